//! Appends decided on the caller's thread (see `here`): the same decisions as the writer's,
//! without waking it.

use super::*;
use crate::store::inbox_writer::SEQ_CHECKPOINT;
use crate::store::inbox_writer::counters::counter_key;

/// Appends message `n` and returns the name of the thread its `ordered` hook ran on, its seq
/// and its task.
async fn append_noting_thread(writer: &Arc<InboxWriter>, n: u8) -> (String, u64, Appending) {
    let (tx, mut rx) = unbounded_channel();
    let task = append_placing(
        writer,
        message(n),
        true,
        Box::new(move |placed: &[crate::store::Placed]| {
            let thread = std::thread::current().name().unwrap_or_default().to_owned();
            let _ = tx.send((thread, placed[0].seq));
        }),
    );
    let (thread, seq) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    (thread, seq, task)
}

/// Message `n` appended, acknowledged and settled: the writer then holds nothing and waits
/// without a deadline. Returns the thread its `ordered` hook ran on.
async fn acknowledged_and_settled(ks: &InboxKeyspaces, writer: &Arc<InboxWriter>, n: u8) -> String {
    let (thread, seq, task) = append_noting_thread(writer, n).await;
    let removed = writer.remove(BOB, vec![seq], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 1);
    task.await.unwrap().unwrap();
    // A batch (one that forgets nothing) settles it now, not at the window's end.
    writer.forget_sent(Vec::new()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    assert_eq!(
        settled_by(ks, n, deadline).await,
        Some(sent_records::settled(EXPIRES).unwrap())
    );
    idle(writer).await;
    thread
}

/// Waits until the writer thread waits for operations (the marker it wrote is visible a
/// moment before).
async fn idle(writer: &InboxWriter) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !writer.idle.load(std::sync::atomic::Ordering::Acquire) {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer stays busy"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The first message of a sender to an inbox goes through the writer (it reads what it needs
/// from the store); the next one is decided by its caller, is answered by its ack, and is
/// settled, never written. A resend of it is still a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_decided_by_its_caller_is_answered_by_its_ack_and_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let writer = start_holding(&ks, None, Duration::from_secs(2));
    let first = acknowledged_and_settled(&ks, &writer, 1).await;
    assert_eq!(
        first, "sfc-inbox-writer",
        "nothing was known of alice and bob"
    );
    let (thread, seq, task) = append_noting_thread(&writer, 2).await;
    assert_ne!(thread, "sfc-inbox-writer", "decided by the caller");
    assert!(!task.is_finished(), "held until acknowledged");
    let removed = writer.remove(BOB, vec![seq], Removal::Acknowledged).await;
    assert_eq!(removed.unwrap(), 1);
    assert_eq!(
        task.await.unwrap().unwrap(),
        Appended::Stored { seqs: vec![seq] }
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    assert_eq!(
        settled_by(&ks, 2, deadline).await,
        Some(sent_records::settled(EXPIRES).unwrap())
    );
    assert_eq!(ks.inbox.iter().count(), 0, "never written");
    let (_, again) = append(&writer, 2);
    assert_eq!(again.await.unwrap().unwrap(), Appended::Duplicate);
    // The seq is not given out again.
    assert!(stored_seq_after(&writer, 3, seq).await);
}

/// A message decided by its caller while the writer waits with nothing held wakes the writer:
/// unacknowledged, it is written when its window ends, and only then answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_decided_by_its_caller_is_written_when_its_window_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let window = Duration::from_millis(200);
    let writer = start_holding(&ks, None, window);
    acknowledged_and_settled(&ks, &writer, 1).await;
    let started = std::time::Instant::now();
    let (thread, seq, task) = append_noting_thread(&writer, 2).await;
    assert_ne!(thread, "sfc-inbox-writer");
    let answer = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("written within the window and a sync");
    assert_eq!(
        answer.unwrap().unwrap(),
        Appended::Stored { seqs: vec![seq] }
    );
    assert!(
        started.elapsed() >= window,
        "answered before its window ended"
    );
    assert_eq!(ks.inbox.iter().count(), 1);
    assert!(
        sent_records::pending_record(&record(&ks, 2).unwrap())
            .unwrap()
            .is_some()
    );
}

/// After a restart the writer knows a sender's records from the store (read once): a resend
/// of a message stored before is a duplicate, and new messages are decided by their callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_a_restart_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    let writer = start(&ks, None);
    stored(&writer, 1).await;
    drop(Arc::into_inner(writer).unwrap());
    let writer = start_holding(&ks, None, Duration::from_secs(2));
    let (_, resend) = append(&writer, 1);
    assert_eq!(resend.await.unwrap().unwrap(), Appended::Duplicate);
    acknowledged_and_settled(&ks, &writer, 2).await;
    let (thread, seq, task) = append_noting_thread(&writer, 3).await;
    assert_ne!(thread, "sfc-inbox-writer");
    writer
        .remove(BOB, vec![seq], Removal::Acknowledged)
        .await
        .unwrap();
    task.await.unwrap().unwrap();
    let (_, resend) = append(&writer, 1);
    assert_eq!(resend.await.unwrap().unwrap(), Appended::Duplicate);
    // Forgotten (expired), its id is new again.
    writer
        .forget_sent(vec![sent_key(ALICE, &[1; 16]).to_vec()])
        .await
        .unwrap();
    let (mut ordered, appending) = append(&writer, 1);
    let seq = ordered.recv().await.unwrap();
    writer
        .remove(BOB, vec![seq], Removal::Acknowledged)
        .await
        .unwrap();
    assert!(matches!(
        appending.await.unwrap().unwrap(),
        Appended::Stored { .. }
    ));
}

/// Seqs given out by callers still reach the stored counter (every [`SEQ_CHECKPOINT`]), even
/// when none of their messages is ever written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_advanced_by_callers_are_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keyspaces(dir.path());
    // A window longer than the loop: the writer sleeps through it, so every message below is
    // decided by its caller.
    let writer = start_holding(&ks, None, Duration::from_secs(60));
    acknowledged_and_settled(&ks, &writer, 1).await;
    let counter = counter_key(&Username::parse("bob").unwrap(), 1, BOB);
    let stored_next = || {
        ks.meta
            .get(&counter)
            .unwrap()
            .map(|v| u64::from_be_bytes(v[..8].try_into().unwrap()))
            .unwrap_or(0)
    };
    let before = stored_next();
    let mut n: u16 = 0;
    let mut last = 0;
    while u64::from(n) <= SEQ_CHECKPOINT {
        let mut m = message(2);
        m.message.id = MessageId({
            let mut id = [0xc0; 16];
            id[..2].copy_from_slice(&n.to_be_bytes());
            id
        });
        let (tx, mut ordered) = unbounded_channel();
        let hook = move |placed: &[crate::store::Placed]| {
            let thread = std::thread::current().name().unwrap_or_default().to_owned();
            let _ = tx.send((thread, placed[0].seq));
        };
        let appending = append_placing(&writer, m, true, Box::new(hook));
        let thread;
        (thread, last) = ordered.recv().await.unwrap();
        assert_ne!(thread, "sfc-inbox-writer", "message {n}");
        writer
            .remove(BOB, vec![last], Removal::Acknowledged)
            .await
            .unwrap();
        appending.await.unwrap().unwrap();
        n += 1;
    }
    assert_eq!(ks.inbox.iter().count(), 0, "none written");
    // The writer's next batch (here: one that forgets nothing) stores the counter.
    writer.forget_sent(Vec::new()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stored_next() < before + SEQ_CHECKPOINT && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = stored_next();
    assert!(
        after >= before + SEQ_CHECKPOINT && after <= last + 1,
        "stored {after}, from {before}, last seq {last}"
    );
}
