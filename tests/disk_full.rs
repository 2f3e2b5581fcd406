//! A full disk, through the `sfc-server` binary: the data directory is a 16 MiB tmpfs the test
//! mounts (skipped, with a message, where it cannot). Senders get `storage_unavailable` and no
//! false ack; deliveries, acks and logins go on; freeing space ends the outage without a
//! restart; everything acknowledged is delivered; SIGTERM exits 0, also while the disk is full.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::PASSWORD;
use common::cli::ServerProcess;
use securefastchat::client::{Client, ClientError, ClientOptions};
use securefastchat::protocol::{ErrorCode, MessageId, Password, SessionToken};

/// A body large enough that each message needs fresh pages of the filesystem.
const BODY: usize = 60_000;

/// A tmpfs mounted on a directory, unmounted when dropped (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a 16 MiB tmpfs, private (0700), on `dir`; `None` (with a message) if this
    /// machine does not let the test mount.
    fn mount(dir: &Path) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Self(dir.to_owned())),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a server killed by a failing test may still hold files for a moment.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with a file until it refuses more; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
            return path;
        }
    }
}

async fn connect(server: &ServerProcess, dir: &Path) -> Client {
    let mut options = ClientOptions::new(server.addr.clone(), dir.join("certs").join("ca.crt"));
    options.request_timeout = Duration::from_secs(10);
    Client::connect(&options).await.unwrap()
}

fn code(result: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    match result {
        Ok(_) => None,
        Err(ClientError::Server { code, .. }) => Some(code),
        Err(e) => panic!("not a server error: {e}"),
    }
}

/// Sends alice's next message to bob: [`BODY`] bytes of noise, which fjall's journal cannot
/// compress (a body of one repeated byte took a few hundred bytes on disk).
async fn send(alice: &Client) -> (MessageId, Option<ErrorCode>) {
    let id = MessageId::random().unwrap();
    let mut body = vec![0u8; BODY];
    let mut state = u64::from_le_bytes(id.0[..8].try_into().unwrap()) | 1;
    for byte in &mut body {
        // xorshift64: cheap noise, seeded by the random id.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    (id, code(alice.send_message("bob", "m", id, &body).await))
}

/// Every message delivered to `client` within `wait` of the previous one; the first `ack`
/// of them are acknowledged.
async fn drain(client: &Client, wait: Duration, ack: usize) -> Vec<MessageId> {
    let mut ids = Vec::new();
    while let Some(message) = client.next_delivery(wait).await {
        if ids.len() < ack {
            assert_eq!(client.ack(vec![message.seq]).await.unwrap(), 1);
        }
        ids.push(message.id);
    }
    ids
}

/// Starts a server on a full-disk-ready tmpfs with alice and bob signed up; bob's token.
async fn setup(dir: &Path) -> Option<(Tmpfs, ServerProcess, Client, SessionToken)> {
    let mount = Tmpfs::mount(&dir.join("data"))?;
    let server = ServerProcess::start(dir).await;
    let alice = connect(&server, dir).await;
    alice
        .signup("alice", Password::new(PASSWORD))
        .await
        .unwrap();
    let bob = connect(&server, dir).await;
    let (_, token) = bob.signup("bob", Password::new(PASSWORD)).await.unwrap();
    bob.close().await;
    Some((mount, server, alice, token))
}

fn count(log: &[String], needle: &str) -> usize {
    log.iter().filter(|line| line.contains(needle)).count()
}

#[tokio::test]
async fn a_full_disk_refuses_messages_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mount, server, alice, bob_token)) = setup(dir.path()).await else {
        return;
    };
    let mut acked = Vec::new();
    for _ in 0..10 {
        let (id, refused) = send(&alice).await;
        assert_eq!(refused, None);
        acked.push(id);
    }

    let filler = fill(&mount.0);
    let mut refused = Vec::new();
    for _ in 0..40 {
        let (id, result) = send(&alice).await;
        match result {
            // A page left half used may still take a message: it is acknowledged, so stored.
            None if refused.is_empty() => acked.push(id),
            None => panic!("a send succeeded after one was refused, with the disk still full"),
            Some(code) => {
                assert_eq!(code, ErrorCode::StorageUnavailable);
                refused.push(id);
                if refused.len() == 5 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused.len(), 5, "the full disk refused messages");

    // While the disk is full: bob logs in with his password (a session kept in memory),
    // receives everything acknowledged and acknowledges all but the last 3 (acks kept in
    // memory); on another connection, resuming, he gets just those 3 again.
    let kept = acked.len() - 3;
    let bob = connect(&server, dir.path()).await;
    bob.login("bob", Password::new(PASSWORD)).await.unwrap();
    let received = drain(&bob, Duration::from_secs(2), kept).await;
    assert_eq!(
        received, acked,
        "bob gets every acknowledged message, in order"
    );
    bob.close().await;
    let resumed = connect(&server, dir.path()).await;
    resumed.resume(bob_token.clone()).await.unwrap();
    let again = drain(&resumed, Duration::from_secs(1), 0).await;
    assert_eq!(again, acked[kept..], "acks made during the outage hold");
    resumed.close().await;

    // Space returns: sends succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let first = loop {
        let (id, result) = send(&alice).await;
        match result {
            None => break id,
            Some(code) => assert_eq!(code, ErrorCode::StorageUnavailable),
        }
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "no recovery in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "recovered {} ms after the space was freed",
        freed.elapsed().as_millis()
    );
    let mut after = vec![first];
    for _ in 0..5 {
        let (id, result) = send(&alice).await;
        assert_eq!(result, None);
        after.push(id);
    }

    // In the reopened store, bob gets the 3 he did not acknowledge and the new messages, and
    // none acknowledged during the outage again. A refused send may have reached the journal
    // whole before the failure (then it is stored after all, and a resend is answered as a
    // duplicate): those are let through, nothing else.
    let bob = connect(&server, dir.path()).await;
    bob.resume(bob_token).await.unwrap();
    let received = drain(&bob, Duration::from_secs(2), usize::MAX).await;
    let refused: HashSet<_> = refused.into_iter().collect();
    let received_new: Vec<_> = received
        .iter()
        .copied()
        .filter(|id| !refused.contains(id))
        .collect();
    let expected: Vec<_> = acked[kept..].iter().chain(&after).copied().collect();
    assert_eq!(received_new, expected, "{received:?}");
    bob.close().await;
    alice.close().await;

    let log = server.terminate().await;
    for line in log
        .iter()
        .filter(|l| l.contains("store") || l.contains("ERROR"))
    {
        eprintln!("log: {line}");
    }
    assert_eq!(count(&log, "the store cannot write"), 1, "{log:#?}");
    assert_eq!(count(&log, "the store writes again"), 1, "{log:#?}");
    assert_eq!(
        count(&log, "cannot store message"),
        0,
        "no line per message: {log:#?}"
    );
    drop(mount);
}

#[tokio::test]
async fn a_server_stops_cleanly_while_its_disk_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mount, server, alice, _)) = setup(dir.path()).await else {
        return;
    };
    let (_, refused) = send(&alice).await;
    assert_eq!(refused, None);
    let _filler = fill(&mount.0);
    let mut refused = None;
    for _ in 0..20 {
        if let (_, Some(code)) = send(&alice).await {
            refused = Some(code);
            break;
        }
    }
    assert_eq!(refused, Some(ErrorCode::StorageUnavailable));
    alice.close().await;
    // `terminate` asserts exit status 0.
    let log = server.terminate().await;
    assert_eq!(count(&log, "the store cannot write"), 1, "{log:#?}");
    drop(mount);
}
