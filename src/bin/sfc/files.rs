//! `sfc send-file`, and what `sfc recv` does with a received file: fetch it into the download
//! directory and say where it went.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use securefastchat::client::ClientOptions;
use securefastchat::client::files::human_size;
use securefastchat::client::home::Home;
use securefastchat::client::messenger::Messenger;
use securefastchat::client::render;
use securefastchat::e2e::FileRef;

use super::{report_flushed, resume, warn};

/// `sfc send-file USER PATH`: uploads the sealed file (resuming after a lost connection), then
/// sends its message; prints the message's id once the server has both.
pub(super) async fn send_file(
    home: &Home,
    options: &ClientOptions,
    user: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
    let (client, saved) = resume(home, options, false).await?;
    let messenger = Messenger::new(client, home.dir(), &saved.username)?.with_reconnect(
        options.clone(),
        saved.token,
        false,
    );
    messenger.ensure_keys().await?;
    report_flushed(&messenger.flush_outbox().await?);
    let bar = progress_bar(meta.len());
    let sent = messenger
        .send_file(user, path, |done, total| {
            if let Some(bar) = &bar {
                bar.set_length(total);
                bar.set_position(done);
            }
        })
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (id, warning) = sent?;
    if let Some(warning) = warning {
        warn(&warning);
    }
    messenger.close().await;
    println!("{id}");
    Ok(())
}

/// A progress bar on standard error when it is a terminal (nothing in scripts).
fn progress_bar(len: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

/// A received file as saved.
pub(super) struct Saved {
    /// Where it is.
    pub path: PathBuf,
    /// The name it was saved under (made safe; maybe numbered).
    pub name: String,
}

/// Fetches a received file into `dir`. A file that will never open (tampered, gone from the
/// server) is given up (the server is told), with a warning, and gives `None`; any other
/// failure (the connection, a full disk) is an error, and the message comes again.
pub(super) async fn receive_file(
    messenger: &Messenger,
    file: &FileRef,
    dir: &Path,
) -> anyhow::Result<Option<Saved>> {
    let bar = progress_bar(file.size);
    let fetched = messenger
        .download_file(file, dir, |done, _| {
            if let Some(bar) = &bar {
                bar.set_position(done);
            }
        })
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match fetched {
        Ok(path) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(Some(Saved { path, name }))
        }
        Err(e) if !e.is_file_lost() => Err(e.into()),
        Err(e) => {
            warn(&format!(
                "the file {:?} could not be received and is given up: {e}",
                file.name
            ));
            messenger.give_up_file(file).await?;
            Ok(None)
        }
    }
}

/// The text line of a received file: `file: NAME (SIZE)`, NAME as saved, made inert.
pub(super) fn file_line(saved: &Saved, file: &FileRef) -> String {
    format!(
        "file: {} ({})",
        render::line(&saved.name),
        human_size(file.size)
    )
}

/// The JSON `file` object of a received file.
pub(super) fn file_json(saved: &Saved, file: &FileRef) -> serde_json::Value {
    serde_json::json!({
        "name": saved.name,
        "size": file.size,
        "type": file.content_type,
        "path": saved.path.to_string_lossy(),
    })
}
