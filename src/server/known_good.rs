//! Addresses that logged in successfully lately, so that their password work can go ahead of
//! work from addresses the server knows nothing about. During a flood from many fresh
//! addresses, each flooding address's first attempt has a clean record too; without this an
//! honest user waited behind all of them.
//!
//! Only a hint for the argon2 queue, never a permission: a known address that fails a login
//! is suspect like any other (the caller asks only for clean addresses). Kept in memory only,
//! for [`REMEMBER`], by throttle key (IPv6 by /64), at most 100,000 of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::throttle;

/// How long a successful login makes an address known.
pub const REMEMBER: Duration = Duration::from_secs(24 * 3600);

/// Addresses remembered at most; past it new ones are not (a hint lost, nothing refused).
const MAX_KNOWN: usize = 100_000;

/// Addresses with a successful login in the last [`REMEMBER`].
#[derive(Debug)]
pub struct KnownGood {
    max: usize,
    table: Mutex<HashMap<IpAddr, Instant>>,
}

impl Default for KnownGood {
    fn default() -> Self {
        Self::with_capacity(MAX_KNOWN)
    }
}

impl KnownGood {
    /// At most `max` addresses (small in tests).
    pub fn with_capacity(max: usize) -> Self {
        Self {
            max,
            table: Mutex::default(),
        }
    }

    /// `addr` just logged in successfully.
    pub fn note(&self, addr: IpAddr, now: Instant) {
        let key = throttle::key(addr);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if table.len() >= self.max && !table.contains_key(&key) {
            prune_table(&mut table, now);
            if table.len() >= self.max {
                return;
            }
        }
        table.insert(key, now);
    }

    /// Whether `addr` logged in successfully within [`REMEMBER`] of `now`.
    pub fn knows(&self, addr: IpAddr, now: Instant) -> bool {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table
            .get(&throttle::key(addr))
            .is_some_and(|at| now.saturating_duration_since(*at) < REMEMBER)
    }

    /// Forgets addresses not seen for [`REMEMBER`].
    pub fn prune(&self, now: Instant) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        prune_table(&mut table, now);
    }
}

fn prune_table(table: &mut HashMap<IpAddr, Instant>, now: Instant) {
    table.retain(|_, at| now.saturating_duration_since(*at) < REMEMBER);
    if table.capacity() > 1024 && table.len() * 4 < table.capacity() {
        table.shrink_to(table.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn remembers_for_a_day_by_throttle_key() {
        let known = KnownGood::default();
        let now = Instant::now();
        assert!(!known.knows(ip("192.0.2.1"), now));
        known.note(ip("2001:db8::1"), now);
        assert!(known.knows(ip("2001:db8::ffff"), now));
        assert!(!known.knows(ip("2001:db8:0:1::1"), now));
        let later = now + REMEMBER;
        assert!(!known.knows(ip("2001:db8::1"), later));
        known.prune(later);
        assert!(known.table.lock().unwrap().is_empty());
    }

    #[test]
    fn a_full_table_keeps_what_it_has() {
        let known = KnownGood::with_capacity(2);
        let now = Instant::now();
        for a in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            known.note(ip(a), now);
        }
        assert!(known.knows(ip("192.0.2.1"), now));
        assert!(!known.knows(ip("192.0.2.3"), now));
        // Once the old ones expire there is room again.
        let later = now + REMEMBER;
        known.note(ip("192.0.2.3"), later);
        assert!(known.knows(ip("192.0.2.3"), later));
    }
}
