//! The chat's receive side: a task that takes messages from the server one at a time and
//! hands them over (the chat loop shows each, then marks it shown, which acknowledges it),
//! reconnecting with backoff when the connection is lost; and the catch-up a group chat does
//! before its prompt, which shows what waits the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::screen::{Clock, Screen, notice};
use super::show::show_received;
use super::{Conversation, Flow};
use crate::client::messenger::{Messenger, MessengerError, Received};
use crate::client::receiving::Connection;

/// How long the receiver waits for a message before it looks whether the chat is over.
const RECEIVE_SLICE: Duration = Duration::from_millis(250);
/// How long the catch-up listens for deliveries that already wait, per pause.
const CATCH_UP_IDLE: Duration = Duration::from_millis(300);
/// How long the catch-up may take at most (a busy group never pauses).
const CATCH_UP_MAX: Duration = Duration::from_secs(10);

/// What the receive side hands over.
pub(super) enum Arrival {
    /// A message to show (then to mark shown).
    Message(Received),
    /// A line about the connection (lost, reconnecting, back).
    Notice(String),
    /// Receiving failed for good (e.g. the session was revoked).
    Failed(MessengerError),
}

/// Starts the receive task; it runs until `stop` is set (it finishes the message at hand
/// first) or receiving fails for good.
pub(super) fn spawn_receiver(
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
fn connection_notice(event: Connection<'_>) -> String {
    match event {
        Connection::Lost { why, wait } => notice(&format!(
            "connection lost ({why}); reconnecting in {} s",
            wait.as_secs()
        )),
        Connection::Back(flushed) => {
            let sent = flushed.sent.len();
            if sent == 0 {
                "-- reconnected".to_owned()
            } else {
                format!("-- reconnected; sent {sent} messages that waited in the outbox")
            }
        }
    }
}

/// Shows what waits for this device, in order, until nothing comes for a moment (or for
/// [`CATCH_UP_MAX`]): the group's commits are merged on the way, so the chat's first send
/// goes out in the group's current epoch. Each message is shown, then marked shown, as the
/// receive task would do. Stops early when what arrived ends the chat (this device was
/// removed from the group).
pub(super) async fn catch_up(
    messenger: &Messenger,
    screen: &mut Screen,
    clock: Clock,
    conversation: &Conversation,
) -> Result<Flow, MessengerError> {
    let deadline = tokio::time::Instant::now() + CATCH_UP_MAX;
    while tokio::time::Instant::now() < deadline {
        let Some(received) = messenger.receive(CATCH_UP_IDLE).await? else {
            break;
        };
        let arrival = Arrival::Message(received);
        if let Flow::End(end) =
            show_received(messenger, screen, clock, conversation, arrival).await?
        {
            return Ok(Flow::End(end));
        }
    }
    Ok(Flow::Continue)
}
