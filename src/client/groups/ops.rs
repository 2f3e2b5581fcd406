//! What the [`Messenger`] does to groups: its MLS member opened from the home, the pins its
//! checks use, key packages kept topped up, and the group operations, each posting its MLS
//! message to the delivery service and merging a commit only once the server has ordered it.

use std::collections::BTreeMap;

use super::super::messenger::{Messenger, MessengerError, username};
use super::super::{ClientError, is_offline};
use super::{KIND_MLS, encode_text, group_name};
use crate::e2e::IdentityKey;
use crate::e2e::mls::{
    Commit, FetchedKeyPackage, GroupSummary, MemberId, MlsDevice, MlsError, MlsGroupId,
    PostedCommit, ServerKeyPackages,
};
use crate::protocol::keys::IdentityKeyBytes;
use crate::protocol::{ErrorCode, MessageId};

/// One-time key packages this device keeps on the server (topped up when fewer than half
/// remain, or on the server's `key_packages_low`).
pub const KEY_PACKAGE_TARGET: u32 = 50;

/// A group as this device sees it: its name on the server and its MLS state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// The group's name.
    pub name: String,
    /// Epoch, members, admins.
    pub mls: GroupSummary,
}

/// Runs MLS state work (file lock, file I/O, crypto) off the async runtime.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, MlsError> + Send + 'static,
) -> Result<T, MessengerError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| MessengerError::Client(ClientError::Protocol(e.to_string())))?
        .map_err(MessengerError::from)
}

impl Messenger {
    /// This device's MLS member (created in the home the first time).
    pub async fn mls(&self) -> Result<MlsDevice, MessengerError> {
        let dir = self.keystore().dir().to_owned();
        let (user, device, identity) = self
            .keystore()
            .read_async(|s| s.map(|s| (s.username.clone(), s.device, s.identity())))
            .await?
            .ok_or(MessengerError::NoKeys)?;
        blocking(move || MlsDevice::open(&dir, MemberId { user, device }, &identity)).await
    }

    /// The identity keys pinned for users (and this user's own), which every member's
    /// certification is checked against.
    pub(super) async fn pins(&self) -> Result<BTreeMap<String, IdentityKey>, MessengerError> {
        self.keystore()
            .read_async(|s| {
                s.map(|s| {
                    let mut pins: BTreeMap<String, IdentityKey> = s
                        .pinned
                        .iter()
                        .filter_map(|(user, p)| {
                            Some((user.clone(), IdentityKey::from_bytes(&p.0).ok()?))
                        })
                        .collect();
                    pins.insert(s.username.clone(), s.identity().public());
                    pins
                })
            })
            .await?
            .ok_or(MessengerError::NoKeys)
    }

    /// Pins `user`'s identity key on first sight (as for 1:1 messages); a key other than the
    /// pinned one is only recorded as changed, and the MLS checks refuse its members.
    pub(super) async fn pin_identity(
        &self,
        user: &str,
        key: &IdentityKeyBytes,
    ) -> Result<(), MessengerError> {
        if user == self.me() {
            return Ok(());
        }
        let key = IdentityKey::from_bytes(&key.0)?;
        let user = user.to_owned();
        self.keystore()
            .update_async(move |s| -> Result<(), MessengerError> {
                let s = s.as_mut().ok_or(MessengerError::NoKeys)?;
                s.saw_identity(&user, &key);
                Ok(())
            })
            .await
    }

    /// Fetches and pins the identity keys of users met in a group for the first time.
    pub(super) async fn pin_users(&self, users: &[String]) -> Result<(), MessengerError> {
        for user in users {
            let key = self.client().fetch_identity(user).await?;
            self.pin_identity(user, &key).await?;
        }
        Ok(())
    }

    /// Keeps this device's key packages on the server fresh and topped up: to
    /// [`KEY_PACKAGE_TARGET`] one-time ones when fewer than half remain, a fresh batch when
    /// even the newest is in the last third of its lifetime, a new last-resort one when the
    /// server has none or this device's is in the last third of its lifetime; and prunes the
    /// private keys of key packages that ended a week ago (docs/CLIENT.md "Groups",
    /// [`MlsDevice::refresh_key_packages`]). Returns how many one-time ones the server holds.
    pub async fn ensure_key_packages(&self) -> Result<u32, MessengerError> {
        let (held, last_resort) = self.client().publish_key_packages(Vec::new(), None).await?;
        let server = ServerKeyPackages {
            one_time: held,
            last_resort,
        };
        let mls = self.mls().await?;
        let now = crate::unix_now();
        let batch =
            blocking(move || mls.refresh_key_packages(now, server, KEY_PACKAGE_TARGET as usize))
                .await?;
        if batch.one_time.is_empty() && batch.last_resort.is_none() {
            return Ok(held);
        }
        let (held, _) = self
            .client()
            .publish_key_packages(batch.one_time, batch.last_resort)
            .await?;
        Ok(held)
    }

    /// Creates the group `name` (global on the server; this user its first admin). Returns
    /// the name as folded.
    pub async fn create_group(&self, name: &str) -> Result<String, MessengerError> {
        let name = group_name(name)?.as_str().to_owned();
        let mls = self.mls().await?;
        let created = {
            let (mls, name) = (mls.clone(), name.clone());
            blocking(move || mls.create_named_group(&name)).await?
        };
        match self
            .client()
            .create_group(&name, created.id, created.group_info)
            .await
        {
            Ok(folded) => Ok(folded),
            Err(e) => {
                let id = created.id;
                blocking(move || mls.forget_group(&id)).await?;
                Err(e.into())
            }
        }
    }

    /// The MLS member and the id of the group this device knows as `name`.
    pub(super) async fn group_of(
        &self,
        name: &str,
    ) -> Result<(MlsDevice, MlsGroupId, String), MessengerError> {
        let name = group_name(name)?.as_str().to_owned();
        let mls = self.mls().await?;
        let id = {
            let (mls, name) = (mls.clone(), name.clone());
            blocking(move || mls.group_named(&name)).await?
        };
        let id = id.ok_or(MessengerError::Mls(MlsError::UnknownGroup))?;
        Ok((mls, id, name))
    }

    /// Adds every device of `user` to the group (their key packages fetched, their identity
    /// pinned on first sight and their certifications checked). Only an admin adds others;
    /// anyone adds their own other devices. Returns the devices added.
    pub async fn group_add(&self, name: &str, user: &str) -> Result<Vec<MemberId>, MessengerError> {
        let (mls, id, name) = self.group_of(name).await?;
        let user = username(user)?.as_str().to_owned();
        let fetched = self.client().fetch_key_packages(&user, None).await?;
        self.pin_identity(&user, &fetched.identity_key).await?;
        let key_packages: Vec<FetchedKeyPackage> = fetched
            .devices
            .into_iter()
            .map(|d| FetchedKeyPackage {
                user: user.clone(),
                bytes: d.key_package,
            })
            .collect();
        let pins = self.pins().await?;
        let commit = {
            let mls = mls.clone();
            blocking(move || mls.add_members(&id, &key_packages, &pins)).await?
        };
        let commit = self.post_commit(&mls, &name, commit).await?;
        Ok(commit.added)
    }

    /// Removes every device of `user` from the group (an admin's right, or anyone's for a user
    /// who left or for their own other devices). Returns the devices removed.
    pub async fn group_remove(
        &self,
        name: &str,
        user: &str,
    ) -> Result<Vec<MemberId>, MessengerError> {
        let (mls, id, name) = self.group_of(name).await?;
        let user = username(user)?.as_str().to_owned();
        let commit = {
            let mls = mls.clone();
            blocking(move || mls.remove_user(&id, &user)).await?
        };
        Ok(self.post_commit(&mls, &name, commit).await?.removed)
    }

    /// Makes `user` an admin of the group too (admins only).
    pub async fn group_add_admin(&self, name: &str, user: &str) -> Result<(), MessengerError> {
        let (mls, id, name) = self.group_of(name).await?;
        let user = username(user)?.as_str().to_owned();
        let commit = {
            let mls = mls.clone();
            blocking(move || mls.add_admin(&id, &user)).await?
        };
        self.post_commit(&mls, &name, commit).await.map(|_| ())
    }

    /// Makes again the change of a commit the server refused as stale, once the commit that
    /// won has been received. `None`: nothing left to do.
    pub async fn group_redo(&self, name: &str) -> Result<Option<Vec<MemberId>>, MessengerError> {
        let (mls, id, name) = self.group_of(name).await?;
        let pins = self.pins().await?;
        let commit = {
            let mls = mls.clone();
            blocking(move || mls.redo(&id, &pins)).await?
        };
        match commit {
            Some(commit) => {
                let commit = self.post_commit(&mls, &name, commit).await?;
                Ok(Some([commit.added, commit.removed].concat()))
            }
            None => Ok(None),
        }
    }

    /// Leaves the group: the server stops delivering it to all this user's devices at once
    /// and asks the others to commit the removal; this device forgets the group.
    pub async fn group_leave(&self, name: &str) -> Result<(), MessengerError> {
        let (mls, id, name) = self.group_of(name).await?;
        self.client().leave_group(&name).await?;
        blocking(move || mls.forget_group(&id)).await
    }

    /// Sends a text to the group. Returns its message id.
    pub async fn group_send(&self, name: &str, text: &str) -> Result<MessageId, MessengerError> {
        let (mls, id, name) = self.group_of(name).await?;
        let plaintext = encode_text(text)?;
        let body = blocking(move || mls.send(&id, &plaintext)).await?;
        let message_id = MessageId::random().map_err(crate::e2e::E2eError::from)?;
        self.client()
            .send_group(&name, KIND_MLS, message_id, &body, None)
            .await?;
        Ok(message_id)
    }

    /// The group as this device sees it.
    pub async fn group(&self, name: &str) -> Result<GroupState, MessengerError> {
        let (mls, id, name) = self.group_of(name).await?;
        let summary = blocking(move || mls.group(&id)).await?;
        Ok(GroupState { name, mls: summary })
    }

    /// The groups this device is a member of, by name.
    pub async fn groups(&self) -> Result<Vec<GroupState>, MessengerError> {
        let mls = self.mls().await?;
        let states = blocking(move || {
            let mut states = Vec::new();
            for summary in mls.groups()? {
                if let (true, Some(name)) = (summary.active, mls.name_of(&summary.id)?) {
                    states.push(GroupState { name, mls: summary });
                }
            }
            Ok(states)
        })
        .await?;
        let mut states = states;
        states.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(states)
    }

    /// Posts a commit (and its welcome) to the delivery service: saved as posted first, then
    /// merged once the server has ordered it; dropped when refused (`stale_epoch`: receive
    /// the winning commit, then [`Messenger::group_redo`]). On a lost connection it stays
    /// pending and posted: [`Messenger::group_resume_commits`] posts it again.
    pub(super) async fn post_commit(
        &self,
        mls: &MlsDevice,
        name: &str,
        commit: Commit,
    ) -> Result<Commit, MessengerError> {
        let message_id = MessageId::random().map_err(crate::e2e::E2eError::from)?;
        let mut body = commit.commit.clone();
        let welcome = commit.welcome.as_ref().map(|w| {
            body.extend_from_slice(w);
            w.len() as u64
        });
        let posted = PostedCommit {
            message_id: message_id.0.to_vec(),
            body,
            welcome,
        };
        {
            let (mls, id, posted) = (mls.clone(), commit.group, posted.clone());
            blocking(move || mls.mark_posted(&id, posted)).await?;
        }
        self.send_posted(mls, name, commit.group, posted).await?;
        Ok(commit)
    }

    /// Posts a saved commit and settles it by the server's answer.
    async fn send_posted(
        &self,
        mls: &MlsDevice,
        name: &str,
        group: MlsGroupId,
        posted: PostedCommit,
    ) -> Result<(), MessengerError> {
        let mut id = [0u8; 16];
        if posted.message_id.len() == 16 {
            id.copy_from_slice(&posted.message_id);
        }
        let sent = self
            .client()
            .send_group(name, KIND_MLS, MessageId(id), &posted.body, posted.welcome)
            .await;
        let mls = mls.clone();
        match sent {
            Ok(_) => {
                blocking(move || mls.commit_accepted(&group)).await?;
                Ok(())
            }
            Err(e) if is_offline(&e) => Err(e.into()),
            Err(e) => {
                if e.is_server(ErrorCode::StaleEpoch) {
                    tracing::debug!(group = name, "a commit lost its epoch");
                }
                blocking(move || mls.commit_refused(&group)).await?;
                Err(e.into())
            }
        }
    }

    /// Posts again the commits whose answer was lost (a lost connection, a crash after
    /// sending), under their message ids: the server recognises a repeat. Returns how many
    /// were settled (accepted or refused).
    pub async fn group_resume_commits(&self) -> Result<usize, MessengerError> {
        let mls = self.mls().await?;
        let posted = {
            let mls = mls.clone();
            blocking(move || mls.posted_commits()).await?
        };
        let mut settled = 0;
        for (group, commit) in posted {
            let name = {
                let mls = mls.clone();
                blocking(move || mls.name_of(&group)).await?
            };
            let Some(name) = name else { continue };
            match self.send_posted(&mls, &name, group, commit).await {
                Ok(()) => settled += 1,
                Err(e) if e.is_disconnected() => return Err(e),
                Err(e) => {
                    tracing::debug!(%e, "a posted commit was refused");
                    settled += 1;
                }
            }
        }
        Ok(settled)
    }
}
