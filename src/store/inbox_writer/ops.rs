//! What the inbox writer is asked to do, besides removals: messages to append with where
//! each copy goes ([`Addressed`]), and inboxes to drop ([`DropInbox`]).

use crate::store::NewMessage;
use crate::store::devices::InboxId;
use crate::store::user_ids::UserId;

/// Where one copy of a message goes: its recipient's account id and its device's inbox id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::store) struct Target {
    pub user: UserId,
    pub inbox: InboxId,
}

/// A message to append, with its sender's id and each copy's [`Target`] (in copy order).
pub(in crate::store) struct Addressed {
    pub message: NewMessage,
    pub sender: UserId,
    pub targets: Vec<Target>,
}

/// An inbox to empty and close (its device is removed, or its account deleted).
pub(in crate::store) struct DropInbox {
    pub inbox: InboxId,
    /// The account, if it is being deleted: no message goes from it either from now on.
    pub account: Option<UserId>,
    /// The inbox's seq counter key in `meta`, deleted with the last of its messages.
    pub counter: Vec<u8>,
}

/// What one [`Op::DropInbox`] did.
pub(in crate::store) struct Dropped {
    /// Messages removed in this batch.
    pub removed: u64,
    /// The inbox is empty and its counter gone; otherwise submit it again.
    pub done: bool,
}

/// Messages of a dropped inbox removed per batch at most.
pub(super) const DROP_CHUNK: usize = 4096;
