//! What the server delivers, processed: a welcome joins a group once every leaf's
//! certification verifies; a commit is merged only if it keeps the group's policy (admins add
//! and remove other users and change the admins; anyone removes a user who left or a device
//! whose removal from its account the commit proves with a revocation signed by that
//! account's pinned identity, adds or removes devices of their own user, or updates); a
//! proposal is stored for the next commit
//! (only a member leaving is accepted); an application message is decrypted and attributed to
//! the device its verified credential names.

use std::collections::BTreeSet;

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;

use super::cert::{self, MemberId, Pins};
use super::device::Session;
use super::error::mls;
use super::group::members;
use super::store::GroupMeta;
use super::{MlsDevice, MlsError, MlsGroupId, group_id};

/// What processing a delivered MLS message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// This device joined a group from a welcome.
    Joined {
        /// The group.
        group: MlsGroupId,
        /// Its epoch.
        epoch: u64,
        /// The member who added this device.
        inviter: MemberId,
        /// All members, sorted.
        members: Vec<MemberId>,
    },
    /// An application message.
    Message {
        /// The group.
        group: MlsGroupId,
        /// The epoch it was sent in.
        epoch: u64,
        /// The device that sent it (from its verified credential).
        sender: MemberId,
        /// The plaintext.
        plaintext: Vec<u8>,
    },
    /// Another member's commit, checked and merged.
    Commit {
        /// The group.
        group: MlsGroupId,
        /// The new epoch.
        epoch: u64,
        /// Who committed.
        committer: MemberId,
        /// Devices added.
        added: Vec<MemberId>,
        /// Devices removed.
        removed: Vec<MemberId>,
        /// Whether the admins changed.
        admins_changed: bool,
        /// Whether it removed this device (the group is now inactive).
        removed_self: bool,
        /// Whether this device had a commit pending, now lost: call
        /// [`MlsDevice::commit_refused`] (if the server has not said so yet) and
        /// [`MlsDevice::redo`].
        lost_own_commit: bool,
    },
    /// This device's own commit came back and was merged.
    OwnCommit {
        /// The group.
        group: MlsGroupId,
        /// The new epoch.
        epoch: u64,
    },
    /// A member asked to leave; the proposal is stored. Commit it
    /// ([`MlsDevice::commit_proposals`]).
    Leaving {
        /// The group.
        group: MlsGroupId,
        /// The device leaving.
        member: MemberId,
    },
    /// A handshake message of an epoch this device has passed (its own commit coming back
    /// after it was merged, a redelivery) or its own proposal: nothing to do.
    Stale {
        /// The group.
        group: MlsGroupId,
    },
}

impl MlsDevice {
    /// Processes bytes the server delivered for a group: a welcome, a commit, a proposal or
    /// an application message. The state is saved before this returns, so the delivery can
    /// be acknowledged then. A refused message changes nothing.
    pub fn process(&self, bytes: &[u8], pins: &dyn Pins) -> Result<Incoming, MlsError> {
        match parse(bytes)? {
            Parsed::Welcome(welcome) => self.change(|s| join(s, welcome, pins)),
            Parsed::Protocol(message) => self.change(|s| handle(s, message, pins)),
        }
    }
}

/// A delivered MLS message, decoded.
pub(super) enum Parsed {
    /// A welcome into a group.
    Welcome(Welcome),
    /// A commit, proposal or application message of a group.
    Protocol(ProtocolMessage),
}

/// Decodes a delivered `MLSMessage`, refusing key packages, group infos and trailing bytes.
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, MlsError> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| MlsError::Malformed(e.to_string()))?;
    match message.wire_format() {
        WireFormat::Welcome => match message.extract() {
            MlsMessageBodyIn::Welcome(welcome) => Ok(Parsed::Welcome(welcome)),
            _ => Err(MlsError::Malformed("not a welcome".into())),
        },
        WireFormat::PublicMessage | WireFormat::PrivateMessage => message
            .try_into_protocol_message()
            .map(Parsed::Protocol)
            .map_err(|e| MlsError::Malformed(e.to_string())),
        other => Err(MlsError::Malformed(format!("unexpected {other:?}"))),
    }
}

pub(super) fn join(
    s: &mut Session<'_>,
    welcome: Welcome,
    pins: &dyn Pins,
) -> Result<Incoming, MlsError> {
    let staged = StagedWelcome::new_from_welcome(s.provider(), &cert::join_config(), welcome, None)
        .map_err(|e| match e {
            WelcomeError::NoMatchingKeyPackage => MlsError::KeyPackageGone,
            other => mls(other),
        })?;
    let inviter = MemberId::of_credential(staged.welcome_sender().map_err(mls)?.credential())?;
    let g = staged.into_group(s.provider()).map_err(mls)?;
    let id = group_id(g.group_id().as_slice())?;
    let policy = |reason: &str| MlsError::Policy {
        committer: inviter.to_string(),
        reason: reason.into(),
    };
    if !cert::requires_certification(g.extensions()) {
        return Err(policy("the group does not require certified members"));
    }
    cert::admins_of(g.extensions())?;
    let leaves: Vec<&LeafNode> = g
        .members()
        .map(|m| g.public_group().leaf(m.index))
        .collect::<Option<_>>()
        .ok_or_else(|| policy("a member without a leaf"))?;
    let mut all = cert::verify_leaves(leaves, pins)?;
    all.sort();
    if all.windows(2).any(|w| w[0] == w[1]) {
        return Err(policy("a device is in the group twice"));
    }
    s.state.header.groups.retain(|m| m.id != id);
    s.state.header.groups.push(GroupMeta {
        id: id.to_vec(),
        name: None,
        departed: BTreeSet::new(),
        pending: None,
        posted: None,
    });
    Ok(Incoming::Joined {
        group: id,
        epoch: g.epoch().as_u64(),
        inviter,
        members: all,
    })
}

pub(super) fn handle(
    s: &mut Session<'_>,
    message: ProtocolMessage,
    pins: &dyn Pins,
) -> Result<Incoming, MlsError> {
    let id = group_id(message.group_id().as_slice())?;
    let mut g = s.group(&id)?;
    if !g.is_active() {
        return Err(MlsError::Inactive);
    }
    if message.is_handshake_message() && message.epoch() < g.epoch() {
        return Ok(Incoming::Stale { group: id });
    }
    let own = g.own_leaf_index();
    let processed = g
        .process_message(s.provider(), message)
        .map_err(process_error)?;
    let epoch = processed.epoch().as_u64();
    // Revocations a commit carries, each checked against the identity pinned for its user.
    let revoked = cert::revoked_in(processed.aad(), pins);
    let sender = MemberId::of_credential(processed.credential())?;
    let sender_index = match processed.sender() {
        Sender::Member(index) => *index,
        other => {
            return Err(MlsError::Policy {
                committer: sender.to_string(),
                reason: format!("sender {other:?} is not a member"),
            });
        }
    };
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(message) => Ok(Incoming::Message {
            group: id,
            epoch,
            sender,
            plaintext: message.into_bytes(),
        }),
        ProcessedMessageContent::ProposalMessage(queued) => {
            if sender_index == own {
                return Ok(Incoming::Stale { group: id });
            }
            match queued.proposal() {
                Proposal::Remove(r) if r.removed() == sender_index => {}
                other => {
                    return Err(MlsError::Policy {
                        committer: sender.to_string(),
                        reason: format!("a {:?} proposal", other.proposal_type()),
                    });
                }
            }
            g.store_pending_proposal(s.provider().storage(), *queued)
                .map_err(mls)?;
            s.state.meta_mut(&id)?.departed.insert(sender.user.clone());
            Ok(Incoming::Leaving {
                group: id,
                member: sender,
            })
        }
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            let departed = s.state.meta_mut(&id)?.departed.clone();
            let checked = check_commit(
                &g,
                sender_index,
                &sender,
                &Leaving {
                    departed: &departed,
                    revoked: &revoked,
                },
                &staged,
                pins,
            )?;
            let removed_self = staged.self_removed();
            g.merge_staged_commit(s.provider(), *staged).map_err(mls)?;
            let present: BTreeSet<String> = members(&g)?.into_iter().map(|(_, m)| m.user).collect();
            let meta = s.state.meta_mut(&id)?;
            meta.departed.retain(|user| present.contains(user));
            let lost_own_commit = meta.pending.is_some();
            // Another commit took the epoch: this device's posted one cannot win any more.
            meta.posted = None;
            if removed_self {
                tracing::info!(group = %hex::encode(id), "removed from an MLS group");
            }
            Ok(Incoming::Commit {
                group: id,
                epoch: g.epoch().as_u64(),
                committer: sender,
                added: checked.added,
                removed: checked.removed,
                admins_changed: checked.admins_changed,
                removed_self,
                lost_own_commit,
            })
        }
        ProcessedMessageContent::OwnPendingCommit => {
            g.merge_pending_commit(s.provider()).map_err(mls)?;
            let meta = s.state.meta_mut(&id)?;
            meta.pending = None;
            meta.posted = None;
            Ok(Incoming::OwnCommit {
                group: id,
                epoch: g.epoch().as_u64(),
            })
        }
        ProcessedMessageContent::OwnPrivateMessage => Ok(Incoming::Stale { group: id }),
        ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::Policy {
            committer: sender.to_string(),
            reason: "an external join proposal".into(),
        }),
    }
}

/// A redelivered application message is [`MlsError::Duplicate`]; other failures are openmls's.
fn process_error<E: std::fmt::Display>(e: ProcessMessageError<E>) -> MlsError {
    match e {
        ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
            openmls::framing::errors::MessageDecryptionError::SecretTreeError(
                openmls::framing::errors::SecretTreeError::SecretReuseError,
            ),
        )) => MlsError::Duplicate,
        other => mls(other),
    }
}

/// What a commit that keeps the policy changes.
struct Checked {
    added: Vec<MemberId>,
    removed: Vec<MemberId>,
    admins_changed: bool,
}

/// Who any member may remove, as this device has verified it.
struct Leaving<'a> {
    /// Users who left the group (their own remove proposal, or the server's notice).
    departed: &'a BTreeSet<String>,
    /// Devices removed from their accounts: their revocations, carried by the commit,
    /// verify with the identities pinned for their users.
    revoked: &'a BTreeSet<MemberId>,
}

/// The group's policy, checked on a commit before it is merged (against the group as it is
/// before the commit).
fn check_commit(
    g: &MlsGroup,
    committer_index: LeafNodeIndex,
    committer: &MemberId,
    leaving: &Leaving<'_>,
    staged: &StagedCommit,
    pins: &dyn Pins,
) -> Result<Checked, MlsError> {
    let refuse = |reason: String| MlsError::Policy {
        committer: committer.to_string(),
        reason,
    };
    let admins = cert::admins_of(g.extensions())?;
    let is_admin = admins.contains(&committer.user);
    let present = members(g)?;
    let at = |index: LeafNodeIndex| {
        present
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, m)| m.clone())
    };
    if at(committer_index).as_ref() != Some(committer) {
        return Err(refuse(
            "the committer's leaf does not match its credential".into(),
        ));
    }

    // Every new or changed leaf must be certified by its user's pinned identity.
    let mut leaves: Vec<&LeafNode> = Vec::new();
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            Proposal::Add(a) => leaves.push(a.key_package().leaf_node()),
            Proposal::Update(u) => leaves.push(u.leaf_node()),
            _ => {}
        }
    }
    if let Some(leaf) = staged.update_path_leaf_node() {
        leaves.push(leaf);
        if MemberId::of_credential(leaf.credential())? != *committer {
            return Err(refuse("the commit changes the committer's identity".into()));
        }
    }
    cert::verify_leaves(leaves, pins)?;

    // Users leaving in this very commit (their own remove proposals).
    let self_leaving: BTreeSet<String> = staged
        .queued_proposals()
        .filter_map(|q| match (q.proposal(), q.sender()) {
            (Proposal::Remove(r), Sender::Member(s)) if r.removed() == *s => {
                at(r.removed()).map(|m| m.user)
            }
            _ => None,
        })
        .collect();

    let mut checked = Checked {
        added: Vec::new(),
        removed: Vec::new(),
        admins_changed: false,
    };
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            Proposal::Add(a) => {
                let member = MemberId::of_credential(a.key_package().leaf_node().credential())?;
                if !is_admin && member.user != committer.user {
                    return Err(refuse(format!("adds {member} without being an admin")));
                }
                if present.iter().any(|(_, m)| *m == member) || checked.added.contains(&member) {
                    return Err(refuse(format!("adds {member}, a member already")));
                }
                checked.added.push(member);
            }
            Proposal::Remove(r) => {
                let member = at(r.removed())
                    .ok_or_else(|| refuse("removes a leaf that is not a member".into()))?;
                let allowed = is_admin
                    || member.user == committer.user
                    || leaving.departed.contains(&member.user)
                    || leaving.revoked.contains(&member)
                    || self_leaving.contains(&member.user);
                if !allowed {
                    return Err(refuse(format!("removes {member} without being an admin")));
                }
                checked.removed.push(member);
            }
            Proposal::Update(u) => {
                let Sender::Member(index) = queued.sender() else {
                    return Err(refuse("an update not from a member".into()));
                };
                let before = at(*index).ok_or_else(|| refuse("an update of no member".into()))?;
                if MemberId::of_credential(u.leaf_node().credential())? != before {
                    return Err(refuse(format!("an update changes {before}'s identity")));
                }
            }
            Proposal::GroupContextExtensions(e) => {
                if !is_admin {
                    return Err(refuse("changes the group without being an admin".into()));
                }
                if !cert::requires_certification(e.extensions()) {
                    return Err(refuse("drops the certification requirement".into()));
                }
                let new = cert::admins_of(e.extensions())?;
                if let Some(gone) = admins.iter().find(|a| !new.contains(a)) {
                    return Err(refuse(format!("removes the admin {gone}")));
                }
                let users: BTreeSet<&str> = present.iter().map(|(_, m)| m.user.as_str()).collect();
                if let Some(stranger) = new.iter().find(|a| !users.contains(a.as_str())) {
                    return Err(refuse(format!("makes {stranger}, not a member, an admin")));
                }
                checked.admins_changed = new != admins;
            }
            other => {
                return Err(refuse(format!("a {:?} proposal", other.proposal_type())));
            }
        }
    }
    Ok(checked)
}
