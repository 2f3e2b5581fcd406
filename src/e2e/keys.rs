//! Key material shared by every part of `e2e`: the zeroizing 32-byte secret, where fresh secrets
//! come from, X25519 with the all-zero check, and HKDF-SHA256.
//!
//! Protocol logic (which DH, which info string) lives in `x3dh` and `ratchet`, not here.

use std::fmt;

use hkdf::Hkdf;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::E2eError;

/// A 32-byte secret (X25519 private key, root key, chain key, message key, shared secret).
///
/// Zeroized on drop, masked in `Debug`, compared in constant time, and serialized as a
/// MessagePack `bin` of exactly 32 bytes.
#[derive(Clone)]
pub(crate) struct Secret32([u8; 32]);

impl Drop for Secret32 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for Secret32 {}

impl Secret32 {
    pub(crate) fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn expose_mut(&mut self) -> &mut [u8; 32] {
        &mut self.0
    }
}

impl PartialEq for Secret32 {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Secret32 {}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32(***)")
    }
}

impl Serialize for Secret32 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(SecretVisitor)
    }
}

/// Accepts only a byte string of exactly 32 bytes (never an array of integers), and wipes any
/// owned buffer it was handed.
struct SecretVisitor;

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a 32-byte secret as bin")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Secret32, E> {
        let bytes: [u8; 32] = v
            .try_into()
            .map_err(|_| E::invalid_length(v.len(), &self))?;
        Ok(Secret32(bytes))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Secret32, E> {
        let v = Zeroizing::new(v);
        self.visit_bytes(&v)
    }
}

/// Where fresh secret bytes come from.
///
/// Production code uses [`OsRandom`]. Tests and interoperability vectors pass a source that
/// replays fixed secrets, which is why every operation that needs randomness has a `_with`
/// variant taking one. Anything else must be a cryptographically secure generator.
pub trait SecretSource {
    /// 32 fresh secret bytes (an X25519 private key or an Ed25519 seed).
    fn secret_bytes(&mut self) -> Result<[u8; 32], E2eError>;
}

/// The operating system's CSPRNG (through `getrandom`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl SecretSource for OsRandom {
    fn secret_bytes(&mut self) -> Result<[u8; 32], E2eError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(bytes)
    }
}

/// A fresh secret from `source`, wrapped at once so it is wiped when dropped.
pub(crate) fn fresh_secret(source: &mut impl SecretSource) -> Result<Secret32, E2eError> {
    Ok(Secret32(source.secret_bytes()?))
}

/// The X25519 public key of a private key (RFC 7748: X25519(k, 9)).
pub(crate) fn x25519_public(secret: &Secret32) -> [u8; 32] {
    x25519_dalek::x25519(secret.0, x25519_dalek::X25519_BASEPOINT_BYTES)
}

/// X25519(secret, public), refusing an all-zero output: it means the peer's key has small order
/// and would make the "shared" secret public knowledge.
pub(crate) fn dh(secret: &Secret32, public: &[u8; 32]) -> Result<Secret32, E2eError> {
    let out = Secret32(x25519_dalek::x25519(secret.0, *public));
    if bool::from(out.0.ct_eq(&[0u8; 32])) {
        return Err(E2eError::InvalidKey);
    }
    Ok(out)
}

/// HKDF-SHA256 (RFC 5869) into `okm`.
pub(crate) fn hkdf_sha256(
    salt: &[u8],
    ikm: &[u8],
    info: &[u8],
    okm: &mut [u8],
) -> Result<(), E2eError> {
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, okm)
        .map_err(|_| E2eError::Primitive)
}

/// Appends to a vector of secrets without leaving copies behind: when full, the elements move
/// to a larger allocation and the old one is wiped before it is freed (a plain `push` would
/// reallocate and free the old copies as they are).
pub(crate) fn push_wiping<T>(vec: &mut Vec<T>, item: T) {
    if vec.len() == vec.capacity() {
        let mut grown = Vec::with_capacity(vec.capacity().saturating_mul(2).max(8));
        grown.append(vec);
        vec.spare_capacity_mut().zeroize();
        *vec = grown;
    }
    vec.push(item);
}

/// Keeps the elements `keep` accepts (the others are dropped, hence wiped if they are secrets),
/// then wipes the stale copies that shifting left in the spare capacity.
pub(crate) fn retain_wiping<T>(vec: &mut Vec<T>, keep: impl FnMut(&T) -> bool) {
    vec.retain(keep);
    vec.spare_capacity_mut().zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_masked_and_round_trips_as_bin32() {
        let secret = Secret32::new([0x5a; 32]);
        assert!(!format!("{secret:?}").contains("5a"));
        let bytes = rmp_serde::to_vec(&secret).unwrap();
        assert_eq!(&bytes[..2], &[0xc4, 32]);
        assert_eq!(rmp_serde::from_slice::<Secret32>(&bytes).unwrap(), secret);
        // An array of 32 integers is not a bin: refused.
        let array = rmp_serde::to_vec(&[0x5au8; 32].to_vec()).unwrap();
        assert!(rmp_serde::from_slice::<Secret32>(&array).is_err());
        let short = rmp_serde::to_vec(&serde_bytes::Bytes::new(&[1; 31])).unwrap();
        assert!(rmp_serde::from_slice::<Secret32>(&short).is_err());
    }

    #[test]
    fn dh_refuses_small_order_points() {
        let secret = Secret32::new([7; 32]);
        // u = 0 and u = 1 are points of small order: the output is all zeros.
        assert_eq!(dh(&secret, &[0; 32]), Err(E2eError::InvalidKey));
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(dh(&secret, &one), Err(E2eError::InvalidKey));
        let other = Secret32::new([9; 32]);
        let a = dh(&secret, &x25519_public(&other)).unwrap();
        let b = dh(&other, &x25519_public(&secret)).unwrap();
        assert_eq!(a, b);
    }
}
