//! A group's life: messages in order, removal, leaving, concurrent commits, admins.

use super::*;

fn text(incoming: &Incoming) -> (String, String) {
    match incoming {
        Incoming::Message {
            sender, plaintext, ..
        } => (
            sender.to_string(),
            String::from_utf8(plaintext.clone()).unwrap(),
        ),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn a_group_of_three_exchanges_messages_in_order() {
    let (alice, bob, carol) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 2),
    );
    let all = pins(&[&alice, &bob, &carol]);
    let id = group_of(&alice, &[&bob, &carol], &all);
    for d in [&alice, &bob, &carol] {
        let g = d.mls.group(&id).unwrap();
        assert_eq!(g.epoch, 1);
        assert_eq!(g.admins, vec!["alice".to_string()]);
        let names: Vec<String> = g.members.iter().map(|m| m.to_string()).collect();
        assert_eq!(names, ["alice/1", "bob/1", "carol/2"]);
    }
    // The delivery service's order: a1 b1 a2 c1 b2, the same for every inbox.
    let sent = [
        (&alice, "a1"),
        (&bob, "b1"),
        (&alice, "a2"),
        (&carol, "c1"),
        (&bob, "b2"),
    ];
    let wire: Vec<(String, Vec<u8>)> = sent
        .iter()
        .map(|(d, t)| {
            (
                d.mls.member().to_string(),
                d.mls.send(&id, t.as_bytes()).unwrap(),
            )
        })
        .collect();
    for reader in [&alice, &bob, &carol] {
        let mut got = Vec::new();
        for (from, bytes) in &wire {
            if *from == reader.mls.member().to_string() {
                continue; // the server does not echo one's own messages
            }
            got.push(text(&reader.mls.process(bytes, &all).unwrap()));
        }
        let want: Vec<(String, String)> = sent
            .iter()
            .filter(|(d, _)| d.mls.member() != reader.mls.member())
            .map(|(d, t)| (d.mls.member().to_string(), t.to_string()))
            .collect();
        assert_eq!(got, want, "{}", reader.mls.member());
    }
    // A redelivery is recognised.
    assert!(matches!(
        bob.mls.process(&wire[0].1, &all),
        Err(MlsError::Duplicate)
    ));
}

#[test]
fn a_removed_member_cannot_decrypt_what_follows_its_removal() {
    let (alice, bob, carol) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
    );
    let all = pins(&[&alice, &bob, &carol]);
    let id = group_of(&alice, &[&bob, &carol], &all);
    let removal = alice.mls.remove_user(&id, "carol").unwrap();
    assert_eq!(removal.removed.len(), 1);
    alice.mls.commit_accepted(&id).unwrap();
    let seen = bob.mls.process(&removal.commit, &all).unwrap();
    assert!(
        matches!(seen, Incoming::Commit { ref removed, removed_self: false, .. } if removed[0].user == "carol")
    );
    let secret = alice.mls.send(&id, b"after carol").unwrap();
    assert_eq!(
        text(&bob.mls.process(&secret, &all).unwrap()).1,
        "after carol"
    );

    // Carol, with her own state, before and after she processes her removal.
    assert!(carol.mls.process(&secret, &all).is_err());
    let gone = carol.mls.process(&removal.commit, &all).unwrap();
    assert!(matches!(
        gone,
        Incoming::Commit {
            removed_self: true,
            ..
        }
    ));
    assert!(!carol.mls.group(&id).unwrap().active);
    assert!(matches!(
        carol.mls.process(&secret, &all),
        Err(MlsError::Inactive)
    ));
    assert!(matches!(carol.mls.send(&id, b"x"), Err(MlsError::Inactive)));
    carol.mls.forget_group(&id).unwrap();
    assert!(carol.mls.groups().unwrap().is_empty());
}

#[test]
fn two_commits_at_one_epoch_one_wins_the_other_lands_later() {
    let (alice, bob, carol, dave) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
        Dev::new("dave", 1),
    );
    let all = pins(&[&alice, &bob, &carol, &dave]);
    let id = group_of(&alice, &[&bob, &carol], &all);
    // Both commit at epoch 1: alice adds dave, bob updates his keys.
    let winner = alice
        .mls
        .add_members(&id, &[dave.key_package()], &all)
        .unwrap();
    let loser = bob.mls.update(&id).unwrap();
    assert_eq!((winner.epoch, loser.epoch), (1, 1));
    // The server orders alice's; bob's is refused as stale.
    alice.mls.commit_accepted(&id).unwrap();
    assert_eq!(
        bob.mls.commit_refused(&id).unwrap(),
        Some(PendingChange::Update)
    );
    let seen = bob.mls.process(&winner.commit, &all).unwrap();
    assert!(matches!(
        seen,
        Incoming::Commit {
            lost_own_commit: true,
            ..
        }
    ));
    deliver(&[&carol], &winner.commit, &all);
    dave.mls
        .process(winner.welcome.as_ref().unwrap(), &all)
        .unwrap();
    // Bob makes his change again, at epoch 2.
    let again = bob.mls.redo(&id, &all).unwrap().unwrap();
    assert_eq!(again.epoch, 2);
    bob.mls.commit_accepted(&id).unwrap();
    let others = deliver(&[&alice, &carol, &dave], &again.commit, &all);
    assert!(
        others
            .iter()
            .all(|i| matches!(i, Incoming::Commit { epoch: 3, .. }))
    );
    for d in [&alice, &bob, &carol, &dave] {
        assert_eq!(epoch(d, &id), 3);
    }
    assert_eq!(bob.mls.redo(&id, &all).unwrap(), None);
    // Everyone still talks.
    let hello = dave.mls.send(&id, b"hello from dave").unwrap();
    for d in [&alice, &bob, &carol] {
        assert_eq!(
            text(&d.mls.process(&hello, &all).unwrap()).1,
            "hello from dave"
        );
    }
}

#[test]
fn own_commit_coming_back_is_merged_or_stale() {
    let (alice, bob) = (Dev::new("alice", 1), Dev::new("bob", 1));
    let all = pins(&[&alice, &bob]);
    let id = group_of(&alice, &[&bob], &all);
    let first = alice.mls.update(&id).unwrap();
    // Back in the inbox before the server's answer: merged.
    assert!(matches!(
        alice.mls.process(&first.commit, &all).unwrap(),
        Incoming::OwnCommit { epoch: 2, .. }
    ));
    assert_eq!(alice.mls.commit_accepted(&id).unwrap(), 2);
    let second = alice.mls.update(&id).unwrap();
    alice.mls.commit_accepted(&id).unwrap();
    // After it: stale.
    assert!(matches!(
        alice.mls.process(&second.commit, &all).unwrap(),
        Incoming::Stale { .. }
    ));
    deliver(&[&bob], &first.commit, &all);
    deliver(&[&bob], &second.commit, &all);
    assert_eq!(epoch(&bob, &id), 3);
}

#[test]
fn a_member_leaves_and_any_member_commits_the_removal() {
    let (alice, bob, carol) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
    );
    let all = pins(&[&alice, &bob, &carol]);
    let id = group_of(&alice, &[&bob, &carol], &all);
    let proposal = carol.mls.leave(&id).unwrap();
    for d in [&alice, &bob] {
        let seen = d.mls.process(&proposal, &all).unwrap();
        assert!(matches!(seen, Incoming::Leaving { ref member, .. } if member.user == "carol"));
        assert!(matches!(
            d.mls.send(&id, b"x"),
            Err(MlsError::PendingProposals)
        ));
    }
    // Bob, not an admin, commits it; alice accepts that.
    let commit = bob.mls.commit_proposals(&id).unwrap();
    assert_eq!(commit.removed[0].user, "carol");
    bob.mls.commit_accepted(&id).unwrap();
    assert!(matches!(
        alice.mls.process(&commit.commit, &all).unwrap(),
        Incoming::Commit { ref removed, .. } if removed.len() == 1
    ));
    assert!(matches!(
        carol.mls.process(&commit.commit, &all).unwrap(),
        Incoming::Commit {
            removed_self: true,
            ..
        }
    ));
    let after = alice.mls.send(&id, b"bye carol").unwrap();
    assert_eq!(text(&bob.mls.process(&after, &all).unwrap()).1, "bye carol");
    assert!(carol.mls.process(&after, &all).is_err());
}

#[test]
fn an_admin_makes_an_admin_who_may_then_add() {
    let (alice, bob, carol, dave) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
        Dev::new("dave", 1),
    );
    let all = pins(&[&alice, &bob, &carol, &dave]);
    let id = group_of(&alice, &[&bob, &carol], &all);
    assert!(matches!(
        bob.mls.add_members(&id, &[dave.key_package()], &all),
        Err(MlsError::NotAdmin { .. })
    ));
    let promote = alice.mls.add_admin(&id, "bob").unwrap();
    alice.mls.commit_accepted(&id).unwrap();
    for i in deliver(&[&bob, &carol], &promote.commit, &all) {
        assert!(matches!(
            i,
            Incoming::Commit {
                admins_changed: true,
                ..
            }
        ));
    }
    assert_eq!(bob.mls.group(&id).unwrap().admins, ["alice", "bob"]);
    let add = bob
        .mls
        .add_members(&id, &[dave.key_package()], &all)
        .unwrap();
    bob.mls.commit_accepted(&id).unwrap();
    deliver(&[&alice, &carol], &add.commit, &all);
    dave.mls
        .process(add.welcome.as_ref().unwrap(), &all)
        .unwrap();
    assert_eq!(dave.mls.group(&id).unwrap().admins, ["alice", "bob"]);
    assert_eq!(dave.mls.group(&id).unwrap().members.len(), 4);
}

#[test]
fn a_second_device_of_a_member_is_added_by_its_own_user() {
    let (alice, bob) = (Dev::new("alice", 1), Dev::new("bob", 1));
    let bob2 = Dev::with_identity(
        "bob",
        2,
        IdentityKeyPair::from_seed(bob.identity.expose_seed()),
    );
    let all = pins(&[&alice, &bob]);
    let id = group_of(&alice, &[&bob], &all);
    // Bob (not an admin) adds his own new device.
    let add = bob
        .mls
        .add_members(&id, &[bob2.key_package()], &all)
        .unwrap();
    bob.mls.commit_accepted(&id).unwrap();
    assert!(matches!(
        alice.mls.process(&add.commit, &all).unwrap(),
        Incoming::Commit { ref added, .. } if added[0].to_string() == "bob/2"
    ));
    bob2.mls
        .process(add.welcome.as_ref().unwrap(), &all)
        .unwrap();
    let hi = bob2.mls.send(&id, b"from bob's phone").unwrap();
    assert_eq!(text(&alice.mls.process(&hi, &all).unwrap()).0, "bob/2");
    // And removes it again (his own user: his other devices).
    let rm = bob.mls.remove_user(&id, "bob").unwrap();
    assert_eq!(rm.removed[0].to_string(), "bob/2");
    bob.mls.commit_accepted(&id).unwrap();
    assert!(matches!(
        alice.mls.process(&rm.commit, &all).unwrap(),
        Incoming::Commit { .. }
    ));
}

/// Bob's first device leaves; carol (not an admin) commits the removal of all of bob's
/// devices, covering his proposal, and the others accept it.
#[test]
fn a_user_who_leaves_loses_all_devices_by_any_members_commit() {
    let (alice, bob, carol) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
    );
    let bob2 = Dev::with_identity(
        "bob",
        2,
        IdentityKeyPair::from_seed(bob.identity.expose_seed()),
    );
    let all = pins(&[&alice, &bob, &carol]);
    let id = group_of(&alice, &[&bob, &bob2, &carol], &all);
    let proposal = bob.mls.leave(&id).unwrap();
    for i in deliver(&[&alice, &bob2, &carol], &proposal, &all) {
        assert!(matches!(i, Incoming::Leaving { .. }));
    }
    let commit = carol.mls.remove_user(&id, "bob").unwrap();
    assert_eq!(commit.removed.len(), 2);
    carol.mls.commit_accepted(&id).unwrap();
    assert!(matches!(
        alice.mls.process(&commit.commit, &all).unwrap(),
        Incoming::Commit { ref removed, .. } if removed.len() == 2
    ));
    for d in [&bob, &bob2] {
        assert!(matches!(
            d.mls.process(&commit.commit, &all).unwrap(),
            Incoming::Commit {
                removed_self: true,
                ..
            }
        ));
    }
    let g = alice.mls.group(&id).unwrap();
    assert_eq!(g.members.len(), 2);
    assert!(!g.proposals_pending);
    let after = carol.mls.send(&id, b"just us").unwrap();
    assert!(alice.mls.process(&after, &all).is_ok());
}

/// A posted commit is kept (for posting again under its id) until the server's answer, and
/// dropped when another commit takes the epoch.
#[test]
fn a_posted_commit_is_kept_until_settled() {
    let (alice, bob) = (Dev::new("alice", 1), Dev::new("bob", 1));
    let all = pins(&[&alice, &bob]);
    let id = group_of(&alice, &[&bob], &all);
    let posted = |n: u8| PostedCommit {
        message_id: vec![n; 16],
        body: vec![n; 3],
        welcome: None,
    };
    assert!(matches!(
        alice.mls.mark_posted(&id, posted(1)),
        Err(MlsError::NoPendingCommit)
    ));
    let first = alice.mls.update(&id).unwrap();
    alice.mls.mark_posted(&id, posted(1)).unwrap();
    assert_eq!(alice.mls.posted_commits().unwrap(), vec![(id, posted(1))]);
    alice.mls.commit_accepted(&id).unwrap();
    assert!(alice.mls.posted_commits().unwrap().is_empty());
    bob.mls.process(&first.commit, &all).unwrap();

    // Bob's posted commit loses to alice's.
    let winner = alice.mls.update(&id).unwrap();
    bob.mls.update(&id).unwrap();
    bob.mls.mark_posted(&id, posted(2)).unwrap();
    alice.mls.commit_accepted(&id).unwrap();
    bob.mls.process(&winner.commit, &all).unwrap();
    assert!(bob.mls.posted_commits().unwrap().is_empty());
}
