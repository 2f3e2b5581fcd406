//! The key directory in fjall: `keys` (username → [`KeysRecord`]) and `prekeys`
//! (username 0x00 id(u32 BE) → X25519 public key). Changes run under one mutex and are synced
//! before they return, so a one-time prekey is handed out at most once, even across a crash.

use std::sync::Mutex;

use fjall::{Database, Keyspace, OwnedWriteBatch, PersistMode};

use super::inbox_writer::pair_key;
use super::{KeysRecord, StoreError, TakenBundle};
use crate::protocol::Username;
use crate::protocol::keys::{Bin, OneTimePrekey};

/// One-time prekeys a user may have stored at once.
pub const MAX_ONE_TIME_PREKEYS: usize = 500;

pub(super) struct KeyDirectory {
    pub db: Database,
    pub keys: Keyspace,
    pub prekeys: Keyspace,
    pub lock: Mutex<()>,
}

fn decode_keys(bytes: &[u8]) -> Result<KeysRecord, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        keyspace: "keys",
        reason: e.to_string(),
    })
}

impl KeyDirectory {
    fn prefix(user: &Username) -> Vec<u8> {
        pair_key(user, &[])
    }

    fn count(&self, user: &Username) -> usize {
        self.prekeys.prefix(Self::prefix(user)).count()
    }

    pub fn put(
        &self,
        user: &Username,
        keys: Option<KeysRecord>,
        one_time: Vec<OneTimePrekey>,
    ) -> Result<u32, StoreError> {
        let _guard = self.lock.lock().map_err(|_| StoreError::Poisoned)?;
        // A new identity key makes every stored one-time prekey useless (their private halves
        // belong to the old identity's client): they go in the same batch, so a bundle never
        // pairs the new identity with an old prekey.
        let replaced_identity = match (&keys, self.get(user)?) {
            (Some(new), Some(old)) => new.identity_key != old.identity_key,
            _ => false,
        };
        let stale: Vec<_> = if replaced_identity {
            self.prekeys
                .prefix(Self::prefix(user))
                .map(|entry| entry.key().map(|k| k.to_vec()))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let existing = self.count(user).saturating_sub(stale.len());
        if existing + one_time.len() > MAX_ONE_TIME_PREKEYS {
            return Err(StoreError::Limit(format!(
                "at most {MAX_ONE_TIME_PREKEYS} one-time prekeys may be stored ({existing} are)"
            )));
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for key in stale {
            batch.remove(&self.prekeys, key);
        }
        if let Some(keys) = keys {
            batch.insert(
                &self.keys,
                user.as_str().as_bytes().to_vec(),
                rmp_serde::to_vec_named(&keys)?,
            );
        }
        let mut added = 0;
        for prekey in one_time {
            let key = pair_key(user, &prekey.id.to_be_bytes());
            if replaced_identity || !self.prekeys.contains_key(&key)? {
                added += 1;
            }
            batch.insert(&self.prekeys, key, prekey.key.0.to_vec());
        }
        batch.commit()?;
        Ok(u32::try_from(existing + added).unwrap_or(u32::MAX))
    }

    /// Adds the removal of `user`'s keys and one-time prekeys to `batch`; the caller holds
    /// `lock` until the batch is committed.
    pub fn remove_into(
        &self,
        batch: &mut OwnedWriteBatch,
        user: &Username,
    ) -> Result<(), StoreError> {
        batch.remove(&self.keys, user.as_str().as_bytes().to_vec());
        for entry in self.prekeys.prefix(Self::prefix(user)) {
            batch.remove(&self.prekeys, entry.key()?.to_vec());
        }
        Ok(())
    }

    pub fn get(&self, user: &Username) -> Result<Option<KeysRecord>, StoreError> {
        match self.keys.get(user.as_str().as_bytes())? {
            Some(bytes) => decode_keys(&bytes).map(Some),
            None => Ok(None),
        }
    }

    pub fn take_bundle(&self, user: &Username) -> Result<Option<TakenBundle>, StoreError> {
        let _guard = self.lock.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(keys) = self.get(user)? else {
            return Ok(None);
        };
        let prefix = Self::prefix(user);
        let mut iter = self.prekeys.prefix(&prefix);
        let one_time_prekey = match iter.next() {
            Some(entry) => {
                let (key, value) = entry.into_inner()?;
                let corrupt = |reason: &str| StoreError::Corrupt {
                    keyspace: "prekeys",
                    reason: reason.into(),
                };
                let id_bytes: [u8; 4] = key
                    .get(prefix.len()..)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| corrupt("bad key"))?;
                let public: [u8; 32] = value
                    .as_ref()
                    .try_into()
                    .map_err(|_| corrupt("bad value"))?;
                self.prekeys.remove(key.to_vec())?;
                self.db.persist(PersistMode::SyncData)?;
                Some(OneTimePrekey {
                    id: u32::from_be_bytes(id_bytes),
                    key: Bin(public),
                })
            }
            None => None,
        };
        drop(iter);
        let remaining = u32::try_from(self.count(user)).unwrap_or(u32::MAX);
        Ok(Some(TakenBundle {
            keys,
            one_time_prekey,
            remaining,
        }))
    }
}
