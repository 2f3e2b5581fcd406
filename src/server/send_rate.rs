//! The per-account send rate: a token bucket per sending account (the server's [`Throttle`]),
//! taken before a message is read, so one account cannot take more than its rate of the
//! server's throughput however many streams it opens at once.
//!
//! [`Throttle`] checks and spends in two calls; here both happen under one lock, so concurrent
//! message streams of one account cannot all pass the check before any of them spends.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::throttle::Throttle;
use crate::protocol::Username;

/// How often the refilled buckets are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Messages per account per minute.
pub(crate) struct SendRate {
    throttle: Throttle<Username>,
    enabled: bool,
    /// Held across check and spend; also when the table was last pruned.
    gate: Mutex<Instant>,
}

impl SendRate {
    /// `per_minute` messages per account per minute, with a burst of as many; 0 = unlimited.
    pub(crate) fn new(per_minute: u32) -> Self {
        Self {
            throttle: Throttle::new(per_minute),
            enabled: per_minute > 0,
            gate: Mutex::new(Instant::now()),
        }
    }

    /// Takes one message from `sender`'s bucket; `Err(wait)` if it is empty (nothing is taken).
    pub(crate) fn take(&self, sender: &Username) -> Result<(), Duration> {
        if !self.enabled {
            return Ok(());
        }
        let now = Instant::now();
        // A poisoned gate only means a panic elsewhere; the buckets themselves are fine.
        let mut pruned = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(*pruned) >= PRUNE_EVERY {
            self.throttle.prune(now);
            *pruned = now;
        }
        self.throttle.check(sender.clone(), now)?;
        self.throttle.spend(sender.clone(), now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_takes_never_pass_more_than_the_burst() {
        let rate = std::sync::Arc::new(SendRate::new(50));
        let alice = Username::parse("alice").unwrap();
        let passed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        if rate.take(&alice).is_ok() {
                            passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        // The burst, plus at most what refilled while the threads ran (50/min).
        let passed = passed.into_inner();
        assert!((50..=51).contains(&passed), "{passed}");
        assert!(SendRate::new(0).take(&alice).is_ok());
    }
}
