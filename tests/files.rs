//! Files through a real server with the client library (docs/PROTOCOL.md 5.6, E15): a file
//! reaches online and offline recipients intact, an upload cut off resumes, a blob that was
//! changed in any way leaves nothing under a final name, and hostile names stay inside the
//! download directory.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{PASSWORD, TestServer};
use securefastchat::client::UploadOutcome;
use securefastchat::client::messenger::{Messenger, MessengerError, Received};
use securefastchat::e2e::{
    ChunkSealer, FILE_CHUNK_LEN, FileError, FileKey, FileRef, SEALED_CHUNK_LEN, sealed_len,
};
use securefastchat::protocol::{BlobId, ErrorCode, Password};
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(10);

/// `len` bytes that do not repeat within a chunk (a xorshift stream seeded by `seed`).
fn contents(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Every entry of `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A messenger that can reconnect (as `sfc` makes them), signed up as `name`.
async fn reconnecting(server: &TestServer, home: &Path, name: &str) -> Messenger {
    let client = server.client().await;
    let (_, token) = client.signup(name, Password::new(PASSWORD)).await.unwrap();
    let messenger =
        Messenger::new(client, home, name)
            .unwrap()
            .with_reconnect(server.options(), token, true);
    messenger.ensure_keys().await.unwrap();
    messenger
}

/// The next message, which must be a file.
async fn next_file(m: &Messenger) -> (Received, FileRef) {
    let received = m.receive(WAIT).await.unwrap().expect("a message");
    match &received {
        Received::File { file, .. } => {
            let file = file.clone();
            (received, file)
        }
        other => panic!("expected a file, got {other:?}"),
    }
}

/// Seals `plaintext` as E15 does, chunk by chunk.
fn seal(key: &FileKey, blob: BlobId, plaintext: &[u8]) -> Vec<Vec<u8>> {
    let mut sealer = ChunkSealer::new(key, blob, plaintext.len() as u64).unwrap();
    let mut chunks = Vec::new();
    let mut at = 0;
    while !sealer.is_done() {
        let len = sealer.next_len();
        chunks.push(sealer.seal(plaintext[at..at + len].to_vec()).unwrap());
        at += len;
    }
    chunks
}

/// Uploads `bytes` as blob `blob` that `readers` may fetch, through the raw client calls.
async fn upload_raw(m: &Messenger, blob: BlobId, bytes: &[u8], readers: &[&str]) {
    let client = m.client();
    let readers = readers.iter().map(|r| r.to_string()).collect();
    let held = client
        .upload_blob(blob, bytes.len() as u64, readers)
        .await
        .unwrap();
    assert_eq!(held, 0);
    let mut stream = client.open_upload(blob, 0).await.unwrap();
    assert!(stream.write(bytes).await.unwrap());
    assert_eq!(
        stream.finish().await.unwrap(),
        UploadOutcome::Stored {
            length: bytes.len() as u64
        }
    );
}

/// A file reference for `plaintext` sealed under `key` as `blob`, named `name`.
fn reference(blob: BlobId, key: &FileKey, plaintext: &[u8], name: &str) -> FileRef {
    FileRef {
        blob,
        key: key.clone(),
        sha256: sha(plaintext),
        size: plaintext.len() as u64,
        name: name.into(),
        content_type: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_reaches_an_online_and_an_offline_recipient_intact() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = server
        .messenger(&homes.path().join("a"), "alice", true)
        .await;
    let bob = server.messenger(&homes.path().join("b"), "bob", true).await;
    let carol = server
        .messenger(&homes.path().join("c"), "carol", true)
        .await;
    carol.close().await;

    // 3 chunks and a bit, and an empty file.
    let data = contents(3 * FILE_CHUNK_LEN + 1234, 7);
    let source = homes.path().join("report.bin");
    std::fs::write(&source, &data).unwrap();
    let empty = homes.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();

    let mut seen = Vec::new();
    let (id, warning) = alice
        .send_file("bob", &source, |done, total| seen.push((done, total)))
        .await
        .unwrap();
    assert!(warning.is_none());
    let length = sealed_len(data.len() as u64).unwrap();
    assert_eq!(seen.last(), Some(&(length, length)));
    alice.send_file("carol", &source, |_, _| {}).await.unwrap();
    alice.send_file("bob", &empty, |_, _| {}).await.unwrap();

    // Online.
    let downloads = tempfile::tempdir().unwrap();
    let (received, file) = next_file(&bob).await;
    let Received::File { id: got, from, .. } = &received else {
        unreachable!()
    };
    assert_eq!((*got, from.as_str()), (id, "alice"));
    assert_eq!(
        (file.name.as_str(), file.size, file.content_type.as_str()),
        ("report.bin", data.len() as u64, "")
    );
    let mut progress = Vec::new();
    let saved = bob
        .download_file(&file, downloads.path(), |done, total| {
            progress.push((done, total))
        })
        .await
        .unwrap();
    bob.shown(&received).await.unwrap();
    assert_eq!(saved, downloads.path().join("report.bin"));
    assert_eq!(sha(&std::fs::read(&saved).unwrap()), sha(&data));
    assert_eq!(
        progress.last(),
        Some(&(data.len() as u64, data.len() as u64))
    );
    let (received, file) = next_file(&bob).await;
    let saved = bob
        .download_file(&file, downloads.path(), |_, _| {})
        .await
        .unwrap();
    bob.shown(&received).await.unwrap();
    assert_eq!(saved, downloads.path().join("empty.txt"));
    assert_eq!(std::fs::read(&saved).unwrap(), b"");
    assert_eq!(listing(downloads.path()), ["empty.txt", "report.bin"]);

    // Offline: carol comes back later; the same name again is numbered, not replaced.
    let carol = server
        .messenger(&homes.path().join("c"), "carol", false)
        .await;
    let (received, file) = next_file(&carol).await;
    assert_eq!(file.sha256, sha(&data));
    let saved = carol
        .download_file(&file, downloads.path(), |_, _| {})
        .await
        .unwrap();
    carol.shown(&received).await.unwrap();
    assert_eq!(saved, downloads.path().join("report (1).bin"));
    assert_eq!(sha(&std::fs::read(&saved).unwrap()), sha(&data));
    assert_eq!(
        sha(&std::fs::read(downloads.path().join("report.bin")).unwrap()),
        sha(&data)
    );
    // Acknowledged by every device that had to fetch it: the blob is gone.
    let again = carol
        .download_file(&file, downloads.path(), |_, _| {})
        .await;
    assert!(
        matches!(&again, Err(MessengerError::Client(e)) if e.is_server(ErrorCode::UnknownBlob)),
        "{again:?}"
    );
    assert_eq!(
        listing(downloads.path()),
        ["empty.txt", "report (1).bin", "report.bin"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_at_half_resumes_with_the_right_digest() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = reconnecting(&server, &homes.path().join("a"), "alice").await;
    let bob = server.messenger(&homes.path().join("b"), "bob", true).await;
    // 20 MiB: the server syncs (and records what it holds) every 8 MiB, and a connection
    // that goes loses what arrived since the last sync, so half of this is past one.
    let data = contents(320 * FILE_CHUNK_LEN + 99, 11);
    let source = homes.path().join("big.dat");
    std::fs::write(&source, &data).unwrap();

    // The connection is cut once the upload is half done.
    let first = alice.client();
    let cut = Arc::new(AtomicBool::new(false));
    let mut resumed_from = None;
    let mut last = 0;
    let (id, _) = alice
        .send_file("bob", &source, |done, total| {
            if !cut.load(Ordering::Relaxed) && done >= total / 2 {
                cut.store(true, Ordering::Relaxed);
                // What is written is only queued: give the connection (driven on the other
                // worker) time to deliver some of it, so that the server holds something.
                std::thread::sleep(Duration::from_millis(500));
                first.connection().close(quinn::VarInt::from_u32(0), b"cut");
            } else if cut.load(Ordering::Relaxed) && done < last && resumed_from.is_none() {
                resumed_from = Some(done);
            }
            last = done;
        })
        .await
        .unwrap();
    assert!(cut.load(Ordering::Relaxed));
    assert!(
        !Arc::ptr_eq(&first, &alice.client()),
        "the upload went on over a new connection"
    );
    // It went on from what the server held, not from the start.
    let total = sealed_len(data.len() as u64).unwrap();
    assert!(
        resumed_from.is_some_and(|from| from > 0),
        "{resumed_from:?}"
    );
    assert!(last == total);

    let (received, file) = next_file(&bob).await;
    let Received::File { id: got, .. } = &received else {
        unreachable!()
    };
    assert_eq!(*got, id);
    let downloads = tempfile::tempdir().unwrap();
    let saved = bob
        .download_file(&file, downloads.path(), |_, _| {})
        .await
        .unwrap();
    assert_eq!(file.sha256, sha(&data));
    assert_eq!(sha(&std::fs::read(saved).unwrap()), sha(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_upload_reset_halfway_resumes_from_held() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = server
        .messenger(&homes.path().join("a"), "alice", true)
        .await;
    let bob = server.messenger(&homes.path().join("b"), "bob", true).await;
    let data = contents(10 * FILE_CHUNK_LEN, 3);
    let (blob, key) = (BlobId::random().unwrap(), FileKey::random().unwrap());
    let sealed = seal(&key, blob, &data).concat();
    let half = sealed.len() / 2 + 77;
    let client = alice.client();
    let readers = vec!["bob".to_owned()];
    let length = sealed.len() as u64;
    assert_eq!(
        client
            .upload_blob(blob, length, readers.clone())
            .await
            .unwrap(),
        0
    );
    let mut stream = client.open_upload(blob, 0).await.unwrap();
    assert!(stream.write(&sealed[..half]).await.unwrap());
    // The half fits in the stream's window, so `write` returns once it is buffered here: cut
    // the stream only when the server has written it (in whole 64 KiB buffers) to its file,
    // as a connection lost mid-upload would.
    let on_disk = server
        .dir
        .path()
        .join("data")
        .join("blobs")
        .join(blob.to_hex());
    let whole_buffers = (half / FILE_CHUNK_LEN * FILE_CHUNK_LEN) as u64;
    for _ in 0..100 {
        let len = std::fs::metadata(&on_disk).map_or(0, |m| m.len());
        if len >= whole_buffers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stream.abandon();
    // The server keeps what arrived (synced at the stream's end) and says so.
    let mut held = 0;
    for _ in 0..50 {
        held = client
            .upload_blob(blob, length, readers.clone())
            .await
            .unwrap();
        if held > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held > 0 && held <= half as u64, "{held}");
    let mut stream = client.open_upload(blob, held).await.unwrap();
    assert!(stream.write(&sealed[held as usize..]).await.unwrap());
    assert_eq!(
        stream.finish().await.unwrap(),
        UploadOutcome::Stored { length }
    );
    let downloads = tempfile::tempdir().unwrap();
    let file = reference(blob, &key, &data, "resumed.bin");
    let saved = bob
        .download_file(&file, downloads.path(), |_, _| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_blob_leaves_nothing_under_a_final_name() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = server
        .messenger(&homes.path().join("a"), "alice", true)
        .await;
    let bob = server.messenger(&homes.path().join("b"), "bob", true).await;
    let downloads = tempfile::tempdir().unwrap();
    let data = contents(3 * FILE_CHUNK_LEN, 5);

    type Mangle = fn(&[Vec<u8>]) -> Vec<u8>;
    let cases: [(&str, Mangle, usize); 6] = [
        (
            "tampered",
            |c| {
                let mut blob = c.concat();
                blob[SEALED_CHUNK_LEN + 9] ^= 0x40;
                blob
            },
            data.len(),
        ),
        (
            "reordered",
            |c| [&c[1], &c[0], &c[2]].map(|x| x.as_slice()).concat(),
            data.len(),
        ),
        (
            "duplicated",
            |c| [&c[0], &c[0], &c[2]].map(|x| x.as_slice()).concat(),
            data.len(),
        ),
        (
            "dropped",
            |c| [&c[0], &c[2], &c[2]].map(|x| x.as_slice()).concat(),
            data.len(),
        ),
        // Two chunks of three, announced as a file of two chunks: the last flag is missing.
        (
            "cut at a chunk",
            |c| [&c[0], &c[1]].map(|x| x.as_slice()).concat(),
            2 * FILE_CHUNK_LEN,
        ),
        // Cut inside a chunk: the blob is shorter than the size says.
        (
            "cut short",
            |c| c.concat()[..2 * SEALED_CHUNK_LEN + 100].to_vec(),
            data.len(),
        ),
    ];
    for (what, mangle, size) in cases {
        let (blob, key) = (BlobId::random().unwrap(), FileKey::random().unwrap());
        let chunks = seal(&key, blob, &data);
        upload_raw(&alice, blob, &mangle(&chunks), &["bob"]).await;
        let file = reference(blob, &key, &data[..size], "victim.txt");
        let result = bob.download_file(&file, downloads.path(), |_, _| {}).await;
        let Err(MessengerError::File(error)) = &result else {
            panic!("{what}: {result:?}");
        };
        match what {
            "cut at a chunk" => assert_eq!(*error, FileError::MissingLastFlag { index: 1 }),
            "cut short" => assert!(matches!(error, FileError::Truncated { .. }), "{error:?}"),
            _ => assert!(
                matches!(error, FileError::BadChunk { .. }),
                "{what}: {error:?}"
            ),
        }
        assert!(listing(downloads.path()).is_empty(), "{what}");
        bob.give_up_file(&file).await.unwrap();
    }

    // Intact chunks under a digest that is not the file's: the same.
    let (blob, key) = (BlobId::random().unwrap(), FileKey::random().unwrap());
    upload_raw(&alice, blob, &seal(&key, blob, &data).concat(), &["bob"]).await;
    let mut file = reference(blob, &key, &data, "victim.txt");
    file.sha256[0] ^= 1;
    let result = bob.download_file(&file, downloads.path(), |_, _| {}).await;
    assert!(
        matches!(result, Err(MessengerError::File(FileError::DigestMismatch))),
        "{result:?}"
    );
    // And a blob sealed for another blob id (moved between blobs).
    let other = BlobId::random().unwrap();
    upload_raw(&alice, other, &seal(&key, blob, &data).concat(), &["bob"]).await;
    let moved = reference(other, &key, &data, "victim.txt");
    let result = bob.download_file(&moved, downloads.path(), |_, _| {}).await;
    assert!(
        matches!(
            result,
            Err(MessengerError::File(FileError::BadChunk { index: 0 }))
        ),
        "{result:?}"
    );
    assert!(listing(downloads.path()).is_empty());
    // The intact blob under its real digest does arrive.
    file.sha256[0] ^= 1;
    let saved = bob
        .download_file(&file, downloads.path(), |_, _| {})
        .await
        .unwrap();
    assert_eq!(listing(downloads.path()), ["victim.txt"]);
    assert_eq!(std::fs::read(saved).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_land_safely_inside_the_directory() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = server
        .messenger(&homes.path().join("a"), "alice", true)
        .await;
    let bob = server.messenger(&homes.path().join("b"), "bob", true).await;
    let outer = tempfile::tempdir().unwrap();
    let downloads = outer.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let data = b"not what it claims".to_vec();
    let names = [
        "../../etc/passwd",
        "/etc/passwd",
        "a/b",
        "..\\..\\boot.ini",
        "..",
        ".",
        ".bashrc",
        "\u{1b}[2J\u{1b}]0;pwned\u{7}title",
        "evil\u{202e}txt.exe",
        "line\nbreak",
        "   ",
    ];
    let mut saved = Vec::<PathBuf>::new();
    for name in names {
        let (blob, key) = (BlobId::random().unwrap(), FileKey::random().unwrap());
        upload_raw(&alice, blob, &seal(&key, blob, &data).concat(), &["bob"]).await;
        let file = reference(blob, &key, &data, name);
        let path = bob
            .download_file(&file, &downloads, |_, _| {})
            .await
            .unwrap();
        assert_eq!(path.parent(), Some(downloads.as_path()), "{name:?}");
        let file_name = path.file_name().unwrap().to_str().unwrap();
        assert!(!file_name.starts_with('.'), "{name:?} -> {file_name:?}");
        assert!(
            !file_name
                .chars()
                .any(|c| c.is_control() || matches!(c, '/' | '\\' | '\u{202e}')),
            "{name:?} -> {file_name:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), data);
        saved.push(path);
    }
    // Nothing was written beside the directory, and every file has a name of its own.
    assert_eq!(listing(outer.path()), ["downloads"]);
    assert_eq!(listing(&downloads).len(), names.len());
    let names_saved: Vec<String> = saved
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names_saved.contains(&"_etc_passwd".to_owned()),
        "{names_saved:?}"
    );
    assert!(names_saved.contains(&"file".to_owned()), "{names_saved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_off_resumes_from_the_last_verified_chunk() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = server
        .messenger(&homes.path().join("a"), "alice", true)
        .await;
    let bob = reconnecting(&server, &homes.path().join("b"), "bob").await;
    let data = contents(30 * FILE_CHUNK_LEN + 5, 13);
    let source = homes.path().join("movie.mp4");
    std::fs::write(&source, &data).unwrap();
    alice.send_file("bob", &source, |_, _| {}).await.unwrap();
    let (received, file) = next_file(&bob).await;
    assert_eq!(file.content_type, "video/mp4");
    let downloads = tempfile::tempdir().unwrap();
    let first = bob.client();
    let mut cut = false;
    let mut after_cut = Vec::new();
    let saved = bob
        .download_file(&file, downloads.path(), |done, total| {
            if cut {
                after_cut.push(done);
            } else if done >= total / 2 {
                cut = true;
                first.connection().close(quinn::VarInt::from_u32(0), b"cut");
            }
        })
        .await
        .unwrap();
    assert!(cut);
    assert!(!Arc::ptr_eq(&first, &bob.client()));
    // The next verified bytes came after the half: nothing was fetched twice into the file.
    assert!(
        after_cut
            .first()
            .is_some_and(|&d| d > data.len() as u64 / 2),
        "{after_cut:?}"
    );
    assert_eq!(sha(&std::fs::read(&saved).unwrap()), sha(&data));
    assert_eq!(listing(downloads.path()), ["movie.mp4"]);
    bob.shown(&received).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_saved_by_a_run_that_ended_before_showing_it_is_not_fetched_again() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = server
        .messenger(&homes.path().join("a"), "alice", true)
        .await;
    let bob = server.messenger(&homes.path().join("b"), "bob", true).await;
    let source = homes.path().join("once.txt");
    std::fs::write(&source, b"only once").unwrap();
    alice.send_file("bob", &source, |_, _| {}).await.unwrap();
    let downloads = tempfile::tempdir().unwrap();
    let (_, file) = next_file(&bob).await;
    let first = bob
        .download_file(&file, downloads.path(), |_, _| {})
        .await
        .unwrap();
    // The run ends here, before the message is shown.
    bob.close().await;
    let bob = server
        .messenger(&homes.path().join("b"), "bob", false)
        .await;
    let (received, again) = next_file(&bob).await;
    assert!(
        matches!(received, Received::File { seq: None, .. }),
        "{received:?}"
    );
    assert_eq!(again, file);
    let second = bob
        .download_file(&again, downloads.path(), |_, _| {})
        .await
        .unwrap();
    assert_eq!(second, first);
    bob.shown(&received).await.unwrap();
    assert_eq!(listing(downloads.path()), ["once.txt"]);
    // The server's redelivery is a duplicate, and nothing more comes.
    while let Some(more) = bob.receive(Duration::from_secs(1)).await.unwrap() {
        assert_eq!(more, Received::Duplicate);
    }
}
