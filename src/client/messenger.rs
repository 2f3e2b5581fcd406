//! End-to-end messaging for people: keys created and published at signup, sessions set up from
//! prekey bundles, text sealed before it leaves and opened after it arrives, duplicates
//! dropped, acknowledgements sent only once a message is safely recorded.

use std::collections::BTreeSet;
use std::time::Duration;

use super::keystore::{KeyState, Keystore, Outgoing};
use super::{Bundle, Client, ClientError, Delivered};
use crate::e2e::{
    E2eError, Envelope, IdentityKey, OneTimePrekeyPublic, PrekeyBundle, PrekeyStore, Session,
    SignedPrekeyPublic, safety_number,
};
use crate::protocol::keys::{Bin, OneTimePrekey, SignedPrekey};
use crate::protocol::{ErrorCode, MessageId, Username};
use crate::unix_now;

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
    #[error("encryption: {0}")]
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
            ErrorCode::NotAuthenticated => Refusal::StopAll,
            ErrorCode::InboxFull
            | ErrorCode::Busy
            | ErrorCode::Internal
            | ErrorCode::RateLimited => Refusal::HoldPeer,
            _ => Refusal::Drop,
        },
        _ => Refusal::StopAll,
    }
}

/// A message as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A message, shown for the first time.
    Text {
        /// The sender's id for it.
        id: MessageId,
        /// The sender.
        from: String,
        /// When the server stored it (Unix seconds).
        sent_at: u64,
        /// The text.
        text: String,
        /// Set when the sender's identity key changed: show it to the user.
        warning: Option<String>,
    },
    /// A message that could not be opened (tampered, replayed, or from a broken session);
    /// it was acknowledged so it is not delivered again.
    Undecryptable {
        /// The sender's id for it.
        id: MessageId,
        /// The claimed sender.
        from: String,
        /// Why.
        reason: String,
    },
    /// A redelivery of a message already shown; acknowledged and otherwise ignored.
    Duplicate,
}

/// A logged-in client with its keystore.
pub struct Messenger {
    client: Client,
    keystore: Keystore,
    me: Username,
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

fn username(name: &str) -> Result<Username, MessengerError> {
    Username::parse(name).map_err(|_| MessengerError::BadName(name.to_owned()))
}

fn changed_warning(peer: &str) -> String {
    format!(
        "{peer}'s identity key has changed (new device, or someone in the middle): \
         compare safety numbers with `sfc fingerprint {peer}`"
    )
}

impl Messenger {
    /// Wraps an authenticated client; `home` holds (or will hold) `me`'s keys.
    pub fn new(client: Client, home: &std::path::Path, me: &str) -> Result<Self, MessengerError> {
        let home = super::home::Home::open(home)?;
        Ok(Self {
            client,
            keystore: Keystore::new(home.dir()),
            me: username(me)?,
        })
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.client.close().await;
    }

    /// Makes sure this user has keys and the server has their public halves: creates and
    /// publishes them the first time, rotates the signed prekey when it is due, and tops up
    /// one-time prekeys when the server said they run low.
    pub async fn ensure_keys(&self) -> Result<(), MessengerError> {
        let me = self.me.as_str().to_owned();
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
            self.client
                .publish_keys(None, Some(spk), None, Vec::new())
                .await?;
        }
        match self.client.fetch_identity(self.me.as_str()).await {
            Ok(_) => Ok(()),
            // Keys were made here but never reached the server (a crash in between).
            Err(e) if e.is_server(ErrorCode::NoKeys) => self.publish_all().await,
            Err(e) => Err(e.into()),
        }
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
        self.client
            .publish_keys(Some(identity), Some(spk), Some(last), one_time)
            .await?;
        Ok(())
    }

    async fn top_up_prekeys(&self) -> Result<(), MessengerError> {
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
        self.client.publish_keys(None, None, None, fresh).await?;
        Ok(())
    }

    /// Encrypts `text` for `to` and sends it; returns once the server has stored it durably.
    /// The second value is a warning for the user when `to`'s identity key changed.
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
        let peer = username(to)?;
        let has_session = {
            let peer = peer.clone();
            self.keystore
                .read_async(move |s| s.is_some_and(|s| s.sessions.contains_key(peer.as_str())))
                .await?
        };
        let bundle = if has_session {
            None
        } else {
            Some(self.client.fetch_bundle(peer.as_str()).await?)
        };
        let id =
            MessageId::random().map_err(|e| MessengerError::Client(ClientError::Io(e.into())))?;
        let (me, text) = (self.me.clone(), text.to_owned());
        // The same save returns the outbox to send, so the flush need not read it again.
        let (warning, outbox) = self
            .keystore
            .update_async(move |state| -> Result<_, MessengerError> {
                let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                let bytes: usize = state.outbox.iter().map(|o| o.envelope.len()).sum();
                if state.outbox.len() >= MAX_OUTBOX || bytes >= MAX_OUTBOX_BYTES {
                    return Err(MessengerError::OutboxFull {
                        count: state.outbox.len(),
                        bytes,
                    });
                }
                let mut warning = None;
                if !state.sessions.contains_key(peer.as_str()) {
                    let bundle = bundle.as_ref().ok_or(MessengerError::NoKeys)?;
                    let bundle = to_bundle(bundle)?;
                    let session = Session::initiate(&state.identity(), &me, &peer, &bundle)?;
                    if state.pin(peer.as_str(), &bundle.identity_key).is_some() {
                        warning = Some(changed_warning(peer.as_str()));
                    }
                    state.sessions.insert(peer.as_str().to_owned(), session);
                }
                let session = state
                    .sessions
                    .get_mut(peer.as_str())
                    .ok_or(MessengerError::NoKeys)?;
                let envelope = session.seal(id.0, text.as_bytes())?;
                state.outbox.push_back(Outgoing {
                    to: peer.as_str().to_owned(),
                    id,
                    kind: TEXT.to_owned(),
                    envelope: envelope.to_bytes()?,
                });
                Ok((warning, state.outbox.iter().cloned().collect()))
            })
            .await?;
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
    async fn send_outbox(&self, outbox: Vec<Outgoing>) -> Result<Flushed, MessengerError> {
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
                .client
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

    /// The next message, opened, or `None` if nothing arrives within `wait`. It is
    /// acknowledged to the server only after it is recorded as seen.
    pub async fn receive(&self, wait: Duration) -> Result<Option<Received>, MessengerError> {
        let Some(delivered) = self.client.next_delivery(wait).await else {
            return Ok(None);
        };
        let seq = delivered.seq;
        let received = self.open_delivered(delivered).await?;
        self.client.ack(vec![seq]).await?;
        if self.client.take_prekeys_low().is_some() {
            self.top_up_prekeys().await?;
        }
        Ok(Some(received))
    }

    /// Opens a delivered message and records it as seen (without acknowledging it): what
    /// [`Messenger::receive`] does between the delivery and the ack.
    pub async fn open_delivered(&self, delivered: Delivered) -> Result<Received, MessengerError> {
        let me = self.me.clone();
        let received = self
            .keystore
            .update_async(move |state| -> Result<Received, MessengerError> {
                let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                if state.seen(&delivered.from, delivered.id) {
                    return Ok(Received::Duplicate);
                }
                let undecryptable = |reason: String| Received::Undecryptable {
                    id: delivered.id,
                    from: delivered.from.clone(),
                    reason,
                };
                let Ok(peer) = Username::parse(&delivered.from) else {
                    return Ok(undecryptable("invalid sender name".into()));
                };
                let opened = open(state, &me, &peer, delivered.id, &delivered.body);
                state.mark_seen(&delivered.from, delivered.id);
                Ok(match opened {
                    Ok((plaintext, warning)) => Received::Text {
                        id: delivered.id,
                        from: delivered.from.clone(),
                        sent_at: delivered.sent_at,
                        text: String::from_utf8_lossy(&plaintext).into_owned(),
                        warning,
                    },
                    Err(e) => undecryptable(e.to_string()),
                })
            })
            .await?;
        Ok(received)
    }

    /// The safety number of this user and `peer` (as the server currently lists `peer`'s key).
    pub async fn fingerprint(&self, peer: &str) -> Result<String, MessengerError> {
        let peer_name = username(peer)?;
        let key = self.client.fetch_identity(peer_name.as_str()).await?;
        let peer_key = IdentityKey::from_bytes(&key.0)?;
        let mine = self
            .keystore
            .read_async(|s| s.map(|s| s.identity().public()))
            .await?
            .ok_or(MessengerError::NoKeys)?;
        Ok(safety_number(&self.me, &mine, &peer_name, &peer_key))
    }
}

/// Opens an envelope from `peer`, setting up a session when it starts a new one.
fn open(
    state: &mut KeyState,
    me: &Username,
    peer: &Username,
    id: MessageId,
    body: &[u8],
) -> Result<(Vec<u8>, Option<String>), E2eError> {
    let envelope = Envelope::from_bytes(body)?;
    if let Some(session) = state.sessions.get_mut(peer.as_str()) {
        match session.open(id.0, &envelope) {
            Ok(plaintext) => return Ok((plaintext, None)),
            Err(E2eError::NewSession | E2eError::IdentityChanged { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let identity = state.identity();
    let (session, plaintext) =
        Session::accept(&identity, &mut state.prekeys, me, peer, id.0, &envelope)?;
    let warning = state
        .pin(peer.as_str(), session.peer_identity())
        .map(|_| changed_warning(peer.as_str()));
    state.sessions.insert(peer.as_str().to_owned(), session);
    Ok((plaintext, warning))
}
