//! Receiving for people: a delivered message is opened and kept in the keystore in one save,
//! shown by the application, and only then taken out and acknowledged to the server. A crash
//! at any point shows a message again only if it may not have been shown; it never loses one.
//! What cannot be opened is quarantined and its sender asked to send it again (a `retry`
//! message, `docs/PROTOCOL.md` E8.6, sent to every device of the sender, E14). What a delivery
//! does to the keystore is decided in `keep`.

use std::time::Duration;

use super::copies::{Destinations, known_destinations};
use super::keystore::{FIRST_DEVICE, Incoming};
use super::messenger::{Content, MessengerError, Received, username};
use super::{ClientError, Copies, Delivered, Messenger};
use crate::e2e::FileRef;
use crate::protocol::{MessageId, Username};

mod catch_up;
mod keep;

use keep::{Kept, keep};

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

impl Messenger {
    /// The next message to show, or `None` if nothing arrives within `wait`. Messages an
    /// earlier run kept and never showed come first. Show it, then call
    /// [`Messenger::shown`]. A lost connection is an error (see [`Messenger::reconnect`]).
    pub async fn receive(&self, wait: Duration) -> Result<Option<Received>, MessengerError> {
        if let Some(kept) = self.next_from_backlog().await? {
            return Ok(Some(kept));
        }
        if let Some(kept) = self.next_group_backlog().await? {
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
        if self.client().take_key_packages_low().is_some()
            && let Err(e) = self.ensure_key_packages().await
        {
            tracing::warn!(%e, "could not top up the key packages");
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
        Ok(next.map(|m| to_show(m, None)))
    }

    /// Opens a delivered message and keeps it (or quarantines it) in one keystore save; a
    /// duplicate or a retry request is acknowledged at once. What [`Messenger::receive`] does
    /// with each delivery.
    pub async fn open_delivered(&self, delivered: Delivered) -> Result<Received, MessengerError> {
        if delivered.group.is_some() {
            return self.open_group_delivery(delivered).await;
        }
        let me = self.me().to_owned();
        let seq = delivered.seq;
        let (id, from) = (delivered.id, delivered.from.clone());
        let kept = self
            .keystore()
            .update_async(move |state| -> Result<Kept, MessengerError> {
                let state = state.as_mut().ok_or(MessengerError::NoKeys)?;
                Ok(keep(state, &username(&me)?, &delivered))
            })
            .await?;
        match kept {
            Kept::Text(m) => Ok(to_show(m, Some(seq))),
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
            Kept::Resend {
                peer,
                text,
                file,
                asked,
            } => {
                let content = match file {
                    Some(plaintext) => Content::File {
                        plaintext,
                        name: text.strip_prefix("file: ").unwrap_or(&text).to_owned(),
                    },
                    None => Content::Text(text),
                };
                let resent_as = match self.resend(&peer, content).await {
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
            Received::Text { id, from, seq, .. } | Received::File { id, from, seq, .. } => {
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
            Received::Group { group, id, seq, .. } => {
                self.group_shown(group, *id, *seq).await?;
            }
            Received::RetryRequested { .. }
            | Received::Duplicate
            | Received::GroupNotice { .. } => {}
        }
        Ok(())
    }

    /// Asks `from` to start a new session and send message `id` again. Best effort: the
    /// message stays in the quarantine whatever happens.
    ///
    /// The request is not sealed, but a message must still go to every device of the
    /// recipient and of the sender (part I): each gets the same 16 bytes, and only the device
    /// that sent `id` answers (the others hold no such message, or only a copy of it).
    async fn ask_to_resend(&self, from: &str, id: MessageId) {
        let Ok(request_id) = MessageId::random() else {
            return;
        };
        let dest = match (username(from), username(self.me())) {
            (Ok(peer), Ok(me)) => self
                .keystore()
                .read_async(move |s| s.map(|s| known_destinations(s, &me, &peer)))
                .await
                .ok()
                .flatten(),
            _ => None,
        };
        let mut dest = dest.unwrap_or_default();
        for _ in 0..3 {
            let count = dest.devices.len() + dest.own_devices.len();
            if count == 0 {
                return;
            }
            let legacy = dest.devices == [FIRST_DEVICE] && dest.own_devices.is_empty();
            let copies = (!legacy).then(|| Copies {
                devices: dest.devices.clone(),
                own_devices: dest.own_devices.clone(),
                lengths: vec![id.0.len() as u64; count],
            });
            let body = id.0.repeat(count);
            match self
                .client()
                .send_copies(from, RETRY, request_id, copies, &body)
                .await
            {
                Ok(_) => return,
                Err(ClientError::StaleDevices {
                    devices,
                    own_devices,
                }) => {
                    dest = Destinations {
                        devices,
                        own_devices,
                    }
                }
                Err(e) => {
                    tracing::warn!(%e, "could not ask the sender to resend");
                    return;
                }
            }
        }
        tracing::warn!("could not ask the sender to resend: their devices keep changing");
    }

    /// Seals `content` again for `peer` in a new session (the old one was just reset) and
    /// sends it with the outbox; returns the new id.
    async fn resend(&self, peer: &Username, content: Content) -> Result<MessageId, MessengerError> {
        let (id, _, outbox) = self.seal_content(peer, content).await?;
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

/// What the application is handed for a kept message: a text, or a file with its reference.
fn to_show(m: Incoming, seq: Option<u64>) -> Received {
    // Checked when it was kept; a reference that no longer decodes shows as its name.
    match m.file.as_deref().map(FileRef::from_bytes) {
        Some(Ok(file)) => Received::File {
            id: m.id,
            from: m.from,
            to: m.to,
            sent_at: m.sent_at,
            file,
            warning: m.warning,
            seq,
        },
        _ => Received::Text {
            id: m.id,
            from: m.from,
            to: m.to,
            sent_at: m.sent_at,
            text: m.text,
            warning: m.warning,
            seq,
        },
    }
}
