//! Packets to the shard that holds their connection.
//!
//! Every connection ID a shard's endpoint issues starts with the shard's number
//! ([`ShardCids`]). The kernel picks a shard's socket by the packet's addresses and ports, so a
//! client keeps landing on the shard of its connection until its address changes (a phone
//! moving from Wi-Fi to mobile data, a NAT rebinding). Then its packets reach another shard,
//! whose endpoint does not know the connection and would answer with a stateless reset. A
//! [`RoutedSocket`] looks at the destination connection ID of each short-header (1-RTT) packet
//! it reads and hands a packet of another shard to that shard's queue, from which that shard's
//! endpoint reads it as if its own socket had. Long-header packets (handshakes) stay where they
//! land: a client may not change its address before the handshake is confirmed (RFC 9000,
//! 9), and its first packet carries a connection ID of its own choosing.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use quinn_proto::ConnectionId;
use quinn_proto::{ConnectionIdGenerator, HashedConnectionIdGenerator, InvalidCid};
use std::time::Duration;

/// Length of the connection IDs the server issues: the shard's number, then quinn's keyed
/// 8-byte ID (3 random bytes and a 5-byte tag that lets the server tell its own IDs).
pub(crate) const CID_LEN: usize = 9;

/// Packets waiting for a shard beyond which more are dropped (QUIC retransmits them): bounds
/// the memory a flood of misrouted packets can take, 4,096 × at most 64 KiB.
const MAX_QUEUED: usize = 4096;

/// Connection IDs that name their shard in their first byte.
pub(crate) struct ShardCids {
    shard: u8,
    inner: HashedConnectionIdGenerator,
}

impl ShardCids {
    pub(crate) fn new(shard: u8, key: u64) -> Self {
        Self {
            shard,
            inner: HashedConnectionIdGenerator::from_key(key),
        }
    }
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let keyed = self.inner.generate_cid();
        let mut bytes = [0u8; CID_LEN];
        bytes[0] = self.shard;
        bytes[1..].copy_from_slice(&keyed);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() != CID_LEN {
            return Err(InvalidCid);
        }
        self.inner.validate(&ConnectionId::new(&cid[1..]))
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The shard a datagram belongs to, if it names one: a short-header packet (first bit 0)
/// long enough to hold one of our connection IDs, whose first byte is the shard's number.
fn shard_of(datagram: &[u8]) -> Option<usize> {
    match datagram {
        [first, shard, ..] if first & 0x80 == 0 && datagram.len() > CID_LEN => {
            Some(usize::from(*shard))
        }
        _ => None,
    }
}

/// A datagram read by one shard for another.
struct Forwarded {
    meta: RecvMeta,
    data: Vec<u8>,
}

/// The shards' queues of datagrams read by another shard.
pub(crate) struct Exchange {
    queues: Vec<Queue>,
}

#[derive(Default)]
struct Queue {
    datagrams: Mutex<VecDeque<Forwarded>>,
    waker: AtomicWaker,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Forwarded>> {
        // The queue holds plain data; a panic elsewhere cannot leave it half-changed.
        self.datagrams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Exchange {
    pub(crate) fn new(shards: usize) -> Arc<Self> {
        Arc::new(Self {
            queues: (0..shards).map(|_| Queue::default()).collect(),
        })
    }

    /// Queues `data` for `shard` and wakes its endpoint; false if the queue is full.
    fn forward(&self, shard: usize, meta: RecvMeta, data: &[u8]) -> bool {
        let Some(queue) = self.queues.get(shard) else {
            return false;
        };
        {
            let mut datagrams = queue.lock();
            if datagrams.len() >= MAX_QUEUED {
                return false;
            }
            let meta = RecvMeta {
                len: data.len(),
                stride: data.len(),
                ..meta
            };
            datagrams.push_back(Forwarded {
                meta,
                data: data.to_vec(),
            });
        }
        queue.waker.wake();
        true
    }
}

/// A shard's UDP socket, reading also what other shards forward to it.
pub(crate) struct RoutedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    shard: usize,
    exchange: Arc<Exchange>,
}

impl RoutedSocket {
    pub(crate) fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        shard: usize,
        exchange: Arc<Exchange>,
    ) -> Self {
        Self {
            inner,
            shard,
            exchange,
        }
    }

    /// Moves forwarded datagrams into `bufs`; how many.
    fn take_forwarded(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let Some(queue) = self.exchange.queues.get(self.shard) else {
            return 0;
        };
        let mut datagrams = queue.lock();
        let mut taken = 0;
        while taken < bufs.len().min(meta.len()) {
            let Some(next) = datagrams.pop_front() else {
                break;
            };
            let buf = &mut bufs[taken];
            // Every buffer quinn reads into holds a whole datagram: one that does not fit
            // (a smaller buffer than the shard it came from used) is dropped.
            if next.data.len() > buf.len() {
                continue;
            }
            buf[..next.data.len()].copy_from_slice(&next.data);
            meta[taken] = next.meta;
            taken += 1;
        }
        taken
    }

    /// Passes the datagrams of other shards in `buf` (one buffer, `meta.stride` apart) to them,
    /// keeping this shard's at the front of `buf` in their order; returns the bytes kept.
    fn route(&self, meta: &RecvMeta, buf: &mut [u8]) -> usize {
        let len = meta.len.min(buf.len());
        let stride = meta.stride.clamp(1, len.max(1));
        // The common case, checked without moving anything: every datagram is this shard's.
        let foreign = |d: &[u8]| {
            shard_of(d).is_some_and(|s| s != self.shard && s < self.exchange.queues.len())
        };
        if !buf[..len].chunks(stride).any(foreign) {
            return len;
        }
        let mut kept = 0;
        let mut start = 0;
        while start < len {
            let end = (start + stride).min(len);
            match shard_of(&buf[start..end]) {
                Some(shard) if shard != self.shard && shard < self.exchange.queues.len() => {
                    let queued = self.exchange.forward(shard, *meta, &buf[start..end]);
                    crate::server::metrics::shard_forwarded(queued);
                    if !queued {
                        tracing::debug!(shard, "a shard's packet queue is full; dropping a packet");
                    }
                }
                _ => {
                    buf.copy_within(start..end, kept);
                    kept += end - start;
                }
            }
            start = end;
        }
        kept
    }
}

impl fmt::Debug for RoutedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutedSocket")
            .field("shard", &self.shard)
            .field("inner", &self.inner)
            .finish()
    }
}

impl AsyncUdpSocket for RoutedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Some(queue) = self.exchange.queues.get(self.shard) {
            // Registered before the queue is looked at, so a datagram queued after the look
            // wakes this endpoint.
            queue.waker.register(cx.waker());
        }
        let forwarded = self.take_forwarded(bufs, meta);
        if forwarded > 0 {
            return Poll::Ready(Ok(forwarded));
        }
        let read = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(read)) => read,
            other => return other,
        };
        // A datagram passed on leaves its slot empty (length 0), which quinn skips.
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()).take(read) {
            meta.len = self.route(meta, buf);
        }
        Poll::Ready(Ok(read))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use quinn::Runtime;

    use super::*;

    #[test]
    fn ids_name_their_shard_and_are_recognised() {
        let mut cids = ShardCids::new(3, 42);
        let cid = cids.generate_cid();
        assert_eq!(cid.len(), CID_LEN);
        assert_eq!(cid[0], 3);
        assert!(cids.validate(&cid).is_ok());
        // Another shard's ID with the same key is recognised too (stateless resets).
        let other = ShardCids::new(1, 42).generate_cid();
        assert!(cids.validate(&other).is_ok());
        // A forged or foreign ID is not.
        let mut forged = [0u8; CID_LEN];
        forged.copy_from_slice(&cid);
        forged[8] ^= 1;
        assert!(cids.validate(&ConnectionId::new(&forged)).is_err());
        assert!(ShardCids::new(3, 43).validate(&cid).is_err());
        assert!(cids.validate(&ConnectionId::new(&[3; 8])).is_err());
    }

    /// A 1-RTT datagram of `len` bytes for a connection of `shard`, filled with `fill`.
    fn datagram(shard: u8, len: usize, fill: u8) -> Vec<u8> {
        let mut d = vec![fill; len];
        d[0] = 0x40;
        d[1] = shard;
        d
    }

    fn socket(shard: usize, exchange: &Arc<Exchange>) -> RoutedSocket {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = quinn::TokioRuntime.wrap_udp_socket(udp).unwrap();
        RoutedSocket::new(inner, shard, Arc::clone(exchange))
    }

    #[tokio::test]
    async fn datagrams_of_other_shards_are_passed_on_and_the_rest_kept_in_order() {
        let exchange = Exchange::new(2);
        let (zero, one) = (socket(0, &exchange), socket(1, &exchange));
        // A GRO buffer of three datagrams 100 bytes apart (the last shorter): shard 0's, shard
        // 1's, shard 0's. A long-header packet naming shard 1 would stay.
        let (a, b, c) = (datagram(0, 100, 1), datagram(1, 100, 2), datagram(0, 40, 3));
        let mut buf = [a.clone(), b.clone(), c.clone()].concat();
        let meta = RecvMeta {
            addr: "127.0.0.1:9".parse().unwrap(),
            len: buf.len(),
            stride: 100,
            ecn: None,
            dst_ip: None,
        };
        let kept = zero.route(&meta, &mut buf);
        assert_eq!(&buf[..kept], &[a.clone(), c].concat()[..]);
        // Shard 1 reads its datagram, alone, from the same address.
        let mut storage = vec![0u8; 2000];
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut metas = [RecvMeta::default()];
        assert_eq!(one.take_forwarded(&mut bufs, &mut metas), 1);
        assert_eq!((metas[0].len, metas[0].stride), (100, 100));
        assert_eq!(metas[0].addr, meta.addr);
        assert_eq!(&bufs[0][..100], &b[..]);
        assert_eq!(one.take_forwarded(&mut bufs, &mut metas), 0);
        // A buffer all of its own shard is left as it is; so is a shard number out of range.
        let mut own = [a.clone(), datagram(7, 100, 4)].concat();
        let meta = RecvMeta {
            len: own.len(),
            ..meta
        };
        assert_eq!(zero.route(&meta, &mut own), 200);
        // A full queue drops what comes on.
        for _ in 0..MAX_QUEUED {
            assert!(exchange.forward(1, meta, &b));
        }
        assert!(!exchange.forward(1, meta, &b));
    }

    #[test]
    fn only_short_headers_name_a_shard() {
        let mut short = vec![0x40u8, 1];
        short.extend([0u8; 20]);
        assert_eq!(shard_of(&short), Some(1));
        let mut long = short.clone();
        long[0] = 0xc0;
        assert_eq!(shard_of(&long), None);
        assert_eq!(shard_of(&short[..CID_LEN]), None);
        assert_eq!(shard_of(&[]), None);
    }
}
