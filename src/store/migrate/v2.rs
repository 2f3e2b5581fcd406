//! The migration from store format 1 to format 2.
//!
//! Format 1 keyed `inbox` by recipient name 0x00 seq and `sent` by sender name 0x00 message
//! id. Format 2 keeps the same values in `inbox_v2` (recipient id ‖ seq) and `sent_v2` (sender
//! id ‖ message id), and every account has an id (see `user_ids`). The migration:
//! 1. every account without an id gets one;
//! 2. the records of `inbox`, then of `sent`, move to the new keyspaces in chunks, each chunk
//!    one synced batch that writes the new records and deletes the old ones, so a crash at
//!    any point loses nothing and the next start goes on where this one stopped;
//! 3. the emptied old keyspaces are deleted (the caller then writes the format, synced).
//!
//! A name in an old record without an account (not something this server writes) gets an id
//! too, so its records are kept.

use std::collections::HashMap;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{CHUNK, chunk_after, name_in};
use crate::protocol::Username;
use crate::store::StoreError;
use crate::store::user_ids::{UserId, UserIds};

/// The format-1 keyspaces, with the length of what follows the name and 0x00 in their keys.
const OLD_INBOX: (&str, usize) = ("inbox", 8);
const OLD_SENT: (&str, usize) = ("sent", 16);

/// What the migration to format 2 did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Migrated {
    pub ids_given: u64,
    pub inbox_moved: u64,
    pub sent_moved: u64,
}

/// Brings a store of format 1 to format 2 (the caller writes the format).
pub(super) fn run(
    db: &Database,
    users: &Keyspace,
    ids: &UserIds,
    inbox: &Keyspace,
    sent: &Keyspace,
) -> Result<Migrated, StoreError> {
    let migrated = Migrated {
        ids_given: give_ids(db, users, ids)?,
        inbox_moved: move_records(db, ids, OLD_INBOX, inbox)?,
        sent_moved: move_records(db, ids, OLD_SENT, sent)?,
    };
    if migrated != Migrated::default() {
        tracing::info!(
            ids_given = migrated.ids_given,
            inbox_moved = migrated.inbox_moved,
            sent_moved = migrated.sent_moved,
            "store migrated to format 2 (per-user ids in inbox and sent keys)"
        );
    }
    Ok(migrated)
}

/// Gives an id to every account without one; returns how many.
fn give_ids(db: &Database, users: &Keyspace, ids: &UserIds) -> Result<u64, StoreError> {
    let mut given = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut batch = db.batch().durability(Some(PersistMode::SyncData));
        let mut new = Vec::new();
        let mut last = None;
        for entry in chunk_after(users, after.as_deref()).take(CHUNK) {
            let key = entry.key()?;
            let name = name_in("users", &key)?;
            if ids.stored(&name)?.is_none() {
                new.push((ids.assign(&mut batch, &name)?, name));
            }
            last = Some(key.to_vec());
        }
        let Some(last) = last else {
            return Ok(given);
        };
        if !new.is_empty() {
            batch.commit()?;
            given += new.len() as u64;
            for (id, name) in new {
                ids.remember(&name, id)?;
            }
        }
        after = Some(last);
    }
}

/// Moves the records of an old keyspace to `to` under id-based keys, then deletes it; returns
/// how many moved.
fn move_records(
    db: &Database,
    ids: &UserIds,
    (name, suffix): (&'static str, usize),
    to: &Keyspace,
) -> Result<u64, StoreError> {
    if !db.keyspace_exists(name) {
        return Ok(0);
    }
    let from = db.keyspace(name, KeyspaceCreateOptions::default)?;
    let mut moved = 0;
    let mut after: Option<Vec<u8>> = None;
    // Ids given in this chunk (not in the store until it is committed), per name.
    let mut new_ids: HashMap<Username, UserId> = HashMap::new();
    loop {
        new_ids.clear();
        let mut batch = db.batch().durability(Some(PersistMode::SyncData));
        let mut count = 0u64;
        for entry in chunk_after(&from, after.as_deref()).take(CHUNK) {
            let (key, value) = entry.into_inner()?;
            let corrupt = || StoreError::Corrupt {
                keyspace: name,
                reason: "a key is not a user name, 0x00 and its suffix".into(),
            };
            let zero = key.iter().position(|b| *b == 0).ok_or_else(corrupt)?;
            let (owner, rest) = (&key[..zero], &key[zero + 1..]);
            if rest.len() != suffix {
                return Err(corrupt());
            }
            let owner = name_in(name, owner)?;
            let id: UserId = match new_ids.get(&owner) {
                Some(id) => *id,
                None => match ids.stored(&owner)? {
                    Some(id) => id,
                    None => {
                        // Not an account (see the module documentation): given an id, but
                        // not remembered as an account.
                        let id = ids.assign(&mut batch, &owner)?;
                        new_ids.insert(owner.clone(), id);
                        id
                    }
                },
            };
            let mut new_key = Vec::with_capacity(4 + suffix);
            new_key.extend_from_slice(&id.to_be_bytes());
            new_key.extend_from_slice(rest);
            batch.insert(to, new_key, value);
            batch.remove(&from, key.clone());
            after = Some(key.to_vec());
            count += 1;
        }
        if count == 0 {
            break;
        }
        batch.commit()?;
        moved += count;
    }
    db.delete_keyspace(from)?;
    Ok(moved)
}
