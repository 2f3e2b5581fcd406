//! The MLS requests of a device (docs/PROTOCOL.md 5.7): key packages (`publish_key_packages`,
//! `fetch_key_packages`) and groups (`create_group`, `leave_group`, `group_info`,
//! `list_groups`), and the `device_removed` notice a `remove_device` with a revocation sends
//! to the removed device's groups. Group sends are message streams: `server::groups::send`.

use std::time::Instant;

use tracing::{info, warn};

use super::{Control, error, rate_limited, store_error, unknown_user};
use crate::protocol::groups::{
    DeviceRevocation, KEY_PACKAGES_LOW, KIND_DEVICE_REMOVED, KIND_GROUP_LEFT,
    MAX_KEY_PACKAGE_BYTES, MAX_KEY_PACKAGES_PER_REQUEST,
};
use crate::protocol::keys::Bin;
use crate::protocol::{
    DeviceId, DeviceKeyPackage, ErrorCode, GroupMember, GroupSummary, MessageId, Reply, Request,
    Username,
};
use crate::server::accounts::ActiveSession;
use crate::server::groups::mls::{self, Refusal};
use crate::server::groups::policy;
use crate::server::groups::send::{delivery_targets, fan_out};
use crate::server::router::Inbox;
use crate::store::{
    Copy, GroupCreated, GroupRecord, KeyPackageUpload, MAX_DEVICES, NewKeyPackage, StoreError,
};

fn refusal(refusal: Refusal) -> Reply {
    error(refusal.code, refusal.message)
}

fn group_name(raw: &str) -> Option<Username> {
    Username::parse(raw).ok()
}

fn invalid_group_name() -> Reply {
    error(
        ErrorCode::InvalidGroupName,
        "a group name has 3 to 32 of a-z, 0-9, '_', '.' and '-'".into(),
    )
}

fn summary(record: &GroupRecord) -> GroupSummary {
    GroupSummary {
        group: record.name.to_string(),
        group_id: Bin(record.id),
        epoch: record.epoch,
        creator: record.creator.to_string(),
        admins: record.admins.iter().map(ToString::to_string).collect(),
        members: record
            .members
            .iter()
            .map(|m| GroupMember {
                username: m.user.to_string(),
                device: m.device,
                leaf: m.leaf,
            })
            .collect(),
        pending_leaves: record
            .pending_leaves
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}

impl Control {
    pub(super) async fn group_request(
        &mut self,
        session: &ActiveSession,
        request: Request,
    ) -> Reply {
        match request {
            Request::PublishKeyPackages {
                key_packages,
                last_resort,
            } => {
                let key_packages = key_packages.into_iter().map(|b| b.into_vec()).collect();
                let last_resort = last_resort.map(|b| b.into_vec());
                self.publish_key_packages(session, key_packages, last_resort)
                    .await
            }
            Request::FetchKeyPackages { username, devices } => {
                self.fetch_key_packages(session, &username, devices).await
            }
            Request::CreateGroup {
                group,
                group_id,
                group_info,
            } => {
                self.create_group(session, &group, group_id.0, &group_info)
                    .await
            }
            Request::LeaveGroup { group } => self.leave_group(session, &group).await,
            Request::GroupInfo { group } => self.group_info(session, &group).await,
            Request::ListGroups => self.list_groups(session).await,
            other => error(
                ErrorCode::UnknownRequest,
                format!("{} is not a group request", other.kind().as_str()),
            ),
        }
    }

    async fn publish_key_packages(
        &mut self,
        session: &ActiveSession,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Reply {
        if key_packages.len() > MAX_KEY_PACKAGES_PER_REQUEST {
            return error(
                ErrorCode::BadRequest,
                format!("at most {MAX_KEY_PACKAGES_PER_REQUEST} key packages per request"),
            );
        }
        let store = self.shared.accounts.store();
        let identity = match store.identity(&session.username).await {
            Ok(Some(identity)) => identity,
            Ok(None) => {
                return error(
                    ErrorCode::InvalidKeys,
                    "publish your identity key (publish_keys) first".into(),
                );
            }
            Err(e) => return store_error(&e),
        };
        let now = crate::unix_now();
        let check = |bytes: Vec<u8>, want_last_resort: bool| -> Result<NewKeyPackage, Refusal> {
            let invalid = |why: String| Refusal::new(ErrorCode::InvalidKeys, why);
            if bytes.len() > MAX_KEY_PACKAGE_BYTES {
                return Err(invalid(format!(
                    "a key package is at most {MAX_KEY_PACKAGE_BYTES} bytes"
                )));
            }
            let checked = mls::check_key_package(&bytes, now)?;
            if checked.leaf.user != session.username || checked.leaf.device != session.device {
                return Err(invalid(format!(
                    "a key package's identity must be {}/{}",
                    session.username, session.device
                )));
            }
            if !checked.leaf.verifies_with(&identity) {
                return Err(invalid(
                    "a key package's certification does not verify with your identity key".into(),
                ));
            }
            if checked.last_resort != want_last_resort {
                return Err(invalid(if want_last_resort {
                    "`last_resort` must carry the last_resort extension".into()
                } else {
                    "`key_packages` must not carry the last_resort extension".into()
                }));
            }
            Ok(NewKeyPackage {
                reference: checked.reference,
                not_after: checked.not_after,
                bytes,
            })
        };
        let mut upload = KeyPackageUpload::default();
        for bytes in key_packages {
            match check(bytes, false) {
                Ok(package) => upload.one_time.push(package),
                Err(r) => return refusal(r),
            }
        }
        if let Some(bytes) = last_resort {
            match check(bytes, true) {
                Ok(package) => upload.last_resort = Some(package),
                Err(r) => return refusal(r),
            }
        }
        match store
            .put_key_packages(&session.username, session.device, upload)
            .await
        {
            Ok(counts) => Reply::KeyPackagesPublished {
                key_packages: counts.one_time,
                last_resort: counts.last_resort,
            },
            Err(StoreError::Limit(why)) => error(ErrorCode::BadRequest, why),
            Err(StoreError::UnknownDevice(..)) => {
                error(ErrorCode::UnknownDevice, "this device was removed".into())
            }
            Err(e) => store_error(&e),
        }
    }

    async fn fetch_key_packages(
        &mut self,
        session: &ActiveSession,
        username: &str,
        devices: Option<Vec<DeviceId>>,
    ) -> Reply {
        let Ok(user) = Username::parse(username) else {
            return unknown_user();
        };
        if let Some(devices) = &devices {
            let mut sorted = devices.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if devices.is_empty() || devices.len() > MAX_DEVICES || sorted.len() != devices.len() {
                return error(
                    ErrorCode::BadRequest,
                    format!("`devices` holds 1 to {MAX_DEVICES} ids, each once"),
                );
            }
        }
        let me = session.username.clone();
        if let Err(wait) = self.shared.bundle_fetches.take(me, Instant::now()) {
            return rate_limited("key package fetches", wait);
        }
        let store = self.shared.accounts.store();
        if let Some(asked) = &devices {
            match store.devices(&user).await {
                Ok(current) if current.is_empty() => return unknown_user(),
                Ok(current) => {
                    if let Some(missing) =
                        asked.iter().find(|d| !current.iter().any(|c| c.id == **d))
                    {
                        return error(
                            ErrorCode::UnknownDevice,
                            format!("{user} has no device {missing}"),
                        );
                    }
                }
                Err(e) => return store_error(&e),
            }
        }
        let taken = match store.take_key_packages(&user, devices).await {
            Ok(Some(taken)) => taken,
            Ok(None) => return self.no_keys(&user).await,
            Err(e) => return store_error(&e),
        };
        // Devices whose ended key packages this fetch deleted are told to upload fresh ones
        // (the same event as when few remain), whatever is left.
        for (device, remaining) in &taken.refill {
            self.shared.router.push_event(
                &Inbox::new(&user, *device),
                Reply::KeyPackagesLow {
                    remaining: *remaining,
                },
            );
        }
        if taken.devices.is_empty() {
            return self.no_keys(&user).await;
        }
        let mut out = Vec::with_capacity(taken.devices.len());
        for package in taken.devices {
            let told = taken.refill.iter().any(|(d, _)| *d == package.device);
            if !told && !package.last_resort && package.remaining < KEY_PACKAGES_LOW {
                self.shared.router.push_event(
                    &Inbox::new(&user, package.device),
                    Reply::KeyPackagesLow {
                        remaining: package.remaining,
                    },
                );
            }
            out.push(DeviceKeyPackage {
                device: package.device,
                key_package: package.key_package,
                last_resort: package.last_resort,
            });
        }
        Reply::KeyPackages {
            username: user.to_string(),
            identity_key: taken.identity,
            devices: out,
        }
    }

    async fn create_group(
        &mut self,
        session: &ActiveSession,
        group: &str,
        group_id: [u8; 16],
        group_info: &[u8],
    ) -> Reply {
        let Some(name) = group_name(group) else {
            return invalid_group_name();
        };
        let new = match mls::new_group(&group_id, group_info) {
            Ok(new) => new,
            Err(r) => return refusal(r),
        };
        if new.creator.user != session.username || new.creator.device != session.device {
            return error(
                ErrorCode::InvalidMls,
                format!(
                    "the group's only member must be {}/{}",
                    session.username, session.device
                ),
            );
        }
        if let Err(r) = policy::check_group_cap(&self.shared, &session.username).await {
            return refusal(r);
        }
        let store = self.shared.accounts.store();
        match store.identity(&session.username).await {
            Ok(Some(identity)) if new.creator.verifies_with(&identity) => {}
            Ok(_) => {
                return error(
                    ErrorCode::InvalidMls,
                    "your leaf's certification does not verify with your identity key".into(),
                );
            }
            Err(e) => return store_error(&e),
        }
        let record = GroupRecord {
            name: name.clone(),
            id: group_id,
            creator: session.username.clone(),
            admins: new.admins,
            epoch: new.epoch,
            members: new.members,
            pending_leaves: Vec::new(),
            recent_commits: Vec::new(),
            state: new.state,
            created_at: crate::unix_now(),
        };
        match store.create_group(record).await {
            Ok(GroupCreated::Created) => {
                info!(group = %name, "group created");
                Reply::GroupCreated {
                    group: name.to_string(),
                    epoch: new.epoch,
                }
            }
            Ok(GroupCreated::NameTaken) => error(
                ErrorCode::GroupExists,
                format!("a group is already named {name}"),
            ),
            Ok(GroupCreated::IdTaken) => error(
                ErrorCode::GroupExists,
                "this MLS group id is taken; choose another".into(),
            ),
            Err(e) => store_error(&e),
        }
    }

    async fn leave_group(&mut self, session: &ActiveSession, group: &str) -> Reply {
        let Some(name) = group_name(group) else {
            return invalid_group_name();
        };
        let _guard = self.shared.group_locks.lock(&name).await;
        let store = self.shared.accounts.store();
        let mut record = match store.group(&name).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                return error(ErrorCode::UnknownGroup, format!("no group is named {name}"));
            }
            Err(e) => return store_error(&e),
        };
        let me = &session.username;
        if record.pending_leaves.contains(me) || !record.members.iter().any(|m| m.user == *me) {
            return error(ErrorCode::NotMember, format!("you are not in {name}"));
        }
        record.pending_leaves.push(me.clone());
        record.pending_leaves.sort();
        let targets = match delivery_targets(&self.shared, &record, session).await {
            Ok(targets) => targets,
            Err(r) => return refusal(r),
        };
        if targets.is_empty() {
            // Nobody left to commit the removal: the group goes, its name is released.
            record.members.clear();
            record.pending_leaves.clear();
        }
        match store.put_group(record).await {
            Ok(_) => {}
            Err(e) => return store_error(&e),
        }
        if !targets.is_empty() {
            let Ok(id) = MessageId::random() else {
                return error(ErrorCode::Internal, "no randomness".into());
            };
            let copies = targets
                .into_iter()
                .map(|(recipient, device)| Copy {
                    recipient,
                    device,
                    body: me.as_str().as_bytes().to_vec(),
                })
                .collect();
            let notice = fan_out(&self.shared, session, &name, KIND_GROUP_LEFT, id, copies).await;
            if !matches!(notice, Reply::Sent { .. }) {
                // The leave stands (nothing more is delivered to the user); the members see it
                // in `group_info`'s `pending_leaves`.
                warn!(group = %name, ?notice, "cannot deliver a leave notice");
            }
        }
        Reply::GroupLeft {
            group: name.to_string(),
        }
    }

    /// After a device of `session`'s account was removed with a signed `revocation`: every
    /// group where that device still has a leaf gets, in its order, the `device_removed`
    /// notice (the revocation) in the inbox of each member device but the sender's, so that
    /// any member may commit the removal of the leaf. The removed device gets nothing more
    /// (it is no longer a current device). Failures are logged: the removal stands, and the
    /// account's other devices remove the leaf when they next catch up.
    pub(super) async fn announce_device_removed(
        &self,
        session: &ActiveSession,
        revocation: &DeviceRevocation,
    ) {
        let store = self.shared.accounts.store();
        let user = &session.username;
        let device = revocation.device;
        let groups = match store.groups_of(user).await {
            Ok(groups) => groups,
            Err(e) => {
                warn!(error = %e, "cannot list the groups of a removed device");
                return;
            }
        };
        let body = match rmp_serde::to_vec_named(revocation) {
            Ok(body) => body,
            Err(e) => {
                warn!(error = %e, "cannot encode a revocation");
                return;
            }
        };
        for listed in groups {
            if listed.leaf_of(user, device).is_none() {
                continue;
            }
            let name = listed.name;
            let _guard = self.shared.group_locks.lock(&name).await;
            // A user who left is being removed whole already (`group_left`).
            let record = match store.group(&name).await {
                Ok(Some(record))
                    if record.leaf_of(user, device).is_some()
                        && !record.pending_leaves.contains(user) =>
                {
                    record
                }
                Ok(_) => continue,
                Err(e) => {
                    warn!(group = %name, error = %e, "cannot read a group");
                    continue;
                }
            };
            let targets = match delivery_targets(&self.shared, &record, session).await {
                Ok(targets) if !targets.is_empty() => targets,
                Ok(_) => continue,
                Err(r) => {
                    warn!(group = %name, refusal = %r, "cannot list a group's devices");
                    continue;
                }
            };
            let Ok(id) = MessageId::random() else {
                warn!("no randomness for a notice id");
                return;
            };
            let copies = targets
                .into_iter()
                .map(|(recipient, device)| Copy {
                    recipient,
                    device,
                    body: body.clone(),
                })
                .collect();
            let notice = fan_out(
                &self.shared,
                session,
                &name,
                KIND_DEVICE_REMOVED,
                id,
                copies,
            )
            .await;
            if !matches!(notice, Reply::Sent { .. }) {
                warn!(group = %name, ?notice, "cannot deliver a device removal notice");
            }
        }
    }

    async fn group_info(&mut self, session: &ActiveSession, group: &str) -> Reply {
        let Some(name) = group_name(group) else {
            return invalid_group_name();
        };
        match self.shared.accounts.store().group(&name).await {
            Ok(Some(record)) if record.delivers_to(&session.username, session.device) => {
                Reply::Group(summary(&record))
            }
            Ok(Some(_)) => error(ErrorCode::NotMember, format!("you are not in {name}")),
            Ok(None) => error(ErrorCode::UnknownGroup, format!("no group is named {name}")),
            Err(e) => store_error(&e),
        }
    }

    async fn list_groups(&mut self, session: &ActiveSession) -> Reply {
        match self
            .shared
            .accounts
            .store()
            .groups_of(&session.username)
            .await
        {
            Ok(records) => Reply::Groups {
                groups: records
                    .iter()
                    .filter(|r| r.delivers_to(&session.username, session.device))
                    .map(summary)
                    .collect(),
            },
            Err(e) => store_error(&e),
        }
    }
}
