//! Padding through whole sessions: what the server sees of a sealed text is one of a few
//! sizes, messages of clients from before padding still open, and a wrong padding is refused
//! without changing the session.

use super::*;

/// Lengths of many texts: every length up to 1,100 bytes, then a spread to the largest, and
/// each bucket's edges.
fn lengths() -> impl Iterator<Item = usize> {
    let edges = PADDING_BUCKETS
        .into_iter()
        .flat_map(|b| [b - 3, b - 2, b - 1, b]);
    (0..=1100)
        .chain((1100..MAX_PLAINTEXT_LEN).step_by(257))
        .chain(edges)
        .filter(|&len| len <= MAX_PLAINTEXT_LEN)
        .chain([MAX_PLAINTEXT_LEN])
}

#[test]
fn sealed_sizes_fall_into_buckets_for_texts_of_every_length() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, mut b) = start(&alice, &mut bob);
    // From one session state each, so the headers are the same and only the text differs:
    // Alice's envelopes still carry `initial`, Bob's do not.
    for from in [&a, &b] {
        let mut sizes = std::collections::BTreeSet::new();
        for len in lengths() {
            let env = from.clone().seal(id(7), &vec![b'x'; len]).unwrap();
            let bucket = padded_len(len).unwrap();
            assert_eq!(
                env.ciphertext.len(),
                bucket + TAG_LEN,
                "text of {len} bytes"
            );
            sizes.insert(env.to_bytes().unwrap().len());
        }
        // One envelope size per bucket, whatever the text's length.
        assert_eq!(sizes.len(), PADDING_BUCKETS.len(), "{sizes:?}");
        assert!(sizes.last().unwrap() <= &MAX_ENVELOPE_LEN);
    }
    // Round trips, a few of each bucket, in a running conversation.
    for (n, len) in lengths().step_by(40).enumerate() {
        let text: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let n = 100 + n as u32;
        let env = b.seal(id(n), &text).unwrap();
        assert_eq!(a.open(id(n), &env).unwrap(), text, "text of {len} bytes");
    }
}

#[test]
fn messages_sealed_without_padding_by_older_clients_still_open() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    // A first message (accept) unpadded, then unpadded and padded ones mixed, out of order.
    let mut a = Session::initiate(&alice.identity, &alice.name, &bob.name, &bundle(&bob)).unwrap();
    let first = a.seal_raw(id(0), b"from before padding").unwrap();
    let (mut b, text) = Session::accept(
        &bob.identity,
        &mut bob.prekeys,
        &bob.name,
        &alice.name,
        id(0),
        &first,
    )
    .unwrap();
    assert_eq!(text, b"from before padding");
    let old = a.seal_raw(id(1), "ünïcode, unpadded".as_bytes()).unwrap();
    let new = a.seal(id(2), b"padded").unwrap();
    let empty = a.seal_raw(id(3), b"").unwrap();
    assert_eq!(b.open(id(2), &new).unwrap(), b"padded");
    assert_eq!(b.open(id(1), &old).unwrap(), "ünïcode, unpadded".as_bytes());
    assert_eq!(b.open(id(3), &empty).unwrap(), b"");
    let back = b.seal(id(4), b"and back").unwrap();
    assert_eq!(a.open(id(4), &back).unwrap(), b"and back");
}

#[test]
fn a_wrong_padding_is_refused_and_changes_nothing() {
    let alice = party("alice", 1);
    let mut bob = party("bob", 1);
    let (mut a, mut b) = start(&alice, &mut bob);
    let bad: [&[u8]; 5] = [
        b"\xff",
        b"\xff\x00\x00\x00",
        b"\xffhello",
        b"\xffhello\x80\x00\x01\x00",
        b"\xffhello\x7f\x00\x00",
    ];
    let mut envelopes: Vec<_> = bad
        .iter()
        .enumerate()
        .map(|(n, p)| (id(10 + n as u32), a.seal_raw(id(10 + n as u32), p).unwrap()))
        .collect();
    // A long one too, wrong only in its last byte.
    let mut long = vec![0u8; 4096];
    long[0] = PADDED_FORMAT;
    long[100] = 0x80;
    long[4095] = 1;
    envelopes.push((id(20), a.seal_raw(id(20), &long).unwrap()));
    // In order, each is refused and the session stays as it was.
    for (mid, env) in &envelopes {
        let before = snapshot(&b);
        assert_eq!(b.open(*mid, env), Err(E2eError::BadPadding));
        assert_eq!(snapshot(&b), before);
    }
    // A good message after them opens (their keys are set aside as skipped)...
    let good = a.seal(id(30), b"good").unwrap();
    assert_eq!(b.open(id(30), &good).unwrap(), b"good");
    // ...and on the skipped-key path they are refused again, still changing nothing.
    for (mid, env) in &envelopes {
        let before = snapshot(&b);
        assert_eq!(b.open(*mid, env), Err(E2eError::BadPadding));
        assert_eq!(snapshot(&b), before);
    }
    // A first message with a wrong padding is refused by accept, keeping the one-time prekey.
    let carol = party("carol", 1);
    let mut c = Session::initiate(&carol.identity, &carol.name, &bob.name, &bundle(&bob)).unwrap();
    let prekeys_before = bob.prekeys.one_time_prekeys().len();
    let first = c.seal_raw(id(0), b"\xff\x80\x01").unwrap();
    assert!(matches!(
        Session::accept(
            &bob.identity,
            &mut bob.prekeys,
            &bob.name,
            &carol.name,
            id(0),
            &first
        ),
        Err(E2eError::BadPadding)
    ));
    assert_eq!(bob.prekeys.one_time_prekeys().len(), prekeys_before);
}
