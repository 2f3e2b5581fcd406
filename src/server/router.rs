//! Who is online where: one entry per authenticated user, pointing at the connection that
//! receives their messages. A newer login takes over (the older connection is closed with code
//! `replaced`). The router also arbitrates between delivery and `unsend`: a message handed to a
//! connection is *claimed* and can no longer be unsent; an unsent one is *cancelled* and will
//! not be delivered.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quinn::{Connection, VarInt};
use tokio::sync::{Notify, mpsc};

use crate::protocol::{CloseCode, Reply, ServerFrame, Username};

/// The online state of one user.
struct Online {
    conn_id: u64,
    conn: Connection,
    /// Wakes the connection's deliverer when new messages are stored.
    wake: Arc<Notify>,
    /// Pushes events onto the connection's control stream.
    events: mpsc::Sender<ServerFrame>,
}

#[derive(Default)]
struct Claims {
    /// Sequence numbers handed to a connection and not yet acknowledged.
    claimed: HashSet<u64>,
    /// Sequence numbers unsent before delivery.
    cancelled: HashSet<u64>,
}

/// The registry of online users.
#[derive(Default)]
pub struct Router {
    online: Mutex<HashMap<Username, Online>>,
    claims: Mutex<HashMap<Username, Claims>>,
    next_id: AtomicU64,
}

/// Removes its user from the router when dropped, unless a newer connection took over.
pub struct Registration {
    router: Arc<Router>,
    user: Username,
    conn_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut online) = self.router.online.lock()
            && online
                .get(&self.user)
                .is_some_and(|o| o.conn_id == self.conn_id)
        {
            online.remove(&self.user);
        }
    }
}

impl Router {
    /// Makes `conn` the connection that receives `user`'s messages, closing any older one.
    pub fn register(
        self: &Arc<Self>,
        user: &Username,
        conn: &Connection,
        wake: Arc<Notify>,
        events: mpsc::Sender<ServerFrame>,
    ) -> Registration {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Online {
            conn_id,
            conn: conn.clone(),
            wake,
            events,
        };
        let previous = match self.online.lock() {
            Ok(mut online) => online.insert(user.clone(), entry),
            Err(_) => None,
        };
        if let Some(previous) = previous
            && previous.conn.stable_id() != conn.stable_id()
        {
            tracing::info!(user = %user, "newer login takes over; closing the older connection");
            previous.conn.close(
                VarInt::from_u32(CloseCode::Replaced.code()),
                b"logged in on another connection",
            );
        }
        // Whatever the old connection was handed and never acknowledged is handed out again by
        // the new one, which reads the inbox afresh (where unsent messages are already gone).
        if let Ok(mut claims) = self.claims.lock() {
            claims.remove(user);
        }
        Registration {
            router: Arc::clone(self),
            user: user.clone(),
            conn_id,
        }
    }

    /// Whether `user` has a connection now.
    pub fn is_online(&self, user: &Username) -> bool {
        self.online
            .lock()
            .map(|o| o.contains_key(user))
            .unwrap_or(false)
    }

    /// Wakes `user`'s deliverer, if online.
    pub fn wake(&self, user: &Username) {
        if let Ok(online) = self.online.lock()
            && let Some(o) = online.get(user)
        {
            o.wake.notify_one();
        }
    }

    /// Pushes an event to `user`'s connection, if online; drops it if their queue is full.
    pub fn push_event(&self, user: &Username, reply: Reply) {
        if let Ok(online) = self.online.lock()
            && let Some(o) = online.get(user)
        {
            let _ = o.events.try_send(ServerFrame { id: None, reply });
        }
    }

    /// Marks `seq` of `user` as handed out; false if it was unsent in the meantime.
    pub fn claim(&self, user: &Username, seq: u64) -> bool {
        let Ok(mut claims) = self.claims.lock() else {
            return false;
        };
        let c = claims.entry(user.clone()).or_default();
        if c.cancelled.remove(&seq) {
            return false;
        }
        c.claimed.insert(seq);
        true
    }

    /// Marks `seq` of `user` as unsent; false if it was already handed out.
    pub fn cancel(&self, user: &Username, seq: u64) -> bool {
        let Ok(mut claims) = self.claims.lock() else {
            return false;
        };
        let c = claims.entry(user.clone()).or_default();
        if c.claimed.contains(&seq) {
            return false;
        }
        c.cancelled.insert(seq);
        true
    }

    /// Forgets the claims of acknowledged messages.
    pub fn release(&self, user: &Username, seqs: &[u64]) {
        if let Ok(mut claims) = self.claims.lock()
            && let Some(c) = claims.get_mut(user)
        {
            for seq in seqs {
                c.claimed.remove(seq);
            }
            if c.claimed.is_empty() && c.cancelled.is_empty() {
                claims.remove(user);
            }
        }
    }
}
