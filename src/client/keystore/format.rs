//! The keystore file as it may be found on disk, and how it becomes a [`KeyState`].
//!
//! Two layouts exist. Before devices (format 1) a keystore had no `device`, one session per
//! peer (`sessions`: name → session, `kept`: name → earlier sessions) and outbox entries with a
//! single `envelope`. Since devices (format 2) it has `device`, `device_sessions` (name →
//! device → {active, kept}) and outbox entries with `copies`. A format-1 file is this
//! account's device 1, and everything it holds was with each peer's device 1 (the only device
//! anyone had), so it is read as exactly that; the next save writes format 2. Fields added
//! over time in format 1 (`kept`, `trust`, `unshown`, `quarantine`, `history`, `outbox`)
//! may be absent: empty.

use std::collections::{BTreeMap, VecDeque};

use serde::Deserialize;

use super::state::{
    DeviceId, DeviceSessions, FIRST_DEVICE, HistoryEntry, Incoming, KeyState, Outgoing, Pinned,
    Quarantined, SealedCopy, Trust,
};
use crate::e2e::{PrekeyStore, Session};
use crate::protocol::MessageId;

/// Every field a keystore file of either format may have.
#[derive(Deserialize)]
pub(super) struct StoredKeyState {
    username: String,
    /// Format 2; absent: device 1.
    #[serde(default)]
    device: Option<DeviceId>,
    #[serde(with = "serde_bytes")]
    identity_seed: [u8; 32],
    prekeys: PrekeyStore,
    signed_prekey_rotated_at: u64,
    /// Format 2.
    #[serde(default)]
    device_sessions: BTreeMap<String, BTreeMap<DeviceId, DeviceSessions>>,
    /// Format 1: the active session with each peer.
    #[serde(default)]
    sessions: BTreeMap<String, Session>,
    /// Format 1: earlier sessions with each peer, newest first.
    #[serde(default)]
    kept: BTreeMap<String, VecDeque<Session>>,
    pinned: BTreeMap<String, Pinned>,
    #[serde(default)]
    trust: BTreeMap<String, Trust>,
    seen: VecDeque<(String, MessageId)>,
    #[serde(default)]
    unshown: VecDeque<Incoming>,
    #[serde(default)]
    quarantine: VecDeque<Quarantined>,
    #[serde(default)]
    history: VecDeque<HistoryEntry>,
    #[serde(default)]
    outbox: VecDeque<Outgoing>,
    /// Format 2, only while set.
    #[serde(default)]
    unpublished: bool,
}

impl From<StoredKeyState> for KeyState {
    fn from(stored: StoredKeyState) -> Self {
        let mut device_sessions = stored.device_sessions;
        // Format 1: each peer's sessions were with its device 1. (A file has one format or the
        // other; should both appear, the format-2 entry of a device wins.)
        for (peer, active) in stored.sessions {
            let slot = device_sessions
                .entry(peer)
                .or_default()
                .entry(FIRST_DEVICE)
                .or_default();
            if slot.active.is_none() {
                slot.active = Some(active);
            }
        }
        for (peer, kept) in stored.kept {
            let slot = device_sessions
                .entry(peer)
                .or_default()
                .entry(FIRST_DEVICE)
                .or_default();
            if slot.kept.is_empty() {
                slot.kept = kept;
            }
        }
        let mut state = KeyState::new(
            &stored.username,
            &crate::e2e::IdentityKeyPair::from_seed(&stored.identity_seed),
            stored.prekeys,
            stored.signed_prekey_rotated_at,
        );
        state.device = stored.device.unwrap_or(FIRST_DEVICE);
        state.device_sessions = device_sessions;
        state.pinned = stored.pinned;
        state.trust = stored.trust;
        state.seen = stored.seen;
        state.unshown = stored.unshown;
        state.quarantine = stored.quarantine;
        state.history = stored.history;
        state.outbox = stored.outbox;
        state.unpublished = stored.unpublished;
        state
    }
}

/// An outbox entry of either format.
#[derive(Deserialize)]
pub(super) struct StoredOutgoing {
    to: String,
    id: MessageId,
    kind: String,
    /// Format 2.
    #[serde(default)]
    copies: Vec<SealedCopy>,
    /// Format 2.
    #[serde(default)]
    text: Option<String>,
    /// Files: the plaintext of a message that is not text.
    #[serde(default, with = "serde_bytes")]
    plaintext: Option<Vec<u8>>,
    /// Format 1: the one copy, for the recipient's device 1.
    #[serde(default, with = "serde_bytes")]
    envelope: Option<Vec<u8>>,
}

impl From<StoredOutgoing> for Outgoing {
    fn from(stored: StoredOutgoing) -> Self {
        let mut copies = stored.copies;
        if let Some(envelope) = stored.envelope
            && copies.is_empty()
        {
            copies.push(SealedCopy {
                device: FIRST_DEVICE,
                own: false,
                envelope,
            });
        }
        Self {
            to: stored.to,
            id: stored.id,
            kind: stored.kind,
            copies,
            text: stored.text,
            plaintext: stored.plaintext,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::sessions::{self, Origin};
    use crate::e2e::Envelope;
    use crate::protocol::Username;

    /// Keystores written by `sfc` before devices (main at ebc2144, `KeyState` of that day,
    /// `rmp_serde::to_vec_named`): alice and bob talked (alice's session with bob is active,
    /// an earlier one is kept), and alice has one message to bob in her outbox, not sent yet.
    const ALICE: &[u8] = include_bytes!("fixtures/format1-alice.msgpack");
    const BOB: &[u8] = include_bytes!("fixtures/format1-bob.msgpack");

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn keys(bytes: &[u8]) -> Vec<String> {
        let rmpv::Value::Map(fields) = rmpv::decode::read_value(&mut &bytes[..]).unwrap() else {
            panic!("a keystore is a map");
        };
        fields
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn a_keystore_from_before_devices_opens_as_device_1_with_its_sessions_and_outbox() {
        assert!(keys(ALICE).contains(&"sessions".to_owned()));
        assert!(!keys(ALICE).contains(&"device".to_owned()));
        let mut alice: KeyState = rmp_serde::from_slice(ALICE).unwrap();
        let mut bob: KeyState = rmp_serde::from_slice(BOB).unwrap();
        assert_eq!((alice.username.as_str(), alice.device), ("alice", 1));
        assert_eq!(bob.device, 1);
        // Sessions with the peer's device 1, the kept one too; identities stay per account.
        assert_eq!(alice.known_devices("bob"), [1]);
        assert_eq!(alice.device_sessions["bob"][&1].kept.len(), 1);
        assert!(alice.active("bob", 1).is_some() && bob.active("alice", 1).is_some());
        assert!(alice.pinned.contains_key("bob") && bob.pinned.contains_key("alice"));
        assert!(alice.seen("bob", MessageId([2; 16])));

        // The queued message is one copy for bob's device 1, and it opens at bob's.
        let queued = alice.outbox.front().unwrap().clone();
        assert_eq!((queued.to.as_str(), queued.id), ("bob", MessageId([3; 16])));
        assert_eq!(queued.devices(), [1]);
        assert!(queued.own_devices().is_empty() && queued.text.is_none());
        let (a, b) = (name("alice"), name("bob"));
        let from = |peer| Origin {
            peer,
            device: 1,
            to: None,
        };
        let opened = sessions::open(
            &mut bob,
            &b,
            from(&a),
            queued.id,
            &queued.copies[0].envelope,
        )
        .unwrap();
        assert_eq!(opened.plaintext, b"waiting in the outbox");

        // Both conversations go on in the migrated sessions, both ways.
        let next = alice
            .active_mut("bob", 1)
            .unwrap()
            .seal([4; 16], b"after the upgrade")
            .unwrap();
        let opened = sessions::open(
            &mut bob,
            &b,
            from(&a),
            MessageId([4; 16]),
            &next.to_bytes().unwrap(),
        );
        assert_eq!(opened.unwrap().plaintext, b"after the upgrade");
        let reply = bob
            .active_mut("alice", 1)
            .unwrap()
            .seal([5; 16], b"here too")
            .unwrap();
        assert!(reply.initial.is_none());
        let opened = sessions::open(
            &mut alice,
            &a,
            from(&b),
            MessageId([5; 16]),
            &reply.to_bytes().unwrap(),
        );
        assert_eq!(opened.unwrap().plaintext, b"here too");

        // Saved again, it is format 2 only, and reads back the same.
        let saved = rmp_serde::to_vec_named(&alice).unwrap();
        let fields = keys(&saved);
        assert!(fields.contains(&"device_sessions".to_owned()));
        assert!(!fields.contains(&"sessions".to_owned()) && !fields.contains(&"kept".to_owned()));
        let again: KeyState = rmp_serde::from_slice(&saved).unwrap();
        assert_eq!(again.device, 1);
        assert_eq!(
            again.active("bob", 1).unwrap().origin(),
            alice.active("bob", 1).unwrap().origin()
        );
        assert_eq!(again.outbox[0].copies, queued.copies);
        assert!(Envelope::from_bytes(&again.outbox[0].copies[0].envelope).is_ok());
    }

    #[test]
    fn a_linked_device_keeps_its_id_across_saves() {
        let identity = crate::e2e::IdentityKeyPair::from_seed(&[9; 32]);
        let prekeys = PrekeyStore::generate(&identity, 1).unwrap();
        let state = KeyState::for_device("carol", 3, &identity, prekeys, 5);
        let again: KeyState =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&state).unwrap()).unwrap();
        assert_eq!((again.username.as_str(), again.device), ("carol", 3));
        assert_eq!(again.identity().public(), identity.public());
    }
}
