//! A wrong-password login flood (`sfc-bench flood-logins`): many connections, from one or many
//! loopback source addresses, each sending `login` with a wrong password as fast as the server
//! answers, while an honest user logs in now and then from 127.0.0.1 and the time each honest
//! login takes is recorded. Run `sfc-bench relay` beside it to see what the flood does to
//! relaying.
//!
//! Connections are made on sockets bound to chosen addresses (all of 127.0.0.0/8 is loopback on
//! Linux), which the client library does not offer, so this speaks the control stream itself.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use quinn::{Endpoint, EndpointConfig, RecvStream, SendStream, TokioRuntime};
use serde::Serialize;
use tokio::sync::Mutex;

use super::{BenchError, Latency, histogram};
use crate::protocol::{
    ClientFrame, MAX_CONTROL_FRAME, PROTOCOL_VERSION, Password, Reply, Request, ServerFrame,
    decode_body, encode_frame, read_frame,
};
use crate::{tls, transport};

/// Longest wait for the flood's connections before it is measured anyway.
const CONNECT_WAIT: Duration = Duration::from_secs(15);

/// The honest user's password.
const HONEST_PASSWORD: &str = "honest user's password";

/// A control-stream connection from a chosen source address.
pub struct SourcedClient {
    _endpoint: Endpoint,
    conn: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    next_id: u64,
    buf: Vec<u8>,
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

impl SourcedClient {
    /// Connects from `local` (port chosen by the system) to `server`, trusting `ca`, and says
    /// `hello`.
    pub async fn connect(server: SocketAddr, ca: &Path, local: IpAddr) -> Result<Self, BenchError> {
        let anchors = tls::load_trust_anchors(ca).map_err(setup)?;
        let crypto = tls::client_crypto(anchors, false).map_err(setup)?;
        let socket = transport::bind_udp(SocketAddr::new(local, 0)).map_err(setup)?;
        let mut endpoint = Endpoint::new(
            EndpointConfig::default(),
            None,
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(setup)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        // Keep-alives, as real clients send: a login may wait long in a flooded queue.
        config.transport_config(Arc::new(transport::client_transport()));
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(server, "localhost")
            .map_err(setup)?
            .await
            .map_err(setup)?;
        let (send, recv) = conn.open_bi().await.map_err(setup)?;
        let mut client = Self {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            next_id: 1,
            buf: Vec::new(),
        };
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: Some("sfc-bench flood-logins".into()),
        };
        match client.request(hello).await? {
            Reply::Hello { .. } => Ok(client),
            other => Err(BenchError::Setup(format!("hello answered {other:?}"))),
        }
    }

    /// Sends one request and reads its reply (requests are not pipelined).
    pub async fn request(&mut self, request: Request) -> Result<Reply, BenchError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = encode_frame(&ClientFrame { id, request }, MAX_CONTROL_FRAME).map_err(setup)?;
        self.send.write_all(&frame).await.map_err(setup)?;
        if !read_frame(&mut self.recv, MAX_CONTROL_FRAME, &mut self.buf)
            .await
            .map_err(setup)?
        {
            return Err(BenchError::Setup("the server closed the stream".into()));
        }
        let frame: ServerFrame = decode_body(&self.buf).map_err(setup)?;
        Ok(frame.reply)
    }

    /// `login`, answered with its reply (a session or an error).
    pub async fn login(&mut self, username: &str, password: &str) -> Result<Reply, BenchError> {
        self.request(Request::Login {
            device: None,
            username: username.into(),
            password: Password::new(password),
        })
        .await
    }

    /// `signup`.
    pub async fn signup(&mut self, username: &str, password: &str) -> Result<Reply, BenchError> {
        self.request(Request::Signup {
            username: username.into(),
            password: Password::new(password),
        })
        .await
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// The name a reply is counted under: its error code, or its type.
pub fn reply_name(reply: &Reply) -> String {
    match reply {
        Reply::Error { code, .. } => format!("{code:?}"),
        Reply::Session { .. } => "session".into(),
        other => format!("{other:?}").chars().take(24).collect(),
    }
}

/// What to flood with.
#[derive(Debug, Clone)]
pub struct FloodOptions {
    /// The server.
    pub server: SocketAddr,
    /// Its CA certificate.
    pub ca: std::path::PathBuf,
    /// Flooding connections.
    pub connections: usize,
    /// Source addresses they spread over: 1 is 127.0.0.2 alone; more are 127.0.1.1, 127.0.1.2...
    pub sources: usize,
    /// How long to flood.
    pub duration: Duration,
    /// Time between two honest logins from 127.0.0.1.
    pub honest_every: Duration,
}

/// What the flood saw.
#[derive(Debug, Serialize)]
pub struct FloodReport {
    /// Flood replies by name (error code or reply type).
    pub flood_replies: BTreeMap<String, u64>,
    /// Flood requests answered per second.
    pub flood_replies_per_s: f64,
    /// Flood connections that could not be made or broke.
    pub flood_failures: u64,
    /// Honest logins made, and how many succeeded.
    pub honest_logins: u64,
    /// Honest logins that got a session.
    pub honest_ok: u64,
    /// Time of an honest login (request to reply), microseconds.
    pub honest_latency_us: Latency,
}

impl FloodReport {
    /// A few lines for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "flood: {:.0} replies/s, {} connection failures\n",
            self.flood_replies_per_s, self.flood_failures
        ));
        for (name, count) in &self.flood_replies {
            out.push_str(&format!("  {name}: {count}\n"));
        }
        let l = &self.honest_latency_us;
        out.push_str(&format!(
            "honest logins: {} of {} ok; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}\n",
            self.honest_ok,
            self.honest_logins,
            l.p50 as f64 / 1e3,
            l.p90 as f64 / 1e3,
            l.p99 as f64 / 1e3,
            l.max as f64 / 1e3,
        ));
        out
    }
}

fn source(options: &FloodOptions, index: usize) -> IpAddr {
    if options.sources <= 1 {
        return IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    }
    let n = index % options.sources;
    // 127.0.1.1 onwards, 254 per /24.
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (n / 254) as u8,
        1 + (n % 254) as u8,
    ))
}

/// Signs up an honest user from 127.0.0.1, floods its account with wrong passwords from the
/// flood sources, and logs the honest user in every `honest_every` meanwhile.
pub async fn run(options: &FloodOptions) -> Result<FloodReport, BenchError> {
    let honest_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut suffix = [0u8; 3];
    getrandom::fill(&mut suffix).map_err(setup)?;
    let victim = format!("honest{}", hex::encode(suffix));
    let mut first = SourcedClient::connect(options.server, &options.ca, honest_ip).await?;
    match first.signup(&victim, HONEST_PASSWORD).await? {
        Reply::Session { .. } => first.close(),
        other => return Err(BenchError::Setup(format!("signup answered {other:?}"))),
    }

    let stop = Arc::new(AtomicBool::new(false));
    let replies: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    // Connections made (or failed): the flood is measured once all are, in its steady state
    // (the storm of handshakes before is what `sfc-bench flood` measures).
    let up = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..options.connections {
        let (options, stop, replies, victim, up) = (
            options.clone(),
            Arc::clone(&stop),
            Arc::clone(&replies),
            victim.clone(),
            Arc::clone(&up),
        );
        tasks.spawn(async move {
            let local = source(&options, index);
            let connected = SourcedClient::connect(options.server, &options.ca, local).await;
            up.fetch_add(1, Ordering::Relaxed);
            let mut client = connected?;
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                match client.login(&victim, "not the password").await {
                    Ok(reply) => *counts.entry(reply_name(&reply)).or_default() += 1,
                    // Closed by the server (its login deadline, say): an attacker comes back.
                    Err(_) => {
                        *counts.entry("(reconnected)".into()).or_default() += 1;
                        client = SourcedClient::connect(options.server, &options.ca, local).await?;
                    }
                }
            }
            client.close();
            let mut all = replies.lock().await;
            for (name, count) in counts {
                *all.entry(name).or_default() += count;
            }
            Ok::<(), BenchError>(())
        });
    }

    let connecting = Instant::now();
    while up.load(Ordering::Relaxed) < options.connections && connecting.elapsed() < CONNECT_WAIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "flooding with {} connections (made in {:.1} s)",
        up.load(Ordering::Relaxed),
        connecting.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let mut latencies = histogram()?;
    let (mut honest_logins, mut honest_ok) = (0u64, 0u64);
    // Let the flood reach its steady state before measuring.
    tokio::time::sleep(Duration::from_millis(500).min(options.duration / 4)).await;
    while started.elapsed() < options.duration {
        let mut client = SourcedClient::connect(options.server, &options.ca, honest_ip).await?;
        let asked = Instant::now();
        let reply = client.login(&victim, HONEST_PASSWORD).await?;
        let took = asked.elapsed();
        client.close();
        honest_logins += 1;
        if matches!(reply, Reply::Session { .. }) {
            honest_ok += 1;
        } else {
            tracing::warn!(reply = %reply_name(&reply), "honest login refused");
        }
        let _ = latencies.record(took.as_micros().max(1) as u64);
        tokio::time::sleep(options.honest_every).await;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut flood_failures = 0;
    while let Some(joined) = tasks.join_next().await {
        if !matches!(joined, Ok(Ok(()))) {
            flood_failures += 1;
        }
    }
    let flood_replies = Arc::try_unwrap(replies)
        .map(Mutex::into_inner)
        .unwrap_or_default();
    let total: u64 = flood_replies.values().sum();
    Ok(FloodReport {
        flood_replies_per_s: total as f64 / elapsed.max(1e-9),
        flood_replies,
        flood_failures,
        honest_logins,
        honest_ok,
        honest_latency_us: Latency::from(&latencies),
    })
}

/// `sfc-bench flood-logins`: the flood against a running server.
#[derive(Debug, clap::Parser)]
#[command(name = "sfc-bench flood-logins")]
pub struct FloodCli {
    /// Server address, IP:PORT (a running server; start it with --signups-per-minute high
    /// enough for the honest user's signup)
    #[arg(long)]
    server: SocketAddr,
    /// CA certificate of --server
    #[arg(long, default_value = "certs/ca.crt")]
    ca: std::path::PathBuf,
    /// Flooding connections, each sending wrong-password logins back to back
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Source addresses: 1 floods from 127.0.0.2; N > 1 from 127.0.1.1 onwards
    #[arg(long, default_value_t = 1)]
    sources: usize,
    /// Seconds of flood
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Milliseconds between honest logins from 127.0.0.1
    #[arg(long, default_value_t = 250)]
    honest_every_ms: u64,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

/// Runs `sfc-bench flood-logins ARGS` (`args` without the program name and subcommand).
pub fn cli_main(args: Vec<String>) -> std::process::ExitCode {
    use clap::Parser;
    let cli = match FloodCli::try_parse_from(
        std::iter::once("sfc-bench flood-logins".to_owned()).chain(args),
    ) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(2);
        }
    };
    let options = FloodOptions {
        server: cli.server,
        ca: cli.ca,
        connections: cli.connections,
        sources: cli.sources.max(1),
        duration: Duration::from_secs_f64(cli.duration.max(0.5)),
        honest_every: Duration::from_millis(cli.honest_every_ms),
    };
    let report = tokio::runtime::Runtime::new()
        .map_err(setup)
        .and_then(|runtime| runtime.block_on(run(&options)));
    match report {
        Ok(report) if cli.json => match serde_json::to_string(&report) {
            Ok(json) => {
                println!("{json}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sfc-bench: error: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!("{}", report.to_text());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sfc-bench: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
