//! What the delivery service checks with OpenMLS (docs/PROTOCOL.md 5.7): uploaded key
//! packages, a new group's GroupInfo, and every commit, against the DS's own `PublicGroup` of
//! the group (its state kept as bytes in the group's record). Synchronous CPU work of a few
//! milliseconds; the policy decisions that need the store (identity keys, devices) are made
//! by the caller from what [`StagedGroupCommit`] lists.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_rust_crypto::OpenMlsRustCrypto;

use crate::protocol::groups::{
    ADMINS_EXTENSION, CERTIFICATION_EXTENSION, DeviceRevocation, KEY_PACKAGE_MARGIN_SECS,
    MLS_CIPHERSUITE, certification_tbs, decode_revocations, parse_member_identity, revocation_tbs,
};
use crate::protocol::keys::IdentityKeyBytes;
use crate::protocol::{DeviceId, ErrorCode, Username};
use crate::store::{GroupMemberRecord, GroupRecord};

const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519;

/// Why the DS refuses an MLS operation: the code the peer gets and why, for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub(crate) struct Refusal {
    /// The code on the wire.
    pub code: ErrorCode,
    /// Why.
    pub message: String,
    /// With `stale_epoch`: the group's current epoch.
    pub epoch: Option<u64>,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            epoch: None,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidMls, message)
    }

    fn stale(current: u64, got: u64) -> Self {
        Self {
            code: ErrorCode::StaleEpoch,
            message: format!("epoch {got} is not current (the group is at {current})"),
            epoch: Some(current),
        }
    }
}

/// A leaf the DS met in a key package, a GroupInfo or a commit: who it claims to be and what
/// must verify with that user's identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimedLeaf {
    /// The credential's user (a valid, folded username).
    pub user: Username,
    /// The credential's device.
    pub device: DeviceId,
    /// The bytes the certification signs.
    pub tbs: Vec<u8>,
    /// The certification (the 0xff00 extension).
    pub certification: Vec<u8>,
}

impl ClaimedLeaf {
    /// Whether the certification verifies with `identity` (Ed25519).
    pub(crate) fn verifies_with(&self, identity: &IdentityKeyBytes) -> bool {
        let crypto = openmls_rust_crypto::RustCrypto::default();
        crypto
            .verify_signature(
                SignatureScheme::ED25519,
                &self.tbs,
                &identity.0,
                &self.certification,
            )
            .is_ok()
    }
}

/// Whether `revocation` (of a device of `user`) verifies with `identity`, the account's
/// identity key (Ed25519).
pub(crate) fn revocation_verifies(
    revocation: &DeviceRevocation,
    identity: &IdentityKeyBytes,
) -> bool {
    let Some(tbs) = revocation_tbs(&revocation.username, revocation.device) else {
        return false;
    };
    let crypto = openmls_rust_crypto::RustCrypto::default();
    crypto
        .verify_signature(
            SignatureScheme::ED25519,
            &tbs,
            &identity.0,
            &revocation.signature.0,
        )
        .is_ok()
}

/// Reads a leaf's claimed identity and certification (not yet verified).
fn claimed_leaf(
    credential: &Credential,
    signature_key: &[u8],
    extensions: &Extensions<LeafNode>,
    capabilities: &Capabilities,
) -> Result<ClaimedLeaf, Refusal> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| Refusal::invalid("a leaf's credential is not a basic credential"))?;
    let (user, device) = identity_of(basic.identity())?;
    if !capabilities
        .extensions()
        .contains(&ExtensionType::Unknown(CERTIFICATION_EXTENSION))
    {
        return Err(Refusal::invalid(
            "a leaf's capabilities do not list the certification extension 0xff00",
        ));
    }
    let certification = extensions
        .unknown(CERTIFICATION_EXTENSION)
        .map(|ext| ext.0.clone())
        .ok_or_else(|| Refusal::invalid("a leaf has no certification extension 0xff00"))?;
    let tbs = certification_tbs(user.as_str(), device, signature_key)
        .ok_or_else(|| Refusal::invalid("a leaf's user name is too long"))?;
    Ok(ClaimedLeaf {
        user,
        device,
        tbs,
        certification,
    })
}

/// `USER/DEVICE` of a credential, with USER a valid username already folded.
fn identity_of(identity: &[u8]) -> Result<(Username, DeviceId), Refusal> {
    let bad = || Refusal::invalid("a credential's identity is not USER/DEVICE");
    let (user, device) = parse_member_identity(identity).ok_or_else(bad)?;
    let name = Username::parse(user).map_err(|_| bad())?;
    if name.as_str() != user {
        return Err(bad());
    }
    Ok((name, device))
}

/// A key package that passed OpenMLS validation and the profile's rules (its certification
/// still to verify).
#[derive(Debug, Clone)]
pub(crate) struct CheckedKeyPackage {
    /// Its MLS reference.
    pub reference: Vec<u8>,
    /// Whether it carries the last-resort extension.
    pub last_resort: bool,
    /// When its MLS lifetime ends (Unix seconds).
    pub not_after: u64,
    /// Its leaf.
    pub leaf: ClaimedLeaf,
}

/// Parses and validates an uploaded key package (`invalid_keys` on any failure): OpenMLS's
/// checks (signature, a lifetime that holds now), the ciphersuite, the leaf's credential and
/// certification extension, and a lifetime that lasts past `now` +
/// [`KEY_PACKAGE_MARGIN_SECS`] (one that ends sooner would never be handed out).
pub(crate) fn check_key_package(bytes: &[u8], now: u64) -> Result<CheckedKeyPackage, Refusal> {
    let invalid = |why: String| Refusal::new(ErrorCode::InvalidKeys, why);
    let provider = OpenMlsRustCrypto::default();
    let package = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| invalid(format!("not a key package: {e}")))?
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .map_err(|e| invalid(format!("the key package does not validate: {e}")))?;
    if package.ciphersuite() != CIPHERSUITE {
        return Err(invalid(format!(
            "only ciphersuite {MLS_CIPHERSUITE:#06x} is accepted"
        )));
    }
    let not_after = package.life_time().not_after();
    if not_after <= now.saturating_add(KEY_PACKAGE_MARGIN_SECS) {
        return Err(invalid(format!(
            "the key package's lifetime ends within {KEY_PACKAGE_MARGIN_SECS} s"
        )));
    }
    let leaf_node = package.leaf_node();
    let leaf = claimed_leaf(
        leaf_node.credential(),
        leaf_node.signature_key().as_slice(),
        leaf_node.extensions(),
        leaf_node.capabilities(),
    )
    .map_err(|r| invalid(r.message))?;
    let reference = package
        .hash_ref(provider.crypto())
        .map_err(|e| invalid(format!("cannot hash the key package: {e}")))?;
    Ok(CheckedKeyPackage {
        reference: reference.as_slice().to_vec(),
        last_resort: package.last_resort(),
        not_after,
        leaf,
    })
}

/// The DS's state of a group: its OpenMLS storage, dumped to bytes.
fn state_to_bytes(provider: &OpenMlsRustCrypto) -> Result<Vec<u8>, Refusal> {
    let values = provider
        .storage()
        .values
        .read()
        .map_err(|_| Refusal::new(ErrorCode::Internal, "MLS state lock poisoned"))?;
    let mut out = Vec::new();
    out.extend_from_slice(
        &u32::try_from(values.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for (key, value) in values.iter() {
        for part in [key, value] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(part);
        }
    }
    Ok(out)
}

/// Reads `n` bytes from the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

/// Reads a u32-BE length from the front of `rest`.
fn take_len(rest: &mut &[u8]) -> Option<usize> {
    let raw: [u8; 4] = take(rest, 4)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(raw)).ok()
}

fn state_from_bytes(bytes: &[u8]) -> Result<OpenMlsRustCrypto, Refusal> {
    let corrupt = || {
        Refusal::new(
            ErrorCode::Internal,
            "the group's stored MLS state is corrupt",
        )
    };
    let provider = OpenMlsRustCrypto::default();
    {
        let mut values = provider.storage().values.write().map_err(|_| corrupt())?;
        let mut rest = bytes;
        let count = take_len(&mut rest).ok_or_else(corrupt)?;
        for _ in 0..count {
            let n = take_len(&mut rest).ok_or_else(corrupt)?;
            let key = take(&mut rest, n).ok_or_else(corrupt)?.to_vec();
            let n = take_len(&mut rest).ok_or_else(corrupt)?;
            let value = take(&mut rest, n).ok_or_else(corrupt)?.to_vec();
            values.insert(key, value);
        }
    }
    Ok(provider)
}

fn load(record: &GroupRecord) -> Result<(OpenMlsRustCrypto, PublicGroup), Refusal> {
    let provider = state_from_bytes(&record.state)?;
    let group = PublicGroup::load(provider.storage(), &GroupId::from_slice(&record.id))
        .ok()
        .flatten()
        .ok_or_else(|| Refusal::new(ErrorCode::Internal, "the group's MLS state is missing"))?;
    Ok((provider, group))
}

/// The admins in a group context's 0xff01 extension (sorted, unique).
fn admins_of(extensions: &Extensions<GroupContext>) -> Result<Vec<Username>, Refusal> {
    let ext = extensions
        .unknown(ADMINS_EXTENSION)
        .ok_or_else(|| Refusal::invalid("the group has no admins extension 0xff01"))?;
    let names: Vec<String> = rmp_serde::from_slice(&ext.0)
        .map_err(|_| Refusal::invalid("the admins extension is not an array of names"))?;
    let mut admins = Vec::with_capacity(names.len());
    for name in names {
        let parsed = Username::parse(&name)
            .ok()
            .filter(|n| n.as_str() == name)
            .ok_or_else(|| Refusal::invalid("the admins extension holds an invalid name"))?;
        if admins.last().is_some_and(|last: &Username| *last >= parsed) {
            return Err(Refusal::invalid(
                "the admins extension must be sorted and unique",
            ));
        }
        admins.push(parsed);
    }
    Ok(admins)
}

fn requires_certification(extensions: &Extensions<GroupContext>) -> bool {
    extensions.required_capabilities().is_some_and(|caps| {
        caps.extension_types()
            .contains(&ExtensionType::Unknown(CERTIFICATION_EXTENSION))
    })
}

/// The members of a public group as leaf records.
fn members_of(group: &PublicGroup) -> Result<Vec<GroupMemberRecord>, Refusal> {
    group
        .members()
        .map(|m| {
            let basic = BasicCredential::try_from(m.credential.clone())
                .map_err(|_| Refusal::invalid("a member's credential is not basic"))?;
            let (user, device) = identity_of(basic.identity())?;
            Ok(GroupMemberRecord {
                user,
                device,
                leaf: m.index.u32(),
            })
        })
        .collect()
}

/// A new group as the DS sees it from the creator's GroupInfo.
#[derive(Debug)]
pub(crate) struct NewGroup {
    /// Its epoch.
    pub epoch: u64,
    /// Its only member.
    pub creator: ClaimedLeaf,
    /// The DS's state.
    pub state: Vec<u8>,
    /// The only leaf.
    pub members: Vec<GroupMemberRecord>,
    /// The admins (the creator).
    pub admins: Vec<Username>,
}

/// Builds the DS's view of a new group from its creator's GroupInfo (an `MLSMessage`).
pub(crate) fn new_group(group_id: &[u8; 16], group_info: &[u8]) -> Result<NewGroup, Refusal> {
    let message = MlsMessageIn::tls_deserialize_exact(group_info)
        .map_err(|e| Refusal::invalid(format!("not an MLSMessage: {e}")))?;
    let MlsMessageBodyIn::GroupInfo(info) = message.extract() else {
        return Err(Refusal::invalid("the group_info is not a GroupInfo"));
    };
    if info.group_id().as_slice() != group_id {
        return Err(Refusal::invalid("the GroupInfo is for another group id"));
    }
    if info.ciphersuite() != CIPHERSUITE {
        return Err(Refusal::invalid(format!(
            "only ciphersuite {MLS_CIPHERSUITE:#06x} is accepted"
        )));
    }
    let tree = info
        .extensions()
        .ratchet_tree()
        .ok_or_else(|| Refusal::invalid("the GroupInfo carries no ratchet tree"))?
        .ratchet_tree()
        .clone();
    let provider = OpenMlsRustCrypto::default();
    let (group, _) = PublicGroup::from_external(
        provider.crypto(),
        provider.storage(),
        tree,
        info,
        ProposalStore::new(),
    )
    .map_err(|e| Refusal::invalid(format!("the GroupInfo does not validate: {e}")))?;
    let context = group.group_context();
    if !requires_certification(context.extensions()) {
        return Err(Refusal::invalid(
            "the group must require the certification extension 0xff00",
        ));
    }
    let admins = admins_of(context.extensions())?;
    let members = members_of(&group)?;
    let [only] = members.as_slice() else {
        return Err(Refusal::invalid(
            "a new group has exactly one member, its creator",
        ));
    };
    if admins != [only.user.clone()] {
        return Err(Refusal::invalid(
            "a new group's admins are its creator alone",
        ));
    }
    let leaf_node = group
        .leaf(LeafNodeIndex::new(only.leaf))
        .ok_or_else(|| Refusal::invalid("the creator's leaf is missing"))?;
    let creator = claimed_leaf(
        leaf_node.credential(),
        leaf_node.signature_key().as_slice(),
        leaf_node.extensions(),
        leaf_node.capabilities(),
    )?;
    Ok(NewGroup {
        epoch: context.epoch().as_u64(),
        creator,
        state: state_to_bytes(&provider)?,
        members,
        admins,
    })
}

/// What a group send's body is, as far as the DS can read it.
pub(crate) enum GroupMessage {
    /// A commit (PublicMessage) by the leaf `sender` at `epoch`.
    Commit {
        /// The committer's leaf.
        sender: u32,
        /// The epoch it was made at.
        epoch: u64,
        /// The parsed message.
        message: Box<PublicMessageIn>,
    },
    /// An application message (PrivateMessage) at `epoch`.
    Application {
        /// The epoch it was made at.
        epoch: u64,
    },
}

/// Reads a group send's MLS message and checks its group id.
pub(crate) fn read_group_message(
    group_id: &[u8; 16],
    bytes: &[u8],
) -> Result<GroupMessage, Refusal> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| Refusal::invalid(format!("not one MLSMessage: {e}")))?;
    match message.extract() {
        MlsMessageBodyIn::PublicMessage(m) => {
            if m.group_id().as_slice() != group_id {
                return Err(Refusal::invalid("the message is for another group id"));
            }
            if m.content_type() != ContentType::Commit {
                return Err(Refusal::invalid(
                    "a PublicMessage must be a commit (proposals go inline in commits)",
                ));
            }
            let Sender::Member(leaf) = m.sender() else {
                return Err(Refusal::invalid("a commit's sender must be a member"));
            };
            Ok(GroupMessage::Commit {
                sender: leaf.u32(),
                epoch: m.epoch().as_u64(),
                message: Box::new(m),
            })
        }
        MlsMessageBodyIn::PrivateMessage(m) => {
            if m.group_id().as_slice() != group_id {
                return Err(Refusal::invalid("the message is for another group id"));
            }
            if m.content_type() != ContentType::Application {
                return Err(Refusal::invalid(
                    "a PrivateMessage must be an application message",
                ));
            }
            Ok(GroupMessage::Application {
                epoch: m.epoch().as_u64(),
            })
        }
        _ => Err(Refusal::invalid(
            "a group send is a commit (PublicMessage) or an application message (PrivateMessage)",
        )),
    }
}

/// A commit the DS processed against its view of the group, not yet merged.
pub(crate) struct StagedGroupCommit {
    provider: OpenMlsRustCrypto,
    group: PublicGroup,
    staged: Box<StagedCommit>,
    /// Leaves added, with their key package references.
    pub added: Vec<(ClaimedLeaf, Vec<u8>)>,
    /// Leaves removed, by index.
    pub removed: Vec<u32>,
    /// The new admins, when a GroupContextExtensions proposal changes them.
    pub new_admins: Option<Vec<Username>>,
    /// The committer's new leaf, when it updates its path.
    pub path_leaf: Option<ClaimedLeaf>,
    /// The device revocations in the commit's authenticated data (not yet verified).
    pub revocations: Vec<DeviceRevocation>,
}

/// Processes a commit (already read by [`read_group_message`], its epoch current and its
/// sender the posting device's leaf) against the DS's view of the group.
pub(crate) fn stage_commit(
    record: &GroupRecord,
    message: PublicMessageIn,
) -> Result<StagedGroupCommit, Refusal> {
    let (provider, group) = load(record)?;
    let processed = group
        .process_message(provider.crypto(), message)
        .map_err(|e| match e {
            PublicProcessMessageError::ValidationError(ValidationError::WrongEpoch) => {
                Refusal::stale(record.epoch, record.epoch)
            }
            e => Refusal::invalid(format!("the commit does not validate: {e}")),
        })?;
    let revocations = decode_revocations(processed.aad()).ok_or_else(|| {
        Refusal::invalid("a commit's authenticated data is empty or an array of device revocations")
    })?;
    let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
        return Err(Refusal::invalid("the message is not a commit"));
    };
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut changes_extensions = false;
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            Proposal::Add(add) => {
                let package = add.key_package();
                let leaf_node = package.leaf_node();
                let leaf = claimed_leaf(
                    leaf_node.credential(),
                    leaf_node.signature_key().as_slice(),
                    leaf_node.extensions(),
                    leaf_node.capabilities(),
                )?;
                let reference = package
                    .hash_ref(provider.crypto())
                    .map_err(|e| Refusal::invalid(format!("cannot hash a key package: {e}")))?;
                added.push((leaf, reference.as_slice().to_vec()));
            }
            Proposal::Remove(remove) => removed.push(remove.removed().u32()),
            Proposal::GroupContextExtensions(_) => changes_extensions = true,
            other => {
                return Err(Refusal::invalid(format!(
                    "the DS does not take {:?} proposals",
                    other.proposal_type()
                )));
            }
        }
    }
    let new_context = staged.group_context();
    let new_admins = if changes_extensions {
        if !requires_certification(new_context.extensions()) {
            return Err(Refusal::invalid(
                "the group must keep requiring the certification extension 0xff00",
            ));
        }
        Some(admins_of(new_context.extensions())?)
    } else {
        None
    };
    let path_leaf = staged
        .update_path_leaf_node()
        .map(|leaf_node| {
            claimed_leaf(
                leaf_node.credential(),
                leaf_node.signature_key().as_slice(),
                leaf_node.extensions(),
                leaf_node.capabilities(),
            )
        })
        .transpose()?;
    Ok(StagedGroupCommit {
        provider,
        group,
        staged,
        added,
        removed,
        new_admins,
        path_leaf,
        revocations,
    })
}

/// A group after a merged commit.
#[derive(Debug)]
pub(crate) struct MergedCommit {
    /// The new epoch.
    pub epoch: u64,
    /// The leaves after it.
    pub members: Vec<GroupMemberRecord>,
    /// The DS's new state.
    pub state: Vec<u8>,
}

impl StagedGroupCommit {
    /// Merges the commit into the DS's view (in memory; the caller stores the state).
    pub(crate) fn merge(mut self) -> Result<MergedCommit, Refusal> {
        self.group
            .merge_commit(self.provider.storage(), *self.staged)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot merge: {e}")))?;
        Ok(MergedCommit {
            epoch: self.group.group_context().epoch().as_u64(),
            members: members_of(&self.group)?,
            state: state_to_bytes(&self.provider)?,
        })
    }
}

/// Checks that `welcome` is one `Welcome` for exactly the key packages `references`.
pub(crate) fn check_welcome(welcome: &[u8], references: &[Vec<u8>]) -> Result<(), Refusal> {
    let message = MlsMessageIn::tls_deserialize_exact(welcome)
        .map_err(|e| Refusal::invalid(format!("the welcome is not one MLSMessage: {e}")))?;
    let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
        return Err(Refusal::invalid("the welcome part is not a Welcome"));
    };
    let mut named: Vec<Vec<u8>> = welcome
        .secrets()
        .iter()
        .map(|s| s.new_member().as_slice().to_vec())
        .collect();
    let mut wanted = references.to_vec();
    named.sort();
    wanted.sort();
    if named != wanted {
        return Err(Refusal::invalid(
            "the welcome is not for exactly the key packages the commit adds",
        ));
    }
    Ok(())
}
