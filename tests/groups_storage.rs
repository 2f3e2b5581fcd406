//! How the server stores group traffic (issue 22, item 3), through the real server with MLS
//! members (`common::mls`): a message to a group of 50 is stored once, referenced from the 49
//! other member devices' inboxes, and the body goes when the last of them acknowledges it. The
//! store is opened between server runs to look at what it holds.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use common::mls::{Member, Received};
use securefastchat::protocol::Reply;
use securefastchat::store::{FjallStore, MessageFootprint, Store};
use tempfile::TempDir;

const MEMBERS: usize = 50;

/// What the stopped server's store in `dir` holds (every count checked against its
/// references).
async fn footprint(dir: &Path) -> MessageFootprint {
    let store = FjallStore::open(&dir.join("data")).expect("open the server's store");
    let footprint = store.message_footprint().await.expect("footprint");
    store.close().await.expect("close");
    assert_eq!(footprint.mismatches, 0, "{footprint:#?}");
    footprint
}

async fn server_in(dir: TempDir) -> TestServer {
    TestServer::start_in(dir, |c| {
        c.signups_per_minute = 0;
        c.bundle_fetches_per_minute = 0;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_50_members_is_stored_once_and_freed_by_the_last_ack() {
    let server = server_in(tempfile::tempdir().expect("tempdir")).await;
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("member{i:02}")).collect();
    let mut members = Vec::new();
    for name in &names {
        let mut member = Member::signup(&server, name).await;
        member.publish_key_packages(1).await;
        members.push(member);
    }
    assert!(matches!(
        members[0].create_group("fifty").await,
        Reply::GroupCreated { .. }
    ));
    let mut packages = Vec::new();
    for name in &names[1..] {
        packages.extend(members[0].fetch_key_packages(name).await);
    }
    assert!(matches!(
        members[0].add("fifty", &packages).await,
        Reply::Sent { .. }
    ));
    for member in &mut members[1..] {
        assert_eq!(
            member.receive().await,
            Received::Joined {
                group: "fifty".into()
            }
        );
    }
    let dir = server.stop().await;
    // The add's 49 welcomes were one body, acknowledged by all: nothing is left.
    let before = footprint(dir.path()).await;
    assert_eq!(
        (
            before.bodies.entries,
            before.references,
            before.inbox.entries
        ),
        (0, 0, 0),
        "{before:#?}"
    );

    // The text, with every other member offline.
    let server = server_in(dir).await;
    members[0].reconnect(&server).await;
    let (_, reply) = members[0].send_text("fifty", "hello, fifty").await;
    assert!(matches!(reply, Reply::Sent { .. }), "{reply:?}");
    let dir = server.stop().await;
    let stored = footprint(dir.path()).await;
    assert_eq!(
        (
            stored.bodies.entries,
            stored.references,
            stored.inbox.entries
        ),
        (1, 49, 49),
        "{stored:#?}"
    );
    let record = stored.bodies.value_bytes;
    let added = stored.total() - before.total();
    let per_member = stored.inbox.total() / 49;
    eprintln!(
        "one message to {MEMBERS} members: a shared record of {record} B (the body and the \
         fields the copies share) once, {} B of inbox entries ({per_member} B each), a send \
         record of {} B, {} B of count: {added} B stored",
        stored.inbox.total(),
        stored.sent.total() - before.sent.total(),
        stored.body_refs.total(),
    );
    assert!(per_member < 64, "{stored:#?}");

    // All but one take it (and acknowledge it): the body stays for the last.
    let server = server_in(dir).await;
    for member in &mut members[1..MEMBERS - 1] {
        member.reconnect(&server).await;
        assert_eq!(
            member.receive().await,
            Received::Text {
                group: "fifty".into(),
                from: "member00".into(),
                text: "hello, fifty".into(),
            }
        );
    }
    // Acks are quiet: give the last of them a moment to reach the store.
    let last = &mut members[MEMBERS - 2];
    assert!(last.nothing_within(Duration::from_millis(200)).await);
    let dir = server.stop().await;
    let left = footprint(dir.path()).await;
    assert_eq!(
        (left.bodies.entries, left.references, left.inbox.entries),
        (1, 1, 1),
        "{left:#?}"
    );

    let server = server_in(dir).await;
    let last = &mut members[MEMBERS - 1];
    last.reconnect(&server).await;
    assert!(matches!(last.receive().await, Received::Text { .. }));
    assert!(last.nothing_within(Duration::from_millis(200)).await);
    let dir = server.stop().await;
    let left = footprint(dir.path()).await;
    assert_eq!(
        (
            left.bodies.entries,
            left.body_refs.entries,
            left.inbox.entries
        ),
        (0, 0, 0),
        "{left:#?}"
    );
}

/// The figures of docs/BENCHMARKS.md ("Groups"): what one 292-byte MLS message (a 128-byte
/// text, as `sfc-bench fanout` sends) adds to the store at 10, 50 and 200 members, shared as
/// the server stores it and with a body per copy as before, with the bench's names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_stored_per_group_message_at_10_50_and_200_members() {
    let tag = "0123abcd";
    for members in [10usize, 50, 200] {
        let names: Vec<String> = (0..members).map(|i| format!("g{i}_{tag}")).collect();
        let group = format!("fan{tag}");
        let (shared, unshared) =
            securefastchat::bench::fanout::stored_bytes(&names[0], &names[1..], &group, 292)
                .await
                .expect("measure");
        eprintln!(
            "{members} members: {shared} B shared, {unshared} B with a body per copy \
             ({:.1} × less)",
            unshared as f64 / shared as f64
        );
        assert!(shared * 2 < unshared, "{shared} against {unshared}");
    }
}
