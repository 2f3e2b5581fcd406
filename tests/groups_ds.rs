//! The MLS delivery service (docs/PROTOCOL.md 5.7) against a real server, with test members
//! on OpenMLS (`common::mls`): key packages, a group of three talking, membership and admin
//! rights enforced by the server, racing commits, leaving, and an offline member catching up.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestServer;
use common::mls::{Member, Received, failure};
use common::raw::Raw;
use securefastchat::protocol::{ErrorCode, MessageId, Reply, Request};

const QUIET: Duration = Duration::from_millis(300);

/// `alice` creates `group` and adds the others (each with key packages published).
async fn group_of(server: &TestServer, group: &str, names: &[&str]) -> Vec<Member> {
    let mut members = Vec::new();
    for name in names {
        let mut member = Member::signup(server, name).await;
        let published = member.publish_key_packages(3).await;
        assert!(
            matches!(
                published,
                Reply::KeyPackagesPublished {
                    key_packages: 3,
                    last_resort: true
                }
            ),
            "{published:?}"
        );
        members.push(member);
    }
    let created = members[0].create_group(group).await;
    assert!(
        matches!(&created, Reply::GroupCreated { group: g, epoch: 0 } if g == group),
        "{created:?}"
    );
    let mut packages = Vec::new();
    for name in &names[1..] {
        packages.extend(members[0].fetch_key_packages(name).await);
    }
    if !packages.is_empty() {
        let added = members[0].add(group, &packages).await;
        assert!(matches!(added, Reply::Sent { .. }), "{added:?}");
        for member in &mut members[1..] {
            assert_eq!(
                member.receive().await,
                Received::Joined {
                    group: group.into()
                }
            );
        }
    }
    members
}

fn text(group: &str, from: &str, text: &str) -> Received {
    Received::Text {
        group: group.into(),
        from: from.into(),
        text: text.into(),
    }
}

#[tokio::test]
async fn key_packages_are_handed_out_once_then_the_last_resort_and_bad_ones_are_refused() {
    let server = TestServer::start().await;
    let mut bob = Member::signup(&server, "bob").await;
    assert!(matches!(
        bob.publish_key_packages(5).await,
        Reply::KeyPackagesPublished {
            key_packages: 5,
            last_resort: true
        }
    ));
    // Eight fetchers at once: five distinct one-time packages, then the last-resort one.
    let mut fetchers = Vec::new();
    for i in 0..8 {
        let mut raw = Raw::signed_up(&server, &format!("fetcher{i}")).await;
        fetchers.push(tokio::spawn(async move {
            let request = Request::FetchKeyPackages {
                username: "bob".into(),
                devices: None,
            };
            match raw.call(3, request).await {
                Reply::KeyPackages { mut devices, .. } => devices.remove(0),
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut one_time = HashSet::new();
    let mut last_resort = 0;
    for fetcher in fetchers {
        let package = fetcher.await.unwrap();
        assert_eq!(package.device, 1);
        if package.last_resort {
            last_resort += 1;
        } else {
            assert!(one_time.insert(package.key_package), "handed out twice");
        }
    }
    assert_eq!((one_time.len(), last_resort), (5, 3));
    // Bob was told each time he was low.
    match bob.raw.event().await {
        Reply::KeyPackagesLow { remaining } => assert!(remaining < 10),
        other => panic!("{other:?}"),
    }

    // Refused: a certification by another identity, a last-resort package among the one-time
    // ones, another device's identity, garbage; nothing of such a request is stored.
    let stranger =
        openmls_basic_credential::SignatureKeyPair::new(openmls::prelude::SignatureScheme::ED25519)
            .unwrap();
    let tbs =
        securefastchat::protocol::groups::certification_tbs("bob", 1, bob.signer.public()).unwrap();
    use openmls_traits::signatures::Signer as _;
    let forged = bob.key_package_with(false, stranger.sign(&tbs).unwrap());
    let good = bob.key_package(false);
    let cases = [
        vec![good.clone(), forged],
        vec![bob.key_package(true)],
        vec![vec![1, 2, 3]],
    ];
    for key_packages in cases {
        let reply = bob
            .call(Request::PublishKeyPackages {
                key_packages: key_packages
                    .into_iter()
                    .map(serde_bytes::ByteBuf::from)
                    .collect(),
                last_resort: None,
            })
            .await;
        assert!(
            matches!(
                reply,
                Reply::Error {
                    code: ErrorCode::InvalidKeys,
                    ..
                }
            ),
            "{reply:?}"
        );
    }
    let mut carol = Member::signup(&server, "carol").await;
    let bobs = bob.key_package(false);
    let reply = carol
        .call(Request::PublishKeyPackages {
            key_packages: vec![serde_bytes::ByteBuf::from(bobs)],
            last_resort: None,
        })
        .await;
    assert!(
        matches!(
            reply,
            Reply::Error {
                code: ErrorCode::InvalidKeys,
                ..
            }
        ),
        "{reply:?}"
    );
    // Still only the last resort for bob.
    let fetched = carol.fetch_key_packages("bob").await;
    assert!(fetched[0].last_resort());
    server.stop().await;
}

#[tokio::test]
async fn a_group_of_three_talks_and_everyone_gets_each_message_once_in_order() {
    let server = TestServer::start().await;
    let mut m = group_of(&server, "friends", &["alice", "bob", "carol"]).await;
    let mut sent = Vec::new();
    for round in 0..4 {
        for (i, member) in m.iter_mut().enumerate() {
            let words = format!("{} says {round}", member.name);
            let (_, reply) = member.send_text("friends", &words).await;
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
            sent.push((i, words));
        }
    }
    for (me, member) in m.iter_mut().enumerate() {
        for (from, words) in sent.iter().filter(|(from, _)| *from != me) {
            let from = ["alice", "bob", "carol"][*from];
            assert_eq!(member.receive().await, text("friends", from, words));
        }
        assert!(
            member.nothing_within(QUIET).await,
            "{} got more",
            member.name
        );
    }
    // The DS's view and each member's list.
    let reply = m[1]
        .call(Request::GroupInfo {
            group: "Friends".into(),
        })
        .await;
    let Reply::Group(info) = reply else {
        panic!("{reply:?}");
    };
    assert_eq!((info.group.as_str(), info.epoch), ("friends", 1));
    assert_eq!(info.admins, vec!["alice".to_owned()]);
    let members: Vec<(String, u32)> = info
        .members
        .iter()
        .map(|m| (m.username.clone(), m.leaf))
        .collect();
    assert_eq!(
        members,
        vec![("alice".into(), 0), ("bob".into(), 1), ("carol".into(), 2)]
    );
    match m[2].call(Request::ListGroups).await {
        Reply::Groups { groups } => assert_eq!(groups.len(), 1),
        other => panic!("{other:?}"),
    }
    // Names are global: taken once, by the rules of usernames.
    assert!(matches!(
        m[1].create_group("friends").await,
        Reply::Error {
            code: ErrorCode::GroupExists,
            ..
        }
    ));
    assert!(matches!(
        m[1].create_group("x").await,
        Reply::Error {
            code: ErrorCode::InvalidGroupName,
            ..
        }
    ));
    server.stop().await;
}

#[tokio::test]
async fn a_non_member_cannot_post_and_nothing_reaches_anyone() {
    let server = TestServer::start().await;
    let mut m = group_of(&server, "friends", &["alice", "bob"]).await;
    let mut dave = Member::signup(&server, "dave").await;
    // Dave has no state of the group; whatever he sends is refused before it is read.
    let reply = dave
        .send_raw("friends", MessageId::random().unwrap(), &[0u8; 200], None)
        .await;
    assert_eq!(failure(&reply), (ErrorCode::NotMember, None));
    let reply = dave
        .send_raw(
            "nosuchgroup",
            MessageId::random().unwrap(),
            &[0u8; 20],
            None,
        )
        .await;
    assert_eq!(failure(&reply), (ErrorCode::UnknownGroup, None));
    let info = dave
        .call(Request::GroupInfo {
            group: "friends".into(),
        })
        .await;
    assert!(
        matches!(
            info,
            Reply::Error {
                code: ErrorCode::NotMember,
                ..
            }
        ),
        "{info:?}"
    );
    // A member's bytes replayed by a non-member are refused too.
    let message = m[0].seal("friends", "mine");
    let reply = dave
        .send_raw("friends", MessageId::random().unwrap(), &message, None)
        .await;
    assert_eq!(failure(&reply), (ErrorCode::NotMember, None));
    for member in m.iter_mut() {
        assert!(member.nothing_within(QUIET).await);
    }
    server.stop().await;
}

#[tokio::test]
async fn only_admins_add_and_remove_others_and_a_removed_member_is_cut_off() {
    let server = TestServer::start().await;
    let mut m = group_of(&server, "club", &["alice", "bob"]).await;
    let mut carol = Member::signup(&server, "carol").await;
    carol.publish_key_packages(2).await;
    // Bob is not an admin: he may neither add carol nor remove alice.
    let carols = m[1].fetch_key_packages("carol").await;
    let reply = m[1].add("club", &carols).await;
    assert_eq!(failure(&reply), (ErrorCode::NotAdmin, None));
    let alice_leaves = m[1].leaves_of("club", "alice");
    let reply = m[1].remove("club", &alice_leaves).await;
    assert_eq!(failure(&reply), (ErrorCode::NotAdmin, None));
    // Nor make himself an admin.
    let extensions = openmls::prelude::Extensions::from_vec(vec![
        common::mls::required_capabilities(),
        common::mls::admins_extension(&["alice", "bob"]),
    ])
    .unwrap();
    let (commit, _, _) = m[1].with_group("club", |g, provider, signer| {
        g.update_group_context_extensions(provider, extensions, signer)
            .unwrap()
    });
    let reply = m[1].send_commit("club", commit, None).await;
    assert_eq!(failure(&reply), (ErrorCode::NotAdmin, None));
    // Anyone may update their keys.
    assert!(matches!(m[1].update("club").await, Reply::Sent { .. }));
    assert_eq!(
        m[0].receive().await,
        Received::Commit {
            group: "club".into(),
            epoch: 2
        }
    );

    // Alice adds carol, then removes bob.
    let carols = m[0].fetch_key_packages("carol").await;
    assert!(matches!(
        m[0].add("club", &carols).await,
        Reply::Sent { .. }
    ));
    assert_eq!(
        carol.receive().await,
        Received::Joined {
            group: "club".into()
        }
    );
    assert_eq!(
        m[1].receive().await,
        Received::Commit {
            group: "club".into(),
            epoch: 3
        }
    );
    let bob_leaves = m[0].leaves_of("club", "bob");
    assert!(matches!(
        m[0].remove("club", &bob_leaves).await,
        Reply::Sent { .. }
    ));
    assert_eq!(
        m[1].receive().await,
        Received::Removed {
            group: "club".into()
        }
    );
    assert_eq!(
        carol.receive().await,
        Received::Commit {
            group: "club".into(),
            epoch: 4
        }
    );

    // After the removal: bob may not post, gets nothing, and cannot read what follows.
    let secret = m[0].seal("club", "after bob");
    let reply = m[0]
        .send_raw("club", MessageId::random().unwrap(), &secret, None)
        .await;
    assert!(matches!(reply, Reply::Sent { .. }), "{reply:?}");
    assert_eq!(carol.receive().await, text("club", "alice", "after bob"));
    assert!(m[1].nothing_within(QUIET).await);
    assert!(m[1].try_open("club", &secret).is_err());
    let (_, reply) = (
        (),
        m[1].send_raw("club", MessageId::random().unwrap(), &secret, None)
            .await,
    );
    assert_eq!(failure(&reply), (ErrorCode::NotMember, None));
    server.stop().await;
}

#[tokio::test]
async fn of_two_commits_at_one_epoch_one_wins_and_the_other_lands_later() {
    let server = TestServer::start().await;
    let m = group_of(&server, "race", &["alice", "bob", "carol"]).await;
    let [mut alice, mut bob, mut carol] = <[Member; 3]>::try_from(m).ok().unwrap();
    assert_eq!(alice.epoch("race"), 1);
    let (a, b) = tokio::join!(alice.update("race"), bob.update("race"));
    let (winner, loser, mut won, mut lost) = match (&a, &b) {
        (Reply::Sent { .. }, _) => (a, b, alice, bob),
        (_, Reply::Sent { .. }) => (b, a, bob, alice),
        _ => panic!("neither won: {a:?} {b:?}"),
    };
    assert!(matches!(winner, Reply::Sent { .. }));
    assert_eq!(failure(&loser), (ErrorCode::StaleEpoch, Some(2)));
    // The loser catches up from its inbox and tries again.
    assert_eq!(
        lost.receive().await,
        Received::Commit {
            group: "race".into(),
            epoch: 2
        }
    );
    assert!(matches!(lost.update("race").await, Reply::Sent { .. }));
    assert_eq!(
        won.receive().await,
        Received::Commit {
            group: "race".into(),
            epoch: 3
        }
    );
    assert_eq!(
        carol.receive().await,
        Received::Commit {
            group: "race".into(),
            epoch: 2
        }
    );
    assert_eq!(
        carol.receive().await,
        Received::Commit {
            group: "race".into(),
            epoch: 3
        }
    );
    assert_eq!((won.epoch("race"), lost.epoch("race")), (3, 3));
    // A commit sent again under its id after it won is answered as a duplicate, not stale.
    let commit = won.with_group("race", |g, provider, signer| {
        let bundle = g
            .self_update(
                provider,
                signer,
                openmls::prelude::LeafNodeParameters::default(),
            )
            .unwrap();
        bundle.into_contents().0.to_bytes().unwrap()
    });
    let id = MessageId::random().unwrap();
    let first = won.send_raw("race", id, &commit, None).await;
    assert!(
        matches!(
            first,
            Reply::Sent {
                duplicate: false,
                ..
            }
        ),
        "{first:?}"
    );
    won.with_group("race", |g, provider, _| {
        g.merge_pending_commit(provider).unwrap()
    });
    let again = won.send_raw("race", id, &commit, None).await;
    assert!(
        matches!(
            again,
            Reply::Sent {
                duplicate: true,
                ..
            }
        ),
        "{again:?}"
    );
    assert_eq!(
        lost.receive().await,
        Received::Commit {
            group: "race".into(),
            epoch: 4
        }
    );
    assert_eq!(
        carol.receive().await,
        Received::Commit {
            group: "race".into(),
            epoch: 4
        }
    );
    let (_, reply) = won.send_text("race", "still here").await;
    assert!(matches!(reply, Reply::Sent { .. }));
    assert_eq!(lost.receive().await, text("race", &won.name, "still here"));
    assert_eq!(carol.receive().await, text("race", &won.name, "still here"));
    server.stop().await;
}

#[tokio::test]
async fn leaving_stops_delivery_at_once_and_any_member_commits_the_removal() {
    let server = TestServer::start().await;
    let mut m = group_of(&server, "book", &["alice", "bob", "carol"]).await;
    let left = m[2]
        .call(Request::LeaveGroup {
            group: "book".into(),
        })
        .await;
    assert!(
        matches!(&left, Reply::GroupLeft { group } if group == "book"),
        "{left:?}"
    );
    for member in &mut m[..2] {
        assert_eq!(
            member.receive().await,
            Received::Left {
                group: "book".into(),
                user: "carol".into()
            }
        );
    }
    // Before anyone commits the removal, carol already gets nothing and may not post.
    let (_, reply) = m[0].send_text("book", "carol is gone").await;
    assert!(matches!(reply, Reply::Sent { .. }));
    assert_eq!(m[1].receive().await, text("book", "alice", "carol is gone"));
    assert!(m[2].nothing_within(QUIET).await);
    let (_, reply) = m[2].send_text("book", "wait").await;
    assert_eq!(failure(&reply), (ErrorCode::NotMember, None));
    // Bob is no admin, but may remove a user who left.
    let carols = m[1].leaves_of("book", "carol");
    assert!(matches!(
        m[1].remove("book", &carols).await,
        Reply::Sent { .. }
    ));
    assert_eq!(
        m[0].receive().await,
        Received::Commit {
            group: "book".into(),
            epoch: 2
        }
    );
    assert!(m[2].nothing_within(QUIET).await);
    let info = m[0]
        .call(Request::GroupInfo {
            group: "book".into(),
        })
        .await;
    let Reply::Group(info) = info else {
        panic!("{info:?}")
    };
    assert!(info.pending_leaves.is_empty());
    assert_eq!(info.members.len(), 2);
    // The last ones leave: the name is free again.
    for member in &mut m[..2] {
        let reply = member
            .call(Request::LeaveGroup {
                group: "book".into(),
            })
            .await;
        assert!(matches!(reply, Reply::GroupLeft { .. }), "{reply:?}");
    }
    let mut dave = Member::signup(&server, "dave").await;
    assert!(matches!(
        dave.create_group("book").await,
        Reply::GroupCreated { .. }
    ));
    server.stop().await;
}

#[tokio::test]
async fn an_offline_member_gets_commits_and_messages_in_order_after_login() {
    let server = TestServer::start().await;
    let mut m = group_of(&server, "night", &["alice", "bob", "carol"]).await;
    // Bob goes away (after a reply: his quiet acks were processed).
    assert_eq!(m[1].call(Request::Ping).await, Reply::Pong);
    m[1].raw.conn.close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, reply) = m[0].send_text("night", "one").await;
    assert!(matches!(reply, Reply::Sent { .. }));
    assert!(matches!(m[2].update("night").await, Reply::Sent { .. }));
    let (_, reply) = m[0].send_text("night", "two").await;
    assert!(matches!(reply, Reply::Sent { .. }));
    let (_, reply) = m[2].send_text("night", "three").await;
    assert!(matches!(reply, Reply::Sent { .. }));
    assert_eq!(
        m[0].receive().await,
        Received::Commit {
            group: "night".into(),
            epoch: 2
        }
    );
    assert_eq!(m[0].receive().await, text("night", "carol", "three"));
    // Bob comes back and catches up, in the group's order.
    m[1].reconnect(&server).await;
    assert_eq!(m[1].receive().await, text("night", "alice", "one"));
    assert_eq!(
        m[1].receive().await,
        Received::Commit {
            group: "night".into(),
            epoch: 2
        }
    );
    assert_eq!(m[1].receive().await, text("night", "alice", "two"));
    assert_eq!(m[1].receive().await, text("night", "carol", "three"));
    assert_eq!(
        (
            m[0].epoch("night"),
            m[1].epoch("night"),
            m[2].epoch("night")
        ),
        (2, 2, 2)
    );
    server.stop().await;
}
