//! Which conversation `sfc chat NAME` opens. Group and user names are spelled alike (and
//! folded alike), and a group may share its name with a user, so the rule is:
//!
//! - `--user NAME`: the 1:1 chat with user NAME;
//! - `--group NAME`: the chat of group NAME, which this device must be in;
//! - a plain NAME: the group, when this device is in a group of that name and has no 1:1
//!   conversation (a session or history) with a user of that name; the 1:1 chat when it is in
//!   no such group; and when both apply, nothing: it asks for `--user` or `--group`, rather
//!   than guess.
//!
//! "In a group" is what this device knows, or what the server lists (a group it was just
//! added to, whose welcome still waits in the inbox).

use super::Conversation;
use crate::client::messenger::{Messenger, MessengerError};
use crate::protocol::Username;

/// What the user said NAME is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// A plain name: see the module's rule.
    Either,
    /// `--user`: a user.
    User,
    /// `--group`: a group.
    Group,
}

/// Why no conversation was chosen.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    /// `--group NAME` for a group this device is not in.
    #[error("you are not in a group named {0} (`sfc group list` lists yours)")]
    NotInGroup(String),
    /// A plain name that is both a group this device is in and a user it talks with.
    #[error(
        "{0} is both a group you are in and a user you talk with: say which with `sfc chat \
         --group {0}` or `sfc chat --user {0}`"
    )]
    Ambiguous(String),
    /// The home or the server could not be asked.
    #[error(transparent)]
    Messenger(#[from] MessengerError),
}

/// The conversation `name` opens, by the module's rule.
pub async fn choose(
    messenger: &Messenger,
    name: &str,
    pick: Pick,
) -> Result<Conversation, ChooseError> {
    if pick == Pick::User {
        return Ok(Conversation::Direct(name.to_owned()));
    }
    // A name that is not a valid name is no group (and the 1:1 chat says what is wrong).
    let folded = match Username::parse(name) {
        Ok(folded) => folded.as_str().to_owned(),
        Err(_) if pick == Pick::Group => return Err(ChooseError::NotInGroup(name.to_owned())),
        Err(_) => return Ok(Conversation::Direct(name.to_owned())),
    };
    let in_group = in_group(messenger, &folded).await?;
    match pick {
        Pick::Group if in_group => Ok(Conversation::Group(folded)),
        Pick::Group => Err(ChooseError::NotInGroup(folded)),
        _ if !in_group => Ok(Conversation::Direct(name.to_owned())),
        _ if talks_with(messenger, &folded).await? => Err(ChooseError::Ambiguous(folded)),
        _ => Ok(Conversation::Group(folded)),
    }
}

/// Whether this device is in group `name` (folded), by its own state or the server's list.
async fn in_group(messenger: &Messenger, name: &str) -> Result<bool, MessengerError> {
    if messenger.groups().await?.iter().any(|g| g.name == name) {
        return Ok(true);
    }
    let listed = messenger.client().list_groups().await?;
    Ok(listed.iter().any(|g| g.group == name))
}

/// Whether this home has a 1:1 conversation with user `name` (folded): a session or history.
async fn talks_with(messenger: &Messenger, name: &str) -> Result<bool, MessengerError> {
    let name = name.to_owned();
    let talks = messenger
        .keystore()
        .read_async(move |s| {
            s.is_some_and(|s| {
                s.device_sessions.contains_key(&name) || s.history.iter().any(|e| e.peer == name)
            })
        })
        .await?;
    Ok(talks)
}
