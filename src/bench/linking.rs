//! Linking a benchmark user's devices 2..N to its device 1 through the server, as a person
//! does (PROTOCOL.md 5.5, E13): the real SPAKE2 exchange keyed by a fresh code, the key
//! confirmations both ways and the sealed payload that hands the identity to the new device.
//!
//! The existing device's side runs on a connection of its own that speaks the control stream
//! by hand ([`Linker`]): the `link_request` it waits for is an event, which [`Client`] does
//! not hand out. That connection resumes device 1's session without delivery, so device 1's
//! own connection keeps receiving. The new device is a [`Client`] that says `hello`, joins,
//! and is authenticated as the new device when its `link_confirm` is answered (`linked`).

use quinn::{Connection, Endpoint, RecvStream, SendStream};

use super::BenchError;
use crate::client::{Client, ClientOptions, connect_raw};
use crate::e2e::link::{ExistingDevice, JoiningDevice, LinkSecret};
use crate::e2e::{IdentityKeyPair, LinkCode, LinkPayload};
use crate::protocol::keys::Bin;
use crate::protocol::{
    ClientFrame, DeviceId, MAX_CONTROL_FRAME, Reply, Request, ServerFrame, SessionToken, Username,
    decode_body, encode_frame, read_frame,
};
use crate::transport::MAX_SERVER_UNI_STREAMS;

fn setup(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("{what}: {e}"))
}

/// The existing device's side of links: a connection of device 1 whose control stream this
/// module reads and writes frame by frame.
pub(super) struct Linker {
    account: Username,
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    next_id: u64,
    /// Held so that a connection on an endpoint of its own keeps it.
    _endpoint: Endpoint,
}

impl Linker {
    /// Connects as `account`'s device 1 with its session `token`, leaving delivery with the
    /// device's other connection.
    pub async fn open(
        options: &ClientOptions,
        account: &str,
        token: SessionToken,
    ) -> Result<Self, BenchError> {
        let account = Username::parse(account).map_err(|e| setup("linking account", e))?;
        let (endpoint, conn) = connect_raw(options).await?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| setup("control stream", e))?;
        let mut linker = Self {
            account,
            conn,
            send,
            recv,
            next_id: 1,
            _endpoint: endpoint,
        };
        let hello = Request::Hello {
            version: crate::protocol::PROTOCOL_VERSION,
            client: Some("sfc-bench linker".into()),
        };
        match linker.request(hello).await? {
            Reply::Hello { .. } => {}
            other => return Err(unexpected("hello", &other)),
        }
        let resume = Request::Resume {
            token,
            deliver: false,
        };
        match linker.request(resume).await? {
            Reply::Resumed { device: 1, .. } => Ok(linker),
            other => Err(unexpected("resume", &other)),
        }
    }

    /// Links one new device: runs both sides of the exchange, the new device on a fresh
    /// connection from `options` named `device_name`. Returns the new device's connection (now
    /// authenticated as it, receiving), its id, its session token and the identity it opened
    /// from the payload (which must be `identity`).
    pub async fn link(
        &mut self,
        options: &ClientOptions,
        identity: &IdentityKeyPair,
        device_name: &str,
    ) -> Result<(Client, DeviceId, SessionToken, IdentityKeyPair), BenchError> {
        let secret = LinkSecret::draw().map_err(|e| setup("link secret", e))?;
        let (existing, pake_e) =
            ExistingDevice::start(&secret, &self.account).map_err(|e| setup("link start", e))?;
        let slot = match self
            .request(Request::LinkOpen { pake: Bin(pake_e) })
            .await?
        {
            Reply::LinkOpened { slot, .. } => slot,
            other => return Err(unexpected("link_open", &other)),
        };
        // The new device types the code the existing one shows.
        let code = LinkCode::new(slot, &secret).map_err(|e| setup("link code", e))?;
        let (joining, pake_n) =
            JoiningDevice::start(&code, &self.account).map_err(|e| setup("link join", e))?;
        let new_device = Client::connect(options).await?;
        let join = Request::LinkJoin {
            username: self.account.as_str().into(),
            slot,
            pake: Bin(pake_n),
            name: device_name.into(),
        };
        let pake_e = match new_device.request(join).await? {
            Reply::LinkPake { pake } => pake,
            other => return Err(unexpected("link_join", &other)),
        };
        let (joining, confirm_n) = joining
            .finish(&pake_e.0)
            .map_err(|e| setup("link finish (new device)", e))?;
        // `linked` makes this connection the new device's delivering one (PROTOCOL.md 5.5, 4),
        // but `Client::request` opens the way for delivery streams only for signup, login and
        // resume: open it here, before the confirmation, as they do.
        new_device
            .connection()
            .set_max_concurrent_uni_streams(quinn::VarInt::from_u32(MAX_SERVER_UNI_STREAMS));
        // The new device's `link_confirm` is answered only once the existing device decides.
        let confirm = new_device.request(Request::LinkConfirm {
            confirm: Bin(confirm_n),
        });
        let decide = self.decide(existing, slot, identity);
        let (linked, device) = tokio::join!(confirm, decide);
        let device = device?;
        let (token, confirm_e, sealed) = match linked? {
            Reply::Linked {
                device: d,
                token,
                confirm,
                payload,
                ..
            } if d == device => (token, confirm, payload),
            other => return Err(unexpected("link_confirm", &other)),
        };
        let payload = joining
            .open(&confirm_e.0, &sealed)
            .map_err(|e| setup("link payload", e))?;
        if payload.identity.public() != identity.public() {
            return Err(BenchError::Setup(
                "the linked device opened another identity".into(),
            ));
        }
        Ok((new_device, device, token, payload.identity))
    }

    /// The existing device's half after the join: waits for `link_request`, checks the new
    /// device's confirmation and accepts with the sealed identity; returns the new device's id.
    async fn decide(
        &mut self,
        existing: ExistingDevice,
        slot: u16,
        identity: &IdentityKeyPair,
    ) -> Result<DeviceId, BenchError> {
        let (pake_n, confirm_n) = loop {
            match self.next_frame().await?.reply {
                Reply::LinkRequest {
                    slot: s,
                    pake,
                    confirm,
                    ..
                } if s == slot => break (pake, confirm),
                // `prekeys_low` and the like: not for the link.
                Reply::Error { code, message } => {
                    return Err(BenchError::Setup(format!(
                        "waiting for link_request: {code:?}: {message}"
                    )));
                }
                _ => {}
            }
        };
        let keys = existing
            .finish(slot, &pake_n.0)
            .map_err(|e| setup("link finish (existing device)", e))?;
        let payload = LinkPayload {
            account: self.account.clone(),
            identity: identity.clone(),
            contacts: Vec::new(),
        };
        let accept = keys
            .accept(&confirm_n.0, &payload)
            .map_err(|e| setup("link accept", e))?;
        let request = Request::LinkAccept {
            slot,
            confirm: Bin(accept.confirm),
            payload: accept.payload,
        };
        match self.request(request).await? {
            Reply::LinkAccepted { device } => Ok(device),
            other => Err(unexpected("link_accept", &other)),
        }
    }

    /// Sends `request` and returns its answer, skipping events.
    async fn request(&mut self, request: Request) -> Result<Reply, BenchError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = encode_frame(&ClientFrame { id, request }, MAX_CONTROL_FRAME)
            .map_err(|e| setup("request frame", e))?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| setup("writing a request", e))?;
        loop {
            let frame = self.next_frame().await?;
            if frame.id == Some(id) {
                return Ok(frame.reply);
            }
        }
    }

    /// The next frame of the control stream (bounded by the control frame limit; waits at
    /// most the client's default request timeout).
    async fn next_frame(&mut self) -> Result<ServerFrame, BenchError> {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            read_frame(&mut self.recv, MAX_CONTROL_FRAME, &mut buf),
        )
        .await
        .map_err(|_| BenchError::Setup("the linker waited 30 s for the server".into()))?;
        match read {
            Ok(true) => decode_body(&buf).map_err(|e| setup("a server frame", e)),
            Ok(false) => Err(BenchError::Setup("the linker's stream ended".into())),
            Err(e) => Err(setup("reading a server frame", e)),
        }
    }

    /// Closes the linking connection.
    pub fn close(self) {
        self.conn.close(0u32.into(), b"linked");
    }
}

fn unexpected(what: &str, reply: &Reply) -> BenchError {
    BenchError::Setup(format!("{what}: unexpected answer {reply:?}"))
}
