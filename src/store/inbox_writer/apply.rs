//! What the inbox writer does with each operation while it builds a batch: appends (with
//! deduplication and quotas), removals, and the settling of send records that comes with
//! every removal; and how it encodes the records it writes.

use fjall::OwnedWriteBatch;

use super::caches::{KnownPending, Origin};
use super::{Addressed, InboxKeyspaces, MAX_REMOVED_AHEAD, Map, SEQ_RESTART_GAP, Set, WriterState};
use crate::protocol::MessageId;
use crate::store::sender_shares::count_from_store;
use crate::store::sent_records;
use crate::store::user_ids::{UserId, decode_id, inbox_key, inbox_seq, sent_key};
use crate::store::{Appended, SentRecord, StoreError, StoredMessage};

impl WriterState {
    /// Counts the senders' shares of inbox `id` from the store, unless they are known (or not
    /// limited). The store must show every batch built for the inbox, so this waits for those
    /// still being committed. Called before anything else touches the inbox in a batch, so
    /// the store is also current with respect to the batch being built.
    pub(super) fn load_shares(&mut self, id: UserId) -> Result<(), StoreError> {
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
    pub(super) fn drop_inbox(
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
            self.settle_sent(batch, id, inbox_seq(&key))?;
            batch.remove(&self.ks.inbox, key);
            removed += 1;
        }
        self.pending.insert(id, 0);
        self.known.remove(&id);
        self.shares.forget(id);
        Ok(Some(removed))
    }

    /// Pending messages of user `id`, counted from the inbox (once per process and inbox).
    pub(super) fn count_pending(&self, id: UserId) -> Result<u64, StoreError> {
        let mut count = 0u64;
        for entry in self.ks.inbox.prefix(id.to_be_bytes()) {
            entry.key()?;
            count += 1;
        }
        Ok(count)
    }

    pub(super) fn append(
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
        self.origins.insert(
            recipient_id,
            seq,
            Origin {
                sender: sender_id,
                id: message.id,
                expires_at: message.expires_at,
            },
        );
        let first = touched.entry(recipient_id).or_insert(u64::MAX);
        *first = (*first).min(seq);
        self.in_flight.insert((sender_id, message.id));
        appended.push((sender_id, message.id));
        Ok(Appended::Stored { seq })
    }

    /// Replaces the send record of message `seq` of inbox `id`, which is being removed
    /// (acknowledged, unsent or expired), with a settled marker that names no recipient: its
    /// id stays a duplicate until it expires, and no sender–recipient pair outlives the
    /// message. The marker goes in the batch that removes the message.
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
        id: UserId,
        seq: u64,
    ) -> Result<(), StoreError> {
        match self.origins.take(id, seq) {
            Some(origin) => settle(batch, &self.ks, origin),
            None => self.settle_sent_from_store(batch, id, seq),
        }
    }

    /// [`Self::settle_sent`] for a message whose origin is not in memory: reads its entry (and
    /// its sender's id).
    fn settle_sent_from_store(
        &mut self,
        batch: &mut OwnedWriteBatch,
        id: UserId,
        seq: u64,
    ) -> Result<(), StoreError> {
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
            return Ok(());
        };
        // A record that cannot be read must not block the removal: its send record then simply
        // stays until it expires.
        let stored = match sent_records::origin(&entry) {
            Ok(origin) => origin,
            Err(e) => {
                tracing::warn!(error = %e, "cannot settle a send record");
                return Ok(());
            }
        };
        let Some(sender) = self.ks.user_ids.get(stored.from.as_str().as_bytes())? else {
            return Ok(());
        };
        let Ok(sender) = decode_id("user_ids", &sender) else {
            return Ok(());
        };
        let origin = Origin {
            sender,
            id: stored.id,
            expires_at: stored.expires_at,
        };
        settle(batch, &self.ks, origin)
    }

    pub(super) fn remove(
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
                self.settle_sent(batch, id, seq)?;
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

/// An upper bound on a stored message's encoding beyond its body, sender and kind (field
/// names, headers, integers: 98 bytes at most; a test checks it).
pub(super) const STORED_OVERHEAD: usize = 112;
/// The same for a send record beyond the recipient's name (47 bytes at most).
pub(super) const SENT_OVERHEAD: usize = 64;

/// `value` as a MessagePack map, into a buffer of `capacity` bytes.
pub(super) fn encode_record<T: serde::Serialize>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(capacity);
    rmp_serde::encode::write_named(&mut out, value)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Username;

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
