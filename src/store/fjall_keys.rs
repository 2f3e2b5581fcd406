//! The key directory in fjall: `identities` (username → Ed25519 identity key, 32 bytes), `keys`
//! (username 0x00 device(u32 BE) → [`DeviceKeys`]) and `prekeys` (username 0x00 device(u32 BE)
//! id(u32 BE) → X25519 public key). Changes run under one mutex and are synced before they
//! return, so a one-time prekey is handed out at most once, even across a crash. (Stores of
//! format 2 kept `keys` per user with the identity in it and `prekeys` without the device:
//! `migrate::v3` moves them to device 1.)

use std::sync::Mutex;

use fjall::{Keyspace, OwnedWriteBatch};

use super::inbox_writer::pair_key;
use super::{DeviceId, DeviceKeys, StoreError, TakenDeviceBundle};
use crate::protocol::Username;
use crate::protocol::keys::{Bin, IdentityKeyBytes, OneTimePrekey};

/// One-time prekeys a device may have stored at once.
pub const MAX_ONE_TIME_PREKEYS: usize = 500;

pub(super) struct KeyDirectory {
    pub identities: Keyspace,
    pub keys: Keyspace,
    pub prekeys: Keyspace,
    /// Held by every change of keys (and of devices, which removes keys) until it is
    /// committed.
    pub lock: Mutex<()>,
}

fn corrupt(keyspace: &'static str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        keyspace,
        reason: reason.into(),
    }
}

/// `keys` key of `user`'s `device`; also the prefix of its `prekeys` keys.
pub(super) fn device_keys_key(user: &Username, device: DeviceId) -> Vec<u8> {
    pair_key(user, &device.to_be_bytes())
}

/// `prekeys` key of one-time prekey `id` of `user`'s `device`.
pub(super) fn prekey_key(user: &Username, device: DeviceId, id: u32) -> Vec<u8> {
    let mut key = device_keys_key(user, device);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// A 32-byte key as stored.
pub(super) fn key_bytes(keyspace: &'static str, bytes: &[u8]) -> Result<Bin<32>, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Bin)
        .map_err(|_| corrupt(keyspace, "a key is not 32 bytes"))
}

/// What [`KeyDirectory::put_into`] wrote.
pub(super) struct PutKeys {
    /// The device's one-time prekeys after the batch.
    pub count: u32,
}

impl KeyDirectory {
    pub fn identity(&self, user: &Username) -> Result<Option<IdentityKeyBytes>, StoreError> {
        self.identities
            .get(user.as_str().as_bytes())?
            .map(|bytes| key_bytes("identities", &bytes))
            .transpose()
    }

    pub fn device_keys(
        &self,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<DeviceKeys>, StoreError> {
        match self.keys.get(device_keys_key(user, device))? {
            Some(bytes) => rmp_serde::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt("keys", e.to_string())),
            None => Ok(None),
        }
    }

    fn count(&self, user: &Username, device: DeviceId) -> usize {
        self.prekeys.prefix(device_keys_key(user, device)).count()
    }

    /// Puts `device`'s keys and one-time prekeys in `batch` (with `fresh`, its stored
    /// one-time prekeys go: a new identity made them useless). The caller holds [`Self::lock`]
    /// until the batch is committed.
    pub fn put_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
        device: DeviceId,
        keys: Option<&DeviceKeys>,
        one_time: &[OneTimePrekey],
        fresh: bool,
    ) -> Result<PutKeys, StoreError> {
        let existing = if fresh {
            // Not those put again below: a key removed and inserted in one batch is ambiguous.
            let kept: Vec<Vec<u8>> = one_time
                .iter()
                .map(|p| prekey_key(user, device, p.id))
                .collect();
            for entry in self.prekeys.prefix(device_keys_key(user, device)) {
                let key = entry.key()?;
                if !kept.iter().any(|k| k.as_slice() == key.as_ref()) {
                    batch.remove(&self.prekeys, key.to_vec());
                }
            }
            0
        } else {
            self.count(user, device)
        };
        let mut added = 0;
        for prekey in one_time {
            let key = prekey_key(user, device, prekey.id);
            if fresh || !self.prekeys.contains_key(&key)? {
                added += 1;
            }
        }
        if existing + added > MAX_ONE_TIME_PREKEYS {
            return Err(StoreError::Limit(format!(
                "at most {MAX_ONE_TIME_PREKEYS} one-time prekeys may be stored per device \
                 ({existing} are)"
            )));
        }
        if let Some(keys) = keys {
            batch.insert(
                &self.keys,
                device_keys_key(user, device),
                rmp_serde::to_vec_named(keys)?,
            );
        }
        for prekey in one_time {
            batch.insert(
                &self.prekeys,
                prekey_key(user, device, prekey.id),
                prekey.key.0.to_vec(),
            );
        }
        Ok(PutKeys {
            count: u32::try_from(existing + added).unwrap_or(u32::MAX),
        })
    }

    /// Adds the removal of `device`'s one-time prekeys (and, with `keys`, its prekeys) to
    /// `batch`; the caller holds [`Self::lock`] until the batch is committed.
    pub fn remove_device_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
        device: DeviceId,
        keys: bool,
    ) -> Result<(), StoreError> {
        let prefix = device_keys_key(user, device);
        if keys {
            batch.remove(&self.keys, prefix.clone());
        }
        for entry in self.prekeys.prefix(&prefix) {
            batch.remove(&self.prekeys, entry.key()?.to_vec());
        }
        Ok(())
    }

    /// Adds the removal of every key of `user` (identity, every device's keys and one-time
    /// prekeys) to `batch`; the caller holds [`Self::lock`] until the batch is committed.
    pub fn remove_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
    ) -> Result<(), StoreError> {
        batch.remove(&self.identities, user.as_str().as_bytes().to_vec());
        let prefix = pair_key(user, &[]);
        for entry in self.keys.prefix(&prefix) {
            batch.remove(&self.keys, entry.key()?.to_vec());
        }
        for entry in self.prekeys.prefix(&prefix) {
            batch.remove(&self.prekeys, entry.key()?.to_vec());
        }
        Ok(())
    }

    /// Takes one one-time prekey of `device` into `batch` (removed from the store when the
    /// caller commits it) and describes its bundle; `None` if the device has no keys. The
    /// caller holds [`Self::lock`] until the batch is committed and synced.
    pub fn take_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<TakenDeviceBundle>, StoreError> {
        let Some(keys) = self.device_keys(user, device)? else {
            return Ok(None);
        };
        let prefix = device_keys_key(user, device);
        let mut stored = 0usize;
        let mut one_time_prekey = None;
        for entry in self.prekeys.prefix(&prefix) {
            stored += 1;
            if one_time_prekey.is_some() {
                entry.key()?;
                continue;
            }
            let (key, value) = entry.into_inner()?;
            let id_bytes: [u8; 4] = key
                .get(prefix.len()..)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| corrupt("prekeys", "bad key"))?;
            batch.remove(&self.prekeys, key.to_vec());
            one_time_prekey = Some(OneTimePrekey {
                id: u32::from_be_bytes(id_bytes),
                key: key_bytes("prekeys", &value)?,
            });
        }
        let remaining = stored.saturating_sub(usize::from(one_time_prekey.is_some()));
        Ok(Some(TakenDeviceBundle {
            device,
            keys,
            one_time_prekey,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        }))
    }
}
