//! End-to-end encrypted messaging through a real server with the client's `Messenger`: the
//! server stores only ciphertext, each message is shown once, tampering and identity changes
//! are reported.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{PASSWORD, TestServer};
use securefastchat::client::messenger::{Messenger, Received};
use securefastchat::protocol::{MessageId, Password};

const WAIT: Duration = Duration::from_secs(5);

async fn messenger(server: &TestServer, home: &Path, name: &str, signup: bool) -> Messenger {
    server.messenger(home, name, signup).await
}

fn text_of(received: Option<Received>) -> (String, String, Option<String>) {
    match received {
        Some(Received::Text {
            from,
            text,
            warning,
            ..
        }) => (from, text, warning),
        other => panic!("expected a text, got {other:?}"),
    }
}

/// The texts of every message that arrives until a second passes without one, each shown.
async fn drain(m: &Messenger) -> Vec<String> {
    let mut texts = Vec::new();
    while let Some(received) = m.receive(Duration::from_secs(1)).await.unwrap() {
        if let Received::Text { text, .. } = &received {
            texts.push(text.clone());
        }
        m.shown(&received).await.unwrap();
    }
    texts
}

/// The next message, shown (and so acknowledged).
async fn show(m: &Messenger, wait: Duration) -> Received {
    let received = m.receive(wait).await.unwrap().expect("a message");
    m.shown(&received).await.unwrap();
    received
}

fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|entry| {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_contain(&path, needle)
        } else {
            let bytes = std::fs::read(&path).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_in_both_directions_leaves_no_plaintext_on_the_server() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    bob.close().await;

    // Hex digits resist compression: if the text were stored, these bytes would be on disk.
    let secret = "7f3a9c1e5b2d8f4a6c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a";
    alice.send_text("bob", secret).await.unwrap();
    server_flush_and_check(&server, secret.as_bytes());

    let bob = messenger(&server, &homes.path().join("b"), "bob", false).await;
    assert_eq!(
        text_of(bob.receive(WAIT).await.unwrap()),
        ("alice".into(), secret.into(), None)
    );
    bob.send_text("alice", "and back").await.unwrap();
    assert_eq!(text_of(alice.receive(WAIT).await.unwrap()).1, "and back");
    for n in 0..5 {
        alice.send_text("bob", &format!("turn {n}")).await.unwrap();
        assert_eq!(
            text_of(bob.receive(WAIT).await.unwrap()).1,
            format!("turn {n}")
        );
        bob.send_text("alice", &format!("reply {n}")).await.unwrap();
        assert_eq!(
            text_of(alice.receive(WAIT).await.unwrap()).1,
            format!("reply {n}")
        );
    }
    assert_eq!(
        alice.fingerprint("bob").await.unwrap().number,
        bob.fingerprint("alice").await.unwrap().number
    );
    server.stop().await;
}

fn server_flush_and_check(server: &TestServer, needle: &[u8]) {
    assert!(
        !files_contain(&server.dir.path().join("data"), needle),
        "plaintext found in the server's data directory"
    );
}

/// Bob's client opens a message (its ratchet key is gone) and dies before showing it. The
/// message is not lost: the next start shows it, once, and the server's redelivery is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_opened_but_not_shown_before_a_crash_is_shown_at_the_next_start_once() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    alice.send_text("bob", "exactly once").await.unwrap();

    let delivered = bob.client().next_delivery(WAIT).await.unwrap();
    let opened = bob.open_delivered(delivered).await.unwrap();
    assert_eq!(text_of(Some(opened)).1, "exactly once");
    drop(bob); // crash: opened and kept, never shown, never acknowledged

    let bob = messenger(&server, &homes.path().join("b"), "bob", false).await;
    let kept = bob.receive(WAIT).await.unwrap();
    assert_eq!(text_of(kept.clone()).1, "exactly once");
    assert!(
        matches!(kept, Some(Received::Text { seq: None, .. })),
        "{kept:?}"
    );
    bob.shown(&kept.unwrap()).await.unwrap();
    assert_eq!(bob.receive(WAIT).await.unwrap(), Some(Received::Duplicate));
    assert!(
        bob.client()
            .next_delivery(Duration::from_millis(300))
            .await
            .is_none(),
        "acked now"
    );
    drop(bob);
    let bob = messenger(&server, &homes.path().join("b"), "bob", false).await;
    assert_eq!(bob.receive(Duration::from_millis(500)).await.unwrap(), None);
    server.stop().await;
}

/// A message is acknowledged only once the application says it has shown it: a client that
/// dies after `receive` and before `shown` gets it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_before_it_is_shown() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    for n in 0..3 {
        alice.send_text("bob", &format!("m{n}")).await.unwrap();
    }
    let first = bob.receive(WAIT).await.unwrap().unwrap();
    bob.shown(&first).await.unwrap();
    let second = bob.receive(WAIT).await.unwrap();
    assert_eq!(text_of(second).1, "m1");
    bob.close().await; // killed before showing m1

    let bob = messenger(&server, &homes.path().join("b"), "bob", false).await;
    let texts = drain(&bob).await;
    assert_eq!(texts, ["m1", "m2"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_envelopes_are_reported_and_the_session_goes_on() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    alice.send_text("bob", "genuine").await.unwrap();
    assert_eq!(text_of(bob.receive(WAIT).await.unwrap()).1, "genuine");

    // Alice's client (or anyone with her session token) sends bytes that are no valid envelope.
    alice
        .client()
        .send_message("bob", "text", MessageId([1; 16]), b"\x81\xa1x\x01")
        .await
        .unwrap();
    assert!(matches!(
        bob.receive(WAIT).await.unwrap(),
        Some(Received::Undecryptable { .. })
    ));
    alice.send_text("bob", "still fine").await.unwrap();
    assert_eq!(text_of(bob.receive(WAIT).await.unwrap()).1, "still fine");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_identity_key_is_warned_about() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    bob.send_text("alice", "hello from my phone").await.unwrap();
    assert_eq!(text_of(alice.receive(WAIT).await.unwrap()).2, None);
    let before = alice.fingerprint("bob").await.unwrap();
    bob.close().await;

    // Bob reinstalls: a new home directory. Its keys are refused unless he replaces the
    // account's identity on purpose.
    let client = server.client().await;
    client.login("bob", Password::new(PASSWORD)).await.unwrap();
    let b2 = homes.path().join("b2");
    let refused = Messenger::new(client, &b2, "bob").unwrap();
    let e = refused.ensure_keys().await.unwrap_err();
    assert!(e.to_string().contains("--new-identity"), "{e}");
    refused.close().await;
    let client = server.client().await;
    client.login("bob", Password::new(PASSWORD)).await.unwrap();
    let bob = Messenger::new(client, &b2, "bob").unwrap();
    let replaced = securefastchat::client::link::replace_identity(
        &bob.client(),
        bob.keystore(),
        &securefastchat::protocol::Username::parse("bob").unwrap(),
        1,
        Password::new(PASSWORD),
    )
    .await
    .unwrap();
    assert!(replaced.is_empty(), "bob had one device: {replaced:?}");

    bob.send_text("alice", "new phone").await.unwrap();
    let (from, text, warning) = text_of(alice.receive(WAIT).await.unwrap());
    assert_eq!((from.as_str(), text.as_str()), ("bob", "new phone"));
    assert!(warning.unwrap().contains("identity key has changed"));
    // The number stays the accepted key's; the new key is reported beside it.
    let after = alice.fingerprint("bob").await.unwrap();
    assert_eq!(after.number, before.number);
    let new = after.changed_to.clone().expect("the change is reported");
    assert_ne!(new, before.number);
    // Until alice accepts it, every message and send carries the warning.
    let (_, warning) = alice.send_text("bob", "is that you?").await.unwrap();
    assert!(warning.is_some());
    assert_eq!(alice.trust("bob").await.unwrap(), Some(new.clone()));
    let accepted = alice.fingerprint("bob").await.unwrap();
    assert_eq!((accepted.number, accepted.changed_to), (new, None));
    let (_, warning) = alice.send_text("bob", "ok").await.unwrap();
    assert_eq!(warning, None);
    server.stop().await;
}

/// Bob's keystore goes back in time (restored from a backup): alice's next message cannot be
/// opened. Bob's client keeps it in the quarantine and asks alice's client to send it again,
/// which seals it in a new session: bob reads it, and the conversation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_opened_is_quarantined_and_sent_again() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let bob_home = homes.path().join("b");
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &bob_home, "bob", true).await;
    alice.send_text("bob", "one").await.unwrap();
    show(&bob, WAIT).await;
    let keystore = bob_home.join("keystore.msgpack");
    let backup = std::fs::read(&keystore).unwrap();
    // Two turns each way: the ratchet moves on to keys the backup does not hold.
    bob.send_text("alice", "two").await.unwrap();
    show(&alice, WAIT).await;
    alice.send_text("bob", "two and a half").await.unwrap();
    show(&bob, WAIT).await;
    bob.send_text("alice", "two and three quarters")
        .await
        .unwrap();
    show(&alice, WAIT).await;
    let (lost, _) = alice.send_text("bob", "three").await.unwrap();
    std::fs::write(&keystore, backup).unwrap();

    let received = show(&bob, WAIT).await;
    let Received::Undecryptable { id, from, .. } = &received else {
        panic!("expected an undecryptable message, got {received:?}");
    };
    assert_eq!((*id, from.as_str()), (lost, "alice"));
    let quarantined = bob.offline().quarantined().await.unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].id, lost);

    // Alice's client gets the request and seals "three" again in a new session.
    let retry = alice.receive(WAIT).await.unwrap().unwrap();
    let Received::RetryRequested {
        id,
        resent_as: Some(new_id),
        ..
    } = retry
    else {
        panic!("expected a retry request answered, got {retry:?}");
    };
    assert_eq!(id, lost);
    let again = show(&bob, WAIT).await;
    assert_eq!(text_of(Some(again.clone())).1, "three");
    assert!(matches!(again, Received::Text { id, .. } if id == new_id));

    // A second request for the same message is not answered twice.
    bob.client()
        .send_message(
            "alice",
            securefastchat::client::RETRY,
            MessageId([9; 16]),
            &lost.0,
        )
        .await
        .unwrap();
    assert!(matches!(
        alice.receive(WAIT).await.unwrap(),
        Some(Received::RetryRequested {
            resent_as: None,
            ..
        })
    ));
    alice.send_text("bob", "four").await.unwrap();
    assert_eq!(text_of(bob.receive(WAIT).await.unwrap()).1, "four");
    bob.send_text("alice", "five").await.unwrap();
    assert_eq!(text_of(alice.receive(WAIT).await.unwrap()).1, "five");
    server.stop().await;
}

/// The acknowledgement fails (the server went down between the message being shown and the
/// ack): the server delivers the message again after the restart, and the client drops it as
/// shown, acknowledges it, and shows the next message. Nothing lost, nothing shown twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_acknowledgement_neither_loses_nor_repeats_a_message() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    alice.send_text("bob", "first").await.unwrap();
    alice.send_text("bob", "second").await.unwrap();
    alice.close().await;
    let first = bob.receive(WAIT).await.unwrap().unwrap();
    assert_eq!(text_of(Some(first.clone())).1, "first");
    let addr = server.addr;
    let dir = server.stop().await;
    assert!(
        bob.shown(&first).await.is_err(),
        "the ack cannot reach the server"
    );
    bob.close().await;

    let server = TestServer::start_at(addr, dir, |_| {}).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", false).await;
    let texts = drain(&bob).await;
    assert_eq!(texts, ["second"]);
    server.stop().await;
}

/// A retry request that arrives when the peer's keys cannot be fetched (the server went
/// down) is not lost: it stays unacknowledged, comes again after the restart, and the message
/// is then sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_request_that_cannot_be_answered_now_is_answered_later() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = messenger(&server, &homes.path().join("a"), "alice", true).await;
    let bob = messenger(&server, &homes.path().join("b"), "bob", true).await;
    let (id, _) = alice.send_text("bob", "please resend").await.unwrap();
    show(&bob, WAIT).await;
    // Bob's client says it could not open it.
    bob.client()
        .send_message(
            "alice",
            securefastchat::client::RETRY,
            MessageId([5; 16]),
            &id.0,
        )
        .await
        .unwrap();
    let request = alice.client().next_delivery(WAIT).await.unwrap();
    let addr = server.addr;
    let dir = server.stop().await;
    let failed = alice.open_delivered(request).await;
    assert!(failed.is_err(), "{failed:?}");
    alice.close().await;
    bob.close().await;

    let server = TestServer::start_at(addr, dir, |_| {}).await;
    let alice = messenger(&server, &homes.path().join("a"), "alice", false).await;
    let answered = alice.receive(WAIT).await.unwrap();
    assert!(
        matches!(
            answered,
            Some(Received::RetryRequested {
                resent_as: Some(_),
                ..
            })
        ),
        "{answered:?}"
    );
    let bob = messenger(&server, &homes.path().join("b"), "bob", false).await;
    assert_eq!(drain(&bob).await, ["please resend"]);
    server.stop().await;
}
