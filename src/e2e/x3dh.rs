//! X3DH key agreement (<https://signal.org/docs/specifications/x3dh/>): the initiator turns a
//! [`PrekeyBundle`] into a shared secret and an [`InitialHeader`]; the responder turns that
//! header and its [`PrekeyStore`] into the same secret.
//!
//! Identity keys are Ed25519 and enter the DHs through the conversion in `identity`.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::keys::{Secret32, dh, hkdf_sha256, x25519_public};
use super::{E2eError, IdentityKey, IdentityKeyPair, PrekeyBundle, PrekeyStore};

/// HKDF info string of the X3DH shared secret.
const X3DH_INFO: &[u8] = b"SecureFastChat X3DH v1";

/// Length of the associated data X3DH yields: IK_A ‖ IK_B (Ed25519 encodings).
pub const ASSOCIATED_DATA_LEN: usize = 64;

/// What the initiator tells the responder so it can run X3DH too. It travels in every
/// envelope the initiator sends until the responder's first reply arrives:
/// `{identity_key: bin 32, ephemeral_key: bin 32, signed_prekey_id: uint32,
/// one_time_prekey_id?: uint32}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialHeader {
    /// The initiator's identity key (IK_A).
    pub identity_key: IdentityKey,
    /// The initiator's ephemeral X25519 public key (EK_A).
    #[serde(with = "serde_bytes")]
    pub ephemeral_key: [u8; 32],
    /// Which of the responder's signed prekeys was used.
    pub signed_prekey_id: u32,
    /// Which one-time (or last-resort) prekey was used; absent if none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_prekey_id: Option<u32>,
}

/// The result of X3DH on either side.
pub(crate) struct Agreement {
    /// SK: the root of the Double Ratchet.
    pub(crate) shared_secret: Secret32,
    /// AD = IK_A ‖ IK_B, bound into every message's AEAD.
    pub(crate) associated_data: [u8; ASSOCIATED_DATA_LEN],
}

/// The initiator's result: the agreement, the header to send, and the responder's signed
/// prekey, which is the first ratchet key the initiator sends to.
pub(crate) struct Initiation {
    pub(crate) agreement: Agreement,
    pub(crate) header: InitialHeader,
    pub(crate) peer_ratchet_key: [u8; 32],
}

/// SK = HKDF-SHA256(salt = 32 × 0x00, ikm = 32 × 0xFF ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4], info).
fn derive(dhs: &[&Secret32]) -> Result<Secret32, E2eError> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * (dhs.len() + 1)));
    ikm.extend_from_slice(&[0xff; 32]);
    for dh in dhs {
        ikm.extend_from_slice(dh.expose());
    }
    let mut sk = Secret32::new([0; 32]);
    hkdf_sha256(&[0; 32], &ikm, X3DH_INFO, sk.expose_mut())?;
    Ok(sk)
}

fn associated_data(initiator: &IdentityKey, responder: &IdentityKey) -> [u8; 64] {
    let mut ad = [0u8; ASSOCIATED_DATA_LEN];
    ad[..32].copy_from_slice(initiator.as_bytes());
    ad[32..].copy_from_slice(responder.as_bytes());
    ad
}

/// Runs X3DH as the initiator with the ephemeral private key `ephemeral`.
///
/// Checks the bundle's signatures first. Uses the one-time prekey if there is one, else the
/// last-resort prekey, else neither.
pub(crate) fn initiate(
    me: &IdentityKeyPair,
    bundle: &PrekeyBundle,
    ephemeral: Secret32,
) -> Result<Initiation, E2eError> {
    bundle.verify()?;
    let spk = &bundle.signed_prekey.key;
    let opk = match (&bundle.one_time_prekey, &bundle.last_resort_prekey) {
        (Some(otp), _) => Some((otp.id, otp.key)),
        (None, Some(lr)) => Some((lr.id, lr.key)),
        (None, None) => None,
    };
    let peer_identity = bundle.identity_key.to_x25519()?;
    let dh1 = dh(&me.x25519_secret(), spk)?;
    let dh2 = dh(&ephemeral, &peer_identity)?;
    let dh3 = dh(&ephemeral, spk)?;
    let shared_secret = match opk {
        Some((_, opk)) => derive(&[&dh1, &dh2, &dh3, &dh(&ephemeral, &opk)?])?,
        None => derive(&[&dh1, &dh2, &dh3])?,
    };
    Ok(Initiation {
        agreement: Agreement {
            shared_secret,
            associated_data: associated_data(&me.public(), &bundle.identity_key),
        },
        header: InitialHeader {
            identity_key: me.public(),
            ephemeral_key: x25519_public(&ephemeral),
            signed_prekey_id: bundle.signed_prekey.id,
            one_time_prekey_id: opk.map(|(id, _)| id),
        },
        peer_ratchet_key: *spk,
    })
}

/// Runs X3DH as the responder. Returns the agreement and the private signed prekey the
/// initiator used (the responder's first ratchet key). Does not consume the one-time prekey:
/// the session does that once the first message has decrypted.
pub(crate) fn respond(
    me: &IdentityKeyPair,
    store: &PrekeyStore,
    header: &InitialHeader,
) -> Result<(Agreement, Secret32), E2eError> {
    let spk = store.signed_secret(header.signed_prekey_id)?;
    let peer_identity = header.identity_key.to_x25519()?;
    let ek = &header.ephemeral_key;
    let dh1 = dh(spk, &peer_identity)?;
    let dh2 = dh(&me.x25519_secret(), ek)?;
    let dh3 = dh(spk, ek)?;
    let shared_secret = match header.one_time_prekey_id {
        Some(id) => derive(&[&dh1, &dh2, &dh3, &dh(store.prekey_secret(id)?, ek)?])?,
        None => derive(&[&dh1, &dh2, &dh3])?,
    };
    let agreement = Agreement {
        shared_secret,
        associated_data: associated_data(&header.identity_key, &me.public()),
    };
    Ok((agreement, spk.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Parties {
        alice: IdentityKeyPair,
        bob: IdentityKeyPair,
        store: PrekeyStore,
    }

    fn parties() -> Parties {
        let bob = IdentityKeyPair::from_seed(&[2; 32]);
        let store =
            PrekeyStore::from_secrets(&bob, (1, [3; 32]), (10, [4; 32]), &[(11, [5; 32])]).unwrap();
        Parties {
            alice: IdentityKeyPair::from_seed(&[1; 32]),
            bob,
            store,
        }
    }

    fn bundle(p: &Parties, one_time: bool, last_resort: bool) -> PrekeyBundle {
        PrekeyBundle {
            identity_key: p.bob.public(),
            signed_prekey: p.store.signed_prekey(),
            one_time_prekey: one_time.then(|| p.store.one_time_prekeys()[0].clone()),
            last_resort_prekey: last_resort.then(|| p.store.last_resort_prekey()),
        }
    }

    #[test]
    fn both_sides_agree_with_any_prekey_choice() {
        let p = parties();
        for (one_time, last_resort, expected_id) in [
            (true, false, Some(11)),
            (false, true, Some(10)),
            (false, false, None),
            (true, true, Some(11)),
        ] {
            let b = bundle(&p, one_time, last_resort);
            let init = initiate(&p.alice, &b, Secret32::new([6; 32])).unwrap();
            assert_eq!(init.header.one_time_prekey_id, expected_id);
            let (agreement, spk) = respond(&p.bob, &p.store, &init.header).unwrap();
            assert_eq!(agreement.shared_secret, init.agreement.shared_secret);
            assert_eq!(agreement.associated_data, init.agreement.associated_data);
            assert_eq!(x25519_public(&spk), init.peer_ratchet_key);
        }
    }

    #[test]
    fn forged_signed_prekey_is_refused_before_any_dh() {
        let p = parties();
        let mut b = bundle(&p, true, false);
        b.signed_prekey.key = x25519_public(&Secret32::new([66; 32]));
        assert!(matches!(
            initiate(&p.alice, &b, Secret32::new([6; 32])),
            Err(E2eError::BadSignature)
        ));
        let mut b = bundle(&p, false, true);
        if let Some(lr) = b.last_resort_prekey.as_mut() {
            lr.signature[0] ^= 1;
        }
        assert!(matches!(
            initiate(&p.alice, &b, Secret32::new([6; 32])),
            Err(E2eError::BadSignature)
        ));
    }

    #[test]
    fn responder_refuses_unknown_prekeys() {
        let p = parties();
        let init = initiate(&p.alice, &bundle(&p, true, false), Secret32::new([6; 32])).unwrap();
        let mut header = init.header.clone();
        header.signed_prekey_id = 2;
        assert!(matches!(
            respond(&p.bob, &p.store, &header),
            Err(E2eError::UnknownPrekey { id: 2 })
        ));
        let mut header = init.header;
        header.one_time_prekey_id = Some(12);
        assert!(matches!(
            respond(&p.bob, &p.store, &header),
            Err(E2eError::UnknownPrekey { id: 12 })
        ));
    }
}
