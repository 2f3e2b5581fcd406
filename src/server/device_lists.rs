//! Every account's current device ids, remembered in memory: each message is checked against
//! the recipient's and the sender's lists (`stale_devices`), and a store read per message for
//! them would cost more than the rest of the check. This server is the only writer of device
//! lists (it adds and removes devices, and deletes accounts), and it forgets a list whenever it
//! changes one, so the memory stays exact. A read that raced with a change is not remembered
//! (the generation moved on), so a stale list cannot be kept either.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::protocol::{DeviceId, Username};
use crate::store::{Store, StoreError};

/// Lists remembered at most; past it the map starts again empty (a list is one store read
/// away).
const CAPACITY: usize = 200_000;

/// One account's current devices, ascending; empty if the account does not exist.
pub type DeviceList = Arc<[DeviceId]>;

#[derive(Default)]
pub struct DeviceLists {
    lists: Mutex<HashMap<Username, DeviceList, foldhash::fast::RandomState>>,
    /// Moves on at every change, so a read that overlapped a change is not remembered.
    generation: AtomicU64,
}

impl DeviceLists {
    /// `user`'s current device ids, ascending (empty: no such account).
    pub async fn get(&self, store: &dyn Store, user: &Username) -> Result<DeviceList, StoreError> {
        if let Some(list) = self.lists.lock().ok().and_then(|l| l.get(user).cloned()) {
            return Ok(list);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let mut ids: Vec<DeviceId> = store.devices(user).await?.iter().map(|d| d.id).collect();
        ids.sort_unstable();
        let list: DeviceList = ids.into();
        // An empty list (no such account, yet) is not remembered: a signup would make it
        // wrong.
        if let Ok(mut lists) = self.lists.lock()
            && !list.is_empty()
            && self.generation.load(Ordering::Acquire) == generation
        {
            if lists.len() >= CAPACITY {
                lists.clear();
            }
            lists.insert(user.clone(), Arc::clone(&list));
        }
        Ok(list)
    }

    /// Forgets `user`'s list: call it after every change to the account's devices (and
    /// before answering the request that made it).
    pub fn forget(&self, user: &Username) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut lists) = self.lists.lock() {
            lists.remove(user);
        }
    }
}
