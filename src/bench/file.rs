//! `sfc-bench file`: sending one file end to end (sealed, uploaded, the `file` message, fetched,
//! opened, checked), to a recipient that is online and to one that is offline, against a server
//! this program spawns (to read its CPU and peak memory). With the floor binary next to it
//! (`cargo build --release --example file_floor`), each round also moves the same bytes with
//! QUIC and TLS alone (our configuration, one stream each way): that is the floor.
//!
//! Throughput is in MB/s (10^6 bytes per second) of file bytes: the upload from the start of
//! `send_file` until it returns (blob synced and message stored); the download from the
//! start of `download_file` until the file has its name.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::BenchError;
use super::target::Target;
use crate::client::messenger::{Messenger, Received};
use crate::client::{Client, ClientOptions};
use crate::e2e::{FileRef, sealed_len};
use crate::protocol::{Password, SessionToken};

/// How long a recipient waits for the file's message.
const MESSAGE_WAIT: Duration = Duration::from_secs(120);
/// Bytes written to the source file per call.
const WRITE_PIECE: usize = 1 << 20;

/// `sfc-bench file`: one file to an online and to an offline recipient, rounds alternated with
/// the QUIC+TLS floor.
#[derive(Debug, clap::Parser)]
#[command(name = "sfc-bench file")]
pub struct FileCli {
    /// File size in bytes
    #[arg(long, default_value_t = 100 << 20)]
    size: u64,
    /// Rounds (each: floor, online, offline); medians are reported
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The sfc-server binary [default: next to this program]
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// The floor binary [default: examples/file_floor next to this program]; skipped if absent
    #[arg(long)]
    floor_bin: Option<PathBuf>,
    /// Where the source file and the downloads go [default: the system's temporary directory]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

/// One direction's median MB/s.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rates {
    /// File bytes per second, up (MB/s).
    pub upload_mb_s: f64,
    /// File bytes per second, down (MB/s).
    pub download_mb_s: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// File size in bytes.
    pub size: u64,
    /// Rounds measured.
    pub rounds: usize,
    /// To a recipient connected while the file is sent (medians).
    pub online: Rates,
    /// To a recipient that connects after the upload (medians).
    pub offline: Rates,
    /// QUIC+TLS alone moving the same bytes (medians), if the floor binary was found.
    pub floor: Option<Rates>,
    /// The server's peak resident memory over the run, bytes.
    pub server_peak_rss: u64,
    /// The server's CPU seconds per GB of file sent and fetched.
    pub server_cpu_s_per_gb: f64,
    /// This process's peak resident memory (sender and both recipients), bytes.
    pub client_peak_rss: u64,
    /// The floor server's peak resident memory, bytes (0 without the floor).
    pub floor_server_peak_rss: u64,
}

impl FileReport {
    /// The report as lines of text.
    pub fn to_text(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let mut out = format!(
            "file of {} bytes, {} rounds (medians, MB/s of file bytes)\n\
             online:  upload {:.1}  download {:.1}\n\
             offline: upload {:.1}  download {:.1}\n",
            self.size,
            self.rounds,
            self.online.upload_mb_s,
            self.online.download_mb_s,
            self.offline.upload_mb_s,
            self.offline.download_mb_s,
        );
        if let Some(floor) = self.floor {
            out += &format!(
                "floor (QUIC+TLS, one stream): upload {:.1}  download {:.1}\n",
                floor.upload_mb_s, floor.download_mb_s
            );
        }
        out += &format!(
            "peak RSS: server {:.1} MiB, client process {:.1} MiB, floor server {:.1} MiB\n\
             server CPU: {:.2} s per GB moved\n",
            mib(self.server_peak_rss),
            mib(self.client_peak_rss),
            mib(self.floor_server_peak_rss),
            self.server_cpu_s_per_gb,
        );
        out
    }
}

/// Runs `sfc-bench file ARGS` (`args` without the program name and subcommand).
pub fn cli_main(args: Vec<String>) -> ExitCode {
    super::subcommand_main(
        "sfc-bench file",
        args,
        |cli: &FileCli| cli.json,
        FileReport::to_text,
        |cli: FileCli| async move { run(&cli).await },
    )
}

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

fn next_to_me(name: &str) -> Result<PathBuf, BenchError> {
    Ok(std::env::current_exe().map_err(setup)?.with_file_name(name))
}

async fn run(cli: &FileCli) -> Result<FileReport, BenchError> {
    let server_bin = match &cli.server_bin {
        Some(bin) => bin.clone(),
        None => next_to_me("sfc-server")?,
    };
    let floor_bin = match &cli.floor_bin {
        Some(bin) => Some(bin.clone()),
        None => Some(
            next_to_me("sfc-bench")?
                .with_file_name("examples")
                .join("file_floor"),
        ),
    }
    .filter(|bin| bin.exists());
    let sealed = sealed_len(cli.size).ok_or_else(|| setup("the file is too large"))?;
    let limit = sealed.to_string();
    let quota = sealed.saturating_mul(4).to_string();
    let target = Target::spawn(
        &server_bin,
        &[
            "--max-blob-bytes".into(),
            limit,
            "--blob-quota-bytes".into(),
            quota,
        ],
    )
    .await?;
    let result = measure(cli, &target, &server_bin, floor_bin.as_deref()).await;
    target.stop().await;
    result
}

/// A signed-up user with keys that reconnects by itself, and its token.
async fn user(
    options: &ClientOptions,
    home: &Path,
    name: &str,
    password: &str,
) -> Result<(Messenger, SessionToken), BenchError> {
    let client = Client::connect(options).await?;
    let (_, token) = client.signup(name, Password::new(password)).await?;
    let messenger = Messenger::new(client, home, name)
        .map_err(setup)?
        .with_reconnect(options.clone(), token.clone(), true);
    messenger.ensure_keys().await.map_err(setup)?;
    Ok((messenger, token))
}

/// The next message, which must be a file.
async fn next_file(m: &Messenger) -> Result<(Received, FileRef), BenchError> {
    let received = m
        .receive(MESSAGE_WAIT)
        .await
        .map_err(setup)?
        .ok_or_else(|| setup("the file's message did not come"))?;
    match &received {
        Received::File { file, .. } => {
            let file = file.clone();
            Ok((received, file))
        }
        other => Err(setup(format!("expected a file, got {other:?}"))),
    }
}

/// Fetches the file of the next message into `into`, checks it, removes it; the seconds the
/// download took.
async fn fetch(m: &Messenger, into: &Path) -> Result<f64, BenchError> {
    let (received, file) = next_file(m).await?;
    let start = Instant::now();
    let saved = m
        .download_file(&file, into, |_, _| {})
        .await
        .map_err(setup)?;
    let took = start.elapsed().as_secs_f64();
    m.shown(&received).await.map_err(setup)?;
    tokio::fs::remove_file(&saved).await.map_err(setup)?;
    Ok(took)
}

async fn measure(
    cli: &FileCli,
    target: &Target,
    server_bin: &Path,
    floor_bin: Option<&Path>,
) -> Result<FileReport, BenchError> {
    let work = match &cli.dir {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .map_err(setup)?;
    let source = work.path().join("bench.bin");
    write_source(&source, cli.size).await?;
    let into = work.path().join("downloads");
    tokio::fs::create_dir_all(&into).await.map_err(setup)?;

    let options = &target.options;
    let password = format!(
        "pw-{}",
        hex::encode(crate::protocol::MessageId::random().map_err(setup)?.0)
    );
    let tag = &hex::encode(crate::protocol::MessageId::random().map_err(setup)?.0)[..8];
    let (alice, bob, carol) = (
        format!("fa_{tag}"),
        format!("fb_{tag}"),
        format!("fc_{tag}"),
    );
    let homes = work.path().join("homes");
    let (sender, _) = user(options, &homes.join(&alice), &alice, &password).await?;
    let (mut online, _) = user(options, &homes.join(&bob), &bob, &password).await?;
    let (offline, carol_token) = user(options, &homes.join(&carol), &carol, &password).await?;
    offline.close().await;

    let cpu_before = target.stats().map_or(0.0, |s| s.cpu_s);
    let floor_certs = work.path().join("floor-certs");
    if floor_bin.is_some() {
        let status = tokio::process::Command::new(server_bin)
            .args(["gen-certs", "--dir"])
            .arg(&floor_certs)
            .stdout(Stdio::null())
            .status()
            .await
            .map_err(setup)?;
        if !status.success() {
            return Err(setup("sfc-server gen-certs failed"));
        }
    }
    let size = cli.size as f64 / 1e6;
    let (mut online_rates, mut offline_rates, mut floor_rates) = (vec![], vec![], vec![]);
    let mut floor_rss = 0;
    for _ in 0..cli.rounds.max(1) {
        if let Some(bin) = floor_bin {
            let (rates, rss) = floor_round(bin, &floor_certs, cli.size).await?;
            floor_rates.push(rates);
            floor_rss = floor_rss.max(rss);
        }
        // Online: bob is connected and fetches as soon as the message comes (in a task of
        // its own, as a recipient is another program).
        let start = Instant::now();
        let fetcher = {
            let into = into.clone();
            tokio::spawn(async move {
                let fetched = fetch(&online, &into).await;
                (online, fetched)
            })
        };
        sender
            .send_file(&bob, &source, |_, _| {})
            .await
            .map_err(setup)?;
        let up = start.elapsed().as_secs_f64();
        let (back, fetched) = fetcher.await.map_err(setup)?;
        online = back;
        let down = fetched?;
        online_rates.push(Rates {
            upload_mb_s: size / up,
            download_mb_s: size / down,
        });
        // Offline: carol connects once the upload is done.
        let start = Instant::now();
        sender
            .send_file(&carol, &source, |_, _| {})
            .await
            .map_err(setup)?;
        let up = start.elapsed().as_secs_f64();
        let client = Client::connect(options).await?;
        client.resume(carol_token.clone()).await?;
        let recipient = Messenger::new(client, &homes.join(&carol), &carol)
            .map_err(setup)?
            .with_reconnect(options.clone(), carol_token.clone(), true);
        let down = fetch(&recipient, &into).await?;
        recipient.close().await;
        offline_rates.push(Rates {
            upload_mb_s: size / up,
            download_mb_s: size / down,
        });
    }
    let stats = target.stats();
    // Each round sends the file twice and fetches it twice.
    let moved_gb = 4.0 * cli.size as f64 * online_rates.len() as f64 / 1e9;
    Ok(FileReport {
        size: cli.size,
        rounds: online_rates.len(),
        online: median_rates(&online_rates),
        offline: median_rates(&offline_rates),
        floor: (!floor_rates.is_empty()).then(|| median_rates(&floor_rates)),
        server_peak_rss: stats.map_or(0, |s| s.peak_rss),
        server_cpu_s_per_gb: stats.map_or(0.0, |s| (s.cpu_s - cpu_before) / moved_gb.max(1e-9)),
        client_peak_rss: own_peak_rss(),
        floor_server_peak_rss: floor_rss,
    })
}

/// Writes `size` bytes of a fixed pattern to `path`, a piece at a time.
async fn write_source(path: &Path, size: u64) -> Result<(), BenchError> {
    let mut file = tokio::fs::File::create(path).await.map_err(setup)?;
    let piece: Vec<u8> = (0..WRITE_PIECE).map(|i| (i * 131 % 251) as u8).collect();
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(WRITE_PIECE as u64)).map_err(setup)?;
        file.write_all(&piece[..n]).await.map_err(setup)?;
        left -= n as u64;
    }
    file.sync_all().await.map_err(setup)?;
    Ok(())
}

/// One round of the floor: its server on a free port, its client once; the rates and the
/// floor server's peak RSS.
async fn floor_round(bin: &Path, certs: &Path, size: u64) -> Result<(Rates, u64), BenchError> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(setup)?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = tokio::process::Command::new(bin)
        .args(["server", &addr])
        .arg(certs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(setup)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = tokio::process::Command::new(bin)
        .args(["client", &addr])
        .arg(certs.join("ca.crt"))
        .arg(size.to_string())
        .output()
        .await
        .map_err(setup)?;
    let rss = server
        .id()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|status| vm_hwm(&status))
        .unwrap_or(0);
    let _ = server.start_kill();
    let _ = server.wait().await;
    if !output.status.success() {
        return Err(setup(format!(
            "the floor client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let rates: Rates = serde_json::from_slice::<serde_json::Value>(&output.stdout)
        .ok()
        .and_then(|v| {
            Some(Rates {
                upload_mb_s: v.get("upload_mb_s")?.as_f64()?,
                download_mb_s: v.get("download_mb_s")?.as_f64()?,
            })
        })
        .ok_or_else(|| setup("the floor client printed no rates"))?;
    Ok((rates, rss))
}

/// `VmHWM` of a `/proc/PID/status`, in bytes.
fn vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

fn own_peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| vm_hwm(&s))
        .unwrap_or(0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn median_rates(rates: &[Rates]) -> Rates {
    Rates {
        upload_mb_s: median(rates.iter().map(|r| r.upload_mb_s).collect()),
        download_mb_s: median(rates.iter().map(|r| r.download_mb_s).collect()),
    }
}
