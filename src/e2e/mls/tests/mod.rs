//! Offline tests of the MLS member: several devices in one process, each with its own
//! temporary home, and a few lines standing in for the delivery service (which orders
//! commits by epoch and hands every member the same bytes in the same order).

use std::collections::BTreeMap;

use super::*;
use crate::e2e::{IdentityKey, IdentityKeyPair};

mod flows;
mod key_packages;
mod policy;
mod state;

/// One device of a user, with its own home.
struct Dev {
    home: tempfile::TempDir,
    mls: MlsDevice,
    identity: IdentityKeyPair,
}

impl Dev {
    fn new(user: &str, device: u32) -> Self {
        Self::with_identity(user, device, IdentityKeyPair::generate().unwrap())
    }

    fn with_identity(user: &str, device: u32, identity: IdentityKeyPair) -> Self {
        let home = tempfile::tempdir().unwrap();
        let member = MemberId {
            user: user.into(),
            device,
        };
        let mls = MlsDevice::open(home.path(), member, &identity).unwrap();
        Self {
            home,
            mls,
            identity,
        }
    }

    fn user(&self) -> String {
        self.mls.member().user.clone()
    }

    /// One key package, as the server would hand it out.
    fn key_package(&self) -> FetchedKeyPackage {
        let batch = self.mls.key_packages(1, false).unwrap();
        FetchedKeyPackage {
            user: self.user(),
            bytes: batch.one_time[0].clone(),
        }
    }
}

/// The identities pinned for every user of `devs` (what a client learned from the key
/// directory and trusts).
fn pins(devs: &[&Dev]) -> BTreeMap<String, IdentityKey> {
    devs.iter()
        .map(|d| (d.user(), d.identity.public()))
        .collect()
}

/// A group made by `creator` with the other devices added in one commit and joined.
fn group_of(creator: &Dev, others: &[&Dev], all: &BTreeMap<String, IdentityKey>) -> MlsGroupId {
    let id = creator.mls.create_group().unwrap();
    let kps: Vec<_> = others.iter().map(|d| d.key_package()).collect();
    let commit = creator.mls.add_members(&id, &kps, all).unwrap();
    creator.mls.commit_accepted(&id).unwrap();
    let welcome = commit.welcome.unwrap();
    for d in others {
        let joined = d.mls.process(&welcome, all).unwrap();
        assert!(matches!(joined, Incoming::Joined { group, .. } if group == id));
    }
    id
}

/// Hands `bytes` to each of `devs` in turn, as their inboxes would.
fn deliver(devs: &[&Dev], bytes: &[u8], all: &BTreeMap<String, IdentityKey>) -> Vec<Incoming> {
    devs.iter()
        .map(|d| d.mls.process(bytes, all).unwrap())
        .collect()
}

fn epoch(dev: &Dev, id: &MlsGroupId) -> u64 {
    dev.mls.group(id).unwrap().epoch
}
