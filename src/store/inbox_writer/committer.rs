//! The inbox writer's committer thread: it commits the batches the writer built, in order,
//! syncs once for all of those waiting, then answers their callers. Its own thread so that the
//! writer goes on ordering new messages (and handing them to online recipients) while a sync
//! runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use fjall::{Database, OwnedWriteBatch, PersistMode};
use tokio::sync::oneshot;

use crate::protocol::MessageId;
use crate::store::devices::InboxId;
use crate::store::shared_bodies::BodyKey;
use crate::store::user_ids::UserId;
use crate::store::{Durability, Placed, PlacedHook, StoreError};

/// What the committer reports of a batch once it is committed (or has failed).
pub(super) struct Committed {
    /// (sender's id, message id) of the messages it stored.
    pub(super) appended: Vec<(UserId, MessageId)>,
    /// The inbox of each of its appends' copies and its removals.
    pub(super) inboxes: Vec<InboxId>,
    /// The shared bodies whose counts it changed.
    pub(super) bodies: Vec<BodyKey>,
    pub(super) ops: usize,
}

/// A built batch on its way to the committer, with what waits for it.
pub(super) struct Job {
    pub(super) batch: OwnedWriteBatch,
    /// It holds an append or an unsend: its answers wait for a sync.
    pub(super) must_sync: bool,
    pub(super) synced: Vec<(PlacedHook, Vec<Placed>)>,
    pub(super) replies: Vec<Reply>,
    /// (sender's id, message id) of the messages it stores.
    pub(super) appended: Vec<(UserId, MessageId)>,
    pub(super) inboxes: Vec<InboxId>,
    /// The shared bodies whose counts it changes.
    pub(super) bodies: Vec<BodyKey>,
    pub(super) ops: usize,
}

pub(super) type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// The committer thread: commits the batches the writer built, in order, syncs once for all
/// of those waiting (in `Sync` durability, when one of them needs it), then answers them. The
/// writer goes on ordering new messages meanwhile, so delivery never waits for a sync.
///
/// `hold` (tests only; `None` otherwise) is locked around each group's commit, so a test can
/// keep batches uncommitted for as long as it likes, as a slow disk would.
pub(super) fn run_committer(
    db: &Database,
    durability: Durability,
    jobs: &std_mpsc::Receiver<Job>,
    committed: &std_mpsc::Sender<Committed>,
    (failed, on_failure): (&AtomicBool, &(dyn Fn(&fjall::Error) + Send + Sync)),
    hold: Option<&Arc<Mutex<()>>>,
) {
    let _panic = FailOnPanic(failed);
    while let Ok(first) = jobs.recv() {
        // A poisoned hold (a test panicked while holding it) holds nothing.
        let _held = hold.map(|hold| hold.lock());
        let mut group = vec![first];
        while let Ok(job) = jobs.try_recv() {
            group.push(job);
        }
        let mut error = None;
        let mut must_sync = false;
        let mut rest = Vec::with_capacity(group.len());
        for job in group {
            must_sync |= job.must_sync;
            if error.is_none() && !job.batch.is_empty() {
                error = job.batch.commit().err();
                if error.is_some() {
                    failed.store(true, Ordering::SeqCst);
                }
            }
            // The store shows the batch now (the sync only makes it durable): the writer may
            // stop tracking it, and its memory is free.
            let _ = committed.send(Committed {
                appended: job.appended,
                inboxes: job.inboxes,
                bodies: job.bodies,
                ops: job.ops,
            });
            rest.push((job.synced, job.replies));
        }
        if error.is_none() && must_sync && durability == Durability::Sync {
            let sync_started = std::time::Instant::now();
            error = db.persist(PersistMode::SyncData).err();
            crate::server::metrics::inbox_sync(sync_started.elapsed());
        }
        // Logged once per outage by the hook, not once per batch: with the disk full every
        // batch fails until the store is reopened.
        let error = error.map(|e| {
            failed.store(true, Ordering::SeqCst);
            on_failure(&e);
            StoreError::Engine(e)
        });
        for (synced, replies) in rest {
            if error.is_none() {
                for (hook, places) in synced {
                    hook(&places);
                }
            }
            replies.into_iter().for_each(|reply| reply(error.as_ref()));
        }
    }
}

/// Marks the commits failed if the committer unwinds: the writer must then not stop cleanly.
struct FailOnPanic<'a>(&'a AtomicBool);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Packages a result so it is sent only after the batch commit, as an error if it failed.
pub(super) fn deferred<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, StoreError>>,
    result: Result<T, StoreError>,
) -> Reply {
    Box::new(move |failure: Option<&StoreError>| {
        let outcome = match (failure, result) {
            // fjall refuses every write after a failed one until the store is reopened.
            (Some(StoreError::Engine(_)), _) => Err(StoreError::Unavailable),
            (Some(e), _) => Err(StoreError::Limit(format!("batch not stored: {e}"))),
            (None, result) => result,
        };
        let _ = tx.send(outcome);
    })
}
