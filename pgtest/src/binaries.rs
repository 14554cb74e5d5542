//! Finding the server binaries, `initdb` and `postgres`.
//!
//! Not through `PATH`: `/usr/bin` and `/usr/local/bin` may hold Debian's `pg_wrapper` scripts
//! or links to some other version, while the real binaries live in one directory per major
//! version, `/usr/lib/postgresql/<version>/bin`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's `postgresql-<version>` packages put each version's binaries.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The two programs a cluster needs, from one directory (so of one version).
#[derive(Debug)]
pub(crate) struct Binaries {
    /// Creates the data directory.
    pub(crate) initdb: PathBuf,
    /// The server.
    pub(crate) postgres: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, if it has both.
    fn in_dir(dir: &Path) -> Option<Binaries> {
        let binaries = Binaries { initdb: dir.join("initdb"), postgres: dir.join("postgres") };
        (binaries.initdb.is_file() && binaries.postgres.is_file()).then_some(binaries)
    }
}

/// `pg_config --bindir` if it has the server binaries (`pg_config` comes with libpq-dev too,
/// whose version need not be that of an installed server), else the highest version under
/// `/usr/lib/postgresql`.
pub(crate) fn find() -> Result<Binaries, String> {
    let pg_config = pg_config_bindir();
    if let Some(binaries) = pg_config.as_deref().and_then(Binaries::in_dir) {
        return Ok(binaries);
    }
    let mut versions: Vec<(Vec<u32>, Binaries)> = std::fs::read_dir(DEBIAN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = version_key(entry.file_name().to_str()?)?;
            Some((version, Binaries::in_dir(&entry.path().join("bin"))?))
        })
        .collect();
    versions.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((_, binaries)) = versions.pop() {
        return Ok(binaries);
    }
    let pg_config = match pg_config {
        Some(dir) => format!("`pg_config --bindir` ({})", dir.display()),
        None => "`pg_config --bindir` (no pg_config)".to_owned(),
    };
    Err(format!(
        "PostgreSQL server binaries not found: no initdb and postgres in {pg_config} or in \
         {DEBIAN_ROOT}/*/bin; install Debian's postgresql package (scripts/test does)"
    ))
}

/// What `pg_config --bindir` prints, if `pg_config` runs.
fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").stderr(Stdio::null()).output().ok()?;
    let dir = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !dir.trim().is_empty()).then(|| PathBuf::from(dir.trim()))
}

/// A version directory's name as numbers, so that `16` sorts above `9.6`; `None` for a name
/// that is not a version.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_by_number_not_text() {
        let mut names = vec!["9.6", "16", "15", "10"];
        names.sort_by_key(|name| version_key(name));
        assert_eq!(names, ["9.6", "10", "15", "16"]);
    }

    #[test]
    fn a_name_that_is_not_a_version_is_skipped() {
        assert_eq!(version_key("15"), Some(vec![15]));
        assert_eq!(version_key("9.6"), Some(vec![9, 6]));
        assert_eq!(version_key("common"), None);
        assert_eq!(version_key("15.bak"), None);
    }
}
