//! What an attacker or a broken network may do: replay, tamper, forge, flood the skipped-key
//! store, swap identities, send oversized messages.

use super::*;

#[test]
fn replays_are_rejected_and_leave_the_state_alone() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let mut a = Session::initiate(&alice.identity, &alice.name, &bob.name, &bundle(&bob)).unwrap();
    let first = a.seal(id(0), b"one").unwrap();
    let (mut b, _) = Session::accept(
        &bob.identity,
        &mut bob.prekeys,
        &bob.name,
        &alice.name,
        id(0),
        &first,
    )
    .unwrap();
    let envs: Vec<Envelope> = (1..4).map(|i| a.seal(id(i), b"m").unwrap()).collect();
    b.open(id(3), &envs[2]).unwrap(); // skips 1 and 2
    b.open(id(1), &envs[0]).unwrap(); // from the skipped store
    let before = snapshot(&b);
    assert_eq!(b.open(id(0), &first), Err(E2eError::Duplicate));
    assert_eq!(b.open(id(1), &envs[0]), Err(E2eError::Duplicate));
    assert_eq!(b.open(id(3), &envs[2]), Err(E2eError::Duplicate));
    assert_eq!(snapshot(&b), before);
    // The first envelope offered again as a new session: its one-time prekey is gone.
    let again = Session::accept(
        &bob.identity,
        &mut bob.prekeys,
        &bob.name,
        &alice.name,
        id(0),
        &first,
    );
    assert!(matches!(again, Err(E2eError::UnknownPrekey { .. })));
    // After a ratchet step, a replay from the old chain fails too (it cannot authenticate).
    a.open(id(4), &b.seal(id(4), b"r").unwrap()).unwrap();
    b.open(id(5), &a.seal(id(5), b"n").unwrap()).unwrap();
    let before = snapshot(&b);
    assert!(b.open(id(3), &envs[2]).is_err());
    assert_eq!(snapshot(&b), before);
    b.open(id(2), &envs[1]).unwrap(); // the genuinely late one still works
}

#[test]
fn tampering_is_detected_and_changes_nothing() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, mut b) = start(&alice, &mut bob);
    let genuine = a.seal(id(7), b"pay 10 to carol").unwrap();
    let before = snapshot(&b);
    let mut flipped = genuine.clone();
    flipped.ciphertext[3] ^= 0x01;
    let mut truncated = genuine.clone();
    truncated.ciphertext.pop();
    let mut later = genuine.clone();
    later.header.n += 1;
    let mut pn = genuine.clone();
    pn.header.pn += 1;
    let mut dh = genuine.clone();
    dh.header.dh[0] ^= 0x40;
    for env in [&flipped, &truncated, &later, &pn, &dh] {
        assert!(b.open(id(7), env).is_err(), "{env:?}");
        assert_eq!(snapshot(&b), before);
    }
    assert_eq!(b.open(id(8), &genuine), Err(E2eError::DecryptionFailed)); // other id
    // A session that believes the message is between other users refuses it too.
    let mut confused: Session = rmp_serde::from_slice(&before).unwrap();
    let mallory = Username::parse("mallory").unwrap();
    confused.set_names_for_test(&bob.name, &mallory);
    assert_eq!(
        confused.open(id(7), &genuine),
        Err(E2eError::DecryptionFailed)
    );
    assert_eq!(b.open(id(7), &genuine).unwrap(), b"pay 10 to carol");
}

#[test]
fn forged_signed_prekeys_are_refused() {
    let alice = party("alice", 1);
    let bob = party("bob", 1);
    let mallory = party("mallory", 1);
    let spk = bob.prekeys.signed_prekey();
    let ik = bob.identity.public();
    assert_eq!(
        verify_signed_prekey(&ik, spk.id, &spk.key, &spk.signature),
        Ok(())
    );
    // Mallory's key under Bob's signature, and Bob's key in a bundle claiming Mallory.
    let forged = mallory.prekeys.signed_prekey().key;
    assert_eq!(
        verify_signed_prekey(&ik, spk.id, &forged, &spk.signature),
        Err(E2eError::BadSignature)
    );
    let mut swapped_key = bundle(&bob);
    swapped_key.signed_prekey.key = forged;
    let mut swapped_identity = bundle(&bob);
    swapped_identity.identity_key = mallory.identity.public();
    for b in [swapped_key, swapped_identity] {
        assert!(matches!(
            Session::initiate(&alice.identity, &alice.name, &bob.name, &b),
            Err(E2eError::BadSignature)
        ));
    }
}

#[test]
fn failed_accept_keeps_the_one_time_prekey() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let mut a = Session::initiate(&alice.identity, &alice.name, &bob.name, &bundle(&bob)).unwrap();
    let mut first = a.seal(id(0), b"x").unwrap();
    first.ciphertext[0] ^= 1;
    let (me, peer) = (bob.name.clone(), alice.name.clone());
    let result = Session::accept(&bob.identity, &mut bob.prekeys, &me, &peer, id(0), &first);
    assert_eq!(result.err(), Some(E2eError::DecryptionFailed));
    assert_eq!(bob.prekeys.one_time_count(), 1);
    first.ciphertext[0] ^= 1;
    Session::accept(&bob.identity, &mut bob.prekeys, &me, &peer, id(0), &first).unwrap();
    assert_eq!(bob.prekeys.one_time_count(), 0);
    let plain = Envelope {
        initial: None,
        ..first
    };
    let result = Session::accept(&bob.identity, &mut bob.prekeys, &me, &peer, id(0), &plain);
    assert_eq!(result.err(), Some(E2eError::NotInitial));
}

/// Seals `count` empty messages with fresh ids, returned with their ids.
fn burst(a: &mut Session, next_id: &mut u32, count: u32) -> Vec<([u8; 16], Envelope)> {
    (0..count)
        .map(|_| {
            *next_id += 1;
            (id(*next_id), a.seal(id(*next_id), b"").unwrap())
        })
        .collect()
}

#[test]
fn skipped_keys_are_bounded_per_step_and_in_total() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, mut b) = start(&alice, &mut bob);
    let mut next = 100;
    // Chain 1 continues at n = 1; reaching n = 1002 would skip 1001 keys.
    let chain1 = burst(&mut a, &mut next, 1002);
    let before = snapshot(&b);
    let (mid, env) = &chain1[1001];
    assert_eq!(b.open(*mid, env), Err(E2eError::TooManySkipped));
    assert_eq!(snapshot(&b), before);
    for (mid, env) in &chain1[1000..] {
        b.open(*mid, env).unwrap(); // n = 1001 skips exactly 1000, then n = 1002 in order
    }
    assert_eq!(b.ratchet().skipped_len(), 1000);
    // Chain 2: another 1000 skipped keys fill the store to its bound.
    a.open(id(1), &b.seal(id(1), b"").unwrap()).unwrap();
    let chain2 = burst(&mut a, &mut next, 1001);
    b.open(chain2[1000].0, &chain2[1000].1).unwrap();
    assert_eq!(b.ratchet().skipped_len(), MAX_SKIPPED_KEYS);
    // Chain 3: skipping even one more is refused; in-order messages still decrypt.
    a.open(id(2), &b.seal(id(2), b"").unwrap()).unwrap();
    let chain3 = burst(&mut a, &mut next, 2);
    assert_eq!(
        b.open(chain3[1].0, &chain3[1].1),
        Err(E2eError::TooManySkipped)
    );
    for (mid, env) in &chain3 {
        b.open(*mid, env).unwrap();
    }
    // A late message from chain 1 frees its slot.
    b.open(chain1[0].0, &chain1[0].1).unwrap();
    assert_eq!(b.ratchet().skipped_len(), MAX_SKIPPED_KEYS - 1);
}

#[test]
fn a_changed_identity_or_new_session_is_reported() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 3);
    let (_, mut b) = start(&alice, &mut bob);
    // Alice reinstalls: new identity key, new session.
    let new_alice = party("alice", 0);
    let mut a2 =
        Session::initiate(&new_alice.identity, &alice.name, &bob.name, &bundle(&bob)).unwrap();
    let env = a2.seal(id(9), b"it's me").unwrap();
    assert_eq!(
        b.open(id(9), &env),
        Err(E2eError::IdentityChanged {
            presented: new_alice.identity.public()
        })
    );
    assert_eq!(
        check_identity(b.peer_identity(), env.sender_identity().unwrap()),
        Err(E2eError::IdentityChanged {
            presented: new_alice.identity.public()
        })
    );
    // Same identity, fresh session (e.g. Alice lost her session state).
    let mut a3 = Session::initiate(&alice.identity, &alice.name, &bob.name, &bundle(&bob)).unwrap();
    let env = a3.seal(id(10), b"again").unwrap();
    assert_eq!(b.open(id(10), &env), Err(E2eError::NewSession));
    let (me, peer) = (bob.name.clone(), alice.name.clone());
    let (_, text) =
        Session::accept(&bob.identity, &mut bob.prekeys, &me, &peer, id(10), &env).unwrap();
    assert_eq!(text, b"again");
}

#[test]
fn oversized_plaintexts_are_refused() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, _) = start(&alice, &mut bob);
    let big = vec![0u8; MAX_PLAINTEXT_LEN + 1];
    assert!(matches!(
        a.seal(id(1), &big),
        Err(E2eError::TooLarge { .. })
    ));
    let max = vec![0u8; MAX_PLAINTEXT_LEN];
    let env = a.seal(id(1), &max).unwrap();
    assert_eq!(Envelope::from_bytes(&env.to_bytes().unwrap()).unwrap(), env);
}
