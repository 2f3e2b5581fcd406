//! Message streams on the client side: sending one message per unidirectional stream, and
//! receiving the server's deliveries, released to the application in the server's order.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use quinn::{Connection, RecvStream};
use tokio::sync::mpsc;

use super::ClientError;
use crate::protocol::{
    DeliverHeader, MAX_STREAM_HEADER, MessageId, SendHeader, StreamHeader, decode_body, read_frame,
};

/// Largest delivered body this client accepts (the server's default limit is 64 KiB).
pub const MAX_DELIVERED_BODY: u64 = 16 * 1024 * 1024;
/// Deliveries held back waiting for an earlier one before order is given up on.
const MAX_HELD: usize = 4096;

/// A message the server delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The server's sequence number: acknowledge it with [`super::Client::ack`].
    pub seq: u64,
    /// The sender's message id (drop duplicates by it).
    pub id: MessageId,
    /// The sender.
    pub from: String,
    /// When the server stored it, seconds since the Unix epoch.
    pub sent_at: u64,
    /// The sender's `kind`.
    pub kind: String,
    /// The body as the sender sealed it.
    pub body: Vec<u8>,
}

/// Why a message stream could not be written.
pub(super) enum StreamFailure {
    /// The server stopped reading it: it refused the message and says why on the control stream.
    Refused,
    /// The connection failed.
    Lost(ClientError),
}

/// Writes one message stream: header, body, FIN.
pub(super) async fn send_stream(
    conn: &Connection,
    to: &str,
    kind: &str,
    id: MessageId,
    body: &[u8],
) -> Result<(), StreamFailure> {
    match write_stream(conn, to, kind, id, body).await {
        Ok(()) => Ok(()),
        Err(WriteFailure::Stopped) => Err(StreamFailure::Refused),
        Err(WriteFailure::Other(e)) => Err(StreamFailure::Lost(ClientError::ConnectionLost(e))),
    }
}

enum WriteFailure {
    Stopped,
    Other(String),
}

impl From<quinn::WriteError> for WriteFailure {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(_) => Self::Stopped,
            other => Self::Other(other.to_string()),
        }
    }
}

async fn write_stream(
    conn: &Connection,
    to: &str,
    kind: &str,
    id: MessageId,
    body: &[u8],
) -> Result<(), WriteFailure> {
    let lost = |e: &dyn std::fmt::Display| WriteFailure::Other(e.to_string());
    let mut stream = conn.open_uni().await.map_err(|e| lost(&e))?;
    let header = StreamHeader::Send(SendHeader {
        id,
        to: to.to_owned(),
        kind: kind.to_owned(),
        length: body.len() as u64,
    });
    let frame = crate::protocol::encode_frame(&header, MAX_STREAM_HEADER).map_err(|e| lost(&e))?;
    stream.write_all(&frame).await?;
    stream.write_all(body).await?;
    stream.finish().map_err(|e| lost(&e))
}

async fn read_delivery(mut stream: RecvStream) -> Result<(u64, Delivered), String> {
    let mut buf = Vec::new();
    if !read_frame(&mut stream, MAX_STREAM_HEADER, &mut buf)
        .await
        .map_err(|e| e.to_string())?
    {
        return Err("empty stream".into());
    }
    let header = decode_body(&buf).map_err(|e| e.to_string())?;
    let StreamHeader::Deliver(DeliverHeader {
        seq,
        prev,
        id,
        from,
        sent_at,
        kind,
        length,
    }) = header
    else {
        return Err("not a deliver header".into());
    };
    if length > MAX_DELIVERED_BODY {
        return Err(format!("body of {length} bytes is too large"));
    }
    let mut body = vec![0u8; usize::try_from(length).map_err(|e| e.to_string())?];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    // Read up to the FIN: dropping a stream before its end would ask the server to stop
    // sending (STOP_SENDING), which it would have to tell from a real failure.
    stream
        .read_to_end(0)
        .await
        .map_err(|e| format!("after the body: {e}"))?;
    Ok((
        prev,
        Delivered {
            seq,
            id,
            from,
            sent_at,
            kind,
            body,
        },
    ))
}

/// Accepts delivery streams and releases them in the chain order the server gave (`prev`).
/// One task reads all of them (the server's stream limit bounds how many are open at once):
/// no task and no channel hop per message.
pub(super) async fn receive_deliveries(conn: Connection, out: mpsc::Sender<Delivered>) {
    let mut reading = FuturesUnordered::new();
    let mut accepting = true;
    let mut released = 0u64;
    let mut held: BTreeMap<u64, Delivered> = BTreeMap::new();
    loop {
        let read = tokio::select! {
            accepted = conn.accept_uni(), if accepting => {
                match accepted {
                    Ok(stream) => reading.push(read_delivery(stream)),
                    Err(_) => accepting = false,
                }
                continue;
            }
            Some(read) = reading.next() => read,
            else => return,
        };
        let (prev, delivery) = match read {
            Ok(arrived) => arrived,
            Err(why) => {
                tracing::warn!(%why, "dropping an unreadable delivery stream");
                continue;
            }
        };
        held.insert(prev, delivery);
        loop {
            let next = match held.remove(&released) {
                Some(next) => next,
                // Too much waiting on a missing link (it failed to arrive): give up on the
                // order rather than on the messages.
                None if held.len() > MAX_HELD => match held.pop_first() {
                    Some((_, next)) => next,
                    None => break,
                },
                None => break,
            };
            released = next.seq;
            if out.send(next).await.is_err() {
                return;
            }
        }
    }
}
