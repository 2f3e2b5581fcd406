//! QUIC endpoints: UDP sockets with explicit buffer sizes and transport parameters chosen for
//! many phone-like clients. The numbers are documented here and in `docs/PROTOCOL.md`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

/// Requested UDP send and receive buffer size. The kernel default (≈208 KB) drops packets under
/// load on the machines we measured; 4 MiB is `net.core.rmem_max` there (the kernel caps it).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A connection with no packets for this long is closed. Long enough for a phone that sleeps
/// between keep-alives, short enough that dead phones do not pile up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Clients send a keep-alive this often: below the ≈30 s UDP binding timeout of many NATs and
/// carrier-grade NATs, so a quiet phone stays reachable.
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Bidirectional streams a client may have open: exactly one, the control stream.
pub const MAX_CLIENT_BIDI_STREAMS: u32 = 1;

/// Message streams (unidirectional) a client may have open towards the server at once: 320
/// messages/s per connection over a 100 ms round trip, more than a person types or a phone's
/// outbox flushes; larger messages hit the connection window first. quinn keeps a map entry per
/// allowed stream for every connection, idle or not: 128 cost 5 KB more per idle connection
/// (`sfc-bench connections --clients 2000`: 46.7 KB → 41.5 KB each at 32).
pub const MAX_CLIENT_UNI_STREAMS: u32 = 32;

/// Message streams the server may have open towards a client at once (deliveries in flight),
/// once the client has asked for delivery (before that the server pushes nothing, and the
/// client allows none: see [`client_transport`]). A backlog drains at up to this many messages
/// per round trip plus the time the client takes to free a stream and grant a new one: with
/// 128 the server waited for stream credit while both cores had time to spare (one client
/// draining 300k messages: 180k msg/s, machine 80 % busy; 512: 222k msg/s, 85 %). quinn makes
/// a map entry for every stream the peer may open, ≈ 15 KB and ≈ 15 µs of CPU for 512 (1,024:
/// ≈ 75 KB, for little more), which is why a connection that never takes deliveries (a
/// handshake, a `resume` without delivery) does not pay for them.
pub const MAX_SERVER_UNI_STREAMS: u32 = 512;

/// Bytes a peer may have in flight on one stream: two largest control frames.
pub const STREAM_RECEIVE_WINDOW: u32 = 128 * 1024;

/// Bytes a peer may have in flight on the whole connection: what one phone can make the server
/// buffer, whatever it does.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes we keep unacknowledged towards a peer.
pub const SEND_WINDOW: u64 = 1024 * 1024;

/// Creates a UDP socket bound to `addr` with [`UDP_BUFFER_BYTES`] buffers.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Let a server bound to [::] also take IPv4 clients where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    // The kernel caps these at rmem_max/wmem_max; a smaller buffer is not an error.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn common_transport() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .datagram_receive_buffer_size(None);
    transport
}

/// Transport parameters of the server.
pub fn server_transport() -> TransportConfig {
    let mut transport = common_transport();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CLIENT_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CLIENT_UNI_STREAMS))
        // The client keeps the path alive; a server ping per connection would cost 100k
        // timers at scale for nothing.
        .keep_alive_interval(None);
    transport
}

/// Transport parameters of a client.
pub fn client_transport() -> TransportConfig {
    let mut transport = common_transport();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        // None until the client asks for delivery; `Client::request` then raises it to
        // MAX_SERVER_UNI_STREAMS (the MAX_STREAMS frame goes out before the request).
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
    transport
}

/// A server endpoint on `addr` (connection migration on, as phones change networks).
pub fn server_endpoint(addr: SocketAddr, crypto: QuicServerConfig) -> io::Result<Endpoint> {
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config
        .transport_config(Arc::new(server_transport()))
        .migration(true);
    let socket = bind_udp(addr)?;
    let sock = socket2::SockRef::from(&socket);
    tracing::info!(
        recv_buffer = sock.recv_buffer_size().unwrap_or(0),
        send_buffer = sock.send_buffer_size().unwrap_or(0),
        requested = UDP_BUFFER_BYTES,
        "UDP socket buffers (the kernel caps them at net.core.rmem_max/wmem_max)"
    );
    Endpoint::new(
        EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(TokioRuntime),
    )
}

/// A client endpoint on an ephemeral port of the same address family as `server`.
pub fn client_endpoint(server: SocketAddr, crypto: QuicClientConfig) -> io::Result<Endpoint> {
    let local: SocketAddr = if server.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = Endpoint::new(
        EndpointConfig::default(),
        None,
        bind_udp(local)?,
        Arc::new(TokioRuntime),
    )?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(client_transport()));
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
