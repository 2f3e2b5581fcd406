//! The key directory: signatures checked on upload, one-time prekeys handed out at most once
//! (also under concurrent fetches), the last-resort key after that, "prekeys low" events.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::TestServer;
use ed25519_dalek::{Signer, SigningKey};
use securefastchat::client::{Client, ClientError};
use securefastchat::protocol::keys::{Bin, OneTimePrekey, SignedPrekey};
use securefastchat::protocol::{ErrorCode, Password, Reply, Request};
use tokio::task::JoinSet;

fn signed(identity: &SigningKey, label: &[u8], id: u32, key: [u8; 32]) -> SignedPrekey {
    let mut message = label.to_vec();
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&key);
    SignedPrekey {
        id,
        key: Bin(key),
        signature: Bin(identity.sign(&message).to_bytes()),
    }
}

fn x25519_public(seed: u8) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from([seed; 32]);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

async fn publish(
    client: &Client,
    identity: &SigningKey,
    one_time: u32,
) -> Result<u32, ClientError> {
    let spk = signed(identity, b"SFC signed prekey v1", 1, x25519_public(1));
    let last = signed(identity, b"SFC last-resort prekey v1", 2, x25519_public(2));
    let prekeys = (0..one_time)
        .map(|i| OneTimePrekey {
            id: 100 + i,
            key: Bin(x25519_public(10 + i as u8)),
        })
        .collect();
    client
        .publish_keys(
            Some(Bin(identity.verifying_key().to_bytes())),
            Some(spk),
            Some(last),
            prekeys,
        )
        .await
}

fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_incomplete_uploads_are_refused() {
    let server = TestServer::start().await;
    let (bob, _) = server.signed_up("bob").await;
    let identity = SigningKey::from_bytes(&[7; 32]);
    let impostor = SigningKey::from_bytes(&[8; 32]);

    // Signed by someone else.
    let forged = signed(&impostor, b"SFC signed prekey v1", 1, x25519_public(1));
    let last = signed(&identity, b"SFC last-resort prekey v1", 2, x25519_public(2));
    let identity_key = Some(Bin(identity.verifying_key().to_bytes()));
    let result = bob
        .publish_keys(identity_key, Some(forged), Some(last.clone()), vec![])
        .await;
    assert_eq!(code_of(result), ErrorCode::InvalidKeys);
    // A last-resort signature cannot pass for a signed-prekey one.
    let swapped = signed(&identity, b"SFC last-resort prekey v1", 1, x25519_public(1));
    let result = bob
        .publish_keys(identity_key, Some(swapped), Some(last), vec![])
        .await;
    assert_eq!(code_of(result), ErrorCode::InvalidKeys);
    // The first upload must be complete.
    let result = bob.publish_keys(identity_key, None, None, vec![]).await;
    assert_eq!(code_of(result), ErrorCode::InvalidKeys);
    // Nothing was stored.
    let (alice, _) = server.signed_up("alice").await;
    assert_eq!(code_of(alice.fetch_bundle("bob").await), ErrorCode::NoKeys);
    assert_eq!(
        code_of(alice.fetch_bundle("nobody").await),
        ErrorCode::UnknownUser
    );

    assert_eq!(publish(&bob, &identity, 3).await.unwrap(), 3);
    assert_eq!(
        alice.fetch_identity("bob").await.unwrap().0,
        identity.verifying_key().to_bytes()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_prekeys_are_never_handed_out_twice_under_concurrent_fetches() {
    let server = TestServer::start().await;
    let (bob, _) = server.signed_up("bob").await;
    let identity = SigningKey::from_bytes(&[7; 32]);
    publish(&bob, &identity, 20).await.unwrap();

    let mut fetchers = Vec::new();
    for name in ["carol", "dave", "erin", "frank"] {
        fetchers.push(Arc::new(server.signed_up(name).await.0));
    }
    let mut fetches = JoinSet::new();
    for round in 0..8 {
        for fetcher in &fetchers {
            let fetcher = Arc::clone(fetcher);
            fetches.spawn(async move {
                let _ = round;
                fetcher.fetch_bundle("bob").await
            });
        }
    }
    let (mut handed, mut last_resort) = (Vec::new(), 0);
    while let Some(result) = fetches.join_next().await {
        let bundle = result.unwrap().unwrap();
        match (bundle.one_time_prekey, bundle.last_resort) {
            (Some(otp), None) => handed.push(otp.id),
            (None, Some(last)) => {
                assert_eq!(last.id, 2);
                last_resort += 1;
            }
            other => panic!("exactly one of one_time_prekey and last_resort: {other:?}"),
        }
    }
    let unique: HashSet<_> = handed.iter().collect();
    assert_eq!(
        unique.len(),
        handed.len(),
        "a one-time prekey was handed out twice: {handed:?}"
    );
    assert_eq!((handed.len(), last_resort), (20, 12));
    // The owner was told to upload more.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(bob.take_prekeys_low(), Some(0));
    server.stop().await;
}

/// A new identity key (the account re-keyed from another home, on purpose: `replace_identity`)
/// retires every one-time prekey stored with the old one: their private halves belong to the
/// old identity's client, so a bundle must never pair the new identity with one of them. A
/// plain `publish_keys` cannot change the identity at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_identity_key_retires_the_old_one_time_prekeys() {
    let server = TestServer::start().await;
    let (bob, _) = server.signed_up("bob").await;
    let (alice, _) = server.signed_up("alice").await;
    let old = SigningKey::from_bytes(&[7; 32]);
    assert_eq!(publish(&bob, &old, 5).await.unwrap(), 5);

    let new = SigningKey::from_bytes(&[9; 32]);
    let spk = signed(&new, b"SFC signed prekey v1", 1, x25519_public(1));
    let last = signed(&new, b"SFC last-resort prekey v1", 2, x25519_public(2));
    let fresh = vec![OneTimePrekey {
        id: 1,
        key: Bin(x25519_public(99)),
    }];
    let refused = bob
        .publish_keys(
            Some(Bin(new.verifying_key().to_bytes())),
            Some(spk.clone()),
            Some(last.clone()),
            fresh.clone(),
        )
        .await
        .unwrap_err();
    assert!(refused.is_server(ErrorCode::IdentityMismatch), "{refused}");
    let replaced = bob
        .request(Request::ReplaceIdentity {
            password: Password::new(common::PASSWORD),
            identity_key: Bin(new.verifying_key().to_bytes()),
            signed_prekey: spk,
            last_resort: last,
            one_time_prekeys: fresh,
        })
        .await
        .unwrap();
    assert_eq!(replaced, Reply::IdentityReplaced { removed: vec![] });
    let bundle = alice.fetch_bundle("bob").await.unwrap();
    assert_eq!(
        bundle.one_time_prekey.map(|p| p.id),
        Some(1),
        "only the new identity's prekey is left"
    );
    assert_eq!(bundle.identity_key.0, new.verifying_key().to_bytes());
    let bundle = alice.fetch_bundle("bob").await.unwrap();
    assert!(bundle.one_time_prekey.is_none() && bundle.last_resort.is_some());
    server.stop().await;
}
