//! The embedded [`Store`]: fjall keyspaces in one database directory.
//!
//! Keyspaces: `users` (username → [`UserRecord`]) and `sessions` (token digest →
//! [`SessionRecord`]) here; the key directory in `fjall_keys`; inboxes (written only by the
//! group-commit thread of `inbox_writer`). Values are named MessagePack. Every call runs on the
//! bounded blocking pool; account and key writes are synced (`SyncData`) before they return.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::fjall_keys::KeyDirectory;
use super::inbox_writer::{InboxKeyspaces, InboxWriter, inbox_key, pair_key};
use super::{
    AppendHooks, Appended, Created, Durability, KeysRecord, NewMessage, Removal, SentRecord,
    SessionRecord, Store, StoreError, StoredMessage, TakenBundle, TokenDigest, UserRecord,
};
use crate::blocking::BlockingPool;
use crate::protocol::MessageId;
use crate::protocol::Username;
use crate::protocol::keys::OneTimePrekey;

const USERS: &str = "users";
const SESSIONS: &str = "sessions";

/// How many store calls may run on blocking threads at once.
const CONCURRENT_CALLS: usize = 16;
/// How many may wait for a thread before callers are told the store is saturated.
const MAX_WAITING_CALLS: usize = 4096;

/// Default cap on pending messages per inbox.
pub const DEFAULT_MAX_PENDING: u64 = 10_000;

/// Tunables of the fjall store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How durable an acknowledged message is.
    pub durability: Durability,
    /// Pending messages an inbox may hold before new ones are refused.
    pub max_pending: u64,
    /// Most inbox writes folded into one sync (1 = a sync per message, no group commit).
    pub max_batch: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            max_pending: DEFAULT_MAX_PENDING,
            max_batch: super::inbox_writer::DEFAULT_MAX_BATCH,
        }
    }
}

/// Existing usernames remembered in memory at most (accounts are never deleted, so a name once
/// seen stays valid; past the cap lookups simply go to disk).
const KNOWN_USERS_CACHE: usize = 1_000_000;

/// The fjall-backed store. Cheap to clone.
#[derive(Clone)]
pub struct FjallStore {
    /// Names known to exist: every message send checks its recipient, and that must not cost a
    /// blocking-pool hop each time.
    known_users: Arc<Mutex<std::collections::HashSet<Username>>>,
    inner: Arc<Inner>,
    pool: BlockingPool,
    writer: Arc<InboxWriter>,
}

struct Inner {
    db: Database,
    users: Keyspace,
    sessions: Keyspace,
    /// Serialises check-then-insert in `create_user` so racing signups cannot both win.
    create_user: Mutex<()>,
    directory: KeyDirectory,
    inbox: InboxKeyspaces,
}

impl FjallStore {
    /// Opens (or creates) the database in `dir` with default options.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Opens (or creates) the database in `dir` and starts the inbox writer. Blocking: call
    /// before serving or off the runtime.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::builder(dir).open()?;
        let keyspace = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        let users = keyspace(USERS)?;
        let sessions = keyspace(SESSIONS)?;
        let directory = KeyDirectory {
            db: db.clone(),
            keys: keyspace("keys")?,
            prekeys: keyspace("prekeys")?,
            lock: Mutex::new(()),
        };
        let inbox = InboxKeyspaces {
            db: db.clone(),
            inbox: keyspace("inbox")?,
            sent: keyspace("sent")?,
            meta: keyspace("meta")?,
            contacts: keyspace("contacts")?,
        };
        let writer = InboxWriter::start(
            inbox.clone(),
            options.durability,
            options.max_pending,
            options.max_batch,
        )?;
        Ok(Self {
            known_users: Arc::default(),
            inner: Arc::new(Inner {
                db,
                users,
                sessions,
                create_user: Mutex::new(()),
                directory,
                inbox,
            }),
            pool: BlockingPool::new("store", CONCURRENT_CALLS, MAX_WAITING_CALLS),
            writer: Arc::new(writer),
        })
    }

    fn remember_user(&self, username: &Username) -> Result<(), StoreError> {
        let mut known = self.known_users.lock().map_err(|_| StoreError::Poisoned)?;
        if known.len() < KNOWN_USERS_CACHE {
            known.insert(username.clone());
        }
        Ok(())
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
        if self
            .known_users
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .contains(username)
        {
            return Ok(true);
        }
        let key = username.as_str().to_owned();
        let exists = self.call(move |db| Ok(db.users.contains_key(key)?)).await?;
        if exists {
            self.remember_user(username)?;
        }
        Ok(exists)
    }

    async fn create_user(
        &self,
        username: &Username,
        user: UserRecord,
    ) -> Result<Created, StoreError> {
        let key = username.as_str().to_owned();
        let value = encode(&user)?;
        let created = self
            .call(move |db| {
                let _guard = db.create_user.lock().map_err(|_| StoreError::Poisoned)?;
                if db.users.contains_key(&key)? {
                    return Ok(Created::AlreadyExists);
                }
                db.users.insert(key, value)?;
                db.db.persist(PersistMode::SyncData)?;
                Ok(Created::Created)
            })
            .await?;
        if created == Created::Created {
            self.remember_user(username)?;
        }
        Ok(created)
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

    async fn put_keys(
        &self,
        username: &Username,
        keys: Option<KeysRecord>,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<u32, StoreError> {
        let user = username.clone();
        self.call(move |db| db.directory.put(&user, keys, one_time_prekeys))
            .await
    }

    async fn keys(&self, username: &Username) -> Result<Option<KeysRecord>, StoreError> {
        let user = username.clone();
        self.call(move |db| db.directory.get(&user)).await
    }

    async fn take_bundle(&self, username: &Username) -> Result<Option<TakenBundle>, StoreError> {
        let user = username.clone();
        self.call(move |db| db.directory.take_bundle(&user)).await
    }

    async fn append(
        &self,
        message: NewMessage,
        hooks: AppendHooks,
    ) -> Result<Appended, StoreError> {
        self.writer.append(message, hooks).await
    }

    async fn pending(
        &self,
        username: &Username,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let (start, end) = (
            inbox_key(username, after.saturating_add(1)),
            inbox_key(username, u64::MAX),
        );
        self.call(move |db| {
            let mut messages = Vec::new();
            for entry in db.inbox.inbox.range(start..=end).take(limit) {
                let (_, value) = entry.into_inner()?;
                messages.push(decode::<StoredMessage>("inbox", &value)?);
            }
            Ok(messages)
        })
        .await
    }

    async fn remove_pending(
        &self,
        username: &Username,
        seqs: Vec<u64>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        self.writer.remove(username.clone(), seqs, removal).await
    }

    async fn sent(
        &self,
        sender: &Username,
        id: MessageId,
    ) -> Result<Option<SentRecord>, StoreError> {
        let key = pair_key(sender, &id.0);
        self.call(move |db| match db.inbox.sent.get(key)? {
            Some(bytes) => decode("sent", &bytes).map(Some),
            None => Ok(None),
        })
        .await
    }

    async fn has_written_to(
        &self,
        subject: &Username,
        viewer: &Username,
    ) -> Result<bool, StoreError> {
        let key = pair_key(viewer, subject.as_str().as_bytes());
        self.call(move |db| Ok(db.inbox.contacts.contains_key(key)?))
            .await
    }

    async fn purge_expired_messages(&self, now: u64) -> Result<u64, StoreError> {
        let (expired, forgotten) = self
            .call(move |db| {
                let mut expired: Vec<(Username, u64)> = Vec::new();
                for entry in db.inbox.inbox.iter() {
                    let (key, value) = entry.into_inner()?;
                    let message: StoredMessage = decode("inbox", &value)?;
                    if message.expires_at <= now {
                        let user = key
                            .split(|b| *b == 0)
                            .next()
                            .map(|b| String::from_utf8_lossy(b).into_owned());
                        if let Some(user) = user.and_then(|u| Username::parse(&u).ok()) {
                            expired.push((user, message.seq));
                        }
                    }
                }
                let mut forgotten = Vec::new();
                for entry in db.inbox.sent.iter() {
                    let (key, value) = entry.into_inner()?;
                    let record: SentRecord = decode("sent", &value)?;
                    if record.expires_at <= now {
                        forgotten.push(key.to_vec());
                    }
                }
                Ok((expired, forgotten))
            })
            .await?;
        let mut by_user: std::collections::BTreeMap<Username, Vec<u64>> = Default::default();
        for (user, seq) in expired {
            by_user.entry(user).or_default().push(seq);
        }
        let mut removed = 0;
        for (user, seqs) in by_user {
            removed += self
                .writer
                .remove(user, seqs, Removal::Acknowledged)
                .await?;
        }
        if !forgotten.is_empty() {
            self.writer.forget_sent(forgotten).await?;
        }
        Ok(removed)
    }
}
