//! Bounded pools for blocking work: [`BlockingPool`], a gateway to tokio's blocking threads for
//! fjall calls, and [`PriorityPool`], dedicated low-priority threads for argon2.
//!
//! In a [`BlockingPool`] each job first takes a permit from a semaphore and carries it into the
//! blocking closure, so at most `limit` jobs of one pool run at once and the rest wait
//! asynchronously; a waiter queue longer than `max_waiting` is refused at once instead of
//! growing without bound.
//!
//! A [`PriorityPool`] runs jobs on its own threads, at a lower scheduling priority than the
//! runtime, so that password hashing uses the CPU that message relaying leaves idle instead of
//! competing with it. Its jobs come in two classes, each with its own queue and its own threads:
//! [`Priority::High`] jobs (and [`Priority::Urgent`] ones, which go before them) run at nice
//! [`WORKER_NICE`], [`Priority::Low`] ones under Linux's
//! `SCHED_IDLE` policy, which any runnable normal thread preempts at once. A flood of low work
//! therefore neither delays high work nor takes CPU from relaying. When the queues together are
//! full a high job displaces the newest low one (which fails as saturated) instead of being
//! refused.

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

/// The nice value of [`PriorityPool`] threads for high jobs (and for low ones where
/// `SCHED_IDLE` is refused): CFS gives a nice-10 thread about a tenth of the weight of a nice-0
/// one, so the runtime's workers win a contended core.
pub const WORKER_NICE: i32 = 10;

/// The nice value of low-job threads where `SCHED_IDLE` cannot be set.
const LOW_FALLBACK_NICE: i32 = 19;

/// The class of a [`PriorityPool`] job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Runs on the high threads, before every queued high job.
    Urgent,
    /// Runs on the high threads, never behind a low job.
    High,
    /// Runs on the low threads, with only the CPU nothing else wants.
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
    urgent: VecDeque<Queued>,
    high: VecDeque<Queued>,
    low: VecDeque<Queued>,
    closed: bool,
}

impl Queues {
    fn len(&self) -> usize {
        self.urgent.len() + self.high.len() + self.low.len()
    }

    fn next(&mut self, class: Priority) -> Option<Queued> {
        match class {
            Priority::Urgent | Priority::High => {
                self.urgent.pop_front().or_else(|| self.high.pop_front())
            }
            Priority::Low => self.low.pop_front(),
        }
    }

    /// Drops jobs whose waiter is gone (cancelled requests), to make room.
    fn forget_abandoned(&mut self) {
        self.urgent.retain(|q| (q.live)());
        self.high.retain(|q| (q.live)());
        self.low.retain(|q| (q.live)());
    }
}

struct PoolState {
    queues: Mutex<Queues>,
    /// Wakes a high thread.
    high_ready: Condvar,
    /// Wakes a low thread.
    low_ready: Condvar,
}

impl PoolState {
    fn ready(&self, class: Priority) -> &Condvar {
        match class {
            Priority::Urgent | Priority::High => &self.high_ready,
            Priority::Low => &self.low_ready,
        }
    }
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
        self.state.high_ready.notify_all();
        self.state.low_ready.notify_all();
    }
}

/// A named pool of dedicated, low-priority threads: a bounded queue and a set of threads for
/// each of the two classes.
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
    /// Starts `workers` threads (at least one) for each class, with at most `max_waiting` jobs
    /// queued in all. At most `workers` jobs of each class run at once.
    pub fn new(
        name: &'static str,
        workers: usize,
        max_waiting: usize,
    ) -> Result<Self, std::io::Error> {
        let state = Arc::new(PoolState {
            queues: Mutex::new(Queues::default()),
            high_ready: Condvar::new(),
            low_ready: Condvar::new(),
        });
        for class in [Priority::High, Priority::Low] {
            let tag = match class {
                Priority::Urgent | Priority::High => "",
                Priority::Low => "-idle",
            };
            for index in 0..workers.max(1) {
                let state = Arc::clone(&state);
                std::thread::Builder::new()
                    .name(format!("{name}{tag}-{index}"))
                    .spawn(move || work(&state, class))?;
            }
        }
        Ok(Self {
            name,
            handle: Arc::new(PoolHandle { state }),
            max_waiting,
        })
    }

    /// Runs `job` on a thread of its class, after the jobs of that class queued before it.
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
                Priority::Urgent | Priority::High => queues.low.pop_back(),
                Priority::Low => None,
            };
            match displaced {
                Some(displaced) => (displaced.displace)(),
                None => return Err(BlockingError::Saturated(self.name)),
            }
        }
        match priority {
            Priority::Urgent => queues.urgent.push_back(queued),
            Priority::High => queues.high.push_back(queued),
            Priority::Low => queues.low.push_back(queued),
        }
        drop(queues);
        state.ready(priority).notify_one();
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

/// A pool thread of `class`: lowers its own priority, then runs that class's jobs until the
/// pool closes.
fn work(state: &PoolState, class: Priority) {
    lower_priority(class);
    loop {
        let next = {
            let Ok(mut queues) = state.queues.lock() else {
                return;
            };
            loop {
                if queues.closed {
                    return;
                }
                if let Some(next) = queues.next(class) {
                    break next;
                }
                queues = match state.ready(class).wait(queues) {
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

/// Best effort: a thread that cannot lower its priority still works, at the normal one. Low
/// threads ask for `SCHED_IDLE` (allowed without privileges: it only lowers) and fall back to
/// nice [`LOW_FALLBACK_NICE`].
fn lower_priority(class: Priority) {
    #[cfg(target_os = "linux")]
    {
        if class == Priority::Low {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is a valid sched_param that outlives the call; on Linux pid 0
            // names the calling thread, which is the one being lowered.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
                return;
            }
            tracing::debug!("could not put a low pool thread under SCHED_IDLE");
        }
        let nice = match class {
            Priority::Urgent | Priority::High => WORKER_NICE,
            Priority::Low => LOW_FALLBACK_NICE,
        };
        // SAFETY: setpriority takes plain integers; on Linux `who = 0` with PRIO_PROCESS names
        // the calling thread, which is the one being lowered.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if result != 0 {
            tracing::debug!("could not lower the priority of a pool thread");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = class;
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

    /// Occupies the thread of `class` of a one-thread-per-class pool for `ms`.
    fn occupy(
        pool: &PriorityPool,
        class: Priority,
        ms: u64,
    ) -> tokio::task::JoinHandle<Result<(), BlockingError>> {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.run(class, move || std::thread::sleep(Duration::from_millis(ms)))
                .await
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn high_jobs_displace_low_ones_when_the_queue_is_full() {
        let pool = PriorityPool::new("test", 1, 3).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let blockers = [
            occupy(&pool, Priority::High, 200),
            occupy(&pool, Priority::Low, 200),
        ];
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
        // The queues are full (3): a low job is refused, a high one displaces the newest low one.
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
        for blocker in blockers {
            blocker.await.unwrap().unwrap();
        }
        high2.await.unwrap().unwrap();
        let results: Vec<_> = futures_results(jobs).await;
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(BlockingError::Saturated("test"))));
        assert!(results[2].is_ok());
        let order = order.lock().unwrap().clone();
        let highs: Vec<&str> = order
            .iter()
            .copied()
            .filter(|l| l.starts_with("high"))
            .collect();
        assert_eq!(highs, ["high1", "high2"]);
        assert!(
            order.contains(&"low1") && !order.contains(&"low2"),
            "{order:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn urgent_jobs_go_before_queued_high_ones() {
        let pool = PriorityPool::new("test", 1, 8).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let blocker = occupy(&pool, Priority::High, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut jobs = Vec::new();
        for (label, priority) in [
            ("high1", Priority::High),
            ("high2", Priority::High),
            ("urgent", Priority::Urgent),
        ] {
            let (pool, order) = (pool.clone(), Arc::clone(&order));
            jobs.push(tokio::spawn(async move {
                pool.run(priority, move || order.lock().unwrap().push(label))
                    .await
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        blocker.await.unwrap().unwrap();
        assert!(futures_results(jobs).await.iter().all(Result::is_ok));
        assert_eq!(*order.lock().unwrap(), ["urgent", "high1", "high2"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_low_job_does_not_delay_a_high_one() {
        let pool = PriorityPool::new("test", 1, 8).unwrap();
        let low = occupy(&pool, Priority::Low, 1_000);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let asked = std::time::Instant::now();
        pool.run(Priority::High, || ()).await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "{:?}",
            asked.elapsed()
        );
        low.await.unwrap().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn low_jobs_run_under_sched_idle_and_high_ones_niced() {
        let pool = PriorityPool::new("test", 1, 8).unwrap();
        // SAFETY: both calls take plain integers and name the calling thread.
        let scheduling = || unsafe {
            (
                libc::sched_getscheduler(0),
                libc::getpriority(libc::PRIO_PROCESS, 0),
            )
        };
        let (low_policy, low_nice) = pool.run(Priority::Low, scheduling).await.unwrap();
        assert!(
            low_policy == libc::SCHED_IDLE || low_nice == LOW_FALLBACK_NICE,
            "policy {low_policy}, nice {low_nice}"
        );
        let (high_policy, high_nice) = pool.run(Priority::High, scheduling).await.unwrap();
        // Threads inherit the policy of the process (SCHED_IDLE under `chrt -i 0`), and only
        // their nice value is lowered.
        // SAFETY: takes a plain integer and names the calling thread.
        let inherited = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(high_policy, inherited);
        assert_eq!(high_nice, WORKER_NICE);
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
