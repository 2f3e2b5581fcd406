//! Blob (file attachment) metadata: the records the server keeps about each uploaded blob,
//! their fjall keyspaces, and the store's operations on them. The bytes live in files the
//! server writes itself (`server::blobs`); the store only says who owns a blob, how much of it
//! is on disk (`held`), and which devices still have to fetch it.
//!
//! Keyspaces: `blobs` (blob id → [`StoredBlob`], named MessagePack) and `blob_owners`
//! (owner's user id (u32 BE) ‖ blob id → the blob's length (u64 BE)), an index so that an
//! uploader's quota is a prefix scan of at most its own blobs, not of every blob. Both are
//! changed together in one synced batch, under [`BlobKeyspaces::lock`], so a quota check and
//! the insert it allows cannot race with another upload of the same owner.
//!
//! A store of an older version simply gets these keyspaces empty (fjall creates a keyspace on
//! first open), so no format change is needed.
//!
//! Devices are kept with their account's numeric id as well as its name: an account deleted
//! and a name signed up again later is a different account, whose devices are not the ones
//! snapshotted (see [`Inner::device_exists`]).

use std::sync::Mutex;

use fjall::{Keyspace, PersistMode};
use serde::{Deserialize, Serialize};

use super::fjall_open::Inner;
use super::fjall_store::{FjallStore, decode, encode};
use super::user_ids::UserId;
use super::{DeviceId, StoreError};
use crate::protocol::Username;

/// A blob's id (16 bytes, chosen by its uploader; global on a server).
pub use crate::protocol::BlobId;

pub(super) const BLOBS: &str = "blobs";
pub(super) const BLOB_OWNERS: &str = "blob_owners";

/// The blob keyspaces and the lock that orders their changes.
pub(super) struct BlobKeyspaces {
    pub blobs: Keyspace,
    pub owners: Keyspace,
    /// Held by every change of a blob record (read, decide, write).
    pub lock: Mutex<()>,
}

/// A new blob, as `upload_blob` asks for it.
#[derive(Debug, Clone)]
pub struct NewBlob {
    /// Its id.
    pub id: BlobId,
    /// The uploader.
    pub owner: Username,
    /// The uploader's device (its other devices must fetch the blob; this one need not).
    pub owner_device: DeviceId,
    /// The whole length in bytes (the ciphertext).
    pub length: u64,
    /// Who may fetch it (each must have an account; not the owner).
    pub readers: Vec<Username>,
    /// When it is asked for, seconds since the Unix epoch.
    pub now: u64,
}

/// What one uploader may hold in blobs, complete and partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobQuota {
    /// Bytes at most: the sum of the declared lengths of its blobs (a partial blob counts its
    /// whole length, so a quota granted cannot be overrun by the uploads that follow).
    pub bytes: u64,
    /// Blobs at most.
    pub count: usize,
}

/// A device that must fetch (and acknowledge) a blob before it can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobDevice {
    /// Whose device.
    pub user: Username,
    /// Which one.
    pub device: DeviceId,
    /// Whether it acknowledged the blob, or no longer exists.
    pub done: bool,
}

/// A blob as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    /// Its id.
    pub id: BlobId,
    /// Who uploaded it.
    pub owner: Username,
    /// The device it was created from.
    pub owner_device: DeviceId,
    /// Its whole length in bytes.
    pub length: u64,
    /// Bytes on disk and synced (the upload resumes from here).
    pub held: u64,
    /// When `held` reached `length` (the blob is complete), seconds since the Unix epoch.
    pub completed_at: Option<u64>,
    /// When it was created.
    pub created_at: u64,
    /// When `held` last changed (or it was created).
    pub last_write: u64,
    /// Who may fetch it besides its owner.
    pub readers: Vec<Username>,
    /// The devices snapshotted at its creation: every device of every reader and the owner's
    /// other devices.
    pub devices: Vec<BlobDevice>,
}

impl BlobRecord {
    /// Whether every byte is on disk (synced).
    pub fn is_complete(&self) -> bool {
        self.completed_at.is_some()
    }

    /// Whether `user` may fetch it (or acknowledge it): its owner or one of its readers.
    pub fn may_read(&self, user: &Username) -> bool {
        self.owner == *user || self.readers.contains(user)
    }

    /// Whether every snapshotted device is done with it.
    pub fn all_done(&self) -> bool {
        self.devices.iter().all(|d| d.done)
    }
}

/// The outcome of [`Store::create_blob`](super::Store::create_blob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobCreated {
    /// A new record (nothing held yet), durable.
    Created(BlobRecord),
    /// This owner already has this blob with this length: its current record (readers of the
    /// first request kept).
    Existing(BlobRecord),
    /// The id belongs to another user, or to this one with another length.
    Taken,
    /// The owner's blobs would exceed its quota; nothing was stored.
    OverQuota,
}

/// A snapshotted device as stored: with its account's id, so that a name given to a new
/// account later does not bring the old account's devices back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredDevice {
    user: Username,
    account: UserId,
    device: DeviceId,
    done: bool,
}

/// A blob as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredBlob {
    owner: Username,
    owner_account: UserId,
    owner_device: DeviceId,
    length: u64,
    held: u64,
    #[serde(default)]
    completed_at: Option<u64>,
    created_at: u64,
    last_write: u64,
    readers: Vec<Username>,
    devices: Vec<StoredDevice>,
}

impl StoredBlob {
    fn record(&self, id: BlobId) -> BlobRecord {
        BlobRecord {
            id,
            owner: self.owner.clone(),
            owner_device: self.owner_device,
            length: self.length,
            held: self.held,
            completed_at: self.completed_at,
            created_at: self.created_at,
            last_write: self.last_write,
            readers: self.readers.clone(),
            devices: self
                .devices
                .iter()
                .map(|d| BlobDevice {
                    user: d.user.clone(),
                    device: d.device,
                    done: d.done,
                })
                .collect(),
        }
    }
}

/// `blob_owners` key of `id` owned by `owner`.
fn owner_key(owner: UserId, id: &BlobId) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..4].copy_from_slice(&owner.to_be_bytes());
    key[4..].copy_from_slice(&id.0);
    key
}

fn corrupt(reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        keyspace: BLOB_OWNERS,
        reason: reason.into(),
    }
}

impl Inner {
    /// The id of `name`'s account, if it has one.
    fn blob_account(&self, name: &Username) -> Result<Option<UserId>, StoreError> {
        if !self.users.contains_key(name.as_str())? {
            return Ok(None);
        }
        self.ids.stored(name)
    }

    /// Whether `device` of the account `account` (named `user` when snapshotted) still exists.
    fn device_exists(
        &self,
        user: &Username,
        account: UserId,
        device: DeviceId,
    ) -> Result<bool, StoreError> {
        // A deleted account (or its name given to a new one) has none of its devices left.
        if self.blob_account(user)? != Some(account) {
            return Ok(false);
        }
        let devices = self.devices.read(account)?;
        if devices.devices.is_empty() && devices.next == 1 {
            // An account from before devices that never had one written: device 1 only.
            return Ok(device == 1);
        }
        Ok(devices.get(device).is_some())
    }

    fn stored_blob(&self, id: &BlobId) -> Result<Option<StoredBlob>, StoreError> {
        match self.blobs.blobs.get(id.0)? {
            Some(bytes) => decode(BLOBS, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Writes `blob` (synced).
    fn put_blob(&self, id: &BlobId, blob: &StoredBlob) -> Result<(), StoreError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&self.blobs.blobs, id.0, encode(blob)?);
        batch.commit()?;
        Ok(())
    }

    fn create_blob(&self, new: NewBlob, quota: BlobQuota) -> Result<BlobCreated, StoreError> {
        let _guard = self.blobs.lock.lock().map_err(|_| StoreError::Poisoned)?;
        if let Some(existing) = self.stored_blob(&new.id)? {
            let same_owner = existing.owner == new.owner
                && self.blob_account(&new.owner)? == Some(existing.owner_account);
            if same_owner && existing.length == new.length {
                return Ok(BlobCreated::Existing(existing.record(new.id)));
            }
            return Ok(BlobCreated::Taken);
        }
        let Some(owner) = self.blob_account(&new.owner)? else {
            return Err(StoreError::UnknownUser(new.owner));
        };
        // The quota: every blob of the owner, complete or not, by its declared length.
        let (mut bytes, mut count) = (0u64, 0usize);
        for entry in self.blobs.owners.prefix(owner.to_be_bytes()) {
            let value = entry.value()?;
            let length: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| corrupt("a length is not 8 bytes"))?;
            bytes = bytes.saturating_add(u64::from_be_bytes(length));
            count += 1;
        }
        if count >= quota.count || bytes.saturating_add(new.length) > quota.bytes {
            return Ok(BlobCreated::OverQuota);
        }
        // The devices that must fetch it, as they are now.
        let mut devices = Vec::new();
        for reader in &new.readers {
            let Some(account) = self.blob_account(reader)? else {
                return Err(StoreError::UnknownUser(reader.clone()));
            };
            let current = self.devices.read(account)?;
            let ids: Vec<DeviceId> = if current.devices.is_empty() && current.next == 1 {
                vec![1]
            } else {
                current.devices.iter().map(|(id, _)| *id).collect()
            };
            devices.extend(ids.into_iter().map(|device| StoredDevice {
                user: reader.clone(),
                account,
                device,
                done: false,
            }));
        }
        for (device, _) in self.devices.read(owner)?.devices {
            if device != new.owner_device {
                devices.push(StoredDevice {
                    user: new.owner.clone(),
                    account: owner,
                    device,
                    done: false,
                });
            }
        }
        let blob = StoredBlob {
            owner: new.owner,
            owner_account: owner,
            owner_device: new.owner_device,
            length: new.length,
            held: 0,
            completed_at: None,
            created_at: new.now,
            last_write: new.now,
            readers: new.readers,
            devices,
        };
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&self.blobs.blobs, new.id.0, encode(&blob)?);
        batch.insert(
            &self.blobs.owners,
            owner_key(owner, &new.id),
            new.length.to_be_bytes(),
        );
        batch.commit()?;
        Ok(BlobCreated::Created(blob.record(new.id)))
    }

    fn set_blob_held(
        &self,
        id: BlobId,
        held: u64,
        now: u64,
    ) -> Result<Option<BlobRecord>, StoreError> {
        let _guard = self.blobs.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(mut blob) = self.stored_blob(&id)? else {
            return Ok(None);
        };
        if held > blob.length {
            return Err(StoreError::Limit(format!(
                "blob {id} holds at most {} bytes, not {held}",
                blob.length
            )));
        }
        blob.held = held;
        blob.last_write = now;
        blob.completed_at = match blob.completed_at {
            Some(at) if held == blob.length => Some(at),
            _ if held == blob.length => Some(now),
            _ => None,
        };
        self.put_blob(&id, &blob)?;
        Ok(Some(blob.record(id)))
    }

    fn ack_blob(
        &self,
        id: BlobId,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<BlobRecord>, StoreError> {
        let _guard = self.blobs.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(mut blob) = self.stored_blob(&id)? else {
            return Ok(None);
        };
        let mut changed = false;
        for d in &mut blob.devices {
            if d.user == *user && d.device == device && !d.done {
                d.done = true;
                changed = true;
            }
        }
        if changed {
            self.put_blob(&id, &blob)?;
        }
        Ok(Some(blob.record(id)))
    }

    fn settle_blob(&self, id: BlobId) -> Result<Option<BlobRecord>, StoreError> {
        let _guard = self.blobs.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(mut blob) = self.stored_blob(&id)? else {
            return Ok(None);
        };
        let mut changed = false;
        for d in &mut blob.devices {
            if !d.done && !self.device_exists(&d.user, d.account, d.device)? {
                d.done = true;
                changed = true;
            }
        }
        if changed {
            self.put_blob(&id, &blob)?;
        }
        Ok(Some(blob.record(id)))
    }

    fn delete_blob(&self, id: BlobId) -> Result<bool, StoreError> {
        let _guard = self.blobs.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(blob) = self.stored_blob(&id)? else {
            return Ok(false);
        };
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.remove(&self.blobs.blobs, id.0);
        batch.remove(&self.blobs.owners, owner_key(blob.owner_account, &id));
        batch.commit()?;
        Ok(true)
    }

    fn blobs_after(
        &self,
        after: Option<BlobId>,
        limit: usize,
    ) -> Result<Vec<BlobRecord>, StoreError> {
        let mut records = Vec::new();
        let range = match after {
            // The ids past `after`: every key strictly greater.
            Some(after) => self.blobs.blobs.range::<&[u8], _>((
                std::ops::Bound::Excluded(&after.0[..]),
                std::ops::Bound::Unbounded,
            )),
            None => self.blobs.blobs.iter(),
        };
        for entry in range.take(limit) {
            let (key, value) = entry.into_inner()?;
            let id: [u8; 16] = key.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                keyspace: BLOBS,
                reason: "a blob id is not 16 bytes".into(),
            })?;
            let blob: StoredBlob = decode(BLOBS, &value)?;
            records.push(blob.record(BlobId(id)));
        }
        Ok(records)
    }
}

impl FjallStore {
    pub(super) async fn create_blob_now(
        &self,
        new: NewBlob,
        quota: BlobQuota,
    ) -> Result<BlobCreated, StoreError> {
        self.writable()?;
        self.call(move |db| db.create_blob(new, quota)).await
    }

    pub(super) async fn blob_now(&self, id: BlobId) -> Result<Option<BlobRecord>, StoreError> {
        self.call(move |db| Ok(db.stored_blob(&id)?.map(|b| b.record(id))))
            .await
    }

    pub(super) async fn set_blob_held_now(
        &self,
        id: BlobId,
        held: u64,
        now: u64,
    ) -> Result<Option<BlobRecord>, StoreError> {
        self.writable()?;
        self.call(move |db| db.set_blob_held(id, held, now)).await
    }

    pub(super) async fn ack_blob_now(
        &self,
        id: BlobId,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<BlobRecord>, StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| db.ack_blob(id, &user, device)).await
    }

    pub(super) async fn settle_blob_now(
        &self,
        id: BlobId,
    ) -> Result<Option<BlobRecord>, StoreError> {
        self.writable()?;
        self.call(move |db| db.settle_blob(id)).await
    }

    pub(super) async fn delete_blob_now(&self, id: BlobId) -> Result<bool, StoreError> {
        self.writable()?;
        self.call(move |db| db.delete_blob(id)).await
    }

    pub(super) async fn blobs_after_now(
        &self,
        after: Option<BlobId>,
        limit: usize,
    ) -> Result<Vec<BlobRecord>, StoreError> {
        self.call(move |db| db.blobs_after(after, limit)).await
    }
}

#[cfg(test)]
mod tests;
