//! The hex examples in `docs/PROTOCOL.md` are real frames: this test encodes each example and
//! checks that the document shows exactly those bytes. Run with `SFC_PRINT_EXAMPLES=1` and
//! `--nocapture` to print them.

use securefastchat::protocol::keys::Bin;
use securefastchat::protocol::{
    BlobHeader, BlobId, ClientFrame, Copies, DeliverHeader, DeviceKeyPackage, ErrorCode,
    GroupMember, GroupSummary, MAX_CONTROL_FRAME, MAX_STREAM_HEADER, MessageId, Password, Reply,
    Request, SendHeader, ServerFrame, SessionToken, StreamHeader, UploadHeader, encode_frame,
};

fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn token() -> SessionToken {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = i as u8;
    }
    SessionToken::from_bytes(bytes)
}

fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let mut all = control_examples();
    all.extend(messaging_examples());
    all.extend(blob_examples());
    all.extend(group_examples());
    all
}

/// Key packages, GroupInfos and MLS messages are a few hundred bytes and more: the examples
/// carry 4-byte stand-ins (`de ad be ef`) so the framing stays readable.
fn group_examples() -> Vec<(&'static str, Vec<u8>)> {
    let stand_in = || vec![0xde, 0xad, 0xbe, 0xef];
    let mid = MessageId([0x33; 16]);
    let header = |h: StreamHeader| encode_frame(&h, MAX_STREAM_HEADER);
    let client = |id, request| encode_frame(&ClientFrame { id, request }, MAX_CONTROL_FRAME);
    let server = |id, reply| encode_frame(&ServerFrame { id, reply }, MAX_CONTROL_FRAME);
    vec![
        (
            "publish_key_packages",
            client(
                20,
                Request::PublishKeyPackages {
                    key_packages: vec![serde_bytes::ByteBuf::from(stand_in())],
                    last_resort: None,
                },
            ),
        ),
        (
            "key_packages_published",
            server(
                Some(20),
                Reply::KeyPackagesPublished {
                    key_packages: 1,
                    last_resort: true,
                },
            ),
        ),
        (
            "fetch_key_packages",
            client(
                21,
                Request::FetchKeyPackages {
                    username: "bob".into(),
                    devices: None,
                },
            ),
        ),
        (
            "key_packages",
            server(
                Some(21),
                Reply::KeyPackages {
                    username: "bob".into(),
                    identity_key: Bin([0x44; 32]),
                    devices: vec![DeviceKeyPackage {
                        device: 1,
                        key_package: stand_in(),
                        last_resort: false,
                    }],
                },
            ),
        ),
        (
            "key_packages_low",
            server(None, Reply::KeyPackagesLow { remaining: 9 }),
        ),
        (
            "create_group",
            client(
                22,
                Request::CreateGroup {
                    group: "friends".into(),
                    group_id: Bin([0x55; 16]),
                    group_info: stand_in(),
                },
            ),
        ),
        (
            "group_created",
            server(
                Some(22),
                Reply::GroupCreated {
                    group: "friends".into(),
                    epoch: 0,
                },
            ),
        ),
        (
            "group send header",
            header(StreamHeader::Send(SendHeader {
                id: mid,
                to: String::new(),
                kind: "mls".into(),
                length: 2_512,
                copies: None,
                group: Some("friends".into()),
                welcome: Some(1_496),
            })),
        ),
        (
            "group deliver header",
            header(StreamHeader::Deliver(DeliverHeader {
                seq: 43,
                prev: 42,
                id: mid,
                from: "alice".into(),
                from_device: 1,
                to: None,
                sent_at: 1_767_225_600,
                kind: "mls".into(),
                length: 1_016,
                group: Some("friends".into()),
            })),
        ),
        (
            "stale_epoch",
            server(
                None,
                Reply::SendFailed {
                    message_id: Some(mid),
                    code: ErrorCode::StaleEpoch,
                    message: "epoch 1 is not current".into(),
                    devices: None,
                    own_devices: None,
                    epoch: Some(2),
                },
            ),
        ),
        (
            "group_info",
            client(
                23,
                Request::GroupInfo {
                    group: "friends".into(),
                },
            ),
        ),
        (
            "group",
            server(
                Some(23),
                Reply::Group(GroupSummary {
                    group: "friends".into(),
                    group_id: Bin([0x55; 16]),
                    epoch: 1,
                    creator: "alice".into(),
                    admins: vec!["alice".into()],
                    members: vec![
                        GroupMember {
                            username: "alice".into(),
                            device: 1,
                            leaf: 0,
                        },
                        GroupMember {
                            username: "bob".into(),
                            device: 1,
                            leaf: 1,
                        },
                    ],
                    pending_leaves: vec![],
                }),
            ),
        ),
        (
            "leave_group",
            client(
                24,
                Request::LeaveGroup {
                    group: "friends".into(),
                },
            ),
        ),
        (
            "group_left",
            server(
                Some(24),
                Reply::GroupLeft {
                    group: "friends".into(),
                },
            ),
        ),
    ]
    .into_iter()
    .map(|(name, frame)| (name, frame.unwrap()))
    .collect()
}

fn blob_examples() -> Vec<(&'static str, Vec<u8>)> {
    let blob = BlobId([0x22; 16]);
    let header = |h: StreamHeader| encode_frame(&h, MAX_STREAM_HEADER);
    let client = |id, request| encode_frame(&ClientFrame { id, request }, MAX_CONTROL_FRAME);
    let server = |id, reply| encode_frame(&ServerFrame { id, reply }, MAX_CONTROL_FRAME);
    vec![
        (
            "upload_blob",
            client(
                11,
                Request::UploadBlob {
                    blob,
                    length: 1_048_832,
                    readers: vec!["bob".into()],
                },
            ),
        ),
        (
            "blob_upload",
            server(Some(11), Reply::BlobUpload { blob, held: 0 }),
        ),
        (
            "upload header",
            header(StreamHeader::Upload(UploadHeader { blob, offset: 0 })),
        ),
        (
            "blob_stored",
            server(
                None,
                Reply::BlobStored {
                    blob,
                    length: 1_048_832,
                },
            ),
        ),
        (
            "download_blob",
            client(12, Request::DownloadBlob { blob, offset: 0 }),
        ),
        (
            "blob header",
            header(StreamHeader::Blob(BlobHeader {
                blob,
                offset: 0,
                length: 1_048_832,
            })),
        ),
        ("ack_blob", client(13, Request::AckBlob { blob })),
    ]
    .into_iter()
    .map(|(name, frame)| (name, frame.unwrap()))
    .collect()
}

fn messaging_examples() -> Vec<(&'static str, Vec<u8>)> {
    let mid = MessageId([0x11; 16]);
    let header = |h: StreamHeader| encode_frame(&h, MAX_STREAM_HEADER);
    let client = |id, request| encode_frame(&ClientFrame { id, request }, MAX_CONTROL_FRAME);
    let server = |id, reply| encode_frame(&ServerFrame { id, reply }, MAX_CONTROL_FRAME);
    vec![
        (
            "send header",
            header(StreamHeader::Send(SendHeader {
                id: mid,
                to: "bob".into(),
                kind: "text".into(),
                length: 360,
                copies: Some(Copies {
                    devices: vec![1, 2],
                    own_devices: vec![1],
                    lengths: vec![120, 120, 120],
                }),
                group: None,
                welcome: None,
            })),
        ),
        (
            "sent",
            server(
                None,
                Reply::Sent {
                    message_id: mid,
                    duplicate: false,
                },
            ),
        ),
        (
            "deliver header",
            header(StreamHeader::Deliver(DeliverHeader {
                seq: 42,
                prev: 41,
                id: mid,
                from: "alice".into(),
                from_device: 3,
                to: None,
                sent_at: 1_767_225_600,
                kind: "text".into(),
                length: 120,
                group: None,
            })),
        ),
        (
            "ack",
            client(
                9,
                Request::Ack {
                    seqs: vec![41, 42],
                    quiet: false,
                },
            ),
        ),
        ("acked", server(Some(9), Reply::Acked { removed: 2 })),
        (
            "quiet ack",
            client(
                10,
                Request::Ack {
                    seqs: vec![43],
                    quiet: true,
                },
            ),
        ),
    ]
    .into_iter()
    .map(|(name, frame)| (name, frame.unwrap()))
    .collect()
}

fn control_examples() -> Vec<(&'static str, Vec<u8>)> {
    let client = |id, request| encode_frame(&ClientFrame { id, request }, MAX_CONTROL_FRAME);
    let server = |id, reply| encode_frame(&ServerFrame { id, reply }, MAX_CONTROL_FRAME);
    vec![
        (
            "hello",
            client(
                1,
                Request::Hello {
                    version: 1,
                    client: None,
                },
            ),
        ),
        (
            "hello reply",
            server(
                Some(1),
                Reply::Hello {
                    version: 1,
                    server: "sfc-server/0.1.0".into(),
                    max_frame: MAX_CONTROL_FRAME,
                },
            ),
        ),
        (
            "check_username",
            client(
                2,
                Request::CheckUsername {
                    username: "alice".into(),
                },
            ),
        ),
        (
            "username_status",
            server(
                Some(2),
                Reply::UsernameStatus {
                    username: "alice".into(),
                    available: true,
                },
            ),
        ),
        (
            "signup",
            client(
                3,
                Request::Signup {
                    username: "alice".into(),
                    password: Password::new("correct horse"),
                },
            ),
        ),
        (
            "session",
            server(
                Some(3),
                Reply::Session {
                    username: "alice".into(),
                    token: token(),
                    expires_at: 1_767_225_600,
                    device: 1,
                },
            ),
        ),
        (
            "resume",
            client(
                4,
                Request::Resume {
                    token: token(),
                    deliver: true,
                },
            ),
        ),
        (
            "resumed",
            server(
                Some(4),
                Reply::Resumed {
                    username: "alice".into(),
                    expires_at: 1_767_225_600,
                    device: 1,
                },
            ),
        ),
        ("whoami", client(5, Request::Whoami)),
        ("logout", client(6, Request::Logout)),
        ("logged_out", server(Some(6), Reply::LoggedOut)),
        ("ping", client(7, Request::Ping)),
        ("pong", server(Some(7), Reply::Pong)),
        (
            "error",
            server(
                Some(8),
                Reply::Error {
                    code: ErrorCode::InvalidCredentials,
                    message: "invalid credentials".into(),
                },
            ),
        ),
        (
            "connection error",
            server(
                None,
                Reply::Error {
                    code: ErrorCode::MalformedFrame,
                    message: "the body is not valid MessagePack".into(),
                },
            ),
        ),
    ]
    .into_iter()
    .map(|(name, frame)| (name, frame.unwrap()))
    .collect()
}

#[test]
fn protocol_md_shows_the_real_bytes() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let print = std::env::var_os("SFC_PRINT_EXAMPLES").is_some();
    let mut missing = Vec::new();
    for (name, frame) in examples() {
        let hex = hex_lines(&frame);
        if print {
            println!("#### {name}\n```\n{hex}\n```\n");
        }
        if !doc.contains(&hex) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/PROTOCOL.md lacks the bytes of: {missing:?}"
    );
}
