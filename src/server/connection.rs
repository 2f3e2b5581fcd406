//! One client connection: the handshake, the control stream's read-dispatch-reply loop, and
//! the per-connection session state (hello seen, who is logged in).

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, info, info_span, warn};

use super::Shared;
use super::accounts::{AccountError, ActiveSession, IssuedSession};
use crate::protocol::{
    CloseCode, ErrorCode, FrameError, MAX_CONTROL_FRAME, PROTOCOL_VERSION, Reply, Request,
    RequestError, RequestKind, ServerFrame, decode_request, read_frame, write_frame,
};
use crate::unix_now;

/// How long we wait for a peer to read our last error before closing on it.
const LINGER: Duration = Duration::from_secs(1);

/// Serves one incoming connection until it ends or the server shuts down.
pub(crate) async fn serve(incoming: Incoming, shared: Arc<Shared>, shutdown: CancellationToken) {
    let span =
        info_span!("conn", remote = %incoming.remote_address(), user = tracing::field::Empty);
    async move {
        match accept(incoming, &shared, &shutdown).await {
            Ok(Some((conn, send, recv))) => {
                let mut control = Control {
                    conn,
                    send,
                    recv,
                    shared,
                    hello: false,
                    session: None,
                    span: Span::current(),
                };
                control.run(&shutdown).await;
            }
            Ok(None) => {}
            Err(reason) => debug!(%reason, "connection not established"),
        }
    }
    .instrument(span)
    .await
}

type Established = (Connection, SendStream, RecvStream);

async fn accept(
    incoming: Incoming,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<Option<Established>, String> {
    let connecting = incoming.accept().map_err(|e| e.to_string())?;
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

fn close(conn: &Connection, code: CloseCode, reason: &str) {
    conn.close(VarInt::from_u32(code.code()), reason.as_bytes());
}

struct Control {
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    shared: Arc<Shared>,
    hello: bool,
    session: Option<ActiveSession>,
    span: Span,
}

impl Control {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut buf = Vec::new();
        // A peer that opens the stream but never completes `hello` would otherwise hold its
        // slot until the idle timeout (forever, with keep-alives).
        let hello_deadline = tokio::time::Instant::now() + self.shared.handshake_timeout;
        loop {
            let read = tokio::select! {
                () = shutdown.cancelled() => {
                    close(&self.conn, CloseCode::Shutdown, "server shutting down");
                    return;
                }
                () = tokio::time::sleep_until(hello_deadline), if !self.hello => {
                    debug!("no hello in time");
                    close(&self.conn, CloseCode::ProtocolViolation, "no hello in time");
                    return;
                }
                read = read_frame(&mut self.recv, MAX_CONTROL_FRAME, &mut buf) => read,
            };
            match read {
                Ok(true) => {
                    let reply = self.dispatch(&buf).await;
                    if let Err(e) = write_frame(&mut self.send, &reply, MAX_CONTROL_FRAME).await {
                        debug!(error = %e, "cannot reply; connection gone");
                        return;
                    }
                }
                Ok(false) => {
                    debug!("client finished its control stream");
                    let _ = self.send.finish();
                    close(&self.conn, CloseCode::Normal, "bye");
                    return;
                }
                Err(FrameError::TooLarge { len, max }) => {
                    warn!(len, max, "oversize control frame");
                    let message = format!("frame of {len} bytes exceeds the limit of {max}");
                    self.fail(ErrorCode::FrameTooLarge, message).await;
                    return;
                }
                Err(FrameError::Truncated) => {
                    debug!("control stream ended inside a frame");
                    self.fail(
                        ErrorCode::TruncatedFrame,
                        "stream ended inside a frame".into(),
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    debug!(error = %e, "control stream closed");
                    return;
                }
            }
        }
    }

    /// Sends a connection-level error, lets the peer read it, then closes.
    async fn fail(&mut self, code: ErrorCode, message: String) {
        let frame = ServerFrame {
            id: None,
            reply: Reply::Error { code, message },
        };
        if write_frame(&mut self.send, &frame, MAX_CONTROL_FRAME)
            .await
            .is_ok()
            && self.send.finish().is_ok()
        {
            let _ = tokio::time::timeout(LINGER, self.send.stopped()).await;
        }
        close(&self.conn, CloseCode::ProtocolViolation, code.as_str());
    }

    async fn dispatch(&mut self, body: &[u8]) -> ServerFrame {
        match decode_request(body) {
            Ok(frame) => {
                let reply = self.handle(frame.request).await;
                ServerFrame {
                    id: Some(frame.id),
                    reply,
                }
            }
            Err(RequestError::Malformed(why)) => ServerFrame {
                id: None,
                reply: error(ErrorCode::MalformedFrame, why),
            },
            Err(e @ RequestError::Unknown { id, .. }) => ServerFrame {
                id: Some(id),
                reply: error(ErrorCode::UnknownRequest, e.to_string()),
            },
            Err(e @ RequestError::Bad { id, .. }) => ServerFrame {
                id: Some(id),
                reply: error(ErrorCode::BadRequest, e.to_string()),
            },
        }
    }

    async fn handle(&mut self, request: Request) -> Reply {
        let kind = request.kind();
        if !self.hello && kind != RequestKind::Hello {
            return error(
                ErrorCode::HelloRequired,
                "the first request must be `hello`".into(),
            );
        }
        match request {
            Request::Hello { version, client } => {
                if version != PROTOCOL_VERSION {
                    return error(
                        ErrorCode::UnsupportedVersion,
                        format!("this server speaks protocol version {PROTOCOL_VERSION}"),
                    );
                }
                self.hello = true;
                debug!(client = client.as_deref().unwrap_or("-"), "hello");
                Reply::Hello {
                    version: PROTOCOL_VERSION,
                    server: concat!("sfc-server/", env!("CARGO_PKG_VERSION")).into(),
                    max_frame: MAX_CONTROL_FRAME,
                }
            }
            Request::Ping => Reply::Pong,
            Request::CheckUsername { username } => {
                match self.shared.accounts.check_username(&username).await {
                    Ok((username, available)) => Reply::UsernameStatus {
                        username: username.to_string(),
                        available,
                    },
                    Err(e) => account_error(e),
                }
            }
            Request::Signup { username, password } => {
                if self.session.is_some() {
                    return already_authenticated();
                }
                let addr = self.conn.remote_address().ip();
                if let Err(wait) = self.shared.signups.check(addr, Instant::now()) {
                    return rate_limited("signups", wait);
                }
                let result = self.shared.accounts.signup(&username, password).await;
                if matches!(result, Ok(_) | Err(AccountError::UsernameTaken)) {
                    self.shared.signups.spend(addr, Instant::now());
                }
                self.start_session(result, "signed up")
            }
            Request::Login { username, password } => {
                if self.session.is_some() {
                    return already_authenticated();
                }
                let addr = self.conn.remote_address().ip();
                if let Err(wait) = self.shared.failed_logins.check(addr, Instant::now()) {
                    return rate_limited("failed logins", wait);
                }
                let result = self.shared.accounts.login(&username, password).await;
                if matches!(result, Err(AccountError::InvalidCredentials)) {
                    self.shared.failed_logins.spend(addr, Instant::now());
                }
                self.start_session(result, "logged in")
            }
            Request::Resume { token } => {
                if self.session.is_some() {
                    return already_authenticated();
                }
                match self.shared.accounts.resume(&token).await {
                    Ok(session) => {
                        self.span.record("user", session.username.as_str());
                        info!("resumed session");
                        let reply = Reply::Resumed {
                            username: session.username.to_string(),
                            expires_at: session.expires_at,
                        };
                        self.session = Some(session);
                        reply
                    }
                    Err(e) => account_error(e),
                }
            }
            Request::Logout => {
                let Some(session) = self.authenticated().await else {
                    return not_authenticated();
                };
                match self.shared.accounts.logout(&session).await {
                    Ok(()) => {
                        info!("logged out");
                        self.session = None;
                        Reply::LoggedOut
                    }
                    Err(e) => account_error(e),
                }
            }
            Request::Whoami => match self.authenticated().await {
                Some(session) => Reply::Whoami {
                    username: session.username.to_string(),
                    expires_at: session.expires_at,
                },
                None => not_authenticated(),
            },
        }
    }

    /// The session, unless there is none or it has expired or been revoked (then it is
    /// dropped). Checks the store, so a logout on another connection is seen here too.
    async fn authenticated(&mut self) -> Option<ActiveSession> {
        let session = self.session.clone()?;
        let active = session.expires_at > unix_now()
            && match self.shared.accounts.is_active(&session).await {
                Ok(active) => active,
                Err(e) => {
                    // Fail closed: a store error must not extend a revoked session.
                    warn!(error = %e, "cannot check the session; treating it as ended");
                    false
                }
            };
        if !active {
            debug!("session expired or revoked");
            self.session = None;
        }
        self.session.clone()
    }

    fn start_session(&mut self, result: Result<IssuedSession, AccountError>, what: &str) -> Reply {
        match result {
            Ok(IssuedSession { token, session }) => {
                self.span.record("user", session.username.as_str());
                info!("{what}");
                let reply = Reply::Session {
                    username: session.username.to_string(),
                    token,
                    expires_at: session.expires_at,
                };
                self.session = Some(session);
                reply
            }
            Err(e) => account_error(e),
        }
    }
}

fn error(code: ErrorCode, message: String) -> Reply {
    Reply::Error { code, message }
}

fn rate_limited(what: &str, wait: Duration) -> Reply {
    let secs = wait.as_secs().max(1);
    warn!(what, retry_in_secs = secs, "rate limited");
    error(
        ErrorCode::RateLimited,
        format!("too many {what} from your address; retry in {secs} s"),
    )
}

fn not_authenticated() -> Reply {
    error(
        ErrorCode::NotAuthenticated,
        "log in, sign up or resume first".into(),
    )
}

fn already_authenticated() -> Reply {
    error(
        ErrorCode::AlreadyAuthenticated,
        "this connection already has a session; log out first".into(),
    )
}

fn account_error(e: AccountError) -> Reply {
    if e.is_internal() {
        error!(error = %e, "account operation failed");
        return error(ErrorCode::Internal, "internal server error".into());
    }
    if e.code() == ErrorCode::Busy {
        warn!("refusing request: server busy");
    }
    error(e.code(), e.to_string())
}
