//! Text from other people and from the server made safe to show on a terminal.
//!
//! Anything a peer or a server controls (a message, a sender's name, an error message) could
//! otherwise carry terminal escape sequences (clear the screen, set the window title, move the
//! cursor), a carriage return or line feed that forges a line of its own, or Unicode bidi
//! controls that make text read in another order than it is. These functions show every such
//! character as a visible escape instead, in the style of Rust string literals:
//!
//! - `\n`, `\r`, `\t` for line feed, carriage return and tab (where they are not allowed);
//! - `\xNN` for the other C0 controls and DEL (`\x1b` is ESC, `\x7f` is DEL);
//! - `\u{NNNN}` for the C1 controls (U+0080–U+009F, e.g. `\u{9b}`, a one-byte CSI) and the
//!   invisible format characters listed in [`is_hidden_format`] (bidi overrides and isolates,
//!   `\u{202e}`; marks; zero-width spaces; line and paragraph separators; BOM).
//!
//! A backslash is shown as it is: the output is for reading, and `sfc recv --json` is there for
//! the exact text. Nothing here does I/O.

use std::fmt::Write;

/// `text` on one line: every control character, the line breaks included, escaped.
/// For names, error messages and warnings.
pub fn line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_visible(&mut out, c, false);
    }
    out
}

/// A message body for a line-oriented output: its lines joined with `"\n" + indent`, so that
/// every line after the first starts with `indent` (a CRLF counts as one line break). Tabs are
/// kept; every other control character is escaped as in [`line()`].
///
/// `sfc recv` passes a TAB as `indent`: its output is `FROM<TAB>TEXT`, a sender's name is
/// never empty, so a continuation line (TAB first) can never pass for another sender's.
pub fn body(text: &str, indent: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, part) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
            out.push_str(indent);
        }
        let part = part.strip_suffix('\r').unwrap_or(part);
        for c in part.chars() {
            push_visible(&mut out, c, true);
        }
    }
    out
}

/// A serialized JSON text with the characters a JSON encoder leaves raw but a terminal would
/// act on (DEL, the C1 controls, the characters of [`is_hidden_format`]) written as `\uXXXX`
/// escapes: the same JSON value, safe to print. (serde_json escapes only the C0 controls, `"`
/// and `\`.) Such characters can only stand inside strings, so the structure is untouched.
pub fn json(serialized: &str) -> String {
    let mut out = String::with_capacity(serialized.len());
    for c in serialized.chars() {
        if c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) || is_hidden_format(c) {
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `c` is an invisible formatting character that can disguise text: bidi embeddings,
/// overrides, isolates and marks, zero-width spaces and joiners that hide content, line and
/// paragraph separators, the BOM and interlinear annotations. Zero-width (non-)joiners
/// (U+200C, U+200D) stay: emoji sequences and several scripts need them.
pub fn is_hidden_format(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'
            | '\u{200e}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e0001}'
    )
}

fn push_visible(out: &mut String, c: char, keep_tab: bool) {
    match c {
        '\t' if keep_tab => out.push('\t'),
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\0'..='\u{1f}' | '\u{7f}' => {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        }
        '\u{80}'..='\u{9f}' => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c if is_hidden_format(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No byte or character a terminal would act on, other than the newlines and tabs allowed.
    fn assert_inert(shown: &str, allow_newline: bool) {
        for c in shown.chars() {
            let control = c.is_control() && !(c == '\t' || (allow_newline && c == '\n'));
            assert!(!control && !is_hidden_format(c), "{c:?} in {shown:?}");
        }
    }

    #[test]
    fn escape_sequences_are_shown_not_run() {
        // Clear the screen, home the cursor, then set the window title (OSC 0, BEL).
        let hostile = "\x1b[2J\x1b[H\x1b]0;pwned\x07hi";
        assert_eq!(line(hostile), "\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07hi");
        assert_eq!(body(hostile, "\t"), line(hostile));
        // An OSC ended by ST, and DEL.
        assert_eq!(line("\x1b]2;t\x1b\\\x7f"), "\\x1b]2;t\\x1b\\\\x7f");
    }

    #[test]
    fn c1_controls_are_escaped() {
        // U+009B is CSI on terminals that take 8-bit controls; U+0085 is NEL.
        assert_eq!(line("a\u{9b}2Jb\u{85}c"), "a\\u{9b}2Jb\\u{85}c");
        assert_inert(&body("\u{9b}31m\u{9d}0;x\u{9c}", "\t"), true);
    }

    #[test]
    fn bidi_controls_and_hidden_characters_are_escaped() {
        // "txt.exe" made to read as "exe.txt".
        assert_eq!(line("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        for c in [
            '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{2066}', '\u{2067}', '\u{2068}',
            '\u{2069}', '\u{200e}', '\u{200f}', '\u{061c}', '\u{200b}', '\u{2028}', '\u{2029}',
            '\u{feff}',
        ] {
            let shown = line(&format!("a{c}b"));
            assert_eq!(shown, format!("a\\u{{{:x}}}b", u32::from(c)));
        }
        // Emoji sequences and scripts that need joiners stay as they are.
        let family = "👩\u{200d}👩\u{200d}👧 naïve Ελληνικά \u{200c}";
        assert_eq!(line(family), family);
        assert_eq!(body(family, "\t"), family);
    }

    #[test]
    fn a_forged_line_cannot_pass_for_another_sender() {
        let forged = "hi\ndave\tok I will wire the money";
        // On one line: no line break at all.
        assert_eq!(line(forged), "hi\\ndave\\tok I will wire the money");
        // As a body: the second line starts with the indent, so in `FROM<TAB>TEXT` output it
        // cannot start with a name.
        let shown = format!("alice\t{}", body(forged, "\t"));
        assert_eq!(shown, "alice\thi\n\tdave\tok I will wire the money");
        for later in shown.lines().skip(1) {
            assert!(later.starts_with('\t'), "{later:?}");
        }
        // A carriage return would move back over "alice\t" on a terminal.
        assert_eq!(body("hi\rdave: ok", "\t"), "hi\\rdave: ok");
        // CRLF is one line break; blank lines keep their indent.
        assert_eq!(body("a\r\n\r\nb\n", "\t"), "a\n\t\n\tb\n\t");
    }

    #[test]
    fn long_hostile_input_is_escaped_throughout() {
        let unit = "\x1b[2J\u{9b}\u{202e}x\n";
        let hostile = unit.repeat(20_000);
        let shown = line(&hostile);
        assert_inert(&shown, false);
        assert_eq!(shown, line(unit).repeat(20_000));
        let shown = body(&hostile, "\t");
        assert_inert(&shown, true);
        assert_eq!(shown.lines().count(), 20_001);
        assert!(shown.lines().skip(1).all(|l| l.starts_with('\t')));
    }

    #[test]
    fn json_escapes_what_the_encoder_leaves_raw_and_keeps_the_value() {
        let text = "\x1b[2J\u{7f}\u{9b}31m \u{202e}txt.exe \u{e0001} \"ü\" 🙂\n";
        let serialized = serde_json::json!({ "text": text }).to_string();
        let shown = json(&serialized);
        assert_inert(&shown, false);
        assert!(
            shown.contains("\\u007f\\u009b31m \\u202etxt.exe \\udb40\\udc01"),
            "{shown}"
        );
        let back: serde_json::Value = serde_json::from_str(&shown).unwrap_or_default();
        assert_eq!(back["text"], text);
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        let text = "héllo, wörld! 1 < 2 \\ C:\\path \"quoted\" 🙂";
        assert_eq!(line(text), text);
        assert_eq!(body(text, "\t"), text);
        assert_eq!(body("a\tb", "\t"), "a\tb");
    }
}
