//! Persistent state behind a narrow async [`Store`] trait, and its embedded fjall implementation.
//!
//! The trait speaks in domain records (users, sessions), not keys and bytes, so a distributed
//! backend can be added later without touching the server's logic.

mod blobs;
mod data_dir;
mod devices;
mod fjall_devices;
mod fjall_keys;
mod fjall_messages;
mod fjall_open;
mod fjall_store;
mod groups;
mod inbox_writer;
mod key_packages;
mod migrate;
mod outage;
mod sender_shares;
mod sent_records;
mod shared_bodies;
mod user_ids;

pub use blobs::{BlobCreated, BlobDevice, BlobId, BlobQuota, BlobRecord, NewBlob};
pub use data_dir::DataDirError;
pub use fjall_devices::MAX_DEVICE_NAME;
pub use fjall_store::{DEFAULT_HOLD, DEFAULT_MAX_PENDING, FjallStore, StoreOptions};
pub use groups::{GroupCreated, GroupMemberRecord, GroupRecord};
pub use key_packages::{
    KeyPackageCounts, KeyPackageUpload, MAX_KEY_PACKAGES, NewKeyPackage, TakenKeyPackage,
    TakenKeyPackages,
};
pub use sender_shares::SenderShare;
pub use shared_bodies::{KeyspaceBytes, MessageFootprint};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::blocking::BlockingError;
pub use crate::protocol::DeviceId;
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
    /// The device it is a session of (1 in records from before devices).
    #[serde(default = "first_device")]
    pub device: DeviceId,
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

/// Current devices an account may have at once.
pub const MAX_DEVICES: usize = 8;

/// The name of device 1 (the device that signed up, or that an account from before devices
/// had).
pub const FIRST_DEVICE_NAME: &str = "first device";

/// One of an account's current devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Its id in the account (never reused).
    pub id: DeviceId,
    /// The name given when it was linked (device 1: [`FIRST_DEVICE_NAME`]).
    pub name: String,
    /// When it was added, seconds since the Unix epoch.
    pub added_at: u64,
    /// When it was last seen connected (coarse; 0 if never), seconds since the Unix epoch.
    pub last_seen: u64,
}

/// One device's published prekeys (its account's identity key is kept apart, and its
/// one-time prekeys too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeys {
    /// Current signed prekey.
    pub signed_prekey: SignedPrekey,
    /// Last-resort prekey, handed out when no one-time prekey is left.
    pub last_resort: SignedPrekey,
}

/// One copy of a message: the body sealed for one device.
#[derive(Debug, Clone)]
pub struct Copy {
    /// Whose device it goes to.
    pub recipient: Username,
    /// Which of their devices.
    pub device: DeviceId,
    /// The sealed body (opaque to the server).
    pub body: Vec<u8>,
}

/// A message to append: every copy of it, stored together or not at all.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Who sent it.
    pub sender: Username,
    /// The device it was sent from.
    pub sender_device: DeviceId,
    /// The addressee (copies to the sender's own devices name it in [`StoredMessage::to`]).
    pub to: Username,
    /// The sender's id for it.
    pub id: MessageId,
    /// The sender's `kind` (opaque to the server).
    pub kind: String,
    /// Its copies, each to a distinct (recipient, device); at least one.
    pub copies: Vec<Copy>,
    /// When the server received it, seconds since the Unix epoch.
    pub sent_at: u64,
    /// When it is deleted if still undelivered, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Where one copy of a message was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// Whose device.
    pub recipient: Username,
    /// Which device.
    pub device: DeviceId,
    /// Its seq in that device's inbox.
    pub seq: u64,
}

/// A callback of [`AppendHooks`], given where every copy was placed (in copy order).
pub type PlacedHook = Box<dyn FnOnce(&[Placed]) + Send>;

/// Callbacks of one [`Store::append`], called only if the message is stored, on the inbox
/// writer's thread (they must be quick and must not block).
#[derive(Default)]
pub struct AppendHooks {
    /// Once the copies' places in their inboxes are decided, before they are durable.
    pub ordered: Option<PlacedHook>,
    /// Once they are durable, whether or not the caller is still waiting for the append.
    pub synced: Option<PlacedHook>,
    /// Every copy's device is online, so its acknowledgement may come within the store's
    /// `hold` window: the message may be held instead of written at once (a message to an
    /// offline device is written at once, so its `sent` does not wait for the window).
    pub hold: bool,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Every copy is stored durably.
    Stored {
        /// Each copy's seq in its inbox, in copy order.
        seqs: Vec<u64>,
    },
    /// The sender had already sent this id; nothing new was stored.
    Duplicate,
    /// This device's inbox is full; nothing of the message was stored.
    InboxFull {
        /// Whose inbox.
        recipient: Username,
        /// Which device's.
        device: DeviceId,
    },
    /// The sender already holds its whole share of this device's inbox (messages or bytes,
    /// [`SenderShare`]); nothing of the message was stored.
    SenderQuota {
        /// Whose inbox.
        recipient: Username,
        /// Which device's.
        device: DeviceId,
    },
}

fn first_device() -> DeviceId {
    1
}

// serde's `skip_serializing_if` hands a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_first_device(device: &DeviceId) -> bool {
    *device == 1
}

/// A copy of a message waiting in a device's inbox. Device 1 and "no addressee" are left out
/// of the stored form (records from before devices have neither, and read back as these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its sequence number in the inbox.
    pub seq: u64,
    /// The sender's id for it.
    pub id: MessageId,
    /// Who sent it.
    pub from: Username,
    /// The device it was sent from.
    #[serde(default = "first_device", skip_serializing_if = "is_first_device")]
    pub from_device: DeviceId,
    /// The addressee, on a copy for one of the sender's own devices; `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Username>,
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

/// Where a sent message went, kept for deduplication and `unsend` while no copy of it was
/// acknowledged (then replaced by a marker that names no recipient, until it expires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRecord {
    /// Every copy, in copy order.
    pub copies: Vec<Placed>,
    /// When the record (and the message, if undelivered) expires.
    pub expires_at: u64,
}

/// What a bundle fetch hands out for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenDeviceBundle {
    /// The device.
    pub device: DeviceId,
    /// Its published prekeys.
    pub keys: DeviceKeys,
    /// One of its one-time prekeys, now deleted from the store; `None` when none was left.
    pub one_time_prekey: Option<OneTimePrekey>,
    /// Its one-time prekeys still stored after this fetch.
    pub remaining: u32,
}

/// What a bundle fetch hands out: the account's identity and one entry per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenBundles {
    /// The account's identity key.
    pub identity: IdentityKeyBytes,
    /// One entry per requested current device that has keys, ascending.
    pub devices: Vec<TakenDeviceBundle>,
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
    /// A message (or a key upload) names a device the account does not have (now).
    #[error("{0:?} has no device {1}")]
    UnknownDevice(Username, DeviceId),
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

    /// The account's current devices, ascending by id; empty if there is no such account.
    async fn devices(&self, user: &Username) -> Result<Vec<DeviceRecord>, StoreError>;

    /// Adds a device (synced) with a fresh inbox and returns its id, never used before in the
    /// account. [`StoreError::Limit`] if the account has [`MAX_DEVICES`];
    /// [`StoreError::UnknownUser`] if there is no such account.
    async fn add_device(
        &self,
        user: &Username,
        name: String,
        now: u64,
    ) -> Result<DeviceId, StoreError>;

    /// Removes a device: its inbox, keys, one-time prekeys, sessions and record. Returns the
    /// digests of its deleted sessions, or `None` if it is not a current device. Its id and
    /// its inbox's id are never given again.
    async fn remove_device(
        &self,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError>;

    /// Notes that the device was seen at `now` (not synced: it may be lost in a crash). A
    /// device that is not current is ignored.
    async fn touch_device(
        &self,
        user: &Username,
        device: DeviceId,
        now: u64,
    ) -> Result<(), StoreError>;

    /// The account's identity key, if one was published.
    async fn identity(&self, user: &Username) -> Result<Option<IdentityKeyBytes>, StoreError>;

    /// Stores what is given for `device` (synced): the account's identity, the device's
    /// prekeys (replacing earlier ones) and one-time prekeys (added). A *new* identity (one
    /// that differs from the stored one) also removes every other device (inbox, keys,
    /// one-time prekeys, sessions, record) and this device's earlier one-time prekeys: they
    /// belong to the old identity. Returns how many one-time prekeys the device now has.
    /// [`StoreError::UnknownDevice`] if it is not a current device of the account.
    async fn put_keys(
        &self,
        user: &Username,
        device: DeviceId,
        identity: Option<IdentityKeyBytes>,
        keys: Option<DeviceKeys>,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<u32, StoreError>;

    /// The device's published prekeys, if any.
    async fn device_keys(
        &self,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<DeviceKeys>, StoreError>;

    /// Hands out a bundle for each requested current device with keys (every current device
    /// if `devices` is `None`), removing (durably) the one-time prekey each contains, so no
    /// one-time prekey is ever handed out twice, also under concurrent fetches. `None` if the
    /// account has no identity key.
    async fn take_bundles(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<TakenBundles>, StoreError>;

    /// Appends every copy of a message, each to its device's inbox, in one batch of the group
    /// commit: all or none, durable (per the configured [`Durability`]) when this returns.
    /// The sender and every recipient must have accounts ([`StoreError::UnknownUser`]) and
    /// every copy's device must be current ([`StoreError::UnknownDevice`]). Deduplicates by
    /// (sender, id) for the whole message, and checks every copy against its inbox's quota
    /// and the sender's share of it before any is placed. If stored, `hooks.ordered` is called
    /// with every copy's place as soon as they are decided, before they are durable, and
    /// `hooks.synced` once they are durable. A seq is never given to two messages.
    async fn append(&self, message: NewMessage, hooks: AppendHooks)
    -> Result<Appended, StoreError>;

    /// Up to `limit` pending messages in the inbox of `user`'s `device` with `seq > after`,
    /// in order.
    async fn pending(
        &self,
        user: &Username,
        device: DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Deletes these pending messages of `user`'s `device`; returns how many existed. The
    /// first copy of a message to go settles its send record.
    async fn remove_pending(
        &self,
        user: &Username,
        device: DeviceId,
        seqs: Vec<u64>,
        removal: Removal,
    ) -> Result<u64, StoreError>;

    /// Where the message `sender` sent with `id` went, while no copy of it has left its
    /// inbox; `None` once one was acknowledged, unsent or expired (the store then keeps only
    /// that the id was used).
    async fn sent(
        &self,
        sender: &Username,
        id: MessageId,
    ) -> Result<Option<SentRecord>, StoreError>;

    /// Deletes expired inbox entries (of every device) and send records; returns how many
    /// messages went.
    async fn purge_expired_messages(&self, now: u64) -> Result<u64, StoreError>;

    /// Messages pending in all inboxes (every device's): a scan of every inbox key, for the
    /// metrics at start.
    async fn count_pending_messages(&self) -> Result<u64, StoreError>;
    /// Deletes the account `username`: every device's inbox (and no message goes to or from it
    /// from now on), then in one synced write its record, id, devices, keys and one-time
    /// prekeys and sessions,
    /// and a hold on the name until `hold_until` (Unix seconds) during which no one can sign
    /// it up. Messages it sent that wait in other inboxes stay. Returns the
    /// digests of the deleted sessions, or `None` if there is no such account.
    async fn delete_user(
        &self,
        username: &Username,
        hold_until: u64,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError>;

    /// Creates the record of a new blob, atomically with its owner's quota check (every blob
    /// of the owner, complete or partial, counts its whole length), with a snapshot of the
    /// devices that must fetch it: every current device of every reader and the owner's
    /// devices other than `owner_device`. Every reader and the owner must have an account
    /// ([`StoreError::UnknownUser`]). An id the owner already has with this length gives
    /// [`BlobCreated::Existing`] (nothing changed); any other use of a taken id
    /// [`BlobCreated::Taken`]. Synced.
    async fn create_blob(&self, blob: NewBlob, quota: BlobQuota)
    -> Result<BlobCreated, StoreError>;

    /// The blob's record, if there is one.
    async fn blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StoreError>;

    /// Records that `held` bytes of the blob are on disk and synced, at `now` (its last
    /// write); reaching its length completes it (`completed_at`). Synced. `None` if there is
    /// no such blob; [`StoreError::Limit`] if `held` exceeds its length.
    async fn set_blob_held(
        &self,
        id: BlobId,
        held: u64,
        now: u64,
    ) -> Result<Option<BlobRecord>, StoreError>;

    /// Notes that `user`'s `device` is done with the blob (if it is one of the snapshotted
    /// devices; any other is ignored) and returns the record, whose
    /// [`BlobRecord::all_done`] says whether it can go. `None` if there is no such blob.
    async fn ack_blob(
        &self,
        id: BlobId,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<BlobRecord>, StoreError>;

    /// Marks the snapshotted devices that no longer exist (removed devices, deleted accounts)
    /// as done, and returns the record. `None` if there is no such blob.
    async fn settle_blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StoreError>;

    /// Deletes the blob's record (synced); `false` if there was none. Its file is the
    /// caller's to delete, after this.
    async fn delete_blob(&self, id: BlobId) -> Result<bool, StoreError>;

    /// Up to `limit` blob records with ids after `after` (all from the first with `None`),
    /// ascending by id: a sweep pages through every blob with this.
    async fn blobs_after(
        &self,
        after: Option<BlobId>,
        limit: usize,
    ) -> Result<Vec<BlobRecord>, StoreError>;

    /// Stores MLS key packages of a current device (synced): one-time ones added (at most
    /// [`MAX_KEY_PACKAGES`] stored, else [`StoreError::Limit`] and nothing stored), the
    /// last-resort one replaced. [`StoreError::UnknownDevice`] if it is not a current device.
    async fn put_key_packages(
        &self,
        user: &Username,
        device: DeviceId,
        upload: KeyPackageUpload,
    ) -> Result<KeyPackageCounts, StoreError>;

    /// Hands out a key package for each requested current device that has one (every
    /// current device with `None`): a one-time one, deleted durably before this returns
    /// (never handed out twice, also under concurrent fetches), else the last-resort one.
    /// `None` if the account has no identity key.
    async fn take_key_packages(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<TakenKeyPackages>, StoreError>;

    /// Deletes every key package of `user`'s `device` (every device's with `None`), synced.
    async fn remove_key_packages(
        &self,
        user: &Username,
        device: Option<DeviceId>,
    ) -> Result<(), StoreError>;

    /// Stores a new group (synced) unless its name or id is taken.
    async fn create_group(&self, group: GroupRecord) -> Result<GroupCreated, StoreError>;

    /// The group with this name, if any.
    async fn group(&self, name: &Username) -> Result<Option<GroupRecord>, StoreError>;

    /// Replaces an existing group's record (synced); `false` if there is none. A record with
    /// no member and no pending leave deletes the group (name and id released).
    async fn put_group(&self, group: GroupRecord) -> Result<bool, StoreError>;

    /// The groups in which `user` has a leaf or a pending leave, by name.
    async fn groups_of(&self, user: &Username) -> Result<Vec<GroupRecord>, StoreError>;
}
