//! Prekeys as they travel: the public halves uploaded to the server and handed out in bundles,
//! and the signature checks the server (on upload) and initiators (on every bundle) run on
//! them. The private halves live in `prekey_store`.

use serde::{Deserialize, Serialize};

use super::keys::{Secret32, dh};
use super::{E2eError, IdentityKey};

/// Signature domain of a signed prekey: `label ‖ u32-be(id) ‖ public key`.
pub(crate) const SIGNED_PREKEY_LABEL: &[u8] = b"SFC signed prekey v1";
/// Signature domain of the last-resort prekey, distinct so neither can pose as the other.
pub(crate) const LAST_RESORT_LABEL: &[u8] = b"SFC last-resort prekey v1";

/// A signed prekey (or the last-resort prekey) as uploaded and handed out:
/// `{id: uint32, key: bin 32, signature: bin 64}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPrekeyPublic {
    /// Chosen by the owner; unique among its signed prekeys (or its one-time/last-resort ids).
    pub id: u32,
    /// X25519 public key.
    #[serde(with = "serde_bytes")]
    pub key: [u8; 32],
    /// Ed25519 signature by the owner's identity key over the domain-separated message.
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
}

/// A one-time prekey as uploaded and handed out: `{id: uint32, key: bin 32}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimePrekeyPublic {
    /// Chosen by the owner; unique among its one-time and last-resort prekeys.
    pub id: u32,
    /// X25519 public key.
    #[serde(with = "serde_bytes")]
    pub key: [u8; 32],
}

/// What the server hands an initiator for one user.
///
/// The server includes one unused one-time prekey (and deletes it) while any are left. When
/// none are left it omits `one_time_prekey` and sends the last-resort prekey instead, which it
/// never deletes. The initiator uses `one_time_prekey` if present, otherwise
/// `last_resort_prekey` (checking its signature), otherwise neither (three-DH X3DH).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeyBundle {
    /// The owner's identity key.
    pub identity_key: IdentityKey,
    /// The owner's current signed prekey.
    pub signed_prekey: SignedPrekeyPublic,
    /// One unused one-time prekey, when the server has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_prekey: Option<OneTimePrekeyPublic>,
    /// The last-resort prekey, sent only when no one-time prekey is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resort_prekey: Option<SignedPrekeyPublic>,
}

impl PrekeyBundle {
    /// Checks every signature in the bundle against its identity key.
    pub fn verify(&self) -> Result<(), E2eError> {
        let spk = &self.signed_prekey;
        verify_signed_prekey(&self.identity_key, spk.id, &spk.key, &spk.signature)?;
        if let Some(lr) = &self.last_resort_prekey {
            verify_last_resort_prekey(&self.identity_key, lr.id, &lr.key, &lr.signature)?;
        }
        if let Some(otp) = &self.one_time_prekey {
            check_x25519_public(&otp.key)?;
        }
        Ok(())
    }
}

pub(crate) fn signed_message(label: &[u8], id: u32, public: &[u8; 32]) -> Vec<u8> {
    [label, &id.to_be_bytes(), public].concat()
}

/// Refuses X25519 public keys of small order: any clamped scalar maps them to zero.
fn check_x25519_public(public: &[u8; 32]) -> Result<(), E2eError> {
    dh(&Secret32::new([1; 32]), public).map(drop)
}

/// Checks a signed prekey as the server must on upload (and initiators on every bundle):
/// `signature` is `identity`'s Ed25519 signature over
/// `"SFC signed prekey v1" ‖ u32-be(id) ‖ public`, and `public` is not of small order.
pub fn verify_signed_prekey(
    identity: &IdentityKey,
    id: u32,
    public: &[u8; 32],
    signature: &[u8; 64],
) -> Result<(), E2eError> {
    identity.verify(&signed_message(SIGNED_PREKEY_LABEL, id, public), signature)?;
    check_x25519_public(public)
}

/// Checks the last-resort prekey the same way, over
/// `"SFC last-resort prekey v1" ‖ u32-be(id) ‖ public`.
pub fn verify_last_resort_prekey(
    identity: &IdentityKey,
    id: u32,
    public: &[u8; 32],
    signature: &[u8; 64],
) -> Result<(), E2eError> {
    identity.verify(&signed_message(LAST_RESORT_LABEL, id, public), signature)?;
    check_x25519_public(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::{IdentityKeyPair, PrekeyStore};

    fn store() -> (IdentityKeyPair, PrekeyStore) {
        let identity = IdentityKeyPair::from_seed(&[1; 32]);
        let store =
            PrekeyStore::from_secrets(&identity, (7, [2; 32]), (1, [3; 32]), &[(2, [4; 32])])
                .unwrap();
        (identity, store)
    }

    #[test]
    fn uploaded_prekeys_pass_the_servers_check() {
        let (identity, store) = store();
        let spk = store.signed_prekey();
        assert_eq!(spk.id, 7);
        let ik = identity.public();
        assert_eq!(
            verify_signed_prekey(&ik, spk.id, &spk.key, &spk.signature),
            Ok(())
        );
        let lr = store.last_resort_prekey();
        assert_eq!(
            verify_last_resort_prekey(&ik, lr.id, &lr.key, &lr.signature),
            Ok(())
        );
        // Neither signature passes for the other kind, another id, or another key.
        assert!(verify_signed_prekey(&ik, lr.id, &lr.key, &lr.signature).is_err());
        assert!(verify_last_resort_prekey(&ik, spk.id, &spk.key, &spk.signature).is_err());
        assert!(verify_signed_prekey(&ik, 8, &spk.key, &spk.signature).is_err());
        let other = IdentityKeyPair::from_seed(&[9; 32]).public();
        assert_eq!(
            verify_signed_prekey(&other, spk.id, &spk.key, &spk.signature),
            Err(E2eError::BadSignature)
        );
    }

    #[test]
    fn small_order_prekeys_are_refused_even_when_signed() {
        let identity = IdentityKeyPair::from_seed(&[1; 32]);
        let key = [0u8; 32];
        let signature = identity.sign(&signed_message(SIGNED_PREKEY_LABEL, 1, &key));
        assert_eq!(
            verify_signed_prekey(&identity.public(), 1, &key, &signature),
            Err(E2eError::InvalidKey)
        );
    }
}
