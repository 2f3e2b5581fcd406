//! The store's devices on a real fjall store in a temporary directory: adding and removing
//! devices (ids never reused, also after a restart), per-device keys and bundles, and that a
//! removed device or a deleted account leaves nothing behind in any keyspace. Messages with
//! a copy per device are in `store_copies.rs`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::store::{
    assert_nothing_of, device_keys, dump, inbox_of, message, one_time, people, seqs_of, session,
    user,
};
use securefastchat::protocol::MessageId;
use securefastchat::protocol::keys::Bin;
use securefastchat::store::{
    AppendHooks, Appended, FjallStore, MAX_DEVICES, Store, StoreError, UserRecord,
};

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
