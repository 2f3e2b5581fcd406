//! A raw protocol client for tests: one connection, its control stream, frames written and
//! read by hand, so a test controls every byte the server sees.

use std::time::Duration;

use quinn::{ConnectionError, RecvStream, SendStream};
use securefastchat::client::connect_raw;
use securefastchat::protocol::{
    ClientFrame, CloseCode, ErrorCode, MAX_CONTROL_FRAME, Reply, Request, ServerFrame, decode_body,
    encode_frame, read_frame,
};
use serde::Serialize;

use super::TestServer;

pub struct Raw {
    pub conn: quinn::Connection,
    pub send: SendStream,
    pub recv: RecvStream,
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
}
