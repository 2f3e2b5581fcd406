//! Receiving for people: a delivered message is opened and kept in the keystore in one save,
//! shown by the application, and only then taken out and acknowledged to the server. A crash
//! at any point shows a message again only if it may not have been shown; it never loses one.
//! What cannot be opened is quarantined and its sender asked to send it again (a `retry`
//! message, `docs/PROTOCOL.md` E8.6).

use std::time::Duration;

use super::keystore::{HistoryEntry, Incoming, Quarantined};
use super::messenger::{MessengerError, Received, TEXT, changed_warning, username};
use super::{Delivered, Messenger, sessions};
use crate::e2e::E2eError;
use crate::protocol::{MessageId, Username};

/// The `kind` of a retry request: "I could not open your message ID, start a new session and
/// send it again". Its body is the 16-byte id, not sealed.
pub const RETRY: &str = "retry";

/// Silence after which a waiting receiver pings the server to find out whether it is there.
pub const IDLE_PING: Duration = Duration::from_secs(10);

/// What happened to the connection, for the user.
#[derive(Debug)]
pub enum Connection<'a> {
    /// Lost (`why`); the next attempt comes after `wait`.
    Lost {
        /// Why.
        why: &'a str,
        /// Until the next attempt.
        wait: Duration,
    },
    /// Connected again; the outbox was sent.
    Back(&'a super::messenger::Flushed),
}

/// What keeping a delivery in the keystore decided.
enum Kept {
    /// Opened and kept until shown.
    Text(Incoming),
    /// Kept in the quarantine; `ask_again` when the sender should be asked to resend.
    Quarantined {
        from: String,
        reason: String,
        ask_again: bool,
    },
    /// A retry request for a message in the history: seal it again.
    Resend {
        peer: Username,
        text: String,
        asked: MessageId,
    },
    /// A retry request for nothing this user can send again.
    NoResend { asked: Option<MessageId> },
    /// Kept or shown before.
    Duplicate,
}

impl Messenger {
    /// The next message to show, or `None` if nothing arrives within `wait`. Messages an
    /// earlier run kept and never showed come first. Show it, then call
    /// [`Messenger::shown`]. A lost connection is an error (see [`Messenger::reconnect`]).
    pub async fn receive(&self, wait: Duration) -> Result<Option<Received>, MessengerError> {
        if let Some(kept) = self.next_from_backlog().await? {
            return Ok(Some(kept));
        }
        let Some(delivered) = self.client().next_delivery(wait).await else {
            return match self.disconnected() {
                Some(lost) => Err(lost),
                None => Ok(None),
            };
        };
        let received = self.open_delivered(delivered).await?;
        if self.client().take_prekeys_low().is_some() {
            self.top_up_prekeys().await?;
        }
        Ok(Some(received))
    }

    /// [`Messenger::receive`], reconnecting when the connection is lost
    /// ([`Messenger::reconnect_with_backoff`], giving up after `give_up_after`), then sending
    /// what waits in the outbox. `note` hears of each loss (`Lost`) and each return
    /// (`Back`). Called again and again with a short `wait`, it still pings the server after
    /// `IDLE_PING` (10 s) without news from it.
    pub async fn receive_reconnecting(
        &self,
        wait: Duration,
        give_up_after: Option<Duration>,
        note: &mut impl FnMut(Connection<'_>),
    ) -> Result<Option<Received>, MessengerError> {
        loop {
            let received = match self.receive(wait).await {
                Ok(Some(received)) => {
                    self.heard();
                    Ok(Some(received))
                }
                // A receiver that only waits sends nothing the server must answer, so it
                // would learn of a dead server only at the idle timeout: after IDLE_PING of
                // silence it pings (the connection's liveness watch then notices in seconds).
                Ok(None) if self.silent_for() >= IDLE_PING => match self.client().ping().await {
                    Ok(()) => {
                        self.heard();
                        Ok(None)
                    }
                    Err(e) => Err(MessengerError::from(e)),
                },
                other => other,
            };
            match received {
                Err(e) if e.is_disconnected() => {
                    self.reconnect_with_backoff(give_up_after, |why, wait| {
                        note(Connection::Lost { why, wait })
                    })
                    .await?;
                    self.heard();
                    let flushed = self.flush_outbox().await?;
                    note(Connection::Back(&flushed));
                }
                other => return other,
            }
        }
    }

    fn heard(&self) {
        if let Ok(mut last) = self.last_heard.lock() {
            *last = tokio::time::Instant::now();
        }
    }

    fn silent_for(&self) -> Duration {
        self.last_heard
            .lock()
            .map_or(Duration::ZERO, |last| last.elapsed())
    }

    /// Messages kept by an earlier run and not shown: loaded once, then handed out in order.
    async fn next_from_backlog(&self) -> Result<Option<Received>, MessengerError> {
        let loaded = self.backlog_slot(|b| b.is_some())?;
        if !loaded {
            let kept = self
                .keystore()
                .read_async(|s| s.map(|s| s.unshown.clone()).unwrap_or_default())
                .await?;
            self.backlog_slot(|b| *b = Some(kept))?;
        }
        let next = self.backlog_slot(|b| b.as_mut().and_then(|b| b.pop_front()))?;
        Ok(next.map(|m| Received::Text {
            id: m.id,
            from: m.from,
            to: m.to,
            sent_at: m.sent_at,
            text: m.text,
            warning: m.warning,
            seq: None,
        }))
    }

    /// Opens a delivered message and keeps it (or quarantines it) in one keystore save; a
    /// duplicate or a retry request is acknowledged at once. What [`Messenger::receive`] does
    /// with each delivery.
    pub async fn open_delivered(&self, delivered: Delivered) -> Result<Received, MessengerError> {
        let me = self.me().to_owned();
        let seq = delivered.seq;
        let (id, from) = (delivered.id, delivered.from.clone());
        let kept = self
            .keystore()
            .update_async(move |state| -> Result<Kept, MessengerError> {
                let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                if state.seen(&delivered.from, delivered.id) {
                    return Ok(Kept::Duplicate);
                }
                state.mark_seen(&delivered.from, delivered.id);
                let me = username(&me)?;
                let quarantine = |state: &mut super::keystore::KeyState, reason: String, ask| {
                    state.quarantine(Quarantined {
                        id: delivered.id,
                        from: delivered.from.clone(),
                        sent_at: delivered.sent_at,
                        kind: delivered.kind.clone(),
                        reason: reason.clone(),
                        body: delivered.body.clone(),
                    });
                    Kept::Quarantined {
                        from: delivered.from.clone(),
                        reason,
                        ask_again: ask,
                    }
                };
                if let Some(why) = &delivered.refused {
                    return Ok(quarantine(state, why.clone(), false));
                }
                let Ok(peer) = Username::parse(&delivered.from) else {
                    return Ok(quarantine(state, "invalid sender name".into(), false));
                };
                let addressee = match delivered.to.as_deref().map(Username::parse) {
                    None => None,
                    Some(Ok(to)) => Some(to),
                    Some(Err(_)) => {
                        return Ok(quarantine(state, "invalid addressee name".into(), false));
                    }
                };
                // A copy of this account's own message (E14.3) is never answered with a retry.
                let own = peer == me;
                match delivered.kind.as_str() {
                    TEXT => {}
                    RETRY if own => return Ok(Kept::NoResend { asked: None }),
                    RETRY => {
                        let Ok(asked) = <[u8; 16]>::try_from(delivered.body.as_slice()) else {
                            let reason = "malformed retry request".to_owned();
                            return Ok(quarantine(state, reason, false));
                        };
                        let asked = MessageId(asked);
                        let entry = state.history.iter_mut().find(|e| {
                            e.outgoing && !e.resent && e.id == asked && e.peer == peer.as_str()
                        });
                        let Some(entry) = entry else {
                            return Ok(Kept::NoResend { asked: Some(asked) });
                        };
                        entry.resent = true;
                        let text = entry.text.clone();
                        // The peer's device cannot open our session with it: start a fresh one.
                        // (The message goes again to each of the peer's devices, under a new id.)
                        if let Some(sessions) = state
                            .device_sessions
                            .get_mut(peer.as_str())
                            .and_then(|d| d.get_mut(&delivered.from_device))
                            && let Some(old) = sessions.active.take()
                        {
                            sessions.keep(old);
                        }
                        return Ok(Kept::Resend { peer, text, asked });
                    }
                    other => {
                        let reason = format!("unsupported kind {other:?}");
                        return Ok(quarantine(state, reason, false));
                    }
                }
                let from = sessions::Origin {
                    peer: &peer,
                    device: delivered.from_device,
                    to: addressee.as_ref(),
                };
                match sessions::open(state, &me, from, delivered.id, &delivered.body) {
                    Ok(opened) => {
                        let text = String::from_utf8_lossy(&opened.plaintext).into_owned();
                        // The conversation is with the addressee of one's own copy.
                        let other = addressee.as_ref().unwrap_or(&peer).as_str().to_owned();
                        let changed = opened.identity_changed
                            || (!own && state.trust_of(peer.as_str()).changed_to.is_some());
                        let incoming = Incoming {
                            id: delivered.id,
                            from: delivered.from.clone(),
                            to: addressee.as_ref().map(|to| to.as_str().to_owned()),
                            sent_at: delivered.sent_at,
                            text: text.clone(),
                            warning: changed.then(|| changed_warning(peer.as_str())),
                        };
                        state.unshown.push_back(incoming.clone());
                        state.remember(HistoryEntry {
                            peer: other,
                            outgoing: own,
                            id: delivered.id,
                            at: delivered.sent_at,
                            text,
                            resent: false,
                        });
                        Ok(Kept::Text(incoming))
                    }
                    // A replay of a message already opened: nothing to ask for.
                    Err(e @ E2eError::Duplicate) => Ok(quarantine(state, e.to_string(), false)),
                    Err(e) => Ok(quarantine(state, e.to_string(), !own)),
                }
            })
            .await?;
        match kept {
            Kept::Text(m) => Ok(Received::Text {
                id: m.id,
                from: m.from,
                to: m.to,
                sent_at: m.sent_at,
                text: m.text,
                warning: m.warning,
                seq: Some(seq),
            }),
            Kept::Quarantined {
                from,
                reason,
                ask_again,
            } => {
                if ask_again {
                    self.ask_to_resend(&from, id).await;
                }
                Ok(Received::Undecryptable {
                    id,
                    from,
                    reason,
                    seq,
                })
            }
            Kept::Resend { peer, text, asked } => {
                let resent_as = match self.resend(&peer, &text).await {
                    Ok(id) => Some(id),
                    // The server cannot be asked for the peer's keys now: undo, and leave the
                    // request unacknowledged, so that it comes again on the next connection.
                    Err(e) if e.is_disconnected() => {
                        let (peer, from) = (peer.as_str().to_owned(), from.clone());
                        self.keystore()
                            .update_async(move |state| -> Result<(), MessengerError> {
                                if let Some(state) = state.as_mut() {
                                    state.unsee(&from, id);
                                    for entry in state.history.iter_mut() {
                                        if entry.outgoing && entry.id == asked && entry.peer == peer
                                        {
                                            entry.resent = false;
                                        }
                                    }
                                }
                                Ok(())
                            })
                            .await?;
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::warn!(%e, "could not send a message again");
                        None
                    }
                };
                self.client().ack(vec![seq]).await?;
                Ok(Received::RetryRequested {
                    from,
                    id: asked,
                    resent_as,
                })
            }
            Kept::NoResend { asked } => {
                self.client().ack(vec![seq]).await?;
                Ok(Received::RetryRequested {
                    from,
                    id: asked.unwrap_or(id),
                    resent_as: None,
                })
            }
            Kept::Duplicate => {
                self.client().ack(vec![seq]).await?;
                Ok(Received::Duplicate)
            }
        }
    }

    /// Records that the application has shown `received` (or told the user about it): it
    /// leaves the keystore, and the server is told it may delete it.
    pub async fn shown(&self, received: &Received) -> Result<(), MessengerError> {
        match received {
            Received::Text { id, from, seq, .. } => {
                let (id, from) = (*id, from.clone());
                self.keystore()
                    .update_async(move |state| -> Result<(), MessengerError> {
                        if let Some(state) = state.as_mut() {
                            state.unshown.retain(|m| !(m.id == id && m.from == from));
                        }
                        Ok(())
                    })
                    .await?;
                if let Some(seq) = seq {
                    self.client().ack(vec![*seq]).await?;
                }
            }
            Received::Undecryptable { seq, .. } => {
                self.client().ack(vec![*seq]).await?;
            }
            Received::RetryRequested { .. } | Received::Duplicate => {}
        }
        Ok(())
    }

    /// Asks `from` to start a new session and send message `id` again. Best effort: the
    /// message stays in the quarantine whatever happens.
    async fn ask_to_resend(&self, from: &str, id: MessageId) {
        let Ok(request_id) = MessageId::random() else {
            return;
        };
        if let Err(e) = self
            .client()
            .send_message(from, RETRY, request_id, &id.0)
            .await
        {
            tracing::warn!(%e, "could not ask the sender to resend");
        }
    }

    /// Seals `text` again for `peer` in a new session (the old one was just reset) and sends
    /// it with the outbox; returns the new id.
    async fn resend(&self, peer: &Username, text: &str) -> Result<MessageId, MessengerError> {
        let (id, _, outbox) = self.seal_text(peer, text).await?;
        self.send_outbox(outbox).await?;
        Ok(id)
    }

    fn backlog_slot<T>(
        &self,
        f: impl FnOnce(&mut Option<std::collections::VecDeque<Incoming>>) -> T,
    ) -> Result<T, MessengerError> {
        let mut backlog = self
            .backlog
            .lock()
            .map_err(|_| MessengerError::Client(super::ClientError::Poisoned))?;
        Ok(f(&mut backlog))
    }
}
