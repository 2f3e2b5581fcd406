//! Message streams on the client side: sending one message per unidirectional stream, and
//! receiving the server's streams: deliveries, released to the application in the server's
//! order, and `blob` streams, handed to the download that asked for each (`blobs`).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use quinn::{Connection, ReadToEndError, RecvStream, VarInt};
use tokio::sync::mpsc;

use super::ClientError;
use super::blobs::BlobWaiters;
use crate::protocol::{
    Copies, DeliverHeader, DeviceId, MAX_STREAM_HEADER, MessageId, SendHeader, StreamHeader,
    decode_body, read_frame,
};

/// Largest delivered body this client accepts: the largest end-to-end envelope (part II, E7),
/// which is what every body is. A longer one could not be opened anyway, so its stream is
/// refused from its header, before a byte of the body is read or buffered.
pub const MAX_DELIVERED_BODY: u64 = crate::e2e::MAX_ENVELOPE_LEN as u64;
/// Largest delivered body of group traffic (a deliver header with `group`): the largest
/// `max_group_message_bytes` a server may be configured with (docs/PROTOCOL.md 5.7, 8).
pub const MAX_GROUP_DELIVERED_BODY: u64 = 16 << 20;
/// Deliveries held back waiting for an earlier one before order is given up on.
const MAX_HELD: usize = 4096;
/// Bytes of bodies held back before order is given up on: 273 bodies of the largest size,
/// many more of a chat's. With the streams being read (at most the transport's
/// `MAX_SERVER_UNI_STREAMS`, 512, each buffering at most [`MAX_DELIVERED_BODY`]: 30 MiB), this
/// bounds what a server can make the receiver hold.
const MAX_HELD_BYTES: usize = 16 << 20;
/// STOP_SENDING code of a delivery stream this client refuses.
const DELIVERY_REFUSED: u32 = 1;

/// A message the server delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The server's sequence number: acknowledge it with [`super::Client::ack`].
    pub seq: u64,
    /// The sender's message id (drop duplicates by it).
    pub id: MessageId,
    /// The sender.
    pub from: String,
    /// The sender's device (the session with it opens the body).
    pub from_device: DeviceId,
    /// On a copy of a message this account sent from another device: its recipient.
    pub to: Option<String>,
    /// When the server stored it, seconds since the Unix epoch.
    pub sent_at: u64,
    /// The sender's `kind`.
    pub kind: String,
    /// The body as the sender sealed it (empty when `refused`).
    pub body: Vec<u8>,
    /// On group traffic: the group's name (the body is an MLS message, `kind` `mls`, or a
    /// leave notice, `kind` `group_left`).
    pub group: Option<String>,
    /// Set when this client refused the body for good (larger than the protocol allows, or
    /// bytes after it): a message that can never be read, to be acknowledged and reported
    /// rather than delivered again on every connection.
    pub refused: Option<String>,
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
    copies: Option<Copies>,
    body: &[u8],
) -> Result<(), StreamFailure> {
    let header = SendHeader {
        id,
        to: to.to_owned(),
        kind: kind.to_owned(),
        length: body.len() as u64,
        copies,
        group: None,
        welcome: None,
    };
    write_outcome(write_stream(conn, header, body).await)
}

/// Writes one group message stream (docs/PROTOCOL.md 5.7): an MLS message, or a commit with
/// its welcome (`welcome` bytes at the end of the body).
pub(super) async fn send_group_stream(
    conn: &Connection,
    group: &str,
    kind: &str,
    id: MessageId,
    body: &[u8],
    welcome: Option<u64>,
) -> Result<(), StreamFailure> {
    let header = SendHeader {
        id,
        to: String::new(),
        kind: kind.to_owned(),
        length: body.len() as u64,
        copies: None,
        group: Some(group.to_owned()),
        welcome,
    };
    write_outcome(write_stream(conn, header, body).await)
}

fn write_outcome(written: Result<(), WriteFailure>) -> Result<(), StreamFailure> {
    match written {
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
    header: SendHeader,
    body: &[u8],
) -> Result<(), WriteFailure> {
    let lost = |e: &dyn std::fmt::Display| WriteFailure::Other(e.to_string());
    let mut stream = conn.open_uni().await.map_err(|e| lost(&e))?;
    let header = StreamHeader::Send(header);
    let frame = crate::protocol::encode_frame(&header, MAX_STREAM_HEADER).map_err(|e| lost(&e))?;
    stream.write_all(&frame).await?;
    stream.write_all(body).await?;
    stream.finish().map_err(|e| lost(&e))
}

/// A delivery stream that gave no message.
#[derive(Debug)]
struct Unreadable {
    /// `(prev, seq)` from its header, when the header was read: the place of the missing
    /// message in the server's chain, so later ones are not held back for it.
    link: Option<(u64, u64)>,
    /// Why, for the log.
    why: String,
    /// The message as its header announced it, when its body is refused for good (not when
    /// the stream merely broke off, which a later connection repairs).
    refused: Option<Delivered>,
}

impl Unreadable {
    fn new(why: impl Into<String>) -> Self {
        Self {
            link: None,
            why: why.into(),
            refused: None,
        }
    }
}

/// What a server stream turned out to be.
enum Arrival {
    /// A delivered message, after the one whose `seq` is the first value (`prev`).
    Delivery(u64, Delivered),
    /// A `blob` stream, handed to the download waiting for it (or stopped).
    Blob,
}

/// Reads a server stream's header and dispatches on its type: a delivery is read here, a
/// `blob` stream goes to the download that asked for it, anything else is refused.
async fn read_server_stream(
    mut stream: RecvStream,
    blobs: BlobWaiters,
) -> Result<Arrival, Unreadable> {
    match read_header(&mut stream).await? {
        StreamHeader::Deliver(header) => read_body(stream, header)
            .await
            .map(|(prev, delivered)| Arrival::Delivery(prev, delivered)),
        StreamHeader::Blob(header) => {
            blobs.blob_stream(header, stream);
            Ok(Arrival::Blob)
        }
        StreamHeader::Send(_) | StreamHeader::Upload(_) => {
            let _ = stream.stop(VarInt::from_u32(DELIVERY_REFUSED));
            Err(Unreadable::new("a client stream type from the server"))
        }
    }
}

async fn read_header(stream: &mut RecvStream) -> Result<StreamHeader, Unreadable> {
    let mut buf = Vec::new();
    if !read_frame(stream, MAX_STREAM_HEADER, &mut buf)
        .await
        .map_err(|e| Unreadable::new(e.to_string()))?
    {
        return Err(Unreadable::new("empty stream"));
    }
    decode_body(&buf).map_err(|e| Unreadable::new(e.to_string()))
}

#[cfg(test)]
async fn read_delivery(mut stream: RecvStream) -> Result<(u64, Delivered), Unreadable> {
    match read_header(&mut stream).await? {
        StreamHeader::Deliver(header) => read_body(stream, header).await,
        _ => Err(Unreadable::new("not a deliver header")),
    }
}

async fn read_body(
    mut stream: RecvStream,
    header: DeliverHeader,
) -> Result<(u64, Delivered), Unreadable> {
    let DeliverHeader {
        seq,
        prev,
        id,
        from,
        from_device,
        to,
        sent_at,
        kind,
        length,
        group,
    } = header;
    let failed = |why: String| Unreadable {
        link: Some((prev, seq)),
        why,
        refused: None,
    };
    let refused = |why: String| Unreadable {
        link: Some((prev, seq)),
        why: why.clone(),
        refused: Some(Delivered {
            seq,
            id,
            from: from.clone(),
            from_device,
            to: to.clone(),
            sent_at,
            kind: kind.clone(),
            body: Vec::new(),
            group: group.clone(),
            refused: Some(why),
        }),
    };
    let limit = if group.is_some() {
        MAX_GROUP_DELIVERED_BODY
    } else {
        MAX_DELIVERED_BODY
    };
    if length > limit {
        let _ = stream.stop(VarInt::from_u32(DELIVERY_REFUSED));
        return Err(refused(format!(
            "a body of {length} bytes exceeds the limit of {limit}"
        )));
    }
    // Buffered as it arrives (never more than `length`), up to the FIN: reading to the end
    // also spares the server a STOP_SENDING it would have to tell from a real failure.
    let length = usize::try_from(length).map_err(|e| failed(e.to_string()))?;
    let body = match stream.read_to_end(length).await {
        Ok(body) if body.len() == length => body,
        Ok(body) => {
            return Err(failed(format!(
                "the stream ended after {} of {length} body bytes",
                body.len()
            )));
        }
        Err(ReadToEndError::TooLong) => {
            let _ = stream.stop(VarInt::from_u32(DELIVERY_REFUSED));
            return Err(refused("bytes after the announced body".into()));
        }
        Err(ReadToEndError::Read(e)) => return Err(failed(e.to_string())),
    };
    Ok((
        prev,
        Delivered {
            seq,
            id,
            from,
            from_device,
            to,
            sent_at,
            kind,
            body,
            group,
            refused: None,
        },
    ))
}

/// A place in the server's delivery chain.
enum Link {
    /// A message, waiting for the one before it.
    Message(Delivered),
    /// A message whose stream was unreadable: passed over, so the chain goes on after it.
    Skipped {
        /// Its `seq`.
        seq: u64,
    },
}

impl Link {
    fn seq(&self) -> u64 {
        match self {
            Self::Message(m) => m.seq,
            Self::Skipped { seq } => *seq,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Message(m) => m.body.len(),
            Self::Skipped { .. } => 0,
        }
    }
}

/// Puts deliveries back into the order of the server's chain (each names the `seq` pushed
/// before it as `prev`), holding early ones within [`MAX_HELD`] and [`MAX_HELD_BYTES`]; past
/// either, it gives up the order rather than the messages.
#[derive(Default)]
struct Reorder {
    /// The highest `seq` passed (released or skipped).
    passed: u64,
    /// Early arrivals by their `prev`.
    held: BTreeMap<u64, Link>,
    held_bytes: usize,
    /// Messages released, in order, for the caller to take.
    ready: VecDeque<Delivered>,
}

impl Reorder {
    fn arrive(&mut self, prev: u64, link: Link) {
        // Its predecessor was passed: it is next, or a straggler after order was given up.
        if prev <= self.passed {
            self.pass(link);
        } else {
            match self.held.entry(prev) {
                Entry::Vacant(place) => {
                    self.held_bytes += link.bytes();
                    place.insert(link);
                }
                // Two streams after the same `prev`: the server failed to push the first and
                // chained the next one where it was. The message wins over a skipped link.
                Entry::Occupied(mut place) => match (place.get(), link) {
                    (Link::Skipped { .. }, link @ Link::Message(_)) => {
                        self.held_bytes += link.bytes();
                        place.insert(link);
                    }
                    (_, Link::Skipped { .. }) => {}
                    (Link::Message(_), link @ Link::Message(_)) => self.pass(link),
                },
            }
        }
        while self.held.len() > MAX_HELD || self.held_bytes > MAX_HELD_BYTES {
            let Some((_, link)) = self.held.pop_first() else {
                break;
            };
            self.held_bytes -= link.bytes();
            self.pass(link);
        }
    }

    /// Releases `link` and the held ones that follow it.
    fn pass(&mut self, link: Link) {
        let mut next = Some(link);
        while let Some(link) = next {
            let seq = link.seq();
            self.passed = self.passed.max(seq);
            if let Link::Message(message) = link {
                self.ready.push_back(message);
            }
            next = self.held.remove(&seq);
            if let Some(link) = &next {
                self.held_bytes -= link.bytes();
            }
        }
    }
}

/// Accepts delivery streams and releases them in the chain order the server gave (`prev`).
/// One task reads all of them (the client's stream limit, `MAX_SERVER_UNI_STREAMS`, bounds how
/// many are open at once, and each buffers at most [`MAX_DELIVERED_BODY`]): no task and no
/// channel hop per message.
pub(super) async fn receive_deliveries(
    conn: Connection,
    out: mpsc::Sender<Delivered>,
    blobs: BlobWaiters,
) {
    let mut reading = FuturesUnordered::new();
    let mut accepting = true;
    let mut order = Reorder::default();
    loop {
        let read = tokio::select! {
            accepted = conn.accept_uni(), if accepting => {
                match accepted {
                    Ok(stream) => reading.push(read_server_stream(stream, blobs.clone())),
                    Err(_) => accepting = false,
                }
                continue;
            }
            Some(read) = reading.next() => read,
            else => return,
        };
        match read {
            Ok(Arrival::Delivery(prev, delivery)) => order.arrive(prev, Link::Message(delivery)),
            Ok(Arrival::Blob) => {}
            Err(Unreadable { link, why, refused }) => {
                tracing::warn!(%why, "an unreadable delivery stream");
                match (link, refused) {
                    (Some((prev, _)), Some(refused)) => order.arrive(prev, Link::Message(refused)),
                    (Some((prev, seq)), None) => order.arrive(prev, Link::Skipped { seq }),
                    (None, _) => {}
                }
            }
        }
        while let Some(next) = order.ready.pop_front() {
            if out.send(next).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::encode_frame;
    use crate::{tls, transport};

    fn message(seq: u64, body_len: usize) -> Delivered {
        Delivered {
            seq,
            id: MessageId([seq as u8; 16]),
            from: "alice".into(),
            from_device: 1,
            to: None,
            sent_at: 1,
            kind: "text".into(),
            body: vec![0; body_len],
            group: None,
            refused: None,
        }
    }

    fn drain(order: &mut Reorder) -> Vec<u64> {
        order.ready.drain(..).map(|m| m.seq).collect()
    }

    #[test]
    fn reorder_follows_the_chain_and_passes_over_skipped_links() {
        let mut order = Reorder::default();
        order.arrive(3, Link::Message(message(5, 1)));
        order.arrive(1, Link::Message(message(3, 1)));
        assert!(drain(&mut order).is_empty());
        order.arrive(0, Link::Message(message(1, 1)));
        assert_eq!(drain(&mut order), [1, 3, 5]);
        // Seq 7 was unreadable: 9, chained after it, does not wait for it.
        order.arrive(7, Link::Message(message(9, 1)));
        order.arrive(5, Link::Skipped { seq: 7 });
        assert_eq!(drain(&mut order), [9]);
        // The server could not push 11 and chained 13 after 9: the skipped link is superseded.
        order.arrive(9, Link::Skipped { seq: 11 });
        assert_eq!(drain(&mut order), Vec::<u64>::new());
        order.arrive(9, Link::Message(message(13, 1)));
        assert_eq!(drain(&mut order), [13]);
        assert!(order.held.is_empty());
    }

    #[test]
    fn reorder_holds_bounded_bytes_then_gives_up_the_order() {
        let mut order = Reorder::default();
        let big = MAX_DELIVERED_BODY as usize;
        let fits = MAX_HELD_BYTES / big;
        // Seq 1 never arrives; 2, 3, … wait for it until the bytes held pass the bound.
        for seq in 2..2 + fits as u64 {
            order.arrive(seq - 1, Link::Message(message(seq, big)));
        }
        assert!(order.ready.is_empty());
        assert_eq!(order.held_bytes, fits * big);
        let last = 2 + fits as u64;
        order.arrive(last - 1, Link::Message(message(last, big)));
        assert_eq!(drain(&mut order), (2..=last).collect::<Vec<_>>());
        assert_eq!((order.held.len(), order.held_bytes), (0, 0));
        // The straggler still comes, at once.
        order.arrive(0, Link::Message(message(1, 1)));
        assert_eq!(drain(&mut order), [1]);
    }

    /// A QUIC server and a client connected to it that allows delivery streams, on 127.0.0.1.
    async fn connected() -> (quinn::Endpoint, Connection, quinn::Endpoint, Connection) {
        let dev = tls::DevCertificates::generate(&[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        dev.write_to(dir.path()).unwrap();
        let identity = tls::ServerIdentity::from_dev(&dev).unwrap();
        let server = transport::server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            tls::server_crypto(identity).unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let anchors = tls::load_trust_anchors(&dir.path().join("ca.crt")).unwrap();
        let client =
            transport::client_endpoint(addr, tls::client_crypto(anchors, false).unwrap()).unwrap();
        let connecting = client.connect(addr, "localhost").unwrap();
        let accepting = async { server.accept().await.unwrap().await };
        let (client_conn, server_conn) = tokio::join!(connecting, accepting);
        let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());
        client_conn
            .set_max_concurrent_uni_streams(VarInt::from_u32(transport::MAX_SERVER_UNI_STREAMS));
        (server, server_conn, client, client_conn)
    }

    fn deliver_header(seq: u64, prev: u64, length: u64) -> Vec<u8> {
        let header = StreamHeader::Deliver(DeliverHeader {
            seq,
            prev,
            id: MessageId([seq as u8; 16]),
            from: "alice".into(),
            from_device: 1,
            to: None,
            sent_at: 1,
            kind: "text".into(),
            length,
            group: None,
        });
        encode_frame(&header, MAX_STREAM_HEADER).unwrap()
    }

    #[tokio::test]
    async fn an_oversize_delivery_is_refused_from_its_header() {
        let (_server, server_conn, _client, client_conn) = connected().await;
        for length in [MAX_DELIVERED_BODY + 1, 16 << 20, u64::MAX] {
            let mut stream = server_conn.open_uni().await.unwrap();
            stream
                .write_all(&deliver_header(7, 0, length))
                .await
                .unwrap();
            let accepted = client_conn.accept_uni().await.unwrap();
            let reading = tokio::spawn(read_delivery(accepted));
            // The client stops the stream before a byte of the body was sent.
            let stopped = tokio::time::timeout(Duration::from_secs(5), stream.stopped()).await;
            assert_eq!(
                stopped.unwrap().unwrap(),
                Some(VarInt::from_u32(DELIVERY_REFUSED))
            );
            let refused = reading.await.unwrap().unwrap_err();
            assert_eq!(refused.link, Some((0, 7)), "{refused:?}");
            assert!(refused.why.contains("exceeds the limit"), "{refused:?}");
        }
        // The largest allowed body is read.
        let mut stream = server_conn.open_uni().await.unwrap();
        stream
            .write_all(&deliver_header(8, 0, MAX_DELIVERED_BODY))
            .await
            .unwrap();
        stream
            .write_all(&vec![5; MAX_DELIVERED_BODY as usize])
            .await
            .unwrap();
        stream.finish().unwrap();
        let accepted = client_conn.accept_uni().await.unwrap();
        let (prev, delivered) = read_delivery(accepted).await.unwrap();
        assert_eq!((prev, delivered.seq, delivered.body.len()), (0, 8, 61_440));
    }

    #[tokio::test]
    async fn a_short_or_long_body_is_refused() {
        let (_server, server_conn, _client, client_conn) = connected().await;
        for (sent, fin) in [(10usize, true), (101, false)] {
            let mut stream = server_conn.open_uni().await.unwrap();
            stream.write_all(&deliver_header(4, 2, 100)).await.unwrap();
            stream.write_all(&vec![1; sent]).await.unwrap();
            if fin {
                stream.finish().unwrap();
            }
            let accepted = client_conn.accept_uni().await.unwrap();
            let refused = read_delivery(accepted).await.unwrap_err();
            assert_eq!(refused.link, Some((2, 4)), "{refused:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_delivery_does_not_hold_back_the_ones_after_it() {
        let (_server, server_conn, _client, client_conn) = connected().await;
        let (tx, mut rx) = mpsc::channel(16);
        let receiving = tokio::spawn(receive_deliveries(
            client_conn.clone(),
            tx,
            BlobWaiters::default(),
        ));
        for (seq, prev, length) in [(1, 0, 3), (2, 1, 20 << 20), (3, 2, 3)] {
            let mut stream = server_conn.open_uni().await.unwrap();
            stream
                .write_all(&deliver_header(seq, prev, length))
                .await
                .unwrap();
            if length == 3 {
                stream.write_all(b"abc").await.unwrap();
                stream.finish().unwrap();
            }
        }
        // The refused one comes out in its place, marked, for the application to acknowledge
        // (it would otherwise come back on every connection).
        for (seq, refused) in [(1, false), (2, true), (3, false)] {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            let got = got.unwrap().unwrap();
            assert_eq!((got.seq, got.refused.is_some()), (seq, refused), "{got:?}");
            assert!(got.refused.is_none() || got.body.is_empty());
        }
        receiving.abort();
    }
}
