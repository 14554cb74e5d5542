//! The agent's registration state: one JSON file, readable only by its owner, written by
//! `hatch-agent register` and read by `hatch-agent run`.
//!
//! The file holds the instance secret (the bearer credential of the control channel), so it is
//! created 0600 inside a 0700 directory, written to a temporary file first and then linked or
//! renamed into place: a crash never leaves a half-written registration, and without `--force`
//! an existing registration is never replaced, even by a concurrent `register`.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the state lives when `--state` is not given.
pub const DEFAULT_STATE_PATH: &str = "/var/lib/hatch/agent.json";

/// What `register` learned and `run` needs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The instance id the relay assigned (`i-` + 16 hex digits).
    pub instance_id: String,
    /// The instance secret: the bearer credential of the control channel.
    pub instance_secret: String,
    /// The API base URL, `https://host:port`.
    pub api_url: String,
    /// The PEM of the CA that signs the relay's certificate; the system's CA bundle when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

impl fmt::Debug for State {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("instance_id", &self.instance_id)
            .field("instance_secret", &"<redacted>")
            .field("api_url", &self.api_url)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .finish()
    }
}

/// Why the state could not be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StateError {
    /// The file exists and `--force` was not given.
    #[error("{} already holds a registration (instance {instance_id}); pass --force to replace it", path.display())]
    AlreadyRegistered {
        /// The state file.
        path: PathBuf,
        /// The instance id it holds (or `unknown` when unreadable).
        instance_id: String,
    },
    /// The file does not exist.
    #[error("{} does not exist; run `hatch-agent register` first", .0.display())]
    NotRegistered(PathBuf),
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid state JSON.
    #[error("{} is not a valid agent state file: {source}", path.display())]
    Parse {
        /// The state file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// Largest state file read, in bytes: a registration plus a CA bundle is a few KiB, so 1 MiB
/// only guards against reading something that is clearly not ours.
const MAX_STATE_BYTES: u64 = 1 << 20;

impl State {
    /// Reads the state file. Warns (does not fail) when the file is readable by others.
    pub fn load(path: &Path) -> Result<State, StateError> {
        let io = |source| StateError::Io { path: path.to_owned(), source };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotRegistered(path.to_owned()));
            }
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_STATE_BYTES {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("file is {} bytes, larger than {MAX_STATE_BYTES}", meta.len()),
            )));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "state file is readable by other users; it holds the instance secret (chmod 600)"
            );
        }
        let bytes = std::fs::read(path).map_err(io)?;
        serde_json::from_slice(&bytes)
            .map_err(|source| StateError::Parse { path: path.to_owned(), source })
    }

    /// Writes the state file (0600; its directory is created 0700 when missing). Refuses to
    /// replace an existing file unless `force`.
    pub fn save(&self, path: &Path, force: bool) -> Result<(), StateError> {
        let io = |p: &Path, source| StateError::Io { path: p.to_owned(), source };
        if !force {
            refuse_existing(path)?;
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io(&dir, e))?;
        }
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            file_name.as_deref().unwrap_or("agent.json"),
            std::process::id()
        ));
        let mut json = serde_json::to_vec_pretty(self).expect("State serialises: only strings");
        json.push(b'\n');
        let write = || -> std::io::Result<()> {
            let mut f =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()
        };
        // A stale temporary file from a crashed earlier run would make create_new fail.
        let _ = std::fs::remove_file(&tmp);
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&tmp, e));
        }
        let placed = if force {
            std::fs::rename(&tmp, path)
        } else {
            // link(2) fails when the target exists: no window in which another register's
            // file could be replaced.
            std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
        };
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                return refuse_existing(path);
            }
            return Err(io(path, e));
        }
        Ok(())
    }
}

/// Fails with [`StateError::AlreadyRegistered`] when `path` exists.
pub fn refuse_existing(path: &Path) -> Result<(), StateError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            let instance_id =
                State::load(path).map(|s| s.instance_id).unwrap_or_else(|_| "unknown".to_owned());
            Err(StateError::AlreadyRegistered { path: path.to_owned(), instance_id })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io { path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            instance_id: "i-0123456789abcdef".into(),
            instance_secret: "secret".into(),
            api_url: "https://127.0.0.1:7444".into(),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\n".into()),
        }
    }

    #[test]
    fn save_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.json");
        sample().save(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert_eq!(State::load(&path).unwrap(), sample());
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json");
        sample().save(&path, false).unwrap();
        let mut other = sample();
        other.instance_id = "i-ffffffffffffffff".into();
        let err = other.save(&path, false).unwrap_err();
        assert!(err.to_string().contains("i-0123456789abcdef"), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(State::load(&path).unwrap().instance_id, "i-0123456789abcdef");
        other.save(&path, true).unwrap();
        assert_eq!(State::load(&path).unwrap().instance_id, "i-ffffffffffffffff");
    }

    #[test]
    fn debug_hides_the_secret() {
        let s = format!("{:?}", sample());
        assert!(!s.contains("secret\""), "{s}");
        assert!(s.contains("redacted"), "{s}");
    }

    #[test]
    fn missing_and_garbage_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json");
        let err = State::load(&path).unwrap_err();
        assert!(matches!(err, StateError::NotRegistered(_)), "{err}");
        std::fs::write(&path, b"{not json").unwrap();
        let err = State::load(&path).unwrap_err();
        assert!(err.to_string().contains("agent.json"), "{err}");
    }
}
