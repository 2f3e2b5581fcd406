//! The writer thread: it waits for operations (or for the held messages' deadline), builds a
//! batch of them while it holds the writer's state, and at the end stores the counters.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use fjall::PersistMode;
use tokio::sync::mpsc;

use super::caches::KnownPending;
use super::committer::Committed;
use super::counters::seq_value;
use super::held::SharedHeld;
use super::{Op, RUNNING, WriterState};

/// Locks the writer's state (a panic while it was locked left it as consistent as between
/// two operations: the writer then stops, and its callers see `WriterStopped`).
fn lock_state(state: &Mutex<WriterState>) -> std::sync::MutexGuard<'_, WriterState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The writer thread: waits for operations (or for the held messages' deadline) and builds a
/// batch of them, holding the state meanwhile.
pub(super) fn run_writer(
    shared: &Mutex<WriterState>,
    held: &SharedHeld,
    idle: &AtomicBool,
    mut rx: mpsc::Receiver<Op>,
) {
    let max_batch = lock_state(shared).max_batch;
    // A clock to wait for the next operation with a deadline while messages are held.
    let clock = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(clock) => Some(clock),
        Err(e) => {
            tracing::warn!(error = %e, "no timer for the inbox writer; messages are written at once");
            held.clear();
            None
        }
    };
    loop {
        let deadline = held.lock().deadline();
        idle.store(true, Ordering::Release);
        let first = match (deadline, &clock) {
            (Some(deadline), Some(clock)) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                // (The timer is made inside the clock's context.)
                let next =
                    clock.block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await });
                match next {
                    Ok(op) => op,
                    Err(_) => {
                        // The oldest held message is due (or a finished one to settle).
                        idle.store(false, Ordering::Release);
                        lock_state(shared).commit(Vec::new(), false);
                        continue;
                    }
                }
            }
            _ => rx.blocking_recv(),
        };
        idle.store(false, Ordering::Release);
        let Some(first) = first else {
            break;
        };
        let mut ops = vec![first];
        while ops.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        // A wake-up only makes the deadline be looked at again (see `InboxWriter::append`).
        ops.retain(|op| !matches!(op, Op::Wake));
        if !ops.is_empty() {
            lock_state(shared).commit(ops, false);
        }
    }
    lock_state(shared).stop();
}

impl WriterState {
    /// After the last operation: writes what is held, waits for the committer, and stores
    /// every counter exactly (see [`RUNNING`]).
    fn stop(&mut self) {
        // What is still held is written before the stop.
        if !self.held.lock().is_empty() {
            self.commit(Vec::new(), true);
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
                if let Some(counter) = self.names.get(id)
                    && self.stored_seq.get(id) != Some(next)
                {
                    batch.insert(&self.ks.meta, counter.clone(), seq_value(*next, self.epoch));
                }
            }
            batch.remove(&self.ks.meta, RUNNING);
            if let Err(e) = batch.commit() {
                tracing::warn!(error = %e, "cannot store the inbox counters at stop");
            }
        }
    }

    /// Blocks until the committer reports a batch; `false` if it is gone.
    pub(super) fn wait_for_commit(&mut self) -> bool {
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
    pub(super) fn committer_gone(&mut self) {
        tracing::error!("the inbox committer stopped; no more messages can be stored");
        self.commit_failed.store(true, Ordering::SeqCst);
        self.jobs = None;
        self.note_commits();
    }

    pub(super) fn take_note(&mut self, done: Committed) {
        self.jobs_in_flight = self.jobs_in_flight.saturating_sub(1);
        for key in done.appended {
            self.in_flight.remove(&key);
        }
        self.bodies.committed(&done.bodies);
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
    pub(super) fn note_commits(&mut self) {
        while let Ok(done) = self.committed.try_recv() {
            self.take_note(done);
        }
        if !self.failed && self.commit_failed.load(Ordering::SeqCst) {
            self.failed = true;
            // Reloaded lazily. The seq counters stay (they only grow): the failed batch's seqs
            // may have been delivered.
            self.pending.clear();
            self.shares.clear();
            self.origins.clear();
            self.sent_ids.clear();
            self.bodies.clear();
            self.known = self
                .next_seq
                .iter()
                .map(|(id, next)| (*id, KnownPending::new(*next)))
                .collect();
        }
    }
}
