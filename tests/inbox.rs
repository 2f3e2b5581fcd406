//! The inbox writer against a real fjall store: acknowledgements count exactly what they
//! remove, whether the writer answers from what it knows or asks the store, before and after a
//! restart.

use securefastchat::protocol::{MessageId, Username};
use securefastchat::store::{Appended, FjallStore, NewMessage, Store, StoreOptions};

fn user(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

fn message(n: u8) -> NewMessage {
    NewMessage {
        sender: user("alice"),
        recipient: user("bob"),
        id: MessageId([n; 16]),
        kind: "text".into(),
        body: vec![n; 32],
        sent_at: 1,
        expires_at: u64::MAX,
    }
}

async fn append(store: &FjallStore, n: u8) -> u64 {
    match store.append(message(n)).await.expect("append") {
        Appended::Stored { seq } => seq,
        other => panic!("not stored: {other:?}"),
    }
}

async fn pending(store: &FjallStore) -> Vec<u64> {
    let messages = store.pending(&user("bob"), 0, 1000).await.expect("pending");
    messages.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn acks_remove_exactly_the_pending_messages_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bob = user("bob");
    {
        let store = FjallStore::open(dir.path()).expect("open");
        let mut seqs = Vec::new();
        for n in 1..=6 {
            seqs.push(append(&store, n).await);
        }
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        // Out of order, a duplicate, and a seq never given out.
        let removed = store.remove_pending(&bob, vec![4, 2, 2, 99]).await;
        assert_eq!(removed.expect("remove"), 2);
        assert_eq!(pending(&store).await, vec![1, 3, 5, 6]);
        assert_eq!(
            store
                .remove_pending(&bob, vec![1, 2, 3])
                .await
                .expect("remove"),
            2
        );
        assert_eq!(
            store
                .remove_pending(&bob, vec![1, 4])
                .await
                .expect("remove"),
            0
        );
        assert_eq!(pending(&store).await, vec![5, 6]);
    }
    // A new writer knows nothing of the old messages and asks the store. A quota of 5 shows
    // that the pending counter followed every removal.
    let options = StoreOptions {
        max_pending: 5,
        ..StoreOptions::default()
    };
    let store = FjallStore::open_with(dir.path(), options).expect("reopen");
    assert_eq!(pending(&store).await, vec![5, 6]);
    assert_eq!(
        store
            .remove_pending(&bob, vec![4, 5])
            .await
            .expect("remove"),
        1
    );
    let seq = append(&store, 7).await;
    assert_eq!(seq, 7);
    assert_eq!(
        store
            .remove_pending(&bob, vec![5, 6, 7, 8])
            .await
            .expect("remove"),
        2
    );
    assert!(pending(&store).await.is_empty());
    for n in 8..=12 {
        append(&store, n).await;
    }
    assert_eq!(pending(&store).await, vec![8, 9, 10, 11, 12]);
    let full = store.append(message(13)).await.expect("append");
    assert!(matches!(full, Appended::InboxFull), "{full:?}");
}
