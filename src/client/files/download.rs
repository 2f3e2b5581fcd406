//! Receiving a file: fetch its blob into a temporary file inside the destination directory,
//! opening and hashing it chunk by chunk (only verified plaintext is ever written), resume
//! from the last verified chunk when the stream or the connection breaks, and give the file
//! its safe final name (never over an existing file) only once every chunk opened and the
//! size and SHA-256 match the message.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::names::{numbered, safe_file_name, stays_inside};
use super::{MAX_TRANSFER_ATTEMPTS, RETRY_PAUSE, TRANSFER_RECONNECT_LIMIT};
use crate::client::Messenger;
use crate::client::messenger::MessengerError;
use crate::e2e::{ChunkOpener, FileError, FileRef};
use crate::protocol::BlobId;

/// Prefix of the temporary file a download is written to (a dotfile: `ls` leaves it out).
pub const PARTIAL_PREFIX: &str = ".sfc-partial-";
/// Most numbered names tried for one file (`name (1).ext` …).
const MAX_NUMBERED: u32 = 10_000;

/// The temporary file of a download: deleted when dropped unless it was given its name.
struct Partial {
    temp: tempfile::NamedTempFile,
    file: tokio::fs::File,
}

impl Messenger {
    /// Fetches `file` (from a [`crate::client::messenger::Received::File`]) into `dir` and
    /// returns where it is. The blob streams into a temporary file in `dir`; each chunk is
    /// opened and hashed before it is written, and the file gets its name,
    /// [`safe_file_name`] of the sender's name (numbered ` (1)`, ` (2)`, … rather than
    /// replace an existing file), only if all of it opened and its SHA-256 matches. Otherwise
    /// nothing is left in `dir`. A broken stream or a lost connection is repaired and the
    /// download goes on from the last verified chunk. Once the file has its name the server is
    /// told this device is done with the blob (`ack_blob`); then show it and call
    /// [`Self::shown`]. `progress` hears (plaintext bytes verified, file size).
    ///
    /// A file an earlier run saved before it ended without showing its message is not fetched
    /// again: its path comes back (the keystore keeps it with the unshown message).
    ///
    /// An error for which [`MessengerError::is_file_lost`] holds (the blob was tampered with,
    /// is not the file the message describes, or is gone from the server) will not go away:
    /// give the file up with [`Self::give_up_file`]. Others (a lost connection, a busy server,
    /// a full disk here) may pass: leave the message unshown, and it comes again.
    pub async fn download_file(
        &self,
        file: &FileRef,
        dir: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<PathBuf, MessengerError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| MessengerError::FileIo { path, source }
        };
        if let Some(saved) = self.saved_before(file).await? {
            self.acknowledge_blob(file).await;
            return Ok(saved);
        }
        let temp = tempfile::Builder::new()
            .prefix(PARTIAL_PREFIX)
            .tempfile_in(dir)
            .map_err(io(dir))?;
        let handle = temp.as_file().try_clone().map_err(io(temp.path()))?;
        let mut partial = Partial {
            file: tokio::fs::File::from_std(handle),
            temp,
        };
        let mut opener = ChunkOpener::new(&file.key, file.blob, file.size)?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self
                .download_attempt(file, &mut opener, &mut partial, &mut progress)
                .await
            {
                Ok(()) => break,
                Err(e)
                    if (e.is_disconnected() || e.is_busy()) && attempts < MAX_TRANSFER_ATTEMPTS =>
                {
                    // Only verified chunks were written: go on after the last of them.
                    opener.discard_partial();
                    let verified = opener.verified_plaintext();
                    let path = partial.temp.path().to_owned();
                    partial.file.set_len(verified).await.map_err(io(&path))?;
                    partial
                        .file
                        .seek(SeekFrom::Start(verified))
                        .await
                        .map_err(io(&path))?;
                    if self.disconnected().is_some() {
                        self.reconnect_with_backoff(Some(TRANSFER_RECONNECT_LIMIT), |why, wait| {
                            tracing::info!(%why, ?wait, "download interrupted; reconnecting");
                        })
                        .await?;
                    } else {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        opener.finish(&file.sha256)?;
        let path = partial.temp.path().to_owned();
        partial.file.flush().await.map_err(io(&path))?;
        partial.file.sync_all().await.map_err(io(&path))?;
        let saved = give_name(partial.temp, dir, &safe_file_name(&file.name))?;
        self.record_saved(file, &saved).await?;
        self.acknowledge_blob(file).await;
        Ok(saved)
    }

    async fn acknowledge_blob(&self, file: &FileRef) {
        if let Err(e) = self.client().ack_blob(file.blob).await {
            // The file is saved; the server deletes the blob at its expiry instead.
            tracing::warn!(%e, blob = %file.blob, "could not acknowledge a downloaded blob");
        }
    }

    /// Notes in the keystore, on the unshown message of `file`, where it was saved.
    async fn record_saved(&self, file: &FileRef, saved: &Path) -> Result<(), MessengerError> {
        let (Some(path), blob) = (saved.to_str().map(str::to_owned), file.blob) else {
            return Ok(());
        };
        self.keystore()
            .update_async(move |state| -> Result<(), MessengerError> {
                if let Some(state) = state.as_mut() {
                    for kept in state.unshown.iter_mut() {
                        if of_blob(kept.file.as_deref(), blob) {
                            kept.saved = Some(path.clone());
                        }
                    }
                }
                Ok(())
            })
            .await
    }

    /// Where `file` was saved by an earlier run that ended before its message was shown, if
    /// the file is still there.
    async fn saved_before(&self, file: &FileRef) -> Result<Option<PathBuf>, MessengerError> {
        let blob = file.blob;
        let saved = self
            .keystore()
            .read_async(move |state| {
                state.and_then(|s| {
                    s.unshown
                        .iter()
                        .find(|kept| of_blob(kept.file.as_deref(), blob))
                        .and_then(|kept| kept.saved.clone())
                })
            })
            .await?;
        Ok(saved.map(PathBuf::from).filter(|path| path.is_file()))
    }

    /// Tells the server this device is done with `file`'s blob without having it (it could
    /// not be fetched or opened, and will not be).
    pub async fn give_up_file(&self, file: &FileRef) -> Result<(), MessengerError> {
        Ok(self.client().ack_blob(file.blob).await?)
    }

    /// One download attempt: the blob from the last verified chunk to its end.
    async fn download_attempt(
        &self,
        file: &FileRef,
        opener: &mut ChunkOpener,
        partial: &mut Partial,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), MessengerError> {
        let client = self.client();
        let mut stream = client
            .download_blob(file.blob, opener.verified_offset())
            .await?;
        let expected = opener.blob_len();
        if stream.length < expected {
            return Err(FileError::Truncated {
                got: stream.length,
                expected,
            }
            .into());
        }
        if stream.length > expected {
            return Err(FileError::ExtraBytes.into());
        }
        let mut plaintext = Vec::new();
        while let Some(bytes) = stream.read().await? {
            plaintext.clear();
            opener.feed(&bytes, &mut plaintext)?;
            if !plaintext.is_empty() {
                partial.file.write_all(&plaintext).await.map_err(|source| {
                    MessengerError::FileIo {
                        path: partial.temp.path().to_owned(),
                        source,
                    }
                })?;
                progress(opener.verified_plaintext(), file.size);
            }
        }
        Ok(())
    }
}

/// Whether a kept file message's reference names `blob`.
fn of_blob(reference: Option<&[u8]>, blob: BlobId) -> bool {
    reference
        .and_then(|bytes| FileRef::from_bytes(bytes).ok())
        .is_some_and(|file| file.blob == blob)
}

/// Moves the verified temporary file to `dir/name`, or the first of `name (1)`, `name (2)`, …
/// that does not exist: never over an existing file (a no-replace rename, or a hard link).
fn give_name(
    mut temp: tempfile::NamedTempFile,
    dir: &Path,
    name: &str,
) -> Result<PathBuf, MessengerError> {
    for n in 0..MAX_NUMBERED {
        let numbered = numbered(name, n);
        if !stays_inside(dir, &numbered) {
            break;
        }
        let candidate = dir.join(numbered);
        match temp.persist_noclobber(&candidate) {
            Ok(_) => return Ok(candidate),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => temp = e.file,
            Err(e) => {
                return Err(MessengerError::FileIo {
                    path: candidate,
                    source: e.error,
                });
            }
        }
    }
    Err(MessengerError::FileIo {
        path: dir.join(name),
        source: std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "too many files of this name, or a name that would leave the directory",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_in_use_is_numbered_and_nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "old").unwrap();
        std::fs::write(dir.path().join("a (1).txt"), "old 1").unwrap();
        let mut temp = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        std::io::Write::write_all(&mut temp, b"new").unwrap();
        let saved = give_name(temp, dir.path(), "a.txt").unwrap();
        assert_eq!(saved, dir.path().join("a (2).txt"));
        assert_eq!(std::fs::read(&saved).unwrap(), b"new");
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"old");
        assert_eq!(
            std::fs::read(dir.path().join("a (1).txt")).unwrap(),
            b"old 1"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 3);
    }
}
