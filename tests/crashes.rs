//! Crashes: a server killed with `kill -9` (gone, or restarted on the same data and port), and
//! the leftovers of a killed client.

mod common;

use std::time::{Duration, Instant};

use common::PASSWORD;
use common::cli::{People, ServerProcess, run};
use securefastchat::client::{Client, ClientError, ClientOptions, liveness};
use securefastchat::protocol::{
    MAX_CONTROL_FRAME, MessageId, PROTOCOL_VERSION, Password, Reply, ServerFrame, SessionToken,
    decode_request, read_frame, write_frame,
};
use securefastchat::{tls, transport};

/// Options for the server binary started in `dir`, with the default (30 s) request timeout.
fn options(server: &ServerProcess, dir: &std::path::Path) -> ClientOptions {
    ClientOptions::new(server.addr.clone(), dir.join("certs").join("ca.crt"))
}

/// `name` signed up on one connection, and a second connection resumed with its token.
async fn signed_up_and_resumed(options: &ClientOptions, name: &str) -> (Client, SessionToken) {
    let first = Client::connect(options).await.unwrap();
    let (_, token) = first.signup(name, Password::new(PASSWORD)).await.unwrap();
    first.close().await;
    let client = Client::connect(options).await.unwrap();
    client.resume(token.clone()).await.unwrap();
    client.ping().await.unwrap();
    (client, token)
}

/// Runs `work` and returns its output with how long it took.
async fn timed<T>(work: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = work.await;
    (out, started.elapsed())
}

fn assert_lost(result: Result<impl std::fmt::Debug, ClientError>, needle: &str) {
    match result {
        Err(ClientError::ConnectionLost(reason)) => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
        }
        other => panic!("expected a lost connection ({needle}), got {other:?}"),
    }
}

/// Nothing answers any more: the client notices within seconds (not the 30 s request
/// timeout), every waiter fails, and the deliveries end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_every_waiter_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path()).await;
    let options = options(&server, dir.path());
    let (client, _) = signed_up_and_resumed(&options, "alice").await;
    server.kill().await;

    let id = MessageId::random().unwrap();
    let ((ping, ping_took), (sent, send_took), (delivery, delivery_took)) = tokio::join!(
        timed(client.ping()),
        timed(client.send_message("alice", "text", id, b"hello")),
        timed(client.next_delivery(Duration::from_secs(60))),
    );
    println!(
        "ping failed after {ping_took:?}, send after {send_took:?}, deliveries ended after {delivery_took:?}"
    );
    assert_lost(ping, "stopped answering");
    assert_lost(sent, "stopped answering");
    assert!(delivery.is_none());
    for took in [ping_took, send_took, delivery_took] {
        assert!(took < Duration::from_secs(6), "took {took:?}");
    }
    // Later requests fail at once, with the same reason.
    let (again, took) = timed(client.ping()).await;
    assert_lost(again, "stopped answering");
    assert!(took < Duration::from_millis(100), "took {took:?}");
}

/// A server restarted on the same data and port answers the old connection's packets with a
/// stateless reset: the client's request fails at once, and a new connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resets_old_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path()).await;
    let addr = server.addr.clone();
    let options = options(&server, dir.path());
    let (client, token) = signed_up_and_resumed(&options, "alice").await;
    server.kill().await;
    let server = ServerProcess::start_on(dir.path(), &addr).await;

    let (ping, took) = timed(tokio::time::timeout(Duration::from_secs(40), client.ping())).await;
    println!("the request on the old connection failed after {took:?}");
    assert_lost(ping.unwrap(), "no longer knows this connection");
    assert!(took <= Duration::from_secs(1), "took {took:?}");

    let fresh = Client::connect(&options).await.unwrap();
    fresh.resume(token).await.unwrap();
    fresh.close().await;
    server.terminate().await;
}

/// A stub server on its own endpoint: accepts one connection, answers its `hello`, and hands
/// the control stream to the test. Returns its address.
async fn stub_server(
    dir: &std::path::Path,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<(
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    )>,
) {
    let (identity, _) = tls::ensure_dev_certificates(dir).unwrap();
    let endpoint = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        tls::server_crypto(identity).unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut buf = Vec::new();
        assert!(
            read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf)
                .await
                .unwrap()
        );
        let hello = decode_request(&buf).unwrap();
        let reply = ServerFrame {
            id: Some(hello.id),
            reply: Reply::Hello {
                version: PROTOCOL_VERSION,
                server: "stub".into(),
                max_frame: MAX_CONTROL_FRAME,
            },
        };
        write_frame(&mut send, &reply, MAX_CONTROL_FRAME)
            .await
            .unwrap();
        (endpoint, conn, send, recv)
    });
    (addr, accepted)
}

/// A server that is alive but does not answer is not declared dead: its QUIC stack
/// acknowledges the request, and the request times out after `request_timeout`, as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_server_that_does_not_answer_times_out_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, accepted) = stub_server(dir.path()).await;
    // Reads requests and answers none (keeping the connection open).
    let silent = tokio::spawn(async move {
        let (endpoint, conn, send, mut recv) = accepted.await.unwrap();
        let mut buf = Vec::new();
        while read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf)
            .await
            .unwrap_or(false)
        {}
        drop((send, conn, endpoint));
    });

    let mut options = ClientOptions::new(addr.to_string(), dir.path().join(tls::CA_CERT_FILE));
    options.request_timeout = liveness::DEAD_SERVER_FLOOR * 2;
    let client = Client::connect(&options).await.unwrap();
    let (ping, took) = timed(client.ping()).await;
    assert!(
        matches!(ping, Err(ClientError::Timeout(t)) if t == options.request_timeout),
        "{ping:?} after {took:?}"
    );
    client.close().await;
    silent.abort();
}

/// An `error` event about the control stream (a `malformed_frame` without `id`, which leaves
/// the connection open) does not end the client's reading: the next request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_event_about_the_connection_does_not_end_it() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, accepted) = stub_server(dir.path()).await;
    let stub = tokio::spawn(async move {
        let (endpoint, conn, mut send, mut recv) = accepted.await.unwrap();
        let event = ServerFrame {
            id: None,
            reply: Reply::Error {
                code: securefastchat::protocol::ErrorCode::MalformedFrame,
                message: "not a map".into(),
            },
        };
        write_frame(&mut send, &event, MAX_CONTROL_FRAME)
            .await
            .unwrap();
        let mut buf = Vec::new();
        while read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf)
            .await
            .unwrap_or(false)
        {
            let ping = decode_request(&buf).unwrap();
            let pong = ServerFrame {
                id: Some(ping.id),
                reply: Reply::Pong,
            };
            write_frame(&mut send, &pong, MAX_CONTROL_FRAME)
                .await
                .unwrap();
        }
        drop((send, conn, endpoint));
    });
    let options = ClientOptions::new(addr.to_string(), dir.path().join(tls::CA_CERT_FILE));
    let client = Client::connect(&options).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.ping().await.unwrap();
    assert!(client.take_unclaimed_error().is_some(), "the event is kept");
    client.close().await;
    stub.abort();
}

/// A client killed between writing a private file's temp copy and renaming it leaves
/// `NAME.tmp.PID` behind, holding a secret: the next `sfc` removes it, but never the temp
/// file of a client still running.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_clients_temp_files_are_removed() {
    let server = common::TestServer::start().await;
    let people = People::signed_up(&server, &["alice"]).await;
    let home = people.home("alice");

    let mut gone = tokio::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id().unwrap();
    gone.wait().await.unwrap();
    let mut running = tokio::process::Command::new("sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stale = home.join(format!("keystore.tmp.{gone_pid}"));
    let live = home.join(format!("keystore.tmp.{}", running.id().unwrap()));
    std::fs::write(&stale, b"a dead client's copy of the keys").unwrap();
    std::fs::write(&live, b"a running client's next keystore").unwrap();

    let out = run(people.sfc("alice", &["whoami"])).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        !stale.exists(),
        "the dead client's temp file is still there"
    );
    assert!(live.exists(), "the running client's temp file was removed");
    running.kill().await.unwrap();
    server.stop().await;
}
