//! Linking: the E13 vectors, the code's syntax, and what a wrong code, a server in the middle
//! and a tampered or malformed payload get.

use sha2::{Digest, Sha256};

use super::code::{SECRET_DRAW_BOUND, SECRET_RANGE};
use super::payload::{decode_payload, encode_payload};
use super::*;
use crate::e2e::IdentityKeyPair;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// Hands out the given secrets in order, then refuses.
struct Fixed(Vec<[u8; 32]>);

impl SecretSource for Fixed {
    fn secret_bytes(&mut self) -> Result<[u8; 32], E2eError> {
        if self.0.is_empty() {
            return Err(E2eError::Primitive);
        }
        Ok(self.0.remove(0))
    }
}

/// The SPAKE2 scalar `x` itself: `x ‖ 0^32` reduces to `x` modulo the group order when the
/// top byte of `x` (little-endian) is below 0x10.
fn scalar(first: u8) -> Fixed {
    let mut x = [0u8; 32];
    for (i, byte) in x.iter_mut().take(31).enumerate() {
        *byte = first + i as u8;
    }
    Fixed(vec![x, [0u8; 32]])
}

fn seed(label: &str) -> [u8; 32] {
    Sha256::digest(label.as_bytes()).into()
}

fn vector_payload() -> LinkPayload {
    LinkPayload {
        account: name("alice"),
        identity: IdentityKeyPair::from_seed(&seed("E13 alice identity")),
        contacts: vec![LinkContact {
            username: name("bob"),
            identity_key: IdentityKeyPair::from_seed(&seed("E13 bob identity")).public(),
            verified: true,
        }],
    }
}

fn one_contact_payload(account: &str) -> LinkPayload {
    LinkPayload {
        account: name(account),
        ..vector_payload()
    }
}

/// A whole link between two honest devices, the new one typing `typed`.
fn link(typed: &str) -> Result<LinkPayload, (LinkError, &'static str)> {
    let alice = name("alice");
    let secret = LinkSecret::draw().unwrap();
    let (existing, pake_e) = ExistingDevice::start(&secret, &alice).unwrap();
    let code = LinkCode::new(4821, &secret).unwrap();
    let typed = typed.replace("CODE", &code.to_string());
    let (joining, pake_n) =
        JoiningDevice::start(&LinkCode::parse(&typed).unwrap(), &alice).unwrap();
    let existing = existing.finish(code.slot(), &pake_n).unwrap();
    let (joining, confirm_n) = joining.finish(&pake_e).unwrap();
    let accept = existing
        .accept(&confirm_n, &vector_payload())
        .map_err(|e| (e, "existing"))?;
    joining
        .open(&accept.confirm, &accept.payload)
        .map_err(|e| (e, "new"))
}

#[test]
fn an_honest_link_hands_over_the_identity_and_contacts() {
    let payload = link("CODE").unwrap();
    let expected = vector_payload();
    assert_eq!(payload.account, expected.account);
    assert_eq!(
        payload.identity.expose_seed(),
        expected.identity.expose_seed()
    );
    assert_eq!(payload.contacts, expected.contacts);
}

#[test]
fn link_vectors_match_the_spec() {
    let alice = name("alice");
    let secret = LinkSecret::new(730_195).unwrap();
    let code = LinkCode::new(4821, &secret).unwrap();
    assert_eq!(code.to_string(), "4821-730195");
    assert_eq!(&*secret.password(), b"730195");

    let (existing, pake_e) =
        ExistingDevice::start_with(&secret, &alice, &mut scalar(0x01)).unwrap();
    let (joining, pake_n) = JoiningDevice::start_with(&code, &alice, &mut scalar(0x21)).unwrap();
    let existing = existing.finish(4821, &pake_n).unwrap();
    let (joining, confirm_n) = joining.finish(&pake_e).unwrap();
    let accept = existing.accept(&confirm_n, &vector_payload()).unwrap();
    let opened = joining.open(&accept.confirm, &accept.payload).unwrap();
    assert_eq!(opened.contacts, vector_payload().contacts);

    let key = spake2_key(&pake_n);
    let keys = LinkKeys::derive(&key, &alice, 4821, &pake_e, &pake_n).unwrap();
    assert_eq!(keys.confirm_new, confirm_n);
    assert_eq!(keys.confirm_existing, accept.confirm);
    let plaintext = encode_payload(&vector_payload()).unwrap();

    let got = [
        ("pake_E", hex::encode(pake_e)),
        ("pake_N", hex::encode(pake_n)),
        ("K", hex::encode(key)),
        (
            "transcript",
            hex::encode(transcript(&alice, 4821, &pake_e, &pake_n).unwrap()),
        ),
        ("k_payload", hex::encode(keys.payload_key())),
        ("c_N", hex::encode(confirm_n)),
        ("c_E", hex::encode(accept.confirm)),
        ("payload", hex::encode(&plaintext[..])),
        ("sealed", hex::encode(&accept.payload)),
    ];
    let expected = [
        (
            "pake_E",
            "418c6a685182c16ac54a722028c47bb257fab457ef982639c3f14228a0d3d11392",
        ),
        (
            "pake_N",
            "4281b73789a17781eacb741aa6774ddcc9b06798d53de0e3db7cd596e52309b58f",
        ),
        (
            "K",
            "28525ffff102814c6ca373ee965c35de0f47ad4e3576e2dc796068438d0e80cd",
        ),
        (
            "transcript",
            "534643206c696e6b2076310005616c69636512d5418c6a685182c16ac54a722028c47bb257fab457ef982639c3f14228a0d3d113924281b73789a17781eacb741aa6774ddcc9b06798d53de0e3db7cd596e52309b58f",
        ),
        (
            "k_payload",
            "70ff30a5419eaa8ab2e98015168a8050cfcfbc5f01a4345068755f933905af0b",
        ),
        (
            "c_N",
            "4ee473617673b84ceff364cad0799c8c1776b064df412f81c265903d53e86fe3",
        ),
        (
            "c_E",
            "b99ac9484b1dd126c79f744d43d40e278e25e6a515a9640c19fad8b58a9db008",
        ),
        (
            "payload",
            "84a776657273696f6e01a8757365726e616d65a5616c696365ad6964656e746974795f73656564c4206d2e9e95c07209ee5377ac43611c9a0109e4ff0fcce39799ce3891d84281b973a8636f6e74616374739183a8757365726e616d65a3626f62ac6964656e746974795f6b6579c42050df62cf8fba70c781c3932cc1cf74ccef2020aa331b50bbd2a5230372ad3a7fa87665726966696564c3",
        ),
        (
            "sealed",
            "f0a98c378a1359a4d3248be811b8cee8c59e1ce7928013d73aa8900975bb635b7a15dd95d08f042f3b7aab3216c55646197a7062ee66ec8a94a2d7cab51bc8f7f5459b2a178b3c2b679a765df3bdcb061677ec5476f15fc2fd4bc6b8667f8a232222527ea42966d59b10eb8b72927e241f27afeec244d05fbbd5586c99625f719850777cbd31850705d0dd10d9dd95e4a60c319d2975641ad703f7d72cf01ef48dec6f56f2417343d50a",
        ),
    ];
    for ((label, value), (_, want)) in got.iter().zip(expected) {
        assert_eq!(value, want, "{label}");
    }
}

/// K of the vector, straight from `spake2` (the states above consumed theirs).
fn spake2_key(pake_n: &[u8; 33]) -> [u8; 32] {
    let (id_a, id_b) = identities(&name("alice"));
    let rng = ScalarSeed::draw(&mut scalar(0x01)).unwrap();
    let (pake, _) =
        Spake2::<Ed25519Group>::start_a_with_rng(&Password::new(b"730195"), &id_a, &id_b, rng);
    pake.finish(pake_n).unwrap().try_into().unwrap()
}

#[test]
fn a_wrong_code_yields_different_keys_and_fails_confirmation() {
    let alice = name("alice");
    let secret = LinkSecret::new(730_195).unwrap();
    let (existing, pake_e) = ExistingDevice::start(&secret, &alice).unwrap();
    let typo = LinkCode::parse("4821-730196").unwrap();
    let (joining, pake_n) = JoiningDevice::start(&typo, &alice).unwrap();
    let existing = existing.finish(4821, &pake_n).unwrap();
    let (joining, confirm_n) = joining.finish(&pake_e).unwrap();
    assert_ne!(existing.keys.confirm_new, confirm_n);
    assert_ne!(
        existing.keys.confirm_existing,
        joining.keys.confirm_existing
    );
    assert_ne!(existing.keys.payload_key(), joining.keys.payload_key());
    // The existing device refuses first and releases nothing.
    assert_eq!(
        existing.accept(&confirm_n, &vector_payload()).unwrap_err(),
        LinkError::WrongCode
    );
    // A slot that differs between the two sides (a misrouted join) fails the same way.
    assert_eq!(link("4822-000000").unwrap_err().0, LinkError::WrongCode);
}

#[test]
fn a_wrong_slot_with_the_right_secret_fails_confirmation() {
    let alice = name("alice");
    let secret = LinkSecret::new(730_195).unwrap();
    let (existing, pake_e) = ExistingDevice::start(&secret, &alice).unwrap();
    let (joining, pake_n) =
        JoiningDevice::start(&LinkCode::parse("4822-730195").unwrap(), &alice).unwrap();
    let existing = existing.finish(4821, &pake_n).unwrap();
    let (_, confirm_n) = joining.finish(&pake_e).unwrap();
    assert_eq!(
        existing.accept(&confirm_n, &vector_payload()).unwrap_err(),
        LinkError::WrongCode
    );
}

#[test]
fn another_account_name_fails_confirmation() {
    let secret = LinkSecret::new(730_195).unwrap();
    let code = LinkCode::new(4821, &secret).unwrap();
    let (existing, pake_e) = ExistingDevice::start(&secret, &name("alice")).unwrap();
    let (joining, pake_n) = JoiningDevice::start(&code, &name("mallory")).unwrap();
    let existing = existing.finish(4821, &pake_n).unwrap();
    let (_, confirm_n) = joining.finish(&pake_e).unwrap();
    assert_eq!(
        existing.accept(&confirm_n, &vector_payload()).unwrap_err(),
        LinkError::WrongCode
    );
}

#[test]
fn a_server_in_the_middle_without_the_code_learns_nothing_and_gets_no_payload() {
    let alice = name("alice");
    let secret = LinkSecret::draw().unwrap();
    let code = LinkCode::new(4821, &secret).unwrap();
    let (existing, pake_e) = ExistingDevice::start(&secret, &alice).unwrap();
    let (joining, pake_n) = JoiningDevice::start(&code, &alice).unwrap();

    // The server keeps both real messages and runs its own SPAKE2 with a guess on each leg.
    let guess_secret = LinkSecret::new((secret.0 + 1) % SECRET_RANGE).unwrap();
    let guess = LinkCode::new(4821, &guess_secret).unwrap();
    let (m_as_new, m_pake_n) = JoiningDevice::start(&guess, &alice).unwrap();
    let (m_as_existing, m_pake_e) = ExistingDevice::start(&guess_secret, &alice).unwrap();

    let existing = existing.finish(4821, &m_pake_n).unwrap();
    let (joining, confirm_n) = joining.finish(&m_pake_e).unwrap();
    let (m_keys_toward_e, m_confirm_n) = m_as_new.finish(&pake_e).unwrap();
    let m_keys_toward_n = m_as_existing.finish(4821, &pake_n).unwrap();

    // It shares no key with either side.
    assert_ne!(
        m_keys_toward_e.keys.payload_key(),
        existing.keys.payload_key()
    );
    assert_ne!(
        m_keys_toward_n.keys.payload_key(),
        joining.keys.payload_key()
    );

    // Toward E, neither its own confirmation nor N's relayed one passes: E seals nothing.
    for forged in [m_confirm_n, confirm_n] {
        let keys = ExistingDeviceKeys {
            keys: clone_keys(&existing.keys),
            account: alice.clone(),
        };
        assert_eq!(
            keys.accept(&forged, &vector_payload()).unwrap_err(),
            LinkError::WrongCode
        );
    }

    // Toward N: M cannot pass N's c_N through the API either, and what it seals with its own
    // key toward N (a payload with an identity of its choosing) is refused at c_E; even
    // without that check, the AEAD would not open it under N's key.
    assert_eq!(
        ExistingDeviceKeys {
            keys: clone_keys(&m_keys_toward_n.keys),
            account: alice.clone(),
        }
        .accept(&confirm_n, &vector_payload())
        .unwrap_err(),
        LinkError::WrongCode
    );
    let m_keys = &m_keys_toward_n.keys;
    let sealed = m_keys
        .seal(encode_payload(&vector_payload()).unwrap())
        .unwrap();
    assert_eq!(
        joining.keys.open(&sealed).unwrap_err(),
        LinkError::PayloadDecryption
    );
    assert_eq!(
        joining.open(&m_keys.confirm_existing, &sealed).unwrap_err(),
        LinkError::WrongCode
    );
}

fn clone_keys(keys: &LinkKeys) -> LinkKeys {
    LinkKeys {
        confirm_new: keys.confirm_new,
        confirm_existing: keys.confirm_existing,
        payload_key: keys.payload_key.clone(),
    }
}

#[test]
fn a_tampered_payload_or_confirmation_is_refused() {
    let alice = name("alice");
    let keys = LinkKeys::derive(&[9; 32], &alice, 1, &[0x41; 33], &[0x42; 33]).unwrap();
    let sealed = keys
        .seal(encode_payload(&vector_payload()).unwrap())
        .unwrap();
    let open = |confirm: &[u8], sealed: &[u8]| {
        JoiningDeviceKeys {
            keys: clone_keys(&keys),
            account: alice.clone(),
        }
        .open(confirm, sealed)
    };
    assert!(open(&keys.confirm_existing, &sealed).is_ok());
    let mut flipped = sealed.clone();
    flipped[3] ^= 1;
    assert_eq!(
        open(&keys.confirm_existing, &flipped).unwrap_err(),
        LinkError::PayloadDecryption
    );
    assert_eq!(
        open(&keys.confirm_existing, &sealed[..10]).unwrap_err(),
        LinkError::PayloadDecryption
    );
    assert!(matches!(
        open(&keys.confirm_existing, &vec![0; MAX_LINK_PAYLOAD_LEN + 1]).unwrap_err(),
        LinkError::PayloadTooLarge { .. }
    ));
    assert_eq!(
        open(&keys.confirm_existing[..31], &sealed).unwrap_err(),
        LinkError::WrongCode
    );
    assert_eq!(open(&[], &sealed).unwrap_err(), LinkError::WrongCode);
    // A payload for another account is refused after opening.
    let bob_payload = keys
        .seal(encode_payload(&one_contact_payload("carol")).unwrap())
        .unwrap();
    assert_eq!(
        open(&keys.confirm_existing, &bob_payload).unwrap_err(),
        LinkError::WrongAccount
    );
}

#[test]
fn malformed_pake_messages_are_typed_errors() {
    let alice = name("alice");
    let secret = LinkSecret::new(1).unwrap();
    let code = LinkCode::new(1, &secret).unwrap();
    let (_, pake_e) = ExistingDevice::start(&secret, &alice).unwrap();
    let (_, pake_n) = JoiningDevice::start(&code, &alice).unwrap();
    let bad: [&[u8]; 5] = [
        &[],
        &pake_n[..32],
        &[pake_n.as_slice(), &[0]].concat(),
        &pake_e,
        &[0x42; 33],
    ];
    for message in bad {
        let (existing, _) = ExistingDevice::start(&secret, &alice).unwrap();
        assert!(matches!(
            existing.finish(1, message).unwrap_err(),
            LinkError::MalformedMessage(_)
        ));
    }
    // A reflected message (side A back to side A's twin) and a non-point.
    let (joining, _) = JoiningDevice::start(&code, &alice).unwrap();
    assert!(matches!(
        joining.finish(&pake_n).unwrap_err(),
        LinkError::MalformedMessage(_)
    ));
}

#[test]
fn a_payload_with_an_unknown_field_is_refused() {
    let good = encode_payload(&vector_payload()).unwrap();
    assert!(decode_payload(&good).is_ok());

    let mut extra = Vec::new();
    rmp::encode::write_map_len(&mut extra, 5).unwrap();
    extra.extend_from_slice(&good[1..]);
    rmp::encode::write_str(&mut extra, "sessions").unwrap();
    rmp::encode::write_bool(&mut extra, true).unwrap();
    let err = decode_payload(&extra).unwrap_err();
    assert!(
        matches!(&err, LinkError::MalformedPayload(why) if why.contains("unknown key")),
        "{err}"
    );

    // The same through the whole link: sealed under the right key, still refused.
    let alice = name("alice");
    let keys = LinkKeys::derive(&[3; 32], &alice, 2, &[0x41; 33], &[0x42; 33]).unwrap();
    let sealed = keys.seal(Zeroizing::new(extra)).unwrap();
    let err = JoiningDeviceKeys {
        keys: clone_keys(&keys),
        account: alice,
    }
    .open(&keys.confirm_existing, &sealed)
    .unwrap_err();
    assert!(matches!(err, LinkError::MalformedPayload(_)), "{err}");
}

#[test]
fn payloads_break_no_rule_of_their_format() {
    let rest_of = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = encode_payload(&vector_payload()).unwrap().to_vec();
        edit(&mut bytes);
        decode_payload(&bytes)
    };
    // Trailing bytes, truncation, an array instead of a map.
    assert!(rest_of(&|b| b.push(0xc0)).is_err());
    assert!(rest_of(&|b| b.truncate(b.len() - 1)).is_err());
    assert!(rest_of(&|b| b[0] = 0x94).is_err());
    // Version 2 (the uint after "version").
    assert!(rest_of(&|b| b[9] = 0x02).is_err());
    assert!(rest_of(&|_| ()).is_ok());

    // A repeated key, a missing key.
    let mut repeated = Vec::new();
    rmp::encode::write_map_len(&mut repeated, 5).unwrap();
    let good = encode_payload(&vector_payload()).unwrap();
    repeated.extend_from_slice(&good[1..]);
    rmp::encode::write_str(&mut repeated, "version").unwrap();
    rmp::encode::write_uint(&mut repeated, 1).unwrap();
    assert!(decode_payload(&repeated).is_err());

    // Too many contacts, a repeated contact, the account as its own contact, a seed of 31
    // bytes, a non-canonical username: refused on both ends.
    let contact = |n: usize| LinkContact {
        username: name(&format!("u{n:031}")),
        identity_key: vector_payload().contacts[0].identity_key,
        verified: false,
    };
    let mut many = vector_payload();
    many.contacts = (0..=MAX_LINK_CONTACTS).map(contact).collect();
    assert!(matches!(
        encode_payload(&many).unwrap_err(),
        LinkError::TooManyContacts { .. }
    ));
    many.contacts.pop();
    let bytes = encode_payload(&many).unwrap();
    assert!(
        bytes.len() + TAG_LEN <= MAX_LINK_PAYLOAD_LEN,
        "{}",
        bytes.len()
    );
    assert_eq!(
        decode_payload(&bytes).unwrap().contacts.len(),
        MAX_LINK_CONTACTS
    );

    let mut twice = vector_payload();
    twice.contacts.push(twice.contacts[0].clone());
    assert!(encode_payload(&twice).is_err());
    let mut own = vector_payload();
    own.contacts[0].username = name("alice");
    assert!(encode_payload(&own).is_err());

    let mut upper = encode_payload(&vector_payload()).unwrap().to_vec();
    let at = upper.windows(5).position(|w| w == b"alice").unwrap();
    upper[at] = b'A';
    assert!(decode_payload(&upper).is_err());
}

#[test]
fn link_codes_parse_and_print() {
    for text in [
        "4821-730195",
        "4821730195",
        " 4821 730 195 ",
        "4821 - 730195",
        "\t4821-730195\n",
    ] {
        let code = LinkCode::parse(text).unwrap();
        assert_eq!(code.to_string(), "4821-730195", "{text:?}");
        assert_eq!(code.slot(), 4821);
    }
    let zeros = LinkCode::parse("0007-000042").unwrap();
    assert_eq!(zeros.to_string(), "0007-000042");
    assert_eq!(&*zeros.secret().password(), b"000042");

    for text in [
        "",
        "4821-73019",
        "4821-7301955",
        "482-1730195",
        "48217301950",
        "1",
    ] {
        let err = LinkCode::parse(text).unwrap_err();
        assert!(
            matches!(err, LinkError::CodeLength | LinkError::CodeSyntax),
            "{text:?}: {err}"
        );
    }
    assert_eq!(
        LinkCode::parse("4821-73019").unwrap_err(),
        LinkError::CodeLength
    );
    assert_eq!(
        LinkCode::parse("482173019512").unwrap_err(),
        LinkError::CodeLength
    );
    for text in [
        "4821-73O195",
        "4821--730195",
        "48-21730195",
        "4821-730195-",
        "４８２１-730195",
        "+4821730195",
        "4821_730195",
    ] {
        assert_eq!(
            LinkCode::parse(text).unwrap_err(),
            LinkError::CodeSyntax,
            "{text:?}"
        );
    }
    assert_eq!(
        LinkCode::new(10_000, &LinkSecret::new(1).unwrap()).unwrap_err(),
        LinkError::CodeRange
    );
    assert_eq!(
        LinkSecret::new(1_000_000).unwrap_err(),
        LinkError::CodeRange
    );

    // Debug never shows the secret.
    let debug = format!("{:?} {:?}", zeros, zeros.secret());
    assert!(!debug.contains("42"), "{debug}");
    assert!(debug.contains("0007"), "{debug}");
}

#[test]
fn secrets_are_drawn_uniformly_by_rejection() {
    // Big-endian u32s: the first is at the bound (rejected), the second gives 123456.
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&SECRET_DRAW_BOUND.to_be_bytes());
    bytes[4..8].copy_from_slice(&(3 * SECRET_RANGE + 123_456).to_be_bytes());
    let secret = LinkSecret::draw_with(&mut Fixed(vec![bytes])).unwrap();
    assert_eq!(&*secret.password(), b"123456");
    // A source that fails is an error, not a panic.
    assert!(matches!(
        LinkSecret::draw_with(&mut Fixed(vec![])).unwrap_err(),
        LinkError::Random(_)
    ));
    assert!(matches!(
        ExistingDevice::start_with(&secret, &name("alice"), &mut Fixed(vec![[1; 32]])).unwrap_err(),
        LinkError::Random(_)
    ));
}
