//! The key directory's rules: what a `publish_keys` may change, and the signature checks that
//! keep the server from storing (and handing out) prekeys their owner did not sign.

use ed25519_dalek::{Signature, VerifyingKey};

use crate::protocol::keys::{IdentityKeyBytes, SignedPrekey};
use crate::store::KeysRecord;

/// Signature domain of signed prekeys (see the E2E section of docs/PROTOCOL.md).
const SIGNED_PREKEY_LABEL: &[u8] = b"SFC signed prekey v1";
/// Signature domain of last-resort prekeys.
const LAST_RESORT_LABEL: &[u8] = b"SFC last-resort prekey v1";

fn verify(identity: &VerifyingKey, label: &[u8], prekey: &SignedPrekey) -> Result<(), String> {
    let mut message = Vec::with_capacity(label.len() + 4 + 32);
    message.extend_from_slice(label);
    message.extend_from_slice(&prekey.id.to_be_bytes());
    message.extend_from_slice(&prekey.key.0);
    let signature = Signature::from_bytes(&prekey.signature.0);
    identity
        .verify_strict(&message, &signature)
        .map_err(|_| format!("the signature of prekey {} does not verify", prekey.id))
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
    let identity = VerifyingKey::from_bytes(&merged.identity_key.0)
        .map_err(|_| "identity_key is not a valid Ed25519 public key".to_owned())?;
    verify(&identity, SIGNED_PREKEY_LABEL, &merged.signed_prekey)?;
    verify(&identity, LAST_RESORT_LABEL, &merged.last_resort)?;
    Ok(Some(merged))
}
