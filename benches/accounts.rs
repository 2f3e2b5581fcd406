//! End-to-end account bench: the per-hash cost of argon2 here, then signups and logins against
//! a real in-process server (QUIC, TLS, fjall with synced writes) with both cores busy.
//!
//! `cargo bench --bench accounts [-- --users N --concurrency C]`. Figures go to
//! `docs/BENCHMARKS.md` with the command that produced them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use securefastchat::client::{Client, ClientOptions};
use securefastchat::protocol::Password;
use securefastchat::server::password::Passwords;
use securefastchat::server::{Server, ServerConfig, TlsSource};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "correct horse battery staple";

/// `cargo bench` passes `--bench` to every bench target; it is accepted and ignored.
#[derive(Parser)]
struct Args {
    /// Accounts signed up, then logged in
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Clients at once
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// argon2 hashes timed on one worker
    #[arg(long, default_value_t = 40)]
    hashes: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

fn summary(name: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<28} n={:<5} median {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  rate {:>7.1}/s",
        samples.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        pick(1.0).as_secs_f64() * 1e3,
        samples.len() as f64 / wall.as_secs_f64(),
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()?.get()
    );

    // 1. argon2id (OWASP parameters) per hash, one at a time, memory buffer reused.
    let passwords = tokio::task::spawn_blocking(|| Passwords::new(1)).await??;
    let mut hashes = Vec::new();
    let wall = Instant::now();
    for _ in 0..args.hashes {
        let start = Instant::now();
        passwords.hash(Password::new(PASSWORD)).await?;
        hashes.push(start.elapsed());
    }
    summary("argon2id hash (1 worker)", hashes, wall.elapsed());

    // 2. A real server on loopback with synced fjall writes.
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse()?,
        dir.path().join("data"),
        TlsSource::Dev {
            dir: dir.path().join("certs"),
        },
    );
    // One loopback address plays hundreds of users: lift the per-address limits.
    config.signups_per_minute = 0;
    config.failed_logins_per_minute = 0;
    config.password_work_per_address = 0;
    let server = Server::bind(config).await?;
    let options = ClientOptions::new(
        server.local_addr()?.to_string(),
        dir.path().join("certs/ca.crt"),
    );
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));

    for phase in ["signup", "login"] {
        let limit = Arc::new(Semaphore::new(args.concurrency));
        let mut tasks = JoinSet::new();
        let wall = Instant::now();
        for i in 0..args.users {
            let (options, limit) = (options.clone(), Arc::clone(&limit));
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await?;
                let connect_start = Instant::now();
                let client = Client::connect(&options).await?;
                let connected = connect_start.elapsed();
                let name = format!("user{i:05}");
                let start = Instant::now();
                if phase == "signup" {
                    client.signup(&name, Password::new(PASSWORD)).await?;
                } else {
                    client.login(&name, Password::new(PASSWORD)).await?;
                }
                let request = start.elapsed();
                client.close().await;
                anyhow::Ok((connected, request, connect_start.elapsed()))
            });
        }
        let (mut connects, mut requests, mut totals) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(done) = tasks.join_next().await {
            let (c, r, t) = done??;
            connects.push(c);
            requests.push(r);
            totals.push(t);
        }
        let wall = wall.elapsed();
        summary(&format!("{phase}: connect+hello"), connects, wall);
        summary(&format!("{phase}: request"), requests, wall);
        summary(&format!("{phase}: whole"), totals, wall);
    }
    shutdown.cancel();
    handle.await??;
    Ok(())
}
