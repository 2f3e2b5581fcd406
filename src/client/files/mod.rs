//! Files for people (docs/PROTOCOL.md 5.6, E15): [`Messenger::send_file`] seals a file chunk by
//! chunk as it reads it, uploads it as a blob (resuming from the server's `held` after a lost
//! connection), and only once the server has it sends the `file` message through the outbox,
//! like a text. [`Messenger::download_file`] fetches a received file's blob into a temporary
//! file in the destination directory, opening and hashing it chunk by chunk (resuming from the
//! last verified chunk), and gives it a safe name there only once all of it checked.
//!
//! `send` and `download` hold the two halves; `names` makes a sender's file name safe.
//!
//! [`Messenger::send_file`]: crate::client::Messenger::send_file
//! [`Messenger::download_file`]: crate::client::Messenger::download_file

mod download;
mod names;
mod send;

use std::time::Duration;

pub use names::{FALLBACK_NAME, MAX_SAVED_NAME_LEN, numbered, safe_file_name};

/// How long a transfer keeps reconnecting after the connection is lost before it gives up.
pub const TRANSFER_RECONNECT_LIMIT: Duration = Duration::from_secs(120);
/// Attempts of one transfer (a lost connection, a busy server or a stream cut short each use
/// one) before it gives up.
pub const MAX_TRANSFER_ATTEMPTS: u32 = 20;
/// Wait before trying again after the server said `busy` or a stream broke off while the
/// connection stayed.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// A size for people: `512 bytes`, `1.5 KiB`, `100.0 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(human_size(1023), "1023 bytes");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(100 << 20), "100.0 MiB");
    }
}
