//! The server binary killed (SIGKILL) while it holds messages it never wrote: acknowledged by
//! their recipient while held (docs/ARCHITECTURE.md, "Held messages"), so neither their inbox
//! entries nor anything else of them was synced. With the built `sfc` on both ends:
//!
//! 1. the sender got `sent` from the recipient's ack, then the kill: the recipient showed the
//!    message once, and nothing is sent or shown again after the restart;
//! 2. the recipient has it, the sender's `sent` never reached it (the sender is stopped, then
//!    killed too): after the restart the sender's outbox sends it again, which the server may
//!    store and deliver again, and the recipient still shows it once.
//!
//! The hold window is 5 s here, so the server does not write these messages on its own before
//! the kill; the metrics say when a message was ordered and when it was skipped.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{People, ServerProcess, run, signal, stdout};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const HOLD_MS: &str = "5000";

fn free_tcp_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

fn series(addr: SocketAddr, name: &str) -> f64 {
    scrape(addr)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits (at most 15 s) until metric `name` reaches `at_least`.
async fn until_metric(addr: SocketAddr, name: &str, at_least: f64) {
    until_at_least(name, at_least, || series(addr, name)).await;
}

/// Waits (at most 15 s) until `read` (of `what`) reaches `at_least`.
async fn until_at_least(what: &str, at_least: f64, read: impl Fn() -> f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = read();
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} stayed at {value}, waiting for {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const SKIPPED: &str = "sfc_inbox_skipped_writes_total";
const BATCHES: &str = "sfc_inbox_batch_operations_count";
/// Appends decided without the writer's thread (no batch).
const CALLER_APPENDS: &str = "sfc_inbox_caller_appends_total";

/// Batches built plus appends decided by their callers: one more once a message is ordered.
fn ordered(addr: SocketAddr) -> f64 {
    series(addr, BATCHES) + series(addr, CALLER_APPENDS)
}

/// `sfc recv --follow` as `name`, with its output lines.
fn follow(people: &People, name: &str) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut recv = people.sfc(name, &["recv", "--follow"]);
    recv.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = recv.spawn().unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("no line within 15 s")
        .unwrap()
        .expect("the receiver ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acknowledged_before_they_were_written_survive_a_kill_shown_once() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_tcp_addr();
    let metrics_arg = metrics.to_string();
    let args = ["--write-hold-ms", HOLD_MS, "--metrics", &metrics_arg];
    let server = ServerProcess::start_with_args(dir.path(), "127.0.0.1:0", &args).await;
    let addr = server.addr.clone();
    let ca = dir.path().join("certs").join("ca.crt");
    let people = People::signed_up_at(&addr, &ca, &["alice", "bob"]).await;
    // Every line bob's receivers print, in order.
    let mut shown: Vec<String> = Vec::new();

    // 1. `sent` from bob's ack; then the kill.
    let (mut bob, mut bob_lines) = follow(&people, "bob");
    let out = run(people.sfc("alice", &["send", "bob", "acked"])).await;
    assert!(out.status.success(), "{out:?}");
    shown.push(next_line(&mut bob_lines).await);
    // Never written: its `sent` came from bob's ack.
    until_metric(metrics, SKIPPED, 1.0).await;
    server.kill().await;
    bob.kill().await.unwrap();
    let server = ServerProcess::start_with_args(dir.path(), &addr, &args).await;
    let out = run(people.sfc("alice", &["outbox"])).await;
    assert!(
        out.status.success(),
        "nothing waits in alice's outbox: {out:?}"
    );
    assert_eq!(stdout(&out), "");
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert!(out.status.success(), "{out:?}");
    shown.extend(stdout(&out).lines().map(str::to_owned));
    assert_eq!(shown, ["alice\tacked"], "shown once, nothing again");

    // 2. bob has it, alice never read her `sent`. The first message after the crash is not
    // the next seq bob's deliverer saw (the counters jumped ahead): it waits for the store,
    // so for its write at the window's end. The next one follows it.
    let (mut bob, mut bob_lines) = follow(&people, "bob");
    let out = run(people.sfc("alice", &["send", "bob", "ready"])).await;
    assert!(out.status.success(), "{out:?}");
    shown.push(next_line(&mut bob_lines).await);
    // bob is connected; stopped, he takes the next message only when he goes on.
    signal(&bob, "-STOP");
    let before = ordered(metrics);
    let mut alice = people.sfc("alice", &["send", "bob", "unconfirmed"]);
    alice.stdout(Stdio::null()).stderr(Stdio::null());
    let alice = alice.spawn().unwrap();
    // Ordered (by a batch or by its caller, its copy on its way to bob): alice stops before
    // any `sent`.
    until_at_least("batches plus caller appends", before + 1.0, || {
        ordered(metrics)
    })
    .await;
    signal(&alice, "-STOP");
    let skipped = series(metrics, SKIPPED);
    signal(&bob, "-CONT");
    shown.push(next_line(&mut bob_lines).await);
    until_metric(metrics, SKIPPED, skipped + 1.0).await;
    server.kill().await;
    signal(&alice, "-KILL");
    bob.kill().await.unwrap();

    let server = ServerProcess::start_with_args(dir.path(), &addr, &args).await;
    // alice's outbox still holds it (no `sent`): it goes again, under the same id.
    let out = run(people.sfc("alice", &["outbox"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "", "nothing left waiting");
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert!(out.status.success(), "{out:?}");
    shown.extend(stdout(&out).lines().map(str::to_owned));
    assert_eq!(
        shown,
        ["alice\tacked", "alice\tready", "alice\tunconfirmed"],
        "each shown once"
    );
    server.terminate().await;
}
