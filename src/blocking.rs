//! A bounded gateway to tokio's blocking threads, for fjall and argon2 calls.
//!
//! Each job first takes a permit from a semaphore and carries it into the blocking closure, so
//! at most `limit` jobs of one pool run at once and the rest wait asynchronously; a waiter queue
//! longer than `max_waiting` is refused at once instead of growing without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

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
}
