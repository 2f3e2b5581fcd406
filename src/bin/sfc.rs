//! `sfc`: the SecureFastChat command-line client. Parses arguments and calls the client library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use devices::{DeviceCommand, how_to_link, removed_message, removed_or};
use groups::GroupCommand;
use securefastchat::client::chat::Clock;
use securefastchat::client::home::{Home, SavedSession};
use securefastchat::client::keystore::{FIRST_DEVICE, Keystore};
use securefastchat::client::link;
use securefastchat::client::messenger::{
    Flushed, Messenger, MessengerError, OfflineMessenger, Received,
};
use securefastchat::client::render;
use securefastchat::client::{Client, ClientError, ClientOptions, ConnectionEvent};
use securefastchat::e2e::MAX_PLAINTEXT_LEN;
use securefastchat::protocol::{ErrorCode, MessageId, Password, Username};

#[path = "sfc/chat.rs"]
mod chat;
#[path = "sfc/devices.rs"]
mod devices;
#[path = "sfc/files.rs"]
mod files;
#[path = "sfc/groups.rs"]
mod groups;

/// SecureFastChat client.
#[derive(Parser, Debug)]
#[command(name = "sfc", version)]
struct Cli {
    /// Server address, HOST:PORT
    #[arg(
        long,
        env = "SFC_SERVER",
        default_value = "127.0.0.1:4433",
        global = true
    )]
    server: String,
    /// CA certificate to trust (PEM); `sfc-server` writes its dev CA to `<certs dir>/ca.crt`
    #[arg(long, env = "SFC_CA", default_value = "certs/ca.crt", global = true)]
    ca: PathBuf,
    /// Directory for the session token and keys [default: ~/.config/securefastchat]
    #[arg(long, env = "SFC_HOME", global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an account (password from SFC_PASSWORD or a prompt), log in, publish keys
    Signup {
        /// 3-32 characters of a-z 0-9 _ . -
        user: String,
    },
    /// Log in (password from SFC_PASSWORD or a prompt) as this home's device. In a home
    /// without the account's keys, refuses if the account already has keys on another device:
    /// link this home as a new device instead (`sfc device link`, `sfc device add`)
    Login {
        /// Account name
        user: String,
        /// Make a new identity key here, replacing the account's (every contact sees a key
        /// change; sessions with the old key end; every other device of the account is
        /// removed)
        #[arg(long)]
        new_identity: bool,
    },
    /// List your account's devices: `ID<TAB>NAME<TAB>added DATE<TAB>seen DATE`, times in UTC,
    /// and `this device` after the one you use here
    Devices,
    /// Link, add, list or remove devices of your account (a phone, a laptop, …: each with its
    /// own home directory, all with the account's identity)
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Groups (end-to-end encrypted with MLS): create, add, remove, leave, members, list,
    /// send. `sfc recv` prints group messages as `GROUP/FROM<TAB>TEXT`
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Revoke the saved session on the server and forget it
    Logout,
    /// Delete your account for good (password from SFC_PASSWORD or a prompt): its keys,
    /// sessions and waiting messages on the server, and this home's keys. The server holds the
    /// name for a while (30 days by default) so no one else can take it
    DeleteAccount,
    /// Show who is logged in
    Whoami,
    /// Send an end-to-end encrypted message (at most 57344 bytes, 56 KiB, of UTF-8 text);
    /// prints its id once the server has stored it. What the server cannot take now (a full
    /// inbox) waits in the outbox and goes first next time
    Send {
        /// Recipient
        user: String,
        /// The message; `-` reads it from standard input (one final line break is dropped)
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Read the message from this file (UTF-8 text; one final line break is dropped)
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// Send a file (end-to-end encrypted, at most 100 MiB by default): uploads it, resuming
    /// after a lost connection, then sends its message; prints the message's id once the
    /// server has both. A progress bar shows on a terminal
    SendFile {
        /// Recipient
        user: String,
        /// The file
        path: PathBuf,
    },
    /// Receive messages: one `FROM<TAB>TEXT` line each (`GROUP/FROM<TAB>TEXT` in a group; or
    /// JSON with --json). A message's later lines start with a TAB; control characters show as
    /// escapes (`\x1b`, `\u{202e}`).
    /// A file is saved into --into and shows as `FROM<TAB>file: NAME (SIZE)`, NAME the name it
    /// was saved under
    Recv {
        /// Stop after this many seconds without a message [default: 2]; `--wait` alone waits
        /// until interrupted (Ctrl-C, SIGTERM)
        #[arg(long, value_name = "SECONDS", num_args = 0..=1)]
        wait: Option<Option<u64>>,
        /// Wait for messages until interrupted (Ctrl-C, SIGTERM), like `--wait` alone
        #[arg(long, conflicts_with = "wait")]
        follow: bool,
        /// Stop after this many messages
        #[arg(long)]
        count: Option<usize>,
        /// One JSON object per line: id, from, sent_at, text (a file: `file` with name,
        /// size, type and path; a group message: `group` too)
        #[arg(long)]
        json: bool,
        /// Where received files are saved, made if missing (never over an existing file: a
        /// name in use gets ` (1)`, ` (2)`, …) [default: the current directory]
        #[arg(long, value_name = "DIR")]
        into: Option<PathBuf>,
    },
    /// Delete a sent message that has not been delivered yet
    Unsend {
        /// The message id `sfc send` printed
        id: String,
    },
    /// Is a contact online? (only contacts who have written to you)
    Online {
        /// The contact
        user: String,
    },
    /// Show the safety number of you and USER (from the key you accepted), to compare in person
    Fingerprint {
        /// The contact
        user: String,
    },
    /// Mark USER verified after comparing safety numbers in person: a later change of their
    /// key then blocks sending until you accept it
    Verify {
        /// The contact
        user: String,
    },
    /// Accept USER's new identity key (after comparing the new safety number)
    Trust {
        /// The contact
        user: String,
    },
    /// Start a new session with USER (the next message starts it from fresh keys)
    Reset {
        /// The contact
        user: String,
    },
    /// List the messages that could not be opened (`FROM<TAB>ID<TAB>SENT_AT<TAB>REASON`)
    Quarantine {
        /// Empty the quarantine after listing it
        #[arg(long)]
        clear: bool,
    },
    /// Send what waits in the outbox; list what still waits (`TO<TAB>ID` lines)
    Outbox,
    /// Interactive chat with a user or in a group (`--group`): messages appear as they
    /// come, Enter sends, Ctrl-C, Ctrl-D or `/quit` leaves. With a user, `/file PATH` sends a
    /// file; in a group, `/members` lists the members, `/leave` leaves the group (typed twice)
    /// and `/help` lists the commands
    Chat(chat::ChatArgs),
}

/// How long `sfc recv` waits for a message by default.
const DEFAULT_WAIT: Duration = Duration::from_secs(2);
/// How long `sfc recv` waits at a time before it looks whether it was interrupted.
const RECEIVE_SLICE: Duration = Duration::from_millis(250);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts (see `Clock::local`).
    let clock = Clock::local();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sfc: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, clock)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sfc: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line, each cause once (a cause whose text the line already holds
/// is left out), control characters escaped, with a hint for the mistakes people make most.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    let mut line = render::line(&line.replace('\n', " "));
    let client = error.chain().find_map(|cause| {
        cause.downcast_ref::<ClientError>().or_else(|| {
            match cause.downcast_ref::<MessengerError>() {
                Some(MessengerError::Client(client)) => Some(client),
                _ => None,
            }
        })
    });
    match client {
        Some(ClientError::CertificateNotTrusted(_)) => {
            line.push_str(" (is --ca the CA that signed this server's certificate?)");
        }
        Some(ClientError::Unreachable { .. }) => line.push_str(" (is sfc-server running there?)"),
        Some(ClientError::CaFile(_)) => line.push_str(
            " (point --ca or SFC_CA at the server's CA certificate: sfc-server writes it to \
             <certs dir>/ca.crt, and the default certs/ca.crt is relative to the current \
             directory)",
        ),
        _ => {}
    }
    line
}

/// Prints a warning about something a peer or the server said, on one line.
fn warn(warning: &str) {
    eprintln!("sfc: warning: {}", render::line(warning));
}

/// The text of `sfc send`: the argument, standard input (`-`) or a file; at most
/// MAX_PLAINTEXT_LEN bytes of UTF-8, read before anything is sealed (reading no further than
/// the limit).
async fn message_text(text: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    use tokio::io::AsyncReadExt;
    let too_long = || {
        anyhow::anyhow!(
            "the message is longer than the limit of {MAX_PLAINTEXT_LEN} bytes (56 KiB); nothing \
             was sent"
        )
    };
    let (bytes, source) = match (text, file) {
        (Some(text), None) if text != "-" => {
            if text.len() > MAX_PLAINTEXT_LEN {
                return Err(too_long());
            }
            return Ok(text);
        }
        (_, Some(path)) => {
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            (read_up_to_limit(file).await, path.display().to_string())
        }
        (_, None) => (
            read_up_to_limit(tokio::io::stdin()).await,
            "standard input".to_owned(),
        ),
    };
    let mut bytes = bytes.with_context(|| format!("reading {source}"))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.len() > MAX_PLAINTEXT_LEN {
        return Err(too_long());
    }
    return String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        anyhow::anyhow!("{source} is not UTF-8 text (an invalid byte at offset {at})")
    });

    async fn read_up_to_limit(
        reader: impl tokio::io::AsyncRead + Unpin,
    ) -> std::io::Result<Vec<u8>> {
        // The limit, a final CRLF, and one byte more to tell that it is too long.
        let most = MAX_PLAINTEXT_LEN as u64 + 3;
        let mut bytes = Vec::new();
        reader.take(most).read_to_end(&mut bytes).await?;
        Ok(bytes)
    }
}

/// A flag set on Ctrl-C or SIGTERM (caught from now on, instead of ending the process).
fn interrupted() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("catching Ctrl-C")?;
        let mut terminate = signal(SignalKind::terminate()).context("catching SIGTERM")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            flag.store(true, Ordering::Relaxed);
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    Ok(stop)
}

async fn run(cli: Cli, clock: Clock) -> anyhow::Result<()> {
    let home_dir = cli.home.clone().unwrap_or_else(Home::default_dir);
    let home = Home::open(&home_dir)?;
    let options = ClientOptions::new(cli.server.clone(), cli.ca.clone());
    match cli.command {
        Command::Signup { user } => {
            refuse_other_users_home(&home, &user).await?;
            let client = Client::connect(&options).await?;
            let (name, available) = client.check_username(&user).await?;
            if !available {
                bail!("username {name:?} is taken");
            }
            let password = read_password(true)?;
            let (session, token) = client.signup(&name, password).await?;
            save(
                &home,
                &cli.server,
                &session.username,
                token,
                session.expires_at,
            )?;
            let messenger = Messenger::new(client, home.dir(), &session.username)?;
            let ready = async {
                messenger.ensure_keys().await?;
                // So that others can add this device to groups at once.
                messenger.ensure_key_packages().await?;
                anyhow::Ok(())
            }
            .await;
            messenger.close().await;
            ready?;
            println!(
                "signed up and logged in as {}",
                render::line(&session.username)
            );
        }
        Command::Login { user, new_identity } => {
            refuse_other_users_home(&home, &user).await?;
            // The canonical name, for what is said below (the server checks it again).
            let user = Username::parse(&user).map_or(user, |u| u.as_str().to_owned());
            let keystore = Keystore::new(home.dir());
            // This home's device, or device 1 for a home without keys.
            let held = link::home_keys(&keystore).await?.map(|(_, device)| device);
            let device = held.unwrap_or(FIRST_DEVICE);
            let password = read_password(false)?;
            let client = Client::connect(&options).await?;
            let session = match link::login_as(&client, &user, password.clone(), Some(device)).await
            {
                Err(e) if e.is_server(ErrorCode::UnknownDevice) => {
                    client.close().await;
                    return Err(match held {
                        Some(device) => anyhow::anyhow!(removed_message(&user, Some(device))),
                        None => anyhow::anyhow!(
                            "{user} has no device 1 any more (it was removed); link this home as \
                             a new device: {}",
                            how_to_link(&user)
                        ),
                    });
                }
                other => other?,
            };
            let me = Username::parse(&session.username)
                .with_context(|| format!("the server named the account {:?}", session.username))?;
            // The keys come first: a login that cannot use this home saves nothing here and
            // leaves no session behind on the server.
            let keys = async {
                if new_identity {
                    let removed =
                        link::replace_identity(&client, &keystore, &me, session.device, password)
                            .await?;
                    return anyhow::Ok(removed);
                }
                if held.is_none() {
                    match client.fetch_identity(me.as_str()).await {
                        Ok(_) => bail!(
                            "{me} already has keys on another device, and this home holds none: \
                             making new ones here would replace the account's identity (every \
                             contact would see a key change). Link this home as a new device \
                             instead: {}. (To replace the identity on purpose, which removes \
                             every other device: `sfc login --new-identity {me}`)",
                            how_to_link(me.as_str())
                        ),
                        Err(e) if e.is_server(ErrorCode::NoKeys) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Vec::new())
            }
            .await;
            let removed = match keys {
                Ok(removed) => removed,
                Err(e) => {
                    let _ = client.logout().await;
                    client.close().await;
                    return Err(e);
                }
            };
            // A new identity voids this device's MLS certification, key packages and groups
            // (the server dropped its key packages with the old identity).
            if new_identity {
                securefastchat::e2e::mls::forget_state(home.dir())
                    .context("resetting this home's group state")?;
            }
            let messenger = Messenger::new(client, home.dir(), &session.username)?;
            let ready = async {
                messenger.ensure_keys().await?;
                messenger.ensure_key_packages().await
            }
            .await;
            if let Err(e) = ready {
                let _ = messenger.client().logout().await;
                messenger.close().await;
                return Err(e.into());
            }
            save(
                &home,
                &cli.server,
                &session.username,
                session.token,
                session.expires_at,
            )?;
            messenger.close().await;
            let name = render::line(&session.username);
            if new_identity {
                println!("logged in as {name} with a new identity key");
                if !removed.is_empty() {
                    let ids: Vec<String> = removed.iter().map(u32::to_string).collect();
                    println!(
                        "removed the account's other devices (they held the old identity): {}",
                        ids.join(", ")
                    );
                }
            } else {
                println!("logged in as {name}");
            }
        }
        Command::Devices => {
            devices::run(DeviceCommand::List, &home, &options, &cli.server).await?;
        }
        Command::Device { command } => {
            devices::run(command, &home, &options, &cli.server).await?;
        }
        Command::Group { command } => {
            groups::run(command, &home, &options).await?;
        }
        Command::Whoami => {
            let (client, saved) = resume(&home, &options, false).await?;
            client.close().await;
            println!("{}", render::line(&saved.username));
        }
        Command::Logout => {
            let Some(saved) = home.load_session()? else {
                println!("not logged in");
                return Ok(());
            };
            let client = Client::connect(&options).await?;
            match client.resume(saved.token).await {
                Ok(_) => client.logout().await?,
                Err(e) if e.is_server(ErrorCode::InvalidToken) => {}
                Err(e) => return Err(e.into()),
            }
            client.close().await;
            home.clear_session()?;
            println!("logged out {}", render::line(&saved.username));
        }
        Command::DeleteAccount => {
            let (client, _) = resume(&home, &options, false).await?;
            let password = read_password(false)?;
            let deleted = client.delete_account(password).await?;
            client.close().await;
            home.clear_session()?;
            securefastchat::client::keystore::Keystore::new(home.dir())
                .remove()
                .context("deleting this home's keys")?;
            securefastchat::e2e::mls::forget_state(home.dir())
                .context("deleting this home's group state")?;
            let name = render::line(&deleted);
            println!("deleted account {name}");
        }
        Command::Send { user, text, file } => {
            let text = message_text(text, file).await?;
            let messenger = match messenger(&home, &options, false).await {
                Ok(messenger) => messenger,
                Err(e) => return queue_offline(&home, &user, &text, e).await,
            };
            report_flushed(&messenger.flush_outbox().await?);
            let (id, warning) = messenger.send_text(&user, &text).await?;
            if let Some(warning) = warning {
                warn(&warning);
            }
            messenger.close().await;
            println!("{id}");
        }
        Command::SendFile { user, path } => {
            files::send_file(&home, &options, &user, &path).await?;
        }
        Command::Recv {
            wait,
            follow,
            count,
            json,
            into,
        } => {
            let downloads = download_dir(into)?;
            // None: until interrupted.
            let patience = match wait {
                _ if follow => None,
                None => Some(DEFAULT_WAIT),
                Some(seconds) => seconds.map(Duration::from_secs),
            };
            // An interruption is looked at between messages, never in the middle of one (a
            // message opened but not acknowledged would come again as a duplicate, unshown).
            let stop = interrupted()?;
            let messenger = receiving_messenger(&home, &options).await?;
            let mut shown = 0;
            let mut idle_since = tokio::time::Instant::now();
            let received_all = async {
            while count.is_none_or(|n| shown < n) {
                let slice = patience.map_or(RECEIVE_SLICE, |p| {
                    p.saturating_sub(idle_since.elapsed()).min(RECEIVE_SLICE)
                });
                let received = messenger
                    .receive_reconnecting(slice, patience, &mut tell_connection)
                    .await?;
                let Some(received) = received else {
                    if stop.load(Ordering::Relaxed)
                        || patience.is_some_and(|p| idle_since.elapsed() >= p)
                    {
                        break;
                    }
                    continue;
                };
                idle_since = tokio::time::Instant::now();
                match &received {
                    Received::Text {
                        id,
                        from,
                        to,
                        sent_at,
                        text,
                        warning,
                        ..
                    } => {
                        if let Some(warning) = warning {
                            warn(warning);
                        }
                        if json {
                            let mut line = serde_json::json!({
                                "id": id.to_hex(), "from": from, "sent_at": sent_at, "text": text,
                            });
                            // A copy of what this account sent from another device.
                            if let (Some(to), Some(map)) = (to, line.as_object_mut()) {
                                map.insert("to".into(), serde_json::Value::from(to.as_str()));
                            }
                            println!("{}", render::json(&line.to_string()));
                        } else {
                            // Sent by this account from another device: `alice -> bob` (names
                            // hold no spaces, so the first field still ends at the TAB).
                            let who = match to {
                                Some(to) => format!("{} -> {}", render::line(from), render::line(to)),
                                None => render::line(from),
                            };
                            println!("{who}\t{}", render::body(text, "\t"));
                        }
                        shown += 1;
                    }
                    Received::File {
                        id,
                        from,
                        to,
                        sent_at,
                        file,
                        warning,
                        ..
                    } => {
                        if let Some(warning) = warning {
                            warn(warning);
                        }
                        if let Some(saved) = files::receive_file(&messenger, file, &downloads).await? {
                            if json {
                                let mut line = serde_json::json!({
                                    "id": id.to_hex(), "from": from, "sent_at": sent_at,
                                    "file": files::file_json(&saved, file),
                                });
                                if let (Some(to), Some(map)) = (to, line.as_object_mut()) {
                                    map.insert("to".into(), serde_json::Value::from(to.as_str()));
                                }
                                println!("{}", render::json(&line.to_string()));
                            } else {
                                let who = match to {
                                    Some(to) => format!("{} -> {}", render::line(from), render::line(to)),
                                    None => render::line(from),
                                };
                                println!("{who}\t{}", files::file_line(&saved, file));
                            }
                            shown += 1;
                        }
                    }
                    Received::Group {
                        group,
                        id,
                        from,
                        sent_at,
                        text,
                        ..
                    } => {
                        if json {
                            let line = serde_json::json!({
                                "id": id.to_hex(), "group": group, "from": from,
                                "sent_at": sent_at, "text": text,
                            });
                            println!("{}", render::json(&line.to_string()));
                        } else {
                            // Group and user names hold no `/`, spaces or TABs.
                            println!(
                                "{}/{}\t{}",
                                render::line(group),
                                render::line(from),
                                render::body(text, "\t")
                            );
                        }
                        shown += 1;
                    }
                    other => {
                        if let Some(what) = other.describe() {
                            warn(&what);
                        }
                    }
                }
                // Printed (and flushed) before it counts as shown and is acknowledged.
                std::io::Write::flush(&mut std::io::stdout()).context("writing to stdout")?;
                messenger.shown(&received).await?;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            anyhow::Ok(())
            }
            .await
            .map_err(|e| removed_or(&messenger.client(), messenger.me(), e));
            messenger.close().await;
            received_all?;
        }
        Command::Unsend { id } => {
            let id = MessageId::from_hex(&id).context("a message id is 32 hex digits")?;
            let (client, _) = resume(&home, &options, false).await?;
            let deleted = client.unsend(id).await?;
            client.close().await;
            if !deleted {
                bail!("not deleted: the message was already delivered, expired, or is unknown");
            }
            println!("deleted {id}");
        }
        Command::Online { user } => {
            let (client, _) = resume(&home, &options, false).await?;
            let online = client.online(&user).await?;
            client.close().await;
            println!("{}", if online { "online" } else { "offline" });
        }
        Command::Fingerprint { user } => {
            let messenger = messenger(&home, &options, false).await?;
            let fingerprint = messenger.fingerprint(&user).await?;
            messenger.close().await;
            println!("{}", fingerprint.number);
            if fingerprint.verified {
                eprintln!("sfc: {user} is verified (you compared this number in person)");
            }
            if let Some(new) = &fingerprint.changed_to {
                eprintln!(
                    "sfc: WARNING: {user} now presents ANOTHER identity key, not accepted yet; \
                     with it the number would be: {new}. Compare it with {user} in person, \
                     then accept it with `sfc trust {user}`"
                );
            }
            if let Some(other) = &fingerprint.server_differs {
                eprintln!(
                    "sfc: WARNING: the server lists ANOTHER identity key for {user} than the one \
                     you accepted (someone may be in the middle); with it the number would be: \
                     {other}. The number above is the key you accepted"
                );
            }
            if fingerprint.server_unchecked {
                eprintln!("sfc: the server could not be asked; this is the key you accepted");
            }
        }
        Command::Verify { user } => {
            let messenger = messenger(&home, &options, false).await?;
            let number = messenger.verify(&user).await?;
            messenger.close().await;
            println!("{user} verified: {number}");
        }
        Command::Trust { user } => {
            let messenger = messenger(&home, &options, false).await?;
            let number = messenger.trust(&user).await?;
            messenger.close().await;
            match number {
                Some(number) => println!(
                    "accepted {user}'s new identity key: {number} (compare it, then `sfc verify {user}`)"
                ),
                None => println!("{user}'s identity key has not changed"),
            }
        }
        Command::Reset { user } => {
            let messenger = local_messenger(&home)?;
            let had = messenger.reset(&user).await?;
            if had {
                println!("the next message to {user} starts a new session");
            } else {
                println!("no session with {user} yet");
            }
        }
        Command::Quarantine { clear } => {
            let messenger = local_messenger(&home)?;
            for q in messenger.quarantined().await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    render::line(&q.from),
                    q.id,
                    q.sent_at,
                    render::line(&q.reason)
                );
            }
            if clear {
                let n = messenger.clear_quarantine().await?;
                eprintln!("sfc: removed {n} messages from the quarantine");
            }
        }
        Command::Outbox => {
            let messenger = messenger(&home, &options, false).await?;
            let flushed = messenger.flush_outbox().await?;
            report_flushed(&flushed);
            for waiting in messenger.outbox().await? {
                println!("{}\t{}", render::line(&waiting.to), waiting.id);
            }
            messenger.close().await;
            if let Some(why) = flushed.stopped {
                bail!("{} messages still wait: {why}", flushed.waiting);
            }
        }
        Command::Chat(args) => chat::run(args, &home, &options, clock).await?,
    }
    Ok(())
}

/// The directory received files are saved into: `into` (made, with its parents, if missing),
/// or the current directory.
fn download_dir(into: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = into.unwrap_or_else(|| PathBuf::from("."));
    if !dir.exists() {
        std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
    }
    let meta = std::fs::metadata(&dir).with_context(|| format!("using {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    Ok(dir)
}

/// Connects and resumes the saved session.
async fn resume(
    home: &Home,
    options: &ClientOptions,
    deliver: bool,
) -> anyhow::Result<(Client, SavedSession)> {
    let saved = home
        .load_session()?
        .context("not logged in (run `sfc login USER`)")?;
    let client = Client::connect(options).await?;
    match client.resume_with(saved.token.clone(), deliver).await {
        Err(e) if e.is_server(ErrorCode::InvalidToken) => {
            home.clear_session()?;
            // A removed device's tokens are refused the same way; `sfc login` tells which.
            bail!(
                "session expired or revoked, or this device was removed from its account (run \
                 `sfc login {}`)",
                saved.username
            );
        }
        other => {
            other?;
        }
    }
    Ok((client, saved))
}

/// Tells on standard error what happened to messages that waited in the outbox.
fn report_flushed(flushed: &Flushed) {
    for (to, id) in &flushed.sent {
        let to = render::line(to);
        eprintln!("sfc: sent {id} to {to} (it waited in the outbox)");
    }
    for (to, id, why) in &flushed.dropped {
        let line = render::line(&format!("the server refused {id} to {to} for good: {why}"));
        eprintln!("sfc: {line}");
    }
}

async fn messenger(
    home: &Home,
    options: &ClientOptions,
    deliver: bool,
) -> anyhow::Result<Messenger> {
    let (client, saved) = resume(home, options, deliver).await?;
    let messenger = Messenger::new(client, home.dir(), &saved.username)?;
    messenger.ensure_keys().await?;
    Ok(messenger)
}

/// Tells on standard error what happened to the connection.
fn tell_connection(event: ConnectionEvent<'_>) {
    match event {
        ConnectionEvent::Lost { why, wait } => {
            eprintln!(
                "sfc: connection lost ({why}); reconnecting in {} s",
                wait.as_secs()
            );
        }
        ConnectionEvent::Back(flushed) => {
            eprintln!("sfc: reconnected");
            report_flushed(flushed);
        }
    }
}

/// Resumes the saved session with delivery, holding the home's receive lock (taken before
/// connecting, so a second receiver stops before it takes delivery from the first).
async fn receiving_messenger(home: &Home, options: &ClientOptions) -> anyhow::Result<Messenger> {
    let lock = securefastchat::client::keystore::Keystore::new(home.dir())
        .lock_receiving()?
        .ok_or(MessengerError::AlreadyReceiving)?;
    let (client, saved) = resume(home, options, true).await?;
    let messenger = Messenger::receiving(client, home.dir(), &saved.username, lock)?
        .with_reconnect(options.clone(), saved.token, true);
    messenger.ensure_keys().await?;
    Ok(messenger)
}

/// A messenger for what needs no server (the keystore only).
fn local_messenger(home: &Home) -> anyhow::Result<OfflineMessenger> {
    let saved = home
        .load_session()?
        .context("not logged in (run `sfc login USER`)")?;
    Ok(OfflineMessenger::new(home.dir(), &saved.username)?)
}

/// `sfc send` when the server cannot be reached: seals the message into the outbox if there is
/// a session with the recipient (exit 1, saying so), or fails with the connection's error.
async fn queue_offline(
    home: &Home,
    to: &str,
    text: &str,
    why: anyhow::Error,
) -> anyhow::Result<()> {
    let offline = why
        .downcast_ref::<ClientError>()
        .is_some_and(securefastchat::client::is_offline);
    if !offline {
        return Err(why);
    }
    let messenger = local_messenger(home)?;
    match messenger.queue_text(to, text, &one_line(&why)).await {
        Ok(queued) => Err(queued.into()),
        Err(MessengerError::NoSession(_)) => Err(why.context(format!(
            "nothing was kept: there is no session with {to} yet, and starting one needs the server"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Refuses to sign up or log in as `user` in a home that holds another user's keys, before
/// anything is saved.
async fn refuse_other_users_home(home: &Home, user: &str) -> anyhow::Result<()> {
    let keystore = securefastchat::client::keystore::Keystore::new(home.dir());
    let holder = keystore
        .read_async(|s| s.map(|s| s.username.clone()))
        .await?;
    let folded = securefastchat::protocol::Username::parse(user)
        .map(|u| u.as_str().to_owned())
        .unwrap_or_else(|_| user.to_owned());
    match holder {
        Some(holder) if holder != folded => Err(MessengerError::OtherUser(holder).into()),
        _ => Ok(()),
    }
}

fn save(
    home: &Home,
    server: &str,
    username: &str,
    token: securefastchat::protocol::SessionToken,
    expires_at: u64,
) -> anyhow::Result<()> {
    let session = SavedSession {
        server: server.to_owned(),
        username: username.to_owned(),
        token,
        expires_at,
    };
    home.save_session(&session)
        .with_context(|| format!("saving the session in {}", home.dir().display()))
}

/// The password from SFC_PASSWORD, or a no-echo prompt (asked twice for a new password).
fn read_password(new: bool) -> anyhow::Result<Password> {
    if let Ok(password) = std::env::var("SFC_PASSWORD") {
        return Ok(Password::new(password));
    }
    if !std::io::stdin().is_terminal() {
        bail!("no password: set SFC_PASSWORD or run in a terminal");
    }
    let password = rpassword::prompt_password("Password: ").context("reading the password")?;
    if new {
        let again =
            rpassword::prompt_password("Repeat password: ").context("reading the password")?;
        if again != password {
            bail!("passwords do not match");
        }
    }
    Ok(Password::new(password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_says_each_cause_once() {
        use securefastchat::e2e::E2eError;
        let too_large = E2eError::TooLarge {
            what: "plaintext",
            len: 60_000,
            max: MAX_PLAINTEXT_LEN,
        };
        let error = anyhow::Error::from(MessengerError::E2e(too_large));
        let line = one_line(&error);
        assert_eq!(line.matches("57344").count(), 1, "{line}");
        assert_eq!(line, "plaintext of 60000 bytes exceeds the limit of 57344");
        // Causes that add something are kept.
        let error = anyhow::anyhow!("inner \x1b[2J").context("outer");
        assert_eq!(one_line(&error), "outer: inner \\x1b[2J");
    }

    #[test]
    fn send_help_states_the_size_limit() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let send = cli.find_subcommand_mut("send").map(|c| c.render_help());
        let help = send.map(|h| h.to_string()).unwrap_or_default();
        assert!(help.contains(&MAX_PLAINTEXT_LEN.to_string()), "{help}");
    }
}
