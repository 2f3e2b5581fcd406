//! Group commit for inboxes, in two threads. The *writer* makes the inbox decisions: it takes
//! all the operations waiting in its queue (up to a batch limit) and builds one fjall batch of
//! them. Sequence numbers, deduplication and quotas are decided under one lock, the writer's
//! state, which this thread holds while it builds a batch; an online message's append is
//! decided by its caller under the same lock when the writer is idle and the decision needs no
//! store read (see `here`), so at moderate load a message does not wake this thread. The
//! *committer* commits the built batches in order and syncs once for all of
//! those waiting, and only then answers each caller. So many connections' messages share one
//! fsync, and the writer goes on ordering new messages while a sync runs: with both cores busy
//! a sync takes milliseconds, and nothing but the answers waits for it. Messages of batches not
//! yet committed are deduplicated from memory (the store does not show them yet); their acks
//! become tombstones in a later batch, which the committer writes after them. An ack also
//! settles the message's send record (see `sent_records`) from what the writer remembers of
//! the append (`caches`), so it neither reads the store nor waits for that commit.
//!
//! The parts: `run` (the writer thread's loop), `apply` (each operation into the batch being
//! built) and `remove` (removals and the send records they settle), `here` (appends decided
//! by their callers), `caches` and `sent_ids` (what the writer knows without asking the
//! store), `held` (messages not yet written), `committer` (the second thread), `counters`
//! (seq counters in `meta`).
//!
//! An append carries every copy of a message (one per recipient device): the writer checks
//! every copy's inbox (dropped, full, the sender's share) before it places any, then places
//! them all in the batch being built, with one send record listing them; so a message is
//! stored whole or not at all, with one sync. Inboxes are known by their ids (see
//! `devices`: device 1's is its account's id).
//!
//! An append may carry [`AppendHooks`]: `ordered` is called with the copies' places
//! once the whole batch is built and before it is committed, `synced` after the sync: the
//! server hands the message to an online recipient at once, so delivery does not wait for the
//! disk (the sender's `sent` still does). Sequence numbers are never reused, even when a batch
//! fails or the process dies with a batch unsynced: counters only grow in memory, and every
//! start after a run that did not end cleanly (its [`RUNNING`] marker is still there) begins a
//! new *epoch*. A counter is stored with the epoch it was written in, and on first use skips
//! [`SEQ_RESTART_GAP`] past the stored value for every epoch since: so an inbox that a crashed
//! run used skips ahead whenever it is next used, also after later clean runs that did not
//! touch it.
//!
//! Counters cost few writes: an inbox's next seq is stored only every [`SEQ_CHECKPOINT`] seqs
//! (and exactly at a clean stop), and its pending count is not stored at all but counted from
//! the inbox when this process first needs it (a memtable insert per message and per ack was
//! the writer's largest cost).
//!
//! Key layout (usernames never contain 0x00; ids are the users' numeric ids, see `user_ids`):
//! - `inbox_v2`: inbox id(u32 BE) seq(u64 BE) → [`StoredMessage`](super::StoredMessage)
//! - `sent_v2`: sender id(u32 BE) message-id(16) → [`SentRecord`](super::SentRecord) while
//!   no copy of the message has left its inbox, then a settled marker naming no recipient
//!   (see `sent_records`)
//! - `bodies`, `body_refs`: body key (the inbox id ‖ seq of its first copy) → a body shared by
//!   several copies of one message, and how many inbox entries reference it (see
//!   `shared_bodies`: written with the entries, lowered with each removal, deleted at 0, all
//!   in the batches that change the entries)
//! - `meta`: `seq` 0x00 user (device 1's inbox) or `sqd` 0x00 inbox id(u32 BE) (another
//!   device's) → next seq (u64 BE, at least) and the epoch it was written in
//!   (u64 BE; absent in stores from before epochs: 0); [`EPOCH`] → the current epoch (u64 BE);
//!   [`RUNNING`] → empty, while a writer runs and after one that did not stop cleanly. Stores
//!   from before this layout also hold `cnt` 0x00 user keys, no longer read.
//! - (no `contacts` any more: presence needs no stored graph, and `migrate` deletes the old one)

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fjall::{Database, Keyspace};
use tokio::sync::{mpsc, oneshot};

use super::devices::InboxId;
use super::sender_shares::{SenderShare, SenderShares};
use super::shared_bodies::BodyLedger;
use super::user_ids::UserId;
use super::{AppendHooks, Appended, Durability, Removal, StoreError};
use crate::protocol::{MessageId, Username};

mod apply;
mod batch;
mod caches;
mod committer;
mod counters;
mod held;
mod here;
mod ops;
mod remove;
mod run;
mod sent_ids;
#[cfg(test)]
mod tests;

use caches::{KnownPending, MAX_ORIGINS, Origins};
use committer::{Committed, Job, run_committer};
pub(super) use counters::counter_key;
use counters::{mark_running, seq_value};
use held::SharedHeld;
use ops::DROP_CHUNK;
pub(super) use ops::{Addressed, DropInbox, Dropped, Target};
use run::run_writer;
use sent_ids::SentIds;

/// The writer's maps, hashed with foldhash: SipHash was ≈ 15 % of the writer's instructions
/// (callgrind, store micro benchmark). Randomly seeded per process; keys are user names.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Set<T> = HashSet<T, foldhash::fast::RandomState>;

/// Called by the committer when a batch cannot be committed or synced (fjall is then
/// poisoned): the store logs the outage once and waits for space (see `outage`).
pub(super) type FailureHook = Arc<dyn Fn(&fjall::Error) + Send + Sync>;

/// Most operations folded into one batch (and one sync), by default.
pub const DEFAULT_MAX_BATCH: usize = 1024;
/// Operations that may queue for the writer before callers wait for room.
const QUEUE: usize = 8192;
/// Built batches that may wait for the committer: enough for the trickle of small batches
/// that arrive during one sync at moderate rates.
const JOBS_IN_FLIGHT: usize = 16;
/// Operations in built batches not yet committed, at most: the writer waits for commits
/// before it builds past this, so a stalled disk holds back at most this many (plus the
/// queue) in memory.
const MAX_OPS_IN_FLIGHT: usize = 4096;
/// How far an inbox's counter skips ahead of the stored one per epoch since it was stored:
/// more than a checkpoint interval plus a batch, so no seq handed out before a crash (stored
/// or not) is ever given to another message. Per epoch, because a run that crashes before its
/// first checkpoint is synced leaves the stored counter where it was while it may have handed
/// out seqs from the skipped-to value on.
const SEQ_RESTART_GAP: u64 = 1 << 20;
/// An inbox's next seq is written to `meta` once it is this far past the stored value.
const SEQ_CHECKPOINT: u64 = 4096;
/// Key in `meta` written (synced) when a writer starts and removed when it stops with every
/// counter it used stored exactly. (No 0x00 in it, so no counter key can equal it.)
const RUNNING: &[u8] = b"writer-running";
/// Key in `meta` of the current epoch, raised (synced) at each start after an unclean stop.
const EPOCH: &[u8] = b"seq-epoch";
/// Out-of-order removals remembered per inbox before the writer forgets what it knows of that
/// inbox's older messages (and asks the store about them again); it goes on tracking the
/// messages appended from then on.
const MAX_REMOVED_AHEAD: usize = 4096;

/// The keyspaces the writer owns.
#[derive(Clone)]
pub(super) struct InboxKeyspaces {
    pub db: Database,
    pub inbox: Keyspace,
    pub sent: Keyspace,
    pub meta: Keyspace,
    /// Shared bodies and their reference counts (see `shared_bodies`).
    pub bodies: Keyspace,
    pub body_refs: Keyspace,
    /// Read only: the senders of an inbox's messages when counting their shares, and a
    /// removed message's sender id, to settle its send record.
    pub user_ids: Keyspace,
}

pub(super) fn pair_key(first: &Username, second: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(first.as_str().len() + 1 + second.len());
    key.extend_from_slice(first.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(second);
    key
}

enum Op {
    Append(
        Box<Addressed>,
        AppendHooks,
        oneshot::Sender<Result<Appended, StoreError>>,
    ),
    /// Removes these seqs from the inbox with this id.
    Remove(
        InboxId,
        Vec<u64>,
        Removal,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    /// Removes expired send records (keys in `sent`).
    ForgetSent(Vec<Vec<u8>>, oneshot::Sender<Result<u64, StoreError>>),
    /// Empties an inbox (of a removed device or a deleted account) and refuses messages to it
    /// (and, for an account, from it) from now on; chunk by chunk (see `drop_inbox`).
    DropInbox(DropInbox, oneshot::Sender<Result<Dropped, StoreError>>),
    /// Nothing to do: the writer looks at the held messages' deadline again (an append
    /// decided outside it held the first message).
    Wake,
}

/// Handle to the writer thread; dropping it stops the thread after the queue drains and waits
/// for it, so the database is closed when the store is (a restart can reopen it at once).
pub(super) struct InboxWriter {
    queue: Option<mpsc::Sender<Op>>,
    /// The writer's held messages, whose copies acknowledgements remove here (see `held`).
    held: SharedHeld,
    /// The writer's decisions, which the writer thread holds while it builds a batch and an
    /// append may take when it is free (see [`Self::append`]).
    state: Arc<Mutex<WriterState>>,
    /// Set while the writer thread waits for operations (see [`Self::append`]).
    idle: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    committer: Option<JoinHandle<()>>,
}

impl Drop for InboxWriter {
    fn drop(&mut self) {
        self.queue = None;
        // The writer ends once the committer has committed everything it built; the committer
        // ends when the writer is gone (also if it panicked), and only then is the database
        // closed.
        for thread in [self.thread.take(), self.committer.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

impl InboxWriter {
    /// Starts the writer and its committer. `hold` is how long a message may wait, in memory,
    /// for its copies' acknowledgements before it is written (zero: written at once; see
    /// `held`).
    pub fn start(
        keyspaces: InboxKeyspaces,
        durability: Durability,
        (max_pending, max_batch, hold): (u64, usize, Duration),
        on_failure: FailureHook,
        share: SenderShare,
    ) -> Result<Self, StoreError> {
        Self::start_held(
            keyspaces,
            durability,
            (max_pending, max_batch, hold),
            on_failure,
            share,
            None,
        )
    }

    /// [`Self::start`], with the committer taking `hold` around each commit (tests hold it to
    /// keep batches uncommitted).
    fn start_held(
        keyspaces: InboxKeyspaces,
        durability: Durability,
        (max_pending, max_batch, window): (u64, usize, Duration),
        on_failure: FailureHook,
        share: SenderShare,
        hold: Option<Arc<Mutex<()>>>,
    ) -> Result<Self, StoreError> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let epoch = mark_running(&keyspaces)?;
        let (jobs, jobs_rx) = std_mpsc::sync_channel(JOBS_IN_FLIGHT);
        let (committed_tx, committed) = std_mpsc::channel();
        let commit_failed = Arc::new(AtomicBool::new(false));
        let direct = hold.is_none();
        let held = SharedHeld::new(window);
        let committer = {
            let (db, failed) = (keyspaces.db.clone(), Arc::clone(&commit_failed));
            let on_failure = Arc::clone(&on_failure);
            std::thread::Builder::new()
                .name("sfc-inbox-commit".into())
                .spawn(move || {
                    run_committer(
                        &db,
                        durability,
                        &jobs_rx,
                        &committed_tx,
                        (&failed, &*on_failure),
                        hold.as_ref(),
                    );
                })
                .map_err(|e| StoreError::Limit(format!("cannot start the inbox committer: {e}")))?
        };
        let state = WriterState {
            epoch,
            failed: false,
            ks: keyspaces,
            max_pending,
            shares: SenderShares::new(share),
            dropped_users: Set::default(),
            dropped_inboxes: Set::default(),
            max_batch: max_batch.max(1),
            next_seq: Map::default(),
            stored_seq: Map::default(),
            names: Map::default(),
            pending: Map::default(),
            known: Map::default(),
            origins: Origins::new(MAX_ORIGINS),
            bodies: BodyLedger::default(),
            held: held.clone(),
            in_flight: Set::default(),
            sent_ids: SentIds::default(),
            touched_here: Set::default(),
            jobs: Some(jobs),
            committed,
            commit_failed,
            on_failure,
            direct,
            jobs_in_flight: 0,
            ops_in_flight: 0,
            inboxes_in_flight: Map::default(),
        };
        let state = Arc::new(Mutex::new(state));
        let idle = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, held, idle) = (Arc::clone(&state), held.clone(), Arc::clone(&idle));
            std::thread::Builder::new()
                .name("sfc-inbox-writer".into())
                .spawn(move || run_writer(&state, &held, &idle, rx))
                .map_err(|e| StoreError::Limit(format!("cannot start the inbox writer: {e}")))?
        };
        Ok(Self {
            queue: Some(queue),
            held,
            state,
            idle,
            thread: Some(thread),
            committer: Some(committer),
        })
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let queue = self.queue.as_ref().ok_or(StoreError::WriterStopped)?;
        queue
            .send(op(tx))
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        rx.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Appends a message. One to online devices only (to be held) is decided here, on the
    /// caller's thread, when the writer thread is not building a batch and everything the
    /// decision needs is in memory (the sender's send records, the inboxes' counters, pending
    /// counts and shares: see [`WriterState::append_here`]); the writer's thread is then not
    /// woken at all, and the message goes to its recipients at once. Otherwise it waits in the
    /// writer's queue, as at full speed, where batches share the work.
    pub async fn append(
        &self,
        message: Addressed,
        hooks: AppendHooks,
    ) -> Result<Appended, StoreError> {
        let (message, hooks) = match self.append_here(Box::new(message), hooks) {
            Ok(answer) => return answer.await.map_err(|_| StoreError::WriterStopped)?,
            Err(not_here) => not_here,
        };
        self.submit(|tx| Op::Append(message, hooks, tx)).await
    }

    /// [`Self::append`] on this thread, if it can be; gives the message back if not.
    #[allow(clippy::type_complexity)]
    fn append_here(
        &self,
        message: Box<Addressed>,
        hooks: AppendHooks,
    ) -> Result<oneshot::Receiver<Result<Appended, StoreError>>, (Box<Addressed>, AppendHooks)>
    {
        let Some(queue) = self.queue.as_ref().filter(|q| !q.is_closed()) else {
            return Err((message, hooks));
        };
        // Operations waiting mean a busy writer, which shares its work among them: the
        // message joins them (and keeps its place after them).
        if !hooks.hold
            || !self.idle.load(Ordering::Acquire)
            || queue.capacity() < queue.max_capacity()
        {
            return Err((message, hooks));
        }
        // Never waits: a writer building a batch takes the message in its next one.
        let Ok(mut state) = self.state.try_lock() else {
            return Err((message, hooks));
        };
        let (tx, rx) = oneshot::channel();
        let (ordered, woke) = state.append_here(message, hooks, tx)?;
        // Called in the order of the decisions, as the writer does: an inbox's copies reach
        // its mailbox in seq order (it only hands a deliverer a run without gaps).
        if let Some((hook, places)) = ordered {
            hook(&places);
        }
        drop(state);
        if woke {
            // (A full queue means a busy writer, which looks at the deadline anyway.)
            let _ = queue.try_send(Op::Wake);
        }
        Ok(rx)
    }

    /// Removes `seqs` from inbox `id`. An acknowledgement removes the held copies among them
    /// here, without waking the writer (see `held`), and answers what waited for the messages
    /// it finished; the writer removes the rest.
    pub async fn remove(
        &self,
        id: InboxId,
        mut seqs: Vec<u64>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        if removal == Removal::Acknowledged {
            let (count, (replies, synced)) = self.held.lock().acknowledge(id, &mut seqs);
            for (hook, places) in synced {
                hook(&places);
            }
            for reply in replies {
                reply(None);
            }
            if seqs.is_empty() {
                return Ok(count);
            }
            removed = count;
        }
        let rest = self.submit(|tx| Op::Remove(id, seqs, removal, tx)).await?;
        Ok(removed + rest)
    }

    pub async fn forget_sent(&self, keys: Vec<Vec<u8>>) -> Result<u64, StoreError> {
        self.submit(|tx| Op::ForgetSent(keys, tx)).await
    }

    /// Empties an inbox (synced, in chunks) and refuses messages to it (and from a deleted
    /// account) from now on; returns how many messages went.
    pub async fn drop_inbox(
        &self,
        inbox: InboxId,
        account: Option<UserId>,
        counter: Vec<u8>,
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let drop = DropInbox {
                inbox,
                account,
                counter: counter.clone(),
            };
            let step = self.submit(|tx| Op::DropInbox(drop, tx)).await?;
            removed += step.removed;
            if step.done {
                return Ok(removed);
            }
        }
    }
}

struct WriterState {
    ks: InboxKeyspaces,
    /// The current epoch (see the module documentation).
    epoch: u64,
    /// A batch failed in this run: its seqs may have been given out but not stored.
    failed: bool,
    max_pending: u64,
    /// Each sender's share of each inbox (see `sender_shares`).
    shares: SenderShares,
    /// Users whose accounts were deleted in this run: no message goes to or from them.
    dropped_users: Set<UserId>,
    /// Inboxes dropped in this run (removed devices, deleted accounts): no message goes to
    /// them.
    dropped_inboxes: Set<InboxId>,
    max_batch: usize,
    /// Inboxes are known by their ids: no name is hashed or cloned per message.
    /// Next sequence number per inbox (loaded from `meta` on first use).
    next_seq: Map<InboxId, u64>,
    /// The next seq as stored in `meta`, per inbox in `next_seq`.
    stored_seq: Map<InboxId, u64>,
    /// The key of its counter in `meta`, per inbox in `next_seq`.
    names: Map<InboxId, Vec<u8>>,
    /// Pending messages per inbox (counted from the inbox on first use).
    pending: Map<InboxId, u64>,
    /// Which messages of each inbox are pending, as far as this writer knows.
    known: Map<InboxId, KnownPending>,
    /// What settling the send records of the messages appended lately needs.
    origins: Origins,
    /// Reference counts of shared bodies changed by batches not yet committed.
    bodies: BodyLedger,
    /// Messages ordered but not yet written (see `held`).
    held: SharedHeld,
    /// (sender's id, message id) of every message in a batch not yet committed, for
    /// deduplication: the store does not show them yet.
    in_flight: Set<(UserId, MessageId)>,
    /// The ids of senders' send records, for deduplication without a store read.
    sent_ids: SentIds,
    /// Inboxes of the appends decided outside the writer thread since its last batch, whose
    /// counters may need a checkpoint (see `here`).
    touched_here: Set<InboxId>,
    /// Built batches, to the committer thread.
    jobs: Option<std_mpsc::SyncSender<Job>>,
    /// From the committer: each committed batch.
    committed: std_mpsc::Receiver<Committed>,
    /// Set by the committer when a commit or a sync fails, or when it panics.
    commit_failed: Arc<AtomicBool>,
    /// Told of a batch this thread could not commit itself (see `committer`).
    on_failure: FailureHook,
    /// Whether this thread may commit a batch that needs no sync itself, when no other batch
    /// is on its way to the committer (not while a test holds the committer).
    direct: bool,
    /// Batches handed to the committer and not yet reported committed.
    jobs_in_flight: usize,
    /// Operations in built batches not yet committed.
    ops_in_flight: usize,
    /// Inboxes with appends or removals in built batches not yet committed (how many).
    inboxes_in_flight: Map<InboxId, usize>,
}
