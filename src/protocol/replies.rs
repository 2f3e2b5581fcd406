//! Control-stream messages the server sends: replies to requests (with the request's `id`) and
//! pushed events (without one), as MessagePack maps whose `type` field names the variant.

use serde::{Deserialize, Serialize};

use super::groups::{DeviceKeyPackage, GroupSummary};
use super::keys::{IdentityKeyBytes, OneTimePrekey, SignedPrekey};
use super::messages::{LinkConfirm, LinkPake};
use super::{BlobId, DeviceId, ErrorCode, MessageId, SessionToken};

/// One device's keys in a `bundle` reply: exactly one of `one_time_prekey` and `last_resort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBundle {
    /// The device.
    pub device: DeviceId,
    /// Its signed prekey.
    pub signed_prekey: SignedPrekey,
    /// A one-time prekey of it, handed out to you only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_prekey: Option<OneTimePrekey>,
    /// Its last-resort prekey, when it has no one-time prekey left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resort: Option<SignedPrekey>,
}

/// One device in a `devices` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its id.
    pub device: DeviceId,
    /// The name it was given at linking.
    pub name: String,
    /// When it was added (Unix seconds).
    pub added_at: u64,
    /// When it was last connected (Unix seconds; coarse, 0 if never since it was added).
    pub last_seen: u64,
    /// Whether it is the device of the connection that asked.
    pub current: bool,
}

/// A frame from the server: a reply (with the request's `id`) or, later, a pushed event
/// (without `id`). An `error` without `id` concerns the connection, not one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// The id of the request this answers; absent for events and connection-level errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The reply; its fields sit beside `id` in the same map.
    #[serde(flatten)]
    pub reply: Reply,
}

/// Every reply the server may send on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // a frame is built once and encoded in place
pub enum Reply {
    /// Answer to `hello`.
    Hello {
        /// The protocol version the server speaks.
        version: u64,
        /// Server software name and version.
        server: String,
        /// Largest control frame body the server accepts, in bytes.
        max_frame: u32,
    },
    /// Answer to `check_username`.
    UsernameStatus {
        /// The name as the server folded it.
        username: String,
        /// Whether an account could be created with this name now.
        available: bool,
    },
    /// Answer to `signup` and `login`: the connection is now authenticated.
    Session {
        /// The account's canonical name.
        username: String,
        /// The secret that `resume` accepts; store it as you would a password.
        token: SessionToken,
        /// When the token stops working, in seconds since the Unix epoch.
        expires_at: u64,
        /// The connection's device of the account.
        device: DeviceId,
    },
    /// Answer to `resume`: the connection is authenticated again.
    Resumed {
        /// The account's canonical name.
        username: String,
        /// When the token stops working, in seconds since the Unix epoch.
        expires_at: u64,
        /// The connection's device of the account.
        device: DeviceId,
    },
    /// Answer to `logout`.
    LoggedOut,
    /// Answer to `delete_account`: the account is gone and the connection unauthenticated.
    AccountDeleted {
        /// The deleted account's name (held for a while: no one can sign it up).
        username: String,
    },
    /// Answer to `whoami`.
    Whoami {
        /// The account's canonical name.
        username: String,
        /// When this session's token stops working, in seconds since the Unix epoch.
        expires_at: u64,
        /// The connection's device of the account.
        device: DeviceId,
    },
    /// Answer to `ping`.
    Pong,
    /// Answer to `publish_keys`.
    KeysPublished {
        /// One-time prekeys the server now holds for you.
        one_time_prekeys: u32,
    },
    /// Answer to `fetch_bundle`: a bundle per device. For clients of one device, the
    /// top-level `signed_prekey` and exactly one of `one_time_prekey` and `last_resort` repeat
    /// the first device's (the same keys: nothing more is consumed).
    Bundle {
        /// Whose bundle.
        username: String,
        /// Their Ed25519 identity key (one per account).
        identity_key: IdentityKeyBytes,
        /// The first device's signed prekey.
        signed_prekey: SignedPrekey,
        /// The first device's one-time prekey, handed out to you only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        one_time_prekey: Option<OneTimePrekey>,
        /// The first device's last-resort prekey, when it has no one-time prekey left.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_resort: Option<SignedPrekey>,
        /// One bundle per device asked for (all current devices with keys, by id).
        devices: Vec<DeviceBundle>,
    },
    /// Answer to `fetch_identity`.
    Identity {
        /// Whose key.
        username: String,
        /// Their Ed25519 identity key.
        identity_key: IdentityKeyBytes,
    },
    /// Answer to `ack`.
    Acked {
        /// How many of the acknowledged messages were still pending (and are now deleted).
        removed: u64,
    },
    /// Answer to `unsend`.
    Unsent {
        /// Whether the message was deleted before delivery.
        deleted: bool,
    },
    /// Answer to `online`.
    Presence {
        /// The contact.
        username: String,
        /// Whether they have a connection now.
        online: bool,
    },
    /// Event: a message you sent is durably stored for its recipient (or was already).
    Sent {
        /// The message's id.
        message_id: MessageId,
        /// Whether the server had already stored this id from you (nothing new was stored).
        duplicate: bool,
    },
    /// Event: a message you sent was refused; nothing was stored.
    SendFailed {
        /// The message's id (absent when the stream's header could not be read).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<MessageId>,
        /// Why.
        code: ErrorCode,
        /// Why, for people.
        message: String,
        /// With `stale_devices`: the recipient's current devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devices: Option<Vec<DeviceId>>,
        /// With `stale_devices`: your other current devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        own_devices: Option<Vec<DeviceId>>,
        /// With `stale_epoch`: the group's current epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    /// Event: you have few one-time prekeys left on the server; upload more.
    PrekeysLow {
        /// How many remain.
        remaining: u32,
    },
    /// Answer to `list_devices`: the account's current devices, by id.
    Devices {
        /// The devices.
        devices: Vec<DeviceInfo>,
    },
    /// Answer to `remove_device`: the device is gone.
    DeviceRemoved {
        /// The removed device.
        device: DeviceId,
    },
    /// Answer to `replace_identity`: the new identity is published.
    IdentityReplaced {
        /// The devices removed with the old identity.
        removed: Vec<DeviceId>,
    },
    /// Answer to `link_open`: tell the new device the code `slot`-secret.
    LinkOpened {
        /// The link's slot (0–9999), the public half of the code.
        slot: u16,
        /// When the link lapses unused, in seconds since the Unix epoch.
        expires_at: u64,
    },
    /// Answer to `link_join`: the existing device's SPAKE2 message.
    LinkPake {
        /// `pake_E`.
        pake: LinkPake,
    },
    /// Event to the existing device: a new device joined its link and confirmed.
    LinkRequest {
        /// The link's slot.
        slot: u16,
        /// The name the new device gave itself.
        name: String,
        /// `pake_N`.
        pake: LinkPake,
        /// `c_N`.
        confirm: LinkConfirm,
    },
    /// Answer to `link_accept`: the new device is registered.
    LinkAccepted {
        /// Its device id.
        device: DeviceId,
    },
    /// Answer to `link_refuse`: the link is cancelled.
    LinkRefused,
    /// Answer to `link_confirm`: the connection is now authenticated as the new device.
    Linked {
        /// The account's canonical name.
        username: String,
        /// The new device's id.
        device: DeviceId,
        /// The new device's session token.
        token: SessionToken,
        /// When the token stops working.
        expires_at: u64,
        /// `c_E`.
        confirm: LinkConfirm,
        /// The sealed payload (E13.4).
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Answer to `upload_blob`: how many bytes of the blob the server holds (on disk, synced);
    /// send the rest on an `upload` stream from there. `held == length`: it is complete.
    BlobUpload {
        /// The blob.
        blob: BlobId,
        /// Bytes held.
        held: u64,
    },
    /// Answer to `download_blob`: the bytes follow on a server-opened `blob` stream.
    BlobDownload {
        /// The blob.
        blob: BlobId,
        /// Its whole length.
        length: u64,
        /// Where the stream starts.
        offset: u64,
    },
    /// Answer to `ack_blob`.
    BlobAcked {
        /// The blob.
        blob: BlobId,
    },
    /// Event: an uploaded blob is complete on disk and synced; it may be referenced now.
    BlobStored {
        /// The blob.
        blob: BlobId,
        /// Its length.
        length: u64,
    },
    /// Event: an upload stream was refused or ended early; what arrived before is kept.
    UploadFailed {
        /// The blob.
        blob: BlobId,
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for people.
        message: String,
        /// Bytes the server holds now: resume from here.
        held: u64,
    },
    /// Answer to `publish_key_packages`.
    KeyPackagesPublished {
        /// One-time key packages the server now holds for this device.
        key_packages: u32,
        /// Whether the server holds a last-resort key package for this device.
        last_resort: bool,
    },
    /// Answer to `fetch_key_packages`: one key package per device.
    KeyPackages {
        /// Whose key packages.
        username: String,
        /// Their Ed25519 identity key, which certifies each member leaf (5.7).
        identity_key: IdentityKeyBytes,
        /// One per device asked for (all current devices with key packages), by id.
        devices: Vec<DeviceKeyPackage>,
    },
    /// Event: few one-time key packages of your device remain; upload more.
    KeyPackagesLow {
        /// How many remain.
        remaining: u32,
    },
    /// Answer to `create_group`.
    GroupCreated {
        /// The group's name as the server folded it.
        group: String,
        /// Its epoch (that of the GroupInfo).
        epoch: u64,
    },
    /// Answer to `leave_group`.
    GroupLeft {
        /// The group's name.
        group: String,
    },
    /// Answer to `group_info`.
    Group(GroupSummary),
    /// Answer to `list_groups`.
    Groups {
        /// The groups the device is a member of, by name.
        groups: Vec<GroupSummary>,
    },
    /// The request failed (or, without `id`, the connection has a problem).
    Error {
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people; never contains secrets.
        message: String,
    },
}
