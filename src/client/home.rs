//! The client's home directory (`--home`): where `sfc` keeps the session token (and, later,
//! the user's keys). The directory is private (0700) and secret files are 0600, written
//! atomically so a crash never leaves half a file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::{SessionToken, TOKEN_LEN};

const SESSION_FILE: &str = "session.toml";

/// Why the home directory could not be used.
///
/// Its message carries the cause and it has no `source()`, like the crate's other errors (see
/// `StoreError`); written by hand because `thiserror` makes a field named `source` the source.
#[derive(Debug)]
pub enum HomeError {
    /// A file or directory could not be read or written.
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The blocking task that did the file work did not finish (it panicked or the runtime
    /// is shutting down).
    Task(String),
}

impl std::fmt::Display for HomeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Corrupt { path, reason } => write!(f, "{}: {reason}", path.display()),
            Self::Task(reason) => write!(f, "the keystore's file task failed: {reason}"),
        }
    }
}

impl std::error::Error for HomeError {}

/// The session `sfc login` saved.
#[derive(Clone, PartialEq, Eq)]
pub struct SavedSession {
    /// The server it is valid on.
    pub server: String,
    /// The account.
    pub username: String,
    /// The token (secret).
    pub token: SessionToken,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_at: u64,
}

impl std::fmt::Debug for SavedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedSession")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionFile {
    server: String,
    username: String,
    token: String,
    expires_at: u64,
}

/// A client home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// The default location: the per-user config directory's `securefastchat`.
    pub fn default_dir() -> PathBuf {
        dirs::config_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("securefastchat")
    }

    /// Opens `dir`, creating it with mode 0700 if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, HomeError> {
        let dir = dir.into();
        let io = |source| HomeError::Io {
            path: dir.clone(),
            source,
        };
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(&dir).map_err(io)?;
        remove_stale_temp_files(&dir);
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved session, if any.
    pub fn load_session(&self) -> Result<Option<SavedSession>, HomeError> {
        let path = self.dir.join(SESSION_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HomeError::Io { path, source }),
        };
        let corrupt = |reason: String| HomeError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file: SessionFile = toml::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let bytes = hex::decode(&file.token).map_err(|e| corrupt(format!("token: {e}")))?;
        let token: [u8; TOKEN_LEN] = bytes
            .try_into()
            .map_err(|_| corrupt("token: wrong length".into()))?;
        Ok(Some(SavedSession {
            server: file.server,
            username: file.username,
            token: SessionToken::from_bytes(token),
            expires_at: file.expires_at,
        }))
    }

    /// Saves a session (mode 0600, atomically replacing any previous one).
    pub fn save_session(&self, session: &SavedSession) -> Result<(), HomeError> {
        let file = SessionFile {
            server: session.server.clone(),
            username: session.username.clone(),
            token: hex::encode(session.token.expose()),
            expires_at: session.expires_at,
        };
        let path = self.dir.join(SESSION_FILE);
        let text = toml::to_string(&file).map_err(|e| HomeError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_private(&path, text.as_bytes())
    }

    /// Forgets the saved session.
    pub fn clear_session(&self) -> Result<(), HomeError> {
        let path = self.dir.join(SESSION_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HomeError::Io { path, source }),
        }
    }
}

/// Writes `contents` to `path` via a 0600 temp file, fsync and rename. The temp file is named
/// after the process (`NAME.tmp.PID`), so that one killed before the rename can be told from
/// one still being written ([`remove_stale_temp_files`]).
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), HomeError> {
    let tmp = path.with_extension(format!("{TEMP_INFIX}{}", std::process::id()));
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| HomeError::Io { path: p, source }
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(contents).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    // The rename is durable only once the directory is: without this, a power cut could bring
    // back the previous keystore (an older ratchet, messages kept for showing gone).
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// What [`write_private`] puts between a file's stem and the writing process's id.
const TEMP_INFIX: &str = "tmp.";

/// Removes from `dir` the temp files of [`write_private`] whose process no longer runs: a
/// client killed between writing and renaming leaves one behind, holding a copy of a secret.
/// The file of a live process (even one that merely reuses a dead one's id) is left alone.
/// Best effort: a file that cannot be listed or removed stays, for the next open.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_file_pid) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_file()) || process_may_run(pid) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed a dead client's temp file"),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove a temp file")
            }
        }
    }
}

/// The process id in a temp file's name (`keystore.tmp.1234` → 1234).
fn temp_file_pid(name: &str) -> Option<u32> {
    let (_, pid) = name.rsplit_once(&format!(".{TEMP_INFIX}"))?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` may be running: `false` only when the system says there is none.
#[cfg(target_os = "linux")]
fn process_may_run(pid: u32) -> bool {
    // 0 and ids past i32::MAX would name process groups: never treat them as dead.
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists and that we
    // may signal it. It reads no memory of ours.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    // EPERM: it exists but belongs to someone else.
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Elsewhere there is no cheap check: keep every temp file.
#[cfg(not(target_os = "linux"))]
fn process_may_run(_pid: u32) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_round_trip_privately() {
        let root = tempfile::tempdir().unwrap();
        let home = Home::open(root.path().join("home")).unwrap();
        assert!(home.load_session().unwrap().is_none());
        let saved = SavedSession {
            server: "127.0.0.1:4433".into(),
            username: "alice".into(),
            token: SessionToken::from_bytes([9; 32]),
            expires_at: 42,
        };
        home.save_session(&saved).unwrap();
        assert_eq!(home.load_session().unwrap(), Some(saved));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(home.dir()), 0o700);
            assert_eq!(mode(&home.dir().join(SESSION_FILE)), 0o600);
        }
        home.clear_session().unwrap();
        assert!(home.load_session().unwrap().is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn temp_files_of_dead_processes_are_removed_on_open() {
        let root = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        let dead = root.path().join(format!("keystore.tmp.{}", child.id()));
        let live = root
            .path()
            .join(format!("session.tmp.{}", std::process::id()));
        let other = root.path().join("notes.tmp.txt");
        for path in [&dead, &live, &other] {
            fs::write(path, "x").unwrap();
        }
        Home::open(root.path()).unwrap();
        assert!(!dead.exists(), "a dead process's temp file stays");
        assert!(live.exists(), "a live process's temp file was removed");
        assert!(other.exists(), "a file not ours was removed");
    }

    #[test]
    fn temp_file_names_give_their_process() {
        assert_eq!(temp_file_pid("keystore.tmp.1234"), Some(1234));
        assert_eq!(temp_file_pid("session.tmp.7"), Some(7));
        assert_eq!(temp_file_pid("keystore.tmp."), None);
        assert_eq!(temp_file_pid("keystore.tmp.12a"), None);
        assert_eq!(temp_file_pid("keystore.msgpack"), None);
        assert_eq!(temp_file_pid("tmp.12"), None);
    }

    #[test]
    fn a_corrupt_session_file_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let home = Home::open(root.path()).unwrap();
        fs::write(root.path().join(SESSION_FILE), "token = 5").unwrap();
        assert!(matches!(
            home.load_session(),
            Err(HomeError::Corrupt { .. })
        ));
    }
}
