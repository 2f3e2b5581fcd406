//! SecureFastChat: a secure messaging server that mobile-style clients reach over QUIC.
//!
//! # Layout
//!
//! - [`protocol`]: wire types and the frame codec; no sockets, no storage (fuzzable).
//! - [`tls`]: certificates (PEM loading, rcgen dev certificates) and the rustls configurations.
//! - [`transport`]: quinn endpoints, UDP socket sizing and transport parameters for phones.
//! - [`blocking`]: the bounded pool that keeps fjall and argon2 off the async runtime.
//! - [`store`]: the narrow [`store::Store`] trait and its fjall implementation.
//! - [`server`]: configuration, accept loop, connections, requests, accounts, key directory,
//!   message streams, group-commit delivery, router, throttles.
//! - [`client`]: the client library behind `sfc`: connect (and notice a server that is gone),
//!   accounts, messages, the end-to-end messenger (keep before show before ack, kept sessions,
//!   trust decisions, quarantine and retry requests, reconnecting), the keystore in the home
//!   directory, inert rendering of others' text, the terminal chat.
//! - [`bench`](mod@bench): the load generator behind `sfc-bench` (scenarios, HDR latency, server stats).
//! - [`e2e`]: end-to-end encryption (identities, prekeys, X3DH, Double Ratchet, envelopes); no I/O.
//!
//! The binaries in `src/bin/` only parse arguments and call into these modules.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![warn(missing_docs)]

pub mod bench;
pub mod blocking;
pub mod client;
pub mod e2e;
pub mod protocol;
pub mod server;
pub mod store;
pub mod tls;
pub mod transport;

/// Seconds since the Unix epoch, as the protocol and the store count time.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
