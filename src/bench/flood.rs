//! `sfc-bench flood`: a connection flood. Each connection completes the QUIC and TLS handshake,
//! says `hello` on its control stream and then does nothing (the idle unauthenticated probe
//! that used to hold a connection slot for good), spread round-robin over `--sources` loopback
//! source addresses (127.1.0.1, 127.1.0.2, ...: all of 127/8 is loopback on Linux) so that a
//! per-address cap does not stop it at the first address. It holds them for `--duration`,
//! closes them all, lets the server settle, and does it again `--rounds` times, reading the
//! spawned server's RSS before, while held and after each round: what one idle connection
//! costs, and whether the memory comes back.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, TransportErrorCode};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use super::progress::{self, Goal};
use super::scenarios::empty_report;
use super::{BenchError, BenchOptions, Report, Scenario, Target, histogram};
use crate::protocol::{
    ClientFrame, MAX_CONTROL_FRAME, PROTOCOL_VERSION, Request, read_frame, write_frame,
};
use crate::{tls, transport};

/// The first source address of `--sources`: outside 127.0.0.0/24, where honest clients of a
/// test on the same machine usually come from.
pub const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);
/// Handshakes in flight at once (the server makes clients beyond 256 prove their address).
const OPENING: usize = 256;
/// Time given to the server after a round's connections are closed, before its RSS is read:
/// the closes to be processed and freed memory to go back (jemalloc decays it over ≈ 1 s).
const SETTLE: Duration = Duration::from_secs(5);

/// One round of the flood.
#[derive(Debug, Clone, Serialize)]
pub struct FloodRound {
    /// Connections that completed `hello`.
    pub opened: u64,
    /// Connections the server refused (QUIC `CONNECTION_REFUSED`).
    pub refused: u64,
    /// Connections that failed otherwise (timeouts, resets).
    pub failed: u64,
    /// Held connections the server had closed by the end of the hold (e.g. the login
    /// deadline).
    pub closed_by_server: u64,
    /// Seconds to open the round's connections.
    pub open_s: f64,
    /// The server's RSS while they were held (with `--spawn`).
    pub rss_held_bytes: Option<u64>,
    /// The server's RSS once they were closed and it settled (with `--spawn`).
    pub rss_after_bytes: Option<u64>,
}

/// What the flood saw, in the report's `flood` field.
#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    /// Source addresses used (0: the system's choice).
    pub sources: usize,
    /// The server's RSS before the first round (with `--spawn`).
    pub rss_before_bytes: Option<u64>,
    /// Each round.
    pub rounds: Vec<FloodRound>,
}

impl FloodReport {
    /// Lines for people.
    pub fn to_text(&self) -> String {
        let mib = |b: Option<u64>| match b {
            Some(b) => format!("{:.1} MiB", b as f64 / 1048576.0),
            None => "-".to_owned(),
        };
        let mut text = format!(
            "flood from {} source addresses; server RSS before {}\n",
            self.sources,
            mib(self.rss_before_bytes)
        );
        for (i, r) in self.rounds.iter().enumerate() {
            text.push_str(&format!(
                "round {}: opened {} in {:.1} s, refused {}, failed {}, closed by the server {}; RSS held {}, after {}\n",
                i + 1,
                r.opened,
                r.open_s,
                r.refused,
                r.failed,
                r.closed_by_server,
                mib(r.rss_held_bytes),
                mib(r.rss_after_bytes)
            ));
        }
        text
    }
}

/// An idle connection: kept only so that it stays open.
struct Held {
    conn: Connection,
    _streams: (SendStream, RecvStream),
}

/// How one connection attempt ended.
enum Outcome {
    Held(Held),
    Refused,
    Failed,
}

/// Runs the flood: `options.clients` connections per round, `options.rounds` rounds, each held
/// for `options.duration`.
pub(crate) async fn idle(target: &Target, options: &BenchOptions) -> Result<Report, BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    let (server, server_name) = resolve(&target.options.server).await?;
    let server_name = target.options.server_name.clone().unwrap_or(server_name);
    let anchors = tls::load_trust_anchors(&target.options.ca_file).map_err(|e| setup(&e))?;
    let mut endpoints = Vec::new();
    let locals: Vec<SocketAddr> = if options.sources == 0 {
        vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))]
    } else {
        (0..options.sources)
            .map(|i| {
                let ip = Ipv4Addr::from(u32::from(FIRST_SOURCE).wrapping_add(i as u32));
                SocketAddr::new(IpAddr::V4(ip), 0)
            })
            .collect()
    };
    for local in locals {
        let crypto = tls::client_crypto(anchors.clone(), false).map_err(|e| setup(&e))?;
        endpoints.push(transport::client_endpoint_on(local, crypto).map_err(|e| setup(&e))?);
    }
    let mut flood = FloodReport {
        sources: options.sources,
        rss_before_bytes: target.stats().map(|s| s.rss),
        rounds: Vec::new(),
    };
    let latencies = Arc::new(Mutex::new(histogram()?));
    let mut total_opened = 0;
    let mut total_errors = 0;
    let started = Instant::now();
    for round in 0..options.rounds.max(1) {
        progress::phase("open", Goal::Delivered(options.clients as u64));
        let slots = Arc::new(Semaphore::new(OPENING));
        let (refused, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut opening = JoinSet::new();
        let begin = Instant::now();
        for c in 0..options.clients {
            let permit = Arc::clone(&slots)
                .acquire_owned()
                .await
                .map_err(|e| setup(&e))?;
            let endpoint = endpoints[c % endpoints.len()].clone();
            let (name, latencies) = (server_name.clone(), Arc::clone(&latencies));
            opening.spawn(async move {
                let begin = Instant::now();
                let outcome = open(&endpoint, server, &name).await;
                if matches!(outcome, Outcome::Held(_)) {
                    let _ = latencies
                        .lock()
                        .await
                        .record((begin.elapsed().as_micros() as u64).max(1));
                    progress::delivered();
                }
                drop(permit);
                outcome
            });
        }
        let mut held = Vec::with_capacity(options.clients);
        while let Some(done) = opening.join_next().await {
            match done {
                Ok(Outcome::Held(h)) => held.push(h),
                Ok(Outcome::Refused) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Failed) | Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let open_s = begin.elapsed().as_secs_f64();
        // A line for scripts that wait for the flood to be in place.
        eprintln!(
            "flood: round {} holding {} connections",
            round + 1,
            held.len()
        );
        progress::phase("hold", Goal::Time(options.duration));
        tokio::time::sleep(options.duration).await;
        let rss_held_bytes = target.stats().map(|s| s.rss);
        let closed_by_server = held
            .iter()
            .filter(|h| h.conn.close_reason().is_some())
            .count() as u64;
        let opened = held.len() as u64;
        for h in &held {
            h.conn.close(0u32.into(), b"bye");
        }
        drop(held);
        eprintln!("flood: round {} closed", round + 1);
        progress::phase("settle", Goal::Time(SETTLE));
        tokio::time::sleep(SETTLE).await;
        let round = FloodRound {
            opened,
            refused: refused.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            closed_by_server,
            open_s,
            rss_held_bytes,
            rss_after_bytes: target.stats().map(|s| s.rss),
        };
        total_opened += round.opened;
        total_errors += round.refused + round.failed;
        flood.rounds.push(round);
    }
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    let histogram = latencies.lock().await;
    let mut report = empty_report(Scenario::Flood, &histogram);
    report.sent = total_opened;
    report.delivered = total_opened;
    report.errors = total_errors;
    report.throughput_per_s = total_opened as f64 / started.elapsed().as_secs_f64();
    report.connections = flood.rounds.last().map(|r| r.opened);
    if let (Some(before), Some(last)) = (flood.rss_before_bytes, flood.rounds.last())
        && let Some(held) = last.rss_held_bytes
        && last.opened > 0
    {
        report.server_rss_per_connection_bytes = Some(held.saturating_sub(before) / last.opened);
    }
    report.flood = Some(flood);
    Ok(report)
}

/// Connects from `endpoint`, says `hello`, and keeps the connection.
async fn open(endpoint: &Endpoint, server: SocketAddr, name: &str) -> Outcome {
    let Ok(connecting) = endpoint.connect(server, name) else {
        return Outcome::Failed;
    };
    let conn = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(ConnectionError::ConnectionClosed(close)))
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            return Outcome::Refused;
        }
        _ => return Outcome::Failed,
    };
    let hello = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let frame = ClientFrame {
            id: 1,
            request: Request::Hello {
                version: PROTOCOL_VERSION,
                client: Some("sfc-bench flood".into()),
            },
        };
        write_frame(&mut send, &frame, MAX_CONTROL_FRAME)
            .await
            .ok()?;
        let mut buf = Vec::new();
        match read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf).await {
            Ok(true) => Some((send, recv)),
            _ => None,
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), hello).await {
        Ok(Some(streams)) => Outcome::Held(Held {
            conn,
            _streams: streams,
        }),
        _ => Outcome::Failed,
    }
}

/// Splits `HOST:PORT` and resolves it.
async fn resolve(server: &str) -> Result<(SocketAddr, String), BenchError> {
    let bad = || BenchError::Setup(format!("server address {server:?} is not HOST:PORT"));
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| BenchError::Setup(format!("{server}: {e}")))?
        .next()
        .ok_or_else(bad)?;
    Ok((addr, host.to_owned()))
}
