//! Deleting an account: the password is checked again (throttled like logins); the account's
//! login, keys, sessions, inbox and open delivering connection go; its name is held so nobody
//! can take it over; `sfc delete-account` through the binary.

mod common;

use std::time::Duration;

use common::cli::{People, run, stdout};
use common::{PASSWORD, TestServer};
use securefastchat::client::ClientError;
use securefastchat::protocol::{ErrorCode, MessageId, Password};

fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_delete_account_removes_the_login_the_keys_the_inbox_and_the_connection() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    // A message waits for alice.
    let out = run(people.sfc("bob", &["send", "alice", "hello"])).await;
    assert!(out.status.success(), "{out:?}");
    // alice's phone is online (it has delivery).
    let (carol, _) = server.signed_up("carol").await;
    let phone = server.client().await;
    phone.login("alice", Password::new(PASSWORD)).await.unwrap();

    let out = run(people.sfc("alice", &["delete-account"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "deleted account alice\n");

    // The open connection is closed, and its session is gone.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match phone.whoami().await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the phone's connection is closed");
    assert!(
        matches!(&closed, ClientError::Closed { code, .. } if code == "account deleted"),
        "{closed:?}"
    );
    // No login, no bundle, no messages for it.
    let again = server.client().await;
    assert_eq!(
        code_of(again.login("alice", Password::new(PASSWORD)).await),
        ErrorCode::InvalidCredentials
    );
    let fetched = code_of(carol.fetch_bundle("alice").await);
    assert!(
        matches!(fetched, ErrorCode::UnknownUser | ErrorCode::NoKeys),
        "{fetched:?}"
    );
    assert_eq!(
        code_of(
            carol
                .send_message("alice", "text", MessageId([9; 16]), b"x")
                .await
        ),
        ErrorCode::UnknownUser
    );
    // The home no longer claims to be alice's: it may sign up someone else.
    let out = run(people.sfc("alice", &["whoami"])).await;
    assert!(!out.status.success(), "{out:?}");
    let out = run(people.sfc("alice", &["signup", "alice2"])).await;
    assert!(out.status.success(), "{out:?}");

    // The message that waited for alice is gone from the store.
    drop((carol, again, phone));
    let dir = server.stop().await;
    let db = fjall::Database::builder(dir.path().join("data"))
        .open()
        .unwrap();
    let inbox = db
        .keyspace("inbox_v2", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    assert_eq!(inbox.iter().count(), 0, "no message is left in any inbox");
    let keys = db
        .keyspace("keys", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    assert!(keys.get("alice").unwrap().is_none());
    // bob's send record of that message is settled: it no longer names alice.
    let sent = db
        .keyspace("sent_v2", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    assert_eq!(
        sent.iter().count(),
        1,
        "bob's send record is kept until it expires"
    );
    for entry in sent.iter() {
        let value = entry.value().unwrap();
        assert!(
            !value.windows(5).any(|w| w == b"alice"),
            "a send record still names the deleted account"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_name_cannot_be_signed_up_during_its_hold() {
    let server = TestServer::start().await;
    let (alice, _) = server.signed_up("alice").await;
    assert_eq!(
        alice.delete_account(Password::new(PASSWORD)).await.unwrap(),
        "alice"
    );
    // The connection is unauthenticated now.
    assert_eq!(code_of(alice.whoami().await), ErrorCode::NotAuthenticated);
    let other = server.client().await;
    let (_, available) = other.check_username("alice").await.unwrap();
    assert!(!available);
    assert_eq!(
        code_of(
            other
                .signup("alice", Password::new("another password"))
                .await
        ),
        ErrorCode::UsernameTaken
    );
    // Held across a restart too.
    drop((alice, other));
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let other = server.client().await;
    assert_eq!(
        code_of(
            other
                .signup("alice", Password::new("another password"))
                .await
        ),
        ErrorCode::UsernameTaken
    );
    server.stop().await;

    // Once the hold is over, the name is free again (a new account, with nothing of the old).
    let server = TestServer::start_with(|c| c.name_hold = Duration::ZERO).await;
    let (alice, _) = server.signed_up("alice").await;
    alice.delete_account(Password::new(PASSWORD)).await.unwrap();
    let (again, _) = server.signed_up("alice").await;
    assert_eq!(
        code_of(again.fetch_identity("alice").await),
        ErrorCode::NoKeys
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_refuses_deletion_and_guesses_are_throttled() {
    let server = TestServer::start_with(|c| c.failed_logins_per_minute = 2).await;
    let (alice, token) = server.signed_up("alice").await;
    for _ in 0..2 {
        assert_eq!(
            code_of(
                alice
                    .delete_account(Password::new("not the password"))
                    .await
            ),
            ErrorCode::InvalidCredentials
        );
    }
    assert_eq!(
        code_of(alice.delete_account(Password::new(PASSWORD)).await),
        ErrorCode::RateLimited
    );
    // Nothing was deleted: the session still works, also on a new connection.
    assert_eq!(alice.whoami().await.unwrap().username, "alice");
    let again = server.client().await;
    again.resume_with(token, false).await.unwrap();
    server.stop().await;
}
