//! The blob files: `DATA/blobs/<32 hex digits of the id>`, mode 0600, in a 0700 directory.
//! Every call runs on tokio's blocking threads (file I/O never runs on the async runtime);
//! buffers move into the blocking job and back, so a stream reuses one buffer throughout.
//!
//! Positional reads and writes (`pread`/`pwrite`) on a shared handle: a job needs no seek
//! state, and the handle is not moved in and out of each job.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::BlobId;

/// Runs `job` on a blocking thread.
async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| io::Error::other(format!("a blob file job failed: {e}")))?
}

/// The file of blob `id` in `dir`.
pub(crate) fn path(dir: &Path, id: BlobId) -> PathBuf {
    dir.join(id.to_hex())
}

/// The blob id a file name stands for, if it is one (32 lower-case hex digits).
pub(crate) fn id_of(name: &str) -> Option<BlobId> {
    if name.len() != 32 || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    BlobId::from_hex(name)
}

/// Syncs the directory, so a file created or removed in it stays so after a power loss.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes the blob directory (0700) if it is missing (blocking).
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
        Ok(()) => sync_dir(dir.parent().unwrap_or(dir)),
    }
}

/// Opens blob `id`'s file for writing from `held`: created (0600) if missing, cut to `held`
/// bytes (what the store says was synced; anything after it was not). Returns the file and
/// its length before the cut: shorter than `held` means bytes the store counts are missing.
pub(crate) async fn open_for_upload(
    dir: PathBuf,
    id: BlobId,
    held: u64,
) -> io::Result<(Arc<File>, u64)> {
    blocking(move || {
        ensure_dir(&dir)?;
        let path = path(&dir, id);
        let created = !path.exists();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        let length = file.metadata()?.len();
        if length > held {
            file.set_len(held)?;
            file.sync_data()?;
        }
        if created {
            sync_dir(&dir)?;
        }
        Ok((Arc::new(file), length))
    })
    .await
}

/// Writes all of `buf` at `at` and hands the buffer back (emptied) for reuse.
pub(crate) async fn write_at(file: Arc<File>, mut buf: Vec<u8>, at: u64) -> io::Result<Vec<u8>> {
    blocking(move || {
        file.write_all_at(&buf, at)?;
        buf.clear();
        Ok(buf)
    })
    .await
}

/// Makes what was written durable (the data, and the length it grew to).
pub(crate) async fn sync(file: Arc<File>) -> io::Result<()> {
    blocking(move || file.sync_data()).await
}

/// Opens blob `id`'s file for reading; `None` if it is not there.
pub(crate) async fn open_for_read(dir: PathBuf, id: BlobId) -> io::Result<Option<Arc<File>>> {
    blocking(move || match File::open(path(&dir, id)) {
        Ok(file) => Ok(Some(Arc::new(file))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    })
    .await
}

/// Reads up to `len` bytes at `at` into `buf` (cleared first) and hands it back; fewer only
/// at the end of the file.
pub(crate) async fn read_at(
    file: Arc<File>,
    mut buf: Vec<u8>,
    at: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    blocking(move || {
        buf.clear();
        buf.resize(len, 0);
        let mut filled = 0;
        while filled < len {
            let offset = at + filled as u64;
            match file.read_at(&mut buf[filled..], offset) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    })
    .await
}

/// Removes blob `id`'s file (missing is fine) and syncs the directory.
pub(crate) async fn remove(dir: PathBuf, id: BlobId) -> io::Result<()> {
    blocking(move || remove_now(&dir, id)).await
}

/// [`remove`], blocking.
pub(crate) fn remove_now(dir: &Path, id: BlobId) -> io::Result<()> {
    match std::fs::remove_file(path(dir, id)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every blob file in `dir` with its length (blocking); other names are left alone.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<(BlobId, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(id) = entry.file_name().to_str().and_then(id_of) else {
            continue;
        };
        found.push((id, entry.metadata()?.len()));
    }
    Ok(found)
}

/// Cuts blob `id`'s file to `length` bytes and syncs it (blocking).
pub(crate) fn truncate(dir: &Path, id: BlobId, length: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path(dir, id))?;
    file.set_len(length)?;
    file.sync_data()
}
