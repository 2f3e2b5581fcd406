//! The server: binds the QUIC endpoint, admits connections, serves them, shuts down cleanly.
//!
//! `accept` stays tiny (admission control, then spawn); handshakes and everything after run in
//! the per-connection task of `connection`. Shutdown: stop accepting, tell every connection
//! (close code `shutdown`), wait for them within a grace period, flush the store.

pub mod accounts;
pub mod admission;
pub mod backoff;
mod blobs;
mod body_budget;
pub mod config;
mod connection;
mod delivery;
mod device_lists;
mod devices;
mod directory;
mod groups;
pub mod known_good;
mod links;
mod messaging;
pub mod metrics;
pub mod password;
mod requests;
pub mod router;
mod send_rate;
mod shards;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quinn::{Endpoint, Incoming, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use self::accounts::Accounts;
use self::admission::{Admission, PerAddress};
use self::backoff::AccountBackoff;
pub use self::config::{ConfigError, ConfigLayer, ServerConfig, TlsSource};
use self::password::{PasswordError, Passwords};
use self::router::Router;
use self::throttle::{InFlight, Throttle};
use crate::protocol::CloseCode;
use crate::protocol::Username;
use crate::store::{BlobQuota, FjallStore, SenderShare, Store, StoreError, StoreOptions};
use crate::tls::{self, ServerIdentity, TlsError};
use crate::transport::{self, EndpointSecret};

/// Unvalidated handshakes in flight above which new clients must first prove their address
/// with a QUIC Retry (one extra round trip), so spoofed floods cannot pin handshake state.
const RETRY_THRESHOLD: usize = 256;

/// How often expired sessions are swept from the store.
const SESSION_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// Why the server could not start or stop cleanly. Each message carries its cause, and none
/// is also a `source()` (see [`StoreError`]).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Certificates could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
    /// The endpoint secret in the data directory could not be read or made.
    #[error("endpoint secret {path}: {error}")]
    EndpointSecret {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The store failed to open or flush.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The password hasher could not start.
    #[error("password hasher: {0}")]
    Password(PasswordError),
    /// A startup task died.
    #[error("startup task failed: {0}")]
    Join(tokio::task::JoinError),
    /// The shard threads could not start.
    #[error("cannot start the shard threads: {0}")]
    Shards(std::io::Error),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

impl From<PasswordError> for ServerError {
    fn from(error: PasswordError) -> Self {
        Self::Password(error)
    }
}

impl From<tokio::task::JoinError> for ServerError {
    fn from(error: tokio::task::JoinError) -> Self {
        Self::Join(error)
    }
}

/// State shared by every connection.
pub(crate) struct Shared {
    pub(crate) accounts: Accounts,
    pub(crate) handshake_timeout: Duration,
    /// Time a connection has after `hello` to authenticate.
    pub(crate) login_timeout: Duration,
    pub(crate) failed_logins: Throttle,
    pub(crate) signups: Throttle,
    pub(crate) bundle_fetches: Throttle<Username>,
    pub(crate) username_checks: Throttle,
    pub(crate) password_work: InFlight,
    pub(crate) login_backoff: AccountBackoff,
    /// Addresses with a recent successful login: their password work goes first.
    pub(crate) known_good: known_good::KnownGood,
    pub(crate) router: Arc<Router>,
    pub(crate) limits: MessageLimits,
    pub(crate) send_rate: send_rate::SendRate,
    /// Bytes of message bodies waiting for the store.
    pub(crate) body_budget: body_budget::BodyBudget,
    /// How long a deleted account's name stays unavailable.
    pub(crate) name_hold: Duration,
    /// Device links in progress.
    pub(crate) links: links::Links,
    /// Blob files, limits and streams in flight.
    pub(crate) blobs: Arc<blobs::Blobs>,
    /// One lock per MLS group, ordering its traffic (`groups`).
    pub(crate) group_locks: groups::GroupLocks,
}

/// Limits on messages, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MessageLimits {
    pub(crate) max_message_bytes: u64,
    pub(crate) max_group_message_bytes: u64,
    pub(crate) max_groups_per_account: usize,
    pub(crate) message_ttl: Duration,
    pub(crate) sender_share: SenderShare,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    /// One endpoint per shard (one on the caller's runtime without shards).
    endpoints: Vec<Endpoint>,
    /// The shard threads; `None` when the server runs on the caller's runtime.
    shards: Option<shards::Shards>,
    shared: Arc<Shared>,
    per_address: PerAddress,
    store: Arc<dyn Store>,
    config: ServerConfig,
}

/// What admitting a connection needs, shared by the shards' accept loops.
struct Gate {
    shared: Arc<Shared>,
    per_address: PerAddress,
    max_connections: usize,
    active: Arc<AtomicUsize>,
    handshaking: Arc<AtomicUsize>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Server {
    /// Loads or makes certificates, opens the store and binds the endpoint.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        if let Some(addr) = config.metrics {
            metrics::install(addr)?;
            info!(%addr, "metrics on http://{addr}/metrics");
        }
        let identity = match &config.tls {
            TlsSource::Dev { dir } => {
                let dir = dir.clone();
                let (identity, generated) =
                    tokio::task::spawn_blocking(move || tls::ensure_dev_certificates(&dir))
                        .await??;
                let shown = match &config.tls {
                    TlsSource::Dev { dir } => dir.display().to_string(),
                    TlsSource::Files { .. } => String::new(),
                };
                if generated {
                    warn!(certs = %shown, "dev mode: generated a development CA and server certificate; clients must trust {shown}/{}", tls::CA_CERT_FILE);
                } else {
                    warn!(certs = %shown, "dev mode: using development certificates; pass --cert and --key in production");
                }
                identity
            }
            TlsSource::Files { cert, key } => {
                let (cert, key) = (cert.clone(), key.clone());
                tokio::task::spawn_blocking(move || ServerIdentity::load(&cert, &key)).await??
            }
        };
        let crypto = tls::server_crypto(identity)?;

        // The store first: it creates the data directory and locks it, so the endpoint secret
        // is read (or made) by the one server that owns the directory.
        let data_dir = config.data_dir.clone();
        let options = StoreOptions {
            durability: config.durability,
            max_pending: config.max_pending,
            hold: config.write_hold,
            sender_share: SenderShare {
                messages: config.max_pending_per_sender,
                bytes: config.max_pending_bytes_per_sender,
            },
            ..StoreOptions::default()
        };
        let store: Arc<dyn Store> = Arc::new(
            tokio::task::spawn_blocking(move || FjallStore::open_with(&data_dir, options))
                .await??,
        );
        let data_dir = config.data_dir.clone();
        let secret = tokio::task::spawn_blocking(move || EndpointSecret::load_or_create(&data_dir))
            .await?
            .map_err(|error| ServerError::EndpointSecret {
                path: config.data_dir.join(EndpointSecret::FILE),
                error,
            })?;
        let shard_count = config.shards;
        let shards = if shard_count == 0 {
            None
        } else {
            let started = tokio::task::spawn_blocking(move || shards::Shards::start(shard_count));
            Some(started.await?.map_err(ServerError::Shards)?)
        };
        let bind_error = |error| ServerError::Bind {
            addr: config.listen,
            error,
        };
        let endpoints = match &shards {
            None => vec![
                transport::server_endpoint_with(config.listen, crypto, &secret)
                    .map_err(bind_error)?,
            ],
            Some(shards) => {
                transport::server_endpoints_with(config.listen, crypto, &secret, &shards.handles())
                    .map_err(bind_error)?
            }
        };

        let blobs = Arc::new(blobs::Blobs::new(
            &config.data_dir,
            blobs::BlobLimits {
                max_blob_bytes: config.max_blob_bytes,
                quota: BlobQuota {
                    bytes: config.blob_quota_bytes,
                    count: blobs::MAX_BLOBS_PER_OWNER,
                },
                max_streams: config.max_blob_streams,
                upload_ttl: config.blob_upload_ttl,
                ttl: config.message_ttl,
                sweep_interval: config.blob_sweep_interval,
                stream_idle: config.blob_stream_idle,
            },
        ));
        // Not fatal: a full disk must not keep the server from starting (README). Uploads cut
        // their file back to `held` anyway, and the next start removes what is left over.
        if let Err(e) = blobs::reconcile(store.as_ref(), &blobs).await {
            warn!(error = %e, "cannot bring the blob files in step with the store; will retry at the next start");
        }

        let workers = config.password_workers;
        let passwords = tokio::task::spawn_blocking(move || Passwords::new(workers)).await??;
        let accounts = Accounts::new(Arc::clone(&store), passwords, config.session_ttl);
        let shared = Arc::new(Shared {
            accounts,
            handshake_timeout: config.handshake_timeout,
            login_timeout: config.login_timeout,
            failed_logins: Throttle::new(config.failed_logins_per_minute),
            signups: Throttle::new(config.signups_per_minute),
            bundle_fetches: Throttle::new(config.bundle_fetches_per_minute),
            username_checks: Throttle::new(config.username_checks_per_minute),
            password_work: InFlight::new(config.password_work_per_address),
            login_backoff: AccountBackoff::new(),
            known_good: known_good::KnownGood::default(),
            router: Arc::new(Router::default()),
            limits: MessageLimits {
                max_message_bytes: config.max_message_bytes,
                max_group_message_bytes: config.max_group_message_bytes,
                max_groups_per_account: config.max_groups_per_account,
                message_ttl: config.message_ttl,
                sender_share: SenderShare {
                    messages: config.max_pending_per_sender,
                    bytes: config.max_pending_bytes_per_sender,
                },
            },
            send_rate: send_rate::SendRate::new(config.sends_per_minute),
            body_budget: body_budget::BodyBudget::new(
                config.max_message_bytes.max(config.max_group_message_bytes),
            ),
            name_hold: config.name_hold,
            links: links::Links::new(config.link_ttl),
            blobs,
            group_locks: groups::GroupLocks::default(),
        });
        Ok(Self {
            endpoints,
            shards,
            shared,
            per_address: PerAddress::new(config.max_connections_per_address),
            store,
            config,
        })
    }

    /// The address the endpoint is bound to (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.endpoints.first() {
            Some(endpoint) => endpoint.local_addr(),
            None => Err(std::io::Error::other("the server has no endpoint")),
        }
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        info!(listen = %self.local_addr().map(|a| a.to_string()).unwrap_or_default(), data = %self.config.data_dir.display(), shards = self.config.shards, "serving");
        let tracker = TaskTracker::new();
        tracker.spawn(sweep(Arc::clone(&self.shared), shutdown.clone()));
        tracker.spawn(blobs::sweep_blobs(
            Arc::clone(&self.store),
            Arc::clone(&self.shared.blobs),
            shutdown.clone(),
        ));
        if self.config.metrics.is_some() {
            tracker.spawn(count_pending(Arc::clone(&self.store), shutdown.clone()));
        }
        let gate = Arc::new(Gate {
            shared: Arc::clone(&self.shared),
            per_address: self.per_address,
            max_connections: self.config.max_connections,
            active: Arc::new(AtomicUsize::new(0)),
            handshaking: Arc::new(AtomicUsize::new(0)),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        });

        // Each endpoint accepts on its own runtime, so its connections' tasks run there.
        let handles = self.shards.as_ref().map(shards::Shards::handles);
        let mut accepting = Vec::with_capacity(self.endpoints.len());
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            let accept = accept(endpoint.clone(), Arc::clone(&gate));
            accepting.push(match handles.as_ref().and_then(|h| h.get(index)) {
                Some(handle) => handle.spawn(accept),
                None => tokio::spawn(accept),
            });
        }
        for task in accepting {
            if let Err(e) = task.await {
                warn!(error = %e, "an accept loop failed");
            }
        }

        info!(
            connections = gate.active.load(Ordering::Relaxed),
            "shutting down"
        );
        tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!("connections still open after the grace period; closing them");
        }
        for endpoint in &self.endpoints {
            endpoint.close(
                VarInt::from_u32(CloseCode::Shutdown.code()),
                b"server shutting down",
            );
        }
        let idle = futures_util::future::join_all(self.endpoints.iter().map(Endpoint::wait_idle));
        let _ = tokio::time::timeout(Duration::from_secs(2), idle).await;
        tracker.wait().await;
        drop(self.endpoints);
        if let Some(shards) = self.shards {
            shards.stop().await;
        }
        self.store.close().await?;
        info!("store flushed; bye");
        Ok(())
    }
}

/// Admits the connections of one endpoint until the server shuts down or the endpoint closes.
async fn accept(endpoint: Endpoint, gate: Arc<Gate>) {
    loop {
        let incoming = tokio::select! {
            () = gate.shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        gate.admit(incoming);
    }
}

impl Gate {
    fn admit(&self, incoming: Incoming) {
        let (active, handshaking) = (&self.active, &self.handshaking);
        // Every refusal here costs one small packet (or none) and no TLS work, and none
        // touches a connection already admitted: a flood is turned away, it evicts nobody.
        let now_active = active.load(Ordering::Relaxed);
        if now_active >= self.max_connections {
            debug!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            metrics::connection_refused("max_connections");
            incoming.refuse();
            return;
        }
        let validated = incoming.remote_address_validated();
        // Counted are handshakes in flight, not connections: a server holding many idle
        // clients must not make every new one pay a Retry round trip.
        if !validated && handshaking.load(Ordering::Relaxed) >= RETRY_THRESHOLD {
            // Under load, make unvalidated clients prove their address first.
            metrics::connection_refused("retry");
            retry(incoming);
            return;
        }
        let address_slot = match self
            .per_address
            .admit(incoming.remote_address().ip(), validated)
        {
            Admission::Admit(slot) => slot,
            Admission::Validate => {
                retry(incoming);
                return;
            }
            Admission::Refuse => {
                debug!(remote = %incoming.remote_address(), "per-address connection limit reached; refusing");
                incoming.refuse();
                return;
            }
        };
        let slot = ConnectionSlot::take(active);
        let handshake = ConnectionSlot::take(handshaking);
        let (shared, shutdown) = (Arc::clone(&self.shared), self.shutdown.clone());
        // Boxed: an `Incoming` (the first packet and its headers) is large, and a task keeps room
        // for every value it was given for as long as it lives; idle connections live long.
        let incoming = Box::new(incoming);
        // Spawned from the accept loop, so on its shard's runtime.
        self.tracker.spawn(async move {
            let _slots = (slot, address_slot);
            let _open = metrics::connection_accepted();
            connection::serve(incoming, shared, shutdown, handshake).await;
        });
    }
}

/// Answers with a QUIC Retry (stateless: the server keeps nothing until the client comes back
/// with the token, from the address it claimed).
fn retry(incoming: Incoming) {
    if let Err(e) = incoming.retry() {
        e.into_incoming().ignore();
    }
}

/// Counts a connection (or its handshake) for as long as it is held.
pub(crate) struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(active))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Adds the messages already in the inboxes at start to the metrics (a scan, off the start's
/// path: with a million pending messages it takes a while, and serving need not wait).
async fn count_pending(store: Arc<dyn Store>, shutdown: CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        counted = store.count_pending_messages() => match counted {
            Ok(n) => metrics::inbox_counted_at_start(n),
            Err(e) => warn!(error = %e, "cannot count the pending messages for the metrics"),
        },
    }
}

/// Housekeeping: forget refilled throttle buckets every minute, purge expired sessions hourly.
async fn sweep(shared: Arc<Shared>, shutdown: CancellationToken) {
    // The first sweep comes a minute after the start, not at it: the expiry sweep reads every
    // pending message, which with a large backlog cost seconds of CPU at every start (when
    // nothing can have expired since the last run's sweep but the downtime) and held up a
    // stop that came meanwhile.
    let minute = Duration::from_secs(60);
    let mut minutes = tokio::time::interval_at(tokio::time::Instant::now() + minute, minute);
    let mut last_session_sweep: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = minutes.tick() => {}
        }
        let now = std::time::Instant::now();
        shared.failed_logins.prune(now);
        shared.signups.prune(now);
        shared.bundle_fetches.prune(now);
        shared.username_checks.prune(now);
        shared.login_backoff.prune(now);
        shared.known_good.prune(now);
        if last_session_sweep.is_some_and(|t| t.elapsed() < SESSION_SWEEP_INTERVAL) {
            continue;
        }
        last_session_sweep = Some(tokio::time::Instant::now());
        // A stop does not wait for a sweep: what it leaves is swept next time.
        let purged = tokio::select! {
            () = shutdown.cancelled() => return,
            purged = shared.accounts.purge_expired() => purged,
        };
        match purged {
            Ok(0) => {}
            Ok(n) => info!(sessions = n, "purged expired sessions"),
            Err(e) => warn!(error = %e, "session sweep failed"),
        }
        let store = shared.accounts.store();
        let expired = tokio::select! {
            () = shutdown.cancelled() => return,
            expired = store.purge_expired_messages(crate::unix_now()) => expired,
        };
        match expired {
            Ok(0) => {}
            Ok(n) => {
                metrics::messages_expired(n);
                info!(messages = n, "deleted expired undelivered messages");
            }
            Err(e) => warn!(error = %e, "message expiry sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held connection keeps its task's future for as long as it lives, idle or not, so the
    /// future must not carry what only the handshake needs. With the `Incoming` (384 bytes)
    /// passed by value this future took 2,400 bytes, and the spawned task 4,624: each async
    /// layer keeps its own slot for it.
    #[tokio::test]
    async fn a_connections_task_stays_small() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::new(
            "127.0.0.1:0".parse().expect("address"),
            dir.path().join("data"),
            TlsSource::Dev {
                dir: dir.path().join("certs"),
            },
        );
        // One endpoint, which the client is sure to reach.
        config.shards = 0;
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr().expect("address");
        let ca = dir.path().join("certs").join(tls::CA_CERT_FILE);
        let crypto = tls::client_crypto(tls::load_trust_anchors(&ca).expect("ca"), false);
        let client = transport::client_endpoint(addr, crypto.expect("crypto")).expect("endpoint");
        let connecting = client.connect(addr, "localhost").expect("connect");
        let incoming = server.endpoints[0].accept().await.expect("incoming");

        let active = Arc::new(AtomicUsize::new(0));
        let task = connection::serve(
            Box::new(incoming),
            Arc::clone(&server.shared),
            CancellationToken::new(),
            ConnectionSlot::take(&active),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "a connection's task takes {size} bytes");
        drop((task, connecting));
    }
}
