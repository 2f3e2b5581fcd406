//! `sfc group …`: MLS groups (docs/PROTOCOL.md 5.7, docs/CLIENT.md "Groups"). The work is the
//! client library's (`Messenger::create_group`, `group_add`, …); this module catches the
//! device up with its group deliveries before it changes a group, and makes a change again
//! when another member's commit won the same epoch.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use securefastchat::client::ClientOptions;
use securefastchat::client::home::Home;
use securefastchat::client::keystore::Keystore;
use securefastchat::client::messenger::{Messenger, MessengerError};
use securefastchat::client::render;
use securefastchat::protocol::ErrorCode;

use super::{message_text, resume, warn};

/// How long a group command listens for deliveries that are already waiting, per pause.
const CATCH_UP_IDLE: Duration = Duration::from_millis(300);
/// Times a change is made again after another member's commit won its epoch.
const STALE_RETRIES: usize = 5;

#[derive(Subcommand, Debug)]
pub(crate) enum GroupCommand {
    /// Create a group; you are its first admin. Names are global on the server (first come):
    /// 3-32 characters of a-z 0-9 _ . -
    Create {
        /// The group's name
        group: String,
    },
    /// Add every device of USER to the group (admins only)
    Add {
        /// The group
        group: String,
        /// Who to add
        user: String,
    },
    /// Remove every device of USER from the group (admins only; anyone, for a user who left):
    /// they cannot read what is sent after it
    Remove {
        /// The group
        group: String,
        /// Who to remove
        user: String,
    },
    /// Make USER an admin of the group too (admins only)
    Admin {
        /// The group
        group: String,
        /// The member to make an admin
        user: String,
    },
    /// Leave the group: the server stops delivering it to all your devices at once, and the
    /// next member online removes you from its keys
    Leave {
        /// The group
        group: String,
    },
    /// List the group's members as this device knows them: `USER<TAB>DEVICES[<TAB>admin]`
    Members {
        /// The group
        group: String,
    },
    /// List your groups: `GROUP<TAB>MEMBERS<TAB>epoch N`
    List,
    /// Send an end-to-end encrypted text to the group; prints its id once the server has
    /// stored it for every member
    Send {
        /// The group
        group: String,
        /// The message; `-` reads it from standard input (one final line break is dropped)
        #[arg(required_unless_present = "file")]
        text: Option<String>,
        /// Read the message from this file (UTF-8 text; one final line break is dropped)
        #[arg(long, conflicts_with = "text")]
        file: Option<PathBuf>,
    },
}

/// Runs a group command.
pub(crate) async fn run(
    command: GroupCommand,
    home: &Home,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    let session = GroupSession::open(home, options).await?;
    let done = run_with(&session, command).await;
    session.messenger.close().await;
    done
}

/// A messenger for a group command, and whether it takes deliveries.
struct GroupSession {
    messenger: Messenger,
    /// False while another `sfc` receives in this home (`sfc recv --follow`, `sfc chat`):
    /// that one processes the deliveries, and this one only sends.
    receiving: bool,
}

impl GroupSession {
    /// Connects, taking deliveries when no other `sfc` does in this home (group commands
    /// process the group's commits before they change it), with this device's key packages on
    /// the server topped up and any commit whose answer was lost posted again.
    async fn open(home: &Home, options: &ClientOptions) -> anyhow::Result<Self> {
        let lock = Keystore::new(home.dir()).lock_receiving()?;
        let receiving = lock.is_some();
        let (client, saved) = resume(home, options, receiving).await?;
        let messenger = match lock {
            Some(lock) => Messenger::receiving(client, home.dir(), &saved.username, lock)?,
            None => Messenger::new(client, home.dir(), &saved.username)?,
        };
        let session = Self {
            messenger,
            receiving,
        };
        let ready = async {
            session.messenger.ensure_keys().await?;
            session.messenger.ensure_key_packages().await?;
            session.messenger.group_resume_commits().await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = ready {
            session.messenger.close().await;
            return Err(e);
        }
        Ok(session)
    }

    /// Processes the deliveries that wait for this device until none comes for a moment:
    /// group commits and welcomes are merged (their notices told on standard error); texts
    /// are kept unshown, for `sfc recv` to print.
    async fn catch_up(&self) -> anyhow::Result<()> {
        if !self.receiving {
            return Ok(());
        }
        for notice in self.messenger.catch_up(CATCH_UP_IDLE).await? {
            if let Some(what) = notice.describe() {
                warn(&what);
            }
        }
        Ok(())
    }

    /// Makes a change to a group after catching up; when another member's commit won the
    /// epoch (`stale_epoch`), receives it and makes the change again, up to
    /// [`STALE_RETRIES`] times.
    async fn change<'a, T, F, Fut>(&'a self, group: &str, make: F) -> anyhow::Result<T>
    where
        F: Fn(&'a Messenger) -> Fut,
        Fut: std::future::Future<Output = Result<T, MessengerError>>,
    {
        let mut tries = 0;
        loop {
            self.catch_up().await?;
            match make(&self.messenger).await {
                Err(MessengerError::Client(e)) if e.is_server(ErrorCode::StaleEpoch) => {
                    tries += 1;
                    if tries > STALE_RETRIES || !self.receiving {
                        return Err(anyhow::Error::from(e)).with_context(|| {
                            format!("group {} changed meanwhile; try again", render::line(group))
                        });
                    }
                }
                other => return other.map_err(Into::into),
            }
        }
    }
}

async fn run_with(session: &GroupSession, command: GroupCommand) -> anyhow::Result<()> {
    match command {
        GroupCommand::Create { group } => {
            let name = session.messenger.create_group(&group).await?;
            println!("created group {}", render::line(&name));
        }
        GroupCommand::Add { group, user } => {
            session
                .change(&group, |m| {
                    let (group, user) = (group.clone(), user.clone());
                    async move { m.group_add(&group, &user).await.map(|_| ()) }
                })
                .await?;
            println!("added {} to {}", render::line(&user), render::line(&group));
        }
        GroupCommand::Remove { group, user } => {
            session
                .change(&group, |m| {
                    let (group, user) = (group.clone(), user.clone());
                    async move { m.group_remove(&group, &user).await.map(|_| ()) }
                })
                .await?;
            println!(
                "removed {} from {}",
                render::line(&user),
                render::line(&group)
            );
        }
        GroupCommand::Admin { group, user } => {
            session
                .change(&group, |m| {
                    let (group, user) = (group.clone(), user.clone());
                    async move { m.group_add_admin(&group, &user).await }
                })
                .await?;
            println!(
                "{} is an admin of {}",
                render::line(&user),
                render::line(&group)
            );
        }
        GroupCommand::Leave { group } => {
            session.catch_up().await?;
            session.messenger.group_leave(&group).await?;
            println!("left {}", render::line(&group));
        }
        GroupCommand::Members { group } => {
            session.catch_up().await?;
            let state = session.messenger.group(&group).await?;
            let mut users: Vec<(String, Vec<String>)> = Vec::new();
            for member in &state.mls.members {
                match users.last_mut() {
                    Some((user, devices)) if *user == member.user => {
                        devices.push(member.device.to_string());
                    }
                    _ => users.push((member.user.clone(), vec![member.device.to_string()])),
                }
            }
            for (user, devices) in users {
                let admin = if state.mls.admins.contains(&user) {
                    "\tadmin"
                } else {
                    ""
                };
                println!("{}\t{}{admin}", render::line(&user), devices.join(","));
            }
        }
        GroupCommand::List => {
            session.catch_up().await?;
            for state in session.messenger.groups().await? {
                let mut users: Vec<&str> =
                    state.mls.members.iter().map(|m| m.user.as_str()).collect();
                users.dedup();
                println!(
                    "{}\t{}\tepoch {}",
                    render::line(&state.name),
                    render::line(&users.join(",")),
                    state.mls.epoch
                );
            }
        }
        GroupCommand::Send { group, text, file } => {
            let text = message_text(text, file).await?;
            let id = session
                .change(&group, |m| {
                    let (group, text) = (group.clone(), text.clone());
                    async move { m.group_send(&group, &text).await }
                })
                .await?;
            println!("{id}");
        }
    }
    Ok(())
}
