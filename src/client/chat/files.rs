//! Files in `sfc chat`: `/file PATH` sends one, and a received file is saved into the chat's
//! download directory before it is shown (as `file: NAME (SIZE)`, NAME the name it was saved
//! under).

use std::path::Path;

use super::screen::{Clock, Screen, message_line, notice, now};
use crate::client::files::human_size;
use crate::client::messenger::{Messenger, MessengerError};
use crate::e2e::FileRef;

/// What starts a line that sends a file.
pub(super) const FILE_COMMAND: &str = "/file ";

/// Sends the file at `path` (a `/file PATH` line) and shows it. Returns whether the outbox
/// may now hold something.
pub(super) async fn send_file_line(
    messenger: &Messenger,
    screen: &mut Screen,
    clock: Clock,
    me: &str,
    peer: &str,
    path: &str,
) -> bool {
    let path = Path::new(path.trim());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    screen.show(notice(&format!("sending {}…", path.display())));
    match messenger.send_file(peer, path, |_, _| {}).await {
        Ok((_, warning)) => {
            if let Some(warning) = warning {
                screen.show(notice(&warning));
            }
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let text = format!("file: {name} ({})", human_size(size));
            screen.show(message_line(clock, now(), me, &text, true));
            false
        }
        Err(MessengerError::Queued { reason, .. }) => {
            screen.show(notice(&format!(
                "the file is uploaded; its message is not sent yet ({reason}): it waits in the \
                 outbox"
            )));
            true
        }
        Err(e) => {
            screen.show(notice(&format!("not sent: {e}")));
            false
        }
    }
}

/// Saves a received file into `dir` and returns the line that shows it, or `None` when it
/// cannot be fetched now (the connection, a full disk: it stays unshown and comes again at
/// the next start). A file that will never open is given up (the server is told) and shown
/// as such.
pub(super) async fn receive_file(
    messenger: &Messenger,
    screen: &mut Screen,
    dir: &Path,
    file: &FileRef,
) -> Result<Option<String>, MessengerError> {
    match messenger.download_file(file, dir, |_, _| {}).await {
        Ok(saved) => {
            let name = saved
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(Some(format!("file: {name} ({})", human_size(file.size))))
        }
        Err(e) if !e.is_file_lost() => {
            screen.show(notice(&format!(
                "a file could not be saved now ({e}); it comes again at the next start"
            )));
            Ok(None)
        }
        Err(e) => {
            messenger.give_up_file(file).await?;
            Ok(Some(format!(
                "file: {} could not be received ({e})",
                file.name
            )))
        }
    }
}
