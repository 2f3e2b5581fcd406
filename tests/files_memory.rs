//! Memory stays flat as a file grows: a 100 MiB file sent with the built `sfc send-file` to a
//! recipient running `sfc recv --into` (online) and to one that fetches it later (offline)
//! arrives with its SHA-256, while every `sfc` process peaks under [`CLIENT_PEAK_BOUND`] and
//! the `sfc-server` binary's peak grows by less than [`SERVER_GROWTH_BOUND`] over the two
//! transfers (its resident memory before any file, ≈ 47 MiB in a debug build, is its code,
//! store and caches). A program holding the file, or the blob, would pass either bound by far.
//! docs/ARCHITECTURE.md ("Files") gives the bounds' make-up.

#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::PASSWORD;
use common::cli::ServerProcess;
use sha2::{Digest, Sha256};

/// The file: 100 MiB, 1,600 chunks.
const FILE_SIZE: usize = 100 << 20;
/// Peak resident memory allowed to each `sfc` process (debug builds, their code and libraries
/// included): under a third of the file.
const CLIENT_PEAK_BOUND: u64 = 32 << 20;
/// Growth of the server's peak resident memory allowed over both transfers: a transfer holds a
/// 64 KiB buffer and the QUIC windows (≈ 1.2 MiB), the rest is allocator slack.
const SERVER_GROWTH_BOUND: u64 = 8 << 20;

/// What a finished `sfc` process left: its exit status, output and peak RSS (bytes).
struct Finished {
    success: bool,
    stdout: String,
    stderr: String,
    peak_rss: u64,
}

/// `sfc ARGS` as `name` (home `homes/name`), run to its end; its peak RSS from the kernel's
/// accounting of the child (`wait4`'s `ru_maxrss`).
async fn sfc(addr: &str, ca: &Path, homes: &Path, name: &str, args: &[&str]) -> Finished {
    let out_dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sfc"));
    command
        .env_clear()
        .env("SFC_SERVER", addr)
        .env("SFC_CA", ca)
        .env("SFC_HOME", homes.join(name))
        .env("SFC_PASSWORD", PASSWORD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let child = command.spawn().unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let (status, peak_rss) = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten by wait4.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our child, not yet waited for; the pointers are to live locals.
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(waited, pid, "wait4");
        (status, u64::try_from(usage.ru_maxrss).unwrap() * 1024)
    })
    .await
    .unwrap();
    // `child` was reaped by wait4: dropping it does not wait again.
    drop(child);
    Finished {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout: std::fs::read_to_string(&out_path).unwrap(),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
        peak_rss,
    }
}

fn assert_ok(what: &str, finished: &Finished) {
    assert!(
        finished.success,
        "{what} failed: {}{}",
        finished.stdout, finished.stderr
    );
}

fn peak_rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Writes the file a megabyte at a time (the test holds no more of it either), returning its
/// SHA-256.
fn write_file(path: &Path) -> [u8; 32] {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hasher = Sha256::new();
    let mut piece = vec![0u8; 1 << 20];
    for round in 0..FILE_SIZE / piece.len() {
        for (i, byte) in piece.iter_mut().enumerate() {
            *byte = (i.wrapping_mul(31) ^ round.wrapping_mul(7)) as u8;
        }
        hasher.update(&piece);
        file.write_all(&piece).unwrap();
    }
    file.flush().unwrap();
    hasher.finalize().into()
}

fn digest_of(path: &Path) -> [u8; 32] {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut piece = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut piece).unwrap();
        if n == 0 {
            return hasher.finalize().into();
        }
        hasher.update(&piece[..n]);
    }
}

fn only_file_in(dir: &Path) -> PathBuf {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_file_reaches_online_and_offline_recipients_in_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path()).await;
    let server_pid = server.child.id().unwrap();
    let ca = dir.path().join("certs").join("ca.crt");
    let addr = server.addr.clone();
    let homes = dir.path().join("homes");
    for name in ["alice", "bob", "carol"] {
        assert_ok(
            "signup",
            &sfc(&addr, &ca, &homes, name, &["signup", name]).await,
        );
    }
    let server_before = peak_rss_of(server_pid);
    let source = dir.path().join("big.bin");
    let digest = write_file(&source);
    let source_arg = source.to_str().unwrap().to_owned();

    // Online: bob's `sfc recv` is waiting when alice sends.
    let bob_dir = dir.path().join("bob-files");
    std::fs::create_dir(&bob_dir).unwrap();
    let bob_into = bob_dir.to_str().unwrap().to_owned();
    let receiving = {
        let (addr, ca, homes) = (addr.clone(), ca.clone(), homes.clone());
        tokio::spawn(async move {
            let args = ["recv", "--count", "1", "--wait", "300", "--into", &bob_into];
            sfc(&addr, &ca, &homes, "bob", &args).await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = sfc(
        &addr,
        &ca,
        &homes,
        "alice",
        &["send-file", "bob", &source_arg],
    )
    .await;
    assert_ok("send-file to bob", &sent);
    let received = tokio::time::timeout(Duration::from_secs(300), receiving)
        .await
        .unwrap()
        .unwrap();
    assert_ok("recv by bob", &received);
    assert!(
        received.stdout.starts_with("alice\tfile: big.bin (100"),
        "{:?}",
        received.stdout
    );
    let saved = only_file_in(&bob_dir);
    assert_eq!(saved.file_name().unwrap(), "big.bin");
    assert_eq!(digest_of(&saved), digest);
    std::fs::remove_file(&saved).unwrap();

    // Offline: carol is not connected while alice sends, and fetches it afterwards.
    let sent_offline = sfc(
        &addr,
        &ca,
        &homes,
        "alice",
        &["send-file", "carol", &source_arg],
    )
    .await;
    assert_ok("send-file to carol", &sent_offline);
    let carol_dir = dir.path().join("carol-files");
    std::fs::create_dir(&carol_dir).unwrap();
    let carol_into = carol_dir.to_str().unwrap().to_owned();
    let fetched = sfc(
        &addr,
        &ca,
        &homes,
        "carol",
        &[
            "recv",
            "--count",
            "1",
            "--wait",
            "60",
            "--into",
            &carol_into,
        ],
    )
    .await;
    assert_ok("recv by carol", &fetched);
    assert_eq!(digest_of(&only_file_in(&carol_dir)), digest);

    let server_peak = peak_rss_of(server_pid);
    server.terminate().await;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "peak RSS of sfc-server: {:.1} MiB (before any file: {:.1} MiB)",
        mib(server_peak),
        mib(server_before)
    );
    assert!(
        server_peak - server_before < SERVER_GROWTH_BOUND,
        "sfc-server grew by {:.1} MiB moving a {} MiB file twice (bound {} MiB)",
        mib(server_peak - server_before),
        FILE_SIZE >> 20,
        SERVER_GROWTH_BOUND >> 20
    );
    let peaks = [
        ("sfc send-file (online)", sent.peak_rss),
        ("sfc recv --into (online)", received.peak_rss),
        ("sfc send-file (offline)", sent_offline.peak_rss),
        ("sfc recv --into (offline)", fetched.peak_rss),
    ];
    for (who, peak) in peaks {
        eprintln!("peak RSS of {who}: {:.1} MiB", mib(peak));
    }
    for (who, peak) in peaks {
        assert!(
            peak < CLIENT_PEAK_BOUND,
            "{who} peaked at {:.1} MiB with a {} MiB file (bound {} MiB)",
            mib(peak),
            FILE_SIZE >> 20,
            CLIENT_PEAK_BOUND >> 20
        );
    }
}
