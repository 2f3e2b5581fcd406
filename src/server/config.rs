//! Server configuration: defaults, a TOML file, `SFC_*` environment variables and flags, in
//! increasing order of precedence, resolved and validated into one [`ServerConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::{DEFAULT_HOLD, DEFAULT_MAX_PENDING, Durability};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default cap on the groups one account is in (docs/PROTOCOL.md 5.7).
pub const DEFAULT_MAX_GROUPS_PER_ACCOUNT: usize = 1_000;
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "data";
/// Default dev-certificate directory.
pub const DEFAULT_CERTS_DIR: &str = "certs";
/// Default cap on concurrent connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default cap on concurrent connections from one client address (IPv4) or /64 (IPv6). Far
/// above what one phone or one household needs, and enough for a few hundred users behind one
/// carrier-grade NAT address; low enough that one host holds 0.26 % of the default
/// `max_connections`, not all of it.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// Default time a connection has after `hello` to authenticate (`signup`, `login`, `resume`)
/// before it is closed with `login_timeout`: generous, because `sfc signup` asks for the new
/// password (twice) after it has connected and checked the name.
pub const DEFAULT_LOGIN_TIMEOUT_SECS: u64 = 60;
/// Default session lifetime: 30 days.
pub const DEFAULT_SESSION_TTL_SECS: u64 = 30 * 24 * 3600;
/// Default failed logins allowed per address per minute (and as a burst).
pub const DEFAULT_FAILED_LOGINS_PER_MINUTE: u32 = 30;
/// Default signups allowed per address per minute (and as a burst).
pub const DEFAULT_SIGNUPS_PER_MINUTE: u32 = 20;
/// Default key bundle fetches per user per minute (and as a burst).
pub const DEFAULT_BUNDLE_FETCHES_PER_MINUTE: u32 = 60;
/// Default `check_username` requests per address per minute (and as a burst).
pub const DEFAULT_USERNAME_CHECKS_PER_MINUTE: u32 = 60;
/// Default logins and signups one address may have running or queued at once.
pub const DEFAULT_PASSWORD_WORK_PER_ADDRESS: usize = 2;
/// Default lifetime of an undelivered message: 7 days, as in the seed.
pub const DEFAULT_MESSAGE_TTL_SECS: u64 = 7 * 24 * 3600;
/// Default largest message body: the largest envelope (60 KiB), which is what receiving clients
/// accept; a larger body would be stored and then refused by its recipient.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = crate::e2e::MAX_ENVELOPE_LEN as u64;
/// Default largest group message body (docs/PROTOCOL.md 5.7): a commit with its welcome.
pub const DEFAULT_MAX_GROUP_MESSAGE_BYTES: u64 = 1 << 20;
/// Longest `write_hold_ms` accepted (a minute): the window holds messages in memory and
/// delays the `sent` of those not acknowledged in it; more than tens of milliseconds only
/// makes sense in tests.
pub const MAX_WRITE_HOLD_MS: u64 = 60_000;
/// Default pending messages one sender may hold in one inbox: a tenth of the default inbox,
/// so one account cannot fill someone's inbox and lock everyone else out.
pub const DEFAULT_MAX_PENDING_PER_SENDER: u64 = DEFAULT_MAX_PENDING / 10;
/// Default pending body bytes one sender may hold in one inbox: 32 MiB.
pub const DEFAULT_MAX_PENDING_BYTES_PER_SENDER: u64 = 32 * 1024 * 1024;
/// Default messages one account may send per minute (and as a burst).
pub const DEFAULT_SENDS_PER_MINUTE: u32 = 3000;
/// Default time a deleted account's name stays unavailable: 30 days.
pub const DEFAULT_NAME_HOLD_SECS: u64 = 30 * 24 * 3600;
/// How long an opened device link waits for its new device, by default: 5 minutes.
pub const DEFAULT_LINK_TTL_SECS: u64 = 300;
/// Default longest blob: the ciphertext of a 100 MiB file (docs/PROTOCOL.md E15: 104,857,600
/// bytes in 1,600 chunks of 64 KiB, each with a 16-byte tag).
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 100 * 1024 * 1024 + 16 * 1600;
/// Default bytes of blobs (complete and partial) one uploader may hold: 1 GiB.
pub const DEFAULT_BLOB_QUOTA_BYTES: u64 = 1024 * 1024 * 1024;
/// Default blob streams (uploads and downloads) in flight on the whole server.
pub const DEFAULT_MAX_BLOB_STREAMS: usize = 64;
/// Default time an incomplete blob is kept after its last write: a day.
pub const DEFAULT_BLOB_UPLOAD_TTL_SECS: u64 = 24 * 3600;
/// How often blobs are swept (deleted when expired, abandoned or fetched by every device).
pub const DEFAULT_BLOB_SWEEP_SECS: u64 = 300;
/// How long a blob stream may go without progress (no byte arriving on an upload, no byte
/// taken by the peer on a download) before the server gives up on it and frees its slot.
pub const DEFAULT_BLOB_STREAM_IDLE_SECS: u64 = 60;

/// Where the server's TLS identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Dev mode: load `server.crt`/`server.key` from this directory, generating them (and
    /// `ca.crt`) if missing.
    Dev {
        /// The directory.
        dir: PathBuf,
    },
    /// Real certificates.
    Files {
        /// PEM certificate chain.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
}

/// Fully resolved server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Database directory.
    pub data_dir: PathBuf,
    /// TLS identity.
    pub tls: TlsSource,
    /// Connections beyond this many are refused.
    pub max_connections: usize,
    /// Connections from one address (IPv6: one /64) beyond this many are refused (0 = no cap).
    pub max_connections_per_address: usize,
    /// Time a connection has after `hello` to authenticate before it is closed.
    pub login_timeout: Duration,
    /// How long a session token stays valid.
    pub session_ttl: Duration,
    /// argon2 hashes computed at once (each uses a core and 19 MiB).
    pub password_workers: usize,
    /// Threads that serve connections, each with its own runtime and QUIC endpoint on the one
    /// port (`server::shards`); 0 serves them on the caller's runtime with one endpoint.
    pub shards: usize,
    /// Time a client has to finish the handshake and open its control stream.
    pub handshake_timeout: Duration,
    /// Time connections get to finish at shutdown before they are cut.
    pub shutdown_grace: Duration,
    /// Failed logins per address per minute (0 = unlimited).
    pub failed_logins_per_minute: u32,
    /// Signups per address per minute (0 = unlimited).
    pub signups_per_minute: u32,
    /// Key bundle fetches per user per minute (0 = unlimited).
    pub bundle_fetches_per_minute: u32,
    /// `check_username` requests per address per minute (0 = unlimited).
    pub username_checks_per_minute: u32,
    /// Logins and signups one address (IPv6 /64) may have running or queued at once (0 = no cap).
    pub password_work_per_address: usize,
    /// Undelivered messages are deleted after this long.
    pub message_ttl: Duration,
    /// Largest message body accepted.
    pub max_message_bytes: u64,
    /// Largest group message body accepted (a commit with its welcome, 5.7).
    pub max_group_message_bytes: u64,
    /// Groups one account may be in (at least 1): a commit adding a device of an account
    /// already in this many other groups, or a `create_group` by it, gets `group_full`.
    pub max_groups_per_account: usize,
    /// Pending messages an inbox may hold.
    pub max_pending: u64,
    /// Whether message writes are synced before they are acknowledged.
    pub durability: Durability,
    /// How long a message waits in memory for its recipients' acknowledgements before it is
    /// written (one acknowledged by then is never written; zero writes every message at once).
    pub write_hold: Duration,
    /// TCP address of the Prometheus metrics endpoint, if any (see `server::metrics`).
    pub metrics: Option<SocketAddr>,
    /// Pending messages one sender may hold in one inbox (0 = up to `max_pending`).
    pub max_pending_per_sender: u64,
    /// Pending body bytes one sender may hold in one inbox (0 = unlimited).
    pub max_pending_bytes_per_sender: u64,
    /// Messages one account may send per minute, also as a burst (0 = unlimited).
    pub sends_per_minute: u32,
    /// How long the name of a deleted account cannot be signed up again.
    pub name_hold: Duration,
    /// How long an opened device link (its code) waits for the new device.
    pub link_ttl: Duration,
    /// Longest blob accepted (its ciphertext), in bytes.
    pub max_blob_bytes: u64,
    /// Bytes of blobs, complete and partial, one uploader may hold.
    pub blob_quota_bytes: u64,
    /// Blob streams (uploads and downloads) in flight on the whole server.
    pub max_blob_streams: usize,
    /// An incomplete blob is deleted this long after its last write.
    pub blob_upload_ttl: Duration,
    /// How often blobs are swept (not a setting of the file or the flags: tests shorten it).
    pub blob_sweep_interval: Duration,
    /// How long a blob stream may make no progress before it is dropped (not a setting of
    /// the file or the flags: tests shorten it).
    pub blob_stream_idle: Duration,
}

impl ServerConfig {
    /// Defaults for everything but the listen address and data directory: handy for tests.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, tls: TlsSource) -> Self {
        Self {
            listen,
            data_dir,
            tls,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            login_timeout: Duration::from_secs(DEFAULT_LOGIN_TIMEOUT_SECS),
            session_ttl: Duration::from_secs(DEFAULT_SESSION_TTL_SECS),
            password_workers: number_of_cores(),
            shards: number_of_cores(),
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            failed_logins_per_minute: DEFAULT_FAILED_LOGINS_PER_MINUTE,
            signups_per_minute: DEFAULT_SIGNUPS_PER_MINUTE,
            bundle_fetches_per_minute: DEFAULT_BUNDLE_FETCHES_PER_MINUTE,
            username_checks_per_minute: DEFAULT_USERNAME_CHECKS_PER_MINUTE,
            password_work_per_address: DEFAULT_PASSWORD_WORK_PER_ADDRESS,
            message_ttl: Duration::from_secs(DEFAULT_MESSAGE_TTL_SECS),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_group_message_bytes: DEFAULT_MAX_GROUP_MESSAGE_BYTES,
            max_groups_per_account: DEFAULT_MAX_GROUPS_PER_ACCOUNT,
            max_pending: DEFAULT_MAX_PENDING,
            durability: Durability::Sync,
            write_hold: DEFAULT_HOLD,
            metrics: None,
            max_pending_per_sender: DEFAULT_MAX_PENDING_PER_SENDER,
            max_pending_bytes_per_sender: DEFAULT_MAX_PENDING_BYTES_PER_SENDER,
            sends_per_minute: DEFAULT_SENDS_PER_MINUTE,
            name_hold: Duration::from_secs(DEFAULT_NAME_HOLD_SECS),
            link_ttl: Duration::from_secs(DEFAULT_LINK_TTL_SECS),
            max_blob_bytes: DEFAULT_MAX_BLOB_BYTES,
            blob_quota_bytes: DEFAULT_BLOB_QUOTA_BYTES,
            max_blob_streams: DEFAULT_MAX_BLOB_STREAMS,
            blob_upload_ttl: Duration::from_secs(DEFAULT_BLOB_UPLOAD_TTL_SECS),
            blob_sweep_interval: Duration::from_secs(DEFAULT_BLOB_SWEEP_SECS),
            blob_stream_idle: Duration::from_secs(DEFAULT_BLOB_STREAM_IDLE_SECS),
        }
    }
}

pub use crate::transport::MAX_SHARDS;

/// The number of cores: the default of `password_workers` and of `shards`.
fn number_of_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// One layer of optional settings: the TOML file, or flags and environment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// UDP listen address.
    pub listen: Option<String>,
    /// Data directory.
    pub data: Option<PathBuf>,
    /// Dev-certificate directory.
    pub certs: Option<PathBuf>,
    /// PEM certificate chain (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key (with `cert`).
    pub key: Option<PathBuf>,
    /// Connection cap.
    pub max_connections: Option<usize>,
    /// Connection cap per client address or IPv6 /64 (0 = no cap).
    pub max_connections_per_address: Option<usize>,
    /// Seconds a connection has after `hello` to authenticate.
    pub login_timeout_secs: Option<u64>,
    /// Session lifetime in seconds.
    pub session_ttl_secs: Option<u64>,
    /// Concurrent argon2 hashes.
    pub password_workers: Option<usize>,
    /// Threads that serve connections (0: one multi-threaded runtime).
    pub shards: Option<usize>,
    /// Failed logins per address per minute (0 = unlimited).
    pub failed_logins_per_minute: Option<u32>,
    /// Signups per address per minute (0 = unlimited).
    pub signups_per_minute: Option<u32>,
    /// Key bundle fetches per user per minute (0 = unlimited).
    pub bundle_fetches_per_minute: Option<u32>,
    /// `check_username` requests per address per minute (0 = unlimited).
    pub username_checks_per_minute: Option<u32>,
    /// Logins and signups in flight per address (0 = no cap).
    pub password_work_per_address: Option<usize>,
    /// Lifetime of undelivered messages in seconds.
    pub message_ttl_secs: Option<u64>,
    /// Largest message body in bytes.
    pub max_message_bytes: Option<u64>,
    /// Largest group message body in bytes.
    pub max_group_message_bytes: Option<u64>,
    /// Groups one account may be in (at least 1).
    pub max_groups_per_account: Option<usize>,
    /// Pending messages per inbox.
    pub max_pending: Option<u64>,
    /// `sync` or `buffered`.
    pub durability: Option<Durability>,
    /// Milliseconds a message waits for its acknowledgements before it is written (0 to 60000).
    pub write_hold_ms: Option<u64>,
    /// Prometheus metrics address (`IP:PORT`, TCP).
    pub metrics: Option<String>,
    /// Pending messages one sender may hold in one inbox (0 = up to `max_pending`).
    pub max_pending_per_sender: Option<u64>,
    /// Pending body bytes one sender may hold in one inbox (0 = unlimited).
    pub max_pending_bytes_per_sender: Option<u64>,
    /// Messages one account may send per minute (0 = unlimited).
    pub sends_per_minute: Option<u32>,
    /// Seconds a deleted account's name stays unavailable.
    pub name_hold_secs: Option<u64>,
    /// Seconds an opened device link waits for its new device (1 to 3600).
    pub link_ttl_secs: Option<u64>,
    /// Longest blob in bytes (its ciphertext).
    pub max_blob_bytes: Option<u64>,
    /// Bytes of blobs one uploader may hold, complete and partial.
    pub blob_quota_bytes: Option<u64>,
    /// Blob streams in flight on the whole server.
    pub max_blob_streams: Option<usize>,
    /// Seconds an incomplete blob is kept after its last write.
    pub blob_upload_ttl_secs: Option<u64>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error (in the message, not a `source()`).
        error: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigLayer {
    /// Reads a TOML config file; unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// This layer with `lower`'s values wherever this one has none.
    pub fn over(self, lower: ConfigLayer) -> ConfigLayer {
        ConfigLayer {
            listen: self.listen.or(lower.listen),
            data: self.data.or(lower.data),
            certs: self.certs.or(lower.certs),
            cert: self.cert.or(lower.cert),
            key: self.key.or(lower.key),
            max_connections: self.max_connections.or(lower.max_connections),
            max_connections_per_address: self
                .max_connections_per_address
                .or(lower.max_connections_per_address),
            login_timeout_secs: self.login_timeout_secs.or(lower.login_timeout_secs),
            session_ttl_secs: self.session_ttl_secs.or(lower.session_ttl_secs),
            password_workers: self.password_workers.or(lower.password_workers),
            shards: self.shards.or(lower.shards),
            failed_logins_per_minute: self
                .failed_logins_per_minute
                .or(lower.failed_logins_per_minute),
            signups_per_minute: self.signups_per_minute.or(lower.signups_per_minute),
            bundle_fetches_per_minute: self
                .bundle_fetches_per_minute
                .or(lower.bundle_fetches_per_minute),
            username_checks_per_minute: self
                .username_checks_per_minute
                .or(lower.username_checks_per_minute),
            password_work_per_address: self
                .password_work_per_address
                .or(lower.password_work_per_address),
            message_ttl_secs: self.message_ttl_secs.or(lower.message_ttl_secs),
            max_message_bytes: self.max_message_bytes.or(lower.max_message_bytes),
            max_group_message_bytes: self
                .max_group_message_bytes
                .or(lower.max_group_message_bytes),
            max_groups_per_account: self.max_groups_per_account.or(lower.max_groups_per_account),
            max_pending: self.max_pending.or(lower.max_pending),
            durability: self.durability.or(lower.durability),
            write_hold_ms: self.write_hold_ms.or(lower.write_hold_ms),
            metrics: self.metrics.or(lower.metrics),
            max_pending_per_sender: self.max_pending_per_sender.or(lower.max_pending_per_sender),
            max_pending_bytes_per_sender: self
                .max_pending_bytes_per_sender
                .or(lower.max_pending_bytes_per_sender),
            sends_per_minute: self.sends_per_minute.or(lower.sends_per_minute),
            name_hold_secs: self.name_hold_secs.or(lower.name_hold_secs),
            link_ttl_secs: self.link_ttl_secs.or(lower.link_ttl_secs),
            max_blob_bytes: self.max_blob_bytes.or(lower.max_blob_bytes),
            blob_quota_bytes: self.blob_quota_bytes.or(lower.blob_quota_bytes),
            max_blob_streams: self.max_blob_streams.or(lower.max_blob_streams),
            blob_upload_ttl_secs: self.blob_upload_ttl_secs.or(lower.blob_upload_ttl_secs),
        }
    }

    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let listen_raw = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_raw.parse().map_err(|_| {
            ConfigError::Invalid(format!("listen address {listen_raw:?} is not IP:PORT"))
        })?;
        let tls = match (self.cert, self.key) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::Dev {
                dir: self.certs.unwrap_or_else(|| DEFAULT_CERTS_DIR.into()),
            },
            _ => return Err(ConfigError::Invalid("`cert` and `key` go together".into())),
        };
        let mut config = ServerConfig::new(
            listen,
            self.data.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            tls,
        );
        if let Some(max) = self.max_connections {
            if max == 0 {
                return Err(ConfigError::Invalid(
                    "max_connections must be at least 1".into(),
                ));
            }
            config.max_connections = max;
        }
        if let Some(max) = self.max_connections_per_address {
            config.max_connections_per_address = max;
        }
        if let Some(secs) = self.login_timeout_secs {
            if !(1..=3600).contains(&secs) {
                return Err(ConfigError::Invalid(
                    "login_timeout_secs must be 1 to 3600".into(),
                ));
            }
            config.login_timeout = Duration::from_secs(secs);
        }
        if let Some(secs) = self.session_ttl_secs {
            if secs == 0 {
                return Err(ConfigError::Invalid(
                    "session_ttl_secs must be at least 1".into(),
                ));
            }
            config.session_ttl = Duration::from_secs(secs);
        }
        if let Some(workers) = self.password_workers {
            if !(1..=256).contains(&workers) {
                return Err(ConfigError::Invalid(
                    "password_workers must be 1 to 256".into(),
                ));
            }
            config.password_workers = workers;
        }
        if let Some(shards) = self.shards {
            if shards > MAX_SHARDS {
                return Err(ConfigError::Invalid(format!(
                    "shards must be 0 to {MAX_SHARDS}"
                )));
            }
            config.shards = shards;
        }
        if let Some(n) = self.failed_logins_per_minute {
            config.failed_logins_per_minute = n;
        }
        if let Some(n) = self.signups_per_minute {
            config.signups_per_minute = n;
        }
        if let Some(n) = self.bundle_fetches_per_minute {
            config.bundle_fetches_per_minute = n;
        }
        if let Some(n) = self.username_checks_per_minute {
            config.username_checks_per_minute = n;
        }
        if let Some(n) = self.password_work_per_address {
            config.password_work_per_address = n;
        }
        if let Some(secs) = self.message_ttl_secs {
            if secs == 0 {
                return Err(ConfigError::Invalid(
                    "message_ttl_secs must be at least 1".into(),
                ));
            }
            config.message_ttl = Duration::from_secs(secs);
        }
        if let Some(bytes) = self.max_message_bytes {
            if !(1..=16 * 1024 * 1024).contains(&bytes) {
                return Err(ConfigError::Invalid(
                    "max_message_bytes must be 1 to 16 MiB".into(),
                ));
            }
            config.max_message_bytes = bytes;
        }
        if let Some(bytes) = self.max_group_message_bytes {
            if !(61_440..=16 * 1024 * 1024).contains(&bytes) {
                return Err(ConfigError::Invalid(
                    "max_group_message_bytes must be 61,440 bytes to 16 MiB".into(),
                ));
            }
            config.max_group_message_bytes = bytes;
        }
        if let Some(n) = self.max_groups_per_account {
            if n == 0 {
                return Err(ConfigError::Invalid(
                    "max_groups_per_account must be at least 1".into(),
                ));
            }
            config.max_groups_per_account = n;
        }
        if let Some(n) = self.max_pending {
            if n == 0 {
                return Err(ConfigError::Invalid(
                    "max_pending must be at least 1".into(),
                ));
            }
            config.max_pending = n;
        }
        if let Some(durability) = self.durability {
            config.durability = durability;
        }
        if let Some(ms) = self.write_hold_ms {
            if ms > MAX_WRITE_HOLD_MS {
                return Err(ConfigError::Invalid(format!(
                    "write_hold_ms must be at most {MAX_WRITE_HOLD_MS}"
                )));
            }
            config.write_hold = Duration::from_millis(ms);
        }
        if let Some(raw) = self.metrics {
            let addr = raw.parse().map_err(|_| {
                ConfigError::Invalid(format!("metrics address {raw:?} is not IP:PORT"))
            })?;
            config.metrics = Some(addr);
        }
        if let Some(n) = self.max_pending_per_sender {
            config.max_pending_per_sender = n;
        }
        if let Some(n) = self.max_pending_bytes_per_sender {
            config.max_pending_bytes_per_sender = n;
        }
        if let Some(n) = self.sends_per_minute {
            config.sends_per_minute = n;
        }
        if let Some(secs) = self.name_hold_secs {
            config.name_hold = Duration::from_secs(secs);
        }
        if let Some(secs) = self.link_ttl_secs {
            if !(1..=3600).contains(&secs) {
                return Err(ConfigError::Invalid(format!(
                    "link_ttl_secs must be 1 to 3600, not {secs}"
                )));
            }
            config.link_ttl = Duration::from_secs(secs);
        }
        if let Some(bytes) = self.max_blob_bytes {
            if bytes == 0 {
                return Err(ConfigError::Invalid(
                    "max_blob_bytes must be at least 1".into(),
                ));
            }
            config.max_blob_bytes = bytes;
        }
        if let Some(bytes) = self.blob_quota_bytes {
            config.blob_quota_bytes = bytes;
        }
        if let Some(n) = self.max_blob_streams {
            if n == 0 {
                return Err(ConfigError::Invalid(
                    "max_blob_streams must be at least 1".into(),
                ));
            }
            config.max_blob_streams = n;
        }
        if let Some(secs) = self.blob_upload_ttl_secs {
            if secs == 0 {
                return Err(ConfigError::Invalid(
                    "blob_upload_ttl_secs must be at least 1".into(),
                ));
            }
            config.blob_upload_ttl = Duration::from_secs(secs);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file: ConfigLayer = toml::from_str(
            "listen = \"127.0.0.1:9000\"\ndata = \"/var/lib/sfc\"\nsession_ttl_secs = 60\n",
        )
        .unwrap();
        let flags = ConfigLayer {
            listen: Some("127.0.0.1:9001".into()),
            ..Default::default()
        };
        let config = flags.over(file).resolve().unwrap();
        assert_eq!(config.listen.port(), 9001);
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/sfc"));
        assert_eq!(config.session_ttl, Duration::from_secs(60));
        assert_eq!(
            config.tls,
            TlsSource::Dev {
                dir: "certs".into()
            }
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(toml::from_str::<ConfigLayer>("listne = \"x\"").is_err());
        let bad = ConfigLayer {
            listen: Some("localhost".into()),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
        let half = ConfigLayer {
            cert: Some("a.crt".into()),
            ..Default::default()
        };
        assert!(half.resolve().is_err());
        let zero = ConfigLayer {
            max_connections: Some(0),
            ..Default::default()
        };
        assert!(zero.resolve().is_err());
        let no_streams = ConfigLayer {
            max_blob_streams: Some(0),
            ..Default::default()
        };
        assert!(no_streams.resolve().is_err());
        let too_many_shards = ConfigLayer {
            shards: Some(MAX_SHARDS + 1),
            ..Default::default()
        };
        assert!(too_many_shards.resolve().is_err());
    }

    #[test]
    fn shards_default_to_the_cores_and_zero_is_one_runtime() {
        let defaults = ConfigLayer::default().resolve().unwrap();
        assert_eq!(defaults.shards, number_of_cores());
        let file: ConfigLayer = toml::from_str("shards = 0\n").unwrap();
        assert_eq!(file.resolve().unwrap().shards, 0);
    }

    #[test]
    fn blob_settings_come_from_the_file_with_defaults_for_the_rest() {
        let defaults = ConfigLayer::default().resolve().unwrap();
        assert_eq!(defaults.max_blob_bytes, 104_883_200);
        assert_eq!(defaults.blob_quota_bytes, 1 << 30);
        assert_eq!(defaults.max_blob_streams, 64);
        assert_eq!(defaults.blob_upload_ttl, Duration::from_secs(86_400));
        let file: ConfigLayer = toml::from_str(
            "max_blob_bytes = 1000\nblob_quota_bytes = 5000\nmax_blob_streams = 2\n\
             blob_upload_ttl_secs = 60\n",
        )
        .unwrap();
        let config = file.resolve().unwrap();
        assert_eq!(config.max_blob_bytes, 1000);
        assert_eq!(config.blob_quota_bytes, 5000);
        assert_eq!(config.max_blob_streams, 2);
        assert_eq!(config.blob_upload_ttl, Duration::from_secs(60));
    }
}
