//! Per-account backoff for failed logins: guessing one account's password gets slower as its
//! recent failures pile up, without letting anyone lock the owner out.
//!
//! Each account (by folded username, whether or not it exists, so the backoff says nothing
//! about which names exist) keeps a count of recent failures that decays by one a minute, the
//! time of its last failure, and the last few addresses (IPv6 /64) that failed on it. Past
//! [`FREE_FAILURES`], the account waits `2^(failures - FREE_FAILURES)` seconds (at most
//! [`MAX_WAIT`]) after each failure before the next attempt — but only for attempts from an
//! address that has failed on this account recently or has failed any login in the last
//! minute. An address with a clean record is never held back, so the owner logging in from a
//! usual address gets in at once however hard the account is being guessed at; an attacker
//! gets that free attempt once per fresh address.
//!
//! Memory is bounded: records exist only for names that failed recently (each failure costs
//! an argon2 run, so at most a few thousand a minute), are forgotten once their count has
//! decayed, and at most `MAX_ACCOUNTS` are kept; past that, new names are not tracked (the
//! per-address throttle still holds).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::throttle::{Standing, key};
use crate::protocol::Username;

/// Failures an account may have before it backs off.
pub const FREE_FAILURES: f64 = 5.0;
/// The longest an account waits between attempts from suspect addresses.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Recent failures forgotten per second (one a minute).
const DECAY_PER_SECOND: f64 = 1.0 / 60.0;
/// Failing addresses remembered per account.
const ADDRESSES_PER_ACCOUNT: usize = 16;
/// Accounts tracked at most.
const MAX_ACCOUNTS: usize = 100_000;

#[derive(Debug)]
struct Record {
    failures: f64,
    updated: Instant,
    last_failure: Instant,
    /// Most recent last.
    addresses: Vec<IpAddr>,
}

impl Record {
    fn decay(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.failures = (self.failures - elapsed * DECAY_PER_SECOND).max(0.0);
        self.updated = now;
    }

    fn wait(&self) -> Duration {
        let over = self.failures - FREE_FAILURES;
        if over < 1.0 {
            return Duration::ZERO;
        }
        let secs = 2f64.powf(over.floor()).min(MAX_WAIT.as_secs_f64());
        Duration::from_secs_f64(secs)
    }
}

/// What [`AccountBackoff::admit`] counted for an attempt.
#[derive(Debug, Clone, Copy)]
#[must_use = "hand it to `failed` or `refund` when the attempt is over"]
pub struct Admitted {
    /// Counted as a failure already (a suspect attempt).
    charged: bool,
}

/// Counts a failure on `account` from `addr` (a throttle key); `false` if the table is full
/// and the name is not tracked.
fn charge(
    accounts: &mut HashMap<Username, Record>,
    account: &Username,
    addr: IpAddr,
    now: Instant,
) -> bool {
    if accounts.len() >= MAX_ACCOUNTS && !accounts.contains_key(account) {
        accounts.retain(|_, r| {
            r.decay(now);
            r.failures > 0.0
        });
        if accounts.len() >= MAX_ACCOUNTS {
            return false;
        }
    }
    let record = accounts.entry(account.clone()).or_insert(Record {
        failures: 0.0,
        updated: now,
        last_failure: now,
        addresses: Vec::new(),
    });
    record.decay(now);
    record.failures += 1.0;
    record.last_failure = now;
    record.addresses.retain(|a| *a != addr);
    if record.addresses.len() >= ADDRESSES_PER_ACCOUNT {
        record.addresses.remove(0);
    }
    record.addresses.push(addr);
    true
}

/// The per-account backoff of failed logins.
#[derive(Debug, Default)]
pub struct AccountBackoff {
    accounts: Mutex<HashMap<Username, Record>>,
}

impl AccountBackoff {
    /// An empty backoff table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a login on `account` from `addr` (whose own record is `standing`) may run now;
    /// `Err(wait)` says how long the account is backing off.
    ///
    /// An attempt that the backoff applies to (from a suspect address) is counted as a failure
    /// now, before its password work, so that concurrent attempts cannot all pass one check;
    /// hand the [`Admitted`] to [`AccountBackoff::failed`] or [`AccountBackoff::refund`] when
    /// the attempt is over.
    pub fn admit(
        &self,
        account: &Username,
        addr: IpAddr,
        standing: Standing,
        now: Instant,
    ) -> Result<Admitted, Duration> {
        let Ok(mut accounts) = self.accounts.lock() else {
            return Ok(Admitted { charged: false });
        };
        let addr = key(addr);
        let known_bad = accounts
            .get(account)
            .is_some_and(|r| r.addresses.contains(&addr));
        if standing == Standing::Clean && !known_bad {
            return Ok(Admitted { charged: false });
        }
        if let Some(record) = accounts.get_mut(account) {
            record.decay(now);
            let ready_at = record.last_failure + record.wait();
            if let Some(wait) = ready_at.checked_duration_since(now)
                && !wait.is_zero()
            {
                return Err(wait);
            }
        }
        let charged = charge(&mut accounts, account, addr, now);
        Ok(Admitted { charged })
    }

    /// Records a failed login on `account` from `addr` (counted already if `admitted` says so).
    pub fn failed(&self, account: &Username, addr: IpAddr, admitted: Admitted, now: Instant) {
        let Ok(mut accounts) = self.accounts.lock() else {
            return;
        };
        if admitted.charged {
            // Counted at admission; the wait runs from the failure.
            if let Some(record) = accounts.get_mut(account) {
                record.last_failure = record.last_failure.max(now);
            }
            return;
        }
        charge(&mut accounts, account, key(addr), now);
    }

    /// Takes back what [`AccountBackoff::admit`] counted for an attempt that did not fail (a
    /// successful login, or one that did no password work).
    pub fn refund(&self, account: &Username, admitted: Admitted, now: Instant) {
        if !admitted.charged {
            return;
        }
        let Ok(mut accounts) = self.accounts.lock() else {
            return;
        };
        if let Some(record) = accounts.get_mut(account) {
            record.decay(now);
            record.failures = (record.failures - 1.0).max(0.0);
        }
    }

    /// Forgets accounts whose failures have all decayed.
    pub fn prune(&self, now: Instant) {
        if let Ok(mut accounts) = self.accounts.lock() {
            accounts.retain(|_, r| {
                r.decay(now);
                r.failures > 0.0
            });
        }
    }

    /// How many accounts are tracked.
    pub fn tracked(&self) -> usize {
        self.accounts.lock().map(|a| a.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure of an attempt that was not counted at admission (from a clean address).
    const UNCOUNTED: Admitted = Admitted { charged: false };

    #[test]
    fn backoff_grows_for_known_addresses_but_never_for_a_clean_one() {
        let backoff = AccountBackoff::new();
        let alice = Username::parse("alice").unwrap();
        let attacker: IpAddr = "198.51.100.9".parse().unwrap();
        let owner: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES as usize {
            let admitted = backoff
                .admit(&alice, attacker, Standing::Suspect, now)
                .unwrap();
            backoff.failed(&alice, attacker, admitted, now);
        }
        // The free failures are used: the next guess from the attacker waits 2 s, then 4 s...
        backoff.failed(&alice, attacker, UNCOUNTED, now);
        let wait = backoff
            .admit(&alice, attacker, Standing::Suspect, now)
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
        // ... even when its own record looks clean, because it failed on this account.
        assert!(
            backoff
                .admit(&alice, attacker, Standing::Clean, now)
                .is_err()
        );
        backoff.failed(&alice, attacker, UNCOUNTED, now);
        assert_eq!(
            backoff
                .admit(&alice, attacker, Standing::Suspect, now)
                .unwrap_err(),
            Duration::from_secs(4)
        );
        // The owner, from a clean address, is not held back.
        assert!(backoff.admit(&alice, owner, Standing::Clean, now).is_ok());
        // Another account is not affected.
        let bob = Username::parse("bob").unwrap();
        assert!(
            backoff
                .admit(&bob, attacker, Standing::Suspect, now)
                .is_ok()
        );
        // The wait is capped, and failures decay.
        for _ in 0..50 {
            backoff.failed(&alice, attacker, UNCOUNTED, now);
        }
        assert_eq!(
            backoff
                .admit(&alice, attacker, Standing::Suspect, now)
                .unwrap_err(),
            MAX_WAIT
        );
        backoff.prune(now + Duration::from_secs(3600));
        assert_eq!(backoff.tracked(), 0);
    }

    /// Suspect attempts are counted when they are admitted, so concurrent ones (each still
    /// running its password check) stop at the free failures instead of all passing; a refund
    /// makes room again. Before, a failure was counted only once its argon2 run was over.
    #[test]
    fn concurrent_suspect_attempts_stop_at_the_free_failures() {
        let backoff = AccountBackoff::new();
        let alice = Username::parse("alice").unwrap();
        let attacker: IpAddr = "198.51.100.9".parse().unwrap();
        let now = Instant::now();
        let admitted: Vec<_> = (0..20)
            .filter_map(|_| backoff.admit(&alice, attacker, Standing::Suspect, now).ok())
            .collect();
        assert_eq!(admitted.len(), FREE_FAILURES as usize + 1);
        for a in admitted {
            backoff.refund(&alice, a, now);
        }
        assert!(
            backoff
                .admit(&alice, attacker, Standing::Suspect, now)
                .is_ok()
        );
    }
}
