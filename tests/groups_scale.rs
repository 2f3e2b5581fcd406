//! A 50-member group on the MLS delivery service: one commit adds 49 members, and each message
//! reaches every other member exactly once, in the group's order, with the test members on
//! OpenMLS (`common::mls`) decrypting it.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use common::mls::{Member, Received};
use securefastchat::protocol::Reply;

const MEMBERS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_50_member_group_reaches_all_50_exactly_once() {
    // Fifty sign-ups from one address: more than the default 20 a minute.
    let server = TestServer::start_with(|c| c.signups_per_minute = 1000).await;
    let names: Vec<String> = (0..MEMBERS).map(|i| format!("member{i:02}")).collect();
    let started = Instant::now();
    let mut members = Vec::new();
    for name in &names {
        let mut member = Member::signup(&server, name).await;
        let published = member.publish_key_packages(1).await;
        assert!(
            matches!(published, Reply::KeyPackagesPublished { .. }),
            "{published:?}"
        );
        members.push(member);
    }
    let created = members[0].create_group("crowd").await;
    assert!(matches!(created, Reply::GroupCreated { .. }), "{created:?}");
    let mut packages = Vec::new();
    for name in &names[1..] {
        packages.extend(members[0].fetch_key_packages(name).await);
    }
    assert_eq!(packages.len(), MEMBERS - 1);
    let added = members[0].add("crowd", &packages).await;
    assert!(matches!(added, Reply::Sent { .. }), "{added:?}");
    for member in &mut members[1..] {
        assert_eq!(
            member.receive().await,
            Received::Joined {
                group: "crowd".into()
            }
        );
    }
    eprintln!("50 members joined in {:?}", started.elapsed());

    // Messages from two members, interleaved: everyone else gets each once, in order.
    let mut sent = Vec::new();
    for round in 0..3 {
        for from in [0, 37] {
            let words = format!("{} says {round}", names[from]);
            let (_, reply) = members[from].send_text("crowd", &words).await;
            assert!(
                matches!(
                    reply,
                    Reply::Sent {
                        duplicate: false,
                        ..
                    }
                ),
                "{reply:?}"
            );
            sent.push((from, words));
        }
    }
    let delivering = Instant::now();
    for (me, member) in members.iter_mut().enumerate() {
        for (from, words) in sent.iter().filter(|(from, _)| *from != me) {
            assert_eq!(
                member.receive().await,
                Received::Text {
                    group: "crowd".into(),
                    from: names[*from].clone(),
                    text: words.clone(),
                },
                "member {me}"
            );
        }
        assert!(
            member.nothing_within(Duration::from_millis(100)).await,
            "member {me} got more than once"
        );
    }
    eprintln!(
        "6 messages to 50 members read and checked in {:?}",
        delivering.elapsed()
    );
    server.stop().await;
}
