//! The key packages' life cycle and the groups-per-account cap against a real server
//! (docs/PROTOCOL.md 5.7): a key package that ends within the margin is refused at upload,
//! and one stored that ends (put in the store directly while the server is stopped, as a
//! clock that moved would leave it) is never handed out and its owner is told; a new
//! last-resort key package replaces the old one; `max_groups_per_account` refuses the next
//! group.

mod common;

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use serde_bytes::ByteBuf;

use common::TestServer;
use common::mls::{CS, Member, capabilities, failure};
use securefastchat::protocol::groups::{
    CERTIFICATION_EXTENSION, KEY_PACKAGE_MARGIN_SECS, member_identity,
};
use securefastchat::protocol::{ErrorCode, Reply, Request, Username};
use securefastchat::store::{FjallStore, KeyPackageUpload, NewKeyPackage, Store};

/// A key package of `member`'s device with the given MLS lifetime.
fn lasting(member: &Member, last_resort: bool, lifetime: Lifetime) -> Vec<u8> {
    let credential = CredentialWithKey {
        credential: BasicCredential::new(member_identity(&member.name, member.device).into_bytes())
            .into(),
        signature_key: member.signer.public().into(),
    };
    let extensions = Extensions::single(Extension::Unknown(
        CERTIFICATION_EXTENSION,
        UnknownExtension(member.certification()),
    ))
    .unwrap();
    let mut builder = KeyPackage::builder()
        .leaf_node_capabilities(capabilities())
        .leaf_node_extensions(extensions)
        .key_package_lifetime(lifetime);
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let signer: &SignatureKeyPair = &member.signer;
    builder
        .build(CS, &member.provider, signer, credential)
        .unwrap()
        .key_package()
        .tls_serialize_detached()
        .unwrap()
}

fn now() -> u64 {
    securefastchat::unix_now()
}

async fn publish(member: &mut Member, one_time: Vec<Vec<u8>>, last: Option<Vec<u8>>) -> Reply {
    member
        .call(Request::PublishKeyPackages {
            key_packages: one_time.into_iter().map(ByteBuf::from).collect(),
            last_resort: last.map(ByteBuf::from),
        })
        .await
}

async fn fetch(member: &mut Member, user: &str) -> Reply {
    member
        .call(Request::FetchKeyPackages {
            username: user.into(),
            devices: None,
        })
        .await
}

fn refused_with(reply: &Reply, code: ErrorCode) {
    assert!(
        matches!(reply, Reply::Error { code: c, .. } if *c == code),
        "expected {code:?}: {reply:?}"
    );
}

#[tokio::test]
async fn a_key_package_ending_within_the_margin_is_refused_and_nothing_of_it_stored() {
    let server = TestServer::start().await;
    let mut bob = Member::signup(&server, "bob").await;
    let mut alice = Member::signup(&server, "alice").await;
    let short = Lifetime::init(now() - 3600, now() + KEY_PACKAGE_MARGIN_SECS - 60);
    let fine = Lifetime::init(now() - 3600, now() + KEY_PACKAGE_MARGIN_SECS + 3600);
    // One-time or last-resort, with good ones beside it: nothing is stored.
    let one_time = vec![bob.key_package(false), lasting(&bob, false, short)];
    refused_with(
        &publish(&mut bob, one_time, None).await,
        ErrorCode::InvalidKeys,
    );
    let last = Some(lasting(&bob, true, short));
    let good = vec![bob.key_package(false)];
    refused_with(&publish(&mut bob, good, last).await, ErrorCode::InvalidKeys);
    refused_with(&fetch(&mut alice, "bob").await, ErrorCode::NoKeys);
    // Past the margin by an hour: accepted and handed out.
    let package = lasting(&bob, false, fine);
    let reply = publish(&mut bob, vec![package], None).await;
    assert!(
        matches!(
            reply,
            Reply::KeyPackagesPublished {
                key_packages: 1,
                last_resort: false
            }
        ),
        "{reply:?}"
    );
    assert_eq!(alice.fetch_key_packages("bob").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_key_package_that_ends_is_never_handed_out_and_its_owner_is_told() {
    let server = TestServer::start().await;
    let mut bob = Member::signup(&server, "bob").await;
    let mut alice = Member::signup(&server, "alice").await;
    let (one_time, last) = (bob.key_package(false), bob.key_package(true));
    let dir = server.stop().await;
    {
        // What a store holds once the clock has moved on: both end within the margin.
        let store = FjallStore::open(&dir.path().join("data")).unwrap();
        let soon = now() + KEY_PACKAGE_MARGIN_SECS / 2;
        let upload = KeyPackageUpload {
            one_time: vec![NewKeyPackage {
                reference: vec![1; 32],
                bytes: one_time,
                not_after: soon,
            }],
            last_resort: Some(NewKeyPackage {
                reference: Vec::new(),
                bytes: last,
                not_after: soon,
            }),
        };
        let bob_name = Username::parse("bob").unwrap();
        store.put_key_packages(&bob_name, 1, upload).await.unwrap();
    }
    let server = TestServer::start_in(dir, |_| {}).await;
    bob.reconnect(&server).await;
    alice.reconnect(&server).await;
    // Neither is handed out: `no_keys`, as if none were left, and bob is told.
    refused_with(&fetch(&mut alice, "bob").await, ErrorCode::NoKeys);
    match bob.raw.event().await {
        Reply::KeyPackagesLow { remaining: 0 } => {}
        other => panic!("{other:?}"),
    }
    // They are gone: the server says so, and bob's fresh ones are handed out.
    let reply = publish(&mut bob, Vec::new(), None).await;
    assert!(
        matches!(
            reply,
            Reply::KeyPackagesPublished {
                key_packages: 0,
                last_resort: false
            }
        ),
        "{reply:?}"
    );
    bob.publish_key_packages(1).await;
    assert_eq!(alice.fetch_key_packages("bob").await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_new_last_resort_key_package_replaces_the_old_one() {
    let server = TestServer::start().await;
    let mut bob = Member::signup(&server, "bob").await;
    let mut alice = Member::signup(&server, "alice").await;
    let old = bob.key_package(true);
    let reply = publish(&mut bob, Vec::new(), Some(old.clone())).await;
    assert!(
        matches!(
            reply,
            Reply::KeyPackagesPublished {
                key_packages: 0,
                last_resort: true
            }
        ),
        "{reply:?}"
    );
    let handed = |reply: Reply| match reply {
        Reply::KeyPackages { mut devices, .. } => {
            let device = devices.remove(0);
            assert!(device.last_resort);
            device.key_package
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(handed(fetch(&mut alice, "bob").await), old);
    // The rotation: a new one (what the client uploads when the old one ages).
    let new = bob.key_package(true);
    publish(&mut bob, Vec::new(), Some(new.clone())).await;
    for _ in 0..2 {
        assert_eq!(handed(fetch(&mut alice, "bob").await), new);
    }
}

#[tokio::test]
async fn the_groups_per_account_cap_refuses_the_next_group() {
    let server = TestServer::start_with(|c| c.max_groups_per_account = 2).await;
    let mut alice = Member::signup(&server, "alice").await;
    let mut bob = Member::signup(&server, "bob").await;
    let mut carol = Member::signup(&server, "carol").await;
    bob.publish_key_packages(5).await;
    // Bob is in two groups of his own.
    for group in ["bob1", "bob2"] {
        let created = bob.create_group(group).await;
        assert!(matches!(created, Reply::GroupCreated { .. }), "{created:?}");
    }
    // A third group of his own is refused...
    refused_with(&bob.create_group("bob3").await, ErrorCode::GroupFull);
    // ...and so is being added to someone else's: nothing is delivered.
    let created = alice.create_group("alices").await;
    assert!(matches!(created, Reply::GroupCreated { .. }), "{created:?}");
    let packages = alice.fetch_key_packages("bob").await;
    let added = alice.add("alices", &packages).await;
    assert_eq!(failure(&added).0, ErrorCode::GroupFull, "{added:?}");
    // Carol, in no group yet, can be added to the same group (alice drops her refused
    // commit first).
    carol.publish_key_packages(2).await;
    let storage = alice.provider.storage();
    alice
        .groups
        .get_mut("alices")
        .unwrap()
        .clear_pending_commit(storage)
        .unwrap();
    let packages = alice.fetch_key_packages("carol").await;
    let added = alice.add("alices", &packages).await;
    assert!(matches!(added, Reply::Sent { .. }), "{added:?}");
}
