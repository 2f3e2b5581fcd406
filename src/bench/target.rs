//! The server under load: one already running (`--server`), or a child `sfc-server` with a
//! temporary data directory (`--spawn`) whose CPU time and memory are read from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::BenchError;
use crate::client::ClientOptions;

/// The server's resource use, from `/proc/PID`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerStats {
    /// User + system CPU seconds so far.
    pub cpu_s: f64,
    /// Resident memory now, bytes.
    pub rss: u64,
    /// Peak resident memory, bytes.
    pub peak_rss: u64,
}

impl ServerStats {
    /// The resource use of process `pid` now; `None` where `/proc` cannot tell (not Linux, or
    /// the process is gone). For tools that spawn a server of their own (`examples/relay_floor`).
    pub fn of(pid: u32) -> Option<Self> {
        read_stats(pid)
    }
}

/// Where the load goes.
pub struct Target {
    /// How clients reach it.
    pub options: ClientOptions,
    child: Option<(Child, u32, tempfile::TempDir)>,
}

impl Target {
    /// A server that is already running.
    pub fn remote(server: String, ca: PathBuf) -> Self {
        let mut options = ClientOptions::new(server, ca);
        options.request_timeout = Duration::from_secs(60);
        Self {
            options,
            child: None,
        }
    }

    /// Starts `server_bin` on 127.0.0.1 with a fresh data directory and per-address limits
    /// lifted (one address plays every client). `extra` are more server flags.
    pub async fn spawn(server_bin: &Path, extra: &[String]) -> Result<Self, BenchError> {
        let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
        let dir = tempfile::tempdir().map_err(|e| setup(&e))?;
        let mut child = Command::new(server_bin)
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("data"))
            .arg("--certs")
            .arg(dir.path().join("certs"))
            .args([
                "--signups-per-minute",
                "0",
                "--failed-logins-per-minute",
                "0",
            ])
            .args([
                "--bundle-fetches-per-minute",
                "0",
                "--max-pending",
                "10000000",
            ])
            .args(["--max-connections", "1000000"])
            // One sender fills whole inboxes (`offline`) and sends at full speed.
            .args([
                "--max-pending-per-sender",
                "0",
                "--max-pending-bytes-per-sender",
                "0",
                "--sends-per-minute",
                "0",
            ])
            .args([
                "--username-checks-per-minute",
                "0",
                "--password-work-per-address",
                "0",
            ])
            .args(["--max-connections-per-address", "0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BenchError::Setup(format!("cannot start {}: {e}", server_bin.display()))
            })?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Setup("server exited at once".into()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| BenchError::Setup("no stderr".into()))?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("listen=").nth(1) {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| BenchError::Setup("the server did not report its address".into()))?;
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut target = Self::remote(addr, dir.path().join("certs").join("ca.crt"));
        target.child = Some((child, pid, dir));
        Ok(target)
    }

    /// The spawned server's resource use, if there is one.
    pub fn stats(&self) -> Option<ServerStats> {
        let (_, pid, _) = self.child.as_ref()?;
        read_stats(*pid)
    }

    /// Stops a spawned server.
    pub async fn stop(mut self) {
        if let Some((mut child, _, _)) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// This process's CPU seconds so far (user and system, all threads), from `/proc/self/stat`;
/// `None` where it cannot be read (not Linux).
pub(crate) fn own_cpu_s() -> Option<f64> {
    read_stats(std::process::id()).map(|stats| stats.cpu_s)
}

/// Linux's USER_HZ, the unit of CPU times in `/proc/PID/stat` (100 on every mainstream build).
const CLOCK_TICKS_PER_S: f64 = 100.0;

fn read_stats(pid: u32) -> Option<ServerStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let cpu_s = (ticks(11)? + ticks(12)?) / CLOCK_TICKS_PER_S;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    Some(ServerStats {
        cpu_s,
        rss: kib("VmRSS:")?,
        peak_rss: kib("VmHWM:")?,
    })
}

/// The whole machine's CPU time so far, from the first line of `/proc/stat`: what a run
/// shares the cores with, and what the hypervisor took from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineTimes {
    /// user + nice + system + irq + softirq, all cores.
    busy: u64,
    /// Time the hypervisor ran something else while a core of this machine wanted to run.
    steal: u64,
    /// Everything, idle and iowait included.
    total: u64,
}

/// How busy the machine was over an interval, in percent of all its cores' time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineLoad {
    /// Running anything of this machine (the run itself and whatever else runs).
    pub busy_pct: f64,
    /// Stolen by the hypervisor: cores this machine wanted but did not get. It comes in
    /// bursts, and a burst stalls whatever was running: a tail-latency figure from a run with
    /// steal says as much about the host as about the server.
    pub steal_pct: f64,
}

impl MachineTimes {
    /// Now; `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        use std::io::{BufRead, Read};
        let file = std::fs::File::open("/proc/stat").ok()?;
        // The first line, the whole machine's, is all that is read (and at most 4 KiB of it).
        let mut line = String::new();
        std::io::BufReader::new(file.take(4096))
            .read_line(&mut line)
            .ok()?;
        parse_cpu_line(&line)
    }

    /// The load between `self` and a later reading; `None` if less than 50 clock ticks of all
    /// cores together passed (a quarter of a second of two cores), too little for a percentage.
    pub fn load_until(self, later: Self) -> Option<MachineLoad> {
        let total = later
            .total
            .checked_sub(self.total)
            .filter(|&t| t >= MIN_TICKS)? as f64;
        Some(MachineLoad {
            busy_pct: later.busy.saturating_sub(self.busy) as f64 * 100.0 / total,
            steal_pct: later.steal.saturating_sub(self.steal) as f64 * 100.0 / total,
        })
    }

    /// The load from `self` until now.
    pub fn load_since(self) -> Option<MachineLoad> {
        self.load_until(Self::now()?)
    }
}

/// The shortest interval [`MachineTimes::load_until`] reports on, in clock ticks of all cores
/// together (1/100 s each): a quarter of a second of two cores, so percentages to 2 points.
/// (The drain of the standard suite's 100k backlog takes ≈ 0.45 s.)
const MIN_TICKS: u64 = 50;

/// `cpu  user nice system idle iowait irq softirq steal [guest guest_nice]` (guest time is
/// already counted in user and nice).
fn parse_cpu_line(line: &str) -> Option<MachineTimes> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = values.try_into().ok()?;
    let busy = [nice, system, irq, softirq]
        .into_iter()
        .try_fold(user, u64::checked_add)?;
    let total = [idle, iowait, steal]
        .into_iter()
        .try_fold(busy, u64::checked_add)?;
    Some(MachineTimes { busy, steal, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_load_comes_from_the_cpu_line() {
        let before = parse_cpu_line("cpu  100 0 50 800 10 0 5 5 0 0").unwrap();
        let after = parse_cpu_line("cpu  160 0 70 895 10 0 10 25 0 0").unwrap();
        // 200 ticks in all: 85 busy, 20 stolen, 95 idle.
        let load = before.load_until(after).unwrap();
        assert!((load.busy_pct - 42.5).abs() < 1e-9, "{load:?}");
        assert!((load.steal_pct - 10.0).abs() < 1e-9, "{load:?}");
        assert_eq!(before.load_until(before), None, "no time passed");
        let soon = parse_cpu_line("cpu  100 0 50 849 10 0 5 5 0 0").unwrap();
        assert_eq!(before.load_until(soon), None, "49 ticks: too short");
        let enough = parse_cpu_line("cpu  110 0 50 840 10 0 5 5 0 0").unwrap();
        let load = before.load_until(enough).unwrap();
        assert!(
            (load.busy_pct - 20.0).abs() < 1e-9,
            "50 ticks, 10 busy: {load:?}"
        );
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu  1 2 3"), None, "too few fields");
        let huge = format!("cpu  {} 1 0 0 0 0 0 0", u64::MAX);
        assert_eq!(parse_cpu_line(&huge), None, "overflow");
        assert_eq!(MachineTimes::now().is_some(), cfg!(target_os = "linux"));
    }
}
