//! Bytes of message bodies held while they wait for the store, per connection and for the
//! whole server. A message stream read to its end gives its stream credit back while its body
//! waits, so the transport's limits alone let one connection hold up to `MAX_RECEIVING` bodies
//! (1,024 × 60 KiB) when the disk stalls, and every connection as much again.
//!
//! A stream therefore reserves its body's length here before it reads the body, and gives it
//! back once the store has answered. When a budget is spent the stream waits unread: its peer's
//! flow control stops it, and the 32-stream limit holds its further messages back.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of bodies one connection may hold at once (at least the largest message).
pub const PER_CONNECTION: usize = 4 << 20;
/// Bytes of bodies all connections together may hold at once (at least one connection's).
pub const GLOBAL: usize = 256 << 20;

/// The server's budget, from which each connection draws its own.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    global: Arc<Semaphore>,
    per_connection: usize,
}

impl BodyBudget {
    /// Budgets of [`PER_CONNECTION`] and [`GLOBAL`] bytes, raised to fit a body of
    /// `max_message_bytes` (a body larger than a budget would wait for ever).
    pub(crate) fn new(max_message_bytes: u64) -> Self {
        Self::with_limits(PER_CONNECTION, GLOBAL, max_message_bytes)
    }

    fn with_limits(per_connection: usize, global: usize, max_message_bytes: u64) -> Self {
        let largest = usize::try_from(max_message_bytes).unwrap_or(usize::MAX);
        let per_connection = per_connection.max(largest).min(Semaphore::MAX_PERMITS);
        let global = global.max(per_connection).min(Semaphore::MAX_PERMITS);
        Self {
            global: Arc::new(Semaphore::new(global)),
            per_connection,
        }
    }

    /// A new connection's budget.
    pub(crate) fn connection(&self) -> ConnectionBudget {
        ConnectionBudget {
            global: Arc::clone(&self.global),
            local: Arc::new(Semaphore::new(self.per_connection)),
        }
    }
}

/// One connection's budget.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionBudget {
    global: Arc<Semaphore>,
    local: Arc<Semaphore>,
}

/// Bytes reserved for one body, given back when dropped.
#[derive(Debug)]
pub(crate) struct Reserved {
    _local: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl ConnectionBudget {
    /// Waits until `bytes` fit in this connection's budget and then in the server's (in that
    /// order, so a connection competes for the shared budget with at most its own share).
    /// A body larger than a whole budget would wait for ever: the caller checks the message
    /// limit first, and [`BodyBudget::new`] makes every budget hold the largest message.
    /// `None` only for a length beyond `u32`.
    pub(crate) async fn reserve(&self, bytes: usize) -> Option<Reserved> {
        let n = u32::try_from(bytes).ok()?;
        let local = Arc::clone(&self.local).acquire_many_owned(n).await.ok()?;
        let global = Arc::clone(&self.global).acquire_many_owned(n).await.ok()?;
        Some(Reserved {
            _local: local,
            _global: global,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn blocks(budget: &ConnectionBudget, bytes: usize) -> bool {
        tokio::time::timeout(Duration::from_millis(50), budget.reserve(bytes))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_connection_waits_once_its_budget_is_spent_and_goes_on_when_a_body_is_stored() {
        let budget = BodyBudget::with_limits(100, 1_000, 10);
        let conn = budget.connection();
        let first = conn.reserve(60).await.unwrap();
        let _second = conn.reserve(40).await.unwrap();
        assert!(blocks(&conn, 1).await);
        // Another connection has its own budget.
        let other = budget.connection();
        let _theirs = other.reserve(100).await.unwrap();
        drop(first);
        assert!(conn.reserve(60).await.is_some());
    }

    #[tokio::test]
    async fn all_connections_together_stay_within_the_global_budget() {
        let budget = BodyBudget::with_limits(100, 250, 10);
        let conns: Vec<_> = (0..3).map(|_| budget.connection()).collect();
        let a = conns[0].reserve(100).await.unwrap();
        let _b = conns[1].reserve(100).await.unwrap();
        let _c = conns[2].reserve(50).await.unwrap();
        assert!(blocks(&conns[2], 1).await);
        drop(a);
        assert!(conns[2].reserve(50).await.is_some());
    }

    #[tokio::test]
    async fn the_largest_message_always_fits() {
        let budget = BodyBudget::with_limits(100, 150, 1_000);
        let conn = budget.connection();
        assert!(conn.reserve(1_000).await.is_some());
    }
}
