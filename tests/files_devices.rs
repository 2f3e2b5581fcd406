//! Files and devices, through a real server: every device of the recipient and the sender's
//! other devices get a file message, each fetches the file, and the server deletes the blob
//! once all of them have it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use securefastchat::client::keystore::Keystore;
use securefastchat::client::link::{self, open_link};
use securefastchat::client::messenger::{Messenger, MessengerError, Received};
use securefastchat::e2e::{FILE_CHUNK_LEN, FileRef};
use securefastchat::protocol::{ErrorCode, Username};

const WAIT: Duration = Duration::from_secs(10);

/// The next message, which must be a file.
async fn next_file(m: &Messenger) -> (Received, FileRef) {
    let received = m.receive(WAIT).await.unwrap().expect("a message");
    match &received {
        Received::File { file, .. } => {
            let file = file.clone();
            (received, file)
        }
        other => panic!("expected a file, got {other:?}"),
    }
}

/// Links a new home `home` as a device of `existing`'s account (as tests/devices_messaging.rs
/// does) and returns its messenger, keys published.
async fn link_home(
    server: &TestServer,
    existing: &Messenger,
    user: &str,
    home: &Path,
) -> Messenger {
    let account = Username::parse(user).unwrap();
    let phone = existing.client();
    let opened = open_link(&phone, existing.keystore(), &account)
        .await
        .unwrap();
    let code = opened.code().clone();
    let client = server.client().await;
    std::fs::create_dir_all(home).unwrap();
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let keystore = Keystore::new(home);
    let (linked, joined) = tokio::join!(
        tokio::time::timeout(WAIT, opened.answer(&phone, existing.keystore())),
        link::join_link(&client, &keystore, &account, &code, "laptop")
    );
    assert_eq!(linked.unwrap().unwrap().device, joined.unwrap().device);
    link::publish_keys(&client, &keystore).await.unwrap();
    Messenger::new(client, home, user).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_gets_the_file_and_the_blob_goes_once_all_have_it() {
    let server = TestServer::start().await;
    let homes = tempfile::tempdir().unwrap();
    let alice = server
        .messenger(&homes.path().join("a1"), "alice", true)
        .await;
    let bob = server
        .messenger(&homes.path().join("b1"), "bob", true)
        .await;
    let alice_laptop = link_home(&server, &alice, "alice", &homes.path().join("a2")).await;
    let bob_laptop = link_home(&server, &bob, "bob", &homes.path().join("b2")).await;
    let data: Vec<u8> = (0..FILE_CHUNK_LEN + 10).map(|i| (i % 253) as u8).collect();
    let source = homes.path().join("notes.txt");
    std::fs::write(&source, &data).unwrap();
    let (id, _) = alice.send_file("bob", &source, |_, _| {}).await.unwrap();

    let mut last = None;
    for (who, device) in [
        ("bob", &bob),
        ("bob's laptop", &bob_laptop),
        ("alice's laptop", &alice_laptop),
    ] {
        let (received, file) = next_file(device).await;
        let Received::File {
            id: got, from, to, ..
        } = &received
        else {
            unreachable!()
        };
        assert_eq!((*got, from.as_str()), (id, "alice"), "{who}");
        // alice's other device shows it as sent by her, to bob.
        let expected_to = (who == "alice's laptop").then(|| "bob".to_owned());
        assert_eq!(*to, expected_to, "{who}");
        let dir = tempfile::tempdir().unwrap();
        let saved = device
            .download_file(&file, dir.path(), |_, _| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(saved).unwrap(), data, "{who}");
        device.shown(&received).await.unwrap();
        last = Some(file);
    }
    // Every device that had to fetch it did: the server deleted the blob.
    let dir = tempfile::tempdir().unwrap();
    let again = bob
        .download_file(&last.unwrap(), dir.path(), |_, _| {})
        .await;
    assert!(
        matches!(&again, Err(MessengerError::Client(e)) if e.is_server(ErrorCode::UnknownBlob)),
        "{again:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
