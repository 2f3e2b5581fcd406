//! Typing in a group's chat: a line goes to the group (`Messenger::group_send`) and is shown
//! once the server has stored it for every member; `/members` lists the members, `/leave`
//! (typed twice) leaves the group, `/help` says all this, and `/file` says that files in
//! groups are not supported yet.
//!
//! A send the server refuses as `stale_epoch` (this device is more than 2 epochs behind: the
//! commits it missed still wait in its inbox) is made again once, after the commits the
//! receive task is bringing in are shown and merged, so the user never sees the refusal.

use std::time::Duration;

use tokio::sync::mpsc;

use super::direct::too_long;
use super::receiver::Arrival;
use super::screen::{Clock, Screen, message_line, notice, now, status};
use super::show::{members_line, show_received};
use super::{Conversation, Ended, Flow};
use crate::client::messenger::{Messenger, MessengerError};
use crate::e2e::MAX_PLAINTEXT_LEN;
use crate::e2e::mls::MlsError;
use crate::protocol::ErrorCode;

/// Lists the group's members.
const MEMBERS: &str = "/members";
/// Leaves the group (asked twice).
const LEAVE: &str = "/leave";
/// Lists the commands.
const HELP: &str = "/help";
/// Sends a file in a 1:1 chat; not in a group yet.
const FILE: &str = "/file";

/// How long a send refused as stale waits for the receive task to fall quiet.
const SETTLE_QUIET: Duration = Duration::from_millis(400);
/// How long it waits at most for the group's missed commits before it sends again.
const SETTLE_MAX: Duration = Duration::from_secs(10);

/// The chat's commands, for `/help` and the first line.
pub(super) const COMMANDS: &str = "/members lists the members, /leave leaves the group, /quit \
                                   (or Ctrl-C, Ctrl-D) ends the chat; any other line goes to \
                                   the group";

/// A group's chat: its name (as the server spells it) and whether a `/leave` waits for its
/// confirmation.
pub(super) struct GroupChat {
    name: String,
    confirming_leave: bool,
}

/// What a typed line in a group's chat needs.
pub(super) struct Typing<'a> {
    /// The messenger.
    pub(super) messenger: &'a Messenger,
    /// The screen.
    pub(super) screen: &'a mut Screen,
    /// The clock of the times shown.
    pub(super) clock: Clock,
    /// This user.
    pub(super) me: &'a str,
    /// The open conversation (this group).
    pub(super) conversation: &'a Conversation,
    /// What the receive task hands over (drained while a stale send waits).
    pub(super) incoming: &'a mut mpsc::Receiver<Arrival>,
}

impl GroupChat {
    /// The chat of group `name`.
    pub(super) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            confirming_leave: false,
        }
    }

    /// Handles one typed line (already trimmed, not empty).
    pub(super) async fn typed(
        &mut self,
        at: Typing<'_>,
        line: &str,
    ) -> Result<Flow, MessengerError> {
        if std::mem::take(&mut self.confirming_leave) {
            if line == LEAVE {
                return self.leave(at).await;
            }
            at.screen.show(status(&format!(
                "you stay in {} (that line was not sent)",
                self.name
            )));
            return Ok(Flow::Continue);
        }
        if line == LEAVE {
            self.confirming_leave = true;
            at.screen.show(notice(&format!(
                "leave {}? You will not read it any more unless an admin adds you again. Type \
                 {LEAVE} again to leave, anything else to stay",
                self.name
            )));
            return Ok(Flow::Continue);
        }
        if line == MEMBERS {
            match at.messenger.group(&self.name).await {
                Ok(state) => at.screen.show(members_line(&state)),
                Err(e) => at.screen.show(notice(&format!("members: {e}"))),
            }
            return Ok(Flow::Continue);
        }
        if line == HELP {
            at.screen.show(status(COMMANDS));
            return Ok(Flow::Continue);
        }
        if line
            .strip_prefix(FILE)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        {
            at.screen.show(notice(
                "files in groups are not supported yet: send it to one member with `sfc \
                 send-file USER PATH` (or /file in `sfc chat USER`)",
            ));
            return Ok(Flow::Continue);
        }
        self.send(at, line).await
    }

    /// Sends a text to the group and shows it once the server has stored it; a send refused
    /// as stale is made again once, after catching up.
    async fn send(&self, mut at: Typing<'_>, text: &str) -> Result<Flow, MessengerError> {
        if text.len() > MAX_PLAINTEXT_LEN {
            at.screen.show(too_long());
            return Ok(Flow::Continue);
        }
        let mut caught_up = false;
        loop {
            match at.messenger.group_send(&self.name, text).await {
                Ok(_) => {
                    at.screen
                        .show(message_line(at.clock, now(), at.me, text, true));
                    return Ok(Flow::Continue);
                }
                Err(MessengerError::Client(e))
                    if e.is_server(ErrorCode::StaleEpoch) && !caught_up =>
                {
                    caught_up = true;
                    tracing::debug!(group = %self.name, "a send was stale: catching up");
                    if let Flow::End(end) = self.settle(&mut at).await? {
                        return Ok(Flow::End(end));
                    }
                }
                Err(e) if no_longer_member(&e) => {
                    at.screen.show(notice(&format!("not sent: {e}")));
                    return Ok(Flow::End(Ended::NotMember { why: e.to_string() }));
                }
                Err(e) if e.is_disconnected() => {
                    at.screen.show(notice(&format!(
                        "not sent ({e}): type it again once the chat says it reconnected"
                    )));
                    return Ok(Flow::Continue);
                }
                Err(e) => {
                    at.screen.show(notice(&format!("not sent: {e}")));
                    return Ok(Flow::Continue);
                }
            }
        }
    }

    /// Waits until this device has merged the group's commits up to the server's epoch
    /// (or nothing arrives for [`SETTLE_QUIET`] when the server's epoch is unknown, or
    /// [`SETTLE_MAX`] passed), showing what the receive task hands over meanwhile.
    async fn settle(&self, at: &mut Typing<'_>) -> Result<Flow, MessengerError> {
        let target = at
            .messenger
            .client()
            .group_info(&self.name)
            .await
            .ok()
            .map(|s| s.epoch);
        let deadline = tokio::time::Instant::now() + SETTLE_MAX;
        loop {
            if let Some(target) = target
                && self.epoch(at.messenger).await.is_some_and(|e| e >= target)
            {
                return Ok(Flow::Continue);
            }
            let quiet = (tokio::time::Instant::now() + SETTLE_QUIET).min(deadline);
            match tokio::time::timeout_at(quiet, at.incoming.recv()).await {
                Ok(Some(arrival)) => {
                    let shown =
                        show_received(at.messenger, at.screen, at.clock, at.conversation, arrival)
                            .await?;
                    if let Flow::End(end) = shown {
                        return Ok(Flow::End(end));
                    }
                }
                // The receive task ended (a failure of its own was handed over, and shown,
                // before): send again, and let the send say what is wrong.
                Ok(None) => return Ok(Flow::Continue),
                Err(_) if target.is_none() || tokio::time::Instant::now() >= deadline => {
                    return Ok(Flow::Continue);
                }
                Err(_) => {}
            }
        }
    }

    /// The group's epoch as this device has merged it.
    async fn epoch(&self, messenger: &Messenger) -> Option<u64> {
        messenger.group(&self.name).await.ok().map(|s| s.mls.epoch)
    }

    /// Leaves the group, after the confirmation.
    async fn leave(&self, at: Typing<'_>) -> Result<Flow, MessengerError> {
        match at.messenger.group_leave(&self.name).await {
            Ok(()) => {
                at.screen.show(status(&format!("you left {}", self.name)));
                Ok(Flow::End(Ended::LeftGroup))
            }
            Err(e) if no_longer_member(&e) => {
                at.screen.show(notice(&format!("{}: {e}", self.name)));
                Ok(Flow::End(Ended::NotMember { why: e.to_string() }))
            }
            Err(e) => {
                at.screen
                    .show(notice(&format!("could not leave {}: {e}", self.name)));
                Ok(Flow::Continue)
            }
        }
    }
}

/// Whether `e` says this device is no longer in the group (removed, left from another device
/// of the account, or the group is gone).
fn no_longer_member(e: &MessengerError) -> bool {
    match e {
        MessengerError::Mls(MlsError::Inactive | MlsError::UnknownGroup) => true,
        MessengerError::Client(e) => {
            e.is_server(ErrorCode::NotMember) || e.is_server(ErrorCode::UnknownGroup)
        }
        _ => false,
    }
}
