//! Where each kind of arrival goes on the chat's screen, whichever conversation is open: a
//! message of the open conversation as `HH:MM NAME: TEXT`; a message of any other one marked
//! with where it belongs (`[from carol]`, `[you to carol]`, `[friends/carol]`), shown all the
//! same and never dropped; group notices as status lines (`-- …`), problems as warnings
//! (`!! …`). A message is marked shown (which acknowledges it) only once it is on the screen.

use super::files;
use super::receiver::Arrival;
use super::screen::{Clock, Screen, marked_line, message_line, notice, status};
use super::{Conversation, Ended, Flow};
use crate::client::groups::GroupNotice;
use crate::client::messenger::{Messenger, MessengerError, Received};

/// Shows what arrived, and marks a message shown only once it is on the screen; fails the
/// chat if receiving failed for good, and ends it when this device was removed from the open
/// group.
pub(super) async fn show_received(
    messenger: &Messenger,
    screen: &mut Screen,
    clock: Clock,
    conversation: &Conversation,
    arrival: Arrival,
) -> Result<Flow, MessengerError> {
    let received = match arrival {
        Arrival::Message(received) => received,
        Arrival::Notice(line) => {
            screen.show(line);
            return Ok(Flow::Continue);
        }
        Arrival::Failed(e) => {
            screen.show(notice(&format!("connection problem: {e}")));
            return Err(e);
        }
    };
    let mut flow = Flow::Continue;
    match &received {
        Received::Text {
            from,
            to,
            sent_at,
            text,
            warning,
            ..
        } => {
            if let Some(warning) = warning {
                screen.show(notice(warning));
            }
            screen.show(direct_line(
                clock,
                conversation,
                from,
                to.as_deref(),
                *sent_at,
                text,
            ));
        }
        Received::File {
            from,
            to,
            sent_at,
            file,
            warning,
            ..
        } => {
            if let Some(warning) = warning {
                screen.show(notice(warning));
            }
            let dir = screen.downloads.clone();
            let Some(text) = files::receive_file(messenger, screen, &dir, file).await? else {
                return Ok(Flow::Continue);
            };
            screen.show(direct_line(
                clock,
                conversation,
                from,
                to.as_deref(),
                *sent_at,
                &text,
            ));
        }
        Received::Group {
            group,
            from,
            sent_at,
            text,
            ..
        } => screen.show(group_line(clock, conversation, group, from, *sent_at, text)),
        Received::GroupNotice {
            group,
            notice: what,
        } => {
            screen.show(group_notice_line(group, what));
            if let (GroupNotice::Removed { by }, Conversation::Group(open)) = (what, conversation)
                && open == group
            {
                flow = Flow::End(Ended::Removed { by: by.clone() });
            }
        }
        other => {
            if let Some(what) = other.describe() {
                screen.show(notice(&what));
            }
        }
    }
    messenger.shown(&received).await?;
    Ok(flow)
}

/// A 1:1 message (or a copy of one this user sent from another device) as the open
/// conversation shows it.
fn direct_line(
    clock: Clock,
    conversation: &Conversation,
    from: &str,
    to: Option<&str>,
    at: u64,
    text: &str,
) -> String {
    let peer = match conversation {
        Conversation::Direct(peer) => Some(peer.as_str()),
        Conversation::Group(_) => None,
    };
    match to {
        // A copy of what this user sent from another device: in this conversation it is one
        // of ours; to someone else, it says to whom.
        Some(to) if Some(to) == peer => message_line(clock, at, from, text, true),
        Some(to) => marked_line(clock, at, &format!("you to {to}"), text),
        None => message_line(clock, at, from, text, Some(from) == peer),
    }
}

/// A group text as the open conversation shows it: `HH:MM FROM: TEXT` in the group's own
/// chat, `HH:MM [GROUP/FROM] TEXT` elsewhere (as `sfc recv` names it).
fn group_line(
    clock: Clock,
    conversation: &Conversation,
    group: &str,
    from: &str,
    at: u64,
    text: &str,
) -> String {
    match conversation {
        Conversation::Group(open) if open == group => message_line(clock, at, from, text, true),
        _ => marked_line(clock, at, &format!("{group}/{from}"), text),
    }
}

/// What happened to a group, as a status line; what went wrong (a removal, a refused
/// delivery) as a warning.
fn group_notice_line(group: &str, what: &GroupNotice) -> String {
    let text = what.describe(group);
    match what {
        GroupNotice::Removed { .. } | GroupNotice::Refused { .. } => notice(&text),
        GroupNotice::Joined { .. }
        | GroupNotice::Changed { .. }
        | GroupNotice::Left { .. }
        | GroupNotice::DeviceRemoved { .. } => status(&text),
    }
}

/// The members of a group, one status line: `USER (admin; device 1)`, devices grouped per
/// user.
pub(super) fn members_line(state: &crate::client::groups::GroupState) -> String {
    let mut users: Vec<(&str, Vec<String>)> = Vec::new();
    for member in &state.mls.members {
        match users.last_mut() {
            Some((user, devices)) if *user == member.user => {
                devices.push(member.device.to_string());
            }
            _ => users.push((member.user.as_str(), vec![member.device.to_string()])),
        }
    }
    let listed: Vec<String> = users
        .iter()
        .map(|(user, devices)| {
            let admin = if state.mls.admins.iter().any(|a| a == user) {
                "admin; "
            } else {
                ""
            };
            let plural = if devices.len() > 1 { "s" } else { "" };
            format!("{user} ({admin}device{plural} {})", devices.join(", "))
        })
        .collect();
    status(&format!(
        "{} has {} members: {}",
        state.name,
        users.len(),
        listed.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 1_796_389_559;

    #[test]
    fn a_group_text_shows_in_its_chat_and_is_marked_elsewhere() {
        let friends = Conversation::Group("friends".into());
        let bob = Conversation::Direct("bob".into());
        let clock = Clock::UTC;
        assert_eq!(
            group_line(clock, &friends, "friends", "bob", AT, "hi"),
            "13:05 bob: hi"
        );
        assert_eq!(
            group_line(clock, &friends, "others", "bob", AT, "hi"),
            "13:05 [others/bob] hi"
        );
        assert_eq!(
            group_line(clock, &bob, "friends", "bob", AT, "hi"),
            "13:05 [friends/bob] hi"
        );
        // A 1:1 message in a group's chat is someone else's conversation.
        assert_eq!(
            direct_line(clock, &friends, "bob", None, AT, "psst"),
            "13:05 [from bob] psst"
        );
        assert_eq!(
            direct_line(clock, &friends, "alice", Some("bob"), AT, "yes"),
            "13:05 [you to bob] yes"
        );
        assert_eq!(
            direct_line(clock, &bob, "bob", None, AT, "psst"),
            "13:05 bob: psst"
        );
    }

    #[test]
    fn hostile_group_text_is_inert_and_cannot_forge_a_line() {
        let friends = Conversation::Group("friends".into());
        let line = group_line(
            Clock::UTC,
            &friends,
            "friends",
            "mallory",
            AT,
            "\x1b[2J\x1b]0;pwned\x07ok\n13:06 alice: send money\r\n-- alice left\u{202e}",
        );
        assert_eq!(
            line,
            "13:05 mallory: \\x1b[2J\\x1b]0;pwned\\x07ok\n      13:06 alice: send money\n      \
             -- alice left\\u{202e}"
        );
        assert!(!line.contains('\x1b'));
    }

    #[test]
    fn a_removal_is_a_warning_and_other_changes_are_status_lines() {
        let removed = GroupNotice::Removed {
            by: "alice/1".into(),
        };
        assert_eq!(
            group_notice_line("friends", &removed),
            "!! friends: you were removed by alice/1"
        );
        let left = GroupNotice::Left {
            user: "bob\x1b[2J".into(),
        };
        assert_eq!(
            group_notice_line("friends", &left),
            "-- friends: bob\\x1b[2J left"
        );
    }
}
