//! Admission under floods: the per-address connection cap, the login deadline after `hello`,
//! and the flow-control bounds that hold a hostile peer's cost to the server. Clients appear
//! from several loopback addresses (all of 127/8 is loopback on Linux).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{PASSWORD, TestServer};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, TransportErrorCode};
use securefastchat::client::{Client, ClientError};
use securefastchat::protocol::{
    ClientFrame, CloseCode, MAX_CONTROL_FRAME, PROTOCOL_VERSION, Password, Request, read_frame,
    write_frame,
};
use securefastchat::{tls, transport};

/// A bare QUIC client on `from`, with the project's client transport settings.
fn endpoint_on(server: &TestServer, from: Ipv4Addr) -> Endpoint {
    let anchors = tls::load_trust_anchors(&server.ca_file()).unwrap();
    let crypto: QuicClientConfig = tls::client_crypto(anchors, false).unwrap();
    transport::client_endpoint_on(SocketAddr::from((from, 0)), crypto).unwrap()
}

/// A connection that completes `hello` on its control stream and then does nothing more: the
/// idle unauthenticated probe of the flood.
struct Probe {
    _endpoint: Endpoint,
    conn: Connection,
    send: SendStream,
    _recv: RecvStream,
}

async fn probe(server: &TestServer, from: Ipv4Addr) -> Result<Probe, ConnectionError> {
    let endpoint = endpoint_on(server, from);
    let conn = endpoint.connect(server.addr, "localhost").unwrap().await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = ClientFrame {
        id: 1,
        request: Request::Hello {
            version: PROTOCOL_VERSION,
            client: Some("probe".into()),
        },
    };
    write_frame(&mut send, &hello, MAX_CONTROL_FRAME)
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf),
    )
    .await
    .expect("hello reply in time");
    assert!(matches!(read, Ok(true)), "hello reply: {read:?}");
    Ok(Probe {
        _endpoint: endpoint,
        conn,
        send,
        _recv: recv,
    })
}

fn refused(result: Result<Probe, ConnectionError>) -> bool {
    match result {
        Err(ConnectionError::ConnectionClosed(close)) => {
            close.error_code == TransportErrorCode::CONNECTION_REFUSED
        }
        _ => false,
    }
}

#[tokio::test]
async fn one_address_cannot_take_more_than_its_share_of_connections() {
    let server = TestServer::start_with(|c| c.max_connections_per_address = 3).await;
    let from = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(probe(&server, from).await.expect("under the cap"));
    }
    // The fourth from the same address is refused before any TLS work...
    assert!(
        refused(probe(&server, from).await),
        "a fourth connection got in"
    );
    // ...while other addresses still get in, and the held ones are untouched.
    let other = probe(&server, Ipv4Addr::new(127, 0, 0, 3))
        .await
        .expect("another address");
    let honest = server.client().await;
    honest
        .ping()
        .await
        .expect("an honest client from 127.0.0.1");
    for p in &held {
        assert!(
            p.conn.close_reason().is_none(),
            "a held connection was evicted"
        );
    }
    // A slot given back is free again.
    let first = held.remove(0);
    first.conn.close(0u32.into(), b"bye");
    drop(first);
    let mut again = Err(ConnectionError::TimedOut);
    for _ in 0..50 {
        again = probe(&server, from).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_ok(), "the freed slot was not given back");
    drop((held, other, again, honest));
    server.stop().await;
}

#[tokio::test]
async fn an_unauthenticated_connection_is_closed_at_the_login_deadline() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 2;
        c.login_timeout = Duration::from_secs(1);
    })
    .await;
    let (alice, _) = server.signed_up("alice").await;
    alice.close().await;
    // Two idle probes, from two addresses, take both slots (once alice's is given back).
    let mut probes = Vec::new();
    for from in [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)] {
        let mut opened = None;
        for _ in 0..50 {
            if let Ok(p) = probe(&server, from).await {
                opened = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        probes.push(opened.expect("a probe got a slot"));
    }
    let shut_out = Client::connect(&server.options()).await;
    assert!(
        matches!(shut_out, Err(ClientError::Refused(_))),
        "a third connection got in: {shut_out:?}"
    );
    // The deadline closes the probes with a typed code...
    for p in &probes {
        let closed = tokio::time::timeout(Duration::from_secs(5), p.conn.closed())
            .await
            .expect("closed at the login deadline");
        match closed {
            ConnectionError::ApplicationClosed(close) => assert_eq!(
                close.error_code.into_inner(),
                u64::from(CloseCode::LoginTimeout.code())
            ),
            other => panic!("closed otherwise: {other}"),
        }
    }
    // ...which frees their slots for an honest login,
    let mut honest = None;
    for _ in 0..50 {
        if let Ok(client) = Client::connect(&server.options()).await {
            honest = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let honest = honest.expect("an honest client got in after the deadline");
    honest
        .login("alice", Password::new(PASSWORD))
        .await
        .expect("honest login");
    // and an authenticated connection is not held to the deadline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    honest
        .whoami()
        .await
        .expect("still connected after the deadline");
    drop(probes);
    honest.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_hostile_peer_is_held_by_stream_limits_and_flow_control() {
    let server = TestServer::start().await;
    let mut hostile = probe(&server, Ipv4Addr::new(127, 0, 0, 2)).await.unwrap();

    // Message streams: the server lets a peer have MAX_CLIENT_UNI_STREAMS open at once and
    // grants no more while they stay open (one byte each: half a header, never finished).
    let mut streams = Vec::new();
    for _ in 0..transport::MAX_CLIENT_UNI_STREAMS {
        let mut stream = tokio::time::timeout(Duration::from_secs(5), hostile.conn.open_uni())
            .await
            .expect("a stream within the limit")
            .unwrap();
        stream.write_all(&[0]).await.unwrap();
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let more = tokio::time::timeout(Duration::from_millis(500), hostile.conn.open_uni()).await;
    assert!(more.is_err(), "the server granted a stream past its limit");

    // Control stream: a peer that asks and never reads its replies is stopped by flow
    // control once the server's queue and windows are full, long before it costs the server
    // much: every write after that blocks.
    let ping = ClientFrame {
        id: 2,
        request: Request::Ping,
    };
    let frame = securefastchat::protocol::encode_frame(&ping, MAX_CONTROL_FRAME).unwrap();
    let batch: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 64)
        .collect();
    // What the peer can get in: the server's stream window of unread requests, the replies
    // queued behind a full client window, and the client's own window of unread replies
    // (every window here is STREAM_RECEIVE_WINDOW); the server's own share stays under its
    // connection window and send window, whatever the peer does.
    let bound = 3 * transport::STREAM_RECEIVE_WINDOW as usize;
    let mut written = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), hostile.send.write_all(&batch)).await {
            Ok(Ok(())) => written += batch.len(),
            Ok(Err(e)) => panic!("the server closed the control stream: {e}"),
            Err(_) => break,
        }
        assert!(
            written < bound,
            "{written} bytes of requests accepted without reading a reply"
        );
    }
    eprintln!("a peer that never reads got {written} bytes of requests in before blocking");
    assert!(written as u64 >= u64::from(transport::STREAM_RECEIVE_WINDOW) / 2);
    assert!(hostile.conn.close_reason().is_none());
    drop((streams, hostile));
    server.stop().await;
}

/// `sfc-bench flood` in a short run: its connections come from several addresses, all of them
/// complete `hello`, and the report carries the server's RSS for the round.
#[tokio::test]
async fn the_flood_tool_holds_its_connections_from_many_addresses() {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_sfc-bench"))
        .args([
            "flood",
            "--spawn",
            "--server-bin",
            env!("CARGO_BIN_EXE_sfc-server"),
        ])
        .args([
            "--clients",
            "40",
            "--sources",
            "4",
            "--duration",
            "0.5",
            "--json",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["scenario"], "flood");
    let round = &report["flood"]["rounds"][0];
    assert_eq!(round["opened"], 40, "{report}");
    assert_eq!(round["refused"], 0, "{report}");
    assert_eq!(report["flood"]["sources"], 4);
    assert!(round["rss_held_bytes"].as_u64().unwrap() > 0, "{report}");
}
