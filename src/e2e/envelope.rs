//! The envelope: what one encrypted message looks like on the wire, a named MessagePack map
//! `{initial?, header, ciphertext}`, and its strict decoder.
//!
//! Decoding checks the shape on a generic value first (as `protocol::request` does), because
//! serde would accept an array for a map or a list of integers for a `bin`. Unknown keys are
//! refused too: this is a versioned cryptographic format, and a field we would ignore is a
//! field an attacker could use to make two encodings of one message.

use rmpv::Value;
use serde::Serialize;

use super::ratchet::{Header, TAG_LEN};
use super::{E2eError, IdentityKey, InitialHeader};

/// Largest plaintext a session seals, in bytes: an envelope then fits in a 64 KiB control frame
/// with room to spare for the request around it.
pub const MAX_PLAINTEXT_LEN: usize = 56 * 1024;
/// Largest encoded envelope accepted, in bytes.
pub const MAX_ENVELOPE_LEN: usize = 60 * 1024;
/// Nesting limit handed to rmpv, which counts a container and its body separately: an envelope
/// (map → map → bin) needs 7, anything past 16 is hostile.
const MAX_DEPTH: usize = 16;

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
    /// known keys with their documented types and lengths, and nothing after it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, E2eError> {
        if bytes.len() > MAX_ENVELOPE_LEN {
            return Err(E2eError::TooLarge {
                what: "envelope",
                len: bytes.len(),
                max: MAX_ENVELOPE_LEN,
            });
        }
        let mut rest = bytes;
        let value = rmpv::decode::read_value_with_max_depth(&mut rest, MAX_DEPTH)
            .map_err(|_| malformed("not a valid MessagePack value"))?;
        if !rest.is_empty() {
            return Err(malformed("bytes follow the MessagePack value"));
        }
        let map = Fields::of(&value, "envelope", &["initial", "header", "ciphertext"])?;
        let initial = match map.optional("initial") {
            Some(v) => Some(initial_header(v)?),
            None => None,
        };
        let header = header(map.required("header")?)?;
        let Value::Binary(ciphertext) = map.required("ciphertext")? else {
            return Err(malformed("`ciphertext` must be a bin"));
        };
        if ciphertext.len() < TAG_LEN || ciphertext.len() > MAX_PLAINTEXT_LEN + TAG_LEN {
            return Err(malformed("`ciphertext` has an impossible length"));
        }
        Ok(Self {
            initial,
            header,
            ciphertext: ciphertext.clone(),
        })
    }
}

/// The entries of a map, checked: string keys, no duplicates, none outside `allowed`.
struct Fields<'a> {
    what: &'static str,
    entries: Vec<(&'a str, &'a Value)>,
}

impl<'a> Fields<'a> {
    fn of(value: &'a Value, what: &'static str, allowed: &[&str]) -> Result<Self, E2eError> {
        let Value::Map(map) = value else {
            return Err(malformed(format!("`{what}` must be a map")));
        };
        let mut entries: Vec<(&str, &Value)> = Vec::with_capacity(map.len());
        for (key, value) in map {
            let Some(key) = key.as_str() else {
                return Err(malformed(format!(
                    "`{what}` has a key that is not a string"
                )));
            };
            if !allowed.contains(&key) {
                return Err(malformed(format!("`{what}` has an unknown key `{key}`")));
            }
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(malformed(format!("`{what}` has the key `{key}` twice")));
            }
            entries.push((key, value));
        }
        Ok(Self { what, entries })
    }

    /// The value of an optional key; nil counts as absent.
    fn optional(&self, key: &str) -> Option<&'a Value> {
        self.entries
            .iter()
            .find(|(k, v)| *k == key && !v.is_nil())
            .map(|(_, v)| *v)
    }

    fn required(&self, key: &str) -> Result<&'a Value, E2eError> {
        self.optional(key)
            .ok_or_else(|| malformed(format!("`{}` lacks `{key}`", self.what)))
    }
}

fn bin32(value: &Value, name: &str) -> Result<[u8; 32], E2eError> {
    match value {
        Value::Binary(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed(format!("`{name}` must be 32 bytes"))),
        _ => Err(malformed(format!("`{name}` must be a bin"))),
    }
}

fn uint32(value: &Value, name: &str) -> Result<u32, E2eError> {
    value
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| malformed(format!("`{name}` must be an unsigned 32-bit integer")))
}

fn header(value: &Value) -> Result<Header, E2eError> {
    let map = Fields::of(value, "header", &["dh", "pn", "n"])?;
    Ok(Header {
        dh: bin32(map.required("dh")?, "dh")?,
        pn: uint32(map.required("pn")?, "pn")?,
        n: uint32(map.required("n")?, "n")?,
    })
}

fn initial_header(value: &Value) -> Result<InitialHeader, E2eError> {
    let keys = [
        "identity_key",
        "ephemeral_key",
        "signed_prekey_id",
        "one_time_prekey_id",
    ];
    let map = Fields::of(value, "initial", &keys)?;
    let identity = bin32(map.required("identity_key")?, "identity_key")?;
    Ok(InitialHeader {
        identity_key: IdentityKey::from_bytes(&identity)?,
        ephemeral_key: bin32(map.required("ephemeral_key")?, "ephemeral_key")?,
        signed_prekey_id: uint32(map.required("signed_prekey_id")?, "signed_prekey_id")?,
        one_time_prekey_id: match map.optional("one_time_prekey_id") {
            Some(v) => Some(uint32(v, "one_time_prekey_id")?),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
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
