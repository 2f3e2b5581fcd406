//! The key directory's rules: what a `publish_keys` may change, and the signature checks that
//! keep the server from storing (and handing out) prekeys their owner did not sign. The identity
//! key is the account's; signed and last-resort prekeys are each device's, signed by the
//! account's identity.

use crate::e2e::{IdentityKey, verify_last_resort_prekey, verify_signed_prekey};
use crate::protocol::keys::{IdentityKeyBytes, SignedPrekey};
use crate::store::DeviceKeys;

/// Why an upload was refused; nothing of it is stored.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeysRefused {
    /// A key is missing, malformed, or not signed by the identity (`invalid_keys`).
    Invalid(String),
    /// The upload names an identity other than the account's (`identity_mismatch`).
    IdentityMismatch,
}

/// What an accepted upload stores.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Merged {
    /// The account's identity, when it has none yet (its first device's first upload).
    pub identity: Option<IdentityKeyBytes>,
    /// The device's keys, when the upload changes them.
    pub keys: Option<DeviceKeys>,
}

/// Combines an upload for one device with what is stored: the account's identity (if any)
/// and the device's keys (if any). A device's first upload must carry both prekeys, and the
/// identity too if the account has none; later ones may replace either prekey. An identity in
/// the upload must be the stored one. Every prekey the device has after the call is checked
/// against the account's identity.
pub(crate) fn merge_keys(
    stored_identity: Option<IdentityKeyBytes>,
    existing: Option<DeviceKeys>,
    identity_key: Option<IdentityKeyBytes>,
    signed_prekey: Option<SignedPrekey>,
    last_resort: Option<SignedPrekey>,
) -> Result<Merged, KeysRefused> {
    if let (Some(stored), Some(given)) = (stored_identity, identity_key)
        && stored != given
    {
        return Err(KeysRefused::IdentityMismatch);
    }
    let new_identity = match stored_identity {
        Some(_) => None,
        None => identity_key,
    };
    let Some(identity) = stored_identity.or(identity_key) else {
        return Err(KeysRefused::Invalid(
            "the account's first upload needs identity_key, signed_prekey and last_resort".into(),
        ));
    };
    if signed_prekey.is_none() && last_resort.is_none() {
        return match (&existing, new_identity) {
            // Nothing changes (at most the stored identity was repeated).
            (Some(_), None) => Ok(Merged {
                identity: None,
                keys: None,
            }),
            _ => Err(KeysRefused::Invalid(
                "a device's first upload needs signed_prekey and last_resort".into(),
            )),
        };
    }
    let keys = match existing {
        Some(old) => DeviceKeys {
            signed_prekey: signed_prekey.unwrap_or(old.signed_prekey),
            last_resort: last_resort.unwrap_or(old.last_resort),
        },
        None => match (signed_prekey, last_resort) {
            (Some(signed_prekey), Some(last_resort)) => DeviceKeys {
                signed_prekey,
                last_resort,
            },
            _ => {
                return Err(KeysRefused::Invalid(
                    "a device's first upload needs signed_prekey and last_resort".into(),
                ));
            }
        },
    };
    check_signatures(&identity, &keys).map_err(KeysRefused::Invalid)?;
    Ok(Merged {
        identity: new_identity,
        keys: Some(keys),
    })
}

/// Checks that both of a device's prekeys are signed by `identity`.
pub(crate) fn check_signatures(
    identity: &IdentityKeyBytes,
    keys: &DeviceKeys,
) -> Result<(), String> {
    let identity = IdentityKey::from_bytes(&identity.0)
        .map_err(|_| "identity_key is not a valid Ed25519 public key".to_owned())?;
    let (spk, last) = (&keys.signed_prekey, &keys.last_resort);
    verify_signed_prekey(&identity, spk.id, &spk.key.0, &spk.signature.0)
        .map_err(|e| format!("signed prekey {}: {e}", spk.id))?;
    verify_last_resort_prekey(&identity, last.id, &last.key.0, &last.signature.0)
        .map_err(|e| format!("last-resort prekey {}: {e}", last.id))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::{IdentityKeyPair, PrekeyStore, SignedPrekeyPublic};
    use crate::protocol::keys::Bin;

    fn wire(s: SignedPrekeyPublic) -> SignedPrekey {
        SignedPrekey {
            id: s.id,
            key: Bin(s.key),
            signature: Bin(s.signature),
        }
    }

    fn device(identity: &IdentityKeyPair) -> DeviceKeys {
        let prekeys = PrekeyStore::generate(identity, 0).unwrap();
        DeviceKeys {
            signed_prekey: wire(prekeys.signed_prekey()),
            last_resort: wire(prekeys.last_resort_prekey()),
        }
    }

    fn public(identity: &IdentityKeyPair) -> IdentityKeyBytes {
        Bin(*identity.public().as_bytes())
    }

    #[test]
    fn an_accounts_first_upload_carries_its_identity_and_a_devices_first_its_prekeys() {
        let alice = IdentityKeyPair::generate().unwrap();
        let keys = device(&alice);
        let (spk, lr) = (keys.signed_prekey.clone(), keys.last_resort.clone());
        // The account's first device: identity and both prekeys.
        let merged = merge_keys(
            None,
            None,
            Some(public(&alice)),
            Some(spk.clone()),
            Some(lr.clone()),
        )
        .unwrap();
        assert_eq!(merged.identity, Some(public(&alice)));
        assert_eq!(merged.keys.as_ref(), Some(&keys));
        // Without the identity the account has none to check against.
        assert!(matches!(
            merge_keys(None, None, None, Some(spk.clone()), Some(lr.clone())),
            Err(KeysRefused::Invalid(_))
        ));
        // A linked device: the stored identity, its own prekeys; the identity may be repeated.
        let laptop = device(&alice);
        for given in [None, Some(public(&alice))] {
            let merged = merge_keys(
                Some(public(&alice)),
                None,
                given,
                Some(laptop.signed_prekey.clone()),
                Some(laptop.last_resort.clone()),
            )
            .unwrap();
            assert_eq!((merged.identity, merged.keys), (None, Some(laptop.clone())));
        }
        // A device's first upload needs both prekeys.
        assert!(matches!(
            merge_keys(Some(public(&alice)), None, None, Some(spk), None),
            Err(KeysRefused::Invalid(_))
        ));
    }

    #[test]
    fn another_identity_is_refused_and_prekeys_must_be_signed_by_the_accounts() {
        let alice = IdentityKeyPair::generate().unwrap();
        let mallory = IdentityKeyPair::generate().unwrap();
        let theirs = device(&mallory);
        assert_eq!(
            merge_keys(
                Some(public(&alice)),
                None,
                Some(public(&mallory)),
                Some(theirs.signed_prekey.clone()),
                Some(theirs.last_resort.clone()),
            ),
            Err(KeysRefused::IdentityMismatch)
        );
        // Prekeys signed by another identity, offered under alice's.
        assert!(matches!(
            merge_keys(
                Some(public(&alice)),
                None,
                None,
                Some(theirs.signed_prekey.clone()),
                Some(theirs.last_resort.clone()),
            ),
            Err(KeysRefused::Invalid(_))
        ));
        // A later upload replaces one prekey and keeps the other.
        let mine = device(&alice);
        let newer = device(&alice);
        let merged = merge_keys(
            Some(public(&alice)),
            Some(mine.clone()),
            None,
            Some(newer.signed_prekey.clone()),
            None,
        )
        .unwrap();
        assert_eq!(
            merged.keys,
            Some(DeviceKeys {
                signed_prekey: newer.signed_prekey,
                last_resort: mine.last_resort.clone(),
            })
        );
        // Nothing new: nothing stored.
        let same = merge_keys(Some(public(&alice)), Some(mine), None, None, None).unwrap();
        assert_eq!((same.identity, same.keys), (None, None));
    }
}
