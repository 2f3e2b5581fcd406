//! The requests of the control stream: one method per request type, with the connection's
//! state (hello seen, the session, delivery to this connection). The account requests are
//! here; the key directory's are in `keys`, the inbox's in `inbox`, the devices' and links' in
//! `devices`, the blobs' in `blobs`.

mod blobs;
mod devices;
mod groups;
mod inbox;
mod keys;

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::Connection;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, info, warn};

use super::Shared;
use super::accounts::{AccountError, ActiveSession, IssuedSession};
use super::delivery::deliver;
use super::messaging::SessionCell;
use super::router::{Inbox, Mailbox, Registration};
use super::throttle::Standing;
use crate::blocking::Priority;
use crate::protocol::{
    ErrorCode, MAX_CONTROL_FRAME, PROTOCOL_VERSION, Password, Reply, Request, RequestError,
    RequestKind, ServerFrame, Username, decode_request,
};
use crate::store::StoreError;

/// Fewer one-time prekeys than this left after a fetch: the owner is told to upload more.
pub const PREKEYS_LOW: u32 = 10;
/// Most sequence numbers in one `ack`.
const MAX_ACK: usize = 4096;
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
    /// When the link this connection joined lapses: until then it may stay unauthenticated.
    linking_until: Option<tokio::time::Instant>,
    span: Span,
}

impl Drop for Control {
    fn drop(&mut self) {
        // Links this connection opened or joined end with it.
        self.shared.links.forget_connection(self.conn.stable_id());
    }
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
            linking_until: None,
            span,
        }
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.shared.handshake_timeout
    }

    pub(crate) fn said_hello(&self) -> bool {
        self.hello
    }

    /// When the link this connection joined lapses, if it joined one: the login deadline
    /// waits for it (a link may take its whole lifetime).
    pub(crate) fn linking_until(&self) -> Option<tokio::time::Instant> {
        self.linking_until
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
        self.seen(&session);
        let inbox = Inbox::new(&session.username, session.device);
        let mailbox = Arc::new(Mailbox::default());
        let registration = self.shared.router.register(
            &inbox,
            &self.conn,
            Arc::clone(&mailbox),
            self.events.clone(),
        );
        let stop = CancellationToken::new();
        tokio::spawn(
            deliver(
                self.conn.clone(),
                Arc::clone(&self.shared),
                inbox,
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

    /// Notes that `session`'s device is in use now (its `last_seen`), without waiting.
    fn seen(&self, session: &ActiveSession) {
        let store = Arc::clone(self.shared.accounts.store());
        let (user, device) = (session.username.clone(), session.device);
        tokio::spawn(async move {
            if let Err(e) = store.touch_device(&user, device, crate::unix_now()).await {
                debug!(error = %e, "could not note when the device was last seen");
            }
        });
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
                match self.login(&username, password, device.unwrap_or(1)).await {
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
                            device: session.device,
                        };
                        if deliver {
                            self.begin_session(session);
                        } else {
                            self.span.record("user", session.username.as_str());
                            self.seen(&session);
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
            Request::LinkJoin {
                username,
                slot,
                pake,
                name,
            } => {
                if self.current().is_some() {
                    return already_authenticated();
                }
                self.link_join(&username, slot, pake, name).await
            }
            Request::LinkConfirm { confirm } => {
                if self.current().is_some() {
                    return already_authenticated();
                }
                self.link_confirm(confirm).await
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
    async fn login(
        &mut self,
        username: &str,
        password: Password,
        device: crate::protocol::DeviceId,
    ) -> Result<Reply, Refusal> {
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
        let result = shared
            .accounts
            .login(username, password, device, priority)
            .await;
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
        let inbox = Inbox::new(me, session.device);
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
                device: session.device,
            },
            Request::PublishKeys {
                identity_key,
                signed_prekey,
                last_resort,
                one_time_prekeys,
            } => {
                self.publish_keys(
                    &inbox,
                    identity_key,
                    signed_prekey,
                    last_resort,
                    one_time_prekeys,
                )
                .await
            }
            Request::FetchBundle { username, devices } => {
                self.fetch_bundle(me, &username, devices).await
            }
            Request::FetchIdentity { username } => self.fetch_identity(&username).await,
            Request::Ack { seqs, .. } => self.ack(&inbox, seqs).await,
            Request::Unsend { message_id } => self.unsend(me, message_id).await,
            Request::DeleteAccount { password } => {
                let _in_flight = match self.password_gate().await {
                    Ok(slot) => slot,
                    Err(refused) => return refused,
                };
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
                        self.shared
                            .router
                            .disconnect_user(me, code, "account deleted");
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
            Request::ListDevices => self.list_devices(&inbox).await,
            Request::RemoveDevice {
                device,
                password,
                revocation,
            } => {
                self.remove_device(&session, device, password, revocation)
                    .await
            }
            Request::ReplaceIdentity {
                password,
                identity_key,
                signed_prekey,
                last_resort,
                one_time_prekeys,
            } => {
                let keys = devices::device_keys(signed_prekey, last_resort);
                self.replace_identity(&session, password, identity_key, keys, one_time_prekeys)
                    .await
            }
            Request::LinkOpen { pake } => self.link_open(&inbox, pake).await,
            Request::LinkAccept {
                slot,
                confirm,
                payload,
            } => self.link_accept(&session, slot, confirm, payload).await,
            Request::LinkRefuse { slot } => self.link_refuse(&session, slot),
            Request::UploadBlob {
                blob,
                length,
                readers,
            } => self.upload_blob(&session, blob, length, readers).await,
            Request::DownloadBlob { blob, offset } => {
                self.download_blob(&session, blob, offset).await
            }
            Request::AckBlob { blob } => self.ack_blob(&session, blob).await,
            request @ (Request::PublishKeyPackages { .. }
            | Request::FetchKeyPackages { .. }
            | Request::CreateGroup { .. }
            | Request::LeaveGroup { .. }
            | Request::GroupInfo { .. }
            | Request::ListGroups) => self.group_request(&session, request).await,
            Request::Hello { .. }
            | Request::Ping
            | Request::CheckUsername { .. }
            | Request::Signup { .. }
            | Request::Login { .. }
            | Request::Resume { .. }
            | Request::LinkJoin { .. }
            | Request::LinkConfirm { .. } => already_authenticated(),
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
                    device: session.device,
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
