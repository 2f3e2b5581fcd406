//! Linking a device (PROTOCOL.md E13): every peer input of `e2e::link` is refused or accepted,
//! never a panic.

use super::*;
use securefastchat::e2e::link::{
    ExistingDevice, JoiningDevice, LinkCode, LinkContact, LinkError, LinkPayload, LinkSecret,
};
use securefastchat::protocol::Username;

fn link_payload() -> LinkPayload {
    let contact = IdentityKeyPair::from_seed(&[2; 32]).public();
    LinkPayload {
        account: Username::parse("alice").expect("valid"),
        identity: IdentityKeyPair::from_seed(&[1; 32]),
        contacts: vec![LinkContact {
            username: Username::parse("bob").expect("valid"),
            identity_key: contact,
            verified: true,
        }],
    }
}

/// A SPAKE2 message: arbitrary bytes, or the other side's byte then 32 bytes (about half of
/// which decode to a point, so the key derivation runs too).
fn pake_message(side: u8) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..40),
        vec(any::<u8>(), 32).prop_map(move |point| [vec![side], point].concat()),
    ]
}

proptest! {
    // Each case runs SPAKE2 on both sides: fewer cases.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn link_steps_never_panic_on_arbitrary_peer_messages(
        to_existing in pake_message(b'B'),
        to_new in pake_message(b'A'),
        confirm in vec(any::<u8>(), 0..40),
        sealed in vec(any::<u8>(), 0..200),
        slot in 0..10_000u16,
    ) {
        let alice = Username::parse("alice").expect("valid");
        let secret = LinkSecret::draw().expect("random");
        let code = LinkCode::new(slot, &secret).expect("in range");
        let (existing, _) = ExistingDevice::start(&secret, &alice).expect("starts");
        if let Ok(keys) = existing.finish(slot, &to_existing) {
            // Random bytes never pass as the new device's confirmation.
            prop_assert_eq!(keys.accept(&confirm, &link_payload()).err(), Some(LinkError::WrongCode));
        }
        let (joining, _) = JoiningDevice::start(&code, &alice).expect("starts");
        if let Ok((keys, _)) = joining.finish(&to_new) {
            prop_assert!(keys.open(&confirm, &sealed).is_err());
        }
    }

    #[test]
    fn link_payloads_with_a_few_bytes_changed_are_decoded_or_refused(
        bytes in Just(link_payload().to_bytes().expect("encodes").to_vec()).prop_flat_map(mutated)
    ) {
        if let Ok(payload) = LinkPayload::from_bytes(&bytes) {
            // Whatever decodes re-encodes to a payload that decodes the same.
            let again = LinkPayload::from_bytes(&payload.to_bytes().expect("encodes")).expect("decodes");
            prop_assert_eq!(again.contacts, payload.contacts);
        }
        let _ = LinkPayload::from_bytes(&bytes[..bytes.len() / 2]);
    }

    #[test]
    fn link_codes_are_parsed_or_refused(text in "[0-9 \\-a٣]{0,16}|.{0,16}") {
        if let Ok(code) = LinkCode::parse(&text) {
            let again = LinkCode::parse(&code.to_string()).expect("a printed code parses");
            prop_assert_eq!(again.to_string(), code.to_string());
        }
    }
}

#[test]
fn a_link_payload_round_trips() {
    let bytes = link_payload().to_bytes().expect("encodes");
    let payload = LinkPayload::from_bytes(&bytes).expect("decodes");
    assert_eq!(payload.contacts, link_payload().contacts);
    assert_eq!(payload.identity.expose_seed(), &[1; 32]);
}
