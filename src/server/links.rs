//! Open device links (docs/PROTOCOL.md 5.5): which slot belongs to which account, the SPAKE2
//! message its existing device left, and the new device waiting for the existing one's
//! decision. Memory only: a link lives at most its TTL (`link_ttl`, 5 minutes by default), and a restart fails the links in
//! progress (both devices start over), which costs nothing durable.
//!
//! A link is used by its first join: every later join of the slot fails, as does a join that
//! names another account, so a code cannot be tried twice. The server never sees the code's
//! secret; it only routes between the two connections.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::accounts::IssuedSession;
use crate::protocol::{LinkConfirm, LinkPake, Reply, ServerFrame, Username};

/// Slots are 0..SLOTS (the code's four digits).
const SLOTS: u16 = 10_000;
/// Longest device name, in bytes.
pub const MAX_DEVICE_NAME: usize = 64;

/// Why a link step failed: told to the peer as `link_failed`, one answer for every cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkFailed {
    /// No open link matches (unknown slot, another account, already joined, expired, or the
    /// other device left).
    #[error("the link failed: the code is unknown, expired or used, or the other device left")]
    NoLink,
    /// Every slot is taken.
    #[error("no free link slot; retry in a minute")]
    NoSlot,
}

/// What the existing device decided, handed to the waiting new device.
pub enum Decision {
    /// The confirmation verified: the new device is registered.
    Accept {
        /// The new device's session.
        issued: IssuedSession,
        /// `c_E`.
        confirm: LinkConfirm,
        /// The sealed payload.
        payload: Vec<u8>,
    },
    /// The confirmation did not verify (a wrong code).
    Refuse,
}

/// One open link.
struct Link {
    account: Username,
    /// The connection that opened it (quinn's stable id) and its event queue.
    opener: usize,
    opener_events: mpsc::Sender<Box<ServerFrame>>,
    pake_e: LinkPake,
    expires: Instant,
    joined: Option<Joined>,
}

/// The new device of a used link.
struct Joined {
    conn: usize,
    name: String,
    pake_n: LinkPake,
    /// Set once the new device confirmed: where the decision goes.
    decision: Option<oneshot::Sender<Decision>>,
}

#[derive(Default)]
struct State {
    slots: HashMap<u16, Link>,
    by_account: HashMap<Username, u16>,
}

impl State {
    fn remove(&mut self, slot: u16) -> Option<Link> {
        let link = self.slots.remove(&slot)?;
        if self.by_account.get(&link.account) == Some(&slot) {
            self.by_account.remove(&link.account);
        }
        Some(link)
    }

    fn sweep(&mut self, now: Instant) {
        let expired: Vec<u16> = self
            .slots
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(s, _)| *s)
            .collect();
        for slot in expired {
            self.remove(slot);
        }
    }
}

/// The open links of this server.
pub struct Links {
    state: Mutex<State>,
    ttl: Duration,
}

impl Links {
    /// No open link yet; each will wait `ttl` for its new device.
    pub fn new(ttl: Duration) -> Self {
        Self {
            state: Mutex::default(),
            ttl,
        }
    }

    /// How long a link waits for its new device.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, LinkFailed> {
        self.state.lock().map_err(|_| LinkFailed::NoLink)
    }

    /// Opens a link for `account` from connection `opener`, cancelling the account's previous
    /// one; returns its slot and when it lapses.
    pub fn open(
        &self,
        account: &Username,
        opener: usize,
        opener_events: mpsc::Sender<Box<ServerFrame>>,
        pake_e: LinkPake,
        now: Instant,
    ) -> Result<(u16, Instant), LinkFailed> {
        let mut state = self.state()?;
        state.sweep(now);
        if let Some(old) = state.by_account.get(account).copied() {
            state.remove(old);
        }
        let start = random_slot().ok_or(LinkFailed::NoSlot)?;
        let slot = (0..SLOTS)
            .map(|i| (start + i) % SLOTS)
            .find(|s| !state.slots.contains_key(s))
            .ok_or(LinkFailed::NoSlot)?;
        let expires = now + self.ttl;
        state.slots.insert(
            slot,
            Link {
                account: account.clone(),
                opener,
                opener_events,
                pake_e,
                expires,
                joined: None,
            },
        );
        state.by_account.insert(account.clone(), slot);
        Ok((slot, expires))
    }

    /// The new device on connection `conn` joins `account`'s link at `slot`: the link is used
    /// from now on. Returns the existing device's SPAKE2 message.
    pub fn join(
        &self,
        account: &Username,
        slot: u16,
        conn: usize,
        name: String,
        pake_n: LinkPake,
        now: Instant,
    ) -> Result<(LinkPake, Instant), LinkFailed> {
        let mut state = self.state()?;
        state.sweep(now);
        let Some(link) = state.slots.get_mut(&slot) else {
            return Err(LinkFailed::NoLink);
        };
        if link.joined.is_some() {
            // A second join burns the link: whoever joined first (perhaps someone who saw
            // the slot and guessed) does not get to finish it either.
            state.remove(slot);
            return Err(LinkFailed::NoLink);
        }
        if &link.account != account {
            return Err(LinkFailed::NoLink);
        }
        link.joined = Some(Joined {
            conn,
            name,
            pake_n,
            decision: None,
        });
        Ok((link.pake_e, link.expires))
    }

    /// The new device on `conn` confirms: the existing device is told (`link_request`), and
    /// the returned receiver gets its decision, with the time left to wait for it.
    pub fn confirm(
        &self,
        conn: usize,
        confirm: LinkConfirm,
        now: Instant,
    ) -> Result<(oneshot::Receiver<Decision>, Duration), LinkFailed> {
        let mut state = self.state()?;
        state.sweep(now);
        let slot = state
            .slots
            .iter()
            .find(|(_, l)| l.joined.as_ref().is_some_and(|j| j.conn == conn))
            .map(|(s, _)| *s)
            .ok_or(LinkFailed::NoLink)?;
        let Some(link) = state.slots.get_mut(&slot) else {
            return Err(LinkFailed::NoLink);
        };
        let Some(joined) = link.joined.as_mut() else {
            return Err(LinkFailed::NoLink);
        };
        if joined.decision.is_some() {
            return Err(LinkFailed::NoLink);
        }
        let event = Reply::LinkRequest {
            slot,
            name: joined.name.clone(),
            pake: joined.pake_n,
            confirm,
        };
        let (tx, rx) = oneshot::channel();
        joined.decision = Some(tx);
        let left = link.expires.saturating_duration_since(now);
        if link
            .opener_events
            .try_send(Box::new(ServerFrame {
                id: None,
                reply: event,
            }))
            .is_err()
        {
            state.remove(slot);
            return Err(LinkFailed::NoLink);
        }
        Ok((rx, left))
    }

    /// The existing device on `opener` decides on its link at `slot`: the link ends, and the
    /// returned sender takes the decision to the new device, with the new device's name.
    pub fn decide(
        &self,
        account: &Username,
        opener: usize,
        slot: u16,
        now: Instant,
    ) -> Result<(oneshot::Sender<Decision>, String), LinkFailed> {
        let mut state = self.state()?;
        state.sweep(now);
        let ours = state
            .slots
            .get(&slot)
            .is_some_and(|l| &l.account == account && l.opener == opener);
        if !ours {
            return Err(LinkFailed::NoLink);
        }
        let link = state.remove(slot).ok_or(LinkFailed::NoLink)?;
        let joined = link.joined.ok_or(LinkFailed::NoLink)?;
        let decision = joined.decision.ok_or(LinkFailed::NoLink)?;
        Ok((decision, joined.name))
    }

    /// A connection closed: the links it opened end (their new devices are told
    /// `link_failed`), and so does a link it joined.
    pub fn forget_connection(&self, conn: usize) {
        if let Ok(mut state) = self.state() {
            let gone: Vec<u16> = state
                .slots
                .iter()
                .filter(|(_, l)| {
                    l.opener == conn || l.joined.as_ref().is_some_and(|j| j.conn == conn)
                })
                .map(|(s, _)| *s)
                .collect();
            for slot in gone {
                state.remove(slot);
            }
        }
    }

    /// Open links now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.slots.len()).unwrap_or(0)
    }

    /// Whether no link is open.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A uniformly random slot, so slots say nothing about how many links are open.
fn random_slot() -> Option<u16> {
    let mut bytes = [0u8; 2];
    getrandom::fill(&mut bytes).ok()?;
    Some(u16::from_be_bytes(bytes) % SLOTS)
}

/// Whether `name` may name a device: 1 to [`MAX_DEVICE_NAME`] bytes, no control characters.
pub fn valid_device_name(name: &str) -> bool {
    (1..=MAX_DEVICE_NAME).contains(&name.len()) && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::keys::Bin;

    const TTL: Duration = Duration::from_secs(300);

    fn name(n: &str) -> Username {
        Username::parse(n).expect("valid name")
    }

    fn events() -> (
        mpsc::Sender<Box<ServerFrame>>,
        mpsc::Receiver<Box<ServerFrame>>,
    ) {
        mpsc::channel(4)
    }

    #[test]
    fn a_link_goes_open_join_confirm_decide() {
        let links = Links::new(TTL);
        let (tx, mut rx) = events();
        let now = Instant::now();
        let alice = name("alice");
        let (slot, expires) = links.open(&alice, 1, tx, Bin([0x41; 33]), now).unwrap();
        assert!(slot < SLOTS);
        assert_eq!(expires, now + TTL);
        let pake_e = links
            .join(&alice, slot, 2, "laptop".into(), Bin([0x42; 33]), now)
            .unwrap();
        assert_eq!(pake_e, (Bin([0x41; 33]), expires));
        let (mut decision, left) = links.confirm(2, Bin([7; 32]), now).unwrap();
        assert_eq!(left, TTL);
        let event = rx.try_recv().unwrap();
        assert!(matches!(
            event.reply,
            Reply::LinkRequest { slot: s, ref name, pake, confirm }
                if s == slot && name == "laptop" && pake == Bin([0x42; 33]) && confirm == Bin([7; 32])
        ));
        // Only the opener, on its own connection, decides.
        assert_eq!(
            links.decide(&name("bob"), 1, slot, now).err(),
            Some(LinkFailed::NoLink)
        );
        assert_eq!(
            links.decide(&alice, 3, slot, now).err(),
            Some(LinkFailed::NoLink)
        );
        let (sender, device_name) = links.decide(&alice, 1, slot, now).unwrap();
        assert_eq!(device_name, "laptop");
        assert!(sender.send(Decision::Refuse).is_ok());
        assert!(matches!(decision.try_recv(), Ok(Decision::Refuse)));
        assert!(links.is_empty());
    }

    #[test]
    fn a_slot_is_used_by_its_first_join_and_burnt_by_a_second() {
        let links = Links::new(TTL);
        let (tx, _rx) = events();
        let now = Instant::now();
        let alice = name("alice");
        let (slot, _) = links.open(&alice, 1, tx, Bin([1; 33]), now).unwrap();
        // Another account's name fails and leaves the link alone.
        assert!(
            links
                .join(&name("bob"), slot, 2, "x".into(), Bin([2; 33]), now)
                .is_err()
        );
        links
            .join(&alice, slot, 2, "x".into(), Bin([2; 33]), now)
            .unwrap();
        assert!(
            links
                .join(&alice, slot, 3, "y".into(), Bin([3; 33]), now)
                .is_err()
        );
        // The second join ended the link: the first joiner cannot confirm any more.
        assert!(links.confirm(2, Bin([0; 32]), now).is_err());
        assert!(links.is_empty());
    }

    #[test]
    fn links_lapse_and_a_new_open_cancels_the_old() {
        let links = Links::new(TTL);
        let (tx, _rx) = events();
        let now = Instant::now();
        let alice = name("alice");
        let (first, _) = links
            .open(&alice, 1, tx.clone(), Bin([1; 33]), now)
            .unwrap();
        let (second, _) = links
            .open(&alice, 1, tx.clone(), Bin([1; 33]), now)
            .unwrap();
        assert_eq!(links.len(), 1);
        if first != second {
            assert!(
                links
                    .join(&alice, first, 2, "x".into(), Bin([2; 33]), now)
                    .is_err()
            );
        }
        let later = now + TTL;
        assert!(
            links
                .join(&alice, second, 2, "x".into(), Bin([2; 33]), later)
                .is_err()
        );
        assert!(links.is_empty());
    }

    #[test]
    fn a_closed_connection_ends_its_links_and_the_waiting_device_hears_of_it() {
        let links = Links::new(TTL);
        let (tx, _rx) = events();
        let now = Instant::now();
        let alice = name("alice");
        let (slot, _) = links.open(&alice, 1, tx, Bin([1; 33]), now).unwrap();
        links
            .join(&alice, slot, 2, "x".into(), Bin([2; 33]), now)
            .unwrap();
        let (mut decision, _) = links.confirm(2, Bin([0; 32]), now).unwrap();
        links.forget_connection(1);
        assert!(matches!(
            decision.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(links.is_empty());
    }

    #[test]
    fn device_names_are_short_and_printable() {
        assert!(valid_device_name("Alice's phone"));
        assert!(!valid_device_name(""));
        assert!(!valid_device_name(&"x".repeat(65)));
        assert!(!valid_device_name("evil\u{1b}[2J"));
    }
}
