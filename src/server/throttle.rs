//! Per-address throttling of password work: failed logins and signups cost an argon2 run each,
//! so an address gets a bucket of them that refills slowly. IPv6 addresses are grouped by /64,
//! since one host usually owns a whole /64.
//!
//! A token is taken *before* the expensive work ([`Throttle::take`]) and given back
//! ([`Throttle::refund`]) when the attempt should not count (a successful login, a request
//! refused before any work), so parallel requests cannot all pass one check. [`InFlight`] caps
//! the password work one address has running or queued at once.
//!
//! Memory is bounded: at most `MAX_TRACKED` keys are tracked. Keys that no longer change any
//! answer (full bucket, nothing charged for [`CLEAN_AFTER`]) are forgotten by
//! [`Throttle::prune`], which also runs (at most once a second) when the table is full. If the
//! table is still full, a new key is refused (fails closed): an attempt the server cannot count
//! does not get password work.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keys tracked at most.
const MAX_TRACKED: usize = 100_000;

/// A key charged within this long is not [`Standing::Clean`], even once its bucket is full again.
pub const CLEAN_AFTER: Duration = Duration::from_secs(60);

/// How long a full table waits between two pruning passes made to find room.
const PRUNE_WHEN_FULL_EVERY: Duration = Duration::from_secs(1);

/// What a refusal says when the table is full: retry after the next pruning pass.
const FULL_TABLE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    /// When a token was last taken and kept (not refunded).
    charged: Instant,
}

/// The record of a key when it asked: what the argon2 queue orders by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Nothing charged to this key in the last [`CLEAN_AFTER`].
    Clean,
    /// Recently charged (failed logins, signups).
    Suspect,
}

/// A token taken by [`Throttle::take`], to hand back to [`Throttle::refund`] if the attempt
/// should not count.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    /// The key's record before this attempt.
    pub standing: Standing,
    /// `charged` before this attempt (restored by a refund), `None` for a new key or an
    /// unlimited throttle.
    previous: Option<Instant>,
    /// Whether a token was taken at all (not with an unlimited throttle).
    spent: bool,
}

#[derive(Debug)]
struct Table<K> {
    buckets: HashMap<K, Bucket>,
    last_full_prune: Option<Instant>,
}

/// A token bucket per key (by default a client address).
#[derive(Debug)]
pub struct Throttle<K = IpAddr> {
    burst: f64,
    per_second: f64,
    max_tracked: usize,
    table: Mutex<Table<K>>,
}

/// What a throttle counts by: addresses are grouped (IPv6 by /64), other keys are themselves.
pub trait ThrottleKey: Hash + Eq + Clone {
    /// The key attempts are counted under.
    fn bucket(&self) -> Self;
}

impl ThrottleKey for IpAddr {
    fn bucket(&self) -> Self {
        key(*self)
    }
}

impl ThrottleKey for crate::protocol::Username {
    fn bucket(&self) -> Self {
        self.clone()
    }
}

/// The key an address is throttled under.
pub fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

impl<K: ThrottleKey> Throttle<K> {
    /// `per_minute` attempts per minute per address, with a burst of the same size.
    /// `per_minute == 0` disables the throttle.
    pub fn new(per_minute: u32) -> Self {
        Self::with_capacity(per_minute, MAX_TRACKED)
    }

    /// [`Throttle::new`] tracking at most `max_tracked` keys (small in tests).
    pub fn with_capacity(per_minute: u32, max_tracked: usize) -> Self {
        Self {
            burst: f64::from(per_minute),
            per_second: f64::from(per_minute) / 60.0,
            max_tracked: max_tracked.max(1),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                last_full_prune: None,
            }),
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.updated = now;
    }

    fn wait_for_token(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((1.0 - tokens) / self.per_second).max(0.0))
    }

    fn standing(&self, bucket: &Bucket, now: Instant) -> Standing {
        if bucket.tokens >= self.burst
            && now.saturating_duration_since(bucket.charged) >= CLEAN_AFTER
        {
            Standing::Clean
        } else {
            Standing::Suspect
        }
    }

    /// Whether `addr` may make an attempt now, without taking anything; `Err(wait)` says how
    /// long until it may. An answer only: use [`Throttle::take`] before costly work.
    pub fn check(&self, addr: K, now: Instant) -> Result<(), Duration> {
        if self.burst == 0.0 {
            return Ok(());
        }
        let Ok(mut table) = self.table.lock() else {
            return Err(FULL_TABLE_WAIT);
        };
        let Some(bucket) = table.buckets.get_mut(&addr.bucket()) else {
            return Ok(());
        };
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.wait_for_token(bucket.tokens))
        }
    }

    /// Takes one token of `addr`'s bucket before costly work, or says how long to wait.
    /// A new key when the table is full (even after pruning) is refused: fail closed.
    pub fn take(&self, addr: K, now: Instant) -> Result<Taken, Duration> {
        if self.burst == 0.0 {
            return Ok(Taken {
                standing: Standing::Clean,
                previous: None,
                spent: false,
            });
        }
        let Ok(mut table) = self.table.lock() else {
            return Err(FULL_TABLE_WAIT);
        };
        let addr = addr.bucket();
        if table.buckets.len() >= self.max_tracked && !table.buckets.contains_key(&addr) {
            let due = table
                .last_full_prune
                .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_WHEN_FULL_EVERY);
            if due {
                table.last_full_prune = Some(now);
                self.prune_table(&mut table, now);
            }
            if table.buckets.len() >= self.max_tracked {
                tracing::warn!("throttle table full; refusing attempts from new addresses");
                return Err(FULL_TABLE_WAIT);
            }
        }
        let (bucket, previous) = match table.buckets.entry(addr) {
            Entry::Occupied(entry) => {
                let bucket = entry.into_mut();
                let previous = Some(bucket.charged);
                (bucket, previous)
            }
            Entry::Vacant(entry) => {
                let fresh = Bucket {
                    tokens: self.burst,
                    updated: now,
                    // Long enough ago to be clean.
                    charged: now.checked_sub(CLEAN_AFTER).unwrap_or(now),
                };
                (entry.insert(fresh), None)
            }
        };
        self.refill(bucket, now);
        let standing = if previous.is_none() {
            Standing::Clean
        } else {
            self.standing(bucket, now)
        };
        if bucket.tokens < 1.0 {
            return Err(self.wait_for_token(bucket.tokens));
        }
        bucket.tokens -= 1.0;
        bucket.charged = now;
        Ok(Taken {
            standing,
            previous,
            spent: true,
        })
    }

    /// Gives back a token [`Throttle::take`] took, for an attempt that does not count.
    pub fn refund(&self, addr: K, taken: Taken, now: Instant) {
        if !taken.spent {
            return;
        }
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        if let Some(bucket) = table.buckets.get_mut(&addr.bucket()) {
            self.refill(bucket, now);
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
            bucket.charged = taken
                .previous
                .unwrap_or_else(|| now.checked_sub(CLEAN_AFTER).unwrap_or(now));
        }
    }

    /// Spends one attempt of `addr`'s bucket whatever it holds (for work already done).
    pub fn spend(&self, addr: K, now: Instant) {
        if let Err(wait) = self.take(addr, now) {
            tracing::debug!(?wait, "spent an attempt from an empty bucket");
        }
    }

    fn prune_table(&self, table: &mut Table<K>, now: Instant) {
        let (burst, rate) = (self.burst, self.per_second);
        table.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
                || now.saturating_duration_since(b.charged) < CLEAN_AFTER
        });
    }

    /// Forgets keys whose bucket has refilled and that were not charged for [`CLEAN_AFTER`].
    pub fn prune(&self, now: Instant) {
        if let Ok(mut table) = self.table.lock() {
            self.prune_table(&mut table, now);
        }
    }

    /// How many keys are tracked.
    pub fn tracked(&self) -> usize {
        self.table.lock().map(|t| t.buckets.len()).unwrap_or(0)
    }
}

/// Password work (argon2 runs, running or queued) in flight per address, capped so that one
/// address cannot fill the queue. Only addresses with work in flight are in the table, so it
/// holds at most as many entries as there are requests in flight.
#[derive(Debug)]
pub struct InFlight {
    cap: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One unit of password work in flight; dropping it ends it.
#[derive(Debug)]
pub struct InFlightSlot {
    addr: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl InFlight {
    /// At most `cap` units per address (IPv6 /64); 0 means no cap.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            counts: Arc::default(),
        }
    }

    /// A slot for `addr`, or `None` if it already has `cap` in flight.
    pub fn enter(&self, addr: IpAddr) -> Option<InFlightSlot> {
        let addr = key(addr);
        let mut counts = self.counts.lock().ok()?;
        let count = counts.entry(addr).or_insert(0);
        if self.cap != 0 && *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(InFlightSlot {
            addr,
            counts: Arc::clone(&self.counts),
        })
    }

    /// Addresses with work in flight.
    pub fn addresses(&self) -> usize {
        self.counts.lock().map(|c| c.len()).unwrap_or(0)
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.lock()
            && let Entry::Occupied(mut entry) = counts.entry(self.addr)
        {
            *entry.get_mut() = entry.get().saturating_sub(1);
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_slow_refill() {
        let throttle: Throttle = Throttle::new(3);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            assert!(throttle.check(addr, start).is_ok());
            throttle.spend(addr, start);
        }
        let wait = throttle.check(addr, start).unwrap_err();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        // Another address is not affected.
        assert!(throttle.check("192.0.2.2".parse().unwrap(), start).is_ok());
        assert!(
            throttle
                .check(addr, start + Duration::from_secs(20))
                .is_ok()
        );
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let throttle: Throttle = Throttle::new(1);
        let now = Instant::now();
        throttle.spend("2001:db8::1".parse().unwrap(), now);
        assert!(throttle.check("2001:db8::2".parse().unwrap(), now).is_err());
        assert!(
            throttle
                .check("2001:db8:0:1::1".parse().unwrap(), now)
                .is_ok()
        );
    }

    #[test]
    fn prune_forgets_refilled_buckets_and_zero_disables() {
        let throttle: Throttle = Throttle::new(60);
        let now = Instant::now();
        throttle.spend("192.0.2.1".parse().unwrap(), now);
        throttle.prune(now);
        assert_eq!(throttle.tracked(), 1);
        // Refilled after 1 s, but remembered as recently charged (not clean) until CLEAN_AFTER.
        throttle.prune(now + Duration::from_secs(2));
        assert_eq!(throttle.tracked(), 1);
        throttle.prune(now + CLEAN_AFTER);
        assert_eq!(throttle.tracked(), 0);

        let off: Throttle = Throttle::new(0);
        for _ in 0..100 {
            off.spend("192.0.2.1".parse().unwrap(), now);
        }
        assert!(off.check("192.0.2.1".parse().unwrap(), now).is_ok());
    }
    #[test]
    fn take_spends_before_the_work_and_refund_gives_back() {
        let throttle: Throttle = Throttle::new(2);
        let addr: IpAddr = "192.0.2.7".parse().unwrap();
        let now = Instant::now();
        let first = throttle.take(addr, now).unwrap();
        assert_eq!(first.standing, Standing::Clean);
        // Two attempts in flight at once use the whole burst: a third is refused at once.
        let second = throttle.take(addr, now).unwrap();
        assert_eq!(second.standing, Standing::Suspect);
        assert!(throttle.take(addr, now).is_err());
        // A success gives its token back; the address is then as it was before that attempt.
        throttle.refund(addr, second, now);
        assert!(throttle.take(addr, now).is_ok());
        // A full bucket charged recently is still suspect; after CLEAN_AFTER it is clean.
        let later = now + CLEAN_AFTER + Duration::from_secs(1);
        let taken = throttle.take(addr, later).unwrap();
        assert_eq!(taken.standing, Standing::Clean);
        throttle.refund(addr, taken, later);
        throttle.refund(addr, first, later);
        throttle.prune(later + CLEAN_AFTER);
        assert_eq!(throttle.tracked(), 0);
    }

    #[test]
    fn a_full_table_refuses_new_addresses_until_it_can_prune() {
        let throttle: Throttle = Throttle::with_capacity(30, 2);
        let now = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        throttle.take(a, now).unwrap();
        throttle.take(b, now).unwrap();
        // Fails closed: the new address gets no password work.
        assert_eq!(throttle.take(c, now).unwrap_err(), FULL_TABLE_WAIT);
        assert_eq!(throttle.tracked(), 2);
        // Tracked addresses still work.
        assert!(throttle.take(a, now).is_ok());
        // Once the others are forgettable, a full table prunes itself to make room.
        let later = now + CLEAN_AFTER + Duration::from_secs(5);
        assert!(throttle.take(c, later).is_ok());
        assert_eq!(throttle.tracked(), 1);
    }

    #[test]
    fn in_flight_is_capped_per_address_and_forgotten_when_done() {
        let in_flight = InFlight::new(2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::2".parse().unwrap();
        let first = in_flight.enter(a).unwrap();
        let _second = in_flight.enter(same_64).unwrap();
        assert!(in_flight.enter(a).is_none());
        assert!(in_flight.enter("192.0.2.1".parse().unwrap()).is_some());
        drop(first);
        assert!(in_flight.enter(a).is_some());
        assert_eq!(in_flight.addresses(), 1);
    }
}
