//! Retention (`--recording-retention`): which recordings are older than the retention, and
//! deleting them.
//!
//! A recording's age counts from its file's modification time, that is from its last
//! record: a session that ran for a week is kept for the retention after it ended, not after
//! it began. A session still live is never deleted, whatever its file's age (an idle
//! session's file is not touched for as long as it is idle, and deleting a file being written
//! would lose what the writer appends to it): the caller says which sessions are live. Only
//! files named like recordings (`<valid session id>.hrec`) are considered; anything else in
//! the directory is left alone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A recording file found in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The file.
    pub path: PathBuf,
    /// The session id its name gives.
    pub session_id: String,
    /// Its modification time (its last record).
    pub modified: SystemTime,
}

/// What [`delete_expired`] did.
#[derive(Debug, Default)]
pub struct RetentionReport {
    /// Files deleted.
    pub deleted: Vec<PathBuf>,
    /// Files that could not be deleted, and why (the next run tries again).
    pub failed: Vec<(PathBuf, io::Error)>,
}

/// The candidates older than `retention` at `now` whose session `is_live` does not claim.
/// A file modified after `now` (a clock set back) is not expired.
pub fn expired(
    files: &[Candidate],
    now: SystemTime,
    retention: Duration,
    is_live: impl Fn(&str) -> bool,
) -> Vec<&Candidate> {
    files
        .iter()
        .filter(|c| now.duration_since(c.modified).is_ok_and(|age| age > retention))
        .filter(|c| !is_live(&c.session_id))
        .collect()
}

/// The recording files in `dir`, with their modification times. A file that vanishes while
/// being looked at is skipped.
pub fn scan(dir: &Path) -> io::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(sid) = recording_session_id(&path) else { continue };
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !meta.is_file() {
            continue;
        }
        out.push(Candidate { session_id: sid.to_owned(), modified: meta.modified()?, path });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Deletes the recordings in `dir` older than `retention` at `now`, except live sessions'.
/// One file that cannot be deleted does not stop the others.
pub fn delete_expired(
    dir: &Path,
    now: SystemTime,
    retention: Duration,
    is_live: impl Fn(&str) -> bool,
) -> io::Result<RetentionReport> {
    let files = scan(dir)?;
    let mut report = RetentionReport::default();
    for c in expired(&files, now, retention, is_live) {
        match fs::remove_file(&c.path) {
            Ok(()) => report.deleted.push(c.path.clone()),
            // Gone already (another run, an operator): nothing to do.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => report.failed.push((c.path.clone(), e)),
        }
    }
    Ok(report)
}

/// The session id of a recording file's name, or `None` for any other file.
fn recording_session_id(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    let sid = name.strip_suffix(super::EXTENSION)?.strip_suffix('.')?;
    super::valid_session_id(sid).then_some(sid)
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn cand(sid: &str, modified: SystemTime) -> Candidate {
        Candidate {
            path: PathBuf::from(format!("/r/{sid}.hrec")),
            session_id: sid.into(),
            modified,
        }
    }

    #[test]
    fn expired_is_older_than_the_retention_and_not_live() {
        let now = SystemTime::UNIX_EPOCH + 100 * DAY;
        let files = [
            cand("old", now - 8 * DAY),
            cand("exactly", now - 7 * DAY),
            cand("new", now - DAY),
            cand("future", now + DAY),
            cand("live-old", now - 30 * DAY),
        ];
        let got: Vec<&str> = expired(&files, now, 7 * DAY, |s| s == "live-old")
            .into_iter()
            .map(|c| c.session_id.as_str())
            .collect();
        // Exactly at the retention is kept; a file from the future is kept.
        assert_eq!(got, ["old"]);
        let all: Vec<&str> = expired(&files, now, Duration::ZERO, |_| false)
            .iter()
            .map(|c| &*c.session_id)
            .collect();
        assert_eq!(all, ["old", "exactly", "new", "live-old"]);
    }

    fn touch(dir: &Path, name: &str, modified: SystemTime) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_modified(modified).unwrap();
        p
    }

    #[test]
    fn delete_expired_deletes_only_old_recordings() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let old = now - 10 * DAY;
        let gone = touch(dir.path(), "s-old.hrec", old);
        let kept_new = touch(dir.path(), "s-new.hrec", now - DAY);
        let kept_live = touch(dir.path(), "s-live.hrec", old);
        // Not recordings: another extension, an id that cannot be one, a directory.
        let other = touch(dir.path(), "hatch.db", old);
        let odd = touch(dir.path(), "a.b.hrec", old);
        let hidden = touch(dir.path(), ".hrec", old);
        std::fs::create_dir(dir.path().join("s-dir.hrec")).unwrap();

        let found: Vec<String> =
            scan(dir.path()).unwrap().into_iter().map(|c| c.session_id).collect();
        assert_eq!(found, ["s-live", "s-new", "s-old"]);

        let report = delete_expired(dir.path(), now, 7 * DAY, |s| s == "s-live").unwrap();
        assert_eq!(report.deleted, std::slice::from_ref(&gone));
        assert!(report.failed.is_empty());
        assert!(!gone.exists());
        for p in [&kept_new, &kept_live, &other, &odd, &hidden] {
            assert!(p.exists(), "{}", p.display());
        }
        assert!(dir.path().join("s-dir.hrec").is_dir());
        // Again: nothing more to do.
        let report = delete_expired(dir.path(), now, 7 * DAY, |s| s == "s-live").unwrap();
        assert!(report.deleted.is_empty());
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let err = delete_expired(Path::new("/nonexistent/rec"), SystemTime::now(), DAY, |_| false)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
