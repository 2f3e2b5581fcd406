//! The MLS delivery service (docs/PROTOCOL.md 5.7): per-group locks that order each group's
//! traffic, the checks of every commit (`mls`, `policy`), and the fan-out of group sends into
//! the member devices' inboxes (`send`). The requests (`create_group`, `leave_group`, key
//! packages, …) are in `requests::groups`.
//!
//! Group traffic is stored as ordinary inbox entries (one `NewMessage` whose copies are the
//! member devices), so durability before `sent`, dedupe by message id, acks and expiry are the
//! inbox's. The group's name travels with each entry inside its stored `kind`, as
//! `KIND 0x00 GROUP` (a 1:1 send may not use 0x00 in its kind): the store format is unchanged,
//! and delivery splits it back into the deliver header's `kind` and `group`.

pub(crate) mod mls;
pub(crate) mod policy;
pub(crate) mod send;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::protocol::Username;

/// Separates the kind from the group name in a stored kind.
const GROUP_SEPARATOR: char = '\0';

/// The stored kind of group traffic: `kind 0x00 group`.
pub(crate) fn stored_kind(kind: &str, group: &Username) -> String {
    format!("{kind}{GROUP_SEPARATOR}{group}")
}

/// Splits a stored kind into the deliver header's `kind` and `group`.
pub(crate) fn split_stored_kind(stored: String) -> (String, Option<String>) {
    match stored.split_once(GROUP_SEPARATOR) {
        Some((kind, group)) => (kind.to_owned(), Some(group.to_owned())),
        None => (stored, None),
    }
}

/// Whether a client's kind is usable for a 1:1 send (it must not look like group traffic).
pub(crate) fn is_plain_kind(kind: &str) -> bool {
    !kind.contains(GROUP_SEPARATOR)
}

/// One lock per group: every change of a group (a commit, a leave) and every append of its
/// traffic happens under it, so each group has one order in every member's inbox and exactly
/// one of concurrent commits at an epoch wins.
#[derive(Debug, Default)]
pub(crate) struct GroupLocks {
    locks: Mutex<HashMap<Username, Arc<tokio::sync::Mutex<()>>>>,
}

/// A held group lock; the entry is dropped from the map when nobody else wants it.
pub(crate) struct GroupGuard<'a> {
    locks: &'a GroupLocks,
    name: Username,
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl GroupLocks {
    /// Waits for the lock of `group`.
    pub(crate) async fn lock(&self, group: &Username) -> GroupGuard<'_> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(locks.entry(group.clone()).or_default())
        };
        GroupGuard {
            locks: self,
            name: group.clone(),
            lock: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        drop(self.lock.take());
        let mut locks = self
            .locks
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only the map holds it: nobody waits, so the entry can go.
        if locks
            .get(&self.name)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_kinds_split_back() {
        let group = Username::parse("friends").unwrap();
        let stored = stored_kind("mls", &group);
        assert_eq!(
            split_stored_kind(stored),
            ("mls".to_owned(), Some("friends".to_owned()))
        );
        assert_eq!(split_stored_kind("text".into()), ("text".to_owned(), None));
        assert!(is_plain_kind("text") && !is_plain_kind("a\0b"));
    }

    #[tokio::test]
    async fn a_group_lock_is_exclusive_and_its_entry_goes_with_it() {
        let locks = GroupLocks::default();
        let group = Username::parse("friends").unwrap();
        let held = locks.lock(&group).await;
        let other = Username::parse("others").unwrap();
        drop(locks.lock(&other).await);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock(&group))
                .await
                .is_err()
        );
        drop(held);
        drop(locks.lock(&group).await);
        assert!(locks.locks.lock().unwrap().is_empty());
    }
}
