//! Keeping blob files and records in step: at start ([`reconcile`]: files without a record
//! are removed, files longer than their record's `held` cut back to it, records whose bytes
//! are gone corrected) and periodically ([`sweep_blobs`]: blobs whose time is up, or that
//! every device they were for is done with, are deleted).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Blobs, files};
use crate::store::{BlobId, BlobRecord, Store, StoreError};
use crate::unix_now;

/// Records read per store call while walking every blob.
const PAGE: usize = 256;

/// Why the blob directory could not be brought in step with the store at start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReconcileError {
    /// The blob directory could not be made or read.
    #[error("blob directory {dir}: {error}")]
    Dir {
        /// The directory.
        dir: std::path::PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Brings the blob files in line with the store, before the server serves: removes files
/// without a record (a crash between a record's deletion and its file's), cuts files back to
/// their record's `held` (bytes written after the last sync), and, where a file is shorter
/// than its record says, deletes a complete blob (it cannot be served) or moves a partial one's
/// `held` back to what the file has.
pub(crate) async fn reconcile(store: &dyn Store, blobs: &Blobs) -> Result<(), ReconcileError> {
    let dir = blobs.dir().to_owned();
    let listed = {
        let blob_dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            files::ensure_dir(&blob_dir)?;
            files::list(&blob_dir)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(|error| ReconcileError::Dir {
            dir: dir.clone(),
            error,
        })?
    };
    let mut on_disk: HashMap<BlobId, u64> = listed.into_iter().collect();
    let (mut cut, mut corrected) = (0usize, 0usize);
    let mut after = None;
    loop {
        let page = store.blobs_after(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for record in page {
            let found = on_disk.remove(&record.id).unwrap_or(0);
            if found > record.held {
                let (dir, id, held) = (dir.clone(), record.id, record.held);
                let result = tokio::task::spawn_blocking(move || files::truncate(&dir, id, held))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r);
                match result {
                    Ok(()) => cut += 1,
                    Err(e) => warn!(error = %e, blob = %record.id, "cannot cut a blob file back"),
                }
            } else if found < record.held {
                warn!(blob = %record.id, held = record.held, found, "a blob file is shorter than its record");
                corrected += 1;
                if record.is_complete() {
                    store.delete_blob(record.id).await?;
                    let (dir, id) = (dir.clone(), record.id);
                    let _ = tokio::task::spawn_blocking(move || files::remove_now(&dir, id)).await;
                } else {
                    store.set_blob_held(record.id, found, unix_now()).await?;
                }
            }
        }
    }
    let orphans = on_disk.len();
    for id in on_disk.into_keys() {
        let dir = dir.clone();
        let removed = tokio::task::spawn_blocking(move || files::remove_now(&dir, id)).await;
        if let Ok(Err(e)) = removed {
            warn!(error = %e, blob = %id, "cannot remove a blob file without a record");
        }
    }
    if orphans + cut + corrected > 0 {
        info!(
            removed = orphans,
            cut, corrected, "blob files brought in step with the store"
        );
    }
    Ok(())
}

/// Why a blob goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// Complete, and its message lifetime is over.
    Expired,
    /// Incomplete, and not written to for the upload lifetime.
    Abandoned,
    /// Every device it was for acknowledged it or no longer exists.
    Done,
}

/// Whether `record` is due for deletion at `now` by its age alone.
fn due(blobs: &Blobs, record: &BlobRecord, now: u64) -> Option<Reason> {
    let limits = &blobs.limits;
    match record.completed_at {
        Some(at) if now >= at.saturating_add(limits.ttl.as_secs()) => Some(Reason::Expired),
        None if now
            >= record
                .last_write
                .saturating_add(limits.upload_ttl.as_secs()) =>
        {
            Some(Reason::Abandoned)
        }
        _ => None,
    }
}

/// Deletes blobs past their time, and those no device still needs, every
/// `limits.sweep_interval` (the first a whole interval after the start), until `shutdown`.
pub(crate) async fn sweep_blobs(
    store: Arc<dyn Store>,
    blobs: Arc<Blobs>,
    shutdown: CancellationToken,
) {
    let every = blobs.limits.sweep_interval;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // A stop does not wait for a sweep: what it leaves is swept next time.
        let swept = tokio::select! {
            () = shutdown.cancelled() => return,
            swept = sweep_once(store.as_ref(), &blobs) => swept,
        };
        match swept {
            Ok(0) => {}
            Ok(n) => info!(blobs = n, "deleted blobs"),
            Err(e) => warn!(error = %e, "blob sweep failed"),
        }
    }
}

/// One pass over every blob; returns how many were deleted.
pub(crate) async fn sweep_once(store: &dyn Store, blobs: &Arc<Blobs>) -> Result<u64, StoreError> {
    let mut deleted = 0u64;
    let mut stored_bytes = 0u64;
    let mut after = None;
    loop {
        let page = store.blobs_after(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for record in page {
            let reason = match due(blobs, &record, unix_now()) {
                Some(reason) => Some(reason),
                // Devices removed and accounts deleted count as done.
                None => match store.settle_blob(record.id).await? {
                    Some(settled) if settled.all_done() => Some(Reason::Done),
                    _ => None,
                },
            };
            let Some(reason) = reason else {
                stored_bytes = stored_bytes.saturating_add(record.held);
                continue;
            };
            // Judged again under the blob's claim: an upload may have ended meanwhile.
            let still_due = |now: &BlobRecord| match reason {
                Reason::Done => now.all_done(),
                Reason::Expired | Reason::Abandoned => due(blobs, now, unix_now()).is_some(),
            };
            if blobs.delete_if(store, record.id, still_due).await? {
                tracing::debug!(blob = %record.id, ?reason, "blob deleted");
                deleted += 1;
            } else {
                // Being written, or no longer due: looked at again next time.
                stored_bytes = stored_bytes.saturating_add(record.held);
            }
        }
    }
    super::super::metrics::blob_bytes_stored(stored_bytes);
    Ok(deleted)
}
