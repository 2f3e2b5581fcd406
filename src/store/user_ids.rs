//! Per-user numeric ids, so the hot keyspaces (`inbox`, `sent`) begin with 4 bytes instead of
//! a name.
//!
//! fjall's memtable compares keys on every insert and lookup, and keeps the first 20 bytes of
//! a key inline with its first 4 compared before anything else. Keys that began with a user
//! name were longer than that and shared their first bytes with their neighbours, so every
//! comparison followed a pointer and compared the whole name. An id ‖ seq key is 12 bytes and
//! an id ‖ message-id key 20: both inline, and they differ in their first 4 bytes.
//!
//! An id is given to an account when it is created, in the same synced write as the account,
//! and never changes or goes to anyone else. Keyspaces: `user_ids` (name → id, u32 BE) and
//! `user_names` (id → name: the highest account id in use is its last key).
//!
//! The inboxes of devices other than device 1 take their ids from the same counter (device
//! 1's inbox id is its account's id), so an inbox id is never an account's id nor another
//! inbox's. They have no `user_names` entry: the counter is also written to `meta`
//! ([`NEXT_ID_KEY`]) in the batch that uses an inbox id, and an open continues from the
//! greater of the two, so an id is not given again after a restart, also once its device is
//! removed. An id given in a batch that is never committed may be given again after a
//! restart: nothing durable uses it.

use std::collections::HashMap;
use std::sync::Mutex;

use fjall::{Keyspace, OwnedWriteBatch};

use super::StoreError;
use crate::protocol::Username;

/// A user's id in the store's keys.
pub(super) type UserId = u32;

/// Ids remembered in memory at most (past the cap lookups go to disk). A deleted account's id
/// is forgotten ([`UserIds::forget`]) and never given to anyone else.
const CACHE: usize = 1_000_000;

type Cache = HashMap<Username, UserId, foldhash::fast::RandomState>;

/// Key in `meta` of the counter as of the last inbox id given (u32 BE).
pub(super) const NEXT_ID_KEY: &[u8] = b"next-inbox-id";

pub(super) struct UserIds {
    ids: Keyspace,
    names: Keyspace,
    meta: Keyspace,
    cache: Mutex<Cache>,
    /// The next id to give out.
    next: Mutex<UserId>,
}

impl UserIds {
    pub fn open(ids: Keyspace, names: Keyspace, meta: Keyspace) -> Result<Self, StoreError> {
        let after_accounts = match names.last_key_value() {
            None => 1,
            Some(entry) => decode_id("user_names", &entry.key()?)?
                .checked_add(1)
                .ok_or_else(exhausted)?,
        };
        let after_inboxes = match meta.get(NEXT_ID_KEY)? {
            None => 1,
            Some(bytes) => decode_id("meta", &bytes)?,
        };
        let next = after_accounts.max(after_inboxes);
        Ok(Self {
            ids,
            names,
            meta,
            cache: Mutex::new(Cache::default()),
            next: Mutex::new(next),
        })
    }

    /// The id of `name` if it is in memory.
    pub fn cached(&self, name: &Username) -> Result<Option<UserId>, StoreError> {
        Ok(self
            .cache
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .get(name)
            .copied())
    }

    /// The id of `name` in the store (blocking), not remembered; `None` if it has none.
    pub fn stored(&self, name: &Username) -> Result<Option<UserId>, StoreError> {
        match self.ids.get(name.as_str().as_bytes())? {
            Some(bytes) => decode_id("user_ids", &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Gives `name` the next id, written in `batch`: the caller commits it (synced) and then
    /// calls [`Self::remember`]. The id is used up even if the commit fails.
    pub fn assign(
        &self,
        batch: &mut OwnedWriteBatch,
        name: &Username,
    ) -> Result<UserId, StoreError> {
        let mut next = self.next.lock().map_err(|_| StoreError::Poisoned)?;
        let id = *next;
        *next = id.checked_add(1).ok_or_else(exhausted)?;
        batch.insert(&self.ids, name.as_str().as_bytes(), id.to_be_bytes());
        batch.insert(&self.names, id.to_be_bytes(), name.as_str().as_bytes());
        Ok(id)
    }

    /// Gives the next id to a new device's inbox, written (as the counter) in `batch`, which
    /// the caller commits. The id is used up even if the commit fails.
    pub fn assign_inbox(&self, batch: &mut OwnedWriteBatch) -> Result<u32, StoreError> {
        let mut next = self.next.lock().map_err(|_| StoreError::Poisoned)?;
        let id = *next;
        *next = id.checked_add(1).ok_or_else(exhausted)?;
        batch.insert(&self.meta, NEXT_ID_KEY, next.to_be_bytes());
        Ok(id)
    }

    /// Keeps the id of `name` in memory. Only accounts' ids are remembered: the store answers
    /// "does this account exist" from memory with them.
    pub fn remember(&self, name: &Username, id: UserId) -> Result<(), StoreError> {
        let mut cache = self.cache.lock().map_err(|_| StoreError::Poisoned)?;
        if cache.len() < CACHE {
            cache.insert(name.clone(), id);
        }
        Ok(())
    }
}

impl UserIds {
    /// Takes `name`'s id away in `batch` (its account is being deleted): the name no longer
    /// has an id, while `user_names` keeps the id, so it is never given out again. The caller
    /// commits the batch and then calls [`Self::forget_cached`].
    pub fn forget(&self, batch: &mut OwnedWriteBatch, name: &Username) {
        batch.remove(&self.ids, name.as_str().as_bytes());
    }

    /// Drops `name` from memory.
    pub fn forget_cached(&self, name: &Username) -> Result<(), StoreError> {
        self.cache
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .remove(name);
        Ok(())
    }
}

fn exhausted() -> StoreError {
    StoreError::Limit("no user ids are left".into())
}

pub(super) fn decode_id(keyspace: &'static str, bytes: &[u8]) -> Result<UserId, StoreError> {
    let bytes: [u8; 4] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        keyspace,
        reason: format!("a user id has {} bytes, not 4", bytes.len()),
    })?;
    Ok(UserId::from_be_bytes(bytes))
}

/// `inbox` key: recipient id ‖ seq (u64 BE).
pub(super) fn inbox_key(user: UserId, seq: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&user.to_be_bytes());
    key[4..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// `sent` key: sender id ‖ message id (16 bytes).
/// The seq of an `inbox` key (id ‖ seq); 0 for a key too short to hold one.
pub(super) fn inbox_seq(key: &[u8]) -> u64 {
    key.get(4..12)
        .and_then(|seq| seq.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

pub(super) fn sent_key(sender: UserId, id: &[u8; 16]) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..4].copy_from_slice(&sender.to_be_bytes());
    key[4..].copy_from_slice(id);
    key
}
