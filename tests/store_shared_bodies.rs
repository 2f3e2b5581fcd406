//! Shared bodies on a real fjall store in a temporary directory: the copies of a message that
//! carry the same bytes (group traffic) store one body, referenced from each copy's inbox
//! entry, which every inbox reads back; the body goes exactly when its last reference goes
//! (acks in any order, unsend, expiry, a removed device's or deleted account's inbox), with the
//! store reopened between the steps; duplicates are still found; quotas count the body per
//! inbox; a store of format 3 opens unchanged. `shared_bodies_survive_sigkill` kills a process
//! that appends and acknowledges with SIGKILL, again and again, and checks every count after
//! each restart.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::store::{open_with_people, people, user};
use securefastchat::protocol::MessageId;
use securefastchat::store::{
    AppendHooks, Appended, Copy, FjallStore, MessageFootprint, NewMessage, Removal, SenderShare,
    Store, StoreOptions,
};

const BODY: usize = 300;

/// The copies: (name, device).
const MEMBERS: [(&str, u32); 3] = [("bob", 1), ("bob", 2), ("carol", 1)];

/// A group message from alice with id `[n; 16]`: one body of [`BODY`] bytes of `n` for every
/// (name, device) of `to`.
fn group_message(n: u8, to: &[(&str, u32)], expires_at: u64) -> NewMessage {
    NewMessage {
        sender: user("alice"),
        sender_device: 1,
        to: user("alice"),
        id: MessageId([n; 16]),
        kind: "mls\0friends".into(),
        copies: to
            .iter()
            .map(|(name, device)| Copy {
                recipient: user(name),
                device: *device,
                body: vec![n; BODY],
            })
            .collect(),
        sent_at: 1,
        expires_at,
    }
}

async fn stored(store: &FjallStore, message: NewMessage) -> Vec<u64> {
    match store.append(message, AppendHooks::default()).await {
        Ok(Appended::Stored { seqs }) => seqs,
        other => panic!("not stored: {other:?}"),
    }
}

async fn footprint(store: &FjallStore) -> MessageFootprint {
    let footprint = store.message_footprint().await.expect("footprint");
    assert_eq!(footprint.mismatches, 0, "{footprint:#?}");
    footprint
}

/// alice, bob (devices 1 and 2) and carol.
async fn group(dir: &Path) -> FjallStore {
    let store = people(dir).await;
    let device = store
        .add_device(&user("bob"), "laptop".into(), 5)
        .await
        .expect("add a device");
    assert_eq!(device, 2);
    store
}

async fn reopen(store: FjallStore, dir: &Path) -> FjallStore {
    drop(store);
    FjallStore::open(dir).expect("reopen")
}

/// The pending bodies of `name`'s `device`, by message id byte.
async fn bodies_of(store: &FjallStore, name: &str, device: u32) -> Vec<(u8, Vec<u8>)> {
    let pending = store.pending(&user(name), device, 0, 100).await;
    pending
        .expect("pending")
        .into_iter()
        .map(|m| (m.id.0[0], m.body))
        .collect()
}

#[tokio::test]
async fn a_shared_message_is_stored_once_and_read_from_every_inbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = group(dir.path()).await;
    let seqs = stored(&store, group_message(7, &MEMBERS, u64::MAX)).await;
    assert_eq!(seqs.len(), 3);
    let shared = footprint(&store).await;
    assert_eq!((shared.bodies.entries, shared.references), (1, 3));
    assert!(
        shared.bodies.value_bytes > BODY as u64,
        "the body and the common fields"
    );
    assert_eq!(shared.body_refs.entries, 1);

    // The same message with a body per copy (a one-to-one message's kind of copies) is
    // stored inline, as every message was before shared bodies.
    let mut inline = group_message(8, &MEMBERS, u64::MAX);
    for (at, copy) in inline.copies.iter_mut().enumerate() {
        copy.body[0] = at as u8;
    }
    stored(&store, inline).await;
    let both = footprint(&store).await;
    assert_eq!((both.bodies.entries, both.references), (1, 3));
    let inline_bytes = both.total() - shared.total();
    eprintln!(
        "3 copies of {BODY} B: shared {} B, inline {inline_bytes} B",
        shared.total()
    );
    assert!(
        shared.total() + (BODY as u64) < inline_bytes,
        "{shared:#?} against {inline_bytes}"
    );

    let store = reopen(store, dir.path()).await;
    for (name, device) in MEMBERS {
        let bodies = bodies_of(&store, name, device).await;
        assert_eq!(bodies.len(), 2, "{name} {device}");
        assert_eq!(bodies[0], (7, vec![7; BODY]));
        assert_eq!(bodies[1].0, 8);
    }
    // A resent id is a duplicate, and stores nothing.
    let again = store
        .append(group_message(7, &MEMBERS, u64::MAX), AppendHooks::default())
        .await;
    assert_eq!(again.expect("append"), Appended::Duplicate);
    assert_eq!(footprint(&store).await, both);
}

/// Every order of the three acks, the store reopened after each: the body is there until the
/// last ack and gone with it, and the count is exact at every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_goes_with_the_last_ack_in_any_order() {
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for order in orders {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = group(dir.path()).await;
        let seqs = stored(&store, group_message(1, &MEMBERS, u64::MAX)).await;
        for (step, at) in order.into_iter().enumerate() {
            let (name, device) = MEMBERS[at];
            let removed = store
                .remove_pending(&user(name), device, vec![seqs[at]], Removal::Acknowledged)
                .await;
            assert_eq!(removed.expect("ack"), 1);
            // Acks are made durable by the next synced write: a flush stands for it.
            store.flush().await.expect("flush");
            store = reopen(store, dir.path()).await;
            let left = footprint(&store).await;
            let last = step == 2;
            assert_eq!(
                (left.bodies.entries, left.references),
                if last { (0, 0) } else { (1, 2 - step as u64) },
                "{order:?} after {step}"
            );
            for (other, (name, device)) in MEMBERS.into_iter().enumerate() {
                let acked = order[..=step].contains(&other);
                let bodies = bodies_of(&store, name, device).await;
                let expected = if acked {
                    vec![]
                } else {
                    vec![(1, vec![1; BODY])]
                };
                assert_eq!(bodies, expected, "{order:?} after {step}: {name} {device}");
            }
        }
        assert_eq!(footprint(&store).await.body_refs.entries, 0);
    }
}

#[tokio::test]
async fn unsend_and_expiry_free_the_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = group(dir.path()).await;
    // Unsend, copy by copy as the server does from the send record.
    stored(&store, group_message(1, &MEMBERS, u64::MAX)).await;
    let record = store.sent(&user("alice"), MessageId([1; 16])).await;
    let record = record.expect("sent").expect("pending");
    assert_eq!(record.copies.len(), 3);
    for (done, copy) in record.copies.iter().enumerate() {
        let removed = store
            .remove_pending(
                &copy.recipient,
                copy.device,
                vec![copy.seq],
                Removal::Unsent,
            )
            .await;
        assert_eq!(removed.expect("unsend"), 1);
        let left = footprint(&store).await;
        assert_eq!(left.references, 2 - done as u64);
        assert_eq!(left.bodies.entries, u64::from(done < 2));
    }

    // Expiry: two messages expire, a third does not.
    stored(&store, group_message(2, &MEMBERS, 100)).await;
    stored(&store, group_message(3, &MEMBERS[1..], 100)).await;
    stored(&store, group_message(4, &MEMBERS, 1_000)).await;
    assert_eq!(footprint(&store).await.bodies.entries, 3);
    let purged = store.purge_expired_messages(500).await.expect("purge");
    assert_eq!(purged, 5);
    let store = reopen(store, dir.path()).await;
    let left = footprint(&store).await;
    assert_eq!((left.bodies.entries, left.references), (1, 3));
    for (name, device) in MEMBERS {
        assert_eq!(
            bodies_of(&store, name, device).await,
            vec![(4, vec![4; BODY])]
        );
    }
    store.purge_expired_messages(2_000).await.expect("purge");
    let left = footprint(&store).await;
    assert_eq!(
        (
            left.bodies.entries,
            left.body_refs.entries,
            left.inbox.entries
        ),
        (0, 0, 0)
    );
}

/// A removed device's inbox and a deleted account's inboxes release their references: the
/// body stays for the others, and goes with the last.
#[tokio::test]
async fn dropped_inboxes_release_their_references() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = group(dir.path()).await;
    let seqs = stored(&store, group_message(1, &MEMBERS, u64::MAX)).await;
    stored(&store, group_message(2, &MEMBERS[1..], u64::MAX)).await;

    let removed = store.remove_device(&user("bob"), 2).await.expect("remove");
    assert!(removed.is_some());
    let store = reopen(store, dir.path()).await;
    let left = footprint(&store).await;
    assert_eq!((left.bodies.entries, left.references), (2, 3));

    // carol's account goes: message 2 had no other reference left.
    let deleted = store.delete_user(&user("carol"), 0).await.expect("delete");
    assert!(deleted.is_some());
    let store = reopen(store, dir.path()).await;
    let left = footprint(&store).await;
    assert_eq!((left.bodies.entries, left.references), (1, 1));
    assert_eq!(bodies_of(&store, "bob", 1).await, vec![(1, vec![1; BODY])]);

    let removed = store
        .remove_pending(&user("bob"), 1, vec![seqs[0]], Removal::Acknowledged)
        .await;
    assert_eq!(removed.expect("ack"), 1);
    let left = footprint(&store).await;
    assert_eq!((left.bodies.entries, left.body_refs.entries), (0, 0));
}

/// A commit's copies share its body, and its welcomes (one for each added device) share
/// theirs: two bodies, and a copy with bytes of its own stays inline.
#[tokio::test]
async fn each_set_of_equal_bodies_is_shared_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = group(dir.path()).await;
    let mut message = group_message(1, &MEMBERS, u64::MAX);
    message.copies[1].body = vec![9; BODY];
    message.copies.push(Copy {
        recipient: user("alice"),
        device: 1,
        body: vec![9; BODY],
    });
    message.copies.push(Copy {
        recipient: user("carol"),
        device: 1,
        body: vec![1; BODY],
    });
    let refused = store.append(message.clone(), AppendHooks::default()).await;
    assert!(refused.is_err(), "two copies for carol's device 1");
    message.copies.pop();
    stored(&store, group_message(5, &[("bob", 1)], u64::MAX)).await;
    stored(&store, message).await;
    let left = footprint(&store).await;
    assert_eq!((left.bodies.entries, left.references), (2, 4));
    assert_eq!(bodies_of(&store, "bob", 2).await, vec![(1, vec![9; BODY])]);
    assert_eq!(
        bodies_of(&store, "alice", 1).await,
        vec![(1, vec![9; BODY])]
    );
    assert_eq!(
        bodies_of(&store, "bob", 1).await,
        vec![(5, vec![5; BODY]), (1, vec![1; BODY])]
    );
}

/// A shared body counts its whole length toward the sender's share of every inbox that
/// references it, also when the shares are counted again from the store after a restart.
#[tokio::test]
async fn a_shared_body_counts_in_each_inbox_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions {
        sender_share: SenderShare {
            messages: 0,
            bytes: 3 * BODY as u64,
        },
        ..StoreOptions::default()
    };
    let to = [("bob", 1), ("carol", 1)];
    let store = open_with_people(dir.path(), options).await;
    for n in 1..=3 {
        stored(&store, group_message(n, &to, u64::MAX)).await;
    }
    let refused = store
        .append(group_message(4, &to, u64::MAX), AppendHooks::default())
        .await;
    assert!(
        matches!(refused, Ok(Appended::SenderQuota { .. })),
        "{refused:?}"
    );
    drop(store);
    let store = FjallStore::open_with(dir.path(), options).expect("reopen");
    let refused = store
        .append(group_message(4, &to, u64::MAX), AppendHooks::default())
        .await;
    assert!(
        matches!(refused, Ok(Appended::SenderQuota { .. })),
        "counted from the store: {refused:?}"
    );
    // Room in carol's inbox is not room in bob's.
    let seq = store
        .pending(&user("carol"), 1, 0, 1)
        .await
        .expect("pending")[0]
        .seq;
    let removed = store
        .remove_pending(&user("carol"), 1, vec![seq], Removal::Acknowledged)
        .await;
    assert_eq!(removed.expect("ack"), 1);
    let refused = store
        .append(group_message(4, &to, u64::MAX), AppendHooks::default())
        .await;
    assert!(
        matches!(refused, Ok(Appended::SenderQuota { .. })),
        "{refused:?}"
    );
    let seq = store.pending(&user("bob"), 1, 0, 1).await.expect("pending")[0].seq;
    let removed = store
        .remove_pending(&user("bob"), 1, vec![seq], Removal::Acknowledged)
        .await;
    assert_eq!(removed.expect("ack"), 1);
    stored(&store, group_message(4, &to, u64::MAX)).await;
    let left = footprint(&store).await;
    assert_eq!((left.bodies.entries, left.references), (3, 6));
}

/// A store of format 3 (from before shared bodies) opens: its entries read unchanged, and it
/// is format 4 from then on.
#[tokio::test]
async fn a_format_3_store_opens_and_reads_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = people(dir.path()).await;
    let mut message = group_message(1, &[("bob", 1), ("carol", 1)], u64::MAX);
    message.copies[1].body[0] = 0;
    stored(&store, message).await;
    store.close().await.expect("close");
    drop(store);
    {
        let db = fjall::Database::builder(dir.path())
            .open()
            .expect("open fjall");
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .expect("meta");
        meta.insert("store-format", 3u32.to_be_bytes())
            .expect("write");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }
    let store = FjallStore::open(dir.path()).expect("open a format-3 store");
    assert_eq!(bodies_of(&store, "bob", 1).await, vec![(1, vec![1; BODY])]);
    let mut first = vec![1; BODY];
    first[0] = 0;
    assert_eq!(bodies_of(&store, "carol", 1).await, vec![(1, first)]);
    drop(store);
    let db = fjall::Database::builder(dir.path())
        .open()
        .expect("open fjall");
    let meta = db
        .keyspace("meta", fjall::KeyspaceCreateOptions::default)
        .expect("meta");
    let format = meta.get("store-format").expect("read");
    assert_eq!(format.as_deref(), Some(&4u32.to_be_bytes()[..]));
}

// ---------------------------------------------------------------------------------------
// Killed with SIGKILL.

/// The child's data directory.
const CHILD_DIR: &str = "SFC_SHARED_BODIES_CHILD_DIR";
/// Members of the child's group.
const CHILD_MEMBERS: usize = 6;

fn member(i: usize) -> String {
    format!("member{i}")
}

/// Run as a child by [`shared_bodies_survive_sigkill`]: appends group messages of
/// [`CHILD_MEMBERS`] copies and acknowledges them in a shuffled order, without end, until it
/// is killed. Prints `stored N` once message N is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child by shared_bodies_survive_sigkill"]
async fn shared_bodies_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let store = FjallStore::open(Path::new(&dir)).expect("open");
    for name in std::iter::once("alice".to_owned()).chain((0..CHILD_MEMBERS).map(member)) {
        let record = securefastchat::store::UserRecord {
            password_hash: "unused".into(),
            created_at: 1,
        };
        store
            .create_user(&user(&name), record)
            .await
            .expect("create");
    }
    let names: Vec<String> = (0..CHILD_MEMBERS).map(member).collect();
    let to: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    let mut rng = std::process::id() as u64 | 1;
    let mut next = |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };
    loop {
        // A fresh id each time: the process id and a counter.
        let mut message = group_message(0, &to, u64::MAX);
        message.id = MessageId::random().expect("id");
        let n = message.id.0[0];
        for copy in &mut message.copies {
            copy.body = vec![n; BODY];
        }
        stored(&store, message).await;
        println!("stored");
        // Acknowledge some of what is pending, a member at a time.
        for name in &names {
            let pending = store
                .pending(&user(name), 1, 0, 100)
                .await
                .expect("pending");
            let seqs: Vec<u64> = pending
                .iter()
                .filter(|_| next(3) == 0)
                .map(|m| m.seq)
                .collect();
            if !seqs.is_empty() {
                store
                    .remove_pending(&user(name), 1, seqs, Removal::Acknowledged)
                    .await
                    .expect("ack");
            }
        }
    }
}

/// A process appending and acknowledging shared messages is killed with SIGKILL at random
/// moments; after each kill the store opens, every count equals its references, and every
/// pending entry reads its body. At the end, acknowledging everything leaves no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bodies_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rounds = std::env::var("SFC_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4u64);
    let mut total_stored = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().expect("this test binary"))
            .args(["shared_bodies_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the child");
        let stdout = child.stdout.take().expect("stdout");
        // Killed after a number of stored messages that differs per round (and at a moment
        // inside whatever it does next).
        let wanted = 20 + 15 * round;
        let mut seen = 0;
        for line in BufReader::new(stdout).lines() {
            if line.expect("read the child").starts_with("stored") {
                seen += 1;
            }
            if seen >= wanted {
                std::thread::sleep(Duration::from_millis(round * 3));
                child.kill().expect("kill the child");
                break;
            }
        }
        let status = child.wait().expect("wait for the child");
        assert!(!status.success(), "the child ended by itself");
        total_stored += seen;

        let store = FjallStore::open(dir.path()).expect("open after the kill");
        let left = footprint(&store).await;
        assert!(left.references <= left.inbox.entries);
        for i in 0..CHILD_MEMBERS {
            let name = member(i);
            for message in store
                .pending(&user(&name), 1, 0, 10_000)
                .await
                .expect("pending")
            {
                assert_eq!(message.body, vec![message.id.0[0]; BODY], "{name}");
            }
        }
        eprintln!(
            "round {round}: {seen} stored, {} bodies and {} references left",
            left.bodies.entries, left.references
        );
        store.close().await.expect("close");
    }
    assert!(total_stored > 0);
    let store = FjallStore::open(dir.path()).expect("open");
    for i in 0..CHILD_MEMBERS {
        let name = user(&member(i));
        let pending = store.pending(&name, 1, 0, 100_000).await.expect("pending");
        let seqs = pending.iter().map(|m| m.seq).collect();
        store
            .remove_pending(&name, 1, seqs, Removal::Acknowledged)
            .await
            .expect("ack");
    }
    let left = footprint(&store).await;
    assert_eq!(
        (
            left.inbox.entries,
            left.bodies.entries,
            left.body_refs.entries
        ),
        (0, 0, 0)
    );
}

/// Acks of one message from several devices at once, which the writer folds into one batch:
/// the count is right however many of them one batch holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acks_count_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = group(dir.path()).await;
    let all = [("alice", 1), ("bob", 1), ("bob", 2), ("carol", 1)];
    for round in 0..20u8 {
        let seqs = stored(&store, group_message(round, &all, u64::MAX)).await;
        // All but the last of them, at once (a different one kept each round).
        let kept = usize::from(round) % all.len();
        let mut acks = Vec::new();
        for (at, ((name, device), seq)) in all.into_iter().zip(seqs).enumerate() {
            if at == kept {
                continue;
            }
            let store = store.clone();
            acks.push(tokio::spawn(async move {
                store
                    .remove_pending(&user(name), device, vec![seq], Removal::Acknowledged)
                    .await
            }));
        }
        for ack in acks {
            assert_eq!(ack.await.expect("task").expect("ack"), 1);
        }
        let left = footprint(&store).await;
        assert_eq!(
            (left.bodies.entries, left.references),
            (u64::from(round) + 1, u64::from(round) + 1)
        );
    }
    let store = reopen(store, dir.path()).await;
    for (name, device) in [("alice", 1), ("bob", 1), ("bob", 2), ("carol", 1)] {
        let pending = store
            .pending(&user(name), device, 0, 100)
            .await
            .expect("pending");
        for message in &pending {
            assert_eq!(message.body, vec![message.id.0[0]; BODY]);
        }
        let seqs = pending.iter().map(|m| m.seq).collect();
        store
            .remove_pending(&user(name), device, seqs, Removal::Acknowledged)
            .await
            .expect("ack");
    }
    let left = footprint(&store).await;
    assert_eq!((left.bodies.entries, left.body_refs.entries), (0, 0));
}
