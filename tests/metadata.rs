//! What the server learns about a conversation, checked against a real server: the bodies it
//! stores come in a few sizes whatever the texts' lengths (padding, `docs/PROTOCOL.md` E6.1),
//! and its logs at the default level never pair a sender with a recipient.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PASSWORD, TestServer};
use securefastchat::client::messenger::{Messenger, Received};
use securefastchat::e2e::{MAX_PLAINTEXT_LEN, PADDING_BUCKETS, padded_len};
use securefastchat::protocol::Password;

const WAIT: Duration = Duration::from_secs(5);

async fn messenger(server: &TestServer, home: &Path, name: &str, signup: bool) -> Messenger {
    server.messenger(home, name, signup).await
}

/// Texts of many lengths, among them each bucket's edges and the largest a message may be.
fn texts() -> Vec<String> {
    let mut lengths: BTreeSet<usize> = [1, 2, 50, 100, 200, 1000, 3000, 10_000, 30_000].into();
    for bucket in PADDING_BUCKETS {
        lengths.extend([bucket - 3, bucket - 2, bucket - 1]);
    }
    lengths.insert(MAX_PLAINTEXT_LEN);
    lengths
        .into_iter()
        .filter(|&len| len <= MAX_PLAINTEXT_LEN)
        .enumerate()
        .map(|(n, len)| {
            let tag = format!("{n:03} ");
            format!("{tag}{}", "é".repeat(len.saturating_sub(tag.len()) / 2))
                + &"x".repeat(len.saturating_sub(tag.len()) % 2)
        })
        .collect()
}

/// Alice writes texts of many lengths to Bob. The bodies the server stores and delivers (read
/// by a bare client, which sees what the server sees) take one size per bucket; then Bob's
/// client reads every text back intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sees_one_body_size_per_bucket_whatever_the_text_length() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    bob.close().await;

    let texts = texts();
    for text in &texts {
        alice.send_text("bob", text).await.unwrap();
    }

    // What the server holds for Bob, as a bare client (no keys, no acknowledgement) gets it.
    let raw = server.client().await;
    raw.login("bob", Password::new(PASSWORD)).await.unwrap();
    let mut sizes = BTreeSet::new();
    for text in &texts {
        let delivered = raw.next_delivery(WAIT).await.expect("a delivery");
        sizes.insert((padded_len(text.len()).unwrap(), delivered.body.len()));
    }
    raw.close().await;
    // Every text's body length is decided by its bucket alone: one size per bucket (Alice's
    // envelopes all carry `initial` until Bob answers, and her counters stay small).
    let buckets: BTreeSet<usize> = sizes.iter().map(|(bucket, _)| *bucket).collect();
    assert_eq!(buckets.len(), PADDING_BUCKETS.len(), "{sizes:?}");
    assert_eq!(sizes.len(), buckets.len(), "{sizes:?}");
    for (bucket, len) in &sizes {
        assert!(len > bucket && *len < bucket + 300, "{sizes:?}");
    }

    let bob = messenger(&server, &homes.path().join("b"), "bob", false).await;
    for text in &texts {
        let received = bob.receive(WAIT).await.unwrap();
        match &received {
            Some(Received::Text { text: got, .. }) => assert_eq!(got, text),
            other => panic!("expected a text, got {other:?}"),
        }
        bob.shown(received.as_ref().unwrap()).await.unwrap();
    }
    server.stop().await;
}

/// A `tracing` writer into a shared buffer: what the server would print at the default level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A conversation, a presence check, a reconnection and a second login that replaces the
/// first: no line the server logs at INFO (its default level) names both correspondents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_logs_never_pair_a_sender_with_a_recipient() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "zaphodlog", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "marvinlog", true).await;
    for n in 0..3 {
        alice
            .send_text("marvinlog", &format!("hello {n}"))
            .await
            .unwrap();
        let received = bob.receive(WAIT).await.unwrap().expect("a message");
        bob.shown(&received).await.unwrap();
        bob.send_text("zaphodlog", &format!("back {n}"))
            .await
            .unwrap();
        let received = alice.receive(WAIT).await.unwrap().expect("a message");
        alice.shown(&received).await.unwrap();
    }
    assert!(bob.client().online("zaphodlog").await.unwrap());
    // A message to someone offline, then a new login of the recipient that takes over.
    bob.close().await;
    alice.send_text("marvinlog", "while away").await.unwrap();
    let bob = messenger(&server, &homes.path().join("b"), "marvinlog", false).await;
    let received = bob.receive(WAIT).await.unwrap().expect("a message");
    bob.shown(&received).await.unwrap();
    let again = server.client().await;
    again
        .login("marvinlog", Password::new(PASSWORD))
        .await
        .unwrap();
    again.close().await;
    bob.close().await;
    alice.close().await;
    server.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("marvinlog"), "nothing captured: {logs}");
    for line in logs.lines() {
        assert!(
            !(line.contains("zaphodlog") && line.contains("marvinlog")),
            "a log line pairs the two: {line}"
        );
    }
}
