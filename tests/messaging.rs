//! Messaging through a real server: online and offline delivery, acknowledgements, duplicates,
//! unsend, quotas, expiry, presence, ordering, migration. Bodies here are opaque bytes: the
//! server never looks inside them (end-to-end sealing is tested with the e2e module).

mod common;

use std::time::Duration;

use common::TestServer;
use securefastchat::client::{Client, ClientError, SendOutcome};
use securefastchat::protocol::SessionToken;
use securefastchat::protocol::{ErrorCode, MessageId};

const WAIT: Duration = Duration::from_secs(5);

/// Alice online; Bob signed up and gone offline (his token returned).
async fn alice_and_offline_bob(server: &TestServer) -> (Client, SessionToken) {
    let (alice, _) = server.signed_up("alice").await;
    let (bob, token) = server.signed_up("bob").await;
    bob.close().await;
    (alice, token)
}

fn id(n: u8) -> MessageId {
    MessageId([n; 16])
}

fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_an_online_recipient_and_is_deleted_once_acknowledged() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, _) = server.signed_up("bob").await;

    let outcome = alice
        .send_message("bob", "text", id(1), b"sealed bytes")
        .await
        .unwrap();
    assert_eq!(outcome, SendOutcome::Stored);
    let got = bob.next_delivery(WAIT).await.expect("delivered");
    assert_eq!(
        (got.from.as_str(), got.kind.as_str(), got.id),
        ("alice", "text", id(1))
    );
    assert_eq!(got.body, b"sealed bytes");
    assert_eq!(bob.ack(vec![got.seq]).await.unwrap(), 1);
    assert_eq!(bob.ack(vec![got.seq]).await.unwrap(), 0, "already deleted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_ack_deletes_without_a_reply_and_its_failure_is_reported() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, token) = server.signed_up("bob").await;
    for n in 1..=3 {
        alice
            .send_message("bob", "text", id(n), b"quiet")
            .await
            .unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        seqs.push(bob.next_delivery(WAIT).await.expect("delivered").seq);
    }
    bob.ack_quietly(seqs[..2].to_vec()).await.unwrap();
    // Requests are processed in order: the ping's reply means the quiet ack was processed.
    bob.ping().await.unwrap();
    assert!(bob.take_unclaimed_error().is_none());
    // Only the unacknowledged third message comes again on a new connection.
    bob.close().await;
    let bob = server.resumed(token.clone()).await;
    let again = bob.next_delivery(WAIT).await.expect("redelivered");
    assert_eq!((again.id, again.seq), (id(3), seqs[2]));
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    // A quiet ack that fails is still answered, and the client reports it.
    bob.ack_quietly((0..5_000).collect()).await.unwrap();
    bob.ping().await.unwrap();
    assert_eq!(
        code_of(bob.take_unclaimed_error().map_or(Ok(()), Err)),
        ErrorCode::BadRequest
    );
    assert!(bob.take_unclaimed_error().is_none(), "taken once");
    assert_eq!(bob.ack(vec![again.seq]).await.unwrap(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_recipient_gets_everything_in_order_at_login() {
    let server = TestServer::start().await;
    let (alice, bob_token) = alice_and_offline_bob(&server).await;
    for n in 1..=5 {
        alice
            .send_message("bob", "text", id(n), &[n])
            .await
            .unwrap();
    }
    let bob = server.resumed(bob_token).await;
    let mut seqs = Vec::new();
    for n in 1..=5 {
        let got = bob.next_delivery(WAIT).await.expect("delivered");
        assert_eq!(got.body, vec![n]);
        seqs.push(got.seq);
    }
    assert!(
        bob.next_delivery(Duration::from_millis(200))
            .await
            .is_none()
    );
    assert_eq!(bob.ack(seqs).await.unwrap(), 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_message_comes_again_after_reconnecting() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, token) = server.signed_up("bob").await;
    alice
        .send_message("bob", "text", id(7), b"once")
        .await
        .unwrap();
    let first = bob.next_delivery(WAIT).await.unwrap();
    // Bob's client dies before acknowledging.
    drop(bob);
    let bob = server.resumed(token).await;
    let again = bob.next_delivery(WAIT).await.unwrap();
    assert_eq!(
        (again.id, again.seq, again.body.clone()),
        (first.id, first.seq, first.body)
    );
    bob.ack(vec![again.seq]).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_id_is_acknowledged_again_but_stored_once() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, _) = server.signed_up("bob").await;
    assert_eq!(
        alice
            .send_message("bob", "text", id(9), b"x")
            .await
            .unwrap(),
        SendOutcome::Stored
    );
    assert_eq!(
        alice
            .send_message("bob", "text", id(9), b"x")
            .await
            .unwrap(),
        SendOutcome::Duplicate
    );
    let got = bob.next_delivery(WAIT).await.unwrap();
    bob.ack(vec![got.seq]).await.unwrap();
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsend_deletes_only_what_was_not_delivered() {
    let server = TestServer::start().await;
    let (alice, token) = alice_and_offline_bob(&server).await;
    alice
        .send_message("bob", "text", id(1), b"oops")
        .await
        .unwrap();
    alice
        .send_message("bob", "text", id(2), b"keep")
        .await
        .unwrap();
    assert!(alice.unsend(id(1)).await.unwrap());
    assert!(!alice.unsend(id(1)).await.unwrap(), "already gone");
    assert!(!alice.unsend(id(3)).await.unwrap(), "never sent");

    let bob = server.resumed(token).await;
    let got = bob.next_delivery(WAIT).await.unwrap();
    assert_eq!(got.body, b"keep");
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    // Delivered (even before the ack): too late to unsend.
    assert!(!alice.unsend(id(2)).await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbox_refuses_with_a_typed_error() {
    let server = TestServer::start_with(|c| c.max_pending = 3).await;
    let (alice, token) = alice_and_offline_bob(&server).await;
    for n in 1..=3 {
        alice
            .send_message("bob", "text", id(n), b"x")
            .await
            .unwrap();
    }
    assert_eq!(
        code_of(alice.send_message("bob", "text", id(4), b"x").await),
        ErrorCode::InboxFull
    );
    // Acknowledging makes room again.
    let bob = server.resumed(token).await;
    let got = bob.next_delivery(WAIT).await.unwrap();
    bob.ack(vec![got.seq]).await.unwrap();
    alice
        .send_message("bob", "text", id(4), b"x")
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_not_delivered() {
    let server = TestServer::start_with(|c| c.message_ttl = Duration::from_secs(1)).await;
    let (alice, token) = alice_and_offline_bob(&server).await;
    alice
        .send_message("bob", "text", id(1), b"stale")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    alice
        .send_message("bob", "text", id(2), b"fresh")
        .await
        .unwrap();
    let bob = server.resumed(token).await;
    let got = bob.next_delivery(WAIT).await.unwrap();
    assert_eq!(got.body, b"fresh");
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sends_get_typed_errors() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 1000).await;
    let (alice, _) = server.signed_up("alice").await;
    server.signed_up("bob").await;
    assert_eq!(
        code_of(alice.send_message("nobody", "text", id(1), b"x").await),
        ErrorCode::UnknownUser
    );
    let big = vec![0u8; 1001];
    assert_eq!(
        code_of(alice.send_message("bob", "text", id(2), &big).await),
        ErrorCode::MessageTooLarge
    );
    assert_eq!(
        code_of(alice.send_message("bob", "", id(3), b"x").await),
        ErrorCode::BadRequest
    );
    let anonymous = server.client().await;
    assert_eq!(
        code_of(anonymous.send_message("bob", "text", id(4), b"x").await),
        ErrorCode::NotAuthenticated
    );
    alice.ping().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_shown_only_to_those_written_to() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, _) = server.signed_up("bob").await;
    assert_eq!(code_of(bob.online("alice").await), ErrorCode::NotAllowed);
    alice
        .send_message("bob", "text", id(1), b"hi")
        .await
        .unwrap();
    assert!(bob.online("alice").await.unwrap());
    assert_eq!(
        code_of(alice.online("bob").await),
        ErrorCode::NotAllowed,
        "bob never wrote"
    );
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!bob.online("alice").await.unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_arrive_complete_and_in_order() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, _) = server.signed_up("bob").await;
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 1000 {
            let Some(message) = bob.next_delivery(Duration::from_secs(20)).await else {
                break;
            };
            bob.ack(vec![message.seq]).await.unwrap();
            got.push(u32::from_be_bytes(message.body[..4].try_into().unwrap()));
        }
        got
    });
    for n in 0u32..1000 {
        let mut message_id = [0u8; 16];
        message_id[..4].copy_from_slice(&n.to_be_bytes());
        alice
            .send_message("bob", "text", MessageId(message_id), &n.to_be_bytes())
            .await
            .unwrap();
    }
    let got = receiver.await.unwrap();
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_that_changes_address_keeps_receiving() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, _) = server.signed_up("bob").await;
    alice
        .send_message("bob", "text", id(1), b"before")
        .await
        .unwrap();
    assert_eq!(bob.next_delivery(WAIT).await.unwrap().body, b"before");
    let old = bob.local_addr().unwrap();
    bob.rebind().unwrap();
    assert_ne!(bob.local_addr().unwrap().port(), old.port());
    alice
        .send_message("bob", "text", id(2), b"after")
        .await
        .unwrap();
    let got = bob
        .next_delivery(WAIT)
        .await
        .expect("delivered after migration");
    assert_eq!(got.body, b"after");
    assert_eq!(bob.whoami().await.unwrap().username, "bob");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_receives_what_it_missed() {
    let server = TestServer::start().await;
    let (alice, token) = alice_and_offline_bob(&server).await;
    alice
        .send_message("bob", "text", id(1), b"missed")
        .await
        .unwrap();
    let bob = server.resumed(token).await;
    assert_eq!(bob.next_delivery(WAIT).await.unwrap().body, b"missed");
    server.stop().await;
}

/// Seqs are not contiguous from a new connection's point of view: after everything was
/// acknowledged, a reconnected recipient's next message has a seq far above 1, and (delivered
/// while its batch syncs) it may reach the mailbox before the store has it. It must still
/// arrive at once, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_message_after_everything_was_acknowledged_and_a_reconnect_arrives() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    let (bob, token) = server.signed_up("bob").await;
    for n in 1..=3u8 {
        alice
            .send_message("bob", "text", id(n), b"x")
            .await
            .unwrap();
        let got = bob.next_delivery(WAIT).await.expect("delivered");
        bob.ack(vec![got.seq]).await.unwrap();
    }
    bob.close().await;
    for round in 0..5u8 {
        let bob = server.client().await;
        bob.resume(token.clone()).await.unwrap();
        // Let the new deliverer read the (empty) inbox first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = 10 + round;
        alice
            .send_message("bob", "text", id(n), b"y")
            .await
            .unwrap();
        let got = bob.next_delivery(WAIT).await.expect("delivered");
        assert_eq!(got.id, id(n), "round {round}");
        bob.ack(vec![got.seq]).await.unwrap();
        bob.close().await;
    }
    server.stop().await;
}

/// Clients made from options with a shared endpoint use one UDP socket; they work side by
/// side, and closing one (promptly: it does not wait for the endpoint to go idle) leaves the
/// others working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_can_share_one_endpoint() {
    let server = TestServer::start().await;
    let shared = server.options().share_endpoint(false).await.unwrap();
    let (_, alice_token) = server.signed_up("alice").await;
    let (_, bob_token) = server.signed_up("bob").await;
    let (_, carol_token) = server.signed_up("carol").await;
    let mut clients = Vec::new();
    for token in [alice_token, bob_token, carol_token] {
        let client = Client::connect(&shared).await.unwrap();
        client.resume(token).await.unwrap();
        clients.push(client);
    }
    let port = clients[0].local_addr().unwrap().port();
    assert!(
        clients
            .iter()
            .all(|c| c.local_addr().unwrap().port() == port)
    );
    let carol = clients.pop().unwrap();
    let bob = clients.pop().unwrap();
    let alice = clients.pop().unwrap();
    let started = std::time::Instant::now();
    carol.close().await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "closing one client waited {:?}",
        started.elapsed()
    );
    alice
        .send_message("bob", "text", id(1), b"over a shared socket")
        .await
        .unwrap();
    assert_eq!(
        bob.next_delivery(WAIT).await.unwrap().body,
        b"over a shared socket"
    );
    assert_eq!(alice.whoami().await.unwrap().username, "alice");
    server.stop().await;
}

/// A connection allows the server no message streams until it asks for delivery (so a
/// connection that never takes deliveries does not pay for quinn's per-stream map), and then
/// takes a backlog larger than the old limit of 128 streams whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_streams_are_allowed_only_once_a_connection_asks_for_delivery() {
    let server = TestServer::start().await;
    let (alice, token) = alice_and_offline_bob(&server).await;
    const BACKLOG: u16 = 300;
    for n in 0..BACKLOG {
        let mut bytes = [0u8; 16];
        bytes[..2].copy_from_slice(&n.to_be_bytes());
        let outcome = alice
            .send_message("bob", "text", MessageId(bytes), &n.to_be_bytes())
            .await
            .unwrap();
        assert_eq!(outcome, SendOutcome::Stored);
    }
    let granted = |client: &Client| client.connection().stats().frame_tx.max_streams_uni;

    // Connected (hello) and resumed without delivery: no MAX_STREAMS sent, nothing pushed.
    let watcher = server.client().await;
    assert_eq!(granted(&watcher), 0);
    watcher.resume_with(token.clone(), false).await.unwrap();
    assert_eq!(watcher.whoami().await.unwrap().username, "bob");
    assert!(
        watcher
            .next_delivery(Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(granted(&watcher), 0);

    // Resumed with delivery: the limit is raised with the request, and the whole backlog
    // arrives, in order.
    let bob = server.client().await;
    bob.resume(token).await.unwrap();
    assert!(
        granted(&bob) >= 1,
        "{:?}",
        bob.connection().stats().frame_tx
    );
    let mut seqs = Vec::new();
    for n in 0..BACKLOG {
        let message = bob.next_delivery(WAIT).await.expect("a delivery");
        assert_eq!(message.body, n.to_be_bytes(), "message {n}");
        seqs.push(message.seq);
    }
    assert_eq!(bob.ack(seqs).await.unwrap(), u64::from(BACKLOG));
    server.stop().await;
}
