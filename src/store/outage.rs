//! Write outages of the store: a full (or failing) disk, seen, logged once, and waited out.
//!
//! fjall *poisons* a database at its first failed journal write, sync or background flush:
//! from then on it refuses every write (`Error::Poisoned`) until the database is closed and
//! opened again, which replays the journal up to the last batch written whole. So an outage
//! is: the first failed write marks the store down (one log line); writes are refused at once
//! with [`StoreError::Unavailable`](super::StoreError::Unavailable) without touching fjall;
//! reads go on from the poisoned database; a watcher thread waits for space (a probe file it
//! can write and sync) and then reopens the database (`fjall_store`), which ends the outage
//! (one log line). Nothing refused was acknowledged; everything acknowledged was synced before.
//!
//! Two writes are kept in memory during an outage instead of being refused, because their
//! loss costs nothing a client does not already handle: acknowledgements of delivered
//! messages (lost, a message is delivered again; see [`Removal::Acknowledged`]) and login
//! sessions (lost, the user logs in again). They are written when the store reopens, and
//! bounded here. That keeps `recv` and password login working while the disk is full.
//!
//! [`Removal::Acknowledged`]: super::Removal::Acknowledged

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::user_ids::UserId;
use super::{SessionRecord, StoreError, TokenDigest};

/// How often the watcher looks for space during an outage.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// An outage that begins this soon after the last one ended (a disk that fails, not one that
/// was full) doubles the probe interval, up to [`MAX_PROBE_INTERVAL`], so a store that cannot
/// stay open logs two lines per interval at most rather than flooding.
const FLAP_WINDOW: Duration = Duration::from_secs(60);
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Bytes the probe writes and syncs: room for a few batches of messages and a journal's
/// bookkeeping, so a reopen does not fail again at once for want of a few pages.
const PROBE_BYTES: usize = 1 << 20;
/// The probe file, in the data directory; removed after each probe.
const PROBE_FILE: &str = "space-probe.tmp";
/// Acknowledged seqs kept in memory during an outage, at most (then acks are refused).
const MAX_DEFERRED_ACKS: usize = 100_000;
/// Sessions kept in memory during an outage, at most (then logins are refused).
const MAX_DEFERRED_SESSIONS: usize = 10_000;

/// Writes kept in memory during an outage, written when the store reopens.
#[derive(Default)]
pub(super) struct Deferred {
    /// Acknowledged seqs per inbox.
    pub acks: HashMap<UserId, BTreeSet<u64>>,
    /// How many seqs `acks` holds.
    pub ack_count: usize,
    /// Sessions created during the outage, by token digest.
    pub sessions: HashMap<TokenDigest, SessionRecord>,
}

impl Deferred {
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.sessions.is_empty()
    }
}

/// When the current outage began and the last one ended, and the probe interval.
#[derive(Default)]
struct Timing {
    since: Option<Instant>,
    last_recovery: Option<Instant>,
    interval: Duration,
}

/// The outage state shared by the store, its inbox writer and the watcher.
#[derive(Default)]
pub(super) struct Outage {
    down: AtomicBool,
    /// The generation of the open database (one more per reopen): a failure reported by an
    /// older one, closed since, says nothing about the current one.
    generation: AtomicU64,
    timing: Mutex<Timing>,
    stopping: AtomicBool,
    wake: Condvar,
    deferred: Mutex<Deferred>,
}

impl Outage {
    /// Whether the store refuses writes now.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A write of database `generation` failed with `error` and fjall is poisoned: the first
    /// report of an outage logs it and wakes the watcher; the rest are quiet.
    pub fn failed(&self, generation: u64, error: &dyn std::fmt::Display) {
        if generation != self.generation() || self.down.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut interval = PROBE_INTERVAL;
        if let Ok(mut timing) = self.timing.lock() {
            timing.since = Some(Instant::now());
            if timing
                .last_recovery
                .is_some_and(|t| t.elapsed() < FLAP_WINDOW)
            {
                interval = (timing.interval * 2).clamp(PROBE_INTERVAL, MAX_PROBE_INTERVAL);
            }
            timing.interval = interval;
        }
        tracing::error!(
            error = %error,
            "the store cannot write (disk full or failing): messages, signups and key uploads \
             are refused with `storage_unavailable` until it can; reads, deliveries, acks and \
             logins go on; nothing acknowledged is lost; checking for space every {} ms",
            interval.as_millis()
        );
        self.wake.notify_all();
    }

    /// Database `generation` was opened (in `reopen`) and can write: the outage (if any) is
    /// over.
    pub fn recovered(&self, generation: u64, deferred: &mut Deferred, reopen: Duration) {
        let (acks, sessions) = (deferred.ack_count, deferred.sessions.len());
        *deferred = Deferred::default();
        self.generation.store(generation, Ordering::SeqCst);
        if self.down.swap(false, Ordering::SeqCst) {
            let secs = self
                .timing
                .lock()
                .ok()
                .and_then(|mut timing| {
                    timing.last_recovery = Some(Instant::now());
                    timing.since.take()
                })
                .map_or(0.0, |t| t.elapsed().as_secs_f64());
            tracing::info!(
                down_for_secs = format_args!("{secs:.1}"),
                reopen_ms = reopen.as_millis(),
                deferred_acks = acks,
                deferred_sessions = sessions,
                "the store writes again: the database was reopened and messages are accepted"
            );
        }
    }

    /// A new database generation is being opened.
    pub fn next_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst) + 1
    }

    /// The writes kept for the reopen; hold the guard across the reopen so none is added
    /// between the replay and the end of the outage.
    pub fn deferred(&self) -> Result<MutexGuard<'_, Deferred>, StoreError> {
        self.deferred.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Keeps an ack for the reopen if the store is down; `Ok(false)` if it is not (write it).
    pub fn defer_ack(&self, user: UserId, seqs: &[u64]) -> Result<bool, StoreError> {
        let mut deferred = self.deferred()?;
        if !self.is_down() {
            return Ok(false);
        }
        if deferred.ack_count + seqs.len() > MAX_DEFERRED_ACKS {
            return Err(StoreError::Unavailable);
        }
        let entry = deferred.acks.entry(user).or_default();
        let before = entry.len();
        entry.extend(seqs.iter().copied());
        let added = entry.len() - before;
        deferred.ack_count += added;
        Ok(true)
    }

    /// Seqs of `user`'s inbox acknowledged during the outage (not yet removed from the store).
    pub fn deferred_acks(&self, user: UserId) -> Result<Option<BTreeSet<u64>>, StoreError> {
        Ok(self.deferred()?.acks.get(&user).cloned())
    }

    /// Keeps a session for the reopen if the store is down; `Ok(false)` if it is not.
    pub fn defer_session(&self, session: &SessionRecord) -> Result<bool, StoreError> {
        let mut deferred = self.deferred()?;
        if !self.is_down() {
            return Ok(false);
        }
        if deferred.sessions.len() >= MAX_DEFERRED_SESSIONS {
            return Err(StoreError::Unavailable);
        }
        deferred
            .sessions
            .insert(session.token_digest, session.clone());
        Ok(true)
    }

    /// A session created during the outage.
    pub fn deferred_session(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.deferred()?.sessions.get(digest).cloned())
    }

    /// Forgets a session created during the outage; whether there was one.
    pub fn forget_session(&self, digest: &TokenDigest) -> Result<bool, StoreError> {
        Ok(self.deferred()?.sessions.remove(digest).is_some())
    }

    /// Blocks until the store is down (then waits one probe interval) or stopping; `false`
    /// when stopping.
    pub fn wait_for_probe(&self) -> bool {
        let stopping = || self.stopping.load(Ordering::SeqCst);
        let Ok(mut timing) = self.timing.lock() else {
            return false;
        };
        while !self.is_down() && !stopping() {
            timing = match self.wake.wait(timing) {
                Ok(guard) => guard,
                Err(_) => return false,
            };
        }
        let interval = timing.interval.max(PROBE_INTERVAL);
        let deadline = Instant::now() + interval;
        while !stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            timing = match self.wake.wait_timeout(timing, left) {
                Ok((guard, _)) => guard,
                Err(_) => return false,
            };
        }
        !stopping()
    }

    /// Stops the watcher (the store is dropped).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Taken so the notification cannot fall between the watcher's check and its wait.
        let _timing = self.timing.lock();
        self.wake.notify_all();
    }
}

/// Whether `dir`'s filesystem takes [`PROBE_BYTES`] now: written, synced, removed.
pub(super) fn space_for_writes(dir: &Path) -> bool {
    let path = dir.join(PROBE_FILE);
    let probe = || -> std::io::Result<()> {
        let mut file = File::create(&path)?;
        file.write_all(&vec![0u8; PROBE_BYTES])?;
        file.sync_data()
    };
    let fits = probe().is_ok();
    let _ = std::fs::remove_file(&path);
    fits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(outage: &Outage) -> Duration {
        outage.timing.lock().unwrap().interval
    }

    #[test]
    fn an_outage_starts_once_and_ignores_closed_databases() {
        let outage = Outage::default();
        assert!(!outage.defer_ack(1, &[5]).unwrap(), "not down: ack written");
        outage.failed(1, &"from a database closed since");
        assert!(!outage.is_down());
        outage.failed(0, &"disk full");
        outage.failed(0, &"disk full again");
        assert!(outage.is_down());
        assert!(outage.defer_ack(1, &[5, 6]).unwrap());
        assert!(outage.defer_ack(1, &[6, 7]).unwrap());
        assert_eq!(outage.deferred().unwrap().ack_count, 3, "each seq once");
        let mut deferred = outage.deferred().unwrap();
        outage.recovered(1, &mut deferred, Duration::ZERO);
        assert!(deferred.is_empty());
        drop(deferred);
        assert!(!outage.is_down());
        outage.failed(0, &"the old database again");
        assert!(!outage.is_down(), "generation 1 is open now");
    }

    #[test]
    fn an_outage_soon_after_the_last_probes_less_often() {
        let outage = Outage::default();
        outage.failed(0, &"disk full");
        assert_eq!(interval(&outage), PROBE_INTERVAL);
        for (generation, expected) in [(1, 2), (2, 4), (3, 8)] {
            let mut deferred = outage.deferred().unwrap();
            outage.recovered(generation, &mut deferred, Duration::ZERO);
            drop(deferred);
            outage.failed(generation, &"failing disk");
            assert_eq!(interval(&outage), PROBE_INTERVAL * expected);
        }
    }

    #[test]
    fn deferred_writes_are_bounded() {
        let outage = Outage::default();
        outage.failed(0, &"disk full");
        let seqs: Vec<u64> = (0..MAX_DEFERRED_ACKS as u64).collect();
        assert!(outage.defer_ack(1, &seqs).unwrap());
        assert!(matches!(
            outage.defer_ack(2, &[1]),
            Err(StoreError::Unavailable)
        ));
    }
}
