//! End-to-end relay bench: group-commit inbox writes, online 1:1 delivery through a real
//! in-process server (QUIC + TLS on loopback, synced fjall), and the drain of an offline
//! backlog. Bodies are opaque bytes of `--size` (the server never looks inside; client-side
//! sealing is measured by the e2e unit tests, not here).
//!
//! `cargo bench --bench relay [-- --pairs 50 --messages 10000 --size 128 --backlog 100000
//! --store-writes 20000 --window 8]` (`--window`: sends in flight per sender)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use securefastchat::client::{Client, ClientOptions};
use securefastchat::protocol::{MessageId, Password, Username};
use securefastchat::server::{Server, ServerConfig, TlsSource};
use securefastchat::store::{
    AppendHooks, Copy, Durability, FjallStore, NewMessage, Store, StoreOptions, UserRecord,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// `cargo bench` passes `--bench` to every bench target; it is accepted and ignored.
#[derive(Parser)]
struct Args {
    /// Sender/receiver pairs of the online relay
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Messages of the online relay, in all
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Body bytes
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Messages stored for the offline user, then drained
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Inbox appends of the store benches
    #[arg(long, default_value_t = 20_000)]
    store_writes: usize,
    /// Sends in flight per sender
    #[arg(long, default_value_t = 8)]
    window: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0
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
    store_writes(&args).await?;
    relay(&args).await?;
    backlog(&args).await?;
    Ok(())
}

/// Durable appends from 64 concurrent writers: group commit vs a sync per message.
async fn store_writes(args: &Args) -> anyhow::Result<()> {
    let cases = [
        ("sync, group commit (batch <= 1024)", Durability::Sync, 1024),
        ("sync, one sync per message", Durability::Sync, 1),
        ("buffered, group commit", Durability::Buffered, 1024),
    ];
    for (name, durability, max_batch) in cases {
        let dir = tempfile::tempdir()?;
        let options = StoreOptions {
            durability,
            max_pending: u64::MAX,
            max_batch,
            ..StoreOptions::default()
        };
        let path = dir.path().to_owned();
        let store = Arc::new(
            tokio::task::spawn_blocking(move || FjallStore::open_with(&path, options)).await??,
        );
        let writers = 64;
        let per_writer = args.store_writes / writers;
        for w in 0..writers {
            for role in ["sender", "recipient"] {
                let record = UserRecord {
                    password_hash: "unused".into(),
                    created_at: 0,
                };
                let name = Username::parse(&format!("{role}{w:03}"))?;
                store.create_user(&name, record).await?;
            }
        }
        let body = vec![0x5a; args.size];
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for w in 0..writers {
            let (store, body) = (Arc::clone(&store), body.clone());
            tasks.spawn(async move {
                let sender = Username::parse(&format!("sender{w:03}"))?;
                let recipient = Username::parse(&format!("recipient{w:03}"))?;
                for i in 0..per_writer {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    store
                        .append(
                            NewMessage {
                                sender: sender.clone(),
                                sender_device: 1,
                                to: recipient.clone(),
                                id: MessageId(id),
                                kind: "text".into(),
                                copies: vec![Copy {
                                    recipient: recipient.clone(),
                                    device: 1,
                                    body: body.clone(),
                                }],
                                sent_at: 0,
                                expires_at: u64::MAX,
                            },
                            AppendHooks::default(),
                        )
                        .await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let elapsed = start.elapsed();
        let total = writers * per_writer;
        println!(
            "store appends, {name:<36} {total} in {:>6.2} s = {:>9.0} msg/s",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        );
    }
    Ok(())
}

struct Running {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), securefastchat::server::ServerError>>,
    options: ClientOptions,
    _dir: tempfile::TempDir,
}

async fn start_server() -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse()?,
        dir.path().join("data"),
        TlsSource::Dev {
            dir: dir.path().join("certs"),
        },
    );
    config.signups_per_minute = 0;
    config.failed_logins_per_minute = 0;
    config.max_pending = 1_000_000;
    // One sender fills the backlog and every sender sends at full speed.
    config.max_pending_per_sender = 0;
    config.max_pending_bytes_per_sender = 0;
    config.sends_per_minute = 0;
    let server = Server::bind(config).await?;
    let options = ClientOptions::new(
        server.local_addr()?.to_string(),
        dir.path().join("certs/ca.crt"),
    );
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(server.run(shutdown.clone()));
    Ok(Running {
        shutdown,
        handle,
        options,
        _dir: dir,
    })
}

async fn user(
    options: &ClientOptions,
    name: &str,
) -> anyhow::Result<(Client, securefastchat::protocol::SessionToken)> {
    let client = Client::connect(options).await?;
    let (_, token) = client.signup(name, Password::new("bench password")).await?;
    Ok((client, token))
}

/// Receives until `expected` messages arrived; acks in batches; returns latencies (ns).
async fn receive_all(
    client: Arc<Client>,
    expected: usize,
    stamp: bool,
) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::with_capacity(if stamp { expected } else { 0 });
    let mut pending_acks = Vec::new();
    let mut got = 0;
    while got < expected {
        let Some(message) = client.next_delivery(Duration::from_secs(30)).await else {
            anyhow::bail!("receiver stalled after {got} of {expected}");
        };
        if stamp {
            let sent = u64::from_be_bytes(message.body[..8].try_into()?);
            latencies.push(now_nanos().saturating_sub(sent));
        }
        pending_acks.push(message.seq);
        got += 1;
        if pending_acks.len() >= 256 || got == expected {
            client.ack(std::mem::take(&mut pending_acks)).await?;
        }
    }
    Ok(latencies)
}

/// Online delivery: `pairs` senders each send to their own online receiver.
async fn relay(args: &Args) -> anyhow::Result<()> {
    let server = start_server().await?;
    let per_pair = args.messages / args.pairs;
    let mut senders = Vec::new();
    let mut receivers = JoinSet::new();
    for p in 0..args.pairs {
        let (sender, _) = user(&server.options, &format!("s{p:04}")).await?;
        let (receiver, _) = user(&server.options, &format!("r{p:04}")).await?;
        senders.push(Arc::new(sender));
        receivers.spawn(receive_all(Arc::new(receiver), per_pair, true));
    }
    let window = args.window.max(1);
    let start = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut sending = JoinSet::new();
    for (p, sender) in senders.iter().enumerate() {
        let (sender, sent, size) = (Arc::clone(sender), Arc::clone(&sent), args.size.max(8));
        sending.spawn(async move {
            let slots = Arc::new(Semaphore::new(window));
            let mut inflight = JoinSet::new();
            for i in 0..per_pair {
                let permit = Arc::clone(&slots).acquire_owned().await?;
                let sender = Arc::clone(&sender);
                let sent = Arc::clone(&sent);
                inflight.spawn(async move {
                    let mut body = vec![0u8; size];
                    body[..8].copy_from_slice(&now_nanos().to_be_bytes());
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    sender
                        .send_message(&format!("r{p:04}"), "text", MessageId(id), &body)
                        .await?;
                    sent.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    anyhow::Ok(())
                });
            }
            while let Some(done) = inflight.join_next().await {
                done??;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = sending.join_next().await {
        done??;
    }
    let mut latencies = Vec::new();
    while let Some(done) = receivers.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    println!(
        "relay, {} pairs x {per_pair}, {} B, window {window}, sync: sent {} delivered {} in {:.2} s = {:.0} msg/s; \
         latency p50 {:.0} us p90 {:.0} us p99 {:.0} us max {:.0} us",
        args.pairs,
        args.size,
        sent.load(Ordering::Relaxed),
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    server.shutdown.cancel();
    server.handle.await??;
    Ok(())
}

/// A backlog of `backlog` messages for an offline user, then the time to drain it at login.
async fn backlog(args: &Args) -> anyhow::Result<()> {
    let server = start_server().await?;
    let (bob, bob_token) = user(&server.options, "bob").await?;
    bob.close().await;
    let senders = 4;
    let per_sender = args.backlog / senders;
    let fill = Instant::now();
    let mut tasks = JoinSet::new();
    for s in 0..senders {
        let (client, _) = user(&server.options, &format!("sender{s}")).await?;
        let (client, size) = (Arc::new(client), args.size);
        tasks.spawn(async move {
            let slots = Arc::new(Semaphore::new(32));
            let mut inflight = JoinSet::new();
            for i in 0..per_sender {
                let permit = Arc::clone(&slots).acquire_owned().await?;
                let client = Arc::clone(&client);
                inflight.spawn(async move {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    client
                        .send_message("bob", "text", MessageId(id), &vec![0x42; size])
                        .await?;
                    drop(permit);
                    anyhow::Ok(())
                });
            }
            while let Some(done) = inflight.join_next().await {
                done??;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let total = senders * per_sender;
    let fill = fill.elapsed();
    println!(
        "backlog fill: {total} messages from {senders} senders in {:.2} s = {:.0} msg/s (sync)",
        fill.as_secs_f64(),
        total as f64 / fill.as_secs_f64()
    );
    let bob = Client::connect(&server.options).await?;
    let start = Instant::now();
    bob.resume(bob_token).await?;
    receive_all(Arc::new(bob), total, false).await?;
    let drained = start.elapsed();
    println!(
        "backlog drain: {total} messages to one client in {:.2} s = {:.0} msg/s (acks every 256)",
        drained.as_secs_f64(),
        total as f64 / drained.as_secs_f64()
    );
    server.shutdown.cancel();
    server.handle.await??;
    Ok(())
}
