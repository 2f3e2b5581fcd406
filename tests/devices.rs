//! Devices at the protocol level, against a real server: linking through the server with the
//! real SPAKE2 exchange (E13), per-device keys and bundles, copies for every device checked
//! against the current lists (`stale_devices`), delivery to each device, removal.

mod common;

use std::time::Duration;

use common::TestServer;
use common::raw::Raw;
use securefastchat::e2e::link::{ExistingDevice, JoiningDevice, LinkSecret};
use securefastchat::e2e::{IdentityKeyPair, LinkCode, LinkPayload, PrekeyStore};
use securefastchat::protocol::keys::{Bin, OneTimePrekey, SignedPrekey};
use securefastchat::protocol::{
    CloseCode, Copies, DeliverHeader, DeviceId, ErrorCode, MAX_STREAM_HEADER, MessageId, Password,
    Reply, Request, SendHeader, ServerFrame, StreamHeader, Username, decode_body, encode_frame,
    read_frame,
};

const PASSWORD: &str = "correct horse battery staple";

fn name(n: &str) -> Username {
    Username::parse(n).unwrap()
}

/// A device's keys, published on `raw`'s connection.
async fn publish(raw: &mut Raw, id: u64, identity: &IdentityKeyPair, with_identity: bool) {
    let prekeys = PrekeyStore::generate(identity, 5).unwrap();
    let signed = |s: securefastchat::e2e::SignedPrekeyPublic| SignedPrekey {
        id: s.id,
        key: Bin(s.key),
        signature: Bin(s.signature),
    };
    raw.request(
        id,
        Request::PublishKeys {
            identity_key: with_identity.then(|| Bin(*identity.public().as_bytes())),
            signed_prekey: Some(signed(prekeys.signed_prekey())),
            last_resort: Some(signed(prekeys.last_resort_prekey())),
            one_time_prekeys: prekeys
                .one_time_prekeys()
                .iter()
                .map(|o| OneTimePrekey {
                    id: o.id,
                    key: Bin(o.key),
                })
                .collect(),
        },
    )
    .await;
    let reply = raw.reply().await;
    assert!(
        matches!(
            reply.reply,
            Reply::KeysPublished {
                one_time_prekeys: 5
            }
        ),
        "{reply:?}"
    );
}

/// Signs `user` up as device 1 and publishes its keys; returns the connection and identity.
async fn signed_up(server: &TestServer, user: &str) -> (Raw, IdentityKeyPair) {
    let mut raw = Raw::with_hello(server).await;
    raw.request(
        2,
        Request::Signup {
            username: user.into(),
            password: Password::new(PASSWORD),
        },
    )
    .await;
    let reply = raw.reply().await;
    assert!(
        matches!(reply.reply, Reply::Session { device: 1, .. }),
        "{reply:?}"
    );
    let identity = IdentityKeyPair::generate().unwrap();
    publish(&mut raw, 3, &identity, true).await;
    (raw, identity)
}

/// The next reply or event that is not a `link_request`... or is: the next frame, skipping
/// `prekeys_low` events.
async fn next(raw: &mut Raw) -> ServerFrame {
    loop {
        let frame = raw.reply().await;
        if !matches!(frame.reply, Reply::PrekeysLow { .. }) {
            return frame;
        }
    }
}

/// Links a new device to `user` from `existing` (with the code given by `code_for`), the
/// whole exchange of PROTOCOL.md 5.5; returns the new device's connection and id, or the
/// error the new device got.
async fn link(
    server: &TestServer,
    existing: &mut Raw,
    user: &str,
    identity: &IdentityKeyPair,
    wrong_code: bool,
) -> Result<(Raw, DeviceId), ErrorCode> {
    let account = name(user);
    let secret = LinkSecret::new(123_456).unwrap();
    let (e_side, pake_e) = ExistingDevice::start(&secret, &account).unwrap();
    existing
        .request(40, Request::LinkOpen { pake: Bin(pake_e) })
        .await;
    let slot = match next(existing).await.reply {
        Reply::LinkOpened { slot, .. } => slot,
        other => panic!("link_open: {other:?}"),
    };
    let typed = if wrong_code { 654_321 } else { 123_456 };
    let code = LinkCode::new(slot, &LinkSecret::new(typed).unwrap()).unwrap();
    let (n_side, pake_n) = JoiningDevice::start(&code, &account).unwrap();
    let mut joining = Raw::with_hello(server).await;
    joining
        .request(
            2,
            Request::LinkJoin {
                username: user.into(),
                slot,
                pake: Bin(pake_n),
                name: "laptop".into(),
            },
        )
        .await;
    let pake_e = match joining.reply().await.reply {
        Reply::LinkPake { pake } => pake,
        Reply::Error { code, .. } => return Err(code),
        other => panic!("link_join: {other:?}"),
    };
    let (n_keys, confirm_n) = n_side.finish(&pake_e.0).unwrap();
    joining
        .request(
            3,
            Request::LinkConfirm {
                confirm: Bin(confirm_n),
            },
        )
        .await;
    let (pake, confirm) = match next(existing).await.reply {
        Reply::LinkRequest {
            slot: s,
            name,
            pake,
            confirm,
        } if s == slot && name == "laptop" => (pake, confirm),
        other => panic!("expected link_request: {other:?}"),
    };
    let e_keys = e_side.finish(slot, &pake.0).unwrap();
    let payload = LinkPayload {
        account: account.clone(),
        identity: identity.clone(),
        contacts: Vec::new(),
    };
    match e_keys.accept(&confirm.0, &payload) {
        Ok(accept) => {
            existing
                .request(
                    41,
                    Request::LinkAccept {
                        slot,
                        confirm: Bin(accept.confirm),
                        payload: accept.payload,
                    },
                )
                .await;
            let device = match next(existing).await.reply {
                Reply::LinkAccepted { device } => device,
                other => panic!("link_accept: {other:?}"),
            };
            let (confirm_e, sealed) = match joining.reply().await.reply {
                Reply::Linked {
                    device: d,
                    confirm,
                    payload,
                    ..
                } if d == device => (confirm, payload),
                other => panic!("linked: {other:?}"),
            };
            let opened = n_keys.open(&confirm_e.0, &sealed).unwrap();
            assert_eq!(opened.identity.public(), identity.public());
            Ok((joining, device))
        }
        Err(_) => {
            existing.request(41, Request::LinkRefuse { slot }).await;
            assert!(matches!(next(existing).await.reply, Reply::LinkRefused));
            match joining.reply().await.reply {
                Reply::Error { code, .. } => Err(code),
                other => panic!("expected link_failed: {other:?}"),
            }
        }
    }
}

/// Sends a message with the given copies on `raw`; returns the event.
async fn send(raw: &mut Raw, id: u8, to: &str, devices: &[DeviceId], own: &[DeviceId]) -> Reply {
    let n = devices.len() + own.len();
    let lengths: Vec<u64> = (0..n as u64).map(|i| 10 + i).collect();
    let body: Vec<u8> = lengths
        .iter()
        .enumerate()
        .flat_map(|(i, l)| std::iter::repeat_n(i as u8, *l as usize))
        .collect();
    let header = StreamHeader::Send(SendHeader {
        id: MessageId([id; 16]),
        to: to.into(),
        kind: "text".into(),
        length: body.len() as u64,
        copies: Some(Copies {
            devices: devices.to_vec(),
            own_devices: own.to_vec(),
            lengths,
        }),
        group: None,
        welcome: None,
    });
    let mut stream = raw.conn.open_uni().await.unwrap();
    let mut frame = encode_frame(&header, MAX_STREAM_HEADER).unwrap();
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await.unwrap();
    let _ = stream.finish();
    loop {
        let frame = next(raw).await;
        if frame.id.is_none() {
            return frame.reply;
        }
    }
}

/// The next delivery on `raw`'s connection: header and body.
async fn delivery(raw: &Raw) -> (DeliverHeader, Vec<u8>) {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), raw.conn.accept_uni())
        .await
        .expect("a delivery in time")
        .expect("the connection is open");
    let mut buf = Vec::new();
    assert!(
        read_frame(&mut stream, MAX_STREAM_HEADER, &mut buf)
            .await
            .unwrap()
    );
    let StreamHeader::Deliver(header) = decode_body(&buf).unwrap() else {
        panic!("not a deliver header");
    };
    let body = stream.read_to_end(1 << 16).await.unwrap();
    (header, body)
}

/// No delivery arrives on `raw` for a moment.
async fn no_delivery(raw: &Raw) {
    let waited = tokio::time::timeout(Duration::from_millis(300), raw.conn.accept_uni()).await;
    assert!(waited.is_err(), "unexpected delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_gets_its_own_copy_and_the_sender_sees_what_it_sent() {
    let server = TestServer::start().await;
    let (mut phone, alice_identity) = signed_up(&server, "alice").await;
    let (mut bob, _) = signed_up(&server, "bob").await;
    let (mut laptop, device) = link(&server, &mut phone, "alice", &alice_identity, false)
        .await
        .unwrap();
    assert_eq!(device, 2);
    // The new device publishes its own prekeys under the account's identity.
    publish(&mut laptop, 4, &alice_identity, true).await;
    laptop.request(5, Request::Whoami).await;
    assert!(matches!(
        laptop.reply().await.reply,
        Reply::Whoami { device: 2, .. }
    ));

    // Bob still seals for device 1 only: stale, with the current list.
    match send(&mut bob, 1, "alice", &[1], &[]).await {
        Reply::SendFailed {
            code: ErrorCode::StaleDevices,
            devices: Some(devices),
            own_devices: Some(own),
            ..
        } => assert_eq!((devices, own), (vec![1, 2], vec![])),
        other => panic!("expected stale_devices: {other:?}"),
    }
    // A bundle per device of Alice's, each with its own one-time prekey.
    bob.request(
        6,
        Request::FetchBundle {
            username: "alice".into(),
            devices: None,
        },
    )
    .await;
    match bob.reply().await.reply {
        Reply::Bundle { devices, .. } => {
            let ids: Vec<_> = devices.iter().map(|d| d.device).collect();
            assert_eq!(ids, vec![1, 2]);
            assert!(devices.iter().all(|d| d.one_time_prekey.is_some()));
            assert_ne!(devices[0].signed_prekey, devices[1].signed_prekey);
        }
        other => panic!("bundle: {other:?}"),
    }
    // Sealed for both: each device gets its own copy, exactly once.
    assert!(matches!(
        send(&mut bob, 2, "alice", &[2, 1], &[]).await,
        Reply::Sent {
            duplicate: false,
            ..
        }
    ));
    let (on_phone, phone_body) = delivery(&phone).await;
    let (on_laptop, laptop_body) = delivery(&laptop).await;
    assert_eq!((on_phone.from.as_str(), on_phone.from_device), ("bob", 1));
    assert_eq!(on_phone.id, on_laptop.id);
    // Copies go in the order listed: device 2's copy first (10 bytes of 0), then device 1's.
    assert_eq!(laptop_body, vec![0; 10]);
    assert_eq!(phone_body, vec![1; 11]);
    assert_eq!((on_phone.to, on_laptop.to), (None, None));
    no_delivery(&phone).await;

    // Alice sends from the laptop: Bob gets it, and the phone gets a copy naming Bob.
    assert!(matches!(
        send(&mut laptop, 3, "bob", &[1], &[1]).await,
        Reply::Sent { .. }
    ));
    let (to_bob, _) = delivery(&bob).await;
    assert_eq!((to_bob.from.as_str(), to_bob.from_device), ("alice", 2));
    assert_eq!(to_bob.to, None);
    let (mine, _) = delivery(&phone).await;
    assert_eq!((mine.from.as_str(), mine.from_device), ("alice", 2));
    assert_eq!(mine.to.as_deref(), Some("bob"));
    // Leaving out the phone's copy is stale too.
    match send(&mut laptop, 4, "bob", &[1], &[]).await {
        Reply::SendFailed {
            code: ErrorCode::StaleDevices,
            own_devices: Some(own),
            ..
        } => assert_eq!(own, vec![1]),
        other => panic!("expected stale_devices: {other:?}"),
    }
    // A note to oneself goes to the other devices only.
    assert!(matches!(
        send(&mut phone, 5, "alice", &[], &[2]).await,
        Reply::Sent { .. }
    ));
    let (note, _) = delivery(&laptop).await;
    assert_eq!(
        (note.from.as_str(), note.from_device, note.to.as_deref()),
        ("alice", 1, Some("alice"))
    );

    // The device list, from the laptop's side.
    laptop.request(7, Request::ListDevices).await;
    match laptop.reply().await.reply {
        Reply::Devices { devices } => {
            let seen: Vec<_> = devices
                .iter()
                .map(|d| (d.device, d.name.as_str(), d.current))
                .collect();
            assert_eq!(seen, vec![(1, "first device", false), (2, "laptop", true)]);
        }
        other => panic!("devices: {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_fails_on_both_sides_and_leaves_no_device() {
    let server = TestServer::start().await;
    let (mut phone, identity) = signed_up(&server, "alice").await;
    let failed = link(&server, &mut phone, "alice", &identity, true).await;
    assert_eq!(failed.err(), Some(ErrorCode::LinkFailed));
    phone.request(9, Request::ListDevices).await;
    match phone.reply().await.reply {
        Reply::Devices { devices } => assert_eq!(devices.len(), 1),
        other => panic!("devices: {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_or_unknown_slot_fails_and_a_closed_opener_ends_its_link() {
    let server = TestServer::start().await;
    let (mut phone, _) = signed_up(&server, "alice").await;
    let account = name("alice");
    let secret = LinkSecret::new(1).unwrap();
    let (_e, pake_e) = ExistingDevice::start(&secret, &account).unwrap();
    phone
        .request(40, Request::LinkOpen { pake: Bin(pake_e) })
        .await;
    let slot = match next(&mut phone).await.reply {
        Reply::LinkOpened { slot, .. } => slot,
        other => panic!("{other:?}"),
    };
    let join = |slot: u16, user: &'static str| Request::LinkJoin {
        username: user.into(),
        slot,
        pake: Bin([0x42; 33]),
        name: "x".into(),
    };
    let mut first = Raw::with_hello(&server).await;
    // Another account's name: fails, and the link is still there.
    first.request(2, join(slot, "bob")).await;
    first.expect_error(Some(2), ErrorCode::LinkFailed).await;
    first.request(3, join(slot, "alice")).await;
    assert!(matches!(first.reply().await.reply, Reply::LinkPake { .. }));
    // Used: a second join fails (and ends the link for the first joiner too).
    let mut second = Raw::with_hello(&server).await;
    second.request(2, join(slot, "alice")).await;
    second.expect_error(Some(2), ErrorCode::LinkFailed).await;
    first
        .request(
            4,
            Request::LinkConfirm {
                confirm: Bin([0; 32]),
            },
        )
        .await;
    first.expect_error(Some(4), ErrorCode::LinkFailed).await;
    // A slot nobody opened.
    second.request(3, join((slot + 1) % 10_000, "alice")).await;
    second.expect_error(Some(3), ErrorCode::LinkFailed).await;

    // The opener leaves while the new device waits: the new device hears link_failed.
    let (_e, pake_e) = ExistingDevice::start(&secret, &account).unwrap();
    phone
        .request(41, Request::LinkOpen { pake: Bin(pake_e) })
        .await;
    let slot = match next(&mut phone).await.reply {
        Reply::LinkOpened { slot, .. } => slot,
        other => panic!("{other:?}"),
    };
    let mut third = Raw::with_hello(&server).await;
    third.request(2, join(slot, "alice")).await;
    assert!(matches!(third.reply().await.reply, Reply::LinkPake { .. }));
    third
        .request(
            3,
            Request::LinkConfirm {
                confirm: Bin([0; 32]),
            },
        )
        .await;
    assert!(matches!(
        next(&mut phone).await.reply,
        Reply::LinkRequest { .. }
    ));
    phone.conn.close(0u32.into(), b"bye");
    third.expect_error(Some(3), ErrorCode::LinkFailed).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_loses_its_inbox_its_keys_and_its_sessions() {
    let server = TestServer::start().await;
    let (mut phone, identity) = signed_up(&server, "alice").await;
    let (mut bob, _) = signed_up(&server, "bob").await;
    let (mut laptop, device) = link(&server, &mut phone, "alice", &identity, false)
        .await
        .unwrap();
    publish(&mut laptop, 4, &identity, false).await;
    // A message waits in the laptop's inbox (the laptop is offline).
    laptop.conn.close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(
        send(&mut bob, 1, "alice", &[1, 2], &[]).await,
        Reply::Sent { .. }
    ));
    let _ = delivery(&phone).await;

    // Its own device cannot be removed; a wrong password removes nothing.
    phone
        .request(
            50,
            Request::RemoveDevice {
                device: 1,
                password: Password::new(PASSWORD),
                revocation: None,
            },
        )
        .await;
    phone.expect_error(Some(50), ErrorCode::BadRequest).await;
    phone
        .request(
            51,
            Request::RemoveDevice {
                device,
                password: Password::new("wrong password!"),
                revocation: None,
            },
        )
        .await;
    phone
        .expect_error(Some(51), ErrorCode::InvalidCredentials)
        .await;
    phone
        .request(
            52,
            Request::RemoveDevice {
                device,
                password: Password::new(PASSWORD),
                revocation: None,
            },
        )
        .await;
    assert!(matches!(
        next(&mut phone).await.reply,
        Reply::DeviceRemoved { device: 2 }
    ));

    // It cannot log in again, and Bob's next send learns it is gone.
    let mut again = Raw::with_hello(&server).await;
    again
        .request(
            2,
            Request::Login {
                username: "alice".into(),
                password: Password::new(PASSWORD),
                device: Some(2),
            },
        )
        .await;
    again.expect_error(Some(2), ErrorCode::UnknownDevice).await;
    match send(&mut bob, 2, "alice", &[1, 2], &[]).await {
        Reply::SendFailed {
            code: ErrorCode::StaleDevices,
            devices: Some(devices),
            ..
        } => assert_eq!(devices, vec![1]),
        other => panic!("expected stale_devices: {other:?}"),
    }
    bob.request(
        7,
        Request::FetchBundle {
            username: "alice".into(),
            devices: Some(vec![2]),
        },
    )
    .await;
    bob.expect_error(Some(7), ErrorCode::UnknownDevice).await;
    // A new link gets a new id: 2 is never given again.
    let (_laptop2, device) = link(&server, &mut phone, "alice", &identity, false)
        .await
        .unwrap();
    assert_eq!(device, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_closed_with_device_removed() {
    let server = TestServer::start().await;
    let (mut phone, identity) = signed_up(&server, "alice").await;
    let (laptop, device) = link(&server, &mut phone, "alice", &identity, false)
        .await
        .unwrap();
    phone
        .request(
            52,
            Request::RemoveDevice {
                device,
                password: Password::new(PASSWORD),
                revocation: None,
            },
        )
        .await;
    assert!(matches!(
        next(&mut phone).await.reply,
        Reply::DeviceRemoved { .. }
    ));
    laptop.expect_closed_with(CloseCode::DeviceRemoved).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identity_is_refused_and_replacing_it_removes_the_other_devices() {
    let server = TestServer::start().await;
    let (mut phone, identity) = signed_up(&server, "alice").await;
    let (mut laptop, _) = link(&server, &mut phone, "alice", &identity, false)
        .await
        .unwrap();
    // A fresh identity on a linked device: identity_mismatch, nothing stored.
    let other = IdentityKeyPair::generate().unwrap();
    let prekeys = PrekeyStore::generate(&other, 0).unwrap();
    let signed = |s: securefastchat::e2e::SignedPrekeyPublic| SignedPrekey {
        id: s.id,
        key: Bin(s.key),
        signature: Bin(s.signature),
    };
    laptop
        .request(
            4,
            Request::PublishKeys {
                identity_key: Some(Bin(*other.public().as_bytes())),
                signed_prekey: Some(signed(prekeys.signed_prekey())),
                last_resort: Some(signed(prekeys.last_resort_prekey())),
                one_time_prekeys: Vec::new(),
            },
        )
        .await;
    laptop
        .expect_error(Some(4), ErrorCode::IdentityMismatch)
        .await;
    // Replaced explicitly from the laptop: the phone is removed.
    laptop
        .request(
            5,
            Request::ReplaceIdentity {
                password: Password::new(PASSWORD),
                identity_key: Bin(*other.public().as_bytes()),
                signed_prekey: signed(prekeys.signed_prekey()),
                last_resort: signed(prekeys.last_resort_prekey()),
                one_time_prekeys: Vec::new(),
            },
        )
        .await;
    match next(&mut laptop).await.reply {
        Reply::IdentityReplaced { removed } => assert_eq!(removed, vec![1]),
        other => panic!("{other:?}"),
    }
    phone.expect_closed_with(CloseCode::DeviceRemoved).await;
    laptop
        .request(
            6,
            Request::FetchIdentity {
                username: "alice".into(),
            },
        )
        .await;
    match laptop.reply().await.reply {
        Reply::Identity { identity_key, .. } => {
            assert_eq!(identity_key, Bin(*other.public().as_bytes()))
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_in_the_middle_of_a_link_outlives_the_login_deadline() {
    let server = TestServer::start_with(|c| c.login_timeout = Duration::from_secs(1)).await;
    let (mut phone, _) = signed_up(&server, "alice").await;
    let account = name("alice");
    let secret = LinkSecret::new(7).unwrap();
    let (_e, pake_e) = ExistingDevice::start(&secret, &account).unwrap();
    phone
        .request(40, Request::LinkOpen { pake: Bin(pake_e) })
        .await;
    let slot = match next(&mut phone).await.reply {
        Reply::LinkOpened { slot, .. } => slot,
        other => panic!("{other:?}"),
    };
    // A connection that only said hello is closed at the deadline...
    let idle = Raw::with_hello(&server).await;
    let mut joining = Raw::with_hello(&server).await;
    joining
        .request(
            2,
            Request::LinkJoin {
                username: "alice".into(),
                slot,
                pake: Bin([0x42; 33]),
                name: "tablet".into(),
            },
        )
        .await;
    assert!(matches!(
        joining.reply().await.reply,
        Reply::LinkPake { .. }
    ));
    idle.expect_closed_with(CloseCode::LoginTimeout).await;
    // ...one that joined a link is not: it is still there to confirm.
    tokio::time::sleep(Duration::from_millis(500)).await;
    joining
        .request(
            3,
            Request::LinkConfirm {
                confirm: Bin([0; 32]),
            },
        )
        .await;
    assert!(matches!(
        next(&mut phone).await.reply,
        Reply::LinkRequest { .. }
    ));
    phone.request(41, Request::LinkRefuse { slot }).await;
    assert!(matches!(next(&mut phone).await.reply, Reply::LinkRefused));
    joining.expect_error(Some(3), ErrorCode::LinkFailed).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_fails_and_leaves_nothing() {
    let server = TestServer::start_with(|c| c.link_ttl = Duration::from_secs(1)).await;
    let (mut phone, identity) = signed_up(&server, "alice").await;
    let account = name("alice");
    let secret = LinkSecret::new(424_242).unwrap();
    let (_e, pake_e) = ExistingDevice::start(&secret, &account).unwrap();
    phone
        .request(40, Request::LinkOpen { pake: Bin(pake_e) })
        .await;
    let slot = match next(&mut phone).await.reply {
        Reply::LinkOpened { slot, .. } => slot,
        other => panic!("{other:?}"),
    };
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let code = LinkCode::new(slot, &secret).unwrap();
    let (_n, pake_n) = JoiningDevice::start(&code, &account).unwrap();
    let mut late = Raw::with_hello(&server).await;
    late.request(
        2,
        Request::LinkJoin {
            username: "alice".into(),
            slot,
            pake: Bin(pake_n),
            name: "late".into(),
        },
    )
    .await;
    late.expect_error(Some(2), ErrorCode::LinkFailed).await;
    phone.request(9, Request::ListDevices).await;
    match phone.reply().await.reply {
        Reply::Devices { devices } => assert_eq!(devices.len(), 1),
        other => panic!("devices: {other:?}"),
    }
    // A new link works as ever.
    let (_laptop, device) = link(&server, &mut phone, "alice", &identity, false)
        .await
        .unwrap();
    assert_eq!(device, 2);
    server.stop().await;
}
