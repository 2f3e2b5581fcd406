//! Progress of a run on stderr: a bar redrawn in place on a terminal, plain lines otherwise.
//!
//! The scenarios announce their phases and count what they do through process-wide counters
//! (relaxed atomics, nothing more on the hot path); a [`Display`] thread reads them a few times a
//! second and draws. Without a display the counters are kept and never read.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Scenario;

/// What a phase is heading for, for the bar and the `x/y` figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Goal {
    /// No known end (waiting for stragglers).
    Open,
    /// A length of time.
    Time(Duration),
    /// This many users signed up.
    Users(u64),
    /// This many messages sent.
    Sent(u64),
    /// This many messages delivered (or connections held).
    Delivered(u64),
}

struct Phase {
    scenario: Option<Scenario>,
    name: &'static str,
    goal: Goal,
    started: Instant,
}

static PHASE: Mutex<Option<Phase>> = Mutex::new(None);
static USERS: AtomicU64 = AtomicU64::new(0);
static DELIVERED: AtomicU64 = AtomicU64::new(0);
/// The scenario's own counter of messages sent (or operations completed).
static SENT: Mutex<Option<Arc<AtomicU64>>> = Mutex::new(None);

fn phase_lock() -> std::sync::MutexGuard<'static, Option<Phase>> {
    PHASE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A run of `scenario` begins: counters back to zero, phase "setup".
pub(crate) fn reset(scenario: Scenario) {
    USERS.store(0, Ordering::Relaxed);
    DELIVERED.store(0, Ordering::Relaxed);
    *SENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    *phase_lock() = Some(Phase {
        scenario: Some(scenario),
        name: "setup",
        goal: Goal::Open,
        started: Instant::now(),
    });
}

/// The run enters phase `name`.
pub(crate) fn phase(name: &'static str, goal: Goal) {
    let mut phase = phase_lock();
    let scenario = phase.as_ref().and_then(|p| p.scenario);
    *phase = Some(Phase {
        scenario,
        name,
        goal,
        started: Instant::now(),
    });
}

/// Shows `counter` as the count of messages sent (operations completed) from now on.
pub(crate) fn track_sent(counter: &Arc<AtomicU64>) {
    *SENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(counter));
}

/// One more user signed up.
pub(crate) fn user() {
    USERS.fetch_add(1, Ordering::Relaxed);
}

/// One more message delivered (or connection held).
pub(crate) fn delivered() {
    DELIVERED.fetch_add(1, Ordering::Relaxed);
}

/// Unique messages received so far in this run.
pub(crate) fn delivered_count() -> u64 {
    DELIVERED.load(Ordering::Relaxed)
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A bar redrawn in place (for a terminal).
    Bar,
    /// A plain line per phase and per second (for logs).
    Lines,
}

impl Style {
    /// A bar if stderr is a terminal, plain lines otherwise.
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Self::Bar
        } else {
            Self::Lines
        }
    }
}

/// Draws progress on stderr from a thread of its own until [`Display::finish`].
pub struct Display {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Display {
    /// Starts drawing in `style`.
    pub fn start(style: Style) -> Self {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // Lines: one when a phase begins, then one a second.
            let mut printed: Option<(Instant, Instant)> = None;
            loop {
                if let Some((phase, line)) = snapshot() {
                    match style {
                        Style::Bar => draw_bar(&line),
                        Style::Lines => {
                            let due = printed.is_none_or(|(shown, at)| {
                                shown != phase || at.elapsed() >= Duration::from_secs(1)
                            });
                            if due {
                                eprintln!("sfc-bench: {}", line.text());
                                printed = Some((phase, Instant::now()));
                            }
                        }
                    }
                }
                match stopped.recv_timeout(Duration::from_millis(100)) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            if style == Style::Bar {
                eprint!("\r\x1b[K");
                let _ = std::io::stderr().flush();
            }
        });
        Self { stop, thread }
    }

    /// Stops drawing and clears the bar.
    pub fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// What one look at the counters shows.
struct Line {
    scenario: &'static str,
    phase: &'static str,
    elapsed: Duration,
    goal: Goal,
    users: u64,
    sent: Option<u64>,
    delivered: u64,
    /// The words for `sent` and `delivered` in this scenario, if it uses them.
    words: (Option<&'static str>, Option<&'static str>),
}

/// The phase's identity (its start) and a line for it.
fn snapshot() -> Option<(Instant, Line)> {
    let phase = phase_lock();
    let phase = phase.as_ref()?;
    let scenario = phase.scenario.unwrap_or(Scenario::Relay);
    let words = match scenario {
        Scenario::Relay | Scenario::Offline => (Some("sent"), Some("delivered")),
        Scenario::Login | Scenario::Resume | Scenario::Handshake => (Some("done"), None),
        Scenario::Connections | Scenario::Flood => (None, Some("held")),
    };
    let sent = SENT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|c| c.load(Ordering::Relaxed));
    let line = Line {
        scenario: scenario.name(),
        phase: phase.name,
        elapsed: phase.started.elapsed(),
        goal: phase.goal,
        users: USERS.load(Ordering::Relaxed),
        sent,
        delivered: DELIVERED.load(Ordering::Relaxed),
        words,
    };
    Some((phase.started, line))
}

impl Line {
    /// How far the phase is, 0 to 1, when it has an end.
    fn fraction(&self) -> Option<f64> {
        let ratio = |done: u64, of: u64| done as f64 / of.max(1) as f64;
        let fraction = match self.goal {
            Goal::Open => return None,
            Goal::Time(length) => self.elapsed.as_secs_f64() / length.as_secs_f64().max(1e-3),
            Goal::Users(n) => ratio(self.users, n),
            Goal::Sent(n) => ratio(self.sent.unwrap_or(0), n),
            Goal::Delivered(n) => ratio(self.delivered, n),
        };
        Some(fraction.clamp(0.0, 1.0))
    }

    /// The figures, without the bar.
    fn text(&self) -> String {
        let mut text = format!("{} {}", self.scenario, self.phase);
        let secs = self.elapsed.as_secs_f64();
        match self.goal {
            Goal::Time(length) => {
                text.push_str(&format!(" {secs:.1}/{:.1} s", length.as_secs_f64()))
            }
            _ => text.push_str(&format!(" {secs:.1} s")),
        }
        let of = |n: Option<u64>| n.map(|n| format!("/{}", thousands(n))).unwrap_or_default();
        if let Goal::Users(n) = self.goal {
            // Setting up: only the users count.
            text.push_str(&format!(", users {}{}", thousands(self.users), of(Some(n))));
            return text;
        }
        if let (Some(sent), (Some(word), _)) = (self.sent, self.words) {
            let goal = match self.goal {
                Goal::Sent(n) => Some(n),
                _ => None,
            };
            text.push_str(&format!(", {word} {}{}", thousands(sent), of(goal)));
        }
        if let (_, Some(word)) = self.words {
            let goal = match self.goal {
                Goal::Delivered(n) => Some(n),
                _ => None,
            };
            text.push_str(&format!(
                ", {word} {}{}",
                thousands(self.delivered),
                of(goal)
            ));
        }
        text
    }
}

/// Redraws the bar line in place, cut to the terminal's width so it never wraps.
fn draw_bar(line: &Line) {
    const WIDTH: usize = 24;
    let bar = match line.fraction() {
        Some(fraction) => {
            let filled = (fraction * WIDTH as f64).round() as usize;
            format!("[{}{}] ", "#".repeat(filled), "-".repeat(WIDTH - filled))
        }
        None => String::new(),
    };
    let text = format!("{bar}{}", line.text());
    let columns = crossterm::terminal::size()
        .map(|(columns, _)| usize::from(columns))
        .unwrap_or(80);
    let text: String = text.chars().take(columns.saturating_sub(1)).collect();
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "\r{text}\x1b[K");
    let _ = stderr.flush();
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(goal: Goal, sent: Option<u64>, delivered: u64) -> Line {
        Line {
            scenario: "relay",
            phase: "load",
            elapsed: Duration::from_millis(2500),
            goal,
            users: 7,
            sent,
            delivered,
            words: (Some("sent"), Some("delivered")),
        }
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn lines_show_time_and_counts() {
        let load = line(Goal::Time(Duration::from_secs(5)), Some(12345), 12001);
        assert_eq!(
            load.text(),
            "relay load 2.5/5.0 s, sent 12,345, delivered 12,001"
        );
        assert_eq!(load.fraction(), Some(0.5));
        let drain = line(Goal::Delivered(100_000), Some(100_000), 25_000);
        assert_eq!(
            drain.text(),
            "relay load 2.5 s, sent 100,000, delivered 25,000/100,000"
        );
        assert_eq!(drain.fraction(), Some(0.25));
        let setup = line(Goal::Users(14), None, 0);
        assert_eq!(setup.text(), "relay load 2.5 s, users 7/14");
        assert_eq!(line(Goal::Open, None, 0).fraction(), None);
    }
}
