//! No contact graph is kept longer than presence needs (issue 19, item 16): once a message is
//! acknowledged (or unsent) the data directory holds nothing that pairs its sender with its
//! recipient, presence is decided from memory and forgotten at restart, and the old `contacts`
//! keyspace is deleted at the next start. The data directory is read with fjall directly,
//! after the server stopped, so what is checked is what is on disk.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use securefastchat::client::{ClientError, SendOutcome};
use securefastchat::protocol::{ErrorCode, MessageId};

const WAIT: Duration = Duration::from_secs(5);
/// Names long enough that neither occurs by chance inside a binary value.
const ALICE: &str = "alice-graph";
const BOB: &str = "bob-graph";

fn id(n: u8) -> MessageId {
    MessageId([n; 16])
}

fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every record of every keyspace of the store in `data`: (keyspace, key, value).
fn records(data: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let db = Database::builder(data)
        .open()
        .expect("open the data directory");
    let mut all = Vec::new();
    for name in db.list_keyspace_names() {
        let name = name.to_string();
        let keyspace = db
            .keyspace(&name, KeyspaceCreateOptions::default)
            .expect("keyspace");
        for entry in keyspace.iter() {
            let (key, value) = entry.into_inner().expect("record");
            all.push((name.clone(), key.to_vec(), value.to_vec()));
        }
    }
    all
}

/// Asserts that no record pairs alice with bob: none names both, the send records name no
/// recipient, no inbox entry is left, and there is no `contacts` keyspace.
fn assert_no_pair(data: &Path) {
    let all = records(data);
    assert!(
        all.iter().any(|(ks, _, _)| ks == "sent_v2"),
        "alice's send record (a settled marker) is still there for deduplication"
    );
    for (keyspace, key, value) in &all {
        let record = [key.as_slice(), value.as_slice()].concat();
        assert!(
            !(contains(&record, ALICE.as_bytes()) && contains(&record, BOB.as_bytes())),
            "{keyspace} pairs them: {key:?}"
        );
        assert_ne!(keyspace, "contacts", "a contact graph: {key:?}");
        assert_ne!(keyspace, "inbox_v2", "nothing is pending");
        if keyspace == "sent_v2" {
            assert!(
                !contains(value, BOB.as_bytes()) && !contains(value, b"recipient"),
                "a send record still names its recipient"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_message_leaves_no_record_pairing_sender_and_recipient() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up(ALICE).await;
    let (bob, _) = server.signed_up(BOB).await;
    alice.send_message(BOB, "text", id(1), b"hi").await.unwrap();
    let got = bob.next_delivery(WAIT).await.unwrap();
    assert_eq!(bob.ack(vec![got.seq]).await.unwrap(), 1);
    let dir = server.stop().await;
    assert_no_pair(&dir.path().join("data"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_of_an_acknowledged_id_is_acknowledged_again_and_not_delivered_twice() {
    let server = TestServer::start().await;
    let (alice, alice_token) = server.signed_up(ALICE).await;
    let (bob, bob_token) = server.signed_up(BOB).await;
    alice.send_message(BOB, "text", id(1), b"hi").await.unwrap();
    let got = bob.next_delivery(WAIT).await.unwrap();
    assert_eq!(bob.ack(vec![got.seq]).await.unwrap(), 1);
    // Its ack may still be on its way to the writer: ask after it certainly settled.
    assert_eq!(
        alice.send_message(BOB, "text", id(1), b"hi").await.unwrap(),
        SendOutcome::Duplicate
    );
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    // Delivered and acknowledged: too late to unsend (the documented answer).
    assert!(!alice.unsend(id(1)).await.unwrap());

    // Also after a restart, from the settled marker on disk.
    alice.close().await;
    bob.close().await;
    let dir = server.stop().await;
    assert_no_pair(&dir.path().join("data"));
    let server = TestServer::start_in(dir, |_| {}).await;
    let alice = server.resumed(alice_token).await;
    let bob = server.resumed(bob_token).await;
    assert_eq!(
        alice.send_message(BOB, "text", id(1), b"hi").await.unwrap(),
        SendOutcome::Duplicate
    );
    assert!(!alice.unsend(id(1)).await.unwrap());
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    // A new id is stored and delivered as ever.
    assert_eq!(
        alice
            .send_message(BOB, "text", id(2), b"new")
            .await
            .unwrap(),
        SendOutcome::Stored
    );
    assert_eq!(bob.next_delivery(WAIT).await.unwrap().body, b"new");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsend_before_delivery_still_works_and_leaves_no_pair() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up(ALICE).await;
    let (bob, bob_token) = server.signed_up(BOB).await;
    bob.close().await;
    alice
        .send_message(BOB, "text", id(1), b"oops")
        .await
        .unwrap();
    assert!(alice.unsend(id(1)).await.unwrap());
    assert!(!alice.unsend(id(1)).await.unwrap(), "already gone");
    // The id stays used: a resend is not stored again.
    assert_eq!(
        alice
            .send_message(BOB, "text", id(1), b"oops")
            .await
            .unwrap(),
        SendOutcome::Duplicate
    );
    let bob = server.resumed(bob_token).await;
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    bob.close().await;
    let dir = server.stop().await;
    assert_no_pair(&dir.path().join("data"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_needs_no_stored_graph_and_is_forgotten_at_restart() {
    let server = TestServer::start().await;
    let (alice, alice_token) = server.signed_up(ALICE).await;
    let (bob, bob_token) = server.signed_up(BOB).await;
    alice.send_message(BOB, "text", id(1), b"hi").await.unwrap();
    assert!(bob.online(ALICE).await.unwrap());
    assert_eq!(code_of(alice.online(BOB).await), ErrorCode::NotAllowed);
    let got = bob.next_delivery(WAIT).await.unwrap();
    bob.ack(vec![got.seq]).await.unwrap();
    assert!(
        bob.online(ALICE).await.unwrap(),
        "acknowledged, still granted"
    );
    alice.close().await;
    bob.close().await;
    let dir = server.stop().await;
    assert_no_pair(&dir.path().join("data"));

    // Nothing pending: the permission went with the process.
    let server = TestServer::start_in(dir, |_| {}).await;
    let alice = server.resumed(alice_token).await;
    let bob = server.resumed(bob_token.clone()).await;
    assert_eq!(code_of(bob.online(ALICE).await), ErrorCode::NotAllowed);

    // A message pending across a restart grants it again once it is pushed to bob.
    bob.close().await;
    alice
        .send_message(BOB, "text", id(2), b"later")
        .await
        .unwrap();
    alice.close().await;
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let bob = server.resumed(bob_token).await;
    assert_eq!(bob.next_delivery(WAIT).await.unwrap().body, b"later");
    assert!(
        !bob.online(ALICE).await.unwrap(),
        "granted, and alice is offline"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contact_graph_of_an_older_store_is_deleted_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pair = [BOB.as_bytes(), &[0], ALICE.as_bytes()].concat();
    {
        let db = Database::builder(&data).open().unwrap();
        let contacts = db
            .keyspace("contacts", KeyspaceCreateOptions::default)
            .unwrap();
        contacts.insert(&pair, b"").unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
    }
    let server = TestServer::start_in(dir, |_| {}).await;
    let (bob, _) = server.signed_up(BOB).await;
    let (_alice, _) = server.signed_up(ALICE).await;
    assert_eq!(code_of(bob.online(ALICE).await), ErrorCode::NotAllowed);
    let dir = server.stop().await;
    let db = Database::builder(&data).open().unwrap();
    assert!(!db.keyspace_exists("contacts"), "the old graph is gone");
    drop(db);
    assert!(
        records(&data)
            .iter()
            .all(|(_, k, v)| !contains(&[k.as_slice(), v].concat(), &pair))
    );
    drop(dir);
}
