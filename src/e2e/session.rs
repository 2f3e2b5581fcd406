//! A session with one peer: X3DH to start it, the Double Ratchet to run it, and envelopes in
//! and out. This is the API the client uses; the other `e2e` modules are its parts.
//!
//! Every message's AEAD associated data ends with the sender's and recipient's usernames and
//! the caller's 16-byte message id, so the server cannot move a ciphertext to another
//! conversation or give it another id without decryption failing. A copy of a message for one
//! of the sender's own other devices (a session whose two ends are the same account) also binds
//! the addressee, so the server cannot relabel whom a "sent by me" message went to (E14).

use serde::{Deserialize, Serialize};

use super::envelope::MAX_PLAINTEXT_LEN;
use super::keys::fresh_secret;
use super::padding::{pad, unpad};
use super::ratchet::{RatchetState, TAG_LEN};
use super::{
    E2eError, Envelope, IdentityKey, IdentityKeyPair, InitialHeader, OsRandom, PrekeyBundle,
    PrekeyStore, SecretSource, check_identity, x3dh,
};
use crate::protocol::Username;

/// Length of the caller's message id, bound into every message.
pub const MESSAGE_ID_LEN: usize = 16;

/// The caller-supplied associated data of one message:
/// `u16-be(len) ‖ sender ‖ u16-be(len) ‖ recipient ‖ message id`.
pub(crate) fn message_ad(
    sender: &Username,
    recipient: &Username,
    message_id: &[u8; MESSAGE_ID_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 2 * 32 + MESSAGE_ID_LEN);
    for name in [sender, recipient] {
        let name = name.as_str().as_bytes();
        // Usernames are at most 32 bytes, so the length always fits.
        let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(name);
    }
    out.extend_from_slice(message_id);
    out
}

/// The caller-supplied associated data of a copy for one of the sender's own devices:
/// `message_ad(sender, sender, id) ‖ u16-be(len) ‖ addressee`. Longer than any ordinary
/// message's data for the same two names, so neither can pass for the other.
pub(crate) fn copy_ad(
    sender: &Username,
    addressee: &Username,
    message_id: &[u8; MESSAGE_ID_LEN],
) -> Vec<u8> {
    let mut out = message_ad(sender, sender, message_id);
    let name = addressee.as_str().as_bytes();
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// `plaintext` padded for sealing, refused beyond [`MAX_PLAINTEXT_LEN`].
fn padded(plaintext: &[u8]) -> Result<Vec<u8>, E2eError> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(E2eError::TooLarge {
            what: "plaintext",
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        });
    }
    pad(plaintext, TAG_LEN)
}

/// An end-to-end session with one peer. Serializable (named MessagePack, secrets as `bin`)
/// so the client can persist it between runs; secrets are wiped when dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    my_name: Username,
    peer_name: Username,
    peer_identity: IdentityKey,
    /// The X3DH ephemeral key that created this session, to recognise its initial header
    /// when the initiator repeats it.
    #[serde(with = "serde_bytes")]
    origin: [u8; 32],
    /// The initiator's initial header, attached to every envelope until a reply decrypts.
    pending_initial: Option<InitialHeader>,
    ratchet: RatchetState,
}

impl Session {
    /// Starts a session with `peer_name` from the bundle the server handed out. Checks the
    /// bundle's signatures; comparing `bundle.identity_key` with a pinned key is the caller's
    /// job ([`check_identity`]).
    pub fn initiate(
        my_identity: &IdentityKeyPair,
        my_name: &Username,
        peer_name: &Username,
        bundle: &PrekeyBundle,
    ) -> Result<Self, E2eError> {
        Self::initiate_with(&mut OsRandom, my_identity, my_name, peer_name, bundle)
    }

    /// [`Self::initiate`] drawing the ephemeral key, then the first ratchet key, from `source`.
    pub fn initiate_with(
        source: &mut impl SecretSource,
        my_identity: &IdentityKeyPair,
        my_name: &Username,
        peer_name: &Username,
        bundle: &PrekeyBundle,
    ) -> Result<Self, E2eError> {
        let ephemeral = fresh_secret(source)?;
        let init = x3dh::initiate(my_identity, bundle, ephemeral)?;
        let own_ratchet = fresh_secret(source)?;
        let origin = init.header.ephemeral_key;
        Ok(Self {
            my_name: my_name.clone(),
            peer_name: peer_name.clone(),
            peer_identity: bundle.identity_key,
            origin,
            pending_initial: Some(init.header),
            ratchet: RatchetState::new_initiator(
                init.agreement,
                init.peer_ratchet_key,
                own_ratchet,
            )?,
        })
    }

    /// Accepts a session offered by `envelope` (which must carry an initial header) and
    /// decrypts its message. The one-time prekey it used is removed from `my_prekeys` only once
    /// that message has decrypted; on any error nothing changes.
    ///
    /// The sender's identity is the envelope's `initial.identity_key`, authenticated by the
    /// successful decryption; compare it with a pinned key ([`Envelope::sender_identity`]).
    pub fn accept(
        my_identity: &IdentityKeyPair,
        my_prekeys: &mut PrekeyStore,
        my_name: &Username,
        peer_name: &Username,
        message_id: [u8; MESSAGE_ID_LEN],
        envelope: &Envelope,
    ) -> Result<(Self, Vec<u8>), E2eError> {
        let source = &mut OsRandom;
        Self::accept_with(
            source,
            my_identity,
            my_prekeys,
            my_name,
            peer_name,
            message_id,
            envelope,
        )
    }

    /// [`Self::accept`] drawing the next ratchet key from `source`.
    pub fn accept_with(
        source: &mut impl SecretSource,
        my_identity: &IdentityKeyPair,
        my_prekeys: &mut PrekeyStore,
        my_name: &Username,
        peer_name: &Username,
        message_id: [u8; MESSAGE_ID_LEN],
        envelope: &Envelope,
    ) -> Result<(Self, Vec<u8>), E2eError> {
        let ad = message_ad(peer_name, my_name, &message_id);
        Self::accept_under(
            source,
            my_identity,
            my_prekeys,
            my_name,
            peer_name,
            &ad,
            envelope,
        )
    }

    /// Accepts a session offered by another device of this same account with a copy of a
    /// message it sent to `to` (E14), and decrypts that copy. The envelope's identity key must
    /// be this account's own ([`E2eError::IdentityChanged`] otherwise: only a device holding
    /// the account's identity may start such a session).
    pub fn accept_copy(
        my_identity: &IdentityKeyPair,
        my_prekeys: &mut PrekeyStore,
        my_name: &Username,
        to: &Username,
        message_id: [u8; MESSAGE_ID_LEN],
        envelope: &Envelope,
    ) -> Result<(Self, Vec<u8>), E2eError> {
        let source = &mut OsRandom;
        Self::accept_copy_with(
            source,
            my_identity,
            my_prekeys,
            my_name,
            to,
            message_id,
            envelope,
        )
    }

    /// [`Self::accept_copy`] drawing the next ratchet key from `source`.
    pub fn accept_copy_with(
        source: &mut impl SecretSource,
        my_identity: &IdentityKeyPair,
        my_prekeys: &mut PrekeyStore,
        my_name: &Username,
        to: &Username,
        message_id: [u8; MESSAGE_ID_LEN],
        envelope: &Envelope,
    ) -> Result<(Self, Vec<u8>), E2eError> {
        let initial = envelope.initial.as_ref().ok_or(E2eError::NotInitial)?;
        check_identity(&my_identity.public(), &initial.identity_key)?;
        let ad = copy_ad(my_name, to, &message_id);
        Self::accept_under(
            source,
            my_identity,
            my_prekeys,
            my_name,
            my_name,
            &ad,
            envelope,
        )
    }

    /// X3DH as the responder, then the first message decrypted under `ad`.
    fn accept_under(
        source: &mut impl SecretSource,
        my_identity: &IdentityKeyPair,
        my_prekeys: &mut PrekeyStore,
        my_name: &Username,
        peer_name: &Username,
        ad: &[u8],
        envelope: &Envelope,
    ) -> Result<(Self, Vec<u8>), E2eError> {
        let initial = envelope.initial.as_ref().ok_or(E2eError::NotInitial)?;
        let (agreement, signed_prekey) = x3dh::respond(my_identity, my_prekeys, initial)?;
        let mut ratchet = RatchetState::new_responder(agreement, signed_prekey);
        let plaintext =
            ratchet.decrypt(&envelope.header, &envelope.ciphertext, ad, source, unpad)?;
        if let Some(id) = initial.one_time_prekey_id {
            my_prekeys.consume(id);
        }
        let session = Self {
            my_name: my_name.clone(),
            peer_name: peer_name.clone(),
            peer_identity: initial.identity_key,
            origin: initial.ephemeral_key,
            pending_initial: None,
            ratchet,
        };
        Ok((session, plaintext))
    }

    /// Encrypts a message to the peer under the caller's message id, its plaintext padded to
    /// the smallest of the [`PADDING_BUCKETS`](super::PADDING_BUCKETS) that holds it.
    pub fn seal(
        &mut self,
        message_id: [u8; MESSAGE_ID_LEN],
        plaintext: &[u8],
    ) -> Result<Envelope, E2eError> {
        let ad = message_ad(&self.my_name, &self.peer_name, &message_id);
        self.seal_under(&ad, padded(plaintext)?)
    }

    /// Encrypts, for another device of this same account, a copy of a message this device
    /// sends to `to` (E14): as [`Self::seal`], the addressee bound into the associated data.
    /// A session with another account gives [`E2eError::NotOwnDevice`].
    pub fn seal_copy(
        &mut self,
        message_id: [u8; MESSAGE_ID_LEN],
        to: &Username,
        plaintext: &[u8],
    ) -> Result<Envelope, E2eError> {
        self.check_own()?;
        let ad = copy_ad(&self.my_name, to, &message_id);
        self.seal_under(&ad, padded(plaintext)?)
    }

    /// Encrypts `plaintext` exactly as given under the associated data `ad`.
    fn seal_under(&mut self, ad: &[u8], plaintext: Vec<u8>) -> Result<Envelope, E2eError> {
        let (header, ciphertext) = self.ratchet.encrypt(plaintext, ad)?;
        Ok(Envelope {
            initial: self.pending_initial.clone(),
            header,
            ciphertext,
        })
    }

    /// Decrypts a message from the peer sent under `message_id`. On any error the session is
    /// unchanged.
    ///
    /// An initial header naming another identity key gives [`E2eError::IdentityChanged`]; one
    /// with another ephemeral key (the peer started over) gives [`E2eError::NewSession`]. In
    /// both cases the caller may hand the envelope to [`Session::accept`].
    pub fn open(
        &mut self,
        message_id: [u8; MESSAGE_ID_LEN],
        envelope: &Envelope,
    ) -> Result<Vec<u8>, E2eError> {
        self.open_with(&mut OsRandom, message_id, envelope)
    }

    /// [`Self::open`] drawing the next ratchet key (if the ratchet turns) from `source`.
    pub fn open_with(
        &mut self,
        source: &mut impl SecretSource,
        message_id: [u8; MESSAGE_ID_LEN],
        envelope: &Envelope,
    ) -> Result<Vec<u8>, E2eError> {
        let ad = message_ad(&self.peer_name, &self.my_name, &message_id);
        self.open_under(source, &ad, envelope)
    }

    /// Decrypts a copy, sealed by another device of this account with [`Self::seal_copy`], of
    /// a message it sent to `to`. A copy labelled with another addressee than the one it was
    /// sealed for does not open ([`E2eError::DecryptionFailed`]); errors as [`Self::open`].
    pub fn open_copy(
        &mut self,
        message_id: [u8; MESSAGE_ID_LEN],
        to: &Username,
        envelope: &Envelope,
    ) -> Result<Vec<u8>, E2eError> {
        self.open_copy_with(&mut OsRandom, message_id, to, envelope)
    }

    /// [`Self::open_copy`] drawing the next ratchet key (if the ratchet turns) from `source`.
    pub fn open_copy_with(
        &mut self,
        source: &mut impl SecretSource,
        message_id: [u8; MESSAGE_ID_LEN],
        to: &Username,
        envelope: &Envelope,
    ) -> Result<Vec<u8>, E2eError> {
        self.check_own()?;
        let ad = copy_ad(&self.peer_name, to, &message_id);
        self.open_under(source, &ad, envelope)
    }

    fn open_under(
        &mut self,
        source: &mut impl SecretSource,
        ad: &[u8],
        envelope: &Envelope,
    ) -> Result<Vec<u8>, E2eError> {
        if let Some(initial) = &envelope.initial {
            check_identity(&self.peer_identity, &initial.identity_key)?;
            if initial.ephemeral_key != self.origin {
                return Err(E2eError::NewSession);
            }
        }
        let plaintext =
            self.ratchet
                .decrypt(&envelope.header, &envelope.ciphertext, ad, source, unpad)?;
        // The peer can only have sent a decryptable message from this session once it had it.
        self.pending_initial = None;
        Ok(plaintext)
    }

    /// Copies travel only between two devices of one account.
    fn check_own(&self) -> Result<(), E2eError> {
        if self.my_name == self.peer_name {
            Ok(())
        } else {
            Err(E2eError::NotOwnDevice)
        }
    }

    /// Whether this is a session between two devices of the same account (E14).
    pub fn is_own(&self) -> bool {
        self.my_name == self.peer_name
    }

    /// The peer's identity key, as this session was established with it.
    pub fn peer_identity(&self) -> &IdentityKey {
        &self.peer_identity
    }

    /// The peer's username.
    pub fn peer_name(&self) -> &Username {
        &self.peer_name
    }

    /// Our username in this session.
    pub fn my_name(&self) -> &Username {
        &self.my_name
    }

    /// The initiator's ephemeral key that started this session: an envelope whose initial
    /// header carries it belongs to this session.
    pub fn origin(&self) -> &[u8; 32] {
        &self.origin
    }

    /// Whether envelopes still carry the initial header (initiator, no reply yet).
    pub fn awaiting_reply(&self) -> bool {
        self.pending_initial.is_some()
    }

    /// The Double Ratchet state (to inspect, e.g. how many skipped keys it holds).
    pub fn ratchet(&self) -> &RatchetState {
        &self.ratchet
    }

    /// Seals `plaintext` exactly as given, without padding it: as clients from before padding
    /// did, or with a hand-made (wrong) padding.
    #[cfg(test)]
    pub(crate) fn seal_raw(
        &mut self,
        message_id: [u8; MESSAGE_ID_LEN],
        plaintext: &[u8],
    ) -> Result<Envelope, E2eError> {
        let ad = message_ad(&self.my_name, &self.peer_name, &message_id);
        self.seal_under(&ad, plaintext.to_vec())
    }

    #[cfg(test)]
    pub(crate) fn set_names_for_test(&mut self, me: &Username, peer: &Username) {
        self.my_name = me.clone();
        self.peer_name = peer.clone();
    }
}
