//! Normal conversations: turns, ordering and loss, persistence, prekey life cycle.

use super::*;

#[test]
fn several_turns_round_trip_through_bytes() {
    let alice = party("alice", 5);
    let mut bob = party("bob", 5);
    let (mut a, mut b) = start(&alice, &mut bob);
    assert_eq!(bob.prekeys.one_time_count(), 4);
    let mut n = 1;
    for turn in 0..6 {
        let (from, to) = if turn % 2 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        for i in 0..3 {
            let text = format!("turn {turn} message {i}");
            let wire = from
                .seal(id(n), text.as_bytes())
                .unwrap()
                .to_bytes()
                .unwrap();
            let env = Envelope::from_bytes(&wire).unwrap();
            assert_eq!(to.open(id(n), &env).unwrap(), text.as_bytes());
            n += 1;
        }
    }
    assert!(!a.awaiting_reply());
    assert_eq!(a.peer_identity(), &bob.identity.public());
    assert_eq!(b.peer_identity(), &alice.identity.public());
}

#[test]
fn initiator_attaches_the_initial_header_until_a_reply() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, mut b) = start(&alice, &mut bob);
    let second = a.seal(id(1), b"again").unwrap();
    assert!(second.initial.is_some() && a.awaiting_reply());
    assert_eq!(b.open(id(1), &second).unwrap(), b"again");
    let reply = b.seal(id(2), b"hello").unwrap();
    assert!(reply.initial.is_none());
    a.open(id(2), &reply).unwrap();
    assert!(!a.awaiting_reply());
    assert!(a.seal(id(3), b"x").unwrap().initial.is_none());
}

#[test]
fn out_of_order_and_lost_messages_decrypt_across_ratchet_steps() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let mut a = Session::initiate(&alice.identity, &alice.name, &bob.name, &bundle(&bob)).unwrap();
    let envs: Vec<Envelope> = (0..6).map(|i| a.seal(id(i), b"m").unwrap()).collect();
    // Bob first sees message 2: the session starts from it and keeps keys for 0 and 1.
    let (mut b, _) = Session::accept(
        &bob.identity,
        &mut bob.prekeys,
        &bob.name,
        &alice.name,
        id(2),
        &envs[2],
    )
    .unwrap();
    assert_eq!(b.ratchet().skipped_len(), 2);
    for i in [5, 0, 4] {
        b.open(id(i), &envs[i as usize]).unwrap();
    }
    assert_eq!(b.ratchet().skipped_len(), 2); // 1 and 3 are still missing
    // A ratchet step in between: Bob replies, Alice answers on a new chain.
    a.open(id(10), &b.seal(id(10), b"r").unwrap()).unwrap();
    let late_chain = a.seal(id(11), b"new chain").unwrap();
    assert_eq!(b.open(id(11), &late_chain).unwrap(), b"new chain");
    for i in [3, 1] {
        b.open(id(i), &envs[i as usize]).unwrap();
    }
    assert_eq!(b.ratchet().skipped_len(), 0);
}

#[test]
fn sessions_survive_persistence_mid_conversation() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, mut b) = start(&alice, &mut bob);
    let early = a.seal(id(1), b"early").unwrap();
    let later = a.seal(id(2), b"later").unwrap();
    b.open(id(2), &later).unwrap();
    let mut a: Session = rmp_serde::from_slice(&snapshot(&a)).unwrap();
    let mut b: Session = rmp_serde::from_slice(&snapshot(&b)).unwrap();
    let store: PrekeyStore =
        rmp_serde::from_slice(&rmp_serde::to_vec_named(&bob.prekeys).unwrap()).unwrap();
    assert_eq!(store.signed_prekey(), bob.prekeys.signed_prekey());
    assert_eq!(b.open(id(1), &early).unwrap(), b"early");
    a.open(id(3), &b.seal(id(3), b"back").unwrap()).unwrap();
    assert_eq!(
        b.open(id(4), &a.seal(id(4), b"on").unwrap()).unwrap(),
        b"on"
    );
}

#[test]
fn last_resort_prekey_serves_when_one_time_keys_run_out() {
    let alice = party("alice", 0);
    let mut bob = party("bob", 0);
    let b = bundle(&bob);
    assert!(b.one_time_prekey.is_none() && b.last_resort_prekey.is_some());
    let (mut a, mut bs) = start(&alice, &mut bob);
    a.open(id(1), &bs.seal(id(1), b"ok").unwrap()).unwrap();
    // The last-resort key is still there for the next initiator.
    let carol = party("carol", 0);
    let (_, _) = start(&carol, &mut bob);
}

#[test]
fn no_used_message_key_remains_in_the_state() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, mut b) = start(&alice, &mut bob);
    let mut keys = Vec::new();
    let mut envs = Vec::new();
    for i in 1..5 {
        keys.push(a.ratchet().next_sending_message_key().unwrap());
        envs.push(a.seal(id(i), b"secret").unwrap());
    }
    b.open(id(4), &envs[3]).unwrap(); // keys 1..3 are now skipped
    assert!(keys[..3].iter().all(|k| b.ratchet().holds(k)));
    for (i, env) in [(2, &envs[1]), (1, &envs[0]), (3, &envs[2])] {
        b.open(id(i), env).unwrap();
    }
    let bytes = snapshot(&b);
    for key in &keys {
        assert!(!b.ratchet().holds(key));
        assert!(!bytes.windows(32).any(|w| w == key.expose()));
    }
    assert_eq!(b.ratchet().skipped_len(), 0);
}

#[test]
fn both_sides_compute_the_same_safety_number() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (a, b) = start(&alice, &mut bob);
    let from_alice = safety_number(
        a.my_name(),
        &alice.identity.public(),
        a.peer_name(),
        a.peer_identity(),
    );
    let from_bob = safety_number(
        b.my_name(),
        &bob.identity.public(),
        b.peer_name(),
        b.peer_identity(),
    );
    assert_eq!(from_alice, from_bob);
}
