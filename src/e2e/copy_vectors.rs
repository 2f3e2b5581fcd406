//! Byte-exact test vectors of a copy for one's own device (E14 of part II of
//! `docs/PROTOCOL.md`): alice's device 1 starts a session with her device 2 (both hold
//! alice's identity key) and seals it a copy of the message of E11, addressed to `bob`.
//! Secrets are SHA-256 of ASCII labels, as in `vectors.rs`.

use super::keys::{Secret32, x25519_public};
use super::ratchet::aead_key_nonce;
use super::session::copy_ad;
use super::vectors::{Fixed, hex, ids, name, secret};
use super::*;

/// Alice's device 2: alice's identity, its own prekeys.
fn device_2_prekeys(alice: &IdentityKeyPair) -> PrekeyStore {
    PrekeyStore::from_secrets(
        alice,
        (1, secret("alice device 2 signed prekey")),
        (1, secret("alice device 2 last-resort prekey")),
        &[(2, secret("alice device 2 one-time prekey"))],
    )
    .unwrap()
}

fn bundle(alice: &IdentityKeyPair, store: &PrekeyStore) -> PrekeyBundle {
    PrekeyBundle {
        identity_key: alice.public(),
        signed_prekey: store.signed_prekey(),
        one_time_prekey: Some(store.one_time_prekeys()[0].clone()),
        last_resort_prekey: None,
    }
}

/// Runs the scenario; returns the recorded values and device 2's side after it accepted.
fn scenario() -> (Vec<(&'static str, String)>, Session, Envelope) {
    let mut v = Vec::new();
    let alice = IdentityKeyPair::from_seed(&secret("alice identity"));
    let mut store = device_2_prekeys(&alice);
    let bundle = bundle(&alice, &store);
    v.put("SPK_A2 public", hex(&bundle.signed_prekey.key));
    v.put(
        "OPK_A2 public",
        hex(&bundle.one_time_prekey.as_ref().unwrap().key),
    );
    let ek = secret("alice device 1 ephemeral");
    v.put("EK_A1 public", hex(&x25519_public(&Secret32::new(ek))));
    let init = x3dh::initiate(&alice, &bundle, Secret32::new(ek)).unwrap();
    v.put("SK", hex(init.agreement.shared_secret.expose()));
    v.put("AD", hex(&init.agreement.associated_data));

    let (alice_name, bob_name) = (name("alice"), name("bob"));
    let mut source = Fixed(vec![ek, secret("alice device 1 ratchet")]);
    let mut d1 =
        Session::initiate_with(&mut source, &alice, &alice_name, &alice_name, &bundle).unwrap();
    v.put(
        "copy extra AD",
        hex(&copy_ad(&alice_name, &bob_name, &ids(0))),
    );
    let mk = d1.ratchet().next_sending_message_key().unwrap();
    let okm = aead_key_nonce(&mk).unwrap();
    v.put("copy AEAD key", hex(&okm[..32]));
    v.put("copy AEAD nonce", hex(&okm[32..]));
    let copy = d1.seal_copy(ids(0), &bob_name, b"Hello, Bob!").unwrap();
    v.put("copy envelope", hex(&copy.to_bytes().unwrap()));

    let mut source = Fixed(vec![secret("alice device 2 ratchet")]);
    let (d2, text) = Session::accept_copy_with(
        &mut source,
        &alice,
        &mut store,
        &alice_name,
        &bob_name,
        ids(0),
        &copy,
    )
    .unwrap();
    assert_eq!(text, b"Hello, Bob!");
    (v, d2, copy)
}

trait Put {
    fn put(&mut self, key: &'static str, value: String);
}

impl Put for Vec<(&'static str, String)> {
    fn put(&mut self, key: &'static str, value: String) {
        self.push((key, value));
    }
}

/// The values E14 lists. The copy's AEAD step was reproduced with Python's `cryptography`
/// (ChaCha20Poly1305 of `0xFF ‖ "Hello, Bob!" ‖ 0x80 ‖ 0x00 × 243` under the listed key and
/// nonce, with `AD ‖ header ‖ copy extra AD`, gives the envelope's ciphertext; with `carol`
/// in place of `bob` it does not open).
const EXPECTED: &[(&str, &str)] = &[
    (
        "SPK_A2 public",
        "ebc755b9c90202e95865752253033a8829dc2b646de38ddb578bea4b93dcc659",
    ),
    (
        "OPK_A2 public",
        "b6219cf332f2b7d77b3f82e0372ddac613176679756821bfe6016cba689b991a",
    ),
    (
        "EK_A1 public",
        "998478fd74011dc3e0a004119120dd9367f1a3e0571c16cf45c2873abca31b00",
    ),
    (
        "SK",
        "22d032571a7e5ec530b356f760524bb62b67a8c90e634b937b24c46a3097bc77",
    ),
    (
        "AD",
        concat!(
            "e683ae242758a0da9389619ef238916d91a6bae7b5423b1037e7ed14d76bae94",
            "e683ae242758a0da9389619ef238916d91a6bae7b5423b1037e7ed14d76bae94",
        ),
    ),
    (
        "copy extra AD",
        concat!(
            "0005616c6963650005616c696365000102030405060708090a0b0c0d0e0f0003",
            "626f62",
        ),
    ),
    (
        "copy AEAD key",
        "7147e627e4e74b7d6367fcb5307b5d1f059297f8b32468849827416dceb56fee",
    ),
    ("copy AEAD nonce", "4238d0234f2cd57eb64ac0a7"),
    (
        "copy envelope",
        concat!(
            "83a7696e697469616c84ac6964656e746974795f6b6579c420e683ae242758a0",
            "da9389619ef238916d91a6bae7b5423b1037e7ed14d76bae94ad657068656d65",
            "72616c5f6b6579c420998478fd74011dc3e0a004119120dd9367f1a3e0571c16",
            "cf45c2873abca31b00b07369676e65645f7072656b65795f696401b26f6e655f",
            "74696d655f7072656b65795f696402a668656164657283a26468c4202a7ba38a",
            "1b033bb080827165f6103824b73e62d11a69539fd55665855cd19826a2706e00",
            "a16e00aa63697068657274657874c50110d10ece6a5fd3db17d1be271e5ff4b0",
            "547b0ee600ed069930500f310c133214b4692881d685e60aea0a42c77863574f",
            "af8ceb59037d1d55f3e5c3860bc9e19035b2267ca441afe6320f831e595eabb0",
            "7431562970f868c328c45f10c86f034bd2279f942678c5cf0970c56d6b4e54f2",
            "d2c32b34ad449c24c3395861d141dc77320a6c866dd0e8e427727dfb8c86f2af",
            "d97d16b2ed91c2f3881a69698675b22e30415d994d2c68c2ea30ca3f3136540e",
            "88a5a373de782922036c44dd990facd9e81374e7e5d270073ab9866cc9c33ee9",
            "5c670058179941bdb1d8ee33a3a21fd2c369746072b136d225c936e55c0866b4",
            "bbfce24df58c97335e6cae2349ac21b730ec43c9d0513f7eb1c5d8243c94ee43",
            "aa",
        ),
    ),
];

#[test]
fn copy_vectors_match_the_spec() {
    let (got, _, _) = scenario();
    assert_eq!(got.len(), EXPECTED.len());
    for ((key, value), (k, expected)) in got.iter().zip(EXPECTED) {
        assert_eq!((key, value.as_str()), (k, *expected), "vector `{key}`");
    }
}

/// `docs/PROTOCOL.md` shows the values as they come out (in lines of 64 digits).
#[test]
fn the_spec_lists_the_copy_vectors() {
    let spec = include_str!("../../docs/PROTOCOL.md");
    for (key, value) in EXPECTED {
        let lines: Vec<&str> = value
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        assert!(
            spec.contains(&lines.join("\n")),
            "PROTOCOL.md lacks `{key}`"
        );
    }
}

/// The vector's copy, relabelled with another addressee (what a server would do to make
/// device 2 believe alice wrote to carol), does not open, and leaves device 2's prekeys as
/// they were; with the true addressee it opens.
#[test]
fn the_vector_copy_relabelled_does_not_open() {
    let (_, _, copy) = scenario();
    let alice = IdentityKeyPair::from_seed(&secret("alice identity"));
    let mut store = device_2_prekeys(&alice);
    let alice_name = name("alice");
    for wrong in ["carol", "alice"] {
        let refused =
            Session::accept_copy(&alice, &mut store, &alice_name, &name(wrong), ids(0), &copy);
        assert!(
            matches!(refused, Err(E2eError::DecryptionFailed)),
            "{refused:?}"
        );
    }
    // Nor as an ordinary message from alice to alice.
    let ordinary = Session::accept(&alice, &mut store, &alice_name, &alice_name, ids(0), &copy);
    assert!(
        matches!(ordinary, Err(E2eError::DecryptionFailed)),
        "{ordinary:?}"
    );
    assert_eq!(store.one_time_prekeys().len(), 1);
    let (_, text) =
        Session::accept_copy(&alice, &mut store, &alice_name, &name("bob"), ids(0), &copy).unwrap();
    assert_eq!(text, b"Hello, Bob!");
    assert!(store.one_time_prekeys().is_empty());
}
