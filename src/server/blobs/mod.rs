//! Blobs (sealed file attachments) on the server: what every connection shares about them
//! ([`Blobs`]: the directory, the limits, the blob streams in flight, the blobs being written
//! or deleted), and the pieces that use it: the files on disk (`files`), upload streams
//! (`upload`), download streams (`download`) and the sweeper (`sweep`). The control requests
//! (`upload_blob`, `download_blob`, `ack_blob`) are in `requests::blobs`; the metadata is the
//! store's (`store::blobs`).
//!
//! A blob's record is the truth: a file is written only under a record, and deleted only
//! after it (so a crash between the two leaves a file without a record, which the next start
//! removes, never a record pointing at nothing it believes held).

mod download;
mod files;
mod sweep;
mod upload;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

pub(crate) use self::download::{Download, start_download};
pub(crate) use self::sweep::{reconcile, sweep_blobs};
pub(crate) use self::upload::receive_upload;
use crate::store::{BlobId, BlobQuota, BlobRecord, Store, StoreError};

/// Name of the blob directory inside the data directory.
pub(crate) const BLOB_DIR: &str = "blobs";
/// Blob streams (uploads and downloads together) one connection may have at once.
pub(crate) const STREAMS_PER_CONNECTION: usize = 4;
/// Most blobs one uploader may hold (complete and partial).
pub(crate) const MAX_BLOBS_PER_OWNER: usize = 256;
/// Readers one blob may name at most.
pub(crate) const MAX_READERS: usize = 64;

/// The limits on blobs, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlobLimits {
    /// Longest blob accepted, in bytes (its ciphertext).
    pub(crate) max_blob_bytes: u64,
    /// What one uploader may hold.
    pub(crate) quota: BlobQuota,
    /// Blob streams in flight on the whole server.
    pub(crate) max_streams: usize,
    /// An incomplete blob is deleted this long after its last write.
    pub(crate) upload_ttl: Duration,
    /// A complete blob is deleted this long after it was completed (the message lifetime).
    pub(crate) ttl: Duration,
    /// How often the sweeper runs.
    pub(crate) sweep_interval: Duration,
    /// A blob stream that makes no progress this long is dropped (its slot is freed): a peer
    /// cannot hold the server's blob streams by opening them and going quiet.
    pub(crate) stream_idle: Duration,
}

/// What every connection shares about blobs.
pub(crate) struct Blobs {
    /// `DATA/blobs`.
    dir: PathBuf,
    pub(crate) limits: BlobLimits,
    /// Blob streams in flight: on the whole server, and per connection (by its stable id).
    streams: Mutex<StreamCounts>,
    /// Blobs being written (an upload stream) or deleted: one at a time per blob.
    claimed: Mutex<HashSet<BlobId>>,
}

#[derive(Default)]
struct StreamCounts {
    total: usize,
    per_connection: HashMap<usize, usize>,
}

impl Blobs {
    pub(crate) fn new(data_dir: &std::path::Path, limits: BlobLimits) -> Self {
        Self {
            dir: data_dir.join(BLOB_DIR),
            limits,
            streams: Mutex::new(StreamCounts::default()),
            claimed: Mutex::new(HashSet::new()),
        }
    }

    /// The blob directory.
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Blob `id`'s file, opened for reading; `None` if it is not there.
    pub(crate) async fn open_file(
        &self,
        id: BlobId,
    ) -> std::io::Result<Option<Arc<std::fs::File>>> {
        files::open_for_read(self.dir.clone(), id).await
    }

    /// A blob stream for connection `conn` (its stable id), unless it or the server already
    /// has as many as allowed (then the stream is answered `busy`).
    pub(crate) fn stream_slot(self: &Arc<Self>, conn: usize) -> Option<StreamSlot> {
        let mut counts = self.streams.lock().ok()?;
        let mine = counts.per_connection.get(&conn).copied().unwrap_or(0);
        if counts.total >= self.limits.max_streams || mine >= STREAMS_PER_CONNECTION {
            return None;
        }
        counts.total += 1;
        counts.per_connection.insert(conn, mine + 1);
        Some(StreamSlot {
            blobs: Arc::clone(self),
            conn,
        })
    }

    fn release_stream(&self, conn: usize) {
        let Ok(mut counts) = self.streams.lock() else {
            return;
        };
        counts.total = counts.total.saturating_sub(1);
        if let Some(mine) = counts.per_connection.get_mut(&conn) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                counts.per_connection.remove(&conn);
            }
        }
    }

    /// The blob for writing or deleting, unless another task has it.
    pub(crate) fn claim(self: &Arc<Self>, id: BlobId) -> Option<Claim> {
        let mut claimed = self.claimed.lock().ok()?;
        claimed.insert(id).then(|| Claim {
            blobs: Arc::clone(self),
            id,
        })
    }

    /// Deletes a blob if `still_due` says so of its record as read under the blob's claim (so
    /// an upload that ended meanwhile is seen): its record first (synced), then its file (and
    /// the directory entry, synced). `Ok(false)` if another task is writing or deleting it (it
    /// is left for the sweeper), it has no record, or it is no longer due.
    pub(crate) async fn delete_if(
        self: &Arc<Self>,
        store: &dyn Store,
        id: BlobId,
        still_due: impl FnOnce(&BlobRecord) -> bool,
    ) -> Result<bool, StoreError> {
        let Some(_claim) = self.claim(id) else {
            return Ok(false);
        };
        match store.blob(id).await? {
            Some(record) if still_due(&record) => {}
            _ => return Ok(false),
        }
        if !store.delete_blob(id).await? {
            return Ok(false);
        }
        if let Err(e) = files::remove(self.dir.clone(), id).await {
            // The next start removes a file without a record.
            warn!(error = %e, blob = %id, "cannot delete a blob's file");
        }
        super::metrics::blob_deleted();
        Ok(true)
    }
}

/// A blob stream counted against the limits for as long as it is held.
pub(crate) struct StreamSlot {
    blobs: Arc<Blobs>,
    conn: usize,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.blobs.release_stream(self.conn);
    }
}

/// A blob held for writing or deletion.
pub(crate) struct Claim {
    blobs: Arc<Blobs>,
    id: BlobId,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut claimed) = self.blobs.claimed.lock() {
            claimed.remove(&self.id);
        }
    }
}
