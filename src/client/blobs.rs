//! Blobs (sealed files, docs/PROTOCOL.md 5.6) on the client side, as raw calls on [`Client`]:
//! `upload_blob` and an upload stream whose end the server reports with a `blob_stored` or
//! `upload_failed` event, `download_blob` and the `blob` stream the server opens for it,
//! `ack_blob`. The control-stream reader routes the events, and the acceptor of server streams
//! hands each `blob` stream, by blob id, to the download waiting for it ([`BlobWaiters`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::oneshot;

use super::{Client, ClientError, unexpected};
use crate::protocol::{
    BlobHeader, BlobId, ErrorCode, MAX_STREAM_HEADER, Reply, Request, StreamHeader, UploadHeader,
};
use crate::transport;

/// Bytes read from a blob stream at a time.
const READ_PIECE: usize = 64 * 1024;
/// STOP_SENDING code of a blob stream nobody waits for.
pub(super) const BLOB_REFUSED: u32 = 1;

/// How an upload stream ended, as the server reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// `blob_stored`: the whole blob is on the server's disk, synced.
    Stored {
        /// Its length.
        length: u64,
    },
    /// `upload_failed`: refused or ended early; the server holds `held` bytes of it.
    Failed {
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for people (from the server: render it before showing it).
        message: String,
        /// Bytes the server holds: resume from here.
        held: u64,
    },
}

type UploadWaiter = oneshot::Sender<Result<UploadOutcome, ClientError>>;
type DownloadWaiter = oneshot::Sender<(BlobHeader, RecvStream)>;

/// Who waits for what about blobs on one connection: the end of an upload (an event on the
/// control stream) and the stream of a download, each by blob id.
#[derive(Debug, Default, Clone)]
pub(super) struct BlobWaiters(Arc<Mutex<Waiting>>);

#[derive(Debug, Default)]
struct Waiting {
    uploads: HashMap<BlobId, UploadWaiter>,
    downloads: HashMap<BlobId, DownloadWaiter>,
}

impl BlobWaiters {
    fn with<T>(&self, f: impl FnOnce(&mut Waiting) -> T) -> Option<T> {
        self.0.lock().ok().map(|mut w| f(&mut w))
    }

    /// Routes a `blob_stored` or `upload_failed` event to the upload waiting for it; gives
    /// back any other reply.
    pub(super) fn upload_event(&self, reply: Reply) -> Option<Reply> {
        let (blob, outcome) = match reply {
            Reply::BlobStored { blob, length } => (blob, UploadOutcome::Stored { length }),
            Reply::UploadFailed {
                blob,
                code,
                message,
                held,
            } => (
                blob,
                UploadOutcome::Failed {
                    code,
                    message,
                    held,
                },
            ),
            other => return Some(other),
        };
        match self.with(|w| w.uploads.remove(&blob)).flatten() {
            Some(waiter) => {
                let _ = waiter.send(Ok(outcome));
            }
            None => tracing::debug!(%blob, ?outcome, "an upload event nobody waits for"),
        }
        None
    }

    /// Hands a server-opened `blob` stream to the download waiting for it; a stream nobody
    /// asked for is stopped.
    pub(super) fn blob_stream(&self, header: BlobHeader, mut stream: RecvStream) {
        match self.with(|w| w.downloads.remove(&header.blob)).flatten() {
            Some(waiter) => {
                if let Err((_, mut stream)) = waiter.send((header, stream)) {
                    let _ = stream.stop(VarInt::from_u32(BLOB_REFUSED));
                }
            }
            None => {
                tracing::warn!(blob = %header.blob, "a blob stream nobody asked for");
                let _ = stream.stop(VarInt::from_u32(BLOB_REFUSED));
            }
        }
    }

    /// Fails every upload still waiting (the connection is gone).
    pub(super) fn fail_uploads(&self, failure: &ClientError) {
        let waiters: Vec<UploadWaiter> = self
            .with(|w| w.uploads.drain().map(|(_, w)| w).collect())
            .unwrap_or_default();
        for waiter in waiters {
            let _ = waiter.send(Err(failure.clone_for_waiter()));
        }
    }
}

/// An upload stream being written: the blob's bytes from the offset given to
/// [`Client::open_upload`]. [`BlobUpload::finish`] ends it and waits for the server's verdict.
pub struct BlobUpload {
    blob: BlobId,
    stream: SendStream,
    outcome: oneshot::Receiver<Result<UploadOutcome, ClientError>>,
    waiters: BlobWaiters,
    conn: Connection,
    timeout: Duration,
    stopped: bool,
}

impl std::fmt::Debug for BlobUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobUpload")
            .field("blob", &self.blob)
            .field("stopped", &self.stopped)
            .finish()
    }
}

fn lost(conn: &Connection, fallback: impl std::fmt::Display) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::from_connection(reason, &conn.remote_address().to_string()),
        None => ClientError::ConnectionLost(fallback.to_string()),
    }
}

impl BlobUpload {
    /// Writes the next bytes of the blob. `Ok(false)`: the server stopped reading (it refused
    /// the stream); [`BlobUpload::finish`] then says why.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<bool, ClientError> {
        if self.stopped {
            return Ok(false);
        }
        match self.stream.write_all(bytes).await {
            Ok(()) => Ok(true),
            Err(quinn::WriteError::Stopped(_)) => {
                self.stopped = true;
                Ok(false)
            }
            Err(e) => Err(lost(&self.conn, e)),
        }
    }

    /// Ends the stream (FIN) and waits for `blob_stored` or `upload_failed`.
    pub async fn finish(mut self) -> Result<UploadOutcome, ClientError> {
        if !self.stopped {
            // A stream the server already stopped cannot be finished; the event says why.
            let _ = self.stream.finish();
        }
        let waited = tokio::time::timeout(self.timeout, &mut self.outcome).await;
        match waited {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(lost(&self.conn, "the reply reader stopped")),
            Err(_) => Err(ClientError::Timeout(self.timeout)),
        }
    }

    /// Resets the stream (the upload is abandoned here; the server keeps what arrived).
    pub fn abandon(mut self) {
        let _ = self.stream.reset(VarInt::from_u32(BLOB_REFUSED));
    }
}

impl Drop for BlobUpload {
    fn drop(&mut self) {
        let blob = self.blob;
        self.waiters.with(|w| w.uploads.remove(&blob));
    }
}

/// A blob stream the server opened for a download: bytes `offset..length` of the blob.
pub struct BlobDownload {
    /// The blob.
    pub blob: BlobId,
    /// The blob's whole length.
    pub length: u64,
    /// Where the stream starts in the blob.
    pub offset: u64,
    stream: RecvStream,
    conn: Connection,
    /// Bytes read so far.
    read: u64,
}

impl std::fmt::Debug for BlobDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobDownload")
            .field("blob", &self.blob)
            .field("length", &self.length)
            .field("offset", &self.offset)
            .field("read", &self.read)
            .finish()
    }
}

impl BlobDownload {
    /// The next bytes of the blob (at most 64 KiB), `None` at its end. A stream that ends
    /// early or carries more than `length - offset` bytes is an error.
    pub async fn read(&mut self) -> Result<Option<bytes::Bytes>, ClientError> {
        let want = self.length - self.offset;
        match self.stream.read_chunk(READ_PIECE, true).await {
            Ok(Some(chunk)) => {
                self.read += chunk.bytes.len() as u64;
                if self.read > want {
                    let _ = self.stream.stop(VarInt::from_u32(BLOB_REFUSED));
                    return Err(ClientError::Protocol(format!(
                        "the blob stream carries more than the {want} bytes announced"
                    )));
                }
                Ok(Some(chunk.bytes))
            }
            Ok(None) if self.read == want => Ok(None),
            Ok(None) => Err(ClientError::ConnectionLost(format!(
                "the blob stream ended after {} of {want} bytes",
                self.read
            ))),
            Err(e) => Err(lost(&self.conn, e)),
        }
    }
}

impl Client {
    /// `upload_blob`: announces a blob of `length` bytes that `readers` may fetch, or (same
    /// id and length again) asks how much of it the server holds. Returns `held`.
    pub async fn upload_blob(
        &self,
        blob: BlobId,
        length: u64,
        readers: Vec<String>,
    ) -> Result<u64, ClientError> {
        match self
            .request(Request::UploadBlob {
                blob,
                length,
                readers,
            })
            .await?
        {
            Reply::BlobUpload { blob: b, held } if b == blob => Ok(held),
            other => Err(unexpected("upload_blob", &other)),
        }
    }

    /// Opens an upload stream for `blob` from `offset` (the server's `held`); write the
    /// blob's bytes from there to its end, then [`BlobUpload::finish`].
    pub async fn open_upload(&self, blob: BlobId, offset: u64) -> Result<BlobUpload, ClientError> {
        let stream = self
            .conn
            .open_uni()
            .await
            .map_err(|e| lost(&self.conn, e))?;
        let (tx, rx) = oneshot::channel();
        self.blobs.with(|w| w.uploads.insert(blob, tx));
        let mut upload = BlobUpload {
            blob,
            stream,
            outcome: rx,
            waiters: self.blobs.clone(),
            conn: self.conn.clone(),
            timeout: self.request_timeout,
            stopped: false,
        };
        let header = StreamHeader::Upload(UploadHeader { blob, offset });
        let frame = crate::protocol::encode_frame(&header, MAX_STREAM_HEADER)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        upload.write(&frame).await?;
        Ok(upload)
    }

    /// `download_blob` from `offset`, then the stream the server opens for it. Checks that
    /// the stream is the one asked for (its offset and length those of the answer).
    pub async fn download_blob(
        &self,
        blob: BlobId,
        offset: u64,
    ) -> Result<BlobDownload, ClientError> {
        // The server opens the blob stream: allow server streams (a connection that did not
        // ask for delivery allows none).
        self.conn
            .set_max_concurrent_uni_streams(VarInt::from_u32(transport::MAX_SERVER_UNI_STREAMS));
        let (tx, rx) = oneshot::channel();
        self.blobs.with(|w| w.downloads.insert(blob, tx));
        let forget = || {
            self.blobs.with(|w| w.downloads.remove(&blob));
        };
        let (length, start) = match self.request(Request::DownloadBlob { blob, offset }).await {
            Ok(Reply::BlobDownload {
                blob: b,
                length,
                offset: start,
            }) if b == blob && start == offset => (length, start),
            Ok(other) => {
                forget();
                return Err(unexpected("download_blob", &other));
            }
            Err(e) => {
                forget();
                return Err(e);
            }
        };
        let arrived = tokio::select! {
            arrived = tokio::time::timeout(self.request_timeout, rx) => arrived,
            closed = self.conn.closed() => {
                forget();
                return Err(ClientError::from_connection(
                    closed,
                    &self.conn.remote_address().to_string(),
                ));
            }
        };
        let (header, mut stream) = match arrived {
            Ok(Ok(arrived)) => arrived,
            Ok(Err(_)) => return Err(lost(&self.conn, "the stream acceptor stopped")),
            Err(_) => {
                forget();
                return Err(ClientError::Timeout(self.request_timeout));
            }
        };
        if header.offset != start || header.length != length || start > length {
            let _ = stream.stop(VarInt::from_u32(BLOB_REFUSED));
            return Err(ClientError::Protocol(format!(
                "a blob stream from {} of {} bytes answers a download from {start} of {length}",
                header.offset, header.length
            )));
        }
        Ok(BlobDownload {
            blob,
            length,
            offset: start,
            stream,
            conn: self.conn.clone(),
            read: 0,
        })
    }

    /// `ack_blob`: this device is done with `blob`. A blob already gone (`unknown_blob`)
    /// counts as done.
    pub async fn ack_blob(&self, blob: BlobId) -> Result<(), ClientError> {
        match self.request(Request::AckBlob { blob }).await {
            Ok(Reply::BlobAcked { .. }) => Ok(()),
            Ok(other) => Err(unexpected("ack_blob", &other)),
            Err(e) if e.is_server(ErrorCode::UnknownBlob) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
