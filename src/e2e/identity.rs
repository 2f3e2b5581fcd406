//! Long-term identity: an Ed25519 key pair that signs prekeys and, converted to X25519, takes
//! part in X3DH; and the safety number two users compare to detect a man in the middle.
//!
//! One key pair serves both purposes (as in Signal's XEdDSA setups, but with the libsodium
//! conversion instead of XEdDSA): the signature key is what users verify, and converting it
//! spares a second long-term key. The conversion is:
//!
//! - public: the Edwards point's birational map to Montgomery, u = (1 + y) / (1 − y) mod p;
//! - secret: the first 32 bytes of SHA-512(seed), clamped — the scalar Ed25519 itself signs
//!   with, so X25519(secret, 9) is exactly the converted public key.
//!
//! This is what libsodium's `crypto_sign_ed25519_{pk,sk}_to_curve25519` compute.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::keys::Secret32;
use super::{E2eError, SecretSource};
use crate::protocol::Username;

/// Length of an encoded identity key (a compressed Edwards point).
pub const IDENTITY_KEY_LEN: usize = 32;

/// Identity keys a thread remembers as already validated.
const VALIDATED_CAP: usize = 1024;

thread_local! {
    /// Encodings this thread has validated. Validity depends on the 32 bytes alone, so this
    /// only saves work: every envelope of a session that awaits its first reply carries the
    /// sender's identity key, and checking it (a point decompression) was the largest cost of
    /// opening such a message. Public keys only; cleared when full.
    static VALIDATED: RefCell<HashSet<[u8; IDENTITY_KEY_LEN]>> = RefCell::new(HashSet::new());
}

/// Domain separation for the safety number hash.
const SAFETY_NUMBER_LABEL: &[u8] = b"SecureFastChat safety number v1";

/// A user's public identity: a validated Ed25519 public key (32 bytes, a MessagePack `bin`).
///
/// Valid means a canonical encoding of a curve point that is not of small order; anything else
/// is refused with [`E2eError::InvalidKey`] when parsed or deserialized.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityKey([u8; IDENTITY_KEY_LEN]);

impl IdentityKey {
    /// Parses and validates an encoded identity key.
    pub fn from_bytes(bytes: &[u8; IDENTITY_KEY_LEN]) -> Result<Self, E2eError> {
        if VALIDATED.with(|v| v.borrow().contains(bytes)) {
            return Ok(Self(*bytes));
        }
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| E2eError::InvalidKey)?;
        // dalek accepts a y ≥ p and decodes it mod p; two encodings of one key would let a
        // server show different bytes (and safety numbers) for the same identity.
        let canonical = key.to_edwards().compress().to_bytes() == *bytes;
        if !canonical || key.is_weak() {
            return Err(E2eError::InvalidKey);
        }
        VALIDATED.with(|v| {
            let mut v = v.borrow_mut();
            if v.len() >= VALIDATED_CAP {
                v.clear();
            }
            v.insert(*bytes);
        });
        Ok(Self(*bytes))
    }

    /// The 32-byte encoding.
    pub fn as_bytes(&self) -> &[u8; IDENTITY_KEY_LEN] {
        &self.0
    }

    fn verifying_key(&self) -> Result<VerifyingKey, E2eError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| E2eError::InvalidKey)
    }

    /// The X25519 form of this key, for X3DH.
    pub(crate) fn to_x25519(self) -> Result<[u8; 32], E2eError> {
        Ok(self.verifying_key()?.to_montgomery().to_bytes())
    }

    /// Checks an Ed25519 signature strictly (no small-order R, canonical s).
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), E2eError> {
        let signature = Signature::from_bytes(signature);
        self.verifying_key()?
            .verify_strict(message, &signature)
            .map_err(|_| E2eError::BadSignature)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({})", hex::encode(self.0))
    }
}

impl Serialize for IdentityKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for IdentityKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: [u8; IDENTITY_KEY_LEN] = serde_bytes::deserialize(deserializer)?;
        Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A user's identity key pair. The 32-byte Ed25519 seed is the whole secret.
///
/// Zeroized on drop (by `ed25519-dalek`), masked in `Debug`, serialized as a 32-byte `bin`.
#[derive(Clone)]
pub struct IdentityKeyPair {
    signing: SigningKey,
}

impl IdentityKeyPair {
    /// A new key pair from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, E2eError> {
        Self::generate_with(&mut super::OsRandom)
    }

    /// A new key pair whose seed comes from `source`.
    pub fn generate_with(source: &mut impl SecretSource) -> Result<Self, E2eError> {
        let seed = Zeroizing::new(source.secret_bytes()?);
        Ok(Self::from_seed(&seed))
    }

    /// The key pair of a 32-byte Ed25519 seed (RFC 8032 private key). Every seed is valid.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The seed (secret): what to persist to restore this key pair.
    pub fn expose_seed(&self) -> &[u8; 32] {
        self.signing.as_bytes()
    }

    /// The public identity key.
    pub fn public(&self) -> IdentityKey {
        IdentityKey(self.signing.verifying_key().to_bytes())
    }

    /// An Ed25519 signature (RFC 8032, deterministic) over `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The X25519 private key: clamp(SHA-512(seed)[0..32]), as libsodium converts it.
    pub(crate) fn x25519_secret(&self) -> Secret32 {
        let mut scalar = Secret32::new(self.signing.to_scalar_bytes());
        let bytes = scalar.expose_mut();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        scalar
    }
}

impl fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeyPair")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl Serialize for IdentityKeyPair {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.expose_seed())
    }
}

impl<'de> Deserialize<'de> for IdentityKeyPair {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let seed = Secret32::deserialize(deserializer)?;
        Ok(Self::from_seed(seed.expose()))
    }
}

/// Refuses `presented` unless it is the `known` identity key of the same peer.
///
/// Clients pin the first identity key they see for a user and call this on every bundle they
/// fetch and every new session offered to them.
pub fn check_identity(known: &IdentityKey, presented: &IdentityKey) -> Result<(), E2eError> {
    if known.0.ct_eq(&presented.0).into() {
        Ok(())
    } else {
        Err(E2eError::IdentityChanged {
            presented: *presented,
        })
    }
}

/// The safety number of two users: 60 decimal digits in 12 groups of 5, separated by spaces.
///
/// Both users compute the same string (the two parties are sorted), and it changes when either
/// name or key changes. Algorithm (see part II of `docs/PROTOCOL.md`):
///
/// 1. part(name, key) = u16-be(len(name)) ‖ name ‖ key (name as canonical UTF-8 username);
/// 2. sort the two parts as byte strings; d = SHA-512("SecureFastChat safety number v1" ‖ lo ‖ hi);
/// 3. group i (0..12) = big-endian integer of d[5i..5i+5] mod 100000, as 5 digits.
pub fn safety_number(
    a_name: &Username,
    a_key: &IdentityKey,
    b_name: &Username,
    b_key: &IdentityKey,
) -> String {
    let part = |name: &Username, key: &IdentityKey| {
        let name = name.as_str().as_bytes();
        // Usernames are at most 32 bytes, so the length always fits.
        let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        [&len.to_be_bytes()[..], name, &key.0].concat()
    };
    let (a, b) = (part(a_name, a_key), part(b_name, b_key));
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let digest = Sha512::new()
        .chain_update(SAFETY_NUMBER_LABEL)
        .chain_update(&lo)
        .chain_update(&hi)
        .finalize();
    let groups: Vec<String> = digest[..60]
        .chunks_exact(5)
        .map(|chunk| {
            let value = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", value % 100_000)
        })
        .collect();
    groups.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::keys::x25519_public;

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    #[test]
    fn converted_secret_matches_converted_public() {
        for seed in [[0u8; 32], [1; 32], [0xfe; 32]] {
            let pair = IdentityKeyPair::from_seed(&seed);
            let via_secret = x25519_public(&pair.x25519_secret());
            assert_eq!(via_secret, pair.public().to_x25519().unwrap());
        }
    }

    #[test]
    fn invalid_identity_keys_are_refused() {
        // The identity point (small order), a non-canonical y, and a y with no point.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut non_canonical = [0xff; 32];
        non_canonical[0] = 0xee;
        non_canonical[31] = 0x7f;
        let mut no_point = [0u8; 32];
        no_point[0] = 2;
        for bytes in [identity, non_canonical, no_point] {
            assert_eq!(IdentityKey::from_bytes(&bytes), Err(E2eError::InvalidKey));
            let encoded = rmp_serde::to_vec(&serde_bytes::Bytes::new(&bytes)).unwrap();
            assert!(rmp_serde::from_slice::<IdentityKey>(&encoded).is_err());
        }
        let good = IdentityKeyPair::from_seed(&[3; 32]).public();
        assert_eq!(IdentityKey::from_bytes(good.as_bytes()), Ok(good));
    }

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let pair = IdentityKeyPair::from_seed(&[4; 32]);
        let sig = pair.sign(b"message");
        assert_eq!(pair.public().verify(b"message", &sig), Ok(()));
        assert_eq!(
            pair.public().verify(b"massage", &sig),
            Err(E2eError::BadSignature)
        );
        let other = IdentityKeyPair::from_seed(&[5; 32]).public();
        assert_eq!(other.verify(b"message", &sig), Err(E2eError::BadSignature));
    }

    #[test]
    fn key_pair_round_trips_and_hides_its_seed() {
        let pair = IdentityKeyPair::from_seed(&[0x42; 32]);
        assert!(!format!("{pair:?}").contains("4242"));
        let bytes = rmp_serde::to_vec(&pair).unwrap();
        let back: IdentityKeyPair = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.public(), pair.public());
    }

    #[test]
    fn safety_number_is_symmetric_and_key_dependent() {
        let (alice, bob) = (name("alice"), name("bob"));
        let ka = IdentityKeyPair::from_seed(&[1; 32]).public();
        let kb = IdentityKeyPair::from_seed(&[2; 32]).public();
        let kc = IdentityKeyPair::from_seed(&[3; 32]).public();
        let ab = safety_number(&alice, &ka, &bob, &kb);
        assert_eq!(ab, safety_number(&bob, &kb, &alice, &ka));
        assert_eq!(ab.len(), 60 + 11);
        assert!(
            ab.split(' ')
                .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit()))
        );
        assert_ne!(ab, safety_number(&alice, &ka, &bob, &kc));
        assert_ne!(ab, safety_number(&alice, &kb, &bob, &ka));
    }

    #[test]
    fn check_identity_reports_the_new_key() {
        let ka = IdentityKeyPair::from_seed(&[1; 32]).public();
        let kb = IdentityKeyPair::from_seed(&[2; 32]).public();
        assert_eq!(check_identity(&ka, &ka), Ok(()));
        assert_eq!(
            check_identity(&ka, &kb),
            Err(E2eError::IdentityChanged { presented: kb })
        );
    }
}
