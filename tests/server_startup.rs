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

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Lets a server that has just logged `serving` install its SIGTERM handler (a task spawned
/// next to `run`), so `terminate` tests a clean stop rather than that race.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_new_data_directory_is_private_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path()).await;
    let data = dir.path().join("data");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("endpoint.secret")), 0o600);
    settle().await;
    server.terminate().await;
}

#[tokio::test]
async fn a_data_directory_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o777);
    let err = fails_to_start(dir.path(), "127.0.0.1:0").await;
    assert_eq!(
        err.trim_end(),
        format!(
            "sfc-server: error: starting the server: data directory {0} is writable by group or \
             others (mode 777): they could replace the store; make it private with `chmod 700 \
             {0}`",
            data.display()
        )
    );
    assert_eq!(mode(&data), 0o777, "left as it was");
    set_mode(&data, 0o770);
    let err = fails_to_start(dir.path(), "127.0.0.1:0").await;
    assert!(err.contains("(mode 770)"), "{err:?}");
}

#[tokio::test]
async fn a_data_directory_others_can_read_is_made_private_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o755);
    let server = ServerProcess::start(dir.path()).await;
    assert_eq!(mode(&data), 0o700);
    settle().await;
    let log = server.terminate().await;
    assert_eq!(
        log.iter()
            .filter(|line| line.contains("made it private (0700)") && line.contains("was=755"))
            .count(),
        1,
        "{log:#?}"
    );
}
