//! Message streams: receiving a client's messages (one unidirectional stream each) into the
//! recipient's inbox, and delivering an online user's inbox on server-opened streams.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use quinn::{Connection, ReadToEndError, RecvStream, VarInt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use super::Shared;
use super::accounts::ActiveSession;
use super::body_budget::ConnectionBudget;
use super::router::{Mailbox, Taken};
use crate::protocol::{
    DeliverHeader, ErrorCode, FrameError, MAX_STREAM_HEADER, MessageId, Reply, SendHeader,
    ServerFrame, StreamHeader, Username, decode_body, read_frame,
};
use crate::store::{
    AppendHooks, Appended, NewMessage, SenderShare, SeqHook, StoreError, StoredMessage,
};
use crate::unix_now;

/// The session of a connection, shared by its control loop and its message streams.
pub(crate) type SessionCell = Arc<Mutex<Option<ActiveSession>>>;

/// Longest `kind` accepted, in bytes.
const MAX_KIND_LEN: usize = 32;
/// Inbox entries read per store call while delivering.
const DELIVERY_BATCH: usize = 128;
/// First and longest wait before a deliverer that holds a copy it cannot place reads the store
/// again (see `deliver`).
const GAP_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const GAP_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(50);
/// Message streams of one connection handled at once.
const MAX_RECEIVING: usize = 1024;
/// Stream error code sent with STOP_SENDING when a message stream is refused.
const STREAM_REFUSED: u32 = 1;

/// Accepts the connection's message streams until it closes, and handles them in this one
/// task (no task per message). At most [`MAX_RECEIVING`] are handled at once: beyond that it
/// stops accepting, and the client's stream limit holds further messages back.
pub(crate) async fn accept_message_streams(
    conn: Connection,
    shared: Arc<Shared>,
    session: SessionCell,
    events: mpsc::Sender<Box<ServerFrame>>,
) {
    let budget = shared.body_budget.connection();
    let handle = |stream: RecvStream| {
        let (shared, session, events) = (Arc::clone(&shared), session.clone(), events.clone());
        let budget = budget.clone();
        async move {
            if let Some(reply) = receive(stream, &shared, &session, &budget).await {
                let _ = events.send(Box::new(ServerFrame { id: None, reply })).await;
            }
        }
        .instrument(debug_span!("message"))
    };
    // Boxed futures: a `FuturesUnordered` allocates a stub task sized like its future when it
    // is made, and the handler's future (≈ 0.8 KB) would then sit in every idle connection.
    let mut receiving: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            accepted = conn.accept_uni(), if open && receiving.len() < MAX_RECEIVING => {
                match accepted {
                    Ok(stream) => receiving.push(handle(stream).boxed()),
                    Err(_) => open = false,
                }
            }
            Some(()) = receiving.next() => {}
            else => return,
        }
    }
}

fn failed(message_id: Option<MessageId>, code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::SendFailed {
        message_id,
        code,
        message: message.into(),
        devices: None,
        own_devices: None,
    }
}

/// Reads one message stream and stores the message; returns the event for the sender.
async fn receive(
    mut stream: RecvStream,
    shared: &Shared,
    session: &SessionCell,
    budget: &ConnectionBudget,
) -> Option<Reply> {
    let refuse = |stream: &mut RecvStream| {
        let _ = stream.stop(VarInt::from_u32(STREAM_REFUSED));
    };
    let mut buf = Vec::new();
    let unread = match read_frame(&mut stream, MAX_STREAM_HEADER, &mut buf).await {
        Ok(true) => None,
        Err(FrameError::TooLarge { len, max }) => Some((
            ErrorCode::FrameTooLarge,
            format!("a header of {len} bytes exceeds the limit of {max}"),
        )),
        // Ended (FIN) or reset by the client before the header was complete.
        Ok(false) | Err(FrameError::Truncated | FrameError::Io(_)) => Some((
            ErrorCode::TruncatedFrame,
            "the stream ended inside its header".to_owned(),
        )),
        Err(e) => Some((ErrorCode::MalformedFrame, e.to_string())),
    };
    if let Some((code, why)) = unread {
        refuse(&mut stream);
        return Some(failed(None, code, why));
    }
    let header = match decode_body::<StreamHeader>(&buf) {
        Ok(StreamHeader::Send(header)) => header,
        Ok(StreamHeader::Deliver(_)) | Err(_) => {
            refuse(&mut stream);
            return Some(failed(
                None,
                ErrorCode::MalformedFrame,
                "expected a `send` header",
            ));
        }
    };
    let id = header.id;
    let sender = match session.lock().ok().and_then(|s| s.clone()) {
        Some(s) if s.is_active() => s.username,
        _ => {
            refuse(&mut stream);
            return Some(failed(
                Some(id),
                ErrorCode::NotAuthenticated,
                "log in before sending",
            ));
        }
    };
    if let Err((code, why)) = check_header(&header, shared.limits.max_message_bytes) {
        refuse(&mut stream);
        return Some(failed(Some(id), code, why));
    }
    let Ok(recipient) = Username::parse(&header.to) else {
        refuse(&mut stream);
        return Some(failed(Some(id), ErrorCode::UnknownUser, "no such user"));
    };
    // Taken before the body is read, whatever becomes of the message: the rate bounds the
    // work one account makes the server do, not only what it stores.
    if let Err(wait) = shared.send_rate.take(&sender) {
        refuse(&mut stream);
        let secs = wait.as_secs().max(1);
        debug!(retry_in_secs = secs, "send rate limited");
        return Some(failed(
            Some(id),
            ErrorCode::SendRateLimited,
            format!("your account is sending too many messages; retry in {secs} s"),
        ));
    }
    // Buffered as it arrives, never more than announced: a header alone allocates nothing.
    let length = usize::try_from(header.length).unwrap_or(usize::MAX);
    // Held until the store has answered: a stalled disk stops the peer here, unread.
    let Some(_reserved) = budget.reserve(length).await else {
        refuse(&mut stream);
        return Some(failed(
            Some(id),
            ErrorCode::MessageTooLarge,
            "message too large",
        ));
    };
    let body = match stream.read_to_end(length).await {
        Ok(body) if body.len() == length => body,
        Ok(_) => {
            return Some(failed(
                Some(id),
                ErrorCode::TruncatedFrame,
                "the stream ended inside the body",
            ));
        }
        Err(ReadToEndError::TooLong) => {
            refuse(&mut stream);
            return Some(failed(
                Some(id),
                ErrorCode::BadRequest,
                "bytes after the declared body",
            ));
        }
        Err(ReadToEndError::Read(e)) => {
            debug!(error = %e, "message stream broken inside the body");
            return Some(failed(
                Some(id),
                ErrorCode::TruncatedFrame,
                "the stream was reset inside the body",
            ));
        }
    };
    match shared.accounts.store().user_exists(&recipient).await {
        Ok(true) => {}
        Ok(false) => return Some(failed(Some(id), ErrorCode::UnknownUser, "no such user")),
        Err(e) => return Some(store_failure(id, &e)),
    }
    let now = unix_now();
    let expires_at = now.saturating_add(shared.limits.message_ttl.as_secs());
    // A copy for an online recipient's deliverer, handed over as soon as the message has its
    // seq (while the batch syncs), so delivery does not wait for the disk and the deliverer
    // need not read the message back.
    // The mailbox is looked up here, not on the writer's thread (which every message shares);
    // if a newer connection takes over meanwhile, the synced hook below sends its deliverer to
    // the store.
    let copy: Option<SeqHook> = shared.router.mailbox(&recipient).map(|mailbox| {
        let (from, kind, body) = (sender.clone(), header.kind.clone(), body.clone());
        Box::new(move |seq| {
            mailbox.copy(StoredMessage {
                seq,
                id,
                from,
                kind,
                sent_at: now,
                expires_at,
                body,
            })
        }) as SeqHook
    });
    // Once synced, the recipient's deliverer is told (it may need the store: see `Mailbox`).
    // The writer calls this even if this task is gone by then (its connection closed).
    let synced: SeqHook = {
        let (router, to, copied) = (
            Arc::clone(&shared.router),
            recipient.clone(),
            copy.is_some(),
        );
        Box::new(move |seq| router.stored(&to, seq, copied))
    };
    let hooks = AppendHooks {
        ordered: copy,
        synced: Some(synced),
    };
    let message = NewMessage {
        sender: sender.clone(),
        recipient: recipient.clone(),
        id,
        kind: header.kind,
        body,
        sent_at: now,
        expires_at,
    };
    match shared.accounts.store().append(message, hooks).await {
        Ok(Appended::Stored { seq }) => {
            tracing::trace!(%id, seq, to = %recipient, "stored");
            super::metrics::message_sent();
            // The recipient may see the sender's presence (in memory only: `router`).
            shared.router.note_written(&recipient, &sender);
            Some(Reply::Sent {
                message_id: id,
                duplicate: false,
            })
        }
        Ok(Appended::Duplicate) => Some(Reply::Sent {
            message_id: id,
            duplicate: true,
        }),
        Ok(Appended::InboxFull) => Some(failed(
            Some(id),
            ErrorCode::InboxFull,
            "the recipient's inbox is full",
        )),
        Ok(Appended::SenderQuota) => Some(failed(
            Some(id),
            ErrorCode::SenderQuota,
            sender_quota_message(&recipient, shared.limits.sender_share),
        )),
        // Deleted meanwhile (or a deleted account's held name).
        Err(StoreError::UnknownUser(_)) => {
            Some(failed(Some(id), ErrorCode::UnknownUser, "no such user"))
        }
        Err(e) => Some(store_failure(id, &e)),
    }
}

/// Why a message over the sender's share was refused, with the limits.
fn sender_quota_message(recipient: &Username, share: SenderShare) -> String {
    let limits = match (share.messages, share.bytes) {
        (0, bytes) => format!("{bytes} bytes"),
        (messages, 0) => format!("{messages} messages"),
        (messages, bytes) => format!("{messages} messages or {bytes} bytes"),
    };
    format!(
        "you already have your share ({limits}) of {recipient}'s inbox waiting; \
         send again once {recipient} has read some"
    )
}

fn store_failure(id: MessageId, e: &crate::store::StoreError) -> Reply {
    if matches!(e, crate::store::StoreError::Unavailable) {
        // The store logged the outage once; a line per refused message would flood the log.
        return failed(
            Some(id),
            ErrorCode::StorageUnavailable,
            "the server cannot store messages now; it was not stored: send it again later",
        );
    }
    warn!(error = %e, %id, "cannot store message");
    failed(
        Some(id),
        ErrorCode::Internal,
        "the message could not be stored; send it again",
    )
}

fn check_header(header: &SendHeader, max_body: u64) -> Result<(), (ErrorCode, String)> {
    if header.length > max_body {
        return Err((
            ErrorCode::MessageTooLarge,
            format!("{} bytes exceeds the limit of {max_body}", header.length),
        ));
    }
    if header.kind.is_empty() || header.kind.len() > MAX_KIND_LEN {
        return Err((
            ErrorCode::BadRequest,
            format!("`kind` has 1 to {MAX_KIND_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Pushes `user`'s inbox to `conn`, in order, until `stop` or the connection ends. It reads
/// the inbox from the store at first and whenever the mailbox says so; otherwise it pushes the
/// copies the mailbox holds.
pub(crate) async fn deliver(
    conn: Connection,
    shared: Arc<Shared>,
    user: Username,
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
                batch = store.pending(&user, after, DELIVERY_BATCH) => batch,
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
            if message.expires_at <= now || !shared.router.claim(&user, message.seq) {
                continue;
            }
            // Pending from before a restart: presence is granted again once pushed.
            shared.router.note_written(&user, &message.from);
            let header = DeliverHeader {
                seq: message.seq,
                prev,
                id: message.id,
                from: message.from.to_string(),
                from_device: 1,
                to: None,
                sent_at: message.sent_at,
                kind: message.kind,
                length: message.body.len() as u64,
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
