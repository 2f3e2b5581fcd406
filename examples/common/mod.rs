//! What the floor examples (`quic_floor`, `relay_floor`) share: the allocator of the server and
//! of `sfc-bench`, the command line, the server endpoint and the client endpoints, all with
//! SecureFastChat's exact TLS and transport configurations.

use std::net::SocketAddr;
use std::path::Path;

use quinn::Endpoint;
use securefastchat::tls::{self, ServerIdentity, client_crypto, server_crypto};
use securefastchat::transport::{client_endpoint, server_endpoint};

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Client endpoints (UDP sockets) the connections share, as `sfc-bench` shares them by
/// default (`--client-sockets 4`).
pub const ENDPOINTS: usize = 4;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The command line after the program's name, as string slices to match on (each argument
/// is kept for the life of the program, which reads them once).
pub fn args() -> Vec<&'static str> {
    std::env::args()
        .skip(1)
        .map(|arg| &*Box::leak(arg.into_boxed_str()))
        .collect()
}

/// A server endpoint on `addr` with the certificate and key in `dir`; says `listening on ADDR`
/// on stderr (scripts wait for it).
pub fn listen(addr: SocketAddr, dir: &Path) -> Result<Endpoint, Error> {
    let identity = ServerIdentity::load(
        &dir.join(tls::SERVER_CERT_FILE),
        &dir.join(tls::SERVER_KEY_FILE),
    )?;
    let endpoint = server_endpoint(addr, server_crypto(identity)?)?;
    eprintln!("listening on {}", endpoint.local_addr()?);
    Ok(endpoint)
}

/// [`ENDPOINTS`] client endpoints towards `server` that trust the CA in `ca`, TLS resumption
/// off (every connection makes a full handshake).
pub fn client_endpoints(server: SocketAddr, ca: &Path) -> Result<Vec<Endpoint>, Error> {
    let anchors = tls::load_trust_anchors(ca)?;
    let mut endpoints = Vec::with_capacity(ENDPOINTS);
    for _ in 0..ENDPOINTS {
        endpoints.push(client_endpoint(
            server,
            client_crypto(anchors.clone(), false)?,
        )?);
    }
    Ok(endpoints)
}
