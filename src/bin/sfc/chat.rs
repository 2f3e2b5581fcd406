//! `sfc chat NAME`: the interactive chat, with a user or in a group. The chat itself is the
//! client library's (`securefastchat::client::chat`); this module picks the conversation
//! (`chat::choose`: `--group`, `--user`, or a plain name) and says how the chat ended.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use clap::Args;
use securefastchat::client::ClientOptions;
use securefastchat::client::chat::{self, Conversation, Ended, Pick};
use securefastchat::client::home::Home;
use securefastchat::client::render;

use super::devices::removed_or;
use super::{download_dir, receiving_messenger};

/// Messages of the conversation `sfc chat` shows when it opens.
const CHAT_HISTORY: usize = 20;

/// `sfc chat`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct ChatArgs {
    /// The contact, or the group. A plain NAME opens the group of that name if you are in
    /// one and have no 1:1 conversation with a user of that name, the 1:1 chat if you are in
    /// no such group, and asks for --user or --group if both apply
    name: String,
    /// NAME is a group you are in
    #[arg(long, conflicts_with = "user")]
    group: bool,
    /// NAME is a user (even if you are in a group of that name)
    #[arg(long)]
    user: bool,
    /// Where received files are saved, made if missing [default: the current directory]
    #[arg(long, value_name = "DIR")]
    into: Option<PathBuf>,
}

/// Runs `sfc chat`.
pub(crate) async fn run(
    args: ChatArgs,
    home: &Home,
    options: &ClientOptions,
    clock: chat::Clock,
) -> anyhow::Result<()> {
    let downloads = download_dir(args.into)?;
    if !std::io::stdin().is_terminal() {
        bail!("sfc chat needs a terminal (use `sfc send` and `sfc recv` in scripts)");
    }
    let messenger = Arc::new(receiving_messenger(home, options).await?);
    let me = messenger.me().to_owned();
    let pick = match (args.group, args.user) {
        (true, _) => Pick::Group,
        (_, true) => Pick::User,
        _ => Pick::Either,
    };
    let chatted = async {
        match chat::choose(&messenger, &args.name, pick).await? {
            Conversation::Direct(user) => {
                let history: Vec<chat::Entry> = messenger
                    .offline()
                    .history(&user, CHAT_HISTORY)
                    .await?
                    .into_iter()
                    .map(|e| chat::Entry {
                        sent_at: e.at,
                        from: if e.outgoing { me.clone() } else { e.peer },
                        text: e.text,
                        outgoing: e.outgoing,
                    })
                    .collect();
                chat::run(
                    Arc::clone(&messenger),
                    &me,
                    &user,
                    &history,
                    clock,
                    &downloads,
                )
                .await?;
            }
            Conversation::Group(group) => {
                let ended =
                    chat::run_group(Arc::clone(&messenger), &me, &group, clock, &downloads).await?;
                let group = render::line(&group);
                match ended {
                    Ended::Quit | Ended::LeftGroup => {}
                    Ended::Removed { by } => {
                        bail!(
                            "you were removed from group {group} by {}",
                            render::line(&by)
                        )
                    }
                    Ended::NotMember { why } => {
                        bail!(
                            "you are no longer a member of group {group}: {}",
                            render::line(&why)
                        )
                    }
                }
            }
        }
        anyhow::Ok(())
    }
    .await
    .map_err(|e| removed_or(&messenger.client(), &me, e));
    if let Ok(messenger) = Arc::try_unwrap(messenger) {
        messenger.close().await;
    }
    chatted
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ChatArgs;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<ChatArgs, clap::Error> {
        let cli = Cli::try_parse_from([&["sfc", "chat"], args].concat())?;
        match cli.command {
            Command::Chat(args) => Ok(args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn group_and_user_say_what_the_name_is_and_exclude_each_other() {
        let args = parse(&["--group", "friends"]).unwrap();
        assert_eq!(
            (args.name.as_str(), args.group, args.user),
            ("friends", true, false)
        );
        let args = parse(&["friends", "--user"]).unwrap();
        assert_eq!(
            (args.name.as_str(), args.group, args.user),
            ("friends", false, true)
        );
        let args = parse(&["friends"]).unwrap();
        assert!(!args.group && !args.user);
        assert!(parse(&["--group", "--user", "friends"]).is_err());
        assert!(parse(&["--group"]).is_err());
    }

    #[test]
    fn the_help_says_how_a_plain_name_is_chosen() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("chat")
            .map(|c| c.render_help().to_string())
            .unwrap_or_default();
        assert!(
            help.contains("asks for --user or --group if both apply"),
            "{help}"
        );
        assert!(help.contains("/members"), "{help}");
    }
}
