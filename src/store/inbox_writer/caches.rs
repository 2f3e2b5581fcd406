//! What the inbox writer remembers of the messages it appended, so that the usual ack costs
//! it no store read: which of an inbox's messages are pending ([`KnownPending`]), and what
//! settling a message's send record needs ([`Origins`]).

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::protocol::MessageId;
use crate::store::shared_bodies::BodyKey;
use crate::store::user_ids::UserId;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Messages whose [`Origin`] is remembered at most: the most recently appended ones. A map
/// entry is 64 bytes and a queue slot 16; the map's table rounds up to a power of two, so
/// ≈ 19 MiB at most, reached only when that many recent messages are all still pending. At
/// the relay's ≈ 25,000 msg/s this covers the last 5 s of appends, far more than an online
/// recipient takes to acknowledge. An older message is settled from the store.
pub(super) const MAX_ORIGINS: usize = 1 << 17;

/// What the writer knows of one inbox's messages without asking the store: every message from
/// seq `from` (the next seq when the inbox was first used in this process) up to its next seq
/// was appended by this writer, and is pending unless removed since. All removals (acks,
/// unsend, expiry) go through the writer, so this stays exact; an ack then costs no lookup.
pub(super) struct KnownPending {
    from: u64,
    /// Every seq in `from..removed_below` is removed.
    removed_below: u64,
    /// Removed seqs above `removed_below` (acks out of order).
    pub(super) removed: BTreeSet<u64>,
}

impl KnownPending {
    pub(super) fn new(from: u64) -> Self {
        Self {
            from,
            removed_below: from,
            removed: BTreeSet::new(),
        }
    }

    /// Whether `seq` (below the inbox's next seq) is pending; `None` if it is older than what
    /// this writer knows.
    pub(super) fn pending(&self, seq: u64) -> Option<bool> {
        (seq >= self.from).then(|| seq >= self.removed_below && !self.removed.contains(&seq))
    }

    pub(super) fn remove(&mut self, seq: u64) {
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

/// What settling a message's send record needs, known to the writer when it appends the
/// message: the key of the record (the sender's id and the message id) and the expiry the
/// settled marker keeps. Read from the store instead (the inbox entry, then the sender's id),
/// it cost two point reads per acknowledged message, and a wait for the commit when the ack
/// came before its message's batch was committed, which stalled the whole writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Origin {
    pub sender: UserId,
    pub id: MessageId,
    pub expires_at: u64,
    /// The shared body the message's entry references, released when the entry goes.
    pub body: Option<BodyKey>,
}

/// The [`Origin`]s of the pending messages among the last [`MAX_ORIGINS`] appended, by
/// (inbox, seq). An entry goes when its message is settled (it leaves the inbox only through
/// the writer, which takes its origin then), or when [`MAX_ORIGINS`] newer messages came.
pub(super) struct Origins {
    by_message: Map<(UserId, u64), Origin>,
    /// Every message remembered, oldest first (also those settled since: a queue slot is
    /// freed only when it is the oldest, which keeps this a plain queue).
    order: VecDeque<(UserId, u64)>,
    max: usize,
}

impl Origins {
    pub fn new(max: usize) -> Self {
        Self {
            by_message: Map::default(),
            order: VecDeque::new(),
            max,
        }
    }

    /// Remembers the origin of message `seq` of `inbox`, just appended, forgetting the oldest.
    pub fn insert(&mut self, inbox: UserId, seq: u64, origin: Origin) {
        if self.max == 0 {
            return;
        }
        while self.order.len() >= self.max {
            if let Some(oldest) = self.order.pop_front() {
                self.by_message.remove(&oldest);
            }
        }
        self.by_message.insert((inbox, seq), origin);
        self.order.push_back((inbox, seq));
    }

    /// The origin of message `seq` of `inbox`, which is being removed, if remembered.
    pub fn take(&mut self, inbox: UserId, seq: u64) -> Option<Origin> {
        self.by_message.remove(&(inbox, seq))
    }

    /// Forgets everything (after a failed commit, when the writer trusts its caches no more).
    pub fn clear(&mut self) {
        self.by_message.clear();
        self.order.clear();
    }

    /// Origins remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_message.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(n: u8) -> Origin {
        Origin {
            sender: u32::from(n),
            id: MessageId([n; 16]),
            expires_at: u64::from(n),
            body: None,
        }
    }

    #[test]
    fn origins_are_taken_once_and_bounded_oldest_first() {
        let mut origins = Origins::new(3);
        for n in 1..=3 {
            origins.insert(9, u64::from(n), origin(n));
        }
        assert_eq!(origins.take(9, 2), Some(origin(2)));
        assert_eq!(origins.take(9, 2), None, "taken once");
        assert_eq!(origins.take(8, 1), None, "another inbox");
        // Two more: the two oldest slots go (one of them already taken).
        origins.insert(9, 4, origin(4));
        origins.insert(9, 5, origin(5));
        assert_eq!(origins.len(), 3);
        assert_eq!(origins.take(9, 1), None, "the oldest is forgotten");
        for n in 3..=5 {
            assert_eq!(origins.take(9, u64::from(n)), Some(origin(n)));
        }
        let mut none = Origins::new(0);
        none.insert(1, 1, origin(1));
        assert_eq!(none.take(1, 1), None);
    }
}
