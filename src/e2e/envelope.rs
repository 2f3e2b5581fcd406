//! The envelope: what one encrypted message looks like on the wire, a named MessagePack map
//! `{initial?, header, ciphertext}`, and its strict decoder.
//!
//! The decoder reads the bytes directly, field by field, and accepts only the documented
//! shape: serde would take an array for a map or a list of integers for a `bin`. Unknown keys
//! are refused too: this is a versioned cryptographic format, and a field we would ignore is a
//! field an attacker could use to make two encodings of one message. (It once built a generic
//! `rmpv` value tree first; that allocation-heavy step was a sixth of a receiving client's CPU.)

use serde::Serialize;

use super::padding::MAX_PADDED_LEN;
use super::ratchet::{Header, TAG_LEN};
use super::{E2eError, IdentityKey, InitialHeader};

/// Largest content a session seals, in bytes (before padding to `MAX_PADDED_LEN` at most): an
/// envelope then fits in a 64 KiB control frame with room to spare for the request around it.
pub const MAX_PLAINTEXT_LEN: usize = 56 * 1024;
/// Largest encoded envelope accepted, in bytes.
pub const MAX_ENVELOPE_LEN: usize = 60 * 1024;

/// One encrypted message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Envelope {
    /// X3DH data, attached by the initiator until it has received a reply; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial: Option<InitialHeader>,
    /// The Double Ratchet header.
    pub header: Header,
    /// ChaCha20-Poly1305 ciphertext with its 16-byte tag appended.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

fn malformed(why: impl Into<String>) -> E2eError {
    E2eError::MalformedEnvelope(why.into())
}

impl Envelope {
    /// The identity key the sender claims, if this envelope carries an initial header.
    pub fn sender_identity(&self) -> Option<&IdentityKey> {
        self.initial.as_ref().map(|i| &i.identity_key)
    }

    /// Encodes as named MessagePack (fields in the order above, `initial` omitted when absent).
    pub fn to_bytes(&self) -> Result<Vec<u8>, E2eError> {
        let bytes = rmp_serde::to_vec_named(self).map_err(|e| E2eError::Encode(e.to_string()))?;
        if bytes.len() > MAX_ENVELOPE_LEN {
            return Err(E2eError::TooLarge {
                what: "envelope",
                len: bytes.len(),
                max: MAX_ENVELOPE_LEN,
            });
        }
        Ok(bytes)
    }

    /// Decodes an envelope strictly: exactly one map, string keys each at most once, only the
    /// known keys with their documented types and lengths, and nothing after it. A nil value
    /// counts as an absent key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, E2eError> {
        if bytes.len() > MAX_ENVELOPE_LEN {
            return Err(E2eError::TooLarge {
                what: "envelope",
                len: bytes.len(),
                max: MAX_ENVELOPE_LEN,
            });
        }
        let mut reader = Reader(bytes);
        let (mut initial, mut header, mut ciphertext) = (None, None, None);
        let mut fields = reader.map("envelope", &["initial", "header", "ciphertext"])?;
        while let Some(field) = fields.next_field(&mut reader)? {
            match field {
                "initial" => initial = Some(initial_header(&mut reader)?),
                "header" => header = Some(read_header(&mut reader)?),
                _ => ciphertext = Some(reader.bin("ciphertext")?),
            }
        }
        if !reader.0.is_empty() {
            return Err(malformed("bytes follow the MessagePack value"));
        }
        let header = header.ok_or_else(|| malformed("`envelope` lacks `header`"))?;
        let ciphertext = ciphertext.ok_or_else(|| malformed("`envelope` lacks `ciphertext`"))?;
        if ciphertext.len() < TAG_LEN || ciphertext.len() > MAX_PADDED_LEN + TAG_LEN {
            return Err(malformed("`ciphertext` has an impossible length"));
        }
        Ok(Self {
            initial,
            header,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

/// The bytes of an envelope not read yet.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Consumes a nil if one comes next.
    fn nil(&mut self) -> bool {
        match self.0.split_first() {
            Some((0xc0, rest)) => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    fn take(&mut self, len: u32) -> Result<&'a [u8], E2eError> {
        let len = usize::try_from(len).map_err(|_| malformed("a length overflows"))?;
        if len > self.0.len() {
            return Err(malformed("not a valid MessagePack value (truncated)"));
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    /// A map of `what` whose keys must come from `allowed` (at most 8).
    fn map(
        &mut self,
        what: &'static str,
        allowed: &'static [&'static str],
    ) -> Result<Fields, E2eError> {
        debug_assert!(allowed.len() <= 8, "`Fields::seen` has 8 bits");
        let left = rmp::decode::read_map_len(&mut self.0)
            .map_err(|_| malformed(format!("`{what}` must be a map")))?;
        Ok(Fields {
            what,
            allowed,
            seen: 0,
            left,
        })
    }

    fn str(&mut self, what: &str) -> Result<&'a str, E2eError> {
        let len = rmp::decode::read_str_len(&mut self.0)
            .map_err(|_| malformed(format!("`{what}` has a key that is not a string")))?;
        std::str::from_utf8(self.take(len)?)
            .map_err(|_| malformed(format!("`{what}` has a key that is not UTF-8")))
    }

    fn bin(&mut self, name: &str) -> Result<&'a [u8], E2eError> {
        let len = rmp::decode::read_bin_len(&mut self.0)
            .map_err(|_| malformed(format!("`{name}` must be a bin")))?;
        self.take(len)
    }

    fn bin32(&mut self, name: &str) -> Result<[u8; 32], E2eError> {
        self.bin(name)?
            .try_into()
            .map_err(|_| malformed(format!("`{name}` must be 32 bytes")))
    }

    fn uint32(&mut self, name: &str) -> Result<u32, E2eError> {
        rmp::decode::read_int(&mut self.0)
            .map_err(|_| malformed(format!("`{name}` must be an unsigned 32-bit integer")))
    }
}

/// The keys of a map being read: each known, each at most once.
struct Fields {
    what: &'static str,
    allowed: &'static [&'static str],
    seen: u8,
    left: u32,
}

impl Fields {
    /// The next key whose value is not nil (the reader is then at its value), or `None` at
    /// the end of the map. Every key must be allowed and new, so a map can have at most
    /// `allowed.len()` entries whatever its header claims.
    fn next_field(&mut self, reader: &mut Reader<'_>) -> Result<Option<&'static str>, E2eError> {
        while self.left > 0 {
            self.left -= 1;
            let key = reader.str(self.what)?;
            let Some(index) = self.allowed.iter().position(|k| *k == key) else {
                return Err(malformed(format!(
                    "`{}` has an unknown key `{key}`",
                    self.what
                )));
            };
            let bit = 1u8 << index;
            if self.seen & bit != 0 {
                return Err(malformed(format!(
                    "`{}` has the key `{key}` twice",
                    self.what
                )));
            }
            self.seen |= bit;
            if !reader.nil() {
                return Ok(Some(self.allowed[index]));
            }
        }
        Ok(None)
    }
}

fn read_header(reader: &mut Reader<'_>) -> Result<Header, E2eError> {
    let (mut dh, mut pn, mut n) = (None, None, None);
    let mut fields = reader.map("header", &["dh", "pn", "n"])?;
    while let Some(field) = fields.next_field(reader)? {
        match field {
            "dh" => dh = Some(reader.bin32("dh")?),
            "pn" => pn = Some(reader.uint32("pn")?),
            _ => n = Some(reader.uint32("n")?),
        }
    }
    let lacks = |key: &str| malformed(format!("`header` lacks `{key}`"));
    Ok(Header {
        dh: dh.ok_or_else(|| lacks("dh"))?,
        pn: pn.ok_or_else(|| lacks("pn"))?,
        n: n.ok_or_else(|| lacks("n"))?,
    })
}

fn initial_header(reader: &mut Reader<'_>) -> Result<InitialHeader, E2eError> {
    const KEYS: &[&str] = &[
        "identity_key",
        "ephemeral_key",
        "signed_prekey_id",
        "one_time_prekey_id",
    ];
    let (mut identity, mut ephemeral, mut signed, mut one_time) = (None, None, None, None);
    let mut fields = reader.map("initial", KEYS)?;
    while let Some(field) = fields.next_field(reader)? {
        match field {
            "identity_key" => identity = Some(reader.bin32("identity_key")?),
            "ephemeral_key" => ephemeral = Some(reader.bin32("ephemeral_key")?),
            "signed_prekey_id" => signed = Some(reader.uint32("signed_prekey_id")?),
            _ => one_time = Some(reader.uint32("one_time_prekey_id")?),
        }
    }
    let lacks = |key: &str| malformed(format!("`initial` lacks `{key}`"));
    Ok(InitialHeader {
        identity_key: IdentityKey::from_bytes(&identity.ok_or_else(|| lacks("identity_key"))?)?,
        ephemeral_key: ephemeral.ok_or_else(|| lacks("ephemeral_key"))?,
        signed_prekey_id: signed.ok_or_else(|| lacks("signed_prekey_id"))?,
        one_time_prekey_id: one_time,
    })
}

#[cfg(test)]
mod tests {
    use rmpv::Value;

    use super::*;
    use crate::e2e::IdentityKeyPair;

    fn sample(initial: bool) -> Envelope {
        Envelope {
            initial: initial.then(|| InitialHeader {
                identity_key: IdentityKeyPair::from_seed(&[1; 32]).public(),
                ephemeral_key: [2; 32],
                signed_prekey_id: 7,
                one_time_prekey_id: Some(70_000),
            }),
            header: Header {
                dh: [3; 32],
                pn: 0,
                n: 300,
            },
            ciphertext: vec![4; 20],
        }
    }

    #[test]
    fn round_trips_with_and_without_initial() {
        for env in [sample(true), sample(false)] {
            let bytes = env.to_bytes().unwrap();
            assert_eq!(Envelope::from_bytes(&bytes).unwrap(), env);
        }
        // Without `initial` the map has two keys and starts with `header`.
        let bytes = sample(false).to_bytes().unwrap();
        assert_eq!(
            &bytes[..8],
            &[0x82, 0xa6, b'h', b'e', b'a', b'd', b'e', b'r']
        );
    }

    fn encode(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).unwrap();
        out
    }

    fn as_value(env: &Envelope) -> Value {
        rmpv::decode::read_value(&mut env.to_bytes().unwrap().as_slice()).unwrap()
    }

    fn edit(env: &Envelope, f: impl FnOnce(&mut Vec<(Value, Value)>)) -> Vec<u8> {
        let Value::Map(mut map) = as_value(env) else {
            panic!("not a map")
        };
        f(&mut map);
        encode(&Value::Map(map))
    }

    #[test]
    fn shapes_serde_would_tolerate_are_refused() {
        let env = sample(true);
        let key = |k: &str| Value::from(k);
        let cases = vec![
            edit(&env, |m| m.push((key("extra"), Value::from(1)))),
            edit(&env, |m| m.push((key("header"), m[1].1.clone()))),
            edit(&env, |m| {
                m.retain(|(k, _)| k.as_str() != Some("ciphertext"))
            }),
            edit(&env, |m| m[2].1 = Value::from(vec![Value::from(4); 20])),
            edit(&env, |m| m[2].1 = Value::Binary(vec![4; 15])),
            edit(&env, |m| m[1].1 = Value::Array(vec![])),
            edit(&env, |m| m.push((Value::from(1), Value::from(1)))),
            [env.to_bytes().unwrap(), vec![0xc0]].concat(),
            rmp_serde::to_vec(&env).unwrap(), // positional (array) encoding
            vec![0xdf, 0xff, 0xff, 0xff, 0xff],
            vec![],
            // Cut short inside the ciphertext, and inside the first key.
            env.to_bytes().unwrap()[..env.to_bytes().unwrap().len() - 1].to_vec(),
            env.to_bytes().unwrap()[..3].to_vec(),
            // A nil header is an absent one; a key may not come twice even as nil.
            edit(&env, |m| m[1].1 = Value::Nil),
            edit(&env, |m| {
                m.push((key("initial"), Value::Nil));
                m.push((key("initial"), Value::Nil));
            }),
            // A key that is a str of invalid UTF-8.
            {
                let bytes = edit(&env, |m| m.push((Value::from(vec![0xff_u8]), Value::Nil)));
                assert!(bytes.ends_with(&[0xc4, 0x01, 0xff, 0xc0]));
                [&bytes[..bytes.len() - 4], &[0xa1, 0xff, 0xc0]].concat()
            },
        ];
        for bytes in cases {
            assert!(
                matches!(
                    Envelope::from_bytes(&bytes),
                    Err(E2eError::MalformedEnvelope(_))
                ),
                "{bytes:02x?} → {:?}",
                Envelope::from_bytes(&bytes)
            );
        }
        let too_big = vec![0u8; MAX_ENVELOPE_LEN + 1];
        assert!(matches!(
            Envelope::from_bytes(&too_big),
            Err(E2eError::TooLarge { .. })
        ));
    }

    #[test]
    fn header_fields_are_checked() {
        let env = sample(false);
        let with_header = |h: Value| edit(&env, |m| m[0].1 = h);
        let dh = || (Value::from("dh"), Value::Binary(vec![3; 32]));
        let cases = [
            Value::Map(vec![dh(), (Value::from("pn"), Value::from(0))]),
            Value::Map(vec![
                dh(),
                (Value::from("pn"), Value::from(-1)),
                (Value::from("n"), Value::from(0)),
            ]),
            Value::Map(vec![
                dh(),
                (Value::from("pn"), Value::from(0)),
                (Value::from("n"), Value::from(u64::from(u32::MAX) + 1)),
            ]),
            Value::Map(vec![
                (Value::from("dh"), Value::Binary(vec![3; 31])),
                (Value::from("pn"), Value::from(0)),
                (Value::from("n"), Value::from(0)),
            ]),
        ];
        for header in cases {
            assert!(matches!(
                Envelope::from_bytes(&with_header(header)),
                Err(E2eError::MalformedEnvelope(_))
            ));
        }
        // Keys in another order and a nil `initial` are fine.
        let reordered = edit(&env, |m| {
            m.reverse();
            m.push((Value::from("initial"), Value::Nil));
        });
        assert_eq!(Envelope::from_bytes(&reordered).unwrap(), env);
    }

    #[test]
    fn invalid_identity_in_initial_header_is_an_invalid_key() {
        let env = sample(true);
        let bytes = edit(&env, |m| {
            if let Value::Map(initial) = &mut m[0].1 {
                initial[0].1 = Value::Binary(vec![0; 32]);
            }
        });
        assert_eq!(Envelope::from_bytes(&bytes), Err(E2eError::InvalidKey));
    }
}
