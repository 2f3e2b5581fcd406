//! Crash safety under load, at the application's level: the server binary killed with
//! SIGKILL at random moments while senders and receivers work, restarted on the same data and
//! address, and every message the server acknowledged shown to its receiver exactly once; and
//! a receiving `sfc recv` killed again and again while it drains a backlog.
//!
//! The short versions run in the suite. `scripts/crash-test.sh` runs the long ones (the
//! `#[ignore]`d tests, sized by `SFC_CRASH_*` variables).

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{People, ServerProcess, stdout};
use common::crash_load::Load;
use securefastchat::client::ClientOptions;

/// A number from the environment, or `default`.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A pseudo-random number in `0..bound` (the moments of the kills need not be secret, only
/// spread; the seed is printed so a run can be repeated).
fn next(state: &mut u64, bound: u64) -> u64 {
    // xorshift64
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % bound.max(1)
}

fn seed() -> u64 {
    let seed = setting(
        "SFC_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    seed.max(1)
}

/// `rounds` times: the load runs for a random part of `round` (at least a quarter), then the
/// server is killed with SIGKILL and started again on the same data and address (which must
/// open: `ServerProcess::start_on` fails the test otherwise). Then every acknowledged message
/// must be shown exactly once.
async fn killed_server_rounds(rounds: u64, round: Duration, pairs: usize) {
    let seed = seed();
    let mut rng = seed;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path()).await;
    let addr = server.addr.clone();
    let mut options = ClientOptions::new(addr.clone(), dir.path().join("certs").join("ca.crt"));
    options.request_timeout = Duration::from_secs(20);
    let records = std::env::var_os("SFC_CRASH_RECORDS").map(Into::into);
    let homes = tempfile::tempdir().unwrap();
    let load = Load::start(&options, homes.path(), pairs, records).await;

    let started = Instant::now();
    let mut restarts = Vec::new();
    for r in 0..rounds {
        let ms = round.as_millis() as u64;
        let wait = ms / 4 + next(&mut rng, ms - ms / 4);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let acked = load.records.lock().unwrap().acked.len();
        server.kill().await;
        let restart = Instant::now();
        server = ServerProcess::start_on(dir.path(), &addr).await;
        restarts.push(restart.elapsed());
        eprintln!(
            "round {}: killed after {wait} ms ({acked} acknowledged so far), serving again after {:?}",
            r + 1,
            restart.elapsed()
        );
    }
    // Time for the load after the last restart.
    tokio::time::sleep(round / 2).await;
    let verdict = load.finish(Duration::from_secs(60)).await;
    let log = server.terminate().await;
    eprintln!(
        "seed {seed}: {rounds} kills in {:?}; {} acknowledged, {} shown ({} whose ack was lost \
         with the server), {} missing, {} shown twice (by id), {} texts twice; restarts took {:?}",
        started.elapsed(),
        verdict.acked,
        verdict.shown,
        verdict.shown_unacked,
        verdict.missing.len(),
        verdict.shown_twice.len(),
        verdict.text_twice.len(),
        restarts
    );
    assert!(verdict.acked > 0, "nothing was sent");
    assert!(
        verdict.missing.is_empty(),
        "acknowledged, never shown: {:?}",
        verdict.missing
    );
    assert!(
        verdict.shown_twice.is_empty(),
        "shown twice: {:?}",
        verdict.shown_twice
    );
    assert!(
        verdict.text_twice.is_empty(),
        "a text shown twice: {:?}",
        verdict.text_twice
    );
    assert!(
        !log.iter().any(|l| l.contains("ERROR")),
        "the last server logged errors: {log:?}"
    );
}

/// The server killed at random moments under load, restarted each time: nothing acknowledged
/// is lost, nothing is shown twice, and the store reopens every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_load_loses_and_repeats_nothing() {
    killed_server_rounds(4, Duration::from_millis(1500), 2).await;
}

/// The long version, for `scripts/crash-test.sh`: `SFC_CRASH_ROUNDS` (20) kills,
/// `SFC_CRASH_ROUND_MS` (4000) apart at most, `SFC_CRASH_PAIRS` (6) sender/receiver pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: scripts/crash-test.sh runs it"]
async fn long_killed_server_rounds() {
    killed_server_rounds(
        setting("SFC_CRASH_ROUNDS", 20),
        Duration::from_millis(setting("SFC_CRASH_ROUND_MS", 4000)),
        setting("SFC_CRASH_PAIRS", 6) as usize,
    )
    .await;
}

/// `messages` wait for bob; `sfc recv` is killed with SIGKILL again and again while it drains
/// them, then runs to the end. Every message is shown, and one is shown twice only where a run
/// was killed right after showing it (before it could record that it had): then it is that
/// run's last line, and there is at most one per kill.
async fn killed_receiver_drains(messages: u64, kills: u64) {
    let seed = seed();
    let mut rng = seed;
    // One sender fills the inbox: no share below the whole inbox (the long run's 3,000 passed
    // the default share of 1,000).
    let server = common::TestServer::start_with(|c| {
        c.max_pending = messages + 10;
        c.max_pending_per_sender = 0;
    })
    .await;
    let people = People::signed_up(&server, &["bob"]).await;
    // alice sends through the library (quicker than a process per message).
    let homes = tempfile::tempdir().unwrap();
    let options = server.options();
    let alice = common::crash_load::sender(&options, homes.path(), "alice").await;
    for n in 0..messages {
        alice.send_text("bob", &format!("m{n}")).await.unwrap();
    }
    alice.close().await;

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut killed = 0;
    let mut repeats_explained = 0;
    let mut last_of_killed: Vec<String> = Vec::new();
    let started = Instant::now();
    for _ in 0..kills {
        let mut recv = people.sfc("bob", &["recv", "--wait", "1"]);
        recv.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = recv.spawn().unwrap();
        let pid = child.id().unwrap();
        tokio::time::sleep(Duration::from_millis(200 + next(&mut rng, 600))).await;
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let text = stdout(&out);
        for line in text.lines() {
            *counts.entry(line.to_owned()).or_default() += 1;
        }
        if out.status.success() {
            // It ended by itself: nothing was left.
            break;
        }
        killed += 1;
        if let Some(last) = text.lines().last() {
            last_of_killed.push(last.to_owned());
        }
    }
    // The rest, uninterrupted (a big rest takes longer than `run` waits).
    let mut rest = people.sfc("bob", &["recv", "--wait", "2"]);
    rest.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        rest.spawn().unwrap().wait_with_output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    for line in stdout(&out).lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    let missing: Vec<u64> = (0..messages)
        .filter(|n| !counts.contains_key(&format!("alice\tm{n}")))
        .collect();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    for (line, count) in &twice {
        let explained = last_of_killed.iter().filter(|l| l == line).count();
        assert!(
            **count <= 1 + explained,
            "{line:?} shown {count} times, last line of {explained} killed runs"
        );
        repeats_explained += **count - 1;
    }
    eprintln!(
        "seed {seed}: {messages} messages drained in {:?} by {} runs, {killed} killed mid-drain; \
         {} shown, {} missing, {} shown again (each the last line of a killed run)",
        started.elapsed(),
        killed + 1,
        counts.len(),
        missing.len(),
        repeats_explained
    );
    assert!(missing.is_empty(), "never shown: {missing:?}");
    assert!(killed > 0, "no run was killed mid-drain");
    assert!(
        counts.keys().all(|l| l.starts_with("alice\tm")),
        "{counts:?}"
    );
    server.stop().await;
}

/// A receiver killed while it drains a backlog loses nothing and repeats only what it may
/// not have shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_mid_drain_gets_everything_once() {
    killed_receiver_drains(300, 5).await;
}

/// The long version, for `scripts/crash-test.sh`: `SFC_CRASH_BACKLOG` (3000) messages,
/// at most `SFC_CRASH_RECEIVER_KILLS` (20) kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: scripts/crash-test.sh runs it"]
async fn long_killed_receiver_drains() {
    killed_receiver_drains(
        setting("SFC_CRASH_BACKLOG", 3000),
        setting("SFC_CRASH_RECEIVER_KILLS", 20),
    )
    .await;
}
