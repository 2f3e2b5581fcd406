//! Group commit for inboxes, in two threads. The *writer* owns every inbox decision: it takes
//! all the operations waiting in its queue (up to a batch limit) and builds one fjall batch of
//! them; sequence numbers, deduplication and quotas need no locks because this one thread
//! decides them. The *committer* commits the built batches in order and syncs once for all of
//! those waiting, and only then answers each caller. So many connections' messages share one
//! fsync, and the writer goes on ordering new messages while a sync runs: with both cores busy
//! a sync takes milliseconds, and nothing but the answers waits for it. Messages of batches not
//! yet committed are deduplicated from memory (the store does not show them yet); their acks
//! become tombstones in a later batch, which the committer writes after them.
//!
//! An append may carry [`AppendHooks`]: `ordered` is called with the message's sequence number
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
//! - `inbox_v2`: recipient id(u32 BE) seq(u64 BE) → [`StoredMessage`]
//! - `sent_v2`: sender id(u32 BE) message-id(16) → [`SentRecord`] while the message is pending,
//!   then a settled marker naming no recipient (see `sent_records`)
//! - `meta`: `seq` 0x00 user → next seq (u64 BE, at least) and the epoch it was written in
//!   (u64 BE; absent in stores from before epochs: 0); [`EPOCH`] → the current epoch (u64 BE);
//!   [`RUNNING`] → empty, while a writer runs and after one that did not stop cleanly. Stores
//!   from before this layout also hold `cnt` 0x00 user keys, no longer read.
//! - (no `contacts` any more: presence needs no stored graph, and `migrate` deletes the old one)

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use fjall::{Database, Keyspace, OwnedWriteBatch, PersistMode};
use tokio::sync::{mpsc, oneshot};

use super::sender_shares::{SenderShare, SenderShares, count_from_store};
use super::sent_records;
use super::user_ids::{UserId, decode_id, inbox_key, sent_key};
use super::{
    AppendHooks, Appended, Durability, NewMessage, Removal, SentRecord, SeqHook, StoreError,
    StoredMessage,
};
use crate::protocol::{MessageId, Username};

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

/// What the writer knows of one inbox's messages without asking the store: every message from
/// seq `from` (the next seq when the inbox was first used in this process) up to its next seq
/// was appended by this writer, and is pending unless removed since. All removals (acks,
/// unsend, expiry) go through the writer, so this stays exact; an ack then costs no lookup.
struct KnownPending {
    from: u64,
    /// Every seq in `from..removed_below` is removed.
    removed_below: u64,
    /// Removed seqs above `removed_below` (acks out of order).
    removed: BTreeSet<u64>,
}

impl KnownPending {
    fn new(from: u64) -> Self {
        Self {
            from,
            removed_below: from,
            removed: BTreeSet::new(),
        }
    }

    /// Whether `seq` (below the inbox's next seq) is pending; `None` if it is older than what
    /// this writer knows.
    fn pending(&self, seq: u64) -> Option<bool> {
        (seq >= self.from).then(|| seq >= self.removed_below && !self.removed.contains(&seq))
    }

    fn remove(&mut self, seq: u64) {
        if seq == self.removed_below {
            self.removed_below += 1;
            while self.removed.remove(&self.removed_below) {
                self.removed_below += 1;
            }
        } else if seq > self.removed_below {
            self.removed.insert(seq);
        }
    }
}

/// The keyspaces the writer owns.
#[derive(Clone)]
pub(super) struct InboxKeyspaces {
    pub db: Database,
    pub inbox: Keyspace,
    pub sent: Keyspace,
    pub meta: Keyspace,
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

fn meta_key(kind: &[u8], user: &Username) -> Vec<u8> {
    let mut key = kind.to_vec();
    key.push(0);
    key.extend_from_slice(user.as_str().as_bytes());
    key
}

/// A message to append, with its sender's and recipient's ids.
pub(super) struct Addressed {
    pub message: NewMessage,
    pub sender: UserId,
    pub recipient: UserId,
}

enum Op {
    Append(
        Box<Addressed>,
        AppendHooks,
        oneshot::Sender<Result<Appended, StoreError>>,
    ),
    /// Removes these seqs from the inbox of the user with this id.
    Remove(
        UserId,
        Vec<u64>,
        Removal,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    /// Removes expired send records (keys in `sent`).
    ForgetSent(Vec<Vec<u8>>, oneshot::Sender<Result<u64, StoreError>>),
    /// Empties the inbox of a user whose account is being deleted, and refuses messages to and
    /// from them from now on. `None`: submit it again (see `drop_inbox`).
    DropInbox(UserId, oneshot::Sender<Result<Option<u64>, StoreError>>),
}

/// Handle to the writer thread; dropping it stops the thread after the queue drains and waits
/// for it, so the database is closed when the store is (a restart can reopen it at once).
pub(super) struct InboxWriter {
    queue: Option<mpsc::Sender<Op>>,
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
    pub fn start(
        keyspaces: InboxKeyspaces,
        durability: Durability,
        max_pending: u64,
        max_batch: usize,
        on_failure: FailureHook,
        share: SenderShare,
    ) -> Result<Self, StoreError> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let epoch = mark_running(&keyspaces)?;
        let (jobs, jobs_rx) = std_mpsc::sync_channel(JOBS_IN_FLIGHT);
        let (committed_tx, committed) = std_mpsc::channel();
        let commit_failed = Arc::new(AtomicBool::new(false));
        let committer = {
            let (db, failed) = (keyspaces.db.clone(), Arc::clone(&commit_failed));
            std::thread::Builder::new()
                .name("sfc-inbox-commit".into())
                .spawn(move || {
                    run_committer(
                        &db,
                        durability,
                        &jobs_rx,
                        &committed_tx,
                        (&failed, &*on_failure),
                    );
                })
                .map_err(|e| StoreError::Limit(format!("cannot start the inbox committer: {e}")))?
        };
        let mut state = WriterState {
            epoch,
            failed: false,
            ks: keyspaces,
            max_pending,
            shares: SenderShares::new(share),
            dropped: Set::default(),
            max_batch: max_batch.max(1),
            next_seq: Map::default(),
            stored_seq: Map::default(),
            names: Map::default(),
            pending: Map::default(),
            known: Map::default(),
            in_flight: Set::default(),
            jobs: Some(jobs),
            committed,
            commit_failed,
            ops_in_flight: 0,
            inboxes_in_flight: Map::default(),
        };
        let thread = std::thread::Builder::new()
            .name("sfc-inbox-writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| StoreError::Limit(format!("cannot start the inbox writer: {e}")))?;
        Ok(Self {
            queue: Some(queue),
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

    pub async fn append(
        &self,
        message: Addressed,
        hooks: AppendHooks,
    ) -> Result<Appended, StoreError> {
        self.submit(|tx| Op::Append(Box::new(message), hooks, tx))
            .await
    }

    pub async fn remove(
        &self,
        id: UserId,
        seqs: Vec<u64>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        self.submit(|tx| Op::Remove(id, seqs, removal, tx)).await
    }

    pub async fn forget_sent(&self, keys: Vec<Vec<u8>>) -> Result<u64, StoreError> {
        self.submit(|tx| Op::ForgetSent(keys, tx)).await
    }

    /// Empties user `id`'s inbox (synced) and refuses messages to and from them from now on;
    /// returns how many messages went.
    pub async fn drop_inbox(&self, id: UserId) -> Result<u64, StoreError> {
        loop {
            if let Some(removed) = self.submit(|tx| Op::DropInbox(id, tx)).await? {
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
    dropped: Set<UserId>,
    max_batch: usize,
    /// Inboxes are known by their owners' ids: no name is hashed or cloned per message.
    /// Next sequence number per inbox (loaded from `meta` on first use).
    next_seq: Map<UserId, u64>,
    /// The next seq as stored in `meta`, per inbox in `next_seq`.
    stored_seq: Map<UserId, u64>,
    /// The owner's name, per inbox in `next_seq` (for its counter's key in `meta`).
    names: Map<UserId, Username>,
    /// Pending messages per inbox (counted from the inbox on first use).
    pending: Map<UserId, u64>,
    /// Which messages of each inbox are pending, as far as this writer knows.
    known: Map<UserId, KnownPending>,
    /// (sender's id, message id) of every message in a batch not yet committed, for
    /// deduplication: the store does not show them yet.
    in_flight: Set<(UserId, MessageId)>,
    /// Built batches, to the committer thread.
    jobs: Option<std_mpsc::SyncSender<Job>>,
    /// From the committer: each committed batch.
    committed: std_mpsc::Receiver<Committed>,
    /// Set by the committer when a commit or a sync fails, or when it panics.
    commit_failed: Arc<AtomicBool>,
    /// Operations in built batches not yet committed.
    ops_in_flight: usize,
    /// Inboxes with appends or removals in built batches not yet committed (how many).
    inboxes_in_flight: Map<UserId, usize>,
}

/// What the committer reports of a batch once it is committed (or has failed).
struct Committed {
    /// (sender's id, message id) of the messages it stored.
    appended: Vec<(UserId, MessageId)>,
    /// The inbox of each of its appends and removals.
    inboxes: Vec<UserId>,
    ops: usize,
}

/// A built batch on its way to the committer, with what waits for it.
struct Job {
    batch: OwnedWriteBatch,
    /// It holds an append or an unsend: its answers wait for a sync.
    must_sync: bool,
    synced: Vec<(SeqHook, u64)>,
    replies: Vec<Reply>,
    /// (sender's id, message id) of the messages it stores.
    appended: Vec<(UserId, MessageId)>,
    inboxes: Vec<UserId>,
    ops: usize,
}

type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

impl WriterState {
    fn run(&mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            while ops.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.commit(ops);
        }
        // Every built batch is committed (and synced) before the counters are stored: the
        // committer's reports end when it has finished them all and stopped.
        self.jobs = None;
        while let Ok(done) = self.committed.recv() {
            self.take_note(done);
        }
        self.note_commits();
        // A clean stop stores every counter exactly and drops the marker, so the next start
        // continues without a gap. After a failed batch the marker stays: its seqs may have
        // been given out without being stored.
        if !self.failed {
            let mut batch = self.ks.db.batch().durability(Some(PersistMode::SyncData));
            for (id, next) in &self.next_seq {
                if let Some(user) = self.names.get(id)
                    && self.stored_seq.get(id) != Some(next)
                {
                    batch.insert(
                        &self.ks.meta,
                        meta_key(b"seq", user),
                        seq_value(*next, self.epoch),
                    );
                }
            }
            batch.remove(&self.ks.meta, RUNNING);
            if let Err(e) = batch.commit() {
                tracing::warn!(error = %e, "cannot store the inbox counters at stop");
            }
        }
    }

    fn commit(&mut self, ops: Vec<Op>) {
        crate::server::metrics::inbox_batch(ops.len());
        // Only appends and unsends need the sync before their answer. A batch of acks alone
        // (or expiry, or forgetting expired send records) is handed to the OS and made durable
        // by the next synced batch (the journal is written in order): see
        // [`Removal::Acknowledged`].
        let must_sync = ops.iter().any(|op| {
            matches!(
                op,
                Op::Append(..) | Op::Remove(_, _, Removal::Unsent, _) | Op::DropInbox(..)
            )
        });
        self.note_commits();
        if self.jobs.is_none() {
            // The committer is gone: nothing can be stored. Dropping the operations answers
            // their callers with `WriterStopped`.
            return;
        }
        while self.ops_in_flight > 0 && self.ops_in_flight + ops.len() > MAX_OPS_IN_FLIGHT {
            if !self.wait_for_commit() {
                return;
            }
        }
        // The committer chooses the durability (one sync for all the batches waiting).
        let mut batch = self.ks.db.batch().durability(Some(PersistMode::Buffer));
        let mut replies: Vec<Reply> = Vec::with_capacity(ops.len());
        let mut ordered: Vec<(SeqHook, u64)> = Vec::new();
        let mut synced: Vec<(SeqHook, u64)> = Vec::new();
        let mut appended: Vec<(UserId, MessageId)> = Vec::new();
        let mut inboxes: Vec<UserId> = Vec::with_capacity(ops.len());
        let op_count = ops.len();
        // Inboxes whose counters changed: written once per batch, not once per message. The
        // value is the first seq appended to the inbox in this batch (`u64::MAX` if none): a
        // seq from there on is only in the batch, not in the store, and cannot be removed yet.
        let mut touched: Map<UserId, u64> =
            Map::with_capacity_and_hasher(ops.len(), Default::default());
        for op in ops {
            match op {
                Op::Append(message, hooks, tx) => {
                    inboxes.push(message.recipient);
                    let result = self.append(&mut batch, &mut appended, &mut touched, *message);
                    if let Ok(Appended::Stored { seq }) = &result {
                        ordered.extend(hooks.ordered.map(|hook| (hook, *seq)));
                        synced.extend(hooks.synced.map(|hook| (hook, *seq)));
                    }
                    replies.push(deferred(tx, result));
                }
                Op::Remove(id, seqs, _, tx) => {
                    let result = self.remove(&mut batch, &mut touched, id, &seqs);
                    inboxes.push(id);
                    replies.push(deferred(tx, result));
                }
                Op::DropInbox(id, tx) => {
                    let result = self.drop_inbox(&mut batch, &touched, id);
                    inboxes.push(id);
                    replies.push(deferred(tx, result));
                }
                Op::ForgetSent(keys, tx) => {
                    let count = keys.len() as u64;
                    for key in keys {
                        batch.remove(&self.ks.sent, key);
                    }
                    replies.push(deferred(tx, Ok(count)));
                }
            }
        }
        let mut checkpoints = Vec::new();
        for id in touched.into_keys() {
            let (Some(&next), Some(&stored), Some(user)) = (
                self.next_seq.get(&id),
                self.stored_seq.get(&id),
                self.names.get(&id),
            ) else {
                continue;
            };
            if next.saturating_sub(stored) >= SEQ_CHECKPOINT {
                batch.insert(
                    &self.ks.meta,
                    meta_key(b"seq", user),
                    seq_value(next, self.epoch),
                );
                checkpoints.push((id, next));
            }
        }
        // The batch's order is final: let the messages go to online recipients while it is
        // committed and synced, which the committer thread does while this one goes on.
        for (hook, seq) in ordered {
            hook(seq);
        }
        // Counters are recorded as stored now; if the commit fails, fjall refuses every later
        // write and the next start begins a new epoch anyway.
        self.stored_seq.extend(checkpoints);
        for inbox in &inboxes {
            *self.inboxes_in_flight.entry(*inbox).or_default() += 1;
        }
        let in_flight = &self.inboxes_in_flight;
        self.shares.evict(|id| !in_flight.contains_key(&id));
        self.ops_in_flight += op_count;
        let job = Job {
            batch,
            must_sync,
            synced,
            replies,
            appended,
            inboxes,
            ops: op_count,
        };
        let Some(jobs) = &self.jobs else {
            return;
        };
        if let Err(std_mpsc::SendError(job)) = jobs.send(job) {
            self.committer_gone();
            let error = StoreError::WriterStopped;
            job.replies
                .into_iter()
                .for_each(|reply| reply(Some(&error)));
        }
    }

    /// Blocks until the committer reports a batch; `false` if it is gone.
    fn wait_for_commit(&mut self) -> bool {
        match self.committed.recv() {
            Ok(done) => {
                self.take_note(done);
                true
            }
            Err(_) => {
                self.committer_gone();
                false
            }
        }
    }

    /// The committer stopped (it panicked): nothing more can be stored, and the next start
    /// must not trust the counters.
    fn committer_gone(&mut self) {
        tracing::error!("the inbox committer stopped; no more messages can be stored");
        self.commit_failed.store(true, Ordering::SeqCst);
        self.jobs = None;
        self.note_commits();
    }

    fn take_note(&mut self, done: Committed) {
        for key in done.appended {
            self.in_flight.remove(&key);
        }
        for inbox in done.inboxes {
            if let Some(n) = self.inboxes_in_flight.get_mut(&inbox) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.inboxes_in_flight.remove(&inbox);
                }
            }
        }
        self.ops_in_flight = self.ops_in_flight.saturating_sub(done.ops);
    }

    /// Takes note of the batches committed since the last call: their messages are in the
    /// store now, and after a failed commit the caches may describe writes that never
    /// happened.
    fn note_commits(&mut self) {
        while let Ok(done) = self.committed.try_recv() {
            self.take_note(done);
        }
        if !self.failed && self.commit_failed.load(Ordering::SeqCst) {
            self.failed = true;
            // Reloaded lazily. The seq counters stay (they only grow): the failed batch's seqs
            // may have been delivered.
            self.pending.clear();
            self.shares.clear();
            self.known = self
                .next_seq
                .iter()
                .map(|(id, next)| (*id, KnownPending::new(*next)))
                .collect();
        }
    }

    /// Counts the senders' shares of inbox `id` from the store, unless they are known (or not
    /// limited). The store must show every batch built for the inbox, so this waits for those
    /// still being committed. Called before anything else touches the inbox in a batch, so
    /// the store is also current with respect to the batch being built.
    fn load_shares(&mut self, id: UserId) -> Result<(), StoreError> {
        if !self.shares.enabled() || self.shares.is_tracked(id) {
            return Ok(());
        }
        while self.inboxes_in_flight.contains_key(&id) {
            if !self.wait_for_commit() {
                return Err(StoreError::WriterStopped);
            }
        }
        let pending = count_from_store(&self.ks.inbox, &self.ks.user_ids, id)?;
        self.pending.entry(id).or_insert(pending.len() as u64);
        self.shares.load(id, pending);
        Ok(())
    }

    /// Marks user `id` dropped and removes every message of their inbox. Messages appended to
    /// it in the batch being built are not in the store yet (and a key inserted and removed in
    /// one batch is ambiguous): then it answers `None`, and the caller asks again, in a later
    /// batch, when no new message can have come (the user is dropped).
    fn drop_inbox(
        &mut self,
        batch: &mut OwnedWriteBatch,
        touched: &Map<UserId, u64>,
        id: UserId,
    ) -> Result<Option<u64>, StoreError> {
        self.dropped.insert(id);
        if touched.get(&id).is_some_and(|first| *first != u64::MAX) {
            return Ok(None);
        }
        while self.inboxes_in_flight.contains_key(&id) {
            if !self.wait_for_commit() {
                return Err(StoreError::WriterStopped);
            }
        }
        let mut removed = 0;
        let keys: Vec<_> = self
            .ks
            .inbox
            .prefix(id.to_be_bytes())
            .map(|entry| entry.key().map(|key| key.to_vec()))
            .collect::<Result<_, _>>()?;
        for key in keys {
            // Their senders' records must not go on naming the deleted account either.
            if let Ok(fixed) = <[u8; 12]>::try_from(key.as_slice()) {
                self.settle_sent(batch, id, fixed)?;
            }
            batch.remove(&self.ks.inbox, key);
            removed += 1;
        }
        self.pending.insert(id, 0);
        self.known.remove(&id);
        self.shares.forget(id);
        Ok(Some(removed))
    }

    /// Pending messages of user `id`, counted from the inbox (once per process and inbox).
    fn count_pending(&self, id: UserId) -> Result<u64, StoreError> {
        let mut count = 0u64;
        for entry in self.ks.inbox.prefix(id.to_be_bytes()) {
            entry.key()?;
            count += 1;
        }
        Ok(count)
    }

    /// The stored next seq of `user`'s inbox and the epoch it was stored in.
    fn load_seq(&self, user: &Username) -> Result<(u64, u64), StoreError> {
        let Some(bytes) = self.ks.meta.get(meta_key(b"seq", user))? else {
            return Ok((0, 0));
        };
        let corrupt = || StoreError::Corrupt {
            keyspace: "meta",
            reason: "a seq counter is neither 8 nor 16 bytes".into(),
        };
        let word = |at: usize| -> Result<u64, StoreError> {
            let part = bytes.get(at..at + 8).ok_or_else(corrupt)?;
            Ok(u64::from_be_bytes(part.try_into().map_err(|_| corrupt())?))
        };
        match bytes.len() {
            8 => Ok((word(0)?, 0)),
            16 => Ok((word(0)?, word(8)?)),
            _ => Err(corrupt()),
        }
    }

    fn append(
        &mut self,
        batch: &mut OwnedWriteBatch,
        appended: &mut Vec<(UserId, MessageId)>,
        touched: &mut Map<UserId, u64>,
        addressed: Addressed,
    ) -> Result<Appended, StoreError> {
        let Addressed {
            message,
            sender: sender_id,
            recipient: recipient_id,
        } = addressed;
        if self.dropped.contains(&recipient_id) {
            return Err(StoreError::UnknownUser(message.recipient));
        }
        if self.dropped.contains(&sender_id) {
            return Err(StoreError::UnknownUser(message.sender));
        }
        let sent_key = sent_key(sender_id, &message.id.0);
        if self.in_flight.contains(&(sender_id, message.id))
            || self.ks.sent.contains_key(sent_key)?
        {
            return Ok(Appended::Duplicate);
        }
        self.load_shares(recipient_id)?;
        let pending = match self.pending.get(&recipient_id) {
            Some(n) => *n,
            None => self.count_pending(recipient_id)?,
        };
        if pending >= self.max_pending {
            return Ok(Appended::InboxFull);
        }
        let body_len = message.body.len() as u64;
        if self
            .shares
            .admits(recipient_id, sender_id, body_len)
            .is_err()
        {
            return Ok(Appended::SenderQuota);
        }
        let seq = match self.next_seq.get(&recipient_id) {
            Some(n) => *n,
            None => {
                let (stored, written_in) = self.load_seq(&message.recipient)?;
                let epochs = self.epoch.saturating_sub(written_in);
                let next = stored
                    .max(1)
                    .saturating_add(epochs.saturating_mul(SEQ_RESTART_GAP));
                self.stored_seq.insert(recipient_id, stored);
                self.names.insert(recipient_id, message.recipient.clone());
                self.known.insert(recipient_id, KnownPending::new(next));
                next
            }
        };
        let stored = StoredMessage {
            seq,
            id: message.id,
            from: message.sender.clone(),
            kind: message.kind,
            sent_at: message.sent_at,
            expires_at: message.expires_at,
            body: message.body,
        };
        let record = SentRecord {
            recipient: message.recipient.clone(),
            seq,
            expires_at: message.expires_at,
        };
        // Sized up front: growing the buffer field by field cost more than the encoding.
        let stored_len =
            STORED_OVERHEAD + stored.body.len() + stored.from.as_str().len() + stored.kind.len();
        batch.insert(
            &self.ks.inbox,
            inbox_key(recipient_id, seq),
            encode_record(&stored, stored_len)?,
        );
        let record_len = SENT_OVERHEAD + record.recipient.as_str().len();
        batch.insert(&self.ks.sent, sent_key, encode_record(&record, record_len)?);
        self.next_seq.insert(recipient_id, seq + 1);
        self.pending.insert(recipient_id, pending + 1);
        self.shares.add(recipient_id, seq, sender_id, body_len);
        let first = touched.entry(recipient_id).or_insert(u64::MAX);
        *first = (*first).min(seq);
        self.in_flight.insert((sender_id, message.id));
        appended.push((sender_id, message.id));
        Ok(Appended::Stored { seq })
    }

    /// Replaces the send record of the message at `key` of inbox `id`, which is being removed
    /// (acknowledged, unsent or expired), with a settled marker that names no recipient: its
    /// id stays a duplicate until it expires, and no sender–recipient pair outlives the
    /// message. Costs a read of the entry (and of its sender's id) per removed message.
    fn settle_sent(
        &mut self,
        batch: &mut OwnedWriteBatch,
        id: UserId,
        key: [u8; 12],
    ) -> Result<(), StoreError> {
        let mut entry = self.ks.inbox.get(key)?;
        // Known pending but not in the store yet: its batch is still on its way to the
        // committer.
        while entry.is_none() && self.inboxes_in_flight.contains_key(&id) {
            if !self.wait_for_commit() {
                return Err(StoreError::WriterStopped);
            }
            entry = self.ks.inbox.get(key)?;
        }
        let Some(entry) = entry else {
            return Ok(());
        };
        // A record that cannot be read must not block the removal: its send record then simply
        // stays until it expires.
        let origin = match sent_records::origin(&entry) {
            Ok(origin) => origin,
            Err(e) => {
                tracing::warn!(error = %e, "cannot settle a send record");
                return Ok(());
            }
        };
        let Some(sender) = self.ks.user_ids.get(origin.from.as_str().as_bytes())? else {
            return Ok(());
        };
        let Ok(sender) = decode_id("user_ids", &sender) else {
            return Ok(());
        };
        batch.insert(
            &self.ks.sent,
            sent_key(sender, &origin.id.0),
            sent_records::settled(origin.expires_at)?,
        );
        Ok(())
    }

    fn remove(
        &mut self,
        batch: &mut OwnedWriteBatch,
        touched: &mut Map<UserId, u64>,
        id: UserId,
        seqs: &[u64],
    ) -> Result<u64, StoreError> {
        self.load_shares(id)?;
        let mut removed = 0;
        let mut store_current = false;
        let mut seen = Set::with_capacity_and_hasher(seqs.len(), Default::default());
        let next = self.next_seq.get(&id).copied();
        let in_batch_from = touched.get(&id).copied().unwrap_or(u64::MAX);
        for &seq in seqs {
            if !seen.insert(seq) {
                continue;
            }
            let known = match (self.known.get(&id), next) {
                // Appended in this very batch: not in the store yet (as before this cache).
                _ if seq >= in_batch_from => Some(false),
                // Never given out.
                (Some(_), Some(next)) if seq >= next => Some(false),
                (Some(k), Some(_)) => k.pending(seq),
                _ => None,
            };
            let key = inbox_key(id, seq);
            let present = match known {
                Some(present) => present,
                None => {
                    // The store decides what this writer does not know; it must then show
                    // the inbox's batches built before this one (committed, if not synced).
                    if !store_current {
                        while self.inboxes_in_flight.contains_key(&id) {
                            if !self.wait_for_commit() {
                                return Err(StoreError::WriterStopped);
                            }
                        }
                        store_current = true;
                    }
                    self.ks.inbox.contains_key(key)?
                }
            };
            if present {
                self.settle_sent(batch, id, key)?;
                batch.remove(&self.ks.inbox, key);
                self.shares.remove(id, seq);
                removed += 1;
                if let Some(k) = self.known.get_mut(&id) {
                    k.remove(seq);
                }
            }
        }
        if self
            .known
            .get(&id)
            .is_some_and(|k| k.removed.len() > MAX_REMOVED_AHEAD)
        {
            match next {
                Some(next) => {
                    self.known.insert(id, KnownPending::new(next));
                }
                None => {
                    self.known.remove(&id);
                }
            }
        }
        if removed > 0 {
            let pending = match self.pending.get(&id) {
                Some(n) => *n,
                None => self.count_pending(id)?,
            };
            self.pending.insert(id, pending.saturating_sub(removed));
            touched.entry(id).or_insert(u64::MAX);
        }
        Ok(removed)
    }
}

/// The committer thread: commits the batches the writer built, in order, syncs once for all
/// of those waiting (in `Sync` durability, when one of them needs it), then answers them. The
/// writer goes on ordering new messages meanwhile, so delivery never waits for a sync.
fn run_committer(
    db: &Database,
    durability: Durability,
    jobs: &std_mpsc::Receiver<Job>,
    committed: &std_mpsc::Sender<Committed>,
    (failed, on_failure): (&AtomicBool, &(dyn Fn(&fjall::Error) + Send + Sync)),
) {
    let _panic = FailOnPanic(failed);
    while let Ok(first) = jobs.recv() {
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
                for (hook, seq) in synced {
                    hook(seq);
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

/// A stored seq counter: the next seq and the epoch it is written in.
fn seq_value(next: u64, epoch: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(16);
    value.extend_from_slice(&next.to_be_bytes());
    value.extend_from_slice(&epoch.to_be_bytes());
    value
}

/// Stores the running marker (synced, so a crash from now on is noticed), starting a new
/// epoch if the last writer did not stop cleanly; returns the current epoch.
fn mark_running(ks: &InboxKeyspaces) -> Result<u64, StoreError> {
    let mut epoch = match ks.meta.get(EPOCH)? {
        None => 0,
        Some(value) => {
            u64::from_be_bytes(value.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                keyspace: "meta",
                reason: "the seq epoch is not 8 bytes".into(),
            })?)
        }
    };
    let unclean = ks.meta.contains_key(RUNNING)?;
    let mut batch = ks.db.batch().durability(Some(PersistMode::SyncData));
    if unclean {
        epoch = epoch.saturating_add(1);
        batch.insert(&ks.meta, EPOCH, epoch.to_be_bytes().to_vec());
    }
    batch.insert(&ks.meta, RUNNING, Vec::new());
    batch.commit()?;
    if unclean {
        tracing::warn!(
            epoch,
            "the last run did not stop cleanly: inbox sequence numbers jump ahead, so none \
             handed out before the stop is reused"
        );
    }
    Ok(epoch)
}

/// An upper bound on a stored message's encoding beyond its body, sender and kind (field
/// names, headers, integers: 98 bytes at most; a test checks it).
const STORED_OVERHEAD: usize = 112;
/// The same for a send record beyond the recipient's name (47 bytes at most).
const SENT_OVERHEAD: usize = 64;

/// `value` as a MessagePack map, into a buffer of `capacity` bytes.
fn encode_record<T: serde::Serialize>(value: &T, capacity: usize) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(capacity);
    rmp_serde::encode::write_named(&mut out, value)?;
    Ok(out)
}

/// Packages a result so it is sent only after the batch commit, as an error if it failed.
fn deferred<T: Send + 'static>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_buffers_are_sized_for_the_largest_fields() {
        let from = Username::parse(&"a".repeat(32)).unwrap();
        let stored = StoredMessage {
            seq: u64::MAX,
            id: MessageId([0xff; 16]),
            from: from.clone(),
            kind: "k".repeat(300),
            sent_at: u64::MAX,
            expires_at: u64::MAX,
            body: vec![7; 70_000],
        };
        let capacity =
            STORED_OVERHEAD + stored.body.len() + stored.from.as_str().len() + stored.kind.len();
        let bytes = encode_record(&stored, capacity).unwrap();
        assert!(bytes.len() <= capacity, "{} > {capacity}", bytes.len());
        assert_eq!(bytes.capacity(), capacity, "no growth");
        assert_eq!(
            rmp_serde::from_slice::<StoredMessage>(&bytes).unwrap(),
            stored
        );

        let record = SentRecord {
            recipient: from,
            seq: u64::MAX,
            expires_at: u64::MAX,
        };
        let capacity = SENT_OVERHEAD + record.recipient.as_str().len();
        let bytes = encode_record(&record, capacity).unwrap();
        assert_eq!(bytes.capacity(), capacity, "no growth");
        assert_eq!(rmp_serde::from_slice::<SentRecord>(&bytes).unwrap(), record);
    }
}
