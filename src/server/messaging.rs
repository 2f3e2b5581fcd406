//! Message streams: receiving a client's messages (one unidirectional stream each), checking
//! the devices they were sealed for, and storing every copy in its device's inbox at once.
//! Delivering an inbox is in `delivery`. A client's `upload` streams (blob bytes) arrive here
//! too and are handed to `blobs`.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use quinn::{Connection, ReadToEndError, RecvStream, VarInt};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, debug_span, warn};

use super::Shared;
use super::accounts::ActiveSession;
use super::body_budget::ConnectionBudget;
use super::router::{Inbox, Mailbox};
use crate::protocol::{
    Copies, DeviceId, ErrorCode, FrameError, MAX_STREAM_HEADER, MessageId, Reply, SendHeader,
    ServerFrame, StreamHeader, Username, decode_body, read_frame,
};
use crate::store::{
    AppendHooks, Appended, Copy, MAX_DEVICES, NewMessage, Placed, PlacedHook, SenderShare,
    StoreError, StoredMessage,
};
use crate::unix_now;

/// The session of a connection, shared by its control loop and its message streams.
pub(crate) type SessionCell = Arc<Mutex<Option<ActiveSession>>>;

/// Longest `kind` accepted, in bytes.
const MAX_KIND_LEN: usize = 32;
/// Copies of one message at most: every device of the recipient and every other device of the
/// sender.
const MAX_COPIES: usize = 2 * MAX_DEVICES;
/// Message streams of one connection handled at once.
const MAX_RECEIVING: usize = 1024;
/// Stream error code sent with STOP_SENDING when a message stream is refused.
pub(crate) const STREAM_REFUSED: u32 = 1;

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
    let conn_id = conn.stable_id();
    let handle = |stream: RecvStream| {
        let (shared, session, events) = (Arc::clone(&shared), session.clone(), events.clone());
        let budget = budget.clone();
        async move {
            if let Some(reply) = receive(stream, &shared, &session, &budget, conn_id).await {
                let _ = events.send(Box::new(ServerFrame { id: None, reply })).await;
            }
        }
        .instrument(debug_span!("message"))
    };
    // Boxed futures: a `FuturesUnordered` allocates a stub task sized like its future when it
    // is made, and the handler's future (≈ 1.6 KB) would then sit in every idle connection.
    // Each is moved into its box once per stream: the rare paths (uploads, group messages,
    // stale device lists) are boxed where they are taken, so their space is not in it (it
    // was 5.5 KB, and its copy ≈ 2 % of the server's CPU at full speed).
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

pub(crate) fn failed(
    message_id: Option<MessageId>,
    code: ErrorCode,
    message: impl Into<String>,
) -> Reply {
    Reply::SendFailed {
        message_id,
        code,
        message: message.into(),
        devices: None,
        own_devices: None,
        epoch: None,
    }
}

/// Reads one stream's header and hands the stream to what it is for: a message (`send`) or a
/// blob's bytes (`upload`, in `blobs`); returns the event for the sender.
async fn receive(
    mut stream: RecvStream,
    shared: &Shared,
    session: &SessionCell,
    budget: &ConnectionBudget,
    conn: usize,
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
    match decode_body::<StreamHeader>(&buf) {
        Ok(StreamHeader::Send(header)) => {
            receive_message(stream, header, shared, session, budget).await
        }
        Ok(StreamHeader::Upload(header)) => {
            let upload = super::blobs::receive_upload(stream, header, shared, session, conn);
            Some(Box::pin(upload).await)
        }
        Ok(StreamHeader::Deliver(_) | StreamHeader::Blob(_)) | Err(_) => {
            refuse(&mut stream);
            Some(failed(
                None,
                ErrorCode::MalformedFrame,
                "expected a `send` or `upload` header",
            ))
        }
    }
}

/// Reads the body of one message stream (its header already read) and stores the message;
/// returns the event for the sender.
async fn receive_message(
    mut stream: RecvStream,
    header: SendHeader,
    shared: &Shared,
    session: &SessionCell,
    budget: &ConnectionBudget,
) -> Option<Reply> {
    let refuse = |stream: &mut RecvStream| {
        let _ = stream.stop(VarInt::from_u32(STREAM_REFUSED));
    };
    if header.group.is_some() {
        let group = super::groups::send::receive_group_message;
        return Box::pin(group(stream, header, shared, session, budget)).await;
    }
    let id = header.id;
    if !super::groups::is_plain_kind(&header.kind) {
        refuse(&mut stream);
        return Some(failed(
            Some(id),
            ErrorCode::BadRequest,
            "a kind may not hold the byte 0x00",
        ));
    }
    let sender = match session.lock().ok().and_then(|s| s.clone()) {
        Some(s) if s.is_active() => s,
        _ => {
            refuse(&mut stream);
            return Some(failed(
                Some(id),
                ErrorCode::NotAuthenticated,
                "log in before sending",
            ));
        }
    };
    let copies = match check_header(&header, sender.device, shared.limits.max_message_bytes) {
        Ok(copies) => copies,
        Err((code, why)) => {
            refuse(&mut stream);
            return Some(failed(Some(id), code, why));
        }
    };
    let Ok(recipient) = Username::parse(&header.to) else {
        refuse(&mut stream);
        return Some(failed(Some(id), ErrorCode::UnknownUser, "no such user"));
    };
    // Taken before the body is read, whatever becomes of the message: the rate bounds the
    // work one account makes the server do, not only what it stores.
    if let Err(wait) = shared.send_rate.take(&sender.username) {
        refuse(&mut stream);
        let secs = wait.as_secs().max(1);
        debug!(retry_in_secs = secs, "send rate limited");
        return Some(failed(
            Some(id),
            ErrorCode::SendRateLimited,
            format!("your account is sending too many messages; retry in {secs} s"),
        ));
    }
    // The device lists, before the body is read: a stale message is not worth reading.
    let accounts = &shared.accounts;
    let lists = tokio::try_join!(
        accounts.device_list(&recipient),
        accounts.device_list(&sender.username)
    );
    let (theirs, ours) = match lists {
        Ok(lists) => lists,
        Err(e) => {
            refuse(&mut stream);
            warn!(error = %e, "cannot read device lists");
            return Some(failed(Some(id), ErrorCode::Internal, "send it again"));
        }
    };
    if theirs.is_empty() {
        refuse(&mut stream);
        return Some(failed(Some(id), ErrorCode::UnknownUser, "no such user"));
    }
    let (devices, own_devices) = expected_devices(&sender, &recipient, &theirs, &ours);
    if devices.is_empty() && own_devices.is_empty() {
        refuse(&mut stream);
        return Some(failed(
            Some(id),
            ErrorCode::BadRequest,
            "a message to yourself needs another device of yours to go to",
        ));
    }
    if !same_devices(&copies.devices, &devices) || !same_devices(&copies.own_devices, &own_devices)
    {
        refuse(&mut stream);
        return Some(stale_reply(id, &sender, &recipient, &theirs, &ours));
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
    let now = unix_now();
    let expires_at = now.saturating_add(shared.limits.message_ttl.as_secs());
    let bodies = split_copies(body, &copies.lengths);
    let targets = copies
        .devices
        .iter()
        .map(|d| Inbox::new(&recipient, *d))
        .chain(
            copies
                .own_devices
                .iter()
                .map(|d| Inbox::new(&sender.username, *d)),
        );
    let copies: Vec<Copy> = targets
        .zip(bodies)
        .map(|(inbox, body)| Copy {
            recipient: inbox.user,
            device: inbox.device,
            body,
        })
        .collect();
    let hooks = hooks(
        shared,
        &sender,
        &recipient,
        id,
        &header.kind,
        &copies,
        now,
        expires_at,
    );
    let message = NewMessage {
        sender: sender.username.clone(),
        sender_device: sender.device,
        to: recipient.clone(),
        id,
        kind: header.kind,
        copies,
        sent_at: now,
        expires_at,
    };
    match shared.accounts.store().append(message, hooks).await {
        Ok(Appended::Stored { .. }) => {
            tracing::trace!(%id, to = %recipient, "stored");
            super::metrics::message_sent();
            // The recipient may see the sender's presence (in memory only: `router`).
            if recipient != sender.username {
                shared.router.note_written(&recipient, &sender.username);
            }
            Some(Reply::Sent {
                message_id: id,
                duplicate: false,
            })
        }
        Ok(Appended::Duplicate) => Some(Reply::Sent {
            message_id: id,
            duplicate: true,
        }),
        Ok(Appended::InboxFull { recipient, device }) => Some(failed(
            Some(id),
            ErrorCode::InboxFull,
            format!("the inbox of {recipient}'s device {device} is full"),
        )),
        Ok(Appended::SenderQuota { recipient, .. }) => Some(failed(
            Some(id),
            ErrorCode::SenderQuota,
            sender_quota_message(&recipient, shared.limits.sender_share),
        )),
        // Deleted meanwhile (or a deleted account's held name), or a device removed meanwhile.
        Err(StoreError::UnknownUser(_)) => {
            Some(failed(Some(id), ErrorCode::UnknownUser, "no such user"))
        }
        Err(StoreError::UnknownDevice { .. }) => {
            Some(Box::pin(stale(shared, id, &sender, &recipient)).await)
        }
        Err(e) => Some(store_failure(id, &e)),
    }
}

/// The body cut into its copies (the lengths add up to the body's: checked when the header
/// was decoded). A single copy is the body itself, not a copy of it.
fn split_copies(body: Vec<u8>, lengths: &[u64]) -> Vec<Vec<u8>> {
    if lengths.len() == 1 {
        return vec![body];
    }
    let mut bodies = Vec::with_capacity(lengths.len());
    let mut rest = body.as_slice();
    for length in lengths {
        let at = usize::try_from(*length)
            .unwrap_or(usize::MAX)
            .min(rest.len());
        let (copy, after) = rest.split_at(at);
        bodies.push(copy.to_vec());
        rest = after;
    }
    bodies
}

/// The hooks of one message's append: a copy to the mailbox of each of its devices that is
/// online, handed over as soon as the message has its seqs (while the batch syncs), so delivery
/// does not wait for the disk and the deliverer need not read the message back; and, once
/// synced, a word to each device's deliverer (it may need the store: see `Mailbox`), which
/// the writer calls even if this task is gone by then (its connection closed).
///
/// The mailboxes are looked up here, not on the writer's thread (which every message shares);
/// if a newer connection takes over meanwhile, the synced hook sends its deliverer to the
/// store.
#[allow(clippy::too_many_arguments)]
pub(crate) fn hooks(
    shared: &Shared,
    sender: &ActiveSession,
    to: &Username,
    id: MessageId,
    kind: &str,
    copies: &[Copy],
    sent_at: u64,
    expires_at: u64,
) -> AppendHooks {
    let mailboxes: Vec<(Inbox, Arc<Mailbox>, Vec<u8>)> = copies
        .iter()
        .filter_map(|c| {
            let inbox = Inbox::new(&c.recipient, c.device);
            let mailbox = shared.router.mailbox(&inbox)?;
            Some((inbox, mailbox, c.body.clone()))
        })
        .collect();
    let copied: Vec<Inbox> = mailboxes.iter().map(|(i, _, _)| i.clone()).collect();
    // Held only if every copy can be acknowledged soon (see `AppendHooks::hold`).
    let hold = copied.len() == copies.len();
    let ordered: Option<PlacedHook> = (!mailboxes.is_empty()).then(|| {
        let (from, from_device, kind, to) = (
            sender.username.clone(),
            sender.device,
            kind.to_owned(),
            to.clone(),
        );
        Box::new(move |placed: &[Placed]| {
            for (inbox, mailbox, body) in mailboxes {
                let Some(p) = placed
                    .iter()
                    .find(|p| p.recipient == inbox.user && p.device == inbox.device)
                else {
                    continue;
                };
                mailbox.copy(StoredMessage {
                    seq: p.seq,
                    id,
                    from: from.clone(),
                    from_device,
                    // A copy for one of the sender's own devices names its recipient.
                    to: (inbox.user == from).then(|| to.clone()),
                    kind: kind.clone(),
                    sent_at,
                    expires_at,
                    body,
                });
            }
        }) as PlacedHook
    });
    let router = Arc::clone(&shared.router);
    let synced: PlacedHook = Box::new(move |placed: &[Placed]| {
        for p in placed {
            let inbox = Inbox::new(&p.recipient, p.device);
            let was_copied = copied.contains(&inbox);
            router.stored(&inbox, p.seq, was_copied);
        }
    });
    AppendHooks {
        hold,
        ordered,
        synced: Some(synced),
    }
}

/// `stale_devices`, with the current lists (read afresh).
async fn stale(shared: &Shared, id: MessageId, sender: &ActiveSession, to: &Username) -> Reply {
    let accounts = &shared.accounts;
    match tokio::try_join!(
        accounts.device_list(to),
        accounts.device_list(&sender.username)
    ) {
        Ok((theirs, ours)) => stale_reply(id, sender, to, &theirs, &ours),
        Err(e) => {
            warn!(error = %e, "cannot read device lists");
            failed(Some(id), ErrorCode::Internal, "send it again")
        }
    }
}

/// `stale_devices` for a message to `to` from `sender`, given both accounts' lists.
fn stale_reply(
    id: MessageId,
    sender: &ActiveSession,
    to: &Username,
    theirs: &[DeviceId],
    ours: &[DeviceId],
) -> Reply {
    let (devices, own_devices) = expected_devices(sender, to, theirs, ours);
    Reply::SendFailed {
        message_id: Some(id),
        code: ErrorCode::StaleDevices,
        message: format!("{to}'s devices or yours changed; seal for the current ones"),
        devices: Some(devices),
        own_devices: Some(own_devices),
        epoch: None,
    }
}

/// The copies a message from `sender` to `to` must carry: every device of `to` (none when it is
/// a note to oneself) and every other device of the sender.
fn expected_devices(
    sender: &ActiveSession,
    to: &Username,
    theirs: &[DeviceId],
    ours: &[DeviceId],
) -> (Vec<DeviceId>, Vec<DeviceId>) {
    let devices = if *to == sender.username {
        Vec::new()
    } else {
        theirs.to_vec()
    };
    let own = ours
        .iter()
        .copied()
        .filter(|d| *d != sender.device)
        .collect();
    (devices, own)
}

/// Whether `listed` holds exactly `expected` (both without repeats; `expected` ascending).
fn same_devices(listed: &[DeviceId], expected: &[DeviceId]) -> bool {
    let mut sorted = listed.to_vec();
    sorted.sort_unstable();
    sorted == expected
}

/// Why a message over the sender's share was refused, with the limits.
pub(crate) fn sender_quota_message(recipient: &Username, share: SenderShare) -> String {
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

pub(crate) fn store_failure(id: MessageId, e: &crate::store::StoreError) -> Reply {
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

/// Checks a send header from `device`'s connection and gives its copies: each at most
/// `max_body` bytes, at most [`MAX_COPIES`], no device twice, not the sending device.
fn check_header(
    header: &SendHeader,
    device: DeviceId,
    max_body: u64,
) -> Result<Copies, (ErrorCode, String)> {
    let copies = header.copies();
    if let Some(largest) = copies
        .lengths
        .iter()
        .copied()
        .filter(|l| *l > max_body)
        .max()
    {
        return Err((
            ErrorCode::MessageTooLarge,
            format!("a copy of {largest} bytes exceeds the limit of {max_body}"),
        ));
    }
    if header.kind.is_empty() || header.kind.len() > MAX_KIND_LEN {
        return Err((
            ErrorCode::BadRequest,
            format!("`kind` has 1 to {MAX_KIND_LEN} bytes"),
        ));
    }
    if copies.lengths.len() > MAX_COPIES {
        return Err((
            ErrorCode::BadRequest,
            format!("a message has at most {MAX_COPIES} copies"),
        ));
    }
    let twice = |list: &[DeviceId]| {
        let mut sorted = list.to_vec();
        sorted.sort_unstable();
        sorted.windows(2).any(|w| w[0] == w[1])
    };
    if twice(&copies.devices) || twice(&copies.own_devices) || copies.own_devices.contains(&device)
    {
        return Err((
            ErrorCode::BadRequest,
            "a device is listed twice, or the sending device among its own copies".into(),
        ));
    }
    Ok(copies)
}
