//! The state file: a reload continues where it stopped, a damaged file is a typed error, two
//! handles (as two processes) on one home take turns.

use super::*;
use crate::e2e::mls::store::State;
use openmls::prelude::tls_codec::Deserialize as _;

#[test]
fn the_state_survives_a_reload_and_goes_on() {
    let (alice, bob) = (Dev::new("alice", 1), Dev::new("bob", 1));
    let all = pins(&[&alice, &bob]);
    let id = group_of(&alice, &[&bob], &all);
    let before = alice.mls.send(&id, b"one").unwrap();
    bob.mls.process(&before, &all).unwrap();
    let kps = bob.mls.key_packages(3, true).unwrap();
    assert_eq!(kps.one_time.len(), 3);
    assert!(kps.last_resort.is_some());

    // Bob's device restarts: a new handle from the home alone, and one with the identity.
    let Dev {
        home,
        mls,
        identity,
    } = bob;
    drop(mls);
    let reopened = MlsDevice::open_existing(home.path()).unwrap().unwrap();
    assert_eq!(reopened.member().to_string(), "bob/1");
    let again = MlsDevice::open(home.path(), reopened.member().clone(), &identity).unwrap();
    assert_eq!(again.group(&id).unwrap().epoch, 1);
    let next = alice.mls.send(&id, b"two").unwrap();
    assert!(matches!(
        again.process(&next, &all).unwrap(),
        Incoming::Message { ref plaintext, .. } if plaintext == b"two"
    ));
    let reply = again.send(&id, b"bob is back").unwrap();
    assert!(matches!(
        alice.mls.process(&reply, &all).unwrap(),
        Incoming::Message { ref plaintext, .. } if plaintext == b"bob is back"
    ));
    // A commit after the restart too, and a key package made before it still joins.
    let carol = Dev::new("carol", 1);
    let all = pins(&[
        &alice,
        &carol,
        &Dev::with_identity("bob", 9, identity.clone()),
    ]);
    let add = again
        .add_members(&id, &[carol.key_package()], &all)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(add, MlsError::NotAdmin { .. }));
    let fetched = FetchedKeyPackage {
        user: "bob".into(),
        bytes: kps.one_time[1].clone(),
    };
    let id2 = alice.mls.create_group().unwrap();
    let commit = alice.mls.add_members(&id2, &[fetched], &all).unwrap();
    alice.mls.commit_accepted(&id2).unwrap();
    assert!(matches!(
        again
            .process(commit.welcome.as_ref().unwrap(), &all)
            .unwrap(),
        Incoming::Joined { .. }
    ));
    assert_eq!(again.groups().unwrap().len(), 2);
    // Another account's state is refused.
    let other = MemberId {
        user: "bob".into(),
        device: 2,
    };
    assert!(matches!(
        MlsDevice::open(home.path(), other, &identity),
        Err(MlsError::WrongDevice { .. })
    ));
    let stranger = IdentityKeyPair::generate().unwrap();
    assert!(matches!(
        MlsDevice::open(home.path(), again.member().clone(), &stranger),
        Err(MlsError::Certification { .. })
    ));
}

#[test]
fn a_damaged_state_file_is_a_typed_error() {
    let dev = Dev::new("alice", 1);
    let id = dev.mls.create_group().unwrap();
    let path = dev.home.path().join(STATE_FILE);
    let good = std::fs::read(&path).unwrap();
    let corrupt = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        let opened = MlsDevice::open(dev.home.path(), dev.mls.member().clone(), &dev.identity);
        assert!(
            matches!(opened, Err(MlsError::CorruptState { .. })),
            "{opened:?}"
        );
        assert!(matches!(
            dev.mls.group(&id),
            Err(MlsError::CorruptState { .. })
        ));
    };
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    corrupt(&flipped);
    corrupt(&good[..good.len() - 1]);
    corrupt(&good[..20]);
    corrupt(b"");
    corrupt(&[0xff; 4096]);
    std::fs::write(&path, &good).unwrap();
    assert_eq!(dev.mls.group(&id).unwrap().epoch, 0);

    // Lengths past the bytes left, with a checksum that matches: still refused.
    let path_ref = path.as_path();
    let sealed = |body: &[u8]| {
        use sha2::Digest;
        let mut out = body.to_vec();
        out.extend_from_slice(&sha2::Sha256::digest(body));
        State::decode(path_ref, &out).map(|_| ())
    };
    let magic = &good[..8];
    for tail in [
        &[0xff, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 1, 0x80, 0xff, 0xff, 0xff, 0xff],
        &[0, 0, 0, 1, 0x80, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff],
        &[0, 0, 0, 1, 0x80, 0, 0, 0, 0],
    ] {
        let mut body = magic.to_vec();
        body.extend_from_slice(tail);
        assert!(matches!(sealed(&body), Err(MlsError::CorruptState { .. })));
    }
}

/// Two handles on one home, as two processes (`sfc recv` and `sfc group send`): they take
/// turns on the lock and every message of both is decrypted by the other member.
#[test]
fn two_handles_on_one_home_take_turns() {
    let (alice, bob) = (Dev::new("alice", 1), Dev::new("bob", 1));
    let all = pins(&[&alice, &bob]);
    let id = group_of(&alice, &[&bob], &all);
    let second = MlsDevice::open_existing(alice.home.path())
        .unwrap()
        .unwrap();
    let sent: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let one = scope.spawn(|| {
            (0..10)
                .map(|n| alice.mls.send(&id, format!("one {n}").as_bytes()).unwrap())
                .collect::<Vec<_>>()
        });
        let two = scope.spawn(|| {
            (0..10)
                .map(|n| second.send(&id, format!("two {n}").as_bytes()).unwrap())
                .collect::<Vec<_>>()
        });
        let mut all = one.join().unwrap();
        all.extend(two.join().unwrap());
        all
    });
    let mut texts = Vec::new();
    for bytes in &sent {
        match bob.mls.process(bytes, &all).unwrap() {
            Incoming::Message { plaintext, .. } => {
                texts.push(String::from_utf8(plaintext).unwrap())
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(texts.len(), 20);
}

/// A named group as the server knows it: the welcome records the name, an application message
/// is kept in the state (surviving a restart) until shown, and a message naming another group
/// is refused.
#[test]
fn delivered_messages_are_kept_until_shown() {
    let (alice, bob) = (Dev::new("alice", 1), Dev::new("bob", 1));
    let all = pins(&[&alice, &bob]);
    let created = alice.mls.create_named_group("friends").unwrap();
    let info = openmls::prelude::MlsMessageIn::tls_deserialize_exact(created.group_info.as_slice());
    assert!(info.is_ok());
    assert_eq!(alice.mls.group_named("friends").unwrap(), Some(created.id));
    let add = alice
        .mls
        .add_members(&created.id, &[bob.key_package()], &all)
        .unwrap();
    alice.mls.commit_accepted(&created.id).unwrap();
    let at = |seq: u64| GroupDelivery {
        group: "friends",
        id: &[7; 16],
        seq,
        sent_at: 1_700_000_000 + seq,
    };
    bob.mls
        .process_delivered(&at(1), add.welcome.as_ref().unwrap(), &all)
        .unwrap();
    assert_eq!(bob.mls.group_named("friends").unwrap(), Some(created.id));
    assert_eq!(
        bob.mls.name_of(&created.id).unwrap().as_deref(),
        Some("friends")
    );
    let hello = alice.mls.send(&created.id, b"hello friends").unwrap();
    let elsewhere = GroupDelivery {
        group: "others",
        ..at(2)
    };
    assert!(matches!(
        bob.mls.process_delivered(&elsewhere, &hello, &all),
        Err(MlsError::Malformed(_))
    ));
    bob.mls.process_delivered(&at(2), &hello, &all).unwrap();
    let reopened = MlsDevice::open_existing(bob.home.path()).unwrap().unwrap();
    let kept = reopened.unshown().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].from.as_str(), kept[0].from_device, kept[0].seq),
        ("alice", 1, 2)
    );
    assert_eq!(kept[0].plaintext, b"hello friends");
    reopened.shown("friends", &[7; 16]).unwrap();
    assert!(bob.mls.unshown().unwrap().is_empty());
}
