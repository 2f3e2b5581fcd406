//! `sfc-bench fanout`: a group of M members on the MLS delivery service, against a server this
//! program spawns (to read its CPU and peak memory).
//!
//! Setup: M users sign up through the client library (keys and key packages published); the
//! first creates the group and adds the others one commit at a time (`Messenger::group_add`),
//! which is the **commit** figure: the time from building each add to the server's answer
//! (the DS checks the commit against its copy of the group, stores it for every member device
//! and the welcome for the added one, durably). Then every other member connects as a bare
//! receiver: it takes its deliveries and acknowledges them, without decrypting (the server
//! cannot tell the difference; decrypting 200 MLS states on one machine would measure the
//! clients). The first member sends `--messages` texts (sealed with MLS by the client library,
//! `--window` in flight), and each delivery to each member is timed from the start of its send:
//! **deliveries/s** counts messages × member devices reached per second, and the **latency to
//! the last member** is, per message, the time until the last member had it.
//!
//! **Bytes stored per message** ([`stored_bytes`]) are measured apart from the run, on a scratch
//! store in this process with the server's store code: one message of the delivered size, from
//! a sender named like the run's to M − 1 devices named like its members, appended as the
//! server appends group traffic (one body shared by the copies), and once more with a body per
//! copy (the layout before shared bodies); each figure is the keys and values it added
//! (inbox entries, send record, shared body and its count), before fjall's own framing and
//! compression. The server's data directory is not measured: its journals are preallocated.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::target::Target;
use super::{BenchError, Latency, histogram};
use crate::client::messenger::Messenger;
use crate::client::{Client, ClientOptions};
use crate::protocol::{MessageId, Password, SessionToken, Username};
use crate::store::{
    AppendHooks, Appended, Copy, Durability, FjallStore, NewMessage, Store, StoreOptions,
    UserRecord,
};

/// How long the receivers may take, after the last send, to get everything.
const DRAIN_WAIT: Duration = Duration::from_secs(60);
/// Silence after which a receiver's backlog (commits and its welcome) counts as drained.
const QUIET: Duration = Duration::from_millis(500);
/// Sign-ups in flight during setup.
const SETUP_CONCURRENCY: usize = 8;

/// `sfc-bench fanout`: group message fan-out and commit latency.
#[derive(Debug, clap::Parser)]
#[command(name = "sfc-bench fanout")]
pub struct FanoutCli {
    /// Members of the group (one device each), 2 to 1,000
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Messages the first member sends
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Sends in flight
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Plaintext bytes per message
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// The sfc-server binary [default: next to this program]
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Members (devices) in the group.
    pub members: usize,
    /// Messages sent (each to the other `members - 1`).
    pub messages: usize,
    /// Deliveries expected: messages × (members − 1).
    pub expected: u64,
    /// Deliveries received (first time each).
    pub delivered: u64,
    /// Expected and never received.
    pub lost: u64,
    /// Deliveries of a message a member already had.
    pub duplicates: u64,
    /// Deliveries per second, from the first send to the last delivery.
    pub deliveries_per_s: f64,
    /// Messages per second over the same interval.
    pub messages_per_s: f64,
    /// Per message: from the start of its send until the last member had it, microseconds.
    pub latency_to_last_member_us: Latency,
    /// Per delivery: from the start of the send until that member had it, microseconds.
    pub latency_per_delivery_us: Latency,
    /// Bytes of one application message on the wire (what the server stores per copy).
    pub message_bytes: usize,
    /// Each add commit, from building it to the server's answer (durable), microseconds.
    pub commit_latency_us: Latency,
    /// Add commits per second during setup (one committer, one after another).
    pub commits_per_s: f64,
    /// The server's CPU per delivery during the load, microseconds.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// The server's peak resident memory, bytes.
    pub server_peak_rss_bytes: Option<u64>,
    /// Seconds of setup (sign-ups, adds, receivers drained, texts sealed).
    pub setup_s: f64,
    /// Texts the creator's client sealed per second before the load (MLS, its state saved
    /// durably after each).
    pub seals_per_s: f64,
    /// Bytes the store writes for one message of `message_bytes` to the other members, as the
    /// server stores group traffic (one shared body), measured on a scratch store (module doc).
    pub stored_bytes_per_message: u64,
    /// The same message with a body per copy, as before shared bodies.
    pub stored_bytes_per_message_unshared: u64,
}

/// A group text's plaintext (docs/PROTOCOL.md 5.7): `{"kind": "text", "text": str}`.
#[derive(Serialize)]
struct GroupText {
    kind: &'static str,
    text: String,
}

impl FanoutReport {
    /// The report as lines of text.
    pub fn to_text(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "group of {} members, {} messages of {} bytes on the wire\n\
             delivered {}/{} (lost {}, duplicates {}): {:.0} deliveries/s, {:.0} messages/s\n\
             latency to the last member: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n\
             latency per delivery: p50 {:.2} ms, p99 {:.2} ms\n\
             commit (add one member): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.1} commits/s\n\
             server: {} µs CPU per delivery, peak RSS {} MiB; setup {:.1} s; sealing {:.0}/s\n\
             stored per message: {} B (with a body per copy: {} B)\n",
            self.members,
            self.messages,
            self.message_bytes,
            self.delivered,
            self.expected,
            self.lost,
            self.duplicates,
            self.deliveries_per_s,
            self.messages_per_s,
            ms(self.latency_to_last_member_us.p50),
            ms(self.latency_to_last_member_us.p99),
            ms(self.latency_to_last_member_us.max),
            ms(self.latency_per_delivery_us.p50),
            ms(self.latency_per_delivery_us.p99),
            ms(self.commit_latency_us.p50),
            ms(self.commit_latency_us.p99),
            ms(self.commit_latency_us.max),
            self.commits_per_s,
            self.server_cpu_us_per_delivery
                .map_or("?".into(), |c| format!("{c:.1}")),
            self.server_peak_rss_bytes.map_or("?".into(), |b| format!(
                "{:.1}",
                b as f64 / f64::from(1 << 20)
            )),
            self.setup_s,
            self.seals_per_s,
            self.stored_bytes_per_message,
            self.stored_bytes_per_message_unshared,
        )
    }
}

/// Runs `sfc-bench fanout ARGS` (`args` without the program name and subcommand).
pub fn cli_main(args: Vec<String>) -> ExitCode {
    super::subcommand_main(
        "sfc-bench fanout",
        args,
        |cli: &FanoutCli| cli.json,
        FanoutReport::to_text,
        |cli: FanoutCli| async move { run(&cli).await },
    )
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

async fn run(cli: &FanoutCli) -> Result<FanoutReport, BenchError> {
    if !(2..=1000).contains(&cli.members) {
        return Err(setup("--members must be 2 to 1,000"));
    }
    let server_bin = match &cli.server_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()
            .map_err(setup)?
            .with_file_name("sfc-server"),
    };
    let target = Target::spawn(&server_bin, &[]).await?;
    let result = measure(cli, &target).await;
    target.stop().await;
    result
}

/// A signed-up user with identity, prekeys and key packages published.
async fn member(
    options: ClientOptions,
    home: PathBuf,
    name: String,
    password: String,
) -> Result<(Messenger, SessionToken), BenchError> {
    let client = Client::connect(&options).await?;
    let (_, token) = client.signup(&name, Password::new(&password)).await?;
    let messenger = Messenger::new(client, &home, &name).map_err(setup)?;
    messenger.ensure_keys().await.map_err(setup)?;
    messenger.ensure_key_packages().await.map_err(setup)?;
    Ok((messenger, token))
}

/// Group texts as the members got them: a delivery may come before its sender has the
/// server's answer, so arrivals are matched to sends at the end.
#[derive(Default)]
struct Arrivals {
    /// Per message id: when each member had it (first time).
    reached: HashMap<MessageId, Vec<Instant>>,
    /// Deliveries of a message a member already had.
    duplicates: u64,
    /// Bytes of the last group text delivered.
    message_bytes: usize,
}

async fn measure(cli: &FanoutCli, target: &Target) -> Result<FanoutReport, BenchError> {
    let setup_start = Instant::now();
    let work = tempfile::tempdir().map_err(setup)?;
    let options = target.options.clone();
    let tag = &hex::encode(MessageId::random().map_err(setup)?.0)[..8];
    let password = format!("pw-{tag}-fanout");
    let names: Vec<String> = (0..cli.members).map(|i| format!("g{i}_{tag}")).collect();

    // Sign-ups, a few at a time (each costs the server an argon2 hash).
    let mut members: Vec<Option<(Messenger, SessionToken)>> = Vec::new();
    members.resize_with(cli.members, || None);
    let mut signups = JoinSet::new();
    let mut next = 0;
    while next < names.len() || !signups.is_empty() {
        while next < names.len() && signups.len() < SETUP_CONCURRENCY {
            let (options, home, name, password) = (
                options.clone(),
                work.path().join(&names[next]),
                names[next].clone(),
                password.clone(),
            );
            let i = next;
            signups.spawn(async move { (i, member(options, home, name, password).await) });
            next += 1;
        }
        if let Some(done) = signups.join_next().await {
            let (i, made) = done.map_err(setup)?;
            members[i] = Some(made?);
        }
    }
    let mut members: Vec<(Messenger, SessionToken)> = members.into_iter().flatten().collect();
    let (creator, _) = members.remove(0);
    let group = format!("fan{tag}");
    creator.create_group(&group).await.map_err(setup)?;
    let mut commits = Vec::with_capacity(names.len());
    let adding = Instant::now();
    for name in &names[1..] {
        let start = Instant::now();
        creator.group_add(&group, name).await.map_err(setup)?;
        commits.push(start.elapsed());
    }
    let commits_per_s = commits.len() as f64 / adding.elapsed().as_secs_f64().max(1e-9);
    let commit_latency = latency(commits.iter().map(|d| d.as_micros() as u64))?;

    // The other members become bare receivers: their backlog (commits, their welcome) is taken
    // and acknowledged first.
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let mut receivers = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(members.len().max(1));
    let stop = tokio_util::sync::CancellationToken::new();
    for (messenger, token) in members {
        messenger.close().await;
        let client = Client::connect(&options).await?;
        client.resume_with(token, true).await?;
        let (arrivals, ready, stop, group) = (
            arrivals.clone(),
            ready_tx.clone(),
            stop.clone(),
            group.clone(),
        );
        receivers.spawn(async move { receive(client, group, arrivals, ready, stop).await });
    }
    drop(ready_tx);
    let mut drained = 0;
    while drained < names.len() - 1 {
        if ready_rx.recv().await.is_none() {
            break;
        }
        drained += 1;
    }
    let setup_s = setup_start.elapsed().as_secs_f64();

    // The texts, sealed by the creator's MLS state before the load (each seal is a durable
    // save of that state, a cost of the sending client, not of the fan-out): their seal rate
    // is reported on its own.
    let plaintext = rmp_serde::to_vec_named(&GroupText {
        kind: "text",
        text: "x".repeat(cli.size),
    })
    .map_err(setup)?;
    let group_id = creator.group(&group).await.map_err(setup)?.mls.id;
    let mls = creator.mls().await.map_err(setup)?;
    let sealing = Instant::now();
    let mut bodies = Vec::with_capacity(cli.messages);
    for _ in 0..cli.messages {
        let (mls, plaintext) = (mls.clone(), plaintext.clone());
        let body = tokio::task::spawn_blocking(move || mls.send(&group_id, &plaintext))
            .await
            .map_err(setup)?
            .map_err(setup)?;
        bodies.push((MessageId::random().map_err(setup)?, body));
    }
    let seals_per_s = cli.messages as f64 / sealing.elapsed().as_secs_f64().max(1e-9);
    let setup_s = setup_s + sealing.elapsed().as_secs_f64();

    // The load: the sealed texts on message streams, `window` in flight.
    let cpu_before = target.stats().map(|s| s.cpu_s);
    let load_start = Instant::now();
    let client = creator.client();
    let window = Arc::new(tokio::sync::Semaphore::new(cli.window.max(1)));
    let mut sends = JoinSet::new();
    let mut sent: HashMap<MessageId, Instant> = HashMap::with_capacity(cli.messages);
    for (id, body) in bodies {
        let permit = window.clone().acquire_owned().await.map_err(setup)?;
        let (client, group) = (client.clone(), group.clone());
        sent.insert(id, Instant::now());
        sends.spawn(async move {
            let _permit = permit;
            client.send_group(&group, "mls", id, &body, None).await
        });
        while let Some(done) = sends.try_join_next() {
            done.map_err(setup)??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done.map_err(setup)??;
    }
    let expected = (cli.messages * (names.len() - 1)) as u64;
    let deadline = Instant::now() + DRAIN_WAIT;
    let mut last_delivery = load_start;
    loop {
        let (got, last) = {
            let a = arrivals.lock().map_err(setup)?;
            // Only this load's texts (a late piece of a member's backlog is not one).
            let load = a.reached.iter().filter(|(id, _)| sent.contains_key(*id));
            let got: usize = load.clone().map(|(_, times)| times.len()).sum();
            (got as u64, load.flat_map(|(_, times)| times).max().copied())
        };
        if let Some(last) = last {
            last_delivery = last_delivery.max(last);
        }
        if got >= expected || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = match (cpu_before, target.stats()) {
        (Some(before), Some(after)) => Some(after.cpu_s - before),
        _ => None,
    };
    stop.cancel();
    while receivers.join_next().await.is_some() {}
    creator.close().await;

    let message_bytes = arrivals.lock().map_err(setup)?.message_bytes;
    let (stored_shared, stored_unshared) =
        stored_bytes(&names[0], &names[1..], &group, message_bytes).await?;
    let a = arrivals.lock().map_err(setup)?;
    let mut delivered = 0u64;
    let mut to_last = Vec::with_capacity(sent.len());
    let mut per_delivery = Vec::new();
    for (id, times) in &a.reached {
        // Only what this run sent during the load (nothing else is group text here).
        let Some(start) = sent.get(id) else { continue };
        delivered += times.len() as u64;
        let us = |t: &Instant| t.saturating_duration_since(*start).as_micros() as u64;
        per_delivery.extend(times.iter().map(us));
        if times.len() == names.len() - 1 {
            to_last.extend(times.iter().max().map(us));
        }
    }
    let elapsed = last_delivery
        .saturating_duration_since(load_start)
        .as_secs_f64()
        .max(1e-9);
    Ok(FanoutReport {
        members: names.len(),
        messages: cli.messages,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicates: a.duplicates,
        deliveries_per_s: delivered as f64 / elapsed,
        messages_per_s: cli.messages as f64 / elapsed,
        latency_to_last_member_us: latency(to_last.into_iter())?,
        latency_per_delivery_us: latency(per_delivery.into_iter())?,
        message_bytes: a.message_bytes,
        commit_latency_us: commit_latency,
        commits_per_s,
        server_cpu_us_per_delivery: cpu.map(|c| c * 1e6 / (delivered.max(1) as f64)),
        server_peak_rss_bytes: target.stats().map(|s| s.peak_rss),
        setup_s,
        seals_per_s,
        stored_bytes_per_message: stored_shared,
        stored_bytes_per_message_unshared: stored_unshared,
    })
}

/// Bytes one group message of `body_len` bytes from `sender` to device 1 of each of
/// `members` adds to a scratch store (see the module doc): (as the server stores it, with one
/// body shared by the copies; with a body per copy, as before shared bodies). Keys and values
/// of the message keyspaces, before fjall's framing.
pub async fn stored_bytes(
    sender: &str,
    members: &[String],
    group: &str,
    body_len: usize,
) -> Result<(u64, u64), BenchError> {
    let dir = tempfile::tempdir().map_err(setup)?;
    let options = StoreOptions {
        durability: Durability::Buffered,
        ..StoreOptions::default()
    };
    // A directory the store creates (private) itself.
    let store = FjallStore::open_with(&dir.path().join("store"), options).map_err(setup)?;
    let name = |n: &str| Username::parse(n).map_err(|e| setup(format!("{n:?}: {e}")));
    for user in std::iter::once(sender).chain(members.iter().map(String::as_str)) {
        let record = UserRecord {
            password_hash: String::new(),
            created_at: 0,
        };
        store
            .create_user(&name(user)?, record)
            .await
            .map_err(setup)?;
    }
    let group = name(group)?;
    let sender = name(sender)?;
    let mut totals = Vec::with_capacity(3);
    totals.push(store.message_footprint().await.map_err(setup)?.total());
    for shared in [true, false] {
        let mut copies = Vec::with_capacity(members.len());
        for (at, member) in members.iter().enumerate() {
            let mut body = vec![0x5a; body_len];
            if !shared && let Some(first) = body.first_mut() {
                *first = at as u8;
            }
            copies.push(Copy {
                recipient: name(member)?,
                device: 1,
                body,
            });
        }
        let now = crate::unix_now();
        let message = NewMessage {
            sender: sender.clone(),
            sender_device: 1,
            to: sender.clone(),
            id: MessageId::random().map_err(setup)?,
            // The server's stored kind of group traffic: `kind 0x00 group`.
            kind: format!("mls\0{group}"),
            copies,
            sent_at: now,
            expires_at: now + 7 * 24 * 3600,
        };
        match store.append(message, AppendHooks::default()).await {
            Ok(Appended::Stored { .. }) => {}
            other => return Err(setup(format!("the scratch store refused: {other:?}"))),
        }
        totals.push(store.message_footprint().await.map_err(setup)?.total());
    }
    store.close().await.map_err(setup)?;
    match totals.as_slice() {
        [empty, shared, both] => Ok((shared - empty, both - shared)),
        _ => Err(setup("no footprint")),
    }
}

/// A bare member: takes deliveries and acknowledges them; group texts sent during the load are
/// timed. Says `ready` once its backlog is drained (nothing for [`QUIET`]).
async fn receive(
    client: Client,
    group: String,
    arrivals: Arc<Mutex<Arrivals>>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), BenchError> {
    let mut ready = Some(ready);
    let mut seen = HashSet::new();
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => break,
            delivery = client.next_delivery(QUIET) => delivery,
        };
        let Some(delivery) = delivery else {
            if let Some(ready) = ready.take() {
                let _ = ready.send(()).await;
            }
            continue;
        };
        let now = Instant::now();
        client.ack_quietly(vec![delivery.seq]).await?;
        if delivery.group.as_deref() != Some(group.as_str()) {
            continue;
        }
        let mut a = arrivals.lock().map_err(setup)?;
        if !seen.insert(delivery.id) {
            a.duplicates += 1;
            continue;
        }
        a.message_bytes = delivery.body.len();
        a.reached.entry(delivery.id).or_default().push(now);
    }
    client.close().await;
    Ok(())
}

fn latency(samples: impl Iterator<Item = u64>) -> Result<Latency, BenchError> {
    let mut h = histogram()?;
    for s in samples {
        h.saturating_record(s.max(1));
    }
    Ok(Latency::from(&h))
}
