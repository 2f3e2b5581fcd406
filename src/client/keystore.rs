//! The client's private key material and end-to-end sessions, kept in the home directory as
//! one MessagePack file (`keystore.msgpack`, mode 0600). Every change is a locked
//! load-modify-save: an exclusive lock on `keystore.lock` across processes, written atomically,
//! so two `sfc` processes on one home directory take turns and never corrupt it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::home::{HomeError, write_private};
use crate::e2e::{IdentityKey, IdentityKeyPair, PrekeyStore, Session};
use crate::protocol::MessageId;

pub use crate::protocol::DeviceId;

/// The device of every account and home from before devices.
pub const FIRST_DEVICE: DeviceId = 1;

const KEYSTORE_FILE: &str = "keystore.msgpack";
const LOCK_FILE: &str = "keystore.lock";
const RECEIVE_LOCK_FILE: &str = "receive.lock";
/// Message ids remembered to drop duplicates (redeliveries after a crash before the ack).
const SEEN_IDS: usize = 10_000;
/// Earlier sessions kept per peer. libsignal keeps 40; each kept session may hold up to
/// `MAX_SKIPPED_KEYS` skipped keys, and the whole keystore is rewritten at every change, so we
/// keep fewer: enough for several restarts and simultaneous starts in a row.
pub const MAX_KEPT_SESSIONS: usize = 8;
/// Messages that could not be opened, kept for the user to look at.
pub const MAX_QUARANTINE: usize = 100;
/// Bytes of their envelopes kept: a sender of unreadable messages cannot make every keystore
/// save write megabytes.
pub const MAX_QUARANTINE_BYTES: usize = 1024 * 1024;
/// Messages kept in the conversation history.
pub const MAX_HISTORY: usize = 500;
/// Bytes of text kept in the conversation history.
pub const MAX_HISTORY_BYTES: usize = 512 * 1024;

/// Everything secret the client keeps.
#[derive(Serialize, Deserialize)]
pub struct KeyState {
    /// The account these keys belong to.
    pub username: String,
    /// This device's id within the account. Absent in keystores from before devices: 1.
    #[serde(default = "first_device")]
    pub device: DeviceId,
    #[serde(with = "serde_bytes")]
    identity_seed: [u8; 32],
    /// Signed, last-resort and one-time prekeys (private halves).
    pub prekeys: PrekeyStore,
    /// When the signed prekey was last rotated, in seconds since the Unix epoch.
    pub signed_prekey_rotated_at: u64,
    /// The session each peer's messages are sealed with (the active one).
    pub sessions: BTreeMap<String, Session>,
    /// Earlier sessions with each peer, newest first, at most [`MAX_KEPT_SESSIONS`]: a message
    /// sealed in one of them (sent before the peer switched, or when both started at once)
    /// still opens. Absent in keystores from before: empty.
    #[serde(default)]
    pub kept: BTreeMap<String, VecDeque<Session>>,
    /// The identity key accepted for each peer (trust on first use, then only by
    /// `sfc trust`): safety numbers are computed from it.
    pub pinned: BTreeMap<String, Pinned>,
    /// What the user decided about each peer's identity: verified in person, or a new key
    /// seen and not accepted yet. Absent in keystores from before: nothing verified.
    #[serde(default)]
    pub trust: BTreeMap<String, Trust>,
    /// (sender, message id) of recent messages, to show each message once.
    seen: VecDeque<(String, MessageId)>,
    /// Messages opened (their ratchet keys are gone) and not yet shown by the application,
    /// oldest first: a crash between opening and showing shows them at the next start
    /// instead of losing them. Absent in keystores from before: empty.
    #[serde(default)]
    pub unshown: VecDeque<Incoming>,
    /// Messages that could not be opened, kept for `sfc quarantine`, oldest first, at most
    /// [`MAX_QUARANTINE`] and [`MAX_QUARANTINE_BYTES`] of envelopes.
    #[serde(default)]
    pub quarantine: VecDeque<Quarantined>,
    /// The recent conversation, both ways, oldest first, bounded by [`MAX_HISTORY`] entries
    /// and [`MAX_HISTORY_BYTES`] of text: what `sfc chat` shows when it opens, and what is
    /// sealed again when a peer asks for a message it could not open.
    #[serde(default)]
    pub history: VecDeque<HistoryEntry>,
    /// Messages sealed and not yet stored by the server, oldest first. A message is sealed
    /// and queued here in one save, so the ratchet never moves past a message that could be
    /// lost; it leaves once the server says `sent` (or refuses it for good). Absent in
    /// keystores from before the outbox: empty.
    #[serde(default)]
    pub outbox: VecDeque<Outgoing>,
}

/// A sealed message waiting in the outbox. Sent again, it is the same bytes under the same id,
/// so the server stores it at most once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outgoing {
    /// The recipient.
    pub to: String,
    /// The message's id.
    pub id: MessageId,
    /// Its `kind`.
    pub kind: String,
    /// The sealed envelope.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

/// A message opened and kept until the application has shown it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The sender's id for it.
    pub id: MessageId,
    /// The sender.
    pub from: String,
    /// When the server stored it (Unix seconds).
    pub sent_at: u64,
    /// The text.
    pub text: String,
    /// A warning to show with it (the sender's identity key changed).
    pub warning: Option<String>,
}

/// A message that could not be opened, as it arrived.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Quarantined {
    /// The sender's id for it.
    pub id: MessageId,
    /// The claimed sender.
    pub from: String,
    /// When the server stored it (Unix seconds).
    pub sent_at: u64,
    /// Its `kind`.
    pub kind: String,
    /// Why it could not be opened.
    pub reason: String,
    /// The envelope as delivered.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// One message of the conversation history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The other side of the conversation.
    pub peer: String,
    /// Sent by this user (`true`) or received.
    pub outgoing: bool,
    /// The message's id.
    pub id: MessageId,
    /// When it was written (sent) or stored by the server (received), Unix seconds.
    pub at: u64,
    /// The text.
    pub text: String,
    /// For an outgoing message: already sealed again once because the peer could not open
    /// it (a message is resent at most once).
    #[serde(default)]
    pub resent: bool,
}

/// What the user decided about a peer's identity key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// The user compared safety numbers in person (`sfc verify`) for the pinned key.
    pub verified: bool,
    /// A different identity key the peer now presents, not accepted yet (`sfc trust`).
    pub changed_to: Option<Pinned>,
}

/// A peer's identity key as first seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned(#[serde(with = "serde_bytes")] pub [u8; 32]);

fn first_device() -> DeviceId {
    FIRST_DEVICE
}

impl KeyState {
    /// New keys for `username`'s first device (the one that signs up).
    pub fn new(username: &str, identity: &IdentityKeyPair, prekeys: PrekeyStore, now: u64) -> Self {
        Self::for_device(username, FIRST_DEVICE, identity, prekeys, now)
    }

    /// New keys for `username`'s device `device` (a linked device, with the account's
    /// identity).
    pub fn for_device(
        username: &str,
        device: DeviceId,
        identity: &IdentityKeyPair,
        prekeys: PrekeyStore,
        now: u64,
    ) -> Self {
        Self {
            username: username.to_owned(),
            device,
            identity_seed: *identity.expose_seed(),
            prekeys,
            signed_prekey_rotated_at: now,
            sessions: BTreeMap::new(),
            kept: BTreeMap::new(),
            pinned: BTreeMap::new(),
            trust: BTreeMap::new(),
            seen: VecDeque::new(),
            unshown: VecDeque::new(),
            quarantine: VecDeque::new(),
            history: VecDeque::new(),
            outbox: VecDeque::new(),
        }
    }

    /// The identity key pair.
    pub fn identity(&self) -> IdentityKeyPair {
        IdentityKeyPair::from_seed(&self.identity_seed)
    }

    /// Whether this message was already shown.
    pub fn seen(&self, from: &str, id: MessageId) -> bool {
        self.seen.iter().any(|(f, i)| *i == id && f == from)
    }

    /// Remembers a shown message.
    pub fn mark_seen(&mut self, from: &str, id: MessageId) {
        if self.seen.len() >= SEEN_IDS {
            self.seen.pop_front();
        }
        self.seen.push_back((from.to_owned(), id));
    }

    /// Forgets that a message was seen (its handling was undone: it is to be handled again
    /// when it is delivered again).
    pub fn unsee(&mut self, from: &str, id: MessageId) {
        self.seen.retain(|(f, i)| !(*i == id && f == from));
    }

    /// Records that `peer` presents `key`: pins it if nothing is pinned yet (trust on first
    /// use); if another key is pinned, keeps the pinned one and records `key` as a change not
    /// accepted yet. Returns whether `key` differs from the pinned key.
    pub fn saw_identity(&mut self, peer: &str, key: &IdentityKey) -> bool {
        let new = Pinned(*key.as_bytes());
        match self.pinned.get(peer) {
            None => {
                self.pinned.insert(peer.to_owned(), new);
                false
            }
            Some(pinned) if *pinned == new => {
                if let Some(trust) = self.trust.get_mut(peer) {
                    trust.changed_to = None;
                }
                false
            }
            Some(_) => {
                self.trust.entry(peer.to_owned()).or_default().changed_to = Some(new);
                true
            }
        }
    }

    /// The trust state of `peer` (default: unverified, no change).
    pub fn trust_of(&self, peer: &str) -> Trust {
        self.trust.get(peer).copied().unwrap_or_default()
    }

    /// Makes `session` the active one with its peer; the one it replaces is kept (newest
    /// first, the oldest dropped beyond [`MAX_KEPT_SESSIONS`]).
    pub fn activate(&mut self, peer: &str, session: Session) {
        if let Some(old) = self.sessions.insert(peer.to_owned(), session) {
            self.keep(peer, old);
        }
    }

    /// Keeps `session` as an earlier session with `peer` (it can open, it does not seal).
    pub fn keep(&mut self, peer: &str, session: Session) {
        let kept = self.kept.entry(peer.to_owned()).or_default();
        kept.push_front(session);
        kept.truncate(MAX_KEPT_SESSIONS);
    }

    /// Ends the active session with `peer` (kept, so what is in flight still opens): the next
    /// message to `peer` starts a fresh one from a new prekey bundle.
    pub fn reset(&mut self, peer: &str) -> bool {
        match self.sessions.remove(peer) {
            Some(old) => {
                self.keep(peer, old);
                true
            }
            None => false,
        }
    }

    /// Adds a message to the conversation history, dropping the oldest beyond the bounds.
    pub fn remember(&mut self, entry: HistoryEntry) {
        self.history.push_back(entry);
        let mut bytes: usize = self.history.iter().map(|e| e.text.len()).sum();
        while self.history.len() > MAX_HISTORY || bytes > MAX_HISTORY_BYTES {
            match self.history.pop_front() {
                Some(old) => bytes -= old.text.len(),
                None => break,
            }
        }
    }

    /// Keeps a message that could not be opened, dropping the oldest beyond the bound.
    pub fn quarantine(&mut self, message: Quarantined) {
        self.quarantine.push_back(message);
        let mut bytes: usize = self.quarantine.iter().map(|q| q.body.len()).sum();
        while self.quarantine.len() > MAX_QUARANTINE || bytes > MAX_QUARANTINE_BYTES {
            match self.quarantine.pop_front() {
                Some(old) => bytes -= old.body.len(),
                None => break,
            }
        }
    }
}

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
                resent: false,
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
            envelope: vec![1, 2, 3],
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
            (saved[0].id, saved[0].envelope.clone()),
            (queued.id, vec![1, 2, 3])
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
}
