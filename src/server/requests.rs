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
use super::throttle::Standing;
use crate::blocking::Priority;
use crate::protocol::keys::IdentityKeyBytes;
use crate::protocol::keys::{OneTimePrekey, SignedPrekey};
use crate::protocol::{
    DeviceBundle, ErrorCode, MAX_CONTROL_FRAME, MessageId, PROTOCOL_VERSION, Password, Reply,
    Request, RequestError, RequestKind, ServerFrame, Username, decode_request,
};
use crate::store::{Removal, StoreError};

/// Fewer one-time prekeys than this left after a fetch: the owner is told to upload more.
pub const PREKEYS_LOW: u32 = 10;
/// Most sequence numbers in one `ack`.
const MAX_ACK: usize = 4096;
/// Most one-time prekeys in one `publish_keys`.
const MAX_PREKEYS_PER_REQUEST: usize = 200;
/// What a login or signup refused by the per-address in-flight cap is told.
const IN_FLIGHT_WHAT: &str = "logins and signups in progress from your address";
/// When it may retry: about one argon2 run.
const IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);
/// How long a refused login, signup or username check waits before its `rate_limited` reply
/// (at most: a shorter wait is answered after the wait).
const REFUSAL_DELAY: Duration = Duration::from_millis(500);
/// Each further refusal in a row on one connection doubles the delay, up to this.
const MAX_REFUSAL_DELAY: Duration = Duration::from_secs(8);

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
    /// Throttle refusals in a row on this connection (see [`Refusal::delay`]).
    refusals: u32,
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
            refusals: 0,
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

    /// Answers a throttle refusal, later the more refusals in a row this connection had.
    async fn refuse(&mut self, refusal: Refusal) -> Reply {
        self.refusals = self.refusals.saturating_add(1);
        refusal.answer(self.refusals).await
    }

    /// A throttled request that was not refused ends the run of refusals.
    fn not_refused(&mut self, reply: Reply) -> Reply {
        self.refusals = 0;
        reply
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
            Request::CheckUsername { username } => match self.check_username(&username).await {
                Ok(reply) => self.not_refused(reply),
                Err(refusal) => self.refuse(refusal).await,
            },
            Request::Signup { username, password } => {
                if self.current().is_some() {
                    return already_authenticated();
                }
                match self.signup(&username, password).await {
                    Ok(reply) => self.not_refused(reply),
                    Err(refusal) => self.refuse(refusal).await,
                }
            }
            Request::Login {
                username,
                password,
                device,
            } => {
                if self.current().is_some() {
                    return already_authenticated();
                }
                // DEVICES-WIP: every account has exactly device 1 until linking is served.
                if device.is_some_and(|d| d != 1) {
                    return error(ErrorCode::UnknownDevice, "no such device".into());
                }
                match self.login(&username, password).await {
                    Ok(reply) => self.not_refused(reply),
                    Err(refusal) => self.refuse(refusal).await,
                }
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
                            device: 1,
                        };
                        if deliver {
                            self.begin_session(session);
                        } else {
                            self.span.record("user", session.username.as_str());
                            if let Ok(mut cell) = self.session.lock() {
                                *cell = Some(session);
                            }
                        }
                        // A token is as good a sign as a password that the address is honest.
                        let addr = self.conn.remote_address().ip();
                        self.shared.known_good.note(addr, Instant::now());
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

    async fn check_username(&mut self, username: &str) -> Result<Reply, Refusal> {
        let addr = self.conn.remote_address().ip();
        if let Err(wait) = self.shared.username_checks.take(addr, Instant::now()) {
            return Err(Refusal::new("username checks from your address", wait));
        }
        Ok(match self.shared.accounts.check_username(username).await {
            Ok((username, available)) => Reply::UsernameStatus {
                username: username.to_string(),
                available,
            },
            Err(e) => account_error(e),
        })
    }

    /// A signup: a token of the address's signup bucket is taken before the hash is computed
    /// and given back only when the attempt did no work that counts (invalid input, busy).
    async fn signup(&mut self, username: &str, password: Password) -> Result<Reply, Refusal> {
        let shared = Arc::clone(&self.shared);
        let addr = self.conn.remote_address().ip();
        let Some(_in_flight) = shared.password_work.enter(addr) else {
            return Err(Refusal::new(IN_FLIGHT_WHAT, IN_FLIGHT_RETRY));
        };
        let taken = shared
            .signups
            .take(addr, Instant::now())
            .map_err(|wait| Refusal::new("signups from your address", wait))?;
        let result = shared
            .accounts
            .signup(username, password, queue_priority(taken.standing))
            .await;
        super::metrics::signup(&result);
        if !matches!(result, Ok(_) | Err(AccountError::UsernameTaken)) {
            shared.signups.refund(addr, taken, Instant::now());
        }
        Ok(self.start_session(result, "signed up"))
    }

    /// A password login: the in-flight cap, then a token of the address's failed-login bucket
    /// (taken before argon2 runs, given back on success), then the account's backoff.
    async fn login(&mut self, username: &str, password: Password) -> Result<Reply, Refusal> {
        let shared = Arc::clone(&self.shared);
        let addr = self.conn.remote_address().ip();
        let Some(_in_flight) = shared.password_work.enter(addr) else {
            return Err(Refusal::new(IN_FLIGHT_WHAT, IN_FLIGHT_RETRY));
        };
        let now = Instant::now();
        let taken = shared
            .failed_logins
            .take(addr, now)
            .map_err(|wait| Refusal::new("failed logins from your address", wait))?;
        let account = Username::parse(username).ok();
        let admitted = match &account {
            Some(account) => match shared
                .login_backoff
                .admit(account, addr, taken.standing, now)
            {
                Ok(admitted) => Some((account, admitted)),
                Err(wait) => {
                    shared.failed_logins.refund(addr, taken, now);
                    return Err(Refusal::new("failed logins for this account", wait));
                }
            },
            None => None,
        };
        // A clean address that logged in lately goes ahead of clean ones never seen before,
        // which is what each address of a flood from many addresses looks like at first.
        let priority = match queue_priority(taken.standing) {
            Priority::High if shared.known_good.knows(addr, now) => Priority::Urgent,
            other => other,
        };
        let result = shared.accounts.login(username, password, priority).await;
        super::metrics::login(&result);
        let now = Instant::now();
        match (&result, admitted) {
            (Err(AccountError::InvalidCredentials), Some((account, admitted))) => {
                shared.login_backoff.failed(account, addr, admitted, now);
            }
            (Err(AccountError::InvalidCredentials), None) => {}
            (_, admitted) => {
                shared.failed_logins.refund(addr, taken, now);
                if let Some((account, admitted)) = admitted {
                    shared.login_backoff.refund(account, admitted, now);
                }
            }
        }
        if result.is_ok() {
            shared.known_good.note(addr, now);
        }
        Ok(self.start_session(result, "logged in"))
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
                device: 1,
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
            Request::FetchBundle { username, devices }
                if devices.as_ref().is_some_and(|d| !d.contains(&1)) =>
            {
                let _ = username;
                error(ErrorCode::UnknownDevice, "no such device".into())
            }
            Request::FetchBundle { username, .. } => self.fetch_bundle(me, &username).await,
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
                        super::metrics::messages_delivered(removed);
                        self.shared.router.release(me, &seqs);
                        Reply::Acked { removed }
                    }
                    Err(e) => store_error(&e),
                }
            }
            Request::Unsend { message_id } => self.unsend(me, message_id).await,
            // DEVICES-WIP: replaced by the device requests before this branch reaches main.
            Request::ListDevices
            | Request::RemoveDevice { .. }
            | Request::ReplaceIdentity { .. }
            | Request::LinkOpen { .. }
            | Request::LinkJoin { .. }
            | Request::LinkConfirm { .. }
            | Request::LinkAccept { .. }
            | Request::LinkRefuse { .. } => error(
                ErrorCode::UnknownRequest,
                "device requests are not served yet".into(),
            ),
            Request::DeleteAccount { password } => {
                // Password work, throttled like logins; spent before the work, so parallel
                // requests cannot all pass the check.
                let addr = self.conn.remote_address().ip();
                let shared = Arc::clone(&self.shared);
                let Some(_in_flight) = shared.password_work.enter(addr) else {
                    return self
                        .refuse(Refusal::new(IN_FLIGHT_WHAT, IN_FLIGHT_RETRY))
                        .await;
                };
                // Kept even when the password is right: a deletion happens once.
                if let Err(wait) = shared.failed_logins.take(addr, Instant::now()) {
                    return self
                        .refuse(Refusal::new("password attempts from your address", wait))
                        .await;
                }
                let hold = self.shared.name_hold;
                match self
                    .shared
                    .accounts
                    .delete_account(&session, password, hold)
                    .await
                {
                    Ok(()) => {
                        info!("account deleted");
                        self.end_session();
                        let code = crate::protocol::CloseCode::AccountDeleted;
                        self.shared.router.disconnect(me, code, "account deleted");
                        Reply::AccountDeleted {
                            username: me.to_string(),
                        }
                    }
                    Err(e) => account_error(e),
                }
            }
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
        // Taken in one step: a check followed by a spend let concurrent fetches (from the
        // user's other connections) all pass one check.
        if let Err(wait) = self.shared.bundle_fetches.take(me.clone(), Instant::now()) {
            return rate_limited("key bundle fetches", wait);
        }
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
                let device = DeviceBundle {
                    device: 1,
                    signed_prekey: taken.keys.signed_prekey.clone(),
                    one_time_prekey: taken.one_time_prekey.clone(),
                    last_resort: last_resort.clone(),
                };
                Reply::Bundle {
                    username: user.to_string(),
                    identity_key: taken.keys.identity_key,
                    signed_prekey: taken.keys.signed_prekey,
                    one_time_prekey: taken.one_time_prekey,
                    last_resort,
                    devices: vec![device],
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
                deleted: super::metrics::messages_unsent(removed) == 1,
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
                    device: 1,
                };
                self.begin_session(session);
                info!("{what}");
                reply
            }
            Err(e) => account_error(e),
        }
    }
}

/// A request refused by a throttle, answered after a short delay (see [`Refusal::answer`]).
struct Refusal {
    what: &'static str,
    wait: Duration,
}

impl Refusal {
    fn new(what: &'static str, wait: Duration) -> Self {
        Self { what, wait }
    }

    /// `rate_limited`, sent after [`Refusal::delay`]. Requests on a control stream are
    /// handled one at a time, so a client that ignores "retry in" and asks again at once makes
    /// two requests a second on a connection at first and one every
    /// [`MAX_REFUSAL_DELAY`] soon after, not thousands, and a sleeping task costs the server
    /// next to nothing. Nothing is held meanwhile (the in-flight slot was given back).
    async fn answer(self, in_a_row: u32) -> Reply {
        tokio::time::sleep(self.delay(in_a_row)).await;
        rate_limited(self.what, self.wait)
    }

    /// The delay of the `in_a_row`th refusal in a row on a connection: the first waits
    /// [`REFUSAL_DELAY`] (or the wait, if shorter), each further one twice the one before, up
    /// to [`MAX_REFUSAL_DELAY`]. An honest client, which waits as told, is seldom refused twice
    /// in a row; a flooding connection soon costs one reply every few seconds.
    fn delay(&self, in_a_row: u32) -> Duration {
        if in_a_row <= 1 {
            return REFUSAL_DELAY.min(self.wait);
        }
        let doublings = (in_a_row - 1).min(16);
        REFUSAL_DELAY
            .saturating_mul(1 << doublings)
            .min(MAX_REFUSAL_DELAY)
    }
}

/// Where a requester's password work goes in the argon2 queue: clean records first.
fn queue_priority(standing: Standing) -> Priority {
    match standing {
        Standing::Clean => Priority::High,
        Standing::Suspect => Priority::Low,
    }
}

fn error(code: ErrorCode, message: String) -> Reply {
    Reply::Error { code, message }
}

fn unknown_user() -> Reply {
    error(ErrorCode::UnknownUser, "no such user".into())
}

fn store_error(e: &StoreError) -> Reply {
    if matches!(e, StoreError::Unavailable) {
        return error(
            ErrorCode::StorageUnavailable,
            "the server cannot store anything now; nothing was changed: retry later".into(),
        );
    }
    error!(error = %e, "store operation failed");
    error(ErrorCode::Internal, "internal server error".into())
}

fn rate_limited(what: &str, wait: Duration) -> Reply {
    let secs = wait.as_secs().max(1);
    super::metrics::throttled(what);
    // Counted in the metrics; a log line per refusal would let a flood flood the log too.
    debug!(what, retry_in_secs = secs, "rate limited");
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
