//! Shards: a server with several endpoints on one port keeps a client whose address changes,
//! whichever shard's socket its packets reach (`transport::routing`). A test binary of its own:
//! it reads the metrics, and the metrics recorder is one per process.

mod common;

use std::time::Duration;

use common::TestServer;
use common::metrics::{scrape, series};
use securefastchat::protocol::MessageId;
use securefastchat::server::{Server, ServerConfig, ServerError, TlsSource};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_address_changes_keeps_its_connection_across_shards() {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = TestServer::start_with(|c| {
        c.shards = 4;
        c.metrics = Some(metrics);
    })
    .await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, _) = server.signed_up("bob").await;
    // Each new port of bob's lands on one of the 4 sockets by the kernel's hash: after 12,
    // at least one is another shard's but for a chance of (1/4)^12.
    for n in 1..=12u8 {
        bob.rebind().unwrap();
        let mut id = [0u8; 16];
        id[0] = n;
        alice
            .send_message("bob", "text", MessageId(id), &[n])
            .await
            .unwrap();
        let got = bob
            .next_delivery(WAIT)
            .await
            .expect("delivered after a move");
        assert_eq!(got.body, [n]);
        // Bob's own requests reach the server from the new address too.
        assert_eq!(bob.whoami().await.unwrap().username, "bob");
    }
    let text = scrape(metrics);
    let queued = series(
        &text,
        "sfc_shard_forwarded_packets_total{result=\"queued\"}",
    )
    .expect("the forwarded series");
    assert!(queued > 0.0, "no packet was passed between shards:\n{text}");
    assert_eq!(
        series(
            &text,
            "sfc_shard_forwarded_packets_total{result=\"dropped\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
    server.stop().await;
}

/// The shards share their port with each other only: a second server on it fails to start,
/// as it did when there was one endpoint, instead of taking a share of the clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_cannot_join_the_shards_port() {
    let first = TestServer::start_with(|c| c.shards = 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(
        first.addr,
        dir.path().join("data"),
        TlsSource::Dev {
            dir: dir.path().join("certs"),
        },
    );
    config.shards = 2;
    match Server::bind(config).await {
        Err(ServerError::Bind { addr, error }) => {
            assert_eq!(addr, first.addr);
            assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        }
        Err(other) => panic!("expected a bind error, got {other}"),
        Ok(_) => panic!("a second server bound the port of the first"),
    }
    first.stop().await;
}
