//! The floor under `sfc-bench handshake`: QUIC and TLS with exactly the server's and the
//! client's configurations (the same rustls suites, certificates, transport parameters and
//! sockets), and no SecureFastChat protocol on top. The server accepts a connection, answers a
//! 2-byte request on a bidirectional stream (the size of the round trip `hello` makes) and waits
//! for the client to close; the client opens connections in loops over 4 shared endpoints, as
//! `sfc-bench handshake` does, with TLS resumption off.
//!
//! ```text
//! cargo run --release --example quic_floor -- server 127.0.0.1:4433 certs
//! cargo run --release --example quic_floor -- client 127.0.0.1:4433 certs/ca.crt 5 16
//! ```
//!
//! `scripts/quic-floor.sh` runs both against `sfc-server` + `sfc-bench handshake` and reports
//! each side's CPU per handshake.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{ENDPOINTS, Error, client_endpoints, listen};

fn usage() -> Error {
    "usage: quic_floor server ADDR CERT_DIR | client ADDR CA_FILE SECONDS LOOPS".into()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    match common::args().as_slice() {
        ["server", addr, dir] => serve(addr.parse()?, Path::new(dir)).await,
        ["client", addr, ca, secs, loops] => {
            let (done, took) = connect_loops(
                addr.parse()?,
                Path::new(ca),
                Duration::from_secs(secs.parse()?),
                loops.parse()?,
            )
            .await?;
            println!(
                "{done} handshakes in {:.2} s = {:.0}/s",
                took.as_secs_f64(),
                done as f64 / took.as_secs_f64()
            );
            Ok(())
        }
        _ => Err(usage()),
    }
}

async fn serve(addr: SocketAddr, dir: &Path) -> Result<(), Error> {
    let endpoint = listen(addr, dir)?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let mut request = [0u8; 2];
                if recv.read_exact(&mut request).await.is_ok() {
                    let _ = send.write_all(b"ok").await;
                    let _ = send.finish();
                }
            }
            conn.closed().await;
        });
    }
    Ok(())
}

async fn connect_loops(
    addr: SocketAddr,
    ca: &Path,
    duration: Duration,
    loops: usize,
) -> Result<(u64, Duration), Error> {
    let endpoints = client_endpoints(addr, ca)?;
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..loops {
        let (endpoint, done) = (endpoints[i % ENDPOINTS].clone(), Arc::clone(&done));
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let conn = endpoint.connect(addr, "localhost")?.await?;
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(b"hi").await?;
                let mut reply = [0u8; 2];
                recv.read_exact(&mut reply).await?;
                done.fetch_add(1, Ordering::Relaxed);
                conn.close(0u32.into(), b"");
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let took = start.elapsed();
    for endpoint in endpoints {
        endpoint.wait_idle().await;
    }
    Ok((done.load(Ordering::Relaxed), took))
}
