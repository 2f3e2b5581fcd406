//! The embedded [`Store`]: fjall keyspaces in one database directory.
//!
//! Keyspaces: `users` (username → [`UserRecord`]) and `sessions` (token digest →
//! [`SessionRecord`]) here; users' numeric ids in `user_ids`; the key directory in
//! `fjall_keys`; inboxes (written only by the group-commit thread of `inbox_writer`). Opening
//! a store of an older format migrates it first (`migrate`). Values are named MessagePack.
//! Every call runs on the bounded blocking pool; account and key writes are synced
//! (`SyncData`) before they return.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::fjall_keys::KeyDirectory;
use super::inbox_writer::{Addressed, InboxKeyspaces, InboxWriter};
use super::user_ids::{UserId, UserIds, decode_id, inbox_key, sent_key};
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

/// The fjall-backed store. Cheap to clone.
#[derive(Clone)]
pub struct FjallStore {
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
    /// Users' ids; the ids of accounts known to exist stay in memory, since every message
    /// send checks its recipient, and that must not cost a blocking-pool hop each time.
    ids: UserIds,
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
        let db = Database::builder(dir).open().map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked {
                dir: dir.to_owned(),
            },
            e => StoreError::Engine(e),
        })?;
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
            inbox: keyspace("inbox_v2")?,
            sent: keyspace("sent_v2")?,
            meta: keyspace("meta")?,
            user_ids: keyspace("user_ids")?,
        };
        let ids = UserIds::open(keyspace("user_ids")?, keyspace("user_names")?)?;
        super::migrate::run(&db, &users, &inbox.meta, &ids, &inbox.inbox, &inbox.sent)?;
        let writer = InboxWriter::start(
            inbox.clone(),
            options.durability,
            options.max_pending,
            options.max_batch,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                users,
                sessions,
                create_user: Mutex::new(()),
                ids,
                directory,
                inbox,
            }),
            pool: BlockingPool::new("store", CONCURRENT_CALLS, MAX_WAITING_CALLS),
            writer: Arc::new(writer),
        })
    }

    /// The id of `name`, from memory or else the store; `None` if it has none (no account,
    /// or at most records migrated from an older format without one: `migrate`).
    async fn user_id(&self, name: &Username) -> Result<Option<UserId>, StoreError> {
        if let Some(id) = self.inner.ids.cached(name)? {
            return Ok(Some(id));
        }
        let name = name.clone();
        self.call(move |db| {
            let id = db.ids.stored(&name)?;
            if let Some(id) = id
                && db.users.contains_key(name.as_str())?
            {
                db.ids.remember(&name, id)?;
            }
            Ok(id)
        })
        .await
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
        // Only accounts' ids are remembered.
        if self.inner.ids.cached(username)?.is_some() {
            return Ok(true);
        }
        let name = username.clone();
        self.call(move |db| {
            if !db.users.contains_key(name.as_str())? {
                return Ok(false);
            }
            if let Some(id) = db.ids.stored(&name)? {
                db.ids.remember(&name, id)?;
            }
            Ok(true)
        })
        .await
    }

    async fn create_user(
        &self,
        username: &Username,
        user: UserRecord,
    ) -> Result<Created, StoreError> {
        let name = username.clone();
        let value = encode(&user)?;
        self.call(move |db| {
            let _guard = db.create_user.lock().map_err(|_| StoreError::Poisoned)?;
            if db.users.contains_key(name.as_str())? {
                return Ok(Created::AlreadyExists);
            }
            // The account and its id in one synced write.
            let mut batch = db.db.batch().durability(Some(PersistMode::SyncData));
            batch.insert(&db.users, name.as_str(), value);
            let id = db.ids.assign(&mut batch, &name)?;
            batch.commit()?;
            db.ids.remember(&name, id)?;
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
        let unknown = |name: &Username| StoreError::UnknownUser(name.clone());
        let sender = self
            .user_id(&message.sender)
            .await?
            .ok_or_else(|| unknown(&message.sender))?;
        let recipient = self
            .user_id(&message.recipient)
            .await?
            .ok_or_else(|| unknown(&message.recipient))?;
        let message = Addressed {
            message,
            sender,
            recipient,
        };
        self.writer.append(message, hooks).await
    }

    async fn pending(
        &self,
        username: &Username,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let Some(id) = self.user_id(username).await? else {
            return Ok(Vec::new());
        };
        let (start, end) = (
            inbox_key(id, after.saturating_add(1)),
            inbox_key(id, u64::MAX),
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
        let Some(id) = self.user_id(username).await? else {
            return Ok(0);
        };
        self.writer.remove(id, seqs, removal).await
    }

    async fn sent(
        &self,
        sender: &Username,
        id: MessageId,
    ) -> Result<Option<SentRecord>, StoreError> {
        let Some(sender) = self.user_id(sender).await? else {
            return Ok(None);
        };
        let key = sent_key(sender, &id.0);
        // A settled record (its message acknowledged, unsent or expired) no longer says where
        // the message went.
        self.call(move |db| match db.inbox.sent.get(key)? {
            Some(bytes) => super::sent_records::pending_record(&bytes),
            None => Ok(None),
        })
        .await
    }

    async fn purge_expired_messages(&self, now: u64) -> Result<u64, StoreError> {
        let (expired, forgotten) = self
            .call(move |db| {
                let mut expired: Vec<(UserId, u64)> = Vec::new();
                for entry in db.inbox.inbox.iter() {
                    let (key, value) = entry.into_inner()?;
                    let message: StoredMessage = decode("inbox", &value)?;
                    if message.expires_at <= now {
                        let id = key.get(..4).ok_or_else(|| StoreError::Corrupt {
                            keyspace: "inbox",
                            reason: "a key is shorter than a user id".into(),
                        })?;
                        expired.push((decode_id("inbox", id)?, message.seq));
                    }
                }
                let mut by_user: BTreeMap<UserId, Vec<u64>> = BTreeMap::new();
                for (id, seq) in expired {
                    by_user.entry(id).or_default().push(seq);
                }
                let mut forgotten = Vec::new();
                for entry in db.inbox.sent.iter() {
                    let (key, value) = entry.into_inner()?;
                    if super::sent_records::expires_at(&value)? <= now {
                        forgotten.push(key.to_vec());
                    }
                }
                Ok((by_user, forgotten))
            })
            .await?;
        let mut removed = 0;
        for (id, seqs) in expired {
            removed += self.writer.remove(id, seqs, Removal::Acknowledged).await?;
        }
        if !forgotten.is_empty() {
            self.writer.forget_sent(forgotten).await?;
        }
        Ok(removed)
    }
}
