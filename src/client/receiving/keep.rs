//! What a delivered message does to the keystore's state, decided without I/O: opened and kept
//! until shown (a copy of this account's own message as sent to its addressee), quarantined,
//! or a retry request to answer.

use super::super::keystore::{HistoryEntry, Incoming, KeyState, Quarantined};
use super::super::messenger::{FILE, TEXT, changed_warning};
use super::super::{Delivered, sessions};
use super::RETRY;
use crate::e2e::{E2eError, FileRef};
use crate::protocol::{MessageId, Username};

/// What keeping a delivery in the keystore decided.
pub(super) enum Kept {
    /// Opened and kept until shown.
    Text(Incoming),
    /// Kept in the quarantine; `ask_again` when the sender should be asked to resend.
    Quarantined {
        from: String,
        reason: String,
        ask_again: bool,
    },
    /// A retry request for a message in the history: seal it again (a file message as its
    /// file reference, `file`).
    Resend {
        peer: Username,
        text: String,
        file: Option<Vec<u8>>,
        asked: MessageId,
    },
    /// A retry request for nothing this user can send again.
    NoResend { asked: Option<MessageId> },
    /// Kept or shown before.
    Duplicate,
}

/// Keeps a delivered message in the keystore's state: opened and kept until shown (in the
/// history too), quarantined, or a retry request to act on. Pure: the caller saves the state.
pub(super) fn keep(state: &mut KeyState, me: &Username, delivered: &Delivered) -> Kept {
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
        TEXT | FILE => {}
        RETRY if own => return Kept::NoResend { asked: None },
        RETRY => {
            let Ok(asked) = <[u8; 16]>::try_from(delivered.body.as_slice()) else {
                let reason = "malformed retry request".to_owned();
                return quarantine(state, reason, false);
            };
            let asked = MessageId(asked);
            let entry = state.history.iter_mut().find(|e| {
                e.outgoing && !e.resent && !e.copy && e.id == asked && e.peer == peer.as_str()
            });
            let Some(entry) = entry else {
                return Kept::NoResend { asked: Some(asked) };
            };
            entry.resent = true;
            let text = entry.text.clone();
            let file = entry.file.clone();
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
            return Kept::Resend {
                peer,
                text,
                file,
                asked,
            };
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
            // A file message keeps its reference (checked now, so that what is kept can be
            // shown), and shows as its name.
            let (text, file) = if delivered.kind == FILE {
                match FileRef::from_bytes(&opened.plaintext) {
                    Ok(file) => (file.name, Some(opened.plaintext)),
                    // Authentic but unusable: asking again would bring the same.
                    Err(e) => return quarantine(state, e.to_string(), false),
                }
            } else {
                (
                    String::from_utf8_lossy(&opened.plaintext).into_owned(),
                    None,
                )
            };
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
                file: file.clone(),
                saved: None,
            };
            state.unshown.push_back(incoming.clone());
            state.remember(HistoryEntry {
                peer: other,
                outgoing: own,
                id: delivered.id,
                at: delivered.sent_at,
                text: match file {
                    Some(_) => format!("file: {text}"),
                    None => text,
                },
                file,
                resent: false,
                copy: own,
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
        send_kind(from, to, own, n, TEXT, text.as_bytes())
    }

    /// [`send`] of any kind and plaintext.
    fn send_kind(
        from: &mut (Username, KeyState),
        to: (&Username, &KeyState),
        own: &KeyState,
        n: u8,
        kind: &str,
        plaintext: &[u8],
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
            plaintext,
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
                kind: kind.into(),
                body: c.envelope,
                group: None,
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
        // bob asks alice (every device of hers) to resend it: only device 1, which sent it,
        // would; device 2 holds a copy.
        let retry = Delivered {
            id: MessageId([9; 16]),
            from: "bob".into(),
            kind: RETRY.into(),
            body: MessageId([1; 16]).0.to_vec(),
            to: None,
            ..sent[0].clone()
        };
        assert!(matches!(
            keep(&mut a2.1, &a2.0, &retry),
            Kept::NoResend { asked: Some(_) }
        ));
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
            file: None,
            resent: false,
            copy: false,
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

    /// A file message is kept with its reference and shown as its name; one whose plaintext
    /// is not a valid reference is quarantined without asking again (the same bytes would
    /// come); a retry request for a sent file gives its reference back to seal again.
    #[test]
    fn a_file_message_keeps_its_reference() {
        use crate::e2e::{FileKey, FileRef};
        use crate::protocol::BlobId;
        let mut a1 = device("alice", 1, 1);
        let a2 = device("alice", 1, 2);
        let mut b1 = device("bob", 2, 1);
        let file = FileRef {
            blob: BlobId([4; 16]),
            key: FileKey::from_bytes([5; 32]),
            sha256: [6; 32],
            size: 10,
            name: "a.txt".into(),
            content_type: "text/plain".into(),
        };
        let plaintext = file.to_bytes().unwrap().to_vec();
        let sent = send_kind(&mut a1, (&b1.0, &b1.1), &a2.1, 1, FILE, &plaintext);
        let Kept::Text(incoming) = keep(&mut b1.1, &b1.0, &sent[0]) else {
            panic!("the file message did not open");
        };
        assert_eq!(incoming.text, "a.txt");
        assert_eq!(incoming.file.as_deref(), Some(plaintext.as_slice()));
        let last = b1.1.history.back().unwrap();
        assert_eq!(
            (last.text.as_str(), last.file.is_some()),
            ("file: a.txt", true)
        );

        let bad = send_kind(&mut a1, (&b1.0, &b1.1), &a2.1, 2, FILE, b"not a map");
        match keep(&mut b1.1, &b1.0, &bad[0]) {
            Kept::Quarantined {
                ask_again, reason, ..
            } => {
                assert!(!ask_again);
                assert!(reason.contains("file reference"), "{reason}");
            }
            _ => panic!("a malformed file reference was kept"),
        }

        a1.1.remember(HistoryEntry {
            peer: "bob".into(),
            outgoing: true,
            id: MessageId([1; 16]),
            at: 7,
            text: "file: a.txt".into(),
            file: Some(plaintext.clone()),
            resent: false,
            copy: false,
        });
        let retry = Delivered {
            id: MessageId([9; 16]),
            from: "bob".into(),
            from_device: 1,
            kind: RETRY.into(),
            body: MessageId([1; 16]).0.to_vec(),
            to: None,
            ..sent[0].clone()
        };
        match keep(&mut a1.1, &a1.0, &retry) {
            Kept::Resend {
                file: Some(again), ..
            } => assert_eq!(again, plaintext),
            _ => panic!("the file was not given back to seal again"),
        }
    }
}
