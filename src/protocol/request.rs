//! Strict decoding of client frames: the body must be one MessagePack map with string keys, a
//! uint `id`, a string `type`, and the documented type for every known field. Anything else is
//! classified into the error the peer gets (`malformed_frame`, `unknown_request`, `bad_request`).
//!
//! serde alone is too lenient here (it would take an array for a map, an integer index for the
//! `type` tag, or `bin` for a string), so the shape is checked on a generic value first. That
//! value borrows its strings and byte strings from the frame (no allocation per field).

use rmpv::ValueRef as Value;

use super::frame::decode_checked_body;
use super::nesting::{MAX_NESTING, check_markers};
use super::{ClientFrame, Request, RequestKind};

/// The depth budget rmpv needs for a value that [`check_markers`] let through: rmpv spends one
/// unit on every value and one more on every map or array it opens, and a string or extension
/// at the bottom costs three. Only a safety net: the nesting is already checked.
const RMPV_DEPTH: usize = 2 * MAX_NESTING + 3;

/// Why a frame body is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a map with string keys, a uint `id` and a string `type` (no id can be echoed).
    #[error("{0}")]
    Malformed(String),
    /// A well-formed request of a type this server does not know.
    #[error("unknown request type {kind:?}")]
    Unknown {
        /// The request's id.
        id: u64,
        /// The type it named.
        kind: String,
    },
    /// A known request type with a missing or mistyped field.
    #[error("invalid {}: {reason}", kind.as_str())]
    Bad {
        /// The request's id.
        id: u64,
        /// Its type.
        kind: RequestKind,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Clone, Copy)]
enum Expected {
    Str,
    Uint,
    Bin,
    Array,
    Map,
    Bool,
}

impl Expected {
    fn matches(self, value: &Value) -> bool {
        match self {
            Self::Str => as_str(value).is_some(),
            Self::Uint => value.as_u64().is_some(),
            Self::Bin => matches!(value, Value::Binary(_)),
            Self::Array => matches!(value, Value::Array(_)),
            Self::Map => matches!(value, Value::Map(_)),
            Self::Bool => matches!(value, Value::Boolean(_)),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Str => "a UTF-8 string",
            Self::Uint => "an unsigned integer",
            Self::Bin => "a byte string (bin)",
            Self::Array => "an array",
            Self::Map => "a map",
            Self::Bool => "a boolean",
        }
    }
}

/// The text of a MessagePack `str` that is valid UTF-8.
fn as_str<'a>(value: &'a Value<'_>) -> Option<&'a str> {
    match value {
        Value::String(s) => s.as_str(),
        _ => None,
    }
}

/// A prekey as the spec writes it: a map with string keys. serde alone would also take the
/// positional array `[id, key]` and `bin` keys for a struct.
fn is_prekey_map(value: &Value) -> bool {
    matches!(value, Value::Map(entries) if entries.iter().all(|(k, _)| as_str(k).is_some()))
}

/// The type a known field must have in a request of `kind`; `None` for unknown fields, which
/// are ignored.
fn field_type(kind: RequestKind, field: &str) -> Option<Expected> {
    use RequestKind as K;
    match (kind, field) {
        (K::Hello, "version") => Some(Expected::Uint),
        (K::Hello, "client") => Some(Expected::Str),
        (K::CheckUsername | K::Signup | K::Login, "username") => Some(Expected::Str),
        (
            K::Signup | K::Login | K::DeleteAccount | K::RemoveDevice | K::ReplaceIdentity,
            "password",
        ) => Some(Expected::Str),
        (K::Login | K::RemoveDevice, "device") => Some(Expected::Uint),
        (K::RemoveDevice, "revocation") => Some(Expected::Bin),
        (K::FetchBundle, "devices") => Some(Expected::Array),
        (K::LinkOpen | K::LinkJoin, "pake") => Some(Expected::Bin),
        (K::LinkJoin, "username" | "name") => Some(Expected::Str),
        (K::LinkJoin | K::LinkAccept | K::LinkRefuse, "slot") => Some(Expected::Uint),
        (K::LinkConfirm | K::LinkAccept, "confirm") => Some(Expected::Bin),
        (K::LinkAccept, "payload") => Some(Expected::Bin),
        (K::Resume, "token") => Some(Expected::Bin),
        (K::Resume, "deliver") => Some(Expected::Bool),
        (K::FetchBundle | K::FetchIdentity | K::Online, "username") => Some(Expected::Str),
        (K::Unsend, "message_id") => Some(Expected::Bin),
        (K::Ack, "seqs") => Some(Expected::Array),
        (K::Ack, "quiet") => Some(Expected::Bool),
        (K::PublishKeys | K::ReplaceIdentity, "identity_key") => Some(Expected::Bin),
        (K::PublishKeys | K::ReplaceIdentity, "signed_prekey" | "last_resort") => {
            Some(Expected::Map)
        }
        (K::PublishKeys | K::ReplaceIdentity, "one_time_prekeys") => Some(Expected::Array),
        (K::UploadBlob | K::DownloadBlob | K::AckBlob, "blob") => Some(Expected::Bin),
        (K::UploadBlob, "length") | (K::DownloadBlob, "offset") => Some(Expected::Uint),
        (K::UploadBlob, "readers") => Some(Expected::Array),
        (K::PublishKeyPackages, "key_packages") => Some(Expected::Array),
        (K::PublishKeyPackages, "last_resort") => Some(Expected::Bin),
        (K::FetchKeyPackages, "username") => Some(Expected::Str),
        (K::FetchKeyPackages, "devices") => Some(Expected::Array),
        (K::CreateGroup | K::LeaveGroup | K::GroupInfo, "group") => Some(Expected::Str),
        (K::CreateGroup, "group_id" | "group_info") => Some(Expected::Bin),
        _ => None,
    }
}

/// Decodes a control-stream frame body into a request, strictly.
pub fn decode_request(body: &[u8]) -> Result<ClientFrame, RequestError> {
    let malformed = |why: &str| RequestError::Malformed(why.to_owned());
    if let Err(e) = check_markers(body, MAX_NESTING) {
        return Err(RequestError::Malformed(e.to_string()));
    }
    let mut rest = body;
    let value = rmpv::decode::read_value_ref_with_max_depth(&mut rest, RMPV_DEPTH)
        .map_err(|_| malformed("the body is not valid MessagePack"))?;
    if !rest.is_empty() {
        return Err(malformed("bytes follow the MessagePack value"));
    }
    let Value::Map(entries) = value else {
        return Err(malformed("the body must be a MessagePack map"));
    };
    let mut fields = Vec::with_capacity(entries.len());
    for (key, value) in &entries {
        let Some(key) = as_str(key) else {
            return Err(malformed("map keys must be UTF-8 strings"));
        };
        if fields.iter().any(|(k, _)| *k == key) {
            return Err(malformed("a map key appears twice"));
        }
        fields.push((key, value));
    }
    let field = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let id = field("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("`id` must be present and an unsigned integer"))?;
    let kind_name = field("type")
        .and_then(as_str)
        .ok_or_else(|| malformed("`type` must be present and a UTF-8 string"))?;
    let Some(kind) = RequestKind::from_wire(kind_name) else {
        return Err(RequestError::Unknown {
            id,
            kind: kind_name.to_owned(),
        });
    };
    for (name, value) in &fields {
        if let Some(expected) = field_type(kind, name)
            && !expected.matches(value)
        {
            let reason = format!("`{name}` must be {}", expected.name());
            return Err(RequestError::Bad { id, kind, reason });
        }
    }
    if matches!(
        kind,
        RequestKind::PublishKeys | RequestKind::ReplaceIdentity
    ) {
        for (name, value) in &fields {
            let shaped = match (*name, value) {
                ("signed_prekey" | "last_resort", prekey) => is_prekey_map(prekey),
                ("one_time_prekeys", Value::Array(items)) => items.iter().all(is_prekey_map),
                _ => true,
            };
            if !shaped {
                let reason = format!("`{name}` must hold prekeys as maps with string keys");
                return Err(RequestError::Bad { id, kind, reason });
            }
        }
    }
    if kind == RequestKind::PublishKeyPackages
        && let Some(Value::Array(items)) = field("key_packages")
        && !items.iter().all(|item| matches!(item, Value::Binary(_)))
    {
        let reason = "`key_packages` must hold byte strings (bin) only".to_owned();
        return Err(RequestError::Bad { id, kind, reason });
    }
    if kind == RequestKind::Ack {
        // The one request of every delivered batch: built from the value already decoded
        // (serde's flattened, tagged decoding of the frame costs several times more).
        let bad = |reason: &str| RequestError::Bad {
            id,
            kind,
            reason: reason.to_owned(),
        };
        let Some(Value::Array(items)) = field("seqs") else {
            return Err(bad("missing field `seqs`"));
        };
        let seqs = items
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| bad("`seqs` must hold unsigned integers only"))?;
        let quiet = matches!(field("quiet"), Some(Value::Boolean(true)));
        return Ok(ClientFrame {
            id,
            request: Request::Ack { seqs, quiet },
        });
    }
    decode_checked_body::<ClientFrame>(body).map_err(|e| RequestError::Bad {
        id,
        kind,
        reason: match e {
            super::FrameError::Decode(e) => e.to_string(),
            other => other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode_body;
    use serde::Serialize;

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        rmp_serde::to_vec_named(value).unwrap()
    }

    #[derive(Serialize)]
    struct Head<T: Serialize, U: Serialize> {
        id: T,
        r#type: U,
    }

    #[test]
    fn valid_requests_decode() {
        let frame = decode_request(&encode(&Head {
            id: 7u64,
            r#type: "ping",
        }))
        .unwrap();
        assert_eq!((frame.id, frame.request), (7, Request::Ping));
    }

    #[test]
    fn shapes_serde_would_tolerate_are_malformed() {
        let cases: Vec<Vec<u8>> = vec![
            encode(&Head {
                id: 1u64,
                r#type: 7u8,
            }), // integer tag
            encode(&Head {
                id: 1u64,
                r#type: serde_bytes::Bytes::new(b"ping"),
            }), // bin tag
            rmp_serde::to_vec(&(101u64, "ping")).unwrap(), // array, not map
            encode(&Head {
                id: -1i64,
                r#type: "ping",
            }), // negative id
            encode(&Head {
                id: "1",
                r#type: "ping",
            }), // string id
            vec![0x81, 0x01, 0x02],                        // integer key
            vec![0x82, 0xa2, b'i', b'd', 0x01, 0xa2, b'i', b'd', 0x02], // duplicate key
            [vec![0x91; 40], vec![0x01]].concat(),         // deep nesting
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],            // huge array header
            vec![],
        ];
        for body in cases {
            assert!(
                matches!(decode_request(&body), Err(RequestError::Malformed(_))),
                "{body:02x?} → {:?}",
                decode_request(&body)
            );
        }
    }

    /// A `ping` whose unknown field `x` nests maps or arrays so that the frame is `levels`
    /// deep; the innermost holds a string, which costs a generic decoder the most depth.
    fn ping_nested(levels: usize, maps: bool) -> Vec<u8> {
        let mut x = rmpv::Value::from("leaf");
        for _ in 1..levels {
            x = if maps {
                rmpv::Value::Map(vec![("k".into(), x)])
            } else {
                rmpv::Value::Array(vec![x])
            };
        }
        let frame = rmpv::Value::Map(vec![
            ("id".into(), 3.into()),
            ("type".into(), "ping".into()),
            ("x".into(), x),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &frame).unwrap();
        out
    }

    #[test]
    fn nesting_counts_one_level_per_map_or_array() {
        for maps in [true, false] {
            let deepest = decode_request(&ping_nested(MAX_NESTING, maps)).unwrap();
            assert_eq!((deepest.id, deepest.request), (3, Request::Ping));
            assert!(matches!(
                decode_request(&ping_nested(MAX_NESTING + 1, maps)),
                Err(RequestError::Malformed(_))
            ));
        }
    }

    #[test]
    fn unknown_types_keep_their_id() {
        let err = decode_request(&encode(&Head {
            id: 5u64,
            r#type: "teleport",
        }))
        .unwrap_err();
        assert_eq!(
            err,
            RequestError::Unknown {
                id: 5,
                kind: "teleport".into()
            }
        );
    }

    #[test]
    fn mistyped_fields_are_bad_requests() {
        #[derive(Serialize)]
        struct Resume<T: Serialize> {
            id: u64,
            r#type: &'static str,
            token: T,
        }
        let str_token = Resume {
            id: 2,
            r#type: "resume",
            token: "0".repeat(32),
        };
        let array_token = Resume {
            id: 3,
            r#type: "resume",
            token: vec![0u8; 32],
        };
        let short_token = Resume {
            id: 4,
            r#type: "resume",
            token: serde_bytes::ByteBuf::from(vec![0u8; 31]),
        };
        #[derive(Serialize)]
        struct Check {
            id: u64,
            r#type: &'static str,
            username: serde_bytes::ByteBuf,
        }
        let bin_name = Check {
            id: 5,
            r#type: "check_username",
            username: serde_bytes::ByteBuf::from(b"bob".to_vec()),
        };
        #[derive(Serialize)]
        struct Hello {
            id: u64,
            r#type: &'static str,
            version: i64,
        }
        let negative_version = Hello {
            id: 6,
            r#type: "hello",
            version: -1,
        };
        #[derive(Serialize)]
        struct Login {
            id: u64,
            r#type: &'static str,
            username: &'static str,
        }
        let missing_password = Login {
            id: 7,
            r#type: "login",
            username: "bob",
        };

        let bodies = [
            (2, encode(&str_token)),
            (3, encode(&array_token)),
            (4, encode(&short_token)),
            (5, encode(&bin_name)),
            (6, encode(&negative_version)),
            (7, encode(&missing_password)),
        ];
        for (id, body) in bodies {
            match decode_request(&body) {
                Err(RequestError::Bad { id: got, .. }) => assert_eq!(got, id),
                other => panic!("{id}: {other:?}"),
            }
        }
    }

    #[test]
    fn acks_decode_as_serde_would_and_refuse_what_it_refuses() {
        #[derive(Serialize)]
        struct Ack<S: Serialize, Q: Serialize> {
            id: u64,
            r#type: &'static str,
            seqs: S,
            #[serde(skip_serializing_if = "Option::is_none")]
            quiet: Option<Q>,
        }
        let ack = |seqs: Vec<u64>, quiet: Option<bool>| {
            encode(&Ack {
                id: 9,
                r#type: "ack",
                seqs,
                quiet,
            })
        };
        for body in [
            ack(vec![41, 42, u64::MAX], None),
            ack(vec![], Some(true)),
            ack(vec![1], Some(false)),
        ] {
            let fast = decode_request(&body).unwrap();
            assert_eq!(fast, decode_body::<ClientFrame>(&body).unwrap());
        }
        assert_eq!(
            decode_request(&ack(vec![7], Some(true))).unwrap().request,
            Request::Ack {
                seqs: vec![7],
                quiet: true
            }
        );

        #[derive(Serialize)]
        struct NoSeqs {
            id: u64,
            r#type: &'static str,
        }
        let refused = [
            encode(&NoSeqs {
                id: 9,
                r#type: "ack",
            }),
            encode(&Ack {
                id: 9,
                r#type: "ack",
                seqs: vec![1i64, -2],
                quiet: None::<bool>,
            }),
            encode(&Ack {
                id: 9,
                r#type: "ack",
                seqs: vec!["1"],
                quiet: None::<bool>,
            }),
            encode(&Ack {
                id: 9,
                r#type: "ack",
                seqs: 1u64,
                quiet: None::<bool>,
            }),
            encode(&Ack {
                id: 9,
                r#type: "ack",
                seqs: vec![1u64],
                quiet: Some(1u8),
            }),
        ];
        for body in refused {
            assert!(decode_body::<ClientFrame>(&body).is_err());
            match decode_request(&body) {
                Err(RequestError::Bad {
                    id: 9,
                    kind: RequestKind::Ack,
                    ..
                }) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn large_versions_are_not_a_decoding_error() {
        #[derive(Serialize)]
        struct Hello {
            id: u64,
            r#type: &'static str,
            version: u64,
        }
        let frame = decode_request(&encode(&Hello {
            id: 1,
            r#type: "hello",
            version: 1 << 40,
        }))
        .unwrap();
        assert!(matches!(frame.request, Request::Hello { version, .. } if version == 1 << 40));
    }
}
