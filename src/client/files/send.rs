//! Sending a file: read, hash and seal it one chunk at a time while uploading it (never the
//! whole file in memory), resume the upload from the server's `held` after a lost connection,
//! then send the `file` message through the outbox once the server has the blob.

use std::io::SeekFrom;
use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{MAX_TRANSFER_ATTEMPTS, RETRY_PAUSE, TRANSFER_RECONNECT_LIMIT};
use crate::client::messenger::{Content, MessengerError};
use crate::client::{Messenger, UploadOutcome};
use crate::e2e::{
    ChunkSealer, FILE_CHUNK_LEN, FILE_TAG_LEN, FileError, FileKey, FileRef, MAX_FILE_NAME_LEN,
    chunk_at_offset, sealed_len,
};
use crate::protocol::{BlobId, ErrorCode, MessageId, Username};

/// A file being uploaded: what stays the same across attempts, and the hash so far.
struct Upload<'a> {
    path: &'a Path,
    file: tokio::fs::File,
    size: u64,
    blob: BlobId,
    key: FileKey,
    length: u64,
    peer: &'a Username,
    /// SHA-256 of chunks `0..hashed`: an attempt that resumes before `hashed` does not hash
    /// again what it seals again.
    hasher: Sha256,
    hashed: u64,
}

/// What one upload attempt came to.
enum Attempt {
    /// The server has the whole blob.
    Stored,
    /// Try again (from the server's `held`), after a pause when `pause`.
    Again { pause: bool },
}

impl Messenger {
    /// Sends the file at `path` to `to`: seals it (E15) while reading it, uploads it, and once
    /// the server has it (`blob_stored`), sends the `file` message as [`Self::send_text`]
    /// sends a text (through the outbox; [`MessengerError::Queued`] if the server cannot take
    /// it now). `progress` hears (blob bytes written, blob length) as the upload goes. A lost
    /// connection is repaired ([`Self::reconnect_with_backoff`], at most
    /// [`super::TRANSFER_RECONNECT_LIMIT`]) and the upload goes on from what the server holds.
    /// Returns the message's id and the warning of [`Self::send_text`].
    pub async fn send_file(
        &self,
        to: &str,
        path: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(MessageId, Option<String>), MessengerError> {
        let peer = self.recipient(to)?;
        let io = |source| MessengerError::FileIo {
            path: path.to_owned(),
            source,
        };
        let file = tokio::fs::File::open(path).await.map_err(io)?;
        let meta = file.metadata().await.map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let size = meta.len();
        let length = sealed_len(size).ok_or(FileError::TooLarge { size })?;
        let random = |e: getrandom::Error| FileError::Random(e.to_string());
        let mut upload = Upload {
            path,
            file,
            size,
            blob: BlobId::random().map_err(random)?,
            key: FileKey::random()?,
            length,
            peer: &peer,
            hasher: Sha256::new(),
            hashed: 0,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let last = attempts >= MAX_TRANSFER_ATTEMPTS;
            match self.upload_attempt(&mut upload, &mut progress).await {
                Ok(Attempt::Stored) => break,
                Ok(Attempt::Again { pause }) if !last => {
                    if pause {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                Ok(Attempt::Again { .. }) => {
                    return Err(MessengerError::UploadRefused {
                        code: ErrorCode::Busy,
                        message: format!("the upload did not finish in {attempts} attempts"),
                    });
                }
                Err(e) if e.is_busy() && !last => tokio::time::sleep(RETRY_PAUSE).await,
                Err(e) if e.is_disconnected() && !last => {
                    if self.disconnected().is_some() {
                        self.reconnect_with_backoff(Some(TRANSFER_RECONNECT_LIMIT), |why, wait| {
                            tracing::info!(%why, ?wait, "upload interrupted; reconnecting");
                        })
                        .await?;
                    } else {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if upload.hashed != crate::e2e::chunk_count(size) {
            return Err(MessengerError::Client(
                crate::client::ClientError::Protocol(
                    "the server reports the blob stored before it was sent".into(),
                ),
            ));
        }
        let file = FileRef {
            blob: upload.blob,
            key: upload.key,
            sha256: upload.hasher.finalize().into(),
            size,
            name: file_name(path),
            content_type: content_type(path).to_owned(),
        };
        let content = Content::File {
            plaintext: file.to_bytes()?.to_vec(),
            name: file.name.clone(),
        };
        let (id, warning, outbox) = self.seal_content(&peer, content).await?;
        self.send_sealed(id, warning, outbox).await
    }

    /// One upload attempt: asks how much the server holds, then seals and writes the rest.
    async fn upload_attempt(
        &self,
        up: &mut Upload<'_>,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<Attempt, MessengerError> {
        let io = |source| MessengerError::FileIo {
            path: up.path.to_owned(),
            source,
        };
        let client = self.client();
        let readers = vec![up.peer.as_str().to_owned()];
        let held = client.upload_blob(up.blob, up.length, readers).await?;
        progress(held, up.length);
        if held >= up.length {
            return Ok(Attempt::Stored);
        }
        let (index, start) = chunk_at_offset(held);
        if index > up.hashed {
            return Err(MessengerError::Client(
                crate::client::ClientError::Protocol(format!(
                    "the server holds {held} bytes, more than were sent"
                )),
            ));
        }
        up.file
            .seek(SeekFrom::Start(index * FILE_CHUNK_LEN as u64))
            .await
            .map_err(io)?;
        let mut sealer = ChunkSealer::starting_at(&up.key, up.blob, up.size, index)?;
        let mut stream = client.open_upload(up.blob, held).await?;
        let mut skip = usize::try_from(held - start).unwrap_or(0);
        let mut written = held;
        let mut stopped = false;
        while !sealer.is_done() {
            let (i, len) = (sealer.next_index(), sealer.next_len());
            let mut chunk = vec![0; len];
            chunk.reserve_exact(FILE_TAG_LEN);
            up.file.read_exact(&mut chunk).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    io(std::io::Error::other(
                        "the file got shorter while it was sent",
                    ))
                } else {
                    io(e)
                }
            })?;
            if i == up.hashed {
                up.hasher.update(&chunk);
                up.hashed += 1;
            }
            let sealed = sealer.seal(chunk)?;
            let part = sealed.get(skip..).unwrap_or_default();
            skip = 0;
            if !stream.write(part).await? {
                stopped = true;
                break;
            }
            written += part.len() as u64;
            progress(written, up.length);
        }
        if !stopped && up.file.read(&mut [0; 1]).await.map_err(io)? != 0 {
            stream.abandon();
            return Err(io(std::io::Error::other(
                "the file got longer while it was sent",
            )));
        }
        match stream.finish().await? {
            UploadOutcome::Stored { .. } => Ok(Attempt::Stored),
            UploadOutcome::Failed { code, message, .. } => match code {
                // The stream did not start where the server's copy ends (another attempt got
                // further than its answer said), or broke off: ask again from `held`.
                ErrorCode::BadOffset | ErrorCode::TruncatedFrame => {
                    Ok(Attempt::Again { pause: false })
                }
                ErrorCode::Busy | ErrorCode::StorageUnavailable => {
                    Ok(Attempt::Again { pause: true })
                }
                code => Err(MessengerError::UploadRefused { code, message }),
            },
        }
    }
}

/// The name a file is sent under: its own name (without directories), at most
/// [`MAX_FILE_NAME_LEN`] bytes, cut at a character boundary; `file` if it has none.
pub(super) fn file_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(MAX_FILE_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    match &name[..end] {
        "" => super::FALLBACK_NAME.to_owned(),
        cut => cut.to_owned(),
    }
}

/// The content type of a few common file types, from the extension; `""` otherwise.
pub(super) fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "txt" => "text/plain",
        "md" => "text/markdown",
        "html" | "htm" => "text/html",
        "csv" => "text/csv",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sent_name_is_the_file_name_cut_to_255_bytes() {
        assert_eq!(file_name(Path::new("/tmp/dir/report.pdf")), "report.pdf");
        assert_eq!(file_name(Path::new("/")), "file");
        let long = format!("/tmp/{}", "é".repeat(200));
        let name = file_name(Path::new(&long));
        assert!(name.len() <= 255 && name.len() >= 254, "{}", name.len());
        assert_eq!(content_type(Path::new("a.PNG")), "image/png");
        assert_eq!(content_type(Path::new("a.unknown")), "");
    }
}
