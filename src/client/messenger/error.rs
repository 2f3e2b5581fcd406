//! [`MessengerError`]: why a messaging operation failed, in words for the user.

use super::super::ClientError;
use crate::e2e::{E2eError, FileError};
use crate::protocol::{ErrorCode, MessageId};

/// Why a messaging operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MessengerError {
    /// The server or the connection failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Encryption failed.
    #[error(transparent)]
    E2e(#[from] E2eError),
    /// A file could not be sealed or opened (tampered, cut short, not what the message
    /// says), or its reference is not valid.
    #[error(transparent)]
    File(#[from] FileError),
    /// Reading the file to send, or writing a received one, failed.
    #[error("{}: {source}", path.display())]
    FileIo {
        /// The file or directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server refused an upload for good (its code says why).
    #[error("the server refused the upload: {message} ({code})")]
    UploadRefused {
        /// The server's code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// A group operation was refused or failed at the MLS layer (issue 22).
    #[error(transparent)]
    Mls(#[from] crate::e2e::mls::MlsError),
    /// The home directory could not be used.
    #[error(transparent)]
    Home(#[from] super::super::home::HomeError),
    /// The home directory holds another user's keys.
    #[error("this home directory holds the keys of {0}; use another --home")]
    OtherUser(String),
    /// The home directory holds the keys of another device of this account than the one the
    /// connection is logged in as.
    #[error(
        "this home directory holds the keys of device {home} of the account, but you are logged \
         in as device {connection}; use the home of that device"
    )]
    OtherDevice {
        /// The home's device.
        home: u32,
        /// The connection's device.
        connection: u32,
    },
    /// No keys yet (log in or sign up with this home directory first).
    #[error("no keys in this home directory: sign up or log in first")]
    NoKeys,
    /// A name is not a valid username.
    #[error("invalid username {0:?}")]
    BadName(String),
    /// A message to oneself (it could not be opened: sessions are between two users).
    #[error("you cannot send a message to yourself")]
    ToSelf,
    /// A text longer than a message can carry; nothing was sealed.
    #[error("the message is {len} bytes; a message holds at most {max} bytes of text")]
    TooLong {
        /// Its length in bytes (UTF-8).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No session with the peer, and no way to start one now (the server is unreachable).
    #[error("no session with {0} yet, and their keys cannot be fetched now; nothing was kept")]
    NoSession(String),
    /// The server offers a device of this account whose keys are not signed with this
    /// account's identity: nothing is sealed for it.
    #[error(
        "the server lists device {0} of your account with another identity key; nothing was \
         sent (if you replaced your identity elsewhere, this home's keys are outdated)"
    )]
    ForeignOwnDevice(u32),
    /// The peer's identity key changed since the user verified it: nothing is sealed for the
    /// new key until the user accepts it.
    #[error(
        "{0}'s identity key changed since you verified it; nothing was sent. Compare safety \
         numbers again (`sfc fingerprint {0}`), then accept the new key with `sfc trust {0}`"
    )]
    VerifiedKeyChanged(String),
    /// The account already has an identity key, made in another home directory.
    #[error(
        "{0} already has keys in another home directory; making new ones here would replace the \
         account's identity (every contact would see a key change). Use the home that holds the \
         keys (`--home`), link this home as a new device (`sfc device link` there, then \
         `sfc device add {0} CODE` here), or replace the identity on purpose with \
         `sfc login --new-identity {0}`"
    )]
    IdentityElsewhere(String),
    /// The contact's key is in doubt (a changed key not accepted, or the server lists another
    /// key): there is nothing to verify until the user decides.
    #[error(
        "{0}'s identity key is in doubt (see `sfc fingerprint {0}`); accept the key you \
         compared with `sfc trust {0}` before verifying"
    )]
    KeyInDoubt(String),
    /// Another process already receives for this home directory.
    #[error(
        "another sfc (recv or chat) is already receiving messages for this home directory; stop \
         it first, or use it"
    )]
    AlreadyReceiving,
    /// The message was sealed and queued, but the server has not stored it yet.
    #[error(
        "message {id} not sent yet ({reason}); it waits in the outbox and goes with the next \
         `sfc send`, `sfc chat` or `sfc outbox`"
    )]
    Queued {
        /// The message's id.
        id: MessageId,
        /// Why it is still waiting.
        reason: String,
    },
    /// The server refused the message for good (it left the outbox).
    #[error("the server refused message {id}: {reason}")]
    Refused {
        /// The message's id.
        id: MessageId,
        /// The server's reason.
        reason: String,
    },
    /// The outbox is full; nothing was sealed.
    #[error(
        "{count} messages ({bytes} bytes) already wait in the outbox: send them first \
         (`sfc outbox`)"
    )]
    OutboxFull {
        /// Messages waiting.
        count: usize,
        /// Their envelope bytes.
        bytes: usize,
    },
}

impl MessengerError {
    /// Whether this is the connection failing (the server is down, restarting or
    /// unreachable), which reconnecting may fix.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Self::Client(e) if super::super::is_offline(e))
    }

    /// Whether fetching a file failed for good: its blob does not open as its message says
    /// (changed, cut short, another file) or the server does not have it for this account
    /// (`unknown_blob`: deleted, expired, or never readable here). Such a file is given up;
    /// any other failure (the connection, a busy server, a full local disk) may pass later.
    pub fn is_file_lost(&self) -> bool {
        match self {
            Self::File(_) => true,
            Self::Client(e) => e.is_server(ErrorCode::UnknownBlob),
            _ => false,
        }
    }

    /// Whether the server is busy or cannot write now: worth trying again after a pause.
    pub(crate) fn is_busy(&self) -> bool {
        matches!(self, Self::Client(e)
            if e.is_server(ErrorCode::Busy) || e.is_server(ErrorCode::StorageUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_file_that_cannot_open_or_is_gone_is_lost() {
        let server = |code| {
            MessengerError::Client(ClientError::Server {
                code,
                message: String::new(),
            })
        };
        assert!(MessengerError::File(FileError::DigestMismatch).is_file_lost());
        assert!(server(ErrorCode::UnknownBlob).is_file_lost());
        for passing in [
            server(ErrorCode::Busy),
            server(ErrorCode::StorageUnavailable),
            MessengerError::Client(ClientError::ConnectionLost("gone".into())),
            MessengerError::FileIo {
                path: "/downloads".into(),
                source: std::io::Error::other("no space left on device"),
            },
        ] {
            assert!(!passing.is_file_lost(), "{passing}");
        }
        assert!(server(ErrorCode::Busy).is_busy());
        assert!(!server(ErrorCode::UnknownBlob).is_busy());
    }
}
