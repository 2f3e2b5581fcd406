//! Which session opens a message from a peer's device: the active one with that device, an
//! earlier one kept, or a new one the envelope starts, with the tie-break for two devices that
//! start at the same moment (`docs/PROTOCOL.md` E8.3–E8.5, E14). A message from this account's
//! own other device is a copy of what it sent to someone (E14) and opens only under the
//! addressee it names. Pure functions over the keystore's state: no I/O.

use super::keystore::{DeviceId, KeyState};
use crate::e2e::{E2eError, Envelope, Session};
use crate::protocol::{MessageId, Username};

/// Who sent a delivered message, as its header says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    /// The sending account (`from`).
    pub peer: &'a Username,
    /// Its device (`from_device`).
    pub device: DeviceId,
    /// On a copy of this account's own message: whom it was sent to (`to`).
    pub to: Option<&'a Username>,
}

/// A message opened, and what it says about the peer's identity.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The plaintext.
    pub plaintext: Vec<u8>,
    /// The peer presents an identity key other than the one pinned for it.
    pub identity_changed: bool,
}

/// Opens an envelope from `from`.
///
/// An envelope goes first to the session with the sending device it belongs to: with an
/// initial header, the session that header started (active or kept); without one, the active
/// session and then the kept ones, newest first. Only an initial header that belongs to no
/// session starts a new one (E8.2), which becomes the active session with that device unless
/// both sides started at once and ours wins the tie-break ((name, device) sorts first): then
/// the peer's is kept, only to open what was sealed in it. A first message replayed later
/// belongs to the session it started, where its key is gone: it is refused as a duplicate
/// and never starts a second session (on the never-deleted last-resort prekey).
///
/// A message from `me` must be a copy naming its addressee (`from.to`), and only such a
/// message may name one ([`E2eError::NotOwnDevice`] otherwise); a copy opens under the
/// addressee it was sealed for, and a new session from one of this account's devices must
/// present this account's identity key.
pub(crate) fn open(
    state: &mut KeyState,
    me: &Username,
    from: Origin<'_>,
    id: MessageId,
    body: &[u8],
) -> Result<Opened, E2eError> {
    let (peer, device) = (from.peer, from.device);
    if (peer == me) != from.to.is_some() {
        return Err(E2eError::NotOwnDevice);
    }
    let envelope = Envelope::from_bytes(body)?;
    let opened = |plaintext| Opened {
        plaintext,
        identity_changed: false,
    };
    let open_in = |session: &mut Session| match from.to {
        Some(to) => session.open_copy(id.0, to, &envelope),
        None => session.open(id.0, &envelope),
    };
    let origin = envelope.initial.as_ref().map(|i| i.ephemeral_key);
    let belongs = |s: &Session| origin.is_none_or(|o| *s.origin() == o);
    let mut failure = None;
    if let Some(sessions) = state
        .device_sessions
        .get_mut(peer.as_str())
        .and_then(|d| d.get_mut(&device))
    {
        if let Some(session) = sessions.active.as_mut()
            && belongs(session)
        {
            match open_in(session) {
                Ok(plaintext) => return Ok(opened(plaintext)),
                Err(e) => failure = Some(e),
            }
        }
        for session in sessions.kept.iter_mut().filter(|s| belongs(s)) {
            match open_in(session) {
                Ok(plaintext) => return Ok(opened(plaintext)),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
    }
    if let Some(e) = failure {
        // The envelope belongs to a session we hold and does not open in it.
        return Err(e);
    }
    if origin.is_none() {
        return Err(E2eError::DecryptionFailed);
    }
    let identity = state.identity();
    let (session, plaintext) = match from.to {
        Some(to) => Session::accept_copy(&identity, &mut state.prekeys, me, to, id.0, &envelope)?,
        None => Session::accept(&identity, &mut state.prekeys, me, peer, id.0, &envelope)?,
    };
    // This account's own identity was checked by `accept_copy`; it is not pinned.
    let identity_changed =
        from.to.is_none() && state.saw_identity(peer.as_str(), session.peer_identity());
    let ours_first = (me.as_str().as_bytes(), state.device) < (peer.as_str().as_bytes(), device);
    let ours_wins = !identity_changed
        && ours_first
        && state.active(peer.as_str(), device).is_some_and(|ours| {
            ours.awaiting_reply() && ours.peer_identity() == session.peer_identity()
        });
    if ours_wins {
        state.keep(peer.as_str(), device, session);
    } else {
        state.activate(peer.as_str(), device, session);
    }
    Ok(Opened {
        plaintext,
        identity_changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::{IdentityKeyPair, PrekeyBundle, PrekeyStore};

    fn party(name: &str) -> (Username, KeyState) {
        let identity = IdentityKeyPair::generate().unwrap();
        let prekeys = PrekeyStore::generate(&identity, 4).unwrap();
        (
            Username::parse(name).unwrap(),
            KeyState::new(name, &identity, prekeys, 0),
        )
    }

    fn bundle(state: &KeyState) -> PrekeyBundle {
        PrekeyBundle {
            identity_key: state.identity().public(),
            signed_prekey: state.prekeys.signed_prekey(),
            one_time_prekey: state.prekeys.one_time_prekeys().first().cloned(),
            last_resort_prekey: Some(state.prekeys.last_resort_prekey()),
        }
    }

    /// `from` seals `text` to `to` with its active session, starting one if it has none.
    fn seal(
        from: &mut (Username, KeyState),
        to: &(Username, KeyState),
        n: u8,
        text: &str,
    ) -> (MessageId, Vec<u8>) {
        let (me, state) = from;
        if state.active(to.0.as_str(), 1).is_none() {
            let session = Session::initiate(&state.identity(), me, &to.0, &bundle(&to.1)).unwrap();
            state.saw_identity(to.0.as_str(), session.peer_identity());
            state.activate(to.0.as_str(), 1, session);
        }
        let id = MessageId([n; 16]);
        let session = state.active_mut(to.0.as_str(), 1).unwrap();
        (
            id,
            session
                .seal(id.0, text.as_bytes())
                .unwrap()
                .to_bytes()
                .unwrap(),
        )
    }

    fn device_1(peer: &Username) -> Origin<'_> {
        Origin {
            peer,
            device: 1,
            to: None,
        }
    }

    fn read(
        to: &mut (Username, KeyState),
        from: &Username,
        sealed: &(MessageId, Vec<u8>),
    ) -> String {
        let opened = open(&mut to.1, &to.0, device_1(from), sealed.0, &sealed.1).unwrap();
        String::from_utf8(opened.plaintext).unwrap()
    }

    /// Alice and Bob write first at the same moment. Each receives the other's first message
    /// after sending its own; both end on alice's session (alice sorts first), every message
    /// opens, and the conversation goes on both ways.
    #[test]
    fn simultaneous_first_messages_settle_on_one_session_and_lose_nothing() {
        let mut alice = party("alice");
        let mut bob = party("bob");
        let a1 = seal(&mut alice, &bob, 1, "hi bob");
        let b1 = seal(&mut bob, &alice, 2, "hi alice");
        let b2 = seal(&mut bob, &alice, 3, "are you there?");
        assert_eq!(read(&mut bob, &alice.0, &a1), "hi bob");
        assert_eq!(read(&mut alice, &bob.0, &b1), "hi alice");
        // Bob switched to alice's session; alice kept hers and reads bob's as a kept one.
        let origin = |s: &(Username, KeyState), peer: &str| *s.1.active(peer, 1).unwrap().origin();
        assert_eq!(origin(&alice, "bob"), origin(&bob, "alice"));
        let b3 = seal(&mut bob, &alice, 4, "on your session now");
        let a2 = seal(&mut alice, &bob, 5, "got it");
        assert_eq!(read(&mut alice, &bob.0, &b2), "are you there?");
        assert_eq!(read(&mut alice, &bob.0, &b3), "on your session now");
        assert_eq!(read(&mut bob, &alice.0, &a2), "got it");
        for n in 6..12 {
            let m = seal(&mut alice, &bob, n, &format!("a{n}"));
            assert_eq!(read(&mut bob, &alice.0, &m), format!("a{n}"));
            let m = seal(&mut bob, &alice, n + 100, &format!("b{n}"));
            assert_eq!(read(&mut alice, &bob.0, &m), format!("b{n}"));
        }
        assert!(!alice.1.active("bob", 1).unwrap().awaiting_reply());
        assert!(!bob.1.active("alice", 1).unwrap().awaiting_reply());
    }

    /// The same in the other order of names: the tie-break does not depend on who is first
    /// to receive.
    #[test]
    fn the_tie_break_holds_whichever_side_reads_first() {
        let mut zed = party("zed");
        let mut amy = party("amy");
        let z1 = seal(&mut zed, &amy, 1, "from zed");
        let a1 = seal(&mut amy, &zed, 2, "from amy");
        assert_eq!(read(&mut amy, &zed.0, &z1), "from zed");
        assert_eq!(read(&mut zed, &amy.0, &a1), "from amy");
        assert_eq!(
            amy.1.active("zed", 1).unwrap().origin(),
            zed.1.active("amy", 1).unwrap().origin()
        );
        let z2 = seal(&mut zed, &amy, 3, "zed again");
        assert_eq!(read(&mut amy, &zed.0, &z2), "zed again");
        let a2 = seal(&mut amy, &zed, 4, "amy again");
        assert_eq!(read(&mut zed, &amy.0, &a2), "amy again");
    }

    /// A first message replayed after the conversation moved on is refused and does not
    /// replace the session (the old behaviour accepted it again on the last-resort key).
    #[test]
    fn a_replayed_first_message_is_refused_and_keeps_the_session() {
        let mut alice = party("alice");
        let mut bob = party("bob");
        let first = seal(&mut alice, &bob, 1, "first");
        assert_eq!(read(&mut bob, &alice.0, &first), "first");
        let reply = seal(&mut bob, &alice, 2, "reply");
        assert_eq!(read(&mut alice, &bob.0, &reply), "reply");
        let before = *bob.1.active("alice", 1).unwrap().origin();
        let replay = open(&mut bob.1, &bob.0, device_1(&alice.0), first.0, &first.1);
        assert!(matches!(replay, Err(E2eError::Duplicate)), "{replay:?}");
        assert_eq!(*bob.1.active("alice", 1).unwrap().origin(), before);
        assert!(bob.1.device_sessions["alice"][&1].kept.is_empty());
        let later = seal(&mut alice, &bob, 3, "later");
        assert_eq!(read(&mut bob, &alice.0, &later), "later");
    }

    /// A peer that starts over (lost its state, or `sfc reset`) gets a new active session;
    /// what it sealed in the old one before still opens.
    #[test]
    fn a_new_session_from_the_peer_replaces_ours_and_the_old_one_still_opens() {
        let mut alice = party("alice");
        let mut bob = party("bob");
        let m1 = seal(&mut alice, &bob, 1, "one");
        assert_eq!(read(&mut bob, &alice.0, &m1), "one");
        let late = seal(&mut alice, &bob, 2, "sealed before the reset");
        assert!(alice.1.reset("bob"));
        let fresh = seal(&mut alice, &bob, 3, "fresh session");
        assert_eq!(read(&mut bob, &alice.0, &fresh), "fresh session");
        assert_eq!(read(&mut bob, &alice.0, &late), "sealed before the reset");
        let back = seal(&mut bob, &alice, 4, "back");
        assert_eq!(read(&mut alice, &bob.0, &back), "back");
    }
}
