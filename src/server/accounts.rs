//! Accounts and sessions: the seed's two-step signup, password login, token resume and logout.
//!
//! Only digests of session tokens are stored. Every failure a peer can cause maps to one
//! [`AccountError`] that the connection turns into a typed error code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::password::{PasswordError, Passwords};
use crate::blocking::{BlockingError, Priority};
use crate::protocol::{
    ErrorCode, MAX_PASSWORD_LEN, MIN_PASSWORD_LEN, Password, SessionToken, Username, UsernameError,
};
use crate::store::{Created, SessionRecord, Store, StoreError, TokenDigest, UserRecord};
use crate::unix_now;

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The username breaks the rules.
    #[error("invalid username: {0}")]
    InvalidUsername(UsernameError),
    /// The password is too short or too long.
    #[error("passwords have {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} bytes")]
    WeakPassword,
    /// Someone already has the name.
    #[error("username is taken")]
    UsernameTaken,
    /// Wrong username or wrong password (deliberately the same error).
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Unknown, expired or revoked session token.
    #[error("invalid or expired session token")]
    InvalidToken,
    /// A bounded pool is full.
    #[error("server busy")]
    Busy,
    /// Storage failed.
    #[error("store: {0}")]
    Store(StoreError),
    /// Hashing failed for a reason other than load.
    #[error("password hashing: {0}")]
    Password(PasswordError),
    /// The operating system's random generator failed.
    #[error("random generator: {0}")]
    Random(getrandom::Error),
}

impl From<UsernameError> for AccountError {
    fn from(error: UsernameError) -> Self {
        Self::InvalidUsername(error)
    }
}

impl From<getrandom::Error> for AccountError {
    fn from(error: getrandom::Error) -> Self {
        Self::Random(error)
    }
}

impl From<StoreError> for AccountError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Blocking(BlockingError::Saturated(_)) => Self::Busy,
            other => Self::Store(other),
        }
    }
}

impl From<PasswordError> for AccountError {
    fn from(e: PasswordError) -> Self {
        match e {
            PasswordError::Blocking(BlockingError::Saturated(_)) => Self::Busy,
            other => Self::Password(other),
        }
    }
}

impl AccountError {
    /// The code a peer sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidUsername(_) => ErrorCode::InvalidUsername,
            Self::WeakPassword => ErrorCode::WeakPassword,
            Self::UsernameTaken => ErrorCode::UsernameTaken,
            Self::InvalidCredentials => ErrorCode::InvalidCredentials,
            Self::InvalidToken => ErrorCode::InvalidToken,
            Self::Busy => ErrorCode::Busy,
            Self::Store(StoreError::Unavailable) => ErrorCode::StorageUnavailable,
            Self::Store(_) | Self::Password(_) | Self::Random(_) => ErrorCode::Internal,
        }
    }

    /// Whether the failure is the server's fault (logged as an error) rather than the peer's.
    pub fn is_internal(&self) -> bool {
        self.code() == ErrorCode::Internal
    }
}

/// A session just created by signup or login; the token is shown to the client once.
#[derive(Debug)]
pub struct IssuedSession {
    /// The secret token for `resume`.
    pub token: SessionToken,
    /// The session as the connection keeps it.
    pub session: ActiveSession,
}

/// An authenticated connection's view of its session.
#[derive(Debug, Clone)]
pub struct ActiveSession {
    /// Whose session it is.
    pub username: Username,
    /// Digest of the token, to revoke it at logout.
    pub digest: TokenDigest,
    /// When the token expires, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// Set when the session is revoked (logout on any connection).
    revoked: Arc<AtomicBool>,
}

impl ActiveSession {
    /// Whether the session still holds: not expired and not revoked. No store access: a
    /// logout on any connection of this server sets the shared flag at once.
    pub fn is_active(&self) -> bool {
        self.expires_at > unix_now() && !self.revoked.load(Ordering::Acquire)
    }
}

/// The revocation flags of the sessions that live connections hold, by token digest, so a
/// logout reaches every connection using that token without each request reading the store.
/// Entries die with their last connection; dead ones are swept as the map grows, so it stays
/// within twice the live sessions.
#[derive(Default)]
struct LiveSessions {
    flags: HashMap<TokenDigest, Weak<AtomicBool>>,
    sweep_at: usize,
}

impl LiveSessions {
    fn flag(&mut self, digest: TokenDigest) -> Arc<AtomicBool> {
        if let Some(flag) = self.flags.get(&digest).and_then(Weak::upgrade) {
            return flag;
        }
        if self.flags.len() >= self.sweep_at {
            self.flags.retain(|_, flag| flag.strong_count() > 0);
            self.sweep_at = (self.flags.len() * 2).max(1024);
        }
        let flag = Arc::new(AtomicBool::new(false));
        self.flags.insert(digest, Arc::downgrade(&flag));
        flag
    }

    fn revoke(&mut self, digest: &TokenDigest) {
        if let Some(flag) = self.flags.remove(digest).and_then(|f| f.upgrade()) {
            flag.store(true, Ordering::Release);
        }
    }
}

/// Account operations over a store and a password hasher.
#[derive(Clone)]
pub struct Accounts {
    store: Arc<dyn Store>,
    passwords: Passwords,
    session_ttl: Duration,
    live: Arc<Mutex<LiveSessions>>,
}

/// SHA-256 of a session token: what the store keys sessions by.
pub fn token_digest(token: &SessionToken) -> TokenDigest {
    Sha256::digest(token.expose()).into()
}

fn check_password_policy(password: &Password) -> Result<(), AccountError> {
    if (MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&password.len()) {
        Ok(())
    } else {
        Err(AccountError::WeakPassword)
    }
}

impl Accounts {
    /// Account operations issuing sessions valid for `session_ttl`.
    pub fn new(store: Arc<dyn Store>, passwords: Passwords, session_ttl: Duration) -> Self {
        Self {
            store,
            passwords,
            session_ttl,
            live: Arc::default(),
        }
    }

    /// The store behind the accounts.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Signup step one: whether `raw` is a valid, free username (returned folded).
    pub async fn check_username(&self, raw: &str) -> Result<(Username, bool), AccountError> {
        let username = Username::parse(raw)?;
        let taken = self.store.user_exists(&username).await?;
        Ok((username, !taken))
    }

    /// Signup step two: creates the account and logs it in. Of racing signups for one name,
    /// exactly one succeeds; the others get [`AccountError::UsernameTaken`]. `priority` places
    /// the hash in the argon2 queue.
    pub async fn signup(
        &self,
        raw: &str,
        password: Password,
        priority: Priority,
    ) -> Result<IssuedSession, AccountError> {
        let username = Username::parse(raw)?;
        check_password_policy(&password)?;
        if self.store.user_exists(&username).await? {
            return Err(AccountError::UsernameTaken);
        }
        let password_hash = self.passwords.hash_ranked(password, priority).await?;
        let record = UserRecord {
            password_hash,
            created_at: unix_now(),
        };
        match self.store.create_user(&username, record).await? {
            Created::Created => self.issue_session(username).await,
            Created::AlreadyExists => Err(AccountError::UsernameTaken),
        }
    }

    /// Password login. A wrong username and a wrong password fail alike, in similar time.
    /// `priority` places the verification in the argon2 queue.
    pub async fn login(
        &self,
        raw: &str,
        password: Password,
        priority: Priority,
    ) -> Result<IssuedSession, AccountError> {
        if password.len() > MAX_PASSWORD_LEN {
            return Err(AccountError::InvalidCredentials);
        }
        let username = Username::parse(raw).ok();
        let stored = match &username {
            Some(name) => self.store.user(name).await?.map(|user| user.password_hash),
            None => None,
        };
        let matches = self
            .passwords
            .verify_ranked(password, stored, priority)
            .await?;
        match (matches, username) {
            (true, Some(username)) => self.issue_session(username).await,
            _ => Err(AccountError::InvalidCredentials),
        }
    }

    /// Restores a session from its token.
    pub async fn resume(&self, token: &SessionToken) -> Result<ActiveSession, AccountError> {
        let digest = token_digest(token);
        let Some(record) = self.store.session(&digest).await? else {
            return Err(AccountError::InvalidToken);
        };
        if !bool::from(record.token_digest.ct_eq(&digest)) {
            return Err(AccountError::InvalidToken);
        }
        if record.expires_at <= unix_now() {
            self.store.delete_session(&digest).await?;
            return Err(AccountError::InvalidToken);
        }
        let revoked = self.live_flag(digest)?;
        // A logout racing with this resume may have deleted the record after the read above
        // and revoked the flags before `live_flag`: read again (see `logout`).
        if self.store.session(&digest).await?.is_none() {
            return Err(AccountError::InvalidToken);
        }
        Ok(ActiveSession {
            username: record.username,
            digest,
            expires_at: record.expires_at,
            revoked,
        })
    }

    /// Revokes a session: its token is refused from now on, on every connection.
    pub async fn logout(&self, session: &ActiveSession) -> Result<(), AccountError> {
        // The store first, then the flag (whatever the store said): a `resume` that read the
        // record before the delete takes its flag either before the revocation (and is
        // revoked with it) or after it, and then reads the store again and finds no session.
        let deleted = self.store.delete_session(&session.digest).await;
        self.revoke_live(&session.digest);
        Ok(deleted?)
    }

    fn revoke_live(&self, digest: &TokenDigest) {
        if let Ok(mut live) = self.live.lock() {
            live.revoke(digest);
        }
    }

    fn live_flag(&self, digest: TokenDigest) -> Result<Arc<AtomicBool>, AccountError> {
        let mut live = self.live.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(live.flag(digest))
    }

    /// Deletes expired sessions; returns how many.
    pub async fn purge_expired(&self) -> Result<usize, AccountError> {
        Ok(self.store.purge_expired_sessions(unix_now()).await?)
    }

    async fn issue_session(&self, username: Username) -> Result<IssuedSession, AccountError> {
        let token = SessionToken::generate()?;
        let digest = token_digest(&token);
        let created_at = unix_now();
        let expires_at = created_at.saturating_add(self.session_ttl.as_secs().max(1));
        self.store
            .put_session(SessionRecord {
                username: username.clone(),
                device: 1,
                created_at,
                expires_at,
                token_digest: digest,
            })
            .await?;
        Ok(IssuedSession {
            token,
            session: ActiveSession {
                username,
                digest,
                expires_at,
                revoked: self.live_flag(digest)?,
            },
        })
    }
}

impl Accounts {
    /// Deletes `session`'s account after checking `password` again (one argon2 run on the
    /// pool, like a login): its inbox, keys and sessions go, and the name is
    /// held for `hold` so no one else can take it and receive what the old owner's contacts
    /// still send to it. Every live connection of the account loses its session at once.
    pub async fn delete_account(
        &self,
        session: &ActiveSession,
        password: Password,
        hold: Duration,
    ) -> Result<(), AccountError> {
        if password.len() > MAX_PASSWORD_LEN {
            return Err(AccountError::InvalidCredentials);
        }
        let name = &session.username;
        let stored = self.store.user(name).await?.map(|user| user.password_hash);
        if !self.passwords.verify(password, stored).await? {
            return Err(AccountError::InvalidCredentials);
        }
        let hold_until = unix_now().saturating_add(hold.as_secs());
        let digests = self.store.delete_user(name, hold_until).await?;
        self.revoke_live(&session.digest);
        for digest in digests.unwrap_or_default() {
            self.revoke_live(&digest);
        }
        Ok(())
    }
}
