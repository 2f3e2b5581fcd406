//! `sfc devices` and `sfc device …`: linking a new device (`link` on a device of the account,
//! `add` on the new one), listing and removing devices; and what `sfc` says when its own device
//! was removed. The work is the client library's (`securefastchat::client::link`).

use anyhow::Context;
use clap::Subcommand;
use securefastchat::client::groups::DeviceChanges;
use securefastchat::client::home::Home;
use securefastchat::client::keystore::Keystore;
use securefastchat::client::link;
use securefastchat::client::messenger::Messenger;
use securefastchat::client::render;
use securefastchat::client::{Client, ClientOptions};
use securefastchat::e2e::LinkCode;
use securefastchat::protocol::{DeviceId, Username};

use super::{read_password, resume, save, warn};

#[derive(Subcommand, Debug)]
pub(crate) enum DeviceCommand {
    /// On a device of your account: show a code for a new device, then wait (up to 5
    /// minutes) for it to be used with `sfc device add` there
    Link,
    /// On the new device, in a new, empty home: link this home to USER's account with the code
    /// that `sfc device link` shows on a device of the account
    Add {
        /// The account
        user: String,
        /// The code shown by `sfc device link` (SSSS-PPPPPP)
        code: String,
        /// A name for this device in the device list, 1-64 bytes [default: this computer's
        /// host name, or "new device"]
        #[arg(long)]
        name: Option<String>,
    },
    /// List your account's devices (as `sfc devices`)
    List,
    /// Remove another device of your account (password from SFC_PASSWORD or a prompt): its
    /// sessions end at once and the messages waiting for it are deleted
    Remove {
        /// The device's id (see `sfc devices`)
        id: DeviceId,
    },
}

/// Runs a device command; `server` is the address the session is saved for.
pub(crate) async fn run(
    command: DeviceCommand,
    home: &Home,
    options: &ClientOptions,
    server: &str,
) -> anyhow::Result<()> {
    match command {
        DeviceCommand::List => list(home, options).await,
        DeviceCommand::Link => open_link(home, options).await,
        DeviceCommand::Add { user, code, name } => {
            add(home, options, server, &user, &code, name).await
        }
        DeviceCommand::Remove { id } => {
            let (client, saved) = resume(home, options, false).await?;
            let password = read_password(false)?;
            let messenger = Messenger::new(client, home.dir(), &saved.username)?;
            // Signs a revocation (so other members may remove its leaves too), removes the
            // device, then commits the removal of its leaves in this device's groups.
            let removed = messenger.remove_device(id, password).await;
            messenger.close().await;
            let changes = removed?;
            println!("removed device {id}");
            report_groups(&changes, "removed from");
            Ok(())
        }
    }
}

/// `sfc devices`: `ID<TAB>NAME<TAB>added DATE<TAB>seen DATE[<TAB>this device]`.
async fn list(home: &Home, options: &ClientOptions) -> anyhow::Result<()> {
    let (client, _) = resume(home, options, false).await?;
    let devices = link::list_devices(&client).await;
    client.close().await;
    for device in devices? {
        let seen = match device.last_seen {
            0 => "never seen".to_owned(),
            at => format!("seen {}", utc(at)),
        };
        let current = if device.current { "\tthis device" } else { "" };
        println!(
            "{}\t{}\tadded {}\t{seen}{current}",
            device.device,
            render::line(&device.name),
            utc(device.added_at)
        );
    }
    Ok(())
}

/// `sfc device link`: shows the code, waits for the new device, answers it.
async fn open_link(home: &Home, options: &ClientOptions) -> anyhow::Result<()> {
    let (client, saved) = resume(home, options, false).await?;
    let me = Username::parse(&saved.username)
        .with_context(|| format!("the saved session names {:?}", saved.username))?;
    let keystore = Keystore::new(home.dir());
    let open = link::open_link(&client, &keystore, &me).await?;
    let code = open.code().to_string();
    println!("link code: {code}");
    println!("on the new device, in a new home: sfc device add {me} {code}");
    println!(
        "waiting for it (the code works once, for {} minutes) …",
        link::LINK_WAIT.as_secs() / 60
    );
    std::io::Write::flush(&mut std::io::stdout()).context("writing to stdout")?;
    let linked = match open.answer(&client, &keystore).await {
        Ok(linked) => linked,
        Err(e) => {
            client.close().await;
            return Err(e.into());
        }
    };
    println!(
        "linked device {}: {}",
        linked.device,
        render::line(&linked.name)
    );
    // The new device joins this account's groups: this device adds it to each, once the new
    // one has published its key packages (it does right after linking).
    let messenger = Messenger::new(client, home.dir(), &saved.username)?;
    let joined = messenger
        .add_device_to_groups(linked.device, GROUP_JOIN_WAIT)
        .await;
    messenger.close().await;
    match joined {
        Ok(changes) => report_groups(&changes, "added to"),
        Err(e) => warn(&format!(
            "device {} was linked but not added to your groups now ({e}); your devices add it \
             when they next catch up (any `sfc group` command)",
            linked.device
        )),
    }
    if linked.contacts_left_out > 0 {
        warn(&format!(
            "{} pinned contacts were not passed on (at most {} are); the new device pins their \
             keys when it first hears from them",
            linked.contacts_left_out,
            link::MAX_LINK_CONTACTS
        ));
    }
    Ok(())
}

/// How long `sfc device link` waits for the new device's key packages to add it to groups.
const GROUP_JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Says which groups a device change reached (`verb`: "added to", "removed from"), and which
/// it could not reach now.
fn report_groups(changes: &DeviceChanges, verb: &str) {
    if !changes.changed.is_empty() {
        let names: Vec<String> = changes.changed.iter().map(|n| render::line(n)).collect();
        println!("{verb} groups: {}", names.join(", "));
    }
    for (group, why) in &changes.deferred {
        warn(&format!(
            "group {}: not changed now ({}); its members or your next catch-up will",
            render::line(group),
            render::line(why)
        ));
    }
}

/// `sfc device add USER CODE`: links this (empty) home as a new device of `user`.
async fn add(
    home: &Home,
    options: &ClientOptions,
    server: &str,
    user: &str,
    code: &str,
    name: Option<String>,
) -> anyhow::Result<()> {
    let code = LinkCode::parse(code).context("reading the code")?;
    let account =
        Username::parse(user).map_err(|_| anyhow::anyhow!("invalid username {user:?}"))?;
    let name = name.unwrap_or_else(default_device_name);
    // The new device's confirmation is answered once the existing device has decided, which
    // may take a while on a slow link.
    let mut options = options.clone();
    options.request_timeout = options.request_timeout.max(link::LINK_WAIT);
    let keystore = Keystore::new(home.dir());
    let client = Client::connect(&options).await?;
    let joined = match link::join_link(&client, &keystore, &account, &code, &name).await {
        Ok(joined) => joined,
        Err(e) => {
            client.close().await;
            return Err(e.into());
        }
    };
    save(
        home,
        server,
        &joined.username,
        joined.token,
        joined.expires_at,
    )?;
    let published = link::publish_keys(&client, &keystore).await;
    let published = match published {
        // Key packages too, so that this device can be added to groups at once.
        Ok(_) => match Messenger::new(client, home.dir(), &joined.username) {
            Ok(messenger) => {
                let packages = messenger.ensure_key_packages().await;
                messenger.close().await;
                packages.map(|_| ()).map_err(anyhow::Error::from)
            }
            Err(e) => Err(e.into()),
        },
        Err(e) => {
            client.close().await;
            Err(anyhow::Error::from(e))
        }
    };
    published.with_context(|| {
        format!(
            "linked as device {} of {}, but its keys did not reach the server (others cannot \
             write to it yet)",
            joined.device, joined.username
        )
    })?;
    let plural = if joined.contacts == 1 { "" } else { "s" };
    println!(
        "linked this home to {} as device {}: {} (with the keys of {} pinned contact{plural})",
        render::line(&joined.username),
        joined.device,
        render::line(&name),
        joined.contacts
    );
    Ok(())
}

/// What to tell the user of a device that was removed from `user`'s account.
pub(crate) fn removed_message(user: &str, device: Option<DeviceId>) -> String {
    let which = device.map_or_else(String::new, |d| format!(" (device {d} of {user})"));
    format!(
        "this device was removed from its account{which}: its keys in this home are no longer \
         used. To use this computer again, link it anew: {}",
        how_to_link(user)
    )
}

/// How to link a new device of `user`, in words.
pub(crate) fn how_to_link(user: &str) -> String {
    format!(
        "run `sfc device link` on a device of {user}, then `sfc device add {user} CODE` in a \
         new, empty home here with the code it shows"
    )
}

/// `error`, or the device's removal if that is what ended `client`'s connection (close
/// code 7): the error then is only its consequence.
pub(crate) fn removed_or(client: &Client, user: &str, error: anyhow::Error) -> anyhow::Error {
    if link::was_removed(client) {
        anyhow::anyhow!(removed_message(user, None))
    } else {
        error
    }
}

/// `YYYY-MM-DD HH:MM UTC` of `seconds` since the Unix epoch.
fn utc(seconds: u64) -> String {
    let at = i64::try_from(seconds)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok());
    match at {
        Some(at) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute()
        ),
        None => seconds.to_string(),
    }
}

/// The name a new device gives itself by default: the host name (as much of it as a device
/// name holds), or "new device".
fn default_device_name() -> String {
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| {
            use std::io::Read;
            let mut text = String::new();
            std::fs::File::open(path)
                .ok()?
                .take(256)
                .read_to_string(&mut text)
                .ok()?;
            Some(text)
        })
        .unwrap_or_default();
    let mut name: String = host.trim().chars().filter(|c| !c.is_control()).collect();
    while name.len() > link::MAX_DEVICE_NAME {
        name.pop();
    }
    if link::valid_device_name(&name) {
        name
    } else {
        "new device".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_minutes() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_764_882_960), "2025-12-04 21:16 UTC");
    }

    #[test]
    fn the_default_device_name_is_one_the_server_takes() {
        assert!(link::valid_device_name(&default_device_name()));
    }
}
