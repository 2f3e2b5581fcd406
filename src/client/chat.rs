//! `sfc chat USER`: an interactive terminal chat. The screen scrolls the conversation; the
//! bottom line is where you type, with a line editor (rustyline: arrow keys, history, Ctrl-U,
//! Ctrl-W, Ctrl-L). Incoming messages are printed above the typing line as they arrive,
//! without disturbing what you are typing. Enter sends, Ctrl-C or Ctrl-D (or `/quit`) leaves;
//! `/file PATH` sends a file, and received files are saved into a download directory (`files`).
//!
//! Each message shows as `HH:MM NAME: TEXT` (the time the server stored it, in the clock
//! chosen at start); a message from someone other than the open conversation's peer shows as
//! `HH:MM [from NAME] TEXT`. Everything from others goes through [`super::render`], and a
//! message's later lines are indented, so no text can pass for another sender's line.
//!
//! The keyboard runs on a thread of its own (the line editor blocks); receiving runs in a task
//! of its own, so that a keystroke never interrupts a message between its arrival and its
//! acknowledgement. Sending and the outbox run in the loop that ties them together.

mod files;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustyline::error::ReadlineError;
use rustyline::{Config, DefaultEditor, ExternalPrinter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ClientError;
use super::messenger::{Messenger, MessengerError, Received};
use super::render;
use crate::e2e::MAX_PLAINTEXT_LEN;

/// How often the chat tries again what waits in the outbox.
const OUTBOX_RETRY: Duration = Duration::from_secs(5);
/// How long the receiver waits for a message before it looks whether the chat is over.
const RECEIVE_SLICE: Duration = Duration::from_millis(250);
/// How long a chat that ends waits for the message being opened.
const RECEIVER_STOP: Duration = Duration::from_secs(5);
/// How many typed lines the editor's history keeps (Up and Down recall them).
const HISTORY: usize = 500;
/// What starts a message's later lines: as wide as `HH:MM `, and no line of a message can
/// start like a message line (`HH:MM NAME` or `!!`).
const CONTINUATION: &str = "      ";

/// A message of the conversation as the chat shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When it was sent or stored (Unix seconds).
    pub sent_at: u64,
    /// Who wrote it.
    pub from: String,
    /// The text.
    pub text: String,
    /// Whether the user of this chat wrote it.
    pub outgoing: bool,
}

/// How the chat turns Unix seconds into `HH:MM`: local time, or UTC when the local offset is
/// unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    offset_seconds: i64,
    local: bool,
}

impl Clock {
    /// UTC.
    pub const UTC: Self = Self {
        offset_seconds: 0,
        local: false,
    };

    /// The local time zone's current offset, or UTC if it cannot be known. Call it before the
    /// process starts threads: the C library's time zone functions are not thread-safe, and
    /// the `time` crate refuses to read the offset once there are several threads.
    pub fn local() -> Self {
        match time::UtcOffset::current_local_offset() {
            Ok(offset) => Self {
                offset_seconds: i64::from(offset.whole_seconds()),
                local: true,
            },
            Err(_) => Self::UTC,
        }
    }

    /// `HH:MM` of `unix_seconds`.
    pub fn hh_mm(self, unix_seconds: u64) -> String {
        let seconds = i64::try_from(unix_seconds).unwrap_or(i64::MAX - 86_400);
        let of_day = (seconds + self.offset_seconds).rem_euclid(86_400);
        format!("{:02}:{:02}", of_day / 3600, of_day % 3600 / 60)
    }

    /// Which clock the times are in, for the chat's first line.
    fn describe(self) -> String {
        if !self.local {
            return "times in UTC".into();
        }
        let (sign, offset) = if self.offset_seconds < 0 {
            ('-', -self.offset_seconds)
        } else {
            ('+', self.offset_seconds)
        };
        format!(
            "local times, UTC{sign}{:02}:{:02}",
            offset / 3600,
            offset % 3600 / 60
        )
    }
}

/// The lines showing `entries`, a conversation with `peer`.
pub fn history_lines(entries: &[Entry], peer: &str, clock: Clock) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            message_line(
                clock,
                e.sent_at,
                &e.from,
                &e.text,
                e.outgoing || e.from == peer,
            )
        })
        .collect()
}

/// One message: `HH:MM NAME: TEXT` from the user or the peer (`in_conversation`), else
/// `HH:MM [from NAME] TEXT`; later lines of the text indented.
fn message_line(clock: Clock, at: u64, from: &str, text: &str, in_conversation: bool) -> String {
    let time = clock.hh_mm(at);
    let from = render::line(from);
    let text = render::body(text, CONTINUATION);
    if in_conversation {
        format!("{time} {from}: {text}")
    } else {
        format!("{time} [from {from}] {text}")
    }
}

/// A notice from the chat itself (`!! …`), on one line.
fn notice(text: &str) -> String {
    format!("!! {}", render::line(text))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the chat prints: above the line being typed, through the line editor.
struct Screen {
    printer: Box<dyn ExternalPrinter + Send>,
    /// Where received files are saved.
    downloads: PathBuf,
}

impl Screen {
    fn show(&mut self, mut line: String) {
        // While the editor reads a line, the printer hands the text to the editor's thread
        // through a pipe (it does not block), and that adds a line break; otherwise it writes
        // the text as it is.
        line.push('\n');
        if self.printer.print(line).is_err() {
            tracing::debug!("the line editor is gone");
        }
    }
}

/// What the keyboard thread reports.
enum Input {
    Line(String),
    Quit,
    Failed(String),
}

/// Puts the terminal back as it was when the chat started, however the chat ends (the line
/// editor's thread may still be waiting for a key in raw mode).
struct TerminalMode {
    #[cfg(unix)]
    saved: Option<nix::sys::termios::Termios>,
}

impl TerminalMode {
    fn save() -> Self {
        Self {
            #[cfg(unix)]
            saved: nix::sys::termios::tcgetattr(std::io::stdin()).ok(),
        }
    }
}

impl Drop for TerminalMode {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(saved) = &self.saved {
            let now = nix::sys::termios::SetArg::TCSANOW;
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), now, saved);
        }
    }
}

/// Runs the chat with `peer` until the user leaves, after showing `history` (the
/// conversation so far, oldest first).
pub async fn run(
    messenger: Arc<Messenger>,
    me: &str,
    peer: &str,
    history: &[Entry],
    clock: Clock,
    downloads: &Path,
) -> Result<(), MessengerError> {
    let _terminal = TerminalMode::save();
    println!(
        "chatting with {} (Enter sends, Ctrl-C leaves; {})",
        render::line(peer),
        clock.describe()
    );
    for line in history_lines(history, peer, clock) {
        println!("{line}");
    }
    // A changed key stays in sight until the user accepts it (`sfc trust`).
    if messenger.offline().key_changed(peer).await? {
        println!("{}", notice(&super::messenger::changed_warning(peer)));
    }
    let prompt = format!("{}> ", render::line(me));
    let (mut keys, printer) = spawn_keyboard(prompt).await?;
    let mut screen = Screen {
        printer,
        downloads: downloads.to_owned(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (receiver, mut incoming) = spawn_receiver(Arc::clone(&messenger), Arc::clone(&stop));
    let result = chat_loop(
        &messenger,
        &mut screen,
        me,
        peer,
        clock,
        &mut keys,
        &mut incoming,
    )
    .await;
    // A message being opened when the user left is finished and shown: stopped in the middle,
    // it would be acknowledged unshown, or come again and be taken for a duplicate.
    stop.store(true, Ordering::Relaxed);
    let mut receiver = receiver;
    let _ = tokio::time::timeout(RECEIVER_STOP, &mut receiver).await;
    receiver.abort();
    if result.is_ok() {
        while let Ok(received) = incoming.try_recv() {
            let _ = show_received(&messenger, &mut screen, clock, peer, received).await;
        }
    }
    result
}

/// Starts the line editor on a thread of its own; returns what it reads and the printer that
/// writes above it.
async fn spawn_keyboard(
    prompt: String,
) -> Result<(mpsc::Receiver<Input>, Box<dyn ExternalPrinter + Send>), MessengerError> {
    let (tx, keys) = mpsc::channel(16);
    let (printer_tx, printer_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let config = Config::builder()
            .max_history_size(HISTORY)
            .map(|b| b.auto_add_history(false).build());
        let editor = config
            .and_then(DefaultEditor::with_config)
            .and_then(|mut editor| {
                let printer = editor.create_external_printer()?;
                Ok((editor, printer))
            });
        match editor {
            Ok((editor, printer)) => {
                let printer: Box<dyn ExternalPrinter + Send> = Box::new(printer);
                if printer_tx.send(Ok(printer)).is_ok() {
                    read_lines(editor, &prompt, &tx);
                }
            }
            Err(e) => {
                let _ = printer_tx.send(Err(e));
            }
        }
    });
    let printer = printer_rx
        .await
        .map_err(|_| editor_error("the line editor did not start".into()))?
        .map_err(|e| editor_error(e.to_string()))?;
    Ok((keys, printer))
}

fn editor_error(reason: String) -> MessengerError {
    MessengerError::Client(ClientError::Io(std::io::Error::other(format!(
        "terminal: {reason}"
    ))))
}

/// The keyboard thread: one line at a time until the user leaves.
fn read_lines(mut editor: DefaultEditor, prompt: &str, tx: &mpsc::Sender<Input>) {
    loop {
        let input = match editor.readline(prompt) {
            Ok(line) if line.trim() == "/quit" => Input::Quit,
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                Input::Line(line)
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => Input::Quit,
            Err(e) => Input::Failed(e.to_string()),
        };
        let last = !matches!(input, Input::Line(_));
        if tx.blocking_send(input).is_err() || last {
            return;
        }
    }
}

/// What the receive side hands over.
enum Arrival {
    /// A message to show (then to mark shown).
    Message(Received),
    /// A notice about the connection (lost, reconnecting, back).
    Notice(String),
    /// Receiving failed for good (e.g. the session was revoked).
    Failed(MessengerError),
}

/// The receive side: a task that takes messages from the server one at a time and hands them
/// over (the chat loop shows each, then marks it shown, which acknowledges it). A lost
/// connection is reconnected, with backoff, for as long as the chat runs.
fn spawn_receiver(
    messenger: Arc<Messenger>,
    stop: Arc<AtomicBool>,
) -> (JoinHandle<()>, mpsc::Receiver<Arrival>) {
    let (tx, incoming) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            // Told at once (not when receiving resumes): a notice that finds the channel full
            // is dropped rather than held.
            let notify = tx.clone();
            let received = messenger
                .receive_reconnecting(RECEIVE_SLICE, None, &mut |event| {
                    let _ = notify.try_send(Arrival::Notice(connection_notice(event)));
                })
                .await;
            let arrival = match received {
                Ok(None) => continue,
                Ok(Some(received)) => Arrival::Message(received),
                Err(e) => Arrival::Failed(e),
            };
            let failed = matches!(arrival, Arrival::Failed(_));
            if tx.send(arrival).await.is_err() || failed {
                return;
            }
        }
    });
    (task, incoming)
}

/// What the user is told when the connection goes and comes back.
fn connection_notice(event: super::receiving::Connection<'_>) -> String {
    match event {
        super::receiving::Connection::Lost { why, wait } => notice(&format!(
            "connection lost ({why}); reconnecting in {} s",
            wait.as_secs()
        )),
        super::receiving::Connection::Back(flushed) => {
            let sent = flushed.sent.len();
            if sent == 0 {
                "-- reconnected".to_owned()
            } else {
                format!("-- reconnected; sent {sent} messages that waited in the outbox")
            }
        }
    }
}

/// The send side: seals and sends one typed line, and shows it (or why it did not go).
/// Returns whether the outbox may now hold something.
async fn send_line(
    messenger: &Messenger,
    screen: &mut Screen,
    clock: Clock,
    me: &str,
    peer: &str,
    text: &str,
) -> bool {
    if text.len() > MAX_PLAINTEXT_LEN {
        screen.show(notice(&format!(
            "not sent: the message is longer than the limit of {MAX_PLAINTEXT_LEN} bytes (56 KiB)"
        )));
        return false;
    }
    let shown = message_line(clock, now(), me, text, true);
    match messenger.send_text(peer, text).await {
        Ok((_, warning)) => {
            if let Some(warning) = warning {
                screen.show(notice(&warning));
            }
            screen.show(shown);
            false
        }
        Err(MessengerError::Queued { reason, .. }) => {
            screen.show(shown);
            let every = OUTBOX_RETRY.as_secs();
            screen.show(notice(&format!(
                "not sent yet ({reason}): it waits in the outbox, tried again every {every} s"
            )));
            true
        }
        Err(e) => {
            screen.show(notice(&format!("not sent: {e}")));
            true
        }
    }
}

/// Shows what arrived, and marks a message shown only once it is on the screen (which
/// acknowledges it); fails the chat if receiving failed for good.
async fn show_received(
    messenger: &Messenger,
    screen: &mut Screen,
    clock: Clock,
    peer: &str,
    arrival: Arrival,
) -> Result<(), MessengerError> {
    let received = match arrival {
        Arrival::Message(received) => received,
        Arrival::Notice(line) => {
            screen.show(line);
            return Ok(());
        }
        Arrival::Failed(e) => {
            screen.show(notice(&format!("connection problem: {e}")));
            return Err(e);
        }
    };
    match &received {
        Received::Text {
            from,
            to,
            sent_at,
            text,
            warning,
            ..
        } => {
            if let Some(warning) = warning {
                screen.show(notice(warning));
            }
            // A copy of what this user sent from another device: in this conversation it is
            // one of ours; to someone else, it says to whom.
            let line = match to {
                Some(to) if to == peer => message_line(clock, *sent_at, from, text, true),
                Some(to) => format!(
                    "{} [you to {}] {}",
                    clock.hh_mm(*sent_at),
                    render::line(to),
                    render::body(text, CONTINUATION)
                ),
                None => message_line(clock, *sent_at, from, text, from == peer),
            };
            screen.show(line);
        }
        Received::File {
            from,
            to,
            sent_at,
            file,
            warning,
            ..
        } => {
            if let Some(warning) = warning {
                screen.show(notice(warning));
            }
            let dir = screen.downloads.clone();
            let Some(text) = files::receive_file(messenger, screen, &dir, file).await? else {
                return Ok(());
            };
            let line = match to {
                Some(to) if to == peer => message_line(clock, *sent_at, from, &text, true),
                Some(to) => format!(
                    "{} [you to {}] {}",
                    clock.hh_mm(*sent_at),
                    render::line(to),
                    render::body(&text, CONTINUATION)
                ),
                None => message_line(clock, *sent_at, from, &text, from == peer),
            };
            screen.show(line);
        }
        other => {
            if let Some(what) = other.describe() {
                screen.show(notice(&what));
            }
        }
    }
    messenger.shown(&received).await
}

/// Sends what waits in the outbox and tells the user what left it (and, with `tell_waiting`,
/// what still waits and why). Returns whether anything still waits.
async fn flush_outbox(messenger: &Messenger, screen: &mut Screen, tell_waiting: bool) -> bool {
    match messenger.flush_outbox().await {
        Ok(flushed) => {
            for (to, id) in &flushed.sent {
                screen.show(format!(
                    "-- sent {id} to {} from the outbox",
                    render::line(to)
                ));
            }
            for (to, id, why) in &flushed.dropped {
                screen.show(notice(&format!(
                    "the server refused {id} to {to} for good: {why}"
                )));
            }
            if tell_waiting && let Some(why) = &flushed.stopped {
                screen.show(notice(&format!(
                    "{} messages still wait in the outbox: {why}",
                    flushed.waiting
                )));
            }
            flushed.waiting > 0
        }
        Err(e) => {
            screen.show(notice(&format!("outbox: {e}")));
            true
        }
    }
}

async fn chat_loop(
    messenger: &Messenger,
    screen: &mut Screen,
    me: &str,
    peer: &str,
    clock: Clock,
    keys: &mut mpsc::Receiver<Input>,
    incoming: &mut mpsc::Receiver<Arrival>,
) -> Result<(), MessengerError> {
    // What waited in the outbox goes first, and whatever still waits is tried again every
    // OUTBOX_RETRY (a full inbox empties as its owner reads).
    let mut waiting = flush_outbox(messenger, screen, true).await;
    let mut retry =
        tokio::time::interval_at(tokio::time::Instant::now() + OUTBOX_RETRY, OUTBOX_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // SIGTERM leaves as Ctrl-C does: the message at hand is shown, the terminal restored.
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| MessengerError::Client(ClientError::Io(e)))?;
    loop {
        #[cfg(unix)]
        let terminated = terminate.recv();
        #[cfg(not(unix))]
        let terminated = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = terminated => return Ok(()),
            _ = retry.tick(), if waiting => {
                waiting = flush_outbox(messenger, screen, false).await;
            }
            input = keys.recv() => match input {
                None | Some(Input::Quit) => return Ok(()),
                Some(Input::Failed(why)) => {
                    screen.show(notice(&format!("keyboard: {why}")));
                    return Ok(());
                }
                Some(Input::Line(line)) => {
                    let line = line.trim();
                    if let Some(path) = line.strip_prefix(files::FILE_COMMAND) {
                        waiting |=
                            files::send_file_line(messenger, screen, clock, me, peer, path).await;
                    } else if !line.is_empty() {
                        waiting |= send_line(messenger, screen, clock, me, peer, line).await;
                    }
                }
            },
            received = incoming.recv() => {
                let Some(received) = received else { return Ok(()) };
                show_received(messenger, screen, clock, peer, received).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_hours_and_minutes_in_the_chosen_clock() {
        // 2026-12-04 13:05:59 UTC.
        let at = 1_796_389_559;
        assert_eq!(Clock::UTC.hh_mm(at), "13:05");
        let paris = Clock {
            offset_seconds: 3600,
            local: true,
        };
        assert_eq!(paris.hh_mm(at), "14:05");
        let west = Clock {
            offset_seconds: -14 * 3600,
            local: true,
        };
        assert_eq!(west.hh_mm(at), "23:05");
        assert_eq!(west.describe(), "local times, UTC-14:00");
        assert_eq!(Clock::UTC.hh_mm(u64::MAX).len(), 5);
    }

    #[test]
    fn history_marks_other_senders_and_cannot_be_forged() {
        let entry = |from: &str, text: &str, outgoing| Entry {
            sent_at: 1_796_389_559,
            from: from.into(),
            text: text.into(),
            outgoing,
        };
        let lines = history_lines(
            &[
                entry("alice", "hi bob", true),
                entry("bob", "hi\n13:06 carol: the money?\x1b]0;t\x07", false),
                entry("carol", "psst \u{202e}", false),
            ],
            "bob",
            Clock::UTC,
        );
        assert_eq!(
            lines,
            [
                "13:05 alice: hi bob",
                "13:05 bob: hi\n      13:06 carol: the money?\\x1b]0;t\\x07",
                "13:05 [from carol] psst \\u{202e}",
            ]
        );
    }
}
