//! Headers of message streams. Every message is one unidirectional QUIC stream: a header frame
//! (same framing as the control stream), then exactly `length` bytes of sealed body, then FIN.

use serde::{Deserialize, Serialize};

use super::MessageId;

/// Largest header frame body, in bytes.
pub const MAX_STREAM_HEADER: u32 = 1024;

/// The header frame that opens a message stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamHeader {
    /// Client → server: a message to store and deliver.
    Send(SendHeader),
    /// Server → client: a message for you.
    Deliver(DeliverHeader),
}

/// Client → server: the header of a message to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendHeader {
    /// Chosen by the sender; resending the same id is recognised, not stored twice.
    pub id: MessageId,
    /// The recipient's username.
    pub to: String,
    /// What the body is, for the recipient's client (`text` for chat messages); not
    /// interpreted by the server. At most 32 bytes.
    pub kind: String,
    /// Body length in bytes.
    pub length: u64,
}

/// Server → client: the header of a delivered message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverHeader {
    /// The server's sequence number in your inbox: what you acknowledge.
    pub seq: u64,
    /// The `seq` of the message delivered just before this one on this connection (0 for the
    /// first): process messages in this chain's order to keep the server's order.
    pub prev: u64,
    /// The sender's message id.
    pub id: MessageId,
    /// The sender's username.
    pub from: String,
    /// When the server stored it, in seconds since the Unix epoch.
    pub sent_at: u64,
    /// The sender's `kind`.
    pub kind: String,
    /// Body length in bytes.
    pub length: u64,
}
