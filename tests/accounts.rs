//! Accounts against a real server: signup, login, resume, logout, expiry, restarts.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PASSWORD, TestServer};
use securefastchat::client::ClientError;
use securefastchat::protocol::{CloseCode, ErrorCode, Password, SessionToken};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

fn server_error(result: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Server { code, message }) => (code, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_then_login() {
    let server = TestServer::start().await;
    let client = server.client().await;
    assert_eq!(
        client.check_username("Alice").await.unwrap(),
        ("alice".into(), true)
    );
    let (session, _token) = client
        .signup("Alice", Password::new(PASSWORD))
        .await
        .unwrap();
    assert_eq!(session.username, "alice");
    assert_eq!(client.whoami().await.unwrap().username, "alice");
    client.close().await;

    let again = server.client().await;
    let (session, _) = again.login("ALICE", Password::new(PASSWORD)).await.unwrap();
    assert_eq!(session.username, "alice");
    assert!(session.expires_at > securefastchat::unix_now());
    assert_eq!(again.whoami().await.unwrap().username, "alice");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_name_is_reported_at_both_steps() {
    let server = TestServer::start().await;
    server.signed_up("bob").await;
    let client = server.client().await;
    assert_eq!(
        client.check_username("BOB").await.unwrap(),
        ("bob".into(), false)
    );
    let (code, _) = server_error(
        client
            .signup("Bob", Password::new("another password"))
            .await,
    );
    assert_eq!(code, ErrorCode::UsernameTaken);
    // The original password still works: the failed signup changed nothing.
    client.login("bob", Password::new(PASSWORD)).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_racing_signups_exactly_one_wins() {
    // All racers share one address here: lift the per-address cap on password work in
    // flight, which would otherwise refuse all but two of them before the race (the cap has
    // its own test in tests/password_floods.rs).
    let server = TestServer::start_with(|c| c.password_work_per_address = 0).await;
    let racers = 8;
    let barrier = Arc::new(Barrier::new(racers));
    let mut attempts = JoinSet::new();
    for i in 0..racers {
        let (client, barrier) = (server.client().await, Arc::clone(&barrier));
        attempts.spawn(async move {
            barrier.wait().await;
            let password = format!("password number {i}");
            (i, client.signup("carol", Password::new(password)).await)
        });
    }
    let mut winners = Vec::new();
    while let Some(joined) = attempts.join_next().await {
        match joined.unwrap() {
            (i, Ok(_)) => winners.push(i),
            (_, Err(e)) => assert!(e.is_server(ErrorCode::UsernameTaken), "{e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    // The winner's password is the one stored.
    let login = server.client().await;
    let winner_password = format!("password number {}", winners[0]);
    login
        .login("carol", Password::new(winner_password))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_answer_alike() {
    let server = TestServer::start().await;
    server.signed_up("dave").await;
    let client = server.client().await;

    let mut wrong_password = Vec::new();
    let mut unknown_user = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        answers.push(server_error(
            client
                .login("dave", Password::new("not the password"))
                .await,
        ));
        wrong_password.push(start.elapsed());
        let start = Instant::now();
        answers.push(server_error(
            client
                .login("nobody", Password::new("not the password"))
                .await,
        ));
        unknown_user.push(start.elapsed());
    }
    let first = answers[0].clone();
    assert_eq!(first.0, ErrorCode::InvalidCredentials);
    assert!(answers.iter().all(|a| *a == first), "{answers:?}");

    // Both paths run one argon2 verification: medians within a factor of two.
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut wrong_password), median(&mut unknown_user));
    let ratio = a.as_secs_f64() / b.as_secs_f64();
    assert!(
        (0.5..2.0).contains(&ratio),
        "wrong password {a:?} vs unknown user {b:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_resumes_the_session_on_a_new_connection() {
    let server = TestServer::start().await;
    let (first, token) = server.signed_up("erin").await;
    first.close().await;

    let second = server.client().await;
    let (code, _) = server_error(second.whoami().await);
    assert_eq!(code, ErrorCode::NotAuthenticated);
    let session = second.resume(token.clone()).await.unwrap();
    assert_eq!(session.username, "erin");
    assert_eq!(second.whoami().await.unwrap().username, "erin");
    let (code, _) = server_error(second.resume(token).await);
    assert_eq!(code, ErrorCode::AlreadyAuthenticated);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_unknown_tokens_are_refused() {
    let server = TestServer::start().await;
    let (client, token) = server.signed_up("frank").await;
    client.logout().await.unwrap();
    let (code, _) = server_error(client.whoami().await);
    assert_eq!(code, ErrorCode::NotAuthenticated);

    let other = server.client().await;
    let (code, _) = server_error(other.resume(token).await);
    assert_eq!(code, ErrorCode::InvalidToken);
    let (code, _) = server_error(other.resume(SessionToken::from_bytes([0; 32])).await);
    assert_eq!(code, ErrorCode::InvalidToken);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_login_takes_over_and_the_older_connection_is_told_why() {
    let server = TestServer::start().await;
    let (first, token) = server.signed_up("fiona").await;
    let second = server.client().await;
    second.resume(token.clone()).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), first.connection().closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code.into_inner(),
                u64::from(CloseCode::Replaced.code())
            );
            assert!(String::from_utf8_lossy(&close.reason).contains("another connection"));
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    assert_eq!(second.whoami().await.unwrap().username, "fiona");
    // A logout revokes the token: it cannot be resumed anywhere afterwards.
    second.logout().await.unwrap();
    let third = server.client().await;
    assert_eq!(
        server_error(third.resume(token).await).0,
        ErrorCode::InvalidToken
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refused() {
    let server = TestServer::start_with(|c| c.session_ttl = Duration::from_secs(1)).await;
    let (client, token) = server.signed_up("grace").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, _) = server_error(client.whoami().await);
    assert_eq!(code, ErrorCode::NotAuthenticated);
    let other = server.client().await;
    let (code, _) = server_error(other.resume(token).await);
    assert_eq!(code, ErrorCode::InvalidToken);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_needing_a_session_are_refused_before_authentication() {
    let server = TestServer::start().await;
    let client = server.client().await;
    assert_eq!(
        server_error(client.whoami().await).0,
        ErrorCode::NotAuthenticated
    );
    assert_eq!(
        server_error(client.logout().await).0,
        ErrorCode::NotAuthenticated
    );
    client.ping().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_passwords_get_typed_errors() {
    let server = TestServer::start().await;
    let client = server.client().await;
    for bad in ["ab", "has space", "émile", &"x".repeat(33)] {
        assert_eq!(
            server_error(client.check_username(bad).await).0,
            ErrorCode::InvalidUsername
        );
        let result = client.signup(bad, Password::new(PASSWORD)).await;
        assert_eq!(server_error(result).0, ErrorCode::InvalidUsername);
    }
    for weak in ["short", &"p".repeat(1025)] {
        let result = client.signup("heidi", Password::new(weak)).await;
        assert_eq!(server_error(result).0, ErrorCode::WeakPassword);
    }
    // Nothing was created by the refused attempts.
    assert!(client.check_username("heidi").await.unwrap().1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_and_sessions_survive_a_restart() {
    let server = TestServer::start().await;
    let (client, token) = server.signed_up("ivan").await;
    client.close().await;
    let dir = server.stop().await;

    let server = TestServer::start_in(dir, |_| {}).await;
    let client = server.client().await;
    assert_eq!(client.resume(token).await.unwrap().username, "ivan");
    let fresh = server.client().await;
    fresh.login("ivan", Password::new(PASSWORD)).await.unwrap();
    assert!(!fresh.check_username("ivan").await.unwrap().1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_and_signups_are_throttled_per_address() {
    let server = TestServer::start_with(|c| {
        c.failed_logins_per_minute = 3;
        c.signups_per_minute = 2;
    })
    .await;
    let client = server.client().await;
    client
        .signup("kate", Password::new(PASSWORD))
        .await
        .unwrap();
    client.logout().await.unwrap();
    for _ in 0..3 {
        let result = client.login("kate", Password::new("wrong password")).await;
        assert_eq!(server_error(result).0, ErrorCode::InvalidCredentials);
    }
    // Even the right password waits now: the address has used its attempts.
    let (code, message) = server_error(client.login("kate", Password::new(PASSWORD)).await);
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(message.contains("retry in"), "{message}");

    let other = server.client().await;
    other.signup("liam", Password::new(PASSWORD)).await.unwrap();
    let third = server.client().await;
    let (code, _) = server_error(third.signup("mona", Password::new(PASSWORD)).await);
    assert_eq!(code, ErrorCode::RateLimited);
    server.stop().await;
}

/// A logout on one connection ends the session on every other connection that holds the same
/// token at once: control requests and message streams alike, without a restart or a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_ends_the_session_on_every_connection_at_once() {
    let server = TestServer::start().await;
    let (first, token) = server.signed_up("hanna").await;
    server.signed_up("ivo").await;
    let second = server.client().await;
    second.resume_with(token, false).await.unwrap();
    assert_eq!(second.whoami().await.unwrap().username, "hanna");
    first.logout().await.unwrap();
    let (code, _) = server_error(second.whoami().await);
    assert_eq!(code, ErrorCode::NotAuthenticated);
    let id = securefastchat::protocol::MessageId([7; 16]);
    let (code, _) = server_error(second.send_message("ivo", "text", id, b"late").await);
    assert_eq!(code, ErrorCode::NotAuthenticated);
    server.stop().await;
}
