//! End-to-end encryption, Signal-style: Ed25519 identities, signed and one-time X25519
//! prekeys, X3DH to agree on a secret, the Double Ratchet to run a conversation, and envelopes
//! for the wire. No sockets, storage or clocks: the client persists what is serializable here,
//! and the server only ever sees public keys and ciphertext.
//!
//! part II of `docs/PROTOCOL.md` specifies every byte (key encodings, KDF inputs, associated data, envelope
//! layout) with test vectors, so other implementations can interoperate.
//!
//! Layout (the modules are private; their public types are re-exported here):
//!
//! - `identity`: [`IdentityKeyPair`], [`IdentityKey`], their X25519 form, [`safety_number`].
//! - `prekeys`: what travels ([`PrekeyBundle`]) and the signature checks the server runs on
//!   upload ([`verify_signed_prekey`]); `prekey_store`: the client's private [`PrekeyStore`].
//! - `x3dh`: the key agreement and the [`InitialHeader`].
//! - `ratchet`: the Double Ratchet ([`RatchetState`]) with bounded skipped-message keys.
//! - `session`, `envelope`: [`Session`] and [`Envelope`], what the client calls.
//! - `padding`: plaintexts padded to a few size buckets before sealing ([`PADDING_BUCKETS`]).
//! - `file`: files sealed chunk by chunk for upload as blobs, and the [`FileRef`] a `file`
//!   message carries (E15).
//! - `keys`: zeroizing secrets, [`SecretSource`], X25519 and HKDF helpers.
//! - [`link`] (public): linking a new device to an account: the link code, SPAKE2 and the
//!   sealed payload with the identity seed and pinned contacts (E13).
//! - [`mls`] (public): groups on MLS: this device as a member, its state in the home, the
//!   certification of its MLS key by the identity key, the groups' admin policy (issue 22).
//!
//! Server side, only [`verify_signed_prekey`] and [`verify_last_resort_prekey`] (on upload)
//! and the public wire types are needed.

mod envelope;
mod error;
mod file;
mod identity;
mod keys;
pub mod link;
pub mod mls;
mod padding;
mod prekey_store;
mod prekeys;
mod ratchet;
mod session;
mod x3dh;

#[cfg(test)]
mod copy_vectors;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;

pub use envelope::{Envelope, MAX_ENVELOPE_LEN, MAX_PLAINTEXT_LEN};
pub use error::E2eError;
pub use file::{
    ChunkOpener, ChunkSealer, FILE_CHUNK_LEN, FILE_KEY_LEN, FILE_TAG_LEN, FileError, FileKey,
    FileRef, MAX_FILE_NAME_LEN, MAX_FILE_REF_LEN, MAX_FILE_TYPE_LEN, SEALED_CHUNK_LEN,
    chunk_at_offset, chunk_count, sealed_len,
};
pub use identity::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair, check_identity, safety_number};
pub use keys::{OsRandom, SecretSource};
pub use link::{LinkCode, LinkError, LinkPayload};
pub use padding::{MAX_PADDED_LEN, PADDED_FORMAT, PADDING_BUCKETS, padded_len};
pub use prekey_store::{MAX_SIGNED_PREKEYS, PrekeyStore};
pub use prekeys::{
    OneTimePrekeyPublic, PrekeyBundle, SignedPrekeyPublic, verify_last_resort_prekey,
    verify_signed_prekey,
};
pub use ratchet::{HEADER_AD_LEN, Header, MAX_SKIP, MAX_SKIPPED_KEYS, RatchetState, TAG_LEN};
pub use session::{MESSAGE_ID_LEN, Session};
pub use x3dh::{ASSOCIATED_DATA_LEN, InitialHeader};
