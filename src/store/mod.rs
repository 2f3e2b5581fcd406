//! Persistent state behind a narrow async [`Store`] trait, and its embedded fjall implementation.
//!
//! The trait speaks in domain records (users, sessions), not keys and bytes, so a distributed
//! backend can be added later without touching the server's logic.

mod data_dir;
mod fjall_keys;
mod fjall_open;
mod fjall_store;
mod inbox_writer;
mod migrate;
mod outage;
mod sender_shares;
mod sent_records;
mod user_ids;

pub use data_dir::DataDirError;
pub use fjall_store::{DEFAULT_MAX_PENDING, FjallStore, StoreOptions};
pub use sender_shares::SenderShare;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::blocking::BlockingError;
use crate::protocol::keys::{IdentityKeyBytes, OneTimePrekey, SignedPrekey};
use crate::protocol::{MessageId, Username};

/// SHA-256 of a session token: what the store keeps instead of the token itself.
pub type TokenDigest = [u8; 32];

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The argon2id hash of the password, as a PHC string.
    pub password_hash: String,
    /// When the account was created, in seconds since the Unix epoch.
    pub created_at: u64,
}

/// A login session as stored, keyed by the digest of its token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The account the session belongs to.
    pub username: Username,
    /// When it was created, in seconds since the Unix epoch.
    pub created_at: u64,
    /// When it stops being accepted, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// The token digest again, compared in constant time after the lookup.
    #[serde(with = "serde_bytes")]
    pub token_digest: TokenDigest,
}

/// The outcome of [`Store::create_user`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The account was created and is durable.
    Created,
    /// An account with this name already exists; nothing was written.
    AlreadyExists,
}

/// How durable an acknowledged message write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Synced to disk (fsync/fdatasync) before it is acknowledged: survives power loss.
    #[default]
    Sync,
    /// Handed to the operating system before it is acknowledged: survives a crash of the
    /// server process, not of the machine. For benchmarks and disposable deployments.
    Buffered,
}

/// A message to append to its recipient's inbox.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Who sent it.
    pub sender: Username,
    /// Whose inbox it goes to.
    pub recipient: Username,
    /// The sender's id for it.
    pub id: MessageId,
    /// The sender's `kind` (opaque to the server).
    pub kind: String,
    /// The sealed body (opaque to the server).
    pub body: Vec<u8>,
    /// When the server received it, seconds since the Unix epoch.
    pub sent_at: u64,
    /// When it is deleted if still undelivered, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// A callback of [`AppendHooks`], given the message's inbox seq.
pub type SeqHook = Box<dyn FnOnce(u64) + Send>;

/// Callbacks of one [`Store::append`], called only if the message is stored, on the inbox
/// writer's thread (they must be quick and must not block).
#[derive(Default)]
pub struct AppendHooks {
    /// Once the message's place in the inbox is decided, before it is durable.
    pub ordered: Option<SeqHook>,
    /// Once it is durable, whether or not the caller is still waiting for the append.
    pub synced: Option<SeqHook>,
}

/// How durable a [`Store::remove_pending`] must be when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Acknowledged (or expired) messages: the removal is made durable by the next synced
    /// write. Lost in a crash, it only means the message is delivered again, which clients
    /// handle by its id; so acks need not wait for a sync of their own.
    Acknowledged,
    /// Unsent messages: synced before it returns (per the store's [`Durability`]), so an
    /// unsent message never comes back.
    Unsent,
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored durably under this sequence number in the recipient's inbox.
    Stored {
        /// The inbox sequence number.
        seq: u64,
    },
    /// The sender had already sent this id; nothing new was stored.
    Duplicate,
    /// The recipient's inbox is full; nothing was stored.
    InboxFull,
    /// The sender already holds its whole share of the recipient's inbox (messages or bytes,
    /// [`SenderShare`]); nothing was stored.
    SenderQuota,
}

/// A message waiting in an inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its sequence number in the inbox.
    pub seq: u64,
    /// The sender's id for it.
    pub id: MessageId,
    /// Who sent it.
    pub from: Username,
    /// The sender's `kind`.
    pub kind: String,
    /// When the server received it.
    pub sent_at: u64,
    /// When it expires.
    pub expires_at: u64,
    /// The sealed body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Where a sent message went, kept for deduplication and `unsend` while it is pending (then
/// replaced by a marker that names no recipient, until it expires).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRecord {
    /// The recipient.
    pub recipient: Username,
    /// Its sequence number in the recipient's inbox.
    pub seq: u64,
    /// When the record (and the message, if undelivered) expires.
    pub expires_at: u64,
}

/// A user's published public keys (one-time prekeys are kept apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysRecord {
    /// Ed25519 identity key.
    pub identity_key: IdentityKeyBytes,
    /// Current signed prekey.
    pub signed_prekey: SignedPrekey,
    /// Last-resort prekey, handed out when no one-time prekey is left.
    pub last_resort: SignedPrekey,
}

/// What a bundle fetch hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenBundle {
    /// The published keys.
    pub keys: KeysRecord,
    /// A one-time prekey, now deleted from the store; `None` when none was left.
    pub one_time_prekey: Option<OneTimePrekey>,
    /// One-time prekeys still stored after this fetch.
    pub remaining: u32,
}

/// Why a store operation failed.
///
/// Like every error type of the crate, its message carries its cause (one line, fit for a log
/// or a terminal) and it reports no separate `source()`: a chain printer (`anyhow`'s `{:#}`)
/// would otherwise print the cause twice.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed.
    #[error("storage engine error: {0}")]
    Engine(fjall::Error),
    /// Another process holds the data directory's lock (a second server on the same data).
    #[error("another server is using this data directory ({dir})")]
    Locked {
        /// The data directory.
        dir: std::path::PathBuf,
    },
    /// The data directory is unusable (not private, not a directory, not creatable).
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// A stored record could not be decoded (corruption or an incompatible version).
    #[error("corrupt record in `{keyspace}`: {reason}")]
    Corrupt {
        /// Which keyspace held it.
        keyspace: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A record could not be encoded.
    #[error("cannot encode record: {0}")]
    Encode(rmp_serde::encode::Error),
    /// The blocking pool refused or lost the job.
    #[error(transparent)]
    Blocking(#[from] BlockingError),
    /// A lock inside the store was poisoned by a panic.
    #[error("store lock poisoned")]
    Poisoned,
    /// The inbox writer thread has stopped.
    #[error("inbox writer stopped")]
    WriterStopped,
    /// The request breaks a store limit (too many prekeys, ...).
    #[error("{0}")]
    Limit(String),
    /// The store cannot write now (its disk is full or failing) and refused the write: nothing
    /// of it was stored. It recovers by itself when it can write again (see `outage`).
    #[error("the store cannot write now (disk full or failing); retry later")]
    Unavailable,
    /// A message names a sender or recipient without an account.
    #[error("no account named {0:?}")]
    UnknownUser(Username),
}

impl From<fjall::Error> for StoreError {
    fn from(error: fjall::Error) -> Self {
        Self::Engine(error)
    }
}

impl From<rmp_serde::encode::Error> for StoreError {
    fn from(error: rmp_serde::encode::Error) -> Self {
        Self::Encode(error)
    }
}

/// What the server needs to persist. Every write is durable when its future resolves.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the name `username` is taken: an account has it, or a deleted account's name
    /// is still held ([`Store::delete_user`]).
    async fn user_exists(&self, username: &Username) -> Result<bool, StoreError>;

    /// Creates an account unless the name is taken (also by the hold of a deleted account:
    /// [`Created::AlreadyExists`]); exactly one of racing callers succeeds.
    async fn create_user(
        &self,
        username: &Username,
        user: UserRecord,
    ) -> Result<Created, StoreError>;

    /// The account named `username`, if any.
    async fn user(&self, username: &Username) -> Result<Option<UserRecord>, StoreError>;

    /// Stores a session under the digest of its token.
    async fn put_session(&self, session: SessionRecord) -> Result<(), StoreError>;

    /// The session whose token has this digest, if any (expired ones included).
    async fn session(&self, digest: &TokenDigest) -> Result<Option<SessionRecord>, StoreError>;

    /// Deletes the session with this digest; deleting a missing one is not an error.
    async fn delete_session(&self, digest: &TokenDigest) -> Result<(), StoreError>;

    /// Deletes every session that expired before `now`; returns how many went.
    async fn purge_expired_sessions(&self, now: u64) -> Result<usize, StoreError>;

    /// Makes everything written so far durable.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Called once at a clean shutdown, after the last request: makes everything durable
    /// ([`Store::flush`]) and leaves as little as it can for the next start to recover (the
    /// fjall store writes its memtables to tables, so their journals go and a restart does not
    /// replay them).
    async fn close(&self) -> Result<(), StoreError> {
        self.flush().await
    }

    /// Stores a user's public keys (replacing earlier ones) and adds one-time prekeys.
    /// Returns how many one-time prekeys the user now has.
    async fn put_keys(
        &self,
        username: &Username,
        keys: Option<KeysRecord>,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<u32, StoreError>;

    /// The user's published keys, if any.
    async fn keys(&self, username: &Username) -> Result<Option<KeysRecord>, StoreError>;

    /// Hands out the user's bundle, removing (durably) the one-time prekey it contains, so no
    /// one-time prekey is ever handed out twice, also under concurrent fetches.
    async fn take_bundle(&self, username: &Username) -> Result<Option<TakenBundle>, StoreError>;

    /// Appends a message to its recipient's inbox through group commit: durable (per the
    /// configured [`Durability`]) when this returns. Sender and recipient must have accounts
    /// ([`StoreError::UnknownUser`] otherwise: the store checks that they have user ids,
    /// which every account has). Deduplicates by (sender, id) and enforces the per-inbox
    /// quota and each sender's share of it. If the message is stored, `hooks.ordered` is called
    /// with its seq as soon as its place in the inbox is decided, before it is durable, and
    /// `hooks.synced` once it is durable. A seq is never given to two messages.
    async fn append(&self, message: NewMessage, hooks: AppendHooks)
    -> Result<Appended, StoreError>;

    /// Up to `limit` pending messages of `username` with `seq > after`, in order.
    async fn pending(
        &self,
        username: &Username,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Deletes these pending messages of `username`; returns how many existed.
    async fn remove_pending(
        &self,
        username: &Username,
        seqs: Vec<u64>,
        removal: Removal,
    ) -> Result<u64, StoreError>;

    /// Where a message `sender` sent with `id` went, while it is pending; `None` once it was
    /// acknowledged, unsent or expired (the store then keeps only that the id was used).
    async fn sent(
        &self,
        sender: &Username,
        id: MessageId,
    ) -> Result<Option<SentRecord>, StoreError>;

    /// Deletes expired inbox entries and send records; returns how many messages went.
    async fn purge_expired_messages(&self, now: u64) -> Result<u64, StoreError>;

    /// Messages pending in all inboxes: a scan of every inbox key, for the metrics at start.
    async fn count_pending_messages(&self) -> Result<u64, StoreError>;
    /// Deletes the account `username`: its inbox (and no message goes to or from it from now
    /// on), then in one synced write its record, id, keys and one-time prekeys and sessions,
    /// and a hold on the name until `hold_until` (Unix seconds) during which no one can sign
    /// it up. Messages it sent that wait in other inboxes stay. Returns the
    /// digests of the deleted sessions, or `None` if there is no such account.
    async fn delete_user(
        &self,
        username: &Username,
        hold_until: u64,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError>;
}
