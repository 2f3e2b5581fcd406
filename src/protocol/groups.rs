//! Wire types and constants of MLS groups (docs/PROTOCOL.md 5.7): key packages in the key
//! directory, group descriptions, and the byte strings that clients and the delivery service
//! both compute (the MLS credential identity and the certification that binds a member's MLS
//! signature key to its account's identity key). No cryptography here: only the layouts.

use serde::{Deserialize, Serialize};

use super::DeviceId;
use super::keys::Bin;

/// A group's MLS GroupId: 16 random bytes chosen by its creator (`bin 16` on the wire).
pub type GroupIdBytes = Bin<16>;

/// The only MLS ciphersuite of version 1: MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519.
pub const MLS_CIPHERSUITE: u16 = 0x0003;

/// Leaf-node extension type (private use) carrying a member's certification (64 bytes).
pub const CERTIFICATION_EXTENSION: u16 = 0xff00;

/// Group-context extension type (private use) carrying the admins: a MessagePack array of
/// usernames, sorted and unique.
pub const ADMINS_EXTENSION: u16 = 0xff01;

/// The context string that opens a certification's signed bytes.
pub const CERTIFICATION_CONTEXT: &[u8] = b"SFC MLS leaf v1";

/// How many past epochs application messages may be behind the group's current epoch
/// (the `max_past_epochs` every member configures).
pub const MAX_PAST_EPOCHS: u64 = 2;

/// Most key packages in one `publish_key_packages`.
pub const MAX_KEY_PACKAGES_PER_REQUEST: usize = 100;

/// Most one-time key packages the server stores per device.
pub const MAX_KEY_PACKAGES_STORED: usize = 200;

/// The server neither accepts nor hands out a key package whose MLS lifetime ends within
/// this many seconds (a day): the one who fetches it needs time to send the welcome, and the
/// joiner to process it.
pub const KEY_PACKAGE_MARGIN_SECS: u64 = 24 * 3600;

/// Largest key package accepted, in bytes (they are about 350).
pub const MAX_KEY_PACKAGE_BYTES: usize = 4096;

/// Below this many one-time key packages after a fetch, the device gets `key_packages_low`.
pub const KEY_PACKAGES_LOW: u32 = 10;

/// The `kind` of every group send, and of the commits, welcomes and application messages
/// delivered from it.
pub const KIND_MLS: &str = "mls";

/// The `kind` of the server's notice that a user left a group (5.7); the body is the user's
/// name.
pub const KIND_GROUP_LEFT: &str = "group_left";

/// The `kind` of the server's notice that a device was removed from its account (5.7); the
/// body is the [`DeviceRevocation`] the removing device signed (named MessagePack).
pub const KIND_DEVICE_REMOVED: &str = "device_removed";

/// The context string that opens a device revocation's signed bytes.
pub const REVOCATION_CONTEXT: &[u8] = b"SFC device removed v1";

/// Most revocations a commit's authenticated data may carry (one per removed leaf at most).
pub const MAX_REVOCATIONS: usize = 1024;

/// A device's removal from its account, signed by the account's identity key (5.5, 5.7): the
/// proof that lets any member of a group commit the removal of that device's leaf. It travels
/// in the `device_removed` notice and, as an array of them, in the authenticated data of the
/// commit that removes the leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRevocation {
    /// The account (folded username).
    pub username: String,
    /// The removed device.
    pub device: DeviceId,
    /// Ed25519 signature by the account's identity key over [`revocation_tbs`].
    pub signature: super::keys::SignatureBytes,
}

/// The bytes a device revocation signs: `"SFC device removed v1" ‖ u8 len(user) ‖ user ‖
/// u32-BE device`. `None` for a user name over 255 bytes.
pub fn revocation_tbs(username: &str, device: DeviceId) -> Option<Vec<u8>> {
    let user_len = u8::try_from(username.len()).ok()?;
    let mut out = Vec::with_capacity(REVOCATION_CONTEXT.len() + 1 + username.len() + 4);
    out.extend_from_slice(REVOCATION_CONTEXT);
    out.push(user_len);
    out.extend_from_slice(username.as_bytes());
    out.extend_from_slice(&device.to_be_bytes());
    Some(out)
}

/// Encodes revocations as a commit's authenticated data: a MessagePack array of
/// [`DeviceRevocation`] maps. Empty input gives empty bytes (no authenticated data).
pub fn encode_revocations(revocations: &[DeviceRevocation]) -> Vec<u8> {
    if revocations.is_empty() {
        return Vec::new();
    }
    // Strings, integers and fixed-size byte strings always encode.
    rmp_serde::to_vec_named(revocations).unwrap_or_default()
}

/// Reads the revocations in a commit's authenticated data: empty bytes are none; anything
/// else must be an array of at most [`MAX_REVOCATIONS`] revocations (`None` otherwise).
pub fn decode_revocations(aad: &[u8]) -> Option<Vec<DeviceRevocation>> {
    if aad.is_empty() {
        return Some(Vec::new());
    }
    let revocations: Vec<DeviceRevocation> = rmp_serde::from_slice(aad).ok()?;
    (revocations.len() <= MAX_REVOCATIONS).then_some(revocations)
}

/// The MLS credential identity of a member: `USER/DEVICE`, the device in decimal.
pub fn member_identity(username: &str, device: DeviceId) -> String {
    format!("{username}/{device}")
}

/// Splits a credential identity `USER/DEVICE` (the device decimal, no sign, no leading zero);
/// `None` if it is not of that shape. The user part is returned as written: check it is a
/// valid, folded username where that matters.
pub fn parse_member_identity(identity: &[u8]) -> Option<(&str, DeviceId)> {
    let text = std::str::from_utf8(identity).ok()?;
    let (user, device) = text.rsplit_once('/')?;
    if user.is_empty()
        || device.is_empty()
        || !device.bytes().all(|b| b.is_ascii_digit())
        || (device.len() > 1 && device.starts_with('0'))
    {
        return None;
    }
    Some((user, device.parse().ok()?))
}

/// The bytes a certification signs: `"SFC MLS leaf v1" ‖ u8 len(user) ‖ user ‖ u32-BE device
/// ‖ the member's MLS signature public key`. `None` for a user name over 255 bytes.
pub fn certification_tbs(
    username: &str,
    device: DeviceId,
    mls_signature_key: &[u8],
) -> Option<Vec<u8>> {
    let user_len = u8::try_from(username.len()).ok()?;
    let mut out = Vec::with_capacity(CERTIFICATION_CONTEXT.len() + 1 + username.len() + 4 + 32);
    out.extend_from_slice(CERTIFICATION_CONTEXT);
    out.push(user_len);
    out.extend_from_slice(username.as_bytes());
    out.extend_from_slice(&device.to_be_bytes());
    out.extend_from_slice(mls_signature_key);
    Some(out)
}

/// One device's key package in a `key_packages` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeyPackage {
    /// The device.
    pub device: DeviceId,
    /// The key package (the TLS encoding of an MLS `KeyPackage`, not wrapped in an
    /// `MLSMessage`).
    #[serde(with = "serde_bytes")]
    pub key_package: Vec<u8>,
    /// Whether it is the device's last-resort key package (handed out again and again).
    pub last_resort: bool,
}

/// One member device of a group, as the delivery service sees it in the MLS tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// The member's account.
    pub username: String,
    /// Its device.
    pub device: DeviceId,
    /// Its MLS leaf index.
    pub leaf: u32,
}

/// A group as the delivery service knows it: the `group` reply and the entries of `groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The group's name (global on the server).
    pub group: String,
    /// Its MLS GroupId.
    pub group_id: GroupIdBytes,
    /// Its current MLS epoch.
    pub epoch: u64,
    /// The user who created it.
    pub creator: String,
    /// Its admins (sorted), as in its admins extension.
    pub admins: Vec<String>,
    /// The member devices in the MLS tree, by leaf index.
    pub members: Vec<GroupMember>,
    /// Users who left (`leave_group`) and whose leaves no commit has removed yet: no longer
    /// delivered to, and any member may commit their removal.
    pub pending_leaves: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_are_strict() {
        assert_eq!(member_identity("alice", 2), "alice/2");
        assert_eq!(parse_member_identity(b"alice/2"), Some(("alice", 2)));
        assert_eq!(parse_member_identity(b"a/b/10"), Some(("a/b", 10)));
        for bad in [
            &b"alice"[..],
            b"alice/",
            b"/2",
            b"alice/02",
            b"alice/+2",
            b"alice/x",
            b"\xff/1",
        ] {
            assert_eq!(parse_member_identity(bad), None, "{bad:?}");
        }
        assert_eq!(parse_member_identity(b"alice/99999999999"), None);
    }

    #[test]
    fn certification_bytes_are_as_documented() {
        let tbs = certification_tbs("bob", 3, &[0xaa; 32]).unwrap();
        let mut expected = b"SFC MLS leaf v1".to_vec();
        expected.extend_from_slice(&[3, b'b', b'o', b'b', 0, 0, 0, 3]);
        expected.extend_from_slice(&[0xaa; 32]);
        assert_eq!(tbs, expected);
        assert!(certification_tbs(&"x".repeat(256), 1, &[]).is_none());
    }

    #[test]
    fn revocations_are_as_documented_and_round_trip() {
        let tbs = revocation_tbs("bob", 3).unwrap();
        let mut expected = b"SFC device removed v1".to_vec();
        expected.extend_from_slice(&[3, b'b', b'o', b'b', 0, 0, 0, 3]);
        assert_eq!(tbs, expected);
        let one = DeviceRevocation {
            username: "bob".into(),
            device: 3,
            signature: super::super::keys::Bin([7; 64]),
        };
        assert!(encode_revocations(&[]).is_empty());
        assert_eq!(decode_revocations(&[]), Some(Vec::new()));
        let aad = encode_revocations(std::slice::from_ref(&one));
        assert_eq!(decode_revocations(&aad), Some(vec![one]));
        assert_eq!(decode_revocations(b"\xc0"), None);
    }
}
