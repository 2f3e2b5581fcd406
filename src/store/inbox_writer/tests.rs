//! The inbox writer on a real fjall database in a temporary directory: settling a send record
//! from memory writes what settling it from the store writes, and an ack that overtakes its
//! message's commit does not hold up the writer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fjall::KeyspaceCreateOptions;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::{Addressed, InboxKeyspaces, InboxWriter};
use crate::protocol::{MessageId, Username};
use crate::store::sender_shares::SenderShare;
use crate::store::sent_records;
use crate::store::user_ids::{UserId, sent_key};
use crate::store::{AppendHooks, Appended, Durability, NewMessage, Removal};

const ALICE: UserId = 1;
const BOB: UserId = 2;
const EXPIRES: u64 = 4_000_000_000;

fn keyspaces(dir: &std::path::Path) -> InboxKeyspaces {
    let db = fjall::Database::builder(dir).open().unwrap();
    let open = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).unwrap();
    let user_ids = open("user_ids");
    user_ids.insert("alice", ALICE.to_be_bytes()).unwrap();
    user_ids.insert("bob", BOB.to_be_bytes()).unwrap();
    InboxKeyspaces {
        inbox: open("inbox_v2"),
        sent: open("sent_v2"),
        meta: open("meta"),
        bodies: open("bodies"),
        body_refs: open("body_refs"),
        user_ids,
        db,
    }
}

fn start(ks: &InboxKeyspaces, hold: Option<Arc<Mutex<()>>>) -> Arc<InboxWriter> {
    start_holding(ks, hold, Duration::ZERO)
}

/// [`start`], holding messages for `window` before they are written.
fn start_holding(
    ks: &InboxKeyspaces,
    hold: Option<Arc<Mutex<()>>>,
    window: Duration,
) -> Arc<InboxWriter> {
    let writer = InboxWriter::start_held(
        ks.clone(),
        Durability::Buffered,
        (1000, 1024, window),
        Arc::new(|_| {}),
        SenderShare::UNLIMITED,
        hold,
    )
    .unwrap();
    Arc::new(writer)
}

/// A message from alice to bob with id `[n; 16]`.
fn message(n: u8) -> Addressed {
    Addressed {
        message: NewMessage {
            sender: Username::parse("alice").unwrap(),
            sender_device: 1,
            to: Username::parse("bob").unwrap(),
            id: MessageId([n; 16]),
            kind: "text".into(),
            copies: vec![crate::store::Copy {
                recipient: Username::parse("bob").unwrap(),
                device: 1,
                body: vec![n; 100],
            }],
            sent_at: 1,
            expires_at: EXPIRES,
        },
        sender: ALICE,
        targets: vec![super::Target {
            user: BOB,
            inbox: BOB,
        }],
    }
}

type Appending = tokio::task::JoinHandle<Result<Appended, crate::store::StoreError>>;

/// Appends message `n` in a task of its own; the receiver gets its seq once it is ordered
/// (before its batch is committed).
fn append(writer: &Arc<InboxWriter>, n: u8) -> (UnboundedReceiver<u64>, Appending) {
    let (tx, rx) = unbounded_channel();
    let task = append_placing(
        writer,
        message(n),
        true,
        Box::new(move |placed: &[crate::store::Placed]| {
            for copy in placed {
                let _ = tx.send(copy.seq);
            }
        }),
    );
    (rx, task)
}

/// Appends `addressed` in a task of its own, held if `hold` allows it; the receiver gets its
/// copies' seqs once it is ordered.
fn append_copies(
    writer: &Arc<InboxWriter>,
    addressed: Addressed,
    hold: bool,
) -> (UnboundedReceiver<Vec<u64>>, Appending) {
    let (tx, rx) = unbounded_channel();
    let task = append_placing(
        writer,
        addressed,
        hold,
        Box::new(move |placed: &[crate::store::Placed]| {
            let _ = tx.send(placed.iter().map(|p| p.seq).collect::<Vec<_>>());
        }),
    );
    (rx, task)
}

fn append_placing(
    writer: &Arc<InboxWriter>,
    addressed: Addressed,
    hold: bool,
    ordered: crate::store::PlacedHook,
) -> Appending {
    let hooks = AppendHooks {
        ordered: Some(ordered),
        synced: None,
        hold,
    };
    let writer = Arc::clone(writer);
    tokio::spawn(async move { writer.append(addressed, hooks).await })
}

async fn stored(writer: &Arc<InboxWriter>, n: u8) -> u64 {
    let (_, task) = append(writer, n);
    match task.await.unwrap().unwrap() {
        Appended::Stored { seqs } => seqs[0],
        other => panic!("not stored: {other:?}"),
    }
}

fn record(ks: &InboxKeyspaces, n: u8) -> Option<Vec<u8>> {
    let value = ks.sent.get(sent_key(ALICE, &[n; 16])).unwrap();
    value.map(|bytes| bytes.to_vec())
}

/// Waits until message `n`'s send record is the settled marker, or `deadline`; returns the
/// record then.
async fn settled_by(ks: &InboxKeyspaces, n: u8, deadline: std::time::Instant) -> Option<Vec<u8>> {
    let settled = sent_records::settled(EXPIRES).unwrap();
    while record(ks, n).as_ref() != Some(&settled) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    record(ks, n)
}

/// Both ways of settling (the origin remembered from the append, or read back from the inbox
/// entry and `user_ids`) write the same marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_from_memory_writes_the_marker_settling_from_the_store_writes() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    // Message 1 is appended by a writer that then stops: the next one knows nothing of it.
    let writer = start(&ks, None);
    let old = stored(&writer, 1).await;
    drop(writer);
    let writer = start(&ks, None);
    let recent = stored(&writer, 2).await;
    assert!(
        sent_records::pending_record(&record(&ks, 2).unwrap())
            .unwrap()
            .is_some()
    );

    let removed = writer.remove(BOB, vec![old], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 1);
    let from_store = record(&ks, 1).unwrap();

    // Without alice's id in `user_ids` the store path could not settle message 2 at all:
    // from memory it needs no read.
    ks.user_ids.remove("alice").unwrap();
    let removed = writer
        .remove(BOB, vec![recent], Removal::Acknowledged)
        .await;
    assert_eq!(removed.unwrap(), 1);
    let from_memory = record(&ks, 2).unwrap();

    assert_eq!(from_memory, from_store);
    assert_eq!(from_memory, sent_records::settled(EXPIRES).unwrap());
    assert_eq!(sent_records::pending_record(&from_memory).unwrap(), None);
    assert_eq!(sent_records::expires_at(&from_memory).unwrap(), EXPIRES);
    assert_eq!(ks.inbox.iter().count(), 0);
    // Still a duplicate until it expires.
    let (_, task) = append(&writer, 2);
    assert_eq!(task.await.unwrap().unwrap(), Appended::Duplicate);
}

/// Delivery does not wait for the commit, so an ack often comes before its message's batch
/// is committed. Settling it from the store meant waiting for that commit, and the writer
/// ordered nothing meanwhile; from memory it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::await_holding_lock,
    reason = "the committer thread blocks on the hold while the test awaits the writer"
)]
async fn an_ack_that_overtakes_its_commit_does_not_hold_up_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let hold = Arc::new(Mutex::new(()));
    let writer = start(&ks, Some(Arc::clone(&hold)));
    let wait = Duration::from_secs(3);

    let held = hold.lock().unwrap();
    let (mut ordered, first) = append(&writer, 1);
    let seq = tokio::time::timeout(wait, ordered.recv())
        .await
        .unwrap()
        .unwrap();
    let ack = {
        let writer = Arc::clone(&writer);
        tokio::spawn(async move { writer.remove(BOB, vec![seq], Removal::Acknowledged).await })
    };
    // The ack is queued before the next message; the writer must order that message while
    // the first one's batch is still not committed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (mut ordered, second) = append(&writer, 2);
    let next = tokio::time::timeout(wait, ordered.recv()).await;
    assert!(
        matches!(next, Ok(Some(_))),
        "the writer stalled behind an ack waiting for its message's commit"
    );
    assert!(!first.is_finished(), "nothing was committed meanwhile");

    drop(held);
    assert!(matches!(
        first.await.unwrap().unwrap(),
        Appended::Stored { .. }
    ));
    assert_eq!(ack.await.unwrap().unwrap(), 1);
    assert!(matches!(
        second.await.unwrap().unwrap(),
        Appended::Stored { .. }
    ));
    assert_eq!(
        record(&ks, 1).unwrap(),
        sent_records::settled(EXPIRES).unwrap()
    );
    assert!(
        sent_records::pending_record(&record(&ks, 2).unwrap())
            .unwrap()
            .is_some()
    );
}

/// A message of three copies with one 300-byte body, to bob's inboxes `BOB`, 10 and 11.
fn shared_message(n: u8) -> Addressed {
    let mut addressed = message(n);
    addressed.message.copies = (1..=3)
        .map(|device| crate::store::Copy {
            recipient: Username::parse("bob").unwrap(),
            device,
            body: vec![n; 300],
        })
        .collect();
    addressed.targets = [BOB, 10, 11]
        .into_iter()
        .map(|inbox| super::Target { user: BOB, inbox })
        .collect();
    addressed
}

/// The stored count of the body of the message whose first copy is `first` in inbox `BOB`.
fn count(ks: &InboxKeyspaces, first: u64) -> Option<u32> {
    let key = crate::store::shared_bodies::body_key(BOB, first);
    ks.body_refs
        .get(key)
        .unwrap()
        .map(|v| u32::from_be_bytes(v.as_ref().try_into().unwrap()))
}

/// Acks built into batches while the append (and each other) are still uncommitted lower
/// the count from what those batches wrote, not from the store (which shows none of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::await_holding_lock,
    reason = "the committer thread blocks on the hold while the test awaits the writer"
)]
async fn acks_of_uncommitted_batches_count_a_shared_body_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let hold = Arc::new(Mutex::new(()));
    let writer = start(&ks, Some(Arc::clone(&hold)));
    let wait = Duration::from_secs(3);

    let held = hold.lock().unwrap();
    let (mut ordered, appending) = append_copies(&writer, shared_message(1), false);
    let seqs = tokio::time::timeout(wait, ordered.recv())
        .await
        .unwrap()
        .unwrap();
    // Two acks, each queued after the last was built into a batch: three batches in flight.
    let mut acks = Vec::new();
    for (inbox, seq) in [(10, seqs[1]), (BOB, seqs[0])] {
        let writer = Arc::clone(&writer);
        acks.push(tokio::spawn(async move {
            writer.remove(inbox, vec![seq], Removal::Acknowledged).await
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(count(&ks, seqs[0]).is_none(), "nothing committed yet");
    drop(held);
    assert!(matches!(
        appending.await.unwrap().unwrap(),
        Appended::Stored { .. }
    ));
    for ack in acks {
        assert_eq!(ack.await.unwrap().unwrap(), 1);
    }
    assert_eq!(count(&ks, seqs[0]), Some(1));
    let key = crate::store::shared_bodies::body_key(BOB, seqs[0]);
    let record = ks.bodies.get(key).unwrap().unwrap();
    let record: crate::store::shared_bodies::SharedBody = rmp_serde::from_slice(&record).unwrap();
    assert_eq!(
        (record.id, record.body),
        (MessageId([1; 16]), vec![1u8; 300])
    );

    // The last one, once everything is committed: from the store.
    let removed = writer
        .remove(11, vec![seqs[2]], Removal::Acknowledged)
        .await;
    assert_eq!(removed.unwrap(), 1);
    assert_eq!(count(&ks, seqs[0]), None);
    assert!(
        ks.bodies.get(key).unwrap().is_none(),
        "freed with its last reference"
    );
    assert_eq!(ks.inbox.iter().count(), 0);
    // A second ack of the same copy changes nothing.
    let removed = writer
        .remove(11, vec![seqs[2]], Removal::Acknowledged)
        .await;
    assert_eq!(removed.unwrap(), 0);
}

/// A message whose copy is acknowledged while it is held is never written: no entry, no
/// tombstone. Its append is answered by the ack itself, which does not go through the
/// writer's queue; the writer settles its send record (the settled marker) within the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acknowledged_while_held_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let window = Duration::from_secs(2);
    let writer = start_holding(&ks, None, window);
    let wait = Duration::from_secs(5);
    let (mut ordered, appending) = append(&writer, 1);
    let seq = tokio::time::timeout(wait, ordered.recv())
        .await
        .unwrap()
        .unwrap();
    let held_at = std::time::Instant::now();
    assert!(
        !appending.is_finished(),
        "held: neither written nor acknowledged"
    );
    assert!(record(&ks, 1).is_none());
    let removed = writer.remove(BOB, vec![seq], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 1);
    let stored = tokio::time::timeout(wait, appending).await.unwrap();
    assert_eq!(
        stored.unwrap().unwrap(),
        Appended::Stored { seqs: vec![seq] }
    );
    // The writer was not woken: it settles the message with its next batch, or at the end
    // of the window.
    if held_at.elapsed() < window {
        assert!(
            record(&ks, 1).is_none(),
            "settled by the writer, not by the ack"
        );
    }
    // Still a duplicate, and a second ack finds nothing.
    let (_, again) = append(&writer, 1);
    assert_eq!(again.await.unwrap().unwrap(), Appended::Duplicate);
    let removed = writer.remove(BOB, vec![seq], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 0);
    assert_eq!(
        settled_by(&ks, 1, held_at + window + wait).await,
        Some(sent_records::settled(EXPIRES).unwrap())
    );
    assert_eq!(ks.inbox.iter().count(), 0, "never written");
    // The seq is not given out again.
    assert!(stored_seq_after(&writer, 2, seq).await);
}

/// A message acknowledged while held with nothing else for the writer to do is settled when
/// the window ends: the writer wakes for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_message_is_settled_when_the_window_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let window = Duration::from_millis(300);
    let writer = start_holding(&ks, None, window);
    let (mut ordered, appending) = append(&writer, 1);
    let seq = ordered.recv().await.unwrap();
    let removed = writer.remove(BOB, vec![seq], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 1);
    appending.await.unwrap().unwrap();
    let deadline = std::time::Instant::now() + window + Duration::from_secs(5);
    assert_eq!(
        settled_by(&ks, 1, deadline).await,
        Some(sent_records::settled(EXPIRES).unwrap())
    );
    assert_eq!(ks.inbox.iter().count(), 0, "never written");
}

async fn stored_seq_after(writer: &Arc<InboxWriter>, n: u8, after: u64) -> bool {
    let (mut ordered, appending) = append(writer, n);
    let seq = ordered.recv().await.unwrap();
    let removed = writer.remove(BOB, vec![seq], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 1);
    appending.await.unwrap().unwrap();
    seq > after
}

/// A message nobody acknowledges is written once its window ends, and only then answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_is_written_when_its_window_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let window = Duration::from_millis(200);
    let writer = start_holding(&ks, None, window);
    let started = std::time::Instant::now();
    let seq = stored(&writer, 1).await;
    assert!(
        started.elapsed() >= window,
        "answered before its window ended"
    );
    assert_eq!(ks.inbox.iter().count(), 1);
    assert!(
        sent_records::pending_record(&record(&ks, 1).unwrap())
            .unwrap()
            .is_some()
    );
    // Acknowledged now, from the store as usual.
    let removed = writer.remove(BOB, vec![seq], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 1);
    assert_eq!(ks.inbox.iter().count(), 0);
}

/// A message of two copies with one acknowledged while held: the other copy is written with
/// the settled marker (not a record naming the acknowledged copy); a resend meanwhile is
/// answered only once the message is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_acknowledged_message_writes_the_rest_and_a_resend_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let window = Duration::from_millis(300);
    let writer = start_holding(&ks, None, window);
    let mut two = message(1);
    two.message.copies.push(crate::store::Copy {
        recipient: Username::parse("bob").unwrap(),
        device: 2,
        body: vec![2; 100],
    });
    two.targets.push(super::Target {
        user: BOB,
        inbox: 10,
    });
    let started = std::time::Instant::now();
    let (mut ordered, appending) = append_copies(&writer, two, true);
    let seqs = ordered.recv().await.unwrap();
    let removed = writer
        .remove(BOB, vec![seqs[0]], Removal::Acknowledged)
        .await;
    assert_eq!(removed.unwrap(), 1);
    let resend = {
        let writer = Arc::clone(&writer);
        let hooks = AppendHooks {
            hold: true,
            ..AppendHooks::default()
        };
        tokio::spawn(async move { writer.append(message(1), hooks).await })
    };
    assert!(matches!(
        appending.await.unwrap().unwrap(),
        Appended::Stored { .. }
    ));
    assert_eq!(resend.await.unwrap().unwrap(), Appended::Duplicate);
    assert!(
        started.elapsed() >= window,
        "answered before the copy left was written"
    );
    let keys: Vec<Vec<u8>> = ks.inbox.iter().map(|e| e.key().unwrap().to_vec()).collect();
    assert_eq!(
        keys,
        vec![crate::store::user_ids::inbox_key(10, seqs[1]).to_vec()],
        "only the copy not acknowledged"
    );
    assert_eq!(
        record(&ks, 1).unwrap(),
        sent_records::settled(EXPIRES).unwrap()
    );
    let removed = writer
        .remove(10, vec![seqs[1]], Removal::Acknowledged)
        .await;
    assert_eq!(removed.unwrap(), 1);
    assert_eq!(ks.inbox.iter().count(), 0);
}

/// A message that cannot be held (its copies share a body) is written only after the older
/// messages held for the same inbox: the store never shows an inbox's later message without
/// the earlier ones, which a deliverer reading it would skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_written_at_once_goes_after_what_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let writer = start_holding(&ks, None, Duration::from_secs(60));
    let (mut ordered, held) = append(&writer, 1);
    let first = ordered.recv().await.unwrap();
    assert!(!held.is_finished());
    let shared = writer
        .append(shared_message(2), AppendHooks::default())
        .await
        .unwrap();
    let Appended::Stored { seqs } = shared else {
        panic!("not stored: {shared:?}");
    };
    assert!(seqs[0] > first);
    let in_bob: Vec<u64> = ks
        .inbox
        .prefix(BOB.to_be_bytes())
        .map(|e| crate::store::user_ids::inbox_seq(&e.key().unwrap()))
        .collect();
    assert_eq!(
        in_bob,
        vec![first, seqs[0]],
        "the held one was written first"
    );
    let written = tokio::time::timeout(Duration::from_secs(5), held).await;
    assert_eq!(
        written.unwrap().unwrap().unwrap(),
        Appended::Stored { seqs: vec![first] }
    );
}

mod here;
