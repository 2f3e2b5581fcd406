//! Who is online where: one entry per device of an authenticated user, pointing at the
//! connection that receives that device's messages. A newer login of the same device takes over
//! (the older connection is closed with code `replaced`); each device of an account has its own
//! entry, so an account's devices receive side by side. The router also arbitrates between delivery and `unsend`: a message handed to a
//! connection is *claimed* and can no longer be unsent; an unsent one is *cancelled* and will
//! not be delivered.
//!
//! It also decides who may ask for whose presence (`online`), from memory only: B may see A's
//! presence if, in the last [`WRITTEN_FOR`] and since this process started, the server stored a
//! message from A to B or pushed one to B. Nothing of it is written to disk, so no
//! who-wrote-to-whom graph outlives the process; messages still pending from before a restart
//! count again once they are pushed to B, which happens as soon as B connects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, VarInt};
use tokio::sync::{Notify, mpsc};

use crate::protocol::{CloseCode, DeviceId, Reply, ServerFrame, Username};
use crate::store::StoredMessage;

/// Most messages a mailbox holds before its deliverer is sent back to the store.
const MAILBOX_MESSAGES: usize = 512;
/// Most body bytes a mailbox holds before its deliverer is sent back to the store.
const MAILBOX_BYTES: usize = 256 * 1024;

/// Messages stored for an online user since its deliverer last looked, kept in memory so the
/// deliverer can push them without reading them back from the store. The store stays the
/// truth: whenever the mailbox cannot prove it holds the next message in order (a gap, an
/// overflow, a message stored without a copy), the deliverer reads the inbox instead.
///
/// Copies arrive when a message's place in the inbox is decided, before it is durable; the
/// store has it only after the sync. So a message whose copy this mailbox does not hold must
/// wake the deliverer again once it is synced (`Mailbox::committed`): a store read made
/// before that would not have seen it.
#[derive(Default)]
pub struct Mailbox {
    notify: Notify,
    fresh: Mutex<Fresh>,
}

#[derive(Default)]
struct Fresh {
    messages: BTreeMap<u64, StoredMessage>,
    bytes: usize,
    /// Something was stored that is not in `messages`: the inbox must be read.
    stale: bool,
    /// The highest seq whose copy was offered here.
    offered_upto: u64,
    /// The highest seq whose copy was offered here and dropped (overflow).
    dropped_upto: u64,
}

/// What a deliverer should do next, from [`Mailbox::take_after`].
pub enum Taken {
    /// Push these, in order: they directly follow the last message pushed.
    Messages(Vec<StoredMessage>),
    /// Read the inbox from the store.
    ReadStore,
    /// The next message is missing (its copy is late, was dropped, or never came): read the
    /// store, or if a read just found nothing, wait for [`Mailbox::changed`]; the missing
    /// message's sync marks the mailbox stale.
    Gap,
    /// Nothing new: wait for [`Mailbox::changed`].
    Nothing,
}

impl Mailbox {
    /// Adds a copy of a message just ordered (or, with `None`, notes that one was stored without
    /// a copy) and wakes the deliverer.
    fn offer(&self, message: Option<StoredMessage>) {
        if let Ok(mut fresh) = self.fresh.lock() {
            if let Some(m) = &message {
                fresh.offered_upto = fresh.offered_upto.max(m.seq);
            }
            match message {
                Some(m)
                    if !fresh.stale
                        && fresh.messages.len() < MAILBOX_MESSAGES
                        && fresh.bytes + m.body.len() <= MAILBOX_BYTES =>
                {
                    fresh.bytes += m.body.len();
                    fresh.messages.insert(m.seq, m);
                }
                dropped => {
                    if let Some(m) = dropped {
                        fresh.dropped_upto = fresh.dropped_upto.max(m.seq);
                    }
                    fresh.stale = true;
                    fresh.messages.clear();
                    fresh.bytes = 0;
                }
            }
        }
        self.notify.notify_one();
    }

    /// Hands the deliverer a copy of a message whose place in the inbox was just decided (it
    /// may not be durable yet).
    pub fn copy(&self, message: StoredMessage) {
        self.offer(Some(message));
    }

    /// Notes that `seq`, whose copy was offered to the recipient's mailbox of the moment, is
    /// now in the store. If this mailbox does not hold that copy (dropped, or offered to an
    /// older connection's mailbox), the deliverer must read the store again.
    fn committed(&self, seq: u64) {
        let Ok(mut fresh) = self.fresh.lock() else {
            return;
        };
        if !fresh.stale && (seq <= fresh.dropped_upto || seq > fresh.offered_upto) {
            fresh.stale = true;
            fresh.messages.clear();
            fresh.bytes = 0;
            drop(fresh);
            self.notify.notify_one();
        }
    }

    /// Takes the run of messages that directly follows `after` (the last sequence number
    /// pushed, or read from the store), or says to read the store.
    pub fn take_after(&self, after: u64) -> Taken {
        let Ok(mut fresh) = self.fresh.lock() else {
            return Taken::ReadStore;
        };
        if fresh.stale {
            fresh.stale = false;
            fresh.messages.clear();
            fresh.bytes = 0;
            return Taken::ReadStore;
        }
        // Drop what the store already gave the deliverer, then take the run that follows.
        let mut next = after.saturating_add(1);
        let newer = fresh.messages.split_off(&next);
        let pushed = std::mem::replace(&mut fresh.messages, newer);
        let mut freed: usize = pushed.values().map(|m| m.body.len()).sum();
        let mut run = Vec::new();
        while let Some(entry) = fresh.messages.first_entry() {
            if *entry.key() != next {
                break;
            }
            let message = entry.remove();
            freed += message.body.len();
            next = next.saturating_add(1);
            run.push(message);
        }
        fresh.bytes = fresh.bytes.saturating_sub(freed);
        match (run.is_empty(), fresh.messages.is_empty()) {
            (false, _) => Taken::Messages(run),
            // A gap: the missing message's copy is late or was never made.
            (true, false) => Taken::Gap,
            (true, true) => Taken::Nothing,
        }
    }

    /// Completes when something was offered since the last call (at once if it already was).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// How long a message from A to B lets B see A's presence: the default message TTL, so a
/// message still pending keeps granting it.
pub const WRITTEN_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Senders remembered per recipient; past it the one that wrote least recently is forgotten.
const WRITERS_PER_USER: usize = 256;
/// Senders remembered in all: ≈ 32 MB when full with one sender per recipient (the costliest
/// shape), ≈ 5 MB with 256 per recipient (RSS growth, measured with a throwaway test). Past it, expired entries are dropped (at most
/// once per [`PRUNE_EVERY`], so a full table costs no sweep per message), and if that is not
/// enough new ones are not remembered: presence then stays hidden (it fails closed).
const WRITERS_TOTAL: usize = 1 << 17;
/// Least time between two sweeps of the whole table.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Who wrote to whom lately, for the presence rule: recipient → (sender, when last).
#[derive(Default)]
struct Writers {
    by_recipient: HashMap<Username, Vec<(Username, Instant)>, Hasher>,
    total: usize,
    pruned_at: Option<Instant>,
}

impl Writers {
    fn note(&mut self, recipient: &Username, sender: &Username, now: Instant) {
        if let Some(list) = self.by_recipient.get_mut(recipient)
            && let Some(entry) = list.iter_mut().find(|(s, _)| s == sender)
        {
            entry.1 = now;
            return;
        }
        if self.total >= WRITERS_TOTAL {
            if self
                .pruned_at
                .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY)
            {
                self.prune(now);
                self.pruned_at = Some(now);
            }
            if self.total >= WRITERS_TOTAL {
                return;
            }
        }
        // Most users hear from few: a list starts with room for one.
        let list = self
            .by_recipient
            .entry(recipient.clone())
            .or_insert_with(|| Vec::with_capacity(1));
        let before = list.len();
        list.retain(|(_, at)| now.saturating_duration_since(*at) < WRITTEN_FOR);
        if list.len() >= WRITERS_PER_USER
            && let Some((oldest, _)) = list.iter().enumerate().min_by_key(|(_, (_, at))| *at)
        {
            list.swap_remove(oldest);
        }
        list.push((sender.clone(), now));
        self.total = self.total + list.len() - before;
    }

    fn wrote(&self, sender: &Username, recipient: &Username, now: Instant) -> bool {
        self.by_recipient.get(recipient).is_some_and(|list| {
            list.iter()
                .any(|(s, at)| s == sender && now.saturating_duration_since(*at) < WRITTEN_FOR)
        })
    }

    fn prune(&mut self, now: Instant) {
        self.by_recipient.retain(|_, list| {
            list.retain(|(_, at)| now.saturating_duration_since(*at) < WRITTEN_FOR);
            !list.is_empty()
        });
        self.total = self.by_recipient.values().map(Vec::len).sum();
    }
}

/// One device's inbox: the unit of delivery, of claims and of the `replaced` rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Inbox {
    /// The account.
    pub user: Username,
    /// Its device.
    pub device: DeviceId,
}

impl Inbox {
    /// The inbox of `user`'s `device`.
    pub fn new(user: &Username, device: DeviceId) -> Self {
        Self {
            user: user.clone(),
            device,
        }
    }
}

impl std::fmt::Display for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.user, self.device)
    }
}

/// The online state of one device.
struct Online {
    conn_id: u64,
    conn: Connection,
    /// Hands newly stored messages to the connection's deliverer.
    mailbox: Arc<Mailbox>,
    /// Pushes events onto the connection's control stream.
    events: mpsc::Sender<Box<ServerFrame>>,
}

/// The router's maps, hashed with foldhash (randomly seeded per process), as the inbox
/// writer's: every message looks a name up here three or four times, and SipHash costs
/// several times more on short keys.
type Hasher = foldhash::fast::RandomState;

#[derive(Default)]
struct Claims {
    /// Sequence numbers handed to a connection and not yet acknowledged.
    claimed: HashSet<u64, Hasher>,
    /// Sequence numbers unsent before delivery.
    cancelled: HashSet<u64, Hasher>,
}

impl Claims {
    fn is_empty(&self) -> bool {
        self.claimed.is_empty() && self.cancelled.is_empty()
    }
}

/// The online devices of one user (at most a few: a list beats a map).
type Devices = Vec<(DeviceId, Online)>;

/// The registry of online devices.
#[derive(Default)]
pub struct Router {
    online: Mutex<HashMap<Username, Devices, Hasher>>,
    claims: Mutex<HashMap<Inbox, Claims, Hasher>>,
    writers: Mutex<Writers>,
    next_id: AtomicU64,
}

/// Removes its device from the router when dropped, unless a newer connection took over.
pub struct Registration {
    router: Arc<Router>,
    inbox: Inbox,
    conn_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut online) = self.router.online.lock()
            && let Some(devices) = online.get_mut(&self.inbox.user)
        {
            devices.retain(|(d, o)| !(*d == self.inbox.device && o.conn_id == self.conn_id));
            if devices.is_empty() {
                online.remove(&self.inbox.user);
            }
        }
        // An online device's claims stay while empty (a message a moment makes and releases
        // one); they go with the connection. Claims still held stay until the next login.
        if let Ok(mut claims) = self.router.claims.lock()
            && claims.get(&self.inbox).is_some_and(Claims::is_empty)
        {
            claims.remove(&self.inbox);
        }
    }
}

/// The entry of `inbox` in `online`, if its device is online.
fn entry<'a>(online: &'a HashMap<Username, Devices, Hasher>, inbox: &Inbox) -> Option<&'a Online> {
    online
        .get(&inbox.user)?
        .iter()
        .find(|(d, _)| *d == inbox.device)
        .map(|(_, o)| o)
}

impl Router {
    /// Makes `conn` the connection that receives `inbox`'s messages, closing any older one of
    /// the same device.
    pub fn register(
        self: &Arc<Self>,
        inbox: &Inbox,
        conn: &Connection,
        mailbox: Arc<Mailbox>,
        events: mpsc::Sender<Box<ServerFrame>>,
    ) -> Registration {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Online {
            conn_id,
            conn: conn.clone(),
            mailbox,
            events,
        };
        let previous = match self.online.lock() {
            Ok(mut online) => {
                let devices = online.entry(inbox.user.clone()).or_default();
                match devices.iter_mut().find(|(d, _)| *d == inbox.device) {
                    Some((_, slot)) => Some(std::mem::replace(slot, entry)),
                    None => {
                        devices.push((inbox.device, entry));
                        None
                    }
                }
            }
            Err(_) => None,
        };
        if let Some(previous) = previous
            && previous.conn.stable_id() != conn.stable_id()
        {
            tracing::info!(%inbox, "newer login takes over; closing the older connection");
            previous.conn.close(
                VarInt::from_u32(CloseCode::Replaced.code()),
                b"logged in on another connection",
            );
        }
        // Whatever the old connection was handed and never acknowledged is handed out again by
        // the new one, which reads the inbox afresh (where unsent messages are already gone).
        if let Ok(mut claims) = self.claims.lock() {
            claims.remove(inbox);
        }
        Registration {
            router: Arc::clone(self),
            inbox: inbox.clone(),
            conn_id,
        }
    }

    /// Whether any device of `user` has a connection now.
    pub fn is_online(&self, user: &Username) -> bool {
        self.online
            .lock()
            .map(|o| o.contains_key(user))
            .unwrap_or(false)
    }

    /// Notes that a message from `sender` to `recipient` was stored or pushed to `recipient`:
    /// for [`WRITTEN_FOR`], `recipient` may see `sender`'s presence.
    pub fn note_written(&self, recipient: &Username, sender: &Username) {
        if let Ok(mut writers) = self.writers.lock() {
            writers.note(recipient, sender, Instant::now());
        }
    }

    /// Whether `viewer` may see `subject`'s presence: a message from `subject` to `viewer` was
    /// stored or pushed to `viewer` by this process within [`WRITTEN_FOR`].
    pub fn may_see_presence(&self, viewer: &Username, subject: &Username) -> bool {
        self.writers
            .lock()
            .map(|w| w.wrote(subject, viewer, Instant::now()))
            .unwrap_or(false)
    }

    /// Tells `inbox`'s deliverer, if online, that message `seq` is now in the store; `copied`
    /// says whether a copy went to a mailbox ([`Mailbox::copy`]; otherwise the deliverer reads the inbox).
    pub fn stored(&self, inbox: &Inbox, seq: u64, copied: bool) {
        if let Some(mailbox) = self.mailbox(inbox) {
            if copied {
                mailbox.committed(seq);
            } else {
                mailbox.offer(None);
            }
        }
    }

    /// The mailbox of `inbox`'s delivering connection, if online.
    pub fn mailbox(&self, inbox: &Inbox) -> Option<Arc<Mailbox>> {
        match self.online.lock() {
            Ok(online) => entry(&online, inbox).map(|o| Arc::clone(&o.mailbox)),
            Err(_) => None,
        }
    }

    /// Pushes an event to `inbox`'s delivering connection, if online; drops it if its queue is
    /// full.
    pub fn push_event(&self, inbox: &Inbox, reply: Reply) {
        if let Ok(online) = self.online.lock()
            && let Some(o) = entry(&online, inbox)
        {
            let _ = o.events.try_send(Box::new(ServerFrame { id: None, reply }));
        }
    }

    /// Marks `seq` of `inbox` as handed out; false if it was unsent in the meantime.
    pub fn claim(&self, inbox: &Inbox, seq: u64) -> bool {
        let Ok(mut claims) = self.claims.lock() else {
            return false;
        };
        if let Some(c) = claims.get_mut(inbox) {
            if c.cancelled.remove(&seq) {
                return false;
            }
            c.claimed.insert(seq);
            return true;
        }
        let mut c = Claims::default();
        c.claimed.insert(seq);
        claims.insert(inbox.clone(), c);
        true
    }

    /// Marks `seq` of `inbox` as unsent; false if it was already handed out.
    pub fn cancel(&self, inbox: &Inbox, seq: u64) -> bool {
        let Ok(mut claims) = self.claims.lock() else {
            return false;
        };
        let c = claims.entry(inbox.clone()).or_default();
        if c.claimed.contains(&seq) {
            return false;
        }
        c.cancelled.insert(seq);
        true
    }

    /// Marks every `(inbox, seq)` as unsent, or none of them if one was already handed out:
    /// the copies of one message are unsent together.
    pub fn cancel_all(&self, copies: &[(Inbox, u64)]) -> bool {
        let Ok(mut claims) = self.claims.lock() else {
            return false;
        };
        let handed_out = copies
            .iter()
            .any(|(inbox, seq)| claims.get(inbox).is_some_and(|c| c.claimed.contains(seq)));
        if handed_out {
            return false;
        }
        for (inbox, seq) in copies {
            claims
                .entry(inbox.clone())
                .or_default()
                .cancelled
                .insert(*seq);
        }
        true
    }

    /// Closes the delivering connection of every device of `user` with `code` (their account
    /// is gone).
    pub fn disconnect_user(&self, user: &Username, code: CloseCode, reason: &str) {
        let devices = self.online.lock().ok().and_then(|mut o| o.remove(user));
        for (_, online) in devices.unwrap_or_default() {
            online
                .conn
                .close(VarInt::from_u32(code.code()), reason.as_bytes());
        }
    }

    /// Closes `inbox`'s delivering connection, if any, with `code` (its device is gone).
    pub fn disconnect(&self, inbox: &Inbox, code: CloseCode, reason: &str) {
        let removed = self.online.lock().ok().and_then(|mut online| {
            let devices = online.get_mut(&inbox.user)?;
            let at = devices.iter().position(|(d, _)| *d == inbox.device)?;
            let (_, o) = devices.swap_remove(at);
            if devices.is_empty() {
                online.remove(&inbox.user);
            }
            Some(o)
        });
        if let Some(online) = removed {
            online
                .conn
                .close(VarInt::from_u32(code.code()), reason.as_bytes());
        }
    }

    /// Forgets the claims of acknowledged messages.
    pub fn release(&self, inbox: &Inbox, seqs: &[u64]) {
        if let Ok(mut claims) = self.claims.lock()
            && let Some(c) = claims.get_mut(inbox)
        {
            for seq in seqs {
                c.claimed.remove(seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageId;

    fn message(seq: u64, len: usize) -> StoredMessage {
        StoredMessage {
            seq,
            id: MessageId([seq as u8; 16]),
            from: Username::parse("alice").expect("valid name"),
            from_device: 1,
            to: None,
            kind: "text".into(),
            sent_at: 1,
            expires_at: 2,
            body: vec![0; len],
        }
    }

    fn seqs(taken: Taken) -> Option<Vec<u64>> {
        match taken {
            Taken::Messages(m) => Some(m.iter().map(|m| m.seq).collect()),
            Taken::ReadStore | Taken::Gap => None,
            Taken::Nothing => Some(Vec::new()),
        }
    }

    #[test]
    fn hands_out_runs_that_follow_the_last_pushed() {
        let mailbox = Mailbox::default();
        assert_eq!(seqs(mailbox.take_after(0)), Some(vec![]));
        mailbox.offer(Some(message(5, 10)));
        mailbox.offer(Some(message(7, 10)));
        mailbox.offer(Some(message(6, 10)));
        mailbox.offer(Some(message(3, 10)));
        assert_eq!(mailbox.fresh.lock().expect("lock").bytes, 40);
        assert_eq!(seqs(mailbox.take_after(4)), Some(vec![5, 6, 7]));
        assert_eq!(mailbox.fresh.lock().expect("lock").bytes, 0);
        assert_eq!(seqs(mailbox.take_after(7)), Some(vec![]));
    }

    #[test]
    fn a_gap_sends_the_deliverer_to_the_store() {
        let mailbox = Mailbox::default();
        mailbox.offer(Some(message(9, 10)));
        // 8 is stored but its copy has not arrived (or never will): read the store.
        assert_eq!(seqs(mailbox.take_after(7)), None);
        // The store gave up to 9; the copy of 9 is dropped as already pushed.
        assert_eq!(seqs(mailbox.take_after(9)), Some(vec![]));
    }

    #[test]
    fn a_message_stored_without_a_copy_sends_the_deliverer_to_the_store() {
        let mailbox = Mailbox::default();
        mailbox.offer(Some(message(1, 10)));
        mailbox.offer(None);
        mailbox.offer(Some(message(3, 10)));
        assert_eq!(seqs(mailbox.take_after(0)), None);
        assert_eq!(seqs(mailbox.take_after(3)), Some(vec![]));
    }

    #[test]
    fn overflow_is_bounded_and_sends_the_deliverer_to_the_store() {
        let mailbox = Mailbox::default();
        for seq in 1..=(MAILBOX_MESSAGES as u64 + 10) {
            mailbox.offer(Some(message(seq, 1)));
        }
        assert!(mailbox.fresh.lock().expect("lock").messages.is_empty());
        assert_eq!(seqs(mailbox.take_after(0)), None);

        let big = Mailbox::default();
        big.offer(Some(message(1, MAILBOX_BYTES)));
        big.offer(Some(message(2, 1)));
        assert_eq!(seqs(big.take_after(0)), None);
    }

    #[test]
    fn a_dropped_copy_marks_the_mailbox_stale_again_once_synced() {
        let mailbox = Mailbox::default();
        for seq in 1..=(MAILBOX_MESSAGES as u64 + 1) {
            mailbox.offer(Some(message(seq, 1)));
        }
        // The deliverer reads the store before the batch is synced: it finds nothing.
        assert!(matches!(mailbox.take_after(0), Taken::ReadStore));
        assert!(matches!(mailbox.take_after(0), Taken::Nothing));
        // The sync of a dropped copy sends it back to the store, once.
        mailbox.committed(1);
        mailbox.committed(2);
        assert!(matches!(mailbox.take_after(0), Taken::ReadStore));
        // A copy it holds needs nothing.
        mailbox.offer(Some(message(1000, 1)));
        mailbox.committed(1000);
        assert!(matches!(mailbox.take_after(999), Taken::Messages(_)));
    }

    #[test]
    fn a_copy_offered_to_another_mailbox_marks_this_one_stale_once_synced() {
        // A newer connection's mailbox never saw seq 5's copy (the older one got it).
        let mailbox = Mailbox::default();
        mailbox.committed(5);
        assert!(matches!(mailbox.take_after(0), Taken::ReadStore));
    }

    #[test]
    fn a_claimed_message_cannot_be_unsent_and_an_unsent_one_is_not_claimed() {
        let router = Router::default();
        let bob = Inbox::new(&Username::parse("bob").expect("valid name"), 1);
        assert!(router.claim(&bob, 1));
        assert!(router.claim(&bob, 2));
        assert!(!router.cancel(&bob, 1));
        router.release(&bob, &[1]);
        // Acknowledged: the claim is gone, the user's (now empty) entry stays for the next.
        assert!(router.cancel(&bob, 1));
        assert!(!router.claim(&bob, 1));
        assert!(!router.cancel(&bob, 2));
        assert!(router.cancel(&bob, 3));
        assert!(!router.claim(&bob, 3));
        assert!(router.claim(&bob, 4));
    }

    #[test]
    fn presence_is_granted_by_a_recent_message_and_bounded() {
        let name = |n: &str| Username::parse(n).expect("valid name");
        let (alice, bob) = (name("alice"), name("bob"));
        let mut writers = Writers::default();
        let start = Instant::now();
        assert!(!writers.wrote(&alice, &bob, start));
        writers.note(&bob, &alice, start);
        writers.note(&bob, &alice, start);
        assert!(writers.wrote(&alice, &bob, start));
        assert!(!writers.wrote(&bob, &alice, start), "one way only");
        assert_eq!(writers.total, 1);
        // Forgotten with time.
        let later = start + WRITTEN_FOR;
        assert!(!writers.wrote(&alice, &bob, later));
        // Bounded per recipient: the least recent goes.
        for n in 0..WRITERS_PER_USER + 5 {
            let t = later + Duration::from_secs(n as u64);
            writers.note(&bob, &name(&format!("user{n}")), t);
        }
        assert_eq!(writers.by_recipient[&bob].len(), WRITERS_PER_USER);
        assert_eq!(writers.total, WRITERS_PER_USER);
        assert!(!writers.wrote(&name("user0"), &bob, later + Duration::from_secs(600)));
        assert!(writers.wrote(
            &name(&format!("user{}", WRITERS_PER_USER + 4)),
            &bob,
            later + Duration::from_secs(600)
        ));
    }

    #[test]
    fn a_full_table_fails_closed_until_entries_expire() {
        let name = |n: &str| Username::parse(n).expect("valid name");
        let (alice, start) = (name("alice"), Instant::now());
        let mut writers = Writers::default();
        for n in 0..WRITERS_TOTAL {
            writers.note(&name(&format!("rcpt{n}")), &alice, start);
        }
        let bob = name("bob");
        writers.note(&bob, &alice, start);
        assert!(!writers.wrote(&alice, &bob, start), "full: not remembered");
        assert!(
            writers.wrote(&alice, &name("rcpt0"), start),
            "nothing evicted"
        );
        let later = start + WRITTEN_FOR;
        writers.note(&bob, &alice, later);
        assert!(
            writers.wrote(&alice, &bob, later),
            "the expired ones made room"
        );
        assert_eq!(writers.total, 1);
    }

    #[test]
    fn a_gap_is_not_a_stale_mailbox() {
        let mailbox = Mailbox::default();
        mailbox.offer(Some(message(3, 1)));
        assert!(matches!(mailbox.take_after(1), Taken::Gap));
    }
}
