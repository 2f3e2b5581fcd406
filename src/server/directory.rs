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
