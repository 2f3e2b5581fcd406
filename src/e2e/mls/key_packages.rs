//! The life cycle of this device's key packages (docs/CLIENT.md "Groups", PROTOCOL 5.7):
//! which ones to make and publish, when the last-resort one is replaced, and when the private
//! keys of key packages that will never be used leave the state.
//!
//! The key packages this device made are the `KeyPackage` entries of openmls's storage (a
//! `KeyPackageBundle`: the key package with its private init and leaf encryption keys, written
//! by `KeyPackageBuilder::build` and nothing else). A welcome consumes its one-time key
//! package's entry; one fetched by someone who never sends the welcome stays, so they are
//! pruned here by their MLS lifetime. The leaf's `EncryptionKeyPair` entry is never touched:
//! it only exists once the key package joined a group, and then it is that group's key.
//!
//! Every decision takes `now` (Unix seconds) as an argument, so it is tested with a clock that
//! jumps instead of one that sleeps.

use openmls::prelude::*;
use openmls_traits::storage::StorageProvider as _;

use super::device::{KeyPackageBatch, MAX_KEY_PACKAGE_BATCH, MlsDevice, Session};
use super::error::mls;
use super::store::State;
use super::{MlsError, cert};

/// How long after its lifetime ends a key package's private keys are kept, for a welcome
/// still in flight (a welcome waits in the inbox while this device is offline).
pub const KEY_PACKAGE_GRACE_SECS: u64 = 7 * 24 * 3600;

/// Last-resort key packages counted in the bound on the key packages a state holds (the
/// current one and the one it replaced, whose welcomes may still be in flight).
pub const LAST_RESORT_KEPT: usize = 2;

/// A key package is replaced once less than `1 / ROTATE_FRACTION` of its lifetime remains.
pub const ROTATE_FRACTION: u64 = 3;

/// The storage label openmls's memory storage gives key package bundles.
const KEY_PACKAGE_LABEL: &[u8] = b"KeyPackage";

/// What the server holds for this device (the answer to an empty `publish_key_packages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerKeyPackages {
    /// One-time key packages it holds.
    pub one_time: u32,
    /// Whether it holds a last-resort one.
    pub last_resort: bool,
}

/// A key package this device holds the private keys of.
#[derive(Debug, Clone)]
struct Held {
    reference: KeyPackageRef,
    not_before: u64,
    not_after: u64,
    last_resort: bool,
}

impl Held {
    /// Whether less than a third of its lifetime remains at `now`.
    fn ageing(&self, now: u64) -> bool {
        let lifetime = self.not_after.saturating_sub(self.not_before);
        self.not_after
            .saturating_sub(now)
            .saturating_mul(ROTATE_FRACTION)
            < lifetime
    }
}

/// What [`MlsDevice::refresh_key_packages`] will do.
#[derive(Debug, Clone, Default)]
struct Plan {
    /// One-time key packages to make.
    one_time: usize,
    /// Whether to make a new last-resort key package.
    last_resort: bool,
    /// Key packages whose private keys go.
    prune: Vec<KeyPackageRef>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.one_time == 0 && !self.last_resort && self.prune.is_empty()
    }
}

/// The key packages in the state at `path`, oldest (soonest ending) first.
fn held(state: &State, path: &std::path::Path) -> Result<Vec<Held>, MlsError> {
    let corrupt = |reason: &str| MlsError::CorruptState {
        path: path.to_owned(),
        reason: reason.into(),
    };
    let values = state
        .provider
        .storage()
        .values
        .read()
        .map_err(|_| corrupt("the storage lock is poisoned"))?;
    let mut out = Vec::new();
    for (key, value) in values.iter() {
        if !key.starts_with(KEY_PACKAGE_LABEL) {
            continue;
        }
        let bundle: KeyPackageBundle = serde_json::from_slice(value)
            .map_err(|_| corrupt("an undecodable key package bundle"))?;
        let package = bundle.key_package();
        let reference = package.hash_ref(state.provider.crypto()).map_err(mls)?;
        out.push(Held {
            reference,
            not_before: package.life_time().not_before(),
            not_after: package.life_time().not_after(),
            last_resort: package.last_resort(),
        });
    }
    out.sort_by_key(|h| (h.not_after, h.reference.as_slice().to_vec()));
    Ok(out)
}

/// Decides what to make and what to prune at `now`, given what the server holds and the
/// one-time `target` (see docs/CLIENT.md "Groups" for the rule in words).
fn plan(held: &[Held], server: ServerKeyPackages, target: usize, now: u64) -> Plan {
    let mut plan = Plan::default();
    // 1. Private keys whose lifetime ended more than the grace period ago.
    let (gone, live): (Vec<&Held>, Vec<&Held>) = held
        .iter()
        .partition(|h| h.not_after.saturating_add(KEY_PACKAGE_GRACE_SECS) <= now);
    plan.prune.extend(gone.iter().map(|h| h.reference.clone()));
    // 2. The last-resort key package: replaced when the server has none, or when the newest
    //    one this device holds is missing, ended, or in the last third of its lifetime.
    let newest_last_resort = live.iter().rev().find(|h| h.last_resort);
    plan.last_resort = !server.last_resort
        || newest_last_resort.is_none_or(|h| h.not_after <= now || h.ageing(now));
    // 3. One-time key packages: topped up to the target when the server holds less than half
    //    of it; a fresh batch when even the newest one is in the last third of its lifetime
    //    (the server drops the old ones a day before they end).
    let held_one_time = server.one_time as usize;
    let room = crate::protocol::groups::MAX_KEY_PACKAGES_STORED.saturating_sub(held_one_time);
    let newest_one_time = live.iter().rev().find(|h| !h.last_resort);
    if held_one_time < target / 2 {
        plan.one_time = target.saturating_sub(held_one_time);
    } else if held_one_time > 0 && newest_one_time.is_none_or(|h| h.ageing(now)) {
        plan.one_time = target;
    }
    plan.one_time = plan.one_time.min(room).min(MAX_KEY_PACKAGE_BATCH);
    // 4. The bound: at most 2 × target one-time ones and [`LAST_RESORT_KEPT`] last-resort
    //    ones after the new ones are made. The ended ones go first, then one-time ones, then
    //    older last-resort ones, oldest first in each; never the newest last-resort one (the
    //    server hands it out until a new one is uploaded).
    let bound = max_held(target);
    let newest_last_resort = newest_last_resort.map(|h| h.reference.as_slice());
    let mut candidates: Vec<&&Held> = live
        .iter()
        .filter(|h| Some(h.reference.as_slice()) != newest_last_resort)
        .collect();
    candidates.sort_by_key(|h| (h.not_after > now, h.last_resort, h.not_after));
    let count = live.len() + plan.one_time + usize::from(plan.last_resort);
    plan.prune.extend(
        candidates
            .into_iter()
            .take(count.saturating_sub(bound))
            .map(|h| h.reference.clone()),
    );
    plan
}

/// Most key packages whose private keys a state holds for a one-time `target`.
pub fn max_held(target: usize) -> usize {
    target.saturating_mul(2).saturating_add(LAST_RESORT_KEPT)
}

/// Makes one key package (its bundle written to the session's storage); TLS-encoded.
pub(super) fn make_key_package(
    s: &Session<'_>,
    extensions: &Extensions<LeafNode>,
    last_resort: bool,
) -> Result<Vec<u8>, MlsError> {
    use openmls::prelude::tls_codec::Serialize as _;
    let mut builder = KeyPackage::builder()
        .leaf_node_capabilities(cert::capabilities())
        .leaf_node_extensions(extensions.clone());
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(cert::CIPHERSUITE, s.provider(), &s.signer, s.credential())
        .map_err(mls)?;
    bundle.key_package().tls_serialize_detached().map_err(mls)
}

impl MlsDevice {
    /// Runs the key package life cycle at `now`: prunes the private keys of key packages that
    /// ended more than [`KEY_PACKAGE_GRACE_SECS`] ago and keeps at most [`max_held`]`(target)`
    /// of them, replaces an ageing last-resort key package, and makes the one-time ones the
    /// server needs (see docs/CLIENT.md "Groups"). Returns what to publish (empty when nothing
    /// is due); the state is saved before it returns, and not written at all when nothing is
    /// due.
    pub fn refresh_key_packages(
        &self,
        now: u64,
        server: ServerKeyPackages,
        target: usize,
    ) -> Result<KeyPackageBatch, MlsError> {
        let path = self.state_path();
        let due =
            self.read(|s| Ok(!plan(&held(s.state, &path)?, server, target, now).is_empty()))?;
        if !due {
            return Ok(KeyPackageBatch::default());
        }
        self.change(|s| {
            let plan = plan(&held(s.state, &path)?, server, target, now);
            for reference in &plan.prune {
                s.provider()
                    .storage()
                    .delete_key_package(reference)
                    .map_err(mls)?;
            }
            if !plan.prune.is_empty() {
                tracing::debug!(pruned = plan.prune.len(), "pruned key package private keys");
            }
            let extensions = cert::leaf_extensions(&s.state.header.certification)?;
            let mut batch = KeyPackageBatch::default();
            for _ in 0..plan.one_time {
                batch
                    .one_time
                    .push(make_key_package(s, &extensions, false)?);
            }
            if plan.last_resort {
                batch.last_resort = Some(make_key_package(s, &extensions, true)?);
            }
            Ok(batch)
        })
    }

    /// How many key packages this device holds the private keys of (one-time, last-resort).
    pub fn held_key_packages(&self) -> Result<(usize, usize), MlsError> {
        let path = self.state_path();
        self.read(|s| {
            let held = held(s.state, &path)?;
            let last_resort = held.iter().filter(|h| h.last_resort).count();
            Ok((held.len() - last_resort, last_resort))
        })
    }
}

#[cfg(test)]
impl MlsDevice {
    /// Makes `count` key packages with the given MLS lifetime (tests only: a clock that
    /// jumps for the key packages themselves).
    pub(super) fn key_packages_lasting(
        &self,
        count: usize,
        last_resort: bool,
        lifetime: Lifetime,
    ) -> Result<Vec<Vec<u8>>, MlsError> {
        use openmls::prelude::tls_codec::Serialize as _;
        self.change(|s| {
            let extensions = cert::leaf_extensions(&s.state.header.certification)?;
            (0..count)
                .map(|_| {
                    let mut builder = KeyPackage::builder()
                        .leaf_node_capabilities(cert::capabilities())
                        .leaf_node_extensions(extensions.clone())
                        .key_package_lifetime(lifetime);
                    if last_resort {
                        builder = builder.mark_as_last_resort();
                    }
                    let bundle = builder
                        .build(cert::CIPHERSUITE, s.provider(), &s.signer, s.credential())
                        .map_err(mls)?;
                    bundle.key_package().tls_serialize_detached().map_err(mls)
                })
                .collect()
        })
    }

    /// The `(not_after, last_resort)` of every key package held, oldest first.
    pub(super) fn held_ends(&self) -> Result<Vec<(u64, bool)>, MlsError> {
        let path = self.state_path();
        self.read(|s| {
            Ok(held(s.state, &path)?
                .iter()
                .map(|h| (h.not_after, h.last_resort))
                .collect())
        })
    }
}
