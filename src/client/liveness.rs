//! Noticing a server that stopped answering (crashed, unplugged, its network gone) within
//! seconds, while a request or a message waits for its answer, instead of after the request
//! timeout or QUIC's idle timeout.
//!
//! A live server acknowledges every packet that asks for it within a round trip plus its ack
//! delay (25 ms), however long it then takes to answer, and quinn keeps probing for as long
//! as something it sent is unacknowledged (its probe timeout, doubling). So the watcher does
//! not measure how long an answer takes (a slow server is the request timeout's business): it
//! measures how long the server has acknowledged nothing while we kept sending, from quinn's
//! counters. Past [`dead_after`] the connection is declared lost: every waiter fails with
//! the reason, and the connection is closed, which also ends the deliveries.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::{Connection, ConnectionStats, FrameStats, VarInt};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{ClientError, Pending, PendingSends};
use crate::protocol::CloseCode;

/// Never declare a server dead sooner than this: a phone's link can stall for a second or two
/// (a handover, a weak cell) and come back.
pub const DEAD_SERVER_FLOOR: Duration = Duration::from_secs(3);

/// On a slow path, wait this many round trips of silence: quinn's probes back off, doubling
/// from about one round trip, so this leaves it about four unanswered probes.
pub const DEAD_SERVER_ROUND_TRIPS: u32 = 12;

/// How often the counters are read while someone waits (and only then).
const TICK: Duration = Duration::from_millis(200);

/// How long the server may acknowledge nothing we send before it is declared gone, given the
/// path's smoothed round-trip time.
pub fn dead_after(rtt: Duration) -> Duration {
    DEAD_SERVER_FLOOR.max(rtt.saturating_mul(DEAD_SERVER_ROUND_TRIPS))
}

/// What the watcher shares with the client.
pub(super) struct Watched {
    pub(super) conn: Connection,
    pub(super) pending: Pending,
    pub(super) sends: PendingSends,
    /// Woken when a request or a send starts waiting.
    pub(super) wake: Arc<Notify>,
    /// Why the watcher gave the connection up, for every later error on it.
    pub(super) verdict: Arc<OnceLock<String>>,
}

impl Watched {
    fn has_waiters(&self) -> bool {
        let requests = self.pending.lock().is_ok_and(|p| !p.is_empty());
        requests || self.sends.lock().is_ok_and(|s| !s.is_empty())
    }

    /// Fails every waiter with `reason` and closes the connection.
    fn give_up(&self, reason: String) {
        tracing::warn!(remote = %self.conn.remote_address(), "{reason}");
        let _ = self.verdict.set(reason.clone());
        let requests: Vec<_> = match self.pending.lock() {
            Ok(mut p) => p.drain().map(|(_, w)| w).collect(),
            Err(_) => Vec::new(),
        };
        for waiter in requests {
            let _ = waiter.send(Err(ClientError::ConnectionLost(reason.clone())));
        }
        let sends: Vec<_> = match self.sends.lock() {
            Ok(mut s) => s.drain().map(|(_, w)| w).collect(),
            Err(_) => Vec::new(),
        };
        for waiter in sends {
            let _ = waiter.send(Err(ClientError::ConnectionLost(reason.clone())));
        }
        self.conn.close(
            VarInt::from_u32(CloseCode::Normal.code()),
            b"server not answering",
        );
    }
}

/// Watches the connection until it closes; ticks only while someone waits.
pub(super) async fn watch(watched: Watched) {
    loop {
        while !watched.has_waiters() {
            tokio::select! {
                () = watched.wake.notified() => {}
                _ = watched.conn.closed() => return,
            }
        }
        let mut silence = Silence::new(&watched.conn.stats());
        while watched.has_waiters() {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                _ = watched.conn.closed() => return,
            }
            let now = Instant::now();
            let Some(silent) = silence.update(&watched.conn.stats(), now) else {
                continue;
            };
            if silent >= dead_after(watched.conn.rtt()) {
                watched.give_up(format!(
                    "the server stopped answering (nothing acknowledged for {:.1} s)",
                    silent.as_secs_f64()
                ));
                return;
            }
        }
    }
}

/// Since when we have been sending without the server acknowledging anything.
#[derive(Debug)]
struct Silence {
    acks_received: u64,
    eliciting_sent: u64,
    since: Option<Instant>,
}

impl Silence {
    fn new(stats: &ConnectionStats) -> Self {
        Self {
            acks_received: stats.frame_rx.acks,
            eliciting_sent: ack_eliciting(&stats.frame_tx),
            since: None,
        }
    }

    /// Takes new counters read at `now`; returns how long the server has been silent, if it
    /// owes us an acknowledgement. An ack and a send seen in the same tick count as answered
    /// (the order is unknown): if the send was not acknowledged, quinn's next probe shows it.
    fn update(&mut self, stats: &ConnectionStats, now: Instant) -> Option<Duration> {
        let acks = stats.frame_rx.acks;
        let sent = ack_eliciting(&stats.frame_tx);
        if acks != self.acks_received {
            self.since = None;
        } else if sent != self.eliciting_sent && self.since.is_none() {
            self.since = Some(now);
        }
        self.acks_received = acks;
        self.eliciting_sent = sent;
        self.since.map(|since| now.saturating_duration_since(since))
    }
}

/// Frames sent that the peer must acknowledge: all but ACK, PADDING (not counted) and
/// CONNECTION_CLOSE.
fn ack_eliciting(frames: &FrameStats) -> u64 {
    [
        frames.stream,
        frames.ping,
        frames.crypto,
        frames.max_data,
        frames.max_stream_data,
        frames.max_streams_bidi,
        frames.max_streams_uni,
        frames.data_blocked,
        frames.stream_data_blocked,
        frames.streams_blocked_bidi,
        frames.streams_blocked_uni,
        frames.reset_stream,
        frames.stop_sending,
        frames.new_connection_id,
        frames.retire_connection_id,
        frames.path_challenge,
        frames.path_response,
        frames.new_token,
        frames.datagram,
        frames.ack_frequency,
        frames.immediate_ack,
        u64::from(frames.handshake_done),
    ]
    .iter()
    .fold(0u64, |sum, n| sum.wrapping_add(*n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_has_a_floor_and_grows_with_the_round_trip() {
        assert_eq!(dead_after(Duration::from_millis(1)), DEAD_SERVER_FLOOR);
        assert_eq!(
            dead_after(Duration::from_millis(500)),
            Duration::from_secs(6)
        );
    }

    #[test]
    fn silence_counts_from_an_unacknowledged_send() {
        let mut stats = ConnectionStats::default();
        let start = Instant::now();
        let mut silence = Silence::new(&stats);
        // Nothing sent: nothing owed, however long.
        assert_eq!(silence.update(&stats, start + Duration::from_secs(9)), None);
        // A send, then nothing back.
        stats.frame_tx.stream += 1;
        let sent_at = start + Duration::from_secs(10);
        assert_eq!(silence.update(&stats, sent_at), Some(Duration::ZERO));
        stats.frame_tx.ping += 1;
        assert_eq!(
            silence.update(&stats, sent_at + Duration::from_secs(2)),
            Some(Duration::from_secs(2))
        );
        // An acknowledgement ends it; acks we send do not start it.
        stats.frame_rx.acks += 1;
        stats.frame_tx.acks += 1;
        assert_eq!(
            silence.update(&stats, sent_at + Duration::from_secs(3)),
            None
        );
        assert_eq!(
            silence.update(&stats, sent_at + Duration::from_secs(9)),
            None
        );
    }
}
