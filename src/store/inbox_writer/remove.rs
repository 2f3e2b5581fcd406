//! Removals (acknowledged, unsent, expired messages) in the batch being built, and the
//! settling of the send record that comes with each; and the held copies that
//! acknowledgements removed outside the writer.

use fjall::OwnedWriteBatch;

use super::caches::{KnownPending, Origin};
use super::{InboxKeyspaces, MAX_REMOVED_AHEAD, Map, Set, WriterState};
use crate::store::StoreError;
use crate::store::devices::InboxId;
use crate::store::sent_records;
use crate::store::shared_bodies::{BodyKey, shared_header};
use crate::store::user_ids::{decode_id, inbox_key, sent_key};

impl WriterState {
    /// Replaces the send record of message `seq` of inbox `id`, which is being removed
    /// (acknowledged, unsent or expired), with a settled marker that names no recipient: its
    /// id stays a duplicate until it expires, and no sender–recipient pair outlives the
    /// message. The marker goes in the batch that removes the message. Returns the shared body
    /// the message's entry references, if any: the caller releases it in that batch.
    ///
    /// A message of several copies has an origin per copy, all naming the one record: the
    /// first copy to go settles it, and each later one writes the same marker again (the
    /// record's copies are then delivered as usual, and no longer named anywhere).
    ///
    /// A message this writer appended lately settles from memory
    /// ([`Origins`](super::caches::Origins)): no read, and no wait for its batch's commit.
    /// Others (older, or from before a restart) are read from the store. One difference: from
    /// memory, the record of a sender whose account was deleted since is settled too, where
    /// the store path no longer finds their id and leaves it, naming its recipient, until it
    /// expires.
    pub(super) fn settle_sent(
        &mut self,
        batch: &mut OwnedWriteBatch,
        id: InboxId,
        seq: u64,
    ) -> Result<Option<BodyKey>, StoreError> {
        match self.origins.take(id, seq) {
            Some(origin) => {
                settle(batch, &self.ks, origin)?;
                Ok(origin.body)
            }
            None => self.settle_sent_from_store(batch, id, seq),
        }
    }

    /// [`Self::settle_sent`] for a message whose origin is not in memory: reads its entry (and
    /// its sender's id).
    fn settle_sent_from_store(
        &mut self,
        batch: &mut OwnedWriteBatch,
        id: InboxId,
        seq: u64,
    ) -> Result<Option<BodyKey>, StoreError> {
        let key = inbox_key(id, seq);
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
            return Ok(None);
        };
        // A record that cannot be read must not block the removal: its send record then simply
        // stays until it expires (and a shared body it referenced, unknown, stays too).
        let stored = match sent_records::origin(&entry) {
            Ok(origin) => origin,
            Err(e) => {
                tracing::warn!(error = %e, "cannot settle a send record");
                return Ok(None);
            }
        };
        let body = stored.shared;
        // A shared entry's sender and id are in its shared record.
        let (message_id, from) = match (stored.id, stored.from, body) {
            (Some(message_id), Some(from), _) => (message_id, from),
            (_, _, Some(key)) => {
                let header = self.ks.bodies.get(key)?.map(|r| shared_header(&r));
                match header {
                    Some(Ok(header)) => (header.id, header.from),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cannot settle a send record");
                        return Ok(body);
                    }
                    None => return Ok(body),
                }
            }
            _ => return Ok(body),
        };
        let Some(sender) = self.ks.user_ids.get(from.as_str().as_bytes())? else {
            return Ok(body);
        };
        let Ok(sender) = decode_id("user_ids", &sender) else {
            return Ok(body);
        };
        let origin = Origin {
            sender,
            id: message_id,
            expires_at: stored.expires_at,
            body,
        };
        settle(batch, &self.ks, origin)?;
        Ok(body)
    }

    /// Takes note of the held copies acknowledged outside the writer since the last call (see
    /// `held`): they leave their inboxes' counts as if the writer had removed them.
    pub(super) fn note_acknowledged(&mut self) {
        let outside = self.held.lock().take_outside();
        self.forget_acknowledged(outside);
    }

    fn forget_acknowledged(&mut self, copies: Vec<(InboxId, u64)>) {
        for (id, seq) in copies {
            self.forget_held_copy(id, seq);
            if let Some(pending) = self.pending.get_mut(&id) {
                *pending = pending.saturating_sub(1);
            }
        }
    }

    /// Forgets a held copy that left its inbox: its origin, its sender's share, its place in
    /// what the writer knows of the inbox (its inbox's pending count is the caller's).
    fn forget_held_copy(&mut self, id: InboxId, seq: u64) {
        self.origins.take(id, seq);
        self.shares.remove(id, seq);
        if let Some(k) = self.known.get_mut(&id) {
            k.remove(seq);
        }
    }

    pub(super) fn remove(
        &mut self,
        batch: &mut OwnedWriteBatch,
        touched: &mut Map<InboxId, u64>,
        id: InboxId,
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
            // A held copy leaves without a trace: it was never written (see `held`). Copies
            // acknowledged outside meanwhile are noted first: this one may be among them.
            let (was_held, outside) = {
                let mut held = self.held.lock();
                (held.remove_copy(id, seq), held.take_outside())
            };
            self.forget_acknowledged(outside);
            if was_held {
                self.forget_held_copy(id, seq);
                removed += 1;
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
                let body = self.settle_sent(batch, id, seq)?;
                batch.remove(&self.ks.inbox, key);
                if let Some(body) = body {
                    self.bodies.release(&self.ks, body)?;
                }
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

/// Puts the settled marker of the message of `origin` in `batch`, over its send record.
fn settle(
    batch: &mut OwnedWriteBatch,
    ks: &InboxKeyspaces,
    origin: Origin,
) -> Result<(), StoreError> {
    batch.insert(
        &ks.sent,
        sent_key(origin.sender, &origin.id.0),
        sent_records::settled(origin.expires_at)?,
    );
    Ok(())
}
