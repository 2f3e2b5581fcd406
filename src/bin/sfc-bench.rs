//! `sfc-bench`: the load generator. Parses arguments and runs a scenario of the library's
//! `bench` module against a running server or one it spawns.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use securefastchat::bench::progress::{Display, Style};
use securefastchat::bench::{self, BenchOptions, Scenario, Target};
use securefastchat::store::Durability;

/// The load generator allocates with jemalloc, as the server does: it shares the cores with
/// the server it measures, and glibc's malloc and free were ≈ 10 % of all CPU under relay load
/// (perf). mimalloc, its allocator until the tenth pass, measured the same CPU per message and
/// a little more memory, so one allocator serves both (docs/BENCHMARKS.md).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Load generator for SecureFastChat: real clients (QUIC, TLS) against a server.
///
/// A wrong-password login flood has options of its own: `sfc-bench flood-logins --help`; so
/// has sending a file: `sfc-bench file --help`, and a group's fan-out: `sfc-bench fanout --help`.
#[derive(Parser, Debug)]
#[command(name = "sfc-bench", version)]
struct Cli {
    /// What to measure
    #[arg(value_enum)]
    scenario: Scenario,
    /// Server address (with --ca); without it, --spawn is implied
    #[arg(long)]
    server: Option<String>,
    /// CA certificate of --server
    #[arg(long, default_value = "certs/ca.crt")]
    ca: PathBuf,
    /// Start a server with a temporary data directory as a child (to read its CPU and memory)
    #[arg(long)]
    spawn: bool,
    /// The sfc-server binary for --spawn [default: next to this program]
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Durability of the spawned server
    #[arg(long, value_enum, default_value = "sync")]
    durability: Durability,
    /// Pairs (relay), users (offline), concurrent loops (login, resume, handshake), connections
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Total messages (or operations) per second; omitted = full speed
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load (or of holding connections)
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Plaintext bytes per message (each is sealed end to end: the envelope on the wire adds
    /// its ratchet header, the X3DH initial header until the peer replies, and a 16-byte tag)
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Sends in flight per sender at full speed
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Messages per user in the offline scenario
    #[arg(long, default_value_t = 1000)]
    backlog: usize,
    /// Client UDP sockets (quinn endpoints) that the connections share, round-robin; 0 gives
    /// each connection its own socket, as each phone has. Every connection still makes its own
    /// QUIC connection, TLS handshake and end-to-end sessions either way
    #[arg(long, default_value_t = 4)]
    client_sockets: usize,
    /// Flood: loopback source addresses (127.1.0.1 on) to spread the connections over; 0 lets
    /// the system choose
    #[arg(long, default_value_t = 0)]
    sources: usize,
    /// Flood: times to open, hold and close the connections
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Relay: devices per user, 1 to 8. Devices 2..N are linked to device 1 through the server
    /// (SPAKE2, as a person links a laptop); the sender's device 1 sends, and each message
    /// carries a copy for each of the receiver's devices and each of the sender's others, all
    /// of which receive. With 1 the send headers carry no copy lists (as before devices)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    devices: u8,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // `sfc-bench flood-logins ...` has options of its own (src/bench/flood_logins.rs).
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("flood-logins") => {
            init_logging();
            return bench::flood_logins::cli_main(args.collect());
        }
        // `sfc-bench fanout ...`: group message fan-out and commits (src/bench/fanout.rs).
        Some("fanout") => {
            init_logging();
            return bench::fanout::cli_main(args.collect());
        }
        // `sfc-bench file ...`: one file end to end (src/bench/file.rs).
        Some("file") => {
            init_logging();
            return bench::file::cli_main(args.collect());
        }
        _ => {}
    }
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sfc-bench: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sfc-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let target = match (&cli.server, cli.spawn) {
        (Some(server), false) => Target::remote(server.clone(), cli.ca.clone()),
        _ => {
            let bin = match &cli.server_bin {
                Some(bin) => bin.clone(),
                None => std::env::current_exe()?.with_file_name("sfc-server"),
            };
            let durability = match cli.durability {
                Durability::Sync => "sync",
                Durability::Buffered => "buffered",
            };
            Target::spawn(&bin, &["--durability".into(), durability.into()])
                .await
                .context("starting the server")?
        }
    };
    let options = BenchOptions {
        scenario: cli.scenario,
        clients: cli.clients.max(1),
        rate: cli.rate.filter(|r| *r > 0.0),
        duration: Duration::from_secs_f64(cli.duration.max(0.1)),
        size: cli.size,
        window: cli.window,
        backlog: cli.backlog,
        client_sockets: cli.client_sockets,
        sources: cli.sources,
        rounds: cli.rounds,
        devices: usize::from(cli.devices),
    };
    // On stderr, so that stdout stays one JSON object with --json.
    let progress = Display::start(Style::for_stderr());
    let report = bench::run(&target, &options).await;
    progress.finish();
    target.stop().await;
    let report = report?;
    if cli.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
