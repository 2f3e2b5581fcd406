//! `sfc chat USER` and `sfc chat --group GROUP`: an interactive terminal chat. The screen
//! scrolls the conversation; the bottom line is where you type, with a line editor (arrow
//! keys, history, Ctrl-U, Ctrl-W, Ctrl-L). Incoming messages are printed above the typing line
//! as they arrive, without disturbing what you are typing. Enter sends, Ctrl-C or Ctrl-D (or
//! `/quit`) leaves. In a 1:1 chat `/file PATH` sends a file, and received files are saved into
//! a download directory (`files`); in a group's chat, `/members` and `/leave` (`group`).
//!
//! Each message shows as `HH:MM NAME: TEXT` (the time the server stored it, in the clock
//! chosen at start); a message of another conversation is shown too, marked with where it
//! belongs (`HH:MM [from NAME] TEXT`, `[you to NAME]`, `[GROUP/NAME]`: `show`). Everything
//! from others goes through [`super::render`], and a message's later lines are indented, so no
//! text can pass for another sender's line (`screen`).
//!
//! The keyboard runs on a thread of its own (`keyboard`: the line editor blocks); receiving
//! runs in a task of its own (`receiver`), so that a keystroke never interrupts a message
//! between its arrival and its acknowledgement. Sending and the outbox (`direct`, `group`) run
//! in the loop that ties them together, here. Which conversation a name opens is decided in
//! `choose`.

mod choose;
mod direct;
mod files;
mod group;
mod keyboard;
mod receiver;
mod screen;
mod show;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

pub use choose::{ChooseError, Pick, choose};
pub use screen::{Clock, Entry, history_lines};

use super::ClientError;
use super::messenger::{Messenger, MessengerError};
use super::render;
use direct::{OUTBOX_RETRY, flush_outbox, send_line};
use group::{GroupChat, Typing};
use keyboard::{Input, spawn_keyboard};
use receiver::{Arrival, spawn_receiver};
use screen::{Screen, TerminalMode, notice, status};
use show::{members_line, show_received};

/// How long a chat that ends waits for the message being opened.
const RECEIVER_STOP: Duration = Duration::from_secs(5);

/// Which conversation a chat is open on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    /// The 1:1 conversation with this user.
    Direct(String),
    /// This group (its name as the server spells it), of which this device is a member.
    Group(String),
}

/// How a chat ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The user left the chat (Ctrl-C, Ctrl-D, `/quit`, SIGTERM).
    Quit,
    /// The user left the group (`/leave`).
    LeftGroup,
    /// This device was removed from the group by `by` (`USER/DEVICE`): it cannot read what
    /// the group says from now on.
    Removed {
        /// Who removed it.
        by: String,
    },
    /// The group refused this device as a member (it left from another device of the
    /// account, or the group is gone): `why`, in words.
    NotMember {
        /// What the send or leave that found out said.
        why: String,
    },
}

/// Whether the chat goes on after something it did.
pub(super) enum Flow {
    /// It goes on.
    Continue,
    /// It ends.
    End(Ended),
}

/// Runs the chat with `peer` until the user leaves, after showing `history` (the
/// conversation so far, oldest first).
pub async fn run(
    messenger: Arc<Messenger>,
    me: &str,
    peer: &str,
    history: &[Entry],
    clock: Clock,
    downloads: &Path,
) -> Result<(), MessengerError> {
    let conversation = Conversation::Direct(peer.to_owned());
    open(messenger, me, &conversation, history, clock, downloads)
        .await
        .map(|_| ())
}

/// Runs the chat in group `group` (a group this device is a member of, as [`choose`] found
/// it) until the user leaves the chat or the group, or this device is removed from it. It
/// first shows what waits for this device (merging the group's commits, so that the first
/// line goes out in the group's current epoch) and the members.
pub async fn run_group(
    messenger: Arc<Messenger>,
    me: &str,
    group: &str,
    clock: Clock,
    downloads: &Path,
) -> Result<Ended, MessengerError> {
    let conversation = Conversation::Group(group.to_owned());
    open(messenger, me, &conversation, &[], clock, downloads).await
}

/// Opens the chat on `conversation` and runs it.
async fn open(
    messenger: Arc<Messenger>,
    me: &str,
    conversation: &Conversation,
    history: &[Entry],
    clock: Clock,
    downloads: &Path,
) -> Result<Ended, MessengerError> {
    let _terminal = TerminalMode::save();
    let mut screen = Screen::new(downloads.to_owned());
    match conversation {
        Conversation::Direct(peer) => {
            println!(
                "chatting with {} (Enter sends, Ctrl-C leaves; {})",
                render::line(peer),
                clock.describe()
            );
            for line in history_lines(history, peer, clock) {
                println!("{line}");
            }
            // A changed key stays in sight until the user accepts it (`sfc trust`).
            if messenger.offline().key_changed(peer).await? {
                println!("{}", notice(&super::messenger::changed_warning(peer)));
            }
        }
        Conversation::Group(name) => {
            println!(
                "chatting in group {} (Enter sends to the group, /help lists the commands, \
                 Ctrl-C leaves; {})",
                render::line(name),
                clock.describe()
            );
            let opened = open_group(&messenger, &mut screen, clock, name, conversation).await?;
            if let Flow::End(end) = opened {
                return Ok(end);
            }
        }
    }
    let prompt = format!("{}> ", render::line(me));
    let (mut keys, printer) = spawn_keyboard(prompt).await?;
    screen.above_editor(printer);
    let stop = Arc::new(AtomicBool::new(false));
    let (receiver, mut incoming) = spawn_receiver(Arc::clone(&messenger), Arc::clone(&stop));
    let mut chat = Chat {
        messenger: &messenger,
        screen: &mut screen,
        me,
        conversation,
        clock,
    };
    let result = chat.run(&mut keys, &mut incoming).await;
    // A message being opened when the user left is finished and shown: stopped in the middle,
    // it would be acknowledged unshown, or come again and be taken for a duplicate.
    stop.store(true, Ordering::Relaxed);
    let mut receiver = receiver;
    let _ = tokio::time::timeout(RECEIVER_STOP, &mut receiver).await;
    receiver.abort();
    if result.is_ok() {
        while let Ok(received) = incoming.try_recv() {
            let _ = show_received(&messenger, &mut screen, clock, conversation, received).await;
        }
    }
    result
}

/// Before the prompt of group `name`'s chat (`conversation`): commits whose answer a lost connection took are settled, what
/// waits is shown (and the group's commits merged), then the members.
async fn open_group(
    messenger: &Messenger,
    screen: &mut Screen,
    clock: Clock,
    name: &str,
    conversation: &Conversation,
) -> Result<Flow, MessengerError> {
    if let Err(e) = messenger.group_resume_commits().await {
        screen.show(notice(&format!("a commit of this device waits: {e}")));
    }
    if let Flow::End(end) = receiver::catch_up(messenger, screen, clock, conversation).await? {
        return Ok(Flow::End(end));
    }
    match messenger.group(name).await {
        Ok(state) if state.mls.active => {
            screen.show(members_line(&state));
            Ok(Flow::Continue)
        }
        Ok(_) => Ok(Flow::End(Ended::NotMember {
            why: "this device is no longer a member of the group".into(),
        })),
        Err(e) => Ok(Flow::End(Ended::NotMember { why: e.to_string() })),
    }
}

/// What typed lines go to: a peer, or a group's chat (with its commands' state).
enum Side<'a> {
    Direct(&'a str),
    Group(GroupChat),
}

/// A running chat: what its loop works with.
struct Chat<'a> {
    messenger: &'a Messenger,
    screen: &'a mut Screen,
    me: &'a str,
    conversation: &'a Conversation,
    clock: Clock,
}

impl Chat<'_> {
    /// Shows what arrives and sends what is typed until the chat ends.
    async fn run(
        &mut self,
        keys: &mut mpsc::Receiver<Input>,
        incoming: &mut mpsc::Receiver<Arrival>,
    ) -> Result<Ended, MessengerError> {
        let mut side = match self.conversation {
            Conversation::Direct(peer) => Side::Direct(peer),
            Conversation::Group(name) => Side::Group(GroupChat::new(name)),
        };
        // What waited in the outbox goes first, and whatever still waits is tried again every
        // OUTBOX_RETRY (a full inbox empties as its owner reads).
        let mut waiting = flush_outbox(self.messenger, self.screen, true).await;
        let mut retry =
            tokio::time::interval_at(tokio::time::Instant::now() + OUTBOX_RETRY, OUTBOX_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // SIGTERM leaves as Ctrl-C does: the message at hand is shown, the terminal restored.
        #[cfg(unix)]
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| MessengerError::Client(ClientError::Io(e)))?;
        loop {
            #[cfg(unix)]
            let terminated = terminate.recv();
            #[cfg(not(unix))]
            let terminated = std::future::pending::<Option<()>>();
            let flow = tokio::select! {
                _ = terminated => return Ok(Ended::Quit),
                _ = retry.tick(), if waiting => {
                    waiting = flush_outbox(self.messenger, self.screen, false).await;
                    Flow::Continue
                }
                input = keys.recv() => match input {
                    None | Some(Input::Quit) => return Ok(Ended::Quit),
                    Some(Input::Failed(why)) => {
                        self.screen.show(notice(&format!("keyboard: {why}")));
                        return Ok(Ended::Quit);
                    }
                    Some(Input::Line(line)) => {
                        self.typed(line.trim(), &mut side, &mut waiting, incoming).await?
                    }
                },
                received = incoming.recv() => {
                    let Some(received) = received else { return Ok(Ended::Quit) };
                    show_received(
                        self.messenger,
                        self.screen,
                        self.clock,
                        self.conversation,
                        received,
                    )
                    .await?
                }
            };
            if let Flow::End(end) = flow {
                if let (Ended::Removed { .. }, Conversation::Group(name)) =
                    (&end, self.conversation)
                {
                    self.screen.show(status(&format!(
                        "the chat ends: you are no longer a member of {name}"
                    )));
                }
                return Ok(end);
            }
        }
    }

    /// Handles a typed line: a command, or a message to the open conversation.
    async fn typed(
        &mut self,
        line: &str,
        side: &mut Side<'_>,
        waiting: &mut bool,
        incoming: &mut mpsc::Receiver<Arrival>,
    ) -> Result<Flow, MessengerError> {
        if line.is_empty() {
            return Ok(Flow::Continue);
        }
        match side {
            Side::Group(group) => {
                let at = Typing {
                    messenger: self.messenger,
                    screen: self.screen,
                    clock: self.clock,
                    me: self.me,
                    conversation: self.conversation,
                    incoming,
                };
                group.typed(at, line).await
            }
            Side::Direct(peer) => {
                let (messenger, clock, me) = (self.messenger, self.clock, self.me);
                if let Some(path) = line.strip_prefix(files::FILE_COMMAND) {
                    *waiting |=
                        files::send_file_line(messenger, self.screen, clock, me, peer, path).await;
                } else {
                    *waiting |= send_line(messenger, self.screen, clock, me, peer, line).await;
                }
                Ok(Flow::Continue)
            }
        }
    }
}
