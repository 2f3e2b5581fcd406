//! Hostile and broken peers: bad frames get a typed error or a clean close, and other clients
//! keep working.

mod common;

use std::time::Duration;

use common::TestServer;
use common::raw::Raw;
use quinn::ConnectionError;
use securefastchat::client::{Client, ClientError, ClientOptions, connect_raw};
use securefastchat::protocol::{
    CloseCode, ErrorCode, MAX_CONTROL_FRAME, MAX_NESTING, MAX_STREAM_HEADER, MessageId, Reply,
    Request, ServerFrame, encode_frame,
};
use securefastchat::tls::DevCertificates;
use serde::Serialize;

#[derive(Serialize)]
struct Typed<'a> {
    id: u64,
    r#type: &'a str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_closes_only_that_connection() {
    let server = TestServer::start().await;
    let (healthy, _) = server.signed_up("judy").await;

    for announced in [MAX_CONTROL_FRAME + 1, u32::MAX] {
        let mut raw = Raw::with_hello(&server).await;
        raw.bytes(&announced.to_be_bytes()).await;
        raw.expect_error(None, ErrorCode::FrameTooLarge).await;
        raw.expect_closed_with(CloseCode::ProtocolViolation).await;
    }
    assert_eq!(healthy.whoami().await.unwrap().username, "judy");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_gets_a_typed_error_and_a_close() {
    let server = TestServer::start().await;
    let mut raw = Raw::with_hello(&server).await;
    raw.bytes(&[0, 0, 0, 50, 0x82, 0xa2, b'i', b'd']).await;
    raw.send.finish().unwrap();
    raw.expect_error(None, ErrorCode::TruncatedFrame).await;
    raw.expect_closed_with(CloseCode::ProtocolViolation).await;
    server.client().await.ping().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_messagepack_is_answered_and_the_connection_goes_on() {
    let server = TestServer::start().await;
    let mut raw = Raw::with_hello(&server).await;
    // Never-used byte, an array instead of a map, a map without `type`, trailing bytes.
    raw.body(&[0xc1, 0xc1]).await;
    raw.expect_error(None, ErrorCode::MalformedFrame).await;
    raw.body(&rmp_serde::to_vec(&(1, 2)).unwrap()).await;
    raw.expect_error(None, ErrorCode::MalformedFrame).await;
    #[derive(Serialize)]
    struct NoType {
        id: u64,
    }
    raw.map(&NoType { id: 3 }).await;
    raw.expect_error(None, ErrorCode::MalformedFrame).await;
    let mut trailing = rmp_serde::to_vec_named(&Typed {
        id: 4,
        r#type: "ping",
    })
    .unwrap();
    trailing.push(0xc0);
    raw.body(&trailing).await;
    raw.expect_error(None, ErrorCode::MalformedFrame).await;
    raw.body(&[]).await;
    raw.expect_error(None, ErrorCode::MalformedFrame).await;
    // An integer where the `type` string belongs is not read as a variant index.
    #[derive(Serialize)]
    struct IndexTag {
        id: u64,
        r#type: u8,
    }
    raw.map(&IndexTag { id: 6, r#type: 5 }).await;
    raw.expect_error(None, ErrorCode::MalformedFrame).await;

    raw.expect_pong(7).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_requests_get_typed_errors_with_their_id() {
    let server = TestServer::start().await;
    let mut raw = Raw::with_hello(&server).await;
    raw.map(&Typed {
        id: 5,
        r#type: "teleport",
    })
    .await;
    raw.expect_error(Some(5), ErrorCode::UnknownRequest).await;

    #[derive(Serialize)]
    struct BadLogin {
        id: u64,
        r#type: &'static str,
        username: u32,
    }
    raw.map(&BadLogin {
        id: 6,
        r#type: "login",
        username: 7,
    })
    .await;
    raw.expect_error(Some(6), ErrorCode::BadRequest).await;

    raw.expect_pong(7).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_ack_is_answered_only_when_it_fails() {
    let server = TestServer::start().await;
    let mut raw = Raw::with_hello(&server).await;
    let quiet = |seqs: Vec<u64>| Request::Ack { seqs, quiet: true };
    raw.request(2, quiet(vec![1])).await;
    raw.expect_error(Some(2), ErrorCode::NotAuthenticated).await;

    raw.request(
        3,
        Request::Signup {
            username: "quinn".into(),
            password: securefastchat::protocol::Password::new("correct horse battery staple"),
        },
    )
    .await;
    assert!(matches!(raw.reply().await.reply, Reply::Session { .. }));
    // Nothing is pending, so this would be `acked` with `removed: 0`; quiet, it is not
    // answered at all: the next frame is the ping's pong.
    raw.request(4, quiet(vec![1, 2])).await;
    raw.expect_pong(5).await;
    raw.request(6, quiet((0..5_000).collect())).await;
    raw.expect_error(Some(6), ErrorCode::BadRequest).await;

    #[derive(Serialize)]
    struct MistypedQuiet {
        id: u64,
        r#type: &'static str,
        seqs: Vec<u64>,
        quiet: &'static str,
    }
    raw.map(&MistypedQuiet {
        id: 7,
        r#type: "ack",
        seqs: vec![1],
        quiet: "yes",
    })
    .await;
    raw.expect_error(Some(7), ErrorCode::BadRequest).await;
    // Without `quiet` the same ack is answered.
    raw.request(
        8,
        Request::Ack {
            seqs: vec![1],
            quiet: false,
        },
    )
    .await;
    let frame = raw.reply().await;
    assert_eq!(
        (frame.id, frame.reply),
        (Some(8), Reply::Acked { removed: 0 })
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_comes_first_and_versions_are_checked() {
    let server = TestServer::start().await;
    let mut raw = Raw::open(&server).await;
    raw.request(1, Request::Ping).await;
    raw.expect_error(Some(1), ErrorCode::HelloRequired).await;
    raw.request(
        2,
        Request::Hello {
            version: 99,
            client: None,
        },
    )
    .await;
    raw.expect_error(Some(2), ErrorCode::UnsupportedVersion)
        .await;
    raw.request(3, Request::Whoami).await;
    raw.expect_error(Some(3), ErrorCode::HelloRequired).await;
    raw.request(
        4,
        Request::Hello {
            version: 1,
            client: Some("test".into()),
        },
    )
    .await;
    assert!(matches!(raw.reply().await.reply, Reply::Hello { .. }));
    raw.expect_pong(5).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_opens_no_control_stream_is_closed() {
    let server = TestServer::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let (_endpoint, conn) = connect_raw(&server.options()).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap();
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 2),
        "{closed:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_closed() {
    let server = TestServer::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut raw = Raw::open(&server).await;
    // Open the stream with half a frame, then stall.
    raw.bytes(&[0, 0]).await;
    raw.expect_closed_with(CloseCode::ProtocolViolation).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_ca_fails_clearly() {
    let server = TestServer::start().await;
    let other = tempfile::tempdir().unwrap();
    DevCertificates::generate(&[])
        .unwrap()
        .write_to(other.path())
        .unwrap();
    let options = ClientOptions::new(server.addr.to_string(), other.path().join("ca.crt"));
    let err = Client::connect(&options).await.unwrap_err();
    assert!(
        matches!(err, ClientError::CertificateNotTrusted(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("not trusted"), "{err}");

    // A name the certificate does not carry is refused too.
    let mut options = server.options();
    options.server_name = Some("chat.example".into());
    let err = Client::connect(&options).await.unwrap_err();
    assert!(
        matches!(err, ClientError::CertificateNotTrusted(_)),
        "{err:?}"
    );
    server.client().await.ping().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused() {
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let first = server.client().await;
    let second = server.client().await;
    let err = Client::connect(&server.options()).await.unwrap_err();
    assert!(matches!(err, ClientError::Refused(_)), "{err:?}");
    first.ping().await.unwrap();
    second.ping().await.unwrap();
    server.stop().await;
}

/// A frame body `levels` maps or arrays deep: `fields` in the top map plus `x`, which nests
/// the rest, a string at the bottom.
fn nested_body(fields: &[(&str, rmpv::Value)], levels: usize, maps: bool) -> Vec<u8> {
    let mut x = rmpv::Value::from("leaf");
    for _ in 1..levels {
        x = if maps {
            rmpv::Value::Map(vec![("k".into(), x)])
        } else {
            rmpv::Value::Array(vec![x])
        };
    }
    let mut entries: Vec<_> = fields
        .iter()
        .map(|(k, v)| (rmpv::Value::from(*k), v.clone()))
        .collect();
    entries.push(("x".into(), x));
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &rmpv::Value::Map(entries)).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frames_nest_up_to_sixteen_maps_or_arrays() {
    let server = TestServer::start().await;
    let mut raw = Raw::with_hello(&server).await;
    let mut id = 1;
    for maps in [true, false] {
        id += 1;
        let ping = [("id", rmpv::Value::from(id)), ("type", "ping".into())];
        raw.body(&nested_body(&ping, MAX_NESTING, maps)).await;
        let frame = raw.reply().await;
        assert_eq!(
            (frame.id, frame.reply),
            (Some(id), Reply::Pong),
            "maps: {maps}"
        );
        raw.body(&nested_body(&ping, MAX_NESTING + 1, maps)).await;
        raw.expect_error(None, ErrorCode::MalformedFrame).await;
    }
    raw.expect_pong(id + 1).await;
    server.stop().await;
}

/// Signs `name` up on a raw connection (after `hello`).
async fn raw_signed_up(server: &TestServer, name: &str) -> Raw {
    let mut raw = Raw::with_hello(server).await;
    raw.request(
        2,
        Request::Signup {
            username: name.into(),
            password: securefastchat::protocol::Password::new("correct horse battery staple"),
        },
    )
    .await;
    assert!(matches!(raw.reply().await.reply, Reply::Session { .. }));
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_stream_headers_nest_up_to_sixteen_maps_or_arrays() {
    let server = TestServer::start().await;
    server.signed_up("bob").await;
    let mut raw = raw_signed_up(&server, "alice").await;
    for (n, maps) in [(1u8, true), (2, false)] {
        let header = |id: u8| {
            [
                ("type", rmpv::Value::from("send")),
                ("id", rmpv::Value::Binary(vec![id; 16])),
                ("to", "bob".into()),
                ("kind", "text".into()),
                ("length", 1.into()),
            ]
        };
        let mut stream = raw.conn.open_uni().await.unwrap();
        let body = nested_body(&header(n), MAX_NESTING, maps);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame.push(b'!');
        stream.write_all(&frame).await.unwrap();
        stream.finish().unwrap();
        let event = raw.reply().await;
        assert_eq!(
            (event.id, event.reply),
            (
                None,
                Reply::Sent {
                    message_id: MessageId([n; 16]),
                    duplicate: false
                }
            )
        );

        let mut stream = raw.conn.open_uni().await.unwrap();
        let body = nested_body(&header(n + 10), MAX_NESTING + 1, maps);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame.push(b'!');
        stream.write_all(&frame).await.unwrap();
        let _ = stream.finish();
        let event = raw.reply().await;
        assert!(
            matches!(
                event.reply,
                Reply::SendFailed {
                    message_id: None,
                    code: ErrorCode::MalformedFrame,
                    ..
                }
            ),
            "{event:?}"
        );
    }
    raw.expect_pong(9).await;
    server.stop().await;
}

/// The next event about a message stream, skipping nothing else (the raw connection sends no
/// requests meanwhile).
async fn send_event(raw: &mut Raw) -> (Option<MessageId>, ErrorCode) {
    let event = raw.reply().await;
    match event {
        ServerFrame {
            id: None,
            reply: Reply::SendFailed {
                message_id, code, ..
            },
        } => (message_id, code),
        other => panic!("expected send_failed, got {other:?}"),
    }
}

fn send_header(id: MessageId, length: u64) -> Vec<u8> {
    let header =
        securefastchat::protocol::StreamHeader::Send(securefastchat::protocol::SendHeader {
            id,
            to: "bob".into(),
            kind: "text".into(),
            length,
            copies: None,
            group: None,
            welcome: None,
        });
    encode_frame(&header, MAX_STREAM_HEADER).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_message_streams_get_typed_events() {
    let server = TestServer::start().await;
    server.signed_up("bob").await;
    let mut raw = raw_signed_up(&server, "alice").await;

    // A header longer than 1,024 bytes: refused from its length prefix.
    let mut stream = raw.conn.open_uni().await.unwrap();
    stream
        .write_all(&(MAX_STREAM_HEADER + 1).to_be_bytes())
        .await
        .unwrap();
    assert_eq!(send_event(&mut raw).await, (None, ErrorCode::FrameTooLarge));
    let stopped = tokio::time::timeout(Duration::from_secs(5), stream.stopped());
    assert_eq!(
        stopped.await.unwrap().unwrap(),
        Some(quinn::VarInt::from_u32(1))
    );

    // A stream that ends inside its header.
    let mut stream = raw.conn.open_uni().await.unwrap();
    stream
        .write_all(&send_header(MessageId([1; 16]), 5)[..9])
        .await
        .unwrap();
    stream.finish().unwrap();
    assert_eq!(
        send_event(&mut raw).await,
        (None, ErrorCode::TruncatedFrame)
    );

    // A stream that ends (FIN) inside its body.
    let id = MessageId([2; 16]);
    let mut stream = raw.conn.open_uni().await.unwrap();
    stream.write_all(&send_header(id, 100)).await.unwrap();
    stream.write_all(&[7; 10]).await.unwrap();
    stream.finish().unwrap();
    assert_eq!(
        send_event(&mut raw).await,
        (Some(id), ErrorCode::TruncatedFrame)
    );

    // A stream the client resets inside its body, once the server has read the header.
    let id = MessageId([3; 16]);
    let mut stream = raw.conn.open_uni().await.unwrap();
    stream.write_all(&send_header(id, 100)).await.unwrap();
    stream.write_all(&[7; 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.reset(quinn::VarInt::from_u32(9)).unwrap();
    assert_eq!(
        send_event(&mut raw).await,
        (Some(id), ErrorCode::TruncatedFrame)
    );

    // More bytes than the header announced.
    let id = MessageId([4; 16]);
    let mut stream = raw.conn.open_uni().await.unwrap();
    stream.write_all(&send_header(id, 3)).await.unwrap();
    stream.write_all(b"four").await.unwrap();
    let _ = stream.finish();
    assert_eq!(
        send_event(&mut raw).await,
        (Some(id), ErrorCode::BadRequest)
    );

    // None of it was stored, and the connection goes on.
    let mut stream = raw.conn.open_uni().await.unwrap();
    let id = MessageId([5; 16]);
    stream.write_all(&send_header(id, 2)).await.unwrap();
    stream.write_all(b"ok").await.unwrap();
    stream.finish().unwrap();
    let event = raw.reply().await;
    assert_eq!(
        event.reply,
        Reply::Sent {
            message_id: id,
            duplicate: false
        }
    );
    let bob = server.client().await;
    bob.login(
        "bob",
        securefastchat::protocol::Password::new(common::PASSWORD),
    )
    .await
    .unwrap();
    let only = bob.next_delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!((only.id, only.body.as_slice()), (id, &b"ok"[..]));
    raw.expect_pong(9).await;
    server.stop().await;
}

/// A signed prekey as MessagePack, signed by `identity` under `label`.
fn wire_signed_prekey(identity: &ed25519_dalek::SigningKey, label: &[u8], id: u32) -> rmpv::Value {
    use ed25519_dalek::Signer;
    let key = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([id as u8; 32]));
    let mut message = label.to_vec();
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(key.as_bytes());
    rmpv::Value::Map(vec![
        ("id".into(), id.into()),
        ("key".into(), rmpv::Value::Binary(key.as_bytes().to_vec())),
        (
            "signature".into(),
            rmpv::Value::Binary(identity.sign(&message).to_bytes().to_vec()),
        ),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_first_key_upload_is_invalid_keys_and_stores_nothing() {
    let server = TestServer::start().await;
    let mut raw = raw_signed_up(&server, "alice").await;
    let identity = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let identity_key = rmpv::Value::Binary(identity.verifying_key().to_bytes().to_vec());
    let spk = wire_signed_prekey(&identity, b"SFC signed prekey v1", 1);
    let last = wire_signed_prekey(&identity, b"SFC last-resort prekey v1", 2);
    let publish = |id: u64, fields: &[(&str, &rmpv::Value)]| {
        let mut entries = vec![
            ("id".into(), id.into()),
            ("type".into(), "publish_keys".into()),
        ];
        entries.extend(
            fields
                .iter()
                .map(|(k, v)| (rmpv::Value::from(*k), (*v).clone())),
        );
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &rmpv::Value::Map(entries)).unwrap();
        body
    };
    let incomplete = [
        publish(3, &[("identity_key", &identity_key)]),
        publish(
            4,
            &[("identity_key", &identity_key), ("signed_prekey", &spk)],
        ),
        publish(5, &[("signed_prekey", &spk), ("last_resort", &last)]),
        // Part II's PrekeyBundle calls the key `last_resort_prekey`; on the wire of part I it
        // is `last_resort`, and the other name is an unknown key, ignored.
        publish(
            6,
            &[
                ("identity_key", &identity_key),
                ("signed_prekey", &spk),
                ("last_resort_prekey", &last),
            ],
        ),
    ];
    for (id, body) in (3..).zip(incomplete) {
        raw.body(&body).await;
        raw.expect_error(Some(id), ErrorCode::InvalidKeys).await;
    }
    raw.request(
        7,
        Request::FetchBundle {
            username: "alice".into(),
            devices: None,
        },
    )
    .await;
    raw.expect_error(Some(7), ErrorCode::NoKeys).await;

    raw.body(&publish(
        8,
        &[
            ("identity_key", &identity_key),
            ("signed_prekey", &spk),
            ("last_resort", &last),
        ],
    ))
    .await;
    let frame = raw.reply().await;
    assert_eq!(
        (frame.id, frame.reply),
        (
            Some(8),
            Reply::KeysPublished {
                one_time_prekeys: 0
            }
        )
    );
    server.stop().await;
}
