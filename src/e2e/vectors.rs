//! Byte-exact test vectors, the same ones part II of `docs/PROTOCOL.md` lists for other implementations.
//!
//! Every secret is SHA-256 of an ASCII label; everything else follows deterministically
//! (Ed25519 signatures are deterministic too).

use sha2::{Digest, Sha256};

use super::keys::{Secret32, x25519_public};
use super::ratchet::aead_key_nonce;
use super::session::message_ad;
use super::*;
use crate::protocol::Username;

pub(super) fn secret(label: &str) -> [u8; 32] {
    Sha256::digest(label.as_bytes()).into()
}

/// Hands out the given secrets in order, then refuses.
pub(super) struct Fixed(pub(super) Vec<[u8; 32]>);

impl SecretSource for Fixed {
    fn secret_bytes(&mut self) -> Result<[u8; 32], E2eError> {
        if self.0.is_empty() {
            return Err(E2eError::Primitive);
        }
        Ok(self.0.remove(0))
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

pub(super) fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

pub(super) fn ids(start: u8) -> [u8; 16] {
    std::array::from_fn(|i| start + i as u8)
}

struct Vectors {
    lines: Vec<(String, String)>,
}

impl Vectors {
    fn put(&mut self, key: &str, value: impl Into<String>) {
        self.lines.push((key.to_owned(), value.into()));
    }

    fn get(&self, key: &str) -> &str {
        &self.lines.iter().find(|(k, _)| k == key).unwrap().1
    }
}

/// Runs the documented scenario and records every intermediate value: with `padded`, as
/// clients seal now (E6.1); without, as clients from before padding sealed (plaintext as is).
fn scenario(padded: bool) -> Vectors {
    let seal = |session: &mut Session, id, text: &[u8]| {
        if padded {
            session.seal(id, text)
        } else {
            session.seal_raw(id, text)
        }
    };
    let mut v = Vectors { lines: Vec::new() };
    let alice = IdentityKeyPair::from_seed(&secret("alice identity"));
    let bob = IdentityKeyPair::from_seed(&secret("bob identity"));
    let mut store = PrekeyStore::from_secrets(
        &bob,
        (1, secret("bob signed prekey")),
        (1, secret("bob last-resort prekey")),
        &[(2, secret("bob one-time prekey"))],
    )
    .unwrap();
    v.put("IK_A", hex(alice.public().as_bytes()));
    v.put("IK_B", hex(bob.public().as_bytes()));
    v.put(
        "IK_A x25519 public",
        hex(&alice.public().to_x25519().unwrap()),
    );
    v.put("IK_A x25519 secret", hex(alice.x25519_secret().expose()));
    v.put(
        "IK_B x25519 public",
        hex(&bob.public().to_x25519().unwrap()),
    );
    let spk = store.signed_prekey();
    v.put("SPK_B public", hex(&spk.key));
    v.put("SPK_B signature", hex(&spk.signature));
    v.put("LR_B signature", hex(&store.last_resort_prekey().signature));
    let otp = store.one_time_prekeys()[0].clone();
    v.put("OPK_B public", hex(&otp.key));
    let bundle = PrekeyBundle {
        identity_key: bob.public(),
        signed_prekey: spk,
        one_time_prekey: Some(otp),
        last_resort_prekey: None,
    };
    v.put("bundle", hex(&rmp_serde::to_vec_named(&bundle).unwrap()));

    let ek = secret("alice ephemeral");
    v.put("EK_A public", hex(&x25519_public(&Secret32::new(ek))));
    let init = x3dh::initiate(&alice, &bundle, Secret32::new(ek)).unwrap();
    v.put("SK", hex(init.agreement.shared_secret.expose()));
    v.put("AD", hex(&init.agreement.associated_data));

    let (alice_name, bob_name) = (name("alice"), name("bob"));
    let mut source = Fixed(vec![ek, secret("alice ratchet")]);
    let mut a =
        Session::initiate_with(&mut source, &alice, &alice_name, &bob_name, &bundle).unwrap();
    let ratchet_a = x25519_public(&Secret32::new(secret("alice ratchet")));
    v.put("alice ratchet public", hex(&ratchet_a));
    let mk = a.ratchet().next_sending_message_key().unwrap();
    v.put("first message key", hex(mk.expose()));
    let okm = aead_key_nonce(&mk).unwrap();
    v.put("first AEAD key", hex(&okm[..32]));
    v.put("first AEAD nonce", hex(&okm[32..]));
    v.put(
        "first extra AD",
        hex(&message_ad(&alice_name, &bob_name, &ids(0))),
    );
    let first = seal(&mut a, ids(0), b"Hello, Bob!").unwrap();
    v.put("first ciphertext", hex(&first.ciphertext));
    v.put("first envelope", hex(&first.to_bytes().unwrap()));

    let mut source = Fixed(vec![secret("bob ratchet")]);
    let (mut b, text) = Session::accept_with(
        &mut source,
        &bob,
        &mut store,
        &bob_name,
        &alice_name,
        ids(0),
        &first,
    )
    .unwrap();
    assert_eq!(text, b"Hello, Bob!");
    let ratchet_b = x25519_public(&Secret32::new(secret("bob ratchet")));
    v.put("bob ratchet public", hex(&ratchet_b));
    let reply = seal(&mut b, ids(16), b"Hi Alice!").unwrap();
    v.put("reply envelope", hex(&reply.to_bytes().unwrap()));
    let mut source = Fixed(vec![secret("alice ratchet 2")]);
    assert_eq!(
        a.open_with(&mut source, ids(16), &reply).unwrap(),
        b"Hi Alice!"
    );
    v.put(
        "safety number",
        safety_number(&alice_name, &alice.public(), &bob_name, &bob.public()),
    );
    v
}

/// The values part II of `docs/PROTOCOL.md` lists, cross-checked against an independent Python implementation
/// of the spec (`cryptography` + `msgpack`). The messages here are unpadded, as clients sealed
/// before padding (E6.1); [`PADDED`] has what differs when they are padded.
const EXPECTED: &[(&str, &str)] = &[
    (
        "IK_A",
        "e683ae242758a0da9389619ef238916d91a6bae7b5423b1037e7ed14d76bae94",
    ),
    (
        "IK_B",
        "2c21cd0bb45e6aec2b376e91e832d60313f8f2248828c243c87ab59ad35135aa",
    ),
    (
        "IK_A x25519 public",
        "bb635ce46052dffa9868b48b6c10890e4c0a7d2b07deb42e38e6e11e6c36d050",
    ),
    (
        "IK_A x25519 secret",
        "08585c6c12c558955a763c9bce630a1747e0a83b9b5f14e9f00d81e354a13141",
    ),
    (
        "IK_B x25519 public",
        "bf5ce3aaf87626972180cacc5b148990084be7751f4439c2eca5843d7d5bc271",
    ),
    (
        "SPK_B public",
        "b3d658053de4c4954e38daf0a2430eafe0c03d826c61975f53d4f7e138aed762",
    ),
    (
        "SPK_B signature",
        concat!(
            "d896ac0eb1af69b27d273cbc7b932bead3debaa58ec6ab1c13d863b796f69a2c",
            "c21a0d81f6bee1c44aa02f9f815f06fe3bb6f1a7864f9d944246ae419ff40901",
        ),
    ),
    (
        "LR_B signature",
        concat!(
            "5ff3ea5bcb01181b5e5cd68f3bbb31230c769d2c131e4234b428dc36b4bd3b0e",
            "8fd5bf00639d07adcb212c93ad4e935f3f4cacb5a4f9fe95846c6029fa40740b",
        ),
    ),
    (
        "OPK_B public",
        "0370f68dea4a3381bc982ff1d63821728fbb3c4e73f3e534712cdead90538a7f",
    ),
    (
        "bundle",
        concat!(
            "83ac6964656e746974795f6b6579c4202c21cd0bb45e6aec2b376e91e832d603",
            "13f8f2248828c243c87ab59ad35135aaad7369676e65645f7072656b657983a2",
            "696401a36b6579c420b3d658053de4c4954e38daf0a2430eafe0c03d826c6197",
            "5f53d4f7e138aed762a97369676e6174757265c440d896ac0eb1af69b27d273c",
            "bc7b932bead3debaa58ec6ab1c13d863b796f69a2cc21a0d81f6bee1c44aa02f",
            "9f815f06fe3bb6f1a7864f9d944246ae419ff40901af6f6e655f74696d655f70",
            "72656b657982a2696402a36b6579c4200370f68dea4a3381bc982ff1d6382172",
            "8fbb3c4e73f3e534712cdead90538a7f",
        ),
    ),
    (
        "EK_A public",
        "9b6d9e84cdd58b6de4adf54cc8c28e387917a5a6736c2ff87b3d009f21b5f111",
    ),
    (
        "SK",
        "c879de3c41d059e90fac4a2f34e05907b96b078468d2db97417cd3ba47ac3b17",
    ),
    (
        "AD",
        concat!(
            "e683ae242758a0da9389619ef238916d91a6bae7b5423b1037e7ed14d76bae94",
            "2c21cd0bb45e6aec2b376e91e832d60313f8f2248828c243c87ab59ad35135aa",
        ),
    ),
    (
        "alice ratchet public",
        "a7244b29b9c7ae5475592379168f21b852ef340d91727086e25ae8fbaa2cae39",
    ),
    (
        "first message key",
        "e63259956d86c51fdf09bbea6bbf246839624540aaf17eafbacea34c39a74f8e",
    ),
    (
        "first AEAD key",
        "e3168b0369e5d3dea06df05413f16f26f9c7f554396f6f4512e1cb83f3248ca2",
    ),
    ("first AEAD nonce", "828e1b24536135ce45659da8"),
    (
        "first extra AD",
        "0005616c6963650003626f62000102030405060708090a0b0c0d0e0f",
    ),
    (
        "first ciphertext",
        "38b83bb0997a0ee71cced14da645a72d476e1aba6770d14817b524",
    ),
    (
        "first envelope",
        concat!(
            "83a7696e697469616c84ac6964656e746974795f6b6579c420e683ae242758a0",
            "da9389619ef238916d91a6bae7b5423b1037e7ed14d76bae94ad657068656d65",
            "72616c5f6b6579c4209b6d9e84cdd58b6de4adf54cc8c28e387917a5a6736c2f",
            "f87b3d009f21b5f111b07369676e65645f7072656b65795f696401b26f6e655f",
            "74696d655f7072656b65795f696402a668656164657283a26468c420a7244b29",
            "b9c7ae5475592379168f21b852ef340d91727086e25ae8fbaa2cae39a2706e00",
            "a16e00aa63697068657274657874c41b38b83bb0997a0ee71cced14da645a72d",
            "476e1aba6770d14817b524",
        ),
    ),
    (
        "bob ratchet public",
        "355cba1e5872679ef89092ba9626e6f02ac27a9864dd594cfbf49fc378d9e14d",
    ),
    (
        "reply envelope",
        concat!(
            "82a668656164657283a26468c420355cba1e5872679ef89092ba9626e6f02ac2",
            "7a9864dd594cfbf49fc378d9e14da2706e00a16e00aa63697068657274657874",
            "c4193b08449b479fd740c17df25fbee28c8b8fffc8e7a9ddc3753e",
        ),
    ),
    (
        "safety number",
        concat!(
            "70516 51600 77012 86160 72929 16939 48192 44884 94886 27591 6928",
            "9 52397",
        ),
    ),
];

/// The values that differ when the messages are padded (E6.1): everything up to the message
/// keys is the same. The first ciphertext was reproduced with Python's `cryptography`
/// (ChaCha20Poly1305 of `0xFF ‖ "Hello, Bob!" ‖ 0x80 ‖ 0x00 × 243` under the listed key, nonce
/// and associated data).
const PADDED: &[(&str, &str)] = &[
    (
        "first ciphertext",
        concat!(
            "8f9532b09a39028531c3929f9cff6090df11a65975bd693070f79ac840de0131",
            "0ee26f707cc9ae61d6779bcee64c6b7ba3c5da547f24c256d96e957175af727d",
            "65ee66412002441b07213bd9c7964c9752ef368f7981430b9408ec2616ce5ed3",
            "7d0043a42c22bf57a9a4bbfae1d558e0797b2585c5eb2ff909016496e39fdef7",
            "7ba09aedef824d9fa1a200bb982f5d7f731daca477ee9c52b42b5ef2488d5083",
            "2b27539651e95c4b233a2ced5e0c45470d4ea762e2d994fc788308227e225049",
            "2080eb469f6d6fa9213ae663559abd9d5eaabf7eba9374a8ac4e2d1102c1e46e",
            "80a9fedf076ee6f65dab7353f1112923f0c7dd826693f84ea1b90182aaf325f8",
            "69464d97eccf3693446885385b5dbeee",
        ),
    ),
    (
        "first envelope",
        concat!(
            "83a7696e697469616c84ac6964656e746974795f6b6579c420e683ae242758a0",
            "da9389619ef238916d91a6bae7b5423b1037e7ed14d76bae94ad657068656d65",
            "72616c5f6b6579c4209b6d9e84cdd58b6de4adf54cc8c28e387917a5a6736c2f",
            "f87b3d009f21b5f111b07369676e65645f7072656b65795f696401b26f6e655f",
            "74696d655f7072656b65795f696402a668656164657283a26468c420a7244b29",
            "b9c7ae5475592379168f21b852ef340d91727086e25ae8fbaa2cae39a2706e00",
            "a16e00aa63697068657274657874c501108f9532b09a39028531c3929f9cff60",
            "90df11a65975bd693070f79ac840de01310ee26f707cc9ae61d6779bcee64c6b",
            "7ba3c5da547f24c256d96e957175af727d65ee66412002441b07213bd9c7964c",
            "9752ef368f7981430b9408ec2616ce5ed37d0043a42c22bf57a9a4bbfae1d558",
            "e0797b2585c5eb2ff909016496e39fdef77ba09aedef824d9fa1a200bb982f5d",
            "7f731daca477ee9c52b42b5ef2488d50832b27539651e95c4b233a2ced5e0c45",
            "470d4ea762e2d994fc788308227e2250492080eb469f6d6fa9213ae663559abd",
            "9d5eaabf7eba9374a8ac4e2d1102c1e46e80a9fedf076ee6f65dab7353f11129",
            "23f0c7dd826693f84ea1b90182aaf325f869464d97eccf3693446885385b5dbe",
            "ee",
        ),
    ),
    (
        "reply envelope",
        concat!(
            "82a668656164657283a26468c420355cba1e5872679ef89092ba9626e6f02ac2",
            "7a9864dd594cfbf49fc378d9e14da2706e00a16e00aa63697068657274657874",
            "c501108c290dfa6a9add46851b1bef8947b983be94196f29845c277880ec8587",
            "963ce03fc2a8fc57292370c46b022b93464d305e25fbcf8628ba1df19f97863c",
            "5dee630599fab920d554f3bc796e676551fa67e2c90241cd875d0f227bcef0c7",
            "620b884a10d244149446ace0a07fb74c9f8354bd25374f53489263c8e9a7df16",
            "9e98536b014eb55d61b469eef2fde64ffa093d7ca0c3e4c091c0868da181fbc5",
            "47372411833d08737160880c8e05b00445babc56f1396365b7f63718dbd79bf9",
            "c343838478a8b3247bda05841d5d887c0f8ff22c5f741fec49fe9c6451b5191a",
            "8663ad04da53f77f7e753898f5185ca226b00fb67ce2d0d7537246316585232d",
            "0e4cecc6de2109a24b8edd97ae6166cf030654",
        ),
    ),
];

#[test]
fn vectors_match_the_spec() {
    let got = scenario(true);
    assert_eq!(got.lines.len(), EXPECTED.len());
    for (key, expected) in EXPECTED {
        let expected = PADDED
            .iter()
            .find(|(k, _)| k == key)
            .map_or(*expected, |(_, v)| *v);
        assert_eq!(got.get(key), expected, "vector `{key}`");
    }
}

/// The vectors of clients from before padding still come out of an unpadded seal, byte for
/// byte: the scenario's receivers (which unpad) opened them.
#[test]
fn unpadded_vectors_match_the_spec() {
    let got = scenario(false);
    for (key, expected) in EXPECTED {
        assert_eq!(got.get(key), *expected, "vector `{key}`");
    }
}

/// The spec's unpadded envelopes, taken from their hex as a message sealed before padding
/// would sit in an inbox, open in today's sessions.
#[test]
fn unpadded_envelopes_from_before_padding_still_open() {
    let expected = |key: &str| {
        let hex = EXPECTED.iter().find(|(k, _)| *k == key).unwrap().1;
        Envelope::from_bytes(&hex::decode(hex).unwrap()).unwrap()
    };
    let alice = IdentityKeyPair::from_seed(&secret("alice identity"));
    let bob = IdentityKeyPair::from_seed(&secret("bob identity"));
    let mut store = PrekeyStore::from_secrets(
        &bob,
        (1, secret("bob signed prekey")),
        (1, secret("bob last-resort prekey")),
        &[(2, secret("bob one-time prekey"))],
    )
    .unwrap();
    let bundle = PrekeyBundle {
        identity_key: bob.public(),
        signed_prekey: store.signed_prekey(),
        one_time_prekey: Some(store.one_time_prekeys()[0].clone()),
        last_resort_prekey: None,
    };
    let (alice_name, bob_name) = (name("alice"), name("bob"));
    let mut source = Fixed(vec![secret("alice ephemeral"), secret("alice ratchet")]);
    let mut a =
        Session::initiate_with(&mut source, &alice, &alice_name, &bob_name, &bundle).unwrap();
    let mut source = Fixed(vec![secret("bob ratchet")]);
    let (mut b, text) = Session::accept_with(
        &mut source,
        &bob,
        &mut store,
        &bob_name,
        &alice_name,
        ids(0),
        &expected("first envelope"),
    )
    .unwrap();
    assert_eq!(text, b"Hello, Bob!");
    assert_eq!(
        a.open(ids(16), &expected("reply envelope")).unwrap(),
        b"Hi Alice!"
    );
    // And the conversation goes on padded.
    let next = a.seal(ids(32), b"padded now").unwrap();
    assert_eq!(next.ciphertext.len(), 256 + TAG_LEN);
    assert_eq!(b.open(ids(32), &next).unwrap(), b"padded now");
}

/// `docs/PROTOCOL.md` shows the padded run's bytes as they come out (in lines of 64 digits).
#[test]
fn the_spec_lists_the_padded_vectors() {
    let spec = include_str!("../../docs/PROTOCOL.md");
    for (key, value) in PADDED {
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
