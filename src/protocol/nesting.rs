//! How deeply a MessagePack value nests maps and arrays, measured on the bytes without decoding
//! them, so that every frame decoder applies the one limit the protocol states.
//!
//! Generic decoders count depth in their own units (rmpv spends about two per map or array and
//! more on a string inside one), which made "16 levels" mean 6 maps or 7 arrays. Here a map or
//! an array is one level, and nothing else is.

use rmp::Marker;

/// Deepest nesting of maps and arrays in a frame body: the body's own map is level 1, a map or
/// array that is a value inside it level 2, and so on. Real frames need 3 (`publish_keys`:
/// the request, `one_time_prekeys`, each prekey); the rest is room for fields to come.
pub const MAX_NESTING: usize = 16;

/// A value nests maps and arrays deeper than the limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the value nests maps and arrays more than {max} levels deep")]
pub struct TooDeep {
    /// The limit in force.
    pub max: usize,
}

/// What one marker announces.
enum Item {
    /// A scalar followed by this many bytes of payload.
    Skip(u64),
    /// A scalar whose payload length is the big-endian integer of this many bytes after the
    /// marker, plus `extra` bytes (the type byte of an extension).
    Sized { len_bytes: usize, extra: u64 },
    /// A map or array holding this many values (a map's keys and values both count).
    Container(u64),
    /// A container whose element count is the big-endian integer of this many bytes; `per`
    /// values per element (2 for a map).
    SizedContainer { len_bytes: usize, per: u64 },
    /// A byte that is not a MessagePack marker (0xc1, "never used").
    Invalid,
}

fn item(marker: Marker) -> Item {
    use Item::{Container, Invalid, Sized, SizedContainer, Skip};
    match marker {
        Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
            Skip(0)
        }
        Marker::U8 | Marker::I8 => Skip(1),
        Marker::U16 | Marker::I16 => Skip(2),
        Marker::U32 | Marker::I32 | Marker::F32 => Skip(4),
        Marker::U64 | Marker::I64 | Marker::F64 => Skip(8),
        Marker::FixStr(n) => Skip(u64::from(n)),
        Marker::Str8 | Marker::Bin8 => Sized {
            len_bytes: 1,
            extra: 0,
        },
        Marker::Str16 | Marker::Bin16 => Sized {
            len_bytes: 2,
            extra: 0,
        },
        Marker::Str32 | Marker::Bin32 => Sized {
            len_bytes: 4,
            extra: 0,
        },
        Marker::FixExt1 => Skip(2),
        Marker::FixExt2 => Skip(3),
        Marker::FixExt4 => Skip(5),
        Marker::FixExt8 => Skip(9),
        Marker::FixExt16 => Skip(17),
        Marker::Ext8 => Sized {
            len_bytes: 1,
            extra: 1,
        },
        Marker::Ext16 => Sized {
            len_bytes: 2,
            extra: 1,
        },
        Marker::Ext32 => Sized {
            len_bytes: 4,
            extra: 1,
        },
        Marker::FixArray(n) => Container(u64::from(n)),
        Marker::FixMap(n) => Container(2 * u64::from(n)),
        Marker::Array16 => SizedContainer {
            len_bytes: 2,
            per: 1,
        },
        Marker::Array32 => SizedContainer {
            len_bytes: 4,
            per: 1,
        },
        Marker::Map16 => SizedContainer {
            len_bytes: 2,
            per: 2,
        },
        Marker::Map32 => SizedContainer {
            len_bytes: 4,
            per: 2,
        },
        Marker::Reserved => Invalid,
    }
}

/// The big-endian integer of `n` bytes at `pos`, if the input holds them.
fn be_uint(bytes: &[u8], pos: usize, n: usize) -> Option<u64> {
    let field = bytes.get(pos..pos.checked_add(n)?)?;
    Some(field.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Refuses `bytes` if the MessagePack value at its start nests maps and arrays more than `max`
/// levels deep (a `max` above [`MAX_NESTING`] counts as [`MAX_NESTING`]).
///
/// Only depth is judged: input that is truncated or not MessagePack passes as far as it goes,
/// and the decoder that runs next refuses it. The reserved byte 0xc1 counts as a scalar, as
/// rmpv (which reads it as nil) counts it. Runs in one pass without recursion or allocation.
pub fn check_nesting(bytes: &[u8], max: usize) -> Result<(), TooDeep> {
    match scan(bytes, max, false) {
        Err(MarkerError::TooDeep(e)) => Err(e),
        Ok(()) | Err(MarkerError::Reserved) => Ok(()),
    }
}

/// Why [`check_markers`] refused a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MarkerError {
    /// It nests too deeply.
    #[error(transparent)]
    TooDeep(#[from] TooDeep),
    /// It holds the byte 0xc1 where a value starts.
    #[error("the byte 0xc1, which MessagePack never uses, stands where a value starts")]
    Reserved,
}

/// [`check_nesting`], and also refuses the reserved byte 0xc1 where a value starts, which
/// rmpv would read as nil: for the decoders that read through rmpv (`decode_request`), so that
/// they refuse what the MessagePack specification and strict decoders in other languages do.
pub fn check_markers(bytes: &[u8], max: usize) -> Result<(), MarkerError> {
    scan(bytes, max, true)
}

fn scan(bytes: &[u8], max: usize, strict: bool) -> Result<(), MarkerError> {
    // Values still to read in each open container, innermost last (at most `max` of them);
    // `pending` is for the innermost, or for the top level (one value) when none is open.
    let max = max.min(MAX_NESTING);
    let mut open = [0u64; MAX_NESTING];
    let mut depth = 0usize;
    let mut pending = 1u64;
    let mut pos = 0usize;
    loop {
        while pending == 0 {
            if depth == 0 {
                return Ok(());
            }
            depth -= 1;
            pending = open[depth];
        }
        pending -= 1;
        let Some(&byte) = bytes.get(pos) else {
            return Ok(());
        };
        pos += 1;
        let (skip, values) = match item(Marker::from_u8(byte)) {
            Item::Skip(n) => (n, None),
            Item::Sized { len_bytes, extra } => match be_uint(bytes, pos, len_bytes) {
                Some(len) => (len_bytes as u64 + extra + len, None),
                None => return Ok(()),
            },
            Item::Container(values) => (0, Some(values)),
            Item::SizedContainer { len_bytes, per } => match be_uint(bytes, pos, len_bytes) {
                Some(len) => (len_bytes as u64, Some(len * per)),
                None => return Ok(()),
            },
            // rmpv reads this byte as nil and goes on: count it as a one-byte scalar so that
            // what follows is still measured (stopping here let deeper nesting through to
            // `decode_request`; found by the `nesting` fuzz target).
            Item::Invalid if strict => return Err(MarkerError::Reserved),
            Item::Invalid => (0, None),
        };
        let Some(next) = usize::try_from(skip).ok().and_then(|s| pos.checked_add(s)) else {
            return Ok(());
        };
        pos = next;
        if let Some(values) = values {
            if depth >= max {
                return Err(MarkerError::TooDeep(TooDeep { max }));
            }
            open[depth] = pending;
            depth += 1;
            pending = values;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).unwrap();
        out
    }

    /// `levels` maps (or arrays) inside each other, the innermost holding a string.
    fn nested(levels: usize, maps: bool) -> rmpv::Value {
        let mut value = rmpv::Value::from("leaf");
        for _ in 0..levels {
            value = if maps {
                rmpv::Value::Map(vec![("k".into(), value)])
            } else {
                rmpv::Value::Array(vec![1.into(), value])
            };
        }
        value
    }

    #[test]
    fn one_level_per_map_or_array() {
        for maps in [true, false] {
            let deepest = encode(&nested(MAX_NESTING, maps));
            assert_eq!(check_nesting(&deepest, MAX_NESTING), Ok(()));
            let too_deep = encode(&nested(MAX_NESTING + 1, maps));
            assert_eq!(
                check_nesting(&too_deep, MAX_NESTING),
                Err(TooDeep { max: MAX_NESTING })
            );
        }
        assert_eq!(check_nesting(&encode(&"scalar".into()), 0), Ok(()));
        assert!(check_nesting(&[0x90], 0).is_err());
    }

    #[test]
    fn siblings_do_not_add_up() {
        // [[...15...], [...15...], {k: [..15..]}] is 16 deep however many siblings there are.
        let branch = nested(MAX_NESTING - 1, false);
        let value = rmpv::Value::Array(vec![
            branch.clone(),
            rmpv::Value::Binary(vec![0; 300]),
            branch.clone(),
            rmpv::Value::Ext(5, vec![1; 3]),
            rmpv::Value::Map(vec![(1.into(), nested(MAX_NESTING - 2, true))]),
            rmpv::Value::from(u64::MAX),
            rmpv::Value::F64(1.5),
            "x".repeat(70_000).into(),
        ]);
        assert_eq!(check_nesting(&encode(&value), MAX_NESTING), Ok(()));
    }

    #[test]
    fn huge_or_truncated_input_passes_to_the_decoder() {
        for bytes in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff, 0x01],
            &[0xdb, 0xff, 0xff, 0xff, 0xff],
            &[0xc1],
            &[0x92, 0xc4],
            &[],
        ] {
            assert_eq!(check_nesting(bytes, MAX_NESTING), Ok(()), "{bytes:02x?}");
        }
        // A huge count does not hide depth that comes before the input ends.
        let mut bytes = vec![0xdd, 0xff, 0xff, 0xff, 0xff];
        bytes.extend_from_slice(&[0x91; MAX_NESTING]);
        assert!(check_nesting(&bytes, MAX_NESTING).is_err());
    }
}
