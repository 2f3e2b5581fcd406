//! `sfc-server`: parses flags, environment and the config file, then runs the server.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use securefastchat::server::{ConfigLayer, Server};
use securefastchat::store::Durability;
use securefastchat::tls::DevCertificates;
use tokio_util::sync::CancellationToken;
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
    /// Failed logins allowed per client address per minute, 0 = unlimited [default: 30]
    #[arg(long, env = "SFC_FAILED_LOGINS_PER_MINUTE")]
    failed_logins_per_minute: Option<u32>,
    /// Signups allowed per client address per minute, 0 = unlimited [default: 20]
    #[arg(long, env = "SFC_SIGNUPS_PER_MINUTE")]
    signups_per_minute: Option<u32>,
    /// Key bundle fetches allowed per user per minute, 0 = unlimited [default: 60]
    #[arg(long, env = "SFC_BUNDLE_FETCHES_PER_MINUTE")]
    bundle_fetches_per_minute: Option<u32>,
    /// Undelivered messages are deleted after this many seconds [default: 604800 = 7 days]
    #[arg(long, env = "SFC_MESSAGE_TTL_SECS")]
    message_ttl_secs: Option<u64>,
    /// Largest message body in bytes [default: 65536]
    #[arg(long, env = "SFC_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<u64>,
    /// Pending messages an inbox may hold [default: 10000]
    #[arg(long, env = "SFC_MAX_PENDING")]
    max_pending: Option<u64>,
    /// sync: messages are on disk before they are acknowledged; buffered: in the OS only
    /// (survives a server crash, not a power loss) [default: sync]
    #[arg(long, env = "SFC_DURABILITY", value_enum)]
    durability: Option<Durability>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sfc-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::GenCerts { dir, sans }) = &cli.command {
        let certs = DevCertificates::generate(sans).context("generating dev certificates")?;
        certs
            .write_to(dir)
            .with_context(|| format!("writing certificates to {}", dir.display()))?;
        println!(
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
        failed_logins_per_minute: cli.failed_logins_per_minute,
        signups_per_minute: cli.signups_per_minute,
        bundle_fetches_per_minute: cli.bundle_fetches_per_minute,
        message_ttl_secs: cli.message_ttl_secs,
        max_message_bytes: cli.max_message_bytes,
        max_pending: cli.max_pending,
        durability: cli.durability,
    };
    let config = flags.over(file).resolve()?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(config).await.context("starting the server")?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        server.run(shutdown).await.context("running the server")
    })
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received");
    shutdown.cancel();
}
