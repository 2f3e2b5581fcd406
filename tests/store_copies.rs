//! Messages with a copy per device on a real fjall store in a temporary directory: every
//! copy stored in one piece or none (a full inbox or a used-up share of any copy refuses the
//! whole message), duplicates, the copies' places handed to the hooks, unsend of every copy,
//! and the send record settled by the first acknowledged copy.

mod common;

use std::sync::{Arc, Mutex};

use common::store::{message, open_with_people, people, seqs_of, user};
use securefastchat::protocol::MessageId;
use securefastchat::store::{
    AppendHooks, Appended, FjallStore, Placed, Removal, SenderShare, Store, StoreError,
    StoreOptions,
};

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
        hold: false,
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
