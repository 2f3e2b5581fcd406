//! The MLS state of one device, in its home directory as one file (`mls.state`, mode 0600):
//! a header (who the device is, its MLS signature key and certification, its groups) and
//! the whole openmls storage map, followed by a SHA-256 of everything before it. Every change
//! is a locked load-change-save (an exclusive lock on `mls.lock`, the file written to a temp
//! file, synced and renamed, the directory synced), so two processes on one home take turns,
//! and nothing is sent or acknowledged before the state that produced it is on disk.
//!
//! Layout: `"SFCMLS\0\1"`, u32-BE header length, header (MessagePack map), u32-BE entry count,
//! per entry u32-BE key length, key, u32-BE value length, value; then the 32-byte digest.
//! Every length is checked against its bound and the bytes left before anything is allocated.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::MlsError;
use crate::client::home::{HomeError, write_private};
use crate::protocol::DeviceId;

/// The state file in the home directory.
pub const STATE_FILE: &str = "mls.state";
/// The lock file that serializes changes across processes.
const LOCK_FILE: &str = "mls.lock";
/// The first bytes of a state file (format version 1).
const MAGIC: &[u8; 8] = b"SFCMLS\x00\x01";
/// Largest state file read (about 3,500 groups of 50 members).
pub const MAX_STATE_LEN: u64 = 256 * 1024 * 1024;
/// Largest header.
const MAX_HEADER_LEN: usize = 16 * 1024 * 1024;
/// Largest storage key (openmls's keys are a label and an id: tens of bytes).
const MAX_KEY_LEN: usize = 64 * 1024;
/// Length of the trailing digest.
const DIGEST_LEN: usize = 32;

/// Who the device is and what it keeps beside openmls's storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Header {
    /// The account.
    pub user: String,
    /// The device.
    pub device: DeviceId,
    /// The device's MLS signature public key (its key pair is in openmls's storage).
    #[serde(with = "serde_bytes")]
    pub signature_key: Vec<u8>,
    /// The certification of that key by the account's identity key.
    #[serde(with = "serde_bytes")]
    pub certification: Vec<u8>,
    /// The groups this device is (or was) in, in the order joined.
    pub groups: Vec<GroupMeta>,
    /// Application messages decrypted and not yet shown, oldest first (their keys are gone:
    /// a crash before showing shows them at the next start instead of losing them).
    #[serde(default)]
    pub unshown: std::collections::VecDeque<KeptMessage>,
}

/// A decrypted group message kept until the application has shown it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptMessage {
    /// The group's name on the server.
    pub group: String,
    /// The sender's message id.
    #[serde(with = "serde_bytes")]
    pub id: Vec<u8>,
    /// The sending account (from its verified MLS credential).
    pub from: String,
    /// The sending device.
    pub from_device: DeviceId,
    /// When the server stored it (Unix seconds).
    pub sent_at: u64,
    /// The server's sequence number of the delivery, to acknowledge once shown.
    pub seq: u64,
    /// The plaintext.
    #[serde(with = "serde_bytes")]
    pub plaintext: Vec<u8>,
}

/// What this device keeps about one group beside openmls's storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GroupMeta {
    /// The MLS group id.
    #[serde(with = "serde_bytes")]
    pub id: Vec<u8>,
    /// The group's name on the server (global there), once known.
    #[serde(default)]
    pub name: Option<String>,
    /// Users who left (a self-remove proposal was seen, or the server said so): any member
    /// may commit the removal of their leaves.
    #[serde(default)]
    pub departed: BTreeSet<String>,
    /// The change behind this device's commit that waits for the server, to redo it if
    /// another commit wins the epoch.
    #[serde(default)]
    pub pending: Option<PendingChange>,
    /// The pending commit as it was posted (saved before it was sent), to post again under
    /// the same message id when the answer was lost with the connection.
    #[serde(default)]
    pub posted: Option<PostedCommit>,
}

/// A commit of this device as posted to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostedCommit {
    /// The message id it was posted under.
    #[serde(with = "serde_bytes")]
    pub message_id: Vec<u8>,
    /// The body: the commit, then the welcome if any.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The welcome's length at the end of the body.
    pub welcome: Option<u64>,
}

/// A change this device committed, kept until the server accepts or refuses the commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingChange {
    /// Adding devices from their key packages (the fetched bytes and the user each is for).
    Add(Vec<(String, serde_bytes::ByteBuf)>),
    /// Removing all the devices of a user.
    Remove(String),
    /// Making a user an admin.
    AddAdmin(String),
    /// Committing proposals (a member leaving).
    CommitProposals,
    /// Updating this device's own leaf (fresh keys).
    Update,
    /// Removing single devices (removed from their accounts), with the revocations that
    /// prove it to the other members.
    RemoveDevices {
        /// The devices, as `(user, device)`.
        members: Vec<(String, crate::protocol::DeviceId)>,
        /// The signed revocations the commit carries.
        revocations: Vec<crate::protocol::groups::DeviceRevocation>,
    },
}

/// A device's whole MLS state, loaded.
pub(super) struct State {
    /// The header.
    pub header: Header,
    /// openmls's provider, whose storage map is what the file holds.
    pub provider: OpenMlsRustCrypto,
}

impl State {
    /// The group's metadata.
    pub fn meta_mut(&mut self, id: &[u8]) -> Result<&mut GroupMeta, MlsError> {
        self.header
            .groups
            .iter_mut()
            .find(|g| g.id == id)
            .ok_or(MlsError::UnknownGroup)
    }

    /// Encodes the state as the file holds it.
    fn encode(&self, path: &Path) -> Result<Vec<u8>, MlsError> {
        let corrupt = |reason: String| MlsError::CorruptState {
            path: path.to_owned(),
            reason,
        };
        let header = rmp_serde::to_vec_named(&self.header).map_err(|e| corrupt(e.to_string()))?;
        let values = self
            .provider
            .storage()
            .values
            .read()
            .map_err(|_| corrupt("the storage lock is poisoned".into()))?;
        let mut entries: Vec<_> = values.iter().collect();
        entries.sort();
        let size: usize = entries.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(MAGIC.len() + 8 + header.len() + size + DIGEST_LEN);
        out.extend_from_slice(MAGIC);
        put_len(&mut out, header.len())?;
        out.extend_from_slice(&header);
        put_len(&mut out, entries.len())?;
        for (key, value) in entries {
            put_len(&mut out, key.len())?;
            out.extend_from_slice(key);
            put_len(&mut out, value.len())?;
            out.extend_from_slice(value);
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        if out.len() as u64 > MAX_STATE_LEN {
            return Err(corrupt("the state outgrew its bound".into()));
        }
        Ok(out)
    }

    /// Decodes a state file, checking every length and the digest.
    pub(super) fn decode(path: &Path, bytes: &[u8]) -> Result<Self, MlsError> {
        let corrupt = |reason: &str| MlsError::CorruptState {
            path: path.to_owned(),
            reason: reason.into(),
        };
        if bytes.len() < MAGIC.len() + DIGEST_LEN || !bytes.starts_with(MAGIC) {
            return Err(corrupt("not an MLS state file"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - DIGEST_LEN);
        if Sha256::digest(body).as_slice() != digest {
            return Err(corrupt("checksum mismatch"));
        }
        let mut rd = Reader(&body[MAGIC.len()..]);
        let header_len = rd
            .len(MAX_HEADER_LEN)
            .ok_or_else(|| corrupt("bad header length"))?;
        let header = rd
            .take(header_len)
            .ok_or_else(|| corrupt("truncated header"))?;
        let header: Header =
            rmp_serde::from_slice(header).map_err(|_| corrupt("undecodable header"))?;
        let count = rd
            .len(usize::MAX)
            .ok_or_else(|| corrupt("bad entry count"))?;
        let provider = OpenMlsRustCrypto::default();
        {
            let mut values = provider
                .storage()
                .values
                .write()
                .map_err(|_| corrupt("the storage lock is poisoned"))?;
            for _ in 0..count {
                let key_len = rd
                    .len(MAX_KEY_LEN)
                    .ok_or_else(|| corrupt("bad key length"))?;
                let key = rd.take(key_len).ok_or_else(|| corrupt("truncated key"))?;
                let value_len = rd
                    .len(usize::MAX)
                    .ok_or_else(|| corrupt("bad value length"))?;
                let value = rd
                    .take(value_len)
                    .ok_or_else(|| corrupt("truncated value"))?;
                if values.insert(key.to_vec(), value.to_vec()).is_some() {
                    return Err(corrupt("a key twice"));
                }
            }
        }
        if !rd.0.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Self { header, provider })
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), MlsError> {
    let len = u32::try_from(len).map_err(|_| MlsError::Mls("a state entry over 4 GiB".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// A cursor over the file's bytes that never reads past them.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// A u32-BE length, at most `max` and at most the bytes left (a count of entries needs at
    /// least 8 bytes each, so it is bounded by the bytes left too).
    fn len(&mut self, max: usize) -> Option<usize> {
        let bytes: [u8; 4] = self.take(4)?.try_into().ok()?;
        let n = u32::from_be_bytes(bytes) as usize;
        (n <= max && n <= self.0.len()).then_some(n)
    }
}

/// The MLS files of one home directory.
#[derive(Debug, Clone)]
pub(super) struct StateFile {
    dir: PathBuf,
}

/// The exclusive lock on a home's MLS state, released when dropped.
pub(super) struct StateLock {
    _file: File,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Waits for the exclusive lock (another process may hold it).
    pub fn lock(&self) -> Result<StateLock, MlsError> {
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
        Ok(StateLock { _file: file })
    }

    /// Reads the state (`None` if there is none yet). Call under the lock.
    pub fn load(&self, _lock: &StateLock) -> Result<Option<State>, MlsError> {
        let path = self.path();
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HomeError::Io { path, source }.into()),
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| HomeError::Io {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_STATE_LEN {
            return Err(MlsError::CorruptState {
                path,
                reason: "larger than its bound".into(),
            });
        }
        State::decode(&path, &bytes).map(Some)
    }

    /// Deletes the state (nothing if there is none). Call under the lock.
    pub fn remove(&self, _lock: &StateLock) -> Result<(), MlsError> {
        let path = self.path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HomeError::Io { path, source }.into()),
        }
    }

    /// Writes the state atomically and durably. Call under the lock.
    pub fn save(&self, _lock: &StateLock, state: &State) -> Result<(), MlsError> {
        let path = self.path();
        let bytes = state.encode(&path)?;
        write_private(&path, &bytes)?;
        Ok(())
    }
}
