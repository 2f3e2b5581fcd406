//! Each sender's share of each inbox: how many messages, and how many body bytes, one sender
//! has pending in one recipient's inbox, so that no single account can fill someone's inbox
//! and lock every other sender out with `inbox_full`.
//!
//! Only the inbox writer's thread uses this (it decides every append and removal), so a limit
//! checked here cannot be raced past by concurrent sends. Nothing of it is stored: an inbox's
//! shares are counted from the inbox itself (its messages name their sender and carry their
//! body) the first time the writer needs them in a process, and kept exact from then on,
//! since every removal (ack, unsend, expiry) goes through the writer too. So they survive
//! restarts without a write per message. A body shared by several inboxes (`shared_bodies`)
//! counts its whole length in each of them, as a copy of it would.
//!
//! Memory is bounded: each tracked message costs 16 bytes; past [`MAX_TRACKED`] the inboxes
//! used least recently are forgotten (and counted again from the store when next used).

use std::collections::{HashMap, VecDeque};

use serde::Deserialize;

use super::StoreError;
use super::inbox_writer::InboxKeyspaces;
use super::shared_bodies::{BodyKey, shared_header};
use super::user_ids::{UserId, decode_id};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Messages tracked in memory at most, over all inboxes (16 bytes each, so ≈ 32 MiB plus the
/// per-sender totals); past this, inboxes are forgotten least recently used first.
pub(super) const MAX_TRACKED: usize = 1 << 21;
/// What eviction brings the tracked messages down to, so it runs rarely.
const EVICT_TO: usize = MAX_TRACKED / 4 * 3;
/// `bytes` of an entry whose message is gone (acked, unsent, expired), until compaction.
const GONE: u32 = u32::MAX;

/// The share one sender may hold of one inbox; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderShare {
    /// Pending messages from one sender in one inbox, at most.
    pub messages: u64,
    /// Pending body bytes from one sender in one inbox, at most.
    pub bytes: u64,
}

impl SenderShare {
    /// No per-sender limit (the inbox's own cap still holds).
    pub const UNLIMITED: Self = Self {
        messages: 0,
        bytes: 0,
    };

    fn is_unlimited(&self) -> bool {
        self.messages == 0 && self.bytes == 0
    }
}

/// One pending message as the shares see it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    sender: UserId,
    /// Body bytes, or [`GONE`].
    bytes: u32,
}

/// What one sender holds of one inbox.
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    messages: u64,
    bytes: u64,
}

/// The shares of one inbox.
#[derive(Default)]
struct InboxShares {
    /// Pending messages by seq, ascending (seqs of one inbox only grow).
    entries: VecDeque<Entry>,
    /// Entries marked [`GONE`] and not yet compacted away.
    gone: usize,
    senders: Map<UserId, Held>,
    last_used: u64,
}

impl InboxShares {
    fn remove(&mut self, seq: u64) -> bool {
        let Ok(at) = self.entries.binary_search_by_key(&seq, |e| e.seq) else {
            return false;
        };
        let Some(entry) = self.entries.get_mut(at) else {
            return false;
        };
        if entry.bytes == GONE {
            return false;
        }
        let (sender, bytes) = (entry.sender, u64::from(entry.bytes));
        entry.bytes = GONE;
        self.gone += 1;
        if let Some(held) = self.senders.get_mut(&sender) {
            held.messages = held.messages.saturating_sub(1);
            held.bytes = held.bytes.saturating_sub(bytes);
            if held.messages == 0 {
                self.senders.remove(&sender);
            }
        }
        true
    }

    /// Drops gone entries at the front, and all of them once they are most of the queue.
    fn compact(&mut self) -> usize {
        let before = self.entries.len();
        while self.entries.front().is_some_and(|e| e.bytes == GONE) {
            self.entries.pop_front();
            self.gone -= 1;
        }
        if self.gone > 32 && self.gone * 2 > self.entries.len() {
            self.entries.retain(|e| e.bytes != GONE);
            self.gone = 0;
        }
        before - self.entries.len()
    }
}

/// Why an append would break the sender's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OverShare;

/// The shares of the inboxes the writer has used lately.
pub(super) struct SenderShares {
    limit: SenderShare,
    inboxes: Map<UserId, InboxShares>,
    /// Entries (live or gone) over all inboxes.
    tracked: usize,
    clock: u64,
}

impl SenderShares {
    pub fn new(limit: SenderShare) -> Self {
        Self {
            limit,
            inboxes: Map::default(),
            tracked: 0,
            clock: 0,
        }
    }

    /// Whether shares are limited at all (if not, nothing is tracked).
    pub fn enabled(&self) -> bool {
        !self.limit.is_unlimited()
    }

    /// Whether `inbox`'s shares are known (else [`Self::load`] them first).
    pub fn is_tracked(&self, inbox: UserId) -> bool {
        self.inboxes.contains_key(&inbox)
    }

    /// Starts tracking `inbox` with its pending messages as (seq, sender, body bytes), in
    /// seq order, as counted from the store.
    pub fn load(&mut self, inbox: UserId, pending: Vec<(u64, UserId, u64)>) {
        self.forget(inbox);
        let mut shares = InboxShares::default();
        for (seq, sender, bytes) in pending {
            let bytes = u32::try_from(bytes).unwrap_or(GONE - 1).min(GONE - 1);
            shares.entries.push_back(Entry { seq, sender, bytes });
            let held = shares.senders.entry(sender).or_default();
            held.messages += 1;
            held.bytes += u64::from(bytes);
        }
        self.tracked += shares.entries.len();
        self.inboxes.insert(inbox, shares);
    }

    /// Whether `sender` may add a message of `bytes` to `inbox` (which must be tracked).
    pub fn admits(&mut self, inbox: UserId, sender: UserId, bytes: u64) -> Result<(), OverShare> {
        self.clock += 1;
        let Some(shares) = self.inboxes.get_mut(&inbox) else {
            return Ok(());
        };
        shares.last_used = self.clock;
        let held = shares.senders.get(&sender).copied().unwrap_or_default();
        let limit = self.limit;
        if limit.messages > 0 && held.messages >= limit.messages {
            return Err(OverShare);
        }
        if limit.bytes > 0 && held.bytes.saturating_add(bytes) > limit.bytes {
            return Err(OverShare);
        }
        Ok(())
    }

    /// Counts a message just appended to `inbox` (with a seq above all its others).
    pub fn add(&mut self, inbox: UserId, seq: u64, sender: UserId, bytes: u64) {
        let Some(shares) = self.inboxes.get_mut(&inbox) else {
            return;
        };
        let bytes = u32::try_from(bytes).unwrap_or(GONE - 1).min(GONE - 1);
        shares.entries.push_back(Entry { seq, sender, bytes });
        let held = shares.senders.entry(sender).or_default();
        held.messages += 1;
        held.bytes += u64::from(bytes);
        self.tracked += 1;
    }

    /// Uncounts message `seq` of `inbox` (acknowledged, unsent or expired).
    pub fn remove(&mut self, inbox: UserId, seq: u64) {
        if let Some(shares) = self.inboxes.get_mut(&inbox)
            && shares.remove(seq)
        {
            self.tracked -= shares.compact();
        }
    }

    /// Forgets `inbox` (counted again from the store when next used).
    pub fn forget(&mut self, inbox: UserId) {
        if let Some(shares) = self.inboxes.remove(&inbox) {
            self.tracked -= shares.entries.len();
        }
    }

    /// Forgets everything (after a failed batch the counts may describe unwritten messages).
    pub fn clear(&mut self) {
        self.inboxes.clear();
        self.tracked = 0;
    }

    /// Past [`MAX_TRACKED`], forgets the inboxes used least recently among those `evictable`
    /// allows (the writer keeps those whose batches are not committed yet: a recount from
    /// the store would not see them).
    pub fn evict(&mut self, evictable: impl Fn(UserId) -> bool) {
        if self.tracked <= MAX_TRACKED {
            return;
        }
        let mut order: Vec<(u64, UserId)> = self
            .inboxes
            .iter()
            .filter(|(id, _)| evictable(**id))
            .map(|(id, s)| (s.last_used, *id))
            .collect();
        order.sort_unstable();
        for (_, id) in order {
            if self.tracked <= EVICT_TO {
                break;
            }
            self.forget(id);
        }
    }

    /// Messages tracked (live or awaiting compaction).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.tracked
    }
}

/// The pending messages of inbox `id` as (seq, sender's id, body bytes), in seq order, read
/// from the store. A sender whose account is gone counts under id 0 (given to no account). A
/// message that references a shared body counts the body's whole length (see
/// `shared_bodies`).
pub(super) fn count_from_store(
    ks: &InboxKeyspaces,
    id: UserId,
) -> Result<Vec<(u64, UserId, u64)>, StoreError> {
    /// The part of a stored message the shares need (the rest is skipped, not copied).
    #[derive(Deserialize)]
    struct View<'a> {
        seq: u64,
        #[serde(borrow, default)]
        from: Option<&'a str>,
        #[serde(borrow, default)]
        body: Option<&'a serde_bytes::Bytes>,
        #[serde(default, with = "serde_bytes")]
        shared: Option<BodyKey>,
    }
    let mut ids: Map<Vec<u8>, UserId> = Map::default();
    let mut pending = Vec::new();
    for entry in ks.inbox.prefix(id.to_be_bytes()) {
        let (_, value) = entry.into_inner()?;
        let view: View<'_> = rmp_serde::from_slice(&value).map_err(|e| StoreError::Corrupt {
            keyspace: "inbox",
            reason: e.to_string(),
        })?;
        // A shared entry's sender and body are in its shared record.
        let (from, bytes) = match (view.shared, view.from) {
            (Some(key), _) => match ks.bodies.get(key)? {
                Some(record) => {
                    let header = shared_header(&record)?;
                    (header.from.as_str().as_bytes().to_vec(), header.body_len)
                }
                None => (Vec::new(), 0),
            },
            (None, from) => (
                from.unwrap_or_default().as_bytes().to_vec(),
                view.body.map_or(0, |b| b.len() as u64),
            ),
        };
        let sender = match ids.get(&from) {
            Some(sender) => *sender,
            // No sender to be found (a damaged entry): counted under no account.
            None if from.is_empty() => 0,
            None => {
                let sender = match ks.user_ids.get(&from)? {
                    Some(bytes) => decode_id("user_ids", &bytes)?,
                    None => 0,
                };
                ids.insert(from, sender);
                sender
            }
        };
        pending.push((view.seq, sender, bytes));
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_is_held_to_its_share_and_removals_make_room() {
        let mut shares = SenderShares::new(SenderShare {
            messages: 2,
            bytes: 100,
        });
        shares.load(7, vec![(1, 1, 10)]);
        assert!(shares.admits(7, 1, 10).is_ok());
        shares.add(7, 2, 1, 10);
        assert_eq!(shares.admits(7, 1, 10), Err(OverShare), "two messages held");
        assert!(
            shares.admits(7, 2, 100).is_ok(),
            "another sender is not held back"
        );
        assert_eq!(shares.admits(7, 2, 101), Err(OverShare), "bytes count too");
        shares.remove(7, 1);
        assert!(shares.admits(7, 1, 10).is_ok());
        shares.remove(7, 1);
        shares.remove(7, 2);
        assert_eq!(shares.tracked(), 0, "gone entries at the front are dropped");
    }

    #[test]
    fn out_of_order_removals_are_compacted() {
        let mut shares = SenderShares::new(SenderShare {
            messages: 1000,
            bytes: 0,
        });
        shares.load(1, vec![]);
        for seq in 1..=200 {
            shares.add(1, seq, 9, 1);
        }
        for seq in 2..=200 {
            shares.remove(1, seq);
        }
        assert!(shares.tracked() < 50, "{}", shares.tracked());
        shares.remove(1, 1);
        assert_eq!(shares.tracked(), 0);
    }
}
