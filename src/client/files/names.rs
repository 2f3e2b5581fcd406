//! Names for received files: the sender's name made safe to use inside a download directory,
//! and the next free name there. A sender controls the name completely, so nothing of it may
//! climb out of the directory, hide as a dotfile, carry terminal escapes or bidi tricks, or
//! pass the file system's limits.

use std::path::Path;

use crate::client::render::is_hidden_format;

/// Longest saved name, in bytes (file systems allow 255; the ` (N)` suffix needs room).
pub const MAX_SAVED_NAME_LEN: usize = 200;
/// The name of a file whose own name leaves nothing usable.
pub const FALLBACK_NAME: &str = "file";
/// Longest extension kept whole when a long name is shortened.
const MAX_KEPT_EXTENSION: usize = 16;

/// Whether `c` cannot stand in a saved name: a path separator, a control character (Unicode
/// Cc: C0, DEL, C1; ESC among them), or an invisible format character (Unicode Cf: bidi
/// controls, zero-width characters, tags, …).
fn replaced(c: char) -> bool {
    c == '/'
        || c == '\\'
        || c.is_control()
        || is_hidden_format(c)
        || matches!(
            c,
            '\u{200c}'
                | '\u{200d}'
                | '\u{0600}'..='\u{0605}'
                | '\u{06dd}'
                | '\u{070f}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08e2}'
                | '\u{110bd}'
                | '\u{110cd}'
                | '\u{13430}'..='\u{1343f}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// The sender's `name` as a safe file name: separators, control and format characters become
/// `_`, surrounding white space goes, leading dots become `_` (no dotfiles, never `.` or
/// `..`), at most [`MAX_SAVED_NAME_LEN`] bytes (cut at a character boundary, keeping a short
/// extension), and never empty ([`FALLBACK_NAME`]).
pub fn safe_file_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if replaced(c) { '_' } else { c })
        .collect();
    let trimmed = cleaned.trim();
    let dots = trimmed.len() - trimmed.trim_start_matches('.').len();
    let mut safe = "_".repeat(dots);
    safe.push_str(&trimmed[dots..]);
    if safe.len() > MAX_SAVED_NAME_LEN {
        safe = shorten(&safe, MAX_SAVED_NAME_LEN);
    }
    if safe.is_empty() {
        FALLBACK_NAME.to_owned()
    } else {
        safe
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `name` cut to `max` bytes, keeping its extension when it is short.
fn shorten(name: &str, max: usize) -> String {
    let (stem, ext) = split_extension(name);
    if !ext.is_empty() && ext.len() <= MAX_KEPT_EXTENSION && ext.len() < max {
        let mut out = cut(stem, max - ext.len()).to_owned();
        out.push_str(ext);
        out
    } else {
        cut(name, max).to_owned()
    }
}

/// `("report", ".pdf")` for `report.pdf`; no extension for `_bashrc` or `archive.`.
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(at) if at > 0 && at + 1 < name.len() => name.split_at(at),
        _ => (name, ""),
    }
}

/// The `n`th candidate for a safe name: the name itself, then `stem (1).ext`, `stem (2).ext`, …
pub fn numbered(safe: &str, n: u32) -> String {
    if n == 0 {
        return safe.to_owned();
    }
    let (stem, ext) = split_extension(safe);
    format!("{stem} ({n}){ext}")
}

/// Whether `name` (as [`safe_file_name`] made it) names a file directly inside `dir`.
pub fn stays_inside(dir: &Path, name: &str) -> bool {
    let joined = dir.join(name);
    joined.parent() == Some(dir) && joined.file_name().and_then(|n| n.to_str()) == Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_become_plain_names() {
        let cases = [
            ("report.pdf", "report.pdf"),
            ("../../etc/passwd", "___.._etc_passwd"),
            ("/etc/passwd", "_etc_passwd"),
            ("a/b", "a_b"),
            ("a\\b", "a_b"),
            ("..", "__"),
            (".", "_"),
            (".bashrc", "_bashrc"),
            ("...x", "___x"),
            ("", "file"),
            ("   ", "file"),
            (" x.txt ", "x.txt"),
            ("\u{1b}[2Jevil\u{7}.txt", "_[2Jevil_.txt"),
            ("line\nbreak\r.txt", "line_break_.txt"),
            ("cool\u{202e}fdp.exe", "cool_fdp.exe"),
            ("csi\u{9b}31m", "csi_31m"),
            ("zero\u{200b}width\u{feff}", "zero_width_"),
            ("tag\u{e0041}", "tag_"),
            ("nul\0byte", "nul_byte"),
            ("naïve résumé.txt", "naïve résumé.txt"),
        ];
        for (name, safe) in cases {
            assert_eq!(safe_file_name(name), safe, "{name:?}");
            let dir = Path::new("/downloads");
            assert!(stays_inside(dir, &safe_file_name(name)), "{name:?}");
        }
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary_keeping_the_extension() {
        let long = format!("{}.pdf", "é".repeat(200));
        let safe = safe_file_name(&long);
        assert!(safe.len() <= MAX_SAVED_NAME_LEN);
        assert!(safe.ends_with("é.pdf"), "{safe}");
        let no_ext = "x".repeat(255);
        assert_eq!(safe_file_name(&no_ext).len(), MAX_SAVED_NAME_LEN);
        let odd = format!("a{}", "€".repeat(100));
        let safe = safe_file_name(&odd);
        assert!(safe.len() <= MAX_SAVED_NAME_LEN && safe.len() > MAX_SAVED_NAME_LEN - 3);
        let long_ext = format!("name.{}", "e".repeat(250));
        assert_eq!(safe_file_name(&long_ext).len(), MAX_SAVED_NAME_LEN);
    }

    #[test]
    fn numbered_names_keep_the_extension() {
        assert_eq!(numbered("report.pdf", 0), "report.pdf");
        assert_eq!(numbered("report.pdf", 1), "report (1).pdf");
        assert_eq!(numbered("archive.tar.gz", 2), "archive.tar (2).gz");
        assert_eq!(numbered("README", 3), "README (3)");
        assert_eq!(numbered("_bashrc", 1), "_bashrc (1)");
    }
}
