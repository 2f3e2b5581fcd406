//! What the chat shows and where: the clock of its `HH:MM` times, the shape of its lines
//! (messages, the chat's own status lines and warnings), the screen it prints on, and the
//! terminal mode it puts back. Everything from others goes through [`crate::client::render`]
//! here, and a message's later lines are indented, so no text can pass for another line.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use rustyline::ExternalPrinter;

use crate::client::render;

/// What starts a message's later lines: as wide as `HH:MM `, and no line of a message can
/// start like a message line (`HH:MM NAME`), a status line (`--`) or a warning (`!!`).
pub(super) const CONTINUATION: &str = "      ";

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
    pub(super) fn describe(self) -> String {
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

/// One message: `HH:MM NAME: TEXT` from someone of the open conversation (`in_conversation`),
/// else `HH:MM [from NAME] TEXT`; later lines of the text indented.
pub(super) fn message_line(
    clock: Clock,
    at: u64,
    from: &str,
    text: &str,
    in_conversation: bool,
) -> String {
    if in_conversation {
        format!(
            "{} {}: {}",
            clock.hh_mm(at),
            render::line(from),
            render::body(text, CONTINUATION)
        )
    } else {
        marked_line(clock, at, &format!("from {from}"), text)
    }
}

/// A message of another conversation: `HH:MM [MARK] TEXT` (`from carol`, `you to carol`,
/// `friends/carol`); later lines of the text indented.
pub(super) fn marked_line(clock: Clock, at: u64, mark: &str, text: &str) -> String {
    format!(
        "{} [{}] {}",
        clock.hh_mm(at),
        render::line(mark),
        render::body(text, CONTINUATION)
    )
}

/// A warning from the chat itself (`!! …`), on one line.
pub(super) fn notice(text: &str) -> String {
    format!("!! {}", render::line(text))
}

/// A status line from the chat itself (`-- …`), on one line.
pub(super) fn status(text: &str) -> String {
    format!("-- {}", render::line(text))
}

/// Now, in Unix seconds.
pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the chat prints: above the line being typed, through the line editor; before the
/// editor runs (while the chat opens), straight to standard output.
pub(super) struct Screen {
    printer: Option<Box<dyn ExternalPrinter + Send>>,
    /// Where received files are saved.
    pub(super) downloads: PathBuf,
}

impl Screen {
    /// A screen that prints to standard output until [`Screen::above_editor`].
    pub(super) fn new(downloads: PathBuf) -> Self {
        Self {
            printer: None,
            downloads,
        }
    }

    /// From now on, prints above the line being typed.
    pub(super) fn above_editor(&mut self, printer: Box<dyn ExternalPrinter + Send>) {
        self.printer = Some(printer);
    }

    /// Shows one line (made of inert text: see the functions above).
    pub(super) fn show(&mut self, mut line: String) {
        let Some(printer) = self.printer.as_mut() else {
            println!("{line}");
            return;
        };
        // While the editor reads a line, the printer hands the text to the editor's thread
        // through a pipe (it does not block), and that adds a line break; otherwise it writes
        // the text as it is.
        line.push('\n');
        if printer.print(line).is_err() {
            tracing::debug!("the line editor is gone");
        }
    }
}

/// Puts the terminal back as it was when the chat started, however the chat ends (the line
/// editor's thread may still be waiting for a key in raw mode).
pub(super) struct TerminalMode {
    #[cfg(unix)]
    saved: Option<nix::sys::termios::Termios>,
}

impl TerminalMode {
    /// The terminal's mode now, put back on drop.
    pub(super) fn save() -> Self {
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

    #[test]
    fn status_lines_and_warnings_stay_on_one_inert_line() {
        assert_eq!(status("a\nb\x1b[2J"), "-- a\\nb\\x1b[2J");
        assert_eq!(notice("x\r-- y"), "!! x\\r-- y");
        assert_eq!(
            marked_line(Clock::UTC, 0, "friends/m\x1b]0", "two\nlines"),
            "00:00 [friends/m\\x1b]0] two\n      lines"
        );
    }
}
