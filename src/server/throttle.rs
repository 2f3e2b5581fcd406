//! Per-address throttling of password work: failed logins and signups cost an argon2 run each,
//! so an address gets a bucket of them that refills slowly. IPv6 addresses are grouped by /64,
//! since one host usually owns a whole /64.
//!
//! Memory is bounded: at most `MAX_TRACKED` addresses are tracked; full buckets are forgotten
//! by [`Throttle::prune`]; past the cap new addresses are let through (with a warning) rather
//! than letting the table grow.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A token bucket per key (by default a client address).
#[derive(Debug)]
pub struct Throttle<K = IpAddr> {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
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
fn key(addr: IpAddr) -> IpAddr {
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
        Self {
            burst: f64::from(per_minute),
            per_second: f64::from(per_minute) / 60.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.updated = now;
    }

    /// Whether `addr` may make an attempt now; `Err(wait)` says how long until it may.
    pub fn check(&self, addr: K, now: Instant) -> Result<(), Duration> {
        if self.burst == 0.0 {
            return Ok(());
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let Some(bucket) = buckets.get_mut(&addr.bucket()) else {
            return Ok(());
        };
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }

    /// Spends one attempt of `addr`'s bucket (call after a failure, or before costly work).
    pub fn spend(&self, addr: K, now: Instant) {
        if self.burst == 0.0 {
            return;
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let addr = addr.bucket();
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&addr) {
            tracing::warn!("throttle table full; not tracking more addresses until pruned");
            return;
        }
        let bucket = buckets.entry(addr).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        self.refill(bucket, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    /// Forgets addresses whose bucket has refilled completely.
    pub fn prune(&self, now: Instant) {
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let (burst, rate) = (self.burst, self.per_second);
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst
        });
    }

    /// How many addresses are tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
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
        throttle.prune(now + Duration::from_secs(2));
        assert_eq!(throttle.tracked(), 0);

        let off: Throttle = Throttle::new(0);
        for _ in 0..100 {
            off.spend("192.0.2.1".parse().unwrap(), now);
        }
        assert!(off.check("192.0.2.1".parse().unwrap(), now).is_ok());
    }
}
