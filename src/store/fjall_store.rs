//! The embedded [`Store`]: fjall keyspaces in one database directory.
//!
//! Keyspaces: `users` (username → [`UserRecord`]) and `sessions` (token digest →
//! [`SessionRecord`]), values in named MessagePack. Every call runs on the bounded blocking pool;
//! writes are synced (`SyncData`) before they return.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Created, SessionRecord, Store, StoreError, TokenDigest, UserRecord};
use crate::blocking::BlockingPool;
use crate::protocol::Username;

const USERS: &str = "users";
const SESSIONS: &str = "sessions";

/// How many store calls may run on blocking threads at once.
const CONCURRENT_CALLS: usize = 16;
/// How many may wait for a thread before callers are told the store is saturated.
const MAX_WAITING_CALLS: usize = 4096;

/// The fjall-backed store. Cheap to clone.
#[derive(Clone)]
pub struct FjallStore {
    inner: Arc<Inner>,
    pool: BlockingPool,
}

struct Inner {
    db: Database,
    users: Keyspace,
    sessions: Keyspace,
    /// Serialises check-then-insert in `create_user` so racing signups cannot both win.
    create_user: Mutex<()>,
}

impl FjallStore {
    /// Opens (or creates) the database in `dir`. Blocking: call before serving or off the runtime.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Database::builder(dir).open()?;
        let users = db.keyspace(USERS, KeyspaceCreateOptions::default)?;
        let sessions = db.keyspace(SESSIONS, KeyspaceCreateOptions::default)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                users,
                sessions,
                create_user: Mutex::new(()),
            }),
            pool: BlockingPool::new("store", CONCURRENT_CALLS, MAX_WAITING_CALLS),
        })
    }

    async fn call<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        self.pool.run(move || job(&inner)).await?
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

fn decode<T: DeserializeOwned>(keyspace: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        keyspace,
        reason: e.to_string(),
    })
}

#[async_trait]
impl Store for FjallStore {
    async fn user_exists(&self, username: &Username) -> Result<bool, StoreError> {
        let key = username.as_str().to_owned();
        self.call(move |db| Ok(db.users.contains_key(key)?)).await
    }

    async fn create_user(
        &self,
        username: &Username,
        user: UserRecord,
    ) -> Result<Created, StoreError> {
        let key = username.as_str().to_owned();
        let value = encode(&user)?;
        self.call(move |db| {
            let _guard = db.create_user.lock().map_err(|_| StoreError::Poisoned)?;
            if db.users.contains_key(&key)? {
                return Ok(Created::AlreadyExists);
            }
            db.users.insert(key, value)?;
            db.db.persist(PersistMode::SyncData)?;
            Ok(Created::Created)
        })
        .await
    }

    async fn user(&self, username: &Username) -> Result<Option<UserRecord>, StoreError> {
        let key = username.as_str().to_owned();
        self.call(move |db| match db.users.get(key)? {
            Some(bytes) => decode(USERS, &bytes).map(Some),
            None => Ok(None),
        })
        .await
    }

    async fn put_session(&self, session: SessionRecord) -> Result<(), StoreError> {
        let value = encode(&session)?;
        self.call(move |db| {
            db.sessions.insert(session.token_digest.to_vec(), value)?;
            db.db.persist(PersistMode::SyncData)?;
            Ok(())
        })
        .await
    }

    async fn session(&self, digest: &TokenDigest) -> Result<Option<SessionRecord>, StoreError> {
        let key = *digest;
        self.call(move |db| match db.sessions.get(key)? {
            Some(bytes) => decode(SESSIONS, &bytes).map(Some),
            None => Ok(None),
        })
        .await
    }

    async fn delete_session(&self, digest: &TokenDigest) -> Result<(), StoreError> {
        let key = *digest;
        self.call(move |db| {
            db.sessions.remove(key.to_vec())?;
            db.db.persist(PersistMode::SyncData)?;
            Ok(())
        })
        .await
    }

    async fn purge_expired_sessions(&self, now: u64) -> Result<usize, StoreError> {
        self.call(move |db| {
            let mut expired = Vec::new();
            for entry in db.sessions.iter() {
                let (key, value) = entry.into_inner()?;
                let session: SessionRecord = decode(SESSIONS, &value)?;
                if session.expires_at <= now {
                    expired.push(key);
                }
            }
            if expired.is_empty() {
                return Ok(0);
            }
            let mut batch = db.db.batch().durability(Some(PersistMode::SyncData));
            for key in &expired {
                batch.remove(&db.sessions, key.clone());
            }
            batch.commit()?;
            Ok(expired.len())
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.call(|db| Ok(db.db.persist(PersistMode::SyncAll)?))
            .await
    }
}
