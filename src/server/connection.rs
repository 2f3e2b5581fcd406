//! One client connection: the handshake, the control stream's read loop, the writer task that
//! owns the control stream's send side (replies and pushed events share it, in order), and
//! the message streams. Request handling itself lives in `requests`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info_span, warn};

use super::messaging::{SessionCell, accept_message_streams};
use super::requests::Control;
use super::{ConnectionSlot, Shared};
use crate::protocol::{
    CloseCode, ErrorCode, FrameError, MAX_CONTROL_FRAME, Reply, ServerFrame, encode_frame_into,
    read_frame,
};

/// How long we wait for a peer to read our last frames before closing on it.
const LINGER: Duration = Duration::from_secs(1);
/// Replies and events that may wait for the control stream's writer. Past this the reader
/// (or the message streams) wait: a peer that stops reading its control stream holds at most
/// this many frames of each kind in the server (≈ 0.3–0.5 KB each: replies are small), not
/// as many as it can ask for. An honest client has at most a few dozen in flight (its
/// requests, plus one `sent` per concurrent message stream, 32).
const CONTROL_QUEUE: usize = 256;

/// What the control stream's writer task is asked to do. Frames are boxed: a channel allocates
/// its slots in blocks of 32 up front, and 32 unboxed frames (320 bytes each) in each of a
/// connection's two channels were about 20 KB of every idle connection.
pub(crate) enum Outgoing {
    /// Write this frame.
    Frame(Box<ServerFrame>),
    /// Finish the stream, give the peer a moment to read it, then report back.
    Finish(oneshot::Sender<()>),
}

/// Serves one incoming connection until it ends or the server shuts down.
/// `handshake` counts this connection among the handshakes in flight until it is established.
pub(crate) async fn serve(
    incoming: Box<Incoming>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    handshake: ConnectionSlot,
) {
    let span =
        info_span!("conn", remote = %incoming.remote_address(), user = tracing::field::Empty);
    async move {
        let accepted = accept(incoming, &shared, &shutdown).await;
        drop(handshake);
        super::metrics::handshake(matches!(accepted, Ok(Some(_))));
        match accepted {
            Ok(Some((conn, send, recv))) => run(conn, send, recv, shared, &shutdown).await,
            Ok(None) => {}
            Err(reason) => debug!(%reason, "connection not established"),
        }
    }
    .instrument(span)
    .await
}

type Established = (Connection, SendStream, RecvStream);

async fn accept(
    incoming: Box<Incoming>,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<Option<Established>, String> {
    let connecting = (*incoming).accept().map_err(|e| e.to_string())?;
    let conn = match tokio::time::timeout(shared.handshake_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(format!("handshake failed: {e}")),
        Err(_) => return Err("handshake timed out".into()),
    };
    debug!("handshake complete");
    let stream = tokio::select! {
        () = shutdown.cancelled() => {
            close(&conn, CloseCode::Shutdown, "server shutting down");
            return Ok(None);
        }
        stream = tokio::time::timeout(shared.handshake_timeout, conn.accept_bi()) => stream,
    };
    match stream {
        Ok(Ok((send, recv))) => Ok(Some((conn, send, recv))),
        Ok(Err(e)) => Err(format!("connection lost before control stream: {e}")),
        Err(_) => {
            close(
                &conn,
                CloseCode::ProtocolViolation,
                "no control stream opened",
            );
            Err("no control stream opened in time".into())
        }
    }
}

pub(crate) fn close(conn: &Connection, code: CloseCode, reason: &str) {
    conn.close(VarInt::from_u32(code.code()), reason.as_bytes());
}

/// Most bytes of frames gathered into one write of the control stream.
const COALESCE_BYTES: usize = 32 * 1024;
/// A write buffer larger than this is freed once the queues are empty.
const IDLE_BUFFER_BYTES: usize = 16 * 1024;

/// Owns the control stream's send side: writes replies (from `queue`) and pushed events (from
/// `events`) in the order they are taken. Whatever is already waiting when it wakes goes out
/// in one write, so a burst of `sent` events costs one stream write instead of one each.
async fn write_frames(
    mut send: SendStream,
    mut queue: mpsc::Receiver<Outgoing>,
    mut events: mpsc::Receiver<Box<ServerFrame>>,
) {
    // Grown on demand, and given back after a burst: an idle connection holds none of it.
    let mut buf = Vec::new();
    let mut events_open = true;
    loop {
        let first = tokio::select! {
            biased;
            outgoing = queue.recv() => outgoing,
            event = events.recv(), if events_open => match event {
                Some(frame) => Some(Outgoing::Frame(frame)),
                None => {
                    events_open = false;
                    continue;
                }
            },
        };
        let Some(mut next) = first else { return };
        buf.clear();
        let finish = loop {
            match next {
                Outgoing::Frame(frame) => {
                    if let Err(e) = encode_frame_into(&mut buf, &frame, MAX_CONTROL_FRAME) {
                        warn!(error = %e, "cannot encode a control frame; dropped");
                    }
                }
                Outgoing::Finish(done) => break Some(done),
            }
            if buf.len() >= COALESCE_BYTES {
                break None;
            }
            next = match queue.try_recv() {
                Ok(outgoing) => outgoing,
                Err(_) => match events.try_recv() {
                    Ok(frame) => Outgoing::Frame(frame),
                    Err(_) => break None,
                },
            };
        };
        if !buf.is_empty()
            && let Err(e) = send.write_all(&buf).await
        {
            debug!(error = %e, "cannot write to the control stream; connection gone");
            return;
        }
        if buf.capacity() > IDLE_BUFFER_BYTES && queue.is_empty() && events.is_empty() {
            buf = Vec::new();
        }
        if let Some(done) = finish {
            if send.finish().is_ok() {
                let _ = tokio::time::timeout(LINGER, send.stopped()).await;
            }
            let _ = done.send(());
            return;
        }
    }
}

async fn run(
    conn: Connection,
    send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    shutdown: &CancellationToken,
) {
    let (queue, queue_rx) = mpsc::channel(CONTROL_QUEUE);
    let (events, events_rx) = mpsc::channel(CONTROL_QUEUE);
    let writer = tokio::spawn(write_frames(send, queue_rx, events_rx));
    let session: SessionCell = Arc::new(Mutex::new(None));
    let streams = tokio::spawn(
        accept_message_streams(
            conn.clone(),
            Arc::clone(&shared),
            session.clone(),
            events.clone(),
        )
        .instrument(Span::current()),
    );
    let login_timeout = shared.login_timeout;
    let signed_in = Arc::clone(&session);
    let mut control = Control::new(conn.clone(), shared, session, events, Span::current());

    let mut buf = Vec::new();
    // A peer that opens the stream but never completes `hello` would otherwise hold its slot
    // until the idle timeout (forever, with keep-alives).
    let hello_deadline = tokio::time::Instant::now() + control.handshake_timeout();
    // Likewise a peer that says `hello` and never authenticates (or logs out and stays):
    // it must log in within `login_timeout` or give its slot back. A login under way when
    // the deadline passes is finished first (requests are handled inline), so a slow password
    // check under load does not cost an honest client its connection.
    let mut login_deadline: Option<tokio::time::Instant> = None;
    let ending = loop {
        let read = tokio::select! {
            () = shutdown.cancelled() => break Ending::Close(CloseCode::Shutdown, "server shutting down"),
            () = tokio::time::sleep_until(hello_deadline), if !control.said_hello() => {
                debug!("no hello in time");
                break Ending::Close(CloseCode::ProtocolViolation, "no hello in time");
            }
            () = tokio::time::sleep_until(login_deadline.unwrap_or(hello_deadline)), if login_deadline.is_some() => {
                debug!("not authenticated in time");
                break Ending::Close(CloseCode::LoginTimeout, "not authenticated in time");
            }
            read = read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf) => read,
        };
        match read {
            Ok(true) => {
                // Boxed: the request handlers' state exists only while one runs, not in every idle
                // connection's task.
                let reply = Box::pin(control.dispatch(&buf)).await;
                if let Some(reply) = reply
                    && queue.send(Outgoing::Frame(Box::new(reply))).await.is_err()
                {
                    break Ending::Gone;
                }
                let authenticated = signed_in.lock().is_ok_and(|s| s.is_some());
                if authenticated {
                    login_deadline = None;
                } else if control.said_hello() {
                    let now = tokio::time::Instant::now();
                    let mut deadline = *login_deadline.get_or_insert(now + login_timeout);
                    // A new device in the middle of a link has until the link lapses.
                    if let Some(linking) = control.linking_until()
                        && linking > deadline
                    {
                        deadline = linking;
                        login_deadline = Some(linking);
                    }
                    if deadline <= now {
                        debug!("not authenticated in time");
                        break Ending::Close(CloseCode::LoginTimeout, "not authenticated in time");
                    }
                }
            }
            Ok(false) => {
                debug!("client finished its control stream");
                break Ending::Finish(CloseCode::Normal, None);
            }
            Err(FrameError::TooLarge { len, max }) => {
                warn!(len, max, "oversize control frame");
                let message = format!("frame of {len} bytes exceeds the limit of {max}");
                break Ending::Finish(
                    CloseCode::ProtocolViolation,
                    Some(Box::new(Reply::Error {
                        code: ErrorCode::FrameTooLarge,
                        message,
                    })),
                );
            }
            Err(FrameError::Truncated) => {
                debug!("control stream ended inside a frame");
                let message = "stream ended inside a frame".to_owned();
                break Ending::Finish(
                    CloseCode::ProtocolViolation,
                    Some(Box::new(Reply::Error {
                        code: ErrorCode::TruncatedFrame,
                        message,
                    })),
                );
            }
            Err(e) => {
                debug!(error = %e, "control stream closed");
                break Ending::Gone;
            }
        }
    };
    control.end_session();
    match ending {
        Ending::Close(code, reason) => close(&conn, code, reason),
        Ending::Finish(code, last) => {
            if let Some(reply) = last {
                let reply = *reply;
                let _ = queue
                    .send(Outgoing::Frame(Box::new(ServerFrame { id: None, reply })))
                    .await;
            }
            let (done, flushed) = oneshot::channel();
            if queue.send(Outgoing::Finish(done)).await.is_ok() {
                let _ = tokio::time::timeout(LINGER * 2, flushed).await;
            }
            let reason = match code {
                CloseCode::Normal => "bye".to_owned(),
                _ => "protocol violation".to_owned(),
            };
            close(&conn, code, &reason);
        }
        Ending::Gone => {}
    }
    drop(control);
    drop(queue);
    streams.abort();
    let _ = writer.await;
}

enum Ending {
    /// Close at once with this code.
    Close(CloseCode, &'static str),
    /// Send the last frame (if any), finish the control stream, then close with this code.
    Finish(CloseCode, Option<Box<Reply>>),
    /// The connection is already gone.
    Gone,
}
