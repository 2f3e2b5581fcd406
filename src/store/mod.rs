//! Persistent state behind a narrow async [`Store`] trait, and its embedded fjall implementation.
//!
//! The trait speaks in domain records (users, sessions), not keys and bytes, so a distributed
//! backend can be added later without touching the server's logic.

mod fjall_store;

pub use fjall_store::FjallStore;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::blocking::BlockingError;
use crate::protocol::Username;

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

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed.
    #[error("storage engine error: {0}")]
    Engine(#[from] fjall::Error),
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
    Encode(#[from] rmp_serde::encode::Error),
    /// The blocking pool refused or lost the job.
    #[error(transparent)]
    Blocking(#[from] BlockingError),
    /// A lock inside the store was poisoned by a panic.
    #[error("store lock poisoned")]
    Poisoned,
}

/// What the server needs to persist. Every write is durable when its future resolves.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether an account named `username` exists.
    async fn user_exists(&self, username: &Username) -> Result<bool, StoreError>;

    /// Creates an account unless the name is taken; exactly one of racing callers succeeds.
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

    /// Makes everything written so far durable (called at shutdown).
    async fn flush(&self) -> Result<(), StoreError>;
}
