//! The client library: connect to a server (trusting a given CA), then signup, login, resume,
//! logout over the control stream, with typed errors. The `sfc` command is built on it.
//!
//! Requests may be issued concurrently from several tasks: each carries a fresh id, and a
//! reader task (`replies`) routes every reply to the request that is waiting for it. The
//! account requests are in `account`, the key requests in `bundles`, message streams in
//! `streams`, blob uploads and downloads in `blobs`; end-to-end messaging on top of it all in [`messenger`].

mod account;
mod blobs;
mod bundles;
pub mod chat;
mod copies;
mod error;
pub mod files;
pub mod groups;
pub mod home;
pub mod keystore;
pub mod link;
pub mod liveness;
pub mod messenger;
mod receiving;
pub mod render;
mod replies;
mod sessions;
mod streams;
mod trust;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use quinn::{Connection, Endpoint, SendStream, VarInt};
use tokio::sync::{Notify, mpsc, oneshot};

pub use self::account::SessionInfo;
pub use self::blobs::{BlobDownload, BlobUpload, UploadOutcome};
pub use self::bundles::{Bundle, DeviceBundles};
pub use self::error::ClientError;
pub use self::messenger::Messenger;
pub use self::receiving::{Connection as ConnectionEvent, RETRY};
pub use self::streams::{Delivered, MAX_DELIVERED_BODY};
pub use self::trust::is_offline;
use crate::protocol::{
    ClientFrame, CloseCode, ErrorCode, MAX_CONTROL_FRAME, MessageId, PROTOCOL_VERSION, Reply,
    Request, write_frame,
};
pub use crate::protocol::{Copies, DeviceBundle, DeviceId, DeviceInfo};
use crate::{tls, transport};

/// How to reach a server.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `HOST:PORT`; HOST is also the name the certificate must carry.
    pub server: String,
    /// PEM file of the CA certificate(s) to trust.
    pub ca_file: PathBuf,
    /// Name the server's certificate must carry, when it differs from HOST.
    pub server_name: Option<String>,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Give up on a request's reply after this long.
    pub request_timeout: Duration,
    /// One endpoint for every connection made with these options (see
    /// [`ClientOptions::share_endpoint`]); without it, each connection opens its own.
    shared: Option<SharedEndpoint>,
}

/// A UDP endpoint with its TLS configuration, set up once for many connections.
#[derive(Debug, Clone)]
struct SharedEndpoint {
    endpoint: Endpoint,
    addr: SocketAddr,
    server_name: String,
}

impl ClientOptions {
    /// Options with default timeouts (5 s to connect, 30 s per request).
    pub fn new(server: impl Into<String>, ca_file: impl Into<PathBuf>) -> Self {
        Self {
            server: server.into(),
            ca_file: ca_file.into(),
            server_name: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            shared: None,
        }
    }

    /// Loads the CA file, builds the TLS configuration and opens one UDP socket now, for
    /// every [`Client::connect`] made with the returned options (and their clones) to share,
    /// as an app making many connections should: otherwise each connection pays for all three
    /// (≈ 1 ms of CPU here, most of a client's handshake cost). With `resumption`, session
    /// tickets are kept and later handshakes resume; without, each one is a full handshake.
    /// [`Client::rebind`] then moves every connection on the endpoint, and
    /// [`Client::close`] no longer waits for the endpoint to be idle.
    pub async fn share_endpoint(mut self, resumption: bool) -> Result<Self, ClientError> {
        let (addr, host) = resolve(&self.server).await?;
        let server_name = self.server_name.clone().unwrap_or(host);
        let anchors = tls::load_trust_anchors(&self.ca_file).map_err(ClientError::CaFile)?;
        let crypto = tls::client_crypto(anchors, resumption).map_err(ClientError::CaFile)?;
        let endpoint = transport::client_endpoint(addr, crypto).map_err(ClientError::Io)?;
        self.shared = Some(SharedEndpoint {
            endpoint,
            addr,
            server_name,
        });
        Ok(self)
    }
}

/// Splits `HOST:PORT` (or `[V6]:PORT`) and resolves it.
async fn resolve(server: &str) -> Result<(SocketAddr, String), ClientError> {
    let bad = || ClientError::InvalidServerAddress(server.to_owned());
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ClientError::Resolve {
            server: server.to_owned(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| ClientError::Resolve {
            server: server.to_owned(),
            reason: "no address found".into(),
        })?;
    Ok((addr, host.to_owned()))
}

/// Opens a QUIC connection to the server (TLS verified against the CA), without any request.
///
/// The building block of [`Client::connect`]; tests and load generators use it directly.
pub async fn connect_raw(options: &ClientOptions) -> Result<(Endpoint, Connection), ClientError> {
    let (endpoint, addr, server_name) = match &options.shared {
        Some(shared) => (
            shared.endpoint.clone(),
            shared.addr,
            shared.server_name.clone(),
        ),
        None => {
            let (addr, host) = resolve(&options.server).await?;
            let server_name = options.server_name.clone().unwrap_or(host);
            let anchors = tls::load_trust_anchors(&options.ca_file).map_err(ClientError::CaFile)?;
            let crypto = tls::client_crypto(anchors, false).map_err(ClientError::CaFile)?;
            let endpoint = transport::client_endpoint(addr, crypto).map_err(ClientError::Io)?;
            (endpoint, addr, server_name)
        }
    };
    let connecting = endpoint
        .connect(addr, &server_name)
        .map_err(|e| ClientError::InvalidServerAddress(format!("{}: {e}", options.server)))?;
    let conn = match tokio::time::timeout(options.connect_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(ClientError::from_connection(e, &options.server)),
        Err(_) => {
            return Err(ClientError::Unreachable {
                server: options.server.clone(),
                reason: format!("no answer within {:?}", options.connect_timeout),
            });
        }
    };
    Ok((endpoint, conn))
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Reply, ClientError>>>>>;
type PendingSends =
    Arc<Mutex<HashMap<MessageId, oneshot::Sender<Result<SendOutcome, ClientError>>>>>;

/// What the server said about a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Durably stored for the recipient.
    Stored,
    /// The server already had this id from us; it was not stored twice.
    Duplicate,
}

/// Events the server pushed that are not replies.
#[derive(Debug, Default)]
struct Notices {
    prekeys_low: Option<u32>,
    /// The last `key_packages_low` event's count (groups).
    key_packages_low: Option<u32>,
    /// The last error answering a request nobody waits for: a quiet `ack` that failed.
    unclaimed_error: Option<ClientError>,
    /// `link_request` events, for the device that opened a link (`link`).
    link_requests: link::LinkRequests,
}

/// A connection to a server with its control stream open and `hello` exchanged.
pub struct Client {
    endpoint: Endpoint,
    /// The endpoint is shared with other clients ([`ClientOptions::share_endpoint`]).
    shared_endpoint: bool,
    conn: Connection,
    send: tokio::sync::Mutex<SendStream>,
    pending: Pending,
    next_id: AtomicU64,
    /// The device this connection is logged in as (1 until a session reply says otherwise).
    device: AtomicU32,
    request_timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
    sends: PendingSends,
    notices: Arc<Mutex<Notices>>,
    deliveries: tokio::sync::Mutex<mpsc::Receiver<Delivered>>,
    receiver: tokio::task::JoinHandle<()>,
    /// Wakes the [`liveness`] watcher when a request or a send starts waiting.
    wake_watcher: Arc<Notify>,
    watcher: tokio::task::JoinHandle<()>,
    /// Why the watcher gave the connection up, if it did.
    verdict: Arc<OnceLock<String>>,
    /// Uploads and downloads waiting for their event or stream.
    blobs: blobs::BlobWaiters,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("remote", &self.conn.remote_address())
            .finish()
    }
}

impl Client {
    /// Connects, opens the control stream and says `hello`.
    pub async fn connect(options: &ClientOptions) -> Result<Self, ClientError> {
        let (endpoint, conn) = connect_raw(options).await?;
        let shared_endpoint = options.shared.is_some();
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::from_connection(e, &options.server))?;
        let pending: Pending = Arc::default();
        let sends: PendingSends = Arc::default();
        let notices: Arc<Mutex<Notices>> = Arc::default();
        let verdict: Arc<OnceLock<String>> = Arc::default();
        let blobs = blobs::BlobWaiters::default();
        let reader = tokio::spawn(replies::read_replies(
            recv,
            conn.clone(),
            Arc::clone(&pending),
            Arc::clone(&sends),
            Arc::clone(&notices),
            Arc::clone(&verdict),
            blobs.clone(),
        ));
        let wake_watcher = Arc::new(Notify::new());
        let watcher = tokio::spawn(liveness::watch(liveness::Watched {
            conn: conn.clone(),
            pending: Arc::clone(&pending),
            sends: Arc::clone(&sends),
            wake: Arc::clone(&wake_watcher),
            verdict: Arc::clone(&verdict),
        }));
        let (deliveries_tx, deliveries) = mpsc::channel(1024);
        let receiver = tokio::spawn(streams::receive_deliveries(
            conn.clone(),
            deliveries_tx,
            blobs.clone(),
        ));
        let client = Self {
            endpoint,
            shared_endpoint,
            conn,
            send: tokio::sync::Mutex::new(send),
            pending,
            next_id: AtomicU64::new(1),
            device: AtomicU32::new(1),
            request_timeout: options.request_timeout,
            reader,
            sends,
            notices,
            deliveries: tokio::sync::Mutex::new(deliveries),
            receiver,
            wake_watcher,
            watcher,
            verdict,
            blobs,
        };
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: Some(concat!("sfc/", env!("CARGO_PKG_VERSION")).into()),
        };
        match client.request(hello).await? {
            Reply::Hello { .. } => Ok(client),
            other => Err(unexpected("hello", &other)),
        }
    }

    /// Moves the connection to a new UDP socket (a new local port), as a phone does when it
    /// changes networks; QUIC migrates the connection and the session goes on. On a shared
    /// endpoint every connection on it moves.
    pub fn rebind(&self) -> Result<(), ClientError> {
        let local = self.endpoint.local_addr().map_err(ClientError::Io)?;
        let fresh = SocketAddr::new(local.ip(), 0);
        let socket = transport::bind_udp(fresh).map_err(ClientError::Io)?;
        self.endpoint.rebind(socket).map_err(ClientError::Io)
    }

    /// The local UDP address the client sends from.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        self.endpoint.local_addr().map_err(ClientError::Io)
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sends one request and waits for its reply. Server errors come back as
    /// [`ClientError::Server`].
    pub async fn request(&self, request: Request) -> Result<Reply, ClientError> {
        if asks_for_delivery(&request) {
            // The server pushes messages only to a connection that authenticated with delivery.
            // Raised before the request is written, so the MAX_STREAMS frame reaches the
            // server before (or with) the request.
            self.conn.set_max_concurrent_uni_streams(VarInt::from_u32(
                transport::MAX_SERVER_UNI_STREAMS,
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| ClientError::Poisoned)?
            .insert(id, tx);
        self.wake_watcher.notify_one();
        if let Err(e) = self.write_request(id, request).await {
            self.forget(id);
            return Err(e);
        }
        let reply = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(reply)) => reply?,
            Ok(Err(_)) => return Err(self.lost("reply reader stopped".into())),
            Err(_) => {
                self.forget(id);
                return Err(ClientError::Timeout(self.request_timeout));
            }
        };
        match reply {
            Reply::Error { code, message } => Err(ClientError::Server { code, message }),
            other => Ok(other),
        }
    }

    /// Writes one request frame on the control stream.
    async fn write_request(&self, id: u64, request: Request) -> Result<(), ClientError> {
        let frame = ClientFrame { id, request };
        let written = {
            let mut send = self.send.lock().await;
            write_frame(&mut *send, &frame, MAX_CONTROL_FRAME).await
        };
        written.map_err(|e| self.lost(e.to_string()))
    }

    fn forget(&self, id: u64) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&id);
        }
    }

    fn lost(&self, fallback: String) -> ClientError {
        if let Some(verdict) = self.verdict.get() {
            return ClientError::ConnectionLost(verdict.clone());
        }
        match self.conn.close_reason() {
            Some(reason) => {
                ClientError::from_connection(reason, &self.conn.remote_address().to_string())
            }
            None => ClientError::ConnectionLost(fallback),
        }
    }

    /// Sends one message (`body` as sealed by the caller) and waits until the server says it is
    /// durably stored for the recipient (or was already, for a resent id).
    pub async fn send_message(
        &self,
        to: &str,
        kind: &str,
        id: MessageId,
        body: &[u8],
    ) -> Result<SendOutcome, ClientError> {
        self.send_copies(to, kind, id, None, body).await
    }

    /// [`Client::send_message`] of a body made of one sealed copy per device, as `copies`
    /// lists them (`None`: one copy, for the recipient's device 1). Lists that are not the
    /// current ones give [`ClientError::StaleDevices`] with the current ones.
    pub async fn send_copies(
        &self,
        to: &str,
        kind: &str,
        id: MessageId,
        copies: Option<Copies>,
        body: &[u8],
    ) -> Result<SendOutcome, ClientError> {
        self.send_on_stream(
            id,
            streams::send_stream(&self.conn, to, kind, id, copies, body),
        )
        .await
    }

    /// Sends a message stream (`stream`, writing message `id`) and waits for the server's
    /// answer to it: `sent`, or the `send_failed` event that explains a refused stream.
    async fn send_on_stream(
        &self,
        id: MessageId,
        stream: impl std::future::Future<Output = Result<(), streams::StreamFailure>>,
    ) -> Result<SendOutcome, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.sends
            .lock()
            .map_err(|_| ClientError::Poisoned)?
            .insert(id, tx);
        self.wake_watcher.notify_one();
        let forget = || {
            if let Ok(mut sends) = self.sends.lock() {
                sends.remove(&id);
            }
        };
        match stream.await {
            // A refused stream is explained by a `send_failed` event: wait for it below.
            Ok(()) | Err(streams::StreamFailure::Refused) => {}
            Err(streams::StreamFailure::Lost(e)) => {
                forget();
                return Err(self.lost(e.to_string()));
            }
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(self.lost("reply reader stopped".into())),
            Err(_) => {
                forget();
                Err(ClientError::Timeout(self.request_timeout))
            }
        }
    }

    /// The next delivered message, in the server's order; `None` if none arrives within
    /// `wait` or the connection is gone. Acknowledge it with [`Client::ack`] once it is safe.
    pub async fn next_delivery(&self, wait: Duration) -> Option<Delivered> {
        let mut deliveries = self.deliveries.lock().await;
        tokio::time::timeout(wait, deliveries.recv())
            .await
            .ok()
            .flatten()
    }

    /// A delivered message that has already arrived, without waiting: lets a receiver take
    /// everything at hand and acknowledge it in one batch.
    pub fn try_next_delivery(&self) -> Option<Delivered> {
        self.deliveries.try_lock().ok()?.try_recv().ok()
    }

    /// Acknowledges delivered messages so the server deletes them; returns how many it had.
    pub async fn ack(&self, seqs: Vec<u64>) -> Result<u64, ClientError> {
        match self.request(Request::Ack { seqs, quiet: false }).await? {
            Reply::Acked { removed } => Ok(removed),
            other => Err(unexpected("ack", &other)),
        }
    }

    /// Acknowledges delivered messages without waiting for an answer: the server sends none
    /// when the ack succeeds, which saves a packet each way. A failure comes back later and
    /// [`Client::take_unclaimed_error`] reports it. Messages whose ack has not reached the
    /// server when the connection closes are delivered again on the next one (same id), as
    /// after any lost ack.
    pub async fn ack_quietly(&self, seqs: Vec<u64>) -> Result<(), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.write_request(id, Request::Ack { seqs, quiet: true })
            .await
    }

    /// The last error the server answered to a request nobody was waiting for (a quiet ack
    /// that failed, or a request that had timed out), if one came (and clears it).
    pub fn take_unclaimed_error(&self) -> Option<ClientError> {
        self.notices
            .lock()
            .ok()
            .and_then(|mut n| n.unclaimed_error.take())
    }

    /// Deletes a sent message that has not been delivered yet; says whether it did.
    pub async fn unsend(&self, message_id: MessageId) -> Result<bool, ClientError> {
        match self.request(Request::Unsend { message_id }).await? {
            Reply::Unsent { deleted } => Ok(deleted),
            other => Err(unexpected("unsend", &other)),
        }
    }

    /// Whether a contact who has written to us is online.
    pub async fn online(&self, username: &str) -> Result<bool, ClientError> {
        match self
            .request(Request::Online {
                username: username.into(),
            })
            .await?
        {
            Reply::Presence { online, .. } => Ok(online),
            other => Err(unexpected("online", &other)),
        }
    }

    /// The remaining count from the last "prekeys low" event, if one came (and clears it).
    pub fn take_prekeys_low(&self) -> Option<u32> {
        self.notices
            .lock()
            .ok()
            .and_then(|mut n| n.prekeys_low.take())
    }

    /// The remaining count from the last "key packages low" event, if one came (and clears
    /// it).
    pub fn take_key_packages_low(&self) -> Option<u32> {
        self.notices
            .lock()
            .ok()
            .and_then(|mut n| n.key_packages_low.take())
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(Request::Ping).await? {
            Reply::Pong => Ok(()),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Ends the control stream and closes the connection, waiting briefly for the close to be
    /// sent.
    pub async fn close(self) {
        if let Ok(mut send) = self.send.try_lock() {
            let _ = send.finish();
        }
        self.conn
            .close(VarInt::from_u32(CloseCode::Normal.code()), b"bye");
        self.reader.abort();
        self.receiver.abort();
        self.watcher.abort();
        // An endpoint of its own would be dropped with the client: let it send the close
        // first. A shared one lives on and sends it.
        if !self.shared_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
    }
}

/// Whether `request` makes its connection the one the server delivers the user's messages on.
fn asks_for_delivery(request: &Request) -> bool {
    matches!(
        request,
        Request::Signup { .. }
            | Request::Login { .. }
            | Request::Resume { deliver: true, .. }
            | Request::LinkConfirm { .. }
    )
}

fn unexpected(request: &str, reply: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply to {request}: {reply:?}"))
}

impl ClientError {
    /// Whether this is the server's `code`.
    pub fn is_server(&self, code: ErrorCode) -> bool {
        matches!(self, Self::Server { code: c, .. } if *c == code)
    }
}
