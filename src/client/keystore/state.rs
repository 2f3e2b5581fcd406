//! What the keystore file holds ([`KeyState`]) and the changes every part of the client makes
//! to it: sessions per device of each peer (and with this account's other devices), pinned
//! identities per account, the seen ids, the unshown messages, the quarantine, the history and
//! the outbox. How older files are read is in `format`.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::format::{StoredKeyState, StoredOutgoing};
use crate::e2e::{IdentityKey, IdentityKeyPair, LinkPayload, PrekeyStore, Session};
use crate::protocol::MessageId;

pub use crate::protocol::DeviceId;

/// The device of every account and home from before devices.
pub const FIRST_DEVICE: DeviceId = 1;

/// Message ids remembered to drop duplicates (redeliveries after a crash before the ack).
pub(super) const SEEN_IDS: usize = 10_000;
/// Earlier sessions kept per peer device. libsignal keeps 40; each kept session may hold up to
/// `MAX_SKIPPED_KEYS` skipped keys, and the whole keystore is rewritten at every change, so we
/// keep fewer: enough for several restarts and simultaneous starts in a row.
pub const MAX_KEPT_SESSIONS: usize = 8;
/// Messages that could not be opened, kept for the user to look at.
pub const MAX_QUARANTINE: usize = 100;
/// Bytes of their envelopes kept: a sender of unreadable messages cannot make every keystore
/// save write megabytes.
pub const MAX_QUARANTINE_BYTES: usize = 1024 * 1024;
/// Messages kept in the conversation history.
pub const MAX_HISTORY: usize = 500;
/// Bytes of text kept in the conversation history.
pub const MAX_HISTORY_BYTES: usize = 512 * 1024;

/// Everything secret the client keeps. Read through `format`, which also reads the files of
/// clients from before devices (as device 1, their sessions as sessions with each peer's
/// device 1).
#[derive(Serialize, Deserialize)]
#[serde(from = "StoredKeyState")]
pub struct KeyState {
    /// The account these keys belong to.
    pub username: String,
    /// This device's id within the account.
    pub device: DeviceId,
    #[serde(with = "serde_bytes")]
    pub(super) identity_seed: [u8; 32],
    /// Signed, last-resort and one-time prekeys (private halves).
    pub prekeys: PrekeyStore,
    /// When the signed prekey was last rotated, in seconds since the Unix epoch.
    pub signed_prekey_rotated_at: u64,
    /// The sessions with each device of each peer, by username then device id; this account's
    /// other devices are under its own username.
    pub device_sessions: BTreeMap<String, BTreeMap<DeviceId, DeviceSessions>>,
    /// The identity key accepted for each peer (trust on first use, then only by
    /// `sfc trust`): safety numbers are computed from it. One per account: all of a peer's
    /// devices share its identity key.
    pub pinned: BTreeMap<String, Pinned>,
    /// What the user decided about each peer's identity: verified in person, or a new key
    /// seen and not accepted yet.
    pub trust: BTreeMap<String, Trust>,
    /// (sender, message id) of recent messages, to show each message once.
    pub(super) seen: VecDeque<(String, MessageId)>,
    /// Messages opened (their ratchet keys are gone) and not yet shown by the application,
    /// oldest first: a crash between opening and showing shows them at the next start
    /// instead of losing them.
    pub unshown: VecDeque<Incoming>,
    /// Messages that could not be opened, kept for `sfc quarantine`, oldest first, at most
    /// [`MAX_QUARANTINE`] and [`MAX_QUARANTINE_BYTES`] of envelopes.
    pub quarantine: VecDeque<Quarantined>,
    /// The recent conversation, both ways, oldest first, bounded by [`MAX_HISTORY`] entries
    /// and [`MAX_HISTORY_BYTES`] of text: what `sfc chat` shows when it opens, and what is
    /// sealed again when a peer asks for a message it could not open.
    pub history: VecDeque<HistoryEntry>,
    /// Messages sealed and not yet stored by the server, oldest first. A message is sealed
    /// and queued here in one save, so the ratchet never moves past a message that could be
    /// lost; it leaves once the server says `sent` (or refuses it for good).
    pub outbox: VecDeque<Outgoing>,
    /// Set while this device's keys are made but the server has not taken them yet (a device
    /// between its link and its `publish_keys`): [`Messenger::ensure_keys`] publishes them
    /// then, so a link cut short before the upload is finished by the next command.
    ///
    /// [`Messenger::ensure_keys`]: crate::client::messenger::Messenger::ensure_keys
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpublished: bool,
}

/// The sessions with one device of a peer (or of this account).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceSessions {
    /// The session messages to this device are sealed with; `None` after a reset (the next
    /// message starts a new one from a fresh bundle).
    pub active: Option<Session>,
    /// Earlier sessions, newest first, at most [`MAX_KEPT_SESSIONS`]: a message sealed in one
    /// of them (sent before the device switched, or when both started at once) still opens.
    pub kept: VecDeque<Session>,
}

/// A sealed message waiting in the outbox: one copy per device. Sent again, it is the same
/// bytes under the same id, so the server stores it at most once.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "StoredOutgoing")]
pub struct Outgoing {
    /// The recipient.
    pub to: String,
    /// The message's id.
    pub id: MessageId,
    /// Its `kind`.
    pub kind: String,
    /// The sealed copies: for the recipient's devices, then for this account's other devices.
    pub copies: Vec<SealedCopy>,
    /// The text, to seal for a device that appeared before the message was stored (`None` in
    /// an outbox from before devices: such a message goes to the devices it was sealed for).
    pub text: Option<String>,
    /// The plaintext of a message of another kind than text (a `file` message's file
    /// reference, E15.4), to seal for a device that appeared before it was stored. Absent in
    /// outboxes from before files.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub plaintext: Option<Vec<u8>>,
}

/// One device's copy of a message in the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCopy {
    /// The device it is sealed for.
    pub device: DeviceId,
    /// For one of this account's other devices (a copy "sent by me", E14), rather than for
    /// one of the recipient's.
    pub own: bool,
    /// The sealed envelope.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

impl Outgoing {
    /// Bytes of all its envelopes.
    pub fn bytes(&self) -> usize {
        self.copies.iter().map(|c| c.envelope.len()).sum()
    }

    /// The recipient's devices it is sealed for, in copy order.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.copies
            .iter()
            .filter(|c| !c.own)
            .map(|c| c.device)
            .collect()
    }

    /// This account's other devices it is sealed for, in copy order.
    pub fn own_devices(&self) -> Vec<DeviceId> {
        self.copies
            .iter()
            .filter(|c| c.own)
            .map(|c| c.device)
            .collect()
    }
}

/// A message opened and kept until the application has shown it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The sender's id for it.
    pub id: MessageId,
    /// The sender.
    pub from: String,
    /// On a copy of a message this account sent from another device: its recipient.
    #[serde(default)]
    pub to: Option<String>,
    /// When the server stored it (Unix seconds).
    pub sent_at: u64,
    /// The text (for a file: its name, as the sender gave it).
    pub text: String,
    /// A warning to show with it (the sender's identity key changed).
    pub warning: Option<String>,
    /// For a `file` message: its plaintext, the file reference (E15.4). Absent in keystores
    /// from before files.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub file: Option<Vec<u8>>,
    /// For a file: where it was saved, once it was (a run that ends before the message is
    /// shown does not fetch it again at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<String>,
}

/// A message that could not be opened, as it arrived.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Quarantined {
    /// The sender's id for it.
    pub id: MessageId,
    /// The claimed sender.
    pub from: String,
    /// When the server stored it (Unix seconds).
    pub sent_at: u64,
    /// Its `kind`.
    pub kind: String,
    /// Why it could not be opened.
    pub reason: String,
    /// The envelope as delivered.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// One message of the conversation history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The other side of the conversation.
    pub peer: String,
    /// Sent by this user (`true`) or received.
    pub outgoing: bool,
    /// The message's id.
    pub id: MessageId,
    /// When it was written (sent) or stored by the server (received), Unix seconds.
    pub at: u64,
    /// The text (for a file: `file: ` and its name, as the sender gave it).
    pub text: String,
    /// For a `file` message: its plaintext, the file reference (E15.4), which a retry request
    /// seals again. Absent in keystores from before files.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub file: Option<Vec<u8>>,
    /// For an outgoing message: already sealed again once because the peer could not open
    /// it (a message is resent at most once).
    #[serde(default)]
    pub resent: bool,
    /// For an outgoing message: a copy of what another device of this account sent (E14):
    /// only that device answers the peer's retry requests for it.
    #[serde(default)]
    pub copy: bool,
}

/// What the user decided about a peer's identity key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// The user compared safety numbers in person (`sfc verify`) for the pinned key.
    pub verified: bool,
    /// A different identity key the peer now presents, not accepted yet (`sfc trust`).
    pub changed_to: Option<Pinned>,
}

/// A peer's identity key as first seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl KeyState {
    /// New keys for `username`'s first device (the one that signs up).
    pub fn new(username: &str, identity: &IdentityKeyPair, prekeys: PrekeyStore, now: u64) -> Self {
        Self::for_device(username, FIRST_DEVICE, identity, prekeys, now)
    }

    /// New keys for `username`'s device `device` (a linked device, with the account's
    /// identity).
    pub fn for_device(
        username: &str,
        device: DeviceId,
        identity: &IdentityKeyPair,
        prekeys: PrekeyStore,
        now: u64,
    ) -> Self {
        Self {
            username: username.to_owned(),
            device,
            identity_seed: *identity.expose_seed(),
            prekeys,
            signed_prekey_rotated_at: now,
            device_sessions: BTreeMap::new(),
            pinned: BTreeMap::new(),
            trust: BTreeMap::new(),
            seen: VecDeque::new(),
            unshown: VecDeque::new(),
            quarantine: VecDeque::new(),
            history: VecDeque::new(),
            outbox: VecDeque::new(),
            unpublished: false,
        }
    }

    /// The keys of a device just linked (E13): the account and identity of `payload`, its
    /// contacts pinned (verified as the existing device had them), `prekeys` made for this
    /// device. Its public keys still have to be published
    /// ([`Messenger::publish_all_keys`](crate::client::messenger::Messenger::publish_all_keys)).
    pub fn linked(payload: &LinkPayload, device: DeviceId, prekeys: PrekeyStore, now: u64) -> Self {
        let mut state = Self::for_device(
            payload.account.as_str(),
            device,
            &payload.identity,
            prekeys,
            now,
        );
        for contact in &payload.contacts {
            let name = contact.username.as_str().to_owned();
            state
                .pinned
                .insert(name.clone(), Pinned(*contact.identity_key.as_bytes()));
            if contact.verified {
                state.trust.insert(
                    name,
                    Trust {
                        verified: true,
                        changed_to: None,
                    },
                );
            }
        }
        state
    }

    /// The identity key pair.
    pub fn identity(&self) -> IdentityKeyPair {
        IdentityKeyPair::from_seed(&self.identity_seed)
    }

    /// Whether this message was already shown.
    pub fn seen(&self, from: &str, id: MessageId) -> bool {
        self.seen.iter().any(|(f, i)| *i == id && f == from)
    }

    /// Remembers a shown message.
    pub fn mark_seen(&mut self, from: &str, id: MessageId) {
        if self.seen.len() >= SEEN_IDS {
            self.seen.pop_front();
        }
        self.seen.push_back((from.to_owned(), id));
    }

    /// Forgets that a message was seen (its handling was undone: it is to be handled again
    /// when it is delivered again).
    pub fn unsee(&mut self, from: &str, id: MessageId) {
        self.seen.retain(|(f, i)| !(*i == id && f == from));
    }

    /// Records that `peer` presents `key`: pins it if nothing is pinned yet (trust on first
    /// use); if another key is pinned, keeps the pinned one and records `key` as a change not
    /// accepted yet. Returns whether `key` differs from the pinned key.
    pub fn saw_identity(&mut self, peer: &str, key: &IdentityKey) -> bool {
        let new = Pinned(*key.as_bytes());
        match self.pinned.get(peer) {
            None => {
                self.pinned.insert(peer.to_owned(), new);
                false
            }
            Some(pinned) if *pinned == new => {
                if let Some(trust) = self.trust.get_mut(peer) {
                    trust.changed_to = None;
                }
                false
            }
            Some(_) => {
                self.trust.entry(peer.to_owned()).or_default().changed_to = Some(new);
                true
            }
        }
    }

    /// The trust state of `peer` (default: unverified, no change).
    pub fn trust_of(&self, peer: &str) -> Trust {
        self.trust.get(peer).copied().unwrap_or_default()
    }

    /// The active session with `peer`'s device `device`.
    pub fn active(&self, peer: &str, device: DeviceId) -> Option<&Session> {
        self.device_sessions
            .get(peer)
            .and_then(|d| d.get(&device))
            .and_then(|s| s.active.as_ref())
    }

    /// The active session with `peer`'s device `device`, to seal or open with.
    pub fn active_mut(&mut self, peer: &str, device: DeviceId) -> Option<&mut Session> {
        self.device_sessions
            .get_mut(peer)
            .and_then(|d| d.get_mut(&device))
            .and_then(|s| s.active.as_mut())
    }

    /// The sessions with `peer`'s device `device`, made empty if there were none.
    pub fn sessions_with(&mut self, peer: &str, device: DeviceId) -> &mut DeviceSessions {
        self.device_sessions
            .entry(peer.to_owned())
            .or_default()
            .entry(device)
            .or_default()
    }

    /// The devices of `peer` this client holds sessions with (active or kept), ascending.
    /// For this account's own name: its other devices.
    pub fn known_devices(&self, peer: &str) -> Vec<DeviceId> {
        self.device_sessions
            .get(peer)
            .map(|d| d.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Makes `session` the active one with `peer`'s device `device`; the one it replaces is
    /// kept (newest first, the oldest dropped beyond [`MAX_KEPT_SESSIONS`]).
    pub fn activate(&mut self, peer: &str, device: DeviceId, session: Session) {
        let sessions = self.sessions_with(peer, device);
        if let Some(old) = sessions.active.replace(session) {
            sessions.keep(old);
        }
    }

    /// Keeps `session` as an earlier session with `peer`'s device `device` (it can open, it
    /// does not seal).
    pub fn keep(&mut self, peer: &str, device: DeviceId, session: Session) {
        self.sessions_with(peer, device).keep(session);
    }

    /// Ends the active sessions with every device of `peer` (kept, so what is in flight still
    /// opens): the next message to `peer` starts fresh ones from new prekey bundles. Returns
    /// whether there was any.
    pub fn reset(&mut self, peer: &str) -> bool {
        let mut had = false;
        for sessions in self.device_sessions.get_mut(peer).into_iter().flatten() {
            if let Some(old) = sessions.1.active.take() {
                sessions.1.keep(old);
                had = true;
            }
        }
        had
    }

    /// Drops every session with the devices of `peer` not in `current` (devices removed from
    /// the account: nothing is sealed for them any more). Returns the devices dropped.
    pub fn forget_devices(&mut self, peer: &str, current: &[DeviceId]) -> Vec<DeviceId> {
        let Some(devices) = self.device_sessions.get_mut(peer) else {
            return Vec::new();
        };
        let gone: Vec<DeviceId> = devices
            .keys()
            .copied()
            .filter(|d| !current.contains(d))
            .collect();
        for device in &gone {
            devices.remove(device);
        }
        if devices.is_empty() {
            self.device_sessions.remove(peer);
        }
        gone
    }

    /// Adds a message to the conversation history, dropping the oldest beyond the bounds.
    pub fn remember(&mut self, entry: HistoryEntry) {
        self.history.push_back(entry);
        let size = |e: &HistoryEntry| e.text.len() + e.file.as_ref().map_or(0, Vec::len);
        let mut bytes: usize = self.history.iter().map(size).sum();
        while self.history.len() > MAX_HISTORY || bytes > MAX_HISTORY_BYTES {
            match self.history.pop_front() {
                Some(old) => bytes -= size(&old),
                None => break,
            }
        }
    }

    /// Keeps a message that could not be opened, dropping the oldest beyond the bound.
    pub fn quarantine(&mut self, message: Quarantined) {
        self.quarantine.push_back(message);
        let mut bytes: usize = self.quarantine.iter().map(|q| q.body.len()).sum();
        while self.quarantine.len() > MAX_QUARANTINE || bytes > MAX_QUARANTINE_BYTES {
            match self.quarantine.pop_front() {
                Some(old) => bytes -= old.body.len(),
                None => break,
            }
        }
    }
}

impl DeviceSessions {
    /// Keeps `session` as the newest earlier one.
    pub fn keep(&mut self, session: Session) {
        self.kept.push_front(session);
        self.kept.truncate(MAX_KEPT_SESSIONS);
    }
}
