//! Appends decided on the caller's thread (see [`InboxWriter::append`](super::InboxWriter)):
//! an online message otherwise crossed to the writer thread and back before it could go to
//! its recipient, two thread wake-ups on the path of every message at moderate load, when the
//! writer is idle between messages anyway.
//!
//! The caller holds the writer's state, as the writer thread does while it builds a batch, so
//! the decision is the one the writer would make (the same [`WriterState::append`]), at the
//! place in the order where the caller took the state. It is made here only when it needs no
//! store read and no write to a batch:
//! - the message is to be held (every copy's device is online) and the hold admits it;
//! - its sender's send records are known ([`SentIds`](super::sent_ids::SentIds)), and it is
//!   not a duplicate (a resend waits for its first copy's answer: the writer's way);
//! - every copy's inbox has its counter, its pending count and its senders' shares in memory;
//! - no two copies share a body (a shared body is written at once).
//!
//! The message is then held like one the writer held: its copies go to their recipients at
//! once, and an acknowledgement of every copy (see `held`), or the writer at the window's end,
//! answers it. The writer is woken only when this makes it have a deadline where it had none.

use tokio::sync::oneshot;

use super::committer::deferred;
use super::held::held_bytes;
use super::{Addressed, Map, WriterState};
use crate::store::devices::InboxId;
use crate::store::{AppendHooks, Appended, Placed, PlacedHook, StoreError};

/// An `ordered` hook with the copies' places, for the caller to call before it lets go of
/// the state (so copies reach their mailboxes in the order of the decisions), and whether the
/// writer must be woken.
type Decided = (Option<(PlacedHook, Vec<Placed>)>, bool);

/// The answer to an append decided here.
type Answer = oneshot::Sender<Result<Appended, StoreError>>;

impl WriterState {
    /// Decides `message` here if it can be (see the module documentation); gives it back
    /// untouched if not.
    #[allow(clippy::type_complexity)]
    pub(super) fn append_here(
        &mut self,
        message: Box<Addressed>,
        hooks: AppendHooks,
        answer: Answer,
    ) -> Result<Decided, (Box<Addressed>, AppendHooks)> {
        // What the writer would take note of before its next operation.
        self.note_commits();
        self.note_acknowledged();
        if !self.decides_here(&message) {
            return Err((message, hooks));
        }
        let mut scratch = self.ks.db.batch();
        let mut touched: Map<InboxId, u64> = Map::default();
        let wants_places = hooks.ordered.is_some() || hooks.synced.is_some();
        let (outcome, places, staged) =
            match self.append(&mut scratch, &mut touched, *message, wants_places) {
                Ok(decided) => decided,
                Err(e) => {
                    let _ = answer.send(Err(e));
                    return Ok((None, false));
                }
            };
        crate::server::metrics::inbox_caller_append();
        // Counters that may need a checkpoint, in the writer's next batch.
        self.touched_here.extend(touched.into_keys());
        if !scratch.is_empty() {
            // (Never: only a shared body is written by an append itself.)
            tracing::error!("an append decided outside the writer wrote to a batch");
        }
        let Some(staged) = staged else {
            // Refused (a full inbox, the sender's share): nothing to wait for.
            let _ = answer.send(Ok(outcome));
            return Ok((None, false));
        };
        let ordered = hooks.ordered.zip(places.clone());
        let synced = hooks.synced.zip(places);
        let mut held = self.held.lock();
        let woke = held.deadline().is_none();
        held.hold(
            staged,
            synced,
            deferred(answer, Ok(outcome)),
            std::time::Instant::now(),
        );
        Ok((ordered, woke))
    }

    /// Whether [`Self::append_here`] may decide `message` (see the module documentation).
    fn decides_here(&self, message: &Addressed) -> bool {
        let Addressed {
            message,
            sender,
            targets,
        } = message;
        // (What the writer refuses, such as a dropped inbox, is refused here the same way.)
        if self.failed
            || self.jobs.is_none()
            || self.in_flight.contains(&(*sender, message.id))
            || self.sent_ids.contains(*sender, &message.id) != Some(false)
        {
            return false;
        }
        let Some(bytes) = held_bytes(&message.copies) else {
            return false;
        };
        {
            let held = self.held.lock();
            if !held.is_holding() || !held.has_room(1, bytes) {
                return false;
            }
        }
        targets.iter().all(|t| {
            self.next_seq.contains_key(&t.inbox)
                && self.pending.contains_key(&t.inbox)
                && (!self.shares.enabled() || self.shares.is_tracked(t.inbox))
        })
    }
}
