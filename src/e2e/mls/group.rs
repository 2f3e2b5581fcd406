//! What this device does to its groups: create one, add devices from fetched key packages,
//! remove a user's devices, leave, commit pending proposals, make an admin, update its keys,
//! send. A commit is saved as pending (with the change behind it) before it is returned;
//! [`MlsDevice::commit_accepted`] merges it once the server has ordered it, and
//! [`MlsDevice::commit_refused`] drops it when another commit won the epoch, keeping the change
//! so [`MlsDevice::redo`] can make it again at the new epoch.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;

use super::cert::{self, MemberId, Pins};
use super::device::Session;
use super::error::mls;
use super::store::{GroupMeta, PendingChange, PostedCommit};
use super::{GROUP_ID_LEN, MlsDevice, MlsError, MlsGroupId};
use crate::protocol::groups::{DeviceRevocation, encode_revocations};

/// A key package the server handed out for a device of `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedKeyPackage {
    /// The user it was fetched for (the key package must name this user).
    pub user: String,
    /// The TLS-encoded `KeyPackage`.
    pub bytes: Vec<u8>,
}

/// A commit of this device, saved as pending: post it (and its welcome) to the server, then
/// call [`MlsDevice::commit_accepted`] or [`MlsDevice::commit_refused`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The group.
    pub group: MlsGroupId,
    /// The epoch the commit was made in (the server accepts it only at this epoch).
    pub epoch: u64,
    /// The commit (an MLS `PublicMessage`).
    pub commit: Vec<u8>,
    /// The welcome for the devices it adds, if it adds any.
    pub welcome: Option<Vec<u8>>,
    /// The devices it adds.
    pub added: Vec<MemberId>,
    /// The devices it removes.
    pub removed: Vec<MemberId>,
}

impl MlsDevice {
    /// Creates a group with a random 16-byte id; this device is its only member and its user
    /// the first admin.
    pub fn create_group(&self) -> Result<MlsGroupId, MlsError> {
        self.change(|s| create(s, None))
    }

    /// Adds the devices whose key packages were fetched: each must validate, name the user it
    /// was fetched for, be certified by that user's pinned identity and not be a member yet.
    /// Only an admin adds other users' devices; anyone may add devices of their own user.
    pub fn add_members(
        &self,
        group: &MlsGroupId,
        key_packages: &[FetchedKeyPackage],
        pins: &dyn Pins,
    ) -> Result<Commit, MlsError> {
        self.change(|s| add(s, group, key_packages, pins, true))
    }

    /// Removes every device of `user` (but this one), covering the proposals pending (a
    /// device of `user` asking to leave). Only an admin removes other users, unless `user`
    /// left; anyone may remove the other devices of their own user.
    pub fn remove_user(&self, group: &MlsGroupId, user: &str) -> Result<Commit, MlsError> {
        self.change(|s| remove(s, group, user))
    }

    /// Removes single devices' leaves (devices removed from their accounts; members without
    /// a leaf are skipped). Allowed for an admin, for this user's own other devices, for users
    /// who left, and for any device whose signed revocation is in `revocations`: the commit
    /// carries those (for the removed devices) in its authenticated data, so that every
    /// member can check them against the identity it pinned.
    pub fn remove_devices(
        &self,
        group: &MlsGroupId,
        devices: &[MemberId],
        revocations: &[DeviceRevocation],
    ) -> Result<Commit, MlsError> {
        self.change(|s| remove_devices(s, group, devices, revocations))
    }

    /// Asks to leave: a proposal removing this device, for another member to commit. Post it
    /// with the server's leave request; the group goes inactive when the commit arrives.
    pub fn leave(&self, group: &MlsGroupId) -> Result<Vec<u8>, MlsError> {
        self.change(|s| {
            let mut g = s.group(group)?;
            ensure_operational(&g)?;
            let proposal = g.leave_group(s.provider(), &s.signer).map_err(mls)?;
            proposal.to_bytes().map_err(mls)
        })
    }

    /// Commits the pending proposals (members who left).
    pub fn commit_proposals(&self, group: &MlsGroupId) -> Result<Commit, MlsError> {
        self.change(|s| commit_proposals(s, group))
    }

    /// Makes `user` (a member) an admin too. Only an admin may.
    pub fn add_admin(&self, group: &MlsGroupId, user: &str) -> Result<Commit, MlsError> {
        self.change(|s| add_admin(s, group, user))
    }

    /// Updates this device's leaf with fresh keys (post-compromise security).
    pub fn update(&self, group: &MlsGroupId) -> Result<Commit, MlsError> {
        self.change(|s| update(s, group))
    }

    /// Encrypts an application message for the group (an MLS `PrivateMessage`).
    pub fn send(&self, group: &MlsGroupId, plaintext: &[u8]) -> Result<Vec<u8>, MlsError> {
        self.change(|s| {
            let mut g = s.group(group)?;
            ensure_operational(&g)?;
            if g.pending_proposals().next().is_some() {
                return Err(MlsError::PendingProposals);
            }
            let message = g
                .create_message(s.provider(), &s.signer, plaintext)
                .map_err(mls)?;
            message.to_bytes().map_err(mls)
        })
    }

    /// The server ordered this device's pending commit: merge it. Returns the new epoch
    /// (also when the commit was merged already, having come back in the inbox first).
    pub fn commit_accepted(&self, group: &MlsGroupId) -> Result<u64, MlsError> {
        self.change(|s| {
            let mut g = s.group(group)?;
            if g.pending_commit().is_some() {
                g.merge_pending_commit(s.provider()).map_err(mls)?;
            }
            let meta = s.state.meta_mut(group)?;
            meta.pending = None;
            meta.posted = None;
            Ok(g.epoch().as_u64())
        })
    }

    /// The server refused this device's pending commit (another one won the epoch): drop it.
    /// Returns the change behind it, which [`Self::redo`] makes again once the winning commit
    /// has been processed.
    pub fn commit_refused(&self, group: &MlsGroupId) -> Result<Option<PendingChange>, MlsError> {
        self.change(|s| {
            let mut g = s.group(group)?;
            if g.pending_commit().is_some() {
                g.clear_pending_commit(s.provider().storage())
                    .map_err(mls)?;
            }
            let meta = s.state.meta_mut(group)?;
            meta.posted = None;
            Ok(meta.pending.clone())
        })
    }

    /// Makes the change of a refused commit again, at the current epoch. `None` when there is
    /// nothing left to do (the change was made by others meanwhile, or there was none).
    pub fn redo(&self, group: &MlsGroupId, pins: &dyn Pins) -> Result<Option<Commit>, MlsError> {
        self.change(|s| {
            let Some(change) = s.state.meta_mut(group)?.pending.take() else {
                return Ok(None);
            };
            if s.group(group)?.pending_commit().is_some() {
                return Err(MlsError::PendingCommit);
            }
            let made = match &change {
                PendingChange::Add(fetched) => {
                    let fetched: Vec<FetchedKeyPackage> = fetched
                        .iter()
                        .map(|(user, bytes)| FetchedKeyPackage {
                            user: user.clone(),
                            bytes: bytes.to_vec(),
                        })
                        .collect();
                    add(s, group, &fetched, pins, true)
                }
                PendingChange::Remove(user) => remove(s, group, user),
                PendingChange::AddAdmin(user) => add_admin(s, group, user),
                PendingChange::CommitProposals => commit_proposals(s, group),
                PendingChange::Update => update(s, group),
                PendingChange::RemoveDevices {
                    members,
                    revocations,
                } => {
                    let devices: Vec<MemberId> = members
                        .iter()
                        .map(|(user, device)| MemberId {
                            user: user.clone(),
                            device: *device,
                        })
                        .collect();
                    remove_devices(s, group, &devices, revocations)
                }
            };
            match made {
                Ok(commit) => Ok(Some(commit)),
                Err(MlsError::Nothing(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// Records how the pending commit is posted (before it is sent), so that it can be
    /// posted again under the same message id if the answer is lost.
    pub fn mark_posted(&self, group: &MlsGroupId, posted: PostedCommit) -> Result<(), MlsError> {
        self.change(|s| {
            if s.group(group)?.pending_commit().is_none() {
                return Err(MlsError::NoPendingCommit);
            }
            s.state.meta_mut(group)?.posted = Some(posted);
            Ok(())
        })
    }

    /// Pending commits posted whose answer never came, by group: post each again under its
    /// message id (the server recognises a repeat), then call [`Self::commit_accepted`] or
    /// [`Self::commit_refused`].
    pub fn posted_commits(&self) -> Result<Vec<(MlsGroupId, PostedCommit)>, MlsError> {
        self.read(|s| {
            let mut posted = Vec::new();
            for meta in &s.state.header.groups {
                if let Some(p) = &meta.posted {
                    posted.push((super::group_id(&meta.id)?, p.clone()));
                }
            }
            Ok(posted)
        })
    }

    /// Records that `user` left the group (the server's notice): any member may then commit
    /// the removal of their devices.
    pub fn note_departed(&self, group: &MlsGroupId, user: &str) -> Result<(), MlsError> {
        self.change(|s| {
            s.state.meta_mut(group)?.departed.insert(user.to_owned());
            Ok(())
        })
    }

    /// Deletes a group from this device's state (after it was removed, or to give it up).
    pub fn forget_group(&self, group: &MlsGroupId) -> Result<(), MlsError> {
        self.change(|s| {
            let mut g = s.group(group)?;
            g.delete(s.provider().storage()).map_err(mls)?;
            s.state.header.groups.retain(|m| m.id != group);
            Ok(())
        })
    }
}

/// Creates a group (named, for the server, or not) with a random id.
pub(super) fn create(s: &mut Session<'_>, name: Option<&str>) -> Result<MlsGroupId, MlsError> {
    let mut id = [0u8; GROUP_ID_LEN];
    let random = s.provider().rand().random_vec(GROUP_ID_LEN).map_err(mls)?;
    id.copy_from_slice(&random);
    let config = cert::create_config(
        &s.state.header.certification,
        std::slice::from_ref(&s.me.user),
    )?;
    let credential = s.credential();
    MlsGroup::new_with_group_id(
        s.provider(),
        &s.signer,
        &config,
        GroupId::from_slice(&id),
        credential,
    )
    .map_err(mls)?;
    s.state.header.groups.push(GroupMeta {
        id: id.to_vec(),
        name: name.map(str::to_owned),
        departed: Default::default(),
        pending: None,
        posted: None,
    });
    Ok(id)
}

/// Refuses an operation on a group this device left or was removed from, or whose previous
/// commit waits for the server.
pub(super) fn ensure_operational(g: &MlsGroup) -> Result<(), MlsError> {
    if !g.is_active() {
        return Err(MlsError::Inactive);
    }
    if g.pending_commit().is_some() {
        return Err(MlsError::PendingCommit);
    }
    Ok(())
}

fn ensure_admin(g: &MlsGroup, user: &str) -> Result<(), MlsError> {
    if cert::admins_of(g.extensions())?.iter().any(|a| a == user) {
        Ok(())
    } else {
        Err(MlsError::NotAdmin { user: user.into() })
    }
}

/// The members of a group with their leaf indexes.
pub(super) fn members(g: &MlsGroup) -> Result<Vec<(LeafNodeIndex, MemberId)>, MlsError> {
    g.members()
        .map(|m| Ok((m.index, MemberId::of_credential(&m.credential)?)))
        .collect()
}

/// Validates a fetched key package and checks its certification against the pins.
pub(super) fn check_key_package(
    s: &Session<'_>,
    fetched: &FetchedKeyPackage,
    pins: &dyn Pins,
) -> Result<(KeyPackage, MemberId), MlsError> {
    let key_package = KeyPackageIn::tls_deserialize_exact(fetched.bytes.as_slice())
        .map_err(|e| MlsError::KeyPackage(e.to_string()))?
        .validate(s.provider().crypto(), ProtocolVersion::Mls10)
        .map_err(|e| MlsError::KeyPackage(e.to_string()))?;
    if key_package.ciphersuite() != cert::CIPHERSUITE {
        return Err(MlsError::KeyPackage("another ciphersuite".into()));
    }
    let member = MemberId::of_credential(key_package.leaf_node().credential())?;
    if member.user != fetched.user {
        return Err(MlsError::KeyPackage(format!(
            "fetched for {} but names {member}",
            fetched.user
        )));
    }
    let identity = pins
        .pinned(&member.user)
        .ok_or_else(|| MlsError::Unpinned(vec![member.user.clone()]))?;
    cert::verify_leaf(key_package.leaf_node(), &identity)?;
    Ok((key_package, member))
}

/// Adds devices; `enforce` checks the admin rule locally (tests turn it off to see the other
/// members refuse).
pub(super) fn add(
    s: &mut Session<'_>,
    group: &MlsGroupId,
    fetched: &[FetchedKeyPackage],
    pins: &dyn Pins,
    enforce: bool,
) -> Result<Commit, MlsError> {
    let mut g = s.group(group)?;
    ensure_operational(&g)?;
    let mut unpinned: Vec<String> = fetched
        .iter()
        .filter(|f| pins.pinned(&f.user).is_none())
        .map(|f| f.user.clone())
        .collect();
    if !unpinned.is_empty() {
        unpinned.sort();
        unpinned.dedup();
        return Err(MlsError::Unpinned(unpinned));
    }
    if enforce && fetched.iter().any(|f| f.user != s.me.user) {
        ensure_admin(&g, &s.me.user)?;
    }
    let present: Vec<MemberId> = members(&g)?.into_iter().map(|(_, m)| m).collect();
    let mut packages = Vec::new();
    let mut added = Vec::new();
    for f in fetched {
        let (key_package, member) = check_key_package(s, f, pins)?;
        if present.contains(&member) || added.contains(&member) {
            continue;
        }
        packages.push(key_package);
        added.push(member);
    }
    if packages.is_empty() {
        return Err(MlsError::Nothing("every device is a member already".into()));
    }
    let epoch = g.epoch().as_u64();
    let (commit, welcome, _) = g
        .add_members(s.provider(), &s.signer, &packages)
        .map_err(mls)?;
    s.state.meta_mut(group)?.pending = Some(PendingChange::Add(
        fetched
            .iter()
            .map(|f| (f.user.clone(), serde_bytes::ByteBuf::from(f.bytes.clone())))
            .collect(),
    ));
    Ok(Commit {
        group: *group,
        epoch,
        commit: commit.to_bytes().map_err(mls)?,
        welcome: Some(welcome.to_bytes().map_err(mls)?),
        added,
        removed: Vec::new(),
    })
}

/// The leaves whose removal is proposed already (a device leaving by its own proposal): a
/// commit covers them anyway, so they are not removed again.
fn proposed_removals(g: &MlsGroup) -> Vec<LeafNodeIndex> {
    g.pending_proposals()
        .filter_map(|p| match p.proposal() {
            Proposal::Remove(r) => Some(r.removed()),
            _ => None,
        })
        .collect()
}

fn remove(s: &mut Session<'_>, group: &MlsGroupId, user: &str) -> Result<Commit, MlsError> {
    let mut g = s.group(group)?;
    ensure_operational(&g)?;
    let departed = s.state.meta_mut(group)?.departed.contains(user);
    if user != s.me.user && !departed {
        ensure_admin(&g, &s.me.user)?;
    }
    let own = g.own_leaf_index();
    let proposed = proposed_removals(&g);
    let all = members(&g)?;
    let theirs: Vec<&(LeafNodeIndex, MemberId)> = all
        .iter()
        .filter(|(index, m)| m.user == user && *index != own)
        .collect();
    if theirs.is_empty() {
        return Err(MlsError::Nothing(format!(
            "{user} has no device in the group"
        )));
    }
    let removed: Vec<MemberId> = theirs.iter().map(|(_, m)| m.clone()).collect();
    let indexes: Vec<LeafNodeIndex> = theirs
        .iter()
        .map(|(index, _)| *index)
        .filter(|index| !proposed.contains(index))
        .collect();
    let epoch = g.epoch().as_u64();
    let (commit, _, _) = if indexes.is_empty() {
        g.commit_to_pending_proposals(s.provider(), &s.signer)
            .map_err(mls)?
    } else {
        g.remove_members(s.provider(), &s.signer, &indexes)
            .map_err(mls)?
    };
    s.state.meta_mut(group)?.pending = Some(PendingChange::Remove(user.to_owned()));
    Ok(Commit {
        group: *group,
        epoch,
        commit: commit.to_bytes().map_err(mls)?,
        welcome: None,
        added: Vec::new(),
        removed,
    })
}

fn remove_devices(
    s: &mut Session<'_>,
    group: &MlsGroupId,
    devices: &[MemberId],
    revocations: &[DeviceRevocation],
) -> Result<Commit, MlsError> {
    let mut g = s.group(group)?;
    ensure_operational(&g)?;
    let departed = s.state.meta_mut(group)?.departed.clone();
    let admin = ensure_admin(&g, &s.me.user).is_ok();
    let own = g.own_leaf_index();
    let proposed = proposed_removals(&g);
    let revocation_of = |m: &MemberId| {
        revocations
            .iter()
            .find(|r| r.username == m.user && r.device == m.device)
    };
    let mut removed = Vec::new();
    let mut indexes = Vec::new();
    let mut proofs = Vec::new();
    for (index, member) in members(&g)? {
        if index == own || !devices.contains(&member) {
            continue;
        }
        let proof = revocation_of(&member);
        let allowed =
            admin || member.user == s.me.user || departed.contains(&member.user) || proof.is_some();
        if !allowed {
            return Err(MlsError::NotAdmin {
                user: s.me.user.clone(),
            });
        }
        proofs.extend(proof.cloned());
        if !proposed.contains(&index) {
            indexes.push(index);
        }
        removed.push(member);
    }
    if removed.is_empty() {
        return Err(MlsError::Nothing(
            "none of the devices is in the group".into(),
        ));
    }
    let epoch = g.epoch().as_u64();
    g.set_aad(encode_revocations(&proofs));
    let (commit, _, _) = if indexes.is_empty() {
        g.commit_to_pending_proposals(s.provider(), &s.signer)
            .map_err(mls)?
    } else {
        g.remove_members(s.provider(), &s.signer, &indexes)
            .map_err(mls)?
    };
    s.state.meta_mut(group)?.pending = Some(PendingChange::RemoveDevices {
        members: removed.iter().map(|m| (m.user.clone(), m.device)).collect(),
        revocations: proofs,
    });
    Ok(Commit {
        group: *group,
        epoch,
        commit: commit.to_bytes().map_err(mls)?,
        welcome: None,
        added: Vec::new(),
        removed,
    })
}

fn commit_proposals(s: &mut Session<'_>, group: &MlsGroupId) -> Result<Commit, MlsError> {
    let mut g = s.group(group)?;
    ensure_operational(&g)?;
    if g.pending_proposals().next().is_none() {
        return Err(MlsError::Nothing("no proposals pending".into()));
    }
    let present = members(&g)?;
    let removed: Vec<MemberId> = g
        .pending_proposals()
        .filter_map(|p| match p.proposal() {
            Proposal::Remove(r) => present
                .iter()
                .find(|(i, _)| *i == r.removed())
                .map(|(_, m)| m.clone()),
            _ => None,
        })
        .collect();
    let epoch = g.epoch().as_u64();
    let (commit, welcome, _) = g
        .commit_to_pending_proposals(s.provider(), &s.signer)
        .map_err(mls)?;
    s.state.meta_mut(group)?.pending = Some(PendingChange::CommitProposals);
    Ok(Commit {
        group: *group,
        epoch,
        commit: commit.to_bytes().map_err(mls)?,
        welcome: welcome.map(|w| w.to_bytes()).transpose().map_err(mls)?,
        added: Vec::new(),
        removed,
    })
}

fn add_admin(s: &mut Session<'_>, group: &MlsGroupId, user: &str) -> Result<Commit, MlsError> {
    let mut g = s.group(group)?;
    ensure_operational(&g)?;
    ensure_admin(&g, &s.me.user)?;
    let mut admins = cert::admins_of(g.extensions())?;
    if admins.iter().any(|a| a == user) {
        return Err(MlsError::Nothing(format!("{user} is an admin already")));
    }
    if !members(&g)?.iter().any(|(_, m)| m.user == user) {
        return Err(MlsError::Nothing(format!("{user} is not a member")));
    }
    admins.push(user.to_owned());
    let epoch = g.epoch().as_u64();
    let (commit, _, _) = g
        .update_group_context_extensions(s.provider(), cert::group_extensions(&admins)?, &s.signer)
        .map_err(mls)?;
    s.state.meta_mut(group)?.pending = Some(PendingChange::AddAdmin(user.to_owned()));
    Ok(Commit {
        group: *group,
        epoch,
        commit: commit.to_bytes().map_err(mls)?,
        welcome: None,
        added: Vec::new(),
        removed: Vec::new(),
    })
}

fn update(s: &mut Session<'_>, group: &MlsGroupId) -> Result<Commit, MlsError> {
    let mut g = s.group(group)?;
    ensure_operational(&g)?;
    let epoch = g.epoch().as_u64();
    let (commit, _, _) = g
        .self_update(s.provider(), &s.signer, LeafNodeParameters::default())
        .map_err(mls)?
        .into_contents();
    s.state.meta_mut(group)?.pending = Some(PendingChange::Update);
    Ok(Commit {
        group: *group,
        epoch,
        commit: commit.to_bytes().map_err(mls)?,
        welcome: None,
        added: Vec::new(),
        removed: Vec::new(),
    })
}
