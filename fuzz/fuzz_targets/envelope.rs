//! Envelopes as a receiving client gets them from any sender: the strict decoder, its round
//! trip, and then opening the envelope in an established session (the ratchet's header
//! handling, skipped-key bounds and AEAD check on attacker-chosen values).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use securefastchat::e2e::{Envelope, IdentityKeyPair, PrekeyBundle, PrekeyStore, Session};
use securefastchat::protocol::Username;

/// Bob's side of a session Alice started (one message in), made once per process.
fn bob_session() -> Option<&'static Session> {
    static SESSION: OnceLock<Option<Session>> = OnceLock::new();
    SESSION
        .get_or_init(|| {
            let alice = IdentityKeyPair::from_seed(&[1; 32]);
            let bob = IdentityKeyPair::from_seed(&[2; 32]);
            let mut bob_prekeys = PrekeyStore::generate(&bob, 1).ok()?;
            let (alice_name, bob_name) =
                (Username::parse("alice").ok()?, Username::parse("bob").ok()?);
            let bundle = PrekeyBundle {
                identity_key: bob.public(),
                signed_prekey: bob_prekeys.signed_prekey(),
                one_time_prekey: bob_prekeys.one_time_prekeys().into_iter().next(),
                last_resort_prekey: None,
            };
            let mut a = Session::initiate(&alice, &alice_name, &bob_name, &bundle).ok()?;
            let first = a.seal([0; 16], b"hi").ok()?;
            let (b, _) = Session::accept(
                &bob,
                &mut bob_prekeys,
                &bob_name,
                &alice_name,
                [0; 16],
                &first,
            )
            .ok()?;
            Some(b)
        })
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::from_bytes(data) else {
        return;
    };
    let bytes = envelope.to_bytes().expect("a decoded envelope encodes");
    assert_eq!(Envelope::from_bytes(&bytes).as_ref(), Ok(&envelope));
    if let Some(session) = bob_session() {
        let mut session = session.clone();
        // Forging the AEAD tag is out of reach: this must fail, quickly and without a panic.
        assert!(session.open([0; 16], &envelope).is_err());
    }
});
