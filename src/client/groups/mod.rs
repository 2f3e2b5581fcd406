//! Groups for people (issue 22): this device's MLS member ([`crate::e2e::mls`]) on the
//! server's delivery service (docs/PROTOCOL.md 5.7). Key packages are kept topped up on the
//! server; creating, adding, removing, leaving and sending post MLS messages on group message
//! streams, and a commit is merged only once the server has ordered it; what the server
//! delivers for a group is processed, saved, and handed to the application as
//! [`Received::Group`] or [`Received::GroupNotice`].
//!
//! `requests`: the delivery service's requests on a [`super::Client`]. `ops`: what the
//! [`super::Messenger`] does to groups. `receive`: group deliveries. `devices`: the account's
//! devices in its groups (a linked device added, a removed one's leaves removed, self-healing).
//!
//! An application message's plaintext is a MessagePack map `{"kind": "text", "text": str}`
//! (other kinds are shown as unsupported).

mod devices;
mod ops;
mod receive;
mod requests;

pub use devices::DeviceChanges;
pub use ops::{GroupState, KEY_PACKAGE_TARGET};
pub use receive::GroupNotice;
pub use requests::FetchedKeyPackages;

pub use super::messenger::Received;
use super::messenger::{MessengerError, username};
use crate::protocol::Username;

/// The `kind` of the server's notice that a device was removed from its account.
pub use crate::protocol::groups::KIND_DEVICE_REMOVED;
/// The `kind` of the server's notice that a user left a group.
pub use crate::protocol::groups::KIND_GROUP_LEFT;
/// The `kind` of group MLS traffic.
pub use crate::protocol::groups::KIND_MLS;

/// The plaintext of a group text message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct GroupContent {
    kind: String,
    #[serde(default)]
    text: String,
}

/// Encodes a text for a group.
fn encode_text(text: &str) -> Result<Vec<u8>, MessengerError> {
    let content = GroupContent {
        kind: "text".into(),
        text: text.into(),
    };
    rmp_serde::to_vec_named(&content)
        .map_err(|e| MessengerError::Client(super::ClientError::Protocol(e.to_string())))
}

/// Decodes a group message's plaintext into the text to show.
fn decode_text(plaintext: &[u8]) -> String {
    match rmp_serde::from_slice::<GroupContent>(plaintext) {
        Ok(c) if c.kind == "text" => c.text,
        Ok(c) => format!("[a {} message this client cannot show]", c.kind),
        Err(_) => "[a message this client cannot read]".into(),
    }
}

/// A group name folded like a username (the server's rule, 5.7).
fn group_name(name: &str) -> Result<Username, MessengerError> {
    username(name)
}
