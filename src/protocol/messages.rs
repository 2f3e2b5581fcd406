//! Control-stream requests: what a client asks (`ClientFrame`), a MessagePack map whose `type`
//! field names the variant. What the server answers or pushes is in `replies`.

use serde::{Deserialize, Serialize};

use super::groups::GroupIdBytes;
use super::keys::{Bin, IdentityKeyBytes, OneTimePrekey, SignatureBytes, SignedPrekey};
use super::{BlobId, DeviceId, MessageId, Password, SessionToken};

/// A SPAKE2 message of the device link (docs/PROTOCOL.md E13.2): 33 bytes.
pub type LinkPake = Bin<33>;
/// A key confirmation of the device link (E13.3): 32 bytes.
pub type LinkConfirm = Bin<32>;

/// A request from the client: `{"id": u64, "type": "...", ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Chosen by the client; echoed in the reply so requests may be pipelined.
    pub id: u64,
    /// The request itself; its fields sit beside `id` in the same map.
    #[serde(flatten)]
    pub request: Request,
}

/// Every request a client may send on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // a frame is decoded once and handled in place
pub enum Request {
    /// Must be the first request on a connection: announces the protocol version.
    Hello {
        /// The protocol version the client speaks ([`super::PROTOCOL_VERSION`]).
        version: u64,
        /// Free-form client name and version, for the server's logs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// Signup step one: is this username valid and free?
    CheckUsername {
        /// The wanted name (folded to lower case by the server).
        username: String,
    },
    /// Signup step two: create the account; on success the connection is logged in.
    Signup {
        /// The wanted name.
        username: String,
        /// The password, 8 to 1024 bytes of UTF-8.
        password: Password,
    },
    /// Log in with a password; returns a new session token.
    Login {
        /// The account's name (folded to lower case by the server).
        username: String,
        /// The account's password.
        password: Password,
        /// Which device of the account logs in (default 1, the device that signed up).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceId>,
    },
    /// Restore a session on this connection with a token from an earlier login.
    Resume {
        /// The token from `session`.
        token: SessionToken,
        /// Whether this connection receives the user's messages (taking delivery over from
        /// any other connection). `false` for short-lived connections that only send or ask.
        #[serde(default = "default_true", skip_serializing_if = "is_true")]
        deliver: bool,
    },
    /// Revoke this connection's session token; the connection stays open, unauthenticated.
    Logout,
    /// Who is logged in on this connection.
    Whoami,
    /// Liveness check; allowed at any time after `hello`.
    Ping,
    /// Upload or replace public keys: the identity key (required the first time), a signed
    /// prekey, a last-resort prekey, and one-time prekeys to add.
    PublishKeys {
        /// Ed25519 identity key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity_key: Option<IdentityKeyBytes>,
        /// A new signed prekey (replaces the current one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed_prekey: Option<SignedPrekey>,
        /// A new last-resort prekey (replaces the current one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_resort: Option<SignedPrekey>,
        /// One-time prekeys to add.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        one_time_prekeys: Vec<OneTimePrekey>,
    },
    /// Get a user's prekey bundle to start a session (consumes one one-time prekey).
    FetchBundle {
        /// Whose bundle.
        username: String,
        /// Which of their devices (all current ones with keys when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devices: Option<Vec<DeviceId>>,
    },
    /// Get a user's identity key only (for safety numbers); consumes nothing.
    FetchIdentity {
        /// Whose key.
        username: String,
    },
    /// Acknowledge delivered messages by their server sequence numbers.
    Ack {
        /// Sequence numbers from `deliver` headers.
        seqs: Vec<u64>,
        /// No `acked` reply on success (a failure is still answered with an `error`): saves
        /// the reply's packet, and the peer's acknowledgement of it, per batch of acks.
        #[serde(default, skip_serializing_if = "is_false")]
        quiet: bool,
    },
    /// Delete a message you sent that has not been delivered yet.
    Unsend {
        /// The id you gave it.
        message_id: MessageId,
    },
    /// Is this contact online? Allowed once the contact has sent you a message.
    Online {
        /// The contact.
        username: String,
    },
    /// Delete this connection's account for good, after checking its password again.
    DeleteAccount {
        /// The account's password.
        password: Password,
    },
    /// The account's devices.
    ListDevices,
    /// Remove another device of the account, after checking the password again.
    RemoveDevice {
        /// The device to remove (not the connection's own).
        device: DeviceId,
        /// The account's password.
        password: Password,
        /// The removal signed by the account's identity key (`groups::revocation_tbs`): the
        /// server checks it and passes it to the device's groups, whose members may then
        /// commit the removal of its leaves (5.7).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revocation: Option<SignatureBytes>,
    },
    /// Give the account a new identity key (every contact sees a key change); every other
    /// device is removed, since they hold the old identity.
    ReplaceIdentity {
        /// The account's password.
        password: Password,
        /// The new Ed25519 identity key.
        identity_key: IdentityKeyBytes,
        /// This device's signed prekey under the new identity.
        signed_prekey: SignedPrekey,
        /// This device's last-resort prekey under the new identity.
        last_resort: SignedPrekey,
        /// One-time prekeys to start with (the old ones are deleted).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        one_time_prekeys: Vec<OneTimePrekey>,
    },
    /// Existing device: open a link for a new device, with the first SPAKE2 message.
    LinkOpen {
        /// `pake_E`.
        pake: LinkPake,
    },
    /// New device (unauthenticated): join the link whose slot the code names.
    LinkJoin {
        /// The account to join.
        username: String,
        /// The code's slot (0–9999).
        slot: u16,
        /// `pake_N`.
        pake: LinkPake,
        /// A name for the new device, shown in the device list (1–64 bytes).
        name: String,
    },
    /// New device: prove knowledge of the code; answered once the existing device decides.
    LinkConfirm {
        /// `c_N`.
        confirm: LinkConfirm,
    },
    /// Existing device: the new device's confirmation verified; hand over the payload.
    LinkAccept {
        /// The link's slot.
        slot: u16,
        /// `c_E`.
        confirm: LinkConfirm,
        /// The sealed payload (E13.4), at most 60,016 bytes.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Existing device: the new device's confirmation did not verify (a wrong code).
    LinkRefuse {
        /// The link's slot.
        slot: u16,
    },
    /// Start uploading a blob (a sealed file), or ask how much of it the server holds.
    UploadBlob {
        /// The id, chosen by the uploader.
        blob: BlobId,
        /// The blob's whole length in bytes (the sealed file, docs/PROTOCOL.md E15).
        length: u64,
        /// Who may fetch it: 1 to 64 distinct user names, not the uploader (kept from the
        /// first request of an id; ignored when resuming).
        readers: Vec<String>,
    },
    /// Fetch a complete blob from `offset`: answered with `blob_download`, then the bytes
    /// arrive on a stream the server opens.
    DownloadBlob {
        /// The blob.
        blob: BlobId,
        /// Where to start (0, or the bytes already held, to resume).
        offset: u64,
    },
    /// This device is done with a blob (fetched and checked, or given up on).
    AckBlob {
        /// The blob.
        blob: BlobId,
    },
    /// Upload MLS key packages of the connection's device (docs/PROTOCOL.md 5.7).
    PublishKeyPackages {
        /// One-time key packages to add (at most 100 per request).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        key_packages: Vec<serde_bytes::ByteBuf>,
        /// A new last-resort key package (replaces the stored one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_resort: Option<serde_bytes::ByteBuf>,
    },
    /// Get one key package per device of a user (consumes one-time key packages).
    FetchKeyPackages {
        /// Whose key packages.
        username: String,
        /// Which of their devices (all current devices with key packages when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devices: Option<Vec<DeviceId>>,
    },
    /// Register a new MLS group under a name, from the creator's GroupInfo.
    CreateGroup {
        /// The group's name (global on the server; the rules of usernames).
        group: String,
        /// The MLS GroupId.
        group_id: GroupIdBytes,
        /// The creator's GroupInfo (an `MLSMessage`) at epoch 0, with the ratchet tree.
        #[serde(with = "serde_bytes")]
        group_info: Vec<u8>,
    },
    /// Leave a group: delivery to all the user's devices stops at once.
    LeaveGroup {
        /// The group's name.
        group: String,
    },
    /// The delivery service's view of a group the connection's device is a member of.
    GroupInfo {
        /// The group's name.
        group: String,
    },
    /// The groups the connection's device is a member of.
    ListGroups,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn default_true() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// The `type` names of [`Request`], to tell an unknown request from a malformed known one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `hello`
    Hello,
    /// `check_username`
    CheckUsername,
    /// `signup`
    Signup,
    /// `login`
    Login,
    /// `resume`
    Resume,
    /// `logout`
    Logout,
    /// `whoami`
    Whoami,
    /// `ping`
    Ping,
    /// `publish_keys`
    PublishKeys,
    /// `fetch_bundle`
    FetchBundle,
    /// `fetch_identity`
    FetchIdentity,
    /// `ack`
    Ack,
    /// `unsend`
    Unsend,
    /// `online`
    Online,
    /// `delete_account`
    DeleteAccount,
    /// `list_devices`
    ListDevices,
    /// `remove_device`
    RemoveDevice,
    /// `replace_identity`
    ReplaceIdentity,
    /// `link_open`
    LinkOpen,
    /// `link_join`
    LinkJoin,
    /// `link_confirm`
    LinkConfirm,
    /// `link_accept`
    LinkAccept,
    /// `link_refuse`
    LinkRefuse,
    /// `upload_blob`
    UploadBlob,
    /// `download_blob`
    DownloadBlob,
    /// `ack_blob`
    AckBlob,
    /// `publish_key_packages`
    PublishKeyPackages,
    /// `fetch_key_packages`
    FetchKeyPackages,
    /// `create_group`
    CreateGroup,
    /// `leave_group`
    LeaveGroup,
    /// `group_info`
    GroupInfo,
    /// `list_groups`
    ListGroups,
}

impl RequestKind {
    /// The kind with this wire name, if any.
    pub fn from_wire(name: &str) -> Option<Self> {
        Some(match name {
            "hello" => Self::Hello,
            "check_username" => Self::CheckUsername,
            "signup" => Self::Signup,
            "login" => Self::Login,
            "resume" => Self::Resume,
            "logout" => Self::Logout,
            "whoami" => Self::Whoami,
            "ping" => Self::Ping,
            "publish_keys" => Self::PublishKeys,
            "fetch_bundle" => Self::FetchBundle,
            "fetch_identity" => Self::FetchIdentity,
            "ack" => Self::Ack,
            "unsend" => Self::Unsend,
            "online" => Self::Online,
            "delete_account" => Self::DeleteAccount,
            "list_devices" => Self::ListDevices,
            "remove_device" => Self::RemoveDevice,
            "replace_identity" => Self::ReplaceIdentity,
            "link_open" => Self::LinkOpen,
            "link_join" => Self::LinkJoin,
            "link_confirm" => Self::LinkConfirm,
            "link_accept" => Self::LinkAccept,
            "link_refuse" => Self::LinkRefuse,
            "upload_blob" => Self::UploadBlob,
            "download_blob" => Self::DownloadBlob,
            "ack_blob" => Self::AckBlob,
            "publish_key_packages" => Self::PublishKeyPackages,
            "fetch_key_packages" => Self::FetchKeyPackages,
            "create_group" => Self::CreateGroup,
            "leave_group" => Self::LeaveGroup,
            "group_info" => Self::GroupInfo,
            "list_groups" => Self::ListGroups,
            _ => return None,
        })
    }

    /// The wire name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::CheckUsername => "check_username",
            Self::Signup => "signup",
            Self::Login => "login",
            Self::Resume => "resume",
            Self::Logout => "logout",
            Self::Whoami => "whoami",
            Self::Ping => "ping",
            Self::PublishKeys => "publish_keys",
            Self::FetchBundle => "fetch_bundle",
            Self::FetchIdentity => "fetch_identity",
            Self::Ack => "ack",
            Self::Unsend => "unsend",
            Self::Online => "online",
            Self::DeleteAccount => "delete_account",
            Self::ListDevices => "list_devices",
            Self::RemoveDevice => "remove_device",
            Self::ReplaceIdentity => "replace_identity",
            Self::LinkOpen => "link_open",
            Self::LinkJoin => "link_join",
            Self::LinkConfirm => "link_confirm",
            Self::LinkAccept => "link_accept",
            Self::LinkRefuse => "link_refuse",
            Self::UploadBlob => "upload_blob",
            Self::DownloadBlob => "download_blob",
            Self::AckBlob => "ack_blob",
            Self::PublishKeyPackages => "publish_key_packages",
            Self::FetchKeyPackages => "fetch_key_packages",
            Self::CreateGroup => "create_group",
            Self::LeaveGroup => "leave_group",
            Self::GroupInfo => "group_info",
            Self::ListGroups => "list_groups",
        }
    }
}

impl Request {
    /// The kind of this request.
    pub fn kind(&self) -> RequestKind {
        match self {
            Self::Hello { .. } => RequestKind::Hello,
            Self::CheckUsername { .. } => RequestKind::CheckUsername,
            Self::Signup { .. } => RequestKind::Signup,
            Self::Login { .. } => RequestKind::Login,
            Self::Resume { .. } => RequestKind::Resume,
            Self::Logout => RequestKind::Logout,
            Self::Whoami => RequestKind::Whoami,
            Self::Ping => RequestKind::Ping,
            Self::PublishKeys { .. } => RequestKind::PublishKeys,
            Self::FetchBundle { .. } => RequestKind::FetchBundle,
            Self::FetchIdentity { .. } => RequestKind::FetchIdentity,
            Self::Ack { .. } => RequestKind::Ack,
            Self::Unsend { .. } => RequestKind::Unsend,
            Self::Online { .. } => RequestKind::Online,
            Self::DeleteAccount { .. } => RequestKind::DeleteAccount,
            Self::ListDevices => RequestKind::ListDevices,
            Self::RemoveDevice { .. } => RequestKind::RemoveDevice,
            Self::ReplaceIdentity { .. } => RequestKind::ReplaceIdentity,
            Self::LinkOpen { .. } => RequestKind::LinkOpen,
            Self::LinkJoin { .. } => RequestKind::LinkJoin,
            Self::LinkConfirm { .. } => RequestKind::LinkConfirm,
            Self::LinkAccept { .. } => RequestKind::LinkAccept,
            Self::LinkRefuse { .. } => RequestKind::LinkRefuse,
            Self::UploadBlob { .. } => RequestKind::UploadBlob,
            Self::DownloadBlob { .. } => RequestKind::DownloadBlob,
            Self::AckBlob { .. } => RequestKind::AckBlob,
            Self::PublishKeyPackages { .. } => RequestKind::PublishKeyPackages,
            Self::FetchKeyPackages { .. } => RequestKind::FetchKeyPackages,
            Self::CreateGroup { .. } => RequestKind::CreateGroup,
            Self::LeaveGroup { .. } => RequestKind::LeaveGroup,
            Self::GroupInfo { .. } => RequestKind::GroupInfo,
            Self::ListGroups => RequestKind::ListGroups,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorCode, Reply, ServerFrame, SessionToken, decode_body, encode_frame};

    fn body_of<T: Serialize>(msg: &T) -> Vec<u8> {
        encode_frame(msg, 1 << 16).unwrap()[4..].to_vec()
    }

    #[test]
    fn hello_encodes_as_documented() {
        let frame = ClientFrame {
            id: 1,
            request: Request::Hello {
                version: 1,
                client: None,
            },
        };
        // {"id":1,"type":"hello","version":1}: the bytes docs/PROTOCOL.md shows.
        let expected = [
            0x83, 0xa2, b'i', b'd', 0x01, 0xa4, b't', b'y', b'p', b'e', 0xa5, b'h', b'e', b'l',
            b'l', b'o', 0xa7, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x01,
        ];
        assert_eq!(body_of(&frame), expected);
        assert_eq!(decode_body::<ClientFrame>(&expected).unwrap(), frame);
    }

    #[test]
    fn unit_requests_are_maps_with_only_id_and_type() {
        let frame = ClientFrame {
            id: 2,
            request: Request::Whoami,
        };
        let expected = [
            0x82, 0xa2, b'i', b'd', 0x02, 0xa4, b't', b'y', b'p', b'e', 0xa6, b'w', b'h', b'o',
            b'a', b'm', b'i',
        ];
        assert_eq!(body_of(&frame), expected);
        assert_eq!(decode_body::<ClientFrame>(&expected).unwrap(), frame);
    }

    #[test]
    fn fields_may_come_in_any_order_and_unknown_ones_are_ignored() {
        let body = rmp_serde::to_vec_named(&serde_json_like::Login {
            password: "hunter22",
            extra: 5,
            username: "Bob",
            r#type: "login",
            id: 9,
        })
        .unwrap();
        let frame: ClientFrame = decode_body(&body).unwrap();
        assert_eq!(frame.id, 9);
        assert_eq!(
            frame.request,
            Request::Login {
                username: "Bob".into(),
                password: Password::new("hunter22"),
                device: None,
            }
        );
    }

    mod serde_json_like {
        #[derive(serde::Serialize)]
        pub struct Login {
            pub password: &'static str,
            pub extra: u8,
            pub username: &'static str,
            pub r#type: &'static str,
            pub id: u64,
        }
    }

    #[test]
    fn token_is_bin_of_exactly_32_bytes() {
        let token = SessionToken::from_bytes([0xab; 32]);
        let frame = ClientFrame {
            id: 3,
            request: Request::Resume {
                token,
                deliver: true,
            },
        };
        let body = body_of(&frame);
        let bin_at = body
            .windows(2)
            .position(|w| w == [0xc4, 32])
            .expect("bin8 header");
        assert_eq!(&body[bin_at + 2..bin_at + 34], &[0xab; 32]);
        assert_eq!(decode_body::<ClientFrame>(&body).unwrap(), frame);

        let short = ClientFrame {
            id: 3,
            request: Request::Ping,
        };
        let mut body = body_of(&short);
        // Rewrite into a resume with a 3-byte token: must not decode.
        body.clear();
        body.extend_from_slice(&[0x83, 0xa2, b'i', b'd', 0x03, 0xa4, b't', b'y', b'p', b'e']);
        body.extend_from_slice(&[0xa6, b'r', b'e', b's', b'u', b'm', b'e']);
        body.extend_from_slice(&[0xa5, b't', b'o', b'k', b'e', b'n', 0xc4, 3, 1, 2, 3]);
        assert!(decode_body::<ClientFrame>(&body).is_err());
    }

    #[test]
    fn replies_round_trip_with_and_without_id() {
        let frames = [
            ServerFrame {
                id: Some(4),
                reply: Reply::Pong,
            },
            ServerFrame {
                id: None,
                reply: Reply::Error {
                    code: ErrorCode::FrameTooLarge,
                    message: "too big".into(),
                },
            },
            ServerFrame {
                id: Some(u64::MAX),
                reply: Reply::Session {
                    username: "alice".into(),
                    token: SessionToken::from_bytes([7; 32]),
                    expires_at: 1_900_000_000,
                    device: 1,
                },
            },
        ];
        for frame in frames {
            assert_eq!(decode_body::<ServerFrame>(&body_of(&frame)).unwrap(), frame);
        }
    }

    #[test]
    fn group_replies_round_trip() {
        use crate::protocol::{DeviceKeyPackage, GroupMember, GroupSummary, keys::Bin};
        let summary = GroupSummary {
            group: "friends".into(),
            group_id: Bin([9; 16]),
            epoch: 3,
            creator: "alice".into(),
            admins: vec!["alice".into()],
            members: vec![GroupMember {
                username: "alice".into(),
                device: 1,
                leaf: 0,
            }],
            pending_leaves: vec![],
        };
        let replies = [
            Reply::Group(summary.clone()),
            Reply::Groups {
                groups: vec![summary],
            },
            Reply::KeyPackages {
                username: "bob".into(),
                identity_key: Bin([1; 32]),
                devices: vec![DeviceKeyPackage {
                    device: 2,
                    key_package: vec![1, 2, 3],
                    last_resort: true,
                }],
            },
            Reply::SendFailed {
                message_id: None,
                code: ErrorCode::StaleEpoch,
                message: "stale".into(),
                devices: None,
                own_devices: None,
                epoch: Some(4),
            },
        ];
        for reply in replies {
            let frame = ServerFrame { id: Some(1), reply };
            assert_eq!(decode_body::<ServerFrame>(&body_of(&frame)).unwrap(), frame);
        }
        let requests = [
            Request::PublishKeyPackages {
                key_packages: vec![serde_bytes::ByteBuf::from(vec![1u8; 300])],
                last_resort: Some(serde_bytes::ByteBuf::from(vec![2u8; 300])),
            },
            Request::CreateGroup {
                group: "friends".into(),
                group_id: Bin([9; 16]),
                group_info: vec![3; 40],
            },
            Request::ListGroups,
        ];
        for request in requests {
            let frame = ClientFrame { id: 2, request };
            let body = body_of(&frame);
            assert_eq!(crate::protocol::decode_request(&body).unwrap(), frame);
        }
    }

    #[test]
    fn unknown_error_codes_decode_as_unknown() {
        #[derive(Serialize)]
        struct Raw {
            id: u64,
            r#type: &'static str,
            code: &'static str,
            message: &'static str,
        }
        let body = rmp_serde::to_vec_named(&Raw {
            id: 1,
            r#type: "error",
            code: "from_the_future",
            message: "",
        })
        .unwrap();
        let frame: ServerFrame = decode_body(&body).unwrap();
        assert!(matches!(
            frame.reply,
            Reply::Error {
                code: ErrorCode::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn secrets_are_masked_in_debug_output() {
        let req = Request::Login {
            username: "a".into(),
            password: Password::new("s3cret-pw"),
            device: None,
        };
        assert!(!format!("{req:?}").contains("s3cret"));
        let token = SessionToken::from_bytes([0x41; 32]);
        assert!(!format!("{token:?}").contains("41"));
    }
}
