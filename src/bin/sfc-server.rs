//! `sfc-server`: parses flags, environment and the config file, then runs the server.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use securefastchat::server::{ConfigLayer, Server};
use securefastchat::store::Durability;
use securefastchat::tls::DevCertificates;
use tokio_util::sync::CancellationToken;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// The server allocates with jemalloc: memory allocated on the runtime's threads is freed on
/// the inbox writer's and the other way round, where glibc's allocator was ≈ 20 % of the
/// server's CPU under relay load. jemalloc took 20 % off the server's CPU per message at full
/// speed for 6 % more RSS per idle connection (mimalloc: 7 % and 24 %); see
/// docs/BENCHMARKS.md.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the C symbol `malloc_conf`, prefixed as
/// tikv-jemalloc-sys builds it; `_RJEM_MALLOC_CONF` in the environment still overrides it).
/// Without them a server that goes quiet after a flood of connections keeps the freed memory:
/// jemalloc returns dirty pages only when the arena that holds them allocates again, and an
/// idle server allocates almost nothing. A background thread purges them instead, over about
/// a second (`dirty_decay_ms`), straight back to the kernel (`muzzy_decay_ms:0`: pages merely
/// marked free would still count in RSS until the kernel needs them). docs/ARCHITECTURE.md,
/// "Limits per connection", has the figures.
#[cfg(target_os = "linux")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// SecureFastChat server: end-to-end encrypted messaging over QUIC.
///
/// Settings come from flags, then SFC_* environment variables, then the TOML file given with
/// --config, then defaults. Without --cert/--key it runs in dev mode with certificates from
/// --certs (generated there if missing).
#[derive(Parser, Debug)]
#[command(name = "sfc-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// UDP address to listen on [default: 0.0.0.0:4433]
    #[arg(long, env = "SFC_LISTEN")]
    listen: Option<String>,
    /// Data directory [default: ./data]
    #[arg(long, env = "SFC_DATA")]
    data: Option<PathBuf>,
    /// Dev-certificate directory, used without --cert/--key [default: ./certs]
    #[arg(long, env = "SFC_CERTS")]
    certs: Option<PathBuf>,
    /// PEM certificate chain (production)
    #[arg(long, env = "SFC_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key (production)
    #[arg(long, env = "SFC_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// TOML config file (unknown keys are rejected)
    #[arg(long, env = "SFC_CONFIG")]
    config: Option<PathBuf>,
    /// Refuse connections beyond this many [default: 100000]
    #[arg(long, env = "SFC_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Refuse connections beyond this many from one client address (IPv6: one /64), 0 = no
    /// cap [default: 256]
    #[arg(long, env = "SFC_MAX_CONNECTIONS_PER_ADDRESS")]
    max_connections_per_address: Option<usize>,
    /// Close a connection not authenticated this many seconds after `hello` [default: 60]
    #[arg(long, env = "SFC_LOGIN_TIMEOUT_SECS")]
    login_timeout_secs: Option<u64>,
    /// Session token lifetime in seconds [default: 2592000 = 30 days]
    #[arg(long, env = "SFC_SESSION_TTL_SECS")]
    session_ttl_secs: Option<u64>,
    /// Password hashes computed at once [default: number of cores]
    #[arg(long, env = "SFC_PASSWORD_WORKERS")]
    password_workers: Option<usize>,
    /// Threads that serve connections, each with its own QUIC endpoint on the one port
    /// (SO_REUSEPORT); 0 = one multi-threaded runtime and one endpoint [default: number of
    /// cores]
    #[arg(long, env = "SFC_SHARDS")]
    shards: Option<usize>,
    /// Failed logins allowed per client address per minute, 0 = unlimited [default: 30]
    #[arg(long, env = "SFC_FAILED_LOGINS_PER_MINUTE")]
    failed_logins_per_minute: Option<u32>,
    /// Signups allowed per client address per minute, 0 = unlimited [default: 20]
    #[arg(long, env = "SFC_SIGNUPS_PER_MINUTE")]
    signups_per_minute: Option<u32>,
    /// Key bundle fetches allowed per user per minute, 0 = unlimited [default: 60]
    #[arg(long, env = "SFC_BUNDLE_FETCHES_PER_MINUTE")]
    bundle_fetches_per_minute: Option<u32>,
    /// `check_username` requests allowed per client address per minute, 0 = unlimited
    /// [default: 60]
    #[arg(long, env = "SFC_USERNAME_CHECKS_PER_MINUTE")]
    username_checks_per_minute: Option<u32>,
    /// Logins and signups one client address may have in flight at once, 0 = no cap
    /// [default: 2]
    #[arg(long, env = "SFC_PASSWORD_WORK_PER_ADDRESS")]
    password_work_per_address: Option<usize>,
    /// Undelivered messages are deleted after this many seconds [default: 604800 = 7 days]
    #[arg(long, env = "SFC_MESSAGE_TTL_SECS")]
    message_ttl_secs: Option<u64>,
    /// Largest message body in bytes [default: 65536]
    #[arg(long, env = "SFC_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<u64>,
    /// Largest group message body in bytes (a commit with its welcome) [default: 1048576]
    #[arg(long, env = "SFC_MAX_GROUP_MESSAGE_BYTES")]
    max_group_message_bytes: Option<u64>,
    /// Groups one account may be in [default: 1000]
    #[arg(long, env = "SFC_MAX_GROUPS_PER_ACCOUNT")]
    max_groups_per_account: Option<usize>,
    /// Pending messages an inbox may hold [default: 10000]
    #[arg(long, env = "SFC_MAX_PENDING")]
    max_pending: Option<u64>,
    /// sync: messages are on disk before they are acknowledged; buffered: in the OS only
    /// (survives a server crash, not a power loss) [default: sync]
    #[arg(long, env = "SFC_DURABILITY", value_enum)]
    durability: Option<Durability>,
    /// Milliseconds a message waits in memory for its recipients' acknowledgements before it
    /// is written; one acknowledged by then is never written (0 = write at once, at most
    /// 60000) [default: 20]
    #[arg(long, env = "SFC_WRITE_HOLD_MS")]
    write_hold_ms: Option<u64>,
    /// Serve Prometheus metrics over HTTP on this TCP address (an admin address: keep it off
    /// the internet) [default: off]
    #[arg(long, env = "SFC_METRICS")]
    metrics: Option<String>,
    /// Pending messages one sender may hold in one inbox, 0 = up to --max-pending
    /// [default: 1000]
    #[arg(long, env = "SFC_MAX_PENDING_PER_SENDER")]
    max_pending_per_sender: Option<u64>,
    /// Pending body bytes one sender may hold in one inbox, 0 = unlimited
    /// [default: 33554432 = 32 MiB]
    #[arg(long, env = "SFC_MAX_PENDING_BYTES_PER_SENDER")]
    max_pending_bytes_per_sender: Option<u64>,
    /// Messages one account may send per minute (and as a burst), 0 = unlimited
    /// [default: 3000]
    #[arg(long, env = "SFC_SENDS_PER_MINUTE")]
    sends_per_minute: Option<u32>,
    /// Seconds a deleted account's name cannot be signed up again
    /// [default: 2592000 = 30 days]
    #[arg(long, env = "SFC_NAME_HOLD_SECS")]
    name_hold_secs: Option<u64>,
    /// Seconds an opened device link (its code) waits for the new device, 1 to 3600
    /// [default: 300]
    #[arg(long, env = "SFC_LINK_TTL_SECS")]
    link_ttl_secs: Option<u64>,
    /// Longest blob (an uploaded file's ciphertext) in bytes
    /// [default: 104883200 = a 100 MiB file sealed]
    #[arg(long, env = "SFC_MAX_BLOB_BYTES")]
    max_blob_bytes: Option<u64>,
    /// Bytes of blobs, complete and unfinished, one account may hold
    /// [default: 1073741824 = 1 GiB]
    #[arg(long, env = "SFC_BLOB_QUOTA_BYTES")]
    blob_quota_bytes: Option<u64>,
    /// Blob uploads and downloads in flight on the whole server [default: 64]
    #[arg(long, env = "SFC_MAX_BLOB_STREAMS")]
    max_blob_streams: Option<usize>,
    /// Seconds an unfinished blob upload is kept after its last write
    /// [default: 86400 = 1 day]
    #[arg(long, env = "SFC_BLOB_UPLOAD_TTL_SECS")]
    blob_upload_ttl_secs: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a dev CA (ca.crt) and a server certificate and key (server.crt, server.key) for
    /// localhost, 127.0.0.1, ::1 and any --san names.
    GenCerts {
        /// Output directory
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Extra DNS name or IP address for the server certificate (repeatable)
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

/// Log filter unless `RUST_LOG` says otherwise: the server's own events at info, the store
/// engine's (fjall, lsm_tree: about 22 lines of recovery at every start) only from warn.
const DEFAULT_LOG_FILTER: &str = "info,fjall=warn,lsm_tree=warn";
/// Log lines that may wait for the log thread; past that, new lines are dropped (about 3 MB at
/// ≈ 200 bytes a line).
const LOG_QUEUE_LINES: usize = 16_384;
/// How long the end of the process waits for queued log lines to be written.
const LOG_FLUSH_WAIT: Duration = Duration::from_secs(2);
/// How long a second signal waits for queued log lines before the process exits.
const LOG_FLUSH_WAIT_FORCED: Duration = Duration::from_millis(200);
/// A signal this soon after the first is the same request, not a second one: `timeout(1)`
/// signals both the server and its own process group, so the server gets it twice at once.
const SAME_REQUEST: Duration = Duration::from_millis(100);
/// How long the runtime waits for blocking jobs (argon2, store calls) once the server is done.
const RUNTIME_STOP_WAIT: Duration = Duration::from_secs(5);

/// The log thread's guard, taken by whichever ends the process first (see [`flush_logs`]).
static LOG_GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Exit codes: 0 after a graceful shutdown, 1 on an error, and 128 + the signal's number
/// (130 for SIGINT, 143 for SIGTERM) when a second signal cut the graceful shutdown short.
fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = run(cli);
    // The log lines first, then the error after them.
    flush_logs(LOG_FLUSH_WAIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stderr is no reason to panic.
            let _ = writeln!(std::io::stderr(), "sfc-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr through a thread of their own, and logging can neither stop nor stall
/// the server:
/// - a line that cannot be written (the pipe closed: `sfc-server 2>&1 | tee log` after tee
///   died) is dropped. Before, tracing-subscriber reported the failed write with `eprintln!`,
///   which panics when stderr is broken: the task that logged died, and when that was the
///   signal handler, the shutdown never started and only SIGKILL ended the process;
/// - a pipe that stops being read (a stopped `tee`, a full pager) blocks only the log thread:
///   the runtime's threads hand lines to a bounded queue (tracing-appender's non-blocking
///   writer, lossy) and drop them when it is full, instead of blocking on stderr's lock;
/// - SIGPIPE stays ignored (Rust's runtime ignores it before `main`), so a closed log pipe
///   is an error on a write, not the end of the process.
fn init_logging() {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("sfc-log")
        .finish(LossyStderr);
    if let Ok(mut slot) = LOG_GUARD.lock() {
        *slot = Some(guard);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .init();
}

/// Writes what the log thread has queued, waiting at most `wait`. The guard is dropped on a
/// thread of its own: dropping it waits for the log thread (bounded), and in one case prints
/// to stdout (`println!`), which could block on a stalled pipe or panic on a closed one.
fn flush_logs(wait: Duration) {
    let Some(guard) = LOG_GUARD.lock().ok().and_then(|mut slot| slot.take()) else {
        return;
    };
    let (done, flushed) = std::sync::mpsc::channel();
    let flusher = std::thread::Builder::new()
        .name("sfc-log-flush".into())
        .spawn(move || {
            drop(guard);
            let _ = done.send(());
        });
    if flusher.is_ok() {
        let _ = flushed.recv_timeout(wait);
    }
}

/// Standard error that never fails: a line it cannot write is dropped.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::GenCerts { dir, sans }) = &cli.command {
        let certs = DevCertificates::generate(sans).context("generating dev certificates")?;
        certs
            .write_to(dir)
            .with_context(|| format!("writing certificates to {}", dir.display()))?;
        let _ = writeln!(
            std::io::stdout(),
            "wrote {0}/ca.crt, {0}/server.crt and {0}/server.key; clients trust {0}/ca.crt",
            dir.display()
        );
        return Ok(());
    }
    let file = match &cli.config {
        Some(path) => ConfigLayer::from_file(path)?,
        None => ConfigLayer::default(),
    };
    let flags = ConfigLayer {
        listen: cli.listen,
        data: cli.data,
        certs: cli.certs,
        cert: cli.cert,
        key: cli.key,
        max_connections: cli.max_connections,
        max_connections_per_address: cli.max_connections_per_address,
        login_timeout_secs: cli.login_timeout_secs,
        session_ttl_secs: cli.session_ttl_secs,
        password_workers: cli.password_workers,
        shards: cli.shards,
        failed_logins_per_minute: cli.failed_logins_per_minute,
        signups_per_minute: cli.signups_per_minute,
        bundle_fetches_per_minute: cli.bundle_fetches_per_minute,
        username_checks_per_minute: cli.username_checks_per_minute,
        password_work_per_address: cli.password_work_per_address,
        message_ttl_secs: cli.message_ttl_secs,
        max_message_bytes: cli.max_message_bytes,
        max_group_message_bytes: cli.max_group_message_bytes,
        max_groups_per_account: cli.max_groups_per_account,
        max_pending: cli.max_pending,
        durability: cli.durability,
        write_hold_ms: cli.write_hold_ms,
        metrics: cli.metrics,
        max_pending_per_sender: cli.max_pending_per_sender,
        max_pending_bytes_per_sender: cli.max_pending_bytes_per_sender,
        sends_per_minute: cli.sends_per_minute,
        name_hold_secs: cli.name_hold_secs,
        link_ttl_secs: cli.link_ttl_secs,
        max_blob_bytes: cli.max_blob_bytes,
        blob_quota_bytes: cli.blob_quota_bytes,
        max_blob_streams: cli.max_blob_streams,
        blob_upload_ttl_secs: cli.blob_upload_ttl_secs,
    };
    let config = flags.over(file).resolve()?;

    // Signals are watched from before the store opens to the very end of the process, on a
    // thread of their own: a second signal must work while the runtime winds down too.
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone())?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(async move {
        let server = Server::bind(config).await.context("starting the server")?;
        server.run(shutdown).await.context("running the server")
    });
    // The store is flushed and closed by now; a blocking job still running (a hash nobody
    // waits for) must not hold the exit.
    runtime.shutdown_timeout(RUNTIME_STOP_WAIT);
    result
}

/// Listens for SIGINT and SIGTERM (registered before this returns) on a thread with a small
/// runtime of its own; see [`stop_on_signals`].
fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal watcher")?;
    let signals = {
        let _entered = runtime.enter();
        StopSignals::listen().context("listening for SIGINT and SIGTERM")?
    };
    std::thread::Builder::new()
        .name("sfc-signals".into())
        .spawn(move || runtime.block_on(stop_on_signals(signals, shutdown)))
        .context("starting the signal watcher")?;
    Ok(())
}

/// The first SIGINT or SIGTERM starts the graceful shutdown; a second one ends the process at
/// once with 128 + its number. The token is cancelled before anything is logged: nothing
/// that can fail stands between a signal and the shutdown.
async fn stop_on_signals(mut signals: StopSignals, shutdown: CancellationToken) {
    let Some(first) = signals.next().await else {
        return;
    };
    shutdown.cancel();
    tracing::info!(
        signal = first.name(),
        "shutting down gracefully; a second SIGINT or SIGTERM stops at once"
    );
    let first_at = std::time::Instant::now();
    while let Some(second) = signals.next().await {
        if first_at.elapsed() < SAME_REQUEST {
            continue;
        }
        tracing::warn!(
            signal = second.name(),
            "second signal: exiting now, without waiting for connections"
        );
        flush_logs(LOG_FLUSH_WAIT_FORCED);
        std::process::exit(128 + second.number());
    }
}

/// A signal that stops the server.
#[derive(Debug, Clone, Copy)]
enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        }
    }

    /// The signal's number (the same on every Unix for these two).
    fn number(self) -> i32 {
        match self {
            Self::Interrupt => 2,
            Self::Terminate => 15,
        }
    }
}

/// Listeners for SIGINT and SIGTERM, registered once so that no signal falls between two
/// waits.
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Registers the listeners; call it inside a runtime.
    fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// The next signal; `None` if they can no longer be received.
    async fn next(&mut self) -> Option<StopSignal> {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = self.interrupt.recv() => Some(StopSignal::Interrupt),
                Some(()) = self.terminate.recv() => Some(StopSignal::Terminate),
                else => None,
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c()
                .await
                .ok()
                .map(|()| StopSignal::Interrupt)
        }
    }
}
