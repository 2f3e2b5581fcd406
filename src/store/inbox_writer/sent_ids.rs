//! Which message ids each sender's send records hold, in memory, so that deduplicating a new
//! message reads no store: the question every append asks, and the one store read that kept
//! an append on the writer's thread (see [`super::InboxWriter::append`]).
//!
//! A sender is *tracked* once the writer has read the keys of all their records (one prefix
//! scan, on the writer's thread, the first time they send in this process) and has at most
//! [`MAX_PER_SENDER`] of them: from then on every record the writer adds or forgets for them is
//! added or forgotten here too (the writer is the only one that writes `sent`), so a tracked
//! sender's set is exactly their records, plus those of batches not yet committed. A sender
//! with more records is remembered as too many, and their appends read the store as before.
//! At most [`MAX_TRACKED`] ids are kept in all: past it, whole senders are forgotten (read
//! again when they next send).

use crate::protocol::MessageId;
use crate::store::StoreError;
use crate::store::user_ids::UserId;

use super::{Map, Set};

/// Send records a sender may have and be tracked (a settled marker stays until its message
/// expires, a week by default: ≈ 2,300 messages a day). Reading them takes a few ms, once.
pub(super) const MAX_PER_SENDER: usize = 1 << 14;
/// Ids kept in all, at most: 18–36 bytes each in the sets' tables (a power of two of slots,
/// 16 bytes and a control byte each, at most 7/8 full), so 36 MiB at most.
pub(super) const MAX_TRACKED: usize = 1 << 20;

/// What the writer knows of one sender's send records.
enum Sender {
    /// Every id with a record (or in a batch on its way to one).
    Tracked(Set<MessageId>),
    /// More than [`MAX_PER_SENDER`] records: the store is asked.
    TooMany,
}

#[derive(Default)]
pub(super) struct SentIds {
    senders: Map<UserId, Sender>,
    tracked: usize,
}

impl SentIds {
    /// Whether `sender` has a record of `id`, if this is known without the store.
    pub fn contains(&self, sender: UserId, id: &MessageId) -> Option<bool> {
        match self.senders.get(&sender)? {
            Sender::Tracked(ids) => Some(ids.contains(id)),
            Sender::TooMany => None,
        }
    }

    /// Whether `sender` has been looked at (tracked, or known to have too many records).
    pub fn knows(&self, sender: UserId) -> bool {
        self.senders.contains_key(&sender)
    }

    /// Starts tracking `sender` with the ids of their records (`None`: too many), plus
    /// `in_flight` (their messages in batches not yet committed, which the read may or may not
    /// have seen).
    pub fn load(
        &mut self,
        sender: UserId,
        stored: Option<Vec<MessageId>>,
        in_flight: impl Iterator<Item = MessageId>,
    ) {
        let entry = match stored {
            Some(ids) => {
                let mut set: Set<MessageId> = ids.into_iter().collect();
                set.extend(in_flight);
                if set.len() > MAX_PER_SENDER {
                    Sender::TooMany
                } else {
                    self.tracked += set.len();
                    Sender::Tracked(set)
                }
            }
            None => Sender::TooMany,
        };
        if let Some(Sender::Tracked(old)) = self.senders.insert(sender, entry) {
            self.tracked = self.tracked.saturating_sub(old.len());
        }
        self.shrink(sender);
    }

    /// A record of `id` is being written for `sender`.
    pub fn insert(&mut self, sender: UserId, id: MessageId) {
        let Some(Sender::Tracked(ids)) = self.senders.get_mut(&sender) else {
            return;
        };
        if ids.insert(id) {
            self.tracked += 1;
            if ids.len() > MAX_PER_SENDER {
                self.tracked = self.tracked.saturating_sub(ids.len());
                self.senders.insert(sender, Sender::TooMany);
            }
        }
        self.shrink(sender);
    }

    /// The record with this `sent` key (sender id ‖ message id) is being removed.
    pub fn forget_key(&mut self, key: &[u8]) {
        let (Some(sender), Some(id)) = (
            key.get(..4)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .map(UserId::from_be_bytes),
            key.get(4..).and_then(|s| <[u8; 16]>::try_from(s).ok()),
        ) else {
            return;
        };
        if let Some(Sender::Tracked(ids)) = self.senders.get_mut(&sender)
            && ids.remove(&MessageId(id))
        {
            self.tracked = self.tracked.saturating_sub(1);
        }
    }

    /// Forgets everything (after a failed commit, whose records may never have been written).
    pub fn clear(&mut self) {
        self.senders.clear();
        self.tracked = 0;
    }

    /// Forgets other senders while more than [`MAX_TRACKED`] ids are kept.
    fn shrink(&mut self, keep: UserId) {
        while self.tracked > MAX_TRACKED {
            let Some(victim) = self.senders.keys().copied().find(|s| *s != keep) else {
                return;
            };
            if let Some(Sender::Tracked(old)) = self.senders.remove(&victim) {
                self.tracked = self.tracked.saturating_sub(old.len());
            }
        }
    }
}

/// The message ids of `sender`'s send records in the store, or `None` if there are more than
/// [`MAX_PER_SENDER`] (reads at most one more key than that).
pub(super) fn read_sender(
    sent: &fjall::Keyspace,
    sender: UserId,
) -> Result<Option<Vec<MessageId>>, StoreError> {
    let mut ids = Vec::new();
    for entry in sent.prefix(sender.to_be_bytes()) {
        let key = entry.key()?;
        if ids.len() == MAX_PER_SENDER {
            return Ok(None);
        }
        if let Some(id) = key.get(4..).and_then(|s| <[u8; 16]>::try_from(s).ok()) {
            ids.push(MessageId(id));
        }
    }
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    #[test]
    fn a_tracked_sender_is_answered_from_memory_and_an_untracked_one_is_not() {
        let mut ids = SentIds::default();
        assert_eq!(ids.contains(7, &id(1)), None);
        ids.load(7, Some(vec![id(1)]), [id(2)].into_iter());
        assert_eq!(ids.contains(7, &id(1)), Some(true));
        assert_eq!(ids.contains(7, &id(2)), Some(true), "in flight counts");
        assert_eq!(ids.contains(7, &id(3)), Some(false));
        ids.insert(7, id(3));
        assert_eq!(ids.contains(7, &id(3)), Some(true));
        let mut key = 7u32.to_be_bytes().to_vec();
        key.extend_from_slice(&id(3).0);
        ids.forget_key(&key);
        assert_eq!(ids.contains(7, &id(3)), Some(false));
        ids.load(8, None, std::iter::empty());
        assert!(ids.knows(8));
        assert_eq!(ids.contains(8, &id(1)), None, "too many: the store decides");
        ids.clear();
        assert_eq!(ids.contains(7, &id(1)), None);
    }

    #[test]
    fn a_sender_past_the_limit_is_no_longer_tracked() {
        let mut ids = SentIds::default();
        ids.load(1, Some(Vec::new()), std::iter::empty());
        for n in 0..=MAX_PER_SENDER {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&(n as u64).to_be_bytes());
            ids.insert(1, MessageId(raw));
        }
        assert_eq!(ids.contains(1, &id(0xee)), None);
        assert_eq!(ids.tracked, 0);
    }

    #[test]
    fn past_the_total_other_senders_are_forgotten() {
        let mut ids = SentIds::default();
        let per = MAX_PER_SENDER;
        let senders = MAX_TRACKED / per + 2;
        for s in 0..senders as u32 {
            let batch: Vec<MessageId> = (0..per as u64)
                .map(|n| {
                    let mut raw = [0u8; 16];
                    raw[..8].copy_from_slice(&n.to_be_bytes());
                    MessageId(raw)
                })
                .collect();
            ids.load(s, Some(batch), std::iter::empty());
            assert!(ids.tracked <= MAX_TRACKED, "{}", ids.tracked);
        }
        assert!(ids.knows(senders as u32 - 1), "the newest stays");
    }
}
