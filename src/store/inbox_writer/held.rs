//! Messages the writer has ordered but not yet written: *held* for a short window in the hope
//! that every copy is acknowledged first, in which case the message is never written at all
//! (no inbox entries, no tombstones, no sync; only the settled marker that keeps its id a
//! duplicate). A held message has its seqs, counts in its inboxes' pending counts and senders'
//! shares, and has gone to its online recipients like any other; what it lacks is the write,
//! and so its sender's `sent`, which waits for the disk or for the last copy's
//! acknowledgement, whichever comes first.
//!
//! The window is bounded in time (the store's `hold` option) and in size ([`MAX_HELD`]
//! messages, [`MAX_HELD_BYTES`] of entries): a message that does not fit is written at once.
//!
//! The held messages are shared ([`SharedHeld`]) by the writer, which holds and writes them,
//! and the devices' acknowledgements, which remove held copies without a trip through the
//! writer's queue ([`HeldMessages::acknowledge`]): an online message then wakes the writer
//! thread once (its append), not twice. The writer takes note of those removals before it
//! applies its next operation ([`HeldMessages::take_outside`]) and settles the messages they
//! finished within the window.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::apply::Staged;
use super::committer::Reply;
use super::{Map, MessageId};
use crate::store::devices::InboxId;
use crate::store::shared_bodies::{Share, sharing};
use crate::store::user_ids::UserId;
use crate::store::{Copy, Placed, PlacedHook};

/// Messages held at most; one more is written at once.
pub(super) const MAX_HELD: usize = 4096;
/// Bytes of inbox entries held at most; a message that would pass it is written at once.
pub(super) const MAX_HELD_BYTES: usize = 16 << 20;
/// Bytes a held message's entries and record take beyond its bodies, at most (an estimate for
/// [`held_bytes`]).
const HELD_OVERHEAD: usize = 512;

/// What holding a message with these copies would take, at most, in bytes; `None` if it
/// cannot be held: two of its copies share a body, which is written at once (see
/// `shared_bodies`).
pub(super) fn held_bytes(copies: &[Copy]) -> Option<usize> {
    sharing(copies.iter().map(|c| c.body.as_slice()))
        .iter()
        .all(|s| matches!(s, Share::Inline))
        .then(|| copies.iter().map(|c| c.body.len() + HELD_OVERHEAD).sum())
}

/// One held message.
pub(super) struct Held {
    taken: Instant,
    /// Its writes; entries leave as their copies are removed.
    pub staged: Staged,
    /// A copy was removed (acknowledged, unsent, expired) while held: the send record is
    /// written settled.
    pub removed_any: bool,
    /// Its `synced` hook with the copies' places, called once it is written and synced, or
    /// once every copy is acknowledged.
    pub synced: Option<(PlacedHook, Vec<Placed>)>,
    /// The answers waiting for it: its append's, and any resend's meanwhile.
    pub replies: Vec<Reply>,
    bytes: usize,
}

/// What waited for messages whose last copies were just acknowledged: their appends' answers
/// and their `synced` hooks, for the acknowledging caller to run.
pub(super) type Answers = (Vec<Reply>, Vec<(PlacedHook, Vec<Placed>)>);

/// The held messages, shared by the writer thread and the callers' acknowledgements.
#[derive(Clone)]
pub(super) struct SharedHeld(Arc<Mutex<HeldMessages>>);

impl SharedHeld {
    pub fn new(window: Duration) -> Self {
        Self(Arc::new(Mutex::new(HeldMessages::new(window))))
    }

    /// Locks them (a panic while they were locked left them as consistent as between any two
    /// calls: each call changes them whole).
    pub fn lock(&self) -> MutexGuard<'_, HeldMessages> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds nothing from now on; what was held is dropped outside the lock (which answers
    /// its callers `WriterStopped`).
    pub fn clear(&self) {
        let old = std::mem::replace(&mut *self.lock(), HeldMessages::new(Duration::ZERO));
        drop(old);
    }
}

/// The held messages, oldest first, with indexes by copy and by message.
pub(super) struct HeldMessages {
    window: Duration,
    by_token: BTreeMap<u64, Held>,
    copies: Map<(InboxId, u64), u64>,
    messages: Map<(UserId, MessageId), u64>,
    /// How many held entries each inbox has.
    inboxes: Map<InboxId, usize>,
    /// Messages whose every copy was removed while held: to settle, never to write.
    finished: Vec<Held>,
    /// When the oldest of `finished` finished.
    finished_since: Option<Instant>,
    /// Copies removed by acknowledgements outside the writer, which still counts them (pending
    /// counts, senders' shares, what it knows of each inbox) until it takes them.
    outside: Vec<(InboxId, u64)>,
    next_token: u64,
    bytes: usize,
}

impl HeldMessages {
    /// Holds nothing when `window` is zero.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            by_token: BTreeMap::new(),
            copies: Map::default(),
            messages: Map::default(),
            inboxes: Map::default(),
            finished: Vec::new(),
            finished_since: None,
            outside: Vec::new(),
            next_token: 0,
            bytes: 0,
        }
    }

    /// Whether messages are held at all (the window is not zero).
    pub fn is_holding(&self) -> bool {
        !self.window.is_zero()
    }

    /// Whether `more` messages of `bytes` (see [`held_bytes`]) fit beside what is held.
    pub fn has_room(&self, more: usize, bytes: usize) -> bool {
        self.len() + more <= MAX_HELD && self.bytes() + bytes <= MAX_HELD_BYTES
    }

    /// Whether `staged` may be held (the window is on, it has no shared body, it fits).
    pub fn admits(&self, staged: &Staged) -> bool {
        !self.window.is_zero()
            && !staged.shared
            && self.by_token.len() < MAX_HELD
            && self.bytes + entry_bytes(staged) <= MAX_HELD_BYTES
    }

    pub fn hold(
        &mut self,
        staged: Staged,
        synced: Option<(PlacedHook, Vec<Placed>)>,
        reply: Reply,
        now: Instant,
    ) {
        let token = self.next_token;
        self.next_token += 1;
        for entry in &staged.entries {
            self.copies.insert((entry.inbox, entry.seq), token);
            *self.inboxes.entry(entry.inbox).or_default() += 1;
        }
        self.messages.insert(staged.message, token);
        let bytes = entry_bytes(&staged);
        self.bytes += bytes;
        self.by_token.insert(
            token,
            Held {
                taken: now,
                staged,
                removed_any: false,
                synced,
                replies: vec![reply],
                bytes,
            },
        );
    }

    /// Adds a resend's answer to its held message; gives it back if the message is not held.
    pub fn wait_with(&mut self, message: (UserId, MessageId), reply: Reply) -> Option<Reply> {
        match self
            .messages
            .get(&message)
            .and_then(|token| self.by_token.get_mut(token))
        {
            Some(held) => {
                held.replies.push(reply);
                None
            }
            None => Some(reply),
        }
    }

    /// Removes the held copy `seq` of inbox `id`, if there is one (`false` otherwise). The
    /// message's last copy moves it to the finished ones ([`Self::take_finished`]).
    pub fn remove_copy(&mut self, id: InboxId, seq: u64) -> bool {
        let Some(token) = self.copies.remove(&(id, seq)) else {
            return false;
        };
        self.forget_inbox_entry(id);
        let Some(held) = self.by_token.get_mut(&token) else {
            return true;
        };
        held.staged
            .entries
            .retain(|e| !(e.inbox == id && e.seq == seq));
        held.removed_any = true;
        if held.staged.entries.is_empty()
            && let Some(held) = self.by_token.remove(&token)
        {
            self.messages.remove(&held.staged.message);
            self.bytes = self.bytes.saturating_sub(held.bytes);
            self.finished_since.get_or_insert_with(Instant::now);
            self.finished.push(held);
        }
        true
    }

    /// Acknowledgements, outside the writer: removes the held copies among `seqs` of inbox
    /// `id` and leaves the others in `seqs` (for the writer). Returns how many it removed and
    /// what waited for the messages whose last copies these were, for the caller to answer
    /// (their recipients have them). The writer takes note of the removals before its next
    /// operation ([`Self::take_outside`]) and settles the finished messages within the window
    /// ([`Self::deadline`]).
    pub fn acknowledge(&mut self, id: InboxId, seqs: &mut Vec<u64>) -> (u64, Answers) {
        let mut answers: Answers = (Vec::new(), Vec::new());
        if self.copies.is_empty() {
            return (0, answers);
        }
        let before = self.finished.len();
        let mut removed = 0;
        seqs.retain(|&seq| {
            if self.remove_copy(id, seq) {
                self.outside.push((id, seq));
                removed += 1;
                false
            } else {
                true
            }
        });
        for held in self.finished.iter_mut().skip(before) {
            answers.0.append(&mut held.replies);
            answers.1.extend(held.synced.take());
        }
        (removed, answers)
    }

    /// The copies removed by [`Self::acknowledge`] since the last call.
    pub fn take_outside(&mut self) -> Vec<(InboxId, u64)> {
        std::mem::take(&mut self.outside)
    }

    /// The messages whose every copy was removed while held.
    pub fn take_finished(&mut self) -> Vec<Held> {
        self.finished_since = None;
        std::mem::take(&mut self.finished)
    }

    /// The messages to write now: those held for the whole window by `now`, or all of them.
    pub fn take_due(&mut self, now: Instant, all: bool) -> Vec<Held> {
        let mut due = Vec::new();
        while let Some(entry) = self.by_token.first_entry() {
            if !all && now.saturating_duration_since(entry.get().taken) < self.window {
                break;
            }
            let held = entry.remove();
            for e in &held.staged.entries {
                self.copies.remove(&(e.inbox, e.seq));
                self.forget_inbox_entry(e.inbox);
            }
            self.messages.remove(&held.staged.message);
            self.bytes = self.bytes.saturating_sub(held.bytes);
            due.push(held);
        }
        due
    }

    /// When the oldest held message is due, or the oldest finished one is to be settled,
    /// whichever comes first; `None` when there is neither.
    pub fn deadline(&self) -> Option<Instant> {
        let due = self
            .by_token
            .first_key_value()
            .map(|(_, held)| held.taken + self.window);
        let settle = self.finished_since.map(|since| since + self.window);
        match (due, settle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether inbox `id` has held entries (the store does not show them).
    pub fn holds_inbox(&self, id: InboxId) -> bool {
        self.inboxes.contains_key(&id)
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Bytes of entries held (an upper bound on their encoding).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty() && self.finished.is_empty()
    }

    fn forget_inbox_entry(&mut self, id: InboxId) {
        if let Some(n) = self.inboxes.get_mut(&id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inboxes.remove(&id);
            }
        }
    }
}

fn entry_bytes(staged: &Staged) -> usize {
    staged.entries.iter().map(|e| e.value.len()).sum::<usize>() + staged.record.len()
}
