//! Blobs on a real server, spoken to in raw protocol: uploads (whole, refused, resumed),
//! downloads, who may fetch, acknowledgements and deletion, expiry of complete and abandoned
//! blobs, the stream limits, and a blob far larger than a stream's window going to disk while
//! it arrives.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::TestServer;
use common::raw::Raw;
use securefastchat::protocol::{BlobId, ErrorCode, Reply, Request};

/// `len` bytes that differ from blob to blob (xorshift from `seed`).
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn blob_file(server: &TestServer, id: BlobId) -> PathBuf {
    server
        .dir
        .path()
        .join("data")
        .join("blobs")
        .join(id.to_hex())
}

async fn announce(raw: &mut Raw, id: u64, blob: BlobId, length: u64, readers: &[&str]) -> Reply {
    let request = Request::UploadBlob {
        blob,
        length,
        readers: readers.iter().map(|r| r.to_string()).collect(),
    };
    raw.call(id, request).await
}

fn held(reply: &Reply) -> u64 {
    match reply {
        Reply::BlobUpload { held, .. } => *held,
        other => panic!("expected blob_upload, got {other:?}"),
    }
}

fn error_code(reply: &Reply) -> ErrorCode {
    match reply {
        Reply::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Announces and uploads `data` as `blob` for `readers` and waits for `blob_stored`.
async fn store_blob(raw: &mut Raw, blob: BlobId, data: &[u8], readers: &[&str]) {
    let reply = announce(raw, 10, blob, data.len() as u64, readers).await;
    assert_eq!(held(&reply), 0);
    let stored = raw.upload(blob, 0, data).await;
    assert_eq!(
        stored,
        Reply::BlobStored {
            blob,
            length: data.len() as u64
        }
    );
}

async fn download(raw: &mut Raw, id: u64, blob: BlobId, offset: u64) -> Vec<u8> {
    let reply = raw.call(id, Request::DownloadBlob { blob, offset }).await;
    assert!(
        matches!(reply, Reply::BlobDownload { blob: b, offset: o, .. } if b == blob && o == offset),
        "{reply:?}"
    );
    let (header, data) = raw.blob_stream().await;
    assert_eq!((header.blob, header.offset), (blob, offset));
    assert_eq!(header.length, offset + data.len() as u64);
    data
}

/// Polls until `path` is gone (the sweeper runs on its own schedule).
async fn wait_gone(path: &std::path::Path, within: Duration) {
    let deadline = Instant::now() + within;
    while path.exists() {
        assert!(Instant::now() < deadline, "{} still exists", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_blob_downloads_identically_for_its_reader_and_its_owner() {
    let server = TestServer::start().await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([1; 16]);
    // Larger than a stream's receive window (128 KiB) and not a multiple of anything.
    let data = bytes(700_001, 1);
    store_blob(&mut alice, blob, &data, &["bob"]).await;

    let file = blob_file(&server, blob);
    assert_eq!(std::fs::read(&file).unwrap(), data);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    assert!(download(&mut bob, 20, blob, 0).await == data);
    assert!(download(&mut bob, 21, blob, 123_457).await == data[123_457..]);
    assert!(
        download(&mut bob, 22, blob, data.len() as u64)
            .await
            .is_empty()
    );
    assert!(download(&mut alice, 23, blob, 0).await == data);
    // Announcing it again says it is whole.
    let again = announce(&mut alice, 24, blob, data.len() as u64, &["bob"]).await;
    assert_eq!(held(&again), data.len() as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_over_the_limit_is_refused_before_its_body() {
    let server = TestServer::start_with(|c| c.max_blob_bytes = 1000).await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([2; 16]);
    let refused = announce(&mut alice, 10, blob, 1001, &["bob"]).await;
    assert_eq!(error_code(&refused), ErrorCode::BlobTooLarge);
    // Nothing was stored: an upload stream for it finds no blob.
    let failed = alice.upload(blob, 0, &[7; 10]).await;
    assert!(
        matches!(
            failed,
            Reply::UploadFailed {
                code: ErrorCode::UnknownBlob,
                held: 0,
                ..
            }
        ),
        "{failed:?}"
    );
    assert!(!blob_file(&server, blob).exists());
    // At the limit it is fine; a stream carrying more than the length is cut off.
    assert_eq!(
        held(&announce(&mut alice, 11, blob, 1000, &["bob"]).await),
        0
    );
    let failed = alice.upload(blob, 0, &[7; 1500]).await;
    assert!(
        matches!(
            failed,
            Reply::UploadFailed {
                code: ErrorCode::BlobTooLarge,
                ..
            }
        ),
        "{failed:?}"
    );
    // Other refusals of `upload_blob`.
    let cases: [(&[&str], u64, ErrorCode); 5] = [
        (&[], 10, ErrorCode::BadRequest),
        (&["alice"], 10, ErrorCode::BadRequest),
        (&["bob", "bob"], 10, ErrorCode::BadRequest),
        (&["nobody"], 10, ErrorCode::UnknownUser),
        (&["bob"], 0, ErrorCode::BadRequest),
    ];
    for (n, (readers, length, code)) in cases.into_iter().enumerate() {
        let reply = announce(&mut alice, 20 + n as u64, BlobId([3; 16]), length, readers).await;
        assert_eq!(error_code(&reply), code, "{readers:?} {length}");
    }
    // Someone else's id, or this id with another length.
    let mut carol = Raw::signed_up(&server, "carol").await;
    let taken = announce(&mut carol, 30, blob, 1000, &["bob"]).await;
    assert_eq!(error_code(&taken), ErrorCode::BlobExists);
    let other_length = announce(&mut alice, 31, blob, 999, &["bob"]).await;
    assert_eq!(error_code(&other_length), ErrorCode::BlobExists);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaders_blobs_stay_within_its_quota() {
    let server = TestServer::start_with(|c| c.blob_quota_bytes = 2000).await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    // A partial blob counts its whole length.
    assert_eq!(
        held(&announce(&mut alice, 10, BlobId([1; 16]), 1500, &["bob"]).await),
        0
    );
    let over = announce(&mut alice, 11, BlobId([2; 16]), 501, &["bob"]).await;
    assert_eq!(error_code(&over), ErrorCode::BlobQuota);
    assert_eq!(
        held(&announce(&mut alice, 12, BlobId([2; 16]), 500, &["bob"]).await),
        0
    );
    let full = announce(&mut alice, 13, BlobId([3; 16]), 1, &["bob"]).await;
    assert_eq!(error_code(&full), ErrorCode::BlobQuota);
    // Another uploader is not held back by alice's blobs.
    let mut carol = Raw::signed_up(&server, "carol").await;
    assert_eq!(
        held(&announce(&mut carol, 10, BlobId([4; 16]), 2000, &["bob"]).await),
        0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_start_at_held_is_refused() {
    let server = TestServer::start().await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([5; 16]);
    let data = bytes(5000, 5);
    assert_eq!(
        held(&announce(&mut alice, 10, blob, 5000, &["bob"]).await),
        0
    );
    let failed = alice.upload(blob, 100, &data[100..]).await;
    assert!(
        matches!(
            failed,
            Reply::UploadFailed {
                code: ErrorCode::BadOffset,
                held: 0,
                ..
            }
        ),
        "{failed:?}"
    );
    assert_eq!(
        alice.upload(blob, 0, &data).await,
        Reply::BlobStored { blob, length: 5000 }
    );
    // Complete: nothing more is taken.
    let failed = alice.upload(blob, 5000, &[]).await;
    assert!(
        matches!(
            failed,
            Reply::UploadFailed {
                code: ErrorCode::UnknownBlob,
                held: 5000,
                ..
            }
        ),
        "{failed:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_halfway_resumes_from_held() {
    let server = TestServer::start().await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([6; 16]);
    let data = bytes(2 * 1024 * 1024 + 17, 6);
    let half = data.len() / 2;
    assert_eq!(
        held(&announce(&mut alice, 10, blob, data.len() as u64, &["bob"]).await),
        0
    );

    // FIN at half: what arrived is kept and synced.
    let failed = alice.upload(blob, 0, &data[..half]).await;
    assert!(
        matches!(failed, Reply::UploadFailed { code: ErrorCode::TruncatedFrame, held, .. } if held == half as u64),
        "{failed:?}"
    );
    assert_eq!(
        held(&announce(&mut alice, 11, blob, data.len() as u64, &[]).await),
        half as u64
    );
    // Not complete: nobody can fetch it yet.
    let early = bob
        .call(20, Request::DownloadBlob { blob, offset: 0 })
        .await;
    assert_eq!(error_code(&early), ErrorCode::UnknownBlob);

    // A stream reset a quarter further on: the server keeps what it read, in order.
    let mut stream = alice.upload_stream(blob, half as u64).await;
    stream
        .write_all(&data[half..half + half / 2])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.reset(quinn::VarInt::from_u32(1)).unwrap();
    let failed = alice.event().await;
    let Reply::UploadFailed {
        code: ErrorCode::TruncatedFrame,
        held: after_reset,
        ..
    } = failed
    else {
        panic!("{failed:?}");
    };
    assert!((half as u64..=(half + half / 2) as u64).contains(&after_reset));
    let resumed = held(&announce(&mut alice, 12, blob, data.len() as u64, &["bob"]).await);
    assert_eq!(resumed, after_reset);
    assert_eq!(
        std::fs::metadata(blob_file(&server, blob)).unwrap().len(),
        resumed
    );

    let rest = &data[resumed as usize..];
    assert_eq!(
        alice.upload(blob, resumed, rest).await,
        Reply::BlobStored {
            blob,
            length: data.len() as u64
        }
    );
    assert!(download(&mut bob, 21, blob, 0).await == data);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_readers_and_the_uploader_learn_of_a_blob() {
    let server = TestServer::start().await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let mut carol = Raw::signed_up(&server, "carol").await;
    let blob = BlobId([7; 16]);
    store_blob(&mut alice, blob, &bytes(1000, 7), &["bob"]).await;
    for (id, request) in [
        (10, Request::DownloadBlob { blob, offset: 0 }),
        (11, Request::AckBlob { blob }),
        (
            12,
            Request::DownloadBlob {
                blob: BlobId([8; 16]),
                offset: 0,
            },
        ),
    ] {
        let reply = carol.call(id, request).await;
        assert_eq!(error_code(&reply), ErrorCode::UnknownBlob);
    }
    // Carol cannot write into it either: the same answer as for no blob at all.
    let failed = carol.upload(blob, 1000, &[]).await;
    assert!(
        matches!(
            failed,
            Reply::UploadFailed {
                code: ErrorCode::UnknownBlob,
                held: 0,
                ..
            }
        ),
        "{failed:?}"
    );
    let past_end = alice
        .call(13, Request::DownloadBlob { blob, offset: 1001 })
        .await;
    assert_eq!(error_code(&past_end), ErrorCode::BadRequest);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_goes_once_every_device_it_was_for_has_acknowledged_it() {
    let server = TestServer::start().await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let mut carol = Raw::signed_up(&server, "carol").await;
    let blob = BlobId([9; 16]);
    let data = bytes(70_000, 9);
    store_blob(&mut alice, blob, &data, &["bob", "carol"]).await;
    let file = blob_file(&server, blob);

    assert!(download(&mut bob, 10, blob, 0).await == data);
    // The uploader's ack counts for nothing: its device was not among those snapshotted.
    assert_eq!(
        alice.call(11, Request::AckBlob { blob }).await,
        Reply::BlobAcked { blob }
    );
    assert_eq!(
        bob.call(12, Request::AckBlob { blob }).await,
        Reply::BlobAcked { blob }
    );
    assert!(file.exists(), "carol has not fetched it yet");
    assert!(download(&mut carol, 13, blob, 0).await == data);
    assert_eq!(
        carol.call(14, Request::AckBlob { blob }).await,
        Reply::BlobAcked { blob }
    );
    assert!(!file.exists());
    let gone = bob
        .call(15, Request::DownloadBlob { blob, offset: 0 })
        .await;
    assert_eq!(error_code(&gone), ErrorCode::UnknownBlob);
    let gone = carol.call(16, Request::AckBlob { blob }).await;
    assert_eq!(error_code(&gone), ErrorCode::UnknownBlob);
    // The id is free again, and so is the quota it took.
    assert_eq!(held(&announce(&mut alice, 17, blob, 10, &["bob"]).await), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_blob_expires_with_the_message_lifetime() {
    let server = TestServer::start_with(|c| {
        c.message_ttl = Duration::from_secs(1);
        c.blob_sweep_interval = Duration::from_millis(200);
    })
    .await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([10; 16]);
    store_blob(&mut alice, blob, &bytes(3000, 10), &["bob"]).await;
    let file = blob_file(&server, blob);
    assert!(file.exists());
    // Completed_at is in whole seconds: up to 2 s, then a sweep.
    wait_gone(&file, Duration::from_secs(5)).await;
    let gone = bob
        .call(10, Request::DownloadBlob { blob, offset: 0 })
        .await;
    assert_eq!(error_code(&gone), ErrorCode::UnknownBlob);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_is_swept_after_the_upload_lifetime() {
    let server = TestServer::start_with(|c| {
        c.blob_upload_ttl = Duration::from_secs(1);
        c.blob_sweep_interval = Duration::from_millis(200);
    })
    .await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([11; 16]);
    let data = bytes(4000, 11);
    assert_eq!(
        held(&announce(&mut alice, 10, blob, 4000, &["bob"]).await),
        0
    );
    let failed = alice.upload(blob, 0, &data[..1000]).await;
    assert!(
        matches!(failed, Reply::UploadFailed { held: 1000, .. }),
        "{failed:?}"
    );
    let file = blob_file(&server, blob);
    assert!(file.exists());
    wait_gone(&file, Duration::from_secs(5)).await;
    // Its record went first: announcing it again starts over.
    assert_eq!(
        held(&announce(&mut alice, 11, blob, 4000, &["bob"]).await),
        0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_streams_beyond_the_connections_limit_are_busy() {
    let server = TestServer::start().await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let done = BlobId([19; 16]);
    store_blob(&mut alice, done, &[9; 50], &["bob"]).await;
    let mut streams = Vec::new();
    for n in 0..5u8 {
        let blob = BlobId([20 + n; 16]);
        assert_eq!(
            held(&announce(&mut alice, 10 + u64::from(n), blob, 100, &["bob"]).await),
            0
        );
        if n < 4 {
            let mut stream = alice.upload_stream(blob, 0).await;
            stream.write_all(&[n; 10]).await.unwrap();
            streams.push((blob, stream));
        }
    }
    // The four are being read (and hold their slots) before the fifth comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fifth = BlobId([24; 16]);
    let failed = alice.upload(fifth, 0, &[4; 100]).await;
    assert!(
        matches!(failed, Reply::UploadFailed { code: ErrorCode::Busy, blob, .. } if blob == fifth),
        "{failed:?}"
    );
    // Downloads count against the same limit.
    let busy = alice
        .call(
            30,
            Request::DownloadBlob {
                blob: done,
                offset: 0,
            },
        )
        .await;
    assert_eq!(error_code(&busy), ErrorCode::Busy);
    // One ends: a new stream goes through.
    let (first, mut stream) = streams.remove(0);
    stream.write_all(&[0; 90]).await.unwrap();
    stream.finish().unwrap();
    assert_eq!(
        alice.event().await,
        Reply::BlobStored {
            blob: first,
            length: 100
        }
    );
    assert_eq!(
        alice.upload(fifth, 0, &[4; 100]).await,
        Reply::BlobStored {
            blob: fifth,
            length: 100
        }
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_limit_on_blob_streams_holds_across_connections() {
    let server = TestServer::start_with(|c| c.max_blob_streams = 1).await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let mut carol = Raw::signed_up(&server, "carol").await;
    let (first, second) = (BlobId([30; 16]), BlobId([31; 16]));
    assert_eq!(
        held(&announce(&mut alice, 10, first, 100, &["bob"]).await),
        0
    );
    assert_eq!(
        held(&announce(&mut carol, 10, second, 100, &["bob"]).await),
        0
    );
    let mut open = alice.upload_stream(first, 0).await;
    open.write_all(&[1; 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed = carol.upload(second, 0, &[2; 100]).await;
    assert!(
        matches!(
            failed,
            Reply::UploadFailed {
                code: ErrorCode::Busy,
                held: 0,
                ..
            }
        ),
        "{failed:?}"
    );
    drop(open);
    server.stop().await;
}

/// A blob 200 times a stream's receive window goes to disk while it arrives: before the
/// uploader has sent its end, the server has synced and recorded most of it, and the file
/// holds it. (The server's memory while doing so is measured by the RSS tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_is_written_to_disk_as_it_arrives() {
    let server = TestServer::start().await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([40; 16]);
    let data = bytes(25 * 1024 * 1024 + 3, 40);
    let length = data.len() as u64;
    assert_eq!(
        held(&announce(&mut alice, 10, blob, length, &["bob"]).await),
        0
    );
    let mut stream = alice.upload_stream(blob, 0).await;
    let sent = 20 * 1024 * 1024;
    stream.write_all(&data[..sent]).await.unwrap();
    // Synced every 8 MiB: 16 MiB of the 20 sent is recorded once the server caught up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut request = 11;
    loop {
        let now_held = held(&announce(&mut alice, request, blob, length, &["bob"]).await);
        request += 1;
        if now_held >= 16 * 1024 * 1024 {
            assert!(now_held <= sent as u64);
            break;
        }
        assert!(Instant::now() < deadline, "held only {now_held}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_disk = std::fs::metadata(blob_file(&server, blob)).unwrap().len();
    assert!(on_disk >= 16 * 1024 * 1024, "{on_disk} bytes on disk");
    stream.write_all(&data[sent..]).await.unwrap();
    stream.finish().unwrap();
    assert_eq!(alice.event().await, Reply::BlobStored { blob, length });
    assert!(download(&mut bob, 50, blob, 0).await == data);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_removes_files_without_records_and_cuts_partial_ones_to_held() {
    let server = TestServer::start().await;
    let _bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([50; 16]);
    let data = bytes(3000, 50);
    assert_eq!(
        held(&announce(&mut alice, 10, blob, 3000, &["bob"]).await),
        0
    );
    let failed = alice.upload(blob, 0, &data[..1200]).await;
    assert!(
        matches!(failed, Reply::UploadFailed { held: 1200, .. }),
        "{failed:?}"
    );
    drop(alice);
    let partial = blob_file(&server, blob);
    let orphan = blob_file(&server, BlobId([51; 16]));
    let addr = server.addr;
    let dir = server.stop().await;
    // Bytes written after the last sync (a crash), and a file whose record never was.
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .unwrap()
        .write_all(&[0xFF; 500])
        .unwrap();
    std::fs::write(&orphan, b"no record").unwrap();

    let server = TestServer::start_at(addr, dir, |_| {}).await;
    assert!(!orphan.exists());
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 1200);
    let mut alice = Raw::with_hello(&server).await;
    let login = Request::Login {
        username: "alice".into(),
        password: securefastchat::protocol::Password::new(common::PASSWORD),
        device: None,
    };
    assert!(matches!(alice.call(2, login).await, Reply::Session { .. }));
    assert_eq!(held(&announce(&mut alice, 10, blob, 3000, &[]).await), 1200);
    assert_eq!(
        alice.upload(blob, 1200, &data[1200..]).await,
        Reply::BlobStored { blob, length: 3000 }
    );
    assert_eq!(std::fs::read(&partial).unwrap(), data);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_whose_readers_are_deleted_is_swept() {
    let server =
        TestServer::start_with(|c| c.blob_sweep_interval = Duration::from_millis(200)).await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let blob = BlobId([60; 16]);
    store_blob(&mut alice, blob, &bytes(2000, 60), &["bob"]).await;
    let file = blob_file(&server, blob);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(file.exists(), "bob's device still needs it");
    let delete = Request::DeleteAccount {
        password: securefastchat::protocol::Password::new(common::PASSWORD),
    };
    assert!(matches!(
        bob.call(30, delete).await,
        Reply::AccountDeleted { .. }
    ));
    wait_gone(&file, Duration::from_secs(5)).await;
    server.stop().await;
}

/// A peer that opens blob streams and goes quiet does not keep the server's slots: an upload
/// that brings no bytes, and a download whose bytes are not taken, are given up after the
/// idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_blob_streams_give_their_slots_back() {
    let server = TestServer::start_with(|c| {
        c.max_blob_streams = 1;
        c.blob_stream_idle = Duration::from_millis(500);
    })
    .await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let big = BlobId([70; 16]);
    let data = bytes(2 * 1024 * 1024, 70);
    store_blob(&mut alice, big, &data, &["bob"]).await;

    let quiet = BlobId([71; 16]);
    assert_eq!(
        held(&announce(&mut alice, 20, quiet, 100, &["bob"]).await),
        0
    );
    let mut stream = alice.upload_stream(quiet, 0).await;
    stream.write_all(&[1; 10]).await.unwrap();
    let failed = alice.event().await;
    assert!(
        matches!(
            failed,
            Reply::UploadFailed {
                code: ErrorCode::TruncatedFrame,
                held: 10,
                ..
            }
        ),
        "{failed:?}"
    );

    // A download nobody reads: the server's writes stop at the stream's window.
    let reply = bob
        .call(
            30,
            Request::DownloadBlob {
                blob: big,
                offset: 0,
            },
        )
        .await;
    assert!(matches!(reply, Reply::BlobDownload { .. }), "{reply:?}");
    let unread = bob.conn.accept_uni().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(download(&mut bob, 31, big, 0).await == data);
    drop(unread);
    server.stop().await;
}
