//! The blob requests: `upload_blob` (announce a blob, or ask how much of it the server holds),
//! `download_blob` (answered here; the bytes follow on a server-opened stream, `blobs::download`)
//! and `ack_blob` (this device is done with a blob; the last device's ack deletes it). The
//! upload's bytes arrive on an `upload` stream (`blobs::upload`).

use super::{Control, error, store_error};
use crate::protocol::{ErrorCode, Reply, Username};
use crate::server::accounts::ActiveSession;
use crate::server::blobs::{Download, MAX_READERS, start_download};
use crate::store::{BlobCreated, BlobId, BlobRecord, NewBlob, StoreError};

/// A refusal: its code and message.
type Refused = (ErrorCode, String);

fn unknown_blob() -> Reply {
    error(
        ErrorCode::UnknownBlob,
        "no such blob for you (never uploaded, incomplete, or deleted)".into(),
    )
}

impl Control {
    pub(super) async fn upload_blob(
        &self,
        me: &ActiveSession,
        blob: BlobId,
        length: u64,
        readers: Vec<String>,
    ) -> Reply {
        let limits = self.shared.blobs.limits;
        if length == 0 {
            return error(ErrorCode::BadRequest, "a blob has at least 1 byte".into());
        }
        if length > limits.max_blob_bytes {
            return error(
                ErrorCode::BlobTooLarge,
                format!(
                    "a blob of {length} bytes exceeds the limit of {}",
                    limits.max_blob_bytes
                ),
            );
        }
        let store = self.shared.accounts.store();
        // A resumed upload keeps the readers of its first request: they need not be valid now.
        match store.blob(blob).await {
            Ok(Some(record)) if record.owner == me.username && record.length == length => {
                return Reply::BlobUpload {
                    blob,
                    held: record.held,
                };
            }
            Ok(Some(_)) => return blob_exists(),
            Ok(None) => {}
            Err(e) => return store_error(&e),
        }
        let readers = match check_readers(&me.username, readers) {
            Ok(readers) => readers,
            Err((code, message)) => return error(code, message),
        };
        let new = NewBlob {
            id: blob,
            owner: me.username.clone(),
            owner_device: me.device,
            length,
            readers,
            now: crate::unix_now(),
        };
        match store.create_blob(new, limits.quota).await {
            Ok(BlobCreated::Created(record) | BlobCreated::Existing(record)) => Reply::BlobUpload {
                blob,
                held: record.held,
            },
            Ok(BlobCreated::Taken) => blob_exists(),
            Ok(BlobCreated::OverQuota) => error(
                ErrorCode::BlobQuota,
                format!(
                    "your blobs would exceed {} bytes or {} blobs (complete and unfinished \
                     uploads); retry once recipients have fetched some",
                    limits.quota.bytes, limits.quota.count
                ),
            ),
            Err(StoreError::UnknownUser(name)) => {
                error(ErrorCode::UnknownUser, format!("no such user: {name}"))
            }
            Err(e) => store_error(&e),
        }
    }

    pub(super) async fn download_blob(
        &self,
        me: &ActiveSession,
        blob: BlobId,
        offset: u64,
    ) -> Reply {
        let record = match self.readable(me, blob).await {
            Ok(record) if record.is_complete() => record,
            Ok(_) => return unknown_blob(),
            Err(reply) => return reply,
        };
        if offset > record.length {
            return error(
                ErrorCode::BadRequest,
                format!("offset {offset} is past the blob's end ({})", record.length),
            );
        }
        let blobs = &self.shared.blobs;
        let Some(slot) = blobs.stream_slot(self.conn.stable_id()) else {
            return error(
                ErrorCode::Busy,
                "too many blob streams at once; retry when one has ended".into(),
            );
        };
        let file = match blobs.open_file(blob).await {
            Ok(Some(file)) => file,
            Ok(None) => {
                tracing::warn!(%blob, "a complete blob has no file");
                return unknown_blob();
            }
            Err(e) => {
                tracing::warn!(error = %e, %blob, "cannot open a blob file");
                return error(
                    ErrorCode::StorageUnavailable,
                    "the server cannot read this blob now; retry later".into(),
                );
            }
        };
        let download = Download {
            blob,
            length: record.length,
            offset,
            file,
            idle: blobs.limits.stream_idle,
        };
        start_download(self.conn.clone(), download, slot);
        Reply::BlobDownload {
            blob,
            length: record.length,
            offset,
        }
    }

    pub(super) async fn ack_blob(&self, me: &ActiveSession, blob: BlobId) -> Reply {
        if let Err(reply) = self.readable(me, blob).await {
            return reply;
        }
        let store = self.shared.accounts.store();
        let record = match store.ack_blob(blob, &me.username, me.device).await {
            Ok(Some(record)) => record,
            Ok(None) => return unknown_blob(),
            Err(e) => return store_error(&e),
        };
        if record.all_done() {
            // The last device is done: nobody needs it any more. If this fails (or an upload
            // holds it), the sweeper deletes it later.
            let blobs = &self.shared.blobs;
            match blobs
                .delete_if(store.as_ref(), blob, BlobRecord::all_done)
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, %blob, "cannot delete a blob every device is done with")
                }
            }
        }
        Reply::BlobAcked { blob }
    }

    /// The blob's record if `me` may read it (its uploader or a reader); otherwise the reply,
    /// `unknown_blob` whether or not it exists.
    async fn readable(&self, me: &ActiveSession, blob: BlobId) -> Result<BlobRecord, Reply> {
        match self.shared.accounts.store().blob(blob).await {
            Ok(Some(record)) if record.may_read(&me.username) => Ok(record),
            Ok(_) => Err(unknown_blob()),
            Err(e) => Err(store_error(&e)),
        }
    }
}

fn blob_exists() -> Reply {
    error(
        ErrorCode::BlobExists,
        "this blob id is taken; choose another".into(),
    )
}

/// The readers of a new blob: 1 to [`MAX_READERS`] distinct valid names, not `me`. A name
/// that cannot be a user's is `unknown_user`, like one without an account.
fn check_readers(me: &Username, readers: Vec<String>) -> Result<Vec<Username>, Refused> {
    if readers.is_empty() || readers.len() > MAX_READERS {
        return Err((
            ErrorCode::BadRequest,
            format!("a blob has 1 to {MAX_READERS} readers"),
        ));
    }
    let mut names: Vec<Username> = Vec::with_capacity(readers.len());
    for reader in readers {
        let Ok(name) = Username::parse(&reader) else {
            return Err((ErrorCode::UnknownUser, format!("no such user: {reader:?}")));
        };
        if name == *me {
            return Err((
                ErrorCode::BadRequest,
                "you are not a reader of your own blob (your other devices get it anyway)".into(),
            ));
        }
        if names.contains(&name) {
            return Err((
                ErrorCode::BadRequest,
                format!("{name} is listed twice among the readers"),
            ));
        }
        names.push(name);
    }
    Ok(names)
}
