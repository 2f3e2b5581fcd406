//! End-to-end messaging for people: keys created and published at signup, sessions set up from
//! prekey bundles, text sealed before it leaves and opened after it arrives, duplicates
//! dropped, acknowledgements sent only once a message is safely recorded.
//!
//! Here: the [`Messenger`] and its connection, and what the application is handed
//! ([`Received`], [`Fingerprint`]). `error` has [`MessengerError`], `keys` this device's keys
//! on the server, `outbox` sending; receiving is in `super::receiving`, trust in
//! `super::trust`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::keystore::{HistoryEntry, Incoming, KeyState, Keystore, Outgoing, ReceiveLock};
use super::{Client, ClientError, ClientOptions};
use crate::protocol::{MessageId, SessionToken, Username};

mod devices;
mod error;
mod keys;
mod outbox;

pub use error::MessengerError;
pub(crate) use keys::{to_bundle, wire_one_time, wire_signed};
pub(crate) use outbox::{Content, seal_into_outbox};
pub use outbox::{Flushed, MAX_OUTBOX, MAX_OUTBOX_BYTES};

/// One-time prekeys made at signup and at each top-up.
pub const PREKEY_BATCH: u32 = 100;
/// The signed prekey is replaced this often.
pub const SIGNED_PREKEY_ROTATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The `kind` of a text message.
pub const TEXT: &str = "text";
/// The `kind` of a file message (its plaintext a file reference, E15.4).
pub const FILE: &str = "file";

/// The longest wait between two attempts to reconnect.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// A message as the application sees it. Show it, then call [`Messenger::shown`]: only then
/// is it acknowledged to the server and taken out of the keystore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A message to show.
    Text {
        /// The sender's id for it.
        id: MessageId,
        /// The sender (this user, for a copy of a message sent from another of its devices).
        from: String,
        /// On a copy of a message this user sent from another device: whom it went to.
        to: Option<String>,
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
    /// A file (a `file` message, E15.4): fetch it with [`Messenger::download_file`], then
    /// show it and call [`Messenger::shown`].
    File {
        /// The sender's id for it.
        id: MessageId,
        /// The sender (this user, for a copy of a file sent from another of its devices).
        from: String,
        /// On a copy of a file this user sent from another device: whom it went to.
        to: Option<String>,
        /// When the server stored it (Unix seconds).
        sent_at: u64,
        /// Where the sealed file is and how to open it; its name and type come from the
        /// sender (see [`crate::client::files::safe_file_name`]).
        file: crate::e2e::FileRef,
        /// Set while the sender's identity key differs from the one accepted for them.
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
    /// A text in a group (issue 22): show it as `GROUP/FROM`, then call
    /// [`Messenger::shown`].
    Group {
        /// The group's name.
        group: String,
        /// The sender's id for it.
        id: MessageId,
        /// The sender (from its verified MLS credential).
        from: String,
        /// The sender's device.
        from_device: u32,
        /// When the server stored it (Unix seconds).
        sent_at: u64,
        /// The text.
        text: String,
        /// The server's sequence number, acknowledged by [`Messenger::shown`].
        seq: Option<u64>,
    },
    /// Something happened to a group (joined, changed, removed, a user left, a delivery
    /// refused). Already acknowledged; tell the user ([`Received::describe`]).
    GroupNotice {
        /// The group's name.
        group: String,
        /// What happened.
        notice: super::groups::GroupNotice,
    },
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
            Self::GroupNotice { group, notice } => Some(notice.describe(group)),
            // Shown as `sfc recv` prints group texts (`GROUP/FROM<TAB>TEXT`), so that a caller
            // that does not handle group texts yet still shows them.
            Self::Group {
                group, from, text, ..
            } => Some(format!("{group}/{from}\t{text}")),
            Self::Text { .. } | Self::File { .. } | Self::Duplicate => None,
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
        let dest = {
            let (me, peer) = (self.me.clone(), peer.clone());
            self.keystore
                .read_async(move |s| s.map(|s| super::copies::known_destinations(s, &me, &peer)))
                .await?
                .ok_or(MessengerError::NoKeys)?
        };
        let (id, _, _) = seal_into_outbox(
            &self.keystore,
            &self.me,
            &peer,
            text,
            dest,
            Default::default(),
        )
        .await?;
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
    /// Group messages an earlier run decrypted and never showed (kept in the MLS state).
    pub(super) group_backlog: std::sync::Mutex<Option<VecDeque<crate::e2e::mls::KeptMessage>>>,
    /// Held while this messenger receives: one receiver per home.
    _receiving: Option<ReceiveLock>,
    /// When the server was last heard from (a delivery or a ping answered), for the idle
    /// ping of [`Messenger::receive_reconnecting`].
    pub(super) last_heard: std::sync::Mutex<tokio::time::Instant>,
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
            group_backlog: std::sync::Mutex::new(None),
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
}
