//! Store formats and the migrations between them, run when a store is opened, before anything
//! is served.
//!
//! [`FORMAT_KEY`] in `meta` holds the format (u32 BE); a store without it is of format 1 (or
//! new). Format 1 → 2 (`v2`): per-user ids in the inbox and send-record keys. Format 2 → 3
//! (`v3`): devices. Format 3 → 4: bodies shared by several inbox entries (`shared_bodies`);
//! nothing moves (a store of format 3 has no shared body, and its entries read unchanged),
//! the new format only keeps older servers, which cannot read an entry without its body nor
//! release a shared one, from opening a store that may hold them. A store of format 1 goes
//! through all. Each migration moves records in
//! chunks, each chunk one synced batch that writes the new records and deletes the old ones,
//! so a crash at any point loses nothing and the next start goes on where this one stopped;
//! the format is written (synced) only once everything moved. An older server cannot read a
//! store of a newer format, and this one refuses a format it does not know.
//!
//! Independently of the format, every open deletes the `contacts` keyspace that earlier
//! servers wrote (viewer 0x00 subject for every first message): a durable who-wrote-to-whom
//! graph that presence no longer needs (it is decided from memory: `server::router`). An older
//! server opening the store afterwards recreates it empty, which only hides presence it had
//! granted.

mod v2;
mod v3;

use std::ops::Bound;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::StoreError;
use super::user_ids::UserIds;
use crate::protocol::Username;

/// Key in `meta` of the store's format (u32 BE).
const FORMAT_KEY: &[u8] = b"store-format";
/// The format this code writes.
pub(super) const FORMAT: u32 = 4;
/// Records moved per synced batch.
const CHUNK: usize = 4096;

/// The keyspace of the contact graph earlier servers kept (deleted at every open).
const OLD_CONTACTS: &str = "contacts";

/// The keyspaces a migration reads and writes.
pub(super) struct Keyspaces<'a> {
    pub db: &'a Database,
    pub users: &'a Keyspace,
    pub meta: &'a Keyspace,
    pub ids: &'a UserIds,
    pub inbox: &'a Keyspace,
    pub sent: &'a Keyspace,
    pub devices: &'a Keyspace,
    pub identities: &'a Keyspace,
    pub keys: &'a Keyspace,
    pub prekeys: &'a Keyspace,
}

/// Brings the store to [`FORMAT`] (a no-op on a store already there); blocking, before
/// serving. Returns the format it found.
pub(super) fn run(ks: &Keyspaces<'_>) -> Result<u32, StoreError> {
    drop_contacts(ks.db)?;
    let found = match ks.meta.get(FORMAT_KEY)? {
        None => 1,
        Some(value) => <[u8; 4]>::try_from(value.as_ref())
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::Corrupt {
                keyspace: "meta",
                reason: format!("the store format has {} bytes, not 4", value.len()),
            })?,
    };
    if found == FORMAT {
        return Ok(found);
    }
    if !(1..FORMAT).contains(&found) {
        return Err(StoreError::Corrupt {
            keyspace: "meta",
            reason: format!("store format {found} is unknown to this server (it knows {FORMAT})"),
        });
    }
    if found < 2 {
        v2::run(ks.db, ks.users, ks.ids, ks.inbox, ks.sent)?;
        write_format(ks, 2)?;
    }
    if found < 3 {
        v3::run(ks)?;
    }
    // Format 4 (shared bodies) moves nothing: see the module doc.
    write_format(ks, FORMAT)?;
    Ok(found)
}

fn write_format(ks: &Keyspaces<'_>, format: u32) -> Result<(), StoreError> {
    ks.meta.insert(FORMAT_KEY, format.to_be_bytes())?;
    ks.db.persist(PersistMode::SyncData)?;
    Ok(())
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
pub(super) fn chunk_after(keyspace: &Keyspace, after: Option<&[u8]>) -> fjall::Iter {
    match after {
        None => keyspace.iter(),
        Some(key) => keyspace.range::<&[u8], _>((Bound::Excluded(key), Bound::Unbounded)),
    }
}

pub(super) fn name_in(keyspace: &'static str, bytes: &[u8]) -> Result<Username, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| Username::parse(s).ok())
        .filter(|name| name.as_str().as_bytes() == bytes)
        .ok_or_else(|| StoreError::Corrupt {
            keyspace,
            reason: "a key holds an invalid user name".into(),
        })
}
