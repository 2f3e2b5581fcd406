//! End-to-end messaging for people: keys created and published at signup, sessions set up from
//! prekey bundles, text sealed before it leaves and opened after it arrives, duplicates
//! dropped, acknowledgements sent only once a message is safely recorded.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use super::keystore::{HistoryEntry, Incoming, KeyState, Keystore, Outgoing, ReceiveLock};
use super::{Bundle, Client, ClientError, ClientOptions};
use crate::e2e::{
    E2eError, IdentityKey, OneTimePrekeyPublic, PrekeyBundle, PrekeyStore, Session,
    SignedPrekeyPublic,
};
use crate::protocol::keys::{Bin, OneTimePrekey, SignedPrekey};
use crate::protocol::{ErrorCode, MessageId, SessionToken, Username};
use crate::unix_now;
use std::sync::Arc;

/// One-time prekeys made at signup and at each top-up.
pub const PREKEY_BATCH: u32 = 100;
/// The signed prekey is replaced this often.
pub const SIGNED_PREKEY_ROTATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The `kind` of a text message.
pub const TEXT: &str = "text";
/// Most messages the outbox holds. Below the ratchet's `MAX_SKIP` (1,000), so even if every
/// queued message to one peer were refused for good, the gap they leave stays openable.
pub const MAX_OUTBOX: usize = 256;
/// Most envelope bytes the outbox holds (it is saved with the keystore at every change).
pub const MAX_OUTBOX_BYTES: usize = 2 * 1024 * 1024;

/// Why a messaging operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MessengerError {
    /// The server or the connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Encryption failed.
    #[error(transparent)]
    E2e(#[from] E2eError),
    /// The home directory could not be used.
    #[error(transparent)]
    Home(#[from] super::home::HomeError),
    /// The home directory holds another user's keys.
    #[error("this home directory holds the keys of {0}; use another --home")]
    OtherUser(String),
    /// No keys yet (log in or sign up with this home directory first).
    #[error("no keys in this home directory: sign up or log in first")]
    NoKeys,
    /// A name is not a valid username.
    #[error("invalid username {0:?}")]
    BadName(String),
    /// A message to oneself (it could not be opened: sessions are between two users).
    #[error("you cannot send a message to yourself")]
    ToSelf,
    /// A text longer than a message can carry; nothing was sealed.
    #[error("the message is {len} bytes; a message holds at most {max} bytes of text")]
    TooLong {
        /// Its length in bytes (UTF-8).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No session with the peer, and no way to start one now (the server is unreachable).
    #[error("no session with {0} yet, and their keys cannot be fetched now; nothing was kept")]
    NoSession(String),
    /// The peer's identity key changed since the user verified it: nothing is sealed for the
    /// new key until the user accepts it.
    #[error(
        "{0}'s identity key changed since you verified it; nothing was sent. Compare safety \
         numbers again (`sfc fingerprint {0}`), then accept the new key with `sfc trust {0}`"
    )]
    VerifiedKeyChanged(String),
    /// The account already has an identity key, made in another home directory.
    #[error(
        "{0} already has keys in another home directory; making new ones here would replace the \
         account's identity (every contact would see a key change). Use the home that holds the \
         keys (`--home`), or replace the identity on purpose with `sfc login --new-identity {0}`"
    )]
    IdentityElsewhere(String),
    /// The contact's key is in doubt (a changed key not accepted, or the server lists another
    /// key): there is nothing to verify until the user decides.
    #[error(
        "{0}'s identity key is in doubt (see `sfc fingerprint {0}`); accept the key you \
         compared with `sfc trust {0}` before verifying"
    )]
    KeyInDoubt(String),
    /// Another process already receives for this home directory.
    #[error(
        "another sfc (recv or chat) is already receiving messages for this home directory; stop \
         it first, or use it"
    )]
    AlreadyReceiving,
    /// The message was sealed and queued, but the server has not stored it yet.
    #[error(
        "message {id} not sent yet ({reason}); it waits in the outbox and goes with the next \
         `sfc send`, `sfc chat` or `sfc outbox`"
    )]
    Queued {
        /// The message's id.
        id: MessageId,
        /// Why it is still waiting.
        reason: String,
    },
    /// The server refused the message for good (it left the outbox).
    #[error("the server refused message {id}: {reason}")]
    Refused {
        /// The message's id.
        id: MessageId,
        /// The server's reason.
        reason: String,
    },
    /// The outbox is full; nothing was sealed.
    #[error(
        "{count} messages ({bytes} bytes) already wait in the outbox: send them first \
         (`sfc outbox`)"
    )]
    OutboxFull {
        /// Messages waiting.
        count: usize,
        /// Their envelope bytes.
        bytes: usize,
    },
}

/// The longest wait between two attempts to reconnect.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

impl MessengerError {
    /// Whether this is the connection failing (the server is down, restarting or
    /// unreachable), which reconnecting may fix.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Self::Client(e) if super::is_offline(e))
    }
}

/// What [`Messenger::flush_outbox`] did.
#[derive(Debug, Default)]
pub struct Flushed {
    /// Stored by the server now: (recipient, id).
    pub sent: Vec<(String, MessageId)>,
    /// Refused for good and taken out of the outbox: (recipient, id, why). The recipient will
    /// not get these.
    pub dropped: Vec<(String, MessageId, String)>,
    /// Messages still waiting.
    pub waiting: usize,
    /// Why the last attempt stopped short, if it did (the first refusal or connection error).
    pub stopped: Option<String>,
}

/// What a failed send of a queued message means for the rest of the outbox.
enum Refusal {
    /// The connection or the session failed: no other message would pass now.
    StopAll,
    /// The server may take it later (a full inbox, a busy or failing server): keep it, and
    /// hold back that peer's later messages so they stay in order.
    HoldPeer,
    /// Refused for good (e.g. `unknown_user`): take it out and report it.
    Drop,
}

fn refusal(e: &ClientError) -> Refusal {
    match e {
        ClientError::Server { code, .. } => match code {
            // No message to anyone would pass before the store recovers or the account's
            // bucket refills.
            ErrorCode::NotAuthenticated
            | ErrorCode::StorageUnavailable
            | ErrorCode::SendRateLimited => Refusal::StopAll,
            ErrorCode::InboxFull
            | ErrorCode::SenderQuota
            | ErrorCode::Busy
            | ErrorCode::Internal
            | ErrorCode::RateLimited => Refusal::HoldPeer,
            _ => Refusal::Drop,
        },
        _ => Refusal::StopAll,
    }
}

/// A message as the application sees it. Show it, then call [`Messenger::shown`]: only then
/// is it acknowledged to the server and taken out of the keystore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A message to show.
    Text {
        /// The sender's id for it.
        id: MessageId,
        /// The sender.
        from: String,
        /// When the server stored it (Unix seconds).
        sent_at: u64,
        /// The text.
        text: String,
        /// Set while the sender's identity key differs from the one accepted for them: show
        /// it to the user.
        warning: Option<String>,
        /// The server's sequence number, acknowledged by [`Messenger::shown`] (`None` for a
        /// message kept by an earlier run that ended before showing it).
        seq: Option<u64>,
    },
    /// A message that could not be opened (tampered, replayed, or from a broken session). It
    /// is kept in the home's quarantine (`sfc quarantine`), and the sender's client was asked
    /// to start a new session and send it again.
    Undecryptable {
        /// The sender's id for it.
        id: MessageId,
        /// The claimed sender.
        from: String,
        /// Why.
        reason: String,
        /// The server's sequence number, acknowledged by [`Messenger::shown`].
        seq: u64,
    },
    /// The peer could not open a message this user sent: it was sealed again in a new session
    /// and sent under a new id (`resent_as`), or not (`None`: unknown, already resent once,
    /// or too old to be in the history). Already acknowledged.
    RetryRequested {
        /// Who asked.
        from: String,
        /// The message they could not open.
        id: MessageId,
        /// The id it was sent again under.
        resent_as: Option<MessageId>,
    },
    /// A redelivery of a message already kept or shown; acknowledged and otherwise ignored.
    Duplicate,
}

impl Received {
    /// What to tell the user about what is not a text to show (a message that could not be
    /// opened, a peer's retry request), in words; it carries names and reasons from others, so
    /// render it before it reaches a terminal.
    pub fn describe(&self) -> Option<String> {
        match self {
            Self::Undecryptable { from, reason, .. } => Some(format!(
                "a message from {from} could not be opened ({reason}); it is kept \
                 (`sfc quarantine`) and {from} was asked to send it again"
            )),
            Self::RetryRequested {
                from,
                id,
                resent_as: Some(new),
            } => Some(format!("{from} could not open {id}: sent again as {new}")),
            Self::RetryRequested {
                from,
                id,
                resent_as: None,
            } => Some(format!(
                "{from} could not open {id}, and it cannot be sent again"
            )),
            Self::Text { .. } | Self::Duplicate => None,
        }
    }
}

/// A safety number, computed from the identity key accepted for the peer (never from what the
/// server says now), with what else the user must know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The safety number of this user and the peer's accepted key.
    pub number: String,
    /// The user verified this number in person (`sfc verify`).
    pub verified: bool,
    /// The peer presents another identity key that the user has not accepted: the safety
    /// number it would have.
    pub changed_to: Option<String>,
    /// The server lists an identity key for the peer other than the accepted one (and other
    /// than `changed_to`): the number that key would give. Someone may be in the middle.
    pub server_differs: Option<String>,
    /// The server could not be asked (offline): the number is still the accepted key's.
    pub server_unchecked: bool,
}

/// What works on the home directory alone, without a server: the outbox, sessions, the
/// quarantine and the history.
#[derive(Debug, Clone)]
pub struct OfflineMessenger {
    pub(super) keystore: Keystore,
    pub(super) me: Username,
}

impl OfflineMessenger {
    /// The keys of `me` in `home`.
    pub fn new(home: &std::path::Path, me: &str) -> Result<Self, MessengerError> {
        let home = super::home::Home::open(home)?;
        Ok(Self {
            keystore: Keystore::new(home.dir()),
            me: username(me)?,
        })
    }

    /// Whether `peer` presents an identity key the user has not accepted yet (`sfc trust`).
    pub async fn key_changed(&self, peer: &str) -> Result<bool, MessengerError> {
        let name = username(peer)?.as_str().to_owned();
        Ok(self
            .keystore
            .read_async(move |s| s.is_some_and(|s| s.trust_of(&name).changed_to.is_some()))
            .await?)
    }

    /// Seals `text` for `to` into the outbox without sending it (the server cannot be reached:
    /// `reason`), in the session there is. Returns the [`MessengerError::Queued`] to report.
    /// Without a session, [`MessengerError::NoSession`]: starting one needs the server.
    pub async fn queue_text(
        &self,
        to: &str,
        text: &str,
        reason: &str,
    ) -> Result<MessengerError, MessengerError> {
        let peer = username(to)?;
        if peer == self.me {
            return Err(MessengerError::ToSelf);
        }
        let (id, _, _) = seal_into_outbox(&self.keystore, &self.me, &peer, text, None).await?;
        Ok(MessengerError::Queued {
            id,
            reason: reason.to_owned(),
        })
    }
}

/// How to connect again when the connection is lost: the server, and the session to resume.
struct Reconnect {
    options: ClientOptions,
    token: SessionToken,
    deliver: bool,
}

/// A logged-in client with its keystore.
pub struct Messenger {
    /// The current connection; replaced by [`Messenger::reconnect`].
    client: std::sync::RwLock<Arc<Client>>,
    reconnect: Option<Reconnect>,
    keystore: Keystore,
    me: Username,
    /// Messages an earlier run kept and never showed, loaded at the first receive and handed
    /// out before anything new.
    pub(super) backlog: std::sync::Mutex<Option<VecDeque<Incoming>>>,
    /// Held while this messenger receives: one receiver per home.
    _receiving: Option<ReceiveLock>,
    /// When the server was last heard from (a delivery or a ping answered), for the idle
    /// ping of [`Messenger::receive_reconnecting`].
    pub(super) last_heard: std::sync::Mutex<tokio::time::Instant>,
}

pub(crate) fn wire_signed(spk: &SignedPrekeyPublic) -> SignedPrekey {
    SignedPrekey {
        id: spk.id,
        key: Bin(spk.key),
        signature: Bin(spk.signature),
    }
}

pub(crate) fn wire_one_time(otp: &OneTimePrekeyPublic) -> OneTimePrekey {
    OneTimePrekey {
        id: otp.id,
        key: Bin(otp.key),
    }
}

pub(crate) fn to_bundle(bundle: &Bundle) -> Result<PrekeyBundle, E2eError> {
    let signed = |s: &SignedPrekey| SignedPrekeyPublic {
        id: s.id,
        key: s.key.0,
        signature: s.signature.0,
    };
    Ok(PrekeyBundle {
        identity_key: IdentityKey::from_bytes(&bundle.identity_key.0)?,
        signed_prekey: signed(&bundle.signed_prekey),
        one_time_prekey: bundle
            .one_time_prekey
            .as_ref()
            .map(|o| OneTimePrekeyPublic {
                id: o.id,
                key: o.key.0,
            }),
        last_resort_prekey: bundle.last_resort.as_ref().map(signed),
    })
}

pub(crate) fn username(name: &str) -> Result<Username, MessengerError> {
    Username::parse(name).map_err(|_| MessengerError::BadName(name.to_owned()))
}

pub(crate) fn changed_warning(peer: &str) -> String {
    format!(
        "{peer}'s identity key has changed (a new install, or someone in the middle): compare \
         safety numbers with `sfc fingerprint {peer}`, then accept it with `sfc trust {peer}`"
    )
}

impl Messenger {
    /// Wraps an authenticated client; `home` holds (or will hold) `me`'s keys.
    pub fn new(client: Client, home: &std::path::Path, me: &str) -> Result<Self, MessengerError> {
        let home = super::home::Home::open(home)?;
        Ok(Self {
            client: std::sync::RwLock::new(Arc::new(client)),
            reconnect: None,
            keystore: Keystore::new(home.dir()),
            me: username(me)?,
            backlog: std::sync::Mutex::new(None),
            _receiving: None,
            last_heard: std::sync::Mutex::new(tokio::time::Instant::now()),
        })
    }

    /// Wraps a client that asked for delivery, holding the home's receive lock
    /// ([`Keystore::lock_receiving`], taken before the client connected): one process at a
    /// time shows (and acknowledges) a home's messages.
    pub fn receiving(
        client: Client,
        home: &std::path::Path,
        me: &str,
        lock: ReceiveLock,
    ) -> Result<Self, MessengerError> {
        let mut messenger = Self::new(client, home, me)?;
        messenger._receiving = Some(lock);
        Ok(messenger)
    }

    /// What works without the server, on the same home.
    pub fn offline(&self) -> OfflineMessenger {
        OfflineMessenger {
            keystore: self.keystore.clone(),
            me: self.me.clone(),
        }
    }

    /// The client underneath (the current connection).
    pub fn client(&self) -> Arc<Client> {
        match self.client.read() {
            Ok(client) => Arc::clone(&client),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Lets [`Messenger::reconnect`] connect to the server of `options` again and resume the
    /// session of `token` (asking for delivery with `deliver`).
    pub fn with_reconnect(
        mut self,
        options: ClientOptions,
        token: SessionToken,
        deliver: bool,
    ) -> Self {
        self.reconnect = Some(Reconnect {
            options,
            token,
            deliver,
        });
        self
    }

    /// Whether the connection is gone (closed by either side, or timed out).
    pub fn disconnected(&self) -> Option<MessengerError> {
        let client = self.client();
        let reason = client.connection().close_reason()?;
        Some(MessengerError::Client(ClientError::ConnectionLost(
            reason.to_string(),
        )))
    }

    /// [`Messenger::reconnect`] until it works, waiting 1 s, then twice as long after each
    /// failure (at most [`MAX_RECONNECT_BACKOFF`]); `note` is told why and how long before
    /// each wait. Gives up on an error that waiting cannot fix (e.g. the session was revoked),
    /// or once `give_up_after` has passed.
    pub async fn reconnect_with_backoff(
        &self,
        give_up_after: Option<Duration>,
        mut note: impl FnMut(&str, Duration),
    ) -> Result<(), MessengerError> {
        let start = tokio::time::Instant::now();
        let mut backoff = Duration::from_secs(1);
        let mut last = self.disconnected().unwrap_or_else(|| {
            MessengerError::Client(ClientError::ConnectionLost("connection lost".into()))
        });
        loop {
            if give_up_after.is_some_and(|limit| start.elapsed() + backoff > limit) {
                return Err(last);
            }
            note(&last.to_string(), backoff);
            tokio::time::sleep(backoff).await;
            match self.reconnect().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_disconnected() => last = e,
                Err(e) => return Err(e),
            }
            backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
        }
    }

    /// Connects again and resumes the session, replacing the lost connection. What waits in
    /// the outbox is for the caller to flush; messages not acknowledged on the old connection
    /// are delivered again on the new one (and dropped as duplicates if already kept).
    pub async fn reconnect(&self) -> Result<(), MessengerError> {
        let how = self.reconnect.as_ref().ok_or_else(|| {
            MessengerError::Client(ClientError::ConnectionLost(
                "the connection is gone and this client cannot reconnect".into(),
            ))
        })?;
        let client = Client::connect(&how.options).await?;
        client.resume_with(how.token.clone(), how.deliver).await?;
        let old = match self.client.write() {
            Ok(mut current) => std::mem::replace(&mut *current, Arc::new(client)),
            Err(_) => return Err(MessengerError::Client(ClientError::Poisoned)),
        };
        if let Ok(old) = Arc::try_unwrap(old) {
            old.close().await;
        }
        Ok(())
    }

    /// The keystore of this messenger's home.
    pub fn keystore(&self) -> &Keystore {
        &self.keystore
    }

    /// This user.
    pub fn me(&self) -> &str {
        self.me.as_str()
    }

    /// Closes the connection.
    pub async fn close(self) {
        let client = match self.client.into_inner() {
            Ok(client) => client,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Ok(client) = Arc::try_unwrap(client) {
            client.close().await;
        }
    }

    /// Makes sure this user has keys and the server has their public halves: creates and
    /// publishes them the first time, rotates the signed prekey when it is due, and tops up
    /// one-time prekeys when the server said they run low.
    ///
    /// A home without keys for an account that already has an identity key on the server
    /// (made in another home) gives [`MessengerError::IdentityElsewhere`]: making new keys
    /// here would replace the account's identity. `replace_identity` does it anyway.
    pub async fn ensure_keys_with(&self, replace_identity: bool) -> Result<(), MessengerError> {
        let me = self.me.as_str().to_owned();
        let has_keys = {
            let me = me.clone();
            self.keystore
                .read_async(move |state| match state {
                    Some(existing) if existing.username != me => {
                        Err(MessengerError::OtherUser(existing.username.clone()))
                    }
                    other => Ok(other.is_some()),
                })
                .await??
        };
        if !has_keys && !replace_identity {
            match self.client().fetch_identity(self.me.as_str()).await {
                Ok(_) => return Err(MessengerError::IdentityElsewhere(me)),
                Err(e) if e.is_server(ErrorCode::NoKeys) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let now = unix_now();
        let created = self
            .keystore
            .update_async(move |state| -> Result<bool, MessengerError> {
                match state {
                    Some(existing) if existing.username != me => {
                        Err(MessengerError::OtherUser(existing.username.clone()))
                    }
                    Some(_) => Ok(false),
                    None => {
                        let identity = crate::e2e::IdentityKeyPair::generate()?;
                        let prekeys = PrekeyStore::generate(&identity, PREKEY_BATCH)?;
                        *state = Some(KeyState::new(&me, &identity, prekeys, now));
                        Ok(true)
                    }
                }
            })
            .await?;
        if created {
            return self.publish_all().await;
        }
        let rotate = self
            .keystore
            .update_async(
                move |state| -> Result<Option<SignedPrekey>, MessengerError> {
                    let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                    if now.saturating_sub(state.signed_prekey_rotated_at)
                        < SIGNED_PREKEY_ROTATION.as_secs()
                    {
                        return Ok(None);
                    }
                    let identity = state.identity();
                    let spk = state.prekeys.rotate_signed_prekey(&identity)?;
                    state.signed_prekey_rotated_at = now;
                    Ok(Some(wire_signed(&spk)))
                },
            )
            .await?;
        if let Some(spk) = rotate {
            self.client()
                .publish_keys(None, Some(spk), None, Vec::new())
                .await?;
        }
        match self.client().fetch_identity(self.me.as_str()).await {
            Ok(_) => Ok(()),
            // Keys were made here but never reached the server (a crash in between).
            Err(e) if e.is_server(ErrorCode::NoKeys) => self.publish_all().await,
            Err(e) => Err(e.into()),
        }
    }

    /// [`Messenger::ensure_keys_with`] without replacing an identity made elsewhere.
    pub async fn ensure_keys(&self) -> Result<(), MessengerError> {
        self.ensure_keys_with(false).await
    }

    async fn publish_all(&self) -> Result<(), MessengerError> {
        let (identity, spk, last, one_time) = self
            .keystore
            .read_async(|state| {
                state.map(|s| {
                    (
                        Bin(*s.identity().public().as_bytes()),
                        wire_signed(&s.prekeys.signed_prekey()),
                        wire_signed(&s.prekeys.last_resort_prekey()),
                        s.prekeys
                            .one_time_prekeys()
                            .iter()
                            .map(wire_one_time)
                            .collect::<Vec<_>>(),
                    )
                })
            })
            .await?
            .ok_or(MessengerError::NoKeys)?;
        self.client()
            .publish_keys(Some(identity), Some(spk), Some(last), one_time)
            .await?;
        Ok(())
    }

    pub(super) async fn top_up_prekeys(&self) -> Result<(), MessengerError> {
        let fresh = self
            .keystore
            .update_async(|state| -> Result<Vec<OneTimePrekey>, MessengerError> {
                let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                Ok(state
                    .prekeys
                    .add_one_time_prekeys(PREKEY_BATCH)?
                    .iter()
                    .map(wire_one_time)
                    .collect())
            })
            .await?;
        self.client().publish_keys(None, None, None, fresh).await?;
        Ok(())
    }

    /// Encrypts `text` for `to` and sends it; returns once the server has stored it durably.
    /// The second value is a warning for the user while `to`'s identity key differs from the
    /// one accepted for them.
    ///
    /// The message is sealed into the outbox (one keystore save) and then sent with whatever
    /// waited before it. If the server cannot take it now, the error is
    /// [`MessengerError::Queued`]: it is kept and goes with the next
    /// [`Messenger::flush_outbox`] (each `send_text` makes one). Messages to one peer leave
    /// in the order they were written.
    pub async fn send_text(
        &self,
        to: &str,
        text: &str,
    ) -> Result<(MessageId, Option<String>), MessengerError> {
        let peer = self.recipient(to)?;
        let has_session = {
            let peer = peer.clone();
            self.keystore
                .read_async(move |s| s.is_some_and(|s| s.sessions.contains_key(peer.as_str())))
                .await?
        };
        let bundle = if has_session {
            None
        } else {
            Some(self.client().fetch_bundle(peer.as_str()).await?)
        };
        let (id, warning, outbox) =
            seal_into_outbox(&self.keystore, &self.me, &peer, text, bundle).await?;
        let flushed = self.send_outbox(outbox).await?;
        if flushed.sent.iter().any(|(_, sent)| *sent == id) {
            return Ok((id, warning));
        }
        if let Some((_, _, why)) = flushed.dropped.iter().find(|(_, d, _)| *d == id) {
            return Err(MessengerError::Refused {
                id,
                reason: why.clone(),
            });
        }
        Err(MessengerError::Queued {
            id,
            reason: flushed
                .stopped
                .unwrap_or_else(|| "an earlier message to the same peer waits".into()),
        })
    }

    fn recipient(&self, to: &str) -> Result<Username, MessengerError> {
        let peer = username(to)?;
        if peer == self.me {
            return Err(MessengerError::ToSelf);
        }
        Ok(peer)
    }

    /// The messages waiting in the outbox, oldest first.
    pub async fn outbox(&self) -> Result<Vec<Outgoing>, MessengerError> {
        Ok(self
            .keystore
            .read_async(|s| s.map(|s| s.outbox.iter().cloned().collect()))
            .await?
            .unwrap_or_default())
    }

    /// Sends what waits in the outbox, oldest first, and takes out each message the server
    /// stored (or refused for good). A refusal that may pass (a full inbox, a busy server)
    /// holds back that peer's later messages; a connection failure stops the attempt.
    pub async fn flush_outbox(&self) -> Result<Flushed, MessengerError> {
        let outbox = self.outbox().await?;
        self.send_outbox(outbox).await
    }

    /// [`Messenger::flush_outbox`] of `outbox`, the keystore's outbox as just read.
    pub(super) async fn send_outbox(
        &self,
        outbox: Vec<Outgoing>,
    ) -> Result<Flushed, MessengerError> {
        let mut flushed = Flushed::default();
        let mut held_back = BTreeSet::new();
        // Ids to take out, saved once at the end: a crash before that only means sending them
        // again, which the server answers as duplicates.
        let mut done = Vec::new();
        let read = outbox.len();
        for out in outbox {
            if held_back.contains(&out.to) {
                continue;
            }
            match self
                .client()
                .send_message(&out.to, &out.kind, out.id, &out.envelope)
                .await
            {
                Ok(_) => {
                    done.push(out.id);
                    flushed.sent.push((out.to, out.id));
                }
                Err(e) => match refusal(&e) {
                    Refusal::StopAll => {
                        flushed.stopped = Some(e.to_string());
                        break;
                    }
                    Refusal::HoldPeer => {
                        flushed.stopped = Some(e.to_string());
                        held_back.insert(out.to);
                    }
                    Refusal::Drop => {
                        done.push(out.id);
                        flushed.dropped.push((out.to, out.id, e.to_string()));
                    }
                },
            }
        }
        // Nothing left the outbox: it still holds what was just read (or saved), so there is
        // no need to read the file again.
        flushed.waiting = if done.is_empty() {
            read
        } else {
            self.keystore
                .update_async(move |state| -> Result<usize, MessengerError> {
                    Ok(state.as_mut().map_or(0, |state| {
                        state.outbox.retain(|o| !done.contains(&o.id));
                        state.outbox.len()
                    }))
                })
                .await?
        };
        Ok(flushed)
    }
}

/// Seals `text` for `peer` into the outbox in one keystore save, starting a session from
/// `bundle` when there is none (without a bundle and a session, [`MessengerError::NoSession`]).
/// Returns the message's id, a warning while the peer's identity key differs from the one
/// accepted for it, and the outbox as saved. Refuses, before sealing anything, a peer whose
/// verified identity key changed ([`MessengerError::VerifiedKeyChanged`]).
pub(crate) async fn seal_into_outbox(
    keystore: &Keystore,
    me: &Username,
    peer: &Username,
    text: &str,
    bundle: Option<Bundle>,
) -> Result<(MessageId, Option<String>, Vec<Outgoing>), MessengerError> {
    if text.len() > crate::e2e::MAX_PLAINTEXT_LEN {
        return Err(MessengerError::TooLong {
            len: text.len(),
            max: crate::e2e::MAX_PLAINTEXT_LEN,
        });
    }
    let id = MessageId::random().map_err(|e| MessengerError::Client(ClientError::Io(e.into())))?;
    let (me, peer, text) = (me.clone(), peer.clone(), text.to_owned());
    keystore
        .update_async(move |state| -> Result<_, MessengerError> {
            let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
            let bytes: usize = state.outbox.iter().map(|o| o.envelope.len()).sum();
            if state.outbox.len() >= MAX_OUTBOX || bytes >= MAX_OUTBOX_BYTES {
                return Err(MessengerError::OutboxFull {
                    count: state.outbox.len(),
                    bytes,
                });
            }
            let name = peer.as_str();
            if !state.sessions.contains_key(name) {
                let bundle = bundle
                    .as_ref()
                    .ok_or(MessengerError::NoSession(name.to_owned()))?;
                let bundle = to_bundle(bundle)?;
                state.saw_identity(name, &bundle.identity_key);
                let session = Session::initiate(&state.identity(), &me, &peer, &bundle)?;
                state.activate(name, session);
            }
            // Refused before anything is sealed; an error saves nothing (not even the new
            // session above).
            let trust = state.trust_of(name);
            if trust.verified && trust.changed_to.is_some() {
                return Err(MessengerError::VerifiedKeyChanged(name.to_owned()));
            }
            let warning = trust.changed_to.map(|_| changed_warning(name));
            let session = state.sessions.get_mut(name).ok_or(MessengerError::NoKeys)?;
            let envelope = session.seal(id.0, text.as_bytes())?;
            state.outbox.push_back(Outgoing {
                to: name.to_owned(),
                id,
                kind: TEXT.to_owned(),
                envelope: envelope.to_bytes()?,
            });
            state.remember(HistoryEntry {
                peer: name.to_owned(),
                outgoing: true,
                id,
                at: unix_now(),
                text,
                resent: false,
            });
            Ok((id, warning, state.outbox.iter().cloned().collect()))
        })
        .await
}
