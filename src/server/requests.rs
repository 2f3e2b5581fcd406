//! The requests of the control stream: one method per request type, with the connection's
//! state (hello seen, the session, delivery to this connection).

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::Connection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, info, warn};

use super::Shared;
use super::accounts::{AccountError, ActiveSession, IssuedSession};
use super::messaging::{SessionCell, deliver};
use super::router::{Mailbox, Registration};
use crate::protocol::keys::IdentityKeyBytes;
use crate::protocol::keys::{OneTimePrekey, SignedPrekey};
use crate::protocol::{
    ErrorCode, MAX_CONTROL_FRAME, MessageId, PROTOCOL_VERSION, Reply, Request, RequestError,
    RequestKind, ServerFrame, Username, decode_request,
};
use crate::store::{Removal, StoreError};

/// Fewer one-time prekeys than this left after a fetch: the owner is told to upload more.
pub const PREKEYS_LOW: u32 = 10;
/// Most sequence numbers in one `ack`.
const MAX_ACK: usize = 4096;
/// Most one-time prekeys in one `publish_keys`.
const MAX_PREKEYS_PER_REQUEST: usize = 200;

/// Delivery of the user's inbox to this connection; stops when dropped.
struct Delivery {
    _registration: Registration,
    stop: CancellationToken,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The control stream's view of a connection.
pub(crate) struct Control {
    conn: Connection,
    shared: Arc<Shared>,
    hello: bool,
    session: SessionCell,
    events: mpsc::Sender<Box<ServerFrame>>,
    delivery: Option<Delivery>,
    span: Span,
}

impl Control {
    pub(crate) fn new(
        conn: Connection,
        shared: Arc<Shared>,
        session: SessionCell,
        events: mpsc::Sender<Box<ServerFrame>>,
        span: Span,
    ) -> Self {
        Self {
            conn,
            shared,
            hello: false,
            session,
            events,
            delivery: None,
            span,
        }
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.shared.handshake_timeout
    }

    pub(crate) fn said_hello(&self) -> bool {
        self.hello
    }

    /// Handles one control-stream frame and gives the frame to answer with: `None` only
    /// for a quiet `ack` that succeeded.
    pub(crate) async fn dispatch(&mut self, body: &[u8]) -> Option<ServerFrame> {
        Some(match decode_request(body) {
            Ok(frame) => {
                let quiet = matches!(frame.request, Request::Ack { quiet: true, .. });
                let reply = self.handle(frame.request).await;
                if quiet && matches!(reply, Reply::Acked { .. }) {
                    return None;
                }
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
        })
    }

    fn current(&self) -> Option<ActiveSession> {
        self.session.lock().ok().and_then(|s| s.clone())
    }

    fn begin_session(&mut self, session: ActiveSession) {
        self.span.record("user", session.username.as_str());
        let mailbox = Arc::new(Mailbox::default());
        let registration = self.shared.router.register(
            &session.username,
            &self.conn,
            Arc::clone(&mailbox),
            self.events.clone(),
        );
        let stop = CancellationToken::new();
        tokio::spawn(
            deliver(
                self.conn.clone(),
                Arc::clone(&self.shared),
                session.username.clone(),
                mailbox,
                stop.clone(),
            )
            .instrument(self.span.clone()),
        );
        self.delivery = Some(Delivery {
            _registration: registration,
            stop,
        });
        if let Ok(mut cell) = self.session.lock() {
            *cell = Some(session);
        }
    }

    /// Drops the session and stops delivery to this connection.
    pub(crate) fn end_session(&mut self) {
        self.delivery = None;
        if let Ok(mut cell) = self.session.lock() {
            *cell = None;
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
            Request::Hello { version, client } => self.hello(version, client),
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
                if self.current().is_some() {
                    return already_authenticated();
                }
                let addr = self.conn.remote_address().ip();
                if let Err(wait) = self.shared.signups.check(addr, Instant::now()) {
                    return rate_limited("signups from your address", wait);
                }
                let result = self.shared.accounts.signup(&username, password).await;
                if matches!(result, Ok(_) | Err(AccountError::UsernameTaken)) {
                    self.shared.signups.spend(addr, Instant::now());
                }
                self.start_session(result, "signed up")
            }
            Request::Login { username, password } => {
                if self.current().is_some() {
                    return already_authenticated();
                }
                let addr = self.conn.remote_address().ip();
                if let Err(wait) = self.shared.failed_logins.check(addr, Instant::now()) {
                    return rate_limited("failed logins from your address", wait);
                }
                let result = self.shared.accounts.login(&username, password).await;
                if matches!(result, Err(AccountError::InvalidCredentials)) {
                    self.shared.failed_logins.spend(addr, Instant::now());
                }
                self.start_session(result, "logged in")
            }
            Request::Resume { token, deliver } => {
                if self.current().is_some() {
                    return already_authenticated();
                }
                match self.shared.accounts.resume(&token).await {
                    Ok(session) => {
                        let reply = Reply::Resumed {
                            username: session.username.to_string(),
                            expires_at: session.expires_at,
                        };
                        if deliver {
                            self.begin_session(session);
                        } else {
                            self.span.record("user", session.username.as_str());
                            if let Ok(mut cell) = self.session.lock() {
                                *cell = Some(session);
                            }
                        }
                        info!(deliver, "resumed session");
                        reply
                    }
                    Err(e) => account_error(e),
                }
            }
            other => {
                let Some(session) = self.authenticated() else {
                    return not_authenticated();
                };
                self.handle_authenticated(session, other).await
            }
        }
    }

    fn hello(&mut self, version: u64, client: Option<String>) -> Reply {
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

    async fn handle_authenticated(&mut self, session: ActiveSession, request: Request) -> Reply {
        let me = &session.username;
        match request {
            Request::Logout => match self.shared.accounts.logout(&session).await {
                Ok(()) => {
                    info!("logged out");
                    self.end_session();
                    Reply::LoggedOut
                }
                Err(e) => account_error(e),
            },
            Request::Whoami => Reply::Whoami {
                username: session.username.to_string(),
                expires_at: session.expires_at,
            },
            Request::PublishKeys {
                identity_key,
                signed_prekey,
                last_resort,
                one_time_prekeys,
            } => {
                self.publish_keys(
                    me,
                    identity_key,
                    signed_prekey,
                    last_resort,
                    one_time_prekeys,
                )
                .await
            }
            Request::FetchBundle { username } => self.fetch_bundle(me, &username).await,
            Request::FetchIdentity { username } => {
                let Ok(user) = Username::parse(&username) else {
                    return unknown_user();
                };
                match self.shared.accounts.store().keys(&user).await {
                    Ok(Some(keys)) => Reply::Identity {
                        username: user.to_string(),
                        identity_key: keys.identity_key,
                    },
                    Ok(None) => self.no_keys(&user).await,
                    Err(e) => store_error(&e),
                }
            }
            Request::Ack { seqs, .. } => {
                if seqs.len() > MAX_ACK {
                    return error(
                        ErrorCode::BadRequest,
                        format!("at most {MAX_ACK} seqs per ack"),
                    );
                }
                let store = self.shared.accounts.store();
                match store
                    .remove_pending(me, seqs.clone(), Removal::Acknowledged)
                    .await
                {
                    Ok(removed) => {
                        self.shared.router.release(me, &seqs);
                        Reply::Acked { removed }
                    }
                    Err(e) => store_error(&e),
                }
            }
            Request::Unsend { message_id } => self.unsend(me, message_id).await,
            Request::Online { username } => {
                let Ok(user) = Username::parse(&username) else {
                    return unknown_user();
                };
                // Decided from memory (see `router`): no stored contact graph is consulted.
                if self.shared.router.may_see_presence(me, &user) {
                    Reply::Presence {
                        username: user.to_string(),
                        online: self.shared.router.is_online(&user),
                    }
                } else {
                    error(
                        ErrorCode::NotAllowed,
                        format!("{user} has not written to you, so their presence is private"),
                    )
                }
            }
            Request::Hello { .. }
            | Request::Ping
            | Request::CheckUsername { .. }
            | Request::Signup { .. }
            | Request::Login { .. }
            | Request::Resume { .. } => already_authenticated(),
        }
    }

    async fn no_keys(&self, user: &Username) -> Reply {
        match self.shared.accounts.store().user_exists(user).await {
            Ok(true) => error(
                ErrorCode::NoKeys,
                format!("{user} has not published keys yet"),
            ),
            Ok(false) => unknown_user(),
            Err(e) => store_error(&e),
        }
    }

    async fn publish_keys(
        &mut self,
        me: &Username,
        identity_key: Option<IdentityKeyBytes>,
        signed_prekey: Option<SignedPrekey>,
        last_resort: Option<SignedPrekey>,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Reply {
        if one_time_prekeys.len() > MAX_PREKEYS_PER_REQUEST {
            return error(
                ErrorCode::BadRequest,
                format!("at most {MAX_PREKEYS_PER_REQUEST} one-time prekeys per request"),
            );
        }
        let store = self.shared.accounts.store();
        let existing = match store.keys(me).await {
            Ok(existing) => existing,
            Err(e) => return store_error(&e),
        };
        let merged = match super::directory::merge_keys(
            existing,
            identity_key,
            signed_prekey,
            last_resort,
        ) {
            Ok(merged) => merged,
            Err(why) => return error(ErrorCode::InvalidKeys, why),
        };
        match store.put_keys(me, merged, one_time_prekeys).await {
            Ok(count) => Reply::KeysPublished {
                one_time_prekeys: count,
            },
            Err(StoreError::Limit(why)) => error(ErrorCode::BadRequest, why),
            Err(e) => store_error(&e),
        }
    }

    async fn fetch_bundle(&mut self, me: &Username, username: &str) -> Reply {
        let Ok(user) = Username::parse(username) else {
            return unknown_user();
        };
        if let Err(wait) = self.shared.bundle_fetches.check(me.clone(), Instant::now()) {
            return rate_limited("key bundle fetches", wait);
        }
        self.shared.bundle_fetches.spend(me.clone(), Instant::now());
        match self.shared.accounts.store().take_bundle(&user).await {
            Ok(Some(taken)) => {
                if taken.remaining < PREKEYS_LOW {
                    self.shared.router.push_event(
                        &user,
                        Reply::PrekeysLow {
                            remaining: taken.remaining,
                        },
                    );
                }
                let last_resort = match taken.one_time_prekey {
                    Some(_) => None,
                    None => Some(taken.keys.last_resort.clone()),
                };
                Reply::Bundle {
                    username: user.to_string(),
                    identity_key: taken.keys.identity_key,
                    signed_prekey: taken.keys.signed_prekey,
                    one_time_prekey: taken.one_time_prekey,
                    last_resort,
                }
            }
            Ok(None) => self.no_keys(&user).await,
            Err(e) => store_error(&e),
        }
    }

    async fn unsend(&mut self, me: &Username, message_id: MessageId) -> Reply {
        let store = self.shared.accounts.store();
        let record = match store.sent(me, message_id).await {
            Ok(Some(record)) => record,
            Ok(None) => return Reply::Unsent { deleted: false },
            Err(e) => return store_error(&e),
        };
        if !self.shared.router.cancel(&record.recipient, record.seq) {
            return Reply::Unsent { deleted: false };
        }
        match store
            .remove_pending(&record.recipient, vec![record.seq], Removal::Unsent)
            .await
        {
            Ok(removed) => Reply::Unsent {
                deleted: removed == 1,
            },
            Err(e) => store_error(&e),
        }
    }

    /// The session, unless there is none or it has expired or been revoked (then it is
    /// dropped). A logout on another connection is seen here too (a shared flag).
    fn authenticated(&mut self) -> Option<ActiveSession> {
        let session = self.current()?;
        if !session.is_active() {
            debug!("session expired or revoked");
            self.end_session();
            return None;
        }
        Some(session)
    }

    fn start_session(&mut self, result: Result<IssuedSession, AccountError>, what: &str) -> Reply {
        match result {
            Ok(IssuedSession { token, session }) => {
                let reply = Reply::Session {
                    username: session.username.to_string(),
                    token,
                    expires_at: session.expires_at,
                };
                self.begin_session(session);
                info!("{what}");
                reply
            }
            Err(e) => account_error(e),
        }
    }
}

fn error(code: ErrorCode, message: String) -> Reply {
    Reply::Error { code, message }
}

fn unknown_user() -> Reply {
    error(ErrorCode::UnknownUser, "no such user".into())
}

fn store_error(e: &StoreError) -> Reply {
    error!(error = %e, "store operation failed");
    error(ErrorCode::Internal, "internal server error".into())
}

fn rate_limited(what: &str, wait: Duration) -> Reply {
    let secs = wait.as_secs().max(1);
    warn!(what, retry_in_secs = secs, "rate limited");
    error(
        ErrorCode::RateLimited,
        format!("too many {what}; retry in {secs} s"),
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
