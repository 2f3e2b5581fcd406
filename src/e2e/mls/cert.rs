//! What ties an MLS member to an account: the credential `USER/DEVICE`, the certification of
//! the device's MLS signature key by the account's identity key (leaf extension `0xff00`), the
//! group's admins (group context extension `0xff01`), and the capabilities and configurations
//! every member and group of SecureFastChat use. Pure functions: the server can verify a key
//! package's certification with them too.

use openmls::prelude::*;

use super::MlsError;
use crate::e2e::{IdentityKey, IdentityKeyPair};
use crate::protocol::groups::{DeviceRevocation, decode_revocations, revocation_tbs};
use crate::protocol::keys::Bin;
use crate::protocol::{DeviceId, Username};

/// The one ciphersuite: X25519, ChaCha20-Poly1305, SHA-256, Ed25519.
pub const CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519;
/// Leaf-node extension type (private use) holding the certification (64-byte Ed25519
/// signature by the account's identity key).
pub const CERT_EXTENSION: u16 = 0xff00;
/// Group-context extension type (private use) holding the admins: a MessagePack array of
/// usernames, sorted and unique.
pub const ADMINS_EXTENSION: u16 = 0xff01;
/// What the account's identity key signs, before the user, device and MLS key.
pub const CERT_CONTEXT: &[u8] = b"SFC MLS leaf v1";
/// Length of an Ed25519 signature, the certification's length.
pub const CERT_LEN: usize = 64;
/// Most admins a group's extension may name (bounds its decoding).
pub const MAX_ADMINS: usize = 1000;
/// Longest username in bytes (32 ASCII characters).
const MAX_NAME_BYTES: usize = 32;
/// Epochs whose application messages a member can still decrypt after moving on.
pub const MAX_PAST_EPOCHS: usize = 2;

/// A member of a group: one device of one user.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId {
    /// The account.
    pub user: String,
    /// The device of the account.
    pub device: DeviceId,
}

impl MemberId {
    /// The credential's identity bytes, `USER/DEVICE` (device in decimal).
    pub fn identity(&self) -> Vec<u8> {
        format!("{}/{}", self.user, self.device).into_bytes()
    }

    /// Parses a credential identity: a valid (already folded) username, `/`, a device number
    /// in canonical decimal.
    pub fn parse(identity: &[u8]) -> Result<Self, MlsError> {
        let bad = |reason: &str| MlsError::Certification {
            member: String::from_utf8_lossy(identity).chars().take(80).collect(),
            reason: reason.into(),
        };
        let text = std::str::from_utf8(identity).map_err(|_| bad("identity is not UTF-8"))?;
        let (user, device) = text
            .rsplit_once('/')
            .ok_or_else(|| bad("identity is not USER/DEVICE"))?;
        let name = Username::parse(user).map_err(|_| bad("invalid username"))?;
        let number: DeviceId = device.parse().map_err(|_| bad("invalid device"))?;
        if name.as_str() != user || number.to_string() != device {
            return Err(bad("identity is not canonical"));
        }
        Ok(Self {
            user: user.to_owned(),
            device: number,
        })
    }

    /// The member named by an MLS credential (a basic credential `USER/DEVICE`).
    pub fn of_credential(credential: &Credential) -> Result<Self, MlsError> {
        let basic =
            BasicCredential::try_from(credential.clone()).map_err(|_| MlsError::Certification {
                member: "?".into(),
                reason: "not a basic credential".into(),
            })?;
        Self::parse(basic.identity())
    }
}

impl std::fmt::Display for MemberId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.user, self.device)
    }
}

/// The bytes the account's identity key signs to certify `member`'s MLS signature key:
/// `"SFC MLS leaf v1" ‖ u8 len(user) ‖ user ‖ u32-BE device ‖ MLS signature public key`.
pub fn certification_input(member: &MemberId, mls_signature_key: &[u8]) -> Vec<u8> {
    let user = member.user.as_bytes();
    let mut input = Vec::with_capacity(CERT_CONTEXT.len() + 1 + user.len() + 4 + 32);
    input.extend_from_slice(CERT_CONTEXT);
    // A username has at most 32 characters of ASCII, so its length fits a byte.
    input.push(u8::try_from(user.len()).unwrap_or(u8::MAX));
    input.extend_from_slice(user);
    input.extend_from_slice(&member.device.to_be_bytes());
    input.extend_from_slice(mls_signature_key);
    input
}

/// Certifies `member`'s MLS signature key with the account's identity key.
pub fn certify(
    identity: &IdentityKeyPair,
    member: &MemberId,
    mls_signature_key: &[u8],
) -> [u8; CERT_LEN] {
    identity.sign(&certification_input(member, mls_signature_key))
}

/// Signs the removal of `member` (a device of the account whose identity key this is) from
/// its account: the proof that lets any member of a group commit the removal of its leaf
/// (docs/PROTOCOL.md 5.7).
pub fn revoke(identity: &IdentityKeyPair, member: &MemberId) -> DeviceRevocation {
    let tbs = revocation_tbs(&member.user, member.device).unwrap_or_default();
    DeviceRevocation {
        username: member.user.clone(),
        device: member.device,
        signature: Bin(identity.sign(&tbs)),
    }
}

/// The device a revocation removes, if its signature verifies with `identity` (the key
/// pinned for its user).
pub fn verify_revocation(
    revocation: &DeviceRevocation,
    identity: &IdentityKey,
) -> Option<MemberId> {
    let tbs = revocation_tbs(&revocation.username, revocation.device)?;
    identity.verify(&tbs, &revocation.signature.0).ok()?;
    Some(MemberId {
        user: revocation.username.clone(),
        device: revocation.device,
    })
}

/// The devices whose revocations in `aad` (a commit's authenticated data) verify with the
/// identities pinned for their users; revocations that do not verify (or name a user
/// without a pin) prove nothing and are left out, as is authenticated data that does not
/// decode.
pub fn revoked_in(aad: &[u8], pins: &dyn Pins) -> std::collections::BTreeSet<MemberId> {
    decode_revocations(aad)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| verify_revocation(r, &pins.pinned(&r.username)?))
        .collect()
}

/// Checks a leaf node (of a key package, a welcome's tree or a commit): its credential names
/// a member, its certification extension verifies under `identity` (the key pinned for that
/// user). Returns the member.
pub fn verify_leaf(leaf: &LeafNode, identity: &IdentityKey) -> Result<MemberId, MlsError> {
    let member = MemberId::of_credential(leaf.credential())?;
    let refuse = |reason: &str| MlsError::Certification {
        member: member.to_string(),
        reason: reason.into(),
    };
    let cert = leaf
        .extensions()
        .unknown(CERT_EXTENSION)
        .ok_or_else(|| refuse("no certification"))?;
    let signature: &[u8; CERT_LEN] = cert
        .0
        .as_slice()
        .try_into()
        .map_err(|_| refuse("certification is not 64 bytes"))?;
    identity
        .verify(
            &certification_input(&member, leaf.signature_key().as_slice()),
            signature,
        )
        .map_err(|_| refuse("certification does not verify with the pinned identity"))?;
    Ok(member)
}

/// Where the identity keys pinned for users come from (the keystore's pins, for a client).
pub trait Pins {
    /// The identity key pinned for `user`, if any.
    fn pinned(&self, user: &str) -> Option<IdentityKey>;
}

impl<F: Fn(&str) -> Option<IdentityKey>> Pins for F {
    fn pinned(&self, user: &str) -> Option<IdentityKey> {
        self(user)
    }
}

impl Pins for std::collections::BTreeMap<String, IdentityKey> {
    fn pinned(&self, user: &str) -> Option<IdentityKey> {
        self.get(user).copied()
    }
}

/// Verifies every leaf against the pins; users without a pin are collected into
/// [`MlsError::Unpinned`] (checked before any certification).
pub(super) fn verify_leaves<'a>(
    leaves: impl IntoIterator<Item = &'a LeafNode>,
    pins: &dyn Pins,
) -> Result<Vec<MemberId>, MlsError> {
    let leaves: Vec<&LeafNode> = leaves.into_iter().collect();
    let mut unpinned = Vec::new();
    for leaf in &leaves {
        let member = MemberId::of_credential(leaf.credential())?;
        if pins.pinned(&member.user).is_none() && !unpinned.contains(&member.user) {
            unpinned.push(member.user);
        }
    }
    if !unpinned.is_empty() {
        unpinned.sort();
        return Err(MlsError::Unpinned(unpinned));
    }
    leaves
        .into_iter()
        .map(|leaf| {
            let member = MemberId::of_credential(leaf.credential())?;
            let identity = pins
                .pinned(&member.user)
                .ok_or(MlsError::Unpinned(vec![member.user]))?;
            verify_leaf(leaf, &identity)
        })
        .collect()
}

/// Encodes the admins extension: a MessagePack array of the usernames, sorted and unique.
pub fn encode_admins(admins: &[String]) -> Vec<u8> {
    let mut sorted = admins.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_array_len(&mut out, u32::try_from(sorted.len()).unwrap_or(0));
    for name in &sorted {
        let _ = rmp::encode::write_str(&mut out, name);
    }
    out
}

/// Decodes the admins extension, refusing anything but an array of at most [`MAX_ADMINS`]
/// valid usernames, sorted and unique.
pub fn decode_admins(bytes: &[u8]) -> Result<Vec<String>, MlsError> {
    let bad = |reason: &str| MlsError::Malformed(format!("admins extension: {reason}"));
    let mut rd = bytes;
    let len = rmp::decode::read_array_len(&mut rd).map_err(|_| bad("not an array"))? as usize;
    if len > MAX_ADMINS {
        return Err(bad("too many admins"));
    }
    let mut admins: Vec<String> = Vec::with_capacity(len);
    for _ in 0..len {
        let n = rmp::decode::read_str_len(&mut rd).map_err(|_| bad("not a string"))? as usize;
        if n > MAX_NAME_BYTES || n > rd.len() {
            return Err(bad("name too long"));
        }
        let (name, rest) = rd.split_at(n);
        rd = rest;
        let name = std::str::from_utf8(name).map_err(|_| bad("not UTF-8"))?;
        if Username::parse(name).map(|u| u.as_str() == name) != Ok(true) {
            return Err(bad("invalid username"));
        }
        if admins.last().is_some_and(|last| last.as_str() >= name) {
            return Err(bad("not sorted and unique"));
        }
        admins.push(name.to_owned());
    }
    if !rd.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(admins)
}

/// The admins named by a group context's extensions (an empty list if it has none).
pub fn admins_of(extensions: &Extensions<GroupContext>) -> Result<Vec<String>, MlsError> {
    match extensions.unknown(ADMINS_EXTENSION) {
        Some(ext) => decode_admins(&ext.0),
        None => Err(MlsError::Malformed("the group names no admins".into())),
    }
}

/// The capabilities of every leaf: the one ciphersuite, the certification and admins
/// extensions, last resort key packages.
pub fn capabilities() -> Capabilities {
    Capabilities::builder()
        .ciphersuites(vec![CIPHERSUITE])
        .extensions(vec![
            ExtensionType::Unknown(CERT_EXTENSION),
            ExtensionType::Unknown(ADMINS_EXTENSION),
            ExtensionType::LastResort,
        ])
        .build()
}

/// The leaf extensions carrying a certification.
pub fn leaf_extensions(certification: &[u8]) -> Result<Extensions<LeafNode>, MlsError> {
    Extensions::single(Extension::Unknown(
        CERT_EXTENSION,
        UnknownExtension(certification.to_vec()),
    ))
    .map_err(super::error::mls)
}

/// The group context extensions: the certification required of every leaf, and the admins.
pub fn group_extensions(admins: &[String]) -> Result<Extensions<GroupContext>, MlsError> {
    // openmls refuses a group context extension that the required capabilities do not list,
    // so the admins extension is required too.
    let required = RequiredCapabilitiesExtension::new(
        &[
            ExtensionType::Unknown(CERT_EXTENSION),
            ExtensionType::Unknown(ADMINS_EXTENSION),
        ],
        &[],
        &[CredentialType::Basic],
    );
    Extensions::from_vec(vec![
        Extension::RequiredCapabilities(required),
        Extension::Unknown(ADMINS_EXTENSION, UnknownExtension(encode_admins(admins))),
    ])
    .map_err(super::error::mls)
}

/// Whether a group context requires the certification of every leaf.
pub(super) fn requires_certification(extensions: &Extensions<GroupContext>) -> bool {
    extensions.required_capabilities().is_some_and(|r| {
        r.extension_types()
            .contains(&ExtensionType::Unknown(CERT_EXTENSION))
    })
}

/// Application messages of one sender that may arrive behind a later one and still be
/// decrypted. Two processes of one device (receiving and sending) may post their messages in
/// another order than they made them, so this is more than openmls's default of 5.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 32;
/// How far ahead of the last one an application message of a sender may be.
pub const MAX_FORWARD_DISTANCE: u32 = 1000;

fn sender_ratchet() -> SenderRatchetConfiguration {
    SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAX_FORWARD_DISTANCE)
}

/// The configuration a member joins with (the same policies as [`create_config`]).
pub(super) fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .sender_ratchet_configuration(sender_ratchet())
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

/// The configuration a group is created with: handshake messages in the clear (so the
/// delivery service can check them), the tree in welcomes, [`MAX_PAST_EPOCHS`].
pub(super) fn create_config(
    certification: &[u8],
    admins: &[String],
) -> Result<MlsGroupCreateConfig, MlsError> {
    Ok(MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(sender_ratchet())
        .capabilities(capabilities())
        .with_leaf_node_extensions(leaf_extensions(certification)?)
        .map_err(super::error::mls)?
        .with_group_context_extensions(group_extensions(admins)?)
        .build())
}
