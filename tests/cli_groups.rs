//! `sfc group …` and `sfc recv` as a user runs them: a group of three is created and talks
//! (`GROUP/FROM<TAB>TEXT`, `group` in `--json`), only an admin removes, a removed member is
//! cut off, and a member who leaves is removed by the next member's client.

mod common;

use common::TestServer;
use common::cli::{People, assert_fails_with, run, stderr, stdout};

/// `sfc ARGS` as `who`, which must succeed; returns its standard output.
async fn ok(people: &People, who: &str, args: &[&str]) -> String {
    let out = run(people.sfc(who, args)).await;
    assert!(out.status.success(), "{who} {args:?}: {out:?}");
    stdout(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_talks_and_a_removed_member_is_cut_off() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob", "carol"]).await;

    assert_eq!(
        ok(&people, "alice", &["group", "create", "friends"]).await,
        "created group friends\n"
    );
    // Names are global on the server: bob cannot take it.
    let taken = run(people.sfc("bob", &["group", "create", "friends"])).await;
    assert_fails_with(&taken, "friends");
    ok(&people, "alice", &["group", "add", "friends", "bob"]).await;
    ok(&people, "alice", &["group", "add", "friends", "carol"]).await;

    let id = ok(
        &people,
        "alice",
        &["group", "send", "friends", "hello, group"],
    )
    .await;
    assert_eq!(id.trim().len(), 32, "{id:?}");
    let bob = run(people.sfc("bob", &["recv"])).await;
    assert_eq!(stdout(&bob), "friends/alice\thello, group\n", "{bob:?}");
    assert!(
        stderr(&bob).contains("friends: you were added by alice/1"),
        "{bob:?}"
    );
    ok(&people, "bob", &["group", "send", "friends", "hi from bob"]).await;
    let carol = run(people.sfc("carol", &["recv", "--json"])).await;
    let lines: Vec<serde_json::Value> = stdout(&carol)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let texts: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["group"].as_str().unwrap(),
                l["from"].as_str().unwrap(),
                l["text"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        texts,
        [
            ("friends", "alice", "hello, group"),
            ("friends", "bob", "hi from bob")
        ],
        "{carol:?}"
    );
    assert_eq!(
        ok(&people, "alice", &["recv"]).await,
        "friends/bob\thi from bob\n"
    );
    assert_eq!(
        ok(&people, "carol", &["group", "members", "friends"]).await,
        "alice\t1\tadmin\nbob\t1\ncarol\t1\n"
    );

    // Only an admin removes someone else.
    let refused = run(people.sfc("bob", &["group", "remove", "friends", "carol"])).await;
    assert_fails_with(&refused, "not an admin");
    ok(&people, "alice", &["group", "remove", "friends", "carol"]).await;
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
    // carol's client learns it was removed and reads nothing sent after it.
    let carol = run(people.sfc("carol", &["recv"])).await;
    assert!(carol.status.success(), "{carol:?}");
    assert_eq!(stdout(&carol), "", "{carol:?}");
    assert!(
        stderr(&carol).contains("friends: you were removed by alice/1"),
        "{carol:?}"
    );
    let cut_off = run(people.sfc("carol", &["group", "send", "friends", "still here?"])).await;
    assert!(!cut_off.status.success(), "{cut_off:?}");
    assert_eq!(
        ok(&people, "bob", &["recv", "--wait", "1"]).await,
        "",
        "carol's post reached bob"
    );

    // bob leaves: alice's next client run commits his removal.
    assert_eq!(
        ok(&people, "bob", &["group", "leave", "friends"]).await,
        "left friends\n"
    );
    let alice = run(people.sfc("alice", &["recv"])).await;
    assert!(stderr(&alice).contains("friends: bob left"), "{alice:?}");
    assert_eq!(
        ok(&people, "alice", &["group", "members", "friends"]).await,
        "alice\t1\tadmin\n"
    );
    assert_eq!(ok(&people, "bob", &["group", "list"]).await, "");
}
