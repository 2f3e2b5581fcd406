//! The store's devices on a real fjall store in a temporary directory: adding and removing
//! devices (ids never reused, also after a restart), per-device keys and bundles, messages
//! with a copy per device (stored whole or not at all, deduplicated, unsent, settled), and
//! that a removed device or a deleted account leaves nothing behind in any keyspace.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fjall::{Database, KeyspaceCreateOptions};
use securefastchat::protocol::keys::{Bin, OneTimePrekey, SignedPrekey};
use securefastchat::protocol::{MessageId, Username};
use securefastchat::store::{
    AppendHooks, Appended, Copy, Created, DeviceKeys, FjallStore, MAX_DEVICES, NewMessage, Placed,
    Removal, SenderShare, SessionRecord, Store, StoreError, StoreOptions, UserRecord,
};

fn user(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

async fn open_with_people(dir: &Path, options: StoreOptions) -> FjallStore {
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

async fn people(dir: &Path) -> FjallStore {
    open_with_people(dir, StoreOptions::default()).await
}

/// A message from alice's `from` device with id `[n; 16]`, addressed to bob, with one copy
/// per (recipient, device) in `to`; each body is 16 bytes of `n`.
fn message(n: u8, from: u32, to: &[(&str, u32)]) -> NewMessage {
    NewMessage {
        sender: user("alice"),
        sender_device: from,
        to: user("bob"),
        id: MessageId([n; 16]),
        kind: "text".into(),
        copies: to
            .iter()
            .map(|(name, device)| Copy {
                recipient: user(name),
                device: *device,
                body: vec![n; 16],
            })
            .collect(),
        sent_at: 1,
        expires_at: u64::MAX,
    }
}

async fn seqs_of(store: &FjallStore, name: &str, device: u32) -> Vec<u64> {
    let pending = store.pending(&user(name), device, 0, 1000).await;
    pending.expect("pending").iter().map(|m| m.seq).collect()
}

fn signed(id: u32, n: u8) -> SignedPrekey {
    SignedPrekey {
        id,
        key: Bin([n; 32]),
        signature: Bin([n; 64]),
    }
}

fn device_keys(n: u8) -> DeviceKeys {
    DeviceKeys {
        signed_prekey: signed(1, n),
        last_resort: signed(2, n),
    }
}

fn one_time(ids: std::ops::Range<u32>, n: u8) -> Vec<OneTimePrekey> {
    ids.map(|id| OneTimePrekey {
        id,
        key: Bin([n; 32]),
    })
    .collect()
}

fn session(name: &str, device: u32, n: u8) -> SessionRecord {
    SessionRecord {
        username: user(name),
        device,
        created_at: 1,
        expires_at: u64::MAX,
        token_digest: [n; 32],
    }
}

/// Every key of every keyspace of the closed store in `dir`, by keyspace.
fn dump(dir: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
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
fn inbox_of(value: &[u8]) -> u32 {
    #[derive(serde::Deserialize)]
    struct Device {
        inbox_id: u32,
    }
    let device: Device = rmp_serde::from_slice(value).expect("device");
    device.inbox_id
}

#[tokio::test]
async fn devices_are_added_up_to_the_limit_and_ids_are_never_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = user("alice");
    {
        let store = people(dir.path()).await;
        let first = store.devices(&alice).await.expect("devices");
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].id, first[0].name.as_str(), first[0].added_at),
            (1, "first device", 5)
        );
        assert!(
            store
                .devices(&user("nobody"))
                .await
                .expect("devices")
                .is_empty()
        );
        for n in 2..=MAX_DEVICES as u32 {
            let id = store
                .add_device(&alice, format!("phone {n}"), 100 + u64::from(n))
                .await;
            assert_eq!(id.expect("add"), n);
        }
        let full = store.add_device(&alice, "one too many".into(), 200).await;
        assert!(matches!(full, Err(StoreError::Limit(_))), "{full:?}");
        let unknown = store.add_device(&user("nobody"), "x".into(), 200).await;
        assert!(
            matches!(unknown, Err(StoreError::UnknownUser(_))),
            "{unknown:?}"
        );

        // A removed device's id is not given again; its slot is.
        assert!(
            store
                .remove_device(&alice, 3)
                .await
                .expect("remove")
                .is_some()
        );
        assert_eq!(store.remove_device(&alice, 3).await.expect("again"), None);
        assert_eq!(
            store
                .add_device(&alice, "new".into(), 300)
                .await
                .expect("add"),
            9
        );
        let ids: Vec<u32> = store
            .devices(&alice)
            .await
            .expect("devices")
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, [1, 2, 4, 5, 6, 7, 8, 9]);
        assert!(
            store
                .remove_device(&alice, 9)
                .await
                .expect("remove")
                .is_some()
        );
        store.close().await.expect("close");
    }
    // And not after a restart either.
    let store = FjallStore::open(dir.path()).expect("reopen");
    assert_eq!(
        store
            .add_device(&alice, "later".into(), 400)
            .await
            .expect("add"),
        10
    );
    // bob's devices are his own: his next id is 2.
    assert_eq!(
        store
            .add_device(&user("bob"), "b".into(), 400)
            .await
            .expect("add"),
        2
    );
    let names: Vec<String> = store
        .devices(&alice)
        .await
        .expect("devices")
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names.last().map(String::as_str), Some("later"));
    store.touch_device(&alice, 10, 999).await.expect("touch");
    store
        .touch_device(&alice, 3, 999)
        .await
        .expect("touch of a removed device");
    let touched = store.devices(&alice).await.expect("devices");
    assert_eq!(touched.last().map(|d| (d.id, d.last_seen)), Some((10, 999)));
    assert!(touched.iter().all(|d| d.id != 3));
    store.close().await.expect("close");
}

#[tokio::test]
async fn inbox_ids_are_never_reused_across_removals_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = user("alice");
    {
        let store = people(dir.path()).await;
        assert_eq!(
            store.add_device(&alice, "a".into(), 1).await.expect("add"),
            2
        );
        let stored = store
            .append(message(1, 1, &[("alice", 2)]), AppendHooks::default())
            .await;
        assert!(matches!(stored, Ok(Appended::Stored { .. })), "{stored:?}");
        assert!(
            store
                .remove_device(&alice, 2)
                .await
                .expect("remove")
                .is_some()
        );
        store.close().await.expect("close");
    }
    {
        let store = FjallStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.add_device(&alice, "b".into(), 1).await.expect("add"),
            3
        );
        // A new account after the device: its id must not be the removed inbox's either.
        let record = UserRecord {
            password_hash: String::new(),
            created_at: 1,
        };
        store
            .create_user(&user("dave"), record)
            .await
            .expect("create");
        assert!(seqs_of(&store, "alice", 3).await.is_empty());
        assert!(seqs_of(&store, "dave", 1).await.is_empty());
        store.close().await.expect("close");
    }
    // Every inbox id in use or used (accounts' ids and devices' inbox ids) is distinct.
    let mut inboxes = Vec::new();
    for (keyspace, key, value) in dump(dir.path()) {
        if keyspace == "devices" && key[4..] != [0xff; 4] {
            let inbox = inbox_of(&value);
            let (owner, id) = (&key[..4], u32::from_be_bytes(key[4..].try_into().unwrap()));
            if id == 1 {
                assert_eq!(
                    owner,
                    inbox.to_be_bytes(),
                    "device 1's inbox is its user id"
                );
            }
            inboxes.push(inbox);
        }
    }
    // alice 1, bob 2, carol 3, alice's removed device 2: 4, alice's device 3: 5, dave 6.
    inboxes.sort_unstable();
    assert_eq!(inboxes, [1, 2, 3, 5, 6]);
}

#[tokio::test]
async fn a_message_goes_to_every_device_in_one_piece() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = people(dir.path()).await;
    let (alice, bob) = (user("alice"), user("bob"));
    store
        .add_device(&alice, "laptop".into(), 1)
        .await
        .expect("add");
    store
        .add_device(&bob, "laptop".into(), 1)
        .await
        .expect("add");
    let placed = Arc::new(Mutex::new(Vec::new()));
    let (ordered, synced) = (Arc::clone(&placed), Arc::clone(&placed));
    let hooks = AppendHooks {
        ordered: Some(Box::new(move |p: &[Placed]| {
            ordered.lock().unwrap().push(("ordered", p.to_vec()))
        })),
        synced: Some(Box::new(move |p: &[Placed]| {
            synced.lock().unwrap().push(("synced", p.to_vec()))
        })),
    };
    let copies = [("bob", 1), ("bob", 2), ("alice", 1)];
    let stored = store
        .append(message(7, 2, &copies), hooks)
        .await
        .expect("append");
    assert_eq!(
        stored,
        Appended::Stored {
            seqs: vec![1, 1, 1]
        }
    );
    let expected: Vec<Placed> = copies
        .iter()
        .map(|(name, device)| Placed {
            recipient: user(name),
            device: *device,
            seq: 1,
        })
        .collect();
    assert_eq!(
        *placed.lock().unwrap(),
        [("ordered", expected.clone()), ("synced", expected.clone())]
    );
    let record = store.sent(&alice, MessageId([7; 16])).await.expect("sent");
    assert_eq!(record.map(|r| r.copies), Some(expected));

    // What each device reads: the sending device and, on alice's own copy, the addressee.
    let to_bob = store.pending(&bob, 2, 0, 10).await.expect("pending");
    assert_eq!(
        (
            to_bob[0].from_device,
            to_bob[0].to.clone(),
            to_bob[0].body.clone()
        ),
        (2, None, vec![7; 16])
    );
    let own = store.pending(&alice, 1, 0, 10).await.expect("pending");
    assert_eq!(
        (own[0].from.as_str(), own[0].to.clone()),
        ("alice", Some(bob.clone()))
    );
    assert!(seqs_of(&store, "alice", 2).await.is_empty());

    // A resend is a duplicate as a whole: nothing new anywhere.
    let again = store
        .append(message(7, 2, &copies), AppendHooks::default())
        .await;
    assert_eq!(again.expect("resend"), Appended::Duplicate);
    for (name, device) in copies {
        assert_eq!(seqs_of(&store, name, device).await, [1], "{name} {device}");
    }

    // A copy to a device that is not current refuses the whole message.
    let unknown = store
        .append(
            message(8, 1, &[("bob", 1), ("bob", 3)]),
            AppendHooks::default(),
        )
        .await;
    assert!(
        matches!(&unknown, Err(StoreError::UnknownDevice(name, 3)) if *name == bob),
        "{unknown:?}"
    );
    assert_eq!(seqs_of(&store, "bob", 1).await, [1]);
    assert_eq!(
        store.sent(&alice, MessageId([8; 16])).await.expect("sent"),
        None
    );
    store.close().await.expect("close");
}

#[tokio::test]
async fn one_full_inbox_refuses_every_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        max_pending: 2,
        ..StoreOptions::default()
    };
    let store = open_with_people(dir.path(), options).await;
    let (alice, bob) = (user("alice"), user("bob"));
    store
        .add_device(&bob, "laptop".into(), 1)
        .await
        .expect("add");
    // bob's laptop gets two messages from carol: full.
    for n in 1..=2 {
        let mut from_carol = message(n, 1, &[("bob", 2)]);
        from_carol.sender = user("carol");
        let stored = store.append(from_carol, AppendHooks::default()).await;
        assert!(matches!(stored, Ok(Appended::Stored { .. })), "{stored:?}");
    }
    let refused = store
        .append(
            message(9, 1, &[("bob", 1), ("bob", 2), ("alice", 1)]),
            AppendHooks::default(),
        )
        .await
        .expect("append");
    assert_eq!(
        refused,
        Appended::InboxFull {
            recipient: bob.clone(),
            device: 2
        }
    );
    assert!(seqs_of(&store, "bob", 1).await.is_empty());
    assert!(seqs_of(&store, "alice", 1).await.is_empty());
    assert_eq!(seqs_of(&store, "bob", 2).await, [1, 2]);
    assert_eq!(
        store.sent(&alice, MessageId([9; 16])).await.expect("sent"),
        None
    );

    // Room again: the same id is no duplicate (nothing of it was stored), and all copies go.
    let carol = user("carol");
    assert_eq!(
        store
            .remove_pending(&bob, 2, vec![1], Removal::Acknowledged)
            .await
            .expect("ack"),
        1
    );
    let _ = carol;
    let stored = store
        .append(
            message(9, 1, &[("bob", 1), ("bob", 2), ("alice", 1)]),
            AppendHooks::default(),
        )
        .await
        .expect("append");
    assert_eq!(
        stored,
        Appended::Stored {
            seqs: vec![1, 3, 1]
        }
    );
    store.close().await.expect("close");
}

#[tokio::test]
async fn the_sender_share_is_checked_per_device_inbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        sender_share: SenderShare {
            messages: 1,
            bytes: 0,
        },
        ..StoreOptions::default()
    };
    let store = open_with_people(dir.path(), options).await;
    let bob = user("bob");
    store
        .add_device(&bob, "laptop".into(), 1)
        .await
        .expect("add");
    let first = store
        .append(message(1, 1, &[("bob", 2)]), AppendHooks::default())
        .await;
    assert!(matches!(first, Ok(Appended::Stored { .. })), "{first:?}");
    let second = store
        .append(
            message(2, 1, &[("bob", 1), ("bob", 2)]),
            AppendHooks::default(),
        )
        .await
        .expect("append");
    assert_eq!(
        second,
        Appended::SenderQuota {
            recipient: bob.clone(),
            device: 2
        }
    );
    assert!(seqs_of(&store, "bob", 1).await.is_empty());
    store.close().await.expect("close");
}

#[tokio::test]
async fn unsend_removes_every_copy_and_an_ack_settles_the_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = people(dir.path()).await;
    let (alice, bob) = (user("alice"), user("bob"));
    store
        .add_device(&bob, "laptop".into(), 1)
        .await
        .expect("add");
    store
        .add_device(&alice, "laptop".into(), 1)
        .await
        .expect("add");
    let copies = [("bob", 1), ("bob", 2), ("alice", 2)];
    for n in [1, 2] {
        let stored = store
            .append(message(n, 1, &copies), AppendHooks::default())
            .await;
        assert!(matches!(stored, Ok(Appended::Stored { .. })), "{stored:?}");
    }

    // Unsend of message 1: every copy, as the server finds them through `sent`.
    let record = store
        .sent(&alice, MessageId([1; 16]))
        .await
        .expect("sent")
        .expect("pending");
    let mut removed = 0;
    for copy in &record.copies {
        removed += store
            .remove_pending(
                &copy.recipient,
                copy.device,
                vec![copy.seq],
                Removal::Unsent,
            )
            .await
            .expect("unsend");
    }
    assert_eq!(removed, 3);
    assert_eq!(
        store.sent(&alice, MessageId([1; 16])).await.expect("sent"),
        None
    );
    for (name, device) in copies {
        assert_eq!(seqs_of(&store, name, device).await, [2], "{name} {device}");
    }

    // Message 2: bob's phone acknowledges; the record is settled, the other copies stay.
    assert_eq!(
        store
            .remove_pending(&bob, 1, vec![2], Removal::Acknowledged)
            .await
            .expect("ack"),
        1
    );
    assert_eq!(
        store.sent(&alice, MessageId([2; 16])).await.expect("sent"),
        None
    );
    assert_eq!(seqs_of(&store, "bob", 2).await, [2]);
    assert_eq!(seqs_of(&store, "alice", 2).await, [2]);
    // Their acks find nothing more to settle, and are counted.
    assert_eq!(
        store
            .remove_pending(&bob, 2, vec![2], Removal::Acknowledged)
            .await
            .expect("ack"),
        1
    );
    assert_eq!(
        store
            .remove_pending(&alice, 2, vec![2], Removal::Acknowledged)
            .await
            .expect("ack"),
        1
    );
    let again = store
        .append(message(2, 1, &copies), AppendHooks::default())
        .await;
    assert_eq!(again.expect("resend"), Appended::Duplicate);
    store.close().await.expect("close");
    drop(store);

    // The same from the store after a restart (nothing in the writer's memory).
    let store = FjallStore::open(dir.path()).expect("reopen");
    for n in [3, 4] {
        let stored = store
            .append(message(n, 1, &copies), AppendHooks::default())
            .await;
        assert!(matches!(stored, Ok(Appended::Stored { .. })), "{stored:?}");
    }
    store.close().await.expect("close");
    drop(store);
    let store = FjallStore::open(dir.path()).expect("reopen");
    let seq = seqs_of(&store, "bob", 2).await[0];
    assert_eq!(
        store
            .remove_pending(&bob, 2, vec![seq], Removal::Acknowledged)
            .await
            .expect("ack"),
        1
    );
    assert_eq!(
        store.sent(&alice, MessageId([3; 16])).await.expect("sent"),
        None
    );
    assert!(
        store
            .sent(&alice, MessageId([4; 16]))
            .await
            .expect("sent")
            .is_some()
    );
    assert_eq!(seqs_of(&store, "bob", 1).await.len(), 2);
    store.close().await.expect("close");
}

#[tokio::test]
async fn bundles_hand_out_each_one_time_prekey_once_per_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(people(dir.path()).await);
    let bob = user("bob");
    assert_eq!(
        store.take_bundles(&bob, None).await.expect("take"),
        None,
        "no identity yet"
    );
    store
        .add_device(&bob, "laptop".into(), 1)
        .await
        .expect("add");
    store
        .add_device(&bob, "tablet".into(), 1)
        .await
        .expect("add");
    let identity = Bin([9; 32]);
    let count = store
        .put_keys(
            &bob,
            1,
            Some(identity),
            Some(device_keys(1)),
            one_time(0..20, 1),
        )
        .await;
    assert_eq!(count.expect("put"), 20);
    let count = store
        .put_keys(
            &bob,
            2,
            Some(identity),
            Some(device_keys(2)),
            one_time(0..10, 2),
        )
        .await;
    assert_eq!(count.expect("put"), 10);
    // Device 3 has no keys: it gets no bundle.
    assert_eq!(
        store.identity(&bob).await.expect("identity"),
        Some(identity)
    );
    assert_eq!(
        store.device_keys(&bob, 2).await.expect("keys"),
        Some(device_keys(2))
    );
    assert_eq!(store.device_keys(&bob, 3).await.expect("keys"), None);
    let unknown = store.put_keys(&bob, 7, None, None, one_time(0..1, 7)).await;
    assert!(
        matches!(unknown, Err(StoreError::UnknownDevice(_, 7))),
        "{unknown:?}"
    );

    let mut fetches = tokio::task::JoinSet::new();
    for _ in 0..25 {
        let (store, bob) = (Arc::clone(&store), bob.clone());
        fetches.spawn(async move { store.take_bundles(&bob, None).await });
    }
    let mut handed: [BTreeSet<u32>; 3] = Default::default();
    let mut last_resorts = [0; 3];
    while let Some(fetched) = fetches.join_next().await {
        let bundles = fetched.expect("task").expect("take").expect("bundles");
        assert_eq!(bundles.identity, identity);
        let devices: Vec<u32> = bundles.devices.iter().map(|d| d.device).collect();
        assert_eq!(devices, [1, 2]);
        for taken in bundles.devices {
            let at = taken.device as usize;
            assert_eq!(taken.keys, device_keys(taken.device as u8));
            match taken.one_time_prekey {
                Some(prekey) => {
                    assert_eq!(prekey.key, Bin([taken.device as u8; 32]));
                    assert!(handed[at].insert(prekey.id), "prekey {} twice", prekey.id);
                }
                None => last_resorts[at] += 1,
            }
        }
    }
    assert_eq!(handed[1].len(), 20);
    assert_eq!(handed[2].len(), 10);
    assert_eq!(last_resorts, [0, 5, 15]);
    // Asked for devices: only current ones with keys, ascending.
    let some = store
        .take_bundles(&bob, Some(vec![3, 2, 42]))
        .await
        .expect("take")
        .expect("bundles");
    let devices: Vec<u32> = some.devices.iter().map(|d| d.device).collect();
    assert_eq!(devices, [2]);
    assert_eq!(some.devices[0].remaining, 0);
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_new_identity_removes_every_other_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, bob) = (user("alice"), user("bob"));
    {
        let store = people(dir.path()).await;
        for name in ["laptop", "tablet"] {
            store.add_device(&bob, name.into(), 1).await.expect("add");
        }
        let old = Some(Bin([1; 32]));
        for device in 1..=3 {
            let put = store
                .put_keys(
                    &bob,
                    device,
                    old,
                    Some(device_keys(device as u8)),
                    one_time(0..5, 1),
                )
                .await;
            assert_eq!(put.expect("put"), 5);
            store
                .put_session(session("bob", device, device as u8))
                .await
                .expect("session");
            let stored = store
                .append(
                    message(device as u8, 1, &[("bob", device)]),
                    AppendHooks::default(),
                )
                .await;
            assert!(matches!(stored, Ok(Appended::Stored { .. })), "{stored:?}");
        }
        // The same identity again changes nothing else.
        let put = store.put_keys(&bob, 2, old, None, one_time(5..6, 1)).await;
        assert_eq!(put.expect("put"), 6);
        assert_eq!(store.devices(&bob).await.expect("devices").len(), 3);

        // Device 2 publishes a new identity: devices 1 and 3 go, and its own old prekeys.
        let new = Some(Bin([2; 32]));
        let put = store
            .put_keys(&bob, 2, new, Some(device_keys(7)), one_time(3..5, 2))
            .await;
        assert_eq!(put.expect("put"), 2);
        let ids: Vec<u32> = store
            .devices(&bob)
            .await
            .expect("devices")
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, [2]);
        assert_eq!(store.identity(&bob).await.expect("identity"), new);
        assert_eq!(store.device_keys(&bob, 1).await.expect("keys"), None);
        for digest in [[1; 32], [3; 32]] {
            assert_eq!(store.session(&digest).await.expect("session"), None);
        }
        assert!(store.session(&[2; 32]).await.expect("session").is_some());
        assert!(seqs_of(&store, "bob", 1).await.is_empty());
        assert_eq!(seqs_of(&store, "bob", 2).await, [1]);
        let refused = store
            .append(message(9, 1, &[("bob", 1)]), AppendHooks::default())
            .await;
        assert!(
            matches!(refused, Err(StoreError::UnknownDevice(_, 1))),
            "{refused:?}"
        );
        let bundles = store
            .take_bundles(&bob, None)
            .await
            .expect("take")
            .expect("bundles");
        assert_eq!(bundles.devices.len(), 1);
        assert_eq!(
            bundles.devices[0].one_time_prekey.as_ref().map(|p| p.key),
            Some(Bin([2; 32]))
        );
        let _ = alice;
        store.close().await.expect("close");
    }
    // Nothing of devices 1 and 3 is left in any keyspace.
    // bob's inbox is 2, carol's 3, the laptop's 4 (kept), the tablet's 5.
    assert_nothing_of(dir.path(), "bob", &[1, 3], &[2, 5]);
}

/// Checks that the closed store in `dir` holds nothing of `name`'s `devices`, whose inboxes
/// had the ids `inboxes`: no record, keys, one-time prekeys, sessions, inbox entries or seq
/// counter.
fn assert_nothing_of(dir: &Path, name: &str, devices: &[u32], inboxes: &[u32]) {
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

#[tokio::test]
async fn a_removed_device_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bob = user("bob");
    {
        let store = people(dir.path()).await;
        store
            .add_device(&bob, "laptop".into(), 1)
            .await
            .expect("add");
        let put = store
            .put_keys(
                &bob,
                2,
                Some(Bin([1; 32])),
                Some(device_keys(2)),
                one_time(0..50, 2),
            )
            .await;
        assert_eq!(put.expect("put"), 50);
        store
            .put_session(session("bob", 2, 2))
            .await
            .expect("session");
        store
            .put_session(session("bob", 1, 1))
            .await
            .expect("session");
        // Enough messages for a large seq counter and more than one chunk of the drop.
        let mut appends = tokio::task::JoinSet::new();
        for n in 0..5000u32 {
            let mut m = message(0, 1, &[("bob", 2), ("bob", 1)]);
            let mut id = [0; 16];
            id[..4].copy_from_slice(&n.to_be_bytes());
            m.id = MessageId(id);
            let store = store.clone();
            appends.spawn(async move { store.append(m, AppendHooks::default()).await });
        }
        while let Some(appended) = appends.join_next().await {
            let appended = appended.expect("task");
            assert!(
                matches!(appended, Ok(Appended::Stored { .. })),
                "{appended:?}"
            );
        }
        store.close().await.expect("close");
    }
    {
        let store = FjallStore::open(dir.path()).expect("reopen");
        let removed = store.remove_device(&bob, 2).await.expect("remove");
        assert_eq!(removed, Some(vec![[2; 32]]));
        assert_eq!(
            seqs_of(&store, "bob", 1).await.len(),
            1000,
            "device 1's stay"
        );
        assert!(store.session(&[1; 32]).await.expect("session").is_some());
        assert_eq!(store.device_keys(&bob, 2).await.expect("keys"), None);
        store.close().await.expect("close");
    }
    // bob is 2, carol 3: the laptop's inbox was 4.
    assert_nothing_of(dir.path(), "bob", &[2], &[4]);
    let db_keys: Vec<_> = dump(dir.path())
        .into_iter()
        .filter(|(k, key, _)| k == "devices" && key.starts_with(&2u32.to_be_bytes()))
        .map(|(_, key, _)| key)
        .collect();
    assert_eq!(
        db_keys,
        [
            [&2u32.to_be_bytes()[..], &1u32.to_be_bytes()].concat(),
            [&2u32.to_be_bytes()[..], &[0xff; 4]].concat()
        ]
    );
}

#[tokio::test]
async fn a_deleted_account_leaves_none_of_its_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bob = user("bob");
    {
        let store = people(dir.path()).await;
        store
            .add_device(&bob, "laptop".into(), 1)
            .await
            .expect("add");
        for device in [1, 2] {
            store
                .put_keys(
                    &bob,
                    device,
                    Some(Bin([1; 32])),
                    Some(device_keys(2)),
                    one_time(0..5, 2),
                )
                .await
                .expect("put");
            store
                .put_session(session("bob", device, device as u8))
                .await
                .expect("session");
            let stored = store
                .append(
                    message(device as u8, 1, &[("bob", device)]),
                    AppendHooks::default(),
                )
                .await;
            assert!(matches!(stored, Ok(Appended::Stored { .. })), "{stored:?}");
        }
        let digests = store
            .delete_user(&bob, 0)
            .await
            .expect("delete")
            .expect("an account");
        assert_eq!(digests.len(), 2);
        assert!(store.devices(&bob).await.expect("devices").is_empty());
        store.close().await.expect("close");
    }
    assert_nothing_of(dir.path(), "bob", &[1, 2], &[2, 4]);
    for (keyspace, key, _) in dump(dir.path()) {
        assert!(
            !(keyspace == "devices" && key.starts_with(&2u32.to_be_bytes())),
            "{keyspace}"
        );
        assert!(!(keyspace == "identities" && key == b"bob"), "{keyspace}");
    }
}
