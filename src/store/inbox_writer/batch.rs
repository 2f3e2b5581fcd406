//! How the inbox writer builds a batch: each operation applied (see `apply`), held messages
//! kept back or written (see `held`), and the batch handed to the committer, or committed on
//! this thread when it needs no sync and nothing is on its way to the committer.

use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use fjall::PersistMode;

use super::committer::{Committed, Job, Reply, deferred};
use super::held::held_bytes;
use super::{MAX_OPS_IN_FLIGHT, Map, Op, SEQ_CHECKPOINT, WriterState, seq_value};
use crate::protocol::MessageId;
use crate::store::devices::InboxId;
use crate::store::user_ids::UserId;
use crate::store::{Appended, Placed, PlacedHook, Removal, StoreError, sent_records};

impl WriterState {
    /// Builds one batch of `ops`, with the held messages now due (all of them with
    /// `flush_all`), and hands it to the committer.
    pub(super) fn commit(&mut self, ops: Vec<Op>, flush_all: bool) {
        // Acknowledgements that removed held copies since the last batch, before any
        // operation that may concern the same copies.
        self.note_acknowledged();
        // What is held goes to the committer in a batch of its own, ahead of this one, when
        // this one may write a message directly or drop an inbox: the store must never show a
        // message before an older one of the same inbox (a deliverer reading it would skip the
        // older), and an ack in this batch of a message written only now would find it not
        // yet in the store.
        if !ops.is_empty() && !self.held.lock().is_empty() && self.must_flush_first(&ops) {
            self.commit(Vec::new(), true);
        }
        if !ops.is_empty() {
            crate::server::metrics::inbox_batch(ops.len());
        }
        // Only appends written and unsends need the sync before their answer. A batch of acks
        // alone (or expiry, forgetting expired send records, or messages acknowledged while
        // held) is handed to the OS and made durable by the next synced batch (the journal is
        // written in order): see [`Removal::Acknowledged`].
        let mut must_sync = ops
            .iter()
            .any(|op| matches!(op, Op::Remove(_, _, Removal::Unsent, _) | Op::DropInbox(..)));
        self.note_commits();
        if self.jobs.is_none() {
            // The committer is gone: nothing can be stored. Dropping the operations (and what
            // is held) answers their callers with `WriterStopped`.
            self.held.clear();
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
        // Each stored message's `ordered` hook and its copies' places.
        let mut hooked: Vec<(PlacedHook, Vec<Placed>)> = Vec::new();
        let mut synced: Vec<(PlacedHook, Vec<Placed>)> = Vec::new();
        let mut appended: Vec<(UserId, MessageId)> = Vec::new();
        let mut inboxes: Vec<InboxId> = Vec::with_capacity(ops.len());
        let mut op_count = ops.len();
        // Inboxes whose counters changed: written once per batch, not once per message. The
        // value is the first seq appended to the inbox in this batch (`u64::MAX` if none): a
        // seq from there on is only in the batch, not in the store, and cannot be removed yet.
        let mut touched: Map<InboxId, u64> =
            Map::with_capacity_and_hasher(ops.len(), Default::default());
        let now = Instant::now();
        // After a failed commit nothing is held (the caches are reloaded from the store), and
        // an inbox is dropped only once the store shows all its messages.
        let dropping = ops.iter().any(|op| matches!(op, Op::DropInbox(..)));
        let flush_all = flush_all || self.failed || dropping;
        // An inbox is dropped only once the store shows all its messages: in a batch that
        // drops one, every message is written (a drop then answers "not done", see
        // `drop_inbox`, and comes again).
        let may_hold = !flush_all;
        if flush_all {
            let written = self.write_held(
                &mut batch,
                &mut touched,
                (now, true),
                (&mut replies, &mut synced, &mut appended, &mut inboxes),
            );
            must_sync |= written > 0;
            op_count += written;
        }
        for op in ops {
            match op {
                Op::Append(message, hooks, tx) => {
                    let targets: Vec<InboxId> = message.targets.iter().map(|t| t.inbox).collect();
                    let key = (message.sender, message.message.id);
                    let wants_places = hooks.ordered.is_some() || hooks.synced.is_some();
                    let may_hold = may_hold && hooks.hold;
                    let result = self.append(&mut batch, &mut touched, *message, wants_places);
                    let (outcome, places, staged) = match result {
                        Ok(done) => done,
                        Err(e) => {
                            inboxes.extend(targets);
                            replies.push(deferred(tx, Err(e)));
                            continue;
                        }
                    };
                    if let Some(hook) = hooks.ordered
                        && let Some(places) = &places
                    {
                        hooked.push((hook, places.clone()));
                    }
                    let synced_hook = hooks.synced.zip(places);
                    let hold = may_hold
                        && staged
                            .as_ref()
                            .is_some_and(|staged| self.held.lock().admits(staged));
                    match staged {
                        Some(staged) if hold => {
                            self.held.lock().hold(
                                staged,
                                synced_hook,
                                deferred(tx, Ok(outcome)),
                                now,
                            );
                        }
                        Some(staged) => {
                            // Older held messages first (those held in this batch: the earlier
                            // ones went ahead in a batch of their own).
                            op_count += self.write_held(
                                &mut batch,
                                &mut touched,
                                (now, true),
                                (&mut replies, &mut synced, &mut appended, &mut inboxes),
                            );
                            must_sync = true;
                            appended.push(staged.message);
                            inboxes.extend(targets);
                            if let Err(e) =
                                self.write_staged(&mut batch, &mut touched, staged, false)
                            {
                                replies.push(deferred(tx, Err(e)));
                                continue;
                            }
                            synced.extend(synced_hook);
                            replies.push(deferred(tx, Ok(outcome)));
                        }
                        None => {
                            inboxes.extend(targets);
                            let reply = deferred(tx, Ok(outcome.clone()));
                            // A resend of a held message is answered with it: once it is
                            // written, or acknowledged.
                            let reply = if outcome == Appended::Duplicate {
                                self.held.lock().wait_with(key, reply)
                            } else {
                                Some(reply)
                            };
                            // (Answered after this batch's commit, which follows that of any
                            // batch writing the first copy: the duplicate is durable then.)
                            must_sync |= reply.is_some();
                            replies.extend(reply);
                        }
                    }
                }
                Op::Remove(id, seqs, _, tx) => {
                    let result = self.remove(&mut batch, &mut touched, id, &seqs);
                    inboxes.push(id);
                    replies.push(deferred(tx, result));
                }
                Op::DropInbox(drop, tx) => {
                    inboxes.push(drop.inbox);
                    let result = self.drop_inbox(&mut batch, &touched, drop);
                    replies.push(deferred(tx, result));
                }
                Op::Wake => {}
                Op::ForgetSent(keys, tx) => {
                    let count = keys.len() as u64;
                    for key in keys {
                        self.sent_ids.forget_key(&key);
                        batch.remove(&self.ks.sent, key);
                    }
                    replies.push(deferred(tx, Ok(count)));
                }
            }
        }
        // Held messages whose every copy was acknowledged: never written, only settled (the
        // id stays a duplicate). Their senders may have `sent` now: the recipients have them.
        let finished = self.held.lock().take_finished();
        crate::server::metrics::inbox_skipped(finished.len());
        for held in finished {
            let marker = sent_records::settled(held.staged.expires_at);
            match marker {
                Ok(marker) => batch.insert(&self.ks.sent, held.staged.sent_key, marker),
                Err(e) => tracing::warn!(error = %e, "cannot settle a send record"),
            }
            appended.push(held.staged.message);
            replies.extend(held.replies);
            synced.extend(held.synced);
        }
        let written = self.write_held(
            &mut batch,
            &mut touched,
            (now, false),
            (&mut replies, &mut synced, &mut appended, &mut inboxes),
        );
        must_sync |= written > 0;
        op_count += written;
        if replies.is_empty() && batch.is_empty() && hooked.is_empty() {
            return;
        }
        // The final count of every shared body the batch changed, once each.
        let bodies = self.bodies.take_batch(&mut batch, &self.ks);
        let mut checkpoints = Vec::new();
        // (With the inboxes of appends decided outside this thread since the last batch.)
        let touched_here = std::mem::take(&mut self.touched_here);
        for id in touched.into_keys().chain(touched_here) {
            let (Some(&next), Some(&stored), Some(counter)) = (
                self.next_seq.get(&id),
                self.stored_seq.get(&id),
                self.names.get(&id),
            ) else {
                continue;
            };
            if next.saturating_sub(stored) >= SEQ_CHECKPOINT {
                batch.insert(&self.ks.meta, counter.clone(), seq_value(next, self.epoch));
                checkpoints.push((id, next));
            }
        }
        // The batch's order is final: let the messages go to online recipients while it is
        // committed and synced, which the committer thread does while this one goes on.
        for (hook, places) in hooked {
            hook(&places);
        }
        // Counters are recorded as stored now; if the commit fails, fjall refuses every later
        // write and the next start begins a new epoch anyway.
        self.stored_seq.extend(checkpoints);
        // Messages only held: nothing to commit, nobody to answer.
        if batch.is_empty()
            && replies.is_empty()
            && synced.is_empty()
            && appended.is_empty()
            && inboxes.is_empty()
        {
            return;
        }
        for inbox in &inboxes {
            *self.inboxes_in_flight.entry(*inbox).or_default() += 1;
        }
        {
            let (in_flight, held) = (&self.inboxes_in_flight, self.held.lock());
            self.shares
                .evict(|id| !in_flight.contains_key(&id) && !held.holds_inbox(id));
        }
        self.ops_in_flight += op_count;
        let job = Job {
            batch,
            must_sync,
            synced,
            replies,
            appended,
            inboxes,
            bodies,
            ops: op_count,
        };
        // A batch that needs no sync (acks, messages acknowledged while held), with no other
        // on its way to the committer, is committed here: no hand-off to another thread, and
        // the order of commits stays that of the batches.
        if self.direct && !must_sync && self.jobs_in_flight == 0 {
            self.commit_here(job);
            return;
        }
        let Some(jobs) = &self.jobs else {
            return;
        };
        self.jobs_in_flight += 1;
        if let Err(std_mpsc::SendError(job)) = jobs.send(job) {
            self.committer_gone();
            let error = StoreError::WriterStopped;
            job.replies
                .into_iter()
                .for_each(|reply| reply(Some(&error)));
        }
    }

    /// Puts the held messages due by `now` (all of them with `all`) in `batch`: the entries
    /// of their copies not removed meanwhile, and their send records (settled if a copy was
    /// removed); their answers and `synced` hooks wait for the batch's sync. Returns how many.
    #[allow(clippy::type_complexity)]
    pub(super) fn write_held(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        touched: &mut Map<InboxId, u64>,
        (now, all): (Instant, bool),
        (replies, synced, appended, inboxes): (
            &mut Vec<Reply>,
            &mut Vec<(PlacedHook, Vec<Placed>)>,
            &mut Vec<(UserId, MessageId)>,
            &mut Vec<InboxId>,
        ),
    ) -> usize {
        let due = self.held.lock().take_due(now, all);
        let count = due.len();
        for held in due {
            inboxes.extend(held.staged.entries.iter().map(|e| e.inbox));
            appended.push(held.staged.message);
            let written = self.write_staged(batch, touched, held.staged, held.removed_any);
            match written {
                Ok(()) => {
                    replies.extend(held.replies);
                    synced.extend(held.synced);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write a held message");
                    let error = StoreError::Limit(format!("message not stored: {e}"));
                    for reply in held.replies {
                        reply(Some(&error));
                    }
                }
            }
        }
        count
    }

    /// Commits `job` (which needs no sync) on this thread and answers it: what the committer
    /// would do with it, without waking it.
    pub(super) fn commit_here(&mut self, job: Job) {
        let error = if job.batch.is_empty() {
            None
        } else {
            job.batch.commit().err()
        };
        if let Some(e) = &error {
            self.commit_failed.store(true, Ordering::SeqCst);
            (self.on_failure)(e);
        }
        self.jobs_in_flight += 1;
        self.take_note(Committed {
            appended: job.appended,
            inboxes: job.inboxes,
            bodies: job.bodies,
            ops: job.ops,
        });
        let error = error.map(StoreError::Engine);
        if error.is_none() {
            for (hook, places) in job.synced {
                hook(&places);
            }
        }
        for reply in job.replies {
            reply(error.as_ref());
        }
    }

    /// Whether what is held must be written ahead of `ops`: they drop an inbox, the writer
    /// failed, or one of their appends may be written at once (not to be held, a body shared
    /// by its copies, or more than the hold can take).
    fn must_flush_first(&self, ops: &[Op]) -> bool {
        if self.failed {
            return true;
        }
        let (mut messages, mut bytes) = (0, 0);
        for op in ops {
            match op {
                Op::DropInbox(..) => return true,
                Op::Append(_, hooks, _) if !hooks.hold => return true,
                Op::Append(message, _, _) => match held_bytes(&message.message.copies) {
                    Some(more) => {
                        messages += 1;
                        bytes += more;
                    }
                    None => return true,
                },
                _ => {}
            }
        }
        !self.held.lock().has_room(messages, bytes)
    }
}
