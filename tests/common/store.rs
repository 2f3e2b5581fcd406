//! Helpers for the store tests on a real fjall store in a temporary directory
//! (`store_devices`, `store_copies`): accounts, messages with a copy per device, keys, and a
//! raw look at every keyspace of a closed store.

use std::path::Path;

use fjall::{Database, KeyspaceCreateOptions};
use securefastchat::protocol::keys::{Bin, OneTimePrekey, SignedPrekey};
use securefastchat::protocol::{MessageId, Username};
use securefastchat::store::{
    Created, DeviceKeys, FjallStore, NewMessage, Placed, SessionRecord, Store, StoreOptions,
    UserRecord,
};

pub fn user(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

pub async fn open_with_people(dir: &Path, options: StoreOptions) -> FjallStore {
    let store = FjallStore::open_with(dir, options).expect("open");
    for name in ["alice", "bob", "carol"] {
        let record = UserRecord {
            password_hash: "unused".into(),
            created_at: 5,
        };
        let created = store
            .create_user(&user(name), record)
            .await
            .expect("create");
        assert_eq!(created, Created::Created);
    }
    store
}

pub async fn people(dir: &Path) -> FjallStore {
    open_with_people(dir, StoreOptions::default()).await
}

/// A message from alice's `from` device with id `[n; 16]`, addressed to bob, with one copy
/// per (recipient, device) in `to`; each body is 16 bytes of `n`.
pub fn message(n: u8, from: u32, to: &[(&str, u32)]) -> NewMessage {
    NewMessage {
        sender: user("alice"),
        sender_device: from,
        to: user("bob"),
        id: MessageId([n; 16]),
        kind: "text".into(),
        copies: to
            .iter()
            .map(|(name, device)| securefastchat::store::Copy {
                recipient: user(name),
                device: *device,
                body: vec![n; 16],
            })
            .collect(),
        sent_at: 1,
        expires_at: u64::MAX,
    }
}

pub async fn seqs_of(store: &FjallStore, name: &str, device: u32) -> Vec<u64> {
    let pending = store.pending(&user(name), device, 0, 1000).await;
    pending.expect("pending").iter().map(|m| m.seq).collect()
}

pub fn signed(id: u32, n: u8) -> SignedPrekey {
    SignedPrekey {
        id,
        key: Bin([n; 32]),
        signature: Bin([n; 64]),
    }
}

pub fn device_keys(n: u8) -> DeviceKeys {
    DeviceKeys {
        signed_prekey: signed(1, n),
        last_resort: signed(2, n),
    }
}

pub fn one_time(ids: std::ops::Range<u32>, n: u8) -> Vec<OneTimePrekey> {
    ids.map(|id| OneTimePrekey {
        id,
        key: Bin([n; 32]),
    })
    .collect()
}

pub fn session(name: &str, device: u32, n: u8) -> SessionRecord {
    SessionRecord {
        username: user(name),
        device,
        created_at: 1,
        expires_at: u64::MAX,
        token_digest: [n; 32],
    }
}

/// Every key of every keyspace of the closed store in `dir`, by keyspace.
pub fn dump(dir: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let db = Database::builder(dir).open().expect("open fjall");
    let mut all = Vec::new();
    for name in db.list_keyspace_names() {
        let keyspace = db
            .keyspace(&name, KeyspaceCreateOptions::default)
            .expect("keyspace");
        for entry in keyspace.iter() {
            let (key, value) = entry.into_inner().expect("read");
            all.push((name.to_string(), key.to_vec(), value.to_vec()));
        }
    }
    all
}

/// The inbox id of a stored device record.
pub fn inbox_of(value: &[u8]) -> u32 {
    #[derive(serde::Deserialize)]
    struct Device {
        inbox_id: u32,
    }
    let device: Device = rmp_serde::from_slice(value).expect("device");
    device.inbox_id
}

/// Checks that the closed store in `dir` holds nothing of `name`'s `devices`, whose inboxes
/// had the ids `inboxes`: no record, keys, one-time prekeys, sessions, inbox entries or seq
/// counter.
pub fn assert_nothing_of(dir: &Path, name: &str, devices: &[u32], inboxes: &[u32]) {
    for (keyspace, key, value) in dump(dir) {
        let what = format!("{keyspace} {} → {}", hex::encode(&key), hex::encode(&value));
        for device in devices {
            let name_device = [name.as_bytes(), &[0], &device.to_be_bytes()].concat();
            match keyspace.as_str() {
                "keys" | "prekeys" => assert!(!key.starts_with(&name_device), "{what}"),
                "sessions" => {
                    let session: SessionRecord = rmp_serde::from_slice(&value).expect("session");
                    assert!(
                        !(session.username.as_str() == name && session.device == *device),
                        "{what}"
                    );
                }
                _ => {}
            }
        }
        if keyspace == "sent_v2" {
            // A pending record naming a copy on one of the devices (or device 1, in its
            // one-copy form).
            #[derive(serde::Deserialize)]
            struct Record {
                #[serde(default)]
                copies: Vec<Placed>,
                recipient: Option<Username>,
            }
            let record: Record = rmp_serde::from_slice(&value).expect("record");
            for copy in record.copies {
                let gone = copy.recipient.as_str() == name && devices.contains(&copy.device);
                assert!(!gone, "a record names a copy on a removed device: {what}");
            }
            let one_copy = record.recipient.is_some_and(|r| r.as_str() == name);
            assert!(!(one_copy && devices.contains(&1)), "{what}");
        }
        for inbox in inboxes {
            match keyspace.as_str() {
                "inbox_v2" => assert!(!key.starts_with(&inbox.to_be_bytes()), "{what}"),
                "meta" => assert_ne!(
                    key,
                    [b"sqd\0".as_slice(), &inbox.to_be_bytes()].concat(),
                    "{what}"
                ),
                "devices" if key[4..] != [0xff; 4] => {
                    assert_ne!(inbox_of(&value), *inbox, "{what}");
                }
                _ => {}
            }
        }
    }
}
