//! Per-sender shares of an inbox and the per-account send rate: one account cannot fill
//! someone's inbox or take the server's throughput, and the limits hold under concurrent
//! sends and across restarts.

mod common;

use std::time::Duration;

use common::TestServer;
use common::cli::{People, assert_fails_with, run, stderr};
use futures_util::future::join_all;
use securefastchat::client::{Client, ClientError};
use securefastchat::protocol::{ErrorCode, MessageId};
use securefastchat::server::ServerConfig;

fn id(sender: u8, n: u16) -> MessageId {
    let mut id = [sender; 16];
    id[..2].copy_from_slice(&n.to_be_bytes());
    MessageId(id)
}

fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn share(messages: u64, bytes: u64) -> impl FnOnce(&mut ServerConfig) {
    move |c| {
        c.max_pending_per_sender = messages;
        c.max_pending_bytes_per_sender = bytes;
    }
}

/// alice and carol online, bob signed up and gone (his inbox fills); bob's token.
async fn senders_and_offline_bob(
    server: &TestServer,
) -> (Client, Client, securefastchat::protocol::SessionToken) {
    let (alice, _) = server.signed_up("alice").await;
    let (carol, _) = server.signed_up("carol").await;
    let (bob, token) = server.signed_up("bob").await;
    bob.close().await;
    (alice, carol, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_over_its_share_is_refused_while_others_still_deliver() {
    let server = TestServer::start_with(share(3, 0)).await;
    let (alice, carol, token) = senders_and_offline_bob(&server).await;
    for n in 0..3 {
        alice
            .send_message("bob", "text", id(1, n), b"x")
            .await
            .unwrap();
    }
    let refused = alice.send_message("bob", "text", id(1, 3), b"x").await;
    let Err(ClientError::Server { code, message }) = refused else {
        panic!("expected sender_quota, got {refused:?}");
    };
    assert_eq!(code, ErrorCode::SenderQuota);
    assert!(
        message.contains("3 messages") && message.contains("bob"),
        "{message}"
    );
    // Another sender is not locked out of bob's inbox.
    carol
        .send_message("bob", "text", id(3, 0), b"x")
        .await
        .unwrap();
    // Once bob reads one of alice's messages, she may send one more.
    let bob = server.resumed(token).await;
    let first = bob.next_delivery(Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.from, "alice");
    bob.ack(vec![first.seq]).await.unwrap();
    alice
        .send_message("bob", "text", id(1, 3), b"x")
        .await
        .unwrap();
    assert_eq!(
        code_of(alice.send_message("bob", "text", id(1, 4), b"x").await),
        ErrorCode::SenderQuota
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_counts_bytes_too() {
    let server = TestServer::start_with(share(0, 100)).await;
    let (alice, carol, _) = senders_and_offline_bob(&server).await;
    alice
        .send_message("bob", "text", id(1, 0), &[7; 60])
        .await
        .unwrap();
    assert_eq!(
        code_of(alice.send_message("bob", "text", id(1, 1), &[7; 41]).await),
        ErrorCode::SenderQuota
    );
    alice
        .send_message("bob", "text", id(1, 2), &[7; 40])
        .await
        .unwrap();
    carol
        .send_message("bob", "text", id(3, 0), &[7; 100])
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_cannot_exceed_the_share() {
    let server = TestServer::start_with(share(5, 0)).await;
    let (alice, alice_token) = server.signed_up("alice").await;
    alice.close().await;
    let (bob, _) = server.signed_up("bob").await;
    bob.close().await;
    // Two connections of alice's (neither taking delivery), 25 messages each, all at once.
    let alice = server.client().await;
    alice.resume_with(alice_token.clone(), false).await.unwrap();
    let other = server.client().await;
    other.resume_with(alice_token, false).await.unwrap();
    let sends = (0..50u16).map(|n| {
        let client = if n % 2 == 0 { &alice } else { &other };
        client.send_message("bob", "text", id(1, n), b"x")
    });
    let results = join_all(sends).await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(ClientError::Server {
                    code: ErrorCode::SenderQuota,
                    ..
                })
            )
        })
        .count();
    assert_eq!((stored, refused), (5, 45), "{results:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_survive_a_restart() {
    let server = TestServer::start_with(share(3, 0)).await;
    let (alice, _, _) = senders_and_offline_bob(&server).await;
    for n in 0..3 {
        alice
            .send_message("bob", "text", id(1, n), b"x")
            .await
            .unwrap();
    }
    alice.close().await;
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, share(3, 0)).await;
    let alice = server.client().await;
    alice
        .login(
            "alice",
            securefastchat::protocol::Password::new(common::PASSWORD),
        )
        .await
        .unwrap();
    assert_eq!(
        code_of(alice.send_message("bob", "text", id(1, 3), b"x").await),
        ErrorCode::SenderQuota
    );
    let carol = server.client().await;
    carol
        .login(
            "carol",
            securefastchat::protocol::Password::new(common::PASSWORD),
        )
        .await
        .unwrap();
    carol
        .send_message("bob", "text", id(3, 0), b"x")
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_sending_too_fast_gets_a_typed_error() {
    let server = TestServer::start_with(|c| c.sends_per_minute = 5).await;
    let (alice, carol, _) = senders_and_offline_bob(&server).await;
    // All at once: the bucket's check and spend cannot be raced past.
    let results =
        join_all((0..12u16).map(|n| alice.send_message("bob", "text", id(1, n), b"x"))).await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(stored, 5, "{results:?}");
    let refused = alice.send_message("bob", "text", id(1, 99), b"x").await;
    let Err(ClientError::Server { code, message }) = refused else {
        panic!("expected send_rate_limited, got {refused:?}");
    };
    assert_eq!(code, ErrorCode::SendRateLimited);
    assert!(message.contains("retry in"), "{message}");
    // Another account has its own bucket.
    carol
        .send_message("bob", "text", id(3, 0), b"x")
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_send_says_the_share_is_used_up() {
    let server = TestServer::start_with(share(1, 0)).await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let out = run(people.sfc("alice", &["send", "bob", "first"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("alice", &["send", "bob", "second"])).await;
    assert_fails_with(&out, "waits in the outbox");
    assert!(stderr(&out).contains("sender_quota"), "{out:?}");
    assert!(stderr(&out).contains("once bob has read some"), "{out:?}");
    server.stop().await;
}
