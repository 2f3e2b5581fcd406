//! Shards: the server's connections on one single-threaded tokio runtime per core.
//!
//! Each shard is a thread running a current-thread runtime with its own QUIC endpoint, all
//! endpoints on one UDP port (`SO_REUSEPORT`). A connection lives on the shard whose socket the
//! kernel gave its first packet: its endpoint task, its connection driver, its streams and its
//! deliveries run on that one thread, so the events of one message wake no other thread except
//! where the message itself crosses to a connection of another shard. With one multi-threaded
//! runtime the workers woke each other for nearly every event (docs/BENCHMARKS.md, "Shards").
//!
//! A packet that reaches the wrong shard (a client whose address changed, so the kernel's hash
//! picks another socket) is passed to the shard that holds its connection: see
//! `transport::routing`.

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The shard threads and their runtimes.
pub(crate) struct Shards {
    threads: Vec<ShardThread>,
}

struct ShardThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Shards {
    /// Starts `count` shard threads (at least one). Blocking: thread start-up.
    pub(crate) fn start(count: usize) -> io::Result<Self> {
        let mut threads = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            threads.push(ShardThread::start(index)?);
        }
        Ok(Self { threads })
    }

    /// The shards' runtimes, in shard order.
    pub(crate) fn handles(&self) -> Vec<Handle> {
        self.threads.iter().map(|t| t.handle.clone()).collect()
    }

    /// Stops every shard's runtime (dropping what still runs there) and waits for its thread.
    pub(crate) async fn stop(mut self) {
        let mut joins = Vec::with_capacity(self.threads.len());
        for thread in &mut self.threads {
            if let Some(stop) = thread.stop.take() {
                let _ = stop.send(());
            }
            joins.extend(thread.thread.take());
        }
        let joined = tokio::task::spawn_blocking(move || {
            for join in joins {
                if join.join().is_err() {
                    tracing::warn!("a shard thread panicked");
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::warn!("could not wait for the shard threads");
        }
    }
}

impl ShardThread {
    fn start(index: usize) -> io::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("sfc-shard-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| io::Error::other("a shard thread ended before its runtime started"))??;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ShardThread {
    /// A server dropped without running (or a failed start) still ends its threads; they are
    /// not waited for.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
