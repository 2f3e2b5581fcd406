//! The relay scenario: N sender/receiver pairs online, each sender sending to its receiver at
//! full speed (a window of sends in flight) or on an open-loop schedule.
//!
//! With `--devices N` every user of a pair has N devices, each its own connection: device 1
//! signs up, devices 2..N are linked to it through the server (real SPAKE2, [`super::linking`]).
//! The sender's device 1 sends; each message carries a copy for each of the receiver's devices
//! and one for each of the sender's other devices (PROTOCOL.md 5.2, E14), and every one of
//! those 2N − 1 devices receives, opens and acknowledges its copy. With one device the send
//! headers are exactly those of a client from before devices (no copy lists).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::linking::Linker;
use super::packets::Snapshot;
use super::progress::{self, Goal};
use super::scenarios::{
    ClientSockets, DRAIN_WAIT, Received, SETUP_CONCURRENCY, WARM_UP_ID, WARM_UP_WAIT, empty_report,
    pace, receive, send_sealed, signup, wall_nanos, was_stored,
};
use super::sealing::{Keys, Opener, Sealer};
use super::{
    BenchError, BenchOptions, DeviceDeliveries, DeviceOwner, MachineTimes, Report, Scenario,
    Target, histogram,
};
use crate::client::{Client, SendOutcome};
use crate::protocol::{DeviceId, SessionToken};

/// A device that receives during the load: one of the receiver's, or one of the sender's
/// other devices (which get a copy of everything it sends).
struct Receiving {
    owner: DeviceOwner,
    device: DeviceId,
    client: Client,
    opener: Opener,
    /// For the reconnect diagnosis after a loss: resuming it reaches this device's inbox.
    token: SessionToken,
}

/// One relay pair, ready: the sender holds a session with every destination device, and each
/// of those has opened a first message (the warm-up).
struct Pair {
    sender: Client,
    sealer: Sealer,
    receiving: Vec<Receiving>,
}

/// A user's devices after setup: device 1 signed up, the others linked; every device has
/// published its keys.
struct Account {
    first: Client,
    first_token: SessionToken,
    first_keys: Keys,
    /// Devices 2.. in the order they were linked: (id, connection, token, keys).
    others: Vec<(DeviceId, Client, SessionToken, Keys)>,
}

/// Signs `name` up as device 1 on socket `socket`, publishes its keys, then links `devices` − 1
/// more devices to it (sockets `socket + 1`, …), each of which publishes its own prekeys.
async fn account(
    sockets: &ClientSockets,
    socket: usize,
    name: &str,
    devices: usize,
) -> Result<Account, BenchError> {
    let options = sockets.for_connection(socket);
    let (first, first_token) = signup(options, name).await?;
    let first_keys = Keys::publish(&first, name).await?;
    let mut others = Vec::with_capacity(devices.saturating_sub(1));
    if devices > 1 {
        let mut linker = Linker::open(options, name, first_token.clone()).await?;
        for k in 1..devices {
            let (client, device, token, identity) = linker
                .link(
                    sockets.for_connection(socket + k),
                    first_keys.identity(),
                    &format!("bench device {}", k + 1),
                )
                .await?;
            let keys = Keys::publish_with(&client, name, identity).await?;
            progress::user();
            others.push((device, client, token, keys));
        }
        linker.close();
    }
    Ok(Account {
        first,
        first_token,
        first_keys,
        others,
    })
}

/// Sets up `count` pairs of users with `devices` devices each (some pairs at once): sign-ups,
/// links, keys, X3DH from the sender's device 1 to every destination device, and the warm-up
/// ([`warm_up`]); returns them in order.
async fn setup_pairs(
    sockets: &Arc<ClientSockets>,
    prefix: &str,
    count: usize,
    devices: usize,
) -> Result<Vec<Pair>, BenchError> {
    let slots = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut setting_up = JoinSet::new();
    for p in 0..count {
        // Sockets 2N·p.. for the receiver's devices, then N more for the sender's, so that with
        // one device the pairs use the sockets they used before devices.
        let (sockets, prefix, slots) = (Arc::clone(sockets), prefix.to_owned(), Arc::clone(&slots));
        setting_up.spawn(async move {
            let _slot = slots
                .acquire_owned()
                .await
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            let (sender_name, receiver_name) = (format!("{prefix}s{p}"), format!("{prefix}r{p}"));
            let base = 2 * devices * p;
            // With one device the sender signs up first, as before devices; with more, the
            // receiver's devices must all exist before the sender fetches their bundles, and
            // the sender's before it fetches its own.
            let (sender, receiver) = if devices == 1 {
                let sender = account(&sockets, base, &sender_name, 1).await?;
                let receiver = account(&sockets, base + 1, &receiver_name, 1).await?;
                (sender, receiver)
            } else {
                let receiver = account(&sockets, base, &receiver_name, devices).await?;
                let sender = account(&sockets, base + devices, &sender_name, devices).await?;
                (sender, receiver)
            };
            let mut receiving = vec![Receiving {
                owner: DeviceOwner::Receiver,
                device: 1,
                client: receiver.first,
                opener: receiver.first_keys.opener(),
                token: receiver.first_token,
            }];
            for (device, client, token, keys) in receiver.others {
                receiving.push(Receiving {
                    owner: DeviceOwner::Receiver,
                    device,
                    client,
                    opener: keys.opener(),
                    token,
                });
            }
            let own: Vec<DeviceId> = sender.others.iter().map(|(d, ..)| *d).collect();
            let sealer = if devices == 1 {
                sender
                    .first_keys
                    .seal_to(&sender.first, &receiver_name)
                    .await?
            } else {
                sender
                    .first_keys
                    .seal_to_devices(&sender.first, &receiver_name, &own)
                    .await?
            };
            for (device, client, token, keys) in sender.others {
                receiving.push(Receiving {
                    owner: DeviceOwner::Sender,
                    device,
                    client,
                    opener: keys.opener(),
                    token,
                });
            }
            let mut pair = Pair {
                sender: sender.first,
                sealer,
                receiving,
            };
            warm_up(&mut pair, &receiver_name, p).await?;
            Ok::<_, BenchError>((p, pair))
        });
    }
    let mut pairs: Vec<Option<Pair>> = (0..count).map(|_| None).collect();
    while let Some(joined) = setting_up.join_next().await {
        let (p, pair) = joined.map_err(|e| BenchError::Setup(e.to_string()))??;
        if let Some(slot) = pairs.get_mut(p) {
            *slot = Some(pair);
        }
    }
    Ok(pairs.into_iter().flatten().collect())
}

/// Sends one message of the pair's sessions before the load, and has every destination device
/// open and acknowledge its copy: opening the first message of a session accepts it (X3DH,
/// ≈ 0.7 ms of CPU, measured by the `keys/` micro benchmarks), a one-time cost that a relay
/// measurement would otherwise take for a stall at its start. It is not counted in the report.
async fn warm_up(pair: &mut Pair, receiver_name: &str, p: usize) -> Result<(), BenchError> {
    match send_sealed(
        &pair.sender,
        &pair.sealer,
        receiver_name,
        (p, WARM_UP_ID),
        b"warm-up",
        None,
    )
    .await?
    {
        SendOutcome::Stored => {}
        SendOutcome::Duplicate => {
            return Err(BenchError::Setup(format!(
                "the warm-up message to {receiver_name} was refused as a duplicate"
            )));
        }
    }
    for device in &mut pair.receiving {
        let Some(message) = device.client.next_delivery(WARM_UP_WAIT).await else {
            let why = match device.client.connection().close_reason() {
                Some(reason) => format!("its connection closed: {reason}"),
                None => format!("none came within {} s", WARM_UP_WAIT.as_secs()),
            };
            return Err(BenchError::Setup(format!(
                "{:?} device {} of pair {p} got no warm-up message: {why}",
                device.owner, device.device
            )));
        };
        device.opener.open(
            (&message.from, message.from_device),
            message.to.as_deref(),
            message.id,
            &message.body,
        )?;
        device.client.ack(vec![message.seq]).await?;
    }
    Ok(())
}

/// N online pairs; open loop at `rate` or closed loop with `window` sends in flight.
pub(super) async fn relay(
    server: &Target,
    options: &BenchOptions,
    prefix: &str,
) -> Result<Report, BenchError> {
    let target = &server.options;
    let devices = options.devices.clamp(1, crate::store::MAX_DEVICES);
    let latencies = Arc::new(Mutex::new(histogram()?));
    let done = Arc::new(AtomicU64::new(0));
    let (mut senders, mut receivers, mut tokens) = (Vec::new(), JoinSet::new(), Vec::new());
    progress::phase("setup", Goal::Users((2 * options.clients * devices) as u64));
    let setup_started = Instant::now();
    let sockets = Arc::new(
        ClientSockets::open(
            target,
            options.client_sockets,
            2 * options.clients * devices,
        )
        .await?,
    );
    let mut copies_per_message = 1;
    let (mut sender_conns, mut receiver_conns) = (Vec::new(), Vec::new());
    for pair in setup_pairs(&sockets, prefix, options.clients, devices).await? {
        copies_per_message = pair.sealer.copies_per_message();
        sender_conns.push(pair.sender.connection().clone());
        senders.push(Arc::new((pair.sender, pair.sealer)));
        for device in pair.receiving {
            tokens.push(device.token);
            receiver_conns.push(device.client.connection().clone());
            let (owner, id) = (device.owner, device.device);
            let receiving = receive(
                Arc::new(device.client),
                device.opener,
                Arc::clone(&latencies),
                Arc::clone(&done),
                true,
            );
            receivers.spawn(async move { receiving.await.map(|got| ((owner, id), got)) });
        }
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    let (sent, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let refused = Arc::new(AtomicU64::new(0));
    progress::track_sent(&sent);
    progress::phase("load", Goal::Time(options.duration));
    let machine = MachineTimes::now();
    let server_before = server.stats();
    let client_before = super::target::own_cpu_s();
    let packets_before = Snapshot::take(&sender_conns, &receiver_conns);
    let start = Instant::now();
    let deadline = start + options.duration;
    // Open loop: one pacer thread hands each sender the instants it is due to send (sender p
    // gets every clients-th slot of an even schedule), so the schedule does not depend on
    // the runtime's 1 ms timer wheel and the senders never send in bursts.
    let (mut schedules, pacer) = match options.rate {
        Some(rate) if rate > 0.0 => {
            let (txs, rxs): (Vec<_>, Vec<_>) = (0..options.clients)
                .map(|_| tokio::sync::mpsc::unbounded_channel())
                .unzip();
            let pacer = std::thread::Builder::new()
                .name("sfc-bench-pacer".into())
                .spawn(move || pace(&txs, start, rate, deadline))
                .map_err(|e| BenchError::Setup(format!("cannot start the pacer: {e}")))?;
            (rxs.into_iter().map(Some).collect(), Some(pacer))
        }
        _ => ((0..options.clients).map(|_| None).collect::<Vec<_>>(), None),
    };
    let mut sending = JoinSet::new();
    for (p, sender) in senders.iter().enumerate() {
        let (sender, sent, errors, refused) = (
            Arc::clone(sender),
            Arc::clone(&sent),
            Arc::clone(&errors),
            Arc::clone(&refused),
        );
        let schedule = schedules.get_mut(p).and_then(Option::take);
        let (to, size, window) = (
            format!("{prefix}r{p}"),
            options.size.max(16),
            options.window.max(1),
        );
        sending.spawn(async move {
            let outbox = Outbox {
                sender: &sender,
                pair: p,
                to: &to,
                size,
                counts: (&sent, &errors, &refused),
            };
            match schedule {
                Some(mut schedule) => outbox.open_loop(&mut schedule, deadline).await,
                None => outbox.closed_loop(window, deadline).await,
            }
        });
    }
    while sending.join_next().await.is_some() {}
    // Over the load, not the receivers' wait for silence after it.
    let machine = machine.and_then(MachineTimes::load_since);
    let pacer_lateness = match pacer.map(std::thread::JoinHandle::join) {
        Some(Ok(lateness)) => Some(lateness),
        Some(Err(_)) => return Err(BenchError::Setup("the pacer panicked".into())),
        None => None,
    };
    done.store(1, Ordering::Release);
    let total_sent = sent.load(Ordering::Relaxed);
    progress::phase(
        "drain",
        Goal::Delivered(total_sent * copies_per_message as u64),
    );
    let mut per_device: BTreeMap<(DeviceOwner, DeviceId), Received> = BTreeMap::new();
    while let Some(result) = receivers.join_next().await {
        let (slot, got) = result.map_err(|e| BenchError::Setup(e.to_string()))??;
        let entry = per_device.entry(slot).or_default();
        entry.unique += got.unique;
        entry.duplicates += got.duplicates;
    }
    let packets_after = Snapshot::take(&sender_conns, &receiver_conns);
    // From the start of the load until every device has all it will get (its last second is
    // the receivers' wait for silence, when the server idles).
    let server_load_cpu = match (server_before, server.stats()) {
        (Some(before), Some(after)) => Some(after.cpu_s - before.cpu_s),
        _ => None,
    };
    let client_load_cpu = match (client_before, super::target::own_cpu_s()) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let elapsed = start
        .elapsed()
        .saturating_sub(*DRAIN_WAIT)
        .max(options.duration);
    let mut report = empty_report(Scenario::Relay, &*latencies.lock().await);
    report.set_machine_load(machine);
    report.sent = total_sent;
    report.errors = errors.load(Ordering::Relaxed);
    report.refused = Some(refused.load(Ordering::Relaxed));
    report.count_device_deliveries(&per_device, elapsed);
    report.devices = Some(devices as u32);
    report.copies_per_message = Some(copies_per_message as u64);
    report.setup_s = Some(setup_s);
    if let Some(cpu) = server_load_cpu {
        report.server_cpu_load_s = Some(cpu);
        if report.delivered > 0 {
            report.server_cpu_us_per_delivery = Some(cpu * 1e6 / report.delivered as f64);
        }
    }
    if let Some(cpu) = client_load_cpu {
        report.client_cpu_load_s = Some(cpu);
        if report.delivered > 0 {
            report.client_cpu_us_per_delivery = Some(cpu * 1e6 / report.delivered as f64);
        }
    }
    report.pacer_lateness_us = pacer_lateness;
    report.packets = packets_after.since(&packets_before, report.delivered);
    if report.lost > 0 {
        let mut redelivered = 0;
        for token in tokens {
            let client = Client::connect(target).await?;
            client.resume(token).await?;
            while let Some(message) = client.next_delivery(Duration::from_secs(2)).await {
                client.ack(vec![message.seq]).await?;
                redelivered += 1;
            }
            client.close().await;
        }
        report.redelivered_after_reconnect = Some(redelivered);
    }
    // Together: each close waits for its connection to drain (a few round trips).
    let mut closing = JoinSet::new();
    for sender in senders {
        if let Ok((sender, _)) = Arc::try_unwrap(sender) {
            closing.spawn(sender.close());
        }
    }
    closing.join_all().await;
    Ok(report)
}

/// One sender's sends during the load: what every send of the pair needs, and the counters
/// its answers go to (stored, failed, refused at least once).
struct Outbox<'a> {
    sender: &'a (Client, Sealer),
    pair: usize,
    to: &'a str,
    size: usize,
    counts: (&'a AtomicU64, &'a AtomicU64, &'a AtomicU64),
}

/// Most sends one open-loop sender keeps in flight: a bound only to keep memory finite.
/// Latency is still measured from the intended time, so a stall behind it shows.
const OPEN_LOOP_IN_FLIGHT: usize = 4096;

impl Outbox<'_> {
    /// Seals and sends load message `i` stamped with `intended_wall` (the receiver's latency
    /// counts from it); whether it was stored.
    async fn send(&self, i: u64, intended_wall: u64) -> bool {
        let (client, sealer) = self.sender;
        let mut plaintext = vec![0u8; self.size];
        plaintext[..8].copy_from_slice(&intended_wall.to_be_bytes());
        let refused = Some(self.counts.2);
        let sent = send_sealed(client, sealer, self.to, (self.pair, i), &plaintext, refused);
        was_stored(sent.await)
    }

    fn count(&self, stored: bool) {
        let (sent, errors, _) = self.counts;
        let counter = if stored { sent } else { errors };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Open loop: a send at each instant the pacer gives, until `deadline`. As in
    /// [`Self::closed_loop`], a sender's sends are futures of its one task, so each starts in
    /// the wake-up that received its instant, with no task spawned per message.
    async fn open_loop(
        &self,
        schedule: &mut tokio::sync::mpsc::UnboundedReceiver<Instant>,
        deadline: Instant,
    ) {
        let mut inflight = FuturesUnordered::new();
        let mut i: u64 = 0;
        let mut scheduled = true;
        loop {
            tokio::select! {
                intended = schedule.recv(), if scheduled && inflight.len() < OPEN_LOOP_IN_FLIGHT => {
                    match intended {
                        Some(intended) if intended < deadline => {
                            let late = intended.elapsed().as_nanos() as u64;
                            inflight.push(self.send(i, wall_nanos().saturating_sub(late)));
                            i += 1;
                        }
                        _ => scheduled = false,
                    }
                }
                Some(stored) = inflight.next(), if !inflight.is_empty() => self.count(stored),
                else => return,
            }
        }
    }

    /// Full speed: `window` sends in flight until `deadline`, a new one as each is answered.
    /// All of a sender's sends run in this one task, as an app's outbox would: the streams it
    /// writes in one wake-up (a burst of `sent` answers frees several slots at once) are queued
    /// before the connection's driver runs, so they leave together. With a task per send, tokio
    /// ran the driver (woken into its LIFO slot) after each one, and every message took a
    /// datagram of its own (quinn's counters: 1.1 datagrams from the senders per message at
    /// 100 pairs).
    async fn closed_loop(&self, window: usize, deadline: Instant) {
        let mut inflight = FuturesUnordered::new();
        let mut i: u64 = 0;
        loop {
            while inflight.len() < window && Instant::now() < deadline {
                inflight.push(self.send(i, wall_nanos()));
                i += 1;
            }
            let Some(stored) = inflight.next().await else {
                return;
            };
            self.count(stored);
        }
    }
}

impl Report {
    /// Fills delivered, duplicates, lost, the throughputs and the per-device counts from what
    /// each receiving device saw (`sent` must be set already): every device is owed one copy of
    /// each message sent, so a device's loss is `sent` minus the distinct messages it got, and
    /// `delivered` and `lost` are the sums over the devices (with one device: the receiver's).
    fn count_device_deliveries(
        &mut self,
        per_device: &BTreeMap<(DeviceOwner, DeviceId), Received>,
        elapsed: Duration,
    ) {
        let mut rows = Vec::with_capacity(per_device.len());
        for (&(owner, device), got) in per_device {
            rows.push(DeviceDeliveries {
                owner,
                device,
                delivered: got.unique,
                lost: self.sent.saturating_sub(got.unique),
                duplicates: got.duplicates,
            });
        }
        self.delivered = rows.iter().map(|r| r.delivered).sum();
        self.lost = rows.iter().map(|r| r.lost).sum();
        self.duplicates = rows.iter().map(|r| r.duplicates).sum();
        self.throughput_per_s = self.delivered as f64 / elapsed.as_secs_f64();
        self.messages_per_s = Some(self.sent as f64 / elapsed.as_secs_f64());
        self.deliveries_per_device = Some(rows);
    }
}
