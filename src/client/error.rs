//! Client-side errors, each with a message fit for one line on a terminal.

use std::time::Duration;

use quinn::ConnectionError;

use crate::protocol::{CloseCode, ErrorCode};
use crate::tls::TlsError;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not `HOST:PORT`.
    #[error("invalid server address {0:?} (expected HOST:PORT)")]
    InvalidServerAddress(String),
    /// The host name did not resolve.
    #[error("cannot resolve {server}: {reason}")]
    Resolve {
        /// The address given.
        server: String,
        /// Why.
        reason: String,
    },
    /// The CA file could not be used.
    #[error("cannot use CA certificate: {0}")]
    CaFile(TlsError),
    /// Nothing answered.
    #[error("server unreachable at {server}: {reason}")]
    Unreachable {
        /// The address given.
        server: String,
        /// Why we think so.
        reason: String,
    },
    /// The server's certificate is not signed by the trusted CA (or not for this name).
    #[error("server certificate not trusted: {0}")]
    CertificateNotTrusted(String),
    /// The server refused the connection (at its limit, or shutting down).
    #[error("server refused the connection: {0}")]
    Refused(String),
    /// The server closed the connection.
    #[error("server closed the connection ({code}): {reason}")]
    Closed {
        /// The close code's name.
        code: String,
        /// The reason the server gave.
        reason: String,
    },
    /// The connection dropped.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server answered with an error.
    #[error("{message} ({code})")]
    Server {
        /// The typed code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server refused a message because the devices it was sealed for are not the
    /// current ones; nothing was stored. Seal it for these and send it again.
    #[error("the recipient's or your own devices changed (now {devices:?} and {own_devices:?})")]
    StaleDevices {
        /// The recipient's current devices.
        devices: Vec<u32>,
        /// The sender's other current devices.
        own_devices: Vec<u32>,
    },
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// A local I/O error (binding the UDP socket).
    #[error("local I/O error: {0}")]
    Io(std::io::Error),
    /// An internal lock was poisoned.
    #[error("client state poisoned by a panic")]
    Poisoned,
}

impl ClientError {
    /// Classifies a QUIC connection error seen while talking to `server`.
    pub fn from_connection(error: ConnectionError, server: &str) -> Self {
        match error {
            ConnectionError::TransportError(e) => {
                let reason = e.reason.clone();
                // TLS alerts travel as CRYPTO_ERROR codes 0x100..=0x1ff.
                let code = u64::from(e.code);
                if (0x100..=0x1ff).contains(&code)
                    && (reason.contains("certificate") || reason.contains("UnknownIssuer"))
                {
                    Self::CertificateNotTrusted(reason)
                } else {
                    Self::ConnectionLost(e.to_string())
                }
            }
            ConnectionError::ConnectionClosed(close) => {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                let text = format!("{}", close.error_code);
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED {
                    Self::Refused("the server is not accepting connections now".into())
                } else if reason.contains("certificate") {
                    Self::CertificateNotTrusted(reason)
                } else {
                    Self::ConnectionLost(format!("{text}: {reason}"))
                }
            }
            ConnectionError::ApplicationClosed(close) => {
                let code = match CloseCode::from_code(close.error_code.into_inner()) {
                    Some(CloseCode::Normal) => "normal".to_owned(),
                    Some(CloseCode::Shutdown) => "shutdown".to_owned(),
                    Some(CloseCode::ProtocolViolation) => "protocol violation".to_owned(),
                    Some(CloseCode::Overloaded) => "overloaded".to_owned(),
                    Some(CloseCode::Replaced) => "replaced by a newer login".to_owned(),
                    Some(CloseCode::AccountDeleted) => "account deleted".to_owned(),
                    Some(CloseCode::LoginTimeout) => "not logged in in time".to_owned(),
                    Some(CloseCode::DeviceRemoved) => "this device was removed".to_owned(),
                    None => format!("code {}", close.error_code),
                };
                Self::Closed {
                    code,
                    reason: String::from_utf8_lossy(&close.reason).into_owned(),
                }
            }
            ConnectionError::TimedOut => Self::Unreachable {
                server: server.to_owned(),
                reason: "timed out".into(),
            },
            // A stateless reset: the server has no such connection (it restarted).
            ConnectionError::Reset => Self::ConnectionLost(
                "the server no longer knows this connection (it restarted?)".into(),
            ),
            other => Self::ConnectionLost(other.to_string()),
        }
    }

    /// A copy for one of several waiters on the same failure (I/O errors are flattened).
    pub(crate) fn clone_for_waiter(&self) -> Self {
        match self {
            Self::Server { code, message } => Self::Server {
                code: *code,
                message: message.clone(),
            },
            Self::StaleDevices {
                devices,
                own_devices,
            } => Self::StaleDevices {
                devices: devices.clone(),
                own_devices: own_devices.clone(),
            },
            Self::Closed { code, reason } => Self::Closed {
                code: code.clone(),
                reason: reason.clone(),
            },
            Self::CertificateNotTrusted(r) => Self::CertificateNotTrusted(r.clone()),
            Self::Refused(r) => Self::Refused(r.clone()),
            Self::Unreachable { server, reason } => Self::Unreachable {
                server: server.clone(),
                reason: reason.clone(),
            },
            Self::Protocol(r) => Self::Protocol(r.clone()),
            other => Self::ConnectionLost(other.to_string()),
        }
    }
}
