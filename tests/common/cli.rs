//! The built binaries in tests: `sfc` commands with a clean environment, the `sfc-server`
//! binary with its log collected, and users signed up through `sfc`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{PASSWORD, TestServer};

pub fn sfc(server: &str, ca: &Path, home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sfc"));
    command
        .env_clear()
        .env("SFC_SERVER", server)
        .env("SFC_CA", ca)
        .env("SFC_HOME", home)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Sends `signal` (`-STOP`, `-KILL`, ...) to `child` with `kill`.
pub fn signal(child: &Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}: {status:?}");
}

pub async fn run(mut command: Command) -> Output {
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap()
        .unwrap()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn assert_fails_with(output: &Output, needle: &str) {
    assert!(!output.status.success(), "expected failure: {output:?}");
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.starts_with("sfc: error: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

/// A running `sfc-server` binary whose log lines are collected.
pub struct ServerProcess {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// `sfc-server` listening on `listen` with its data and certificates in `dir`, logging at
/// `info` to a piped stderr.
pub fn server_command(dir: &Path, listen: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sfc-server"));
    command
        .args(["--listen", listen, "--data"])
        .arg(dir.join("data"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

impl ServerProcess {
    pub async fn start(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1:0").await
    }

    /// Starts the server on `listen` (a restart on the same address when reused).
    pub async fn start_on(dir: &Path, listen: &str) -> Self {
        Self::start_with_args(dir, listen, &[]).await
    }

    /// [`Self::start_on`], with more arguments for the server.
    pub async fn start_with_args(dir: &Path, listen: &str, args: &[&str]) -> Self {
        let mut child = server_command(dir, listen).args(args).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                log.lock().unwrap().push(line.clone());
                if let Some(rest) = line.split("listen=").nth(1) {
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
            }
            panic!("server exited before serving: {:?}", log.lock().unwrap());
        })
        .await
        .unwrap();
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, addr, log }
    }

    /// `kill -9`: the server stops at once, without closing anything.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    pub async fn terminate(mut self) -> Vec<String> {
        signal(&self.child, "-TERM");
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.log.lock().unwrap().clone()
    }
}

/// Users signed up (each with a home directory) on a server that lets one message wait per
/// inbox.
pub struct People {
    pub addr: String,
    pub ca: std::path::PathBuf,
    homes: tempfile::TempDir,
}

impl People {
    pub fn home(&self, name: &str) -> std::path::PathBuf {
        self.homes.path().join(name)
    }

    pub fn sfc(&self, name: &str, args: &[&str]) -> Command {
        let mut command = sfc(&self.addr, &self.ca, &self.home(name));
        command.env("SFC_PASSWORD", PASSWORD).args(args);
        command
    }
}

impl People {
    /// `names` signed up through `sfc`, each in a home directory of its own, on `server`.
    pub async fn signed_up(server: &TestServer, names: &[&str]) -> Self {
        Self::signed_up_at(&server.addr.to_string(), &server.ca_file(), names).await
    }

    /// [`People::signed_up`] on the server at `addr` whose CA certificate is `ca`.
    pub async fn signed_up_at(addr: &str, ca: &Path, names: &[&str]) -> Self {
        let people = Self {
            addr: addr.to_owned(),
            ca: ca.to_owned(),
            homes: tempfile::tempdir().unwrap(),
        };
        for name in names {
            let out = run(people.sfc(name, &["signup", name])).await;
            assert!(out.status.success(), "{out:?}");
        }
        people
    }

    /// `sfc ARGS` run by `name` in a terminal (`script`, from util-linux, gives it one), with
    /// its keyboard and screen.
    pub fn in_terminal(&self, name: &str, args: &str) -> Child {
        Command::new("script")
            .args([
                "-q",
                // The exit status of `sfc`, not of `script` (which is 0 however sfc ended).
                "-e",
                "-c",
                // A known size, so that what the screen shows can be replayed (`Screen`).
                &format!(
                    "stty cols {COLUMNS} rows 24 2>/dev/null; exec {} {args}",
                    env!("CARGO_BIN_EXE_sfc")
                ),
                "/dev/null",
            ])
            .env_clear()
            .env("TERM", "xterm")
            .env("SFC_SERVER", &self.addr)
            .env("SFC_CA", &self.ca)
            .env("SFC_HOME", self.home(name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("`script` (util-linux) runs sfc in a terminal")
    }
}

/// The width of the terminal `People::in_terminal` gives.
pub const COLUMNS: u16 = 80;

/// What a terminal of `COLUMNS` columns shows after `output` was written to it: every row,
/// the scrollback included (it is tall enough never to scroll), wrapped rows joined.
pub fn screen(output: &[u8]) -> String {
    let mut terminal = vt100::Parser::new(
        std::num::NonZeroU16::new(2000).unwrap(),
        std::num::NonZeroU16::new(COLUMNS).unwrap(),
        0,
    );
    terminal.process(output);
    terminal.screen().contents()
}

/// A server that lets one message wait per inbox, with `names` signed up.
pub async fn tight_inboxes(names: &[&str]) -> (TestServer, People) {
    let server = TestServer::start_with(|c| c.max_pending = 1).await;
    let people = People::signed_up(&server, names).await;
    (server, people)
}

/// Reads `from` into `seen` until it contains `needle` (or fails after 15 s).
pub async fn read_until(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    seen: &mut String,
    needle: &str,
) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let n = tokio::time::timeout_at(deadline, from.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in the chat's output: {seen:?}"))
            .unwrap();
        assert!(n > 0, "the chat ended before {needle:?}: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}
