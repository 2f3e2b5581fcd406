//! Bounded pools for blocking work: [`BlockingPool`], a gateway to tokio's blocking threads for
//! fjall calls, and [`PriorityPool`], dedicated low-priority threads for argon2.
//!
//! In a [`BlockingPool`] each job first takes a permit from a semaphore and carries it into the
//! blocking closure, so at most `limit` jobs of one pool run at once and the rest wait
//! asynchronously; a waiter queue longer than `max_waiting` is refused at once instead of
//! growing without bound.
//!
//! A [`PriorityPool`] runs jobs on its own threads, which lower their scheduling priority (nice
//! [`WORKER_NICE`]) so that password hashing uses the CPU that message relaying leaves idle
//! instead of competing with it. Its queue has two classes: [`Priority::High`] jobs all run
//! before any [`Priority::Low`] one, and when the queue is full a high job displaces the newest
//! low one (which fails as saturated) instead of being refused.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::{Semaphore, oneshot};

/// Why a blocking job did not produce its result.
#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    /// Too many jobs are already waiting for this pool.
    #[error("blocking pool `{0}` is saturated")]
    Saturated(&'static str),
    /// The job panicked or the runtime is shutting down.
    #[error("blocking job in pool `{0}` failed to complete")]
    Aborted(&'static str),
}

/// A named, bounded pool of blocking jobs.
#[derive(Debug, Clone)]
pub struct BlockingPool {
    name: &'static str,
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

impl BlockingPool {
    /// A pool running at most `limit` jobs at once with at most `max_waiting` queued.
    pub fn new(name: &'static str, limit: usize, max_waiting: usize) -> Self {
        Self {
            name,
            permits: Arc::new(Semaphore::new(limit.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
        }
    }

    /// Runs `job` on a blocking thread once a permit is free.
    pub async fn run<T, F>(&self, job: F) -> Result<T, BlockingError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(BlockingError::Saturated(self.name));
                }
                let _queued = crate::server::metrics::queued(self.name);
                let permit = Arc::clone(&self.permits).acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                permit.map_err(|_| BlockingError::Aborted(self.name))?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|_| BlockingError::Aborted(self.name))
    }
}

/// The nice value of [`PriorityPool`] threads: CFS gives a nice-10 thread about a tenth of the
/// weight of a nice-0 one, so the runtime's workers win a contended core.
pub const WORKER_NICE: i32 = 10;

/// The class of a [`PriorityPool`] job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Runs before every low job.
    High,
    /// Runs when no high job waits.
    Low,
}

type Job = Box<dyn FnOnce() + Send>;

/// A queued job: `live` says whether anyone still waits for its result.
struct Queued {
    job: Job,
    live: Box<dyn Fn() -> bool + Send>,
    /// Tells the waiter its job was displaced.
    displace: Box<dyn FnOnce() + Send>,
}

#[derive(Default)]
struct Queues {
    high: VecDeque<Queued>,
    low: VecDeque<Queued>,
    closed: bool,
}

impl Queues {
    fn len(&self) -> usize {
        self.high.len() + self.low.len()
    }

    fn next(&mut self) -> Option<Queued> {
        self.high.pop_front().or_else(|| self.low.pop_front())
    }

    /// Drops jobs whose waiter is gone (cancelled requests), to make room.
    fn forget_abandoned(&mut self) {
        self.high.retain(|q| (q.live)());
        self.low.retain(|q| (q.live)());
    }
}

struct PoolState {
    queues: Mutex<Queues>,
    ready: Condvar,
}

/// Closes the pool when the last handle is dropped, so its threads end.
struct PoolHandle {
    state: Arc<PoolState>,
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        if let Ok(mut queues) = self.state.queues.lock() {
            queues.closed = true;
        }
        self.state.ready.notify_all();
    }
}

/// A named pool of dedicated, low-priority threads with a two-class bounded queue.
#[derive(Clone)]
pub struct PriorityPool {
    name: &'static str,
    handle: Arc<PoolHandle>,
    max_waiting: usize,
}

impl std::fmt::Debug for PriorityPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PriorityPool")
            .field("name", &self.name)
            .field("max_waiting", &self.max_waiting)
            .finish_non_exhaustive()
    }
}

impl PriorityPool {
    /// Starts `workers` threads (at least one) with at most `max_waiting` jobs queued.
    pub fn new(
        name: &'static str,
        workers: usize,
        max_waiting: usize,
    ) -> Result<Self, std::io::Error> {
        let state = Arc::new(PoolState {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        for index in 0..workers.max(1) {
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || work(&state))?;
        }
        Ok(Self {
            name,
            handle: Arc::new(PoolHandle { state }),
            max_waiting,
        })
    }

    /// Runs `job` on a pool thread, after every queued job of higher or equal class.
    pub async fn run<T, F>(&self, priority: Priority, job: F) -> Result<T, BlockingError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, BlockingError>>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let (for_job, for_live, for_displace) = (Arc::clone(&tx), Arc::clone(&tx), tx);
        let name = self.name;
        let queued = Queued {
            job: Box::new(move || {
                let result = job();
                if let Some(tx) = for_job.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(Ok(result));
                }
            }),
            live: Box::new(move || {
                for_live
                    .lock()
                    .ok()
                    .is_some_and(|t| t.as_ref().is_some_and(|tx| !tx.is_closed()))
            }),
            displace: Box::new(move || {
                if let Some(tx) = for_displace.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(Err(BlockingError::Saturated(name)));
                }
            }),
        };
        self.enqueue(priority, queued)?;
        rx.await.map_err(|_| BlockingError::Aborted(self.name))?
    }

    fn enqueue(&self, priority: Priority, queued: Queued) -> Result<(), BlockingError> {
        let state = &self.handle.state;
        let mut queues = state
            .queues
            .lock()
            .map_err(|_| BlockingError::Aborted(self.name))?;
        if queues.len() >= self.max_waiting {
            queues.forget_abandoned();
        }
        if queues.len() >= self.max_waiting {
            let displaced = match priority {
                Priority::High => queues.low.pop_back(),
                Priority::Low => None,
            };
            match displaced {
                Some(displaced) => (displaced.displace)(),
                None => return Err(BlockingError::Saturated(self.name)),
            }
        }
        match priority {
            Priority::High => queues.high.push_back(queued),
            Priority::Low => queues.low.push_back(queued),
        }
        drop(queues);
        state.ready.notify_one();
        Ok(())
    }

    /// Jobs waiting for a thread.
    pub fn waiting(&self) -> usize {
        self.handle
            .state
            .queues
            .lock()
            .map(|q| q.len())
            .unwrap_or(0)
    }
}

/// A pool thread: lowers its own priority, then runs jobs until the pool closes.
fn work(state: &PoolState) {
    lower_priority();
    loop {
        let next = {
            let Ok(mut queues) = state.queues.lock() else {
                return;
            };
            loop {
                if queues.closed {
                    return;
                }
                if let Some(next) = queues.next() {
                    break next;
                }
                queues = match state.ready.wait(queues) {
                    Ok(queues) => queues,
                    Err(_) => return,
                };
            }
        };
        // A request that gave up (its connection closed) costs nothing more.
        if (next.live)() {
            (next.job)();
        }
    }
}

/// Best effort: a thread that cannot lower its priority still works, at the normal one.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes plain integers; on Linux `who = 0` with PRIO_PROCESS names
        // the calling thread, which is the one being lowered.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, WORKER_NICE) };
        if result != 0 {
            tracing::debug!("could not lower the priority of a pool thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_concurrency_and_refuses_past_the_queue() {
        let pool = BlockingPool::new("test", 2, 2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut jobs = Vec::new();
        for _ in 0..4 {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            jobs.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(100));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Two run, two wait: a fifth is refused.
        assert!(matches!(
            pool.run(|| ()).await,
            Err(BlockingError::Saturated("test"))
        ));
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn high_jobs_run_first_and_displace_low_ones_when_full() {
        let pool = PriorityPool::new("test", 1, 3).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        // Occupy the single thread.
        let blocker = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(Priority::Low, || {
                    std::thread::sleep(Duration::from_millis(200))
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut jobs = Vec::new();
        for (label, priority) in [
            ("low1", Priority::Low),
            ("low2", Priority::Low),
            ("high1", Priority::High),
        ] {
            let (pool, order) = (pool.clone(), Arc::clone(&order));
            jobs.push(tokio::spawn(async move {
                pool.run(priority, move || order.lock().unwrap().push(label))
                    .await
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The queue is full (3): a low job is refused, a high one displaces the newest low one.
        assert!(matches!(
            pool.run(Priority::Low, || ()).await,
            Err(BlockingError::Saturated("test"))
        ));
        let (pool2, order2) = (pool.clone(), Arc::clone(&order));
        let high2 = tokio::spawn(async move {
            pool2
                .run(Priority::High, move || order2.lock().unwrap().push("high2"))
                .await
        });
        blocker.await.unwrap().unwrap();
        high2.await.unwrap().unwrap();
        let results: Vec<_> = futures_results(jobs).await;
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(BlockingError::Saturated("test"))));
        assert!(results[2].is_ok());
        assert_eq!(*order.lock().unwrap(), vec!["high1", "high2", "low1"]);
    }

    async fn futures_results(
        jobs: Vec<tokio::task::JoinHandle<Result<(), BlockingError>>>,
    ) -> Vec<Result<(), BlockingError>> {
        let mut out = Vec::new();
        for job in jobs {
            out.push(job.await.unwrap());
        }
        out
    }
}
