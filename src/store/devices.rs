//! Accounts' devices in fjall: the `devices` keyspace and what the store keeps of it in memory.
//!
//! Layout: user id(u32 BE) ‖ device id(u32 BE) → [`StoredDevice`] (named MessagePack), and
//! user id ‖ [`NEXT_KEY`] → the next device id of the account (u32 BE), so a removed
//! device's id is never given again. Device 1's inbox id is its account's user id (an account
//! from before devices keeps its inbox where it was); every other device gets a fresh inbox id
//! from the allocator of user ids (`user_ids`), never given again either.
//!
//! Every append resolves each copy's (user, device) to an inbox id: from memory
//! ([`DeviceCache`]) once the account's devices were read. Changes and cache loads hold
//! [`Devices::lock`], and a change updates the cache only after its batch is committed, so
//! the cache never shows a device the store does not have (nor misses one it has, except
//! during that change).

use std::collections::HashMap;
use std::sync::Mutex;

use fjall::{Keyspace, OwnedWriteBatch};
use serde::{Deserialize, Serialize};

use super::user_ids::UserId;
use super::{DeviceId, DeviceRecord, StoreError};

/// The device-id half of the key holding an account's next device id.
pub(super) const NEXT_KEY: DeviceId = u32::MAX;

/// Accounts whose devices are kept in memory at most (past it they are read per use).
const CACHE: usize = 1_000_000;

/// The id of a device's inbox: the first 4 bytes of its `inbox` keys.
pub(super) type InboxId = u32;

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredDevice {
    pub inbox_id: InboxId,
    pub name: String,
    pub added_at: u64,
    pub last_seen: u64,
}

/// `devices` key of `device` of account `user`.
pub(super) fn device_key(user: UserId, device: DeviceId) -> [u8; 8] {
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&user.to_be_bytes());
    key[4..].copy_from_slice(&device.to_be_bytes());
    key
}

fn corrupt(reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        keyspace: "devices",
        reason: reason.into(),
    }
}

pub(super) fn decode_device(bytes: &[u8]) -> Result<StoredDevice, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| corrupt(e.to_string()))
}

pub(super) fn encode_device(device: &StoredDevice) -> Result<Vec<u8>, StoreError> {
    Ok(rmp_serde::to_vec_named(device)?)
}

/// What an account's devices are, as read from the store.
#[derive(Debug, Clone, Default)]
pub(super) struct AccountDevices {
    /// Current devices, ascending by id.
    pub devices: Vec<(DeviceId, StoredDevice)>,
    /// The next device id to give (1 if the account has never had one written).
    pub next: DeviceId,
}

impl AccountDevices {
    pub fn get(&self, device: DeviceId) -> Option<&StoredDevice> {
        self.devices
            .iter()
            .find_map(|(id, d)| (*id == device).then_some(d))
    }

    pub fn records(&self) -> Vec<DeviceRecord> {
        self.devices
            .iter()
            .map(|(id, d)| DeviceRecord {
                id: *id,
                name: d.name.clone(),
                added_at: d.added_at,
                last_seen: d.last_seen,
            })
            .collect()
    }

    fn inboxes(&self) -> Vec<(DeviceId, InboxId)> {
        self.devices
            .iter()
            .map(|(id, d)| (*id, d.inbox_id))
            .collect()
    }
}

type Cache = HashMap<UserId, Vec<(DeviceId, InboxId)>, foldhash::fast::RandomState>;

/// The `devices` keyspace, with the inboxes of the accounts used lately in memory.
pub(super) struct Devices {
    pub keyspace: Keyspace,
    /// Held by every change of a record and every cache load (see the module doc).
    pub lock: Mutex<()>,
    cache: Mutex<Cache>,
}

impl Devices {
    pub fn new(keyspace: Keyspace) -> Self {
        Self {
            keyspace,
            lock: Mutex::new(()),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Reads account `user`'s devices from the store.
    pub fn read(&self, user: UserId) -> Result<AccountDevices, StoreError> {
        let mut account = AccountDevices {
            devices: Vec::new(),
            next: 1,
        };
        for entry in self.keyspace.prefix(user.to_be_bytes()) {
            let (key, value) = entry.into_inner()?;
            let device = key
                .get(4..8)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| corrupt("a key is not 8 bytes"))?;
            if device == NEXT_KEY {
                let next = <[u8; 4]>::try_from(value.as_ref())
                    .map_err(|_| corrupt("a next device id is not 4 bytes"))?;
                account.next = u32::from_be_bytes(next);
            } else {
                account.devices.push((device, decode_device(&value)?));
            }
        }
        Ok(account)
    }

    /// The inbox of `user`'s `device` if the account's devices are in memory: `Some(None)`
    /// if it is not a current device, `None` if they are not in memory.
    pub fn cached_inbox(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<Option<InboxId>>, StoreError> {
        let cache = self.cache.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(cache.get(&user).map(|devices| {
            devices
                .iter()
                .find_map(|(id, inbox)| (*id == device).then_some(*inbox))
        }))
    }

    /// The inbox of `user`'s `device` from the store (blocking), remembering the account's
    /// devices; `None` if it is not a current device.
    pub fn load_inbox(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<InboxId>, StoreError> {
        let _guard = self.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let mut account = self.read(user)?;
        if account.devices.is_empty() && account.next == 1 {
            // Never had a device written: a name that holds messages without an account
            // (`migrate::v2` kept them, under an id of their own), read as device 1's.
            account.devices.push((
                1,
                StoredDevice {
                    inbox_id: user,
                    name: String::new(),
                    added_at: 0,
                    last_seen: 0,
                },
            ));
        }
        let inbox = account.get(device).map(|d| d.inbox_id);
        self.remember(user, &account)?;
        Ok(inbox)
    }

    /// Puts `account` in memory as `user`'s devices (the caller holds [`Self::lock`] and has
    /// committed what `account` describes).
    pub fn remember(&self, user: UserId, account: &AccountDevices) -> Result<(), StoreError> {
        let mut cache = self.cache.lock().map_err(|_| StoreError::Poisoned)?;
        if cache.len() < CACHE || cache.contains_key(&user) {
            cache.insert(user, account.inboxes());
        }
        Ok(())
    }

    /// Drops `user`'s devices from memory (the account is gone).
    pub fn forget(&self, user: UserId) -> Result<(), StoreError> {
        self.cache
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .remove(&user);
        Ok(())
    }

    /// Writes `device` of `user` into `batch`.
    pub fn put_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: UserId,
        id: DeviceId,
        device: &StoredDevice,
    ) -> Result<(), StoreError> {
        batch.insert(&self.keyspace, device_key(user, id), encode_device(device)?);
        Ok(())
    }

    /// Writes `user`'s next device id into `batch`.
    pub fn put_next_into(&self, batch: &mut OwnedWriteBatch, user: UserId, next: DeviceId) {
        batch.insert(
            &self.keyspace,
            device_key(user, NEXT_KEY),
            next.to_be_bytes(),
        );
    }

    /// Removes every key of `user` (devices and next id) in `batch`.
    pub fn remove_account_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: UserId,
    ) -> Result<(), StoreError> {
        for entry in self.keyspace.prefix(user.to_be_bytes()) {
            batch.remove(&self.keyspace, entry.key()?.to_vec());
        }
        Ok(())
    }
}
