//! The one error type of the MLS member. Every refusal (a damaged state file, a member whose
//! certification fails, a commit that breaks the group's policy) is a variant here, never a
//! panic; openmls's own errors are carried as text (they hold no secrets).

use std::path::PathBuf;

use crate::client::home::HomeError;

/// Why an MLS operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    /// The state file or its lock could not be read or written.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The state file is damaged (bad magic, truncated, a length past its bound, a checksum
    /// that does not match, an undecodable header or a group openmls cannot load).
    #[error("{}: damaged MLS state: {reason}", path.display())]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The home's MLS state belongs to another account or device.
    #[error("the MLS state is for {found}, not {expected}")]
    WrongDevice {
        /// `USER/DEVICE` asked for.
        expected: String,
        /// `USER/DEVICE` of the state file.
        found: String,
    },
    /// No group with this id in the local state.
    #[error("no such group")]
    UnknownGroup,
    /// This device is no longer a member of the group (it was removed or left).
    #[error("this device is no longer a member of the group")]
    Inactive,
    /// Only an admin of the group may do this.
    #[error("{user} is not an admin of the group")]
    NotAdmin {
        /// The user who tried.
        user: String,
    },
    /// An incoming commit or proposal breaks the group's policy; it was not merged.
    #[error("refused a commit by {committer}: {reason}")]
    Policy {
        /// `USER/DEVICE` of the committer (or proposer).
        committer: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A member (a key package, or a leaf in a welcome or commit) whose certification by the
    /// account's identity key does not verify against the identity pinned for the user.
    #[error("refused member {member}: {reason}")]
    Certification {
        /// `USER/DEVICE` as the leaf claims it (or what could be read of it).
        member: String,
        /// What failed.
        reason: String,
    },
    /// Users whose identity key is not pinned yet: pin them (fetch and trust on first use, as
    /// for 1:1 messages) and try again; nothing was changed.
    #[error("identity not pinned for {}", .0.join(", "))]
    Unpinned(Vec<String>),
    /// A key package that does not parse or validate, or is for another user than asked.
    #[error("invalid key package: {0}")]
    KeyPackage(String),
    /// A welcome for a key package whose private keys this device no longer holds (it ended
    /// and was pruned, or a welcome already consumed it): the inviter must add this device
    /// again with a fresh key package.
    #[error("a welcome for a key package this device no longer holds")]
    KeyPackageGone,
    /// Bytes that are not an MLS message we accept (undecodable, another wire format, a group
    /// this device is not in).
    #[error("malformed MLS message: {0}")]
    Malformed(String),
    /// This application message was decrypted before: a redelivery. Drop it.
    #[error("MLS message already processed (duplicate)")]
    Duplicate,
    /// The group has a commit of this device waiting for the delivery service's answer.
    #[error("a commit is waiting for the server's answer")]
    PendingCommit,
    /// The group has no commit of this device waiting.
    #[error("no commit is waiting")]
    NoPendingCommit,
    /// Proposals (a member leaving) wait for a commit: commit them before sending.
    #[error("proposals wait for a commit")]
    PendingProposals,
    /// Nothing to do: no such member, the user is already an admin, no proposals pending.
    #[error("nothing to do: {0}")]
    Nothing(String),
    /// openmls refused or failed.
    #[error("MLS: {0}")]
    Mls(String),
}

/// Converts any openmls error to [`MlsError::Mls`].
pub(super) fn mls<E: std::fmt::Display>(e: E) -> MlsError {
    MlsError::Mls(e.to_string())
}
