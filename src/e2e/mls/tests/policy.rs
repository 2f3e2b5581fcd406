//! Refusals: a non-admin's change, certifications that do not match the pinned identity,
//! users not pinned yet.

use super::*;
use crate::e2e::mls::device::Session;

/// Bob adds dave although he is not an admin, skipping his own client's check (a modified
/// client): the other members must refuse the commit.
#[test]
fn a_non_admins_add_is_refused_by_the_other_members() {
    let (alice, bob, carol, dave) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
        Dev::new("dave", 1),
    );
    let all = pins(&[&alice, &bob, &carol, &dave]);
    let id = group_of(&alice, &[&bob, &carol], &all);
    let kp = dave.key_package();
    let rogue = bob
        .mls
        .change(|s: &mut Session<'_>| super::super::group::add(s, &id, &[kp], &all, false))
        .unwrap();
    for d in [&alice, &carol] {
        match d.mls.process(&rogue.commit, &all) {
            Err(MlsError::Policy { committer, reason }) => {
                assert_eq!(committer, "bob/1");
                assert!(reason.contains("admin"), "{reason}");
            }
            other => panic!("expected a policy refusal, got {other:?}"),
        }
        // Not merged: still epoch 1, dave not a member.
        let g = d.mls.group(&id).unwrap();
        assert_eq!((g.epoch, g.members.len()), (1, 3));
    }
    // A non-admin's removal of another user is refused too.
    bob.mls.commit_refused(&id).unwrap();
    let rogue = bob
        .mls
        .change(|s: &mut Session<'_>| {
            let mut g = s.group(&id)?;
            let carol_leaf = super::super::group::members(&g)?
                .into_iter()
                .find(|(_, m)| m.user == "carol")
                .unwrap()
                .0;
            let (c, _, _) = g
                .remove_members(s.provider(), &s.signer, &[carol_leaf])
                .unwrap();
            Ok(c.to_bytes().unwrap())
        })
        .unwrap();
    assert!(matches!(
        alice.mls.process(&rogue, &all),
        Err(MlsError::Policy { .. })
    ));
    assert!(matches!(
        bob.mls.remove_user(&id, "carol"),
        Err(MlsError::PendingCommit)
    ));
}

#[test]
fn a_certification_that_does_not_match_the_pinned_identity_is_refused() {
    let (alice, bob, carol, dave) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
        Dev::new("dave", 1),
    );
    let all = pins(&[&alice, &bob, &carol, &dave]);
    // Alice pinned another key for dave (the server swapped it, or dave's device is not his).
    let mut wrong = all.clone();
    wrong.insert("dave".into(), IdentityKeyPair::generate().unwrap().public());

    // 1. A fetched key package.
    let id = group_of(&alice, &[&bob], &all);
    match alice.mls.add_members(&id, &[dave.key_package()], &wrong) {
        Err(MlsError::Certification { member, .. }) => assert_eq!(member, "dave/1"),
        other => panic!("expected a refused certification, got {other:?}"),
    }
    assert!(!alice.mls.group(&id).unwrap().commit_pending);

    // 2. A commit that adds the leaf (made by a member who trusts dave's key).
    let add = alice
        .mls
        .add_members(&id, &[dave.key_package()], &all)
        .unwrap();
    alice.mls.commit_accepted(&id).unwrap();
    assert!(matches!(
        bob.mls.process(&add.commit, &wrong),
        Err(MlsError::Certification { .. })
    ));
    assert_eq!(epoch(&bob, &id), 1);

    // 3. A welcome whose tree holds the leaf.
    let kps = [carol.key_package()];
    let add_carol = alice.mls.add_members(&id, &kps, &all).unwrap();
    alice.mls.commit_accepted(&id).unwrap();
    assert!(matches!(
        carol
            .mls
            .process(add_carol.welcome.as_ref().unwrap(), &wrong),
        Err(MlsError::Certification { .. })
    ));
    assert!(carol.mls.groups().unwrap().is_empty());

    // A key package certified by its own user's key, but claiming another user.
    let forged = FetchedKeyPackage {
        user: "bob".into(),
        bytes: dave.key_package().bytes,
    };
    assert!(matches!(
        alice.mls.add_members(&id, &[forged], &all),
        Err(MlsError::KeyPackage(_))
    ));
}

#[test]
fn a_user_not_pinned_stops_the_join_until_pinned() {
    let (alice, bob, carol) = (
        Dev::new("alice", 1),
        Dev::new("bob", 1),
        Dev::new("carol", 1),
    );
    let all = pins(&[&alice, &bob, &carol]);
    let id = alice.mls.create_group().unwrap();
    let commit = alice
        .mls
        .add_members(&id, &[bob.key_package(), carol.key_package()], &all)
        .unwrap();
    alice.mls.commit_accepted(&id).unwrap();
    let welcome = commit.welcome.unwrap();
    let only_alice = pins(&[&alice, &carol]);
    match carol.mls.process(&welcome, &only_alice) {
        Err(MlsError::Unpinned(users)) => assert_eq!(users, ["bob"]),
        other => panic!("expected unpinned users, got {other:?}"),
    }
    // Nothing was kept: after pinning, the same welcome joins (its key package is still there).
    assert!(matches!(
        carol.mls.process(&welcome, &all).unwrap(),
        Incoming::Joined { epoch: 1, .. }
    ));
}

#[test]
fn identities_and_admins_parse_strictly() {
    assert_eq!(
        MemberId::parse(b"alice/12").unwrap(),
        MemberId {
            user: "alice".into(),
            device: 12
        }
    );
    for bad in [
        &b"alice"[..],
        b"Alice/1",
        b"alice/01",
        b"alice/",
        b"a/1",
        b"alice/-1",
        b"\xff/1",
    ] {
        assert!(MemberId::parse(bad).is_err(), "{bad:?}");
    }
    let admins = vec!["bob".to_string(), "alice".to_string(), "bob".to_string()];
    let bytes = encode_admins(&admins);
    assert_eq!(decode_admins(&bytes).unwrap(), ["alice", "bob"]);
    let unsorted = {
        let mut out = Vec::new();
        rmp::encode::write_array_len(&mut out, 2).unwrap();
        rmp::encode::write_str(&mut out, "bob").unwrap();
        rmp::encode::write_str(&mut out, "alice").unwrap();
        out
    };
    assert!(decode_admins(&unsorted).is_err());
    assert!(decode_admins(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(decode_admins(&[0x91, 0xd9, 0xff]).is_err());
}

/// Bob (not an admin) removes alice's second device: members accept it only when the commit
/// carries a revocation of that device signed by alice's pinned identity; a revocation signed
/// by another key, or none, is refused.
#[test]
fn a_non_admin_removes_a_revoked_device_only_with_a_valid_revocation() {
    let identity = IdentityKeyPair::generate().unwrap();
    let alice = Dev::with_identity("alice", 1, identity.clone());
    let laptop = Dev::with_identity("alice", 2, identity.clone());
    let (bob, carol) = (Dev::new("bob", 1), Dev::new("carol", 1));
    let all = pins(&[&alice, &bob, &carol]);
    let id = group_of(&alice, &[&laptop, &bob, &carol], &all);
    let gone = MemberId {
        user: "alice".into(),
        device: 2,
    };

    // Bob's own client refuses without a revocation.
    assert!(matches!(
        bob.mls
            .remove_devices(&id, std::slice::from_ref(&gone), &[]),
        Err(MlsError::NotAdmin { .. })
    ));
    // A revocation signed by another key: bob's client does not check it, the others do.
    let forged = revoke(&bob.identity, &gone);
    let rogue = bob
        .mls
        .remove_devices(&id, std::slice::from_ref(&gone), &[forged])
        .unwrap();
    for d in [&alice, &carol] {
        assert!(matches!(
            d.mls.process(&rogue.commit, &all),
            Err(MlsError::Policy { .. })
        ));
    }
    bob.mls.commit_refused(&id).unwrap();

    // Signed by alice's identity: accepted by every member.
    let revocation = revoke(&identity, &gone);
    assert_eq!(
        verify_revocation(&revocation, &identity.public()),
        Some(gone.clone())
    );
    let commit = bob
        .mls
        .remove_devices(&id, std::slice::from_ref(&gone), &[revocation])
        .unwrap();
    assert_eq!(commit.removed, std::slice::from_ref(&gone));
    bob.mls.commit_accepted(&id).unwrap();
    for d in [&alice, &carol] {
        match d.mls.process(&commit.commit, &all).unwrap() {
            Incoming::Commit { removed, .. } => assert_eq!(removed, std::slice::from_ref(&gone)),
            other => panic!("expected a commit, got {other:?}"),
        }
    }
    match laptop.mls.process(&commit.commit, &all).unwrap() {
        Incoming::Commit { removed_self, .. } => assert!(removed_self),
        other => panic!("expected a commit, got {other:?}"),
    }
    for d in [&alice, &bob, &carol] {
        let g = d.mls.group(&id).unwrap();
        assert_eq!((g.epoch, g.members.len()), (2, 3));
    }
    // Nothing left to remove.
    assert!(matches!(
        alice.mls.remove_devices(&id, &[gone], &[]),
        Err(MlsError::Nothing(_))
    ));
}
