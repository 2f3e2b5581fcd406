//! Sending in a 1:1 chat: a typed line is sealed and sent to the peer and shown once the
//! server has stored it; what the server cannot take now waits in the outbox, which the chat
//! tries again.

use std::time::Duration;

use super::screen::{Clock, Screen, message_line, notice, now};
use crate::client::messenger::{Messenger, MessengerError};
use crate::client::render;
use crate::e2e::MAX_PLAINTEXT_LEN;

/// How often the chat tries again what waits in the outbox.
pub(super) const OUTBOX_RETRY: Duration = Duration::from_secs(5);

/// Seals and sends one typed line, and shows it (or why it did not go). Returns whether the
/// outbox may now hold something.
pub(super) async fn send_line(
    messenger: &Messenger,
    screen: &mut Screen,
    clock: Clock,
    me: &str,
    peer: &str,
    text: &str,
) -> bool {
    if text.len() > MAX_PLAINTEXT_LEN {
        screen.show(too_long());
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

/// The warning for a typed line over the size limit (nothing was sent).
pub(super) fn too_long() -> String {
    notice(&format!(
        "not sent: the message is longer than the limit of {MAX_PLAINTEXT_LEN} bytes (56 KiB)"
    ))
}

/// Sends what waits in the outbox and tells the user what left it (and, with `tell_waiting`,
/// what still waits and why). Returns whether anything still waits.
pub(super) async fn flush_outbox(
    messenger: &Messenger,
    screen: &mut Screen,
    tell_waiting: bool,
) -> bool {
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
