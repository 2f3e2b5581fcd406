//! Headers of unidirectional streams. Every message is one unidirectional QUIC stream: a header
//! frame (same framing as the control stream), then exactly `length` bytes of sealed body, then
//! FIN. Blobs (sealed files) travel the same way: an `upload` stream from the client, a `blob`
//! stream from the server, each a header and then a run of the blob's bytes.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{BlobId, DeviceId, MessageId};

/// Largest header frame body, in bytes.
pub const MAX_STREAM_HEADER: u32 = 1024;

/// The header frame that opens a message stream.
///
/// Decoded through `WireHeader`, a flat map of every field: serde's decoder for an
/// internally tagged enum buffers the whole map into generic values first, which cost a
/// tenth of a receiving client's CPU (one header per message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", try_from = "WireHeader")]
pub enum StreamHeader {
    /// Client → server: a message to store and deliver.
    Send(SendHeader),
    /// Server → client: a message for you.
    Deliver(DeliverHeader),
    /// Client → server: bytes of a blob being uploaded, from `offset` to its end.
    Upload(UploadHeader),
    /// Server → client: bytes of a blob you asked for, from `offset` to its end.
    Blob(BlobHeader),
}

/// Client → server: the header of an upload stream. The bytes after it continue the blob from
/// `offset`, which must be what the server holds (`blob_upload`'s `held`), to its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadHeader {
    /// The blob, announced with `upload_blob`.
    pub blob: BlobId,
    /// Where these bytes start in the blob.
    pub offset: u64,
}

/// Server → client: the header of a blob stream, answering `download_blob`. The bytes after it
/// are the blob from `offset` to `length`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobHeader {
    /// The blob.
    pub blob: BlobId,
    /// Where these bytes start in the blob.
    pub offset: u64,
    /// The blob's whole length.
    pub length: u64,
}

/// Client → server: the header of a message to send.
///
/// Serialized by hand: a group send has no `to` on the wire, while a 1:1 send always carries
/// it (also empty).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SendHeader {
    /// Chosen by the sender; resending the same id is recognised, not stored twice.
    pub id: MessageId,
    /// The recipient's username; empty (and absent on the wire) for a group send.
    #[serde(default)]
    pub to: String,
    /// What the body is, for the recipient's client (`text` for chat messages); not
    /// interpreted by the server. At most 32 bytes.
    pub kind: String,
    /// Body length in bytes: the sum of `lengths`.
    pub length: u64,
    /// The copies in the body, one per device, absent for a single copy to the recipient's
    /// device 1 (clients from before devices). Always absent for a group send.
    #[serde(flatten)]
    pub copies: Option<Copies>,
    /// A group send (docs/PROTOCOL.md 5.7): the group's name, instead of `to` and the copies.
    #[serde(default)]
    pub group: Option<String>,
    /// On a group send of a commit that adds members: the length of the Welcome that ends
    /// the body (the commit comes first, `length - welcome` bytes).
    #[serde(default)]
    pub welcome: Option<u64>,
}

impl Serialize for SendHeader {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", &self.id)?;
        if self.group.is_none() {
            map.serialize_entry("to", &self.to)?;
        }
        map.serialize_entry("kind", &self.kind)?;
        map.serialize_entry("length", &self.length)?;
        if let Some(copies) = &self.copies {
            map.serialize_entry("devices", &copies.devices)?;
            map.serialize_entry("own_devices", &copies.own_devices)?;
            map.serialize_entry("lengths", &copies.lengths)?;
        }
        if let Some(group) = &self.group {
            map.serialize_entry("group", group)?;
        }
        if let Some(welcome) = self.welcome {
            map.serialize_entry("welcome", &welcome)?;
        }
        map.end()
    }
}

/// Which devices a message was sealed for: the body is one sealed copy per device, in the
/// order of `devices` then `own_devices`, back to back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copies {
    /// The recipient's devices, each once.
    pub devices: Vec<DeviceId>,
    /// The sender's other devices, each once (not the sending one; for a message to oneself,
    /// the only copies).
    pub own_devices: Vec<DeviceId>,
    /// Each copy's length in bytes, in the order above.
    pub lengths: Vec<u64>,
}

impl SendHeader {
    /// The copies, with the single copy of a header without them as `devices: [1]`.
    pub fn copies(&self) -> Copies {
        self.copies.clone().unwrap_or_else(|| Copies {
            devices: vec![1],
            own_devices: Vec::new(),
            lengths: vec![self.length],
        })
    }
}

/// Server → client: the header of a delivered message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverHeader {
    /// The server's sequence number in your inbox: what you acknowledge.
    pub seq: u64,
    /// The `seq` of the message delivered just before this one on this connection (0 for the
    /// first): process messages in this chain's order to keep the server's order.
    pub prev: u64,
    /// The sender's message id.
    pub id: MessageId,
    /// The sender's username.
    pub from: String,
    /// The sender's device: which session opens the body.
    pub from_device: DeviceId,
    /// On a copy of a message you sent from another device: its recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// When the server stored it, in seconds since the Unix epoch.
    pub sent_at: u64,
    /// The sender's `kind`.
    pub kind: String,
    /// Body length in bytes.
    pub length: u64,
    /// On group traffic: the group's name (docs/PROTOCOL.md 5.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The `type` of a stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HeaderType {
    Send,
    Deliver,
    Upload,
    Blob,
}

/// A stream header as it arrives: every field of either type, keys in any order, unknown keys
/// ignored (as everywhere in the protocol); [`StreamHeader::try_from`] checks that the fields
/// its `type` needs are there. The fields both types carry are typed strictly; those of one
/// type only are read as [`Loose`] values, because to the other type they are unknown keys,
/// which must be ignored whatever their value.
#[derive(Deserialize)]
struct WireHeader {
    #[serde(rename = "type")]
    header_type: HeaderType,
    id: Option<MessageId>,
    kind: Option<String>,
    length: Option<u64>,
    to: Option<Loose>,
    seq: Option<Loose>,
    prev: Option<Loose>,
    from: Option<Loose>,
    sent_at: Option<Loose>,
    from_device: Option<Loose>,
    devices: Option<Loose>,
    own_devices: Option<Loose>,
    lengths: Option<Loose>,
    blob: Option<Loose>,
    offset: Option<Loose>,
    group: Option<Loose>,
    welcome: Option<Loose>,
}

/// Any MessagePack value, kept only if it is an unsigned integer, a string, a byte string or
/// an array of unsigned integers (a header is at most 1,024 bytes, so these are short).
enum Loose {
    Uint(u64),
    Str(String),
    Bin(Vec<u8>),
    Uints(Vec<u64>),
    Other,
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MessagePack value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose, E> {
        Ok(Loose::Other)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose, E> {
        Ok(u64::try_from(v).map_or(Loose::Other, Loose::Uint))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
        Ok(Loose::Uint(v))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Loose, E> {
        Ok(Loose::Other)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
        Ok(Loose::Str(v.to_owned()))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Loose, E> {
        Ok(Loose::Bin(v.to_vec()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Other)
    }

    fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Other)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Loose, D::Error> {
        IgnoredAny::deserialize(deserializer).map(|_| Loose::Other)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Loose, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Loose::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
        let mut uints = Some(Vec::new());
        while let Some(item) = seq.next_element::<Loose>()? {
            match (item, uints.as_mut()) {
                (Loose::Uint(v), Some(list)) => list.push(v),
                _ => uints = None,
            }
        }
        Ok(uints.map_or(Loose::Other, Loose::Uints))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }
}

/// A field that a stream header of its `type` must carry.
fn required<T>(value: Option<T>, field: &str) -> Result<T, String> {
    value.ok_or_else(|| format!("missing field `{field}`"))
}

/// A field of this `type` only, which must be an unsigned integer.
fn uint(value: Option<Loose>, field: &str) -> Result<u64, String> {
    match required(value, field)? {
        Loose::Uint(v) => Ok(v),
        _ => Err(format!("field `{field}` must be an unsigned integer")),
    }
}

/// A field of this `type` only, which must be a string.
fn text(value: Option<Loose>, field: &str) -> Result<String, String> {
    match required(value, field)? {
        Loose::Str(v) => Ok(v),
        _ => Err(format!("field `{field}` must be a string")),
    }
}

/// A field of this `type` only, which must be a 16-byte blob id.
fn blob_id(value: Option<Loose>) -> Result<BlobId, String> {
    match required(value, "blob")? {
        Loose::Bin(v) => v
            .try_into()
            .map(BlobId)
            .map_err(|_| "field `blob` must be 16 bytes".to_owned()),
        _ => Err("field `blob` must be a byte string (bin)".to_owned()),
    }
}

/// A field of this `type` only, which must be an array of unsigned integers.
fn uints(value: Option<Loose>, field: &str) -> Result<Vec<u64>, String> {
    match required(value, field)? {
        Loose::Uints(v) => Ok(v),
        _ => Err(format!(
            "field `{field}` must be an array of unsigned integers"
        )),
    }
}

/// A device id from an array of them.
fn device_ids(values: Vec<u64>, field: &str) -> Result<Vec<DeviceId>, String> {
    values
        .into_iter()
        .map(|v| {
            DeviceId::try_from(v).map_err(|_| format!("`{field}` holds a device id over 2^32"))
        })
        .collect()
}

/// The copies of a send header: all three fields or none (`own_devices` may be left out when
/// empty), one length per device, summing to the header's `length`.
fn copies(wire: &mut WireHeader, length: u64) -> Result<Option<Copies>, String> {
    if wire.devices.is_none() && wire.own_devices.is_none() && wire.lengths.is_none() {
        return Ok(None);
    }
    let devices = device_ids(uints(wire.devices.take(), "devices")?, "devices")?;
    let own_devices = match wire.own_devices.take() {
        None => Vec::new(),
        some => device_ids(uints(some, "own_devices")?, "own_devices")?,
    };
    let lengths = uints(wire.lengths.take(), "lengths")?;
    if lengths.len() != devices.len() + own_devices.len() {
        return Err("`lengths` must hold one length per device".into());
    }
    if lengths.iter().try_fold(0u64, |sum, l| sum.checked_add(*l)) != Some(length) {
        return Err("`lengths` must add up to `length`".into());
    }
    Ok(Some(Copies {
        devices,
        own_devices,
        lengths,
    }))
}

impl TryFrom<WireHeader> for StreamHeader {
    type Error = String;

    fn try_from(mut wire: WireHeader) -> Result<Self, String> {
        Ok(match wire.header_type {
            HeaderType::Send if wire.group.is_some() => {
                let length = required(wire.length, "length")?;
                if wire.to.is_some()
                    || wire.devices.is_some()
                    || wire.own_devices.is_some()
                    || wire.lengths.is_some()
                {
                    return Err("a group send carries no `to` and no copies".into());
                }
                let welcome = match wire.welcome {
                    None => None,
                    some => Some(uint(some, "welcome")?),
                };
                if welcome.is_some_and(|w| w > length) {
                    return Err("`welcome` must not exceed `length`".into());
                }
                Self::Send(SendHeader {
                    id: required(wire.id, "id")?,
                    to: String::new(),
                    kind: required(wire.kind, "kind")?,
                    length,
                    copies: None,
                    group: Some(text(wire.group, "group")?),
                    welcome,
                })
            }
            HeaderType::Send => {
                let length = required(wire.length, "length")?;
                if wire.welcome.is_some() {
                    return Err("`welcome` is only for a group send".into());
                }
                Self::Send(SendHeader {
                    copies: copies(&mut wire, length)?,
                    id: required(wire.id, "id")?,
                    to: text(wire.to, "to")?,
                    kind: required(wire.kind, "kind")?,
                    length,
                    group: None,
                    welcome: None,
                })
            }
            HeaderType::Deliver => Self::Deliver(DeliverHeader {
                seq: uint(wire.seq, "seq")?,
                prev: uint(wire.prev, "prev")?,
                id: required(wire.id, "id")?,
                from: text(wire.from, "from")?,
                from_device: DeviceId::try_from(uint(wire.from_device, "from_device")?)
                    .map_err(|_| "`from_device` is over 2^32".to_owned())?,
                to: match wire.to {
                    None => None,
                    some => Some(text(some, "to")?),
                },
                sent_at: uint(wire.sent_at, "sent_at")?,
                kind: required(wire.kind, "kind")?,
                length: required(wire.length, "length")?,
                group: match wire.group {
                    None => None,
                    some => Some(text(some, "group")?),
                },
            }),
            HeaderType::Upload => Self::Upload(UploadHeader {
                blob: blob_id(wire.blob)?,
                offset: uint(wire.offset, "offset")?,
            }),
            HeaderType::Blob => Self::Blob(BlobHeader {
                blob: blob_id(wire.blob)?,
                offset: uint(wire.offset, "offset")?,
                length: required(wire.length, "length")?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode_body;

    fn encode(value: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).unwrap();
        out
    }

    fn map(entries: &[(&str, rmpv::Value)]) -> rmpv::Value {
        rmpv::Value::Map(
            entries
                .iter()
                .map(|(k, v)| (rmpv::Value::from(*k), v.clone()))
                .collect(),
        )
    }

    fn send_fields() -> Vec<(&'static str, rmpv::Value)> {
        vec![
            ("type", "send".into()),
            ("id", rmpv::Value::Binary(vec![7; 16])),
            ("to", "bob".into()),
            ("kind", "text".into()),
            ("length", 120.into()),
        ]
    }

    fn sample_deliver() -> DeliverHeader {
        DeliverHeader {
            seq: 5,
            prev: 3,
            id: MessageId([2; 16]),
            from: "alice".into(),
            from_device: 1,
            to: None,
            sent_at: 1_700_000_000,
            kind: "text".into(),
            length: 200,
            group: None,
        }
    }

    #[test]
    fn both_types_round_trip() {
        let send = StreamHeader::Send(SendHeader {
            id: MessageId([1; 16]),
            to: "bob".into(),
            kind: "text".into(),
            length: 9,
            copies: None,
            group: None,
            welcome: None,
        });
        for header in [send, StreamHeader::Deliver(sample_deliver())] {
            let bytes = rmp_serde::to_vec_named(&header).unwrap();
            assert_eq!(decode_body::<StreamHeader>(&bytes).unwrap(), header);
        }
    }

    #[test]
    fn keys_in_any_order_and_unknown_keys_are_accepted() {
        let mut fields = send_fields();
        fields.reverse();
        fields.push(("future_field", rmpv::Value::Array(vec![1.into()])));
        let header = decode_body::<StreamHeader>(&encode(&map(&fields))).unwrap();
        let StreamHeader::Send(send) = header else {
            panic!("not a send header: {header:?}");
        };
        assert_eq!((send.to.as_str(), send.length), ("bob", 120));
    }

    #[test]
    fn keys_of_the_other_type_are_ignored_whatever_their_value() {
        // To a `send` header, `seq`, `prev`, `from` and `sent_at` are unknown keys.
        let mut fields = send_fields();
        fields.push(("seq", "not a number".into()));
        fields.push(("from", rmpv::Value::Map(vec![(1.into(), rmpv::Value::Nil)])));
        fields.push(("sent_at", (-5).into()));
        let header = decode_body::<StreamHeader>(&encode(&map(&fields))).unwrap();
        assert!(matches!(header, StreamHeader::Send(_)), "{header:?}");
        // To a `deliver` header, the copies' keys are (`to` is a key of both since devices).
        let deliver = StreamHeader::Deliver(sample_deliver());
        let rmpv::Value::Map(mut entries) =
            rmpv::decode::read_value(&mut rmp_serde::to_vec_named(&deliver).unwrap().as_slice())
                .unwrap()
        else {
            panic!("not a map");
        };
        entries.push(("lengths".into(), "not a list".into()));
        entries.push(("devices".into(), rmpv::Value::Map(vec![])));
        entries.push(("own_devices".into(), rmpv::Value::Array(vec!["x".into()])));
        let decoded = decode_body::<StreamHeader>(&encode(&rmpv::Value::Map(entries))).unwrap();
        assert_eq!(decoded, deliver);
    }

    #[test]
    fn copies_decode_and_must_be_consistent() {
        let with = |extra: Vec<(&'static str, rmpv::Value)>| {
            let mut fields = send_fields();
            fields.extend(extra);
            decode_body::<StreamHeader>(&encode(&map(&fields)))
        };
        let list = |items: &[u64]| rmpv::Value::Array(items.iter().map(|&i| i.into()).collect());
        let header = with(vec![
            ("devices", list(&[1, 4])),
            ("own_devices", list(&[2])),
            ("lengths", list(&[40, 40, 40])),
        ])
        .unwrap();
        let StreamHeader::Send(send) = header else {
            panic!("not a send header: {header:?}");
        };
        assert_eq!(
            send.copies(),
            Copies {
                devices: vec![1, 4],
                own_devices: vec![2],
                lengths: vec![40, 40, 40],
            }
        );
        // `own_devices` may be left out when empty.
        let header = with(vec![("devices", list(&[1])), ("lengths", list(&[120]))]).unwrap();
        let StreamHeader::Send(send) = header else {
            panic!("not a send header");
        };
        assert!(send.copies().own_devices.is_empty());
        // Without the copies' keys: one copy to device 1.
        let Ok(StreamHeader::Send(plain)) = with(vec![]) else {
            panic!("a plain send header must decode");
        };
        assert_eq!(plain.copies().devices, vec![1]);
        assert_eq!(plain.copies().lengths, vec![120]);
        for bad in [
            vec![("devices", list(&[1]))],   // no lengths
            vec![("lengths", list(&[120]))], // no devices
            vec![("devices", list(&[1, 2])), ("lengths", list(&[120]))], // one length short
            vec![("devices", list(&[1])), ("lengths", list(&[100]))], // sum is not `length`
            vec![("devices", list(&[1 << 32])), ("lengths", list(&[120]))], // over u32
            vec![("devices", "1".into()), ("lengths", list(&[120]))], // not a list
            vec![
                ("devices", list(&[1])),
                ("lengths", list(&[u64::MAX, 121])),
                ("own_devices", list(&[2])),
            ], // sum overflows
        ] {
            assert!(with(bad.clone()).is_err(), "{bad:?}");
        }
        // A deliver header's `to` is a string when present.
        let deliver = StreamHeader::Deliver(DeliverHeader {
            to: Some("bob".into()),
            ..sample_deliver()
        });
        let bytes = rmp_serde::to_vec_named(&deliver).unwrap();
        assert_eq!(decode_body::<StreamHeader>(&bytes).unwrap(), deliver);
        let rmpv::Value::Map(mut entries) =
            rmpv::decode::read_value(&mut bytes.as_slice()).unwrap()
        else {
            panic!("not a map");
        };
        for (key, value) in entries.iter_mut() {
            if key.as_str() == Some("to") {
                *value = 7.into();
            }
        }
        assert!(decode_body::<StreamHeader>(&encode(&rmpv::Value::Map(entries))).is_err());
    }

    #[test]
    fn group_headers_round_trip_and_are_strict() {
        let send = StreamHeader::Send(SendHeader {
            id: MessageId([5; 16]),
            to: String::new(),
            kind: "mls".into(),
            length: 300,
            copies: None,
            group: Some("friends".into()),
            welcome: Some(200),
        });
        let deliver = StreamHeader::Deliver(DeliverHeader {
            group: Some("friends".into()),
            ..sample_deliver()
        });
        for header in [send, deliver] {
            let bytes = rmp_serde::to_vec_named(&header).unwrap();
            assert_eq!(decode_body::<StreamHeader>(&bytes).unwrap(), header);
        }
        let group_fields = || {
            vec![
                ("type", "send".into()),
                ("id", rmpv::Value::Binary(vec![7; 16])),
                ("group", "friends".into()),
                ("kind", "mls".into()),
                ("length", 120.into()),
            ]
        };
        let header = decode_body::<StreamHeader>(&encode(&map(&group_fields()))).unwrap();
        assert!(
            matches!(header, StreamHeader::Send(SendHeader { welcome: None, ref to, .. }) if to.is_empty())
        );
        let refused: [(&str, rmpv::Value); 6] = [
            ("to", "bob".into()),
            ("devices", rmpv::Value::Array(vec![1.into()])),
            ("lengths", rmpv::Value::Array(vec![120.into()])),
            ("welcome", 121.into()),
            ("welcome", (-1).into()),
            ("welcome", "1".into()),
        ];
        for (key, value) in refused {
            let mut fields = group_fields();
            fields.push((key, value.clone()));
            assert!(
                decode_body::<StreamHeader>(&encode(&map(&fields))).is_err(),
                "{key} {value:?}"
            );
        }
        let mut fields = group_fields();
        fields[2].1 = 7.into();
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        // `welcome` without `group` is refused; `group` in a deliver header must be a string.
        let mut fields = send_fields();
        fields.push(("welcome", 1.into()));
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        let bytes = rmp_serde::to_vec_named(&StreamHeader::Deliver(sample_deliver())).unwrap();
        let rmpv::Value::Map(mut entries) =
            rmpv::decode::read_value(&mut bytes.as_slice()).unwrap()
        else {
            panic!("not a map");
        };
        entries.push(("group".into(), 3.into()));
        assert!(decode_body::<StreamHeader>(&encode(&rmpv::Value::Map(entries))).is_err());
    }

    #[test]
    fn blob_headers_round_trip_and_are_strict() {
        let upload = StreamHeader::Upload(UploadHeader {
            blob: BlobId([3; 16]),
            offset: 65_552,
        });
        let blob = StreamHeader::Blob(BlobHeader {
            blob: BlobId([4; 16]),
            offset: 0,
            length: 1 << 30,
        });
        for header in [upload, blob] {
            let bytes = rmp_serde::to_vec_named(&header).unwrap();
            assert_eq!(decode_body::<StreamHeader>(&bytes).unwrap(), header);
        }
        let upload = |blob: rmpv::Value, offset: rmpv::Value| {
            let fields = [
                ("type", "upload".into()),
                ("blob", blob),
                ("offset", offset),
            ];
            decode_body::<StreamHeader>(&encode(&map(&fields)))
        };
        assert!(upload(rmpv::Value::Binary(vec![1; 16]), 0.into()).is_ok());
        // To a `send` header, `blob` and `offset` are unknown keys.
        let mut fields = send_fields();
        fields.push(("blob", "x".into()));
        fields.push(("offset", (-1).into()));
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_ok());
        let cases: [(rmpv::Value, rmpv::Value); 4] = [
            (rmpv::Value::Binary(vec![1; 15]), 0.into()),
            (rmpv::Value::from("0101010101010101"), 0.into()),
            (rmpv::Value::Binary(vec![1; 16]), (-1).into()),
            (rmpv::Value::Binary(vec![1; 16]), "0".into()),
        ];
        for (blob, offset) in cases {
            assert!(
                upload(blob.clone(), offset.clone()).is_err(),
                "{blob:?} {offset:?}"
            );
        }
        // A blob header needs its length.
        let fields = [
            ("type", "blob".into()),
            ("blob", rmpv::Value::Binary(vec![1; 16])),
            ("offset", 0.into()),
        ];
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
    }

    #[test]
    fn missing_or_mistyped_fields_and_unknown_types_are_refused() {
        for drop in ["type", "id", "to", "kind", "length"] {
            let fields: Vec<_> = send_fields()
                .into_iter()
                .filter(|(k, _)| *k != drop)
                .collect();
            let err = decode_body::<StreamHeader>(&encode(&map(&fields))).unwrap_err();
            assert!(err.to_string().contains(drop), "{drop}: {err}");
        }
        // A send header's fields do not make a deliver header.
        let mut fields = send_fields();
        fields[0].1 = "deliver".into();
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        fields[0].1 = "shout".into();
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        // The id is a 16-byte bin, not a string or a list of integers.
        let mut fields = send_fields();
        fields[1].1 = "0707070707070707".into();
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        fields[1].1 = rmpv::Value::Array(vec![7.into(); 16]);
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        // A length that is not an unsigned integer.
        let mut fields = send_fields();
        fields[4].1 = (-1).into();
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        // A field of its own type with the wrong type, or nil.
        let mut fields = send_fields();
        fields[2].1 = 7.into();
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        fields[2].1 = rmpv::Value::Nil;
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
        // The same key twice.
        let mut fields = send_fields();
        fields.push(("to", "carol".into()));
        assert!(decode_body::<StreamHeader>(&encode(&map(&fields))).is_err());
    }
}
