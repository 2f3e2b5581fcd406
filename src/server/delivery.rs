//! Delivery of a device's inbox on server-opened streams, in order: from the store, or from
//! the copies the mailbox got when the messages were ordered.

use std::sync::Arc;

use quinn::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use super::router::{Inbox, Mailbox, Taken};
use crate::protocol::{DeliverHeader, MAX_STREAM_HEADER, StreamHeader};
use crate::unix_now;

/// Inbox entries read per store call while delivering.
const DELIVERY_BATCH: usize = 128;
/// First and longest wait before a deliverer that holds a copy it cannot place reads the store
/// again (see `deliver`).
const GAP_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const GAP_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(50);

/// Pushes `inbox` to `conn`, in order, until `stop` or the connection ends. It reads
/// the inbox from the store at first and whenever the mailbox says so; otherwise it pushes the
/// copies the mailbox holds.
pub(crate) async fn deliver(
    conn: Connection,
    shared: Arc<Shared>,
    inbox: Inbox,
    mailbox: Arc<Mailbox>,
    stop: CancellationToken,
) {
    let store = shared.accounts.store();
    let (mut after, mut prev) = (0u64, 0u64);
    let mut read_store = true;
    // The last store read found nothing new. A gap in the mailbox then usually means a message
    // not synced yet: reading again at once would spin for the length of an fsync, so the
    // loop waits for the mailbox to change (a sync marks it stale when it must) or for a
    // backoff, whichever comes first, and then reads the store again. Seqs are not contiguous
    // (acked, unsent, skipped after a crash), so the held copy may well be the next message:
    // only the store can tell, and the backoff guarantees that it is asked.
    let mut dry = false;
    let mut backoff = GAP_BACKOFF_MIN;
    loop {
        let batch = if read_store {
            let batch = tokio::select! {
                () = stop.cancelled() => return,
                batch = store.pending(&inbox.user, inbox.device, after, DELIVERY_BATCH) => batch,
            };
            match batch {
                Ok(batch) => {
                    read_store = batch.len() >= DELIVERY_BATCH;
                    dry = batch.is_empty();
                    batch
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the inbox; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            }
        } else {
            match mailbox.take_after(after) {
                Taken::Messages(batch) => batch,
                Taken::ReadStore => {
                    read_store = true;
                    continue;
                }
                Taken::Gap if !dry => {
                    read_store = true;
                    continue;
                }
                Taken::Gap => {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = mailbox.changed() => {}
                        () = tokio::time::sleep(backoff) => {
                            backoff = (backoff * 2).min(GAP_BACKOFF_MAX);
                        }
                    }
                    read_store = true;
                    continue;
                }
                Taken::Nothing => {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = mailbox.changed() => continue,
                    }
                }
            }
        };
        if !batch.is_empty() {
            dry = false;
            backoff = GAP_BACKOFF_MIN;
        }
        let now = unix_now();
        for message in batch {
            after = message.seq;
            if message.expires_at <= now || !shared.router.claim(&inbox, message.seq) {
                continue;
            }
            // Pending from before a restart: presence is granted again once pushed.
            if message.from != inbox.user {
                shared.router.note_written(&inbox.user, &message.from);
            }
            // Group traffic keeps its group in its stored kind (`groups`).
            let (kind, group) = super::groups::split_stored_kind(message.kind);
            let header = DeliverHeader {
                seq: message.seq,
                prev,
                id: message.id,
                from: message.from.to_string(),
                from_device: message.from_device,
                to: message
                    .to
                    .filter(|_| group.is_none())
                    .map(|to| to.to_string()),
                sent_at: message.sent_at,
                kind,
                length: message.body.len() as u64,
                group,
            };
            let pushed = tokio::select! {
                () = stop.cancelled() => return,
                pushed = push(&conn, &header, &message.body) => pushed,
            };
            match pushed {
                Ok(()) => {
                    tracing::trace!(seq = message.seq, prev, "pushed");
                    super::metrics::message_pushed();
                    prev = message.seq;
                }
                Err(PushError::ConnectionLost(e)) => {
                    debug!(error = %e, "delivery stopped: connection gone");
                    return;
                }
                // The client refused this one stream; it stays unacknowledged and comes again
                // on the next connection. The chain goes on from the last message pushed whole.
                Err(PushError::Stream(e)) => {
                    warn!(error = %e, seq = message.seq, "delivery stream refused")
                }
            }
        }
    }
}

/// Why a delivery stream failed.
enum PushError {
    /// The connection is gone: stop delivering to it.
    ConnectionLost(String),
    /// Only this stream failed (the client stopped it).
    Stream(String),
}

impl From<quinn::WriteError> for PushError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(e) => Self::ConnectionLost(e.to_string()),
            other => Self::Stream(other.to_string()),
        }
    }
}

async fn push(conn: &Connection, header: &DeliverHeader, body: &[u8]) -> Result<(), PushError> {
    let mut stream = conn
        .open_uni()
        .await
        .map_err(|e| PushError::ConnectionLost(e.to_string()))?;
    let header = StreamHeader::Deliver(header.clone());
    // Header and body in one buffer: one write, one wake of the connection's driver.
    let mut frame = Vec::with_capacity(128 + body.len());
    crate::protocol::encode_frame_into(&mut frame, &header, MAX_STREAM_HEADER)
        .map_err(|e| PushError::Stream(e.to_string()))?;
    frame.extend_from_slice(body);
    stream.write_all(&frame).await?;
    // The data is queued; a stop from the client after this point changes nothing.
    let _ = stream.finish();
    Ok(())
}
