//! What the load generator's QUIC connections put on the wire during a relay load: quinn's own
//! counters (UDP datagrams, send calls, frames by type), summed over the connections from the
//! start of the load until the receivers have everything, per delivered copy. The server's
//! side of every one of these connections is the other end of the same datagrams, so this is
//! the whole relay's traffic, split by what it carries.

use quinn::{Connection, ConnectionStats, FrameStats};
use serde::Serialize;

/// Frames of some types, per delivered copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FramesPerMessage {
    /// STREAM frames (message streams, deliveries, control frames).
    pub stream: f64,
    /// ACK frames.
    pub ack: f64,
    /// MAX_STREAMS frames (stream credit).
    pub max_streams: f64,
    /// MAX_DATA and MAX_STREAM_DATA frames (flow-control credit).
    pub max_data: f64,
    /// ACK_FREQUENCY and IMMEDIATE_ACK frames (draft-ietf-quic-ack-frequency).
    pub ack_frequency: f64,
    /// PING frames.
    pub ping: f64,
    /// Every other frame type.
    pub other: f64,
}

/// One direction's traffic, per delivered copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Direction {
    /// UDP datagrams (QUIC packets coalesce into one datagram; a GSO batch counts each).
    pub datagrams: f64,
    /// Send or receive system calls that carried them (a `sendmsg` with GSO, or a `recvmmsg`,
    /// carries several).
    pub calls: f64,
    /// Bytes of UDP payload.
    pub bytes: f64,
    /// The frames they carried.
    pub frames: FramesPerMessage,
}

/// The relay's traffic seen from the load generator, per delivered copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PacketCounts {
    /// From the senders' connections to the server (messages, acknowledgements of `sent`).
    pub senders_out: Direction,
    /// From the server to the senders (`sent` events, stream credit, ACKs).
    pub senders_in: Direction,
    /// From the receivers' connections to the server (their `ack`s, ACKs, stream credit).
    pub receivers_out: Direction,
    /// From the server to the receivers (deliveries, ACKs).
    pub receivers_in: Direction,
    /// All UDP datagrams of the relay, both ways, per delivered copy.
    pub datagrams_per_message: f64,
    /// The smallest and the largest path MTU (UDP payload bytes) quinn had found for the load
    /// generator's connections at the end of the load (it starts at 1,200 and probes upwards).
    pub mtu: (u16, u16),
}

impl PacketCounts {
    /// One line for people.
    pub fn to_text(&self) -> String {
        let row = |name: &str, d: &Direction| {
            format!(
                "  {name}: {:.2} datagrams ({:.2} calls, {:.0} B): stream {:.2}, ack {:.2}, \
                 max_streams {:.2}, max_data {:.2}, ack_frequency {:.2}, ping {:.2}, other {:.2}\n",
                d.datagrams,
                d.calls,
                d.bytes,
                d.frames.stream,
                d.frames.ack,
                d.frames.max_streams,
                d.frames.max_data,
                d.frames.ack_frequency,
                d.frames.ping,
                d.frames.other,
            )
        };
        let mut text = format!(
            "UDP datagrams per message (quinn's counters of the load generator's connections): \
             {:.2}; path MTU {}–{} B\n",
            self.datagrams_per_message, self.mtu.0, self.mtu.1
        );
        text.push_str(&row("senders → server", &self.senders_out));
        text.push_str(&row("server → senders", &self.senders_in));
        text.push_str(&row("receivers → server", &self.receivers_out));
        text.push_str(&row("server → receivers", &self.receivers_in));
        text
    }
}

/// Counters of a set of connections, summed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    senders: Sum,
    receivers: Sum,
    mtu: Option<(u16, u16)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sum {
    tx: Side,
    rx: Side,
}

#[derive(Debug, Clone, Copy, Default)]
struct Side {
    datagrams: u64,
    calls: u64,
    bytes: u64,
    stream: u64,
    ack: u64,
    max_streams: u64,
    max_data: u64,
    ack_frequency: u64,
    ping: u64,
    all: u64,
}

impl Side {
    fn of(udp: &quinn::UdpStats, frames: &FrameStats) -> Self {
        let f = frames;
        let all = f.acks
            + f.ack_frequency
            + f.crypto
            + f.connection_close
            + f.data_blocked
            + f.datagram
            + u64::from(f.handshake_done)
            + f.immediate_ack
            + f.max_data
            + f.max_stream_data
            + f.max_streams_bidi
            + f.max_streams_uni
            + f.new_connection_id
            + f.new_token
            + f.path_challenge
            + f.path_response
            + f.ping
            + f.reset_stream
            + f.retire_connection_id
            + f.stream_data_blocked
            + f.streams_blocked_bidi
            + f.streams_blocked_uni
            + f.stop_sending
            + f.stream;
        Self {
            datagrams: udp.datagrams,
            calls: udp.ios,
            bytes: udp.bytes,
            stream: f.stream,
            ack: f.acks,
            max_streams: f.max_streams_bidi + f.max_streams_uni,
            max_data: f.max_data + f.max_stream_data,
            ack_frequency: f.ack_frequency + f.immediate_ack,
            ping: f.ping,
            all,
        }
    }

    fn add(&mut self, o: &Self) {
        self.datagrams += o.datagrams;
        self.calls += o.calls;
        self.bytes += o.bytes;
        self.stream += o.stream;
        self.ack += o.ack;
        self.max_streams += o.max_streams;
        self.max_data += o.max_data;
        self.ack_frequency += o.ack_frequency;
        self.ping += o.ping;
        self.all += o.all;
    }

    fn per(&self, before: &Self, n: f64) -> Direction {
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / n;
        let stream = d(self.stream, before.stream);
        let ack = d(self.ack, before.ack);
        let max_streams = d(self.max_streams, before.max_streams);
        let max_data = d(self.max_data, before.max_data);
        let ack_frequency = d(self.ack_frequency, before.ack_frequency);
        let ping = d(self.ping, before.ping);
        let all = d(self.all, before.all);
        Direction {
            datagrams: d(self.datagrams, before.datagrams),
            calls: d(self.calls, before.calls),
            bytes: d(self.bytes, before.bytes),
            frames: FramesPerMessage {
                stream,
                ack,
                max_streams,
                max_data,
                ack_frequency,
                ping,
                other: (all - stream - ack - max_streams - max_data - ack_frequency - ping)
                    .max(0.0),
            },
        }
    }
}

impl Sum {
    fn add(&mut self, stats: &ConnectionStats) {
        self.tx.add(&Side::of(&stats.udp_tx, &stats.frame_tx));
        self.rx.add(&Side::of(&stats.udp_rx, &stats.frame_rx));
    }
}

impl Snapshot {
    /// The counters of the senders' and the receivers' connections now.
    pub fn take(senders: &[Connection], receivers: &[Connection]) -> Self {
        let mut snapshot = Self::default();
        for conn in senders {
            let stats = conn.stats();
            snapshot.senders.add(&stats);
            snapshot.note_mtu(stats.path.current_mtu);
        }
        for conn in receivers {
            let stats = conn.stats();
            snapshot.receivers.add(&stats);
            snapshot.note_mtu(stats.path.current_mtu);
        }
        snapshot
    }

    fn note_mtu(&mut self, mtu: u16) {
        let (lo, hi) = self.mtu.unwrap_or((mtu, mtu));
        self.mtu = Some((lo.min(mtu), hi.max(mtu)));
    }

    /// What went over the wire since `before`, per one of `copies` delivered copies (`None`
    /// when none were).
    pub fn since(&self, before: &Self, copies: u64) -> Option<PacketCounts> {
        if copies == 0 {
            return None;
        }
        let n = copies as f64;
        let senders_out = self.senders.tx.per(&before.senders.tx, n);
        let senders_in = self.senders.rx.per(&before.senders.rx, n);
        let receivers_out = self.receivers.tx.per(&before.receivers.tx, n);
        let receivers_in = self.receivers.rx.per(&before.receivers.rx, n);
        let datagrams_per_message = senders_out.datagrams
            + senders_in.datagrams
            + receivers_out.datagrams
            + receivers_in.datagrams;
        Some(PacketCounts {
            senders_out,
            senders_in,
            receivers_out,
            receivers_in,
            datagrams_per_message,
            mtu: self.mtu.unwrap_or_default(),
        })
    }
}
