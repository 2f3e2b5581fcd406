//! Groups on MLS (RFC 9420, through openmls): this device as a member, independent of the
//! network. The client library sends what these functions return and feeds them what the
//! server delivers; the server's delivery service orders it.
//!
//! Layout:
//!
//! - `cert`: the credential `USER/DEVICE`, the certification of the device's MLS signature
//!   key by the account's identity key (leaf extension `0xff00`), the admins (group context
//!   extension `0xff01`), capabilities and group configurations. Pure; the server uses it too.
//! - `store`: the state file in the home (openmls's storage map and a header), locked across
//!   processes, bounded and checked when read, written atomically after every change.
//! - `device`: [`MlsDevice`], opening the state, key packages, the locked load-change-save.
//! - `group`: creating a group, adding, removing, leaving, admins, sending, and what to do
//!   when the server accepts or refuses a commit of this device.
//! - `delivered`: groups by their name on the server, the GroupInfo it needs, deliveries
//!   processed with the name checked and their messages kept until shown.
//! - `key_packages`: the key packages' life cycle: what to publish, the last-resort one
//!   replaced before it ends, the private keys of unused ones pruned after their lifetime.
//! - `incoming`: processing what the server delivers (welcome, commit, proposal, application
//!   message), with the group's policy checked on every commit before it is merged.
//!
//! Every leaf of every group is certified: a member whose certification does not verify
//! against the identity pinned for its user is refused ([`MlsError::Certification`]), and a
//! user without a pin stops the operation with [`MlsError::Unpinned`] (nothing changed) so the
//! caller can pin and retry.

mod cert;
mod delivered;
mod device;
mod error;
mod group;
mod incoming;
mod key_packages;
mod store;

#[cfg(test)]
mod tests;

use openmls::prelude::*;

pub use cert::{
    ADMINS_EXTENSION, CERT_CONTEXT, CERT_EXTENSION, CERT_LEN, CIPHERSUITE, MAX_ADMINS,
    MAX_FORWARD_DISTANCE, MAX_PAST_EPOCHS, MemberId, OUT_OF_ORDER_TOLERANCE, Pins, admins_of,
    capabilities, certification_input, certify, decode_admins, encode_admins, revoke, revoked_in,
    verify_leaf, verify_revocation,
};
pub use delivered::{CreatedGroup, GroupDelivery, MAX_UNSHOWN, MAX_UNSHOWN_BYTES};
pub use device::{KeyPackageBatch, MAX_KEY_PACKAGE_BATCH, MlsDevice};
pub use error::MlsError;
pub use group::{Commit, FetchedKeyPackage};
pub use incoming::Incoming;
pub use key_packages::{
    KEY_PACKAGE_GRACE_SECS, LAST_RESORT_KEPT, ROTATE_FRACTION, ServerKeyPackages, max_held,
};
pub use store::{KeptMessage, MAX_STATE_LEN, PendingChange, PostedCommit, STATE_FILE};

/// Deletes the MLS state of the home in `dir` (its signature key, certification, key
/// packages and groups), under its lock: for an account deleted or an identity replaced,
/// whose certification no longer holds. Nothing if there is none.
pub fn forget_state(dir: &std::path::Path) -> Result<(), MlsError> {
    let file = store::StateFile::new(dir);
    let lock = file.lock()?;
    file.remove(&lock)
}

/// Length of an MLS group id (random bytes chosen by the creator).
pub const GROUP_ID_LEN: usize = 16;

/// An MLS group id.
pub type MlsGroupId = [u8; GROUP_ID_LEN];

/// Reads a group id, refusing any other length.
pub(crate) fn group_id(bytes: &[u8]) -> Result<MlsGroupId, MlsError> {
    bytes
        .try_into()
        .map_err(|_| MlsError::Malformed(format!("a group id of {} bytes", bytes.len())))
}

/// A group as this device sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group id.
    pub id: MlsGroupId,
    /// The current epoch.
    pub epoch: u64,
    /// Whether this device is still a member (false once removed).
    pub active: bool,
    /// The member devices, sorted.
    pub members: Vec<MemberId>,
    /// The admins (usernames, sorted).
    pub admins: Vec<String>,
    /// Whether a commit of this device waits for the server's answer.
    pub commit_pending: bool,
    /// Whether proposals (a member leaving) wait for a commit.
    pub proposals_pending: bool,
}

impl GroupSummary {
    fn of(group: &MlsGroup) -> Result<Self, MlsError> {
        let mut members: Vec<MemberId> = group
            .members()
            .map(|m| MemberId::of_credential(&m.credential))
            .collect::<Result<_, _>>()?;
        members.sort();
        Ok(Self {
            id: group_id(group.group_id().as_slice())?,
            epoch: group.epoch().as_u64(),
            active: group.is_active(),
            members,
            admins: admins_of(group.extensions())?,
            commit_pending: group.pending_commit().is_some(),
            proposals_pending: group.pending_proposals().next().is_some(),
        })
    }
}
