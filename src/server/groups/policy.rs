//! The group policy the DS enforces on every commit (docs/PROTOCOL.md 5.7): who may add and
//! remove whose leaves (anyone may remove a device gone from its account when the commit
//! carries its signed revocation, as every client requires), who may change the admins, and
//! that every new or updated leaf names a current device whose certification verifies with
//! its account's identity key.

use std::collections::HashMap;

use super::mls::{ClaimedLeaf, MergedCommit, Refusal, StagedGroupCommit, revocation_verifies};
use crate::protocol::keys::IdentityKeyBytes;
use crate::protocol::{DeviceId, ErrorCode, Username};
use crate::server::Shared;
use crate::store::GroupRecord;

/// Most member devices (leaves) of a group.
pub(crate) const MAX_GROUP_DEVICES: usize = 1024;

/// Identity keys and device lists looked up once per commit.
#[derive(Default)]
struct Lookups {
    identities: HashMap<Username, Option<IdentityKeyBytes>>,
    devices: HashMap<Username, Vec<DeviceId>>,
}

impl Lookups {
    async fn identity(
        &mut self,
        shared: &Shared,
        user: &Username,
    ) -> Result<Option<IdentityKeyBytes>, Refusal> {
        if let Some(known) = self.identities.get(user) {
            return Ok(*known);
        }
        let found = shared
            .accounts
            .store()
            .identity(user)
            .await
            .map_err(|e| internal(&e))?;
        self.identities.insert(user.clone(), found);
        Ok(found)
    }

    async fn is_current(
        &mut self,
        shared: &Shared,
        user: &Username,
        device: DeviceId,
    ) -> Result<bool, Refusal> {
        if !self.devices.contains_key(user) {
            let list = shared
                .accounts
                .device_list(user)
                .await
                .map_err(|e| internal(&e))?;
            self.devices.insert(user.clone(), list.to_vec());
        }
        Ok(self
            .devices
            .get(user)
            .is_some_and(|list| list.contains(&device)))
    }
}

fn internal(e: &dyn std::fmt::Display) -> Refusal {
    tracing::warn!(error = %e, "cannot look up a group member");
    Refusal::new(ErrorCode::Internal, "send it again")
}

/// Refuses (`group_full`) to put `user` in one more group when it is already in
/// `max_groups_per_account` (groups it left but whose removal is not committed yet count).
pub(crate) async fn check_group_cap(shared: &Shared, user: &Username) -> Result<(), Refusal> {
    let max = shared.limits.max_groups_per_account;
    let groups = shared
        .accounts
        .store()
        .groups_of(user)
        .await
        .map_err(|e| internal(&e))?;
    if groups.len() >= max {
        return Err(Refusal::new(
            ErrorCode::GroupFull,
            format!("{user} is already in {max} groups, the most an account may be in"),
        ));
    }
    Ok(())
}

/// Checks that `leaf` is a current device of its account and that its certification
/// verifies with the account's identity key.
async fn check_leaf(
    shared: &Shared,
    lookups: &mut Lookups,
    leaf: &ClaimedLeaf,
) -> Result<(), Refusal> {
    let Some(identity) = lookups.identity(shared, &leaf.user).await? else {
        return Err(Refusal::invalid(format!(
            "{} has no account or no identity key",
            leaf.user
        )));
    };
    if !leaf.verifies_with(&identity) {
        return Err(Refusal::invalid(format!(
            "the certification of {}/{} does not verify with its account's identity key",
            leaf.user, leaf.device
        )));
    }
    if !lookups.is_current(shared, &leaf.user, leaf.device).await? {
        return Err(Refusal::invalid(format!(
            "{} has no device {}",
            leaf.user, leaf.device
        )));
    }
    Ok(())
}

/// Whether the commit carries a revocation of `user`'s `device` that verifies with the
/// account's identity key: what lets any member remove a device's leaf once the device is
/// gone from its account, as every client checks it too.
async fn revoked(
    shared: &Shared,
    lookups: &mut Lookups,
    staged: &StagedGroupCommit,
    user: &Username,
    device: DeviceId,
) -> Result<bool, Refusal> {
    let Some(revocation) = staged
        .revocations
        .iter()
        .find(|r| r.username == user.as_str() && r.device == device)
    else {
        return Ok(false);
    };
    Ok(match lookups.identity(shared, user).await? {
        Some(identity) => revocation_verifies(revocation, &identity),
        None => false,
    })
}

/// Checks a staged commit by `committer`'s `device` against the group's policy, before it is
/// merged.
pub(crate) async fn check_commit(
    shared: &Shared,
    record: &GroupRecord,
    committer: &Username,
    device: DeviceId,
    staged: &StagedGroupCommit,
) -> Result<(), Refusal> {
    let admin = record.admins.contains(committer);
    let mut lookups = Lookups::default();
    let mut departing: Vec<(Username, DeviceId)> = Vec::new();
    for leaf in &staged.removed {
        let Some(member) = record.members.iter().find(|m| m.leaf == *leaf) else {
            return Err(Refusal::invalid(format!("no member has leaf {leaf}")));
        };
        let allowed = admin
            || member.user == *committer
            || record.pending_leaves.contains(&member.user)
            || (revoked(shared, &mut lookups, staged, &member.user, member.device).await?
                && !lookups
                    .is_current(shared, &member.user, member.device)
                    .await?);
        if !allowed {
            return Err(Refusal::new(
                ErrorCode::NotAdmin,
                format!("only an admin may remove {}'s devices", member.user),
            ));
        }
        departing.push((member.user.clone(), member.device));
    }
    for (leaf, _) in &staged.added {
        if leaf.user != *committer && !admin {
            return Err(Refusal::new(
                ErrorCode::NotAdmin,
                format!("only an admin may add {}", leaf.user),
            ));
        }
        if record.pending_leaves.contains(&leaf.user) {
            return Err(Refusal::invalid(format!(
                "{} left the group: commit their removal before adding them again",
                leaf.user
            )));
        }
        let present = record.members.iter().any(|m| {
            m.user == leaf.user
                && m.device == leaf.device
                && !departing.contains(&(m.user.clone(), m.device))
        });
        if present {
            return Err(Refusal::invalid(format!(
                "{}/{} is already a member",
                leaf.user, leaf.device
            )));
        }
        check_leaf(shared, &mut lookups, leaf).await?;
    }
    let mut joining: Vec<&Username> = staged
        .added
        .iter()
        .map(|(leaf, _)| &leaf.user)
        .filter(|user| !record.members.iter().any(|m| m.user == **user))
        .collect();
    joining.sort();
    joining.dedup();
    for user in joining {
        check_group_cap(shared, user).await?;
    }
    if let Some(admins) = &staged.new_admins {
        if !admin {
            return Err(Refusal::new(
                ErrorCode::NotAdmin,
                "only an admin may change the group's extensions",
            ));
        }
        if let Some(dropped) = record.admins.iter().find(|a| !admins.contains(a)) {
            return Err(Refusal::invalid(format!(
                "admins are never removed (the commit drops {dropped})"
            )));
        }
    }
    if let Some(leaf) = &staged.path_leaf {
        if leaf.user != *committer || leaf.device != device {
            return Err(Refusal::invalid(
                "a committer's new leaf must keep its own identity",
            ));
        }
        check_leaf(shared, &mut lookups, leaf).await?;
    }
    Ok(())
}

/// Checks the group after a merged commit: its size, one leaf per device, and that every
/// admin the commit added has a leaf.
pub(crate) fn check_merged(
    merged: &MergedCommit,
    added_admins: &[Username],
) -> Result<(), Refusal> {
    if merged.members.len() > MAX_GROUP_DEVICES {
        return Err(Refusal::new(
            ErrorCode::GroupFull,
            format!("a group has at most {MAX_GROUP_DEVICES} member devices"),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(merged.members.len());
    for member in &merged.members {
        if !seen.insert((&member.user, member.device)) {
            return Err(Refusal::invalid(format!(
                "{}/{} would have two leaves",
                member.user, member.device
            )));
        }
    }
    if let Some(stranger) = added_admins
        .iter()
        .find(|a| !merged.members.iter().any(|m| m.user == **a))
    {
        return Err(Refusal::invalid(format!(
            "{stranger} cannot become an admin without a leaf in the group"
        )));
    }
    Ok(())
}
