//! A member's devices in its groups (issue 22, item 4), through a real server with the
//! client's `Messenger`: a linked device is added to every group of its account with no
//! `group add`; a removed device loses its leaves everywhere, the server delivers it nothing
//! more, and its own MLS state cannot read what follows; a non-admin's removal of another
//! user's removed device (proved by the account's signed revocation) is accepted by every
//! client, while a removal of a current device is refused; two devices of an account adding
//! the same new device end with one leaf for it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{PASSWORD, TestServer};
use securefastchat::client::groups::DeviceChanges;
use securefastchat::client::keystore::Keystore;
use securefastchat::client::link::{self, open_link};
use securefastchat::client::messenger::{Messenger, Received};
use securefastchat::e2e::IdentityKeyPair;
use securefastchat::e2e::mls::{MemberId, MlsError, revoke};
use securefastchat::protocol::keys::Bin;
use securefastchat::protocol::{ErrorCode, MessageId, Password, Request, Username};

const WAIT: Duration = Duration::from_secs(10);

async fn member(server: &TestServer, home: &Path, name: &str) -> Messenger {
    let m = server.messenger(home, name, true).await;
    assert!(m.ensure_key_packages().await.unwrap() >= 10);
    m
}

/// Everything that arrives until a second passes without news, each shown: group texts as
/// `GROUP/FROM: TEXT`, notices in words.
async fn drain(m: &Messenger) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(received) = m.receive(Duration::from_secs(1)).await.unwrap() {
        match &received {
            Received::Group {
                group, from, text, ..
            } => got.push(format!("{group}/{from}: {text}")),
            Received::GroupNotice { group, notice } => got.push(notice.describe(group)),
            Received::Duplicate => {}
            other => panic!("unexpected {other:?}"),
        }
        m.shown(&received).await.unwrap();
    }
    got
}

async fn members(m: &Messenger, group: &str) -> Vec<String> {
    let g = m.group(group).await.unwrap();
    g.mls.members.iter().map(ToString::to_string).collect()
}

async fn epoch(m: &Messenger, group: &str) -> u64 {
    m.group(group).await.unwrap().mls.epoch
}

/// Links a new device of `user` from `existing` (as `sfc device link` and `sfc device add`
/// do): while the new device publishes its keys and key packages, the existing one adds it
/// to its groups. Returns the new device's messenger, its id and what the existing device
/// did.
async fn link_device(
    server: &TestServer,
    home: &Path,
    existing: &Messenger,
    user: &str,
) -> (Messenger, u32, DeviceChanges) {
    let name = Username::parse(user).unwrap();
    let existing_client = existing.client();
    let opened = open_link(&existing_client, existing.keystore(), &name)
        .await
        .unwrap();
    let code = opened.code().clone();
    let client = server.client().await;
    std::fs::create_dir_all(home).unwrap();
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let keystore = Keystore::new(home);
    let (linked, joined) = tokio::join!(
        tokio::time::timeout(WAIT, opened.answer(&existing_client, existing.keystore())),
        link::join_link(&client, &keystore, &name, &code, "laptop")
    );
    let device = linked.unwrap().unwrap().device;
    assert_eq!(joined.unwrap().device, device);
    let new_device = async {
        link::publish_keys(&client, &keystore).await.unwrap();
        let m = Messenger::new(client, home, user).unwrap();
        m.ensure_key_packages().await.unwrap();
        m
    };
    let (new_device, changes) =
        tokio::join!(new_device, existing.add_device_to_groups(device, WAIT));
    (new_device, device, changes.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_gets_every_group_of_its_account_with_no_group_add() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let phone = member(&server, &homes.path().join("b"), "bob").await;
    // Bob is a member of alice's group and the admin of his own.
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    phone.catch_up(Duration::from_millis(500)).await.unwrap();
    phone.create_group("family").await.unwrap();
    phone.group_add("family", "alice").await.unwrap();
    drain(&alice).await;

    let (laptop, device, changes) =
        link_device(&server, &homes.path().join("laptop"), &phone, "bob").await;
    assert_eq!(device, 2);
    assert_eq!(changes.changed, ["family", "friends"]);
    assert!(changes.deferred.is_empty(), "{changes:?}");
    let joined = drain(&laptop).await;
    assert_eq!(
        joined,
        [
            "family: you were added by bob/1",
            "friends: you were added by bob/1"
        ]
    );
    for group in ["family", "friends"] {
        assert_eq!(members(&laptop, group).await, ["alice/1", "bob/1", "bob/2"]);
    }
    let seen = drain(&alice).await;
    assert_eq!(
        seen,
        ["family: bob/1 added bob/2", "friends: bob/1 added bob/2"]
    );

    // A message sent after the link reaches the new device; it can post.
    alice
        .group_send("friends", "hi bob's laptop")
        .await
        .unwrap();
    assert_eq!(drain(&laptop).await, ["friends/alice: hi bob's laptop"]);
    assert_eq!(drain(&phone).await, ["friends/alice: hi bob's laptop"]);
    laptop
        .group_send("family", "from the laptop")
        .await
        .unwrap();
    assert_eq!(drain(&alice).await, ["family/bob: from the laptop"]);
    assert_eq!(drain(&phone).await, ["family/bob: from the laptop"]);

    // Linking again adds nothing twice: the account's devices are all members.
    assert_eq!(
        phone.heal_group_devices().await.unwrap(),
        DeviceChanges::default()
    );
    for group in ["family", "friends"] {
        assert_eq!(epoch(&alice, group).await, epoch(&laptop, group).await);
    }
}

/// Alice's laptop is in two groups (added to bob's as alice's device, and to her own by her
/// phone's self-healing catch-up). Removing it removes its leaves in both; its own MLS state
/// falls behind and cannot read what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_device_removes_its_leaves_in_every_group() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let (laptop, device, _) =
        link_device(&server, &homes.path().join("laptop"), &alice, "alice").await;
    bob.create_group("bobs").await.unwrap();
    bob.group_add("bobs", "alice").await.unwrap();
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    // The phone's catch-up heals: the laptop gets alice's own group too.
    alice.catch_up(Duration::from_millis(500)).await.unwrap();
    drain(&laptop).await;
    drain(&bob).await;
    for group in ["bobs", "friends"] {
        assert_eq!(members(&bob, group).await, ["alice/1", "alice/2", "bob/1"]);
        assert_eq!(
            members(&laptop, group).await,
            ["alice/1", "alice/2", "bob/1"]
        );
    }
    let laptop_mls = laptop.mls().await.unwrap();
    let laptop_ids: Vec<_> = [
        laptop.group("bobs").await.unwrap().mls,
        laptop.group("friends").await.unwrap().mls,
    ]
    .into_iter()
    .map(|g| (g.id, g.epoch))
    .collect();

    let changes = alice
        .remove_device(device, Password::new(PASSWORD))
        .await
        .unwrap();
    assert!(changes.deferred.is_empty(), "{changes:?}");
    let seen = drain(&bob).await;
    for group in ["bobs", "friends"] {
        assert!(
            seen.iter()
                .any(|s| s.starts_with(group) && s.contains("removed alice/2")),
            "{seen:?}"
        );
    }
    drain(&alice).await;
    for group in ["bobs", "friends"] {
        assert_eq!(members(&alice, group).await, ["alice/1", "bob/1"]);
        assert_eq!(members(&bob, group).await, ["alice/1", "bob/1"]);
        assert_eq!(epoch(&alice, group).await, epoch(&bob, group).await);
    }

    // The laptop's state is left at the old epochs: a message of the new one does not open.
    let bob_mls = bob.mls().await.unwrap();
    let pins = std::collections::BTreeMap::new();
    for (id, old_epoch) in &laptop_ids {
        let later = bob_mls.send(id, b"after the removal").unwrap();
        assert!(bob_mls.group(id).unwrap().epoch > *old_epoch);
        assert!(laptop_mls.process(&later, &pins).is_err());
        assert_eq!(laptop_mls.group(id).unwrap().epoch, *old_epoch);
    }
    bob.group_send("friends", "just us").await.unwrap();
    assert_eq!(drain(&alice).await, ["friends/bob: just us"]);
}

/// A device removed without a revocation (an older client) keeps its leaf until a member
/// commits its removal, but the server delivers nothing more to it: a send to the group is
/// stored for the current devices only (one for a removed device would fail the send). The
/// account's other device removes the leaf when it next catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_delivers_nothing_to_a_removed_device_and_the_account_heals() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let (laptop, device, _) =
        link_device(&server, &homes.path().join("laptop"), &alice, "alice").await;
    bob.create_group("bobs").await.unwrap();
    bob.group_add("bobs", "alice").await.unwrap();
    drain(&laptop).await;
    drain(&alice).await;

    link::remove_device(&alice.client(), device, Password::new(PASSWORD))
        .await
        .unwrap();
    assert!(link::was_removed(&laptop.client()) || laptop.client().list_devices().await.is_err());
    assert_eq!(members(&bob, "bobs").await, ["alice/1", "alice/2", "bob/1"]);
    bob.group_send("bobs", "still there?").await.unwrap();
    assert_eq!(drain(&alice).await, ["bobs/bob: still there?"]);

    let changes = alice.heal_group_devices().await.unwrap();
    assert_eq!(changes.changed, ["bobs"]);
    assert_eq!(drain(&bob).await, ["bobs: alice/1 removed alice/2"]);
    assert_eq!(members(&bob, "bobs").await, ["alice/1", "bob/1"]);
    assert_eq!(epoch(&alice, "bobs").await, epoch(&bob, "bobs").await);
}

/// Alice removes her laptop with a signed revocation but commits nothing: the server passes
/// the revocation to the group, bob (not an admin) commits the removal with it, and every
/// client accepts his commit. A revocation the account did not sign is refused by the server,
/// in `remove_device` and in a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_admins_removal_of_another_users_removed_device_is_accepted() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let carol = member(&server, &homes.path().join("c"), "carol").await;
    let (laptop, device, _) =
        link_device(&server, &homes.path().join("laptop"), &alice, "alice").await;
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "alice").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    alice.group_add("friends", "carol").await.unwrap();
    for m in [&laptop, &bob, &carol] {
        drain(m).await;
    }
    assert_eq!(
        members(&carol, "friends").await,
        ["alice/1", "alice/2", "bob/1", "carol/1"]
    );

    // A revocation the account's identity did not sign is refused; nothing is removed.
    let forged = Request::RemoveDevice {
        device,
        password: Password::new(PASSWORD),
        revocation: Some(Bin([7; 64])),
    };
    let refused = alice.client().request(forged).await.unwrap_err();
    assert!(refused.is_server(ErrorCode::InvalidKeys), "{refused}");
    assert_eq!(alice.client().list_devices().await.unwrap().len(), 2);

    link::remove_device_signed(
        &alice.client(),
        alice.keystore(),
        device,
        Password::new(PASSWORD),
    )
    .await
    .unwrap();
    // The device is gone, but a revocation bob made up does not let him remove its leaf:
    // the server wants the account's own.
    let id = bob.group("friends").await.unwrap().mls.id;
    let gone = MemberId {
        user: "alice".into(),
        device,
    };
    let bob_mls = bob.mls().await.unwrap();
    let made_up = revoke(&IdentityKeyPair::generate().unwrap(), &gone);
    let rogue = bob_mls
        .remove_devices(&id, std::slice::from_ref(&gone), &[made_up])
        .unwrap();
    let sent = bob
        .client()
        .send_group(
            "friends",
            "mls",
            MessageId::random().unwrap(),
            &rogue.commit,
            None,
        )
        .await
        .unwrap_err();
    assert!(sent.is_server(ErrorCode::NotAdmin), "{sent}");
    bob_mls.commit_refused(&id).unwrap();

    // Bob processes the notice first and commits the removal with alice's revocation.
    assert_eq!(drain(&bob).await, ["friends: alice removed their device 2"]);
    assert_eq!(
        members(&bob, "friends").await,
        ["alice/1", "bob/1", "carol/1"]
    );
    for m in [&carol, &alice] {
        let seen = drain(m).await;
        assert!(
            seen.contains(&"friends: bob/1 removed alice/2".to_owned()),
            "{seen:?}"
        );
        assert_eq!(members(m, "friends").await, ["alice/1", "bob/1", "carol/1"]);
        assert_eq!(epoch(m, "friends").await, epoch(&bob, "friends").await);
    }
    carol.group_send("friends", "hello").await.unwrap();
    assert_eq!(drain(&bob).await, ["friends/carol: hello"]);
    assert_eq!(drain(&alice).await, ["friends/carol: hello"]);
}

/// Bob (not an admin) tries to remove alice's laptop, which is still a device of her
/// account, with a revocation he made himself: his commit is refused by the other members'
/// clients (the revocation does not verify with alice's identity) and by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_admins_removal_of_a_current_device_is_refused() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let carol = member(&server, &homes.path().join("c"), "carol").await;
    let (laptop, device, _) =
        link_device(&server, &homes.path().join("laptop"), &alice, "alice").await;
    alice.create_group("friends").await.unwrap();
    alice.group_add("friends", "alice").await.unwrap();
    alice.group_add("friends", "bob").await.unwrap();
    alice.group_add("friends", "carol").await.unwrap();
    for m in [&laptop, &bob, &carol] {
        drain(m).await;
    }
    let before = epoch(&carol, "friends").await;
    let id = carol.group("friends").await.unwrap().mls.id;
    let gone = MemberId {
        user: "alice".into(),
        device,
    };
    let bob_mls = bob.mls().await.unwrap();
    // Bob's client refuses to make it without a revocation.
    assert!(matches!(
        bob_mls.remove_devices(&id, std::slice::from_ref(&gone), &[]),
        Err(MlsError::NotAdmin { .. })
    ));
    let made_up = revoke(&IdentityKeyPair::generate().unwrap(), &gone);
    let rogue = bob_mls
        .remove_devices(&id, std::slice::from_ref(&gone), &[made_up])
        .unwrap();

    // The members' clients refuse it, whatever the server says.
    let pins: std::collections::BTreeMap<_, _> = [
        (
            "alice".to_owned(),
            alice
                .keystore()
                .read_async(|s| s.map(|s| s.identity().public()))
                .await
                .unwrap()
                .unwrap(),
        ),
        (
            "bob".to_owned(),
            bob.keystore()
                .read_async(|s| s.map(|s| s.identity().public()))
                .await
                .unwrap()
                .unwrap(),
        ),
        (
            "carol".to_owned(),
            carol
                .keystore()
                .read_async(|s| s.map(|s| s.identity().public()))
                .await
                .unwrap()
                .unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    for m in [&carol, &alice, &laptop] {
        let mls = m.mls().await.unwrap();
        match mls.process(&rogue.commit, &pins) {
            Err(MlsError::Policy { committer, reason }) => {
                assert_eq!(committer, "bob/1");
                assert!(reason.contains("alice/2"), "{reason}");
            }
            other => panic!("expected a policy refusal, got {other:?}"),
        }
        assert_eq!(epoch(m, "friends").await, before);
    }
    // The server refuses it too: nothing is delivered.
    let sent = bob
        .client()
        .send_group(
            "friends",
            "mls",
            MessageId::random().unwrap(),
            &rogue.commit,
            None,
        )
        .await
        .unwrap_err();
    assert!(sent.is_server(ErrorCode::NotAdmin), "{sent}");
    bob_mls.commit_refused(&id).unwrap();
    assert!(drain(&carol).await.is_empty());
    assert_eq!(
        members(&carol, "friends").await,
        ["alice/1", "alice/2", "bob/1", "carol/1"]
    );
}

/// Alice's phone and tablet both add her new laptop at once: one commit wins the epoch, the
/// other device receives it and finds nothing left to do; the laptop has exactly one leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_adding_the_same_new_device_leave_one_leaf_for_it() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let phone = member(&server, &homes.path().join("a"), "alice").await;
    let bob = member(&server, &homes.path().join("b"), "bob").await;
    let (tablet, _, _) = link_device(&server, &homes.path().join("tablet"), &phone, "alice").await;
    phone.create_group("friends").await.unwrap();
    phone.group_add("friends", "bob").await.unwrap();
    phone.group_add("friends", "alice").await.unwrap();
    drain(&tablet).await;
    drain(&bob).await;
    assert_eq!(
        members(&tablet, "friends").await,
        ["alice/1", "alice/2", "bob/1"]
    );

    // The laptop is linked from the phone, which adds nothing yet; it publishes its key
    // packages; then phone and tablet add it at the same moment.
    let name = Username::parse("alice").unwrap();
    let phone_client = phone.client();
    let opened = open_link(&phone_client, phone.keystore(), &name)
        .await
        .unwrap();
    let code = opened.code().clone();
    let client = server.client().await;
    let home = homes.path().join("laptop");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let keystore = Keystore::new(&home);
    let (linked, _) = tokio::join!(
        opened.answer(&phone_client, phone.keystore()),
        link::join_link(&client, &keystore, &name, &code, "laptop")
    );
    let device = linked.unwrap().device;
    link::publish_keys(&client, &keystore).await.unwrap();
    let laptop = Messenger::new(client, &home, "alice").unwrap();
    laptop.ensure_key_packages().await.unwrap();

    let (a, b) = tokio::join!(
        phone.add_device_to_groups(device, WAIT),
        tablet.add_device_to_groups(device, WAIT)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.deferred.is_empty() && b.deferred.is_empty(),
        "{a:?} {b:?}"
    );
    assert_eq!(
        a.changed.len() + b.changed.len(),
        1,
        "exactly one commit adds it: {a:?} {b:?}"
    );
    let joined = drain(&laptop).await;
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert!(
        joined[0].starts_with("friends: you were added by alice/"),
        "{joined:?}"
    );
    drain(&phone).await;
    drain(&tablet).await;
    drain(&bob).await;
    for m in [&phone, &tablet, &bob, &laptop] {
        assert_eq!(
            members(m, "friends").await,
            ["alice/1", "alice/2", "alice/3", "bob/1"]
        );
        assert_eq!(epoch(m, "friends").await, epoch(&bob, "friends").await);
    }
    laptop.group_send("friends", "one leaf").await.unwrap();
    assert_eq!(drain(&bob).await, ["friends/alice: one leaf"]);
}

/// The DS reads a commit's authenticated data as device revocations: anything else there is
/// refused (`invalid_mls`), and the same commit without it is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ds_refuses_authenticated_data_that_is_not_revocations() {
    use common::mls::{Member, failure};
    use securefastchat::protocol::Reply;

    let server = TestServer::start().await;
    let mut alice = Member::signup(&server, "alice").await;
    assert!(matches!(
        alice.create_group("friends").await,
        Reply::GroupCreated { .. }
    ));
    alice.with_group("friends", |g, _, _| g.set_aad(b"not revocations".to_vec()));
    let refused = alice.update("friends").await;
    assert_eq!(failure(&refused).0, ErrorCode::InvalidMls, "{refused:?}");
    assert_eq!(alice.epoch("friends"), 0);
    let taken = alice.update("friends").await;
    assert!(matches!(taken, Reply::Sent { .. }), "{taken:?}");
    assert_eq!(alice.epoch("friends"), 1);
}
