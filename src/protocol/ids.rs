//! Identifiers that travel on the wire as fixed-size byte strings.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A device of an account: 1 for the device that signed up, then 2, 3, … in the order devices
/// are linked; never reused within the account.
pub type DeviceId = u32;

/// Length of a message id in bytes (128 bits).
pub const MESSAGE_ID_LEN: usize = 16;

/// A client-chosen 128-bit message id: MessagePack `bin` of exactly 16 bytes, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; MESSAGE_ID_LEN]);

impl MessageId {
    /// A fresh random id.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; MESSAGE_ID_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Parses 32 hex digits.
    pub fn from_hex(hex_id: &str) -> Option<Self> {
        let bytes = hex::decode(hex_id).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// The id as 32 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_bytes(FixedBytes::<MESSAGE_ID_LEN>("a 16-byte message id"))
            .map(Self)
    }
}

/// Length of a blob id in bytes (128 bits).
pub const BLOB_ID_LEN: usize = 16;

/// A client-chosen 128-bit id of an uploaded file (a blob): MessagePack `bin` of exactly 16
/// bytes, shown as hex. Global on a server: the first upload of an id owns it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; BLOB_ID_LEN]);

impl BlobId {
    /// A fresh random id.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; BLOB_ID_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Parses 32 hex digits.
    pub fn from_hex(hex_id: &str) -> Option<Self> {
        let bytes = hex::decode(hex_id).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// The id as 32 lower-case hex digits (also the blob's file name on the server).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.to_hex())
    }
}

impl Serialize for BlobId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_bytes(FixedBytes::<BLOB_ID_LEN>("a 16-byte blob id"))
            .map(Self)
    }
}

/// A serde visitor that accepts only a byte string of exactly `N` bytes (not a string, not an
/// array), so wire fields declared `bin` are strict.
pub(crate) struct FixedBytes<const N: usize>(pub &'static str);

impl<const N: usize> serde::de::Visitor<'_> for FixedBytes<N> {
    type Value = [u8; N];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
        bytes
            .try_into()
            .map_err(|_| E::invalid_length(bytes.len(), &self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_strict_bin() {
        let id = MessageId([0xab; 16]);
        assert_eq!(MessageId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(MessageId::from_hex("abc"), None);
        let bytes = rmp_serde::to_vec(&id).unwrap();
        assert_eq!(&bytes[..2], &[0xc4, 16]);
        assert_eq!(rmp_serde::from_slice::<MessageId>(&bytes).unwrap(), id);
        let as_str = rmp_serde::to_vec(&"a".repeat(16)).unwrap();
        assert!(rmp_serde::from_slice::<MessageId>(&as_str).is_err());
        let short = rmp_serde::to_vec(&serde_bytes::Bytes::new(&[1; 15])).unwrap();
        assert!(rmp_serde::from_slice::<MessageId>(&short).is_err());
    }
}
