//! Password work under attack, against a real server: concurrent logins and signups from one
//! address stop at the limit, the per-address in-flight cap, the per-account backoff that does
//! not lock out the owner, the `check_username` limit, and clean requesters served first.
//! Clients connect from chosen loopback addresses (127.0.0.x) to look like different hosts.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PASSWORD, TestServer};
use securefastchat::bench::flood_logins::SourcedClient;
use securefastchat::protocol::{ErrorCode, Reply, Request};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

async fn client_from(server: &TestServer, from: IpAddr) -> SourcedClient {
    SourcedClient::connect(server.addr, &server.ca_file(), from)
        .await
        .unwrap()
}

fn code(reply: &Reply) -> Option<ErrorCode> {
    match reply {
        Reply::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// `n` clients from `from`, connected first, then sending `request(i)` all at once.
async fn at_once(
    server: &TestServer,
    from: IpAddr,
    n: usize,
    request: impl Fn(usize) -> Request,
) -> Vec<Reply> {
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let mut client = client_from(server, from).await;
        let (barrier, request) = (Arc::clone(&barrier), request(i));
        tasks.spawn(async move {
            barrier.wait().await;
            let reply = client.request(request).await.unwrap();
            client.close();
            reply
        });
    }
    let mut replies = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        replies.push(reply.unwrap());
    }
    replies
}

fn count(replies: &[Reply], wanted: Option<ErrorCode>) -> usize {
    replies.iter().filter(|r| code(r) == wanted).count()
}

fn login(username: &str, password: &str) -> Request {
    Request::Login {
        username: username.into(),
        password: securefastchat::protocol::Password::new(password),
        device: None,
    }
}

/// Logs `name` in with the right password from `from`, expects a session, and says how long
/// the login took (request to reply).
async fn logs_in(server: &TestServer, from: IpAddr, name: &str) -> Duration {
    let mut client = client_from(server, from).await;
    let asked = Instant::now();
    let reply = client.request(login(name, PASSWORD)).await.unwrap();
    let took = asked.elapsed();
    assert!(matches!(reply, Reply::Session { .. }), "{reply:?}");
    client.close();
    took
}

/// Before the fix the bucket was checked, argon2 ran, and only then a token was taken: 60
/// parallel wrong-password logins all ran with a limit of 30.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_password_logins_stop_at_the_limit() {
    let server = TestServer::start_with(|c| {
        c.failed_logins_per_minute = 30;
        // Only the token bucket is under test here.
        c.password_work_per_address = 0;
    })
    .await;
    server.signed_up("target").await;
    let replies = at_once(&server, ip(2), 60, |_| login("target", "wrong password")).await;
    let invalid = count(&replies, Some(ErrorCode::InvalidCredentials));
    let limited = count(&replies, Some(ErrorCode::RateLimited));
    assert_eq!(invalid + limited, 60, "{replies:?}");
    assert!((1..=30).contains(&invalid), "{invalid} ran argon2");
    // The owner, from another address, is not affected.
    logs_in(&server, ip(1), "target").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_signups_stop_at_the_limit() {
    let server = TestServer::start_with(|c| {
        c.signups_per_minute = 5;
        c.password_work_per_address = 0;
    })
    .await;
    let replies = at_once(&server, ip(3), 15, |i| Request::Signup {
        username: format!("user{i}"),
        password: securefastchat::protocol::Password::new(PASSWORD),
    })
    .await;
    let created = replies
        .iter()
        .filter(|r| matches!(r, Reply::Session { .. }))
        .count();
    assert_eq!(created, 5, "{replies:?}");
    assert_eq!(count(&replies, Some(ErrorCode::RateLimited)), 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_work_in_flight_is_capped_per_address() {
    let server = TestServer::start_with(|c| {
        c.failed_logins_per_minute = 0;
        c.password_workers = 1;
        c.password_work_per_address = 2;
    })
    .await;
    let replies = at_once(&server, ip(4), 20, |_| login("nobody", "wrong password")).await;
    let limited: Vec<_> = replies
        .iter()
        .filter_map(|r| match r {
            Reply::Error {
                code: ErrorCode::RateLimited,
                message,
            } => Some(message.clone()),
            _ => None,
        })
        .collect();
    // At most two run at once, each ≥ 10 ms of argon2 on one worker: most of twenty
    // simultaneous requests find the cap full.
    assert!(limited.len() >= 10, "{replies:?}");
    assert!(
        limited.iter().all(|m| m.contains("in progress")),
        "{limited:?}"
    );
    // Another address is not held back by this one's cap.
    let mut other = client_from(&server, ip(5)).await;
    let reply = other
        .request(login("nobody", "wrong password"))
        .await
        .unwrap();
    assert_eq!(code(&reply), Some(ErrorCode::InvalidCredentials));
    server.stop().await;
}

/// An attacker guessing one account from one address is slowed down by the account's backoff,
/// while the owner, from an address with a clean record, still logs in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_backoff_slows_guessing_but_does_not_lock_out_the_owner() {
    let server = TestServer::start_with(|c| {
        // No per-address limit: the account's backoff alone is under test.
        c.failed_logins_per_minute = 0;
    })
    .await;
    server.signed_up("owner").await;
    let mut attacker = client_from(&server, ip(6)).await;
    let mut replies = Vec::new();
    for _ in 0..12 {
        replies.push(attacker.request(login("owner", "guess")).await.unwrap());
    }
    let limited = replies
        .iter()
        .position(|r| code(r) == Some(ErrorCode::RateLimited))
        .unwrap_or_else(|| panic!("never slowed down: {replies:?}"));
    assert!(limited >= 5, "the first failures are free: {replies:?}");
    let Reply::Error { message, .. } = &replies[limited] else {
        unreachable!()
    };
    assert!(message.contains("this account"), "{message}");
    // The owner logs in at once from a clean address, with the account under attack.
    assert!(logs_in(&server, ip(1), "owner").await < Duration::from_secs(2));
    // A name that does not exist backs off the same way (the backoff says nothing of which
    // names exist).
    for _ in 0..12 {
        attacker.request(login("ghost", "guess")).await.unwrap();
    }
    let reply = attacker.request(login("ghost", "guess")).await.unwrap();
    assert_eq!(code(&reply), Some(ErrorCode::RateLimited), "{reply:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_username_is_rate_limited_per_address() {
    let server = TestServer::start_with(|c| c.username_checks_per_minute = 5).await;
    let mut prober = client_from(&server, ip(7)).await;
    let check = |i: usize| Request::CheckUsername {
        username: format!("name{i}"),
    };
    for i in 0..5 {
        let reply = prober.request(check(i)).await.unwrap();
        assert!(matches!(reply, Reply::UsernameStatus { .. }), "{reply:?}");
    }
    let reply = prober.request(check(5)).await.unwrap();
    assert_eq!(code(&reply), Some(ErrorCode::RateLimited), "{reply:?}");
    // Checks in parallel do not get around it either.
    let replies = at_once(&server, ip(8), 10, check).await;
    assert_eq!(
        count(&replies, Some(ErrorCode::RateLimited)),
        5,
        "{replies:?}"
    );
    // Another address has its own bucket.
    let client = server.client().await;
    assert!(client.check_username("free_name").await.unwrap().1);
    server.stop().await;
}

/// With one argon2 worker kept busy by a flood from one address (its requests queued behind
/// each other), a login from an address with a clean record goes ahead of the queue: it takes
/// a small fraction of what each flood attempt waits. Before, the queue was first come, first
/// served, and the honest login waited behind the whole flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_address_is_served_ahead_of_a_flood() {
    let server = TestServer::start_with(|c| {
        // High enough never to refuse, but tracked: the flood's address is then suspect.
        c.failed_logins_per_minute = 1_000_000;
        c.password_work_per_address = 0;
        c.password_workers = 1;
    })
    .await;
    server.signed_up("honest").await;
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut flood = JoinSet::new();
    for connection in 0..12 {
        let mut client = client_from(&server, ip(9)).await;
        let flooding = Arc::clone(&flooding);
        flood.spawn(async move {
            let mut waits = Vec::new();
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                // A new name each time, so no account backoff ends the flood's argon2 work.
                let name = format!("n{connection}x{}", waits.len());
                let asked = Instant::now();
                let reply = client.request(login(&name, "guess")).await.unwrap();
                assert_eq!(code(&reply), Some(ErrorCode::InvalidCredentials));
                waits.push(asked.elapsed());
            }
            waits
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut honest = Vec::new();
    for _ in 0..3 {
        honest.push(logs_in(&server, ip(1), "honest").await);
    }
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut waits = Vec::new();
    while let Some(w) = flood.join_next().await {
        waits.extend(w.unwrap());
    }
    waits.sort();
    honest.sort();
    let flood_median = waits[waits.len() / 2];
    let honest_median = honest[1];
    assert!(
        honest_median * 3 < flood_median,
        "honest {honest:?}, flood median {flood_median:?} over {} attempts",
        waits.len()
    );
    server.stop().await;
}

/// A connection that keeps asking after being refused gets each refusal later than the one
/// before (0.5 s, 1 s, 2 s, ...), so a flood's request rate falls instead of staying at two
/// requests a second per connection; a new connection starts again at the first delay. Before,
/// every refusal came after 0.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_a_row_come_ever_later() {
    let server = TestServer::start_with(|c| {
        c.failed_logins_per_minute = 1;
        c.password_work_per_address = 0;
    })
    .await;
    let mut guesser = client_from(&server, ip(10)).await;
    let reply = guesser.request(login("nobody", "guess")).await.unwrap();
    assert_eq!(
        code(&reply),
        Some(ErrorCode::InvalidCredentials),
        "{reply:?}"
    );
    let mut took = Vec::new();
    for _ in 0..3 {
        let asked = Instant::now();
        let reply = guesser.request(login("nobody", "guess")).await.unwrap();
        assert_eq!(code(&reply), Some(ErrorCode::RateLimited), "{reply:?}");
        took.push(asked.elapsed());
    }
    let ms: Vec<u128> = took.iter().map(Duration::as_millis).collect();
    assert!((450..1_000).contains(&ms[0]), "{ms:?}");
    assert!((950..1_800).contains(&ms[1]), "{ms:?}");
    assert!((1_950..3_000).contains(&ms[2]), "{ms:?}");
    let mut fresh = client_from(&server, ip(10)).await;
    let asked = Instant::now();
    let reply = fresh.request(login("nobody", "guess")).await.unwrap();
    assert_eq!(code(&reply), Some(ErrorCode::RateLimited), "{reply:?}");
    assert!(
        asked.elapsed() < Duration::from_millis(1_000),
        "{:?}",
        asked.elapsed()
    );
    server.stop().await;
}

/// Many fresh addresses, one wrong guess each: every one of them has a clean record, as a
/// flood from many addresses looks at first. An address that logged in successfully before
/// goes ahead of all of them; before, it queued behind them as one more clean address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_logged_in_before_goes_ahead_of_fresh_ones() {
    let server = TestServer::start_with(|c| {
        c.failed_logins_per_minute = 1_000_000;
        c.password_work_per_address = 0;
        c.password_workers = 1;
    })
    .await;
    server.signed_up("honest").await;
    logs_in(&server, ip(1), "honest").await;

    let mut flooders = Vec::new();
    for last in 100..140 {
        flooders.push(client_from(&server, ip(last)).await);
    }
    let mut flood = JoinSet::new();
    for (i, mut flooder) in flooders.into_iter().enumerate() {
        flood.spawn(async move {
            let asked = Instant::now();
            let reply = flooder
                .request(login(&format!("guess{i}"), "guess"))
                .await
                .unwrap();
            assert_eq!(code(&reply), Some(ErrorCode::InvalidCredentials));
            asked.elapsed()
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let honest = logs_in(&server, ip(1), "honest").await;
    let mut waits = Vec::new();
    while let Some(w) = flood.join_next().await {
        waits.push(w.unwrap());
    }
    waits.sort();
    let slowest = waits[waits.len() - 1];
    assert!(
        honest * 3 < slowest,
        "honest {honest:?}, fresh addresses {:?} .. {slowest:?}",
        waits[0]
    );
    server.stop().await;
}

/// Concurrent guesses on one account from a suspect address stop at the account's free
/// failures: each is counted when it is let through, not once its password check is over.
/// Before, all of them passed the backoff's check while the first were still being hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guesses_on_one_account_stop_at_its_backoff() {
    let server = TestServer::start_with(|c| {
        // Tracked but never refusing: the address's record, not its bucket, is what counts.
        c.failed_logins_per_minute = 1_000_000;
        c.password_work_per_address = 0;
    })
    .await;
    server.signed_up("owner").await;
    // One failure elsewhere makes the address suspect.
    let mut attacker = client_from(&server, ip(11)).await;
    let reply = attacker.request(login("someone", "guess")).await.unwrap();
    assert_eq!(
        code(&reply),
        Some(ErrorCode::InvalidCredentials),
        "{reply:?}"
    );
    let replies = at_once(&server, ip(11), 30, |_| login("owner", "guess")).await;
    // Five free failures and the one that reaches the sixth; a seventh when the count has
    // decayed (one a minute) below six between two admissions.
    let hashed = count(&replies, Some(ErrorCode::InvalidCredentials));
    assert!((6..=7).contains(&hashed), "{hashed} hashed: {replies:?}");
    assert_eq!(count(&replies, Some(ErrorCode::RateLimited)), 30 - hashed);
    // The owner still gets in from a clean address.
    logs_in(&server, ip(1), "owner").await;
    server.stop().await;
}
