//! Group sends (docs/PROTOCOL.md 5.7): a message stream whose header names a `group`. The DS
//! reads the MLS message, checks it under the group's lock (membership, epoch, and for a
//! commit its validity and the policy), and appends it to the member devices' inboxes in one
//! durable write before answering `sent`. The copies carry the same bytes, so the store keeps
//! the message once and each inbox a reference to it (`store::shared_bodies`).

use quinn::{ReadToEndError, RecvStream, VarInt};
use tracing::{debug, warn};

use super::mls::{self, GroupMessage, Refusal};
use super::policy;
use crate::protocol::groups::{KIND_MLS, MAX_PAST_EPOCHS};
use crate::protocol::{DeviceId, ErrorCode, MessageId, Reply, SendHeader, Username};
use crate::server::Shared;
use crate::server::accounts::ActiveSession;
use crate::server::body_budget::ConnectionBudget;
use crate::server::messaging::{
    STREAM_REFUSED, SessionCell, failed, hooks, sender_quota_message, store_failure,
};
use crate::store::{Appended, Copy, GroupRecord, NewMessage, StoreError};
use crate::unix_now;

/// Commit ids a group remembers, to answer a resent commit `sent` (duplicate).
const RECENT_COMMITS: usize = 64;
/// Bytes of copies one group send may make (its body times its recipients): bounds the
/// memory a fan-out holds.
pub(crate) const MAX_FANOUT_BYTES: usize = 64 << 20;

fn refused(id: MessageId, refusal: Refusal) -> Reply {
    Reply::SendFailed {
        message_id: Some(id),
        code: refusal.code,
        message: refusal.message,
        devices: None,
        own_devices: None,
        epoch: refusal.epoch,
    }
}

/// Reads and handles one group send (its header read); returns the event for the sender.
pub(crate) async fn receive_group_message(
    mut stream: RecvStream,
    header: SendHeader,
    shared: &Shared,
    session: &SessionCell,
    budget: &ConnectionBudget,
) -> Option<Reply> {
    let id = header.id;
    let refuse = |stream: &mut RecvStream, code: ErrorCode, why: String| {
        let _ = stream.stop(VarInt::from_u32(STREAM_REFUSED));
        Some(failed(Some(id), code, why))
    };
    let sender = match session.lock().ok().and_then(|s| s.clone()) {
        Some(s) if s.is_active() => s,
        _ => {
            return refuse(
                &mut stream,
                ErrorCode::NotAuthenticated,
                "log in before sending".into(),
            );
        }
    };
    if header.kind != KIND_MLS {
        return refuse(
            &mut stream,
            ErrorCode::BadRequest,
            format!("a group send's kind is `{KIND_MLS}`"),
        );
    }
    if header.length > shared.limits.max_group_message_bytes {
        return refuse(
            &mut stream,
            ErrorCode::MessageTooLarge,
            format!(
                "a group message is at most {} bytes",
                shared.limits.max_group_message_bytes
            ),
        );
    }
    let Ok(group) = Username::parse(header.group.as_deref().unwrap_or_default()) else {
        return refuse(
            &mut stream,
            ErrorCode::InvalidGroupName,
            "not a valid group name".into(),
        );
    };
    if let Err(wait) = shared.send_rate.take(&sender.username) {
        let secs = wait.as_secs().max(1);
        return refuse(
            &mut stream,
            ErrorCode::SendRateLimited,
            format!("your account is sending too many messages; retry in {secs} s"),
        );
    }
    // Membership before the body is read: a non-member's body is not worth reading.
    match shared.accounts.store().group(&group).await {
        Ok(Some(record)) if record.delivers_to(&sender.username, sender.device) => {}
        Ok(Some(_)) => {
            return refuse(
                &mut stream,
                ErrorCode::NotMember,
                format!("you are not a member of {group}"),
            );
        }
        Ok(None) => {
            return refuse(
                &mut stream,
                ErrorCode::UnknownGroup,
                format!("no group is named {group}"),
            );
        }
        Err(e) => {
            let _ = stream.stop(VarInt::from_u32(STREAM_REFUSED));
            return Some(store_failure(id, &e));
        }
    }
    let length = usize::try_from(header.length).unwrap_or(usize::MAX);
    let Some(_reserved) = budget.reserve(length).await else {
        return refuse(
            &mut stream,
            ErrorCode::MessageTooLarge,
            "message too large".into(),
        );
    };
    let mut body = match stream.read_to_end(length).await {
        Ok(body) if body.len() == length => body,
        Ok(_) => {
            return Some(failed(
                Some(id),
                ErrorCode::TruncatedFrame,
                "the stream ended inside the body",
            ));
        }
        Err(ReadToEndError::TooLong) => {
            return refuse(
                &mut stream,
                ErrorCode::BadRequest,
                "bytes after the declared body".into(),
            );
        }
        Err(ReadToEndError::Read(e)) => {
            debug!(error = %e, "group message stream broken inside the body");
            return Some(failed(
                Some(id),
                ErrorCode::TruncatedFrame,
                "the stream was reset inside the body",
            ));
        }
    };
    let welcome = header.welcome.map(|w| {
        let at = body.len() - usize::try_from(w).unwrap_or(body.len()).min(body.len());
        body.split_off(at)
    });
    let guard = shared.group_locks.lock(&group).await;
    let reply = match handle(shared, &sender, &group, id, body, welcome).await {
        Ok(reply) => reply,
        Err(refusal) => refused(id, refusal),
    };
    drop(guard);
    Some(reply)
}

/// The group send's checks and fan-out, under the group's lock.
async fn handle(
    shared: &Shared,
    sender: &ActiveSession,
    group: &Username,
    id: MessageId,
    body: Vec<u8>,
    welcome: Option<Vec<u8>>,
) -> Result<Reply, Refusal> {
    let store = shared.accounts.store();
    let record = match store.group(group).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            return Err(Refusal::new(
                ErrorCode::UnknownGroup,
                format!("no group is named {group}"),
            ));
        }
        Err(e) => return Ok(store_failure(id, &e)),
    };
    if !record.delivers_to(&sender.username, sender.device) {
        return Err(Refusal::new(
            ErrorCode::NotMember,
            format!("you are not a member of {group}"),
        ));
    }
    match mls::read_group_message(&record.id, &body)? {
        GroupMessage::Application { epoch } => {
            if welcome.is_some() {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    "only a commit that adds members carries a welcome",
                ));
            }
            if epoch > record.epoch {
                return Err(Refusal::invalid(format!(
                    "epoch {epoch} is ahead of the group's ({})",
                    record.epoch
                )));
            }
            if epoch + MAX_PAST_EPOCHS < record.epoch {
                return Err(Refusal {
                    code: ErrorCode::StaleEpoch,
                    message: format!(
                        "epoch {epoch} is too old (the group is at {})",
                        record.epoch
                    ),
                    epoch: Some(record.epoch),
                });
            }
            let targets = delivery_targets(shared, &record, sender).await?;
            let copies = targets
                .into_iter()
                .map(|(recipient, device)| Copy {
                    recipient,
                    device,
                    body: body.clone(),
                })
                .collect();
            Ok(fan_out(shared, sender, group, KIND_MLS, id, copies).await)
        }
        GroupMessage::Commit {
            sender: leaf,
            epoch,
            message,
        } => {
            if record.recent_commits.contains(&id) {
                return Ok(Reply::Sent {
                    message_id: id,
                    duplicate: true,
                });
            }
            if epoch != record.epoch {
                return Err(Refusal {
                    code: ErrorCode::StaleEpoch,
                    message: format!(
                        "epoch {epoch} is not current (the group is at {})",
                        record.epoch
                    ),
                    epoch: Some(record.epoch),
                });
            }
            if record.leaf_of(&sender.username, sender.device) != Some(leaf) {
                return Err(Refusal::invalid(
                    "the commit's sender is not the leaf of the sending device",
                ));
            }
            commit(shared, sender, group, id, record, *message, body, welcome).await
        }
    }
}

/// Validates, checks, fans out and merges a commit at the group's current epoch.
#[allow(clippy::too_many_arguments)]
async fn commit(
    shared: &Shared,
    sender: &ActiveSession,
    group: &Username,
    id: MessageId,
    record: GroupRecord,
    message: openmls::prelude::PublicMessageIn,
    body: Vec<u8>,
    welcome: Option<Vec<u8>>,
) -> Result<Reply, Refusal> {
    let staged = mls::stage_commit(&record, message)?;
    policy::check_commit(shared, &record, &sender.username, sender.device, &staged).await?;
    let references: Vec<Vec<u8>> = staged.added.iter().map(|(_, r)| r.clone()).collect();
    let added: Vec<(Username, DeviceId)> = staged
        .added
        .iter()
        .map(|(leaf, _)| (leaf.user.clone(), leaf.device))
        .collect();
    match (&welcome, references.is_empty()) {
        (None, false) => {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "a commit that adds members carries their welcome",
            ));
        }
        (Some(_), true) => {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "only a commit that adds members carries a welcome",
            ));
        }
        (Some(welcome), false) => mls::check_welcome(welcome, &references)?,
        (None, true) => {}
    }
    let new_admins = staged.new_admins.clone();
    let merged = staged.merge()?;
    let added_admins: Vec<Username> = new_admins
        .iter()
        .flatten()
        .filter(|a| !record.admins.contains(a))
        .cloned()
        .collect();
    policy::check_merged(&merged, &added_admins)?;
    let mut copies: Vec<Copy> = delivery_targets(shared, &record, sender)
        .await?
        .into_iter()
        .map(|(recipient, device)| Copy {
            recipient,
            device,
            body: body.clone(),
        })
        .collect();
    if let Some(welcome) = welcome {
        copies.extend(added.into_iter().map(|(recipient, device)| Copy {
            recipient,
            device,
            body: welcome.clone(),
        }));
    }
    let reply = fan_out(shared, sender, group, KIND_MLS, id, copies).await;
    if !matches!(reply, Reply::Sent { .. }) {
        return Ok(reply);
    }
    let mut next = record;
    next.epoch = merged.epoch;
    next.members = merged.members;
    if let Some(admins) = new_admins {
        next.admins = admins;
    }
    let members = &next.members;
    next.pending_leaves
        .retain(|user| members.iter().any(|m| m.user == *user));
    next.recent_commits.push(id);
    if next.recent_commits.len() > RECENT_COMMITS {
        next.recent_commits.remove(0);
    }
    next.state = merged.state;
    match shared.accounts.store().put_group(next).await {
        Ok(_) => Ok(reply),
        // Delivered but not recorded: a resend of the same id is validated again at the old
        // epoch, found stored (duplicate), and recorded then.
        Err(e) => Ok(store_failure(id, &e)),
    }
}

/// The devices a group send from `sender` goes to: every member device whose user did not
/// leave, that is still a current device of its account, except the sending device.
pub(crate) async fn delivery_targets(
    shared: &Shared,
    record: &GroupRecord,
    sender: &ActiveSession,
) -> Result<Vec<(Username, DeviceId)>, Refusal> {
    let mut targets = Vec::with_capacity(record.members.len());
    let mut lists: Vec<(Username, crate::server::device_lists::DeviceList)> = Vec::new();
    for member in &record.members {
        if record.pending_leaves.contains(&member.user)
            || (member.user == sender.username && member.device == sender.device)
        {
            continue;
        }
        let list = match lists.iter().find(|(u, _)| *u == member.user) {
            Some((_, list)) => list.clone(),
            None => {
                let list = shared
                    .accounts
                    .device_list(&member.user)
                    .await
                    .map_err(|e| {
                        warn!(error = %e, "cannot read a member's devices");
                        Refusal::new(ErrorCode::Internal, "send it again")
                    })?;
                lists.push((member.user.clone(), list.clone()));
                list
            }
        };
        if list.contains(&member.device) {
            targets.push((member.user.clone(), member.device));
        }
    }
    Ok(targets)
}

/// Appends one group send to the inboxes of `copies` (none: nothing to store) and answers
/// for the sender.
pub(crate) async fn fan_out(
    shared: &Shared,
    sender: &ActiveSession,
    group: &Username,
    kind: &str,
    id: MessageId,
    copies: Vec<Copy>,
) -> Reply {
    let total: usize = copies.iter().map(|c| c.body.len()).sum();
    if total > MAX_FANOUT_BYTES {
        return failed(
            Some(id),
            ErrorCode::MessageTooLarge,
            format!("a group send may make at most {MAX_FANOUT_BYTES} bytes of copies"),
        );
    }
    if copies.is_empty() {
        return Reply::Sent {
            message_id: id,
            duplicate: false,
        };
    }
    let now = unix_now();
    let expires_at = now.saturating_add(shared.limits.message_ttl.as_secs());
    let kind = super::stored_kind(kind, group);
    let hooks = hooks(
        shared,
        sender,
        &sender.username,
        id,
        &kind,
        &copies,
        now,
        expires_at,
    );
    let message = NewMessage {
        sender: sender.username.clone(),
        sender_device: sender.device,
        to: sender.username.clone(),
        id,
        kind,
        copies,
        sent_at: now,
        expires_at,
    };
    match shared.accounts.store().append(message, hooks).await {
        Ok(Appended::Stored { .. }) => {
            crate::server::metrics::message_sent();
            Reply::Sent {
                message_id: id,
                duplicate: false,
            }
        }
        Ok(Appended::Duplicate) => Reply::Sent {
            message_id: id,
            duplicate: true,
        },
        Ok(Appended::InboxFull { recipient, device }) => failed(
            Some(id),
            ErrorCode::InboxFull,
            format!("the inbox of {recipient}'s device {device} is full"),
        ),
        Ok(Appended::SenderQuota { recipient, .. }) => failed(
            Some(id),
            ErrorCode::SenderQuota,
            sender_quota_message(&recipient, shared.limits.sender_share),
        ),
        // A member's account or device went meanwhile: the sender may try again.
        Err(StoreError::UnknownUser(_) | StoreError::UnknownDevice(..)) => failed(
            Some(id),
            ErrorCode::Internal,
            "a member device went away meanwhile; send it again",
        ),
        Err(e) => store_failure(id, &e),
    }
}
