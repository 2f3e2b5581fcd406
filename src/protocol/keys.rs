//! Public key material as it travels in control frames: fixed-size byte strings (`bin`).
//! What the bytes mean (Ed25519, X25519, signatures) is the business of `crate::e2e`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ids::FixedBytes;

/// Exactly `N` bytes, encoded as MessagePack `bin` (and only accepted as such).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bin<const N: usize>(pub [u8; N]);

impl<const N: usize> fmt::Debug for Bin<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> Serialize for Bin<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Bin<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_bytes(FixedBytes::<N>("a byte string of the documented length"))
            .map(Self)
    }
}

/// An Ed25519 public identity key (32 bytes).
pub type IdentityKeyBytes = Bin<32>;
/// An X25519 public key (32 bytes).
pub type PublicKeyBytes = Bin<32>;
/// An Ed25519 signature (64 bytes).
pub type SignatureBytes = Bin<64>;

/// A prekey signed by its owner's identity key (the signed prekey and the last-resort prekey).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPrekey {
    /// The owner's id for this key.
    pub id: u32,
    /// The X25519 public key.
    pub key: PublicKeyBytes,
    /// Ed25519 signature by the identity key (see the E2E section of the spec).
    pub signature: SignatureBytes,
}

/// A one-time prekey: handed out at most once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimePrekey {
    /// The owner's id for this key.
    pub id: u32,
    /// The X25519 public key.
    pub key: PublicKeyBytes,
}
