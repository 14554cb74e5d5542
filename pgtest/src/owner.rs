//! Which user runs the server, and the directory it owns.
//!
//! `initdb` and `postgres` refuse to run as root. A normal user runs them as itself; root runs
//! them as the `postgres` system user that Debian's package creates (or `nobody` without it),
//! in a temporary directory chowned to that user.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{Gid, Uid, User};
use tempfile::TempDir;

/// The users root runs the server as, first found wins: Debian's package creates `postgres`;
/// `nobody` exists on any Debian system.
const UNPRIVILEGED: [&str; 2] = ["postgres", "nobody"];

/// The parent of the temporary directory when `TMPDIR` is not reachable by the server's user.
const WORLD_TRAVERSABLE_TMP: &str = "/tmp";

/// The user the server runs as.
#[derive(Debug)]
pub(crate) enum Owner {
    /// This process's own user, not root: no switch.
    Current,
    /// Root switches to this unprivileged user.
    Switch {
        /// The login name, for messages.
        name: String,
        /// Its user id.
        uid: Uid,
        /// Its primary group.
        gid: Gid,
    },
}

impl Owner {
    /// This process's user, or the unprivileged user to switch to when this process is root.
    pub(crate) fn for_server() -> Result<Owner, String> {
        if !Uid::effective().is_root() {
            return Ok(Owner::Current);
        }
        for name in UNPRIVILEGED {
            match User::from_name(name) {
                Ok(Some(user)) => {
                    return Ok(Owner::Switch { name: user.name, uid: user.uid, gid: user.gid });
                }
                Ok(None) => {}
                Err(err) => return Err(format!("looking up the user `{name}`: {err}")),
            }
        }
        Err("running as root, and neither a `postgres` nor a `nobody` user exists to run the \
             PostgreSQL server as (initdb and postgres refuse to run as root)"
            .to_owned())
    }

    /// A new temporary directory the server's user owns and can reach.
    pub(crate) fn temp_dir(&self) -> Result<TempDir, String> {
        let mut parent = std::env::temp_dir();
        if matches!(self, Owner::Switch { .. }) && !traversable_by_others(&parent) {
            // Root's TMPDIR may be under /root; the other user could not reach a directory there.
            parent = PathBuf::from(WORLD_TRAVERSABLE_TMP);
        }
        let dir = tempfile::Builder::new()
            .prefix("hatch-pgtest-")
            // Private to the server's user: the log is nobody else's business.
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(|err| {
                format!("creating a temporary directory in {}: {err}", parent.display())
            })?;
        if let Owner::Switch { name, uid, gid } = self {
            nix::unistd::chown(dir.path(), Some(*uid), Some(*gid)).map_err(|err| {
                format!("giving {} to the user `{name}`: {err}", dir.path().display())
            })?;
        }
        Ok(dir)
    }

    /// A command that runs `program` as this user.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        if let Owner::Switch { uid, gid, .. } = self {
            // std drops root's supplementary groups before setuid when it runs as root.
            command.uid(uid.as_raw()).gid(gid.as_raw());
        }
        command
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Current => f.write_str("as the current user"),
            Owner::Switch { name, uid, .. } => write!(f, "as the user `{name}` (uid {uid})"),
        }
    }
}

/// Whether every directory from `/` down to `dir` lets any user through (others' `x` bit).
fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|ancestor| {
        std::fs::metadata(ancestor).is_ok_and(|meta| meta.permissions().mode() & 0o001 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_is_traversable_and_a_private_directory_is_not() {
        assert!(traversable_by_others(Path::new(WORLD_TRAVERSABLE_TMP)));
        let private = Owner::Current.temp_dir().unwrap();
        assert!(!traversable_by_others(private.path()));
    }
}
