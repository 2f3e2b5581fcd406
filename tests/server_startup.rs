//! `sfc-server` failing to start: the error says what is wrong on one line, each cause once.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cli::{ServerProcess, server_command};

/// Runs `sfc-server` (logging off) expecting it to fail at startup; returns its stderr.
async fn fails_to_start(dir: &Path, listen: &str) -> String {
    let mut command = server_command(dir, listen);
    command.env("RUST_LOG", "off");
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the server gives up within 30 s")
        .expect("sfc-server runs");
    assert!(!out.status.success(), "expected failure: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(
        err.starts_with("sfc-server: error: starting the server: "),
        "{err:?}"
    );
    err
}

#[tokio::test]
async fn a_taken_port_is_reported_once() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = fails_to_start(dir.path(), &addr.to_string()).await;
    assert!(
        err.contains(&format!("cannot listen on {addr}: ")),
        "{err:?}"
    );
    assert_eq!(
        err.matches("Address already in use").count(),
        1,
        "the cause once: {err:?}"
    );
}

#[tokio::test]
async fn a_data_directory_in_use_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path()).await;
    let err = fails_to_start(dir.path(), "127.0.0.1:0").await;
    let data = dir.path().join("data");
    assert_eq!(
        err.trim_end(),
        format!(
            "sfc-server: error: starting the server: another server is using this data \
             directory ({})",
            data.display()
        )
    );
    first.terminate().await;
}
