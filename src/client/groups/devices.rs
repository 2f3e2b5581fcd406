//! The account's devices in its groups (docs/PROTOCOL.md 5.7, "Devices"): a device linked to
//! the account is added to every group the account is in, and a device removed from it loses
//! its leaves there.
//!
//! - Right after a link, the linking device adds the new one
//!   ([`Messenger::add_device_to_groups`], waiting for its key packages).
//! - Removing a device ([`Messenger::remove_device`]) sends the server a revocation signed by
//!   the account's identity key, then commits the removal of the device's leaves in every
//!   group, with the revocation in each commit's authenticated data.
//! - The server passes the revocation to the device's groups (the `device_removed` notice):
//!   any member that processes it commits the removal (`receive`).
//! - Self-healing ([`Messenger::heal_group_devices`], run by [`Messenger::catch_up`]): a member
//!   compares its own account's current devices with its user's leaves in each group, adds
//!   the devices without a leaf and removes the leaves of devices gone.
//!
//! Each change is idempotent: two devices of the account making it at once race at the epoch;
//! one wins, the other gets `stale_epoch`, receives the winning commit and finds nothing left
//! to do.

use std::time::Duration;

use super::super::messenger::{Messenger, MessengerError};
use super::ops::blocking;
use crate::client::keystore::DeviceId;
use crate::e2e::mls::{FetchedKeyPackage, MemberId, MlsError, revoke};
use crate::protocol::groups::DeviceRevocation;
use crate::protocol::{ErrorCode, Password};

/// How long a change that lost its epoch waits for the winning commit before trying again.
const STALE_IDLE: Duration = Duration::from_millis(300);
/// How many times a change that lost its epoch is made again.
const STALE_RETRIES: usize = 3;
/// The first pause while a linked device has not published its key packages yet (it doubles,
/// up to [`MAX_KEY_PACKAGE_PAUSE`]); each try is a `fetch_key_packages`, limited per minute.
const KEY_PACKAGE_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between two tries.
const MAX_KEY_PACKAGE_PAUSE: Duration = Duration::from_secs(2);

/// What a device change did to this device's groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceChanges {
    /// The groups whose commit this device made, by name.
    pub changed: Vec<String>,
    /// The groups where it could not be made now (another member will, or the next catch-up),
    /// with why.
    pub deferred: Vec<(String, String)>,
}

/// What one group's change came to.
enum Outcome {
    /// This device's commit was ordered.
    Committed,
    /// Nothing to do (another device made the change first, or there was none).
    Nothing,
}

fn is_stale(e: &MessengerError) -> bool {
    matches!(e, MessengerError::Client(c) if c.is_server(ErrorCode::StaleEpoch))
}

impl Messenger {
    /// The names of the groups this device is an active member of, with its user's leaves in
    /// each.
    async fn own_leaves(&self) -> Result<Vec<(String, Vec<DeviceId>)>, MessengerError> {
        let me = self.me().to_owned();
        Ok(self
            .groups()
            .await?
            .into_iter()
            .map(|g| {
                let devices = g
                    .mls
                    .members
                    .iter()
                    .filter(|m| m.user == me)
                    .map(|m| m.device)
                    .collect();
                (g.name, devices)
            })
            .collect())
    }

    /// Makes a change to the group `name` and posts it; when another commit won the epoch,
    /// processes the deliveries waiting (the winning commit among them) and makes the change
    /// again from what the group is then ([`Messenger::group_redo`]: maybe nothing is left
    /// to do), up to [`STALE_RETRIES`] times.
    async fn commit_change<F, Fut>(&self, name: &str, make: F) -> Result<Outcome, MessengerError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<crate::e2e::mls::Commit, MessengerError>>,
    {
        let commit = match make().await {
            Ok(commit) => commit,
            Err(MessengerError::Mls(MlsError::Nothing(_))) => return Ok(Outcome::Nothing),
            Err(e) => return Err(e),
        };
        let (mls, _, name) = self.group_of(name).await?;
        let mut posted = self
            .post_commit(&mls, &name, commit)
            .await
            .map(|_| Outcome::Committed);
        let mut tries = 0;
        loop {
            match posted {
                Err(e) if is_stale(&e) && tries < STALE_RETRIES => {
                    tries += 1;
                    self.drain_deliveries(STALE_IDLE).await?;
                    posted = match self.group_redo(&name).await {
                        Ok(Some(_)) => Ok(Outcome::Committed),
                        Ok(None) => Ok(Outcome::Nothing),
                        Err(e) => Err(e),
                    };
                }
                other => return other,
            }
        }
    }

    /// Adds the account's `devices` to the group `name` from their key packages (those that
    /// have none yet are left out: `no_keys` when none has).
    async fn add_own_devices(
        &self,
        name: &str,
        devices: Vec<DeviceId>,
    ) -> Result<Outcome, MessengerError> {
        let me = self.me().to_owned();
        self.commit_change(name, || async move {
            let (mls, id, _) = self.group_of(name).await?;
            let present: Vec<DeviceId> = {
                let mls = mls.clone();
                blocking(move || mls.group(&id)).await?
            }
            .members
            .into_iter()
            .filter(|m| m.user == me)
            .map(|m| m.device)
            .collect();
            let missing: Vec<DeviceId> = devices
                .into_iter()
                .filter(|d| !present.contains(d))
                .collect();
            if missing.is_empty() {
                return Err(MlsError::Nothing("every device is a member already".into()).into());
            }
            let fetched = self.client().fetch_key_packages(&me, Some(missing)).await?;
            let key_packages: Vec<FetchedKeyPackage> = fetched
                .devices
                .into_iter()
                .map(|d| FetchedKeyPackage {
                    user: me.clone(),
                    bytes: d.key_package,
                })
                .collect();
            let pins = self.pins().await?;
            blocking(move || mls.add_members(&id, &key_packages, &pins)).await
        })
        .await
    }

    /// Removes the leaves of `devices` from the group `name`, the commit carrying
    /// `revocations` (for devices of other users; this user's own need none).
    async fn remove_devices_from(
        &self,
        name: &str,
        devices: Vec<MemberId>,
        revocations: Vec<DeviceRevocation>,
    ) -> Result<Outcome, MessengerError> {
        self.commit_change(name, || async move {
            let (mls, id, _) = self.group_of(name).await?;
            blocking(move || mls.remove_devices(&id, &devices, &revocations)).await
        })
        .await
    }

    /// Adds the account's `device` (just linked by this one) to every group this device is
    /// in. Its key packages may not be on the server yet (the new device publishes them once
    /// it has the account's keys): waits for them at most `wait`, trying again with growing
    /// pauses. A group where another device of the account added it meanwhile is left as it
    /// is.
    pub async fn add_device_to_groups(
        &self,
        device: DeviceId,
        wait: Duration,
    ) -> Result<DeviceChanges, MessengerError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = DeviceChanges::default();
        let mut pause = KEY_PACKAGE_PAUSE;
        for (name, leaves) in self.own_leaves().await? {
            if leaves.contains(&device) {
                continue;
            }
            loop {
                match self.add_own_devices(&name, vec![device]).await {
                    Ok(Outcome::Committed) => changes.changed.push(name.clone()),
                    Ok(Outcome::Nothing) => {}
                    Err(MessengerError::Client(e))
                        if e.is_server(ErrorCode::NoKeys)
                            && tokio::time::Instant::now() + pause < deadline =>
                    {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_KEY_PACKAGE_PAUSE);
                        continue;
                    }
                    Err(e) if e.is_disconnected() => return Err(e),
                    Err(e) => changes.deferred.push((name.clone(), e.to_string())),
                }
                break;
            }
        }
        Ok(changes)
    }

    /// Removes `device` from the account (with the password, checked again by the server),
    /// sending a revocation signed by the account's identity key, which the server passes to
    /// the device's groups; then commits the removal of the device's leaves in every group
    /// this device is in. A group where that fails now is left to its other members (they
    /// got the revocation) and to this account's next catch-up.
    pub async fn remove_device(
        &self,
        device: DeviceId,
        password: Password,
    ) -> Result<DeviceChanges, MessengerError> {
        let me = self.me().to_owned();
        let revocation = {
            let member = MemberId {
                user: me.clone(),
                device,
            };
            self.keystore()
                .read_async(move |s| s.map(|s| revoke(&s.identity(), &member)))
                .await?
                .ok_or(MessengerError::NoKeys)?
        };
        crate::client::link::send_removal(
            &self.client(),
            device,
            password,
            Some(revocation.signature),
        )
        .await?;
        let mut changes = DeviceChanges::default();
        let gone = MemberId { user: me, device };
        for (name, leaves) in self.own_leaves().await? {
            if !leaves.contains(&device) {
                continue;
            }
            match self
                .remove_devices_from(&name, vec![gone.clone()], vec![revocation.clone()])
                .await
            {
                Ok(Outcome::Committed) => changes.changed.push(name),
                Ok(Outcome::Nothing) => {}
                Err(e) if e.is_disconnected() => return Err(e),
                Err(e) => changes.deferred.push((name, e.to_string())),
            }
        }
        Ok(changes)
    }

    /// Self-healing of this account's leaves: in every group this device is in, adds the
    /// account's current devices that have no leaf (those with key packages on the server)
    /// and removes the leaves of its devices no longer current (`list_devices`). Run by
    /// [`Messenger::catch_up`]; nothing is asked of the server when this device is in no
    /// group.
    pub async fn heal_group_devices(&self) -> Result<DeviceChanges, MessengerError> {
        let mut changes = DeviceChanges::default();
        let groups = self.own_leaves().await?;
        if groups.is_empty() {
            return Ok(changes);
        }
        let current: Vec<DeviceId> = self
            .client()
            .list_devices()
            .await?
            .into_iter()
            .map(|d| d.device)
            .collect();
        let me = self.me().to_owned();
        for (name, leaves) in groups {
            let gone: Vec<MemberId> = leaves
                .iter()
                .filter(|d| !current.contains(d))
                .map(|&device| MemberId {
                    user: me.clone(),
                    device,
                })
                .collect();
            let missing: Vec<DeviceId> = current
                .iter()
                .copied()
                .filter(|d| !leaves.contains(d))
                .collect();
            let mut outcome = Ok(Outcome::Nothing);
            if !gone.is_empty() {
                outcome = self.remove_devices_from(&name, gone, Vec::new()).await;
            }
            if !missing.is_empty() && outcome.is_ok() {
                outcome = match self.add_own_devices(&name, missing).await {
                    Err(MessengerError::Client(e)) if e.is_server(ErrorCode::NoKeys) => {
                        Ok(Outcome::Nothing)
                    }
                    other => other,
                };
            }
            match outcome {
                Ok(Outcome::Committed) => changes.changed.push(name),
                Ok(Outcome::Nothing) => {}
                Err(e) if e.is_disconnected() => return Err(e),
                Err(e) => {
                    tracing::debug!(group = %name, %e, "could not heal the account's leaves");
                    changes.deferred.push((name, e.to_string()));
                }
            }
        }
        Ok(changes)
    }
}
