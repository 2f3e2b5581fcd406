//! Groups through a real server with the client's `Messenger` (issue 22): key packages
//! published, a group of three created and talking, every message once and in order, a
//! removed member cut off, a user who leaves removed by another member's client, and an
//! offline member catching up to the others' epoch.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use securefastchat::client::groups::GroupNotice;
use securefastchat::client::messenger::{Messenger, Received};

const WAIT: Duration = Duration::from_secs(5);

async fn member(server: &TestServer, home: &Path, name: &str) -> Messenger {
    let m = server.messenger(home, name, true).await;
    assert!(m.ensure_key_packages().await.unwrap() >= 10);
    m
}

/// Everything that arrives until a second passes without news, each shown: group texts as
/// `FROM: TEXT`, notices in words.
async fn drain(m: &Messenger) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(received) = m.receive(Duration::from_secs(1)).await.unwrap() {
        match &received {
            Received::Group { from, text, .. } => got.push(format!("{from}: {text}")),
            Received::GroupNotice { group, notice } => got.push(notice.describe(group)),
            Received::Duplicate => {}
            other => panic!("unexpected {other:?}"),
        }
        m.shown(&received).await.unwrap();
    }
    got
}

async fn next_notice(m: &Messenger) -> GroupNotice {
    let received = m.receive(WAIT).await.unwrap().expect("a delivery");
    m.shown(&received).await.unwrap();
    match received {
        Received::GroupNotice { notice, .. } => notice,
        other => panic!("expected a group notice, got {other:?}"),
    }
}

async fn epoch(m: &Messenger) -> u64 {
    m.group("friends").await.unwrap().mls.epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_talks_in_order_and_a_removed_member_is_cut_off() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let carol = member(&server, &homes.path().join("c"), "carol").await;

    assert_eq!(alice.create_group("Friends").await.unwrap(), "friends");
    let added = alice.group_add("friends", "bob").await.unwrap();
    assert_eq!(added.len(), 1);
    alice.group_add("friends", "carol").await.unwrap();
    assert!(matches!(
        next_notice(&bob).await,
        GroupNotice::Joined { .. }
    ));
    assert!(
        matches!(next_notice(&bob).await, GroupNotice::Changed { ref added, .. } if added == &["carol/1"])
    );
    assert!(matches!(
        next_notice(&carol).await,
        GroupNotice::Joined { .. }
    ));
    for m in [&alice, &bob, &carol] {
        let g = m.group("friends").await.unwrap();
        assert_eq!((g.mls.epoch, g.mls.members.len()), (2, 3));
    }

    alice.group_send("friends", "hello").await.unwrap();
    bob.group_send("friends", "hi alice").await.unwrap();
    alice.group_send("friends", "how are you").await.unwrap();
    assert_eq!(
        drain(&carol).await,
        ["alice: hello", "bob: hi alice", "alice: how are you"]
    );
    assert_eq!(drain(&bob).await, ["alice: hello", "alice: how are you"]);
    assert_eq!(drain(&alice).await, ["bob: hi alice"]);

    // A non-admin cannot remove; the admin can, and carol is cut off.
    assert!(bob.group_remove("friends", "carol").await.is_err());
    alice.group_remove("friends", "carol").await.unwrap();
    assert!(matches!(
        next_notice(&carol).await,
        GroupNotice::Removed { .. }
    ));
    assert!(
        matches!(next_notice(&bob).await, GroupNotice::Changed { ref removed, .. } if removed == &["carol/1"])
    );
    alice.group_send("friends", "carol is gone").await.unwrap();
    assert_eq!(drain(&bob).await, ["alice: carol is gone"]);
    assert!(drain(&carol).await.is_empty());
    assert!(carol.group_send("friends", "still here?").await.is_err());
    assert_eq!(epoch(&alice).await, epoch(&bob).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_leaves_is_removed_by_a_remaining_members_client() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let carol = member(&server, &homes.path().join("c"), "carol").await;
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    alice.group_add("friends", "carol").await.unwrap();
    drain(&bob).await;
    drain(&carol).await;

    carol.group_leave("friends").await.unwrap();
    assert!(carol.groups().await.unwrap().is_empty());
    // Bob (not an admin) sees the notice first and commits carol's removal.
    assert!(matches!(next_notice(&bob).await, GroupNotice::Left { ref user } if user == "carol"));
    let seen = drain(&alice).await;
    assert!(seen.iter().any(|s| s.contains("left")), "{seen:?}");
    assert!(
        seen.iter().any(|s| s.contains("removed carol/1")),
        "{seen:?}"
    );
    assert_eq!(alice.group("friends").await.unwrap().mls.members.len(), 2);
    assert_eq!(epoch(&alice).await, epoch(&bob).await);
    bob.group_send("friends", "just us").await.unwrap();
    assert_eq!(drain(&alice).await, ["bob: just us"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_catches_up_in_order() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let carol = member(&server, &homes.path().join("c"), "carol").await;
    let dave = member(&server, &homes.path().join("d"), "dave").await;
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    bob.close().await;
    alice.group_send("friends", "one").await.unwrap();
    alice.group_add("friends", "carol").await.unwrap();
    alice.group_send("friends", "two").await.unwrap();
    alice.group_add("friends", "dave").await.unwrap();
    alice.group_send("friends", "three").await.unwrap();
    drain(&carol).await;
    drain(&dave).await;

    let bob = server
        .messenger(&homes.path().join("b"), "bob", false)
        .await;
    let got = drain(&bob).await;
    let texts: Vec<&String> = got.iter().filter(|s| s.starts_with("alice: ")).collect();
    assert_eq!(
        texts,
        ["alice: one", "alice: two", "alice: three"],
        "{got:?}"
    );
    assert_eq!(epoch(&bob).await, epoch(&alice).await);
    assert_eq!(bob.group("friends").await.unwrap().mls.members.len(), 4);
}

/// Two admins add someone at the same epoch: the server orders one, the other's client gets
/// `stale_epoch`, receives the winning commit and makes its change again at the next epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_commits_at_one_epoch_one_wins_and_the_other_lands_next() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let carol = member(&server, &homes.path().join("c"), "carol").await;
    let dave = member(&server, &homes.path().join("d"), "dave").await;
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    alice.group_add_admin("friends", "bob").await.unwrap();
    drain(&bob).await;
    assert_eq!(
        bob.group("friends").await.unwrap().mls.admins,
        ["alice", "bob"]
    );
    let before = epoch(&alice).await;

    let (a, b) = tokio::join!(
        alice.group_add("friends", "carol"),
        bob.group_add("friends", "dave")
    );
    let (winner, loser) = match (a, b) {
        (Ok(_), Err(e)) => {
            assert!(e.to_string().contains("epoch"), "{e}");
            (&alice, &bob)
        }
        (Err(e), Ok(_)) => {
            assert!(e.to_string().contains("epoch"), "{e}");
            (&bob, &alice)
        }
        other => panic!("exactly one commit should win: {other:?}"),
    };
    assert_eq!(epoch(winner).await, before + 1);
    drain(loser).await;
    assert_eq!(epoch(loser).await, before + 1);
    let redone = loser.group_redo("friends").await.unwrap().unwrap();
    assert_eq!(redone.len(), 1);
    assert_eq!(epoch(loser).await, before + 2);
    drain(winner).await;
    drain(&carol).await;
    drain(&dave).await;
    for m in [&alice, &bob, &carol, &dave] {
        let g = m.group("friends").await.unwrap();
        assert_eq!((g.mls.epoch, g.mls.members.len()), (before + 2, 4));
    }
    dave.group_send("friends", "hello all").await.unwrap();
    for m in [&alice, &bob, &carol] {
        assert_eq!(drain(m).await, ["dave: hello all"]);
    }
}

/// A member links a new device: their first device adds it to the group (its own user's
/// device, no admin needed), and it reads the group from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_links_a_new_device_gets_the_group_on_it() {
    use securefastchat::client::keystore::Keystore;
    use securefastchat::client::link::{self, open_link};
    use securefastchat::protocol::Username;

    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let phone = member(&server, &homes.path().join("b"), "bob").await;
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    drain(&phone).await;

    // Bob links a laptop (as `sfc device add` does).
    let bob = Username::parse("bob").unwrap();
    let phone_client = phone.client();
    let opened = open_link(&phone_client, phone.keystore(), &bob)
        .await
        .unwrap();
    let code = opened.code().clone();
    let client = server.client().await;
    let home = homes.path().join("laptop");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let keystore = Keystore::new(&home);
    let (linked, joined) = tokio::join!(
        tokio::time::timeout(WAIT, opened.answer(&phone_client, phone.keystore())),
        link::join_link(&client, &keystore, &bob, &code, "laptop")
    );
    assert_eq!(linked.unwrap().unwrap().device, joined.unwrap().device);
    link::publish_keys(&client, &keystore).await.unwrap();
    let laptop = Messenger::new(client, &home, "bob").unwrap();
    laptop.ensure_key_packages().await.unwrap();

    let added = phone.group_add("friends", "bob").await.unwrap();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].to_string(), "bob/2");
    assert!(matches!(
        next_notice(&laptop).await,
        GroupNotice::Joined { .. }
    ));
    assert!(
        matches!(next_notice(&alice).await, GroupNotice::Changed { ref added, .. } if added == &["bob/2"])
    );
    alice
        .group_send("friends", "hi bob's laptop")
        .await
        .unwrap();
    assert_eq!(drain(&laptop).await, ["alice: hi bob's laptop"]);
    assert_eq!(drain(&phone).await, ["alice: hi bob's laptop"]);
    laptop
        .group_send("friends", "from the laptop")
        .await
        .unwrap();
    assert_eq!(drain(&phone).await, ["bob: from the laptop"]);
    assert_eq!(drain(&alice).await, ["bob: from the laptop"]);
}

/// A group text decrypted but not shown when the client stops is shown at the next start
/// (its keys are gone, so it comes from the saved state), once; the redelivery is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_text_not_shown_before_a_stop_is_shown_after_it_once() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    drain(&bob).await;
    alice.group_send("friends", "keep me").await.unwrap();
    let received = bob.receive(WAIT).await.unwrap().expect("the text");
    assert!(matches!(received, Received::Group { ref text, .. } if text == "keep me"));
    // Stopped before showing it: not acknowledged.
    bob.close().await;

    let bob = server
        .messenger(&homes.path().join("b"), "bob", false)
        .await;
    assert_eq!(drain(&bob).await, ["alice: keep me"]);
    let bob = {
        bob.close().await;
        server
            .messenger(&homes.path().join("b"), "bob", false)
            .await
    };
    assert!(drain(&bob).await.is_empty());
}
