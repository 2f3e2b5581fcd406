//! MLS groups as the delivery service keeps them (docs/PROTOCOL.md 5.7): one record per group
//! name, with the DS's own MLS view of the group (its `PublicGroup` state, opaque bytes here).
//!
//! Keyspaces: `groups` (group name → [`GroupRecord`], named MessagePack), `group_ids` (MLS
//! group id → group name: an id is used by one group only) and `group_users` (username 0x00
//! group name → nothing: the groups a user has a leaf in, or left and is still in until a
//! commit removes it). Every change runs under [`GroupKeyspaces::lock`] and is synced before
//! it returns. The server serialises the changes of one group itself (one lock per group), so
//! the store only has to keep the three keyspaces consistent.
//!
//! A store of an older version gets these keyspaces empty (fjall creates a keyspace on first
//! open): no format change.

use std::collections::BTreeSet;
use std::sync::Mutex;

use fjall::{Keyspace, PersistMode};
use serde::{Deserialize, Serialize};

use super::fjall_open::Inner;
use super::fjall_store::{FjallStore, decode, encode};
use super::inbox_writer::pair_key;
use super::{DeviceId, StoreError};
use crate::protocol::{MessageId, Username};

pub(super) const GROUPS: &str = "groups";
pub(super) const GROUP_IDS: &str = "group_ids";
pub(super) const GROUP_USERS: &str = "group_users";

/// The group keyspaces and the lock that orders their changes.
pub(super) struct GroupKeyspaces {
    pub groups: Keyspace,
    pub ids: Keyspace,
    pub users: Keyspace,
    /// Held by every change (read, decide, write, commit).
    pub lock: Mutex<()>,
}

/// One member device of a group: a leaf of its MLS tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMemberRecord {
    /// The member's account.
    pub user: Username,
    /// Its device.
    pub device: DeviceId,
    /// Its leaf index in the MLS tree.
    pub leaf: u32,
}

/// A group as the delivery service keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Its name (the rules of usernames, global on the server).
    pub name: Username,
    /// Its MLS GroupId.
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// Who created it.
    pub creator: Username,
    /// Its admins, as in its admins extension (sorted).
    pub admins: Vec<Username>,
    /// Its current MLS epoch.
    pub epoch: u64,
    /// Its member devices, by leaf index.
    pub members: Vec<GroupMemberRecord>,
    /// Users who left and whose leaves no commit has removed yet (delivered nothing).
    pub pending_leaves: Vec<Username>,
    /// The ids of the latest accepted commits (newest last, a few dozen): a commit sent again
    /// under the same id is recognised before its epoch is checked.
    pub recent_commits: Vec<MessageId>,
    /// The delivery service's MLS state of the group (its `PublicGroup`), opaque here.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    /// When it was created, seconds since the Unix epoch.
    pub created_at: u64,
}

impl GroupRecord {
    /// Whether `user`'s `device` has a leaf and its user did not leave: it sends and receives.
    pub fn delivers_to(&self, user: &Username, device: DeviceId) -> bool {
        !self.pending_leaves.contains(user)
            && self
                .members
                .iter()
                .any(|m| m.user == *user && m.device == device)
    }

    /// The leaf of `user`'s `device`, if it has one.
    pub fn leaf_of(&self, user: &Username, device: DeviceId) -> Option<u32> {
        self.members
            .iter()
            .find(|m| m.user == *user && m.device == device)
            .map(|m| m.leaf)
    }

    /// The users with a leaf, and those who left and still have one.
    fn users(&self) -> BTreeSet<Username> {
        self.members
            .iter()
            .map(|m| m.user.clone())
            .chain(self.pending_leaves.iter().cloned())
            .collect()
    }
}

/// The outcome of [`Store::create_group`](super::Store::create_group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupCreated {
    /// Stored, durable.
    Created,
    /// The name is taken.
    NameTaken,
    /// The MLS group id is taken.
    IdTaken,
}

fn user_key(user: &Username, group: &Username) -> Vec<u8> {
    pair_key(user, group.as_str().as_bytes())
}

impl Inner {
    fn stored_group(&self, name: &Username) -> Result<Option<GroupRecord>, StoreError> {
        match self.groups.groups.get(name.as_str())? {
            Some(bytes) => decode(GROUPS, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn create_group(&self, group: &GroupRecord) -> Result<GroupCreated, StoreError> {
        let _guard = self.groups.lock.lock().map_err(|_| StoreError::Poisoned)?;
        if self.groups.groups.contains_key(group.name.as_str())? {
            return Ok(GroupCreated::NameTaken);
        }
        if self.groups.ids.contains_key(group.id)? {
            return Ok(GroupCreated::IdTaken);
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&self.groups.groups, group.name.as_str(), encode(group)?);
        batch.insert(&self.groups.ids, group.id, group.name.as_str());
        for user in group.users() {
            batch.insert(&self.groups.users, user_key(&user, &group.name), []);
        }
        batch.commit()?;
        Ok(GroupCreated::Created)
    }

    /// Replaces the record of an existing group (the caller holds the group's own lock);
    /// `false` if there is none. A group with no users left is deleted, its name and id
    /// released.
    fn put_group(&self, group: &GroupRecord) -> Result<bool, StoreError> {
        let _guard = self.groups.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(old) = self.stored_group(&group.name)? else {
            return Ok(false);
        };
        let (before, after) = (old.users(), group.users());
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for gone in before.difference(&after) {
            batch.remove(&self.groups.users, user_key(gone, &group.name));
        }
        for new in after.difference(&before) {
            batch.insert(&self.groups.users, user_key(new, &group.name), []);
        }
        if after.is_empty() {
            batch.remove(&self.groups.groups, group.name.as_str());
            batch.remove(&self.groups.ids, old.id);
        } else {
            batch.insert(&self.groups.groups, group.name.as_str(), encode(group)?);
        }
        batch.commit()?;
        Ok(true)
    }

    fn groups_of(&self, user: &Username) -> Result<Vec<GroupRecord>, StoreError> {
        let prefix = pair_key(user, &[]);
        let mut out = Vec::new();
        for entry in self.groups.users.prefix(&prefix) {
            let key = entry.key()?;
            let name = key
                .get(prefix.len()..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| Username::parse(s).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    keyspace: GROUP_USERS,
                    reason: "a key does not end in a group name".into(),
                })?;
            out.extend(self.stored_group(&name)?);
        }
        Ok(out)
    }
}

impl FjallStore {
    pub(super) async fn create_group_now(
        &self,
        group: GroupRecord,
    ) -> Result<GroupCreated, StoreError> {
        self.writable()?;
        self.call(move |db| db.create_group(&group)).await
    }

    pub(super) async fn group_now(
        &self,
        name: &Username,
    ) -> Result<Option<GroupRecord>, StoreError> {
        let name = name.clone();
        self.call(move |db| db.stored_group(&name)).await
    }

    pub(super) async fn put_group_now(&self, group: GroupRecord) -> Result<bool, StoreError> {
        self.writable()?;
        self.call(move |db| db.put_group(&group)).await
    }

    pub(super) async fn groups_of_now(
        &self,
        user: &Username,
    ) -> Result<Vec<GroupRecord>, StoreError> {
        let user = user.clone();
        self.call(move |db| db.groups_of(&user)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn name(n: &str) -> Username {
        Username::parse(n).unwrap()
    }

    fn group(group: &str, id: u8, members: &[(&str, DeviceId)]) -> GroupRecord {
        GroupRecord {
            name: name(group),
            id: [id; 16],
            creator: name(members[0].0),
            admins: vec![name(members[0].0)],
            epoch: 0,
            members: members
                .iter()
                .enumerate()
                .map(|(leaf, (user, device))| GroupMemberRecord {
                    user: name(user),
                    device: *device,
                    leaf: leaf as u32,
                })
                .collect(),
            pending_leaves: Vec::new(),
            recent_commits: Vec::new(),
            state: vec![1, 2, 3],
            created_at: 10,
        }
    }

    #[tokio::test]
    async fn names_and_ids_are_taken_once_and_released_with_the_last_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        let first = group("friends", 1, &[("alice", 1)]);
        assert_eq!(
            store.create_group(first.clone()).await.unwrap(),
            GroupCreated::Created
        );
        let same_name = group("friends", 2, &[("bob", 1)]);
        assert_eq!(
            store.create_group(same_name).await.unwrap(),
            GroupCreated::NameTaken
        );
        let same_id = group("others", 1, &[("bob", 1)]);
        assert_eq!(
            store.create_group(same_id).await.unwrap(),
            GroupCreated::IdTaken
        );
        assert_eq!(
            store.group(&name("friends")).await.unwrap(),
            Some(first.clone())
        );

        // Bob joins, alice leaves (pending), then her leaf goes.
        let mut next = group("friends", 1, &[("alice", 1), ("bob", 1), ("bob", 2)]);
        next.epoch = 1;
        assert!(store.put_group(next.clone()).await.unwrap());
        assert_eq!(
            store.groups_of(&name("bob")).await.unwrap(),
            vec![next.clone()]
        );
        next.pending_leaves = vec![name("alice")];
        assert!(next.delivers_to(&name("bob"), 2));
        assert!(!next.delivers_to(&name("alice"), 1));
        assert_eq!(next.leaf_of(&name("bob"), 2), Some(2));
        assert!(store.put_group(next.clone()).await.unwrap());
        assert_eq!(store.groups_of(&name("alice")).await.unwrap().len(), 1);
        next.members.remove(0);
        next.pending_leaves.clear();
        assert!(store.put_group(next.clone()).await.unwrap());
        assert!(store.groups_of(&name("alice")).await.unwrap().is_empty());

        // Durable across a reopen; deleted with its last user.
        drop(store);
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(
            store.group(&name("friends")).await.unwrap(),
            Some(next.clone())
        );
        next.members.clear();
        assert!(store.put_group(next.clone()).await.unwrap());
        assert_eq!(store.group(&name("friends")).await.unwrap(), None);
        assert!(store.groups_of(&name("bob")).await.unwrap().is_empty());
        assert!(!store.put_group(next).await.unwrap());
        let reused = group("friends", 1, &[("carol", 1)]);
        assert_eq!(
            store.create_group(reused).await.unwrap(),
            GroupCreated::Created
        );
    }
}
