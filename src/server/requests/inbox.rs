//! The inbox requests of a device: `ack` (delete what was delivered) and `unsend` (delete
//! every copy of a message one sent, if no copy was delivered yet).

use super::{Control, MAX_ACK, error, store_error};
use crate::protocol::{ErrorCode, MessageId, Reply, Username};
use crate::server::router::Inbox;
use crate::store::Removal;

impl Control {
    pub(super) async fn ack(&mut self, me: &Inbox, seqs: Vec<u64>) -> Reply {
        if seqs.len() > MAX_ACK {
            return error(
                ErrorCode::BadRequest,
                format!("at most {MAX_ACK} seqs per ack"),
            );
        }
        let store = self.shared.accounts.store();
        match store
            .remove_pending(&me.user, me.device, seqs.clone(), Removal::Acknowledged)
            .await
        {
            Ok(removed) => {
                crate::server::metrics::messages_delivered(removed);
                self.shared.router.release(me, &seqs);
                Reply::Acked { removed }
            }
            Err(e) => store_error(&e),
        }
    }

    pub(super) async fn unsend(&mut self, me: &Username, message_id: MessageId) -> Reply {
        let store = self.shared.accounts.store();
        let record = match store.sent(me, message_id).await {
            Ok(Some(record)) => record,
            Ok(None) => return Reply::Unsent { deleted: false },
            Err(e) => return store_error(&e),
        };
        let copies: Vec<(Inbox, u64)> = record
            .copies
            .iter()
            .map(|c| (Inbox::new(&c.recipient, c.device), c.seq))
            .collect();
        // Group traffic is never unsent: a commit taken back would leave the members behind
        // the delivery service's epoch (docs/PROTOCOL.md 5.7).
        if let Some((inbox, seq)) = copies.first() {
            match store
                .pending(&inbox.user, inbox.device, seq.saturating_sub(1), 1)
                .await
            {
                Ok(found) => {
                    let is_group = found.first().is_some_and(|m| {
                        m.seq == *seq && !crate::server::groups::is_plain_kind(&m.kind)
                    });
                    if is_group {
                        return Reply::Unsent { deleted: false };
                    }
                }
                Err(e) => return store_error(&e),
            }
        }
        // All copies or none: one copy already handed to a device means the message was
        // delivered, and the others stay.
        if !self.shared.router.cancel_all(&copies) {
            return Reply::Unsent { deleted: false };
        }
        let mut removed = 0;
        for (inbox, seq) in copies.iter() {
            match store
                .remove_pending(&inbox.user, inbox.device, vec![*seq], Removal::Unsent)
                .await
            {
                Ok(n) => removed += n,
                Err(e) => return store_error(&e),
            }
        }
        crate::server::metrics::messages_unsent(removed);
        Reply::Unsent {
            deleted: removed == copies.len() as u64,
        }
    }
}
