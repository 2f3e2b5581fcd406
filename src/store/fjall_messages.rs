//! The fjall store's message operations: appends (each copy's inbox resolved from memory
//! when it can be), reading a device's pending messages (with the bodies they share, see
//! `shared_bodies`) and removing them (acks kept in memory during an outage, see `outage`),
//! and the purge of expired messages. The inboxes themselves
//! are written only by the inbox writer (`inbox_writer`).

use std::collections::{BTreeMap, BTreeSet};

use fjall::Readable;

use super::devices::InboxId;
use super::fjall_open::Inner;
use super::fjall_store::{FjallStore, decode};
use super::inbox_writer::{Addressed, Target};
use super::shared_bodies::{MessageFootprint, footprint, read_message};
use super::user_ids::{UserId, decode_id, inbox_key, inbox_seq};
use super::{AppendHooks, Appended, DeviceId, NewMessage, Removal, StoreError, StoredMessage};
use crate::protocol::Username;

impl FjallStore {
    /// The account id of `user` and the inbox id of its `device`, from memory or else the
    /// store: [`StoreError::UnknownUser`] without an account, [`StoreError::UnknownDevice`]
    /// if the device is not current.
    async fn target_in(
        &self,
        inner: &Inner,
        user: &Username,
        device: DeviceId,
    ) -> Result<Target, StoreError> {
        let id = self
            .user_id_in(inner, user)
            .await?
            .ok_or_else(|| StoreError::UnknownUser(user.clone()))?;
        let inbox = match inner.devices.cached_inbox(id, device)? {
            Some(inbox) => inbox,
            None => {
                self.call(move |db| db.devices.load_inbox(id, device))
                    .await?
            }
        };
        let inbox = inbox.ok_or_else(|| StoreError::UnknownDevice(user.clone(), device))?;
        Ok(Target { user: id, inbox })
    }

    /// The inbox of `user`'s `device`; `None` if either is unknown.
    async fn inbox_of(
        &self,
        user: &Username,
        device: DeviceId,
    ) -> Result<Option<InboxId>, StoreError> {
        let inner = self.current()?;
        match self.target_in(&inner, user, device).await {
            Ok(target) => Ok(Some(target.inbox)),
            Err(StoreError::UnknownUser(_) | StoreError::UnknownDevice(..)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// An ack during an outage: kept in memory until the store reopens (see `outage`);
    /// returns how many of `seqs` were pending.
    async fn defer_ack(&self, id: InboxId, seqs: Vec<u64>) -> Result<u64, StoreError> {
        let known = self.shared.outage.deferred_acks(id)?.unwrap_or_default();
        let fresh: Vec<u64> = seqs.into_iter().filter(|s| !known.contains(s)).collect();
        let pending = {
            let fresh = fresh.clone();
            self.call(move |db| {
                let mut pending = 0;
                for seq in fresh {
                    pending += u64::from(db.inbox.inbox.contains_key(inbox_key(id, seq))?);
                }
                Ok(pending)
            })
            .await?
        };
        if self.shared.outage.defer_ack(id, &fresh)? {
            return Ok(pending);
        }
        // The outage ended meanwhile: write it.
        let inner = self.writer()?;
        let writer = inner.writer.as_ref().ok_or(StoreError::Unavailable)?;
        writer.remove(id, fresh, Removal::Acknowledged).await
    }

    pub(super) async fn append_now(
        &self,
        message: NewMessage,
        hooks: AppendHooks,
    ) -> Result<Appended, StoreError> {
        let inner = self.writer()?;
        let writer = inner.writer.as_ref().ok_or(StoreError::Unavailable)?;
        let sender = match inner.ids.cached(&message.sender)? {
            Some(id) => id,
            None => Box::pin(self.user_id_in(&inner, &message.sender))
                .await?
                .ok_or_else(|| StoreError::UnknownUser(message.sender.clone()))?,
        };
        let mut targets = Vec::with_capacity(message.copies.len());
        for copy in &message.copies {
            // From memory, without a future, for every account used lately.
            let target = match cached_target(&inner, &copy.recipient, copy.device)? {
                Some(target) => target,
                // Boxed: the future of every append would otherwise carry its space.
                None => Box::pin(self.target_in(&inner, &copy.recipient, copy.device)).await?,
            };
            targets.push(target);
        }
        let message = Addressed {
            message,
            sender,
            targets,
        };
        writer.append(message, hooks).await
    }

    pub(super) async fn pending_now(
        &self,
        user: &Username,
        device: DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let Some(id) = self.inbox_of(user, device).await? else {
            return Ok(Vec::new());
        };
        let (start, end) = (
            inbox_key(id, after.saturating_add(1)),
            inbox_key(id, u64::MAX),
        );
        // Acks kept in memory during an outage hide their messages until they are removed.
        let acked = if self.shared.outage.is_down() {
            self.shared.outage.deferred_acks(id)?.unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        self.call(move |db| {
            let mut messages = Vec::new();
            // One view of the entries and the bodies they share (see `shared_bodies`).
            let snapshot = db.db.snapshot();
            let mut entries = snapshot.range(&db.inbox.inbox, start..=end);
            while messages.len() < limit {
                let Some(entry) = entries.next() else { break };
                let (key, value) = entry.into_inner()?;
                if !acked.is_empty() && acked.contains(&inbox_seq(&key)) {
                    continue;
                }
                messages.push(read_message(&snapshot, &db.inbox, &value)?);
            }
            Ok(messages)
        })
        .await
    }

    pub(super) async fn remove_pending_now(
        &self,
        user: &Username,
        device: DeviceId,
        seqs: Vec<u64>,
        removal: Removal,
    ) -> Result<u64, StoreError> {
        let Some(id) = self.inbox_of(user, device).await? else {
            return Ok(0);
        };
        if removal == Removal::Acknowledged && self.shared.outage.is_down() {
            return self.defer_ack(id, seqs).await;
        }
        let result = match self.writer() {
            Ok(inner) => match inner.writer.as_ref() {
                Some(writer) => writer.remove(id, seqs.clone(), removal).await,
                None => Err(StoreError::Unavailable),
            },
            Err(e) => Err(e),
        };
        match result {
            // The outage began meanwhile.
            Err(StoreError::Unavailable) if removal == Removal::Acknowledged => {
                self.defer_ack(id, seqs).await
            }
            result => result,
        }
    }

    pub(super) async fn purge_expired_messages_now(&self, now: u64) -> Result<u64, StoreError> {
        self.writable()?;
        let (expired, forgotten) = self
            .call(move |db| {
                let mut expired: Vec<(UserId, u64)> = Vec::new();
                for entry in db.inbox.inbox.iter() {
                    let (key, value) = entry.into_inner()?;
                    let message: Expiry = decode("inbox", &value)?;
                    if message.expires_at <= now {
                        let id = key.get(..4).ok_or_else(|| StoreError::Corrupt {
                            keyspace: "inbox",
                            reason: "a key is shorter than a user id".into(),
                        })?;
                        expired.push((decode_id("inbox", id)?, message.seq));
                    }
                }
                let mut by_user: BTreeMap<UserId, Vec<u64>> = BTreeMap::new();
                for (id, seq) in expired {
                    by_user.entry(id).or_default().push(seq);
                }
                let mut forgotten = Vec::new();
                for entry in db.inbox.sent.iter() {
                    let (key, value) = entry.into_inner()?;
                    if super::sent_records::expires_at(&value)? <= now {
                        forgotten.push(key.to_vec());
                    }
                }
                Ok((by_user, forgotten))
            })
            .await?;
        let inner = self.writer()?;
        let writer = inner.writer.as_ref().ok_or(StoreError::Unavailable)?;
        let mut removed = 0;
        for (id, seqs) in expired {
            removed += writer.remove(id, seqs, Removal::Acknowledged).await?;
        }
        if !forgotten.is_empty() {
            writer.forget_sent(forgotten).await?;
        }
        Ok(removed)
    }
}

impl FjallStore {
    /// What the message keyspaces hold: the entries and bytes of the inboxes, send records,
    /// shared bodies and their counts, and whether every count equals the entries that
    /// reference its body. Reads every entry, from one snapshot: for tests and measurements,
    /// not for serving.
    pub async fn message_footprint(&self) -> Result<MessageFootprint, StoreError> {
        self.call(|db| footprint(&db.db.snapshot(), &db.inbox))
            .await
    }
}

/// What the purge reads of an inbox entry (the rest, its body above all, is skipped).
#[derive(serde::Deserialize)]
struct Expiry {
    seq: u64,
    expires_at: u64,
}

/// [`FjallStore::target_in`] if both the account's id and its devices are in memory.
fn cached_target(
    inner: &Inner,
    user: &Username,
    device: DeviceId,
) -> Result<Option<Target>, StoreError> {
    let Some(id) = inner.ids.cached(user)? else {
        return Ok(None);
    };
    match inner.devices.cached_inbox(id, device)? {
        Some(Some(inbox)) => Ok(Some(Target { user: id, inbox })),
        Some(None) => Err(StoreError::UnknownDevice(user.clone(), device)),
        None => Ok(None),
    }
}
