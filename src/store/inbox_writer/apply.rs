//! What the inbox writer does with each operation while it builds a batch: appends (with
//! deduplication and quotas), removals, and the settling of send records that comes with
//! every removal; and how it encodes the records it writes.

use fjall::OwnedWriteBatch;

use super::caches::{KnownPending, Origin};
use super::counters::counter_key;
use super::sent_ids::read_sender;
use super::{Addressed, DROP_CHUNK, DropInbox, Dropped, Map, SEQ_RESTART_GAP, WriterState};
use crate::protocol::MessageId;
use crate::store::devices::InboxId;
use crate::store::sender_shares::count_from_store;
use crate::store::sent_records;
use crate::store::shared_bodies::{
    BodyKey, InboxEntry, SHARED_RECORD_OVERHEAD, Share, SharedBody, body_key, sharing,
};
use crate::store::user_ids::{UserId, inbox_key, inbox_seq, sent_key};
use crate::store::{Appended, NewMessage, Placed, SentRecord, StoreError};

/// A stored message's writes, decided but not yet in a batch: its inbox entries and its send
/// record (see [`WriterState::append`]).
pub(super) struct Staged {
    pub entries: Vec<StagedEntry>,
    pub sent_key: [u8; 20],
    /// The send record listing the copies.
    pub record: Vec<u8>,
    pub expires_at: u64,
    /// A shared body of the message is in the batch already: it cannot be held.
    pub shared: bool,
    /// (sender's id, message id): in `in_flight` until the batch that writes it is committed.
    pub message: (UserId, MessageId),
}

/// What [`WriterState::append`] decided: the answer, the copies' places if asked for, and
/// the writes of a stored message.
pub(super) type AppendOutcome = (Appended, Option<Vec<Placed>>, Option<Staged>);

/// One copy's inbox entry.
pub(super) struct StagedEntry {
    pub inbox: InboxId,
    pub seq: u64,
    pub value: Vec<u8>,
}

impl WriterState {
    /// Counts the senders' shares of inbox `id` from the store, unless they are known (or not
    /// limited). The store must show every batch built for the inbox, so this waits for those
    /// still being committed. Called before anything else touches the inbox in a batch, so
    /// the store is also current with respect to the batch being built.
    pub(super) fn load_shares(&mut self, id: InboxId) -> Result<(), StoreError> {
        if !self.shares.enabled() || self.shares.is_tracked(id) {
            return Ok(());
        }
        while self.inboxes_in_flight.contains_key(&id) {
            if !self.wait_for_commit() {
                return Err(StoreError::WriterStopped);
            }
        }
        let pending = count_from_store(&self.ks, id)?;
        self.pending.entry(id).or_insert(pending.len() as u64);
        self.shares.load(id, pending);
        Ok(())
    }

    /// Marks an inbox dropped (and its account, if it is being deleted) and removes its
    /// messages, at most [`DROP_CHUNK`] per batch; with the last, its counter goes too.
    /// Messages appended to it in the batch being built are not in the store yet (and a key
    /// inserted and removed in one batch is ambiguous): then it removes nothing and answers
    /// not done, and the caller asks again, in a later batch, when no new message can have
    /// come (the inbox is dropped).
    pub(super) fn drop_inbox(
        &mut self,
        batch: &mut OwnedWriteBatch,
        touched: &Map<InboxId, u64>,
        drop: DropInbox,
    ) -> Result<Dropped, StoreError> {
        let id = drop.inbox;
        self.dropped_inboxes.insert(id);
        if let Some(account) = drop.account {
            self.dropped_users.insert(account);
        }
        if touched.get(&id).is_some_and(|first| *first != u64::MAX) {
            return Ok(Dropped {
                removed: 0,
                done: false,
            });
        }
        while self.inboxes_in_flight.contains_key(&id) {
            if !self.wait_for_commit() {
                return Err(StoreError::WriterStopped);
            }
        }
        let keys: Vec<_> = self
            .ks
            .inbox
            .prefix(id.to_be_bytes())
            .take(DROP_CHUNK + 1)
            .map(|entry| entry.key().map(|key| key.to_vec()))
            .collect::<Result<_, _>>()?;
        let done = keys.len() <= DROP_CHUNK;
        let mut removed = 0;
        for key in keys.into_iter().take(DROP_CHUNK) {
            // Their senders' records must not go on naming the dropped inbox either.
            let body = self.settle_sent(batch, id, inbox_seq(&key))?;
            batch.remove(&self.ks.inbox, key);
            if let Some(body) = body {
                self.bodies.release(&self.ks, body)?;
            }
            removed += 1;
        }
        self.pending.insert(id, 0);
        self.known.remove(&id);
        self.shares.forget(id);
        if done {
            // No message goes to it again: its counter is of no more use.
            batch.remove(&self.ks.meta, drop.counter);
            self.next_seq.remove(&id);
            self.stored_seq.remove(&id);
            self.names.remove(&id);
        }
        Ok(Dropped { removed, done })
    }

    /// Whether `sender` has a send record of message `id` (one not in a batch on its way):
    /// from memory for a sender tracked in [`SentIds`](super::sent_ids::SentIds), whom the
    /// first call reads from the store; from the store for one with too many records.
    fn has_record(&mut self, sender: UserId, id: MessageId) -> Result<bool, StoreError> {
        if !self.sent_ids.knows(sender) {
            let stored = read_sender(&self.ks.sent, sender)?;
            let in_flight = self
                .in_flight
                .iter()
                .filter(|(s, _)| *s == sender)
                .map(|(_, id)| *id);
            self.sent_ids.load(sender, stored, in_flight);
        }
        match self.sent_ids.contains(sender, &id) {
            Some(known) => Ok(known),
            None => Ok(self.ks.sent.contains_key(sent_key(sender, &id.0))?),
        }
    }

    /// Pending messages of inbox `id`, counted from the store (once per process and inbox).
    pub(super) fn count_pending(&self, id: InboxId) -> Result<u64, StoreError> {
        let mut count = 0u64;
        for entry in self.ks.inbox.prefix(id.to_be_bytes()) {
            entry.key()?;
            count += 1;
        }
        Ok(count)
    }

    /// Appends every copy of a message, or none (see the module doc of the writer); with
    /// `wants_places`, also returns where each copy went. A stored message's inbox entries and
    /// send record come back [`Staged`], for the caller to write now or hold (see `held`); a
    /// shared body it needs is in `batch` already (such a message is written at once).
    pub(super) fn append(
        &mut self,
        batch: &mut OwnedWriteBatch,
        touched: &mut Map<InboxId, u64>,
        addressed: Addressed,
        wants_places: bool,
    ) -> Result<AppendOutcome, StoreError> {
        let Addressed {
            message,
            sender: sender_id,
            targets,
        } = addressed;
        if targets.len() != message.copies.len() || targets.is_empty() {
            return Err(StoreError::Limit(
                "a message needs one inbox per copy and at least one copy".into(),
            ));
        }
        if self.dropped_users.contains(&sender_id) {
            return Err(StoreError::UnknownUser(message.sender));
        }
        for (at, (copy, target)) in message.copies.iter().zip(&targets).enumerate() {
            if self.dropped_users.contains(&target.user) {
                return Err(StoreError::UnknownUser(copy.recipient.clone()));
            }
            if self.dropped_inboxes.contains(&target.inbox) {
                return Err(StoreError::UnknownDevice(
                    copy.recipient.clone(),
                    copy.device,
                ));
            }
            if targets[..at].iter().any(|t| t.inbox == target.inbox) {
                return Err(StoreError::Limit(format!(
                    "two copies of one message for device {} of {}",
                    copy.device, copy.recipient
                )));
            }
        }
        let sent_key = sent_key(sender_id, &message.id.0);
        if self.in_flight.contains(&(sender_id, message.id))
            || self.has_record(sender_id, message.id)?
        {
            return Ok((Appended::Duplicate, None, None));
        }
        // Every copy is checked before any is placed.
        for (copy, target) in message.copies.iter().zip(&targets) {
            let inbox = target.inbox;
            self.load_shares(inbox)?;
            let pending = match self.pending.get(&inbox) {
                Some(n) => *n,
                None => {
                    let counted = self.count_pending(inbox)?;
                    self.pending.insert(inbox, counted);
                    counted
                }
            };
            if pending >= self.max_pending {
                let refused = Appended::InboxFull {
                    recipient: copy.recipient.clone(),
                    device: copy.device,
                };
                return Ok((refused, None, None));
            }
            let body_len = copy.body.len() as u64;
            if self.shares.admits(inbox, sender_id, body_len).is_err() {
                let refused = Appended::SenderQuota {
                    recipient: copy.recipient.clone(),
                    device: copy.device,
                };
                return Ok((refused, None, None));
            }
        }
        let mut seqs = Vec::with_capacity(targets.len());
        // The copies' shared fields, moved into the last one.
        let NewMessage {
            sender,
            sender_device,
            to,
            id,
            mut kind,
            mut copies,
            sent_at,
            expires_at,
        } = message;
        let copy_count = copies.len();
        // Copies with equal bodies store one (see `shared_bodies`): the first writes it.
        let shares = sharing(copies.iter().map(|c| c.body.as_slice()));
        let mut first_places: Vec<Option<BodyKey>> = vec![None; copy_count];
        let mut entries = Vec::with_capacity(copy_count);
        let mut any_shared = false;
        for (at, (copy, target)) in copies.iter_mut().zip(&targets).enumerate() {
            let inbox = target.inbox;
            let seq = match self.next_seq.get(&inbox) {
                Some(n) => *n,
                None => {
                    let counter = counter_key(&copy.recipient, copy.device, inbox);
                    let (stored, written_in) = self.load_seq(&counter)?;
                    let epochs = self.epoch.saturating_sub(written_in);
                    let next = stored
                        .max(1)
                        .saturating_add(epochs.saturating_mul(SEQ_RESTART_GAP));
                    self.stored_seq.insert(inbox, stored);
                    self.names.insert(inbox, counter);
                    self.known.insert(inbox, KnownPending::new(next));
                    next
                }
            };
            let last = at + 1 == copy_count;
            let body_len = copy.body.len() as u64;
            // The addressee is named only on copies for the sender's own devices.
            let addressee = (copy.recipient == sender).then(|| to.clone());
            let mut body = std::mem::take(&mut copy.body);
            let shared = match shares.get(at).copied().unwrap_or(Share::Inline) {
                Share::Inline => None,
                Share::First { count } => {
                    let key = body_key(inbox, seq);
                    let record = SharedBody {
                        id,
                        from: sender.clone(),
                        from_device: sender_device,
                        kind: kind.clone(),
                        sent_at,
                        body: std::mem::take(&mut body),
                    };
                    let record_len = SHARED_RECORD_OVERHEAD
                        + record.body.len()
                        + record.from.as_str().len()
                        + record.kind.len();
                    let record = encode_record(&record, record_len)?;
                    self.bodies.create(batch, &self.ks, key, record, count);
                    any_shared = true;
                    if let Some(place) = first_places.get_mut(at) {
                        *place = Some(key);
                    }
                    Some(key)
                }
                // (The first copy of a body always comes before the others.)
                Share::Of(first) => match first_places.get(first).copied().flatten() {
                    Some(key) => {
                        body = Vec::new();
                        Some(key)
                    }
                    None => None,
                },
            };
            // A shared entry leaves what the copies have in common to the shared record.
            let inline = shared.is_none();
            let stored = InboxEntry {
                seq,
                id: inline.then_some(id),
                from: inline.then(|| sender.clone()),
                from_device: if inline { sender_device } else { 1 },
                to: addressee,
                kind: inline.then(|| {
                    if last {
                        std::mem::take(&mut kind)
                    } else {
                        kind.clone()
                    }
                }),
                sent_at: inline.then_some(sent_at),
                expires_at,
                body,
                shared,
            };
            // Sized up front: growing the buffer field by field cost more than the encoding.
            let stored_len = STORED_OVERHEAD
                + stored.body.len()
                + stored.shared.map_or(0, |key| key.len() + SHARED_OVERHEAD)
                + stored.from.as_ref().map_or(0, |from| from.as_str().len())
                + stored.kind.as_ref().map_or(0, String::len)
                + stored.to.as_ref().map_or(0, |to| to.as_str().len());
            entries.push(StagedEntry {
                inbox,
                seq,
                value: encode_record(&stored, stored_len)?,
            });
            self.next_seq.insert(inbox, seq + 1);
            let pending = self.pending.get(&inbox).copied().unwrap_or_default();
            self.pending.insert(inbox, pending + 1);
            self.shares.add(inbox, seq, sender_id, body_len);
            self.origins.insert(
                inbox,
                seq,
                Origin {
                    sender: sender_id,
                    id,
                    expires_at,
                    body: shared,
                },
            );
            // Its counter may need a checkpoint in this batch, whenever the entry is written.
            touched.entry(inbox).or_insert(u64::MAX);
            seqs.push(seq);
        }
        let placed = || -> Vec<Placed> {
            copies
                .iter()
                .zip(&seqs)
                .map(|(copy, seq)| Placed {
                    recipient: copy.recipient.clone(),
                    device: copy.device,
                    seq: *seq,
                })
                .collect()
        };
        let record = match (copies.as_slice(), seqs.as_slice()) {
            // The usual message: no list to build.
            ([only], [seq]) if only.device == 1 => {
                sent_records::encode_one(&only.recipient, *seq, expires_at)?
            }
            _ => sent_records::encode(&SentRecord {
                copies: placed(),
                expires_at,
            })?,
        };
        let places = wants_places.then(placed);
        self.in_flight.insert((sender_id, id));
        self.sent_ids.insert(sender_id, id);
        let staged = Staged {
            entries,
            sent_key,
            record,
            expires_at,
            shared: any_shared,
            message: (sender_id, id),
        };
        Ok((Appended::Stored { seqs }, places, Some(staged)))
    }

    /// Puts a staged message's entries (all, or those not removed since: `settled`) and its
    /// send record in `batch`; with `settled`, the settled marker instead of the record (a copy
    /// left its inbox while the message was held). Marks each entry's seq in `touched` as
    /// appended in this batch: not in the store before the batch is.
    pub(super) fn write_staged(
        &self,
        batch: &mut OwnedWriteBatch,
        touched: &mut Map<InboxId, u64>,
        staged: Staged,
        settled: bool,
    ) -> Result<(), StoreError> {
        for entry in staged.entries {
            batch.insert(
                &self.ks.inbox,
                inbox_key(entry.inbox, entry.seq),
                entry.value,
            );
            let first = touched.entry(entry.inbox).or_insert(u64::MAX);
            *first = (*first).min(entry.seq);
        }
        let record = if settled {
            sent_records::settled(staged.expires_at)?
        } else {
            staged.record
        };
        batch.insert(&self.ks.sent, staged.sent_key, record);
        Ok(())
    }
}

/// An upper bound on a stored message's encoding beyond its body, sender, kind and addressee
/// (field names, headers, integers: 119 bytes at most; a test checks it).
pub(super) const STORED_OVERHEAD: usize = 128;
/// What a reference to a shared body adds beyond its key: the field's name and the `bin`
/// header (9 bytes).
pub(super) const SHARED_OVERHEAD: usize = 9;

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
    use crate::protocol::{MessageId, Username};
    use crate::store::shared_bodies::InboxEntry;

    #[test]
    fn record_buffers_are_sized_for_the_largest_fields() {
        let from = Username::parse(&"a".repeat(32)).unwrap();
        let stored = InboxEntry {
            seq: u64::MAX,
            id: Some(MessageId([0xff; 16])),
            from: Some(from.clone()),
            from_device: u32::MAX,
            to: Some(from.clone()),
            kind: Some("k".repeat(300)),
            sent_at: Some(u64::MAX),
            expires_at: u64::MAX,
            body: vec![7; 70_000],
            shared: None,
        };
        let capacity = STORED_OVERHEAD + stored.body.len() + from.as_str().len() + 300 + 32;
        let bytes = encode_record(&stored, capacity).unwrap();
        assert!(bytes.len() <= capacity, "{} > {capacity}", bytes.len());
        assert_eq!(bytes.capacity(), capacity, "no growth");
        assert_eq!(rmp_serde::from_slice::<InboxEntry>(&bytes).unwrap(), stored);
        let shared = InboxEntry {
            id: None,
            from: None,
            from_device: 1,
            kind: None,
            sent_at: None,
            body: Vec::new(),
            shared: Some([0xff; 12]),
            ..stored.clone()
        };
        let capacity = STORED_OVERHEAD + 12 + SHARED_OVERHEAD + from.as_str().len();
        let bytes = encode_record(&shared, capacity).unwrap();
        assert!(bytes.len() <= capacity, "{} > {capacity}", bytes.len());
        assert_eq!(rmp_serde::from_slice::<InboxEntry>(&bytes).unwrap(), shared);

        // Device 1 and no addressee are left out: the record of format 2.
        let plain = InboxEntry {
            from_device: 1,
            to: None,
            ..stored
        };
        let bytes = encode_record(&plain, 0).unwrap();
        let fields: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(fields.len(), 7, "{:?}", fields.keys());
        assert_eq!(rmp_serde::from_slice::<InboxEntry>(&bytes).unwrap(), plain);
    }
}
