//! The client library: connect to a server (trusting a given CA), then signup, login, resume,
//! logout over the control stream, with typed errors. The `sfc` command is built on it.
//!
//! Requests may be issued concurrently from several tasks: each carries a fresh id, and a
//! reader task routes every reply to the request that is waiting for it.

mod error;
pub mod home;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::oneshot;

pub use self::error::ClientError;
use crate::protocol::{
    ClientFrame, CloseCode, ErrorCode, MAX_CONTROL_FRAME, PROTOCOL_VERSION, Password, Reply,
    Request, ServerFrame, SessionToken, decode_body, read_frame, write_frame,
};
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
        }
    }
}

/// A session as the server granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The account's canonical name.
    pub username: String,
    /// When the token expires, in seconds since the Unix epoch.
    pub expires_at: u64,
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
    let (addr, host) = resolve(&options.server).await?;
    let server_name = options.server_name.clone().unwrap_or(host);
    let anchors = tls::load_trust_anchors(&options.ca_file).map_err(ClientError::CaFile)?;
    let crypto = tls::client_crypto(anchors).map_err(ClientError::CaFile)?;
    let endpoint = transport::client_endpoint(addr, crypto).map_err(ClientError::Io)?;
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

/// A connection to a server with its control stream open and `hello` exchanged.
pub struct Client {
    endpoint: Endpoint,
    conn: Connection,
    send: tokio::sync::Mutex<SendStream>,
    pending: Pending,
    next_id: AtomicU64,
    request_timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
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
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::from_connection(e, &options.server))?;
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_replies(recv, conn.clone(), Arc::clone(&pending)));
        let client = Self {
            endpoint,
            conn,
            send: tokio::sync::Mutex::new(send),
            pending,
            next_id: AtomicU64::new(1),
            request_timeout: options.request_timeout,
            reader,
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

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sends one request and waits for its reply. Server errors come back as
    /// [`ClientError::Server`].
    pub async fn request(&self, request: Request) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| ClientError::Poisoned)?
            .insert(id, tx);
        let frame = ClientFrame { id, request };
        let written = {
            let mut send = self.send.lock().await;
            write_frame(&mut *send, &frame, MAX_CONTROL_FRAME).await
        };
        if let Err(e) = written {
            self.forget(id);
            return Err(self.lost(e.to_string()));
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

    fn forget(&self, id: u64) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&id);
        }
    }

    fn lost(&self, fallback: String) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) => {
                ClientError::from_connection(reason, &self.conn.remote_address().to_string())
            }
            None => ClientError::ConnectionLost(fallback),
        }
    }

    /// Signup step one: whether `username` is valid and free (the folded name is returned).
    pub async fn check_username(&self, username: &str) -> Result<(String, bool), ClientError> {
        match self
            .request(Request::CheckUsername {
                username: username.into(),
            })
            .await?
        {
            Reply::UsernameStatus {
                username,
                available,
            } => Ok((username, available)),
            other => Err(unexpected("check_username", &other)),
        }
    }

    /// Signup step two: creates the account; the connection is then logged in.
    pub async fn signup(
        &self,
        username: &str,
        password: Password,
    ) -> Result<(SessionInfo, SessionToken), ClientError> {
        let reply = self
            .request(Request::Signup {
                username: username.into(),
                password,
            })
            .await?;
        session_reply("signup", reply)
    }

    /// Logs in with a password; returns the session and its token (keep it secret).
    pub async fn login(
        &self,
        username: &str,
        password: Password,
    ) -> Result<(SessionInfo, SessionToken), ClientError> {
        let reply = self
            .request(Request::Login {
                username: username.into(),
                password,
            })
            .await?;
        session_reply("login", reply)
    }

    /// Restores a session with a token from an earlier login.
    pub async fn resume(&self, token: SessionToken) -> Result<SessionInfo, ClientError> {
        match self.request(Request::Resume { token }).await? {
            Reply::Resumed {
                username,
                expires_at,
            } => Ok(SessionInfo {
                username,
                expires_at,
            }),
            other => Err(unexpected("resume", &other)),
        }
    }

    /// Revokes this connection's session token everywhere.
    pub async fn logout(&self) -> Result<(), ClientError> {
        match self.request(Request::Logout).await? {
            Reply::LoggedOut => Ok(()),
            other => Err(unexpected("logout", &other)),
        }
    }

    /// Who is logged in on this connection.
    pub async fn whoami(&self) -> Result<SessionInfo, ClientError> {
        match self.request(Request::Whoami).await? {
            Reply::Whoami {
                username,
                expires_at,
            } => Ok(SessionInfo {
                username,
                expires_at,
            }),
            other => Err(unexpected("whoami", &other)),
        }
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
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

fn unexpected(request: &str, reply: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply to {request}: {reply:?}"))
}

fn session_reply(request: &str, reply: Reply) -> Result<(SessionInfo, SessionToken), ClientError> {
    match reply {
        Reply::Session {
            username,
            token,
            expires_at,
        } => Ok((
            SessionInfo {
                username,
                expires_at,
            },
            token,
        )),
        other => Err(unexpected(request, &other)),
    }
}

/// Routes replies to waiting requests until the stream ends; then fails whoever still waits.
async fn read_replies(mut recv: RecvStream, conn: Connection, pending: Pending) {
    let mut buf = Vec::new();
    let failure = loop {
        match read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf).await {
            Ok(true) => {}
            Ok(false) => {
                break ClientError::ConnectionLost("server ended the control stream".into());
            }
            Err(e) => break ClientError::ConnectionLost(e.to_string()),
        }
        let frame: ServerFrame = match decode_body(&buf) {
            Ok(frame) => frame,
            Err(e) => break ClientError::Protocol(format!("undecodable reply: {e}")),
        };
        match frame.id {
            Some(id) => {
                let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(frame.reply));
                }
            }
            None => {
                if let Reply::Error { code, message } = frame.reply {
                    break ClientError::Server { code, message };
                }
                tracing::debug!(?frame, "ignoring event");
            }
        }
    };
    let failure = match (&failure, conn.close_reason()) {
        (ClientError::ConnectionLost(_), Some(reason)) => {
            ClientError::from_connection(reason, &conn.remote_address().to_string())
        }
        _ => failure,
    };
    let waiters: Vec<_> = match pending.lock() {
        Ok(mut p) => p.drain().map(|(_, w)| w).collect(),
        Err(_) => Vec::new(),
    };
    for waiter in waiters {
        let _ = waiter.send(Err(failure.clone_for_waiter()));
    }
}

impl ClientError {
    /// Whether this is the server's `code`.
    pub fn is_server(&self, code: ErrorCode) -> bool {
        matches!(self, Self::Server { code: c, .. } if *c == code)
    }
}
