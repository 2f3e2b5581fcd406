//! Upload streams: a client's `upload` stream continues a blob from what the server holds to
//! its end. The bytes go to the blob's file as they arrive, through one bounded buffer (never
//! the whole blob in memory); every [`SYNC_EVERY`] bytes and at the end the file is synced
//! and the synced length recorded as the blob's `held`, so a crash loses at most the unsynced
//! tail, and a resumed upload starts from `held` (the file is cut back to it first).

use std::sync::Arc;

use quinn::{RecvStream, VarInt};
use tracing::{debug, warn};

use super::files;
use crate::protocol::{ErrorCode, Reply, UploadHeader};
use crate::server::Shared;
use crate::server::messaging::SessionCell;
use crate::store::{BlobId, BlobRecord, StoreError};
use crate::unix_now;

/// Bytes gathered from the stream before they are written to the file in one job: half the
/// stream's receive window, so the server holds at most about one and a half windows of an
/// upload (this and what quinn has received meanwhile), whatever the blob's length.
const WRITE_BUFFER: usize = 64 * 1024;
/// Bytes written between two syncs (and records of `held`).
const SYNC_EVERY: u64 = 8 * 1024 * 1024;
/// Stream error code sent with STOP_SENDING when an upload stream is refused or cut off.
const STREAM_REFUSED: u32 = 1;

/// Why an upload ended without completing the blob.
struct Failure {
    code: ErrorCode,
    message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Receives one upload stream (its header already read) and gives the event for the
/// uploader: `blob_stored` or `upload_failed`.
pub(crate) async fn receive_upload(
    mut stream: RecvStream,
    header: UploadHeader,
    shared: &Shared,
    session: &SessionCell,
    conn: usize,
) -> Reply {
    let blob = header.blob;
    let refused = |stream: &mut RecvStream, failure: Failure, held: u64| {
        let _ = stream.stop(VarInt::from_u32(STREAM_REFUSED));
        upload_failed(blob, failure, held)
    };
    let Some(owner) = session
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .filter(|s| s.is_active())
    else {
        let failure = Failure::new(ErrorCode::NotAuthenticated, "log in before uploading");
        return refused(&mut stream, failure, 0);
    };
    let store = shared.accounts.store();
    let blobs = &shared.blobs;
    let record = match own_blob(store.blob(blob).await, &owner.username) {
        Ok(record) => record,
        Err(failure) => return refused(&mut stream, failure, 0),
    };
    let Some(_slot) = blobs.stream_slot(conn) else {
        let failure = Failure::new(
            ErrorCode::Busy,
            "too many blob streams at once; retry when one has ended",
        );
        return refused(&mut stream, failure, record.held);
    };
    let Some(_claim) = blobs.claim(blob) else {
        let failure = Failure::new(
            ErrorCode::Busy,
            "this blob is being written by another stream (or deleted)",
        );
        return refused(&mut stream, failure, record.held);
    };
    // Read again under the claim: a stream that just ended may have moved `held`.
    let record = match own_blob(store.blob(blob).await, &owner.username) {
        Ok(record) => record,
        Err(failure) => return refused(&mut stream, failure, 0),
    };
    if record.is_complete() {
        let failure = Failure::new(
            ErrorCode::UnknownBlob,
            "this blob is complete: nothing is left to upload",
        );
        return refused(&mut stream, failure, record.held);
    }
    if header.offset != record.held {
        let failure = Failure::new(
            ErrorCode::BadOffset,
            format!(
                "the server holds {} bytes of this blob; start there, not at {}",
                record.held, header.offset
            ),
        );
        return refused(&mut stream, failure, record.held);
    }
    let held = record.held;
    let mut upload = Upload {
        shared,
        record,
        written: held,
        synced: held,
    };
    match upload.run(&mut stream).await {
        Ok(()) => {
            super::super::metrics::blob_uploaded();
            Reply::BlobStored {
                blob,
                length: upload.record.length,
            }
        }
        Err(failure) => {
            // Nothing more is read from it (a stream that ended or was reset ignores this).
            let _ = stream.stop(VarInt::from_u32(STREAM_REFUSED));
            upload_failed(blob, failure, upload.synced)
        }
    }
}

fn upload_failed(blob: BlobId, failure: Failure, held: u64) -> Reply {
    Reply::UploadFailed {
        blob,
        code: failure.code,
        message: failure.message,
        held,
    }
}

/// The blob's record if `owner` uploaded it; otherwise the failure (the same for a blob of
/// someone else as for none, so an id's existence is not revealed).
fn own_blob(
    found: Result<Option<BlobRecord>, StoreError>,
    owner: &crate::protocol::Username,
) -> Result<BlobRecord, Failure> {
    match found {
        Ok(Some(record)) if record.owner == *owner => Ok(record),
        Ok(_) => Err(Failure::new(
            ErrorCode::UnknownBlob,
            "no such blob of yours: announce it with `upload_blob` first",
        )),
        Err(e) => Err(store_failure(&e)),
    }
}

fn store_failure(e: &StoreError) -> Failure {
    if !matches!(e, StoreError::Unavailable) {
        warn!(error = %e, "blob store operation failed");
    }
    Failure::new(
        ErrorCode::StorageUnavailable,
        "the server cannot store this blob now; retry later from `held`",
    )
}

fn io_failure(e: &std::io::Error) -> Failure {
    warn!(error = %e, "cannot write a blob file");
    Failure::new(
        ErrorCode::StorageUnavailable,
        "the server cannot write this blob now; retry later from `held`",
    )
}

/// One upload in progress.
struct Upload<'a> {
    shared: &'a Shared,
    record: BlobRecord,
    /// Bytes of the blob in the file (written, maybe not synced).
    written: u64,
    /// Bytes synced and recorded as `held`.
    synced: u64,
}

impl Upload<'_> {
    /// Reads the stream into the file until its end and makes what arrived durable. `Err`
    /// says why the blob is not complete; `self.synced` is what the store holds then.
    async fn run(&mut self, stream: &mut RecvStream) -> Result<(), Failure> {
        let dir = self.shared.blobs.dir().to_owned();
        let id = self.record.id;
        let (file, found) = files::open_for_upload(dir, id, self.record.held)
            .await
            .map_err(|e| io_failure(&e))?;
        if found < self.record.held {
            // Bytes the store counts are not in the file (lost outside the server): the
            // record follows the file, and the client resumes from there.
            warn!(blob = %id, held = self.record.held, found, "a blob file is shorter than recorded");
            self.record_held(found).await?;
            return Err(Failure::new(
                ErrorCode::BadOffset,
                format!("the server holds {found} bytes of this blob; start there"),
            ));
        }
        let length = self.record.length;
        let idle = self.shared.blobs.limits.stream_idle;
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BUFFER);
        let ended = loop {
            let room = WRITE_BUFFER - buf.len();
            let read = tokio::time::timeout(idle, stream.read_chunk(room, true)).await;
            let Ok(read) = read else {
                break Err(Failure::new(
                    ErrorCode::TruncatedFrame,
                    format!(
                        "no bytes for {} s; resume the upload from `held`",
                        idle.as_secs()
                    ),
                ));
            };
            match read {
                Ok(Some(chunk)) => {
                    let arrived = self.written + buf.len() as u64 + chunk.bytes.len() as u64;
                    if arrived > length {
                        break Err(Failure::new(
                            ErrorCode::BlobTooLarge,
                            format!("more bytes than the blob's length ({length})"),
                        ));
                    }
                    buf.extend_from_slice(&chunk.bytes);
                    if buf.len() >= WRITE_BUFFER {
                        buf = self.write(&file, buf).await?;
                        if self.written - self.synced >= SYNC_EVERY {
                            self.sync(&file).await?;
                        }
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    debug!(error = %e, blob = %id, "upload stream cut off");
                    break Err(Failure::new(
                        ErrorCode::TruncatedFrame,
                        "the stream was reset before the blob's end",
                    ));
                }
            }
        };
        // Whatever arrived in order is kept, also when the stream failed.
        if !buf.is_empty() {
            self.write(&file, buf).await?;
        }
        if self.written != self.synced {
            self.sync(&file).await?;
        }
        ended?;
        if self.written < length {
            return Err(Failure::new(
                ErrorCode::TruncatedFrame,
                format!(
                    "the stream ended after {} of {length} bytes; send the rest from `held`",
                    self.written
                ),
            ));
        }
        Ok(())
    }

    async fn write(&mut self, file: &Arc<std::fs::File>, buf: Vec<u8>) -> Result<Vec<u8>, Failure> {
        let len = buf.len() as u64;
        let buf = files::write_at(Arc::clone(file), buf, self.written)
            .await
            .map_err(|e| io_failure(&e))?;
        self.written += len;
        Ok(buf)
    }

    /// Syncs the file and records what it holds.
    async fn sync(&mut self, file: &Arc<std::fs::File>) -> Result<(), Failure> {
        files::sync(Arc::clone(file))
            .await
            .map_err(|e| io_failure(&e))?;
        self.record_held(self.written).await
    }

    async fn record_held(&mut self, held: u64) -> Result<(), Failure> {
        let store = self.shared.accounts.store();
        match store.set_blob_held(self.record.id, held, unix_now()).await {
            Ok(Some(record)) => {
                self.synced = held;
                self.record = record;
                Ok(())
            }
            // Deleted meanwhile: cannot happen while the upload holds its claim.
            Ok(None) => Err(Failure::new(ErrorCode::UnknownBlob, "the blob was deleted")),
            Err(e) => Err(store_failure(&e)),
        }
    }
}
