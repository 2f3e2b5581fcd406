//! The one error type of the end-to-end layer. Nothing in `e2e` panics on input: every refusal
//! is one of these variants, so a client can tell a forged prekey from a replay from a bug.

use super::IdentityKey;

/// Why an end-to-end operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    /// A prekey signature does not verify under the identity key that should have made it.
    #[error("prekey signature does not verify")]
    BadSignature,
    /// Bytes that should be a public key are not one we accept: not a canonical Ed25519 point,
    /// a point of small order, or an X25519 key whose Diffie-Hellman output is all zeros.
    #[error("invalid public key")]
    InvalidKey,
    /// Authentication failed: wrong key, or the ciphertext, header or associated data changed.
    #[error("decryption failed")]
    DecryptionFailed,
    /// This message was decrypted before (its key is gone): a replay or a duplicate delivery.
    #[error("message already decrypted (duplicate or replay)")]
    Duplicate,
    /// Decrypting would skip more than `MAX_SKIP` messages in one chain, or store more than
    /// `MAX_SKIPPED_KEYS` skipped message keys in total.
    #[error("too many skipped messages")]
    TooManySkipped,
    /// The peer presents an identity key other than the one known for it: warn the user.
    #[error("the peer's identity key changed")]
    IdentityChanged {
        /// The identity key the peer now presents.
        presented: IdentityKey,
    },
    /// The envelope starts another session with this peer (a new initial header): pass it to
    /// `Session::accept` to replace the current session.
    #[error("the envelope starts a new session")]
    NewSession,
    /// `Session::accept` was given an envelope without an initial header.
    #[error("the envelope carries no initial header")]
    NotInitial,
    /// The initial header names a prekey this store does not hold (used, rotated out, or never
    /// issued).
    #[error("unknown prekey id {id}")]
    UnknownPrekey {
        /// The id the initial header named.
        id: u32,
    },
    /// A prekey id would be used twice within one store.
    #[error("prekey id {id} is already in use")]
    DuplicatePrekeyId {
        /// The id that collided.
        id: u32,
    },
    /// A decrypted plaintext marked as padded whose padding is not `0x80` then zeros. The
    /// AEAD authenticated it, so the sender made it so (a bug, or a hostile peer).
    #[error("the message's padding is malformed")]
    BadPadding,
    /// The bytes are not a well-formed envelope (the reason says which rule was broken).
    #[error("malformed envelope: {0}")]
    MalformedEnvelope(String),
    /// A plaintext or an envelope is larger than its bound.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// What was too large ("plaintext", "envelope").
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The bound in force.
        max: usize,
    },
    /// This side has no sending chain yet (a responder must receive before it can send).
    #[error("cannot send before the first message from the peer")]
    NotReadyToSend,
    /// A copy for one's own devices (E14) was to be sealed or opened in a session with another
    /// account, or a message between two devices of one account is not such a copy.
    #[error(
        "copies for one's own devices travel only between two devices of one account, and only \
         copies do"
    )]
    NotOwnDevice,
    /// A message counter would pass `u32::MAX`; the session must be replaced.
    #[error("message counter exhausted")]
    CounterExhausted,
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(#[from] getrandom::Error),
    /// A value could not be encoded as MessagePack.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// A KDF or cipher primitive refused its input lengths. The lengths used are fixed, so this
    /// is a bug, reported rather than panicking.
    #[error("cryptographic primitive refused its input")]
    Primitive,
}
