//! Shared bodies: one stored body for the copies of a message that carry the same bytes (an
//! MLS group message is one ciphertext for every member device), referenced from each copy's
//! inbox entry and freed when its last reference goes; and the stored form of an inbox entry
//! ([`InboxEntry`]), whose body (with the fields the copies share) is inline or such a
//! reference.
//!
//! Layout:
//! - `bodies`: body key → the shared record ([`SharedBody`], named MessagePack): the body and
//!   the fields every copy has in common (sender, device, message id, kind, time received);
//!   each referencing entry keeps only its seq, expiry, addressee and the key;
//! - `body_refs`: body key → how many inbox entries reference the body (u32 BE).
//!
//! A body key is the place of the first copy that references the body: its inbox id ‖ seq,
//! 12 bytes, the same as its `inbox_v2` key. Seqs are never given twice, also across crashes
//! (`inbox_writer`), so a body key is never reused either. The count lives apart from the body
//! so that a removal rewrites 16 bytes, not the body.
//!
//! **The reference rule.** The inbox writer, the only writer of inboxes, writes the body, its
//! count (the number of copies that reference it) and every referencing entry in one batch.
//! Every removal of a referencing entry (ack, unsend, expiry, a dropped inbox of a removed
//! device or deleted account, an ack kept during an outage and written at the reopen) lowers
//! the count in the batch that removes the entry, and the removal that brings it to 0 deletes
//! the body and its count. A batch writes each count once, its final value (see
//! [`BodyLedger::take_batch`]). A fjall batch is atomic and the journal replays whole batches in
//! order, so after a crash (`kill -9`, power loss) at any point every count equals the number
//! of entries that reference its body: no body outlives its last reference, none goes before.
//!
//! The count is read, changed and written on the writer's thread. The writer builds a batch
//! while the committer still commits earlier ones, so the store may not show the latest count
//! yet: [`BodyLedger`] keeps the counts that batches not yet committed changed, and the store
//! is read only for a body no such batch touched.
//!
//! **When a body is shared** ([`sharing`]): among the copies of one message, those whose
//! bodies are byte-equal, if there are at least two of them and the body has at least
//! [`MIN_SHARED_BODY`] bytes (below that, a reference and the two records cost more than the
//! copies). The copies of a one-to-one message are sealed per device and never equal; those of
//! group traffic are (a commit's welcome copies share a second body among themselves).
//!
//! **Quotas.** A shared body counts its whole length toward the sender's share of each inbox
//! that references it, as a copy of it did; an inbox's cap counts messages, as before.

use std::collections::{HashMap, HashSet};

use fjall::{Keyspace, OwnedWriteBatch, Readable, Snapshot};
use serde::{Deserialize, Serialize};

use super::devices::InboxId;
use super::inbox_writer::InboxKeyspaces;
use super::user_ids::inbox_key;
use super::{DeviceId, StoreError, StoredMessage};
use crate::protocol::{MessageId, Username};

/// The keyspace of shared bodies.
pub(super) const BODIES: &str = "bodies";
/// The keyspace of their reference counts.
pub(super) const BODY_REFS: &str = "body_refs";
/// Bytes a body needs to be shared (see the module doc). At 64 bytes and two copies, sharing
/// already stores less than the two copies.
pub(super) const MIN_SHARED_BODY: usize = 64;

/// The key of a shared body: the inbox id ‖ seq of the first copy that references it.
pub(super) type BodyKey = [u8; 12];

/// The key of the body first referenced by message `seq` of inbox `inbox`.
pub(super) fn body_key(inbox: InboxId, seq: u64) -> BodyKey {
    inbox_key(inbox, seq)
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Set<T> = HashSet<T, foldhash::fast::RandomState>;

/// An inbox entry as stored: a [`StoredMessage`] with its body inline (every entry from
/// before shared bodies), or, with `shared`, a reference to a shared record ([`SharedBody`])
/// that holds the body and the fields every copy has in common (then the entry keeps only its
/// seq, expiry, addressee and the reference). An inline entry encodes as a [`StoredMessage`]
/// did (the same fields in the same order), so older entries read unchanged; an empty body is
/// left out (it reads back empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InboxEntry {
    /// Its sequence number in the inbox.
    pub seq: u64,
    /// The sender's id for it (in the shared record instead, when it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
    /// Who sent it (idem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Username>,
    /// The device it was sent from (idem; 1 is left out).
    #[serde(
        default = "super::first_device",
        skip_serializing_if = "super::is_first_device"
    )]
    pub from_device: DeviceId,
    /// The addressee, on a copy for one of the sender's own devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Username>,
    /// The sender's `kind` (idem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// When the server received it (idem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<u64>,
    /// When it expires (in every entry: the purge reads it).
    pub expires_at: u64,
    /// The sealed body, inline; empty when it is shared.
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Vec::is_empty")]
    pub body: Vec<u8>,
    /// The key of its shared record in `bodies`, if it has one.
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub shared: Option<BodyKey>,
}

/// A shared record (the value in `bodies`): the body and the fields the copies that share it
/// have in common, named MessagePack, the body last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SharedBody {
    /// The sender's id for the message.
    pub id: MessageId,
    /// Who sent it.
    pub from: Username,
    /// The device it was sent from (1 is left out).
    #[serde(
        default = "super::first_device",
        skip_serializing_if = "super::is_first_device"
    )]
    pub from_device: DeviceId,
    /// The sender's `kind`.
    pub kind: String,
    /// When the server received it.
    pub sent_at: u64,
    /// The sealed body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// An upper bound on a shared record's encoding beyond its body, sender and kind.
pub(super) const SHARED_RECORD_OVERHEAD: usize = 96;

impl InboxEntry {
    /// The message: the entry's own fields, and the shared record's if it references one
    /// (`shared`, read by the caller).
    pub(super) fn into_message(
        self,
        shared: Option<SharedBody>,
    ) -> Result<StoredMessage, StoreError> {
        if let Some(record) = shared {
            return Ok(StoredMessage {
                seq: self.seq,
                id: record.id,
                from: record.from,
                from_device: record.from_device,
                to: self.to,
                kind: record.kind,
                sent_at: record.sent_at,
                expires_at: self.expires_at,
                body: record.body,
            });
        }
        let seq = self.seq;
        let missing = |field: &str| StoreError::Corrupt {
            keyspace: "inbox",
            reason: format!("message {seq} has neither a {field} nor a shared record"),
        };
        Ok(StoredMessage {
            seq,
            id: self.id.ok_or_else(|| missing("id"))?,
            from: self.from.ok_or_else(|| missing("sender"))?,
            from_device: self.from_device,
            to: self.to,
            kind: self.kind.ok_or_else(|| missing("kind"))?,
            sent_at: self.sent_at.ok_or_else(|| missing("time"))?,
            expires_at: self.expires_at,
            body: self.body,
        })
    }
}

/// The shared body an inbox entry (encoded) references, if any.
pub(super) fn shared_body_of(entry: &[u8]) -> Result<Option<BodyKey>, StoreError> {
    #[derive(Deserialize)]
    struct View {
        #[serde(default, with = "serde_bytes")]
        shared: Option<BodyKey>,
    }
    let view: View = rmp_serde::from_slice(entry).map_err(|e| StoreError::Corrupt {
        keyspace: "inbox",
        reason: e.to_string(),
    })?;
    Ok(view.shared)
}

/// The part of a shared record (encoded) that says who sent the message, and the body's
/// length, without copying the body.
pub(super) struct SharedHeader {
    /// The sender's id for the message.
    pub id: MessageId,
    /// Who sent it.
    pub from: Username,
    /// Bytes of the body.
    pub body_len: u64,
}

/// Reads a shared record's [`SharedHeader`].
pub(super) fn shared_header(record: &[u8]) -> Result<SharedHeader, StoreError> {
    #[derive(Deserialize)]
    struct View<'a> {
        id: MessageId,
        from: Username,
        #[serde(borrow)]
        body: &'a serde_bytes::Bytes,
    }
    let view: View<'_> = rmp_serde::from_slice(record).map_err(|e| StoreError::Corrupt {
        keyspace: BODIES,
        reason: e.to_string(),
    })?;
    Ok(SharedHeader {
        id: view.id,
        from: view.from,
        body_len: view.body.len() as u64,
    })
}

/// How one copy of a message stores its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Share {
    /// Inline, in its own entry.
    Inline,
    /// It is the first of `count` copies with this body: it writes the shared body, keyed by
    /// its own place.
    First {
        /// Copies that reference the body (at least 2).
        count: u32,
    },
    /// It references the body the copy at this index wrote.
    Of(usize),
}

/// How each of these bodies (a message's copies, in order) is stored: byte-equal bodies of at
/// least [`MIN_SHARED_BODY`] bytes, two or more, share one body (see the module doc). Each
/// body is compared with the first of each distinct body seen before it (of the same length):
/// one comparison per copy for group traffic, and a few for a one-to-one message's copies,
/// which differ in their first bytes.
pub(super) fn sharing<'a>(bodies: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<Share> {
    let mut shares = vec![Share::Inline; bodies.len()];
    if shares.len() < 2 {
        return shares;
    }
    // The first copy of each distinct body, with how many copies have it.
    let mut distinct: Vec<(usize, &[u8], u32)> = Vec::new();
    let mut first_of = Vec::with_capacity(shares.len());
    for (at, body) in bodies.enumerate() {
        if body.len() < MIN_SHARED_BODY {
            first_of.push(None);
            continue;
        }
        match distinct.iter_mut().find(|(_, seen, _)| *seen == body) {
            Some((first, _, count)) => {
                *count = count.saturating_add(1);
                first_of.push(Some(*first));
            }
            None => {
                distinct.push((at, body, 1));
                first_of.push(Some(at));
            }
        }
    }
    for (at, first) in first_of.into_iter().enumerate() {
        let Some(first) = first else { continue };
        let Some((_, _, count)) = distinct.iter().find(|(f, _, _)| *f == first) else {
            continue;
        };
        if *count < 2 {
            continue;
        }
        if let Some(share) = shares.get_mut(at) {
            *share = if at == first {
                Share::First { count: *count }
            } else {
                Share::Of(first)
            };
        }
    }
    shares
}

/// A body's count as changed by batches not yet committed.
#[derive(Debug, Clone, Copy)]
struct Changed {
    /// References left (0: the body is deleted).
    count: u32,
    /// Built batches not yet committed that changed it.
    batches: u32,
}

/// The reference counts of shared bodies that the batch being built, or batches built and not
/// yet committed, changed (see the module doc). The writer's only; a standalone one serves a
/// single batch (the acks written when a store reopens after an outage).
#[derive(Default)]
pub(super) struct BodyLedger {
    changed: Map<BodyKey, Changed>,
    /// Bodies changed by the batch being built.
    building: Set<BodyKey>,
}

impl BodyLedger {
    /// Writes a shared record (encoded) into `batch`; its count (`count` entries will
    /// reference it) is written by [`Self::take_batch`].
    pub(super) fn create(
        &mut self,
        batch: &mut OwnedWriteBatch,
        ks: &InboxKeyspaces,
        key: BodyKey,
        record: Vec<u8>,
        count: u32,
    ) {
        batch.insert(&ks.bodies, key, record);
        self.set(key, count);
    }

    /// Lowers the count of body `key` for the batch being built, whose entry referencing it is
    /// being removed there; [`Self::take_batch`] writes the count, or deletes the body with
    /// its last reference. A count that is missing (the store was damaged) is logged, not an
    /// error: the removal goes on.
    pub(super) fn release(&mut self, ks: &InboxKeyspaces, key: BodyKey) -> Result<(), StoreError> {
        let count = match self.changed.get(&key) {
            Some(changed) => Some(changed.count),
            None => stored_count(&ks.body_refs, &key)?,
        };
        match count {
            None | Some(0) => {
                tracing::warn!(
                    body = %hex::encode(key),
                    "a shared body has no reference left to release; nothing changed"
                );
            }
            Some(n) => self.set(key, n - 1),
        }
        Ok(())
    }

    fn set(&mut self, key: BodyKey, count: u32) {
        let changed = self
            .changed
            .entry(key)
            .or_insert(Changed { count, batches: 0 });
        changed.count = count;
        self.building.insert(key);
    }

    /// The batch being built is done: writes into it the final count of each body it changed,
    /// once (several acks in one batch release one body several times, and fjall gives every
    /// write of a batch the same sequence number: one write per key leaves no doubt which one
    /// holds), or deletes the body and its count at 0. Returns those bodies, which stay here
    /// until [`Self::committed`] is told of them.
    pub(super) fn take_batch(
        &mut self,
        batch: &mut OwnedWriteBatch,
        ks: &InboxKeyspaces,
    ) -> Vec<BodyKey> {
        let keys: Vec<BodyKey> = self.building.drain().collect();
        for key in &keys {
            if let Some(changed) = self.changed.get_mut(key) {
                changed.batches += 1;
                if changed.count == 0 {
                    batch.remove(&ks.bodies, *key);
                    batch.remove(&ks.body_refs, *key);
                } else {
                    batch.insert(&ks.body_refs, *key, changed.count.to_be_bytes());
                }
            }
        }
        keys
    }

    /// A batch that changed these bodies is committed: the store shows it.
    pub(super) fn committed(&mut self, keys: &[BodyKey]) {
        for key in keys {
            if let Some(changed) = self.changed.get_mut(key) {
                changed.batches = changed.batches.saturating_sub(1);
                if changed.batches == 0 && !self.building.contains(key) {
                    self.changed.remove(key);
                }
            }
        }
    }

    /// Forgets everything (after a failed commit, when the writer trusts its caches no more).
    pub(super) fn clear(&mut self) {
        self.changed.clear();
        self.building.clear();
    }
}

/// The stored count of body `key`, if it has one.
fn stored_count(refs: &Keyspace, key: &BodyKey) -> Result<Option<u32>, StoreError> {
    let Some(bytes) = refs.get(key)? else {
        return Ok(None);
    };
    let count: [u8; 4] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
        keyspace: BODY_REFS,
        reason: format!("a reference count has {} bytes, not 4", bytes.len()),
    })?;
    Ok(Some(u32::from_be_bytes(count)))
}

/// The message of an encoded inbox entry, its shared body read from `snapshot` (the one the
/// entry was read from: a body goes only with its last reference, in one batch, so it is
/// there).
pub(super) fn read_message(
    snapshot: &Snapshot,
    ks: &InboxKeyspaces,
    value: &[u8],
) -> Result<StoredMessage, StoreError> {
    let entry: InboxEntry = rmp_serde::from_slice(value).map_err(|e| StoreError::Corrupt {
        keyspace: "inbox",
        reason: e.to_string(),
    })?;
    let Some(key) = entry.shared else {
        return entry.into_message(None);
    };
    let record = snapshot
        .get(&ks.bodies, key)?
        .ok_or_else(|| StoreError::Corrupt {
            keyspace: BODIES,
            reason: format!("message {} references a missing body", entry.seq),
        })?;
    let record: SharedBody = rmp_serde::from_slice(&record).map_err(|e| StoreError::Corrupt {
        keyspace: BODIES,
        reason: e.to_string(),
    })?;
    entry.into_message(Some(record))
}

/// Entries and bytes of one keyspace (keys and values as stored, before fjall's own framing
/// and compression).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyspaceBytes {
    /// Entries.
    pub entries: u64,
    /// Bytes of their keys.
    pub key_bytes: u64,
    /// Bytes of their values.
    pub value_bytes: u64,
}

impl KeyspaceBytes {
    /// Keys and values together.
    pub fn total(&self) -> u64 {
        self.key_bytes + self.value_bytes
    }
}

/// What the message keyspaces hold (see [`FjallStore::message_footprint`]).
///
/// [`FjallStore::message_footprint`]: super::FjallStore::message_footprint
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageFootprint {
    /// Inbox entries (`inbox_v2`).
    pub inbox: KeyspaceBytes,
    /// Send records and settled markers (`sent_v2`).
    pub sent: KeyspaceBytes,
    /// Shared bodies (`bodies`).
    pub bodies: KeyspaceBytes,
    /// Their reference counts (`body_refs`).
    pub body_refs: KeyspaceBytes,
    /// Inbox entries that reference a shared body.
    pub references: u64,
    /// Shared bodies whose stored count differs from the entries that reference them, counts
    /// without a body or bodies without a count, and references to a missing body: 0 in a
    /// sound store.
    pub mismatches: u64,
}

impl MessageFootprint {
    /// Bytes of every keyspace together.
    pub fn total(&self) -> u64 {
        self.inbox.total() + self.sent.total() + self.bodies.total() + self.body_refs.total()
    }
}

/// Reads the message keyspaces from one snapshot (every entry: for tests and measurements).
pub(super) fn footprint(
    snapshot: &Snapshot,
    ks: &InboxKeyspaces,
) -> Result<MessageFootprint, StoreError> {
    let mut footprint = MessageFootprint::default();
    let mut referenced: Map<BodyKey, u64> = Map::default();
    for entry in snapshot.iter(&ks.inbox) {
        let (key, value) = entry.into_inner()?;
        add(&mut footprint.inbox, &key, &value);
        if let Some(body) = shared_body_of(&value)? {
            footprint.references += 1;
            *referenced.entry(body).or_default() += 1;
        }
    }
    for entry in snapshot.iter(&ks.sent) {
        let (key, value) = entry.into_inner()?;
        add(&mut footprint.sent, &key, &value);
    }
    let mut bodies: Map<BodyKey, ()> = Map::default();
    for entry in snapshot.iter(&ks.bodies) {
        let (key, value) = entry.into_inner()?;
        add(&mut footprint.bodies, &key, &value);
        match BodyKey::try_from(key.as_ref()) {
            Ok(key) => {
                bodies.insert(key, ());
            }
            Err(_) => footprint.mismatches += 1,
        }
    }
    for entry in snapshot.iter(&ks.body_refs) {
        let (key, value) = entry.into_inner()?;
        add(&mut footprint.body_refs, &key, &value);
        let Ok(body) = BodyKey::try_from(key.as_ref()) else {
            footprint.mismatches += 1;
            continue;
        };
        let count = <[u8; 4]>::try_from(value.as_ref())
            .ok()
            .map(u32::from_be_bytes);
        let refs = referenced.remove(&body).unwrap_or(0);
        if bodies.remove(&body).is_none() || count.map(u64::from) != Some(refs) {
            footprint.mismatches += 1;
        }
    }
    // References to a body without a count, and bodies without one.
    footprint.mismatches += (referenced.len() + bodies.len()) as u64;
    Ok(footprint)
}

fn add(bytes: &mut KeyspaceBytes, key: &[u8], value: &[u8]) {
    bytes.entries += 1;
    bytes.key_bytes += key.len() as u64;
    bytes.value_bytes += value.len() as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_bodies_of_two_or_more_copies_are_shared() {
        let group = vec![7u8; 300];
        let welcome = vec![9u8; 300];
        let other = vec![8u8; 300];
        let small = vec![1u8; MIN_SHARED_BODY - 1];
        let bodies: Vec<&[u8]> = vec![&group, &welcome, &group, &other, &small, &welcome, &small];
        let shares = sharing(bodies.into_iter());
        assert_eq!(
            shares,
            vec![
                Share::First { count: 2 },
                Share::First { count: 2 },
                Share::Of(0),
                Share::Inline,
                Share::Inline,
                Share::Of(1),
                Share::Inline,
            ]
        );
        let one: Vec<&[u8]> = vec![&group];
        assert_eq!(sharing(one.into_iter()), vec![Share::Inline]);
        let distinct: Vec<&[u8]> = vec![&group, &other];
        assert_eq!(
            sharing(distinct.into_iter()),
            vec![Share::Inline, Share::Inline]
        );
    }

    #[test]
    fn an_inline_entry_encodes_as_a_stored_message_did() {
        let message = StoredMessage {
            seq: 1 << 20,
            id: MessageId([3; 16]),
            from: Username::parse("alice").unwrap(),
            from_device: 2,
            to: Some(Username::parse("bob").unwrap()),
            kind: "text".into(),
            sent_at: 5,
            expires_at: 6,
            body: vec![1, 2, 3],
        };
        let entry = InboxEntry {
            seq: message.seq,
            id: Some(message.id),
            from: Some(message.from.clone()),
            from_device: message.from_device,
            to: message.to.clone(),
            kind: Some(message.kind.clone()),
            sent_at: Some(message.sent_at),
            expires_at: message.expires_at,
            body: message.body.clone(),
            shared: None,
        };
        let old = rmp_serde::to_vec_named(&message).unwrap();
        assert_eq!(rmp_serde::to_vec_named(&entry).unwrap(), old);
        let read: InboxEntry = rmp_serde::from_slice(&old).unwrap();
        assert_eq!(read, entry);
        assert_eq!(shared_body_of(&old).unwrap(), None);
        assert_eq!(read.into_message(None).unwrap(), message);

        // A shared one: seq, expiry, addressee and the reference.
        let shared = InboxEntry {
            id: None,
            from: None,
            from_device: 1,
            kind: None,
            sent_at: None,
            body: Vec::new(),
            shared: Some(body_key(9, 1 << 20)),
            ..entry
        };
        let bytes = rmp_serde::to_vec_named(&shared).unwrap();
        assert_eq!(shared_body_of(&bytes).unwrap(), shared.shared);
        let read: InboxEntry = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(read, shared);
        assert!(bytes.len() < 64, "{}", bytes.len());
        assert!(
            read.clone().into_message(None).is_err(),
            "no record, no message"
        );
        let record = SharedBody {
            id: message.id,
            from: message.from.clone(),
            from_device: 2,
            kind: message.kind.clone(),
            sent_at: 5,
            body: message.body.clone(),
        };
        let encoded = rmp_serde::to_vec_named(&record).unwrap();
        assert!(encoded.len() <= SHARED_RECORD_OVERHEAD + 3 + 5 + 4);
        let header = shared_header(&encoded).unwrap();
        assert_eq!(
            (header.id, &header.from, header.body_len),
            (message.id, &message.from, 3)
        );
        assert_eq!(read.into_message(Some(record)).unwrap(), message);
    }
}
