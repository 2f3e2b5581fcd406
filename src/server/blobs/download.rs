//! Download streams: after `download_blob` is answered, the server opens a unidirectional
//! stream with a `blob` header and sends the blob's file from the asked offset to its end.
//! One bounded buffer is read from the file and written to the stream at a time: the peer's
//! flow control holds the sender back, so a slow reader costs the server a buffer and the
//! stream's window, not the blob.

use std::fs::File;
use std::sync::Arc;

use quinn::Connection;
use tracing::{Instrument, debug, debug_span, warn};

use super::{StreamSlot, files};
use crate::protocol::{BlobHeader, MAX_STREAM_HEADER, StreamHeader};
use crate::store::BlobId;

/// Bytes read from the file and written to the stream at a time.
const READ_BUFFER: usize = 64 * 1024;

/// What a download stream sends.
pub(crate) struct Download {
    /// The blob.
    pub(crate) blob: BlobId,
    /// Its whole length.
    pub(crate) length: u64,
    /// Where the stream starts.
    pub(crate) offset: u64,
    /// Its file, opened before the request was answered.
    pub(crate) file: Arc<File>,
    /// How long the peer may take no bytes before the stream is given up.
    pub(crate) idle: std::time::Duration,
}

/// Sends `download` on a new stream of `conn`, in a task of its own (the control stream goes
/// on meanwhile); `slot` counts the stream until it ends.
pub(crate) fn start_download(conn: Connection, download: Download, slot: StreamSlot) {
    let span = debug_span!("blob download", blob = %download.blob);
    tokio::spawn(
        async move {
            let _slot = slot;
            match send(&conn, &download).await {
                Ok(()) => super::super::metrics::blob_downloaded(),
                Err(e) => debug!(error = %e, "blob download stream ended early"),
            }
        }
        .instrument(span),
    );
}

async fn send(conn: &Connection, download: &Download) -> Result<(), String> {
    // A peer that allows no stream from the server would hold the slot here.
    let mut stream = match tokio::time::timeout(download.idle, conn.open_uni()).await {
        Ok(opened) => opened.map_err(|e| e.to_string())?,
        Err(_) => return Err("the peer allows no stream from the server".into()),
    };
    let header = StreamHeader::Blob(BlobHeader {
        blob: download.blob,
        offset: download.offset,
        length: download.length,
    });
    let mut frame = Vec::with_capacity(64);
    crate::protocol::encode_frame_into(&mut frame, &header, MAX_STREAM_HEADER)
        .map_err(|e| e.to_string())?;
    stream.write_all(&frame).await.map_err(|e| e.to_string())?;
    let mut at = download.offset;
    let mut buf = Vec::with_capacity(READ_BUFFER);
    while at < download.length {
        let want = usize::try_from(download.length - at)
            .unwrap_or(usize::MAX)
            .min(READ_BUFFER);
        buf = files::read_at(Arc::clone(&download.file), buf, at, want)
            .await
            .map_err(|e| {
                warn!(error = %e, "cannot read a blob file");
                e.to_string()
            })?;
        if buf.is_empty() {
            // The file is shorter than its record: the client sees a stream cut short.
            warn!(at, length = download.length, "a blob file ends early");
            let _ = stream.reset(quinn::VarInt::from_u32(1));
            return Err("the blob file ends early".into());
        }
        // The peer's flow control holds this back while it does not read; past the idle time
        // the stream is given up and its slot freed.
        match tokio::time::timeout(download.idle, stream.write_all(&buf)).await {
            Ok(written) => written.map_err(|e| e.to_string())?,
            Err(_) => {
                let _ = stream.reset(quinn::VarInt::from_u32(1));
                return Err(format!("the peer read nothing for {:?}", download.idle));
            }
        }
        at += buf.len() as u64;
    }
    stream.finish().map_err(|e| e.to_string())?;
    Ok(())
}
