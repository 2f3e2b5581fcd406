//! Group deliveries: an MLS message is processed and saved before it is acknowledged (a text
//! is kept in the MLS state until shown, like a 1:1 message in the keystore); a user's leave
//! notice makes this device commit their removal, and so does a device's removal notice once
//! its signed revocation verifies; users met for the first time are pinned
//! (trust on first use) and the message processed again; what the group's policy or the
//! certifications refuse is acknowledged and reported, never retried forever.

use std::collections::VecDeque;

use super::super::Delivered;
use super::super::messenger::{Messenger, MessengerError, Received, username};
use super::ops::blocking;
use super::{KIND_DEVICE_REMOVED, KIND_GROUP_LEFT, KIND_MLS, decode_text};
use crate::e2e::mls::{
    GroupDelivery, Incoming, KeptMessage, MlsDevice, MlsError, verify_revocation,
};
use crate::protocol::MessageId;
use crate::protocol::groups::DeviceRevocation;

/// What happened to a group, for the user (already acknowledged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupNotice {
    /// This device joined the group, added by `by` (`USER/DEVICE`).
    Joined {
        /// Who added it.
        by: String,
    },
    /// A commit changed the group.
    Changed {
        /// Who committed (`USER/DEVICE`).
        by: String,
        /// Devices added (`USER/DEVICE`).
        added: Vec<String>,
        /// Devices removed.
        removed: Vec<String>,
        /// Whether the admins changed.
        admins_changed: bool,
    },
    /// This device was removed from the group: it cannot read what follows.
    Removed {
        /// Who removed it.
        by: String,
    },
    /// A user left; this device committed their removal (or another member will).
    Left {
        /// The user.
        user: String,
    },
    /// A device was removed from its account (the server passed on the account's signed
    /// revocation, checked here); this device committed the removal of its leaf (or another
    /// member did, or will).
    DeviceRemoved {
        /// The account.
        user: String,
        /// The device removed.
        device: crate::protocol::DeviceId,
    },
    /// A group delivery was refused (a broken policy, a certification that does not match
    /// the pinned identity, an unreadable message); it was acknowledged and dropped.
    Refused {
        /// Why.
        reason: String,
    },
}

impl GroupNotice {
    /// In words (names come from others: render before printing to a terminal).
    pub fn describe(&self, group: &str) -> String {
        match self {
            Self::Joined { by } => format!("{group}: you were added by {by}"),
            Self::Changed {
                by,
                added,
                removed,
                admins_changed,
            } => {
                let mut parts = Vec::new();
                if !added.is_empty() {
                    parts.push(format!("added {}", added.join(", ")));
                }
                if !removed.is_empty() {
                    parts.push(format!("removed {}", removed.join(", ")));
                }
                if *admins_changed {
                    parts.push("changed the admins".into());
                }
                if parts.is_empty() {
                    parts.push("updated their keys".into());
                }
                format!("{group}: {by} {}", parts.join("; "))
            }
            Self::Removed { by } => format!("{group}: you were removed by {by}"),
            Self::Left { user } => format!("{group}: {user} left"),
            Self::DeviceRemoved { user, device } => {
                format!("{group}: {user} removed their device {device}")
            }
            Self::Refused { reason } => format!("{group}: a group message was refused: {reason}"),
        }
    }
}

fn kept_to_show(m: KeptMessage) -> Received {
    let mut id = [0u8; 16];
    if m.id.len() == 16 {
        id.copy_from_slice(&m.id);
    }
    Received::Group {
        group: m.group,
        id: MessageId(id),
        from: m.from,
        from_device: m.from_device,
        sent_at: m.sent_at,
        text: decode_text(&m.plaintext),
        seq: Some(m.seq),
    }
}

impl Messenger {
    /// Group messages an earlier run decrypted and never showed: loaded once, then handed out
    /// in order.
    pub(crate) async fn next_group_backlog(&self) -> Result<Option<Received>, MessengerError> {
        let loaded = self.group_backlog_slot(|b| b.is_some())?;
        if !loaded {
            let dir = self.keystore().dir().to_owned();
            let kept = blocking(move || match MlsDevice::open_existing(&dir)? {
                Some(mls) => mls.unshown(),
                None => Ok(Vec::new()),
            })
            .await?;
            self.group_backlog_slot(|b| *b = Some(kept.into_iter().collect()))?;
        }
        let next = self.group_backlog_slot(|b| b.as_mut().and_then(VecDeque::pop_front))?;
        Ok(next.map(kept_to_show))
    }

    fn group_backlog_slot<T>(
        &self,
        f: impl FnOnce(&mut Option<VecDeque<KeptMessage>>) -> T,
    ) -> Result<T, MessengerError> {
        let mut backlog = self
            .group_backlog
            .lock()
            .map_err(|_| MessengerError::Client(super::super::ClientError::Poisoned))?;
        Ok(f(&mut backlog))
    }

    /// A group message was shown: it leaves the MLS state and is acknowledged.
    pub(crate) async fn group_shown(
        &self,
        group: &str,
        id: MessageId,
        seq: Option<u64>,
    ) -> Result<(), MessengerError> {
        if let Some(mls) = {
            let dir = self.keystore().dir().to_owned();
            blocking(move || MlsDevice::open_existing(&dir)).await?
        } {
            let group = group.to_owned();
            blocking(move || mls.shown(&group, &id.0)).await?;
        }
        if let Some(seq) = seq {
            self.client().ack(vec![seq]).await?;
        }
        Ok(())
    }

    /// Processes a group delivery (see the module's doc).
    pub(crate) async fn open_group_delivery(
        &self,
        delivered: Delivered,
    ) -> Result<Received, MessengerError> {
        let group = delivered.group.clone().unwrap_or_default();
        let seq = delivered.seq;
        let notice = |notice: GroupNotice| Received::GroupNotice {
            group: group.clone(),
            notice,
        };
        if let Some(reason) = delivered.refused.clone() {
            self.client().ack(vec![seq]).await?;
            return Ok(notice(GroupNotice::Refused { reason }));
        }
        let received = match delivered.kind.as_str() {
            KIND_MLS => self.process_group_message(&delivered).await?,
            KIND_GROUP_LEFT => self.someone_left(&delivered).await?,
            KIND_DEVICE_REMOVED => self.device_removed(&delivered).await?,
            other => notice(GroupNotice::Refused {
                reason: format!("a group delivery of kind {other:?}"),
            }),
        };
        if !matches!(received, Received::Group { .. }) {
            self.client().ack(vec![seq]).await?;
        }
        Ok(received)
    }

    async fn process_group_message(
        &self,
        delivered: &Delivered,
    ) -> Result<Received, MessengerError> {
        let group = delivered.group.clone().unwrap_or_default();
        let notice = |notice: GroupNotice| Received::GroupNotice {
            group: group.clone(),
            notice,
        };
        let mls = self.mls().await?;
        let mut pinned_once = false;
        let mut resumed_once = false;
        let outcome = loop {
            let pins = self.pins().await?;
            let (mls, group, body, id) = (
                mls.clone(),
                group.clone(),
                delivered.body.clone(),
                delivered.id,
            );
            let (seq, sent_at) = (delivered.seq, delivered.sent_at);
            let outcome = blocking(move || {
                let delivery = GroupDelivery {
                    group: &group,
                    id: &id.0,
                    seq,
                    sent_at,
                };
                mls.process_delivered(&delivery, &body, &pins)
            })
            .await;
            match outcome {
                Err(MessengerError::Mls(MlsError::Unpinned(users))) if !pinned_once => {
                    self.pin_users(&users).await?;
                    pinned_once = true;
                }
                // A commit of this device whose answer was lost may be what this message
                // follows: settle it, then try again.
                Err(MessengerError::Mls(MlsError::Mls(_) | MlsError::PendingCommit))
                    if !resumed_once && self.group_resume_commits().await? > 0 =>
                {
                    resumed_once = true;
                }
                other => break other,
            }
        };
        Ok(match outcome {
            Ok(Incoming::Message {
                sender, plaintext, ..
            }) => Received::Group {
                group: group.clone(),
                id: delivered.id,
                from: sender.user,
                from_device: sender.device,
                sent_at: delivered.sent_at,
                text: decode_text(&plaintext),
                seq: Some(delivered.seq),
            },
            Ok(Incoming::Joined { inviter, .. }) => notice(GroupNotice::Joined {
                by: inviter.to_string(),
            }),
            Ok(Incoming::Commit {
                committer,
                removed_self: true,
                ..
            }) => notice(GroupNotice::Removed {
                by: committer.to_string(),
            }),
            Ok(Incoming::Commit {
                committer,
                added,
                removed,
                admins_changed,
                ..
            }) => notice(GroupNotice::Changed {
                by: committer.to_string(),
                added: added.iter().map(ToString::to_string).collect(),
                removed: removed.iter().map(ToString::to_string).collect(),
                admins_changed,
            }),
            Ok(Incoming::Leaving { member, .. }) => notice(GroupNotice::Left { user: member.user }),
            Ok(Incoming::OwnCommit { .. } | Incoming::Stale { .. })
            | Err(MessengerError::Mls(MlsError::Duplicate)) => Received::Duplicate,
            Err(e) if e.is_disconnected() => return Err(e),
            Err(MessengerError::Mls(e)) => {
                tracing::warn!(group = %group, %e, "refused a group delivery");
                notice(GroupNotice::Refused {
                    reason: e.to_string(),
                })
            }
            Err(e) => return Err(e),
        })
    }

    /// A user left (the server's notice): commit the removal of all their devices, unless
    /// another member already did.
    async fn someone_left(&self, delivered: &Delivered) -> Result<Received, MessengerError> {
        let group = delivered.group.clone().unwrap_or_default();
        let user = String::from_utf8(delivered.body.clone())
            .ok()
            .and_then(|u| username(&u).ok())
            .map(|u| u.as_str().to_owned());
        let Some(user) = user else {
            return Ok(Received::GroupNotice {
                group,
                notice: GroupNotice::Refused {
                    reason: "a leave notice without a username".into(),
                },
            });
        };
        let (mls, id, name) = match self.group_of(&group).await {
            Ok(found) => found,
            Err(MessengerError::Mls(MlsError::UnknownGroup)) => return Ok(Received::Duplicate),
            Err(e) => return Err(e),
        };
        let departed = {
            let (mls, user) = (mls.clone(), user.clone());
            blocking(move || {
                mls.note_departed(&id, &user)?;
                mls.remove_user(&id, &user)
            })
            .await
        };
        match departed {
            Ok(commit) => match self.post_commit(&mls, &name, commit).await {
                Ok(_) => {}
                Err(e) if e.is_disconnected() => return Err(e),
                // Another member's removal won the epoch: nothing left to do.
                Err(e) => tracing::debug!(%e, "the removal of a user who left was not needed"),
            },
            Err(MessengerError::Mls(MlsError::Nothing(_) | MlsError::Inactive)) => {}
            Err(e) => tracing::warn!(%e, "could not commit the removal of a user who left"),
        }
        Ok(Received::GroupNotice {
            group,
            notice: GroupNotice::Left { user },
        })
    }

    /// A device was removed from its account (the server's notice, with the account's signed
    /// revocation): once the revocation verifies with the identity pinned for the account,
    /// commit the removal of the device's leaf with the revocation in the commit, unless
    /// another member already did. The server's word alone removes nothing.
    async fn device_removed(&self, delivered: &Delivered) -> Result<Received, MessengerError> {
        let group = delivered.group.clone().unwrap_or_default();
        let refused = |reason: &str| Received::GroupNotice {
            group: group.clone(),
            notice: GroupNotice::Refused {
                reason: reason.into(),
            },
        };
        let revocation = rmp_serde::from_slice::<DeviceRevocation>(&delivered.body).ok();
        let Some(revocation) = revocation.filter(|r| r.username == delivered.from) else {
            return Ok(refused(
                "a device removal notice that does not name its sender's device",
            ));
        };
        let mut pins = self.pins().await?;
        if !pins.contains_key(&revocation.username) {
            self.pin_users(std::slice::from_ref(&revocation.username))
                .await?;
            pins = self.pins().await?;
        }
        let member = pins
            .get(&revocation.username)
            .and_then(|identity| verify_revocation(&revocation, identity));
        let Some(member) = member else {
            return Ok(refused(
                "a device removal whose revocation does not verify with the pinned identity",
            ));
        };
        let (mls, id, name) = match self.group_of(&group).await {
            Ok(found) => found,
            Err(MessengerError::Mls(MlsError::UnknownGroup)) => return Ok(Received::Duplicate),
            Err(e) => return Err(e),
        };
        let commit = {
            let (mls, member, revocation) = (mls.clone(), member.clone(), revocation.clone());
            blocking(move || mls.remove_devices(&id, &[member], &[revocation])).await
        };
        match commit {
            Ok(commit) => match self.post_commit(&mls, &name, commit).await {
                Ok(_) => {}
                Err(e) if e.is_disconnected() => return Err(e),
                // Another member's removal won the epoch: nothing left to do.
                Err(e) => tracing::debug!(%e, "the removal of a removed device was not needed"),
            },
            Err(MessengerError::Mls(
                MlsError::Nothing(_) | MlsError::Inactive | MlsError::PendingCommit,
            )) => {}
            Err(e) => tracing::warn!(%e, "could not commit the removal of a removed device"),
        }
        Ok(Received::GroupNotice {
            group,
            notice: GroupNotice::DeviceRemoved {
                user: member.user,
                device: member.device,
            },
        })
    }
}
