//! The floor under `sfc-bench relay`: the relay's traffic on QUIC and TLS alone, with the
//! server's and the client's exact configurations, and nothing of SecureFastChat above them (no
//! accounts, no store and no sync, no sealing, no decoding).
//!
//! For every message, as in a real relay of a 128-byte message:
//! - the sender opens a unidirectional stream and writes a `send` header frame and a 214-byte
//!   body (the size of the envelope that seals 128 bytes in a running session), then FIN;
//! - the server reads the stream to its end, opens a stream to the sender's partner and writes
//!   a `deliver` header frame and the body, then FIN; and it writes a `sent` event frame on the
//!   sender's control stream (a writer task per connection puts all waiting frames into one
//!   write, as the server does);
//! - the receiver reads the stream to its end and acknowledges what has arrived in one `ack`
//!   frame (up to 1,024 seqs) on its control stream, which the server reads and drops;
//! - each sender keeps 8 messages in flight (`sfc-bench`'s `--window`; `--window N` sets
//!   another number), a `sent` frame freeing one; or, with `--rate R`, the senders send R
//!   messages/s in all on an even schedule (`sfc-bench --rate`), and the latency from each
//!   message's intended send time to its arrival is reported; the pairs' connections share 4 client endpoints (`--client-sockets`).
//!
//! The frames are encoded by the protocol's own encoders, so their sizes are the real ones.
//!
//! ```text
//! cargo run --release --example relay_floor -- spawn PAIRS SECONDS [--window N] [--rate R]
//!     [--server-workers N] [--json]
//! cargo run --release --example relay_floor -- server 127.0.0.1:4433 CERT_DIR
//! cargo run --release --example relay_floor -- client 127.0.0.1:4433 CA_FILE PAIRS SECONDS [...]
//! ```
//!
//! `spawn` makes dev certificates in a temporary directory and runs the server as a child
//! process (so that its CPU can be read from `/proc`). The client prints a progress line a
//! second on stderr in `sfc-bench`'s words (`relay load …, sent N, delivered N`) and one result
//! line on stdout. `scripts/relay-floor.sh` alternates it with `sfc-bench relay` and reports
//! each side's CPU per message over a window in the middle of the load.
//!
//! `--server-workers N` runs the spawned server's runtime on N threads (its default: one per
//! core); `--server-workers 1` is the transport on one thread, as a single sfc-server shard or
//! mosquitto's one thread carry it. `--json` prints one JSON object instead of the result
//! lines, with `sfc-bench`'s keys (`throughput_per_s`, `sent`, `delivered`, `lost`,
//! `latency_us`, `server_cpu_us_per_delivery`, `client_cpu_us_per_delivery`: CPU from the start
//! of the load until everything arrived), so `scripts/peer-bench.sh` reads it as a third system.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use securefastchat::bench::ServerStats;
use securefastchat::protocol::{
    ClientFrame, DeliverHeader, MAX_CONTROL_FRAME, MAX_STREAM_HEADER, MessageId, Reply, Request,
    SendHeader, ServerFrame, StreamHeader, encode_frame,
};
use securefastchat::tls;
use securefastchat::transport::MAX_SERVER_UNI_STREAMS;
use tokio::sync::{Semaphore, mpsc};

mod common;

use common::{ENDPOINTS, Error, client_endpoints, listen};

/// Sends in flight per sender unless given (`sfc-bench --window`'s default).
const WINDOW: usize = 8;
/// Open loop: a bound on sends in flight only to keep memory finite (as `sfc-bench --rate`).
const OPEN_LOOP_WINDOW: usize = 4096;
/// The envelope that seals 128 bytes in a running session (`docs/PROTOCOL.md` E7): a map of
/// `header` (`dh` bin 32, `pn`, `n` as uint32) and `ciphertext` (bin 8 of 128 + 16 bytes).
const ENVELOPE_BYTES: usize = 214;
/// Most seqs in one `ack` (as `sfc-bench`'s receivers).
const MAX_ACK_BATCH: usize = 1024;
/// Largest message stream the floor server reads.
const MAX_STREAM_BYTES: usize = 64 * 1024;
/// Names of the length of `sfc-bench`'s (a 12-character run prefix, `s`/`r` and the pair).
const NAME_PREFIX: &str = "k3j9x2m7q4wz";

fn usage() -> Error {
    "usage: relay_floor spawn PAIRS SECONDS [--window N] [--rate R] [--server-workers N] [--json] \
     | server ADDR CERT_DIR | client ADDR CA_FILE PAIRS SECONDS [--window N] [--rate R] [--json]"
        .into()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    match common::args().as_slice() {
        ["server", addr, dir] => serve(addr.parse()?, Path::new(dir)).await,
        ["client", addr, ca, pairs, secs, flags @ ..] => {
            let shape = Shape::parse(flags)?;
            let json = shape.json;
            let figures = load(
                addr.parse()?,
                Path::new(ca),
                (pairs.parse()?, secs.parse()?),
                shape,
                None,
            )
            .await?;
            figures.print(json)
        }
        ["spawn", pairs, secs, flags @ ..] => {
            let shape = Shape::parse(flags)?;
            let json = shape.json;
            let dir = tempfile::tempdir()?;
            tls::ensure_dev_certificates(dir.path())?;
            let (mut child, addr) = spawn_server(dir.path(), shape.server_workers)?;
            let result = load(
                addr,
                &dir.path().join(tls::CA_CERT_FILE),
                (pairs.parse()?, secs.parse()?),
                shape,
                Some(child.id()),
            )
            .await;
            let _ = child.kill();
            let _ = child.wait();
            result?.print(json)
        }
        _ => Err(usage()),
    }
}

/// How the senders send: closed loop with `window` in flight each, or open loop at `rate`
/// messages/s in all (each sender every `pairs`-th slot of an even schedule, from a pacer
/// thread, as `sfc-bench --rate` does; latency is then measured from the intended send time).
struct Shape {
    window: usize,
    rate: Option<f64>,
    /// The spawned server's runtime threads (`TOKIO_WORKER_THREADS`), if given.
    server_workers: Option<usize>,
    json: bool,
}

impl Shape {
    fn parse(flags: &[&str]) -> Result<Self, Error> {
        let mut shape = Shape {
            window: WINDOW,
            rate: None,
            server_workers: None,
            json: false,
        };
        let mut flags = flags.iter();
        while let Some(flag) = flags.next() {
            let mut value = || flags.next().ok_or_else(usage);
            match *flag {
                "--window" => shape.window = value()?.parse::<usize>()?.max(1),
                "--rate" => shape.rate = Some(value()?.parse::<f64>()?).filter(|r| *r > 0.0),
                "--server-workers" => {
                    shape.server_workers = Some(value()?.parse::<usize>()?.max(1))
                }
                "--json" => shape.json = true,
                _ => return Err(usage()),
            }
        }
        Ok(shape)
    }
}

/// Runs this program's `server` on a free port of 127.0.0.1 and waits for its address.
fn spawn_server(dir: &Path, workers: Option<usize>) -> Result<(Child, SocketAddr), Error> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["server", "127.0.0.1:0"])
        .arg(dir)
        .stderr(Stdio::piped());
    if let Some(workers) = workers {
        command.env("TOKIO_WORKER_THREADS", workers.to_string());
    }
    let mut child = command.spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or("the server's stderr is not piped")?;
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line)?;
    match line.trim().strip_prefix("listening on ") {
        Some(addr) => Ok((child, addr.parse()?)),
        None => {
            let _ = child.kill();
            Err(format!("the floor server did not start: {line}").into())
        }
    }
}

fn name(role: char, pair: u32) -> String {
    format!("{NAME_PREFIX}{role}{pair}")
}

/// Every frame the server writes, encoded once: `sent` and the `deliver` header.
struct ServerFrames {
    sent: Vec<u8>,
    deliver: Vec<u8>,
}

impl ServerFrames {
    fn new() -> Result<Self, Error> {
        let sent = encode_frame(
            &ServerFrame {
                id: None,
                reply: Reply::Sent {
                    message_id: MessageId([0xab; 16]),
                    duplicate: false,
                },
            },
            MAX_CONTROL_FRAME,
        )?;
        let deliver = encode_frame(
            &StreamHeader::Deliver(DeliverHeader {
                seq: 1_234_567,
                prev: 1_234_566,
                id: MessageId([0x22; 16]),
                from: name('s', 99).as_str().into(),
                from_device: 1,
                to: None,
                sent_at: 1_900_000_000,
                kind: "bench".into(),
                length: ENVELOPE_BYTES as u64,
                group: None,
            }),
            MAX_STREAM_HEADER,
        )?;
        Ok(Self { sent, deliver })
    }
}

type Receivers = Arc<Mutex<HashMap<u32, Connection>>>;

async fn serve(addr: SocketAddr, dir: &Path) -> Result<(), Error> {
    let endpoint = listen(addr, dir)?;
    let frames = Arc::new(ServerFrames::new()?);
    let receivers: Receivers = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let (frames, receivers) = (Arc::clone(&frames), Arc::clone(&receivers));
        tokio::spawn(async move {
            if let Ok(conn) = incoming.await {
                let _ = serve_connection(conn, frames, receivers).await;
            }
        });
    }
    Ok(())
}

/// A connection's control stream opens with a hello: a role byte (`S` or `R`) and the pair
/// number (u32, big-endian); the server answers one byte once the connection is in place.
async fn serve_connection(
    conn: Connection,
    frames: Arc<ServerFrames>,
    receivers: Receivers,
) -> Result<(), Error> {
    let (mut control, mut requests) = conn.accept_bi().await?;
    let mut hello = [0u8; 5];
    requests.read_exact(&mut hello).await?;
    let pair = u32::from_be_bytes([hello[1], hello[2], hello[3], hello[4]]);
    if hello[0] == b'R' {
        lock(&receivers).insert(pair, conn.clone());
        control.write_all(b"k").await?;
        // The receiver's acks: read and dropped (a frame is a u32 length and its body).
        let mut buf = vec![0u8; MAX_CONTROL_FRAME as usize];
        loop {
            let mut length = [0u8; 4];
            if requests.read_exact(&mut length).await.is_err() {
                break;
            }
            let length = u32::from_be_bytes(length) as usize;
            let Some(body) = buf.get_mut(..length) else {
                break;
            };
            requests.read_exact(body).await?;
        }
        lock(&receivers).remove(&pair);
        return Ok(());
    }
    let partner = lock(&receivers)
        .get(&pair)
        .cloned()
        .ok_or("a sender came before its receiver")?;
    let (events, queue) = mpsc::unbounded_channel();
    tokio::spawn(write_events(control, queue));
    let _ = events.send(vec![b'k']);
    while let Ok(stream) = conn.accept_uni().await {
        let (frames, partner, events) = (Arc::clone(&frames), partner.clone(), events.clone());
        tokio::spawn(async move {
            let _ = relay_one(stream, &frames, &partner, &events).await;
        });
    }
    Ok(())
}

/// One message: read the sender's stream, answer `sent`, push it to the partner.
async fn relay_one(
    mut stream: RecvStream,
    frames: &ServerFrames,
    partner: &Connection,
    events: &mpsc::UnboundedSender<Vec<u8>>,
) -> Result<(), Error> {
    let message = stream.read_to_end(MAX_STREAM_BYTES).await?;
    let _ = events.send(frames.sent.clone());
    let body = message.get(message.len().saturating_sub(ENVELOPE_BYTES)..);
    let mut out = Vec::with_capacity(frames.deliver.len() + ENVELOPE_BYTES);
    out.extend_from_slice(&frames.deliver);
    out.extend_from_slice(body.unwrap_or_default());
    let mut delivery = partner.open_uni().await?;
    delivery.write_all(&out).await?;
    delivery.finish()?;
    Ok(())
}

/// A connection's control writer: everything waiting goes out in one write.
async fn write_events(mut control: SendStream, mut queue: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut buf = Vec::new();
    while let Some(first) = queue.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while let Ok(more) = queue.try_recv() {
            buf.extend_from_slice(&more);
        }
        if control.write_all(&buf).await.is_err() {
            return;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts shared by the load's tasks.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    delivered: AtomicU64,
    stop: AtomicBool,
}

/// What one load measured (`load`).
struct Figures {
    secs: f64,
    sent: u64,
    delivered: u64,
    delivered_by_deadline: u64,
    /// Open loop only: from each message's intended send time.
    latency: Option<Histogram<u64>>,
    /// CPU seconds from the start of the load until everything arrived.
    server_cpu_s: Option<f64>,
    client_cpu_s: Option<f64>,
}

impl Figures {
    fn print(&self, json: bool) -> Result<(), Error> {
        let rate = self.delivered_by_deadline as f64 / self.secs;
        if json {
            let per_delivery = |cpu: Option<f64>| {
                cpu.filter(|_| self.delivered > 0)
                    .map(|cpu| cpu * 1e6 / self.delivered as f64)
            };
            let latency = self.latency.as_ref().map(|h| {
                serde_json::json!({
                    "p50": h.value_at_quantile(0.5),
                    "p90": h.value_at_quantile(0.9),
                    "p99": h.value_at_quantile(0.99),
                    "p999": h.value_at_quantile(0.999),
                    "max": h.max(),
                })
            });
            let report = serde_json::json!({
                "scenario": "relay_floor",
                "sent": self.sent,
                "delivered": self.delivered,
                "lost": self.sent.saturating_sub(self.delivered),
                "duplicates": 0,
                "throughput_per_s": rate,
                "latency_us": latency,
                "server_cpu_load_s": self.server_cpu_s,
                "server_cpu_us_per_delivery": per_delivery(self.server_cpu_s),
                "client_cpu_load_s": self.client_cpu_s,
                "client_cpu_us_per_delivery": per_delivery(self.client_cpu_s),
            });
            println!("{report}");
        } else {
            println!(
                "{} delivered in {:.2} s = {rate:.0}/s ({} sent, {} delivered in all)",
                self.delivered_by_deadline, self.secs, self.sent, self.delivered
            );
            if let Some(h) = &self.latency {
                println!(
                    "latency from the intended send time, us: p50 {} p90 {} p99 {} p99.9 {} max {}",
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.9),
                    h.value_at_quantile(0.99),
                    h.value_at_quantile(0.999),
                    h.max()
                );
            }
        }
        if self.delivered != self.sent {
            return Err(
                format!("{} messages were not delivered", self.sent - self.delivered).into(),
            );
        }
        Ok(())
    }
}

/// CPU seconds of process `pid` so far.
fn cpu_s(pid: Option<u32>) -> Option<f64> {
    pid.and_then(ServerStats::of).map(|stats| stats.cpu_s)
}

async fn load(
    addr: SocketAddr,
    ca: &Path,
    (pairs, secs): (u32, f64),
    shape: Shape,
    server: Option<u32>,
) -> Result<Figures, Error> {
    let endpoints = client_endpoints(addr, ca)?;
    let counts = Arc::new(Counts::default());
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let mut senders = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for pair in 0..pairs {
        let endpoint = &endpoints[2 * pair as usize % ENDPOINTS];
        let receiver = endpoint.connect(addr, "localhost")?.await?;
        // As the client does before it asks for delivery.
        receiver.set_max_concurrent_uni_streams(VarInt::from_u32(MAX_SERVER_UNI_STREAMS));
        let (acks, _) = hello(&receiver, b'R', pair).await?;
        tasks.spawn(receive(
            receiver,
            acks,
            Arc::clone(&counts),
            Arc::clone(&latencies),
        ));
        let endpoint = &endpoints[(2 * pair as usize + 1) % ENDPOINTS];
        let sender = endpoint.connect(addr, "localhost")?.await?;
        let (_, events) = hello(&sender, b'S', pair).await?;
        senders.push((sender, events, pair));
    }
    let header = |pair: u32| {
        encode_frame(
            &StreamHeader::Send(SendHeader {
                id: MessageId([0x11; 16]),
                to: name('r', pair).as_str().into(),
                kind: "bench".into(),
                length: ENVELOPE_BYTES as u64,
                copies: None,
                group: None,
                welcome: None,
            }),
            MAX_STREAM_HEADER,
        )
    };
    let sent_length = ServerFrames::new()?.sent.len();
    let cpu_before = (cpu_s(server), cpu_s(Some(std::process::id())));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    // Open loop: the pacer hands each sender its instants; closed loop: none.
    let (mut schedules, pacer) = match shape.rate {
        Some(rate) => {
            let (txs, rxs): (Vec<_>, Vec<_>) =
                (0..pairs).map(|_| mpsc::unbounded_channel()).unzip();
            let pacer = std::thread::spawn(move || {
                securefastchat::bench::pace(&txs, start, rate, deadline);
            });
            (rxs.into_iter().map(Some).collect(), Some(pacer))
        }
        None => ((0..pairs).map(|_| None).collect::<Vec<_>>(), None),
    };
    for ((conn, events, pair), schedule) in senders.into_iter().zip(schedules.iter_mut()) {
        let mut message = header(pair)?;
        message.resize(message.len() + ENVELOPE_BYTES, 0x5a);
        let window = match schedule {
            Some(_) => OPEN_LOOP_WINDOW,
            None => shape.window,
        };
        tasks.spawn(send(
            conn,
            (events, schedule.take()),
            message,
            (sent_length, window),
            deadline,
            Arc::clone(&counts),
        ));
    }
    let report = tokio::spawn(progress(Arc::clone(&counts), start));
    tokio::time::sleep_until(deadline.into()).await;
    let delivered_by_deadline = counts.delivered.load(Ordering::Relaxed);
    // Let what is in flight arrive (or give up after 3 s), then stop everything.
    let settle = Instant::now() + Duration::from_secs(3);
    while counts.delivered.load(Ordering::Relaxed) < counts.sent.load(Ordering::Relaxed)
        && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu_after = (cpu_s(server), cpu_s(Some(std::process::id())));
    counts.stop.store(true, Ordering::Relaxed);
    report.abort();
    tasks.abort_all();
    let latency = match pacer {
        Some(pacer) => {
            let _ = pacer.join();
            Some(lock(&latencies).clone())
        }
        None => None,
    };
    for endpoint in endpoints {
        endpoint.close(0u32.into(), b"");
    }
    let spent = |before: Option<f64>, after: Option<f64>| Some(after? - before?);
    Ok(Figures {
        secs,
        sent: counts.sent.load(Ordering::Relaxed),
        delivered: counts.delivered.load(Ordering::Relaxed),
        delivered_by_deadline,
        latency,
        server_cpu_s: spent(cpu_before.0, cpu_after.0),
        client_cpu_s: spent(cpu_before.1, cpu_after.1),
    })
}

async fn hello(conn: &Connection, role: u8, pair: u32) -> Result<(SendStream, RecvStream), Error> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut hello = vec![role];
    hello.extend_from_slice(&pair.to_be_bytes());
    send.write_all(&hello).await?;
    let mut ready = [0u8; 1];
    recv.read_exact(&mut ready).await?;
    Ok((send, recv))
}

/// Sends until the deadline: with a schedule, at each instant it gives (the intended send time,
/// as nanoseconds since the epoch, goes into the body's first 8 bytes), else as the window
/// allows.
async fn send(
    conn: Connection,
    (mut events, mut schedule): (RecvStream, Option<mpsc::UnboundedReceiver<Instant>>),
    mut message: Vec<u8>,
    (sent_length, window): (usize, usize),
    deadline: Instant,
    counts: Arc<Counts>,
) -> Result<(), Error> {
    let window = Arc::new(Semaphore::new(window));
    let freed = Arc::clone(&window);
    // Every `sent` event frees a slot.
    let events_task = tokio::spawn(async move {
        let mut frame = vec![0u8; sent_length];
        while events.read_exact(&mut frame).await.is_ok() {
            freed.add_permits(1);
        }
    });
    let stamp_at = message.len() - ENVELOPE_BYTES;
    while Instant::now() < deadline {
        if let Some(schedule) = schedule.as_mut() {
            let Some(intended) = schedule.recv().await else {
                break;
            };
            let stamp = wall_nanos().saturating_sub(intended.elapsed().as_nanos() as u64);
            message[stamp_at..stamp_at + 8].copy_from_slice(&stamp.to_be_bytes());
        }
        window.acquire().await?.forget();
        let mut stream = conn.open_uni().await?;
        stream.write_all(&message).await?;
        stream.finish()?;
        counts.sent.fetch_add(1, Ordering::Relaxed);
    }
    let _ = events_task.await;
    Ok(())
}

/// Reads every delivery, records its latency (from the stamp in its body) and acknowledges
/// what has arrived in one frame.
async fn receive(
    conn: Connection,
    mut acks: SendStream,
    counts: Arc<Counts>,
    latencies: Arc<Mutex<Histogram<u64>>>,
) -> Result<(), Error> {
    let (arrived, mut queue) = mpsc::unbounded_channel::<u64>();
    let streams = tokio::spawn(async move {
        while let Ok(mut stream) = conn.accept_uni().await {
            let arrived = arrived.clone();
            tokio::spawn(async move {
                if let Ok(delivery) = stream.read_to_end(MAX_STREAM_BYTES).await {
                    let body = delivery.len().saturating_sub(ENVELOPE_BYTES);
                    let stamp = delivery
                        .get(body..body + 8)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map_or(0, u64::from_be_bytes);
                    let _ = arrived.send(wall_nanos().saturating_sub(stamp) / 1000);
                }
            });
        }
    });
    let mut seq = 0u64;
    while let Some(first) = queue.recv().await {
        let mut micros = vec![first];
        while micros.len() < MAX_ACK_BATCH {
            match queue.try_recv() {
                Ok(m) => micros.push(m),
                Err(_) => break,
            }
        }
        {
            let mut h = lock(&latencies);
            for m in &micros {
                let _ = h.record((*m).max(1));
            }
        }
        let seqs: Vec<u64> = (seq..seq + micros.len() as u64).collect();
        seq += seqs.len() as u64;
        counts
            .delivered
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        let ack = encode_frame(
            &ClientFrame {
                id: 0,
                request: Request::Ack { seqs, quiet: true },
            },
            MAX_CONTROL_FRAME,
        )?;
        acks.write_all(&ack).await?;
        if counts.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    streams.abort();
    Ok(())
}

fn wall_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A progress line a second, in `sfc-bench`'s words (scripts read `delivered N`).
async fn progress(counts: Arc<Counts>, start: Instant) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        tick.tick().await;
        eprintln!(
            "relay_floor: relay load {:.1} s, sent {}, delivered {}",
            start.elapsed().as_secs_f64(),
            counts.sent.load(Ordering::Relaxed),
            counts.delivered.load(Ordering::Relaxed)
        );
    }
}
