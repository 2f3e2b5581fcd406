//! MLS key packages in the key directory (docs/PROTOCOL.md 5.7), beside the prekeys of
//! `fjall_keys`: opaque bytes the server validated before storing them.
//!
//! Keyspaces: `key_packages` (username 0x00 device(u32 BE) ‖ key package reference → the key
//! package) holds the one-time key packages, and `last_resort_key_packages` (username 0x00
//! device(u32 BE) → the key package) the last-resort one of each device. Every change runs
//! under [`KeyPackageKeyspaces::lock`] and is synced before it returns, so a one-time key
//! package is handed out at most once, also to concurrent fetches and across a crash.
//!
//! A store of an older version gets these keyspaces empty (fjall creates a keyspace on first
//! open): no format change.

use std::sync::Mutex;

use fjall::{Keyspace, OwnedWriteBatch, PersistMode};

use super::fjall_keys::device_keys_key;
use super::fjall_open::Inner;
use super::fjall_store::FjallStore;
use super::{DeviceId, StoreError};
use crate::protocol::Username;
use crate::protocol::keys::IdentityKeyBytes;

pub(super) const KEY_PACKAGES: &str = "key_packages";
pub(super) const LAST_RESORT_KEY_PACKAGES: &str = "last_resort_key_packages";

/// One-time key packages a device may have stored at once.
pub const MAX_KEY_PACKAGES: usize = crate::protocol::groups::MAX_KEY_PACKAGES_STORED;

/// The key package keyspaces and the lock that orders their changes.
pub(super) struct KeyPackageKeyspaces {
    pub one_time: Keyspace,
    pub last_resort: Keyspace,
    /// Held by every change (read, decide, write, commit).
    pub lock: Mutex<()>,
}

/// A one-time key package to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKeyPackage {
    /// Its MLS reference (the hash the MLS library computes): storing the same key package
    /// twice stores it once.
    pub reference: Vec<u8>,
    /// The key package's bytes.
    pub bytes: Vec<u8>,
}

/// What a device uploads in one `publish_key_packages`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPackageUpload {
    /// One-time key packages to add.
    pub one_time: Vec<NewKeyPackage>,
    /// A last-resort key package to replace the stored one.
    pub last_resort: Option<Vec<u8>>,
}

/// What the store holds for a device after an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPackageCounts {
    /// One-time key packages.
    pub one_time: u32,
    /// Whether it has a last-resort key package.
    pub last_resort: bool,
}

/// What a fetch hands out for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenKeyPackage {
    /// The device.
    pub device: DeviceId,
    /// The key package: a one-time one, now deleted from the store, or the last-resort one.
    pub key_package: Vec<u8>,
    /// Whether it is the last-resort one.
    pub last_resort: bool,
    /// One-time key packages of the device still stored after this fetch.
    pub remaining: u32,
}

/// What a key package fetch hands out: the account's identity and one entry per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenKeyPackages {
    /// The account's identity key.
    pub identity: IdentityKeyBytes,
    /// One entry per requested current device that has a key package, ascending.
    pub devices: Vec<TakenKeyPackage>,
}

fn one_time_key(user: &Username, device: DeviceId, reference: &[u8]) -> Vec<u8> {
    let mut key = device_keys_key(user, device);
    key.extend_from_slice(reference);
    key
}

impl Inner {
    /// The current device ids of `name`, ascending; empty without an account.
    fn current_device_ids(&self, name: &Username) -> Result<Vec<DeviceId>, StoreError> {
        Ok(self.list_devices(name)?.into_iter().map(|d| d.id).collect())
    }

    fn key_package_count(&self, user: &Username, device: DeviceId) -> usize {
        self.key_packages
            .one_time
            .prefix(device_keys_key(user, device))
            .count()
    }

    fn put_key_packages(
        &self,
        user: &Username,
        device: DeviceId,
        upload: KeyPackageUpload,
    ) -> Result<KeyPackageCounts, StoreError> {
        let _guard = self
            .key_packages
            .lock
            .lock()
            .map_err(|_| StoreError::Poisoned)?;
        if !self.current_device_ids(user)?.contains(&device) {
            return Err(StoreError::UnknownDevice(user.clone(), device));
        }
        let existing = self.key_package_count(user, device);
        let mut added = 0usize;
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(upload.one_time.len());
        for package in &upload.one_time {
            let key = one_time_key(user, device, &package.reference);
            if !keys.contains(&key) && !self.key_packages.one_time.contains_key(&key)? {
                added += 1;
            }
            keys.push(key);
        }
        if existing + added > MAX_KEY_PACKAGES {
            return Err(StoreError::Limit(format!(
                "at most {MAX_KEY_PACKAGES} key packages may be stored per device ({existing} are)"
            )));
        }
        let device_key = device_keys_key(user, device);
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for (key, package) in keys.into_iter().zip(upload.one_time) {
            batch.insert(&self.key_packages.one_time, key, package.bytes);
        }
        let had_last_resort = self.key_packages.last_resort.contains_key(&device_key)?;
        let last_resort = had_last_resort || upload.last_resort.is_some();
        if let Some(bytes) = upload.last_resort {
            batch.insert(&self.key_packages.last_resort, device_key, bytes);
        }
        batch.commit()?;
        Ok(KeyPackageCounts {
            one_time: u32::try_from(existing + added).unwrap_or(u32::MAX),
            last_resort,
        })
    }

    /// Takes one key package of `device` into `batch` (a one-time one is removed when the
    /// caller commits it); `None` if the device has none at all.
    fn take_key_package_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<TakenKeyPackage>, StoreError> {
        let prefix = device_keys_key(user, device);
        let mut stored = 0usize;
        let mut taken = None;
        for entry in self.key_packages.one_time.prefix(&prefix) {
            stored += 1;
            if taken.is_some() {
                entry.key()?;
                continue;
            }
            let (key, value) = entry.into_inner()?;
            batch.remove(&self.key_packages.one_time, key.to_vec());
            taken = Some(value.to_vec());
        }
        if let Some(key_package) = taken {
            return Ok(Some(TakenKeyPackage {
                device,
                key_package,
                last_resort: false,
                remaining: u32::try_from(stored - 1).unwrap_or(u32::MAX),
            }));
        }
        Ok(self
            .key_packages
            .last_resort
            .get(&prefix)?
            .map(|bytes| TakenKeyPackage {
                device,
                key_package: bytes.to_vec(),
                last_resort: true,
                remaining: 0,
            }))
    }

    fn take_key_packages(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<TakenKeyPackages>, StoreError> {
        let _guard = self
            .key_packages
            .lock
            .lock()
            .map_err(|_| StoreError::Poisoned)?;
        let Some(identity) = self.directory.identity(user)? else {
            return Ok(None);
        };
        let current = self.current_device_ids(user)?;
        let wanted: Vec<DeviceId> = match devices {
            None => current,
            Some(asked) => current.into_iter().filter(|d| asked.contains(d)).collect(),
        };
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        let mut taken = Vec::with_capacity(wanted.len());
        for device in wanted {
            taken.extend(self.take_key_package_into(&mut batch, user, device)?);
        }
        if taken.iter().any(|t| !t.last_resort) {
            batch.commit()?;
        }
        Ok(Some(TakenKeyPackages {
            identity,
            devices: taken,
        }))
    }

    /// Adds the removal of every key package of `user`'s `device` (all devices with `None`)
    /// to `batch`.
    pub(super) fn remove_key_packages_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
        device: Option<DeviceId>,
    ) -> Result<(), StoreError> {
        let prefix = match device {
            Some(device) => device_keys_key(user, device),
            None => super::inbox_writer::pair_key(user, &[]),
        };
        for keyspace in [&self.key_packages.one_time, &self.key_packages.last_resort] {
            for entry in keyspace.prefix(&prefix) {
                batch.remove(keyspace, entry.key()?.to_vec());
            }
        }
        Ok(())
    }
}

impl FjallStore {
    pub(super) async fn put_key_packages_now(
        &self,
        user: &Username,
        device: DeviceId,
        upload: KeyPackageUpload,
    ) -> Result<KeyPackageCounts, StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| db.put_key_packages(&user, device, upload))
            .await
    }

    pub(super) async fn take_key_packages_now(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<TakenKeyPackages>, StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| db.take_key_packages(&user, devices))
            .await
    }

    /// Removes every key package of `user`'s `device` (all devices with `None`), synced.
    pub(super) async fn remove_key_packages_now(
        &self,
        user: &Username,
        device: Option<DeviceId>,
    ) -> Result<(), StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| {
            let _guard = db
                .key_packages
                .lock
                .lock()
                .map_err(|_| StoreError::Poisoned)?;
            let mut batch = db.db.batch().durability(Some(PersistMode::SyncData));
            db.remove_key_packages_into(&mut batch, &user, device)?;
            batch.commit()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::protocol::keys::Bin;
    use crate::store::{Created, Store, UserRecord};

    fn name(n: &str) -> Username {
        Username::parse(n).unwrap()
    }

    async fn store_with_bob() -> (tempfile::TempDir, FjallStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        let record = UserRecord {
            password_hash: String::new(),
            created_at: 1,
        };
        let created = store.create_user(&name("bob"), record).await.unwrap();
        assert_eq!(created, Created::Created);
        store
            .put_keys(&name("bob"), 1, Some(Bin([7; 32])), None, Vec::new())
            .await
            .unwrap();
        (dir, store)
    }

    fn packages(range: std::ops::Range<u8>) -> Vec<NewKeyPackage> {
        range
            .map(|i| NewKeyPackage {
                reference: vec![i; 32],
                bytes: vec![i; 300],
            })
            .collect()
    }

    #[tokio::test]
    async fn each_one_time_package_is_handed_out_once_then_the_last_resort() {
        let (dir, store) = store_with_bob().await;
        let upload = KeyPackageUpload {
            one_time: packages(0..20),
            last_resort: Some(vec![0xff; 300]),
        };
        let counts = store
            .put_key_packages(&name("bob"), 1, upload)
            .await
            .unwrap();
        assert_eq!(
            counts,
            KeyPackageCounts {
                one_time: 20,
                last_resort: true
            }
        );
        // The same packages again are stored once.
        let again = KeyPackageUpload {
            one_time: packages(0..20),
            last_resort: None,
        };
        let counts = store
            .put_key_packages(&name("bob"), 1, again)
            .await
            .unwrap();
        assert_eq!(counts.one_time, 20);

        let mut fetches = Vec::new();
        for _ in 0..30 {
            let store = store.clone();
            fetches.push(tokio::spawn(async move {
                store
                    .take_key_packages(&name("bob"), None)
                    .await
                    .unwrap()
                    .unwrap()
            }));
        }
        let mut seen = HashSet::new();
        let mut last_resort = 0;
        for fetch in fetches {
            let taken = fetch.await.unwrap();
            assert_eq!(taken.identity, Bin([7; 32]));
            assert_eq!(taken.devices.len(), 1);
            let package = &taken.devices[0];
            if package.last_resort {
                assert_eq!(package.key_package, vec![0xff; 300]);
                last_resort += 1;
            } else {
                assert!(seen.insert(package.key_package.clone()), "handed out twice");
            }
        }
        assert_eq!((seen.len(), last_resort), (20, 10));
        // Durable: after a reopen nothing comes back.
        drop(store);
        let store = FjallStore::open(dir.path()).unwrap();
        let taken = store
            .take_key_packages(&name("bob"), None)
            .await
            .unwrap()
            .unwrap();
        assert!(taken.devices[0].last_resort);
    }

    #[tokio::test]
    async fn limits_devices_and_removal() {
        let (_dir, store) = store_with_bob().await;
        let bob = name("bob");
        let full = KeyPackageUpload {
            one_time: packages(0..200),
            last_resort: None,
        };
        assert_eq!(
            store
                .put_key_packages(&bob, 1, full)
                .await
                .unwrap()
                .one_time,
            200
        );
        let more = KeyPackageUpload {
            one_time: packages(200..201),
            last_resort: None,
        };
        assert!(matches!(
            store.put_key_packages(&bob, 1, more).await,
            Err(StoreError::Limit(_))
        ));
        assert!(matches!(
            store
                .put_key_packages(&bob, 2, KeyPackageUpload::default())
                .await,
            Err(StoreError::UnknownDevice(_, 2))
        ));
        // A device without any key package is left out of a fetch.
        store.add_device(&bob, "laptop".into(), 5).await.unwrap();
        let taken = store.take_key_packages(&bob, None).await.unwrap().unwrap();
        assert_eq!(taken.devices.len(), 1);
        assert_eq!(taken.devices[0].remaining, 199);
        let taken = store
            .take_key_packages(&bob, Some(vec![2]))
            .await
            .unwrap()
            .unwrap();
        assert!(taken.devices.is_empty());
        store.remove_key_packages(&bob, Some(1)).await.unwrap();
        let taken = store.take_key_packages(&bob, None).await.unwrap().unwrap();
        assert!(taken.devices.is_empty());
        assert!(
            store
                .take_key_packages(&name("nobody"), None)
                .await
                .unwrap()
                .is_none()
        );
    }
}
