//! End to end through the built binaries: `sfc` against an in-process server, and the
//! `sfc-server` binary itself (dev certificates, SIGTERM, restart).

mod common;

use std::path::Path;

use std::time::Duration;

use common::cli::{
    ServerProcess, assert_fails_with, read_until, run, sfc, stderr, stdout, tight_inboxes,
};
use common::{PASSWORD, TestServer};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_signs_up_logs_in_and_out() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let ca = server.ca_file();
    let homes = tempfile::tempdir().unwrap();
    let home = homes.path().join("alice");
    let with_password = |password: &str| {
        let mut command = sfc(&addr, &ca, &home);
        command.env("SFC_PASSWORD", password);
        command
    };

    let mut signup = with_password(PASSWORD);
    signup.args(["signup", "Alice"]);
    let out = run(signup).await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("alice"));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&home.join("session.toml")), 0o600);
    }

    let mut whoami = sfc(&addr, &ca, &home);
    whoami.arg("whoami");
    let out = run(whoami).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "alice");

    let mut taken = with_password(PASSWORD);
    taken.args(["signup", "alice"]);
    assert_fails_with(&run(taken).await, "taken");

    let mut wrong = with_password("not the password");
    wrong.args(["login", "alice"]);
    assert_fails_with(&run(wrong).await, "invalid credentials");

    let mut no_password = sfc(&addr, &ca, &home);
    no_password.args(["login", "alice"]);
    assert_fails_with(&run(no_password).await, "SFC_PASSWORD");

    let mut logout = sfc(&addr, &ca, &home);
    logout.arg("logout");
    let out = run(logout).await;
    assert!(out.status.success(), "{out:?}");

    let mut whoami = sfc(&addr, &ca, &home);
    whoami.arg("whoami");
    assert_fails_with(&run(whoami).await, "not logged in");

    let mut login = with_password(PASSWORD);
    login.args(["login", "ALICE"]);
    let out = run(login).await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("logged in as alice"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_explains_untrusted_certificates_and_unreachable_servers() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    securefastchat::tls::DevCertificates::generate(&[])
        .unwrap()
        .write_to(dir.path())
        .unwrap();
    let home = dir.path().join("home");

    let mut untrusted = sfc(&server.addr.to_string(), &dir.path().join("ca.crt"), &home);
    untrusted
        .env("SFC_PASSWORD", PASSWORD)
        .args(["login", "alice"]);
    assert_fails_with(&run(untrusted).await, "certificate not trusted");

    let mut missing_ca = sfc(
        &server.addr.to_string(),
        &dir.path().join("nope.crt"),
        &home,
    );
    missing_ca
        .env("SFC_PASSWORD", PASSWORD)
        .args(["login", "alice"]);
    assert_fails_with(&run(missing_ca).await, "nope.crt");

    // Nothing listens on a port we bound and released ourselves.
    let free = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut unreachable = sfc(&free.to_string(), &server.ca_file(), &home);
    unreachable
        .env("SFC_PASSWORD", PASSWORD)
        .args(["login", "alice"]);
    assert_fails_with(&run(unreachable).await, "unreachable");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_binary_makes_dev_certificates_stops_on_sigterm_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let ca = dir.path().join("certs").join("ca.crt");

    let server = ServerProcess::start(dir.path()).await;
    assert!(ca.exists());
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("dev mode"))
    );
    let mut signup = sfc(&server.addr, &ca, &home);
    signup.env("SFC_PASSWORD", PASSWORD).args(["signup", "bob"]);
    let out = run(signup).await;
    assert!(out.status.success(), "{out:?}");
    let log = server.terminate().await;
    assert!(log.iter().any(|l| l.contains("store flushed")), "{log:?}");

    let server = ServerProcess::start(dir.path()).await;
    let mut whoami = sfc(&server.addr, &ca, &home);
    whoami.arg("whoami");
    let out = run(whoami).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "bob");
    let mut login = sfc(&server.addr, &ca, &home);
    login.env("SFC_PASSWORD", PASSWORD).args(["login", "bob"]);
    assert!(run(login).await.status.success());
    server.terminate().await;
}

#[tokio::test]
async fn gen_certs_writes_the_three_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = run({
        let mut command = Command::new(env!("CARGO_BIN_EXE_sfc-server"));
        command
            .args(["gen-certs", "--dir"])
            .arg(dir.path())
            .args(["--san", "chat.example"]);
        command
    })
    .await;
    assert!(out.status.success(), "{out:?}");
    for file in ["ca.crt", "server.crt", "server.key"] {
        assert!(dir.path().join(file).exists(), "{file}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_message_survives_a_server_crash_and_arrives_once() {
    use securefastchat::client::{Client, ClientOptions};
    use securefastchat::protocol::{MessageId, Password};

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("certs").join("ca.crt");
    let server = ServerProcess::start(dir.path()).await;
    let options = ClientOptions::new(server.addr.clone(), &ca);
    let alice = Client::connect(&options).await.unwrap();
    alice
        .signup("alice", Password::new(PASSWORD))
        .await
        .unwrap();
    let bob = Client::connect(&options).await.unwrap();
    let (_, bob_token) = bob.signup("bob", Password::new(PASSWORD)).await.unwrap();
    bob.close().await;

    alice
        .send_message("bob", "text", MessageId([5; 16]), b"durable")
        .await
        .unwrap();
    // SIGKILL right after the acknowledgement: no graceful shutdown, no flush.
    let mut child = server.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    drop(alice);

    let server = ServerProcess::start(dir.path()).await;
    let options = ClientOptions::new(server.addr.clone(), &ca);
    let bob = Client::connect(&options).await.unwrap();
    bob.resume(bob_token).await.unwrap();
    let got = bob
        .next_delivery(Duration::from_secs(5))
        .await
        .expect("the message survived");
    assert_eq!(
        (got.id, got.body.as_slice()),
        (MessageId([5; 16]), &b"durable"[..])
    );
    bob.ack(vec![got.seq]).await.unwrap();
    assert!(
        bob.next_delivery(Duration::from_millis(300))
            .await
            .is_none(),
        "exactly once"
    );
    server.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_sends_and_receives_end_to_end() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let ca = server.ca_file();
    let homes = tempfile::tempdir().unwrap();
    let (alice, bob) = (homes.path().join("alice"), homes.path().join("bob"));
    let sfc_as = |home: &Path, args: &[&str]| {
        let mut command = sfc(&addr, &ca, home);
        command.env("SFC_PASSWORD", PASSWORD).args(args);
        command
    };
    assert!(
        run(sfc_as(&alice, &["signup", "alice"]))
            .await
            .status
            .success()
    );
    assert!(run(sfc_as(&bob, &["signup", "bob"])).await.status.success());

    let out = run(sfc_as(&alice, &["send", "bob", "hello bob"])).await;
    assert!(out.status.success(), "{out:?}");
    let id = stdout(&out).trim().to_owned();
    assert_eq!(id.len(), 32, "{id}");

    let out = run(sfc_as(
        &bob,
        &["recv", "--json", "--count", "1", "--wait", "5"],
    ))
    .await;
    assert!(out.status.success(), "{out:?}");
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(line["id"], id.as_str());
    assert_eq!(line["from"], "alice");
    assert_eq!(line["text"], "hello bob");
    assert!(line["sent_at"].as_u64().unwrap() > 1_700_000_000);

    // Two sfc processes on one home directory at once: the keystore must survive both.
    let first = sfc_as(&alice, &["send", "bob", "one"]).output();
    let second = sfc_as(&alice, &["send", "bob", "two"]).output();
    let (first, second) = tokio::join!(first, second);
    assert!(first.unwrap().status.success());
    assert!(second.unwrap().status.success());
    let out = run(sfc_as(&bob, &["recv", "--count", "2", "--wait", "5"])).await;
    let mut lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["alice\tone", "alice\ttwo"]);

    let out = run(sfc_as(&bob, &["online", "alice"])).await;
    assert_eq!(stdout(&out).trim(), "offline");
    assert_fails_with(&run(sfc_as(&alice, &["online", "carol"])).await, "private");

    let a = run(sfc_as(&alice, &["fingerprint", "bob"])).await;
    let b = run(sfc_as(&bob, &["fingerprint", "alice"])).await;
    assert_eq!(stdout(&a), stdout(&b));
    assert_eq!(stdout(&a).split_whitespace().count(), 12);

    // Unsend before delivery succeeds; after delivery it says so and fails.
    let out = run(sfc_as(&alice, &["send", "bob", "oops"])).await;
    let oops = stdout(&out).trim().to_owned();
    assert!(
        run(sfc_as(&alice, &["unsend", &oops]))
            .await
            .status
            .success()
    );
    let out = run(sfc_as(&bob, &["recv", "--wait", "1"])).await;
    assert_eq!(stdout(&out), "");
    assert_fails_with(
        &run(sfc_as(&alice, &["unsend", &oops])).await,
        "not deleted",
    );
    assert_fails_with(
        &run(sfc_as(&alice, &["unsend", "xyz"])).await,
        "32 hex digits",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_server_cannot_take_waits_in_the_outbox_and_arrives_later() {
    let (server, people) = tight_inboxes(&["alice", "bob", "carol"]).await;
    let sfc_as = |name: &str, args: &[&str]| people.sfc(name, args);

    let out = run(sfc_as("alice", &["send", "bob", "first"])).await;
    assert!(out.status.success(), "{out:?}");
    // Bob's inbox holds one message: the second is sealed, refused, and kept.
    let out = run(sfc_as("alice", &["send", "bob", "second"])).await;
    assert_fails_with(&out, "waits in the outbox");
    assert!(stderr(&out).contains("inbox_full"), "{out:?}");
    let out = run(sfc_as("alice", &["send", "bob", "third"])).await;
    assert_fails_with(&out, "waits in the outbox");
    // Another peer is not held back.
    let out = run(sfc_as("alice", &["send", "carol", "hi carol"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(sfc_as("alice", &["outbox"])).await;
    assert_fails_with(&out, "2 messages still wait");
    assert_eq!(stdout(&out).lines().count(), 2, "{out:?}");
    assert!(stdout(&out).lines().all(|l| l.starts_with("bob\t")));

    let out = run(sfc_as("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\tfirst\n");
    let out = run(sfc_as("alice", &["outbox"])).await;
    assert!(
        !out.status.success(),
        "one fits, the next is refused: {out:?}"
    );
    assert_eq!(stderr(&out).matches("it waited in the outbox").count(), 1);
    let out = run(sfc_as("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\tsecond\n");
    // The next send takes what waited first, in order.
    let out = run(sfc_as("alice", &["send", "bob", "fourth"])).await;
    assert!(!out.status.success(), "{out:?}");
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].ends_with("to bob (it waited in the outbox)"),
        "{err}"
    );
    assert!(lines[1].contains("waits in the outbox"), "{err}");
    let out = run(sfc_as("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\tthird\n");
    let out = run(sfc_as("alice", &["outbox"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "");
    let out = run(sfc_as("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\tfourth\n");
    let out = run(sfc_as("carol", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\thi carol\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_chat_sends_what_waited_in_the_outbox_once_the_recipient_has_room() {
    use tokio::io::AsyncWriteExt;
    let (server, people) = tight_inboxes(&["alice", "bob"]).await;
    let sfc_as = |name: &str, args: &[&str]| people.sfc(name, args);
    assert!(
        run(sfc_as("alice", &["send", "bob", "first"]))
            .await
            .status
            .success()
    );

    // `sfc chat` needs a terminal.
    let mut chat = people.in_terminal("alice", "chat bob");
    let mut keys = chat.stdin.take().unwrap();
    let mut screen = chat.stdout.take().unwrap();
    let mut seen = String::new();
    // The prompt is drawn once the terminal is in raw mode: keys typed before that go through
    // the line discipline, which turns Enter into a line feed.
    read_until(&mut screen, &mut seen, "alice> ").await;
    keys.write_all(b"second\r").await.unwrap();
    read_until(&mut screen, &mut seen, "not sent yet").await;
    assert!(seen.contains("inbox_full"), "{seen:?}");

    let out = run(sfc_as("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\tfirst\n");
    // The chat tries the outbox again by itself.
    read_until(&mut screen, &mut seen, "from the outbox").await;
    let out = run(sfc_as("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\tsecond\n");

    keys.write_all(b"\x04").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), chat.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}: {seen:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_recv_shows_escapes_instead_of_running_them_and_cannot_be_made_to_forge_a_line() {
    let (server, people) = tight_inboxes(&["alice", "bob"]).await;
    // Clear the screen, set the window title, a one-byte CSI (C1), a right-to-left override,
    // a carriage return, and a second line made to look like a message from dave.
    let hostile =
        "\x1b[2J\x1b]0;pwned\x07hi \u{9b}31m \u{202e}txt.exe\r\ndave\tok I will wire the money";
    let out = run(people.sfc("alice", &["send", "bob", hostile])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert!(out.status.success(), "{out:?}");
    let shown = stdout(&out);
    assert_eq!(
        shown,
        "alice\t\\x1b[2J\\x1b]0;pwned\\x07hi \\u{9b}31m \\u{202e}txt.exe\n\tdave\tok I will wire the money\n"
    );
    for c in shown.chars() {
        assert!(
            !c.is_control() || c == '\n' || c == '\t',
            "{c:?} in {shown:?}"
        );
        assert!(!('\u{2066}'..='\u{2069}').contains(&c) && !('\u{202a}'..='\u{202e}').contains(&c));
    }
    assert!(
        shown
            .lines()
            .all(|l| l.starts_with("alice\t") || l.starts_with('\t')),
        "{shown:?}"
    );

    // --json keeps the exact text (JSON escapes it).
    let out = run(people.sfc("alice", &["send", "bob", hostile])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("bob", &["recv", "--json", "--count", "1", "--wait", "5"])).await;
    let raw = stdout(&out);
    assert!(
        !raw.contains('\x1b') && !raw.contains('\u{202e}') && !raw.contains('\u{9b}'),
        "{raw:?}"
    );
    let line: serde_json::Value = serde_json::from_str(raw.trim()).unwrap();
    assert_eq!(line["text"], hostile);

    // An error line carries what the user typed (or a server said) escaped, on one line.
    let out = run(people.sfc("alice", &["send", "bo\x1b[2Jb\ncarol", "hi"])).await;
    assert_fails_with(&out, "invalid username");
    assert!(!stderr(&out).contains('\x1b'), "{out:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_send_reads_standard_input_or_a_file_and_refuses_an_oversize_message_first() {
    use tokio::io::AsyncWriteExt;
    let (server, people) = tight_inboxes(&["alice", "bob"]).await;
    let dir = tempfile::tempdir().unwrap();
    let recv = || people.sfc("bob", &["recv", "--json", "--count", "1", "--wait", "5"]);
    let text_of = |out: &std::process::Output| -> String {
        let line: serde_json::Value = serde_json::from_str(stdout(out).trim()).unwrap();
        line["text"].as_str().unwrap().to_owned()
    };

    let mut send = people.sfc("alice", &["send", "bob", "-"]);
    send.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = send.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(b"two lines\nfrom standard input\n")
        .await
        .unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text_of(&run(recv()).await),
        "two lines\nfrom standard input"
    );

    let file = dir.path().join("message.txt");
    std::fs::write(&file, "from a file, ünïcode\r\n").unwrap();
    let out = run(people.sfc("alice", &["send", "bob", "--file", file.to_str().unwrap()])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text_of(&run(recv()).await), "from a file, ünïcode");

    let binary = dir.path().join("binary");
    std::fs::write(&binary, b"abc\xff\xfe").unwrap();
    let out = run(people.sfc(
        "alice",
        &["send", "bob", "--file", binary.to_str().unwrap()],
    ))
    .await;
    assert_fails_with(&out, "not UTF-8 text");

    let limit = securefastchat::e2e::MAX_PLAINTEXT_LEN;
    let at_limit = "x".repeat(limit);
    std::fs::write(&file, &at_limit).unwrap();
    let out = run(people.sfc("alice", &["send", "bob", "--file", file.to_str().unwrap()])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text_of(&run(recv()).await).len(), limit);

    // One byte more is refused, saying the limit once, before anything is sealed: the outbox
    // stays empty and bob gets nothing.
    let over = "x".repeat(limit + 1);
    let out = run(people.sfc("alice", &["send", "bob", &over])).await;
    assert_fails_with(&out, &limit.to_string());
    assert_eq!(
        stderr(&out).matches(&limit.to_string()).count(),
        1,
        "{out:?}"
    );
    std::fs::write(&file, &over).unwrap();
    let out = run(people.sfc("alice", &["send", "bob", "--file", file.to_str().unwrap()])).await;
    assert_fails_with(&out, &limit.to_string());
    assert_eq!(
        stderr(&out).matches(&limit.to_string()).count(),
        1,
        "{out:?}"
    );
    let out = run(people.sfc("alice", &["outbox"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "");
    let out = run(people.sfc("bob", &["recv", "--wait", "1"])).await;
    assert_eq!(stdout(&out), "");

    let out = run(people.sfc("alice", &["send", "--help"])).await;
    assert!(stdout(&out).contains(&limit.to_string()), "{out:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfc_recv_follow_waits_until_interrupted_and_exits_cleanly() {
    use tokio::io::AsyncBufReadExt;
    let (server, people) = tight_inboxes(&["alice", "bob"]).await;
    for (how, signal) in [("--follow", "-TERM"), ("--wait", "-INT")] {
        let mut recv = people.sfc("bob", &["recv", how]);
        recv.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = recv.spawn().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let next_line = async |lines: &mut tokio::io::Lines<_>| {
            tokio::time::timeout(Duration::from_secs(15), lines.next_line())
                .await
                .unwrap()
                .unwrap()
        };

        let out = run(people.sfc("alice", &["send", "bob", "one"])).await;
        assert!(out.status.success(), "{out:?}");
        assert_eq!(next_line(&mut lines).await.as_deref(), Some("alice\tone"));
        // Longer than the default wait of 2 s without a message: still there.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "{how} stopped by itself"
        );
        let out = run(people.sfc("alice", &["send", "bob", "two"])).await;
        assert!(out.status.success(), "{out:?}");
        assert_eq!(next_line(&mut lines).await.as_deref(), Some("alice\ttwo"));

        common::cli::signal(&child, signal);
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{how} {signal}: {status:?}");
        assert_eq!(next_line(&mut lines).await, None);
    }
    server.stop().await;
}

#[tokio::test]
async fn sfc_says_how_to_point_at_the_ca_when_the_default_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    // From a directory without certs/: the default certs/ca.crt is not there.
    let mut login = sfc("127.0.0.1:9", Path::new("unused"), &dir.path().join("home"));
    login
        .env_remove("SFC_CA")
        .current_dir(dir.path())
        .env("SFC_PASSWORD", PASSWORD)
        .args(["login", "alice"]);
    let out = run(login).await;
    assert_fails_with(&out, "certs/ca.crt");
    for hint in [
        "--ca",
        "SFC_CA",
        "sfc-server writes it to <certs dir>/ca.crt",
    ] {
        assert!(stderr(&out).contains(hint), "{hint:?} in {out:?}");
    }
}
