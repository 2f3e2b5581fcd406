//! Typed error codes carried in `error` replies, and the QUIC application close codes.

use serde::{Deserialize, Serialize};

/// Why a request failed. Sent as a snake_case string so clients in any language can match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame body is not a MessagePack map with an integer `id` and a string `type`.
    MalformedFrame,
    /// The frame's length prefix exceeds the limit; the connection is closed after this reply.
    FrameTooLarge,
    /// The stream ended in the middle of a frame; the connection is closed after this reply.
    TruncatedFrame,
    /// The request `type` is not one this server knows.
    UnknownRequest,
    /// The request type is known but a field is missing or has the wrong type.
    BadRequest,
    /// The first request on a connection must be `hello`.
    HelloRequired,
    /// The client's protocol version is not supported by this server.
    UnsupportedVersion,
    /// The request needs an authenticated session (login, signup or resume first).
    NotAuthenticated,
    /// The connection already has a session; `logout` first.
    AlreadyAuthenticated,
    /// The username breaks the rules: 3–32 characters of `a-z 0-9 _ . -`.
    InvalidUsername,
    /// The password is shorter than 8 or longer than 1024 bytes.
    WeakPassword,
    /// Another account already has this username.
    UsernameTaken,
    /// The username or the password is wrong (deliberately not saying which).
    InvalidCredentials,
    /// The session token is unknown, expired or revoked.
    InvalidToken,
    /// Too many requests of this kind from this client; retry later.
    RateLimited,
    /// The server is overloaded; retry later.
    Busy,
    /// The server failed for a reason of its own; the request may be retried.
    Internal,
    /// No account has this username.
    UnknownUser,
    /// The user has not published keys yet, so no session can be started with them.
    NoKeys,
    /// Uploaded keys are malformed or a signature does not verify.
    InvalidKeys,
    /// The recipient's inbox is full; the message was not stored.
    InboxFull,
    /// The message body is larger than the server accepts.
    MessageTooLarge,
    /// The request is not allowed (e.g. presence of a user who has not written to you).
    NotAllowed,
    /// The server cannot store anything now (its disk is full or failing): nothing of the
    /// request was stored; retry later, it recovers by itself.
    StorageUnavailable,
    /// The sender already has its whole share of the recipient's inbox pending (messages or
    /// bytes); the message was not stored. It passes once the recipient has read some.
    SenderQuota,
    /// The sending account sent more messages than the server allows per minute; the
    /// message was not stored. Retry after the wait the message names.
    SendRateLimited,
    /// The device lists a message was sealed for are not the current ones (a device was
    /// added or removed): nothing was stored; `send_failed` carries the current lists.
    StaleDevices,
    /// No current device of the account has this id (never had one, or it was removed).
    UnknownDevice,
    /// The identity key differs from the account's; only `replace_identity` changes it.
    IdentityMismatch,
    /// The account already has as many devices as the server allows.
    TooManyDevices,
    /// A device link failed: an unknown, expired or used code, a wrong code, or the other
    /// device left. The code is used up; start a new link.
    LinkFailed,
    /// A blob is longer than the server accepts (`upload_blob`), or an upload stream carried
    /// more bytes than the blob's length: nothing more of it was stored.
    BlobTooLarge,
    /// The uploader's blobs (complete and partial) would exceed its byte or count quota;
    /// nothing was stored. It passes once recipients have fetched some.
    BlobQuota,
    /// The blob id is taken (by another user, or by this user with another length).
    BlobExists,
    /// No such blob for you: never uploaded, not complete, deleted, or you are neither its
    /// uploader nor a reader it names (the server does not say which).
    UnknownBlob,
    /// An upload stream did not start where the server's copy ends; `held` says where.
    BadOffset,
    /// A group commit or message is for an epoch that is not the group's current one (a
    /// commit), or too old (an application message): nothing was stored; `send_failed`
    /// carries the current `epoch`. Process what is in your inbox, then try again.
    StaleEpoch,
    /// The connection's device is not a member of the group (never was, was removed, or its
    /// user left): nothing was stored or delivered.
    NotMember,
    /// The commit changes what only an admin may change (adds or removes another user's
    /// devices, or the group's extensions), and its sender's user is not an admin.
    NotAdmin,
    /// The group name is taken.
    GroupExists,
    /// No group has this name.
    UnknownGroup,
    /// The group name breaks the rules (those of usernames: 3–32 of `a-z 0-9 _ . -`).
    InvalidGroupName,
    /// The commit would give the group more member devices than the server allows, or the
    /// device more groups.
    GroupFull,
    /// An MLS message, GroupInfo or key package in a group operation does not parse or does
    /// not validate (signature, sender, group id, proposals the delivery service does not
    /// take, a member whose credential or certification does not verify).
    InvalidMls,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name of the code, as it appears in a frame.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedFrame => "malformed_frame",
            Self::FrameTooLarge => "frame_too_large",
            Self::TruncatedFrame => "truncated_frame",
            Self::UnknownRequest => "unknown_request",
            Self::BadRequest => "bad_request",
            Self::HelloRequired => "hello_required",
            Self::UnsupportedVersion => "unsupported_version",
            Self::NotAuthenticated => "not_authenticated",
            Self::AlreadyAuthenticated => "already_authenticated",
            Self::InvalidUsername => "invalid_username",
            Self::WeakPassword => "weak_password",
            Self::UsernameTaken => "username_taken",
            Self::InvalidCredentials => "invalid_credentials",
            Self::InvalidToken => "invalid_token",
            Self::RateLimited => "rate_limited",
            Self::Busy => "busy",
            Self::Internal => "internal",
            Self::UnknownUser => "unknown_user",
            Self::NoKeys => "no_keys",
            Self::InvalidKeys => "invalid_keys",
            Self::InboxFull => "inbox_full",
            Self::MessageTooLarge => "message_too_large",
            Self::NotAllowed => "not_allowed",
            Self::StorageUnavailable => "storage_unavailable",
            Self::SenderQuota => "sender_quota",
            Self::SendRateLimited => "send_rate_limited",
            Self::StaleDevices => "stale_devices",
            Self::UnknownDevice => "unknown_device",
            Self::IdentityMismatch => "identity_mismatch",
            Self::TooManyDevices => "too_many_devices",
            Self::LinkFailed => "link_failed",
            Self::BlobTooLarge => "blob_too_large",
            Self::BlobQuota => "blob_quota",
            Self::BlobExists => "blob_exists",
            Self::UnknownBlob => "unknown_blob",
            Self::BadOffset => "bad_offset",
            Self::StaleEpoch => "stale_epoch",
            Self::NotMember => "not_member",
            Self::NotAdmin => "not_admin",
            Self::GroupExists => "group_exists",
            Self::UnknownGroup => "unknown_group",
            Self::InvalidGroupName => "invalid_group_name",
            Self::GroupFull => "group_full",
            Self::InvalidMls => "invalid_mls",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QUIC application error codes used when a connection is closed on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Normal close: the peer is done.
    Normal = 0,
    /// The server is shutting down; reconnect later (or to another server).
    Shutdown = 1,
    /// The peer broke the framing rules (oversize or truncated frame, missing control stream).
    ProtocolViolation = 2,
    /// The server is at its connection limit.
    Overloaded = 3,
    /// The same user logged in on a newer connection, which takes over delivery.
    Replaced = 4,
    /// The account was deleted (on this or another connection).
    AccountDeleted = 5,
    /// The connection did not authenticate (`signup`, `login`, `resume`) in time after
    /// `hello`; connect again when ready to log in.
    LoginTimeout = 6,
    /// The connection's device was removed from its account (from another device, or by an
    /// identity replacement): its sessions are revoked and its inbox is gone.
    DeviceRemoved = 7,
}

impl CloseCode {
    /// The code as the `u32` carried in the QUIC CONNECTION_CLOSE frame.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The close code with this number, if it is one of ours.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(Self::Normal),
            1 => Some(Self::Shutdown),
            2 => Some(Self::ProtocolViolation),
            3 => Some(Self::Overloaded),
            4 => Some(Self::Replaced),
            5 => Some(Self::AccountDeleted),
            6 => Some(Self::LoginTimeout),
            7 => Some(Self::DeviceRemoved),
            _ => None,
        }
    }
}
