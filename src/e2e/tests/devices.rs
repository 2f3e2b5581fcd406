//! Sessions between two devices of one account, and the copies of sent messages they carry
//! (E14): same identity key on both sides, the addressee bound into every copy.

use super::*;

/// Device `n` of `account`: the account's identity, its own prekeys.
fn device(account: &Party) -> Party {
    let identity = IdentityKeyPair::from_seed(account.identity.expose_seed());
    let prekeys = PrekeyStore::generate(&identity, 2).unwrap();
    Party {
        name: account.name.clone(),
        identity,
        prekeys,
    }
}

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// Device 1 of alice starts a session with her device 2 by sealing it a copy of a message
/// to bob; returns both sides.
fn linked() -> (Session, Session, Party) {
    let d1 = party("alice", 2);
    let mut d2 = device(&d1);
    let mut s1 = Session::initiate(&d1.identity, &d1.name, &d2.name, &bundle(&d2)).unwrap();
    let copy = s1.seal_copy(id(0), &name("bob"), b"to bob").unwrap();
    let (s2, text) = Session::accept_copy(
        &d2.identity,
        &mut d2.prekeys,
        &d2.name,
        &name("bob"),
        id(0),
        &copy,
    )
    .unwrap();
    assert_eq!(text, b"to bob");
    assert!(s1.is_own() && s2.is_own());
    (s1, s2, d2)
}

#[test]
fn copies_go_both_ways_between_two_devices_of_one_account() {
    let (mut s1, mut s2, _) = linked();
    let back = s2.seal_copy(id(1), &name("carol"), b"to carol").unwrap();
    assert_eq!(
        s1.open_copy(id(1), &name("carol"), &back).unwrap(),
        b"to carol"
    );
    for n in 2..6 {
        let copy = s1.seal_copy(id(n), &name("bob"), b"more").unwrap();
        assert!(copy.initial.is_none());
        assert_eq!(s2.open_copy(id(n), &name("bob"), &copy).unwrap(), b"more");
    }
}

/// A server that relabels a copy's addressee gets a decryption failure, and the session is
/// as it was: the copy still opens under its true addressee.
#[test]
fn a_relabelled_copy_does_not_open_and_changes_nothing() {
    let (mut s1, mut s2, _) = linked();
    let copy = s1.seal_copy(id(1), &name("bob"), b"secret plans").unwrap();
    let before = snapshot(&s2);
    for wrong in ["carol", "alice", "bobby"] {
        assert_eq!(
            s2.open_copy(id(1), &name(wrong), &copy),
            Err(E2eError::DecryptionFailed)
        );
    }
    // Nor as an ordinary message, nor under another id.
    assert_eq!(s2.open(id(1), &copy), Err(E2eError::DecryptionFailed));
    assert_eq!(
        s2.open_copy(id(2), &name("bob"), &copy),
        Err(E2eError::DecryptionFailed)
    );
    assert_eq!(snapshot(&s2), before);
    assert_eq!(
        s2.open_copy(id(1), &name("bob"), &copy).unwrap(),
        b"secret plans"
    );
}

/// An ordinary message sealed in a session between two devices of one account does not open
/// as a copy, and copies need such a session on both sides.
#[test]
fn copies_only_between_devices_of_one_account() {
    let (mut s1, mut s2, _) = linked();
    let ordinary = s1.seal(id(1), b"plain").unwrap();
    assert_eq!(
        s2.open_copy(id(1), &name("alice"), &ordinary),
        Err(E2eError::DecryptionFailed)
    );
    let alice = party("alice", 2);
    let mut bob = party("bob", 2);
    let (mut a, mut b) = start(&alice, &mut bob);
    assert!(!a.is_own());
    assert!(matches!(
        a.seal_copy(id(3), &name("carol"), b"x"),
        Err(E2eError::NotOwnDevice)
    ));
    let m = a.seal(id(4), b"x").unwrap();
    assert_eq!(
        b.open_copy(id(4), &name("carol"), &m),
        Err(E2eError::NotOwnDevice)
    );
}

/// Someone without the account's identity key (here bob, calling himself alice) cannot start
/// a session with one of alice's devices: the device requires its own identity key.
#[test]
fn only_a_holder_of_the_account_identity_starts_a_session_with_its_device() {
    let alice = party("alice", 2);
    let mut d2 = device(&alice);
    let bob = party("bob", 2);
    let mut forged =
        Session::initiate(&bob.identity, &alice.name, &alice.name, &bundle(&d2)).unwrap();
    let copy = forged
        .seal_copy(id(0), &name("carol"), b"I said this")
        .unwrap();
    let one_time = d2.prekeys.one_time_prekeys().len();
    let refused = Session::accept_copy(
        &d2.identity,
        &mut d2.prekeys,
        &d2.name,
        &name("carol"),
        id(0),
        &copy,
    );
    assert!(
        matches!(refused, Err(E2eError::IdentityChanged { presented }) if presented == bob.identity.public())
    );
    assert_eq!(d2.prekeys.one_time_prekeys().len(), one_time);
}
