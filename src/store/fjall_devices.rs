//! The fjall store's device and key operations: adding, listing, touching and removing
//! devices, and the per-device key directory (publishing, with the removal of every other
//! device when the identity changes, and bundle fetches). The records live in `devices` and
//! `fjall_keys`; this file orders the steps.
//!
//! A removal empties the device's inbox first (through the inbox writer, which refuses
//! messages to it from then on), then deletes its record, keys, one-time prekeys and sessions
//! in one synced batch: if the second step fails, the device is still there (with an empty
//! inbox) and the removal can be asked again; no inbox entry is ever left without its device.

use fjall::PersistMode;

use super::devices::{AccountDevices, InboxId, StoredDevice, device_key, encode_device};
use super::fjall_open::Inner;
use super::fjall_store::{FjallStore, SESSIONS, decode};
use super::inbox_writer::counter_key;
use super::user_ids::UserId;
use super::{
    DeviceId, DeviceKeys, DeviceRecord, MAX_DEVICES, SessionRecord, StoreError, TakenBundles,
    TokenDigest,
};
use crate::protocol::Username;
use crate::protocol::keys::{IdentityKeyBytes, OneTimePrekey};

/// Bytes a device's name may have at most.
pub const MAX_DEVICE_NAME: usize = 64;

/// What `put_keys` found before it wrote: whether the identity is replaced, and the other
/// devices that then go.
struct Replacing {
    others: Vec<(DeviceId, InboxId)>,
}

impl Inner {
    /// `name`'s account id, if it has an account.
    fn account_id(&self, name: &Username) -> Result<Option<UserId>, StoreError> {
        if !self.users.contains_key(name.as_str())? {
            return Ok(None);
        }
        self.ids.stored(name)
    }

    pub(super) fn list_devices(&self, name: &Username) -> Result<Vec<DeviceRecord>, StoreError> {
        let Some(id) = self.account_id(name)? else {
            return Ok(Vec::new());
        };
        Ok(self.devices.read(id)?.records())
    }

    pub(super) fn add_device(
        &self,
        name: &Username,
        device_name: String,
        now: u64,
    ) -> Result<DeviceId, StoreError> {
        if device_name.len() > MAX_DEVICE_NAME {
            return Err(StoreError::Limit(format!(
                "a device name has at most {MAX_DEVICE_NAME} bytes"
            )));
        }
        let _devices = self.devices.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(user) = self.account_id(name)? else {
            return Err(StoreError::UnknownUser(name.clone()));
        };
        let mut account = self.devices.read(user)?;
        if account.devices.len() >= MAX_DEVICES {
            return Err(StoreError::Limit(format!(
                "an account has at most {MAX_DEVICES} devices"
            )));
        }
        let id = account.next.max(1);
        let next = id
            .checked_add(1)
            .filter(|next| *next < super::devices::NEXT_KEY)
            .ok_or_else(|| StoreError::Limit("no device ids are left".into()))?;
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        // Device 1's inbox is its account's (only an account that never had a device gets it
        // here; every account is created or migrated with its device 1).
        let inbox_id = match id {
            1 => user,
            _ => self.ids.assign_inbox(&mut batch)?,
        };
        let device = StoredDevice {
            inbox_id,
            name: device_name,
            added_at: now,
            last_seen: 0,
        };
        self.devices.put_into(&mut batch, user, id, &device)?;
        self.devices.put_next_into(&mut batch, user, next);
        batch.commit()?;
        account.devices.push((id, device));
        account.next = next;
        self.devices.remember(user, &account)?;
        Ok(id)
    }

    /// Device 1 of a new account, in the batch that creates it (the caller holds
    /// `create_user` and commits, then calls [`Self::remember_first_device`]).
    pub(super) fn first_device_into(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        user: UserId,
        created_at: u64,
    ) -> Result<AccountDevices, StoreError> {
        let first = StoredDevice {
            inbox_id: user,
            name: super::FIRST_DEVICE_NAME.into(),
            added_at: created_at,
            last_seen: 0,
        };
        self.devices.put_into(batch, user, 1, &first)?;
        self.devices.put_next_into(batch, user, 2);
        Ok(AccountDevices {
            devices: vec![(1, first)],
            next: 2,
        })
    }

    pub(super) fn touch_device(
        &self,
        name: &Username,
        device: DeviceId,
        now: u64,
    ) -> Result<(), StoreError> {
        let Some(user) = self
            .ids
            .cached(name)?
            .map_or_else(|| self.ids.stored(name), |id| Ok(Some(id)))?
        else {
            return Ok(());
        };
        let _devices = self.devices.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let key = device_key(user, device);
        let Some(bytes) = self.devices.keyspace.get(key)? else {
            return Ok(());
        };
        let mut record = super::devices::decode_device(&bytes)?;
        if record.last_seen >= now {
            return Ok(());
        }
        record.last_seen = now;
        // Not synced: a lost `last_seen` only shows the device as seen a little earlier.
        self.devices.keyspace.insert(key, encode_device(&record)?)?;
        Ok(())
    }

    /// The account id and the inbox of `name`'s `device`, if it is current.
    pub(super) fn device_inbox(
        &self,
        name: &Username,
        device: DeviceId,
    ) -> Result<Option<(UserId, InboxId)>, StoreError> {
        let Some(user) = self.account_id(name)? else {
            return Ok(None);
        };
        Ok(self
            .devices
            .read(user)?
            .get(device)
            .map(|d| (user, d.inbox_id)))
    }

    /// Deletes the records of `name`'s `devices` (whose inboxes are dropped already): records,
    /// keys, one-time prekeys, key packages, sessions; synced. The caller holds the
    /// directory's lock.
    /// Returns the deleted sessions' digests, or `None` if none of the devices is current.
    fn delete_devices_into(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        name: &Username,
        user: UserId,
        account: &mut AccountDevices,
        devices: &[DeviceId],
    ) -> Result<Vec<TokenDigest>, StoreError> {
        for device in devices {
            batch.remove(&self.devices.keyspace, device_key(user, *device));
            self.directory
                .remove_device_into(batch, name, *device, true)?;
            self.remove_key_packages_into(batch, name, Some(*device))?;
        }
        account.devices.retain(|(id, _)| !devices.contains(id));
        // Sessions are keyed by token digest: every one is read (a removal is rare).
        let mut digests = Vec::new();
        for entry in self.sessions.iter() {
            let (key, value) = entry.into_inner()?;
            let session: SessionRecord = decode(SESSIONS, &value)?;
            if session.username == *name && devices.contains(&session.device) {
                batch.remove(&self.sessions, key.to_vec());
                digests.push(session.token_digest);
            }
        }
        Ok(digests)
    }

    /// The second step of a device removal (see the module doc); `None` if it is no longer a
    /// current device.
    pub(super) fn delete_device(
        &self,
        name: &Username,
        device: DeviceId,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError> {
        let _keys = self
            .directory
            .lock
            .lock()
            .map_err(|_| StoreError::Poisoned)?;
        let _devices = self.devices.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(user) = self.account_id(name)? else {
            return Ok(None);
        };
        let mut account = self.devices.read(user)?;
        if account.get(device).is_none() {
            return Ok(None);
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        let digests = self.delete_devices_into(&mut batch, name, user, &mut account, &[device])?;
        batch.commit()?;
        self.devices.remember(user, &account)?;
        Ok(Some(digests))
    }

    /// The first look of `put_keys`: `Some` with the devices that go if `identity` replaces
    /// a stored one. [`StoreError::UnknownDevice`] if `device` is not current.
    fn replacing(
        &self,
        name: &Username,
        device: DeviceId,
        identity: Option<&IdentityKeyBytes>,
    ) -> Result<Option<Replacing>, StoreError> {
        let unknown = || StoreError::UnknownDevice(name.clone(), device);
        let user = self.account_id(name)?.ok_or_else(unknown)?;
        let account = self.devices.read(user)?;
        if account.get(device).is_none() {
            return Err(unknown());
        }
        let stored = self.directory.identity(name)?;
        match (identity, stored) {
            (Some(new), Some(old)) if *new != old => Ok(Some(Replacing {
                others: account
                    .devices
                    .iter()
                    .filter(|(id, _)| *id != device)
                    .map(|(id, d)| (*id, d.inbox_id))
                    .collect(),
            })),
            _ => Ok(None),
        }
    }

    /// Writes what `put_keys` was given in one synced batch; with `replace`, also removes
    /// every other device (their inboxes dropped already) and every key of the old identity.
    /// `None` if the identity changed meanwhile (the caller starts again).
    fn write_keys(
        &self,
        name: &Username,
        device: DeviceId,
        identity: Option<IdentityKeyBytes>,
        keys: Option<DeviceKeys>,
        one_time: &[OneTimePrekey],
        replace: bool,
    ) -> Result<Option<u32>, StoreError> {
        let _keys = self
            .directory
            .lock
            .lock()
            .map_err(|_| StoreError::Poisoned)?;
        let _devices = self.devices.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let unknown = || StoreError::UnknownDevice(name.clone(), device);
        let user = self.account_id(name)?.ok_or_else(unknown)?;
        let mut account = self.devices.read(user)?;
        if account.get(device).is_none() {
            return Err(unknown());
        }
        let stored = self.directory.identity(name)?;
        let replaces = matches!((&identity, &stored), (Some(new), Some(old)) if new != old);
        if replaces != replace {
            return Ok(None);
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        if replaces {
            let others: Vec<DeviceId> = account
                .devices
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| *id != device)
                .collect();
            self.delete_devices_into(&mut batch, name, user, &mut account, &others)?;
            // Its key packages are certified by the old identity.
            self.remove_key_packages_into(&mut batch, name, Some(device))?;
            if keys.is_none() {
                batch.remove(
                    &self.directory.keys,
                    super::fjall_keys::device_keys_key(name, device),
                );
            }
        }
        if let Some(identity) = &identity {
            batch.insert(
                &self.directory.identities,
                name.as_str().as_bytes().to_vec(),
                identity.0.to_vec(),
            );
        }
        let put =
            self.directory
                .put_into(&mut batch, name, device, keys.as_ref(), one_time, replaces)?;
        batch.commit()?;
        if replaces {
            self.devices.remember(user, &account)?;
        }
        Ok(Some(put.count))
    }

    pub(super) fn take_bundles(
        &self,
        name: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<TakenBundles>, StoreError> {
        let _keys = self
            .directory
            .lock
            .lock()
            .map_err(|_| StoreError::Poisoned)?;
        let Some(identity) = self.directory.identity(name)? else {
            return Ok(None);
        };
        let Some(user) = self.account_id(name)? else {
            return Ok(None);
        };
        let account = self.devices.read(user)?;
        let current = account.devices.iter().map(|(id, _)| *id);
        let wanted: Vec<DeviceId> = match devices {
            None => current.collect(),
            Some(asked) => current.filter(|id| asked.contains(id)).collect(),
        };
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        let mut taken = Vec::with_capacity(wanted.len());
        for device in wanted {
            taken.extend(self.directory.take_into(&mut batch, name, device)?);
        }
        if taken.iter().any(|t| t.one_time_prekey.is_some()) {
            batch.commit()?;
        }
        Ok(Some(TakenBundles {
            identity,
            devices: taken,
        }))
    }
}

impl FjallStore {
    /// Empties the inbox of `name`'s `device` (id `inbox`) through the writer.
    pub(super) async fn drop_device_inbox(
        &self,
        name: &Username,
        device: DeviceId,
        inbox: InboxId,
        account: Option<UserId>,
    ) -> Result<u64, StoreError> {
        let inner = self.writer()?;
        let writer = inner.writer.as_ref().ok_or(StoreError::Unavailable)?;
        writer
            .drop_inbox(inbox, account, counter_key(name, device, inbox))
            .await
    }

    pub(super) async fn remove_device_now(
        &self,
        name: &Username,
        device: DeviceId,
    ) -> Result<Option<Vec<TokenDigest>>, StoreError> {
        self.writable()?;
        let user = name.clone();
        let Some((_, inbox)) = self.call(move |db| db.device_inbox(&user, device)).await? else {
            return Ok(None);
        };
        self.drop_device_inbox(name, device, inbox, None).await?;
        let user = name.clone();
        self.call(move |db| db.delete_device(&user, device)).await
    }

    pub(super) async fn put_keys_now(
        &self,
        name: &Username,
        device: DeviceId,
        identity: Option<IdentityKeyBytes>,
        keys: Option<DeviceKeys>,
        one_time: Vec<OneTimePrekey>,
    ) -> Result<u32, StoreError> {
        self.writable()?;
        loop {
            let (user, asked) = (name.clone(), identity);
            let replacing = self
                .call(move |db| db.replacing(&user, device, asked.as_ref()))
                .await?;
            let replace = replacing.is_some();
            for (other, inbox) in replacing.map(|r| r.others).unwrap_or_default() {
                self.drop_device_inbox(name, other, inbox, None).await?;
            }
            let (user, identity, keys, one_time) =
                (name.clone(), identity, keys.clone(), one_time.clone());
            let written = self
                .call(move |db| db.write_keys(&user, device, identity, keys, &one_time, replace))
                .await?;
            if let Some(count) = written {
                return Ok(count);
            }
        }
    }
}
