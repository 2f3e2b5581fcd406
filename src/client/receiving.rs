//! Receiving for people: a delivered message is opened and kept in the keystore in one save,
//! shown by the application, and only then taken out and acknowledged to the server. A crash
//! at any point shows a message again only if it may not have been shown; it never loses one.
//! What cannot be opened is quarantined and its sender asked to send it again (a `retry`
//! message, `docs/PROTOCOL.md` E8.6).

use std::time::Duration;

use super::keystore::{HistoryEntry, Incoming, KeyState, Quarantined};
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
                Ok(keep(state, &username(&me)?, &delivered))
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

/// Keeps a delivered message in the keystore's state: opened and kept until shown (in the
/// history too), quarantined, or a retry request to act on. Pure: the caller saves the state.
fn keep(state: &mut KeyState, me: &Username, delivered: &Delivered) -> Kept {
    if state.seen(&delivered.from, delivered.id) {
        return Kept::Duplicate;
    }
    state.mark_seen(&delivered.from, delivered.id);
    let quarantine = |state: &mut KeyState, reason: String, ask| {
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
        return quarantine(state, why.clone(), false);
    }
    let Ok(peer) = Username::parse(&delivered.from) else {
        return quarantine(state, "invalid sender name".into(), false);
    };
    let addressee = match delivered.to.as_deref().map(Username::parse) {
        None => None,
        Some(Ok(to)) => Some(to),
        Some(Err(_)) => {
            return quarantine(state, "invalid addressee name".into(), false);
        }
    };
    // A copy of this account's own message (E14.3) is never answered with a retry.
    let own = peer == *me;
    match delivered.kind.as_str() {
        TEXT => {}
        RETRY if own => return Kept::NoResend { asked: None },
        RETRY => {
            let Ok(asked) = <[u8; 16]>::try_from(delivered.body.as_slice()) else {
                let reason = "malformed retry request".to_owned();
                return quarantine(state, reason, false);
            };
            let asked = MessageId(asked);
            let entry = state
                .history
                .iter_mut()
                .find(|e| e.outgoing && !e.resent && e.id == asked && e.peer == peer.as_str());
            let Some(entry) = entry else {
                return Kept::NoResend { asked: Some(asked) };
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
            return Kept::Resend { peer, text, asked };
        }
        other => {
            let reason = format!("unsupported kind {other:?}");
            return quarantine(state, reason, false);
        }
    }
    let from = sessions::Origin {
        peer: &peer,
        device: delivered.from_device,
        to: addressee.as_ref(),
    };
    match sessions::open(state, me, from, delivered.id, &delivered.body) {
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
            Kept::Text(incoming)
        }
        // A replay of a message already opened: nothing to ask for.
        Err(e @ E2eError::Duplicate) => quarantine(state, e.to_string(), false),
        Err(e) => quarantine(state, e.to_string(), !own),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::copies::{self, Bundles, Destinations, Draft};
    use crate::client::keystore::DeviceId;
    use crate::e2e::{IdentityKeyPair, PrekeyBundle, PrekeyStore};

    fn device(account: &str, seed: u8, device: DeviceId) -> (Username, KeyState) {
        let identity = IdentityKeyPair::from_seed(&[seed; 32]);
        let prekeys = PrekeyStore::generate(&identity, 4).unwrap();
        (
            Username::parse(account).unwrap(),
            KeyState::for_device(account, device, &identity, prekeys, 0),
        )
    }

    fn bundle(state: &KeyState) -> PrekeyBundle {
        PrekeyBundle {
            identity_key: state.identity().public(),
            signed_prekey: state.prekeys.signed_prekey(),
            one_time_prekey: state.prekeys.one_time_prekeys().first().cloned(),
            last_resort_prekey: None,
        }
    }

    /// `from` seals `text` to `to`'s device `to_device` and, as a copy, to its own `own`.
    fn send(
        from: &mut (Username, KeyState),
        to: (&Username, &KeyState),
        own: &KeyState,
        n: u8,
        text: &str,
    ) -> Vec<Delivered> {
        let dest = Destinations {
            devices: vec![to.1.device],
            own_devices: vec![own.device],
        };
        let bundles = Bundles {
            peer: [(to.1.device, bundle(to.1))].into(),
            own: [(own.device, bundle(own))].into(),
        };
        let draft = Draft {
            to: to.0,
            id: MessageId([n; 16]),
            plaintext: text.as_bytes(),
        };
        let copies = copies::seal_copies(&mut from.1, &from.0, draft, &dest, &bundles, &[]);
        copies
            .unwrap()
            .into_iter()
            .map(|c| Delivered {
                seq: u64::from(n),
                id: MessageId([n; 16]),
                from: from.0.as_str().to_owned(),
                from_device: from.1.device,
                to: c.own.then(|| to.0.as_str().to_owned()),
                sent_at: 7,
                kind: TEXT.into(),
                body: c.envelope,
                refused: None,
            })
            .collect()
    }

    /// alice writes to bob from her device 1: her device 2 keeps the copy as a message she
    /// sent to bob (history, `to`), and a copy relabelled or stripped of its addressee is
    /// quarantined without asking anyone to resend it.
    #[test]
    fn an_own_copy_is_kept_as_sent_to_its_addressee() {
        let mut a1 = device("alice", 1, 1);
        let mut a2 = device("alice", 1, 2);
        let b1 = device("bob", 2, 1);
        let sent = send(&mut a1, (&b1.0, &b1.1), &a2.1, 1, "hello bob");
        let mut copy = sent[1].clone();
        for (to, why) in [
            (Some("carol"), "decryption failed"),
            (None, "only copies"),
            (Some("not a name!"), "invalid addressee"),
        ] {
            copy.to = to.map(str::to_owned);
            // Each try is a new delivery as far as the seen ids go.
            a2.1.unsee("alice", copy.id);
            match keep(&mut a2.1, &a2.0, &copy) {
                Kept::Quarantined {
                    reason, ask_again, ..
                } => {
                    assert!(reason.contains(why), "{reason}");
                    assert!(!ask_again);
                }
                _ => panic!("{to:?} was not quarantined"),
            }
        }
        a2.1.unsee("alice", copy.id);
        let Kept::Text(incoming) = keep(&mut a2.1, &a2.0, &sent[1]) else {
            panic!("the copy did not open");
        };
        assert_eq!(incoming.to.as_deref(), Some("bob"));
        assert_eq!(
            (incoming.from.as_str(), incoming.text.as_str()),
            ("alice", "hello bob")
        );
        assert!(incoming.warning.is_none());
        let last = a2.1.history.back().unwrap();
        assert_eq!((last.peer.as_str(), last.outgoing), ("bob", true));
        assert!(matches!(keep(&mut a2.1, &a2.0, &sent[1]), Kept::Duplicate));
    }

    /// bob answers from his device 2: alice's device 1 opens it in a session with bob's
    /// device 2 (its session with device 1 untouched); a retry request from bob's device 2
    /// ends only the session with that device, and one from alice's own account is ignored.
    #[test]
    fn a_peer_device_gets_its_own_session_and_its_own_reset() {
        let mut a1 = device("alice", 1, 1);
        let a2 = device("alice", 1, 2);
        let mut b1 = device("bob", 2, 1);
        let mut b2 = device("bob", 2, 2);
        let first = send(&mut a1, (&b1.0, &b1.1), &a2.1, 1, "hi bob");
        assert!(matches!(keep(&mut b1.1, &b1.0, &first[0]), Kept::Text(_)));
        let answer = send(&mut b2, (&a1.0, &a1.1), &b1.1, 2, "hi from my laptop");
        let Kept::Text(incoming) = keep(&mut a1.1, &a1.0, &answer[0]) else {
            panic!("bob's device 2 did not open");
        };
        assert_eq!(
            (incoming.text.as_str(), incoming.to),
            ("hi from my laptop", None)
        );
        assert_eq!(a1.1.known_devices("bob"), [1, 2]);
        assert_eq!(a1.1.history.back().unwrap().peer, "bob");

        let mut retry = answer[0].clone();
        retry.id = MessageId([9; 16]);
        retry.kind = RETRY.into();
        retry.body = MessageId([1; 16]).0.to_vec();
        a1.1.remember(HistoryEntry {
            peer: "bob".into(),
            outgoing: true,
            id: MessageId([1; 16]),
            at: 7,
            text: "hi bob".into(),
            resent: false,
        });
        let one = *a1.1.active("bob", 1).unwrap().origin();
        assert!(matches!(
            keep(&mut a1.1, &a1.0, &retry),
            Kept::Resend { .. }
        ));
        assert!(a1.1.active("bob", 2).is_none());
        assert_eq!(a1.1.active("bob", 1).map(|s| *s.origin()), Some(one));
        let mut own_retry = retry.clone();
        own_retry.from = "alice".into();
        own_retry.id = MessageId([10; 16]);
        assert!(matches!(
            keep(&mut a1.1, &a1.0, &own_retry),
            Kept::NoResend { asked: None }
        ));
    }
}
