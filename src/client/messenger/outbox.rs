//! Sending: a message is sealed into the outbox (one keystore save), then the outbox is sent
//! oldest first; what the server stores (or refuses for good) leaves it.

use std::collections::BTreeSet;

use super::super::ClientError;
use super::super::copies::{self, Bundles, Destinations, Draft};
use super::devices::{copies_error, trust_check};
use super::{FILE, HistoryEntry, Keystore, Messenger, MessengerError, Outgoing, TEXT, username};
use crate::protocol::{ErrorCode, MessageId, Username};
use crate::unix_now;

/// Most messages the outbox holds. Below the ratchet's `MAX_SKIP` (1,000), so even if every
/// queued message to one peer were refused for good, the gap they leave stays openable.
pub const MAX_OUTBOX: usize = 256;
/// Most envelope bytes the outbox holds (it is saved with the keystore at every change).
pub const MAX_OUTBOX_BYTES: usize = 2 * 1024 * 1024;

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
pub(super) enum Refusal {
    /// The connection or the session failed: no other message would pass now.
    StopAll,
    /// The server may take it later (a full inbox, a busy or failing server): keep it, and
    /// hold back that peer's later messages so they stay in order.
    HoldPeer,
    /// Refused for good (e.g. `unknown_user`): take it out and report it.
    Drop,
}

pub(super) fn refusal(e: &ClientError) -> Refusal {
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

impl Messenger {
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
        let (id, warning, outbox) = self.seal_text(&peer, text).await?;
        self.send_sealed(id, warning, outbox).await
    }

    /// Sends the outbox just saved with message `id` in it; the outcome of `id` as
    /// [`Self::send_text`] reports it.
    pub(crate) async fn send_sealed(
        &self,
        id: MessageId,
        warning: Option<String>,
        outbox: Vec<Outgoing>,
    ) -> Result<(MessageId, Option<String>), MessengerError> {
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

    /// Seals `text` for every device of `peer` and this account's other devices into the
    /// outbox (one keystore save), fetching the prekey bundles of devices without a session
    /// first. Returns the id, the warning of [`Self::send_text`] and the outbox as saved.
    pub(crate) async fn seal_text(
        &self,
        peer: &Username,
        text: &str,
    ) -> Result<(MessageId, Option<String>, Vec<Outgoing>), MessengerError> {
        let (dest, bundles) = self.destinations(peer).await?;
        seal_into_outbox(&self.keystore, &self.me, peer, text, dest, bundles).await
    }

    /// [`Self::seal_text`] of a text or a file message.
    pub(crate) async fn seal_content(
        &self,
        peer: &Username,
        content: Content,
    ) -> Result<(MessageId, Option<String>, Vec<Outgoing>), MessengerError> {
        let (dest, bundles) = self.destinations(peer).await?;
        seal_content_into_outbox(&self.keystore, &self.me, peer, content, dest, bundles).await
    }

    pub(crate) fn recipient(&self, to: &str) -> Result<Username, MessengerError> {
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
    pub(crate) async fn send_outbox(
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
            let (to, id) = (out.to.clone(), out.id);
            match self.send_one(out).await {
                Ok(()) => {
                    done.push(id);
                    flushed.sent.push((to, id));
                }
                Err((refused, why)) => match refused {
                    Refusal::StopAll => {
                        flushed.stopped = Some(why);
                        break;
                    }
                    Refusal::HoldPeer => {
                        flushed.stopped = Some(why);
                        held_back.insert(to);
                    }
                    Refusal::Drop => {
                        done.push(id);
                        flushed.dropped.push((to, id, why));
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

/// The body of a message stream: its copies' envelopes, one after the other.
pub(super) fn body(out: &Outgoing) -> Vec<u8> {
    out.copies
        .iter()
        .flat_map(|c| c.envelope.iter().copied())
        .collect()
}

/// What a message says: a text, or a file (its reference's plaintext, E15.4).
#[derive(Clone)]
pub(crate) enum Content {
    /// A `text` message.
    Text(String),
    /// A `file` message.
    File {
        /// The file reference as MessagePack.
        plaintext: Vec<u8>,
        /// The file's name, for the history.
        name: String,
    },
}

impl Content {
    fn kind(&self) -> &'static str {
        match self {
            Self::Text(_) => TEXT,
            Self::File { .. } => FILE,
        }
    }

    fn plaintext(&self) -> &[u8] {
        match self {
            Self::Text(text) => text.as_bytes(),
            Self::File { plaintext, .. } => plaintext,
        }
    }
}

/// Seals `text` for `peer` into the outbox in one keystore save, once for each device of
/// `dest` (E14), starting sessions from `bundles` where there are none (a device with neither
/// gives [`MessengerError::NoSession`]). Returns the message's id, a warning while the peer's
/// identity key differs from the one accepted for it, and the outbox as saved. Refuses, before
/// anything is saved, a peer whose verified identity key changed
/// ([`MessengerError::VerifiedKeyChanged`]).
pub(crate) async fn seal_into_outbox(
    keystore: &Keystore,
    me: &Username,
    peer: &Username,
    text: &str,
    dest: Destinations,
    bundles: Bundles,
) -> Result<(MessageId, Option<String>, Vec<Outgoing>), MessengerError> {
    let content = Content::Text(text.to_owned());
    seal_content_into_outbox(keystore, me, peer, content, dest, bundles).await
}

/// [`seal_into_outbox`] of a text or a file message.
pub(crate) async fn seal_content_into_outbox(
    keystore: &Keystore,
    me: &Username,
    peer: &Username,
    content: Content,
    dest: Destinations,
    bundles: Bundles,
) -> Result<(MessageId, Option<String>, Vec<Outgoing>), MessengerError> {
    let len = content.plaintext().len();
    if len > crate::e2e::MAX_PLAINTEXT_LEN {
        return Err(MessengerError::TooLong {
            len,
            max: crate::e2e::MAX_PLAINTEXT_LEN,
        });
    }
    let id = MessageId::random().map_err(|e| MessengerError::Client(ClientError::Io(e.into())))?;
    let (me, peer) = (me.clone(), peer.clone());
    keystore
        .update_async(move |state| -> Result<_, MessengerError> {
            let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
            let bytes: usize = state.outbox.iter().map(Outgoing::bytes).sum();
            if state.outbox.len() >= MAX_OUTBOX || bytes >= MAX_OUTBOX_BYTES {
                return Err(MessengerError::OutboxFull {
                    count: state.outbox.len(),
                    bytes,
                });
            }
            let name = peer.as_str();
            let draft = Draft {
                to: &peer,
                id,
                plaintext: content.plaintext(),
            };
            let copies = copies::seal_copies(state, &me, draft, &dest, &bundles, &[])
                .map_err(|e| copies_error(name, e))?;
            // An error saves nothing (not even the sessions just started), so this refusal
            // after sealing is as good as one before.
            let warning = trust_check(state, name)?;
            let kind = content.kind().to_owned();
            let (text, file, history) = match content {
                Content::Text(text) => (Some(text.clone()), None, text),
                Content::File {
                    plaintext,
                    name: file_name,
                } => (None, Some(plaintext), format!("file: {file_name}")),
            };
            state.outbox.push_back(Outgoing {
                to: name.to_owned(),
                id,
                kind,
                copies,
                text,
                plaintext: file.clone(),
            });
            state.remember(HistoryEntry {
                peer: name.to_owned(),
                outgoing: true,
                id,
                at: unix_now(),
                text: history,
                file,
                resent: false,
                copy: false,
            });
            Ok((id, warning, state.outbox.iter().cloned().collect()))
        })
        .await
}
