//! A raw protocol client for tests: one connection, its control stream, frames written and
//! read by hand, so a test controls every byte the server sees.

use std::collections::VecDeque;
use std::time::Duration;

use quinn::{ConnectionError, RecvStream, SendStream};
use securefastchat::client::connect_raw;
use securefastchat::protocol::{
    BlobHeader, BlobId, ClientFrame, CloseCode, ErrorCode, MAX_CONTROL_FRAME, MAX_STREAM_HEADER,
    Password, Reply, Request, ServerFrame, StreamHeader, UploadHeader, decode_body, encode_frame,
    read_frame,
};
use serde::Serialize;

use super::TestServer;

pub struct Raw {
    pub conn: quinn::Connection,
    pub send: SendStream,
    pub recv: RecvStream,
    /// Events (frames without an id) read while waiting for a reply ([`Raw::call`]).
    events: VecDeque<ServerFrame>,
    _endpoint: quinn::Endpoint,
}

impl Raw {
    pub async fn open(server: &TestServer) -> Self {
        let (endpoint, conn) = connect_raw(&server.options()).await.unwrap();
        // As a client that receives does (PROTOCOL.md section 1): allow the server's
        // delivery streams.
        conn.set_max_concurrent_uni_streams(quinn::VarInt::from_u32(
            securefastchat::transport::MAX_SERVER_UNI_STREAMS,
        ));
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            conn,
            send,
            recv,
            events: VecDeque::new(),
            _endpoint: endpoint,
        }
    }

    pub async fn with_hello(server: &TestServer) -> Self {
        let mut raw = Self::open(server).await;
        raw.request(
            1,
            Request::Hello {
                version: 1,
                client: None,
            },
        )
        .await;
        assert!(matches!(
            raw.reply().await.reply,
            Reply::Hello { version: 1, .. }
        ));
        raw
    }

    pub async fn bytes(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    pub async fn body(&mut self, body: &[u8]) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.bytes(&frame).await;
    }

    pub async fn map<T: Serialize>(&mut self, value: &T) {
        self.body(&rmp_serde::to_vec_named(value).unwrap()).await;
    }

    pub async fn request(&mut self, id: u64, request: Request) {
        let frame = encode_frame(&ClientFrame { id, request }, MAX_CONTROL_FRAME).unwrap();
        self.bytes(&frame).await;
    }

    pub async fn reply(&mut self) -> ServerFrame {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            read_frame(&mut self.recv, MAX_CONTROL_FRAME, &mut buf),
        );
        assert!(read.await.unwrap().unwrap(), "stream ended without a reply");
        decode_body(&buf).unwrap()
    }

    pub async fn expect_error(&mut self, id: Option<u64>, code: ErrorCode) {
        let frame = self.reply().await;
        assert_eq!(frame.id, id, "{frame:?}");
        assert!(
            matches!(frame.reply, Reply::Error { code: c, .. } if c == code),
            "{frame:?}"
        );
    }

    pub async fn expect_pong(&mut self, id: u64) {
        self.request(id, Request::Ping).await;
        let frame = self.reply().await;
        assert_eq!((frame.id, frame.reply), (Some(id), Reply::Pong));
    }

    pub async fn expect_closed_with(&self, code: CloseCode) {
        let closed = tokio::time::timeout(Duration::from_secs(5), self.conn.closed()).await;
        match closed.unwrap() {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code.into_inner(), u64::from(code.code()))
            }
            other => panic!("expected an application close, got {other:?}"),
        }
    }

    /// A connection signed up as `name` (after `hello`), with delivery.
    pub async fn signed_up(server: &TestServer, name: &str) -> Self {
        let mut raw = Self::with_hello(server).await;
        let signup = Request::Signup {
            username: name.into(),
            password: Password::new(super::PASSWORD),
        };
        let reply = raw.call(2, signup).await;
        assert!(matches!(reply, Reply::Session { .. }), "{reply:?}");
        raw
    }

    /// Sends `request` with `id` and gives its reply; events that come first are kept for
    /// [`Raw::event`].
    pub async fn call(&mut self, id: u64, request: Request) -> Reply {
        self.request(id, request).await;
        loop {
            let frame = self.reply().await;
            match frame.id {
                None => self.events.push_back(frame),
                Some(got) => {
                    assert_eq!(got, id, "{frame:?}");
                    return frame.reply;
                }
            }
        }
    }

    /// The next event (a frame without an id), waiting up to 5 s for it.
    pub async fn event(&mut self) -> Reply {
        if let Some(frame) = self.events.pop_front() {
            return frame.reply;
        }
        let frame = self.reply().await;
        assert_eq!(frame.id, None, "expected an event, got {frame:?}");
        frame.reply
    }

    /// Opens an upload stream for `blob` from `offset` and writes its header.
    pub async fn upload_stream(&self, blob: BlobId, offset: u64) -> SendStream {
        let mut stream = self.conn.open_uni().await.unwrap();
        let header = StreamHeader::Upload(UploadHeader { blob, offset });
        let frame = encode_frame(&header, MAX_STREAM_HEADER).unwrap();
        stream.write_all(&frame).await.unwrap();
        stream
    }

    /// Uploads `bytes` of `blob` from `offset` on one stream (FIN at the end) and gives the
    /// event that answers it.
    pub async fn upload(&mut self, blob: BlobId, offset: u64, bytes: &[u8]) -> Reply {
        let mut stream = self.upload_stream(blob, offset).await;
        // The server may refuse the stream (STOP_SENDING) before it is all written.
        if stream.write_all(bytes).await.is_ok() {
            let _ = stream.finish();
        }
        self.event().await
    }

    /// Accepts the next server stream, which must be a blob stream, and reads it to its end:
    /// its header and bytes.
    pub async fn blob_stream(&self) -> (BlobHeader, Vec<u8>) {
        let accepted = tokio::time::timeout(Duration::from_secs(10), self.conn.accept_uni());
        let mut stream = accepted.await.unwrap().unwrap();
        let mut buf = Vec::new();
        assert!(
            read_frame(&mut stream, MAX_STREAM_HEADER, &mut buf)
                .await
                .unwrap()
        );
        let StreamHeader::Blob(header) = decode_body::<StreamHeader>(&buf).unwrap() else {
            panic!("expected a blob stream");
        };
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(usize::MAX));
        (header, read.await.unwrap().unwrap())
    }
}
