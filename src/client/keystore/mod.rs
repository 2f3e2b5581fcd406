//! The client's private key material and end-to-end sessions, kept in the home directory as
//! one MessagePack file (`keystore.msgpack`, mode 0600). Every change is a locked
//! load-modify-save: an exclusive lock on `keystore.lock` across processes, written atomically,
//! so two `sfc` processes on one home directory take turns and never corrupt it.
//!
//! `state` has what the file holds ([`KeyState`]); `format` reads the files of older clients.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::home::{HomeError, write_private};

mod format;
mod state;

pub use state::{
    DeviceId, DeviceSessions, FIRST_DEVICE, HistoryEntry, Incoming, KeyState, MAX_HISTORY,
    MAX_HISTORY_BYTES, MAX_KEPT_SESSIONS, MAX_QUARANTINE, MAX_QUARANTINE_BYTES, Outgoing, Pinned,
    Quarantined, SealedCopy, Trust,
};

const KEYSTORE_FILE: &str = "keystore.msgpack";
const LOCK_FILE: &str = "keystore.lock";
const RECEIVE_LOCK_FILE: &str = "receive.lock";

/// The keystore of one home directory.
#[derive(Debug, Clone)]
pub struct Keystore {
    dir: PathBuf,
}

/// An exclusive lock on the keystore, released when dropped.
struct Locked {
    _file: File,
}

/// The right to receive for a home directory (one process at a time), released when dropped
/// or when the process ends, however it ends.
#[derive(Debug)]
pub struct ReceiveLock {
    _file: File,
}

impl Keystore {
    /// The keystore in `dir` (the home directory).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The home directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<Locked, HomeError> {
        let path = self.dir.join(LOCK_FILE);
        let io = |source| HomeError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        file.lock().map_err(io)?;
        Ok(Locked { _file: file })
    }

    /// Takes the home's receive lock without waiting: `None` if another process holds it.
    pub fn lock_receiving(&self) -> Result<Option<ReceiveLock>, HomeError> {
        let path = self.dir.join(RECEIVE_LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| HomeError::Io {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ReceiveLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(source)) => Err(HomeError::Io { path, source }),
        }
    }

    fn load(&self) -> Result<Option<KeyState>, HomeError> {
        let path = self.dir.join(KEYSTORE_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HomeError::Io { path, source }),
        };
        rmp_serde::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HomeError::Corrupt {
                path,
                reason: e.to_string(),
            })
    }

    fn save(&self, state: &KeyState) -> Result<(), HomeError> {
        let path = self.dir.join(KEYSTORE_FILE);
        let bytes = rmp_serde::to_vec_named(state).map_err(|e| HomeError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_private(&path, &bytes)
    }

    /// Runs `change` on the state under the lock and saves the result (if `change` succeeds).
    /// `change` gets `None` when no keys exist yet and may create them.
    pub fn update<T, E: From<HomeError>>(
        &self,
        change: impl FnOnce(&mut Option<KeyState>) -> Result<T, E>,
    ) -> Result<T, E> {
        let _lock = self.lock()?;
        let mut state = self.load()?;
        let result = change(&mut state)?;
        if let Some(state) = &state {
            self.save(state)?;
        }
        Ok(result)
    }

    /// Deletes the keystore (private keys, sessions, history) under the lock: for an account
    /// that no longer exists. Nothing to delete is not an error.
    pub fn remove(&self) -> Result<(), HomeError> {
        let _lock = self.lock()?;
        let path = self.dir.join(KEYSTORE_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HomeError::Io { path, source }),
        }
    }

    /// Reads the state under the lock without changing it.
    pub fn read<T>(&self, read: impl FnOnce(Option<&KeyState>) -> T) -> Result<T, HomeError> {
        let _lock = self.lock()?;
        let state = self.load()?;
        Ok(read(state.as_ref()))
    }

    /// [`Self::update`] on a blocking thread, for async callers: the file lock may wait for
    /// another `sfc` process, and the file I/O must not hold up the runtime.
    pub async fn update_async<T, E>(
        &self,
        change: impl FnOnce(&mut Option<KeyState>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<HomeError> + Send + 'static,
    {
        let keystore = self.clone();
        tokio::task::spawn_blocking(move || keystore.update(change))
            .await
            .unwrap_or_else(|e| Err(HomeError::Task(e.to_string()).into()))
    }

    /// [`Self::read`] on a blocking thread, for async callers.
    pub async fn read_async<T: Send + 'static>(
        &self,
        read: impl FnOnce(Option<&KeyState>) -> T + Send + 'static,
    ) -> Result<T, HomeError> {
        let keystore = self.clone();
        tokio::task::spawn_blocking(move || keystore.read(read))
            .await
            .unwrap_or_else(|e| Err(HomeError::Task(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::{IdentityKeyPair, PrekeyStore};
    use crate::protocol::MessageId;

    fn state() -> KeyState {
        let identity = IdentityKeyPair::generate().unwrap();
        let prekeys = PrekeyStore::generate(&identity, 2).unwrap();
        KeyState::new("alice", &identity, prekeys, 1)
    }

    /// While another holder (here a thread; usually another `sfc`) has the keystore's lock,
    /// an async caller waits on a blocking thread: the runtime, even a single-threaded one,
    /// goes on running its other tasks.
    #[tokio::test(flavor = "current_thread")]
    async fn waiting_for_the_lock_does_not_hold_up_the_runtime() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        let keystore = Keystore::new(dir.path());
        keystore
            .update(|s| {
                *s = Some(state());
                Ok::<_, HomeError>(())
            })
            .unwrap();
        let (held, is_held) = std::sync::mpsc::channel();
        let holder = {
            let keystore = keystore.clone();
            std::thread::spawn(move || {
                keystore.read(|_| {
                    held.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                })
            })
        };
        is_held.recv().unwrap();
        let ticks = Arc::new(AtomicU32::new(0));
        let ticker = {
            let ticks = Arc::clone(&ticks);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let name = keystore
            .read_async(|s| s.map(|s| s.username.clone()))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("alice"));
        let ticked = ticks.load(Ordering::SeqCst);
        assert!(
            ticked >= 5,
            "the runtime ticked {ticked} times while the lock was awaited"
        );
        ticker.abort();
        holder.join().unwrap().unwrap();
    }

    #[test]
    fn the_quarantine_and_the_history_stay_within_their_bounds() {
        let mut state = state();
        for n in 0..30u8 {
            state.quarantine(Quarantined {
                id: MessageId([n; 16]),
                from: "mallory".into(),
                sent_at: 0,
                kind: "text".into(),
                reason: "decryption failed".into(),
                body: vec![0; 60 * 1024],
            });
        }
        let bytes: usize = state.quarantine.iter().map(|q| q.body.len()).sum();
        assert!(bytes <= MAX_QUARANTINE_BYTES, "{bytes}");
        assert_eq!(
            state.quarantine.back().map(|q| q.id),
            Some(MessageId([29; 16]))
        );
        for n in 0..(MAX_HISTORY as u32 + 50) {
            state.remember(HistoryEntry {
                peer: "bob".into(),
                outgoing: n % 2 == 0,
                id: MessageId([0; 16]),
                at: u64::from(n),
                text: "x".repeat(2000),
                file: None,
                resent: false,
                copy: false,
            });
        }
        let text: usize = state.history.iter().map(|e| e.text.len()).sum();
        assert!(state.history.len() <= MAX_HISTORY && text <= MAX_HISTORY_BYTES);
        assert_eq!(
            state.history.back().map(|e| e.at),
            Some(u64::from(MAX_HISTORY as u32 + 49))
        );
    }

    #[test]
    fn the_outbox_is_saved_and_a_keystore_from_before_it_loads_with_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Keystore::new(dir.path());
        let queued = Outgoing {
            to: "bob".into(),
            id: MessageId([7; 16]),
            kind: "text".into(),
            copies: vec![SealedCopy {
                device: 1,
                own: false,
                envelope: vec![1, 2, 3],
            }],
            text: Some("hi".into()),
            plaintext: None,
        };
        store
            .update(|s| -> Result<(), HomeError> {
                let mut fresh = state();
                fresh.outbox.push_back(queued.clone());
                *s = Some(fresh);
                Ok(())
            })
            .unwrap();
        let saved = store
            .read(|s| s.map(|s| s.outbox.iter().cloned().collect::<Vec<_>>()))
            .unwrap()
            .unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(
            (saved[0].id, saved[0].copies.clone()),
            (queued.id, queued.copies.clone())
        );

        // The same state as a keystore written before the outbox existed: no such field.
        let bytes = rmp_serde::to_vec_named(&state()).unwrap();
        let rmpv::Value::Map(fields) = rmpv::decode::read_value(&mut &bytes[..]).unwrap() else {
            panic!("a keystore is a map");
        };
        let old: Vec<_> = fields
            .into_iter()
            .filter(|(k, _)| k.as_str() != Some("outbox"))
            .collect();
        let mut old_bytes = Vec::new();
        rmpv::encode::write_value(&mut old_bytes, &rmpv::Value::Map(old)).unwrap();
        let loaded: KeyState = rmp_serde::from_slice(&old_bytes).unwrap();
        assert!(loaded.outbox.is_empty());
        assert_eq!(loaded.username, "alice");
    }

    /// A file message keeps its plaintext in the outbox, the unshown list and the history;
    /// a text message writes none of these fields, so older clients read it as before.
    #[test]
    fn file_plaintexts_are_saved_and_absent_for_texts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Keystore::new(dir.path());
        let file = Outgoing {
            to: "bob".into(),
            id: MessageId([8; 16]),
            kind: "file".into(),
            copies: Vec::new(),
            text: None,
            plaintext: Some(vec![0x80]),
        };
        let text = Outgoing {
            id: MessageId([9; 16]),
            kind: "text".into(),
            text: Some("hi".into()),
            plaintext: None,
            ..file.clone()
        };
        let incoming = Incoming {
            id: MessageId([1; 16]),
            from: "bob".into(),
            to: None,
            sent_at: 1,
            text: "a.txt".into(),
            warning: None,
            file: Some(vec![0x81]),
            saved: Some("/downloads/a.txt".into()),
        };
        store
            .update(|s| -> Result<(), HomeError> {
                let mut fresh = state();
                fresh.outbox.extend([file.clone(), text.clone()]);
                fresh.unshown.push_back(incoming.clone());
                fresh.remember(HistoryEntry {
                    peer: "bob".into(),
                    outgoing: false,
                    id: MessageId([1; 16]),
                    at: 1,
                    text: "file: a.txt".into(),
                    file: Some(vec![0x81]),
                    resent: false,
                    copy: false,
                });
                *s = Some(fresh);
                Ok(())
            })
            .unwrap();
        let (outbox, unshown, history) = store
            .read(|s| {
                s.map(|s| {
                    let outbox: Vec<_> = s.outbox.iter().cloned().collect();
                    (outbox, s.unshown.clone(), s.history.clone())
                })
            })
            .unwrap()
            .unwrap();
        assert_eq!(outbox[0].plaintext, Some(vec![0x80]));
        assert_eq!(
            (outbox[1].plaintext.clone(), outbox[1].text.clone()),
            (None, Some("hi".into()))
        );
        assert_eq!(unshown.back(), Some(&incoming));
        assert_eq!(
            history.back().and_then(|h| h.file.clone()),
            Some(vec![0x81])
        );
        let bytes = rmp_serde::to_vec_named(&text).unwrap();
        let rmpv::Value::Map(fields) = rmpv::decode::read_value(&mut &bytes[..]).unwrap() else {
            panic!("an outgoing message is a map");
        };
        assert!(fields.iter().all(|(k, _)| k.as_str() != Some("plaintext")));
    }

    /// A device just linked holds the account's identity and the contacts the existing device
    /// pinned (and verified), and no session yet.
    #[test]
    fn a_linked_device_starts_from_the_payload() {
        use crate::e2e::LinkPayload;
        use crate::e2e::link::LinkContact;
        use crate::protocol::Username;

        let identity = IdentityKeyPair::from_seed(&[4; 32]);
        let bob = IdentityKeyPair::from_seed(&[5; 32]).public();
        let carol = IdentityKeyPair::from_seed(&[6; 32]).public();
        let payload = LinkPayload {
            account: Username::parse("alice").unwrap(),
            identity: IdentityKeyPair::from_seed(&[4; 32]),
            contacts: vec![
                LinkContact {
                    username: Username::parse("bob").unwrap(),
                    identity_key: bob,
                    verified: true,
                },
                LinkContact {
                    username: Username::parse("carol").unwrap(),
                    identity_key: carol,
                    verified: false,
                },
            ],
        };
        let prekeys = PrekeyStore::generate(&identity, 2).unwrap();
        let state = KeyState::linked(&payload, 2, prekeys, 9);
        assert_eq!((state.username.as_str(), state.device), ("alice", 2));
        assert_eq!(state.identity().public(), identity.public());
        assert_eq!(state.pinned["bob"], Pinned(*bob.as_bytes()));
        assert_eq!(state.pinned["carol"], Pinned(*carol.as_bytes()));
        assert!(state.trust_of("bob").verified && !state.trust_of("carol").verified);
        assert!(state.device_sessions.is_empty() && state.outbox.is_empty());
    }
}
