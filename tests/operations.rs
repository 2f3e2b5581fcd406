//! Running `sfc-server` as an operator does, through the binary: a log pipe that dies or
//! stalls, signals, quiet default logs, and the Prometheus metrics endpoint.
#![cfg(target_os = "linux")]

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::PASSWORD;
use securefastchat::client::{Client, ClientOptions, SendOutcome};
use securefastchat::protocol::{MessageId, Password};

/// A pipe: (read end, write end).
fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; each is owned once below.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by pipe2 and are not owned elsewhere.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// `sfc-server` on `listen` in `dir`, its stdout and stderr both into `log` (as with
/// `sfc-server 2>&1 | tee log`), with `RUST_LOG` as given (unset: the default filter).
fn server(dir: &Path, listen: &str, log: OwnedFd, rust_log: Option<&str>, extra: &[&str]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sfc-server"));
    command
        .args(["--listen", listen, "--data"])
        .arg(dir.join("data"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .args(extra)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("dup")))
        .stderr(Stdio::from(log));
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    command.spawn().expect("sfc-server starts")
}

/// Reads `log` until the server says it serves; returns the lines and the UDP address.
fn until_serving(log: &mut BufReader<File>) -> (Vec<String>, String) {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = log.read_line(&mut line).expect("read the log");
        assert!(n > 0, "the server exited before serving: {lines:?}");
        let addr = line
            .split("listen=")
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned());
        lines.push(line.trim_end().to_owned());
        if let Some(addr) = addr {
            return (lines, addr);
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// The child's exit status if it exits within `limit`.
fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends a child that failed its test, so no server outlives the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A UDP port nobody uses right now (bound, read and released; only loopback).
fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free UDP port")
}

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free TCP port")
}

fn ca_file(dir: &Path) -> PathBuf {
    dir.join("certs").join("ca.crt")
}

/// Signed up as `name`, retrying the connection while the server is still starting.
async fn sign_up(addr: &str, ca: &Path, name: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut options = ClientOptions::new(addr, ca);
        options.request_timeout = Duration::from_secs(10);
        if ca.exists()
            && let Ok(client) = Client::connect(&options).await
        {
            client
                .signup(name, Password::new(PASSWORD))
                .await
                .expect("signup");
            return client;
        }
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 19 item 6: with `sfc-server 2>&1 | tee log`, tee died, and the next log line (the
/// one saying a signal was received) made tracing-subscriber `eprintln!` its failure, which
/// panicked the signal task: the server never shut down. Now the line is dropped and the
/// shutdown runs.
#[test]
fn a_closed_log_pipe_does_not_keep_the_server_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (read, write) = pipe();
    let child = server(dir.path(), "127.0.0.1:0", write, Some("info"), &[]);
    let mut child = KillOnDrop(child);
    let mut log = BufReader::new(read);
    until_serving(&mut log);
    drop(log);
    signal(&child.0, libc::SIGINT);
    let status = wait_within(&mut child.0, Duration::from_secs(15))
        .expect("the server exits after SIGINT although its log pipe is closed");
    assert_eq!(status.code(), Some(0), "a graceful stop: {status:?}");
}

/// A log reader that stops reading (a stopped `tee`, a pager) must block neither the server
/// nor its shutdown: lines past the log queue are dropped. Then a second SIGINT during a slow
/// graceful shutdown (a handshake that never finishes holds it for the grace period) exits
/// at once with 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_pipe_blocks_nothing_and_a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (read, write) = pipe();
    // The smallest pipe (a page), never read: full after the first lines at trace level.
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&read),
            libc::F_SETPIPE_SZ,
            4096,
        )
    };
    assert!(
        rc >= 4096,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    let addr = free_udp();
    let child = server(dir.path(), &addr.to_string(), write, Some("trace"), &[]);
    let mut child = KillOnDrop(child);
    let ca = ca_file(dir.path());

    let started = Instant::now();
    let alice = tokio::time::timeout(
        Duration::from_secs(60),
        sign_up(&addr.to_string(), &ca, "alice"),
    )
    .await
    .expect("a signup is served while the log pipe is stalled");
    let bob = sign_up(&addr.to_string(), &ca, "bob").await;
    let outcome = alice
        .send_message("bob", "text", MessageId([1; 16]), b"sealed")
        .await
        .expect("send");
    assert_eq!(outcome, SendOutcome::Stored);
    let got = bob
        .next_delivery(Duration::from_secs(10))
        .await
        .expect("delivered");
    assert_eq!(got.id, MessageId([1; 16]));
    eprintln!("served with a stalled log pipe in {:?}", started.elapsed());

    // A handshake that never completes: its packets reach the server, the answers are lost.
    let blackhole = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hole = blackhole.local_addr().expect("address");
    let forward = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = blackhole.recv_from(&mut buf).await {
            if from != addr {
                let _ = blackhole.send_to(&buf[..n], addr).await;
            }
        }
    });
    let mut options = ClientOptions::new(hole.to_string(), &ca);
    options.server_name = Some("localhost".into());
    options.connect_timeout = Duration::from_secs(30);
    let stuck = tokio::spawn(async move { Client::connect(&options).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;

    signal(&child.0, libc::SIGINT);
    let graceful = wait_within(&mut child.0, Duration::from_millis(1000));
    assert!(
        graceful.is_none(),
        "the graceful shutdown should wait for the unfinished handshake (the grace period): \
         {graceful:?}; this test needs a slow graceful shutdown to check the second signal"
    );
    let second = Instant::now();
    signal(&child.0, libc::SIGINT);
    let status = wait_within(&mut child.0, Duration::from_secs(2))
        .expect("a second SIGINT ends the server at once");
    eprintln!("exited {:?} after the second SIGINT", second.elapsed());
    assert_eq!(status.code(), Some(130), "128 + SIGINT: {status:?}");
    forward.abort();
    stuck.abort();
    drop(read);
}

/// Issue 19 item 14: fjall's recovery printed about 22 INFO lines at every start; by default
/// only the server's own lines appear, on a fresh start as on a restart.
#[test]
fn default_logs_show_only_the_servers_own_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    for run in ["fresh start", "restart"] {
        let (read, write) = pipe();
        let child = server(dir.path(), "127.0.0.1:0", write, None, &[]);
        let mut child = KillOnDrop(child);
        let mut log = BufReader::new(read);
        let (mut lines, _) = until_serving(&mut log);
        signal(&child.0, libc::SIGTERM);
        let status = wait_within(&mut child.0, Duration::from_secs(15)).expect("stops");
        assert_eq!(status.code(), Some(0), "{run}: {status:?}");
        let mut rest = String::new();
        log.read_to_string(&mut rest).expect("read the log");
        lines.extend(rest.lines().map(str::to_owned));
        let foreign: Vec<&String> = lines
            .iter()
            .filter(|l| !l.contains(" securefastchat") && !l.contains(" sfc_server"))
            .collect();
        assert!(
            foreign.is_empty(),
            "{run}: other crates' lines: {foreign:#?}"
        );
        assert!(lines.len() <= 8, "{run}: {} lines: {lines:#?}", lines.len());
    }
}

/// Fetches `/metrics` with a plain HTTP/1.0 GET; `None` if nothing answers.
fn try_scrape(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn scrape(addr: SocketAddr) -> String {
    let response = try_scrape(addr).expect("the metrics address answers");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

/// The value of the series `series` (name with labels, as printed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Issue 19 item 14: `--metrics ADDR` serves Prometheus metrics that follow what happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_logins_and_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (read, write) = pipe();
    let metrics = free_tcp();
    let child = server(
        dir.path(),
        "127.0.0.1:0",
        write,
        Some("info"),
        &["--metrics", &metrics.to_string()],
    );
    let mut child = KillOnDrop(child);
    let mut log = BufReader::new(read);
    let (lines, addr) = until_serving(&mut log);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("metrics on http://{metrics}/metrics"))),
        "{lines:#?}"
    );
    // Keep reading the log so the pipe never fills.
    let drain = std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    let ca = ca_file(dir.path());

    let before = scrape(metrics);
    assert_eq!(
        value(&before, "sfc_logins_total{result=\"ok\"}"),
        Some(0.0),
        "{before}"
    );

    let _alice = sign_up(&addr, &ca, "alice").await;
    let bob = sign_up(&addr, &ca, "bob").await;
    let mut options = ClientOptions::new(addr.as_str(), &ca);
    options.request_timeout = Duration::from_secs(10);
    let again = Client::connect(&options).await.expect("connect");
    again
        .login("alice", Password::new(PASSWORD))
        .await
        .expect("login");
    let wrong = Client::connect(&options).await.expect("connect");
    assert!(
        wrong
            .login("alice", Password::new("not the password"))
            .await
            .is_err()
    );
    for n in 1..=3u8 {
        let outcome = again
            .send_message("bob", "text", MessageId([n; 16]), b"sealed")
            .await
            .expect("send");
        assert_eq!(outcome, SendOutcome::Stored);
    }
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(
            bob.next_delivery(Duration::from_secs(10))
                .await
                .expect("delivered")
                .seq,
        );
    }
    assert_eq!(bob.ack(seqs[..2].to_vec()).await.expect("ack"), 2);

    let after = scrape(metrics);
    let at = |series: &str| value(&after, series).unwrap_or_else(|| panic!("{series} in {after}"));
    assert_eq!(at("sfc_signups_total{result=\"ok\"}"), 2.0);
    assert_eq!(at("sfc_logins_total{result=\"ok\"}"), 1.0);
    assert_eq!(at("sfc_logins_total{result=\"invalid_credentials\"}"), 1.0);
    assert_eq!(at("sfc_messages_sent_total"), 3.0);
    assert_eq!(at("sfc_messages_pushed_total"), 3.0);
    assert_eq!(at("sfc_messages_delivered_total"), 2.0);
    assert_eq!(at("sfc_inbox_pending_messages"), 1.0);
    assert!(at("sfc_connections_accepted_total") >= 4.0);
    // alice's first connection was replaced by her login on `again`.
    let open = at("sfc_connections_open");
    assert!((3.0..=4.0).contains(&open), "{open} open");
    assert!(at("sfc_handshakes_total{result=\"ok\"}") >= 4.0);
    assert!(at("sfc_inbox_batch_operations_count") >= 1.0, "{after}");
    // The first message went through the writer (it read alice's send records and bob's
    // inbox); the next ones, to an online bob with an idle writer, were decided by their
    // callers.
    assert!(at("sfc_inbox_caller_appends_total") >= 1.0, "{after}");
    assert!(at("sfc_inbox_sync_seconds_count") >= 1.0, "{after}");
    assert!(after.contains("# HELP sfc_logins_total "), "{after}");

    signal(&child.0, libc::SIGTERM);
    let status = wait_within(&mut child.0, Duration::from_secs(15)).expect("stops");
    assert_eq!(status.code(), Some(0));
    let _ = drain.join();

    // A restart counts what is still waiting.
    let (read, write) = pipe();
    let child = server(
        dir.path(),
        "127.0.0.1:0",
        write,
        Some("warn"),
        &["--metrics", &metrics.to_string()],
    );
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        if let Some(text) = try_scrape(metrics)
            && let Some(n) = value(&text, "sfc_inbox_pending_messages")
            && n > 0.0
        {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no pending count after the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(pending, 1.0);
    signal(&child.0, libc::SIGTERM);
    wait_within(&mut child.0, Duration::from_secs(15)).expect("stops");
    drop(read);
}
