//! Opening a store written in format 1 (inbox and send records keyed by user names) moves
//! everything to format 2 (keyed by per-user ids) and loses nothing, also when an earlier
//! migration stopped half-way. The format-1 stores here are written with fjall directly, in
//! the layout the earlier server wrote (docs/ARCHITECTURE.md, "Store layout").

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use securefastchat::protocol::{MessageId, Username};
use securefastchat::store::{
    AppendHooks, Appended, FjallStore, NewMessage, Removal, SentRecord, Store, StoredMessage,
    UserRecord,
};

/// bob's pending messages from alice in the old store: more than one migration chunk.
const MESSAGES: u64 = 5_000;

fn user(name: &str) -> Username {
    Username::parse(name).expect("valid name")
}

fn id(n: u64) -> MessageId {
    let mut id = [0xa1; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    MessageId(id)
}

fn stored(n: u64, from: &str) -> StoredMessage {
    StoredMessage {
        seq: n,
        id: id(n),
        from: user(from),
        kind: "text".into(),
        sent_at: 1_000 + n,
        expires_at: u64::MAX,
        body: n.to_be_bytes().repeat(4),
    }
}

fn name_key(name: &str, suffix: &[u8]) -> Vec<u8> {
    [name.as_bytes(), &[0], suffix].concat()
}

fn keyspace(db: &Database, name: &str) -> Keyspace {
    db.keyspace(name, KeyspaceCreateOptions::default)
        .expect("keyspace")
}

/// Writes a format-1 store: accounts alice and bob; bob's inbox holds `MESSAGES` messages
/// from alice (seqs 1..), alice has their send records; "ghost", who has no account, has one
/// message in its inbox. bob's seq counter was stored at a clean stop. The messages from
/// `moved_from` on are in the old keyspaces; those before it were already moved by a
/// migration that stopped (ids alice 1, bob 2).
fn old_store(dir: &std::path::Path, moved_from: u64) {
    let db = Database::builder(dir).open().expect("open fjall");
    let (users, inbox, sent, meta) = (
        keyspace(&db, "users"),
        keyspace(&db, "inbox"),
        keyspace(&db, "sent"),
        keyspace(&db, "meta"),
    );
    for name in ["alice", "bob"] {
        let record = UserRecord {
            password_hash: "unused".into(),
            created_at: 7,
        };
        let value = rmp_serde::to_vec_named(&record).expect("encode");
        users.insert(name, value).expect("insert");
    }
    let encode_sent = |n: u64| {
        let record = SentRecord {
            recipient: user("bob"),
            seq: n,
            expires_at: u64::MAX,
        };
        rmp_serde::to_vec_named(&record).expect("encode")
    };
    if moved_from > 1 {
        let (ids, names) = (keyspace(&db, "user_ids"), keyspace(&db, "user_names"));
        let (inbox_v2, sent_v2) = (keyspace(&db, "inbox_v2"), keyspace(&db, "sent_v2"));
        for (name, n) in [("alice", 1u32), ("bob", 2)] {
            ids.insert(name, n.to_be_bytes()).expect("insert");
            names.insert(n.to_be_bytes(), name).expect("insert");
        }
        for n in 1..moved_from {
            let message = rmp_serde::to_vec_named(&stored(n, "alice")).expect("encode");
            let inbox_key = [&2u32.to_be_bytes()[..], &n.to_be_bytes()].concat();
            inbox_v2.insert(inbox_key, message).expect("insert");
            let sent_key = [&1u32.to_be_bytes()[..], &id(n).0].concat();
            sent_v2.insert(sent_key, encode_sent(n)).expect("insert");
        }
    }
    for n in moved_from..=MESSAGES {
        let message = rmp_serde::to_vec_named(&stored(n, "alice")).expect("encode");
        inbox
            .insert(name_key("bob", &n.to_be_bytes()), message)
            .expect("insert");
        sent.insert(name_key("alice", &id(n).0), encode_sent(n))
            .expect("insert");
    }
    let ghost = rmp_serde::to_vec_named(&stored(1, "alice")).expect("encode");
    inbox
        .insert(name_key("ghost", &1u64.to_be_bytes()), ghost)
        .expect("insert");
    // bob's next seq, stored in epoch 0 at a clean stop (no running marker).
    let counter = [(MESSAGES + 1).to_be_bytes(), 0u64.to_be_bytes()].concat();
    meta.insert(name_key("seq", b"bob")[..].to_vec(), counter)
        .expect("insert");
    db.persist(PersistMode::SyncAll).expect("persist");
}

/// Everything of `old_store` is readable, deduplicated and removable through the new store.
async fn check_everything_moved(dir: &std::path::Path) {
    let (alice, bob) = (user("alice"), user("bob"));
    {
        let store = FjallStore::open(dir).expect("open the old store");
        let pending = store.pending(&bob, 0, 10_000).await.expect("pending");
        let expected: Vec<StoredMessage> = (1..=MESSAGES).map(|n| stored(n, "alice")).collect();
        assert!(
            pending == expected,
            "bob's inbox differs after the migration"
        );
        let record = store.sent(&alice, id(4_321)).await.expect("sent");
        assert_eq!(
            record.map(|r| (r.recipient, r.seq)),
            Some((bob.clone(), 4_321))
        );

        // A resend of a migrated message is a duplicate; a new one follows bob's counter.
        let message = |n: u64| NewMessage {
            sender: alice.clone(),
            recipient: bob.clone(),
            id: id(n),
            kind: "text".into(),
            body: vec![1; 8],
            sent_at: 1,
            expires_at: u64::MAX,
        };
        let resend = store.append(message(17), AppendHooks::default()).await;
        assert!(matches!(resend, Ok(Appended::Duplicate)), "{resend:?}");
        let new = store
            .append(message(MESSAGES + 1), AppendHooks::default())
            .await;
        assert!(
            matches!(new, Ok(Appended::Stored { seq }) if seq == MESSAGES + 1),
            "{new:?}"
        );
        let removed = store
            .remove_pending(&bob, vec![1, 2, MESSAGES], Removal::Acknowledged)
            .await
            .expect("remove");
        assert_eq!(removed, 3);

        // The ghost's message is kept, but the ghost is no account.
        let ghost = user("ghost");
        assert_eq!(
            store.pending(&ghost, 0, 10).await.expect("pending").len(),
            1
        );
        assert_eq!(store.user_exists(&ghost).await.ok(), Some(false));
        assert_eq!(store.user_exists(&bob).await.ok(), Some(true));
    }
    // Reopened: nothing to migrate again, and the changes above stayed.
    {
        let store = FjallStore::open(dir).expect("reopen");
        let pending = store.pending(&bob, 0, 10_000).await.expect("pending");
        assert_eq!(pending.len() as u64, MESSAGES - 3 + 1);
        assert_eq!(pending.first().map(|m| m.seq), Some(3));
        assert_eq!(pending.last().map(|m| m.seq), Some(MESSAGES + 1));
    }
    // The old keyspaces are gone.
    let db = Database::builder(dir).open().expect("open fjall");
    assert!(!db.keyspace_exists("inbox"));
    assert!(!db.keyspace_exists("sent"));
}

#[tokio::test]
async fn a_format_1_store_is_migrated_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_store(dir.path(), 1);
    check_everything_moved(dir.path()).await;
}

#[tokio::test]
async fn a_migration_that_stopped_half_way_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_store(dir.path(), 2_000);
    check_everything_moved(dir.path()).await;
}

#[tokio::test]
async fn a_store_of_an_unknown_format_is_not_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = Database::builder(dir.path()).open().expect("open fjall");
        keyspace(&db, "meta")
            .insert("store-format", 3u32.to_be_bytes())
            .expect("insert");
        db.persist(PersistMode::SyncAll).expect("persist");
    }
    let refused = FjallStore::open(dir.path()).err().map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("store format 3")),
        "{refused:?}"
    );
}
