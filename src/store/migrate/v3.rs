//! The migration from store format 2 to format 3 (devices).
//!
//! Format 3 gives every account devices (`devices`, see `store::devices`) and keeps keys per
//! device (see `fjall_keys`). Every account of format 2 becomes one device, device 1, whose
//! inbox is the account's own: no inbox entry, send record or seq counter moves (a send record
//! of format 2 reads as one copy to device 1, a stored message and a session without a device
//! as device 1's). The migration, each step in synced chunks that are idempotent, so a crash
//! loses nothing and the next start goes on:
//! 1. every account without a device record gets device 1 ("first device", added when the
//!    account was created, never seen) and its next device id, 2;
//! 2. every `keys` record of format 2 (username → identity and prekeys) is split into the
//!    account's identity (`identities`) and device 1's prekeys (username 0x00 device 1), and
//!    deleted;
//! 3. every one-time prekey of format 2 (username 0x00 id) moves to device 1 (username 0x00
//!    device 1 ‖ id).
//!
//! Old and new keys share `keys` and `prekeys`: a username holds no 0x00, so a `keys` key
//! without one is of format 2, and a `prekeys` key is of format 2 if 4 bytes follow the 0x00
//! (8 in format 3).

use fjall::PersistMode;
use serde::Deserialize;

use super::{CHUNK, Keyspaces, chunk_after, name_in};
use crate::protocol::keys::{IdentityKeyBytes, SignedPrekey};
use crate::store::devices::{NEXT_KEY, StoredDevice, device_key, encode_device};
use crate::store::fjall_keys::device_keys_key;
use crate::store::{DeviceKeys, FIRST_DEVICE_NAME, StoreError, UserRecord};

/// A `keys` record of format 2.
#[derive(Deserialize)]
struct KeysV2 {
    identity_key: IdentityKeyBytes,
    signed_prekey: SignedPrekey,
    last_resort: SignedPrekey,
}

/// What the migration to format 3 did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Migrated {
    pub devices_added: u64,
    pub keys_moved: u64,
    pub prekeys_moved: u64,
}

/// Brings a store of format 2 to format 3 (the caller writes the format).
pub(super) fn run(ks: &Keyspaces<'_>) -> Result<Migrated, StoreError> {
    let migrated = Migrated {
        devices_added: add_first_devices(ks)?,
        keys_moved: move_keys(ks)?,
        prekeys_moved: move_prekeys(ks)?,
    };
    // A new, empty store passes through here too: it has nothing to say.
    if migrated != Migrated::default() {
        tracing::info!(
            devices_added = migrated.devices_added,
            keys_moved = migrated.keys_moved,
            prekeys_moved = migrated.prekeys_moved,
            "store migrated to format 3 (devices: every account's keys and inbox are its device 1's)"
        );
    }
    Ok(migrated)
}

fn chunk_done(step: &'static str, count: u64) {
    tracing::debug!(step, count, "store migration: chunk committed");
}

/// Step 1: device 1 for every account without devices.
fn add_first_devices(ks: &Keyspaces<'_>) -> Result<u64, StoreError> {
    let mut added = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut batch = ks.db.batch().durability(Some(PersistMode::SyncData));
        let (mut seen, mut count) = (0usize, 0u64);
        for entry in chunk_after(ks.users, after.as_deref()).take(CHUNK) {
            let (key, value) = entry.into_inner()?;
            seen += 1;
            after = Some(key.to_vec());
            let name = name_in("users", &key)?;
            let Some(id) = ks.ids.stored(&name)? else {
                // Format 2 gave every account an id.
                return Err(StoreError::Corrupt {
                    keyspace: "user_ids",
                    reason: format!("the account {name} has no id"),
                });
            };
            if ks.devices.contains_key(device_key(id, NEXT_KEY))? {
                continue;
            }
            let user: UserRecord =
                rmp_serde::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    keyspace: "users",
                    reason: e.to_string(),
                })?;
            let first = StoredDevice {
                inbox_id: id,
                name: FIRST_DEVICE_NAME.into(),
                added_at: user.created_at,
                last_seen: 0,
            };
            batch.insert(ks.devices, device_key(id, 1), encode_device(&first)?);
            batch.insert(ks.devices, device_key(id, NEXT_KEY), 2u32.to_be_bytes());
            count += 1;
        }
        if seen == 0 {
            return Ok(added);
        }
        if count > 0 {
            batch.commit()?;
            added += count;
            chunk_done("devices", count);
        }
    }
}

/// Step 2: `keys` records of format 2 into identities and device 1's keys.
fn move_keys(ks: &Keyspaces<'_>) -> Result<u64, StoreError> {
    let mut moved = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut batch = ks.db.batch().durability(Some(PersistMode::SyncData));
        let (mut seen, mut count) = (0usize, 0u64);
        for entry in chunk_after(ks.keys, after.as_deref()).take(CHUNK) {
            let (key, value) = entry.into_inner()?;
            seen += 1;
            after = Some(key.to_vec());
            if key.contains(&0) {
                continue;
            }
            let name = name_in("keys", &key)?;
            let old: KeysV2 = rmp_serde::from_slice(&value).map_err(|e| StoreError::Corrupt {
                keyspace: "keys",
                reason: e.to_string(),
            })?;
            let device = DeviceKeys {
                signed_prekey: old.signed_prekey,
                last_resort: old.last_resort,
            };
            batch.insert(ks.identities, key.to_vec(), old.identity_key.0.to_vec());
            batch.insert(
                ks.keys,
                device_keys_key(&name, 1),
                rmp_serde::to_vec_named(&device)?,
            );
            batch.remove(ks.keys, key.to_vec());
            count += 1;
        }
        if seen == 0 {
            return Ok(moved);
        }
        if count > 0 {
            batch.commit()?;
            moved += count;
            chunk_done("keys", count);
        }
    }
}

/// Step 3: one-time prekeys of format 2 to device 1.
fn move_prekeys(ks: &Keyspaces<'_>) -> Result<u64, StoreError> {
    let mut moved = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut batch = ks.db.batch().durability(Some(PersistMode::SyncData));
        let (mut seen, mut count) = (0usize, 0u64);
        for entry in chunk_after(ks.prekeys, after.as_deref()).take(CHUNK) {
            let (key, value) = entry.into_inner()?;
            seen += 1;
            after = Some(key.to_vec());
            let corrupt = || StoreError::Corrupt {
                keyspace: "prekeys",
                reason: "a key is not a user name, 0x00 and 4 or 8 bytes".into(),
            };
            let zero = key.iter().position(|b| *b == 0).ok_or_else(corrupt)?;
            let (owner, rest) = (&key[..zero], &key[zero + 1..]);
            match rest.len() {
                8 => continue,
                4 => {}
                _ => return Err(corrupt()),
            }
            let name = name_in("prekeys", owner)?;
            let mut new_key = device_keys_key(&name, 1);
            new_key.extend_from_slice(rest);
            batch.insert(ks.prekeys, new_key, value.to_vec());
            batch.remove(ks.prekeys, key.to_vec());
            count += 1;
        }
        if seen == 0 {
            return Ok(moved);
        }
        if count > 0 {
            batch.commit()?;
            moved += count;
            chunk_done("prekeys", count);
        }
    }
}
