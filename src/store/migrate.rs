//! Store format 2 and the migration to it from format 1.
//!
//! Format 1 keyed `inbox` by recipient name 0x00 seq and `sent` by sender name 0x00 message
//! id. Format 2 keeps the same values in `inbox_v2` (recipient id ‖ seq) and `sent_v2` (sender
//! id ‖ message id), and every account has an id (see `user_ids`). [`FORMAT_KEY`] in `meta`
//! says a store is in format 2; without it, opening the store migrates it before anything is
//! served:
//! 1. every account without an id gets one;
//! 2. the records of `inbox`, then of `sent`, move to the new keyspaces in chunks, each chunk
//!    one synced batch that writes the new records and deletes the old ones, so a crash at
//!    any point loses nothing and the next start goes on where this one stopped;
//! 3. the emptied old keyspaces are deleted and the format is written (synced).
//!
//! A name in an old record without an account (not something this server writes) gets an id
//! too, so its records are kept. An older server cannot read a store in format 2.
//!
//! Independently of the format, every open deletes the `contacts` keyspace that earlier
//! servers wrote (viewer 0x00 subject for every first message): a durable who-wrote-to-whom
//! graph that presence no longer needs (it is decided from memory: `server::router`). An older
//! server opening the store afterwards recreates it empty, which only hides presence it had
//! granted.

use std::collections::HashMap;
use std::ops::Bound;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::StoreError;
use super::user_ids::{UserId, UserIds};
use crate::protocol::Username;

/// Key in `meta` of the store's format (u32 BE).
const FORMAT_KEY: &[u8] = b"store-format";
/// The format this code writes.
const FORMAT: u32 = 2;
/// Records moved per synced batch.
const CHUNK: usize = 4096;

/// The keyspace of the contact graph earlier servers kept (deleted at every open).
const OLD_CONTACTS: &str = "contacts";

/// The format-1 keyspaces, with the length of what follows the name and 0x00 in their keys.
const OLD_INBOX: (&str, usize) = ("inbox", 8);
const OLD_SENT: (&str, usize) = ("sent", 16);

/// What a migration did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Migrated {
    pub ids_given: u64,
    pub inbox_moved: u64,
    pub sent_moved: u64,
}

/// Brings the store to format 2 (a no-op on a store already there); blocking, before serving.
pub(super) fn run(
    db: &Database,
    users: &Keyspace,
    meta: &Keyspace,
    ids: &UserIds,
    inbox: &Keyspace,
    sent: &Keyspace,
) -> Result<Migrated, StoreError> {
    drop_contacts(db)?;
    if let Some(value) = meta.get(FORMAT_KEY)? {
        let format = <[u8; 4]>::try_from(value.as_ref())
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::Corrupt {
                keyspace: "meta",
                reason: format!("the store format has {} bytes, not 4", value.len()),
            })?;
        if format == FORMAT {
            return Ok(Migrated::default());
        }
        return Err(StoreError::Corrupt {
            keyspace: "meta",
            reason: format!("store format {format} is unknown to this server (it knows {FORMAT})"),
        });
    }
    let migrated = Migrated {
        ids_given: give_ids(db, users, ids)?,
        inbox_moved: move_records(db, ids, OLD_INBOX, inbox)?,
        sent_moved: move_records(db, ids, OLD_SENT, sent)?,
    };
    meta.insert(FORMAT_KEY, FORMAT.to_be_bytes())?;
    db.persist(PersistMode::SyncData)?;
    if migrated != Migrated::default() {
        tracing::info!(
            ids_given = migrated.ids_given,
            inbox_moved = migrated.inbox_moved,
            sent_moved = migrated.sent_moved,
            "store migrated to format {FORMAT} (per-user ids in inbox and sent keys)"
        );
    }
    Ok(migrated)
}

/// Deletes the old contact graph, if there is one; returns whether there was.
fn drop_contacts(db: &Database) -> Result<bool, StoreError> {
    if !db.keyspace_exists(OLD_CONTACTS) {
        return Ok(false);
    }
    let contacts = db.keyspace(OLD_CONTACTS, KeyspaceCreateOptions::default)?;
    db.delete_keyspace(contacts)?;
    db.persist(PersistMode::SyncData)?;
    tracing::info!("deleted the stored contact graph (`contacts`): presence no longer needs it");
    Ok(true)
}

/// The entries of `keyspace` after `after` (all if `None`), at most one chunk.
fn chunk_after(keyspace: &Keyspace, after: Option<&[u8]>) -> fjall::Iter {
    match after {
        None => keyspace.iter(),
        Some(key) => keyspace.range::<&[u8], _>((Bound::Excluded(key), Bound::Unbounded)),
    }
}

fn name_in(keyspace: &'static str, bytes: &[u8]) -> Result<Username, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| Username::parse(s).ok())
        .filter(|name| name.as_str().as_bytes() == bytes)
        .ok_or_else(|| StoreError::Corrupt {
            keyspace,
            reason: "a key holds an invalid user name".into(),
        })
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
