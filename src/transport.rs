//! QUIC endpoints: UDP sockets with explicit buffer sizes and transport parameters chosen for
//! many phone-like clients. The numbers are documented here and in `docs/PROTOCOL.md`.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    AckFrequencyConfig, Endpoint, EndpointConfig, IdleTimeout, Runtime, TokioRuntime,
    TransportConfig, VarInt,
};
use quinn_proto::HashedConnectionIdGenerator;
use ring::hmac;
use socket2::{Domain, Protocol, Socket, Type};
use zeroize::Zeroizing;

mod routing;

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

/// Bytes a peer may have in flight on one stream: as much as on the whole connection, so one
/// file upload or download can use all of it. A stream moves at most its window per round
/// trip: 128 KiB capped a file at 1.3 MB/s over a 100 ms phone link, 1 MiB allows 10 MB/s.
/// What a peer can make the server buffer is unchanged: the connection window bounds every
/// stream together (messages are at most 60 KiB, control frames 64 KiB).
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes a peer may have in flight on the whole connection: what one phone can make the server
/// buffer, whatever it does.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Ack-eliciting packets a peer may receive from us before it must acknowledge them (the QUIC
/// ACK frequency extension, draft-ietf-quic-ack-frequency, which both our ends speak; a peer
/// that does not is not asked). Without it a peer acknowledges every second packet, so at
/// full speed a quarter of all datagrams were bare ACKs: with 8, 100 pairs relayed 6–21 %
/// more per round at 5–18 % less server CPU per message, in 1.42 datagrams per message
/// instead of 1.81 (docs/BENCHMARKS.md, "ACK frequency"). A gap in packet numbers is still
/// acknowledged at once (quinn's reordering threshold 2, one below the loss threshold), so
/// losses are detected as before; a lone packet is acknowledged within the peer's
/// `max_ack_delay` (25 ms), as without the extension.
pub const ACK_ELICITING_THRESHOLD: u32 = 8;

/// Most endpoints that share a port (`server_endpoints_with`, the server's shards): a
/// connection ID names its endpoint in one byte.
pub const MAX_SHARDS: usize = 256;

/// Bytes we keep unacknowledged towards a peer.
pub const SEND_WINDOW: u64 = 1024 * 1024;

/// Creates a UDP socket bound to `addr` with [`UDP_BUFFER_BYTES`] buffers.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    bind_udp_with(addr, false)
}

/// [`bind_udp`], with `SO_REUSEPORT` when `shared` (several sockets of this process on one port).
fn bind_udp_with(addr: SocketAddr, shared: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Let a server bound to [::] also take IPv4 clients where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    // The kernel caps these at rmem_max/wmem_max; a smaller buffer is not an error.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// What the kernel offers a UDP socket for batching, as quinn-udp finds it (it probes the same
/// when the socket becomes an endpoint): GSO (`UDP_SEGMENT`, one `sendmsg` carries up to
/// `gso_segments` datagrams of one connection) and GRO (`UDP_GRO`, one received buffer holds up
/// to `gro_segments` datagrams of one flow). 1 means the offload is not available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpOffloads {
    /// Most datagrams quinn hands the kernel in one send call (GSO); 1 without GSO.
    pub gso_segments: usize,
    /// Datagrams quinn makes room for in one received buffer (GRO); 1 without GRO.
    pub gro_segments: usize,
}

/// Probes `socket` as quinn-udp does (it sets the same options quinn sets anyway).
pub fn udp_offloads(socket: &UdpSocket) -> io::Result<UdpOffloads> {
    let state = quinn::udp::UdpSocketState::new(socket.into())?;
    Ok(UdpOffloads {
        gso_segments: state.max_gso_segments(),
        gro_segments: state.gro_segments(),
    })
}

fn common_transport() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        // No datagrams either way: none are received (the transport parameter is not sent,
        // so a peer may send none) and none are queued to send.
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0);
    let mut ack_frequency = AckFrequencyConfig::default();
    ack_frequency.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    transport.ack_frequency_config(Some(ack_frequency));
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

/// Least time between two stateless resets the server sends (quinn's default is 20 ms, 50 a
/// second): after a restart every client still holding a connection needs one, and a reset
/// costs one HMAC and is smaller than the packet that caused it, so it amplifies nothing.
pub const MIN_RESET_INTERVAL: Duration = Duration::from_millis(1);

/// The server's endpoint secret: 32 random bytes made once and kept in the data directory
/// ([`EndpointSecret::FILE`], mode 0600). Its stateless-reset key and the key of its
/// connection ids derive from it, so a server restarted on the same data recognises the
/// connection ids it handed out before and answers a packet of a connection it no longer
/// has with a stateless reset: the client's connection fails at once instead of waiting
/// for a timeout. (With quinn's defaults both keys are random per start, and the restarted
/// server drops such packets silently.)
pub struct EndpointSecret(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for EndpointSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndpointSecret(..)")
    }
}

impl EndpointSecret {
    /// The file in the data directory.
    pub const FILE: &str = "endpoint.secret";

    /// Reads the secret from `dir`, creating it first if there is none (atomically: a new file
    /// of mode 0600 is written, synced and linked into place only if the name is still free).
    /// Blocking file I/O.
    pub fn load_or_create(dir: &Path) -> io::Result<Self> {
        let path = dir.join(Self::FILE);
        match Self::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            read => return read,
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut secret[..])?;
        // tempfile creates the file with mode 0600.
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        file.write_all(&secret[..])?;
        file.as_file().sync_all()?;
        match file.persist_noclobber(&path) {
            Ok(_) => {
                std::fs::File::open(dir)?.sync_all()?;
                Ok(Self(secret))
            }
            // Another process made it in the meantime: use theirs.
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Self::read(&path),
            Err(e) => Err(e.error),
        }
    }

    fn read(path: &Path) -> io::Result<Self> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(33));
        std::fs::File::open(path)?
            .take(33)
            .read_to_end(&mut bytes)?;
        let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not 32 bytes (delete it: a new one is made, and connections from before the \
                 restart then time out instead of being reset)",
            )
        })?;
        Ok(Self(Zeroizing::new(secret)))
    }

    /// The endpoint configuration with the keys derived from this secret.
    fn endpoint_config(&self) -> EndpointConfig {
        let (mut config, cid_key) = self.keys();
        config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
        config
    }

    /// [`Self::endpoint_config`] for the endpoint of `shard`, whose connection IDs name it.
    fn shard_endpoint_config(&self, shard: usize) -> EndpointConfig {
        let (mut config, cid_key) = self.keys();
        // `server_endpoints_with` makes at most `MAX_SHARDS` (256) shards.
        let shard = u8::try_from(shard).unwrap_or(u8::MAX);
        config.cid_generator(move || Box::new(routing::ShardCids::new(shard, cid_key)));
        config
    }

    /// The configuration with the stateless-reset key, and the connection-ID key.
    fn keys(&self) -> (EndpointConfig, u64) {
        let master = hmac::Key::new(hmac::HMAC_SHA256, &self.0[..]);
        let reset = hmac::sign(&master, b"sfc stateless reset key");
        let cid = hmac::sign(&master, b"sfc connection id key");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&cid.as_ref()[..8]);
        let mut config =
            EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
        config.min_reset_interval(MIN_RESET_INTERVAL);
        (config, u64::from_le_bytes(cid_key))
    }
}

/// A server endpoint on `addr` (connection migration on, as phones change networks), with
/// keys that change at every start (tests, examples).
pub fn server_endpoint(addr: SocketAddr, crypto: QuicServerConfig) -> io::Result<Endpoint> {
    bind_server(addr, crypto, EndpointConfig::default())
}

/// [`server_endpoint`] with the stateless-reset and connection-id keys of `secret`: what
/// `sfc-server` runs, so that clients of a previous run are reset at once.
pub fn server_endpoint_with(
    addr: SocketAddr,
    crypto: QuicServerConfig,
    secret: &EndpointSecret,
) -> io::Result<Endpoint> {
    bind_server(addr, crypto, secret.endpoint_config())
}

/// One server endpoint per runtime of `runtimes`, all on the port of `addr` (`SO_REUSEPORT`:
/// the kernel spreads clients over the sockets by address and port), each endpoint's task on
/// its runtime, with the keys of `secret`. Port 0 takes one free port for all of them.
///
/// Each endpoint issues connection IDs that name its shard, and reads through a
/// `routing::RoutedSocket`, so a client whose address changes (and whose packets the kernel
/// then gives another shard's socket) keeps its connection.
pub fn server_endpoints_with(
    addr: SocketAddr,
    crypto: QuicServerConfig,
    secret: &EndpointSecret,
    runtimes: &[tokio::runtime::Handle],
) -> io::Result<Vec<Endpoint>> {
    if runtimes.len() > MAX_SHARDS {
        return Err(io::Error::other(format!(
            "at most {} endpoints share a port",
            MAX_SHARDS
        )));
    }
    let config = server_quic_config(crypto);
    let exchange = routing::Exchange::new(runtimes.len());
    let mut endpoints = Vec::with_capacity(runtimes.len());
    // A port that anyone holds is an error, as with one endpoint, even if the holder shares it
    // (another sfc-server's shards): a socket without `SO_REUSEPORT` binds only to a free port.
    // It is closed before the shards bind; a server started in that instant could still join.
    let addr = bind_udp(addr)?.local_addr()?;
    for (shard, runtime) in runtimes.iter().enumerate() {
        let socket = bind_udp_with(addr, true)?;
        if shard == 0 {
            log_socket(&socket);
        }
        // The socket registers with, and the endpoint's task runs on, the shard's runtime.
        let _entered = runtime.enter();
        let socket = TokioRuntime.wrap_udp_socket(socket)?;
        let socket = routing::RoutedSocket::new(socket, shard, Arc::clone(&exchange));
        endpoints.push(Endpoint::new_with_abstract_socket(
            secret.shard_endpoint_config(shard),
            Some(config.clone()),
            Arc::new(socket),
            Arc::new(TokioRuntime),
        )?);
    }
    Ok(endpoints)
}

fn server_quic_config(crypto: QuicServerConfig) -> quinn::ServerConfig {
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config
        .transport_config(Arc::new(server_transport()))
        .migration(true);
    config
}

fn bind_server(
    addr: SocketAddr,
    crypto: QuicServerConfig,
    endpoint_config: EndpointConfig,
) -> io::Result<Endpoint> {
    let config = server_quic_config(crypto);
    let socket = bind_udp(addr)?;
    log_socket(&socket);
    Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(TokioRuntime),
    )
}

/// Logs the buffers and offloads the kernel gave a server socket.
fn log_socket(socket: &UdpSocket) {
    let sock = socket2::SockRef::from(&socket);
    tracing::info!(
        recv_buffer = sock.recv_buffer_size().unwrap_or(0),
        send_buffer = sock.send_buffer_size().unwrap_or(0),
        requested = UDP_BUFFER_BYTES,
        "UDP socket buffers (the kernel caps them at net.core.rmem_max/wmem_max)"
    );
    match udp_offloads(socket) {
        Ok(offloads) => tracing::info!(
            gso_segments = offloads.gso_segments,
            gro_segments = offloads.gro_segments,
            "UDP offloads (1: not available)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot probe the UDP offloads"),
    }
}

/// A client endpoint on an ephemeral port of the same address family as `server`.
pub fn client_endpoint(server: SocketAddr, crypto: QuicClientConfig) -> io::Result<Endpoint> {
    let local: SocketAddr = if server.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    client_endpoint_on(local, crypto)
}

/// A client endpoint bound to `local` (an address and port, 0 for any port): how a load
/// generator or a test appears as many clients, e.g. from 127.0.1.x (all of 127/8 is
/// loopback on Linux).
pub fn client_endpoint_on(local: SocketAddr, crypto: QuicClientConfig) -> io::Result<Endpoint> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_secret_is_made_once_privately() {
        let dir = tempfile::tempdir().unwrap();
        let first = EndpointSecret::load_or_create(dir.path()).unwrap();
        let again = EndpointSecret::load_or_create(dir.path()).unwrap();
        assert_eq!(*first.0, *again.0);
        let path = dir.path().join(EndpointSecret::FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Only the secret is left in the directory (no temp file).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn udp_offloads_are_probed_on_loopback() {
        let socket = bind_udp((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let offloads = udp_offloads(&socket).unwrap();
        // Linux has had both since 5.0; elsewhere quinn reports 1.
        assert!(offloads.gso_segments >= 1 && offloads.gro_segments >= 1);
        if cfg!(target_os = "linux") {
            eprintln!("{offloads:?}");
        }
    }

    #[test]
    fn a_damaged_endpoint_secret_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(EndpointSecret::FILE), [7u8; 33]).unwrap();
        let err = EndpointSecret::load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
