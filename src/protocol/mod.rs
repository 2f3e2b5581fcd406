//! The wire protocol: constants, frame codec and the typed messages of the control stream.
//!
//! Nothing here touches sockets, storage or clocks, so every decoder can be unit-tested and
//! fuzzed alone. `docs/PROTOCOL.md` is the normative description of what these types encode.

mod codes;
mod frame;
pub mod groups;
mod ids;
pub mod keys;
mod messages;
mod nesting;
mod replies;
mod request;
mod secrets;
mod stream;
mod username;

pub use codes::{CloseCode, ErrorCode};
pub use frame::{
    FrameError, LENGTH_PREFIX, decode_body, encode_frame, encode_frame_into, frame_length,
    read_frame, write_frame,
};
pub use groups::{DeviceKeyPackage, GroupIdBytes, GroupMember, GroupSummary};
pub use ids::{BLOB_ID_LEN, BlobId, DeviceId, MESSAGE_ID_LEN, MessageId};
pub use messages::{ClientFrame, LinkConfirm, LinkPake, Request, RequestKind};
pub use nesting::{MAX_NESTING, MarkerError, TooDeep, check_markers, check_nesting};
pub use replies::{DeviceBundle, DeviceInfo, Reply, ServerFrame};
pub use request::{RequestError, decode_request};
pub use secrets::{Password, SessionToken, TOKEN_LEN};
pub use stream::{
    BlobHeader, Copies, DeliverHeader, MAX_STREAM_HEADER, SendHeader, StreamHeader, UploadHeader,
};
pub use username::{Username, UsernameError};

/// The ALPN protocol id both ends must offer in the TLS handshake.
pub const ALPN: &[u8] = b"sfc/1";

/// The protocol version a client announces in `hello`; the major version is also in [`ALPN`].
pub const PROTOCOL_VERSION: u64 = 1;

/// Largest control-stream frame body, in bytes, that either end accepts.
///
/// Control requests are small (the largest, `signup`, is a name and a password); 64 KiB leaves
/// room for the key bundle that signup will carry without letting a peer make us buffer much.
pub const MAX_CONTROL_FRAME: u32 = 64 * 1024;

/// Shortest password accepted at signup, in bytes (NIST SP 800-63B's minimum).
pub const MIN_PASSWORD_LEN: usize = 8;

/// Longest password accepted, in bytes: bounds the work a peer can ask of argon2.
pub const MAX_PASSWORD_LEN: usize = 1024;
