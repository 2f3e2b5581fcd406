//! Catching a device up with its group deliveries before it changes a group (`sfc group …`):
//! every delivery waiting on the connection is processed as [`Messenger::receive`] would
//! (group commits and welcomes merged, texts kept for later), without showing anything; then
//! the account's leaves in its groups are healed (devices linked or removed meanwhile).

use std::time::Duration;

use super::super::messenger::{Messenger, MessengerError, Received};

impl Messenger {
    /// Processes the deliveries that arrive until none comes for `idle`: commits and welcomes
    /// are merged into the groups (each notice returned, already acknowledged), and texts and
    /// files are kept, unshown, for the next [`Messenger::receive`] (which shows kept messages
    /// first). Unlike `receive`, it does not return kept messages, so it gets past them to
    /// the group traffic behind. Needs a messenger that takes deliveries.
    ///
    /// Then it heals this account's leaves in its groups
    /// ([`Messenger::heal_group_devices`]): devices of the account without a leaf are added,
    /// leaves of devices removed from it are removed. That failing for a group is logged and
    /// left for the next time; only a lost connection is an error.
    pub async fn catch_up(&self, idle: Duration) -> Result<Vec<Received>, MessengerError> {
        let notices = self.drain_deliveries(idle).await?;
        match self.heal_group_devices().await {
            Ok(_) => {}
            Err(e) if e.is_disconnected() => return Err(e),
            Err(e) => tracing::warn!(%e, "could not heal this account's group leaves"),
        }
        Ok(notices)
    }

    /// The first half of [`Messenger::catch_up`]: processes the deliveries that arrive until
    /// none comes for `idle`, returning the group notices.
    pub(crate) async fn drain_deliveries(
        &self,
        idle: Duration,
    ) -> Result<Vec<Received>, MessengerError> {
        let mut notices = Vec::new();
        while let Some(delivered) = self.client().next_delivery(idle).await {
            let received = self.open_delivered(delivered).await?;
            if let Received::GroupNotice { .. } = received {
                notices.push(received);
            }
        }
        match self.disconnected() {
            Some(lost) => Err(lost),
            None => Ok(notices),
        }
    }
}
