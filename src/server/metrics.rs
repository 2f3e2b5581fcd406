//! Prometheus metrics: every name and help string, and the small typed API the rest of the
//! server calls at the points it counts (`metrics::login(&result)`, ...).
//!
//! Nothing is recorded unless [`install`] ran (`--metrics ADDR`): the handles live in a cell
//! filled once, so a call without metrics is one check of an empty cell, and a call with them
//! an atomic add on a handle looked up at install time, not a registry lookup per message.
//! The exporter (metrics-exporter-prometheus, its HTTP listener only) answers `GET` on any
//! path of the admin address with the text format. One set per process: a second install
//! fails. The names and what they mean are listed in docs/ARCHITECTURE.md ("Operating it").

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use super::accounts::AccountError;

/// Connections being served (from the first packet until the connection's task ends).
pub const CONNECTIONS_OPEN: &str = "sfc_connections_open";
/// Connections admitted (a handshake started).
pub const CONNECTIONS_ACCEPTED: &str = "sfc_connections_accepted_total";
/// Connections refused before the handshake, by `reason`.
pub const CONNECTIONS_REFUSED: &str = "sfc_connections_refused_total";
/// Handshakes by `result` (`ok`: established with a control stream; `failed`: not).
pub const HANDSHAKES: &str = "sfc_handshakes_total";
/// Password logins by `result`.
pub const LOGINS: &str = "sfc_logins_total";
/// Signups by `result`.
pub const SIGNUPS: &str = "sfc_signups_total";
/// Requests refused by a rate limit, by `limit`.
pub const THROTTLE_REFUSALS: &str = "sfc_throttle_refusals_total";
/// Messages stored in an inbox (acknowledged to their sender).
pub const MESSAGES_SENT: &str = "sfc_messages_sent_total";
/// Messages pushed to a recipient's connection.
pub const MESSAGES_PUSHED: &str = "sfc_messages_pushed_total";
/// Messages acknowledged by their recipient (removed from the inbox).
pub const MESSAGES_DELIVERED: &str = "sfc_messages_delivered_total";
/// Messages deleted undelivered because their lifetime ended.
pub const MESSAGES_EXPIRED: &str = "sfc_messages_expired_total";
/// Messages taken back by their sender before delivery.
pub const MESSAGES_UNSENT: &str = "sfc_messages_unsent_total";
/// Messages waiting in all inboxes.
pub const INBOX_PENDING: &str = "sfc_inbox_pending_messages";
/// Operations folded into one group-commit batch.
pub const INBOX_BATCH_OPERATIONS: &str = "sfc_inbox_batch_operations";
/// Messages acknowledged by every recipient device before they were written: never written.
pub const INBOX_SKIPPED: &str = "sfc_inbox_skipped_writes_total";
/// Appends decided by their callers, without the inbox writer's thread (see
/// `store::inbox_writer::here`).
pub const INBOX_CALLER_APPENDS: &str = "sfc_inbox_caller_appends_total";
/// Packets one shard read for another (a client whose address changed), by result: `queued`
/// for the shard of their connection, or `dropped` because its queue was full (see
/// `transport::routing`).
pub const SHARD_FORWARDED: &str = "sfc_shard_forwarded_packets_total";
/// Duration of the inbox's syncs to disk.
pub const INBOX_SYNC_SECONDS: &str = "sfc_inbox_sync_seconds";
/// Blob uploads completed (the whole blob on disk and synced).
pub const BLOB_UPLOADS: &str = "sfc_blob_uploads_total";
/// Blob download streams sent to their end.
pub const BLOB_DOWNLOADS: &str = "sfc_blob_downloads_total";
/// Blobs deleted (fetched by every device, expired or abandoned).
pub const BLOBS_DELETED: &str = "sfc_blobs_deleted_total";
/// Bytes of blobs on disk (complete and partial), as of the last blob sweep.
pub const BLOB_BYTES: &str = "sfc_blob_bytes_stored";
/// Jobs waiting for a blocking pool (`pool="argon2"`: password hashes), by `pool`.
pub const BLOCKING_QUEUE: &str = "sfc_blocking_queue_depth";

/// Buckets of [`INBOX_BATCH_OPERATIONS`]: one operation up to the writer's batch limit.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Buckets of [`INBOX_SYNC_SECONDS`]: ≈ 100 µs on an idle SSD to a scheduler tick and beyond.
const SYNC_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The exporter could not be built or bound, or a recorder is already installed.
    #[error("metrics on {addr}: {message}")]
    Install {
        /// The admin address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// The handles, looked up once at install time.
struct Handles {
    connections_open: Gauge,
    connections_accepted: Counter,
    handshakes_ok: Counter,
    handshakes_failed: Counter,
    messages_sent: Counter,
    messages_pushed: Counter,
    messages_delivered: Counter,
    messages_expired: Counter,
    messages_unsent: Counter,
    inbox_pending: Gauge,
    inbox_batch_operations: Histogram,
    inbox_sync_seconds: Histogram,
    inbox_skipped: Counter,
    inbox_caller_appends: Counter,
    shard_forwarded: Counter,
    shard_dropped: Counter,
    blob_uploads: Counter,
    blob_downloads: Counter,
    blobs_deleted: Counter,
    blob_bytes: Gauge,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn handles() -> Option<&'static Handles> {
    HANDLES.get()
}

/// Starts the HTTP exporter on `addr` and records from now on. Call it inside the runtime,
/// before the server serves.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    let fail = |message: String| MetricsError::Install { addr, message };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(INBOX_BATCH_OPERATIONS.into()), BATCH_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(INBOX_SYNC_SECONDS.into()), SYNC_BUCKETS)
        })
        .map_err(|e| fail(e.to_string()))?
        .install()
        .map_err(|e| fail(e.to_string()))?;
    describe();
    let handles = Handles {
        connections_open: metrics::gauge!(CONNECTIONS_OPEN),
        connections_accepted: metrics::counter!(CONNECTIONS_ACCEPTED),
        handshakes_ok: metrics::counter!(HANDSHAKES, "result" => "ok"),
        handshakes_failed: metrics::counter!(HANDSHAKES, "result" => "failed"),
        messages_sent: metrics::counter!(MESSAGES_SENT),
        messages_pushed: metrics::counter!(MESSAGES_PUSHED),
        messages_delivered: metrics::counter!(MESSAGES_DELIVERED),
        messages_expired: metrics::counter!(MESSAGES_EXPIRED),
        messages_unsent: metrics::counter!(MESSAGES_UNSENT),
        inbox_pending: metrics::gauge!(INBOX_PENDING),
        inbox_batch_operations: metrics::histogram!(INBOX_BATCH_OPERATIONS),
        inbox_sync_seconds: metrics::histogram!(INBOX_SYNC_SECONDS),
        inbox_skipped: metrics::counter!(INBOX_SKIPPED),
        inbox_caller_appends: metrics::counter!(INBOX_CALLER_APPENDS),
        shard_forwarded: metrics::counter!(SHARD_FORWARDED, "result" => "queued"),
        shard_dropped: metrics::counter!(SHARD_FORWARDED, "result" => "dropped"),
        blob_uploads: metrics::counter!(BLOB_UPLOADS),
        blob_downloads: metrics::counter!(BLOB_DOWNLOADS),
        blobs_deleted: metrics::counter!(BLOBS_DELETED),
        blob_bytes: metrics::gauge!(BLOB_BYTES),
    };
    // Series that exist from the start read 0 instead of being absent until the first event.
    handles.handshakes_failed.increment(0);
    handles.shard_forwarded.increment(0);
    metrics::counter!(LOGINS, "result" => "ok").increment(0);
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => "max_connections").increment(0);
    HANDLES
        .set(handles)
        .map_err(|_| fail("metrics are already installed in this process".into()))
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Connections being served, handshaking or established"
    );
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        "Connections admitted to the handshake"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused before the handshake, by reason (max_connections, retry: asked to validate the address first)"
    );
    describe_counter!(
        HANDSHAKES,
        "Handshakes by result: ok (established with a control stream) or failed (failed, timed out or no control stream)"
    );
    describe_counter!(
        LOGINS,
        "Password logins by result: ok, invalid_credentials, busy or error"
    );
    describe_counter!(
        SIGNUPS,
        "Signups by result: ok, username_taken, refused (invalid name or password), busy or error"
    );
    describe_counter!(
        THROTTLE_REFUSALS,
        "Requests refused by a rate limit, by limit: signup, login, bundle_fetch, username_check or other"
    );
    describe_counter!(
        MESSAGES_SENT,
        "Messages stored in an inbox and acknowledged to their sender"
    );
    describe_counter!(
        MESSAGES_PUSHED,
        "Messages pushed to a recipient's connection (a message can be pushed again on a later connection)"
    );
    describe_counter!(
        MESSAGES_DELIVERED,
        "Messages acknowledged by their recipient and removed from the inbox"
    );
    describe_counter!(
        MESSAGES_EXPIRED,
        "Messages deleted undelivered at the end of their lifetime"
    );
    describe_counter!(
        MESSAGES_UNSENT,
        "Messages taken back by their sender before delivery"
    );
    describe_gauge!(
        INBOX_PENDING,
        "Messages waiting in all inboxes (counted at start, then kept up to date)"
    );
    describe_histogram!(
        INBOX_BATCH_OPERATIONS,
        "Operations (appends, removals) folded into one group-commit batch"
    );
    describe_counter!(
        INBOX_SKIPPED,
        "Messages every recipient device acknowledged while they were held: never written"
    );
    describe_counter!(
        INBOX_CALLER_APPENDS,
        "Appends of online messages decided by their callers, without the inbox writer's thread"
    );
    describe_counter!(
        SHARD_FORWARDED,
        "Packets a shard read for another shard's connection (a client whose address changed), by result: queued for that shard, or dropped (its queue full)"
    );
    describe_histogram!(
        INBOX_SYNC_SECONDS,
        Unit::Seconds,
        "Duration of the inbox's syncs to disk (one per group of batches)"
    );
    describe_counter!(
        BLOB_UPLOADS,
        "Blob uploads completed (the whole blob on disk and synced)"
    );
    describe_counter!(BLOB_DOWNLOADS, "Blob download streams sent to their end");
    describe_counter!(
        BLOBS_DELETED,
        "Blobs deleted: fetched by every device they were for, expired, or abandoned incomplete"
    );
    describe_gauge!(
        BLOB_BYTES,
        Unit::Bytes,
        "Bytes of blobs held on disk, complete and partial, as of the last blob sweep"
    );
    describe_gauge!(
        BLOCKING_QUEUE,
        "Jobs waiting for a blocking pool, by pool (argon2: password hashes; store: database calls)"
    );
}

/// Keeps [`CONNECTIONS_OPEN`] up by one while it lives.
#[must_use = "the connection counts as open while this is held"]
pub(crate) struct OpenConnection(());

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(h) = handles() {
            h.connections_open.decrement(1.0);
        }
    }
}

/// A connection was admitted to its handshake; it counts as open while the result is held.
pub(crate) fn connection_accepted() -> OpenConnection {
    if let Some(h) = handles() {
        h.connections_accepted.increment(1);
        h.connections_open.increment(1.0);
    }
    OpenConnection(())
}

/// A connection was refused before its handshake (`reason`: a short snake_case word).
pub(crate) fn connection_refused(reason: &'static str) {
    if handles().is_some() {
        metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    }
}

/// A handshake ended: established (with its control stream) or not.
pub(crate) fn handshake(established: bool) {
    if let Some(h) = handles() {
        match established {
            true => h.handshakes_ok.increment(1),
            false => h.handshakes_failed.increment(1),
        }
    }
}

/// A password login's outcome.
pub(crate) fn login<T>(result: &Result<T, AccountError>) {
    if handles().is_some() {
        let result = match result {
            Ok(_) => "ok",
            Err(AccountError::InvalidCredentials) => "invalid_credentials",
            Err(AccountError::Busy) => "busy",
            Err(_) => "error",
        };
        metrics::counter!(LOGINS, "result" => result).increment(1);
    }
}

/// A signup's outcome.
pub(crate) fn signup<T>(result: &Result<T, AccountError>) {
    if handles().is_some() {
        let result = match result {
            Ok(_) => "ok",
            Err(AccountError::UsernameTaken) => "username_taken",
            Err(AccountError::InvalidUsername(_) | AccountError::WeakPassword) => "refused",
            Err(AccountError::Busy) => "busy",
            Err(_) => "error",
        };
        metrics::counter!(SIGNUPS, "result" => result).increment(1);
    }
}

/// A request was refused by a rate limit; `what` is the phrase the client is told ("failed
/// logins from your address"), mapped to a short label so the series stay few.
pub(crate) fn throttled(what: &str) {
    if handles().is_some() {
        let limit = if what.contains("signup") {
            "signup"
        } else if what.contains("login") {
            "login"
        } else if what.contains("bundle") {
            "bundle_fetch"
        } else if what.contains("username") {
            "username_check"
        } else {
            "other"
        };
        metrics::counter!(THROTTLE_REFUSALS, "limit" => limit).increment(1);
    }
}

/// A message was stored in its recipient's inbox.
pub(crate) fn message_sent() {
    if let Some(h) = handles() {
        h.messages_sent.increment(1);
        h.inbox_pending.increment(1.0);
    }
}

/// A message was pushed to its recipient's connection.
pub(crate) fn message_pushed() {
    if let Some(h) = handles() {
        h.messages_pushed.increment(1);
    }
}

/// `n` messages were acknowledged by their recipient and removed.
pub(crate) fn messages_delivered(n: u64) {
    if let Some(h) = handles() {
        h.messages_delivered.increment(n);
        h.inbox_pending.decrement(n as f64);
    }
}

/// `n` messages expired undelivered and were deleted.
pub(crate) fn messages_expired(n: u64) {
    if let Some(h) = handles() {
        h.messages_expired.increment(n);
        h.inbox_pending.decrement(n as f64);
    }
}

/// `n` messages (0 or 1) were taken back by their sender; returns `n`.
pub(crate) fn messages_unsent(n: u64) -> u64 {
    if let Some(h) = handles() {
        h.messages_unsent.increment(n);
        h.inbox_pending.decrement(n as f64);
    }
    n
}

/// The messages found in the inboxes at start (counted while the server already serves: the
/// changes made meanwhile were counted already, so they are added, not set).
pub(crate) fn inbox_counted_at_start(n: u64) {
    if let Some(h) = handles() {
        h.inbox_pending.increment(n as f64);
    }
}

/// `n` held messages were acknowledged by all their recipient devices: never written.
pub(crate) fn inbox_skipped(n: usize) {
    if n > 0
        && let Some(h) = handles()
    {
        h.inbox_skipped.increment(n as u64);
    }
}

/// An append was decided by its caller (see `store::inbox_writer::here`).
pub(crate) fn inbox_caller_append() {
    if let Some(h) = handles() {
        h.inbox_caller_appends.increment(1);
    }
}

/// A shard read a packet of another shard's connection, and queued it for that shard or (its
/// queue full) dropped it.
pub(crate) fn shard_forwarded(queued: bool) {
    if let Some(h) = handles() {
        match queued {
            true => h.shard_forwarded.increment(1),
            false => h.shard_dropped.increment(1),
        }
    }
}

/// A group-commit batch of `operations` was built.
pub(crate) fn inbox_batch(operations: usize) {
    if let Some(h) = handles() {
        h.inbox_batch_operations.record(operations as f64);
    }
}

/// The inbox synced to disk in `took`.
pub(crate) fn inbox_sync(took: Duration) {
    if let Some(h) = handles() {
        h.inbox_sync_seconds.record(took.as_secs_f64());
    }
}

/// A blob upload completed.
pub(crate) fn blob_uploaded() {
    if let Some(h) = handles() {
        h.blob_uploads.increment(1);
    }
}

/// A blob download stream was sent to its end.
pub(crate) fn blob_downloaded() {
    if let Some(h) = handles() {
        h.blob_downloads.increment(1);
    }
}

/// A blob was deleted.
pub(crate) fn blob_deleted() {
    if let Some(h) = handles() {
        h.blobs_deleted.increment(1);
    }
}

/// The blob sweep found `bytes` held on disk.
pub(crate) fn blob_bytes_stored(bytes: u64) {
    if let Some(h) = handles() {
        h.blob_bytes.set(bytes as f64);
    }
}

/// A job waits for the blocking pool `pool` while the result is held (dropped with the
/// waiting future too, so a cancelled wait does not stay counted).
pub(crate) fn queued(pool: &'static str) -> QueuedJob {
    let gauge = handles().map(|_| metrics::gauge!(BLOCKING_QUEUE, "pool" => pool));
    if let Some(gauge) = &gauge {
        gauge.increment(1.0);
    }
    QueuedJob(gauge)
}

/// Counts a job in [`BLOCKING_QUEUE`] while it lives.
#[must_use = "the job counts as waiting while this is held"]
pub(crate) struct QueuedJob(Option<Gauge>);

impl Drop for QueuedJob {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.decrement(1.0);
        }
    }
}
