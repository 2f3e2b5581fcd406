//! The inbox writer against a real fjall store: acknowledgements count exactly what they
//! remove, whether the writer answers from what it knows or asks the store, before and after a
//! restart.

use securefastchat::protocol::{MessageId, Username};
use securefastchat::store::{
    AppendHooks, Appended, Copy, Created, FjallStore, NewMessage, Placed, Removal, Store,
    StoreError, StoreOptions, UserRecord,
};

fn user(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

fn message(n: u8) -> NewMessage {
    let mut message = between("alice", "bob", [n; 16]);
    message.copies[0].body = vec![n; 32];
    message
}

/// A message from `sender` to `recipient`'s device 1 with this id.
fn between(sender: &str, recipient: &str, id: [u8; 16]) -> NewMessage {
    NewMessage {
        sender: user(sender),
        sender_device: 1,
        to: user(recipient),
        id: MessageId(id),
        kind: "text".into(),
        copies: vec![Copy {
            recipient: user(recipient),
            device: 1,
            body: vec![1; 16],
        }],
        sent_at: 1,
        expires_at: u64::MAX,
    }
}

/// A 16-byte message id made of two numbers.
fn id_of(high: u64, low: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&high.to_be_bytes());
    id[8..].copy_from_slice(&low.to_be_bytes());
    id
}

/// Accounts for these names: both ends of a message must have one.
async fn accounts(store: &FjallStore, names: impl IntoIterator<Item = String>) {
    for name in names {
        let record = UserRecord {
            password_hash: "unused".into(),
            created_at: 0,
        };
        let created = store.create_user(&user(&name), record).await;
        assert!(
            matches!(created, Ok(Created::Created)),
            "{name}: {created:?}"
        );
    }
}

async fn people(store: &FjallStore) {
    accounts(store, ["alice", "bob", "carol", "dave"].map(String::from)).await;
}

async fn append(store: &FjallStore, n: u8) -> u64 {
    match store
        .append(message(n), AppendHooks::default())
        .await
        .expect("append")
    {
        Appended::Stored { seqs } => seqs[0],
        other => panic!("not stored: {other:?}"),
    }
}

async fn pending(store: &FjallStore) -> Vec<u64> {
    let messages = store
        .pending(&user("bob"), 1, 0, 1000)
        .await
        .expect("pending");
    messages.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn acks_remove_exactly_the_pending_messages_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bob = user("bob");
    {
        let store = FjallStore::open(dir.path()).expect("open");
        people(&store).await;
        let mut seqs = Vec::new();
        for n in 1..=6 {
            seqs.push(append(&store, n).await);
        }
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        // Out of order, a duplicate, and a seq never given out.
        let removed = store
            .remove_pending(&bob, 1, vec![4, 2, 2, 99], Removal::Acknowledged)
            .await;
        assert_eq!(removed.expect("remove"), 2);
        assert_eq!(pending(&store).await, vec![1, 3, 5, 6]);
        assert_eq!(
            store
                .remove_pending(&bob, 1, vec![1, 2, 3], Removal::Acknowledged)
                .await
                .expect("remove"),
            2
        );
        assert_eq!(
            store
                .remove_pending(&bob, 1, vec![1, 4], Removal::Acknowledged)
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
            .remove_pending(&bob, 1, vec![4, 5], Removal::Acknowledged)
            .await
            .expect("remove"),
        1
    );
    let seq = append(&store, 7).await;
    assert_eq!(seq, 7);
    assert_eq!(
        store
            .remove_pending(&bob, 1, vec![5, 6, 7, 8], Removal::Acknowledged)
            .await
            .expect("remove"),
        2
    );
    assert!(pending(&store).await.is_empty());
    for n in 8..=12 {
        append(&store, n).await;
    }
    assert_eq!(pending(&store).await, vec![8, 9, 10, 11, 12]);
    let full = store
        .append(message(13), AppendHooks::default())
        .await
        .expect("append");
    assert!(
        matches!(&full, Appended::InboxFull { recipient, device: 1 } if recipient.as_str() == "bob"),
        "{full:?}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// What a crash leaves: a copy of the data directory taken while the store runs, after bob's
/// inbox got seqs 1 to 3.
async fn crash_image_after_three_messages() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let crashed = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path()).expect("open");
    people(&store).await;
    for n in 1..=3 {
        assert_eq!(append(&store, n).await, u64::from(n));
    }
    copy_dir(dir.path(), crashed.path());
    crashed
}

/// A message may reach its recipient before its batch is synced, so a seq handed out just
/// before a crash must never be given to another message after it: a copy of the data
/// directory taken while the store runs (what a crash leaves) restarts its counters far
/// ahead. A clean stop (the test above) continues where it left off.
#[tokio::test]
async fn seqs_are_not_reused_after_an_unclean_stop() {
    let crashed = crash_image_after_three_messages().await;
    let after_crash = FjallStore::open(crashed.path()).expect("open the crash image");
    assert_eq!(pending(&after_crash).await, vec![1, 2, 3]);
    let seq = append(&after_crash, 4).await;
    assert!(
        seq > 3 + 4096,
        "seq {seq} could repeat one given out before the crash"
    );
    assert_eq!(pending(&after_crash).await, vec![1, 2, 3, seq]);
    // A second crash in a row skips further still.
    let crashed_again = tempfile::tempdir().expect("tempdir");
    copy_dir(crashed.path(), crashed_again.path());
    drop(after_crash);
    let again = FjallStore::open(crashed_again.path()).expect("open the second crash image");
    let next = append(&again, 6).await;
    assert!(
        next > seq + 4096,
        "seq {next} after a second crash, {seq} after the first"
    );
    drop(again);

    // Stopped cleanly this time: the next seq follows on.
    let reopened = FjallStore::open(crashed.path()).expect("reopen");
    assert_eq!(append(&reopened, 5).await, seq + 1);
    drop(reopened);
    let reopened = FjallStore::open(crashed_again.path()).expect("reopen");
    assert_eq!(append(&reopened, 7).await, next + 1);
}

/// An inbox that a crashed run used and the next (clean) run did not touch still skips ahead
/// when it is next used: its stored counter may be behind seqs handed out before the crash.
#[tokio::test]
async fn an_inbox_untouched_since_a_crash_still_skips_ahead() {
    let crashed = crash_image_after_three_messages().await;
    // A clean run after the crash that writes only to carol's inbox.
    let clean = FjallStore::open(crashed.path()).expect("open the crash image");
    let mut to_carol = message(9);
    to_carol.to = user("carol");
    to_carol.copies[0].recipient = user("carol");
    clean
        .append(to_carol, AppendHooks::default())
        .await
        .expect("append");
    drop(clean);

    let reopened = FjallStore::open(crashed.path()).expect("reopen");
    assert_eq!(pending(&reopened).await, vec![1, 2, 3]);
    let seq = append(&reopened, 4).await;
    assert!(
        seq > 3 + 4096,
        "seq {seq} could repeat one given out before the crash"
    );
}

/// Many inboxes written at once, each by its own task (batches of hundreds of messages for
/// hundreds of inboxes): every ack afterwards removes exactly what its inbox holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_after_wide_concurrent_batches_remove_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(FjallStore::open(dir.path()).expect("open"));
    accounts(
        &store,
        (0..512).flat_map(|w| [format!("s{w:03}"), format!("r{w:03}")]),
    )
    .await;
    let shapes = [(64u64, 16u64), (512, 4)];
    for (round, (inboxes, each)) in shapes.iter().flat_map(|s| [*s; 5]).enumerate() {
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..inboxes {
            let store = std::sync::Arc::clone(&store);
            tasks.spawn(async move {
                let (sender, recipient) = (format!("s{w:03}"), format!("r{w:03}"));
                let mut seqs = Vec::new();
                for i in 0..each {
                    let message = between(&sender, &recipient, id_of(round as u64, i));
                    let appended = store
                        .append(message, AppendHooks::default())
                        .await
                        .expect("append");
                    match appended {
                        Appended::Stored { seqs: stored } => seqs.extend(stored),
                        other => panic!("not stored: {other:?}"),
                    }
                }
                (user(&recipient), seqs)
            });
        }
        let mut written = Vec::new();
        while let Some(done) = tasks.join_next().await {
            written.push(done.expect("appender"));
        }
        // The acks too are concurrent, so they share batches.
        let mut acks = tokio::task::JoinSet::new();
        for (recipient, seqs) in written {
            let store = std::sync::Arc::clone(&store);
            acks.spawn(async move {
                let removed = store
                    .remove_pending(&recipient, 1, seqs.clone(), Removal::Acknowledged)
                    .await
                    .expect("remove");
                assert_eq!(
                    removed, each,
                    "{recipient} seqs {seqs:?} ({inboxes} inboxes)"
                );
            });
        }
        while let Some(done) = acks.join_next().await {
            done.expect("ack");
        }
    }
}

/// A message sent twice at once (a client retrying on a new connection) is stored once, also
/// while the first copy's batch is still being committed and synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_original_is_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(FjallStore::open(dir.path()).expect("open"));
    people(&store).await;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200u8 {
        for _copy in 0..2 {
            let store = std::sync::Arc::clone(&store);
            tasks.spawn(async move {
                let appended = store
                    .append(message(n), AppendHooks::default())
                    .await
                    .expect("append");
                (n, appended)
            });
        }
    }
    let mut stored = std::collections::HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (n, appended) = done.expect("task");
        match appended {
            Appended::Stored { .. } => *stored.entry(n).or_insert(0) += 1,
            Appended::Duplicate => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stored.len(), 200);
    assert!(stored.values().all(|&copies| copies == 1), "{stored:?}");
    assert_eq!(pending(&store).await.len(), 200);
}

/// Once the writer has given up tracking an inbox (more than 4,096 acks out of order), acks
/// are checked against the store: an ack that arrives while its message's batch is still
/// waiting to be committed must still remove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_uncommitted_messages_count_after_the_writer_forgets_an_inbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(FjallStore::open(dir.path()).expect("open"));
    people(&store).await;
    let new = |sender: &str, recipient: &str, n: u64| between(sender, recipient, id_of(0, n));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..4_098u64 {
        let store = std::sync::Arc::clone(&store);
        tasks.spawn(async move {
            store
                .append(new("alice", "bob", n), AppendHooks::default())
                .await
        });
    }
    let mut seqs = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.expect("task").expect("append") {
            Appended::Stored { seqs: stored } => seqs.extend(stored),
            other => panic!("{other:?}"),
        }
    }
    seqs.sort_unstable();
    // All but the first, so every removal is out of order: the writer forgets bob's inbox.
    let removed = store
        .remove_pending(&user("bob"), 1, seqs[1..].to_vec(), Removal::Acknowledged)
        .await
        .expect("remove");
    assert_eq!(removed, 4_097);

    // Keep the committer busy with syncs while bob acks each new message as soon as its seq
    // is decided, before its batch is committed.
    let busy = {
        let store = std::sync::Arc::clone(&store);
        tokio::spawn(async move {
            for n in 0..2_000u64 {
                let _ = store
                    .append(new("carol", "dave", n), AppendHooks::default())
                    .await;
            }
        })
    };
    for n in 10_000..10_100u64 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let hooks = AppendHooks {
            ordered: Some(Box::new(move |placed: &[Placed]| {
                let _ = tx.send(placed[0].seq);
            })),
            synced: None,
            hold: false,
        };
        let append = {
            let store = std::sync::Arc::clone(&store);
            tokio::spawn(async move { store.append(new("alice", "bob", n), hooks).await })
        };
        let seq = rx.await.expect("ordered");
        let removed = store
            .remove_pending(&user("bob"), 1, vec![seq], Removal::Acknowledged)
            .await
            .expect("remove");
        assert_eq!(removed, 1, "message {n}, seq {seq}");
        assert!(matches!(append.await, Ok(Ok(Appended::Stored { .. }))));
    }
    busy.abort();
    assert_eq!(pending(&store).await, vec![seqs[0]]);
}

/// Both ends of a message must have accounts; nothing is stored otherwise.
#[tokio::test]
async fn a_message_without_an_account_at_either_end_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path()).expect("open");
    accounts(&store, ["alice".to_string()]).await;
    for (sender, recipient) in [("alice", "nobody"), ("nobody", "alice")] {
        let refused = store
            .append(between(sender, recipient, [1; 16]), AppendHooks::default())
            .await;
        assert!(
            matches!(&refused, Err(StoreError::UnknownUser(name)) if name.as_str() == "nobody"),
            "{refused:?}"
        );
    }
    for name in ["alice", "nobody"] {
        let pending = store.pending(&user(name), 1, 0, 10).await.expect("pending");
        assert!(pending.is_empty(), "{name}: {pending:?}");
    }
    assert_eq!(store.user_exists(&user("nobody")).await.ok(), Some(false));
    assert_eq!(store.user_exists(&user("alice")).await.ok(), Some(true));
}

/// Expired messages leave their inboxes and expired send records go; the rest stay.
#[tokio::test]
async fn purging_removes_exactly_what_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path()).expect("open");
    people(&store).await;
    let expiring = |sender: &str, recipient: &str, n: u8, expires_at: u64| NewMessage {
        expires_at,
        ..between(sender, recipient, [n; 16])
    };
    for (sender, recipient, n, expires_at) in [
        ("alice", "bob", 1, 50),
        ("alice", "bob", 2, 500),
        ("carol", "bob", 3, 50),
        ("alice", "dave", 4, 50),
        ("dave", "carol", 5, 500),
    ] {
        let appended = store
            .append(
                expiring(sender, recipient, n, expires_at),
                AppendHooks::default(),
            )
            .await;
        assert!(
            matches!(appended, Ok(Appended::Stored { .. })),
            "{appended:?}"
        );
    }
    assert_eq!(store.purge_expired_messages(100).await.expect("purge"), 3);
    let ids = |name: &str| {
        let store = &store;
        let name = user(name);
        async move {
            let pending = store.pending(&name, 1, 0, 10).await.expect("pending");
            pending.iter().map(|m| m.id.0[0]).collect::<Vec<_>>()
        }
    };
    assert_eq!(ids("bob").await, vec![2]);
    assert_eq!(ids("dave").await, Vec::<u8>::new());
    assert_eq!(ids("carol").await, vec![5]);
    for (sender, n, kept) in [
        ("alice", 1, false),
        ("carol", 3, false),
        ("alice", 2, true),
        ("dave", 5, true),
    ] {
        let record = store
            .sent(&user(sender), MessageId([n; 16]))
            .await
            .expect("sent");
        assert_eq!(record.is_some(), kept, "send record {n} of {sender}");
    }
    // Nothing more to purge.
    assert_eq!(store.purge_expired_messages(100).await.expect("purge"), 0);
}
