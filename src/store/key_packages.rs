//! MLS key packages in the key directory (docs/PROTOCOL.md 5.7), beside the prekeys of
//! `fjall_keys`: opaque bytes the server validated before storing them.
//!
//! Keyspaces: `key_packages` (username 0x00 device(u32 BE) ‖ key package reference → the key
//! package) holds the one-time key packages, and `last_resort_key_packages` (username 0x00
//! device(u32 BE) → the key package) the last-resort one of each device. Every change runs
//! under [`KeyPackageKeyspaces::lock`] and is synced before it returns, so a one-time key
//! package is handed out at most once, also to concurrent fetches and across a crash.
//!
//! A value is `0xff` ‖ the end of the key package's MLS lifetime (`not_after`, u64 BE Unix
//! seconds) ‖ the key package. A key package ending within
//! [`KEY_PACKAGE_MARGIN_SECS`] is never handed out: a fetch or an upload deletes it, and the
//! fetch tells the caller which devices lost some (to send them `key_packages_low`).
//! A value without the tag (stored before lifetimes were kept; a TLS-encoded key package
//! starts with its version, `0x0001`) has no known end and is handed out as before.
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
use crate::protocol::groups::KEY_PACKAGE_MARGIN_SECS;
use crate::protocol::keys::IdentityKeyBytes;

pub(super) const KEY_PACKAGES: &str = "key_packages";
pub(super) const LAST_RESORT_KEY_PACKAGES: &str = "last_resort_key_packages";

/// The first byte of a stored value that carries the key package's `not_after`.
const VALUE_TAG: u8 = 0xff;

/// A stored value: the tag, `not_after`, the key package.
fn encode_value(package: &NewKeyPackage) -> Vec<u8> {
    let mut value = Vec::with_capacity(9 + package.bytes.len());
    value.push(VALUE_TAG);
    value.extend_from_slice(&package.not_after.to_be_bytes());
    value.extend_from_slice(&package.bytes);
    value
}

/// A stored value's `not_after` (`u64::MAX` for an untagged, older value) and key package.
fn decode_value(value: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    match value.split_first() {
        Some((&VALUE_TAG, rest)) => {
            let (end, package) = rest.split_at_checked(8).ok_or(StoreError::Corrupt {
                keyspace: KEY_PACKAGES,
                reason: "a tagged key package shorter than its lifetime".into(),
            })?;
            let mut not_after = [0u8; 8];
            not_after.copy_from_slice(end);
            Ok((u64::from_be_bytes(not_after), package))
        }
        _ => Ok((u64::MAX, value)),
    }
}

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
    /// When its MLS lifetime ends (Unix seconds, `not_after`).
    pub not_after: u64,
}

/// What a device uploads in one `publish_key_packages`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPackageUpload {
    /// One-time key packages to add.
    pub one_time: Vec<NewKeyPackage>,
    /// A last-resort key package to replace the stored one (its `reference` is not used).
    pub last_resort: Option<NewKeyPackage>,
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
    /// Devices of which this fetch deleted key packages whose lifetime ends within
    /// [`KEY_PACKAGE_MARGIN_SECS`], each with the one-time key packages it still holds: they
    /// should be told to upload fresh ones.
    pub refill: Vec<(DeviceId, u32)>,
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

    /// Stores an upload at `now`: the device's one-time key packages that end within the
    /// margin are deleted first (they neither count nor are handed out), then the new ones
    /// are added and the last-resort one replaced.
    fn put_key_packages(
        &self,
        user: &Username,
        device: DeviceId,
        upload: KeyPackageUpload,
        now: u64,
    ) -> Result<KeyPackageCounts, StoreError> {
        let _guard = self
            .key_packages
            .lock
            .lock()
            .map_err(|_| StoreError::Poisoned)?;
        if !self.current_device_ids(user)?.contains(&device) {
            return Err(StoreError::UnknownDevice(user.clone(), device));
        }
        let cutoff = now.saturating_add(KEY_PACKAGE_MARGIN_SECS);
        let mut ended: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut existing = 0usize;
        for entry in self
            .key_packages
            .one_time
            .prefix(device_keys_key(user, device))
        {
            let (key, value) = entry.into_inner()?;
            if decode_value(&value)?.0 <= cutoff {
                ended.insert(key.to_vec());
            } else {
                existing += 1;
            }
        }
        let mut added = 0usize;
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(upload.one_time.len());
        for package in &upload.one_time {
            let key = one_time_key(user, device, &package.reference);
            // An ended one uploaded again is overwritten, not removed.
            if !keys.contains(&key)
                && (ended.remove(&key) || !self.key_packages.one_time.contains_key(&key)?)
            {
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
        let mut changed = !ended.is_empty() || !keys.is_empty();
        for key in ended {
            batch.remove(&self.key_packages.one_time, key);
        }
        for (key, package) in keys.into_iter().zip(upload.one_time) {
            batch.insert(&self.key_packages.one_time, key, encode_value(&package));
        }
        let had_last_resort = match self.key_packages.last_resort.get(&device_key)? {
            Some(value) => decode_value(&value)?.0 > cutoff,
            None => false,
        };
        let last_resort = had_last_resort || upload.last_resort.is_some();
        if let Some(package) = upload.last_resort {
            // The newest upload replaces the stored one.
            batch.insert(
                &self.key_packages.last_resort,
                device_key,
                encode_value(&package),
            );
            changed = true;
        } else if !had_last_resort && self.key_packages.last_resort.contains_key(&device_key)? {
            batch.remove(&self.key_packages.last_resort, device_key);
            changed = true;
        }
        if !changed {
            return Ok(KeyPackageCounts {
                one_time: u32::try_from(existing).unwrap_or(u32::MAX),
                last_resort,
            });
        }
        batch.commit()?;
        Ok(KeyPackageCounts {
            one_time: u32::try_from(existing + added).unwrap_or(u32::MAX),
            last_resort,
        })
    }

    /// Takes one key package of `device` into `batch` (a one-time one is removed when the
    /// caller commits it), skipping and removing those that end at or before `cutoff`;
    /// `None` if the device has none left. Also returns how many ended ones it removed.
    fn take_key_package_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
        device: DeviceId,
        cutoff: u64,
    ) -> Result<(Option<TakenKeyPackage>, u32), StoreError> {
        let prefix = device_keys_key(user, device);
        let mut stored = 0u32;
        let mut ended = 0u32;
        let mut taken = None;
        for entry in self.key_packages.one_time.prefix(&prefix) {
            let (key, value) = entry.into_inner()?;
            let (not_after, package) = decode_value(&value)?;
            if not_after <= cutoff {
                batch.remove(&self.key_packages.one_time, key.to_vec());
                ended += 1;
            } else if taken.is_none() {
                batch.remove(&self.key_packages.one_time, key.to_vec());
                taken = Some(package.to_vec());
            } else {
                stored += 1;
            }
        }
        if let Some(key_package) = taken {
            let taken = TakenKeyPackage {
                device,
                key_package,
                last_resort: false,
                remaining: stored,
            };
            return Ok((Some(taken), ended));
        }
        let last_resort = match self.key_packages.last_resort.get(&prefix)? {
            Some(value) => {
                let (not_after, package) = decode_value(&value)?;
                if not_after <= cutoff {
                    batch.remove(&self.key_packages.last_resort, prefix.clone());
                    ended += 1;
                    None
                } else {
                    Some(TakenKeyPackage {
                        device,
                        key_package: package.to_vec(),
                        last_resort: true,
                        remaining: 0,
                    })
                }
            }
            None => None,
        };
        Ok((last_resort, ended))
    }

    /// Hands out one key package per wanted device at `now` (see
    /// [`Self::take_key_package_into`]).
    pub(super) fn take_key_packages(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
        now: u64,
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
        let cutoff = now.saturating_add(KEY_PACKAGE_MARGIN_SECS);
        let mut taken = Vec::with_capacity(wanted.len());
        let mut refill = Vec::new();
        for device in wanted {
            let (package, ended) = self.take_key_package_into(&mut batch, user, device, cutoff)?;
            if ended > 0 {
                let remaining = package.as_ref().map_or(0, |p| p.remaining);
                refill.push((device, remaining));
            }
            taken.extend(package);
        }
        if !refill.is_empty() || taken.iter().any(|t| !t.last_resort) {
            batch.commit()?;
        }
        Ok(Some(TakenKeyPackages {
            identity,
            devices: taken,
            refill,
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
        self.call(move |db| db.put_key_packages(&user, device, upload, crate::unix_now()))
            .await
    }

    pub(super) async fn take_key_packages_now(
        &self,
        user: &Username,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Option<TakenKeyPackages>, StoreError> {
        self.writable()?;
        let user = user.clone();
        self.call(move |db| db.take_key_packages(&user, devices, crate::unix_now()))
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

    /// A `not_after` no test reaches.
    const FAR: u64 = u64::MAX / 2;

    fn name(n: &str) -> Username {
        Username::parse(n).unwrap()
    }

    fn last_resort(bytes: Vec<u8>, not_after: u64) -> Option<NewKeyPackage> {
        Some(NewKeyPackage {
            reference: Vec::new(),
            bytes,
            not_after,
        })
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
                not_after: FAR,
            })
            .collect()
    }

    #[tokio::test]
    async fn each_one_time_package_is_handed_out_once_then_the_last_resort() {
        let (dir, store) = store_with_bob().await;
        let upload = KeyPackageUpload {
            one_time: packages(0..20),
            last_resort: last_resort(vec![0xff; 300], FAR),
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

    #[tokio::test]
    async fn key_packages_go_with_their_device_and_their_account() {
        let (_dir, store) = store_with_bob().await;
        let bob = name("bob");
        let laptop = store.add_device(&bob, "laptop".into(), 5).await.unwrap();
        for device in [1, laptop] {
            let upload = KeyPackageUpload {
                one_time: packages(0..3),
                last_resort: last_resort(vec![device as u8; 10], FAR),
            };
            store.put_key_packages(&bob, device, upload).await.unwrap();
        }
        store.remove_device(&bob, laptop).await.unwrap();
        let taken = store.take_key_packages(&bob, None).await.unwrap().unwrap();
        assert_eq!(taken.devices.len(), 1);
        let prefix = super::super::inbox_writer::pair_key(&bob, &[]);
        let left = |store: &FjallStore| {
            let inner = store.current().unwrap();
            inner.key_packages.one_time.prefix(&prefix).count()
                + inner.key_packages.last_resort.prefix(&prefix).count()
        };
        assert_eq!(
            left(&store),
            3,
            "device 1's two one-time and its last resort"
        );
        store.delete_user(&bob, 0).await.unwrap();
        assert_eq!(left(&store), 0);
    }

    #[tokio::test]
    async fn ended_key_packages_are_never_handed_out() {
        let (_dir, store) = store_with_bob().await;
        let bob = name("bob");
        let now = 1_000_000_000u64;
        let inner = store.current().unwrap();
        let package = |i: u8, not_after: u64| NewKeyPackage {
            reference: vec![i; 32],
            bytes: vec![i; 300],
            not_after,
        };
        // Two one-time ones end within the margin, one after it; the last-resort one too.
        let upload = KeyPackageUpload {
            one_time: vec![
                package(1, now + KEY_PACKAGE_MARGIN_SECS),
                package(2, now + 10),
                package(3, now + KEY_PACKAGE_MARGIN_SECS + 1),
            ],
            last_resort: last_resort(vec![0xee; 300], now + 20),
        };
        // Uploaded earlier (all of it was fine then).
        let counts = inner
            .put_key_packages(&bob, 1, upload, now - 10 * KEY_PACKAGE_MARGIN_SECS)
            .unwrap();
        assert_eq!(counts.one_time, 3);
        let taken = inner.take_key_packages(&bob, None, now).unwrap().unwrap();
        assert_eq!(taken.devices.len(), 1);
        assert_eq!(taken.devices[0].key_package, vec![3; 300]);
        assert_eq!(taken.devices[0].remaining, 0);
        assert_eq!(taken.refill, vec![(1, 0)]);
        // Only the ended last-resort one is left: nothing is handed out, and it is deleted.
        let taken = inner.take_key_packages(&bob, None, now).unwrap().unwrap();
        assert!(taken.devices.is_empty());
        assert_eq!(taken.refill, vec![(1, 0)]);
        let taken = inner.take_key_packages(&bob, None, now).unwrap().unwrap();
        assert!(taken.devices.is_empty() && taken.refill.is_empty());
        // An upload deletes the ended ones first: they do not count against the limit.
        let full = KeyPackageUpload {
            one_time: (0..200).map(|i| package(i, now + 100)).collect(),
            last_resort: None,
        };
        inner.put_key_packages(&bob, 1, full, now).unwrap();
        let fresh = KeyPackageUpload {
            one_time: (0..200).map(|i| package(i, FAR)).collect(),
            last_resort: last_resort(vec![0xdd; 300], FAR),
        };
        // Same references, so nothing is added while the old ones still count...
        let later = now + KEY_PACKAGE_MARGIN_SECS;
        let counts = inner.put_key_packages(&bob, 1, fresh, later).unwrap();
        assert_eq!(counts.one_time, 200);
        assert!(counts.last_resort);
        let taken = inner.take_key_packages(&bob, None, later).unwrap().unwrap();
        assert_eq!(taken.devices[0].remaining, 199);
        // A newer last-resort upload replaces the old one.
        let newer = KeyPackageUpload {
            one_time: Vec::new(),
            last_resort: last_resort(vec![0xcc; 300], FAR),
        };
        inner.put_key_packages(&bob, 1, newer, later).unwrap();
        let value = inner
            .key_packages
            .last_resort
            .get(device_keys_key(&bob, 1))
            .unwrap()
            .unwrap();
        assert_eq!(decode_value(&value).unwrap().1, &[0xcc; 300][..]);
    }
}
