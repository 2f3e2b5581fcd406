//! The data directory's permissions: private to the server's user, checked before the store
//! opens it.
//!
//! It holds argon2 hashes, session-token digests, the contact graph and the endpoint secret.
//! The directory is the access boundary: it is created 0700, so the files fjall creates in
//! it with the process umask (0644 by default) are out of reach of other local users, and no
//! process-wide umask has to be imposed on the rest of the server. A directory that group or
//! others can *write* is refused (whoever can write there can replace the store or its lock);
//! one they can only *read* or enter (an older server created it 0755) is tightened to 0700,
//! with a log line. A parent that others can write without the sticky bit lets them rename
//! the data directory away and put their own in its place: that is logged as a warning, not
//! refused, since the parents are not the server's to fix.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// It could not be created or inspected.
    #[error("data directory {}: {error}", .dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// It is not a directory.
    #[error("data directory {} is not a directory", .dir.display())]
    NotADirectory {
        /// The path.
        dir: PathBuf,
    },
    /// Group or others can write to it.
    #[error(
        "data directory {} is writable by group or others (mode {mode:o}): they could replace \
         the store; make it private with `chmod 700 {}`",
        .dir.display(),
        .dir.display()
    )]
    Writable {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

const GROUP_OTHER_WRITE: u32 = 0o022;
const GROUP_OTHER_ALL: u32 = 0o077;
const STICKY: u32 = 0o1000;

/// Creates `dir` (and missing parents) 0700, or checks and tightens an existing one.
pub(super) fn prepare(dir: &Path) -> Result<(), DataDirError> {
    let io = |error| DataDirError::Io {
        dir: dir.to_owned(),
        error,
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        Err(e) => return Err(io(e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(DataDirError::NotADirectory {
                dir: dir.to_owned(),
            });
        }
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & GROUP_OTHER_WRITE != 0 {
                return Err(DataDirError::Writable {
                    dir: dir.to_owned(),
                    mode,
                });
            }
            if mode & GROUP_OTHER_ALL != 0 {
                let private = std::fs::Permissions::from_mode(mode & !GROUP_OTHER_ALL);
                match std::fs::set_permissions(dir, private) {
                    Ok(()) => tracing::warn!(
                        dir = %dir.display(),
                        was = format_args!("{mode:o}"),
                        "the data directory was readable by other users; made it private (0700)"
                    ),
                    Err(e) => tracing::warn!(
                        dir = %dir.display(),
                        error = %e,
                        "the data directory is readable by other users and cannot be made \
                         private; run `chmod 700` on it"
                    ),
                }
            }
        }
    }
    warn_about_parents(dir);
    Ok(())
}

/// Logs each parent of `dir` that others can write without the sticky bit.
fn warn_about_parents(dir: &Path) {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return;
    };
    for parent in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(parent) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER_WRITE != 0 && mode & STICKY == 0 {
            tracing::warn!(
                parent = %parent.display(),
                mode = format_args!("{mode:o}"),
                "a parent of the data directory is writable by group or others, who could \
                 replace the data directory; make it `chmod go-w`"
            );
        }
    }
}
