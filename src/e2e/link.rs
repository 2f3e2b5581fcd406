//! Linking a new device to an account (PROTOCOL.md E13): the link code, SPAKE2 keyed by it,
//! the key schedule, the key confirmations, and the sealed payload that hands the identity
//! seed and the pinned contacts to the new device.
//!
//! Pure cryptography: no sockets, no storage, no clocks. The client drives these states over
//! the server's `link_*` requests; the server only relays the bytes made here and cannot test
//! a guess at the code offline. The code lives in `code`, the payload's format in `payload`.
//!
//! The two sides, in order:
//!
//! - existing device E: [`LinkSecret::draw`], [`ExistingDevice::start`] (→ `pake_E`), then
//!   with the server's slot [`LinkCode::new`] (to show the user) and
//!   [`ExistingDevice::finish`] (← `pake_N`), then [`ExistingDeviceKeys::accept`] (← `c_N`;
//!   → `c_E` and the sealed payload, only if `c_N` proved the code);
//! - new device N: [`LinkCode::parse`], [`JoiningDevice::start`] (→ `pake_N`),
//!   [`JoiningDevice::finish`] (← `pake_E`; → `c_N`), then [`JoiningDeviceKeys::open`]
//!   (← `c_E` and the payload).

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256, Sha512};
use spake2::rand_core::{TryCryptoRng, TryRng};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

mod code;
mod payload;

use super::keys::{OsRandom, SecretSource, hkdf_sha256};
use super::{E2eError, TAG_LEN};
use crate::protocol::Username;
use payload::{decode_payload, encode_payload};

pub use code::{LinkCode, LinkSecret};
pub use payload::{LinkContact, LinkPayload, MAX_LINK_CONTACTS};

/// Length of a SPAKE2 message (`pake`): a side byte (`A` or `B`) and a 32-byte Ed25519 point.
pub const LINK_PAKE_LEN: usize = 33;
/// Length of a key confirmation tag (`confirm`): HMAC-SHA256.
pub const LINK_CONFIRM_LEN: usize = 32;
/// Largest sealed payload, in bytes (what `link_accept` may carry).
pub const MAX_LINK_PAYLOAD_LEN: usize = 60_000;
/// Largest slot the server hands out (4 decimal digits).
pub const MAX_LINK_SLOT: u16 = 9_999;

/// SPAKE2 identity of side A, followed by the canonical username.
const ID_EXISTING: &[u8] = b"SFC link existing device ";
/// SPAKE2 identity of side B, followed by the canonical username.
const ID_NEW: &[u8] = b"SFC link new device ";
/// First bytes of the transcript (the HKDF info).
const TRANSCRIPT_LABEL: &[u8] = b"SFC link v1";
const CONFIRM_NEW_LABEL: &[u8] = b"SFC link confirm new device";
const CONFIRM_EXISTING_LABEL: &[u8] = b"SFC link confirm existing device";
const PAYLOAD_AD_LABEL: &[u8] = b"SFC link payload v1";

type HmacSha256 = Hmac<Sha256>;

/// Why a linking step was refused. Every peer input ends in one of these, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// A typed code does not have 4 + 6 digits.
    #[error("a link code has 10 digits (SSSS-PPPPPP)")]
    CodeLength,
    /// A typed code holds something other than digits, spaces and one dash after the 4th digit.
    #[error("a link code is made of digits: SSSS-PPPPPP")]
    CodeSyntax,
    /// A slot above 9999 or a secret above 999999.
    #[error("link code part out of range")]
    CodeRange,
    /// The peer's SPAKE2 message is not 33 bytes, not from the other side, or not a point.
    #[error("malformed link message: {0}")]
    MalformedMessage(&'static str),
    /// The peer's key confirmation did not verify: it used another code (or is not the
    /// device the user meant, e.g. a server in the middle). The link must be abandoned.
    #[error("the link code does not match (key confirmation failed)")]
    WrongCode,
    /// The sealed payload did not open under the agreed key.
    #[error("the link payload does not decrypt")]
    PayloadDecryption,
    /// The opened payload breaks a rule of its format (the reason says which).
    #[error("malformed link payload: {0}")]
    MalformedPayload(String),
    /// The payload names another account than the one being linked.
    #[error("the link payload is for another account")]
    WrongAccount,
    /// A payload (sealed or to seal) is larger than its bound.
    #[error("link payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Its length in bytes.
        len: usize,
        /// The bound in force.
        max: usize,
    },
    /// More pinned contacts than a payload may carry.
    #[error("{count} contacts exceed the limit of {max}")]
    TooManyContacts {
        /// How many there were.
        count: usize,
        /// The bound in force ([`MAX_LINK_CONTACTS`]).
        max: usize,
    },
    /// The random source failed.
    #[error("random source failed: {0}")]
    Random(E2eError),
    /// A KDF, MAC or cipher refused its fixed-size input: a bug, reported rather than panicking.
    #[error("cryptographic primitive refused its input")]
    Primitive,
}

/// The existing device (SPAKE2 side A) after sending `pake_E`.
pub struct ExistingDevice {
    pake: Spake2<Ed25519Group>,
    account: Username,
    own: [u8; LINK_PAKE_LEN],
}

/// The SPAKE2 role a device plays: A for the existing device, B for the new one.
#[derive(Clone, Copy)]
enum Side {
    Existing,
    Joining,
}

/// Starts SPAKE2 on `side` for `account` with `secret`, the scalar drawn from `source`;
/// returns the state and this side's message.
fn start_pake(
    side: Side,
    secret: &LinkSecret,
    account: &Username,
    source: &mut impl SecretSource,
) -> Result<(Spake2<Ed25519Group>, [u8; LINK_PAKE_LEN]), LinkError> {
    let rng = ScalarSeed::draw(source)?;
    let (id_a, id_b) = identities(account);
    let password = Password::new(&secret.password()[..]);
    let (pake, message) = match side {
        Side::Existing => Spake2::<Ed25519Group>::start_a_with_rng(&password, &id_a, &id_b, rng),
        Side::Joining => Spake2::<Ed25519Group>::start_b_with_rng(&password, &id_a, &id_b, rng),
    };
    Ok((pake, pake_bytes(&message)?))
}

impl fmt::Debug for ExistingDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExistingDevice")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl ExistingDevice {
    /// Starts side A for `account` with `secret`; returns the state and `pake_E`. The slot
    /// is not known yet (the server assigns it in reply to `pake_E`), which is why it is bound
    /// in the transcript at [`finish`](Self::finish) and not in the SPAKE2 password.
    pub fn start(
        secret: &LinkSecret,
        account: &Username,
    ) -> Result<(Self, [u8; LINK_PAKE_LEN]), LinkError> {
        Self::start_with(secret, account, &mut OsRandom)
    }

    /// [`start`](Self::start) with the SPAKE2 scalar drawn from `source` (vectors use this).
    pub fn start_with(
        secret: &LinkSecret,
        account: &Username,
        source: &mut impl SecretSource,
    ) -> Result<(Self, [u8; LINK_PAKE_LEN]), LinkError> {
        let (pake, own) = start_pake(Side::Existing, secret, account, source)?;
        Ok((
            Self {
                pake,
                account: account.clone(),
                own,
            },
            own,
        ))
    }

    /// Takes `pake_N` (relayed by the server) and the slot the server assigned; derives the
    /// keys. Nothing is proven yet: the new device's confirmation decides.
    pub fn finish(self, slot: u16, pake_new: &[u8]) -> Result<ExistingDeviceKeys, LinkError> {
        let peer = peer_message(pake_new, b'B')?;
        let key = finish_pake(self.pake, &peer)?;
        let keys = LinkKeys::derive(&key, &self.account, slot, &self.own, &peer)?;
        Ok(ExistingDeviceKeys {
            keys,
            account: self.account,
        })
    }
}

/// The existing device's keys, before the new device proved it knows the code.
pub struct ExistingDeviceKeys {
    keys: LinkKeys,
    account: Username,
}

impl fmt::Debug for ExistingDeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExistingDeviceKeys")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// What the existing device sends in `link_accept`.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkAccept {
    /// `c_E`: proves to the new device that this side knows the code.
    pub confirm: [u8; LINK_CONFIRM_LEN],
    /// The sealed [`LinkPayload`].
    pub payload: Vec<u8>,
}

impl fmt::Debug for LinkAccept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkAccept")
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl ExistingDeviceKeys {
    /// Verifies the new device's `c_N` (constant time), and only then makes `c_E` and seals
    /// `payload`. [`LinkError::WrongCode`] means the link must be cancelled (`wrong_code`).
    pub fn accept(
        self,
        confirm_new: &[u8],
        payload: &LinkPayload,
    ) -> Result<LinkAccept, LinkError> {
        if !tag_matches(&self.keys.confirm_new, confirm_new) {
            return Err(LinkError::WrongCode);
        }
        if payload.account != self.account {
            return Err(LinkError::WrongAccount);
        }
        let plaintext = encode_payload(payload)?;
        let sealed = self.keys.seal(plaintext)?;
        Ok(LinkAccept {
            confirm: self.keys.confirm_existing,
            payload: sealed,
        })
    }
}

/// The new device (SPAKE2 side B) after sending `pake_N`.
pub struct JoiningDevice {
    pake: Spake2<Ed25519Group>,
    account: Username,
    slot: u16,
    own: [u8; LINK_PAKE_LEN],
}

impl fmt::Debug for JoiningDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoiningDevice")
            .field("account", &self.account)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl JoiningDevice {
    /// Starts side B for `account` with the code the user typed; returns the state and
    /// `pake_N` (sent in `link_join` with the code's slot).
    pub fn start(
        code: &LinkCode,
        account: &Username,
    ) -> Result<(Self, [u8; LINK_PAKE_LEN]), LinkError> {
        Self::start_with(code, account, &mut OsRandom)
    }

    /// [`start`](Self::start) with the SPAKE2 scalar drawn from `source` (vectors use this).
    pub fn start_with(
        code: &LinkCode,
        account: &Username,
        source: &mut impl SecretSource,
    ) -> Result<(Self, [u8; LINK_PAKE_LEN]), LinkError> {
        let (pake, own) = start_pake(Side::Joining, code.secret(), account, source)?;
        Ok((
            Self {
                pake,
                account: account.clone(),
                slot: code.slot(),
                own,
            },
            own,
        ))
    }

    /// Takes `pake_E` (from `link_joined`), derives the keys, and returns them with `c_N`
    /// to send in `link_confirm`.
    pub fn finish(
        self,
        pake_existing: &[u8],
    ) -> Result<(JoiningDeviceKeys, [u8; LINK_CONFIRM_LEN]), LinkError> {
        let peer = peer_message(pake_existing, b'A')?;
        let key = finish_pake(self.pake, &peer)?;
        let keys = LinkKeys::derive(&key, &self.account, self.slot, &peer, &self.own)?;
        let confirm = keys.confirm_new;
        Ok((
            JoiningDeviceKeys {
                keys,
                account: self.account,
            },
            confirm,
        ))
    }
}

/// The new device's keys, waiting for `link_accepted`.
pub struct JoiningDeviceKeys {
    keys: LinkKeys,
    account: Username,
}

impl fmt::Debug for JoiningDeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoiningDeviceKeys")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl JoiningDeviceKeys {
    /// Verifies the existing device's `c_E` (constant time), then opens and decodes the
    /// payload, which must be for this account.
    pub fn open(self, confirm_existing: &[u8], sealed: &[u8]) -> Result<LinkPayload, LinkError> {
        if !tag_matches(&self.keys.confirm_existing, confirm_existing) {
            return Err(LinkError::WrongCode);
        }
        let plaintext = self.keys.open(sealed)?;
        let payload = decode_payload(&plaintext)?;
        if payload.account != self.account {
            return Err(LinkError::WrongAccount);
        }
        Ok(payload)
    }
}

/// Everything derived from the SPAKE2 key and the transcript (E13 "Key schedule").
pub(crate) struct LinkKeys {
    pub(crate) confirm_new: [u8; LINK_CONFIRM_LEN],
    pub(crate) confirm_existing: [u8; LINK_CONFIRM_LEN],
    payload_key: Zeroizing<[u8; 32]>,
}

impl LinkKeys {
    /// The schedule from the SPAKE2 output `key`; `pake_existing` is side A's message.
    pub(crate) fn derive(
        key: &[u8; 32],
        account: &Username,
        slot: u16,
        pake_existing: &[u8; LINK_PAKE_LEN],
        pake_new: &[u8; LINK_PAKE_LEN],
    ) -> Result<Self, LinkError> {
        let transcript = transcript(account, slot, pake_existing, pake_new)?;
        let mut okm = Zeroizing::new([0u8; 96]);
        hkdf_sha256(&[0u8; 32], key, &transcript, okm.as_mut())
            .map_err(|_| LinkError::Primitive)?;
        let confirm_new = confirmation(&okm[..32], CONFIRM_NEW_LABEL, &transcript)?;
        let confirm_existing = confirmation(&okm[32..64], CONFIRM_EXISTING_LABEL, &transcript)?;
        let mut payload_key = Zeroizing::new([0u8; 32]);
        payload_key.copy_from_slice(&okm[64..]);
        Ok(Self {
            confirm_new,
            confirm_existing,
            payload_key,
        })
    }

    /// The payload key (vectors print it).
    #[cfg(test)]
    pub(crate) fn payload_key(&self) -> &[u8; 32] {
        &self.payload_key
    }

    fn cipher(&self) -> Result<LessSafeKey, LinkError> {
        let key = UnboundKey::new(&CHACHA20_POLY1305, self.payload_key.as_ref())
            .map_err(|_| LinkError::Primitive)?;
        Ok(LessSafeKey::new(key))
    }

    fn aad(&self) -> Vec<u8> {
        [
            PAYLOAD_AD_LABEL,
            &self.confirm_new[..],
            &self.confirm_existing[..],
        ]
        .concat()
    }

    /// ChaCha20-Poly1305 with the all-zero nonce: the payload key seals exactly one message.
    pub(crate) fn seal(&self, mut plaintext: Zeroizing<Vec<u8>>) -> Result<Vec<u8>, LinkError> {
        let max = MAX_LINK_PAYLOAD_LEN - TAG_LEN;
        if plaintext.len() > max {
            return Err(LinkError::PayloadTooLarge {
                len: plaintext.len(),
                max,
            });
        }
        let mut sealed = Vec::with_capacity(plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(&plaintext);
        plaintext.zeroize();
        let nonce = Nonce::assume_unique_for_key([0u8; NONCE_LEN]);
        match self
            .cipher()?
            .seal_in_place_append_tag(nonce, Aad::from(self.aad()), &mut sealed)
        {
            Ok(()) => Ok(sealed),
            Err(_) => {
                sealed.zeroize();
                Err(LinkError::Primitive)
            }
        }
    }

    pub(crate) fn open(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, LinkError> {
        if sealed.len() > MAX_LINK_PAYLOAD_LEN {
            return Err(LinkError::PayloadTooLarge {
                len: sealed.len(),
                max: MAX_LINK_PAYLOAD_LEN,
            });
        }
        if sealed.len() < TAG_LEN {
            return Err(LinkError::PayloadDecryption);
        }
        let mut buffer = Zeroizing::new(sealed.to_vec());
        let nonce = Nonce::assume_unique_for_key([0u8; NONCE_LEN]);
        let len = self
            .cipher()?
            .open_in_place(nonce, Aad::from(self.aad()), buffer.as_mut_slice())
            .map_err(|_| LinkError::PayloadDecryption)?
            .len();
        buffer.truncate(len);
        Ok(buffer)
    }
}

/// `"SFC link v1" ‖ u16be(len(username)) ‖ username ‖ u16be(slot) ‖ pake_E ‖ pake_N`.
pub(crate) fn transcript(
    account: &Username,
    slot: u16,
    pake_existing: &[u8; LINK_PAKE_LEN],
    pake_new: &[u8; LINK_PAKE_LEN],
) -> Result<Vec<u8>, LinkError> {
    let name = account.as_str().as_bytes();
    let name_len = u16::try_from(name.len()).map_err(|_| LinkError::Primitive)?;
    Ok([
        TRANSCRIPT_LABEL,
        &name_len.to_be_bytes(),
        name,
        &slot.to_be_bytes(),
        pake_existing,
        pake_new,
    ]
    .concat())
}

/// `HMAC-SHA256(key, label ‖ transcript)`.
fn confirmation(
    key: &[u8],
    label: &[u8],
    transcript: &[u8],
) -> Result<[u8; LINK_CONFIRM_LEN], LinkError> {
    let mut mac = HmacSha256::new_from_slice(key).map_err(|_| LinkError::Primitive)?;
    mac.update(label);
    mac.update(transcript);
    Ok(mac.finalize().into_bytes().into())
}

/// Constant-time comparison of a received tag with the expected one (any length accepted).
fn tag_matches(expected: &[u8; LINK_CONFIRM_LEN], received: &[u8]) -> bool {
    received.len() == LINK_CONFIRM_LEN && bool::from(expected.ct_eq(received))
}

fn identities(account: &Username) -> (Identity, Identity) {
    let name = account.as_str().as_bytes();
    (
        Identity::new(&[ID_EXISTING, name].concat()),
        Identity::new(&[ID_NEW, name].concat()),
    )
}

fn pake_bytes(message: &[u8]) -> Result<[u8; LINK_PAKE_LEN], LinkError> {
    message.try_into().map_err(|_| LinkError::Primitive)
}

/// Checks a peer's SPAKE2 message before `spake2` sees it: 33 bytes, the expected side byte.
fn peer_message(bytes: &[u8], side: u8) -> Result<[u8; LINK_PAKE_LEN], LinkError> {
    let message: [u8; LINK_PAKE_LEN] = bytes
        .try_into()
        .map_err(|_| LinkError::MalformedMessage("not 33 bytes"))?;
    if message[0] != side {
        return Err(LinkError::MalformedMessage("not from the other side"));
    }
    Ok(message)
}

fn finish_pake(
    pake: Spake2<Ed25519Group>,
    peer: &[u8; LINK_PAKE_LEN],
) -> Result<Zeroizing<[u8; 32]>, LinkError> {
    let key = Zeroizing::new(pake.finish(peer).map_err(|e| match e {
        spake2::Error::WrongLength => LinkError::MalformedMessage("not 33 bytes"),
        spake2::Error::BadSide => LinkError::MalformedMessage("not from the other side"),
        spake2::Error::CorruptMessage => LinkError::MalformedMessage("not a curve point"),
    })?);
    let mut out = Zeroizing::new([0u8; 32]);
    if key.len() != out.len() {
        return Err(LinkError::Primitive);
    }
    out.copy_from_slice(&key);
    Ok(out)
}

/// The randomness `spake2` draws its scalar from: 64 bytes taken from a [`SecretSource`]
/// up front (so a failing OS generator is an error here, not a panic inside `spake2`), handed
/// out as they are (curve25519-dalek reduces 64 bytes modulo the group order), then, should
/// more ever be asked for, SHA-512(seed ‖ u64be counter) blocks.
struct ScalarSeed {
    seed: Zeroizing<[u8; 64]>,
    block: Zeroizing<[u8; 64]>,
    used: usize,
    counter: u64,
}

impl ScalarSeed {
    fn draw(source: &mut impl SecretSource) -> Result<Self, LinkError> {
        let mut seed = Zeroizing::new([0u8; 64]);
        seed[..32].copy_from_slice(
            &Zeroizing::new(source.secret_bytes().map_err(LinkError::Random)?)[..],
        );
        seed[32..].copy_from_slice(
            &Zeroizing::new(source.secret_bytes().map_err(LinkError::Random)?)[..],
        );
        let block = seed.clone();
        Ok(Self {
            seed,
            block,
            used: 0,
            counter: 0,
        })
    }
}

impl TryRng for ScalarSeed {
    type Error = core::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut bytes = [0u8; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut bytes = [0u8; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for byte in dst {
            if self.used == self.block.len() {
                self.counter += 1;
                let mut hash = Sha512::new();
                hash.update(self.seed.as_ref());
                hash.update(self.counter.to_be_bytes());
                self.block.copy_from_slice(&hash.finalize());
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
        Ok(())
    }
}

impl TryCryptoRng for ScalarSeed {}

#[cfg(test)]
mod tests;
