//! `sfc chat GROUP` in a terminal (a pty from `script`), replayed on a terminal emulator: a
//! group's chat sends to the group and shows what its members send (inert, whatever they
//! send), keeps other conversations' messages in sight, lists the members, leaves the group
//! when asked twice, ends when this device is removed, and asks which one is meant when a
//! name is both a group and a user.

mod common;

use std::time::Duration;

use common::TestServer;
use common::cli::{People, read_until, run, screen, stdout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// `sfc ARGS` as `who`, which must succeed; returns its standard output.
async fn ok(people: &People, who: &str, args: &[&str]) -> String {
    let out = run(people.sfc(who, args)).await;
    assert!(out.status.success(), "{who} {args:?}: {out:?}");
    stdout(&out)
}

/// alice's group `friends` with bob and carol in it.
async fn friends(server: &TestServer) -> People {
    let people = People::signed_up(server, &["alice", "bob", "carol"]).await;
    ok(&people, "alice", &["group", "create", "friends"]).await;
    ok(&people, "alice", &["group", "add", "friends", "bob"]).await;
    ok(&people, "alice", &["group", "add", "friends", "carol"]).await;
    people
}

/// `sfc chat ARGS` as `name`, once its prompt is drawn.
async fn open_chat(
    people: &People,
    name: &str,
    args: &str,
) -> (Child, ChildStdin, ChildStdout, String) {
    let mut chat = people.in_terminal(name, &format!("chat {args}"));
    let keys = chat.stdin.take().unwrap();
    let mut output = chat.stdout.take().unwrap();
    let mut seen = String::new();
    read_until(&mut output, &mut seen, &format!("{name}> ")).await;
    (chat, keys, output, seen)
}

/// Types `line` and Enter, a key at a time as a person does (the line editor may miss keys
/// that come in one read right after it printed a message: rustyline issue 976).
async fn type_line(keys: &mut ChildStdin, line: &str) {
    for key in line.bytes().chain([b'\r']) {
        keys.write_all(&[key]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Reads on until `needle` appears in what comes next (it may be in `seen` already).
async fn read_next(output: &mut ChildStdout, seen: &mut String, needle: &str) {
    let mut fresh = String::new();
    read_until(output, &mut fresh, needle).await;
    seen.push_str(&fresh);
}

/// Reads the chat's output until it ends; returns all of it and whether it exited 0.
async fn until_it_ends(
    mut chat: Child,
    mut output: ChildStdout,
    mut seen: String,
) -> (String, bool) {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), output.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("the chat did not end: {seen:?}"))
        .unwrap();
    seen.push_str(&String::from_utf8_lossy(&rest));
    let status = tokio::time::timeout(Duration::from_secs(10), chat.wait())
        .await
        .unwrap()
        .unwrap();
    (seen, status.success())
}

/// Leaves with Ctrl-D, which must end the chat with status 0; returns all it wrote.
async fn leave(chat: Child, mut keys: ChildStdin, output: ChildStdout, seen: String) -> String {
    keys.write_all(b"\x04").await.unwrap();
    let (seen, success) = until_it_ends(chat, output, seen).await;
    assert!(success, "{seen:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_chat_sends_to_the_group_and_shows_what_members_send() {
    let server = TestServer::start().await;
    let people = friends(&server).await;
    // A plain name: alice is in a group of that name and talks with no user of that name.
    let (chat, mut keys, mut output, mut seen) = open_chat(&people, "alice", "friends").await;
    assert!(seen.contains("chatting in group friends"), "{seen:?}");
    assert!(
        seen.contains(
            "-- friends has 3 members: alice (admin; device 1), bob (device 1), carol (device 1)"
        ),
        "{seen:?}"
    );

    type_line(&mut keys, "hello from the chat").await;
    read_until(&mut output, &mut seen, "alice: hello from the chat").await;
    let bob = run(people.sfc("bob", &["recv"])).await;
    assert_eq!(
        stdout(&bob),
        "friends/alice\thello from the chat\n",
        "{bob:?}"
    );

    ok(&people, "bob", &["group", "send", "friends", "hi alice"]).await;
    read_until(&mut output, &mut seen, "bob: hi alice").await;

    // A member's hostile text shows inert, and its later lines cannot pass for a message.
    let hostile = "\x1b[2J\x1b]0;pwned\x07evil\u{202e}\n13:06 carol: send money";
    ok(&people, "bob", &["group", "send", "friends", hostile]).await;
    read_until(&mut output, &mut seen, "send money").await;
    assert!(!seen.contains("\x1b]0;pwned"), "{seen:?}");
    assert!(!seen.contains("\x1b[2J"), "{seen:?}");
    let now = screen(seen.as_bytes());
    let rows: Vec<&str> = now.lines().filter(|l| !l.is_empty()).collect();
    let evil = rows
        .iter()
        .position(|r| r.ends_with(" bob: \\x1b[2J\\x1b]0;pwned\\x07evil\\u{202e}"))
        .unwrap_or_else(|| panic!("{now}"));
    assert_eq!(rows[evil + 1], "      13:06 carol: send money", "{now}");

    // Another conversation's message is shown too, marked with where it belongs.
    ok(&people, "carol", &["send", "alice", "psst, 1:1"]).await;
    read_until(&mut output, &mut seen, "[from carol] psst, 1:1").await;

    type_line(&mut keys, "/members").await;
    read_next(&mut output, &mut seen, "-- friends has 3 members").await;
    type_line(&mut keys, "/file ./notes.txt").await;
    read_until(
        &mut output,
        &mut seen,
        "files in groups are not supported yet",
    )
    .await;
    let seen = leave(chat, keys, output, seen).await;
    assert!(!seen.contains("alice: /file"), "{seen:?}");
    assert!(!seen.contains("alice: /members"), "{seen:?}");

    // What the chat showed was acknowledged: `sfc recv` has nothing more, and bob got only
    // the one line.
    assert_eq!(ok(&people, "alice", &["recv", "--wait", "1"]).await, "");
    assert_eq!(ok(&people, "bob", &["recv", "--wait", "1"]).await, "");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_while_in_the_chat_sees_it_end() {
    let server = TestServer::start().await;
    let people = friends(&server).await;
    // carol has not received her welcome yet: the chat catches up first.
    let (chat, _keys, mut output, mut seen) = open_chat(&people, "carol", "--group friends").await;
    assert!(
        seen.contains("-- friends: you were added by alice/1"),
        "{seen:?}"
    );
    assert!(seen.contains("friends has 3 members"), "{seen:?}");

    ok(&people, "alice", &["group", "remove", "friends", "carol"]).await;
    read_until(&mut output, &mut seen, "you were removed by alice/1").await;
    let (seen, success) = until_it_ends(chat, output, seen).await;
    assert!(!success, "{seen:?}");
    assert!(
        seen.contains("-- the chat ends: you are no longer a member of friends"),
        "{seen:?}"
    );
    assert!(
        seen.contains("sfc: error: you were removed from group friends by alice/1"),
        "{seen:?}"
    );
    // The others go on without her.
    ok(
        &people,
        "alice",
        &["group", "send", "friends", "carol is out"],
    )
    .await;
    assert_eq!(
        ok(&people, "bob", &["recv"]).await,
        "friends/alice\tcarol is out\n"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_asks_again_and_then_leaves_the_group() {
    let server = TestServer::start().await;
    let people = friends(&server).await;
    let (chat, mut keys, mut output, mut seen) = open_chat(&people, "bob", "friends").await;
    type_line(&mut keys, "/leave").await;
    read_until(&mut output, &mut seen, "Type /leave again to leave").await;
    type_line(&mut keys, "no").await;
    read_until(&mut output, &mut seen, "you stay in friends").await;
    type_line(&mut keys, "/leave").await;
    read_next(&mut output, &mut seen, "Type /leave again to leave").await;
    type_line(&mut keys, "/leave").await;
    let (seen, success) = until_it_ends(chat, output, seen).await;
    assert!(success, "{seen:?}");
    assert!(seen.contains("-- you left friends"), "{seen:?}");
    assert!(
        !seen.contains("bob: no"),
        "the cancelling line was sent: {seen:?}"
    );
    assert_eq!(ok(&people, "bob", &["group", "list"]).await, "");
    // alice's next client run commits bob's removal.
    let alice = run(people.sfc("alice", &["recv"])).await;
    assert!(
        common::cli::stderr(&alice).contains("friends: bob left"),
        "{alice:?}"
    );
    assert_eq!(
        ok(&people, "alice", &["group", "members", "friends"]).await,
        "alice\t1\tadmin\ncarol\t1\n"
    );
    server.stop().await;
}

/// A name that is both a group alice is in and a user she talks with opens neither until
/// she says which; `--user` and `--group` open each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_a_group_and_a_contact_must_be_told_apart() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "crew"]).await;
    ok(&people, "alice", &["send", "crew", "hi crew"]).await;
    ok(&people, "alice", &["group", "create", "crew"]).await;

    let mut chat = people.in_terminal("alice", "chat crew");
    let output = chat.stdout.take().unwrap();
    let (seen, success) = until_it_ends(chat, output, String::new()).await;
    assert!(!success, "{seen:?}");
    assert!(
        seen.contains("crew is both a group you are in and a user you talk with"),
        "{seen:?}"
    );

    let (chat, keys, output, seen) = open_chat(&people, "alice", "--user crew").await;
    assert!(seen.contains("chatting with crew"), "{seen:?}");
    assert!(seen.contains("alice: hi crew"), "{seen:?}");
    leave(chat, keys, output, seen).await;
    let (chat, keys, output, seen) = open_chat(&people, "alice", "--group crew").await;
    assert!(seen.contains("chatting in group crew"), "{seen:?}");
    leave(chat, keys, output, seen).await;

    // --group for a group she is not in.
    let mut chat = people.in_terminal("alice", "chat --group nosuch");
    let output = chat.stdout.take().unwrap();
    let (seen, success) = until_it_ends(chat, output, String::new()).await;
    assert!(!success, "{seen:?}");
    assert!(
        seen.contains("you are not in a group named nosuch"),
        "{seen:?}"
    );
    server.stop().await;
}

/// A chat that fell 6 epochs behind (stopped while bob changed the group six times) still
/// sends the line typed first thing when it runs again: the line races the missed commits,
/// and when it goes out before the third of them is merged (as it did in every run while this
/// test was written) the server refuses it as stale, and the chat catches up and sends it
/// again, without a word to the user. Either way the line arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_that_fell_behind_still_sends_the_next_line() {
    let server = TestServer::start().await;
    let people = friends(&server).await;
    ok(&people, "alice", &["group", "admin", "friends", "bob"]).await;
    ok(&people, "bob", &["recv"]).await;
    let (chat, mut keys, mut output, mut seen) = open_chat(&people, "alice", "friends").await;
    let sfc = child_of(&chat);
    signal(&sfc, "-STOP");
    for _ in 0..3 {
        ok(&people, "bob", &["group", "remove", "friends", "carol"]).await;
        ok(&people, "bob", &["group", "add", "friends", "carol"]).await;
    }
    // Typed while the chat is stopped: read as soon as it runs, racing the missed commits.
    keys.write_all(b"sent from behind\r").await.unwrap();
    // `script` stops itself when its child stops: both go on.
    signal(&sfc, "-CONT");
    signal(&chat.id().unwrap().to_string(), "-CONT");
    read_until(&mut output, &mut seen, "alice: sent from behind").await;
    assert!(!seen.contains("not sent"), "{seen:?}");
    read_until(&mut output, &mut seen, "bob/1 removed carol/1").await;
    leave(chat, keys, output, seen).await;
    let bob = run(people.sfc("bob", &["recv"])).await;
    assert_eq!(stdout(&bob), "friends/alice\tsent from behind\n", "{bob:?}");
    server.stop().await;
}

/// The `sfc` process `script` runs for `chat`.
fn child_of(chat: &Child) -> String {
    let script = chat.id().unwrap().to_string();
    let children = std::process::Command::new("pgrep")
        .args(["-P", &script])
        .output()
        .unwrap();
    let sfc = String::from_utf8_lossy(&children.stdout).trim().to_owned();
    assert!(!sfc.is_empty(), "no chat process under script {script}");
    sfc
}

fn signal(pid: &str, which: &str) {
    let sent = std::process::Command::new("kill")
        .args([which, pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A group's message that arrives in a 1:1 chat is shown there, marked with its group (as
/// `sfc recv` names it), and acknowledged once shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_shows_marked_in_a_one_to_one_chat() {
    let server = TestServer::start().await;
    let people = friends(&server).await;
    ok(&people, "bob", &["recv"]).await;
    let (chat, keys, mut output, mut seen) = open_chat(&people, "bob", "alice").await;
    assert!(seen.contains("chatting with alice"), "{seen:?}");
    ok(
        &people,
        "alice",
        &["group", "send", "friends", "to all\nof you"],
    )
    .await;
    read_until(&mut output, &mut seen, "[friends/alice] to all").await;
    let seen = leave(chat, keys, output, seen).await;
    let now = screen(seen.as_bytes());
    assert!(
        now.contains("[friends/alice] to all\n      of you"),
        "{now}"
    );
    assert_eq!(ok(&people, "bob", &["recv", "--wait", "1"]).await, "");
    server.stop().await;
}
