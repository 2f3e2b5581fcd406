//! Opening the fjall database, and opening it again to end a write outage (see `outage`).
//!
//! [`Shared`] holds the open database behind a lock so that every clone of the store sees
//! the one reopened after an outage; [`Inner`] is one opening of it with its inbox writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::StoreError;
use super::blobs::{BLOB_OWNERS, BLOBS, BlobKeyspaces};
use super::devices::Devices;
use super::fjall_keys::KeyDirectory;
use super::fjall_store::{HELD_NAMES, SESSIONS, StoreOptions, USERS, encode};
use super::groups::{GROUP_IDS, GROUP_USERS, GROUPS, GroupKeyspaces};
use super::inbox_writer::{FailureHook, InboxKeyspaces, InboxWriter};
use super::key_packages::{KEY_PACKAGES, KeyPackageKeyspaces, LAST_RESORT_KEY_PACKAGES};
use super::outage::{Deferred, Outage, space_for_writes};
use super::shared_bodies::{BODIES, BODY_REFS, BodyLedger, shared_body_of};
use super::user_ids::{UserIds, inbox_key};

/// How long a reopen waits for the calls still using the old database.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Most bytes of sealed journals fjall keeps before it flushes the memtables the oldest one
/// holds, so it can be deleted (fjall's least; its default is 512 MiB). Every journal is read at
/// open, so this bounds the replay after a crash: ≈ 64 MiB sealed plus the active journal (up
/// to 64 MB) instead of ≈ 576 MiB. The price is earlier flushes of small memtables.
const MAX_JOURNALS: u64 = 64 * 1024 * 1024;
/// How long a clean stop waits for the memtables to be written to tables (`Store::close`).
const CLOSE_FLUSH_WAIT: Duration = Duration::from_secs(30);

/// The database's options: those that bound what a restart replays ([`MAX_JOURNALS`]).
fn database(dir: &Path) -> fjall::DatabaseBuilder<Database> {
    Database::builder(dir).max_journaling_size(MAX_JOURNALS)
}

/// Writes every keyspace's memtable to a table and waits (at most [`CLOSE_FLUSH_WAIT`]) until
/// they are written, so that fjall deletes the journals they came from.
///
/// Why: at open fjall replays every journal it finds, flushed or not, and a database dropped
/// without this keeps them all (up to `max_journaling_size` of sealed journals, plus the
/// active one of up to 64 MB). With 1,000,000 pending messages that was ≈ 445 MB and a
/// restart of seconds after a clean stop as after `kill -9`. Afterwards only the active journal
/// is left, read at open but not replayed (its entries are older than the tables).
pub(super) fn flush_memtables(db: &Database) -> Result<(), StoreError> {
    let mut rotated = Vec::new();
    for name in db.list_keyspace_names() {
        let keyspace = db.keyspace(&name, KeyspaceCreateOptions::default)?;
        if keyspace.rotate_memtable()? {
            rotated.push(keyspace);
        }
    }
    let deadline = Instant::now() + CLOSE_FLUSH_WAIT;
    while rotated.iter().any(|k| k.sealed_memtable_count() > 0) {
        if Instant::now() >= deadline {
            // Nothing is lost: the journals still hold it, the next start replays them.
            tracing::warn!(
                waited = ?CLOSE_FLUSH_WAIT,
                "the store's memtables are not all written to tables; the next start replays the journals"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// What every clone shares: the open database, which is replaced when a write outage ends
/// (see `outage`).
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) options: StoreOptions,
    /// The open database; `None` while it is being reopened, or if a reopen failed.
    pub(super) open: RwLock<Option<Arc<Inner>>>,
    pub(super) outage: Arc<Outage>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.outage.stop();
    }
}

pub(super) struct Inner {
    /// Which opening of the database this is (see [`Outage::failed`]).
    pub(super) generation: u64,
    pub(super) db: Database,
    pub(super) users: Keyspace,
    pub(super) sessions: Keyspace,
    /// Names of deleted accounts on hold (see `fjall_store::HELD_NAMES`).
    pub(super) held_names: Keyspace,
    /// Serialises check-then-insert in `create_user` so racing signups cannot both win.
    pub(super) create_user: Mutex<()>,
    /// Users' ids; the ids of accounts known to exist stay in memory, since every message
    /// send checks its recipient, and that must not cost a blocking-pool hop each time.
    pub(super) ids: UserIds,
    pub(super) directory: KeyDirectory,
    /// Accounts' devices (and their inboxes' ids, in memory for the accounts used lately).
    pub(super) devices: Devices,
    pub(super) inbox: InboxKeyspaces,
    /// Blob metadata (see `blobs`).
    pub(super) blobs: BlobKeyspaces,
    /// MLS key packages (see `key_packages`).
    pub(super) key_packages: KeyPackageKeyspaces,
    /// MLS groups (see `groups`).
    pub(super) groups: GroupKeyspaces,
    /// `None` in a database reopened during an outage that still could not write.
    pub(super) writer: Option<InboxWriter>,
}

impl Inner {
    /// Opens the database in `dir` and starts its inbox writer. With `first`, any failure is
    /// an error; on a reopen during an outage, a writer that cannot start (the disk is still
    /// full) leaves a readable database without one.
    pub(super) fn open(
        dir: &Path,
        options: StoreOptions,
        outage: &Arc<Outage>,
        generation: u64,
        first: bool,
    ) -> Result<Self, StoreError> {
        let db = database(dir).open().map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked {
                dir: dir.to_owned(),
            },
            e => StoreError::Engine(e),
        })?;
        let keyspace = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        let users = keyspace(USERS)?;
        let sessions = keyspace(SESSIONS)?;
        let directory = KeyDirectory {
            identities: keyspace("identities")?,
            keys: keyspace("keys")?,
            prekeys: keyspace("prekeys")?,
            lock: Mutex::new(()),
        };
        let user_ids = keyspace("user_ids")?;
        let held_names = keyspace(HELD_NAMES)?;
        let inbox = InboxKeyspaces {
            db: db.clone(),
            inbox: keyspace("inbox_v2")?,
            sent: keyspace("sent_v2")?,
            meta: keyspace("meta")?,
            bodies: keyspace(BODIES)?,
            body_refs: keyspace(BODY_REFS)?,
            user_ids: user_ids.clone(),
        };
        let ids = UserIds::open(user_ids, keyspace("user_names")?, inbox.meta.clone())?;
        let devices = Devices::new(keyspace("devices")?);
        let blobs = BlobKeyspaces {
            blobs: keyspace(BLOBS)?,
            owners: keyspace(BLOB_OWNERS)?,
            lock: Mutex::new(()),
        };
        let key_packages = KeyPackageKeyspaces {
            one_time: keyspace(KEY_PACKAGES)?,
            last_resort: keyspace(LAST_RESORT_KEY_PACKAGES)?,
            lock: Mutex::new(()),
        };
        let groups = GroupKeyspaces {
            groups: keyspace(GROUPS)?,
            ids: keyspace(GROUP_IDS)?,
            users: keyspace(GROUP_USERS)?,
            lock: Mutex::new(()),
        };
        super::migrate::run(&super::migrate::Keyspaces {
            db: &db,
            users: &users,
            meta: &inbox.meta,
            ids: &ids,
            inbox: &inbox.inbox,
            sent: &inbox.sent,
            devices: &devices.keyspace,
            identities: &directory.identities,
            keys: &directory.keys,
            prekeys: &directory.prekeys,
        })?;
        let on_failure: FailureHook = {
            let outage = Arc::clone(outage);
            Arc::new(move |error: &fjall::Error| outage.failed(generation, error))
        };
        let writer = match InboxWriter::start(
            inbox.clone(),
            options.durability,
            (options.max_pending, options.max_batch, options.hold),
            on_failure,
            options.sender_share,
        ) {
            Ok(writer) => Some(writer),
            Err(e) if !first => {
                tracing::debug!(error = %e, "the reopened store still cannot write");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            generation,
            db,
            users,
            sessions,
            held_names,
            create_user: Mutex::new(()),
            ids,
            directory,
            devices,
            inbox,
            blobs,
            key_packages,
            groups,
            writer,
        })
    }

    /// Passes `result` on; an engine error that poisoned the database starts an outage and
    /// becomes [`StoreError::Unavailable`].
    pub(super) fn check<T>(
        &self,
        outage: &Outage,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match result {
            Err(StoreError::Engine(e)) if self.poisoned() => {
                outage.failed(self.generation, &e);
                Err(StoreError::Unavailable)
            }
            result => result,
        }
    }

    /// Whether fjall refuses writes (it tells only through a write: a buffered persist is
    /// one that writes nothing, every write here being flushed to the OS as it is made).
    fn poisoned(&self) -> bool {
        matches!(
            self.db.persist(PersistMode::Buffer),
            Err(fjall::Error::Poisoned)
        )
    }

    /// Writes what was kept in memory during an outage, synced. Runs before any call can use
    /// the reopened database (its writer is idle), so the shared bodies' counts it lowers are
    /// read from the store.
    pub(super) fn replay(&self, deferred: &Deferred) -> Result<(), StoreError> {
        if deferred.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        // The acks of one batch may release one body several times.
        let mut bodies = BodyLedger::default();
        for (user, seqs) in &deferred.acks {
            for seq in seqs {
                let key = inbox_key(*user, *seq);
                let Some(entry) = self.inbox.inbox.get(key)? else {
                    continue;
                };
                batch.remove(&self.inbox.inbox, key);
                match shared_body_of(&entry) {
                    Ok(Some(body)) => bodies.release(&self.inbox, body)?,
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot read an acknowledged entry"),
                }
            }
        }
        bodies.take_batch(&mut batch, &self.inbox);
        for session in deferred.sessions.values() {
            batch.insert(
                &self.sessions,
                session.token_digest.to_vec(),
                encode(session)?,
            );
        }
        batch.commit()?;
        Ok(())
    }
}

impl Shared {
    /// Closes the poisoned database and opens it again; `true` if the new one can write
    /// (the outage is over). Calls during the reopen are refused with `Unavailable`.
    fn reopen(&self) -> Result<bool, StoreError> {
        // Held throughout, so no ack or session is kept between the replay and the end.
        let mut deferred = self.outage.deferred()?;
        let started = Instant::now();
        let old = self.open.write().map_err(|_| StoreError::Poisoned)?.take();
        if let Some(old) = old {
            // Calls in flight hold it for moments (reads; writes are refused at once). The
            // database must be closed before it can be opened again (its lock file).
            let mut old = old;
            let deadline = Instant::now() + CLOSE_WAIT;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(inner) => {
                        drop(inner);
                        break;
                    }
                    Err(still_used) if Instant::now() < deadline => {
                        old = still_used;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(still_used) => {
                        *self.open.write().map_err(|_| StoreError::Poisoned)? = Some(still_used);
                        return Ok(false);
                    }
                }
            }
        }
        let generation = self.outage.next_generation();
        let inner = Inner::open(&self.dir, self.options, &self.outage, generation, false)?;
        let writes = inner.writer.is_some() && inner.replay(&deferred).is_ok();
        *self.open.write().map_err(|_| StoreError::Poisoned)? = Some(Arc::new(inner));
        if writes {
            self.outage
                .recovered(generation, &mut deferred, started.elapsed());
        }
        Ok(writes)
    }
}

/// The watcher thread: during an outage, probes for space and reopens the database once
/// there is some. Ends when the store is dropped.
pub(super) fn watch(shared: &Weak<Shared>, outage: &Outage) {
    while outage.wait_for_probe() {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !space_for_writes(&shared.dir) {
            continue;
        }
        if let Err(e) = shared.reopen() {
            tracing::debug!(error = %e, "cannot reopen the store yet");
        }
    }
}
