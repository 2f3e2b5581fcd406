//! The embedded [`Store`]: fjall keyspaces in one database directory.
//!
//! Keyspaces: `users` (username → [`UserRecord`]) and `sessions` (token digest →
//! [`SessionRecord`]) here; users' numeric ids in `user_ids`; devices in `devices` (their
//! operations in `fjall_devices`); the key directory in `fjall_keys`; inboxes (written only by
//! the group-commit thread of `inbox_writer`), one per device (their operations in
//! `fjall_messages`), with the records that copies of one message share (`shared_bodies`);
//! blob metadata in `blobs` and `blob_owners` (`blobs`). Opening a store of an older format
//! migrates it first (`migrate`); opening and reopening after a write outage live in
//! `fjall_open`. Values are named MessagePack.
//! Every call runs on the bounded blocking pool; account and key writes are synced
//! (`SyncData`) before they return.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use fjall::PersistMode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::fjall_open::{Inner, Shared, flush_memtables, watch};
use super::outage::Outage;
use super::sender_shares::SenderShare;
use super::user_ids::{UserId, sent_key};
use super::{
    AppendHooks, Appended, BlobCreated, BlobId, BlobQuota, BlobRecord, Created, DeviceId,
    DeviceKeys, DeviceRecord, Durability, NewBlob, NewMessage, Removal, SentRecord, SessionRecord,
    Store, StoreError, StoredMessage, TakenBundles, TokenDigest, UserRecord,
};
use crate::blocking::BlockingPool;
use crate::protocol::MessageId;
use crate::protocol::Username;
use crate::protocol::keys::{IdentityKeyBytes, OneTimePrekey};

pub(super) const USERS: &str = "users";
pub(super) const SESSIONS: &str = "sessions";
/// Names of deleted accounts → until when (u64 BE, Unix seconds) no one may sign them up.
pub(super) const HELD_NAMES: &str = "held_names";

/// How many store calls may run on blocking threads at once.
const CONCURRENT_CALLS: usize = 16;
/// How many may wait for a thread before callers are told the store is saturated.
const MAX_WAITING_CALLS: usize = 4096;

/// Default cap on pending messages per inbox.
pub const DEFAULT_MAX_PENDING: u64 = 10_000;

/// How long a message waits in memory for its acknowledgements before it is written, by
/// default (see [`StoreOptions::hold`]).
pub const DEFAULT_HOLD: Duration = Duration::from_millis(20);

/// Tunables of the fjall store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How durable an acknowledged message is.
    pub durability: Durability,
    /// Pending messages an inbox may hold before new ones are refused.
    pub max_pending: u64,
    /// Most inbox writes folded into one sync (1 = a sync per message, no group commit).
    pub max_batch: usize,
    /// What one sender may hold of one inbox (by default no more than the inbox's cap).
    pub sender_share: SenderShare,
    /// How long a message may wait in memory for every copy's acknowledgement before it is
    /// written; one acknowledged by then is never written (zero: every message is written at
    /// once). Its sender's `sent` waits for the write or the last acknowledgement.
    pub hold: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            max_pending: DEFAULT_MAX_PENDING,
            max_batch: super::inbox_writer::DEFAULT_MAX_BATCH,
            sender_share: SenderShare::UNLIMITED,
            hold: DEFAULT_HOLD,
        }
    }
}

/// The fjall-backed store. Cheap to clone.
#[derive(Clone)]
pub struct FjallStore {
    pub(super) shared: Arc<Shared>,
    pool: BlockingPool,
}

impl FjallStore {
    /// Opens (or creates) the database in `dir` with default options.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Opens (or creates) the database in `dir` and starts the inbox writer. Blocking: call
    /// before serving or off the runtime.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        super::data_dir::prepare(dir)?;
        let outage = Arc::new(Outage::default());
        let inner = Inner::open(dir, options, &outage, outage.generation(), true)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            options,
            open: RwLock::new(Some(Arc::new(inner))),
            outage,
        });
        let watched = Arc::downgrade(&shared);
        let outage = Arc::clone(&shared.outage);
        std::thread::Builder::new()
            .name("sfc-store-watch".into())
            .spawn(move || watch(&watched, &outage))
            .map_err(|e| StoreError::Limit(format!("cannot start the store watcher: {e}")))?;
        Ok(Self {
            shared,
            pool: BlockingPool::new("store", CONCURRENT_CALLS, MAX_WAITING_CALLS),
        })
    }

    /// Makes everything durable; with `tables`, also writes the memtables to tables so the
    /// next start replays little (a clean stop: `Store::close`). During an outage there is
    /// nothing acknowledged to make durable (every acknowledged write was synced before its
    /// answer), and a stop must not fail for it.
    async fn persist_all(&self, tables: bool) -> Result<(), StoreError> {
        let result = match self.writable() {
            Ok(()) => {
                self.call(move |db| {
                    db.db.persist(PersistMode::SyncAll)?;
                    // Everything is durable now; the tables only spare the next start a replay.
                    if tables && let Err(e) = flush_memtables(&db.db) {
                        tracing::warn!(error = %e, "cannot write the memtables to tables; the next start replays the journals");
                    }
                    Ok(())
                })
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Err(StoreError::Unavailable) => {
                let deferred = self.shared.outage.deferred()?;
                tracing::warn!(
                    lost_acks = deferred.ack_count,
                    lost_sessions = deferred.sessions.len(),
                    "stopping during a store outage: acks and logins made during it are lost \
                     (those messages are delivered again, those users log in again); every \
                     acknowledged message is stored"
                );
                Ok(())
            }
            result => result,
        }
    }

    /// The open database, unless it is being reopened.
    pub(super) fn current(&self) -> Result<Arc<Inner>, StoreError> {
        self.shared
            .open
            .read()
            .map_err(|_| StoreError::Poisoned)?
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Refuses a write at once during an outage: the database is poisoned until reopened.
    pub(super) fn writable(&self) -> Result<(), StoreError> {
        if self.shared.outage.is_down() {
            return Err(StoreError::Unavailable);
        }
        Ok(())
    }

    /// The id of `name`, from memory or else the store; `None` if it has none (no account,
    /// or at most records migrated from an older format without one: `migrate`).
    pub(super) async fn user_id(&self, name: &Username) -> Result<Option<UserId>, StoreError> {
        let inner = self.current()?;
        self.user_id_in(&inner, name).await
    }

    /// [`Self::user_id`] in the database `inner` already taken (one lock less per message).
    pub(super) async fn user_id_in(
        &self,
        inner: &Inner,
        name: &Username,
    ) -> Result<Option<UserId>, StoreError> {
        if let Some(id) = inner.ids.cached(name)? {
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

    pub(super) async fn call<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.current()?;
        let outage = Arc::clone(&self.shared.outage);
        self.pool
            .run(move || {
                let result = job(&inner);
                inner.check(&outage, result)
            })
            .await?
    }

    /// The inbox writer of the open database, if it can write.
    pub(super) fn writer(&self) -> Result<Arc<Inner>, StoreError> {
        self.writable()?;
        let inner = self.current()?;
        if inner.writer.is_none() {
            return Err(StoreError::Unavailable);
        }
        Ok(inner)
    }
}

impl Inner {
    /// Whether `name` belonged to an account deleted less than its hold ago.
    fn is_held(&self, name: &Username, now: u64) -> Result<bool, StoreError> {
        let Some(bytes) = self.held_names.get(name.as_str())? else {
            return Ok(false);
        };
        let until: [u8; 8] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            keyspace: HELD_NAMES,
            reason: "a hold is not 8 bytes".into(),
        })?;
        Ok(u64::from_be_bytes(until) > now)
    }

    /// Deletes `name`'s account records in one synced write (see [`Store::delete_user`]);
    /// returns the digests of its sessions, or `None` if it has no account.
    fn delete_account(
        &self,
        name: &Username,
        hold_until: u64,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError> {
        let _creating = self.create_user.lock().map_err(|_| StoreError::Poisoned)?;
        let _keys = self
            .directory
            .lock
            .lock()
            .map_err(|_| StoreError::Poisoned)?;
        let _devices = self.devices.lock.lock().map_err(|_| StoreError::Poisoned)?;
        if !self.users.contains_key(name.as_str())? {
            return Ok(None);
        }
        let id = self.ids.stored(name)?;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.remove(&self.users, name.as_str());
        batch.insert(&self.held_names, name.as_str(), hold_until.to_be_bytes());
        self.ids.forget(&mut batch, name);
        self.directory.remove_into(&mut batch, name)?;
        self.remove_key_packages_into(&mut batch, name, None)?;
        if let Some(id) = id {
            self.devices.remove_account_into(&mut batch, id)?;
        }
        // Sessions are keyed by token digest: every one is read (a deletion is rare).
        let mut digests = Vec::new();
        for entry in self.sessions.iter() {
            let (key, value) = entry.into_inner()?;
            let session: SessionRecord = decode(SESSIONS, &value)?;
            if session.username == *name {
                batch.remove(&self.sessions, key.to_vec());
                digests.push(session.token_digest);
            }
        }
        batch.commit()?;
        self.ids.forget_cached(name)?;
        if let Some(id) = id {
            self.devices.forget(id)?;
        }
        Ok(Some(digests))
    }
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

pub(super) fn decode<T: DeserializeOwned>(
    keyspace: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        keyspace,
        reason: e.to_string(),
    })
}

#[async_trait]
impl Store for FjallStore {
    async fn user_exists(&self, username: &Username) -> Result<bool, StoreError> {
        // Only accounts' ids are remembered.
        if self.current()?.ids.cached(username)?.is_some() {
            return Ok(true);
        }
        let name = username.clone();
        self.call(move |db| {
            if !db.users.contains_key(name.as_str())? {
                return db.is_held(&name, crate::unix_now());
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
        self.writable()?;
        let name = username.clone();
        let value = encode(&user)?;
        let created_at = user.created_at;
        self.call(move |db| {
            let _guard = db.create_user.lock().map_err(|_| StoreError::Poisoned)?;
            if db.users.contains_key(name.as_str())? || db.is_held(&name, crate::unix_now())? {
                return Ok(Created::AlreadyExists);
            }
            // The account, its id and its device 1 in one synced write (and the end of an
            // expired hold).
            let _devices = db.devices.lock.lock().map_err(|_| StoreError::Poisoned)?;
            let mut batch = db.db.batch().durability(Some(PersistMode::SyncData));
            batch.remove(&db.held_names, name.as_str());
            batch.insert(&db.users, name.as_str(), value);
            let id = db.ids.assign(&mut batch, &name)?;
            let devices = db.first_device_into(&mut batch, id, created_at)?;
            batch.commit()?;
            db.ids.remember(&name, id)?;
            db.devices.remember(id, &devices)?;
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
        if self.shared.outage.defer_session(&session)? {
            return Ok(());
        }
        let value = encode(&session)?;
        self.call(move |db| {
            db.sessions.insert(session.token_digest.to_vec(), value)?;
            db.db.persist(PersistMode::SyncData)?;
            Ok(())
        })
        .await
    }

    async fn session(&self, digest: &TokenDigest) -> Result<Option<SessionRecord>, StoreError> {
        // Sessions are kept in memory only during an outage.
        if self.shared.outage.is_down()
            && let Some(session) = self.shared.outage.deferred_session(digest)?
        {
            return Ok(Some(session));
        }
        let key = *digest;
        self.call(move |db| match db.sessions.get(key)? {
            Some(bytes) => decode(SESSIONS, &bytes).map(Some),
            None => Ok(None),
        })
        .await
    }

    async fn delete_session(&self, digest: &TokenDigest) -> Result<(), StoreError> {
        if self.shared.outage.is_down() && self.shared.outage.forget_session(digest)? {
            return Ok(());
        }
        self.writable()?;
        let key = *digest;
        self.call(move |db| {
            db.sessions.remove(key.to_vec())?;
            db.db.persist(PersistMode::SyncData)?;
            Ok(())
        })
        .await
    }

    async fn purge_expired_sessions(&self, now: u64) -> Result<usize, StoreError> {
        self.writable()?;
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
        self.persist_all(false).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.persist_all(true).await
    }

    async fn devices(&self, user: &Username) -> Result<Vec<DeviceRecord>, StoreError> {
        let user = user.clone();
        self.call(move |db| db.list_devices(&user)).await
    }

    async fn add_device(
        &self,
        user: &Username,
        name: String,
        now: u64,
    ) -> Result<DeviceId, StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| db.add_device(&user, name, now)).await
    }

    async fn remove_device(
        &self,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError> {
        self.remove_device_now(user, device).await
    }

    async fn touch_device(
        &self,
        user: &Username,
        device: DeviceId,
        now: u64,
    ) -> Result<(), StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| db.touch_device(&user, device, now))
            .await
    }

    async fn identity(&self, user: &Username) -> Result<Option<IdentityKeyBytes>, StoreError> {
        let user = user.clone();
        self.call(move |db| db.directory.identity(&user)).await
    }

    async fn put_keys(
        &self,
        user: &Username,
        device: DeviceId,
        identity: Option<IdentityKeyBytes>,
        keys: Option<DeviceKeys>,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<u32, StoreError> {
        self.put_keys_now(user, device, identity, keys, one_time_prekeys)
            .await
    }

    async fn device_keys(
        &self,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<DeviceKeys>, StoreError> {
        let user = user.clone();
        self.call(move |db| db.directory.device_keys(&user, device))
            .await
    }

    async fn take_bundles(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<TakenBundles>, StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| db.take_bundles(&user, devices)).await
    }

    async fn append(
        &self,
        message: NewMessage,
        hooks: AppendHooks,
    ) -> Result<Appended, StoreError> {
        self.append_now(message, hooks).await
    }

    async fn pending(
        &self,
        user: &Username,
        device: DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.pending_now(user, device, after, limit).await
    }

    async fn remove_pending(
        &self,
        user: &Username,
        device: DeviceId,
        seqs: Vec<u64>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        self.remove_pending_now(user, device, seqs, removal).await
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
        // A settled record (a copy of its message acknowledged, unsent or expired) no longer
        // says where the message went.
        self.call(move |db| match db.inbox.sent.get(key)? {
            Some(bytes) => super::sent_records::pending_record(&bytes),
            None => Ok(None),
        })
        .await
    }

    async fn delete_user(
        &self,
        username: &Username,
        hold_until: u64,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError> {
        let Some(id) = self.user_id(username).await? else {
            return Ok(None);
        };
        // The inboxes first: if what follows fails, the account is still there (with empty
        // inboxes) and its owner can try again.
        let name = username.clone();
        let devices = self
            .call(move |db| Ok(db.devices.read(id)?.devices))
            .await?;
        if devices.is_empty() {
            // Not one device (a record from a migration that never wrote one): its inbox is
            // still device 1's.
            self.drop_device_inbox(username, 1, id, Some(id)).await?;
        }
        for (device, record) in devices {
            self.drop_device_inbox(username, device, record.inbox_id, Some(id))
                .await?;
        }
        self.call(move |db| db.delete_account(&name, hold_until))
            .await
    }

    async fn purge_expired_messages(&self, now: u64) -> Result<u64, StoreError> {
        self.purge_expired_messages_now(now).await
    }

    async fn create_blob(
        &self,
        blob: NewBlob,
        quota: BlobQuota,
    ) -> Result<BlobCreated, StoreError> {
        self.create_blob_now(blob, quota).await
    }

    async fn blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StoreError> {
        self.blob_now(id).await
    }

    async fn set_blob_held(
        &self,
        id: BlobId,
        held: u64,
        now: u64,
    ) -> Result<Option<BlobRecord>, StoreError> {
        self.set_blob_held_now(id, held, now).await
    }

    async fn ack_blob(
        &self,
        id: BlobId,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<BlobRecord>, StoreError> {
        self.ack_blob_now(id, user, device).await
    }

    async fn settle_blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StoreError> {
        self.settle_blob_now(id).await
    }

    async fn delete_blob(&self, id: BlobId) -> Result<bool, StoreError> {
        self.delete_blob_now(id).await
    }

    async fn blobs_after(
        &self,
        after: Option<BlobId>,
        limit: usize,
    ) -> Result<Vec<BlobRecord>, StoreError> {
        self.blobs_after_now(after, limit).await
    }

    async fn put_key_packages(
        &self,
        user: &Username,
        device: DeviceId,
        upload: super::KeyPackageUpload,
    ) -> Result<super::KeyPackageCounts, StoreError> {
        self.put_key_packages_now(user, device, upload).await
    }

    async fn take_key_packages(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<super::TakenKeyPackages>, StoreError> {
        self.take_key_packages_now(user, devices).await
    }

    async fn remove_key_packages(
        &self,
        user: &Username,
        device: Option<DeviceId>,
    ) -> Result<(), StoreError> {
        self.remove_key_packages_now(user, device).await
    }

    async fn create_group(
        &self,
        group: super::GroupRecord,
    ) -> Result<super::GroupCreated, StoreError> {
        self.create_group_now(group).await
    }

    async fn group(&self, name: &Username) -> Result<Option<super::GroupRecord>, StoreError> {
        self.group_now(name).await
    }

    async fn put_group(&self, group: super::GroupRecord) -> Result<bool, StoreError> {
        self.put_group_now(group).await
    }

    async fn groups_of(&self, user: &Username) -> Result<Vec<super::GroupRecord>, StoreError> {
        self.groups_of_now(user).await
    }

    async fn count_pending_messages(&self) -> Result<u64, StoreError> {
        self.call(|db| {
            let mut count = 0u64;
            for entry in db.inbox.inbox.iter() {
                entry.key()?;
                count += 1;
            }
            Ok(count)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjall::KeyspaceCreateOptions;

    fn message(to: &str, n: u8) -> NewMessage {
        NewMessage {
            sender: Username::parse("alice").unwrap(),
            sender_device: 1,
            to: Username::parse(to).unwrap(),
            id: MessageId([n; 16]),
            kind: "text".into(),
            copies: vec![crate::store::Copy {
                recipient: Username::parse(to).unwrap(),
                device: 1,
                body: vec![n; 200],
            }],
            sent_at: 1,
            expires_at: u64::MAX,
        }
    }

    /// A clean close writes what the memtables hold to tables, so the next open has nothing
    /// to replay from the journals (a plain `flush` left it all there: a restart on a million
    /// pending messages replayed ≈ 424 MiB of journals).
    #[tokio::test]
    async fn a_clean_close_leaves_nothing_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        for name in ["alice", "bob"] {
            let user = UserRecord {
                password_hash: String::new(),
                created_at: 1,
            };
            let name = Username::parse(name).unwrap();
            let created = store.create_user(&name, user).await.unwrap();
            assert_eq!(created, Created::Created);
        }
        for n in 0..100 {
            let appended = store.append(message("bob", n), AppendHooks::default());
            assert!(matches!(appended.await.unwrap(), Appended::Stored { .. }));
        }
        let inner = store.current().unwrap();
        assert_eq!(inner.inbox.inbox.table_count(), 0);

        store.close().await.unwrap();
        let db = &inner.db;
        for keyspace in [&inner.inbox.inbox, &inner.inbox.sent, &inner.users] {
            assert!(
                keyspace.table_count() > 0,
                "{:?} is not in tables",
                keyspace.name()
            );
        }
        for name in db.list_keyspace_names() {
            let keyspace = db.keyspace(&name, KeyspaceCreateOptions::default).unwrap();
            assert_eq!(keyspace.sealed_memtable_count(), 0, "{name:?}");
        }
        // Still usable afterwards.
        let appended = store.append(message("bob", 200), AppendHooks::default());
        assert!(matches!(appended.await.unwrap(), Appended::Stored { .. }));
    }

    /// The acks kept during an outage, written when the store reopens, release the shared
    /// bodies of the entries they remove like any other removal.
    #[tokio::test]
    async fn acks_written_at_a_reopen_release_shared_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        let names = ["alice", "bob", "carol"].map(|n| Username::parse(n).unwrap());
        for name in &names {
            let user = UserRecord {
                password_hash: String::new(),
                created_at: 1,
            };
            store.create_user(name, user).await.unwrap();
        }
        let mut shared = message("bob", 1);
        shared.copies[0].body = vec![7; 200];
        for n in [0, 2] {
            shared.copies.push(crate::store::Copy {
                recipient: names[n].clone(),
                device: 1,
                body: vec![7; 200],
            });
        }
        let appended = store.append(shared, AppendHooks::default()).await.unwrap();
        let Appended::Stored { seqs } = appended else {
            panic!("{appended:?}")
        };
        assert_eq!(store.message_footprint().await.unwrap().references, 3);
        let inner = store.current().unwrap();
        let id = |n: usize| inner.ids.cached(&names[n]).unwrap().unwrap();
        let ack = |acks: &[(u32, u64)]| {
            let mut deferred = super::super::outage::Deferred::default();
            for (inbox, seq) in acks {
                deferred.acks.entry(*inbox).or_default().insert(*seq);
            }
            deferred.ack_count = acks.len();
            deferred
        };
        // Bob's ack (and one of nothing): the body stays for the others.
        inner
            .replay(&ack(&[(id(1), seqs[0]), (id(1), seqs[0] + 100)]))
            .unwrap();
        let left = store.message_footprint().await.unwrap();
        assert_eq!(
            (left.bodies.entries, left.references, left.mismatches),
            (1, 2, 0)
        );
        // Alice's and carol's in one batch: the body is released twice there.
        inner
            .replay(&ack(&[(id(0), seqs[1]), (id(2), seqs[2])]))
            .unwrap();
        let left = store.message_footprint().await.unwrap();
        assert_eq!(
            (
                left.bodies.entries,
                left.body_refs.entries,
                left.inbox.entries,
                left.mismatches
            ),
            (0, 0, 0, 0)
        );
    }
}
