//! The load generator behind `sfc-bench`: real clients (QUIC, TLS, the client library) driving a
//! server, an HDR histogram of latencies, and the server's CPU time and peak memory when it is
//! spawned as a child process.
//!
//! Every relay and offline message is sealed end to end (X3DH, then the Double Ratchet) by its
//! sender and opened by its receiver, as a real client does; sessions stay in memory. A relay
//! pair's sessions are started before the load (one warm-up message, opened and acknowledged
//! by every device, not counted), so the relay measures relaying, not the receivers' one-time
//! X3DH accepts. With `--devices N` each relay user has N devices, linked through the server
//! (src/bench/relay.rs), and each message carries a copy per device (2N − 1 receive it).
//!
//! Latency of the open-loop relay is measured from each message's *intended* send time, so a
//! stall delays the measurement instead of the schedule (no coordinated omission).

pub mod fanout;
pub mod file;
pub mod flood;
pub mod flood_logins;
mod linking;
pub mod packets;
pub mod progress;
mod relay;
mod scenarios;
mod sealing;
mod target;

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

pub use scenarios::{pace, run};
pub use target::{MachineLoad, MachineTimes, ServerStats, Target};

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N sender/receiver pairs online, each pair's session started before the load.
    Relay,
    /// Fill offline inboxes, then log the users in and drain them.
    Offline,
    /// Password logins, each on a new connection (full TLS handshake).
    Login,
    /// Token resumes, each on a new connection (full TLS handshake).
    Resume,
    /// Full TLS handshakes (connect, hello, close). Login, resume and handshake loops share
    /// 4 client sockets, with TLS session resumption off.
    Handshake,
    /// Hold N authenticated idle connections.
    Connections,
    /// A flood of N idle connections that say `hello` and never log in, from `--sources`
    /// loopback addresses, held for the duration, closed, `--rounds` times (server RSS
    /// before, held and after each round).
    Flood,
}

impl Scenario {
    /// The scenario's name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Offline => "offline",
            Self::Login => "login",
            Self::Resume => "resume",
            Self::Handshake => "handshake",
            Self::Connections => "connections",
            Self::Flood => "flood",
        }
    }
}

/// Parameters of a run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The scenario.
    pub scenario: Scenario,
    /// Pairs (relay), users (offline), concurrent clients (login, resume, handshake) or
    /// connections (connections).
    pub clients: usize,
    /// Total messages (or operations) per second across all clients; `None` is full speed.
    pub rate: Option<f64>,
    /// How long to offer load (or hold connections).
    pub duration: Duration,
    /// Message body size in bytes.
    pub size: usize,
    /// Sends in flight per sender at full speed.
    pub window: usize,
    /// Messages per user in the offline scenario.
    pub backlog: usize,
    /// Client UDP sockets (quinn endpoints) the scenario's connections share, round-robin; 0
    /// gives each connection its own.
    pub client_sockets: usize,
    /// Flood: loopback source addresses to spread connections over (0: the system's choice).
    pub sources: usize,
    /// Flood: how many times to open, hold and close the connections.
    pub rounds: usize,
    /// Relay: devices per user (1 to 8).
    pub devices: usize,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

/// The quantiles of [`Report::latency_percentiles_us`]: the whole distribution for plots, from
/// the smallest value (0) to the largest (1), with more points in the tail.
const QUANTILES: [f64; 14] = [
    0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0,
];

/// `[percentile, microseconds]` pairs at [`QUANTILES`], both non-decreasing.
fn percentiles(histogram: &Histogram<u64>) -> Vec<(f64, u64)> {
    QUANTILES
        .iter()
        // Percent rounded to 3 decimals, so that 0.999 prints as 99.9.
        .map(|&q| ((q * 1e5).round() / 1e3, histogram.value_at_quantile(q)))
        .collect()
}

impl Latency {
    pub(crate) fn from(histogram: &Histogram<u64>) -> Self {
        Self {
            p50: histogram.value_at_quantile(0.5),
            p90: histogram.value_at_quantile(0.9),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// The result of a run, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: &'static str,
    /// Messages acknowledged by the server (or operations completed).
    pub sent: u64,
    /// Messages received by the receivers (or operations completed).
    pub delivered: u64,
    /// `sent` minus unique deliveries (must be 0).
    pub lost: u64,
    /// Deliveries of an id already received (must be 0).
    pub duplicates: u64,
    /// Operations or messages that failed with an error.
    pub errors: u64,
    /// Delivered (or completed) per second over the measured interval.
    pub throughput_per_s: f64,
    /// Latency distribution, microseconds. Relay: one sample per delivered copy, from the
    /// message's intended send time to the moment that device opened it (with one device, one
    /// per message).
    pub latency_us: Latency,
    /// The latency distribution in more detail: `[percentile, microseconds]` pairs from 0 (the
    /// smallest) to 100 (the largest), for plots.
    pub latency_percentiles_us: Vec<(f64, u64)>,
    /// The server's CPU seconds during the run (with `--spawn`).
    pub server_cpu_s: Option<f64>,
    /// The server's peak resident memory (with `--spawn`).
    pub server_peak_rss_bytes: Option<u64>,
    /// Connections held (connections scenario).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Server RSS growth per held connection (connections scenario, with `--spawn`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_per_connection_bytes: Option<u64>,
    /// When messages were lost: how many of them a reconnecting receiver then got (stored on
    /// the server but not delivered during the run). Diagnoses where a loss happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redelivered_after_reconnect: Option<u64>,
    /// Relay: sends the server refused because the recipient's inbox was full, each then sent
    /// again (the same sealed message, the same id) until stored. Not errors: latency counts
    /// the wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
    /// The whole machine's busy time over the load, percent of all cores (relay: while the
    /// senders send; offline: until the last message is in; connections: while they open).
    /// `null` off Linux and for a load shorter than a quarter of a second of two cores.
    pub machine_busy_pct: Option<f64>,
    /// Of the same interval, the percent of the cores' time the hypervisor took (steal):
    /// a disturbed run shows here.
    pub machine_steal_pct: Option<f64>,
    /// Open loop (`--rate`): how late the load generator's pacer handed out send slots,
    /// microseconds. Latency counts from the intended time, so this is part of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pacer_lateness_us: Option<Latency>,
    /// Flood: each round's counts and the server's RSS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<flood::FloodReport>,
    /// Relay: devices per user (`--devices`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<u32>,
    /// Relay: copies each message carries, one per receiving device: the receiver's N and the
    /// sender's N − 1 others (1 with one device). `delivered`, `lost` and `duplicates` count
    /// copies, summed over the devices: nothing lost means `delivered` = `sent` × this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copies_per_message: Option<u64>,
    /// Relay: messages stored per second over the interval of `throughput_per_s` (which counts
    /// delivered copies); with one device and nothing lost, the two are equal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_per_s: Option<f64>,
    /// Relay: what each device got, summed over the pairs: the receiver's devices 1..N, then
    /// the sender's devices 2..N (copies of what its device 1 sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_device: Option<Vec<DeviceDeliveries>>,
    /// Relay: seconds of setup before the load (sign-ups, links, keys, X3DH, warm-up); not
    /// part of any other figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_s: Option<f64>,
    /// Relay (with `--spawn`): the server's CPU seconds from the start of the load until the
    /// receiving devices had everything (the setup left out, unlike `server_cpu_s`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_load_s: Option<f64>,
    /// Relay (with `--spawn`): `server_cpu_load_s` per delivered copy, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Relay: the load generator's own CPU seconds over the same span as `server_cpu_load_s`
    /// (its senders and receivers: sealing, opening, QUIC and TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu_load_s: Option<f64>,
    /// Relay: `client_cpu_load_s` per delivered copy, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu_us_per_delivery: Option<f64>,
    /// Relay: the UDP datagrams and QUIC frames of the load generator's connections (both
    /// ways, so the whole relay's traffic) from the start of the load until the receivers had
    /// everything, per delivered copy (quinn's counters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets: Option<packets::PacketCounts>,
}

/// Whose device a relay delivery went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceOwner {
    /// The pair's receiver (the message's addressee).
    Receiver,
    /// The pair's sender: one of its devices other than the sending device 1.
    Sender,
}

/// One device position's deliveries in a relay run, summed over the pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceDeliveries {
    /// Whose device.
    pub owner: DeviceOwner,
    /// Its device id.
    pub device: crate::protocol::DeviceId,
    /// Distinct messages it received and opened.
    pub delivered: u64,
    /// Messages sent that it did not receive (`sent` minus `delivered`).
    pub lost: u64,
    /// Deliveries of a message it had already received.
    pub duplicates: u64,
}

impl Report {
    /// The report as plain lines for people.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "scenario {}: sent {} delivered {} lost {} duplicates {} errors {}\n\
             throughput {:.0}/s; latency us p50 {} p90 {} p99 {} p99.9 {} max {}\n",
            self.scenario,
            self.sent,
            self.delivered,
            self.lost,
            self.duplicates,
            self.errors,
            self.throughput_per_s,
            self.latency_us.p50,
            self.latency_us.p90,
            self.latency_us.p99,
            self.latency_us.p999,
            self.latency_us.max,
        );
        if let (Some(devices), Some(copies), Some(rows)) = (
            self.devices,
            self.copies_per_message,
            &self.deliveries_per_device,
        ) {
            text.push_str(&format!(
                "devices per user {devices}: {copies} copies per message, {:.0} messages/s\n",
                self.messages_per_s.unwrap_or(0.0)
            ));
            for row in rows {
                text.push_str(&format!(
                    "  {:?} device {}: delivered {} lost {} duplicates {}\n",
                    row.owner, row.device, row.delivered, row.lost, row.duplicates
                ));
            }
        }
        if let (Some(cpu), Some(per)) = (self.server_cpu_load_s, self.server_cpu_us_per_delivery) {
            text.push_str(&format!(
                "server CPU over the load: {cpu:.2} s, {per:.1} us per delivered copy\n"
            ));
        }
        if let (Some(cpu), Some(per)) = (self.client_cpu_load_s, self.client_cpu_us_per_delivery) {
            text.push_str(&format!(
                "load generator CPU over the load: {cpu:.2} s, {per:.1} us per delivered copy\n"
            ));
        }
        if let Some(packets) = &self.packets {
            text.push_str(&packets.to_text());
        }
        if let Some(setup) = self.setup_s {
            text.push_str(&format!("setup (not measured load): {setup:.1} s\n"));
        }
        if let (Some(cpu), Some(rss)) = (self.server_cpu_s, self.server_peak_rss_bytes) {
            text.push_str(&format!(
                "server: {cpu:.2} CPU s, peak RSS {:.1} MiB\n",
                rss as f64 / 1048576.0
            ));
        }
        if let (Some(busy), Some(steal)) = (self.machine_busy_pct, self.machine_steal_pct) {
            text.push_str(&format!(
                "machine during the load: {busy:.1} % busy, {steal:.1} % stolen by the hypervisor\n"
            ));
        }
        if let Some(late) = &self.pacer_lateness_us {
            text.push_str(&format!(
                "pacer lateness us p50 {} p99 {} max {} (included in latency)\n",
                late.p50, late.p99, late.max
            ));
        }
        if let Some(n) = self.refused.filter(|n| *n > 0) {
            text.push_str(&format!(
                "refused as inbox_full and sent again: {n} times (the receivers fell behind)\n"
            ));
        }
        if let Some(n) = self.redelivered_after_reconnect {
            text.push_str(&format!(
                "of the lost, {n} came on reconnecting (stored, not delivered in-session)\n"
            ));
        }
        if let Some(n) = self.connections {
            text.push_str(&format!("connections held: {n}"));
            if let Some(per) = self.server_rss_per_connection_bytes {
                text.push_str(&format!(", server RSS per connection {per} B"));
            }
            text.push('\n');
        }
        if let Some(flood) = &self.flood {
            text.push_str(&flood.to_text());
        }
        text
    }
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up (spawning the server, creating users) failed.
    #[error("{0}")]
    Setup(String),
    /// A client operation failed where the run cannot go on.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
}

/// A histogram of 1 µs to 1 h with 3 significant digits.
/// Runs a subcommand with options of its own (`sfc-bench file`, `sfc-bench fanout`): parses
/// `args` (without the program name and subcommand) as `C`, runs `run` on a new runtime, and
/// prints its report as one JSON object (with `json(&cli)`) or as text. Exit status 2 for bad
/// options, 1 for a failed run.
pub(crate) fn subcommand_main<C, R, F, Fut>(
    name: &str,
    args: Vec<String>,
    json: impl Fn(&C) -> bool,
    text: impl Fn(&R) -> String,
    run: F,
) -> std::process::ExitCode
where
    C: clap::Parser,
    R: Serialize,
    F: FnOnce(C) -> Fut,
    Fut: std::future::Future<Output = Result<R, BenchError>>,
{
    use std::process::ExitCode;
    let cli = match C::try_parse_from(std::iter::once(name.to_owned()).chain(args)) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let as_json = json(&cli);
    let report = tokio::runtime::Runtime::new()
        .map_err(|e| BenchError::Setup(e.to_string()))
        .and_then(|runtime| runtime.block_on(run(cli)));
    let printed = match report {
        Ok(report) if as_json => serde_json::to_string(&report)
            .map(|line| println!("{line}"))
            .map_err(|e| e.to_string()),
        Ok(report) => {
            print!("{}", text(&report));
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sfc-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| BenchError::Setup(e.to_string()))
}
