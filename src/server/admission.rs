//! Admission per client address: how many connections one address (an IPv4 address, or an
//! IPv6 /64, which one host usually owns whole) may hold at once, decided in the accept loop
//! before any TLS work. The global cap and the handshake Retry threshold live in `server`.
//!
//! The source address of a packet that has not been validated can be forged, so a new
//! connection from an address that already holds one must first prove the address with a QUIC
//! Retry (stateless on the server, one round trip for the client). A spoofer therefore holds
//! at most one slot per forged address, for the handshake deadline, and cannot fill an honest
//! address's quota to lock it out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The part of a client address that is counted: IPv4 addresses alone, IPv6 by /64 (an
/// IPv4-mapped IPv6 address, as a dual-stack socket reports IPv4 clients, counts as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressBlock {
    /// One IPv4 address.
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl AddressBlock {
    /// The block `ip` falls in.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// What the accept loop does with a new connection.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Let it in; the slot counts it against its address until dropped.
    Admit(AddressSlot),
    /// Send a Retry first: the address holds connections and this one has not proved it.
    Validate,
    /// Refuse it: its (validated) address holds its quota.
    Refuse,
}

/// Live connections per address block (blocks without any have no entry).
type Counts = Arc<Mutex<HashMap<AddressBlock, u32>>>;

/// Live connections per address block, and the cap.
#[derive(Debug)]
pub(crate) struct PerAddress {
    /// 0: unlimited (nothing is counted).
    cap: usize,
    counts: Counts,
}

/// Past this many buckets, a map four times larger than it needs to be is shrunk when an
/// entry leaves: after a flood from many addresses the table would otherwise keep its peak
/// size (≈ 16 bytes per address ever seen at once) for the life of the process.
const SHRINK_ABOVE: usize = 1024;

impl PerAddress {
    /// At most `cap` connections per address block (0 = unlimited).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            counts: Arc::default(),
        }
    }

    /// Decides on a connection from `ip`; `validated` is whether the peer has proved its
    /// address (a Retry token).
    pub(crate) fn admit(&self, ip: IpAddr, validated: bool) -> Admission {
        if self.cap == 0 {
            return Admission::Admit(AddressSlot(None));
        }
        let block = AddressBlock::of(ip);
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let held = counts.get(&block).copied().unwrap_or(0);
        if held as usize >= self.cap {
            if validated {
                return Admission::Refuse;
            }
            return Admission::Validate;
        }
        if held > 0 && !validated {
            return Admission::Validate;
        }
        counts.insert(block, held + 1);
        Admission::Admit(AddressSlot(Some((block, Arc::clone(&self.counts)))))
    }

    /// Connections counted for `ip`'s block now.
    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> u32 {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(&AddressBlock::of(ip)).copied().unwrap_or(0)
    }
}

/// One connection counted against its address block for as long as it is held.
#[derive(Debug)]
pub(crate) struct AddressSlot(Option<(AddressBlock, Counts)>);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some((block, counts)) = self.0.take() else {
            return;
        };
        let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
        match counts.get_mut(&block) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                counts.remove(&block);
                if counts.capacity() > SHRINK_ABOVE && counts.len() * 4 < counts.capacity() {
                    let keep = counts.len() * 2;
                    counts.shrink_to(keep);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            AddressBlock::of(ip("2001:db8:1:2:aaaa::1")),
            AddressBlock::of(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            AddressBlock::of(ip("2001:db8:1:2::1")),
            AddressBlock::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddressBlock::of(ip("::ffff:192.0.2.7")),
            AddressBlock::of(ip("192.0.2.7"))
        );
    }

    #[test]
    fn a_full_address_is_refused_and_others_still_get_in() {
        let per = PerAddress::new(2);
        let a = ip("192.0.2.1");
        let first = per.admit(a, false);
        assert!(matches!(first, Admission::Admit(_)));
        // A second one must prove its address before it is counted.
        assert!(matches!(per.admit(a, false), Admission::Validate));
        let second = per.admit(a, true);
        assert!(matches!(second, Admission::Admit(_)));
        assert!(matches!(per.admit(a, true), Admission::Refuse));
        assert!(matches!(per.admit(a, false), Admission::Validate));
        assert!(matches!(
            per.admit(ip("192.0.2.2"), false),
            Admission::Admit(_)
        ));
        drop(first);
        assert_eq!(per.held(a), 1);
        assert!(matches!(per.admit(a, true), Admission::Admit(_)));
        drop(second);
    }

    #[test]
    fn slots_leave_no_entries_and_the_table_shrinks_after_a_flood() {
        let per = PerAddress::new(4);
        let slots: Vec<_> = (0..20_000u32)
            .map(|i| per.admit(IpAddr::from(i.to_be_bytes()), false))
            .collect();
        drop(slots);
        let counts = per.counts.lock().unwrap();
        assert!(counts.is_empty());
        assert!(
            counts.capacity() <= 2 * SHRINK_ABOVE,
            "{}",
            counts.capacity()
        );
    }

    #[test]
    fn zero_is_unlimited() {
        let per = PerAddress::new(0);
        let slots: Vec<_> = (0..100)
            .map(|_| per.admit(ip("192.0.2.1"), false))
            .collect();
        assert!(slots.iter().all(|s| matches!(s, Admission::Admit(_))));
        assert_eq!(per.held(ip("192.0.2.1")), 0);
    }
}
