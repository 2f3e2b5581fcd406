//! The key directory's rules: what a `publish_keys` may change, and the signature checks that
//! keep the server from storing (and handing out) prekeys their owner did not sign.

use crate::e2e::{IdentityKey, verify_last_resort_prekey, verify_signed_prekey};
use crate::protocol::keys::{IdentityKeyBytes, SignedPrekey};

/// A device's published keys with its account's identity key, as one upload sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeysRecord {
    /// Ed25519 identity key.
    pub identity_key: IdentityKeyBytes,
    /// Current signed prekey.
    pub signed_prekey: SignedPrekey,
    /// Last-resort prekey, handed out when no one-time prekey is left.
    pub last_resort: SignedPrekey,
}

/// Combines an upload with what is stored. The first upload must carry all three keys; later
/// ones may replace any of them. Every prekey that is stored after the call is checked against
/// the identity key stored after the call.
pub(crate) fn merge_keys(
    existing: Option<KeysRecord>,
    identity_key: Option<IdentityKeyBytes>,
    signed_prekey: Option<SignedPrekey>,
    last_resort: Option<SignedPrekey>,
) -> Result<Option<KeysRecord>, String> {
    if identity_key.is_none() && signed_prekey.is_none() && last_resort.is_none() {
        return Ok(None);
    }
    let merged = match existing {
        Some(old) => KeysRecord {
            identity_key: identity_key.unwrap_or(old.identity_key),
            signed_prekey: signed_prekey.unwrap_or(old.signed_prekey),
            last_resort: last_resort.unwrap_or(old.last_resort),
        },
        None => match (identity_key, signed_prekey, last_resort) {
            (Some(identity_key), Some(signed_prekey), Some(last_resort)) => KeysRecord {
                identity_key,
                signed_prekey,
                last_resort,
            },
            _ => {
                return Err(
                    "the first upload needs identity_key, signed_prekey and last_resort".into(),
                );
            }
        },
    };
    let identity = IdentityKey::from_bytes(&merged.identity_key.0)
        .map_err(|_| "identity_key is not a valid Ed25519 public key".to_owned())?;
    let (spk, last) = (&merged.signed_prekey, &merged.last_resort);
    verify_signed_prekey(&identity, spk.id, &spk.key.0, &spk.signature.0)
        .map_err(|e| format!("signed prekey {}: {e}", spk.id))?;
    verify_last_resort_prekey(&identity, last.id, &last.key.0, &last.signature.0)
        .map_err(|e| format!("last-resort prekey {}: {e}", last.id))?;
    Ok(Some(merged))
}
