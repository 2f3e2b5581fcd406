//! `sfc chat` in a terminal (a pty from `script`), replayed on a terminal emulator to see what
//! the user sees: long lines, messages arriving while a line is typed, other senders.

mod common;

use std::time::Duration;

use common::TestServer;
use common::cli::{People, read_until, run, screen, stdout};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout};

/// `name`'s chat with `peer`, once its prompt is drawn (keys typed before that go through the
/// line discipline, which turns Enter into a line feed).
async fn open_chat(
    people: &People,
    name: &str,
    peer: &str,
) -> (Child, ChildStdin, ChildStdout, String) {
    let mut chat = people.in_terminal(name, &format!("chat {peer}"));
    let keys = chat.stdin.take().unwrap();
    let mut output = chat.stdout.take().unwrap();
    let mut seen = String::new();
    read_until(&mut output, &mut seen, &format!("{name}> ")).await;
    (chat, keys, output, seen)
}

/// Leaves with Ctrl-D and returns everything the chat wrote.
async fn leave(
    mut chat: Child,
    mut keys: ChildStdin,
    mut output: ChildStdout,
    mut seen: String,
) -> String {
    use tokio::io::AsyncReadExt;
    keys.write_all(b"\x04").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), output.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    seen.push_str(&String::from_utf8_lossy(&rest));
    let status = tokio::time::timeout(Duration::from_secs(10), chat.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}: {seen:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_line_stays_once_on_the_screen_while_it_is_typed() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let (chat, mut keys, mut output, mut seen) = open_chat(&people, "alice", "bob").await;

    // Three terminal rows long, typed a key at a time.
    let long: String = (0..45).map(|i| format!("w{i:03} ")).collect::<String>() + "end";
    for chunk in long.as_bytes().chunks(7) {
        keys.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    keys.write_all(b"\r").await.unwrap();
    read_until(&mut output, &mut seen, "alice: w000").await;
    let seen = leave(chat, keys, output, seen).await;

    // What stays on the screen: the line as typed, and the message as sent.
    let shown = screen(seen.as_bytes()).replace('\n', "");
    assert_eq!(shown.matches(&long).count(), 2, "{shown}");
    assert_eq!(shown.matches("w000 w001 w002").count(), 2, "{shown}");
    let out = run(people.sfc("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), format!("alice\t{long}\n"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_arriving_while_a_line_is_typed_shows_above_it_and_leaves_it_whole() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob", "carol"]).await;
    let (chat, mut keys, mut output, mut seen) = open_chat(&people, "alice", "bob").await;

    keys.write_all(b"half of what I").await.unwrap();
    read_until(&mut output, &mut seen, "half of what I").await;
    let out = run(people.sfc("bob", &["send", "alice", "hello alice\nbob: second line"])).await;
    assert!(out.status.success(), "{out:?}");
    read_until(&mut output, &mut seen, "second line").await;
    let out = run(people.sfc("carol", &["send", "alice", "it is me, bob"])).await;
    assert!(out.status.success(), "{out:?}");
    read_until(&mut output, &mut seen, "it is me, bob").await;

    // The half-typed line is still there, below what arrived, and goes out whole.
    let now = screen(seen.as_bytes());
    let rows: Vec<&str> = now.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.last(), Some(&"alice> half of what I"), "{now}");
    let received = rows
        .iter()
        .position(|r| r.ends_with(" bob: hello alice"))
        .unwrap_or_else(|| panic!("{now}"));
    let time = &rows[received][..6];
    assert!(
        time.as_bytes()[..5]
            .iter()
            .enumerate()
            .all(|(i, b)| if i == 2 {
                *b == b':'
            } else {
                b.is_ascii_digit()
            }),
        "HH:MM in {now}"
    );
    // A later line of a message is indented; another sender is marked as such.
    assert_eq!(rows[received + 1], "      bob: second line", "{now}");
    assert!(
        rows[received + 2].ends_with(" [from carol] it is me, bob"),
        "{now}"
    );

    keys.write_all(b" wanted to say\r").await.unwrap();
    read_until(
        &mut output,
        &mut seen,
        "alice: half of what I wanted to say",
    )
    .await;
    leave(chat, keys, output, seen).await;
    let out = run(people.sfc("bob", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "alice\thalf of what I wanted to say\n");
    server.stop().await;
}

/// The chat opens on the recent conversation (from the home), keeps a changed key in sight
/// until it is accepted, and outlives a server restart: it says the connection was lost,
/// reconnects by itself, and then sends and shows messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_shows_the_history_and_reconnects_after_a_server_restart() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    assert!(
        run(people.sfc("alice", &["send", "bob", "earlier question"]))
            .await
            .status
            .success()
    );
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\tearlier question\n");
    assert!(
        run(people.sfc("bob", &["send", "alice", "earlier answer"]))
            .await
            .status
            .success()
    );
    let out = run(people.sfc("alice", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "bob\tearlier answer\n");

    let (chat, mut keys, mut output, mut seen) = open_chat(&people, "alice", "bob").await;
    assert!(seen.contains("alice: earlier question"), "{seen:?}");
    assert!(seen.contains("bob: earlier answer"), "{seen:?}");

    let addr = server.addr;
    let dir = server.stop().await;
    read_until(&mut output, &mut seen, "connection lost").await;
    let server = TestServer::start_at(addr, dir, |_| {}).await;
    read_until(&mut output, &mut seen, "reconnected").await;
    assert!(
        run(people.sfc("bob", &["send", "alice", "back again"]))
            .await
            .status
            .success()
    );
    read_until(&mut output, &mut seen, "bob: back again").await;
    keys.write_all(b"welcome back\r").await.unwrap();
    read_until(&mut output, &mut seen, "alice: welcome back").await;
    leave(chat, keys, output, seen).await;
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\twelcome back\n");

    // Bob re-keys: the warning is there when the chat opens, until alice accepts the key.
    assert!(
        run(people.sfc("bob2", &["login", "--new-identity", "bob"]))
            .await
            .status
            .success()
    );
    assert!(
        run(people.sfc("bob2", &["send", "alice", "new keys"]))
            .await
            .status
            .success()
    );
    assert!(
        run(people.sfc("alice", &["recv", "--wait", "2"]))
            .await
            .status
            .success()
    );
    let (chat, keys, output, seen) = open_chat(&people, "alice", "bob").await;
    assert!(seen.contains("identity key has changed"), "{seen:?}");
    leave(chat, keys, output, seen).await;
    assert!(
        run(people.sfc("alice", &["trust", "bob"]))
            .await
            .status
            .success()
    );
    let (chat, keys, output, seen) = open_chat(&people, "alice", "bob").await;
    assert!(!seen.contains("identity key has changed"), "{seen:?}");
    leave(chat, keys, output, seen).await;
    server.stop().await;
}

/// SIGTERM ends the chat as Ctrl-C does: cleanly (status 0, so the terminal settings are put
/// back by the chat itself), not by the signal's default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_chat_cleanly() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let (mut chat, _keys, _output, _seen) = open_chat(&people, "alice", "bob").await;
    // `script` runs the chat as its child.
    let script = chat.id().unwrap().to_string();
    let children = std::process::Command::new("pgrep")
        .args(["-P", &script])
        .output()
        .unwrap();
    let sfc = String::from_utf8_lossy(&children.stdout).trim().to_owned();
    assert!(!sfc.is_empty(), "no chat process under script {script}");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &sfc])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), chat.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    server.stop().await;
}
