//! Key material from peers: `publish_keys` uploads as the server checks them (identity key,
//! signatures, small-order keys), and bundles as a client checks them before X3DH, both as a
//! `bundle` reply and as a serialized `PrekeyBundle`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securefastchat::e2e::{
    IdentityKey, IdentityKeyPair, OneTimePrekeyPublic, PrekeyBundle, Session, SignedPrekeyPublic,
    verify_last_resort_prekey, verify_signed_prekey,
};
use securefastchat::protocol::keys::SignedPrekey;
use securefastchat::protocol::{
    Reply, Request, ServerFrame, Username, decode_body, decode_request,
};

fn public(s: &SignedPrekey) -> SignedPrekeyPublic {
    SignedPrekeyPublic {
        id: s.id,
        key: s.key.0,
        signature: s.signature.0,
    }
}

/// What a client does with a bundle: validate it, then start a session from it.
fn use_bundle(bundle: &PrekeyBundle) {
    if bundle.verify().is_err() {
        return;
    }
    let me = IdentityKeyPair::from_seed(&[9; 32]);
    if let (Ok(a), Ok(b)) = (Username::parse("alice"), Username::parse("bob")) {
        // A verified bundle may still hold keys X3DH refuses; either way, no panic.
        let _ = Session::initiate(&me, &a, &b, bundle);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_request(data)
        && let Request::PublishKeys {
            identity_key,
            signed_prekey,
            last_resort,
            one_time_prekeys,
        } = frame.request
    {
        if let Some(identity) = identity_key.and_then(|k| IdentityKey::from_bytes(&k.0).ok()) {
            if let Some(spk) = &signed_prekey {
                let _ = verify_signed_prekey(&identity, spk.id, &spk.key.0, &spk.signature.0);
            }
            if let Some(last) = &last_resort {
                let _ =
                    verify_last_resort_prekey(&identity, last.id, &last.key.0, &last.signature.0);
            }
        }
        let _ = one_time_prekeys.len();
    }
    if let Ok(ServerFrame {
        reply:
            Reply::Bundle {
                identity_key,
                signed_prekey,
                one_time_prekey,
                last_resort,
                ..
            },
        ..
    }) = decode_body::<ServerFrame>(data)
        && let Ok(identity_key) = IdentityKey::from_bytes(&identity_key.0)
    {
        use_bundle(&PrekeyBundle {
            identity_key,
            signed_prekey: public(&signed_prekey),
            one_time_prekey: one_time_prekey.map(|o| OneTimePrekeyPublic {
                id: o.id,
                key: o.key.0,
            }),
            last_resort_prekey: last_resort.as_ref().map(public),
        });
    }
    if let Ok(bundle) = rmp_serde::from_slice::<PrekeyBundle>(data) {
        use_bundle(&bundle);
    }
});
