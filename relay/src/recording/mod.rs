//! Session recording at the relay (issue 16): a tamper-evident, byte-exact log of what a
//! session showed and was typed, one append-only file per session, and what reads it back.
//!
//! The data plane records through it (`data::record`, fed by [`tap`]); the control plane keeps
//! the digests and serves the asciicast export (docs/RECORDING.md, "Wiring").
//!
//! ```text
//!  shard (never blocks on the disk)           writer thread (std::thread, one per Recorder)
//!  SessionRecorder::try_push(now, Event) ──▶ jobs (bytes queued per session are bounded) ──▶
//!       │ over_high_water() / ready().await    encode + SHA-256 chain, one write per session
//!       │   = stop reading the leg              per batch, fsync on finish ──▶ <dir>/<sid>.hrec
//!       ▼                                                   │
//!  finish(now, exit) ──────────────────────────────────────▶ Outcome (Finished { digest } |
//!                                                             Suspended | Failed) ──▶ control
//!  <sid>.hrec ──▶ verify (ok, or the first broken record) ──▶ asciicast (asciicast v2 export)
//!  data dir   ──▶ retention (which files are past the retention, and deleting them)
//! ```
//!
//! - [`format`]: the byte layout (header, records, the digest chain), sans-IO.
//! - [`writer`]: [`Recorder`] (the writer thread) and [`SessionRecorder`] (one session's
//!   handle: non-blocking push, backpressure, finish, resume).
//! - [`verify`]: a streaming reader that checks the chain, and `verify`.
//! - [`asciicast`]: the asciicast v2 export (lossy only where the output is not UTF-8).
//! - [`retention`]: choosing and deleting recordings older than the retention.
//! - [`tap`]: what a recording needs out of the frames a pump forwards (sans-IO).

pub mod asciicast;
pub mod format;
pub mod retention;
pub mod tap;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

pub use format::{Digest, Event, Header};
pub use writer::{Outcome, PushError, Recorder, RecorderConfig, SessionRecorder};

/// File name extension of a recording (`<session id>.hrec`).
pub const EXTENSION: &str = "hrec";

/// Longest session id accepted as a file name, in bytes (the relay's ids are 18).
pub const MAX_SESSION_ID: usize = 128;

/// The recording directory of a relay whose data directory is `data_dir`.
pub fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("recordings")
}

/// Checks that recordings can be written in `dir` now: creates, writes, syncs and removes a
/// probe file there (a name no recording has: it starts with a dot). A read-only or full
/// file system, or a directory that is not writable, fails here, before a session starts.
pub fn probe(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".probe-{}-{n}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        f.write_all(b"probe")?;
        f.sync_all()
    })();
    let removed = std::fs::remove_file(&path);
    res?;
    // A probe left behind is harmless but says something is wrong with the directory.
    removed
}

/// Whether `sid` can name a recording file: 1 to [`MAX_SESSION_ID`] ASCII letters, digits,
/// `-` or `_`. Nothing else, so that no id can reach outside the recording directory (`/`,
/// `..`) or collide with another file's name there.
pub fn valid_session_id(sid: &str) -> bool {
    !sid.is_empty()
        && sid.len() <= MAX_SESSION_ID
        && sid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The recording file of session `sid` in `dir`, or `None` for an id that
/// [`valid_session_id`] refuses.
pub fn file_path(dir: &Path, sid: &str) -> Option<PathBuf> {
    valid_session_id(sid).then(|| dir.join(format!("{sid}.{EXTENSION}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_that_name_files() {
        for ok in ["s-0123456789abcdef", "a", "A_b-9", &"x".repeat(MAX_SESSION_ID)] {
            assert!(valid_session_id(ok), "{ok}");
        }
        for bad in ["", "..", "a/b", "a.b", ".hidden", "s 1", "é", &"x".repeat(MAX_SESSION_ID + 1)]
        {
            assert!(!valid_session_id(bad), "{bad}");
            assert_eq!(file_path(Path::new("/d"), bad), None);
        }
        assert_eq!(file_path(Path::new("/d"), "s-1"), Some(PathBuf::from("/d/s-1.hrec")));
    }
}
