//! The floor under `sfc-bench file`: QUIC and TLS with exactly the server's and the client's
//! configurations (the same rustls suites, certificates, transport parameters, windows and
//! sockets) moving a file's bytes on one stream each way, with no SecureFastChat protocol,
//! no sealing and no disk. The client uploads BYTES on one stream (timed until the server says
//! it has them all), then downloads BYTES on one stream (timed until FIN), on one connection,
//! from a 64 KiB buffer reused throughout, so neither side ever holds the file.
//!
//! ```text
//! cargo run --release --example file_floor -- server 127.0.0.1:4433 certs
//! cargo run --release --example file_floor -- client 127.0.0.1:4433 certs/ca.crt 104857600
//! ```
//!
//! The client prints one JSON line: `{"bytes":…,"upload_mb_s":…,"download_mb_s":…}` (MB =
//! 10^6 bytes). `sfc-bench file --floor` runs it next to our own figures.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

mod common;

use common::{Error, client_endpoints, listen};

/// Bytes written or read per call: the file chunk size of PROTOCOL.md E15.
const PIECE: usize = 65_536;

fn usage() -> Error {
    "usage: file_floor server ADDR CERT_DIR | client ADDR CA_FILE BYTES".into()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    match common::args().as_slice() {
        ["server", addr, dir] => serve(addr.parse()?, Path::new(dir)).await,
        ["client", addr, ca, bytes] => {
            let bytes: u64 = bytes.parse()?;
            let (up, down) = transfer(addr.parse()?, Path::new(ca), bytes).await?;
            let mb_s = |secs: f64| bytes as f64 / 1e6 / secs;
            println!(
                "{{\"bytes\":{bytes},\"upload_mb_s\":{:.1},\"download_mb_s\":{:.1}}}",
                mb_s(up),
                mb_s(down)
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
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let mut request = [0u8; 9];
                if recv.read_exact(&mut request).await.is_err() {
                    return;
                }
                let mut size = [0u8; 8];
                size.copy_from_slice(&request[1..]);
                let size = u64::from_be_bytes(size);
                let done = if request[0] == b'u' {
                    drain(&mut recv, size).await
                } else {
                    fill(&mut send, size).await
                };
                if done.is_err() {
                    return;
                }
                let _ = send.write_all(b"ok").await;
                let _ = send.finish();
            }
        });
    }
    Ok(())
}

/// Reads exactly `size` bytes into one reused buffer.
async fn drain(recv: &mut quinn::RecvStream, size: u64) -> Result<(), Error> {
    let mut buf = vec![0u8; PIECE];
    let mut left = size;
    while left > 0 {
        let want = usize::try_from(left.min(PIECE as u64))?;
        match recv.read(&mut buf[..want]).await? {
            Some(n) => left -= n as u64,
            None => return Err("the stream ended early".into()),
        }
    }
    Ok(())
}

/// Writes `size` bytes from one reused buffer.
async fn fill(send: &mut quinn::SendStream, size: u64) -> Result<(), Error> {
    let buf = vec![0x5a_u8; PIECE];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(PIECE as u64))?;
        send.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Uploads then downloads `bytes` on one connection; the seconds each took.
async fn transfer(addr: SocketAddr, ca: &Path, bytes: u64) -> Result<(f64, f64), Error> {
    let endpoints = client_endpoints(addr, ca)?;
    let endpoint = endpoints.first().ok_or("no client endpoint")?;
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let mut request = [0u8; 9];
    request[1..].copy_from_slice(&bytes.to_be_bytes());

    let mut timed = async |direction: u8| -> Result<f64, Error> {
        let start = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        request[0] = direction;
        send.write_all(&request).await?;
        if direction == b'u' {
            fill(&mut send, bytes).await?;
        }
        send.finish()?;
        if direction == b'd' {
            drain(&mut recv, bytes).await?;
        }
        let mut ok = [0u8; 2];
        recv.read_exact(&mut ok).await?;
        let took = start.elapsed().as_secs_f64();
        // Read to the end, so the stream is closed on both sides before the next one opens
        // (the server allows one bidirectional stream at a time).
        recv.read_to_end(16).await?;
        Ok(took)
    };
    let up = timed(b'u').await?;
    let down = timed(b'd').await?;

    conn.close(0u32.into(), b"");
    endpoint.wait_idle().await;
    Ok((up, down))
}
