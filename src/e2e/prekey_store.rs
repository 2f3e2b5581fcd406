//! The client's private prekeys: signed, last-resort and one-time X25519 secrets by id, with
//! their signatures, ready to persist.
//!
//! Two id spaces: signed prekeys have their own; one-time prekeys and the last-resort prekey
//! share one, so an initial header's `one_time_prekey_id` names either without a flag.

use serde::{Deserialize, Serialize};

use super::keys::{Secret32, fresh_secret, push_wiping, retain_wiping, x25519_public};
use super::prekeys::{LAST_RESORT_LABEL, SIGNED_PREKEY_LABEL, signed_message};
use super::{
    E2eError, IdentityKeyPair, OneTimePrekeyPublic, OsRandom, SecretSource, SignedPrekeyPublic,
};

/// Signed prekeys kept after rotation, newest included, so that initial messages built on a
/// recently replaced bundle still decrypt.
pub const MAX_SIGNED_PREKEYS: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignedSecret {
    id: u32,
    secret: Secret32,
    #[serde(with = "serde_bytes")]
    signature: [u8; 64],
}

impl SignedSecret {
    fn new(identity: &IdentityKeyPair, label: &[u8], id: u32, secret: Secret32) -> Self {
        let signature = identity.sign(&signed_message(label, id, &x25519_public(&secret)));
        Self {
            id,
            secret,
            signature,
        }
    }

    fn public(&self) -> SignedPrekeyPublic {
        SignedPrekeyPublic {
            id: self.id,
            key: x25519_public(&self.secret),
            signature: self.signature,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OneTimeSecret {
    id: u32,
    secret: Secret32,
}

/// The client's private prekeys, by id. Serializable (named MessagePack, secrets as `bin`) so
/// the client can persist it; secrets are wiped when dropped.
///
/// A one-time prekey is removed once a session built on it has decrypted its first message;
/// the last-resort prekey is never removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrekeyStore {
    signed: SignedSecret,
    /// Replaced signed prekeys, oldest first, kept for initial messages still in flight.
    previous_signed: Vec<SignedSecret>,
    last_resort: SignedSecret,
    one_time: Vec<OneTimeSecret>,
    next_signed_id: u32,
    /// Next id in the space shared by one-time and last-resort prekeys.
    next_prekey_id: u32,
}

fn next_id(counter: &mut u32) -> Result<u32, E2eError> {
    let id = *counter;
    *counter = id.checked_add(1).ok_or(E2eError::CounterExhausted)?;
    Ok(id)
}

impl PrekeyStore {
    /// A new store: signed prekey 1, last-resort prekey 1 and one-time prekeys 2, 3, … from
    /// the operating system's CSPRNG.
    pub fn generate(identity: &IdentityKeyPair, one_time_count: u32) -> Result<Self, E2eError> {
        Self::generate_with(&mut OsRandom, identity, one_time_count)
    }

    /// [`Self::generate`] drawing secrets from `source`: signed prekey, then last-resort, then
    /// the one-time prekeys in id order.
    pub fn generate_with(
        source: &mut impl SecretSource,
        identity: &IdentityKeyPair,
        one_time_count: u32,
    ) -> Result<Self, E2eError> {
        let signed = SignedSecret::new(identity, SIGNED_PREKEY_LABEL, 1, fresh_secret(source)?);
        let last_resort = SignedSecret::new(identity, LAST_RESORT_LABEL, 1, fresh_secret(source)?);
        let mut store = Self {
            signed,
            previous_signed: Vec::new(),
            last_resort,
            one_time: Vec::new(),
            next_signed_id: 2,
            next_prekey_id: 2,
        };
        store.add_one_time_prekeys_with(source, one_time_count)?;
        Ok(store)
    }

    /// A store from given secrets and ids (restoring keys, or fixed test vectors). Ids must be
    /// distinct among the last-resort and one-time prekeys.
    pub fn from_secrets(
        identity: &IdentityKeyPair,
        signed_prekey: (u32, [u8; 32]),
        last_resort_prekey: (u32, [u8; 32]),
        one_time_prekeys: &[(u32, [u8; 32])],
    ) -> Result<Self, E2eError> {
        let (spk_id, spk) = signed_prekey;
        let (lr_id, lr) = last_resort_prekey;
        let mut store = Self {
            signed: SignedSecret::new(identity, SIGNED_PREKEY_LABEL, spk_id, Secret32::new(spk)),
            previous_signed: Vec::new(),
            last_resort: SignedSecret::new(identity, LAST_RESORT_LABEL, lr_id, Secret32::new(lr)),
            one_time: Vec::with_capacity(one_time_prekeys.len()),
            next_signed_id: spk_id.saturating_add(1),
            next_prekey_id: lr_id.saturating_add(1),
        };
        for (id, secret) in one_time_prekeys {
            if *id == lr_id || store.one_time.iter().any(|k| k.id == *id) {
                return Err(E2eError::DuplicatePrekeyId { id: *id });
            }
            let secret = Secret32::new(*secret);
            push_wiping(&mut store.one_time, OneTimeSecret { id: *id, secret });
            store.next_prekey_id = store.next_prekey_id.max(id.saturating_add(1));
        }
        Ok(store)
    }

    /// The current signed prekey, to upload.
    pub fn signed_prekey(&self) -> SignedPrekeyPublic {
        self.signed.public()
    }

    /// The last-resort prekey, to upload.
    pub fn last_resort_prekey(&self) -> SignedPrekeyPublic {
        self.last_resort.public()
    }

    /// Every one-time prekey not used yet, to upload.
    pub fn one_time_prekeys(&self) -> Vec<OneTimePrekeyPublic> {
        self.one_time
            .iter()
            .map(|k| OneTimePrekeyPublic {
                id: k.id,
                key: x25519_public(&k.secret),
            })
            .collect()
    }

    /// How many one-time prekeys are unused.
    pub fn one_time_count(&self) -> usize {
        self.one_time.len()
    }

    /// Makes `count` more one-time prekeys and returns their public halves, to upload.
    pub fn add_one_time_prekeys(
        &mut self,
        count: u32,
    ) -> Result<Vec<OneTimePrekeyPublic>, E2eError> {
        self.add_one_time_prekeys_with(&mut OsRandom, count)
    }

    /// [`Self::add_one_time_prekeys`] drawing secrets from `source`.
    pub fn add_one_time_prekeys_with(
        &mut self,
        source: &mut impl SecretSource,
        count: u32,
    ) -> Result<Vec<OneTimePrekeyPublic>, E2eError> {
        let mut added = Vec::new();
        for _ in 0..count {
            let secret = fresh_secret(source)?;
            let id = next_id(&mut self.next_prekey_id)?;
            added.push(OneTimePrekeyPublic {
                id,
                key: x25519_public(&secret),
            });
            push_wiping(&mut self.one_time, OneTimeSecret { id, secret });
        }
        Ok(added)
    }

    /// Makes a new current signed prekey (keeping the last [`MAX_SIGNED_PREKEYS`]) and returns
    /// it, to upload.
    pub fn rotate_signed_prekey(
        &mut self,
        identity: &IdentityKeyPair,
    ) -> Result<SignedPrekeyPublic, E2eError> {
        self.rotate_signed_prekey_with(&mut OsRandom, identity)
    }

    /// [`Self::rotate_signed_prekey`] drawing the secret from `source`.
    pub fn rotate_signed_prekey_with(
        &mut self,
        source: &mut impl SecretSource,
        identity: &IdentityKeyPair,
    ) -> Result<SignedPrekeyPublic, E2eError> {
        let secret = fresh_secret(source)?;
        let id = next_id(&mut self.next_signed_id)?;
        let signed = SignedSecret::new(identity, SIGNED_PREKEY_LABEL, id, secret);
        let public = signed.public();
        let replaced = std::mem::replace(&mut self.signed, signed);
        push_wiping(&mut self.previous_signed, replaced);
        if self.previous_signed.len() >= MAX_SIGNED_PREKEYS
            && let Some(oldest) = self.previous_signed.first().map(|k| k.id)
        {
            retain_wiping(&mut self.previous_signed, |k| k.id != oldest);
        }
        Ok(public)
    }

    /// The secret of signed prekey `id`.
    pub(crate) fn signed_secret(&self, id: u32) -> Result<&Secret32, E2eError> {
        std::iter::once(&self.signed)
            .chain(&self.previous_signed)
            .find(|k| k.id == id)
            .map(|k| &k.secret)
            .ok_or(E2eError::UnknownPrekey { id })
    }

    /// The secret of one-time or last-resort prekey `id`.
    pub(crate) fn prekey_secret(&self, id: u32) -> Result<&Secret32, E2eError> {
        if self.last_resort.id == id {
            return Ok(&self.last_resort.secret);
        }
        self.one_time
            .iter()
            .find(|k| k.id == id)
            .map(|k| &k.secret)
            .ok_or(E2eError::UnknownPrekey { id })
    }

    /// Forgets one-time prekey `id` (its secret is wiped); the last-resort key stays.
    pub(crate) fn consume(&mut self, id: u32) {
        retain_wiping(&mut self.one_time, |k| k.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (IdentityKeyPair, PrekeyStore) {
        let identity = IdentityKeyPair::from_seed(&[1; 32]);
        let store =
            PrekeyStore::from_secrets(&identity, (7, [2; 32]), (1, [3; 32]), &[(2, [4; 32])])
                .unwrap();
        (identity, store)
    }

    #[test]
    fn one_time_keys_are_consumed_but_the_last_resort_stays() {
        let (_, mut store) = store();
        assert!(store.prekey_secret(2).is_ok());
        store.consume(2);
        assert_eq!(
            store.prekey_secret(2).err(),
            Some(E2eError::UnknownPrekey { id: 2 })
        );
        store.consume(1);
        assert!(store.prekey_secret(1).is_ok());
    }

    #[test]
    fn ids_never_collide() {
        let identity = IdentityKeyPair::from_seed(&[1; 32]);
        assert_eq!(
            PrekeyStore::from_secrets(&identity, (1, [2; 32]), (5, [3; 32]), &[(5, [4; 32])]).err(),
            Some(E2eError::DuplicatePrekeyId { id: 5 })
        );
        let mut store = PrekeyStore::generate(&identity, 3).unwrap();
        let new = store.add_one_time_prekeys(2).unwrap();
        let mut ids: Vec<u32> = store.one_time_prekeys().iter().map(|k| k.id).collect();
        ids.push(store.last_resort_prekey().id);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 6);
        assert_eq!(new.len(), 2);
    }

    #[test]
    fn rotation_keeps_recent_signed_prekeys() {
        let (identity, mut store) = store();
        let mut ids = vec![7];
        for _ in 0..MAX_SIGNED_PREKEYS {
            ids.push(store.rotate_signed_prekey(&identity).unwrap().id);
        }
        assert!(store.signed_secret(ids[0]).is_err());
        for id in &ids[1..] {
            assert!(store.signed_secret(*id).is_ok());
        }
        assert_eq!(store.signed_prekey().id, *ids.last().unwrap());
    }

    #[test]
    fn store_round_trips_and_masks_secrets() {
        let (_, store) = store();
        assert!(!format!("{store:?}").contains("[2, 2"));
        let bytes = rmp_serde::to_vec_named(&store).unwrap();
        let back: PrekeyStore = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.one_time_prekeys(), store.one_time_prekeys());
        assert_eq!(back.signed_prekey(), store.signed_prekey());
    }
}
