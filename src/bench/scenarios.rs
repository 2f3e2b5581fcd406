//! The scenarios: each sets up its users, offers load, and fills a [`Report`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::progress::{self, Goal};
use super::sealing::{Keys, Opener, Sealer};
use super::{
    BenchError, BenchOptions, Latency, MachineLoad, MachineTimes, Report, Scenario, Target,
    histogram, percentiles,
};
use crate::client::{Client, ClientOptions, SendOutcome};
use crate::protocol::{ErrorCode, MessageId, Password, SessionToken};

pub(super) const PASSWORD: &str = "bench password 1";
/// Most seqs a bench receiver acknowledges in one request.
const MAX_ACK_BATCH: usize = 1024;
/// Users set up at once (sign-ups hash passwords: more would only queue on the server).
pub(super) const SETUP_CONCURRENCY: usize = 16;
/// The message index of a relay pair's warm-up message. The load's messages count up from 0,
/// so no load message shares its id.
pub(super) const WARM_UP_ID: u64 = u64::MAX;
/// How long a relay sender keeps resending a message refused with `inbox_full`.
const RESEND_FOR: Duration = Duration::from_secs(30);
/// How long a receiver waits for its warm-up message.
pub(super) const WARM_UP_WAIT: Duration = Duration::from_secs(30);
/// The client sockets of a scenario's connections: `--client-sockets` endpoints shared
/// round-robin, or with 0 one per connection, as each phone has its own. Each connection still
/// makes its own QUIC connection, TLS handshake and end-to-end sessions; sharing spares the
/// generator a socket, an endpoint task and ≈ 2.2 MB of buffers per connection (at 1,000 relay
/// pairs: 5.8 GB of generator memory and a 2 s start while it touches them).
pub(super) struct ClientSockets(Vec<ClientOptions>);

impl ClientSockets {
    /// `shared` endpoints for `connections` connections (no more endpoints than connections).
    pub(super) async fn open(
        target: &ClientOptions,
        shared: usize,
        connections: usize,
    ) -> Result<Self, BenchError> {
        let shared = shared.min(connections);
        if shared == 0 {
            return Ok(Self(vec![target.clone()]));
        }
        let mut endpoints = Vec::with_capacity(shared);
        for _ in 0..shared {
            endpoints.push(target.clone().share_endpoint(false).await?);
        }
        Ok(Self(endpoints))
    }

    /// The options for the `n`th connection.
    pub(super) fn for_connection(&self, n: usize) -> &ClientOptions {
        &self.0[n % self.0.len()]
    }
}

/// Silence after which a receiver decides everything has arrived (and which is not counted as
/// drain time). Overridable with `SFC_BENCH_DRAIN_SECS` for diagnosis.
pub(super) static DRAIN_WAIT: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
    std::env::var("SFC_BENCH_DRAIN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(3))
});

/// Runs `options.scenario` against `target`.
pub async fn run(target: &Target, options: &BenchOptions) -> Result<Report, BenchError> {
    if options.devices != 1 && options.scenario != Scenario::Relay {
        return Err(BenchError::Setup(
            "--devices is a relay option: the other scenarios have one device per user".into(),
        ));
    }
    let prefix = unique_prefix()?;
    progress::reset(options.scenario);
    let before = target.stats();
    let mut report = match options.scenario {
        Scenario::Relay => super::relay::relay(target, options, &prefix).await?,
        Scenario::Offline => offline(&target.options, options, &prefix).await?,
        Scenario::Login | Scenario::Resume | Scenario::Handshake => {
            repeated(&target.options, options, &prefix).await?
        }
        Scenario::Connections => connections(target, options, &prefix).await?,
        Scenario::Flood => super::flood::idle(target, options).await?,
    };
    if let (Some(before), Some(after)) = (before, target.stats()) {
        report.server_cpu_s = Some(after.cpu_s - before.cpu_s);
        report.server_peak_rss_bytes = Some(after.peak_rss);
    }
    Ok(report)
}

/// A short random name prefix so runs against one server do not collide.
fn unique_prefix() -> Result<String, BenchError> {
    let mut bytes = [0u8; 3];
    getrandom::fill(&mut bytes).map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(format!("b{}", hex::encode(bytes)))
}

pub(super) fn wall_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(super) async fn signup(
    options: &ClientOptions,
    name: &str,
) -> Result<(Client, SessionToken), BenchError> {
    let client = Client::connect(options).await?;
    let (_, token) = client.signup(name, Password::new(PASSWORD)).await?;
    progress::user();
    Ok((client, token))
}

pub(super) fn empty_report(scenario: Scenario, histogram: &Histogram<u64>) -> Report {
    Report {
        scenario: scenario.name(),
        sent: 0,
        delivered: 0,
        lost: 0,
        duplicates: 0,
        errors: 0,
        throughput_per_s: 0.0,
        latency_us: Latency::from(histogram),
        latency_percentiles_us: percentiles(histogram),
        server_cpu_s: None,
        server_peak_rss_bytes: None,
        connections: None,
        server_rss_per_connection_bytes: None,
        machine_busy_pct: None,
        machine_steal_pct: None,
        redelivered_after_reconnect: None,
        refused: None,
        pacer_lateness_us: None,
        flood: None,
        devices: None,
        copies_per_message: None,
        messages_per_s: None,
        deliveries_per_device: None,
        setup_s: None,
        server_cpu_load_s: None,
        server_cpu_us_per_delivery: None,
        client_cpu_load_s: None,
        client_cpu_us_per_delivery: None,
        packets: None,
    }
}

/// What a receiver saw.
#[derive(Default)]
pub(super) struct Received {
    pub(super) unique: u64,
    pub(super) duplicates: u64,
}

/// Sums what the receivers saw.
async fn collect(
    receivers: &mut JoinSet<Result<Received, BenchError>>,
) -> Result<Received, BenchError> {
    let mut total = Received::default();
    while let Some(result) = receivers.join_next().await {
        let got = result.map_err(|e| BenchError::Setup(e.to_string()))??;
        total.unique += got.unique;
        total.duplicates += got.duplicates;
    }
    Ok(total)
}

impl Report {
    /// Fills the machine's load over the measured interval.
    pub(super) fn set_machine_load(&mut self, load: Option<MachineLoad>) {
        if let Some(load) = load {
            self.machine_busy_pct = Some(load.busy_pct);
            self.machine_steal_pct = Some(load.steal_pct);
        }
    }

    /// Fills delivered, duplicates, lost and throughput from what the receivers saw
    /// (`sent` must be set already).
    fn count_deliveries(&mut self, received: &Received, elapsed: Duration) {
        self.delivered = received.unique;
        self.duplicates = received.duplicates;
        self.lost = self.sent.saturating_sub(received.unique);
        self.throughput_per_s = received.unique as f64 / elapsed.as_secs_f64();
    }
}

/// Receives until `done` says the senders finished and a full drain wait passes in silence.
/// Like a careful client it acknowledges as it goes: everything that has arrived is taken,
/// opened and acknowledged in one quiet batch (so batches grow with the load, no ack waits for
/// a timer, and none waits for an answer; a failed ack ends the receiver with its error).
pub(super) async fn receive(
    client: Arc<Client>,
    mut opener: Opener,
    latencies: Arc<Mutex<Histogram<u64>>>,
    done: Arc<AtomicU64>,
    stamped: bool,
) -> Result<Received, BenchError> {
    let mut seen = HashSet::new();
    let mut got = Received::default();
    let mut acks = Vec::new();
    let mut stamps = Vec::new();
    loop {
        // Only a full drain wait that began after the senders were done may end the receiver:
        // a short wait that merely overlapped their end would miss messages still in flight.
        let finishing = done.load(Ordering::Acquire) == 1;
        let idle = if finishing {
            *DRAIN_WAIT
        } else {
            Duration::from_millis(50)
        };
        let Some(first) = client.next_delivery(idle).await else {
            if let Some(reason) = client.connection().close_reason() {
                return Err(BenchError::Setup(format!(
                    "a receiver's connection closed: {reason}"
                )));
            }
            if finishing {
                return Ok(got);
            }
            continue;
        };
        let mut next = Some(first);
        while let Some(message) = next {
            if !seen.insert(message.id) {
                got.duplicates += 1;
            } else {
                let plaintext = opener.open(
                    (&message.from, message.from_device),
                    message.to.as_deref(),
                    message.id,
                    &message.body,
                )?;
                got.unique += 1;
                progress::delivered();
                if stamped && plaintext.len() >= 8 {
                    let mut stamp = [0u8; 8];
                    stamp.copy_from_slice(&plaintext[..8]);
                    let micros = wall_nanos().saturating_sub(u64::from_be_bytes(stamp)) / 1000;
                    stamps.push(micros.max(1));
                }
            }
            acks.push(message.seq);
            next = if acks.len() < MAX_ACK_BATCH {
                client.try_next_delivery()
            } else {
                None
            };
        }
        if !stamps.is_empty() {
            let mut histogram = latencies.lock().await;
            for micros in stamps.drain(..) {
                let _ = histogram.record(micros);
            }
        }
        client.ack_quietly(std::mem::take(&mut acks)).await?;
        if let Some(e) = client.take_unclaimed_error() {
            return Err(e.into());
        }
    }
}

/// The open-loop schedule: slot k is due at `start + k / rate` and goes to sender
/// `k % senders`. Blocks the calling thread until `deadline` and sets its timer slack to the
/// least (so that sleeps end on time): call it on a thread of its own. Returns how late the
/// pacer handed slots out (its own timer error, which the latency figures include).
pub fn pace(
    senders: &[tokio::sync::mpsc::UnboundedSender<Instant>],
    start: Instant,
    rate: f64,
    deadline: Instant,
) -> Latency {
    precise_sleeps();
    let mut lateness = histogram().ok();
    for k in 0u64.. {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        if at >= deadline || senders.is_empty() {
            break;
        }
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        if let Some(h) = lateness.as_mut() {
            let _ = h.record((at.elapsed().as_micros() as u64).max(1));
        }
        let sender = &senders[(k % senders.len() as u64) as usize];
        let _ = sender.send(at);
    }
    lateness.map(|h| Latency::from(&h)).unwrap_or_default()
}

/// Asks the kernel to wake this thread's sleeps on time: the default timer slack of 50 us
/// would otherwise make every open-loop send that much late.
#[cfg(target_os = "linux")]
fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(not(target_os = "linux"))]
fn precise_sleeps() {}

/// Seals `plaintext` for `to` under the id made of `(owner, i)` and sends it. With `resend`,
/// a message the server refuses because the recipient's inbox is full (`inbox_full`) is sent
/// again, the same sealed bytes under the same id, after a backoff (1 ms doubling to 100 ms),
/// for at most [`RESEND_FOR`], each refusal counted in `resend`. Sealing advanced the
/// sender's ratchet: dropping the message would leave a gap in the receiver's chain, and past
/// the ratchet's skip limit (1,000) the session breaks.
pub(super) async fn send_sealed(
    client: &Client,
    sealer: &Sealer,
    to: &str,
    (owner, i): (usize, u64),
    plaintext: &[u8],
    resend: Option<&AtomicU64>,
) -> Result<SendOutcome, BenchError> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(owner as u64).to_be_bytes());
    id[8..].copy_from_slice(&i.to_be_bytes());
    let id = MessageId(id);
    let (body, copies) = sealer.seal(id, plaintext)?;
    let give_up = Instant::now() + RESEND_FOR;
    let mut backoff = Duration::from_millis(1);
    loop {
        let sent = client
            .send_copies(to, "bench", id, copies.clone(), &body)
            .await;
        match (sent, resend) {
            (Err(e), Some(refused))
                if e.is_server(ErrorCode::InboxFull) && Instant::now() < give_up =>
            {
                refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            (sent, _) => return Ok(sent?),
        }
    }
}

/// Whether a load message was stored: a duplicate, or any failure, is an error here.
pub(super) fn was_stored(sent: Result<SendOutcome, BenchError>) -> bool {
    matches!(sent, Ok(SendOutcome::Stored))
}

/// Fill N offline inboxes with `backlog` messages each, then log the users in and drain them.
async fn offline(
    target: &ClientOptions,
    options: &BenchOptions,
    prefix: &str,
) -> Result<Report, BenchError> {
    progress::phase("setup", Goal::Users(options.clients as u64 + 1));
    let sockets = ClientSockets::open(target, options.client_sockets, options.clients + 1).await?;
    let sender_name = format!("{prefix}sender");
    let (sender, _) = signup(sockets.for_connection(0), &sender_name).await?;
    let sender_keys = Keys::publish(&sender, &sender_name).await?;
    let mut users = Vec::new();
    for u in 0..options.clients {
        let name = format!("{prefix}u{u}");
        let (client, token) = signup(sockets.for_connection(u + 1), &name).await?;
        let opener = Keys::publish(&client, &name).await?.opener();
        client.close().await;
        let sealer = Arc::new(sender_keys.seal_to(&sender, &name).await?);
        users.push((token, opener, sealer));
    }
    let sender = Arc::new(sender);
    let (sent, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // As many sends in flight as the server lets one connection open message streams.
    let slots = Arc::new(Semaphore::new(
        crate::transport::MAX_CLIENT_UNI_STREAMS as usize,
    ));
    let mut inflight = JoinSet::new();
    let total = (options.clients * options.backlog) as u64;
    progress::track_sent(&sent);
    progress::phase("fill", Goal::Sent(total));
    for (u, (_, _, sealer)) in users.iter().enumerate() {
        for i in 0..options.backlog as u64 {
            let permit = Arc::clone(&slots)
                .acquire_owned()
                .await
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            while inflight.try_join_next().is_some() {}
            let (sender, sent, errors, sealer) = (
                Arc::clone(&sender),
                Arc::clone(&sent),
                Arc::clone(&errors),
                Arc::clone(sealer),
            );
            let (to, size) = (format!("{prefix}u{u}"), options.size.max(16));
            inflight.spawn(async move {
                let stored = was_stored(
                    send_sealed(&sender, &sealer, &to, (u, i), &vec![0x42; size], None).await,
                );
                let counter = if stored { &sent } else { &errors };
                counter.fetch_add(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
    while inflight.join_next().await.is_some() {}
    let latencies = Arc::new(Mutex::new(histogram()?));
    let done = Arc::new(AtomicU64::new(1));
    let total_sent = sent.load(Ordering::Relaxed);
    progress::phase("drain", Goal::Delivered(total_sent));
    // The machine's load until the last message is in, not over the wait for silence after.
    let machine = MachineTimes::now();
    // In a JoinSet, so that it is aborted if this function returns early.
    let mut drained = JoinSet::new();
    drained.spawn(async move {
        while progress::delivered_count() < total_sent {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        machine.and_then(MachineTimes::load_since)
    });
    let start = Instant::now();
    let mut receivers = JoinSet::new();
    for (u, (token, opener, _)) in users.into_iter().enumerate() {
        let client = Client::connect(sockets.for_connection(u + 1)).await?;
        client.resume(token).await?;
        receivers.spawn(receive(
            Arc::new(client),
            opener,
            Arc::clone(&latencies),
            Arc::clone(&done),
            false,
        ));
    }
    let received = collect(&mut receivers).await?;
    // Each receiver waits 3 s of silence to be sure it is done; that is not drain time.
    let elapsed = start
        .elapsed()
        .saturating_sub(*DRAIN_WAIT)
        .max(Duration::from_millis(1));
    let machine = match drained.try_join_next() {
        Some(done) => done.ok().flatten(),
        // Some never came (the report says so): the load until the receivers gave up.
        None => machine.and_then(MachineTimes::load_since),
    };
    let mut report = empty_report(Scenario::Offline, &*latencies.lock().await);
    report.set_machine_load(machine);
    report.sent = sent.load(Ordering::Relaxed);
    report.errors = errors.load(Ordering::Relaxed);
    report.count_deliveries(&received, elapsed);
    Ok(report)
}

/// Login, resume or handshake, repeated by `clients` concurrent loops for `duration`.
async fn repeated(
    target: &ClientOptions,
    options: &BenchOptions,
    prefix: &str,
) -> Result<Report, BenchError> {
    let scenario = options.scenario;
    let mut accounts = Vec::new();
    if scenario != Scenario::Handshake {
        progress::phase("setup", Goal::Users(options.clients as u64));
        for c in 0..options.clients {
            let name = format!("{prefix}u{c}");
            let (client, token) = signup(target, &name).await?;
            client.close().await;
            accounts.push((name, token));
        }
    }
    // Each operation is a new connection with a full TLS handshake (no resumption), by
    // default from a few shared client endpoints, as an app reconnecting would: a fresh
    // socket, CA load and TLS configuration per connection cost the generator more CPU than
    // the handshake.
    let sockets = ClientSockets::open(target, options.client_sockets, options.clients).await?;
    let latencies = Arc::new(Mutex::new(histogram()?));
    let (completed, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    progress::track_sent(&completed);
    progress::phase("load", Goal::Time(options.duration));
    let machine = MachineTimes::now();
    let start = Instant::now();
    let deadline = start + options.duration;
    // With `--rate`, each loop keeps its share of the schedule and latency counts from the
    // intended start (a loop that falls behind starts the next operation at once).
    let per_loop_rate = options.rate.map(|r| r / options.clients.max(1) as f64);
    let loops_n = options.clients.max(1);
    let mut loops = JoinSet::new();
    for c in 0..options.clients {
        let account = accounts.get(c).cloned();
        let (target, latencies, completed, errors) = (
            sockets.for_connection(c).clone(),
            Arc::clone(&latencies),
            Arc::clone(&completed),
            Arc::clone(&errors),
        );
        loops.spawn(async move {
            let mut i: u64 = 0;
            // Offset as in `relay`: an even schedule, not bursts of one operation per loop.
            let phase = c as f64 / loops_n as f64;
            while Instant::now() < deadline {
                let begin = match per_loop_rate {
                    Some(rate) if rate > 0.0 => {
                        let intended = start + Duration::from_secs_f64((i as f64 + phase) / rate);
                        if intended >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(intended.into()).await;
                        intended
                    }
                    _ => Instant::now(),
                };
                i += 1;
                let outcome = async {
                    let client = Client::connect(&target).await?;
                    match (&account, scenario) {
                        (Some((name, _)), Scenario::Login) => {
                            client.login(name, Password::new(PASSWORD)).await?;
                        }
                        (Some((_, token)), Scenario::Resume) => {
                            client.resume_with(token.clone(), false).await?;
                        }
                        _ => {}
                    }
                    let took = begin.elapsed();
                    // Closing waits for the close to be acknowledged; let that happen aside.
                    tokio::spawn(client.close());
                    Ok::<_, crate::client::ClientError>(took)
                }
                .await;
                match outcome {
                    Ok(took) => {
                        completed.fetch_add(1, Ordering::Relaxed);
                        let _ = latencies
                            .lock()
                            .await
                            .record((took.as_micros() as u64).max(1));
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while loops.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let histogram = latencies.lock().await;
    let mut report = empty_report(scenario, &histogram);
    report.set_machine_load(machine.and_then(MachineTimes::load_since));
    report.sent = completed.load(Ordering::Relaxed);
    report.delivered = report.sent;
    report.errors = errors.load(Ordering::Relaxed);
    report.throughput_per_s = report.sent as f64 / elapsed.as_secs_f64();
    Ok(report)
}

/// Opens and holds `clients` authenticated idle connections; reports server RSS per connection.
async fn connections(
    target: &Target,
    options: &BenchOptions,
    prefix: &str,
) -> Result<Report, BenchError> {
    let (owner, token) = signup(&target.options, &format!("{prefix}idle")).await?;
    owner.close().await;
    let sockets =
        ClientSockets::open(&target.options, options.client_sockets, options.clients).await?;
    let before = target.stats();
    let latencies = Arc::new(Mutex::new(histogram()?));
    let errors = Arc::new(AtomicU64::new(0));
    let held = Arc::new(Mutex::new(Vec::with_capacity(options.clients)));
    let slots = Arc::new(Semaphore::new(64));
    let mut opening = JoinSet::new();
    progress::phase("open", Goal::Delivered(options.clients as u64));
    let machine = MachineTimes::now();
    let start = Instant::now();
    for c in 0..options.clients {
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        let (target, token, latencies, errors, held) = (
            sockets.for_connection(c).clone(),
            token.clone(),
            Arc::clone(&latencies),
            Arc::clone(&errors),
            Arc::clone(&held),
        );
        opening.spawn(async move {
            let begin = Instant::now();
            let opened = async {
                let client = Client::connect(&target).await?;
                client.resume_with(token, false).await?;
                Ok::<_, crate::client::ClientError>(client)
            }
            .await;
            match opened {
                Ok(client) => {
                    let _ = latencies
                        .lock()
                        .await
                        .record((begin.elapsed().as_micros() as u64).max(1));
                    held.lock().await.push(client);
                    progress::delivered();
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    while opening.join_next().await.is_some() {}
    let opened_in = start.elapsed();
    let machine = machine.and_then(MachineTimes::load_since);
    progress::phase("hold", Goal::Time(options.duration));
    tokio::time::sleep(options.duration).await;
    let during = target.stats();
    let held = std::mem::take(&mut *held.lock().await);
    let count = held.len() as u64;
    let histogram = latencies.lock().await;
    let mut report = empty_report(Scenario::Connections, &histogram);
    report.set_machine_load(machine);
    report.sent = count;
    report.delivered = count;
    report.errors = errors.load(Ordering::Relaxed);
    report.throughput_per_s = count as f64 / opened_in.as_secs_f64();
    report.connections = Some(count);
    if let (Some(before), Some(during)) = (before, during)
        && count > 0
    {
        report.server_rss_per_connection_bytes =
            Some(during.rss.saturating_sub(before.rss) / count);
    }
    drop(histogram);
    let mut closing = JoinSet::new();
    for client in held {
        closing.spawn(client.close());
    }
    closing.join_all().await;
    Ok(report)
}
