//! The writer: one `std::thread` per [`Recorder`] that owns every open recording file, fed
//! by the sessions' [`SessionRecorder`] handles through a queue bounded by bytes.
//!
//! A shard must never block on the disk, so nothing here that a shard calls touches a file:
//! [`SessionRecorder::try_push`] copies the bytes into a job and sends it (a channel send,
//! never a wait), and the writer thread encodes, chains (SHA-256, also off the shard) and
//! writes. A slow disk shows up as queued bytes: each session may have at most
//! [`RecorderConfig::high_water`] bytes queued before `try_push` says [`PushError::Full`];
//! the shard checks [`SessionRecorder::over_high_water`] after a push and, when it is over,
//! stops reading the leg until [`SessionRecorder::ready`] resolves. That is backpressure on
//! the session (its TCP windows fill), never a dropped record. Bytes queued per session are
//! so bounded by `high_water` plus one record, and the relay bounds the number of sessions.
//!
//! Failures are sticky and loud: the first failed create, write, flush or fsync of a file
//! marks its session failed with the [`io::ErrorKind`] and message ([`Failure`]); every later
//! push says [`PushError::Failed`], and an [`Outcome::Failed`] goes to the control plane at
//! once (it ends the live session with its reason). Nothing panics on an I/O error and
//! nothing is dropped silently.
//!
//! Durability (fsync policy): within a batch each file gets one `write` of everything queued
//! for it (the role of a `BufWriter`, without a buffer held per idle session), and at the end
//! of every batch all bytes are with the kernel (a relay crash loses nothing; a machine crash
//! may lose the last unsynced seconds). A file is `fsync`ed when its session finishes or is
//! suspended, and the directory once after a file is created, so that a finished recording
//! survives power loss before its final digest is reported. No timer exists: the thread
//! sleeps on its queue and drains it as fast as the disk allows.
//!
//! Exactly one [`Outcome`] is sent per [`SessionRecorder`]: `Finished` (after
//! [`SessionRecorder::finish`]), `Suspended` (dropped without finishing: the session may
//! resume, see [`Recorder::resume`]) or `Failed`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use thiserror::Error;
use tokio::sync::Notify;

use super::format::{
    self, Chain, Digest, Event, FormatError, Header, MAX_PAYLOAD, RECORD_OVERHEAD,
};
use super::verify::{Reader, VerifyError};

/// Default bytes a session may have queued before it is told to stop reading: 4 MiB, a few
/// hundred milliseconds of a fast session's output, so that a disk that hiccups does not stall
/// the session. The bound is per session so that one busy session cannot hold back the others;
/// the relay's limit on sessions bounds the total.
pub const DEFAULT_HIGH_WATER: u64 = 4 << 20;

/// Bytes of payload the writer takes from the queue before it writes and flushes: 1 MiB, a
/// few hundred `write` calls per second at full speed, while one batch's delay stays short.
const BATCH_BYTES: u64 = 1 << 20;

/// How a [`Recorder`] is set up.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The directory of the recordings (created if missing).
    pub dir: PathBuf,
    /// Bytes (payload plus record overhead) a session may have queued before
    /// [`SessionRecorder::try_push`] says [`PushError::Full`].
    pub high_water: u64,
}

impl RecorderConfig {
    /// Recordings in `dir`, with [`DEFAULT_HIGH_WATER`].
    pub fn new(dir: impl Into<PathBuf>) -> RecorderConfig {
        RecorderConfig { dir: dir.into(), high_water: DEFAULT_HIGH_WATER }
    }
}

/// The file operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Creating a new recording file (or the directory).
    Create,
    /// Opening an existing recording to continue it.
    Open,
    /// Reading an existing recording to find where its chain ends.
    Read,
    /// Writing records.
    Write,
    /// `fsync` of the file or the directory.
    Sync,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Sync => "fsync",
        }
    }
}

/// Why a session's recording stopped: which operation on which file, and the I/O error's kind
/// and message (kept as both so that a caller can branch on the kind and log the message).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("recording {path}: {} failed: {message}", op.as_str())]
pub struct Failure {
    /// What was being done.
    pub op: Op,
    /// The I/O error's kind (`StorageFull`, `PermissionDenied`, `ReadOnlyFilesystem`, ...).
    pub kind: io::ErrorKind,
    /// The error as text.
    pub message: String,
    /// The file.
    pub path: PathBuf,
}

impl Failure {
    fn new(op: Op, path: &Path, err: &io::Error) -> Failure {
        Failure { op, kind: err.kind(), message: err.to_string(), path: path.to_owned() }
    }
}

/// Why [`SessionRecorder::try_push`] did not queue a record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PushError {
    /// The session's queue is over its high-water mark: nothing was queued; wait for
    /// [`SessionRecorder::ready`] and push the same bytes again.
    #[error("recording queue full")]
    Full,
    /// The recording failed; it stays failed.
    #[error(transparent)]
    Failed(Failure),
    /// A payload over the format's bound (1 MiB); nothing was queued.
    #[error("record payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    TooLong(usize),
    /// The writer thread is gone (the recorder was shut down).
    #[error("recorder stopped")]
    Stopped,
}

/// Why a recording could not be started or resumed (checked without touching the disk; disk
/// failures come later, as [`PushError::Failed`] and [`Outcome::Failed`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StartError {
    /// The session id cannot name a file ([`super::valid_session_id`]).
    #[error("session id {0:?} cannot name a recording file")]
    BadSessionId(String),
    /// The header does not encode (a string too long).
    #[error("bad recording header: {0}")]
    Header(FormatError),
    /// The writer thread is gone.
    #[error("recorder stopped")]
    Stopped,
}

/// What became of one session's recording: exactly one per [`SessionRecorder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Finished and synced: the digest to store with the session.
    Finished {
        /// Session id.
        session_id: String,
        /// The final chain digest.
        digest: Digest,
        /// Records in the file (all of it, also before a resume).
        records: u64,
        /// Bytes of the file.
        len: u64,
    },
    /// The handle was dropped without finishing (a detached session, a relay stopping): the
    /// file is synced and may be continued by [`Recorder::resume`].
    Suspended {
        /// Session id.
        session_id: String,
        /// The chain digest so far.
        digest: Digest,
        /// Records in the file.
        records: u64,
        /// Bytes of the file.
        len: u64,
    },
    /// The recording failed (sent when it happened).
    Failed {
        /// Session id.
        session_id: String,
        /// Why.
        failure: Failure,
    },
}

/// State shared by a session's handle and the writer thread.
#[derive(Debug, Default)]
struct SessionShared {
    /// Bytes (payload plus overhead) pushed and not yet handed to the kernel.
    queued: AtomicU64,
    /// Set once, by the writer, on the first failure.
    failure: OnceLock<Failure>,
    /// The handle waits in `ready()`: the writer wakes it when the queue drains.
    want_wake: AtomicBool,
    notify: Notify,
}

impl SessionShared {
    /// Gives back `n` queued bytes and wakes a waiting handle once under the mark.
    fn release(&self, n: u64, high_water: u64) {
        let left = self.queued.fetch_sub(n, Ordering::AcqRel) - n;
        if left <= high_water && self.want_wake.swap(false, Ordering::AcqRel) {
            // Every waiter: both pumps of a session wait on one handle (`notify_one` woke one
            // of them, and the other slept on with its bytes unrecorded and its leg unread).
            // `notify_waiters` reaches every `Notified` created before it, polled or not, and
            // `ready` creates its future before it asks to be woken, so no wake is lost.
            self.notify.notify_waiters();
        }
    }

    fn fail(&self, failure: Failure) -> bool {
        let first = self.failure.set(failure).is_ok();
        self.want_wake.store(false, Ordering::Release);
        self.notify.notify_waiters();
        first
    }
}

/// How the writer opens a session's file.
#[derive(Debug)]
enum Open {
    /// A new file with this header (refused if the file exists: a recording is never
    /// overwritten).
    Create(Vec<u8>),
    /// An existing file, continued after a `Resumed` record stamped with this wall-clock time;
    /// its chain must end at `expected` when that is given.
    Resume { unix_ms: u64, expected: Option<Digest> },
}

/// Work for the writer thread. Times are µs since the handle was made; the writer adds the
/// file's base (0 for a new file; the resume point for a continued one).
#[derive(Debug)]
enum Job {
    Open { id: u64, session_id: String, path: PathBuf, how: Open, shared: Arc<SessionShared> },
    Record { id: u64, rel_us: u64, kind: u8, payload: Vec<u8> },
    Finish { id: u64, rel_us: u64, exit: Option<i32> },
    Suspend { id: u64 },
}

/// The writer thread and the door to it. Cheap to share by reference; `start` and `resume`
/// take `&self` and touch no file.
#[derive(Debug)]
pub struct Recorder {
    tx: mpsc::Sender<Job>,
    dir: PathBuf,
    high_water: u64,
    next_id: AtomicU64,
    thread: JoinHandle<()>,
    #[cfg(test)]
    pause: Arc<Mutex<()>>,
}

impl Recorder {
    /// Starts the writer thread for recordings in `cfg.dir` (created if missing). The
    /// [`Outcome`]s go to `outcomes`: at most one per session, so the channel grows only with
    /// sessions, never with a peer's bytes.
    pub fn spawn(
        cfg: RecorderConfig,
        outcomes: tokio::sync::mpsc::UnboundedSender<Outcome>,
    ) -> io::Result<Recorder> {
        std::fs::create_dir_all(&cfg.dir)?;
        let (tx, rx) = mpsc::channel();
        let high_water = cfg.high_water;
        #[cfg(test)]
        let pause = Arc::new(Mutex::new(()));
        let writer = Writer {
            rx,
            outcomes,
            high_water,
            files: HashMap::new(),
            #[cfg(test)]
            pause: pause.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("hatch-recorder".into())
            .spawn(move || writer.run())?;
        Ok(Recorder {
            tx,
            dir: cfg.dir,
            high_water,
            next_id: AtomicU64::new(0),
            thread,
            #[cfg(test)]
            pause,
        })
    }

    /// The directory of the recordings.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts recording a new session: the file `<dir>/<session id>.hrec` is created by the
    /// writer thread (a failure arrives as [`Outcome::Failed`] and on the next push). `now`
    /// is the session's time 0 for the records' times.
    pub fn start(&self, header: &Header, now: Instant) -> Result<SessionRecorder, StartError> {
        let path = super::file_path(&self.dir, &header.session_id)
            .ok_or_else(|| StartError::BadSessionId(header.session_id.clone()))?;
        let mut bytes = Vec::with_capacity(header.encoded_len());
        header.encode(&mut bytes).map_err(StartError::Header)?;
        self.open(&header.session_id, path, Open::Create(bytes), now)
    }

    /// Continues the recording of `session_id` after a resume or a relay restart: the writer
    /// reads the file, checks its chain to the end, cuts off a torn last record (counted in
    /// the `Resumed` record), and appends a `Resumed` record stamped `now_unix_ms`. The
    /// records' times go on from the later of the last record's time and the wall-clock time
    /// since the recording's start. A file whose chain is broken is not continued
    /// ([`Op::Read`], `InvalidData`).
    ///
    /// `expected` is the digest of the [`Outcome::Suspended`] that ended the previous handle,
    /// when there was one (there is none after a crash): the chain must end exactly there.
    /// Without it, an edit that made the last record look torn would be cut off as a torn
    /// tail; with it, that is refused.
    pub fn resume(
        &self,
        session_id: &str,
        expected: Option<Digest>,
        now_unix_ms: u64,
        now: Instant,
    ) -> Result<SessionRecorder, StartError> {
        let path = super::file_path(&self.dir, session_id)
            .ok_or_else(|| StartError::BadSessionId(session_id.to_owned()))?;
        self.open(session_id, path, Open::Resume { unix_ms: now_unix_ms, expected }, now)
    }

    fn open(
        &self,
        session_id: &str,
        path: PathBuf,
        how: Open,
        now: Instant,
    ) -> Result<SessionRecorder, StartError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(SessionShared::default());
        let job =
            Job::Open { id, session_id: session_id.to_owned(), path, how, shared: shared.clone() };
        self.tx.send(job).map_err(|_| StartError::Stopped)?;
        Ok(SessionRecorder {
            id,
            tx: self.tx.clone(),
            shared,
            base: now,
            high_water: self.high_water,
            done: false,
        })
    }

    /// Stops the writer once every handle is gone and the queue is drained: open files are
    /// synced and reported [`Outcome::Suspended`]. Blocks until the thread has exited.
    pub fn shutdown(self) {
        let Recorder { tx, thread, .. } = self;
        drop(tx);
        // The writer never panics on I/O; a panic would be a bug, surfaced here.
        thread.join().expect("recorder thread panicked");
    }
}

/// One session's recording, held by the shard that owns the session. Pushing never blocks
/// and never touches a file.
#[derive(Debug)]
pub struct SessionRecorder {
    id: u64,
    tx: mpsc::Sender<Job>,
    shared: Arc<SessionShared>,
    base: Instant,
    high_water: u64,
    /// `finish` sent its job: `Drop` sends no `Suspend`.
    done: bool,
}

impl SessionRecorder {
    /// Queues one record stamped `now`. `Full` when the session's queue is over its
    /// high-water mark (nothing queued: wait for [`ready`](Self::ready) and push again), so
    /// the queue holds at most the mark plus one record.
    pub fn try_push(&self, now: Instant, event: Event<'_>) -> Result<(), PushError> {
        if let Some(f) = self.shared.failure.get() {
            return Err(PushError::Failed(f.clone()));
        }
        let len = event.payload_len();
        if len > MAX_PAYLOAD {
            return Err(PushError::TooLong(len));
        }
        if self.shared.queued.load(Ordering::Acquire) > self.high_water {
            return Err(PushError::Full);
        }
        let cost = (len + RECORD_OVERHEAD) as u64;
        let payload = event.with_payload(<[u8]>::to_vec);
        self.shared.queued.fetch_add(cost, Ordering::AcqRel);
        let job =
            Job::Record { id: self.id, rel_us: self.rel_us(now), kind: event.kind(), payload };
        self.tx.send(job).map_err(|_| PushError::Stopped)
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> u64 {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Whether the queue is over its high-water mark: the shard stops reading the session's
    /// leg until [`ready`](Self::ready) resolves.
    pub fn over_high_water(&self) -> bool {
        self.queued_bytes() > self.high_water
    }

    /// The failure that stopped this recording, if one has.
    pub fn failure(&self) -> Option<&Failure> {
        self.shared.failure.get()
    }

    /// Resolves once the queue is at or under its high-water mark, or the recording failed
    /// (the next push says so). Immediately when it already is. Runtime-agnostic (a tokio
    /// `Notify`), so it works under both of the data plane's runtimes.
    pub async fn ready(&self) {
        loop {
            if !self.over_high_water() || self.shared.failure.get().is_some() {
                return;
            }
            let notified = self.shared.notify.notified();
            self.shared.want_wake.store(true, Ordering::Release);
            // Checked again after asking to be woken: a drain between the check above and
            // the store would otherwise not wake us.
            if !self.over_high_water() || self.shared.failure.get().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Ends the recording: an exit record if `exit` is given, then the file is synced and
    /// [`Outcome::Finished`] with the final digest goes to the control plane. Never blocks
    /// and is never refused for a full queue (it is one small record).
    pub fn finish(mut self, now: Instant, exit: Option<i32>) {
        self.done = true;
        let _ = self.tx.send(Job::Finish { id: self.id, rel_us: self.rel_us(now), exit });
    }

    fn rel_us(&self, now: Instant) -> u64 {
        // Saturating: u64 µs is 584,000 years.
        u64::try_from(now.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }
}

impl Drop for SessionRecorder {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Job::Suspend { id: self.id });
        }
    }
}

/// One open recording, on the writer thread.
struct OpenFile {
    session_id: String,
    path: PathBuf,
    file: File,
    chain: Chain,
    /// Added to a job's relative time: where this handle's time 0 is in the file's time.
    base_us: u64,
    last_us: u64,
    records: u64,
    len: u64,
    /// Encoded records of this batch, written with one `write_all`.
    pending: Vec<u8>,
    /// Queued bytes to give back once `pending` is written.
    release: u64,
}

enum Slot {
    Open(Box<OpenFile>, Arc<SessionShared>),
    /// Failed: further jobs are dropped (their bytes given back) until the handle is done.
    Failed(Arc<SessionShared>),
}

struct Writer {
    rx: mpsc::Receiver<Job>,
    outcomes: tokio::sync::mpsc::UnboundedSender<Outcome>,
    high_water: u64,
    files: HashMap<u64, Slot>,
    /// Tests hold this lock to stand for a disk that does not answer.
    #[cfg(test)]
    pause: Arc<Mutex<()>>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::new();
        let mut touched = Vec::new();
        while let Ok(first) = self.rx.recv() {
            let mut bytes = 0u64;
            batch.push(first);
            while bytes < BATCH_BYTES
                && let Ok(job) = self.rx.try_recv()
            {
                if let Job::Record { payload, .. } = &job {
                    bytes += payload.len() as u64;
                }
                batch.push(job);
            }
            #[cfg(test)]
            let pause = self.pause.clone();
            #[cfg(test)]
            let _held = pause.lock().unwrap_or_else(|e| e.into_inner());
            for job in batch.drain(..) {
                self.handle(job, &mut touched);
            }
            for id in touched.drain(..) {
                self.write_pending(id);
            }
        }
        // Every handle and the recorder are gone: sync what is still open.
        let ids: Vec<u64> = self.files.keys().copied().collect();
        for id in ids {
            self.close(id, false, None);
        }
    }

    fn handle(&mut self, job: Job, touched: &mut Vec<u64>) {
        match job {
            Job::Open { id, session_id, path, how, shared } => {
                let slot = match open_file(&session_id, &path, how) {
                    Ok(f) => Slot::Open(Box::new(f), shared),
                    Err(failure) => {
                        shared.fail(failure.clone());
                        let _ = self.outcomes.send(Outcome::Failed { session_id, failure });
                        Slot::Failed(shared)
                    }
                };
                self.files.insert(id, slot);
            }
            Job::Record { id, rel_us, kind, payload } => {
                let cost = (payload.len() + RECORD_OVERHEAD) as u64;
                match self.files.get_mut(&id) {
                    Some(Slot::Open(f, _)) => {
                        if f.pending.is_empty() && f.release == 0 {
                            touched.push(id);
                        }
                        f.append(rel_us, kind, &payload);
                        f.release += cost;
                    }
                    Some(Slot::Failed(shared)) => shared.release(cost, self.high_water),
                    // Jobs of a handle follow its Open in the one channel.
                    None => unreachable!("record for a session that was never opened"),
                }
            }
            Job::Finish { id, rel_us, exit } => {
                if let Some(Slot::Open(f, _)) = self.files.get_mut(&id)
                    && let Some(status) = exit
                {
                    let p = status.to_be_bytes();
                    f.append(rel_us, format::KIND_EXIT, &p);
                }
                self.close(id, true, Some(touched));
            }
            Job::Suspend { id } => self.close(id, false, Some(touched)),
        }
    }

    /// Writes what `id` has pending; on failure marks it failed.
    fn write_pending(&mut self, id: u64) -> bool {
        let Some(Slot::Open(f, shared)) = self.files.get_mut(&id) else { return false };
        let res = f.file.write_all(&f.pending);
        let release = std::mem::take(&mut f.release);
        if res.is_ok() {
            f.len += f.pending.len() as u64;
        }
        // Freed, not cleared: an idle session holds no buffer.
        f.pending = Vec::new();
        shared.release(release, self.high_water);
        match res {
            Ok(()) => true,
            Err(e) => {
                let failure = Failure::new(Op::Write, &f.path, &e);
                self.fail(id, failure);
                false
            }
        }
    }

    fn fail(&mut self, id: u64, failure: Failure) {
        let Some(Slot::Open(f, shared)) = self.files.remove(&id) else { return };
        if shared.fail(failure.clone()) {
            let _ = self.outcomes.send(Outcome::Failed { session_id: f.session_id, failure });
        }
        self.files.insert(id, Slot::Failed(shared));
    }

    /// Writes, syncs and closes `id`'s file and reports it.
    fn close(&mut self, id: u64, finished: bool, touched: Option<&mut Vec<u64>>) {
        if let Some(t) = touched {
            // Written now, not at the end of the batch.
            t.retain(|&x| x != id);
        }
        if !self.write_pending(id) {
            // Failed (now or before): the outcome was sent when it failed.
            self.files.remove(&id);
            return;
        }
        let Some(Slot::Open(f, shared)) = self.files.remove(&id) else { return };
        if let Err(e) = f.file.sync_all() {
            let failure = Failure::new(Op::Sync, &f.path, &e);
            shared.fail(failure.clone());
            let _ = self.outcomes.send(Outcome::Failed { session_id: f.session_id, failure });
            return;
        }
        let OpenFile { session_id, chain, records, len, .. } = *f;
        let digest = chain.digest();
        let outcome = if finished {
            Outcome::Finished { session_id, digest, records, len }
        } else {
            Outcome::Suspended { session_id, digest, records, len }
        };
        let _ = self.outcomes.send(outcome);
    }
}

impl OpenFile {
    fn append(&mut self, rel_us: u64, kind: u8, payload: &[u8]) {
        // Never backwards: a resumed handle's clock may start before the file's last record.
        let t = self.base_us.saturating_add(rel_us).max(self.last_us);
        self.last_us = t;
        let prefix = format::record_prefix(kind, t, payload.len());
        let d = self.chain.advance(&[&prefix, payload]);
        self.pending.reserve(RECORD_OVERHEAD + payload.len());
        self.pending.extend_from_slice(&prefix);
        self.pending.extend_from_slice(payload);
        self.pending.extend_from_slice(&d.0);
        self.records += 1;
    }
}

fn open_file(session_id: &str, path: &Path, how: Open) -> Result<OpenFile, Failure> {
    match how {
        Open::Create(header) => {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| Failure::new(Op::Create, path, &e))?;
            file.write_all(&header).map_err(|e| Failure::new(Op::Write, path, &e))?;
            sync_dir(path)?;
            Ok(OpenFile {
                session_id: session_id.to_owned(),
                path: path.to_owned(),
                file,
                chain: Chain::new(&header),
                base_us: 0,
                last_us: 0,
                records: 0,
                len: header.len() as u64,
                pending: Vec::new(),
                release: 0,
            })
        }
        Open::Resume { unix_ms, expected } => {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| Failure::new(Op::Open, path, &e))?;
            let end = chain_end(session_id, path, &file)?;
            if let Some(expected) = expected
                && expected != end.digest
            {
                return Err(Failure {
                    op: Op::Read,
                    kind: io::ErrorKind::InvalidData,
                    message: format!(
                        "the chain ends at {} after {} records ({} bytes after them), not at \
                         the suspended digest {expected}",
                        end.digest, end.records, end.dropped
                    ),
                    path: path.to_owned(),
                });
            }
            if end.dropped > 0 {
                file.set_len(end.len).map_err(|e| Failure::new(Op::Write, path, &e))?;
            }
            file.seek(SeekFrom::Start(end.len)).map_err(|e| Failure::new(Op::Open, path, &e))?;
            // The gap while the session was detached shows as the wall-clock time it took.
            let since_start = unix_ms.saturating_sub(end.start_unix_ms).saturating_mul(1000);
            let mut f = OpenFile {
                session_id: session_id.to_owned(),
                path: path.to_owned(),
                file,
                chain: Chain::resume(end.digest),
                base_us: since_start.max(end.last_us),
                last_us: end.last_us,
                records: end.records,
                len: end.len,
                pending: Vec::new(),
                release: 0,
            };
            let resumed = Event::Resumed {
                unix_ms,
                // A torn record is at most one record long, far under u32::MAX.
                dropped_tail: u32::try_from(end.dropped).unwrap_or(u32::MAX),
            };
            resumed.with_payload(|p| f.append(0, format::KIND_RESUMED, p));
            Ok(f)
        }
    }
}

/// Where an existing recording's chain ends.
struct ChainEnd {
    digest: Digest,
    records: u64,
    /// Bytes up to the end of the last whole record.
    len: u64,
    last_us: u64,
    start_unix_ms: u64,
    /// Bytes of a torn record after `len`.
    dropped: u64,
}

/// Reads an existing recording to the end of its chain, checking every digest on the way.
fn chain_end(session_id: &str, path: &Path, file: &File) -> Result<ChainEnd, Failure> {
    let bad = |e: VerifyError| {
        let kind = match &e {
            VerifyError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        Failure { op: Op::Read, kind, message: e.to_string(), path: path.to_owned() }
    };
    let mut r = Reader::new(file).map_err(bad)?;
    let dropped = loop {
        match r.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => break 0,
            Err(VerifyError::Truncated { len, .. }) => break len,
            Err(e) => return Err(bad(e)),
        }
    };
    if r.header().session_id != session_id {
        return Err(Failure {
            op: Op::Read,
            kind: io::ErrorKind::InvalidData,
            message: format!("the file records session {:?}", r.header().session_id),
            path: path.to_owned(),
        });
    }
    Ok(ChainEnd {
        digest: r.digest(),
        records: r.records(),
        len: r.offset(),
        last_us: r.last_time_us(),
        start_unix_ms: r.header().start_unix_ms,
        dropped,
    })
}

/// Syncs the directory holding `path`, so that a new file's name survives a crash.
fn sync_dir(path: &Path) -> Result<(), Failure> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Failure::new(Op::Sync, dir, &e))
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;
    use crate::recording::format::DIGEST_LEN;
    use crate::recording::verify::{self, verify};

    fn header(sid: &str) -> Header {
        Header {
            session_id: sid.into(),
            account: "acct".into(),
            instance: "i-1".into(),
            principal: "alice".into(),
            start_unix_ms: 1_700_000_000_000,
            cols: 80,
            rows: 24,
        }
    }

    fn recorder(dir: &Path, high_water: u64) -> (Recorder, UnboundedReceiver<Outcome>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cfg = RecorderConfig { dir: dir.to_owned(), high_water };
        (Recorder::spawn(cfg, tx).unwrap(), rx)
    }

    /// The next outcome, waiting at most 10 s (a test that fails must not hang the suite).
    fn next(rx: &mut UnboundedReceiver<Outcome>) -> Option<Outcome> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("an outcome")
        })
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Every event kind, its times as pushed, and the outcome's digest is the file's.
    #[test]
    fn a_session_is_recorded_and_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let t0 = Instant::now();
        let s = rec.start(&header("s-1"), t0).unwrap();
        s.try_push(t0 + us(10), Event::Output(b"$ ")).unwrap();
        s.try_push(t0 + us(20), Event::Input(b"exit 4\r")).unwrap();
        s.try_push(t0 + us(30), Event::Resize { cols: 100, rows: 40 }).unwrap();
        s.try_push(t0 + us(40), Event::Output(&[0xFF, 0xFE])).unwrap();
        s.finish(t0 + us(50), Some(4));
        let Some(Outcome::Finished { session_id, digest, records, len }) = next(&mut outcomes)
        else {
            panic!("not finished")
        };
        assert_eq!((session_id.as_str(), records), ("s-1", 5));
        let path = dir.path().join("s-1.hrec");
        let v = verify(&path, Some(digest)).unwrap();
        assert_eq!((v.records, v.exit, v.len, v.duration_us), (5, Some(4), len, 50));
        assert_eq!(v.header, header("s-1"));
        let bytes = std::fs::read(&path).unwrap();
        let mut r = verify::Reader::new(bytes.as_slice()).unwrap();
        let mut got = Vec::new();
        while let Some(x) = r.next_record().unwrap() {
            got.push((x.time_us, format!("{:?}", x.event)));
        }
        let want = [
            (10, format!("{:?}", Event::Output(b"$ "))),
            (20, format!("{:?}", Event::Input(b"exit 4\r"))),
            (30, format!("{:?}", Event::Resize { cols: 100, rows: 40 })),
            (40, format!("{:?}", Event::Output(&[0xFF, 0xFE]))),
            (50, format!("{:?}", Event::Exit(4))),
        ];
        assert_eq!(got, want);
        rec.shutdown();
        assert_eq!(next(&mut outcomes), None, "one outcome per session");
    }

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// A disk that does not answer: the queue fills to the mark, pushes say `Full` (nothing
    /// dropped, nothing blocked), `ready` waits, and resolves once the disk answers.
    #[test]
    fn a_stalled_disk_backpressures_instead_of_dropping() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), 1000);
        let t0 = Instant::now();
        let s = rec.start(&header("s-bp"), t0).unwrap();
        let held = rec.pause.lock().unwrap();
        let chunk = [b'x'; 300];
        let mut pushed = 0;
        let err = loop {
            match s.try_push(t0, Event::Output(&chunk)) {
                Ok(()) => pushed += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err, PushError::Full);
        // The mark plus at most one record.
        // Refused once over the mark (3 x 345 bytes > 1000): the mark plus at most one record.
        assert_eq!(pushed, 3);
        assert!(s.over_high_water());
        assert_eq!(s.queued_bytes(), 3 * (300 + RECORD_OVERHEAD as u64));
        assert!(s.queued_bytes() <= 1000 + (300 + RECORD_OVERHEAD as u64));
        {
            let mut ready = pin!(s.ready());
            assert!(poll_once(ready.as_mut()).is_pending());
            drop(held);
            // The writer drains and wakes the waiter: a real runtime waits for it.
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), ready).await.expect("woken")
            });
        }
        assert!(!s.over_high_water());
        s.try_push(t0, Event::Output(&chunk)).unwrap();
        s.finish(t0, None);
        let Some(Outcome::Finished { records, digest, .. }) = next(&mut outcomes) else { panic!() };
        assert_eq!(records, 4, "every pushed record is in the file");
        verify(&dir.path().join("s-bp.hrec"), Some(digest)).unwrap();
        rec.shutdown();
    }

    /// Both pumps of a session wait on one handle: the drain wakes both (a wake for one left
    /// the other asleep for good, its leg unread: a session that stalled).
    #[test]
    fn a_drain_wakes_every_waiter_of_a_handle() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), 1000);
        let t0 = Instant::now();
        let s = rec.start(&header("s-two"), t0).unwrap();
        let held = rec.pause.lock().unwrap();
        while s.try_push(t0, Event::Output(&[b'x'; 300])).is_ok() {}
        {
            let mut a = pin!(s.ready());
            let mut b = pin!(s.ready());
            assert!(poll_once(a.as_mut()).is_pending());
            assert!(poll_once(b.as_mut()).is_pending());
            drop(held);
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let both = async {
                    a.await;
                    b.await;
                };
                tokio::time::timeout(Duration::from_secs(10), both).await.expect("both woken")
            });
        }
        s.finish(t0, None);
        assert!(matches!(next(&mut outcomes), Some(Outcome::Finished { .. })));
        rec.shutdown();
    }

    #[test]
    fn ready_is_immediate_under_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, _outcomes) = recorder(dir.path(), 1000);
        let s = rec.start(&header("s-r"), Instant::now()).unwrap();
        assert!(poll_once(pin!(s.ready())).is_ready());
    }

    #[test]
    fn refusals_that_need_no_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let now = Instant::now();
        assert_eq!(
            rec.start(&header("../x"), now).unwrap_err(),
            StartError::BadSessionId("../x".into())
        );
        assert_eq!(rec.resume("", None, 0, now).unwrap_err(), StartError::BadSessionId("".into()));
        let long = Header { principal: "p".repeat(2000), ..header("s-l") };
        assert!(matches!(rec.start(&long, now), Err(StartError::Header(_))));
        let s = rec.start(&header("s-big"), now).unwrap();
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(s.try_push(now, Event::Output(&big)), Err(PushError::TooLong(MAX_PAYLOAD + 1)));
        s.try_push(now, Event::Output(&big[..MAX_PAYLOAD])).unwrap();
        s.finish(now, None);
        assert!(matches!(next(&mut outcomes), Some(Outcome::Finished { records: 1, .. })));
    }

    /// A recording is never overwritten: starting one whose file exists fails, loudly.
    #[test]
    fn an_existing_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s-x.hrec");
        std::fs::write(&path, b"evidence").unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let now = Instant::now();
        let s = rec.start(&header("s-x"), now).unwrap();
        let Some(Outcome::Failed { session_id, failure }) = next(&mut outcomes) else { panic!() };
        assert_eq!(session_id, "s-x");
        assert_eq!((failure.op, failure.kind), (Op::Create, io::ErrorKind::AlreadyExists));
        assert_eq!(std::fs::read(&path).unwrap(), b"evidence");
        // Sticky: every push says why.
        match s.try_push(now, Event::Output(b"a")) {
            Err(PushError::Failed(f)) => assert_eq!(f, failure),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.failure(), Some(&failure));
        assert!(poll_once(pin!(s.ready())).is_ready(), "a failed recording never waits");
        s.finish(now, Some(0));
        rec.shutdown();
        assert_eq!(next(&mut outcomes), None, "a failed session has one outcome");
    }

    /// The directory removed under the recorder: a create failure with its kind, not a panic.
    #[test]
    fn a_missing_directory_fails_with_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("rec");
        let (rec, mut outcomes) = recorder(&sub, DEFAULT_HIGH_WATER);
        std::fs::remove_dir(&sub).unwrap();
        let _s = rec.start(&header("s-m"), Instant::now()).unwrap();
        let Some(Outcome::Failed { failure, .. }) = next(&mut outcomes) else { panic!() };
        assert_eq!((failure.op, failure.kind), (Op::Create, io::ErrorKind::NotFound));
        assert!(failure.to_string().contains("s-m.hrec: create failed: "), "{failure}");
    }

    /// Dropped without finishing, then resumed: the chain continues across the two handles,
    /// with a `Resumed` record between, and times go on from the wall clock.
    #[test]
    fn a_suspended_recording_resumes_and_its_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let t0 = Instant::now();
        let s = rec.start(&header("s-res"), t0).unwrap();
        s.try_push(t0 + us(5_000), Event::Output(b"before")).unwrap();
        drop(s);
        let Some(Outcome::Suspended { records: 1, digest: d1, .. }) = next(&mut outcomes) else {
            panic!()
        };
        let path = dir.path().join("s-res.hrec");
        verify(&path, Some(d1)).unwrap();

        // Resumed 2 s after the recording's start, by wall clock.
        let t1 = Instant::now();
        let s = rec.resume("s-res", Some(d1), 1_700_000_002_000, t1).unwrap();
        s.try_push(t1 + us(7), Event::Output(b"after")).unwrap();
        s.finish(t1 + us(9), Some(0));
        let Some(Outcome::Finished { records: 4, digest, .. }) = next(&mut outcomes) else {
            panic!()
        };
        let bytes = std::fs::read(&path).unwrap();
        let mut r = verify::Reader::new(bytes.as_slice()).unwrap();
        let mut got = Vec::new();
        while let Some(x) = r.next_record().unwrap() {
            got.push((x.time_us, format!("{:?}", x.event)));
        }
        assert_eq!(r.digest(), digest);
        let resumed = Event::Resumed { unix_ms: 1_700_000_002_000, dropped_tail: 0 };
        assert_eq!(
            got,
            [
                (5_000, format!("{:?}", Event::Output(b"before"))),
                (2_000_000, format!("{resumed:?}")),
                (2_000_007, format!("{:?}", Event::Output(b"after"))),
                (2_000_009, format!("{:?}", Event::Exit(0))),
            ]
        );
    }

    /// A resume with the wall clock behind the file (a clock set back) keeps times in order.
    #[test]
    fn a_resume_never_goes_back_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let t0 = Instant::now();
        let s = rec.start(&header("s-t"), t0).unwrap();
        s.try_push(t0 + us(9_000_000), Event::Output(b"late")).unwrap();
        drop(s);
        next(&mut outcomes).unwrap();
        let s = rec.resume("s-t", None, 0, Instant::now()).unwrap();
        s.finish(Instant::now(), None);
        let Some(Outcome::Finished { digest, .. }) = next(&mut outcomes) else { panic!() };
        let v = verify(&dir.path().join("s-t.hrec"), Some(digest)).unwrap();
        assert_eq!((v.records, v.duration_us), (2, 9_000_000));
    }

    /// The previous writer died inside a record: the torn bytes are cut off and counted in
    /// the `Resumed` record, and the file verifies again.
    #[test]
    fn a_torn_tail_is_cut_and_counted_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let t0 = Instant::now();
        let s = rec.start(&header("s-torn"), t0).unwrap();
        s.try_push(t0, Event::Output(b"whole")).unwrap();
        drop(s);
        next(&mut outcomes).unwrap();
        let path = dir.path().join("s-torn.hrec");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[format::KIND_OUTPUT, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'p']).unwrap();
        drop(f);
        assert!(matches!(verify(&path, None), Err(VerifyError::Truncated { len: 14, .. })));
        let s = rec.resume("s-torn", None, 1_700_000_000_001, Instant::now()).unwrap();
        s.finish(Instant::now(), None);
        let Some(Outcome::Finished { digest, records: 2, .. }) = next(&mut outcomes) else {
            panic!()
        };
        verify(&path, Some(digest)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut r = verify::Reader::new(bytes.as_slice()).unwrap();
        r.next_record().unwrap();
        let ev = r.next_record().unwrap().unwrap().event;
        assert_eq!(ev, Event::Resumed { unix_ms: 1_700_000_000_001, dropped_tail: 14 });
    }

    /// A tampered file is not continued (its chain would vouch for the change).
    #[test]
    fn a_broken_chain_is_not_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let t0 = Instant::now();
        let s = rec.start(&header("s-bad"), t0).unwrap();
        s.try_push(t0, Event::Output(b"secret")).unwrap();
        drop(s);
        let Some(Outcome::Suspended { digest, .. }) = next(&mut outcomes) else { panic!() };
        let path = dir.path().join("s-bad.hrec");
        let good = std::fs::read(&path).unwrap();
        // A payload byte changed: the chain says so.
        let mut bytes = good.clone();
        let at = bytes.len() - DIGEST_LEN - 3;
        bytes[at] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let s = rec.resume("s-bad", None, 0, Instant::now()).unwrap();
        let Some(Outcome::Failed { failure, .. }) = next(&mut outcomes) else { panic!() };
        assert_eq!((failure.op, failure.kind), (Op::Read, io::ErrorKind::InvalidData));
        assert!(failure.message.contains("record 0 at byte"), "{failure}");
        assert!(matches!(
            s.try_push(Instant::now(), Event::Output(b"x")),
            Err(PushError::Failed(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file is left as it was");
        drop(s);
        // A length byte changed so that the last record looks torn: with the suspended
        // digest, that is refused rather than cut off.
        let mut bytes = good.clone();
        let at = bytes.len() - DIGEST_LEN - 6 - 2;
        bytes[at] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(verify(&path, None), Err(VerifyError::Truncated { .. })));
        let s = rec.resume("s-bad", Some(digest), 0, Instant::now()).unwrap();
        let Some(Outcome::Failed { failure, .. }) = next(&mut outcomes) else { panic!() };
        assert_eq!((failure.op, failure.kind), (Op::Read, io::ErrorKind::InvalidData));
        assert!(failure.message.contains("not at the suspended digest"), "{failure}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file is left as it was");
        drop(s);
        // A missing file fails as NotFound.
        let s = rec.resume("s-none", None, 0, Instant::now()).unwrap();
        let Some(Outcome::Failed { failure, .. }) = next(&mut outcomes) else { panic!() };
        assert_eq!((failure.op, failure.kind), (Op::Open, io::ErrorKind::NotFound));
        drop(s);
    }

    /// Many sessions on one writer, interleaved: each file holds exactly its own records.
    #[test]
    fn interleaved_sessions_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, mut outcomes) = recorder(dir.path(), DEFAULT_HIGH_WATER);
        let t0 = Instant::now();
        let sessions: Vec<SessionRecorder> =
            (0..8).map(|i| rec.start(&header(&format!("s-{i}")), t0).unwrap()).collect();
        for round in 0..50u64 {
            for (i, s) in sessions.iter().enumerate() {
                let text = format!("{i}:{round};");
                s.try_push(t0 + us(round), Event::Output(text.as_bytes())).unwrap();
            }
        }
        for s in sessions {
            s.finish(t0 + us(100), None);
        }
        let mut n = 0;
        while n < 8 {
            let Some(Outcome::Finished { session_id, digest, records, .. }) = next(&mut outcomes)
            else {
                panic!()
            };
            assert_eq!(records, 50);
            let path = dir.path().join(format!("{session_id}.hrec"));
            verify(&path, Some(digest)).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let mut r = verify::Reader::new(bytes.as_slice()).unwrap();
            let i = &session_id[2..];
            let mut round = 0;
            while let Some(x) = r.next_record().unwrap() {
                assert_eq!(x.event, Event::Output(format!("{i}:{round};").as_bytes()));
                round += 1;
            }
            n += 1;
        }
        rec.shutdown();
    }
}
