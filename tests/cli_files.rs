//! `sfc send-file` and `sfc recv --into` as a user runs them: the file arrives whole under a
//! safe name, a name already in use is numbered, names that could climb out of the directory
//! or act on the terminal are made inert, and `--json` describes the file.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use common::cli::{People, read_until, run, stderr, stdout};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sha(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `sfc send-file` as `from`; returns the message id it printed.
async fn send_file(people: &People, from: &str, to: &str, path: &Path) -> String {
    let out = run(people.sfc(from, &["send-file", to, path.to_str().unwrap()])).await;
    assert!(out.status.success(), "{out:?}");
    let id = stdout(&out);
    assert_eq!(id.trim().len(), 32, "{id:?}");
    assert!(stderr(&out).is_empty(), "{out:?}");
    id.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_with_sfc_is_saved_by_recv_into_a_directory() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let files = tempfile::tempdir().unwrap();
    let downloads = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let source = files.path().join("report.pdf");
    std::fs::write(&source, &data).unwrap();

    // bob offline: the file waits for him; --into a directory not made yet makes it.
    send_file(&people, "alice", "bob", &source).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let fresh = elsewhere.path().join("new").join("dir");
    let out = run(people.sfc("bob", &["recv", "--into", fresh.to_str().unwrap()])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "alice\tfile: report.pdf (195.3 KiB)\n");
    assert_eq!(
        sha(&std::fs::read(fresh.join("report.pdf")).unwrap()),
        sha(&data)
    );
    std::fs::copy(
        fresh.join("report.pdf"),
        downloads.path().join("report.pdf"),
    )
    .unwrap();
    let into = downloads.path().to_str().unwrap();

    // bob online (recv running when it is sent), and a name in use: numbered, with JSON.
    let mut waiting = people.sfc("bob", &["recv", "--json", "--wait", "20", "--count", "1"]);
    waiting.arg("--into").arg(downloads.path());
    let receiving = tokio::spawn(run(waiting));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = send_file(&people, "alice", "bob", &source).await;
    let out = receiving.await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let saved = downloads.path().join("report (1).pdf");
    assert_eq!(
        line,
        serde_json::json!({
            "id": id,
            "from": "alice",
            "sent_at": line["sent_at"],
            "file": {
                "name": "report (1).pdf",
                "size": data.len(),
                "type": "application/pdf",
                "path": saved.to_str().unwrap(),
            },
        })
    );
    assert_eq!(sha(&std::fs::read(&saved).unwrap()), sha(&data));
    assert_eq!(listing(downloads.path()), ["report (1).pdf", "report.pdf"]);
    // Nothing more waits.
    let out = run(people.sfc("bob", &["recv", "--wait", "1", "--into", into])).await;
    assert_eq!(stdout(&out), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_are_saved_and_shown_inert() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["mallory", "bob"]).await;
    let files = tempfile::tempdir().unwrap();
    let downloads = tempfile::tempdir().unwrap();
    // Names a Linux file may really have: escapes, a line break, a bidi override, a dot first.
    let names = [
        "\u{1b}[2J\u{1b}]0;pwned\u{7}x.txt",
        "fake\nbob\tlegit",
        "invoice\u{202e}fdp.exe",
        ".profile",
        "..hidden",
    ];
    for name in names {
        let path = files.path().join(name);
        std::fs::write(&path, name.as_bytes()).unwrap();
        send_file(&people, "mallory", "bob", &path).await;
    }
    let into = downloads.path().to_str().unwrap();
    let out = run(people.sfc("bob", &["recv", "--into", into])).await;
    assert!(out.status.success(), "{out:?}");
    let shown = stdout(&out);
    assert!(
        !shown
            .chars()
            .any(|c| (c.is_control() && c != '\n' && c != '\t') || c == '\u{202e}'),
        "{shown:?}"
    );
    assert_eq!(shown.lines().count(), names.len(), "{shown:?}");
    assert!(
        shown.lines().all(|l| l.starts_with("mallory\tfile: ")),
        "{shown:?}"
    );
    let saved = listing(downloads.path());
    assert_eq!(
        saved,
        [
            "_[2J_]0;pwned_x.txt",
            "__hidden",
            "_profile",
            "fake_bob_legit",
            "invoice_fdp.exe",
        ]
    );
    // Each file holds what was sent under its name.
    let mut contents: Vec<Vec<u8>> = saved
        .iter()
        .map(|n| std::fs::read(downloads.path().join(n)).unwrap())
        .collect();
    contents.sort();
    let mut sent: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
    sent.sort();
    assert_eq!(contents, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_file_refuses_what_is_not_a_file_and_unknown_users() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let files = tempfile::tempdir().unwrap();
    let dir = files.path().to_str().unwrap();
    let out = run(people.sfc("alice", &["send-file", "bob", dir])).await;
    common::cli::assert_fails_with(&out, "not a regular file");
    let missing = files.path().join("missing");
    let out = run(people.sfc("alice", &["send-file", "bob", missing.to_str().unwrap()])).await;
    common::cli::assert_fails_with(&out, "missing");
    let path = files.path().join("a.txt");
    std::fs::write(&path, "a").unwrap();
    let out = run(people.sfc("alice", &["send-file", "nobody", path.to_str().unwrap()])).await;
    assert!(!out.status.success(), "{out:?}");
    let out = run(people.sfc("bob", &["recv", "--into", path.to_str().unwrap()])).await;
    common::cli::assert_fails_with(&out, "is not a directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sends_a_file_with_slash_file_and_saves_the_ones_it_receives() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let files = tempfile::tempdir().unwrap();
    let downloads = tempfile::tempdir().unwrap();
    let source = files.path().join("photo.png");
    let data = vec![0x89u8; 70_000];
    std::fs::write(&source, &data).unwrap();
    // bob says something first, so that each has the other's keys when the chats open.
    let out = run(people.sfc("bob", &["send", "alice", "hi"])).await;
    assert!(out.status.success(), "{out:?}");

    let into = downloads.path().to_str().unwrap();
    let mut bob = people.in_terminal("bob", &format!("chat alice --into {into}"));
    let (bob_keys, mut bob_out) = (bob.stdin.take().unwrap(), bob.stdout.take().unwrap());
    let mut bob_seen = String::new();
    read_until(&mut bob_out, &mut bob_seen, "bob> ").await;
    let mut alice = people.in_terminal("alice", "chat bob");
    let (mut alice_keys, mut alice_out) =
        (alice.stdin.take().unwrap(), alice.stdout.take().unwrap());
    let mut alice_seen = String::new();
    read_until(&mut alice_out, &mut alice_seen, "alice> ").await;

    let line = format!("/file {}\r", source.display());
    alice_keys.write_all(line.as_bytes()).await.unwrap();
    read_until(
        &mut alice_out,
        &mut alice_seen,
        "alice: file: photo.png (68.4 KiB)",
    )
    .await;
    read_until(
        &mut bob_out,
        &mut bob_seen,
        "alice: file: photo.png (68.4 KiB)",
    )
    .await;
    assert_eq!(
        std::fs::read(downloads.path().join("photo.png")).unwrap(),
        data
    );

    for (mut keys, mut output, mut child) in
        [(alice_keys, alice_out, alice), (bob_keys, bob_out, bob)]
    {
        keys.write_all(b"\x04").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), output.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(child.wait().await.unwrap().success());
    }
}

/// Links the home `new_home` to `user`'s account from `existing`'s home with `sfc device link`
/// and `sfc device add`, as tests/cli_devices.rs does.
async fn link(people: &People, existing: &str, user: &str, new_home: &str) {
    use tokio::io::AsyncBufReadExt;
    let mut linking = people.sfc(existing, &["device", "link"]);
    linking
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = linking.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let code = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("a link code");
            if let Some(code) = line.strip_prefix("link code: ") {
                return code.to_owned();
            }
        }
    })
    .await
    .unwrap();
    let added = run(people.sfc(
        new_home,
        &["device", "add", user, &code, "--name", "laptop"],
    ))
    .await;
    assert!(added.status.success(), "{added:?}");
    while lines.next_line().await.unwrap().is_some() {}
    assert!(child.wait().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_from_another_device_shows_as_sent_by_me() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    link(&people, "alice", "alice", "alice2").await;
    let files = tempfile::tempdir().unwrap();
    let source = files.path().join("plan.txt");
    std::fs::write(&source, b"the plan").unwrap();
    send_file(&people, "alice", "bob", &source).await;
    for (home, line) in [
        ("alice2", "alice -> bob\tfile: plan.txt (8 bytes)\n"),
        ("bob", "alice\tfile: plan.txt (8 bytes)\n"),
    ] {
        let downloads = tempfile::tempdir().unwrap();
        let into = downloads.path().to_str().unwrap();
        let out = run(people.sfc(home, &["recv", "--into", into])).await;
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout(&out), line, "{home}");
        assert_eq!(
            std::fs::read(downloads.path().join("plan.txt")).unwrap(),
            b"the plan"
        );
    }
}
