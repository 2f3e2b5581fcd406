//! The blob records against a real fjall store in a temporary directory: creation with its
//! snapshot and quota, resuming, `held`, acks, settling departed devices, paging, a reopen.

use super::*;
use crate::store::{Created, Store, UserRecord};

fn name(n: &str) -> Username {
    Username::parse(n).unwrap()
}

async fn store_with(users: &[&str]) -> (tempfile::TempDir, FjallStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FjallStore::open(dir.path()).unwrap();
    for user in users {
        let record = UserRecord {
            password_hash: String::new(),
            created_at: 1,
        };
        let created = store.create_user(&name(user), record).await.unwrap();
        assert_eq!(created, Created::Created);
    }
    (dir, store)
}

fn new_blob(id: u8, owner: &str, length: u64, readers: &[&str]) -> NewBlob {
    NewBlob {
        id: BlobId([id; 16]),
        owner: name(owner),
        owner_device: 1,
        length,
        readers: readers.iter().map(|r| name(r)).collect(),
        now: 100,
    }
}

const QUOTA: BlobQuota = BlobQuota {
    bytes: 1000,
    count: 3,
};

fn created(outcome: BlobCreated) -> BlobRecord {
    match outcome {
        BlobCreated::Created(record) => record,
        other => panic!("expected a new blob, got {other:?}"),
    }
}

#[tokio::test]
async fn a_new_blob_snapshots_every_readers_device_and_the_owners_others() {
    let (_dir, store) = store_with(&["alice", "bob", "carol"]).await;
    store
        .add_device(&name("alice"), "laptop".into(), 2)
        .await
        .unwrap();
    store
        .add_device(&name("bob"), "tablet".into(), 2)
        .await
        .unwrap();
    let record = created(
        store
            .create_blob(new_blob(1, "alice", 500, &["bob", "carol"]), QUOTA)
            .await
            .unwrap(),
    );
    let devices: Vec<(String, DeviceId)> = record
        .devices
        .iter()
        .map(|d| (d.user.to_string(), d.device))
        .collect();
    assert_eq!(
        devices,
        [
            ("bob".to_owned(), 1),
            ("bob".to_owned(), 2),
            ("carol".to_owned(), 1),
            ("alice".to_owned(), 2),
        ]
    );
    assert_eq!((record.held, record.completed_at), (0, None));
    assert!(record.may_read(&name("alice")) && record.may_read(&name("carol")));
    assert!(!record.may_read(&name("dave")));
    // Read back as created.
    let read = store.blob(BlobId([1; 16])).await.unwrap();
    assert_eq!(read, Some(record));
    assert_eq!(store.blob(BlobId([9; 16])).await.unwrap(), None);
}

#[tokio::test]
async fn an_id_is_resumed_by_its_owner_with_its_length_and_taken_otherwise() {
    let (_dir, store) = store_with(&["alice", "bob"]).await;
    let first = created(
        store
            .create_blob(new_blob(1, "alice", 500, &["bob"]), QUOTA)
            .await
            .unwrap(),
    );
    store.set_blob_held(first.id, 200, 150).await.unwrap();
    // Readers of a repeated request are not looked at: the first request's stand.
    let again = store
        .create_blob(new_blob(1, "alice", 500, &[]), QUOTA)
        .await
        .unwrap();
    assert!(
        matches!(again, BlobCreated::Existing(r) if r.held == 200 && r.readers == [name("bob")])
    );
    let other_length = store.create_blob(new_blob(1, "alice", 501, &["bob"]), QUOTA);
    assert_eq!(other_length.await.unwrap(), BlobCreated::Taken);
    let other_owner = store.create_blob(new_blob(1, "bob", 500, &["alice"]), QUOTA);
    assert_eq!(other_owner.await.unwrap(), BlobCreated::Taken);
}

#[tokio::test]
async fn the_quota_counts_partial_blobs_whole_and_frees_with_deletion() {
    let (_dir, store) = store_with(&["alice", "bob"]).await;
    created(
        store
            .create_blob(new_blob(1, "alice", 600, &["bob"]), QUOTA)
            .await
            .unwrap(),
    );
    // 600 reserved (nothing held yet) + 401 > 1000.
    let over = store.create_blob(new_blob(2, "alice", 401, &["bob"]), QUOTA);
    assert_eq!(over.await.unwrap(), BlobCreated::OverQuota);
    assert_eq!(store.blob(BlobId([2; 16])).await.unwrap(), None);
    created(
        store
            .create_blob(new_blob(2, "alice", 400, &["bob"]), QUOTA)
            .await
            .unwrap(),
    );
    // Another owner has a quota of its own.
    created(
        store
            .create_blob(new_blob(3, "bob", 1000, &["alice"]), QUOTA)
            .await
            .unwrap(),
    );
    assert!(store.delete_blob(BlobId([1; 16])).await.unwrap());
    assert!(!store.delete_blob(BlobId([1; 16])).await.unwrap());
    created(
        store
            .create_blob(new_blob(4, "alice", 1, &["bob"]), QUOTA)
            .await
            .unwrap(),
    );
    created(
        store
            .create_blob(new_blob(5, "alice", 1, &["bob"]), QUOTA)
            .await
            .unwrap(),
    );
    // Three blobs (2, 4, 5) is the count.
    let fourth = store.create_blob(new_blob(6, "alice", 1, &["bob"]), QUOTA);
    assert_eq!(fourth.await.unwrap(), BlobCreated::OverQuota);
}

#[tokio::test]
async fn a_reader_without_an_account_refuses_the_blob() {
    let (_dir, store) = store_with(&["alice", "bob"]).await;
    let refused = store
        .create_blob(new_blob(1, "alice", 10, &["bob", "nobody"]), QUOTA)
        .await;
    assert!(matches!(refused, Err(StoreError::UnknownUser(n)) if n == name("nobody")));
    assert_eq!(store.blob(BlobId([1; 16])).await.unwrap(), None);
}

#[tokio::test]
async fn held_completes_the_blob_at_its_length_and_never_passes_it() {
    let (_dir, store) = store_with(&["alice", "bob"]).await;
    let id = created(
        store
            .create_blob(new_blob(1, "alice", 100, &["bob"]), QUOTA)
            .await
            .unwrap(),
    )
    .id;
    let partial = store.set_blob_held(id, 40, 200).await.unwrap().unwrap();
    assert_eq!((partial.held, partial.last_write), (40, 200));
    assert!(!partial.is_complete());
    assert!(matches!(
        store.set_blob_held(id, 101, 201).await,
        Err(StoreError::Limit(_))
    ));
    let done = store.set_blob_held(id, 100, 300).await.unwrap().unwrap();
    assert_eq!(done.completed_at, Some(300));
    assert_eq!(
        store.set_blob_held(BlobId([7; 16]), 1, 1).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn acks_from_every_snapshotted_device_leave_nothing_waiting() {
    let (_dir, store) = store_with(&["alice", "bob"]).await;
    store
        .add_device(&name("bob"), "tablet".into(), 2)
        .await
        .unwrap();
    let id = created(
        store
            .create_blob(new_blob(1, "alice", 10, &["bob"]), QUOTA)
            .await
            .unwrap(),
    )
    .id;
    let bob = name("bob");
    assert!(
        !store
            .ack_blob(id, &bob, 1)
            .await
            .unwrap()
            .unwrap()
            .all_done()
    );
    // A device that was not snapshotted changes nothing.
    let unrelated = store
        .ack_blob(id, &name("alice"), 1)
        .await
        .unwrap()
        .unwrap();
    assert!(!unrelated.all_done());
    assert!(
        store
            .ack_blob(id, &bob, 2)
            .await
            .unwrap()
            .unwrap()
            .all_done()
    );
    assert_eq!(
        store.ack_blob(BlobId([3; 16]), &bob, 1).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn removed_devices_and_deleted_accounts_count_as_done() {
    let (_dir, store) = store_with(&["alice", "bob", "carol"]).await;
    let tablet = store
        .add_device(&name("bob"), "tablet".into(), 2)
        .await
        .unwrap();
    let id = created(
        store
            .create_blob(new_blob(1, "alice", 10, &["bob", "carol"]), QUOTA)
            .await
            .unwrap(),
    )
    .id;
    let settled = store.settle_blob(id).await.unwrap().unwrap();
    assert!(settled.devices.iter().all(|d| !d.done));
    store.remove_device(&name("bob"), tablet).await.unwrap();
    store.ack_blob(id, &name("bob"), 1).await.unwrap();
    let settled = store.settle_blob(id).await.unwrap().unwrap();
    assert!(!settled.all_done(), "carol's device is still there");
    store.delete_user(&name("carol"), 0).await.unwrap();
    // Even once the name is an account again, it is another account's.
    let record = UserRecord {
        password_hash: String::new(),
        created_at: 5,
    };
    store.create_user(&name("carol"), record).await.unwrap();
    assert!(store.settle_blob(id).await.unwrap().unwrap().all_done());
}

#[tokio::test]
async fn every_blob_is_listed_in_pages_and_kept_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FjallStore::open(dir.path()).unwrap();
        for user in ["alice", "bob"] {
            let record = UserRecord {
                password_hash: String::new(),
                created_at: 1,
            };
            store.create_user(&name(user), record).await.unwrap();
        }
        let quota = BlobQuota {
            bytes: u64::MAX,
            count: 100,
        };
        for id in 0..10u8 {
            created(
                store
                    .create_blob(new_blob(id, "alice", 10, &["bob"]), quota)
                    .await
                    .unwrap(),
            );
        }
        store.set_blob_held(BlobId([3; 16]), 10, 500).await.unwrap();
        store.close().await.unwrap();
    }
    let store = FjallStore::open(dir.path()).unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.blobs_after(after, 4).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        seen.extend(page.iter().map(|r| r.id.0[0]));
    }
    assert_eq!(seen, (0..10).collect::<Vec<u8>>());
    let complete = store.blob(BlobId([3; 16])).await.unwrap().unwrap();
    assert_eq!(complete.completed_at, Some(500));
}
