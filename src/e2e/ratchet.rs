//! The Double Ratchet (<https://signal.org/docs/specifications/doubleratchet/>), with
//! HKDF-SHA256 for KDF_RK, HMAC-SHA256 for KDF_CK and ChaCha20-Poly1305 for messages.
//!
//! Decryption is transactional: it works on a copy of the chain state and on a list of newly
//! skipped keys, and commits both only once the AEAD tag has verified, so a forged or replayed
//! message leaves the state exactly as it was. A message key is deleted as soon as it has been
//! used, which is what makes a second decryption of the same message fail.

use std::sync::LazyLock;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::keys::{
    Secret32, dh, fresh_secret, hkdf_sha256, push_wiping, retain_wiping, x25519_public,
};
use super::x3dh::{ASSOCIATED_DATA_LEN, Agreement};
use super::{E2eError, SecretSource};

/// Most message keys one chain step may skip (a gap in `n`, or the rest of a chain given by
/// `pn`); a header asking for more is refused.
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys a session stores; a message that would store more is refused.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// Length of a ciphertext's Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Length of a header's fixed encoding inside the AEAD associated data.
pub const HEADER_AD_LEN: usize = 40;

const RATCHET_INFO: &[u8] = b"SecureFastChat ratchet v1";
const MESSAGE_KEY_INFO: &[u8] = b"SecureFastChat message keys v1";

/// A message header: the sender's current ratchet key, the length of its previous sending
/// chain and the message's number in the current one: `{dh: bin 32, pn: uint32, n: uint32}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The sender's current X25519 ratchet public key.
    #[serde(with = "serde_bytes")]
    pub dh: [u8; 32],
    /// Number of messages in the sender's previous sending chain.
    pub pn: u32,
    /// Number of this message in the current sending chain (from 0).
    pub n: u32,
}

impl Header {
    /// The fixed encoding bound into the AEAD: `dh ‖ u32-be(pn) ‖ u32-be(n)`.
    pub fn to_ad_bytes(&self) -> [u8; HEADER_AD_LEN] {
        let mut out = [0u8; HEADER_AD_LEN];
        out[..32].copy_from_slice(&self.dh);
        out[32..36].copy_from_slice(&self.pn.to_be_bytes());
        out[36..].copy_from_slice(&self.n.to_be_bytes());
        out
    }
}

/// KDF_RK: HKDF-SHA256(salt = rk, ikm = dh_out, info) → 64 bytes = (new rk, chain key).
pub(crate) fn kdf_rk(rk: &Secret32, dh_out: &Secret32) -> Result<(Secret32, Secret32), E2eError> {
    let mut okm = Zeroizing::new([0u8; 64]);
    hkdf_sha256(rk.expose(), dh_out.expose(), RATCHET_INFO, okm.as_mut())?;
    let (mut root, mut chain) = (Secret32::new([0; 32]), Secret32::new([0; 32]));
    root.expose_mut().copy_from_slice(&okm[..32]);
    chain.expose_mut().copy_from_slice(&okm[32..]);
    Ok((root, chain))
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 keyed with the 32 zero bytes that salt every message key's HKDF. Keying an HMAC
/// costs two SHA-256 blocks; this one is paid once per process.
static ZERO_SALT: LazyLock<Option<HmacSha256>> =
    LazyLock::new(|| HmacSha256::new_from_slice(&[0; 32]).ok());

fn finish(mac: HmacSha256, byte: u8) -> Secret32 {
    let mut out = Secret32::new([0; 32]);
    out.expose_mut()
        .copy_from_slice(&mac.chain_update([byte]).finalize().into_bytes());
    out
}

/// KDF_CK: message key = HMAC-SHA256(ck, 0x01), next chain key = HMAC-SHA256(ck, 0x02). Both
/// share one keyed state.
pub(crate) fn kdf_ck(ck: &Secret32) -> Result<(Secret32, Secret32), E2eError> {
    let mac = HmacSha256::new_from_slice(ck.expose()).map_err(|_| E2eError::Primitive)?;
    Ok((finish(mac.clone(), 0x02), finish(mac, 0x01)))
}

/// The AEAD key and nonce of a message key: HKDF-SHA256(salt = 32 × 0x00, ikm = mk, info)
/// → 44 bytes = key (32) ‖ nonce (12). Every message key is used once, so no pair repeats.
/// The extract step (PRK = HMAC(salt, mk)) starts from the salt's keyed state.
pub(crate) fn aead_key_nonce(mk: &Secret32) -> Result<Zeroizing<[u8; 44]>, E2eError> {
    let salted = ZERO_SALT.as_ref().ok_or(E2eError::Primitive)?.clone();
    let mut prk = Zeroizing::new([0u8; 32]);
    prk.copy_from_slice(&salted.chain_update(mk.expose()).finalize().into_bytes());
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::from_prk(prk.as_ref())
        .map_err(|_| E2eError::Primitive)?
        .expand(MESSAGE_KEY_INFO, okm.as_mut())
        .map_err(|_| E2eError::Primitive)?;
    Ok(okm)
}

/// The ChaCha20-Poly1305 key and nonce of a message key (ring's implementation: the same
/// algorithm and bytes as RFC 8439, several times faster than a portable one at 128 B).
fn message_cipher(mk: &Secret32) -> Result<(LessSafeKey, Nonce), E2eError> {
    let okm = aead_key_nonce(mk)?;
    let key = UnboundKey::new(&CHACHA20_POLY1305, &okm[..32]).map_err(|_| E2eError::Primitive)?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&okm[32..]);
    Ok((LessSafeKey::new(key), Nonce::assume_unique_for_key(nonce)))
}

/// Seals `plaintext` in place (give it `TAG_LEN` bytes of spare capacity to spare a copy).
fn seal(mk: &Secret32, mut plaintext: Vec<u8>, aad: &[u8]) -> Result<Vec<u8>, E2eError> {
    let (key, nonce) = message_cipher(mk)?;
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut plaintext)
        .map_err(|_| E2eError::Primitive)?;
    Ok(plaintext)
}

fn open(mk: &Secret32, ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, E2eError> {
    let (key, nonce) = message_cipher(mk)?;
    let mut opened = ciphertext.to_vec();
    match key.open_in_place(nonce, Aad::from(aad), &mut opened) {
        Ok(plaintext) => {
            let len = plaintext.len();
            opened.truncate(len);
            Ok(opened)
        }
        Err(_) => {
            // What a failed open leaves in the buffer is unspecified: wipe it.
            opened.zeroize();
            Err(E2eError::DecryptionFailed)
        }
    }
}

/// Everything but the skipped keys: small, so decryption can afford to work on a copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chains {
    /// DHs: our current ratchet private key, and its public key.
    dhs: Secret32,
    #[serde(with = "serde_bytes")]
    dhs_public: [u8; 32],
    /// DHr: the peer's current ratchet public key (none until the responder hears from it).
    #[serde(with = "serde_bytes")]
    dhr: Option<[u8; 32]>,
    rk: Secret32,
    cks: Option<Secret32>,
    ckr: Option<Secret32>,
    ns: u32,
    nr: u32,
    pn: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SkippedKey {
    #[serde(with = "serde_bytes")]
    dh: [u8; 32],
    n: u32,
    mk: Secret32,
}

/// One side's Double Ratchet state for one session. Serializable (named MessagePack, secrets
/// as `bin`) for persistence; secrets are wiped when dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatchetState {
    /// AD from X3DH, the first part of every message's associated data.
    #[serde(with = "serde_bytes")]
    ad: [u8; ASSOCIATED_DATA_LEN],
    chains: Chains,
    skipped: Vec<SkippedKey>,
}

impl RatchetState {
    /// The initiator's state: it knows the responder's signed prekey (the first DHr) and
    /// sends at once from a chain derived with its own first ratchet key `own`.
    pub(crate) fn new_initiator(
        agreement: Agreement,
        peer_ratchet_key: [u8; 32],
        own: Secret32,
    ) -> Result<Self, E2eError> {
        let (rk, cks) = kdf_rk(&agreement.shared_secret, &dh(&own, &peer_ratchet_key)?)?;
        Ok(Self {
            ad: agreement.associated_data,
            chains: Chains {
                dhs_public: x25519_public(&own),
                dhs: own,
                dhr: Some(peer_ratchet_key),
                rk,
                cks: Some(cks),
                ckr: None,
                ns: 0,
                nr: 0,
                pn: 0,
            },
            skipped: Vec::new(),
        })
    }

    /// The responder's state: its signed prekey is its first ratchet key; it can send only
    /// after the first message has turned the ratchet.
    pub(crate) fn new_responder(agreement: Agreement, signed_prekey: Secret32) -> Self {
        Self {
            ad: agreement.associated_data,
            chains: Chains {
                dhs_public: x25519_public(&signed_prekey),
                dhs: signed_prekey,
                dhr: None,
                rk: agreement.shared_secret.clone(),
                cks: None,
                ckr: None,
                ns: 0,
                nr: 0,
                pn: 0,
            },
            skipped: Vec::new(),
        }
    }

    /// How many skipped message keys are stored (at most [`MAX_SKIPPED_KEYS`]).
    pub fn skipped_len(&self) -> usize {
        self.skipped.len()
    }

    fn aad(&self, header: &Header, extra: &[u8]) -> Vec<u8> {
        [&self.ad[..], &header.to_ad_bytes(), extra].concat()
    }

    /// Encrypts the next message of the sending chain, in place.
    pub(crate) fn encrypt(
        &mut self,
        plaintext: Vec<u8>,
        extra_ad: &[u8],
    ) -> Result<(Header, Vec<u8>), E2eError> {
        let cks = self.chains.cks.as_ref().ok_or(E2eError::NotReadyToSend)?;
        let (next_ck, mk) = kdf_ck(cks)?;
        let next_ns = self
            .chains
            .ns
            .checked_add(1)
            .ok_or(E2eError::CounterExhausted)?;
        let header = Header {
            dh: self.chains.dhs_public,
            pn: self.chains.pn,
            n: self.chains.ns,
        };
        let ciphertext = seal(&mk, plaintext, &self.aad(&header, extra_ad))?;
        self.chains.cks = Some(next_ck);
        self.chains.ns = next_ns;
        Ok((header, ciphertext))
    }

    /// Decrypts a message and hands the plaintext to `content` (which unpads it); on any
    /// error, also one from `content`, the state is unchanged. A DH ratchet step draws the new
    /// ratchet key from `source`.
    pub(crate) fn decrypt(
        &mut self,
        header: &Header,
        ciphertext: &[u8],
        extra_ad: &[u8],
        source: &mut impl SecretSource,
        content: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E2eError>,
    ) -> Result<Vec<u8>, E2eError> {
        let aad = self.aad(header, extra_ad);
        if let Some(found) = self
            .skipped
            .iter()
            .find(|k| k.dh == header.dh && k.n == header.n)
        {
            let plaintext = content(open(&found.mk, ciphertext, &aad)?)?;
            retain_wiping(&mut self.skipped, |k| {
                !(k.dh == header.dh && k.n == header.n)
            });
            return Ok(plaintext);
        }
        if self.chains.dhr == Some(header.dh) && header.n < self.chains.nr {
            return Err(E2eError::Duplicate);
        }

        let mut next = self.chains.clone();
        let mut new_skipped = Vec::new();
        if next.dhr != Some(header.dh) {
            self.skip(&mut next, header.pn, &mut new_skipped)?;
            next.pn = next.ns;
            next.ns = 0;
            next.nr = 0;
            next.dhr = Some(header.dh);
            let (rk, ckr) = kdf_rk(&next.rk, &dh(&next.dhs, &header.dh)?)?;
            let dhs = fresh_secret(source)?;
            let (rk, cks) = kdf_rk(&rk, &dh(&dhs, &header.dh)?)?;
            next.dhs_public = x25519_public(&dhs);
            (next.dhs, next.rk, next.ckr, next.cks) = (dhs, rk, Some(ckr), Some(cks));
        }
        self.skip(&mut next, header.n, &mut new_skipped)?;
        let ckr = next.ckr.as_ref().ok_or(E2eError::DecryptionFailed)?;
        let (next_ck, mk) = kdf_ck(ckr)?;
        next.ckr = Some(next_ck);
        next.nr = header.n.checked_add(1).ok_or(E2eError::CounterExhausted)?;
        let plaintext = content(open(&mk, ciphertext, &aad)?)?;

        self.chains = next;
        for key in new_skipped {
            push_wiping(&mut self.skipped, key);
        }
        Ok(plaintext)
    }

    /// Derives and sets aside the keys of messages `next.nr .. until` of the receiving chain,
    /// within the per-step and total bounds.
    fn skip(
        &self,
        next: &mut Chains,
        until: u32,
        new_skipped: &mut Vec<SkippedKey>,
    ) -> Result<(), E2eError> {
        let gap = until.saturating_sub(next.nr);
        if gap > MAX_SKIP {
            return Err(E2eError::TooManySkipped);
        }
        let (Some(dhr), Some(mut ck)) = (next.dhr, next.ckr.clone()) else {
            return Ok(());
        };
        let total = self.skipped.len() + new_skipped.len() + gap as usize;
        if total > MAX_SKIPPED_KEYS {
            return Err(E2eError::TooManySkipped);
        }
        while next.nr < until {
            let (next_ck, mk) = kdf_ck(&ck)?;
            let n = next.nr;
            push_wiping(new_skipped, SkippedKey { dh: dhr, n, mk });
            ck = next_ck;
            next.nr += 1;
        }
        next.ckr = Some(ck);
        Ok(())
    }

    /// The key of the next message this side will send (for test vectors).
    #[cfg(test)]
    pub(crate) fn next_sending_message_key(&self) -> Option<Secret32> {
        self.chains
            .cks
            .as_ref()
            .and_then(|ck| kdf_ck(ck).ok())
            .map(|(_, mk)| mk)
    }

    /// Whether any stored secret (chain, root, ratchet or skipped message key) equals `key`.
    #[cfg(test)]
    pub(crate) fn holds(&self, key: &Secret32) -> bool {
        let c = &self.chains;
        [Some(&c.dhs), Some(&c.rk), c.cks.as_ref(), c.ckr.as_ref()]
            .into_iter()
            .flatten()
            .chain(self.skipped.iter().map(|k| &k.mk))
            .any(|s| s == key)
    }
}
