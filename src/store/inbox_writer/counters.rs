//! The inbox writer's seq counters in `meta`: their keys and values, the running marker and
//! the epoch (see the writer's module documentation for why counters skip ahead after an
//! unclean stop).

use fjall::PersistMode;

use super::{EPOCH, InboxKeyspaces, RUNNING, WriterState};
use crate::protocol::Username;
use crate::store::devices::InboxId;
use crate::store::{DeviceId, StoreError};

/// The key in `meta` of the seq counter of `user`'s `device`'s inbox (id `inbox`): for
/// device 1 `seq` 0x00 user, as before devices; for another `sqd` 0x00 inbox id (u32 BE),
/// which no name-keyed counter can equal (a name is not empty and `sqd` is not `seq`).
pub(in crate::store) fn counter_key(user: &Username, device: DeviceId, inbox: InboxId) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + user.as_str().len());
    if device == 1 {
        key.extend_from_slice(b"seq\0");
        key.extend_from_slice(user.as_str().as_bytes());
    } else {
        key.extend_from_slice(b"sqd\0");
        key.extend_from_slice(&inbox.to_be_bytes());
    }
    key
}

impl WriterState {
    /// The stored next seq of an inbox (its counter's key in `meta`) and the epoch it was
    /// stored in.
    pub(super) fn load_seq(&self, counter: &[u8]) -> Result<(u64, u64), StoreError> {
        let Some(bytes) = self.ks.meta.get(counter)? else {
            return Ok((0, 0));
        };
        let corrupt = || StoreError::Corrupt {
            keyspace: "meta",
            reason: "a seq counter is neither 8 nor 16 bytes".into(),
        };
        let word = |at: usize| -> Result<u64, StoreError> {
            let part = bytes.get(at..at + 8).ok_or_else(corrupt)?;
            Ok(u64::from_be_bytes(part.try_into().map_err(|_| corrupt())?))
        };
        match bytes.len() {
            8 => Ok((word(0)?, 0)),
            16 => Ok((word(0)?, word(8)?)),
            _ => Err(corrupt()),
        }
    }
}

/// A stored seq counter: the next seq and the epoch it is written in.
pub(super) fn seq_value(next: u64, epoch: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(16);
    value.extend_from_slice(&next.to_be_bytes());
    value.extend_from_slice(&epoch.to_be_bytes());
    value
}

/// Stores the running marker (synced, so a crash from now on is noticed), starting a new
/// epoch if the last writer did not stop cleanly; returns the current epoch.
pub(super) fn mark_running(ks: &InboxKeyspaces) -> Result<u64, StoreError> {
    let mut epoch = match ks.meta.get(EPOCH)? {
        None => 0,
        Some(value) => {
            u64::from_be_bytes(value.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                keyspace: "meta",
                reason: "the seq epoch is not 8 bytes".into(),
            })?)
        }
    };
    let unclean = ks.meta.contains_key(RUNNING)?;
    let mut batch = ks.db.batch().durability(Some(PersistMode::SyncData));
    if unclean {
        epoch = epoch.saturating_add(1);
        batch.insert(&ks.meta, EPOCH, epoch.to_be_bytes().to_vec());
    }
    batch.insert(&ks.meta, RUNNING, Vec::new());
    batch.commit()?;
    if unclean {
        tracing::warn!(
            epoch,
            "the last run did not stop cleanly: inbox sequence numbers jump ahead, so none \
             handed out before the stop is reused"
        );
    }
    Ok(epoch)
}
