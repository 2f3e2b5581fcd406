//! The key packages' life cycle with a clock that jumps: ended private keys pruned, the
//! bound on how many a state holds, the last-resort key package rotated when it ages, and a
//! welcome for a pruned key package refused with a typed error.

use openmls::prelude::Lifetime;

use super::*;

const DAY: u64 = 24 * 3600;

fn server(one_time: u32, last_resort: bool) -> ServerKeyPackages {
    ServerKeyPackages {
        one_time,
        last_resort,
    }
}

#[test]
fn a_new_device_publishes_the_target_and_a_last_resort_then_nothing_until_due() {
    let bob = Dev::new("bob", 1);
    let now = crate::unix_now();
    let batch = bob
        .mls
        .refresh_key_packages(now, server(0, false), 10)
        .unwrap();
    assert_eq!(batch.one_time.len(), 10);
    assert!(batch.last_resort.is_some());
    assert_eq!(bob.mls.held_key_packages().unwrap(), (10, 1));
    // Nothing is due while the server holds them and they are young.
    let batch = bob
        .mls
        .refresh_key_packages(now + 20 * DAY, server(10, true), 10)
        .unwrap();
    assert!(batch.one_time.is_empty() && batch.last_resort.is_none());
    // Below half the target: topped up; the server lost its last-resort one: a new one.
    let batch = bob
        .mls
        .refresh_key_packages(now, server(4, false), 10)
        .unwrap();
    assert_eq!(batch.one_time.len(), 6);
    assert!(batch.last_resort.is_some());
}

#[test]
fn the_last_resort_key_package_is_rotated_in_the_last_third_of_its_life() {
    let bob = Dev::new("bob", 1);
    let now = crate::unix_now();
    bob.mls
        .refresh_key_packages(now, server(0, false), 10)
        .unwrap();
    let ends = bob.mls.held_ends().unwrap();
    let (end, _) = *ends.iter().find(|(_, last)| *last).unwrap();
    // OpenMLS's default lifetime: 12 weeks (and an hour before now).
    assert!(
        end >= now + 83 * DAY && end <= now + 85 * DAY,
        "{end} vs {now}"
    );
    // Two thirds in: still fine.
    let early = end - 29 * DAY;
    let batch = bob
        .mls
        .refresh_key_packages(early, server(10, true), 10)
        .unwrap();
    assert!(batch.last_resort.is_none() && batch.one_time.is_empty());
    // Less than a third left: a new last-resort one and a fresh one-time batch (the server
    // drops the old ones the day before they end).
    let late = end - 27 * DAY;
    let batch = bob
        .mls
        .refresh_key_packages(late, server(10, true), 10)
        .unwrap();
    assert!(batch.last_resort.is_some());
    assert_eq!(batch.one_time.len(), 10);
    // The old ones stay (welcomes for them may be in flight) until they end plus the grace.
    assert_eq!(bob.mls.held_key_packages().unwrap(), (20, 2));
    // At the real clock the new ones are young: nothing more is due.
    let batch = bob
        .mls
        .refresh_key_packages(now, server(20, true), 10)
        .unwrap();
    assert!(batch.last_resort.is_none() && batch.one_time.is_empty());
}

#[test]
fn ended_private_keys_are_pruned_and_their_welcome_is_a_typed_error() {
    let (alice, bob) = (Dev::new("alice", 1), Dev::new("bob", 1));
    let all = pins(&[&alice, &bob]);
    let now = crate::unix_now();
    let first = bob
        .mls
        .refresh_key_packages(now, server(0, false), 10)
        .unwrap();
    // Alice fetched one of them and sends the welcome much later.
    let fetched = FetchedKeyPackage {
        user: bob.user(),
        bytes: first.one_time[0].clone(),
    };
    let (end, _) = bob.mls.held_ends().unwrap()[0];
    // A day after the end, within the grace period: kept, and new ones are made.
    let batch = bob
        .mls
        .refresh_key_packages(end + DAY, server(10, true), 10)
        .unwrap();
    assert!(batch.last_resort.is_some());
    assert_eq!(batch.one_time.len(), 10);
    assert_eq!(bob.mls.held_key_packages().unwrap(), (20, 2));
    // Past the grace period (every key package of this test ends within a minute of `end`):
    // all pruned, then a fresh set made.
    bob.mls
        .refresh_key_packages(end + KEY_PACKAGE_GRACE_SECS + 60, server(10, true), 10)
        .unwrap();
    assert_eq!(bob.mls.held_key_packages().unwrap(), (10, 1));

    let id = alice.mls.create_group().unwrap();
    let commit = alice.mls.add_members(&id, &[fetched], &all).unwrap();
    let welcome = commit.welcome.unwrap();
    assert!(matches!(
        bob.mls.process(&welcome, &all),
        Err(MlsError::KeyPackageGone)
    ));
}

#[test]
fn the_state_holds_a_bounded_number_of_key_packages_oldest_ended_first() {
    let bob = Dev::new("bob", 1);
    let now = crate::unix_now();
    // Five that ended yesterday (within the grace period), thirty fresh, a last-resort one.
    bob.mls
        .key_packages_lasting(5, false, Lifetime::init(now - 80 * DAY, now - DAY))
        .unwrap();
    bob.mls
        .key_packages_lasting(30, false, Lifetime::init(now - 3600, now + 50 * DAY))
        .unwrap();
    bob.mls
        .key_packages_lasting(1, true, Lifetime::init(now - 3600, now + 80 * DAY))
        .unwrap();
    // And an older last-resort one, replaced but perhaps still awaited by a welcome.
    bob.mls
        .key_packages_lasting(1, true, Lifetime::init(now - 3600, now + 40 * DAY))
        .unwrap();
    let batch = bob
        .mls
        .refresh_key_packages(now, server(10, true), 10)
        .unwrap();
    assert!(batch.last_resort.is_none() && batch.one_time.is_empty());
    let ends = bob.mls.held_ends().unwrap();
    assert_eq!(ends.len(), max_held(10));
    assert!(
        ends.iter().all(|(e, _)| *e > now),
        "the ended ones go first"
    );
    // Then one-time ones: both last-resort ones stay.
    assert_eq!(ends.iter().filter(|(_, last)| *last).count(), 2);
    // Many batches in a row stay bounded too.
    for _ in 0..3 {
        bob.mls.key_packages(40, false).unwrap();
        bob.mls
            .refresh_key_packages(now, server(0, true), 10)
            .unwrap();
        assert!(bob.mls.held_ends().unwrap().len() <= max_held(10));
    }
}
