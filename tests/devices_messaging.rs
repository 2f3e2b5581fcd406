//! Devices end to end, through the client library and a real server: a phone home and a laptop
//! home of one account linked with the code, every message shown once on every device,
//! "sent by me" copies on the account's other devices, and a device linked while the sender
//! still knows the old device list.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{PASSWORD, TestServer};
use securefastchat::client::keystore::Keystore;
use securefastchat::client::link::{self, open_link};
use securefastchat::client::messenger::{Messenger, Received};
use securefastchat::protocol::{Password, Username};

const WAIT: Duration = Duration::from_secs(5);

fn name(n: &str) -> Username {
    Username::parse(n).unwrap()
}

/// Links a new home `home` as a device of `existing`'s account, with the code the existing
/// device shows, and returns its messenger (keys published).
async fn link_home(
    server: &TestServer,
    existing: &Messenger,
    user: &str,
    home: &Path,
) -> Messenger {
    link_home_with(server, existing, user, home, true).await
}

/// [`link_home`], publishing the new device's keys or not (as when `sfc device add` dies
/// between the link and the upload).
async fn link_home_with(
    server: &TestServer,
    existing: &Messenger,
    user: &str,
    home: &Path,
    publish: bool,
) -> Messenger {
    let phone = existing.client();
    let opened = open_link(&phone, existing.keystore(), &name(user))
        .await
        .unwrap();
    let code = opened.code().clone();
    let client = server.client().await;
    // A home directory as `sfc` makes one: private.
    std::fs::create_dir_all(home).unwrap();
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let keystore = Keystore::new(home);
    let account = name(user);
    // Both sides at once, as on two screens.
    let (linked, joined) = tokio::join!(
        tokio::time::timeout(WAIT, opened.answer(&phone, existing.keystore())),
        link::join_link(&client, &keystore, &account, &code, "laptop")
    );
    assert_eq!(linked.unwrap().unwrap().device, joined.unwrap().device);
    if publish {
        link::publish_keys(&client, &keystore).await.unwrap();
    }
    Messenger::new(client, home, user).unwrap()
}

/// The next text on `m`: (from, to, text).
async fn next_text(m: &Messenger) -> (String, Option<String>, String) {
    match m.receive(WAIT).await.unwrap() {
        Some(Received::Text { from, to, text, .. }) => (from, to, text),
        other => panic!("expected a text, got {other:?}"),
    }
}

/// Nothing more arrives on `m` for a moment.
async fn nothing_more(m: &Messenger) {
    let more = m.receive(Duration::from_millis(700)).await.unwrap();
    assert!(more.is_none(), "unexpected: {more:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_devices_show_each_message_once_and_the_senders_other_device_shows_what_it_sent() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let phone = server
        .messenger(&homes.path().join("phone"), "alice", true)
        .await;
    let bob = server
        .messenger(&homes.path().join("bob"), "bob", true)
        .await;
    let laptop = link_home(&server, &phone, "alice", &homes.path().join("laptop")).await;
    assert_eq!(laptop.client().device(), 2);
    // The laptop holds the account's identity: the same safety number as the phone.
    bob.send_text("alice", "hello alice").await.unwrap();
    assert_eq!(
        next_text(&phone).await,
        ("bob".into(), None, "hello alice".into())
    );
    assert_eq!(
        next_text(&laptop).await,
        ("bob".into(), None, "hello alice".into())
    );
    nothing_more(&phone).await;
    nothing_more(&laptop).await;

    // From the laptop: Bob gets it from alice, the phone shows it as sent by alice to bob.
    laptop.send_text("bob", "from my laptop").await.unwrap();
    assert_eq!(
        next_text(&bob).await,
        ("alice".into(), None, "from my laptop".into())
    );
    assert_eq!(
        next_text(&phone).await,
        ("alice".into(), Some("bob".into()), "from my laptop".into())
    );
    nothing_more(&laptop).await;
    nothing_more(&bob).await;

    // And back: bob's reply reaches both, in the sessions already there.
    bob.send_text("alice", "got it").await.unwrap();
    assert_eq!(next_text(&laptop).await.2, "got it");
    assert_eq!(next_text(&phone).await.2, "got it");
    assert_eq!(
        phone.fingerprint("bob").await.unwrap().number,
        laptop.fingerprint("bob").await.unwrap().number
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_linked_after_the_sender_learnt_the_list_gets_what_follows() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let phone = server
        .messenger(&homes.path().join("phone"), "alice", true)
        .await;
    let bob = server
        .messenger(&homes.path().join("bob"), "bob", true)
        .await;
    // Bob knows alice with one device: his session and device list are for device 1.
    bob.send_text("alice", "before").await.unwrap();
    assert_eq!(next_text(&phone).await.2, "before");

    // The laptop is linked; bob's next message is sealed for [1], refused as stale, sealed
    // again for [1, 2] under the same id, and reaches both, once each.
    let laptop = link_home(&server, &phone, "alice", &homes.path().join("laptop")).await;
    bob.send_text("alice", "after").await.unwrap();
    assert_eq!(
        next_text(&laptop).await,
        ("bob".into(), None, "after".into())
    );
    assert_eq!(next_text(&phone).await.2, "after");
    nothing_more(&phone).await;
    nothing_more(&laptop).await;

    // The laptop is removed from the phone: bob's next message goes to the phone only, and
    // the removed device can no longer log in.
    link::remove_device(&phone.client(), 2, Password::new(PASSWORD))
        .await
        .unwrap();
    bob.send_text("alice", "phone only").await.unwrap();
    assert_eq!(next_text(&phone).await.2, "phone only");
    let client = server.client().await;
    let refused = link::login_as(&client, "alice", Password::new(PASSWORD), Some(2))
        .await
        .unwrap_err();
    assert!(
        refused.is_server(securefastchat::protocol::ErrorCode::UnknownDevice),
        "{refused}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_short_before_the_upload_is_finished_by_the_next_command() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let phone = server
        .messenger(&homes.path().join("phone"), "alice", true)
        .await;
    let bob = server
        .messenger(&homes.path().join("bob"), "bob", true)
        .await;
    let laptop = link_home_with(
        &server,
        &phone,
        "alice",
        &homes.path().join("laptop"),
        false,
    )
    .await;
    // The laptop is a device without keys on the server: a send to alice cannot be sealed
    // for it yet.
    assert!(bob.send_text("alice", "too early").await.is_err());
    // The next command on the laptop publishes what the link left unpublished.
    laptop.ensure_keys().await.unwrap();
    bob.send_text("alice", "now").await.unwrap();
    assert_eq!(next_text(&laptop).await.2, "now");
    assert_eq!(next_text(&phone).await.2, "now");
    server.stop().await;
}
