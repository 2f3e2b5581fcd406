//! The reader of the control stream: routes each reply to the request waiting for it, the
//! `sent`/`send_failed` events to the sends waiting for them, `blob_stored`/`upload_failed` to
//! the uploads waiting for them, and keeps the other events
//! (`prekeys_low`) for the client to take.

use std::sync::{Arc, Mutex, OnceLock};

use quinn::{Connection, RecvStream};

use super::blobs::BlobWaiters;
use super::{ClientError, Notices, Pending, PendingSends, SendOutcome};
use crate::protocol::{ErrorCode, MAX_CONTROL_FRAME, Reply, ServerFrame, decode_body, read_frame};

/// Routes replies to waiting requests until the stream ends; then fails whoever still waits.
pub(super) async fn read_replies(
    mut recv: RecvStream,
    conn: Connection,
    pending: Pending,
    sends: PendingSends,
    notices: Arc<Mutex<Notices>>,
    verdict: Arc<OnceLock<String>>,
    blobs: BlobWaiters,
) {
    let mut buf = Vec::new();
    let failure = loop {
        match read_frame(&mut recv, MAX_CONTROL_FRAME, &mut buf).await {
            Ok(true) => {}
            Ok(false) => {
                break ClientError::ConnectionLost("server ended the control stream".into());
            }
            Err(e) => break ClientError::ConnectionLost(e.to_string()),
        }
        let frame: ServerFrame = match decode_body(&buf) {
            Ok(frame) => frame,
            Err(e) => break ClientError::Protocol(format!("undecodable reply: {e}")),
        };
        match frame.id {
            Some(id) => {
                let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
                match (waiter, frame.reply) {
                    (Some(waiter), reply) => {
                        let _ = waiter.send(Ok(reply));
                    }
                    (None, Reply::Error { code, message }) => {
                        tracing::warn!(id, %code, "error for a request nobody waits for");
                        if let Ok(mut n) = notices.lock() {
                            n.unclaimed_error = Some(ClientError::Server { code, message });
                        }
                    }
                    (None, other) => tracing::debug!(id, ?other, "late reply"),
                }
            }
            None => match frame.reply {
                // About the control stream as a whole (section 2.2): a `malformed_frame`
                // leaves the connection open; after the others the server closes it, which
                // ends this loop. Either way it answers no request: keep it for whoever asks.
                Reply::Error { code, message } => {
                    tracing::warn!(%code, %message, "the server reports an error about the connection");
                    if let Ok(mut n) = notices.lock() {
                        n.unclaimed_error = Some(ClientError::Server { code, message });
                    }
                }
                Reply::Sent {
                    message_id,
                    duplicate,
                } => {
                    let outcome = if duplicate {
                        SendOutcome::Duplicate
                    } else {
                        SendOutcome::Stored
                    };
                    let waiter = sends.lock().ok().and_then(|mut s| s.remove(&message_id));
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(Ok(outcome));
                    }
                }
                Reply::SendFailed {
                    message_id: Some(message_id),
                    code,
                    message,
                    devices,
                    own_devices,
                    epoch: _,
                } => {
                    let waiter = sends.lock().ok().and_then(|mut s| s.remove(&message_id));
                    let failure = match (code, devices) {
                        (ErrorCode::StaleDevices, Some(devices)) => ClientError::StaleDevices {
                            devices,
                            own_devices: own_devices.unwrap_or_default(),
                        },
                        _ => ClientError::Server { code, message },
                    };
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(Err(failure));
                    }
                }
                Reply::PrekeysLow { remaining } => {
                    if let Ok(mut n) = notices.lock() {
                        n.prekeys_low = Some(remaining);
                    }
                }
                Reply::KeyPackagesLow { remaining } => {
                    if let Ok(mut n) = notices.lock() {
                        n.key_packages_low = Some(remaining);
                    }
                }
                event @ Reply::LinkRequest { .. } => super::link::arrived(&notices, event),
                event @ (Reply::BlobStored { .. } | Reply::UploadFailed { .. }) => {
                    blobs.upload_event(event);
                }
                other => tracing::debug!(?other, "ignoring event"),
            },
        }
    };
    let failure = match (&failure, verdict.get(), conn.close_reason()) {
        (ClientError::ConnectionLost(_), Some(verdict), _) => {
            ClientError::ConnectionLost(verdict.clone())
        }
        (ClientError::ConnectionLost(_), None, Some(reason)) => {
            ClientError::from_connection(reason, &conn.remote_address().to_string())
        }
        _ => failure,
    };
    blobs.fail_uploads(&failure);
    let waiters: Vec<_> = match pending.lock() {
        Ok(mut p) => p.drain().map(|(_, w)| w).collect(),
        Err(_) => Vec::new(),
    };
    for waiter in waiters {
        let _ = waiter.send(Err(failure.clone_for_waiter()));
    }
    let send_waiters: Vec<_> = match sends.lock() {
        Ok(mut s) => s.drain().map(|(_, w)| w).collect(),
        Err(_) => Vec::new(),
    };
    for waiter in send_waiters {
        let _ = waiter.send(Err(failure.clone_for_waiter()));
    }
}
