//! Session recording end to end through the writer thread, on real files: 10 MiB of random
//! binary output byte for byte, a flipped byte named by verify, the asciicast export read by
//! the real `asciinema cat`, and a read-only or full file system surfacing as a failure with
//! its error kind (not a panic, not silence).
//!
//! The relay does not record yet (the module is not wired in); these tests drive the module
//! as the data plane will.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hatch_relay::recording::asciicast::{self, ExportOptions};
use hatch_relay::recording::verify::{self, Reader, VerifyError};
use hatch_relay::recording::writer::{Op, Outcome, PushError, RecorderConfig};
use hatch_relay::recording::{Event, Header, Recorder, SessionRecorder};
use rand::{Rng, RngCore, SeedableRng};
use tokio::sync::mpsc::UnboundedReceiver;

fn header(sid: &str) -> Header {
    Header {
        session_id: sid.into(),
        account: "acct-1".into(),
        instance: "i-0123456789abcdef".into(),
        principal: "alice".into(),
        start_unix_ms: 1_765_000_000_000,
        cols: 80,
        rows: 24,
    }
}

fn recorder(dir: &Path) -> (Recorder, UnboundedReceiver<Outcome>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (Recorder::spawn(RecorderConfig::new(dir), tx).unwrap(), rx)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
}

/// The next outcome, within 30 s: a broken writer fails the test instead of hanging it.
fn next(rt: &tokio::runtime::Runtime, rx: &mut UnboundedReceiver<Outcome>) -> Outcome {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), rx.recv()).await })
        .expect("an outcome within 30 s")
        .expect("the writer is alive")
}

/// Pushes as the data plane will: on `Full`, wait for `ready` (the shard stops reading its
/// leg meanwhile) and push the same bytes again. Returns how often it had to wait.
fn push(rt: &tokio::runtime::Runtime, s: &SessionRecorder, now: Instant, e: Event<'_>) -> u32 {
    let mut waits = 0;
    loop {
        match s.try_push(now, e) {
            Ok(()) => return waits,
            Err(PushError::Full) => {
                waits += 1;
                rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), s.ready()).await
                })
                .expect("the queue drains");
            }
            Err(other) => panic!("push failed: {other}"),
        }
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().to_vec()
}

#[test]
fn ten_mib_of_binary_output_is_recorded_byte_for_byte_and_a_flipped_byte_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, mut outcomes) = recorder(dir.path());
    let rt = runtime();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x16);
    let mut output = vec![0u8; 10 << 20];
    rng.fill_bytes(&mut output);

    let t0 = Instant::now();
    let s = rec.start(&header("s-tenmib"), t0).unwrap();
    let mut pos = 0;
    let mut chunks = 0u64;
    let mut waits = 0;
    while pos < output.len() {
        // Random sizes from 1 byte to the 1 MiB record bound, mostly small as terminals are.
        let n = if rng.random_bool(0.01) {
            rng.random_range(1..=1 << 20)
        } else {
            rng.random_range(1..=4096)
        }
        .min(output.len() - pos);
        let now = t0 + Duration::from_micros(chunks * 50);
        waits += push(&rt, &s, now, Event::Output(&output[pos..pos + n]));
        if chunks.is_multiple_of(97) {
            push(&rt, &s, now, Event::Input(b"\x03"));
        }
        pos += n;
        chunks += 1;
    }
    s.finish(t0 + Duration::from_micros(chunks * 50), Some(0));
    let Outcome::Finished { session_id, digest, records, len } = next(&rt, &mut outcomes) else {
        panic!("not finished")
    };
    eprintln!("{chunks} output records, {records} in all, {len} bytes, waited {waits} times");
    assert_eq!(session_id, "s-tenmib");
    let path = dir.path().join("s-tenmib.hrec");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);

    // It verifies against the digest the store will keep.
    let v = verify::verify(&path, Some(digest)).unwrap();
    assert_eq!((v.records, v.exit, v.final_digest), (records, Some(0), digest));

    // The output read back is the output written, byte for byte; and each record's offset,
    // for the tamper check below.
    let file = std::fs::File::open(&path).unwrap();
    let mut r = Reader::new(io::BufReader::new(file)).unwrap();
    let mut back = Vec::with_capacity(output.len());
    let mut offsets = Vec::new();
    let mut outputs = Vec::new();
    loop {
        let at = r.offset();
        let Some(x) = r.next_record().unwrap() else { break };
        if let Event::Output(b) = x.event {
            back.extend_from_slice(b);
            outputs.push((offsets.len() as u64, at, b.len()));
        }
        offsets.push(at);
    }
    assert_eq!(back.len(), output.len());
    assert_eq!(sha256(&back), sha256(&output), "the output read back differs");

    // One byte flipped in the payload of an output record in the middle: verify names that
    // record, by index and byte offset, and nothing before it.
    let (index, offset, plen) = outputs[outputs.len() / 2];
    let mut bytes = std::fs::read(&path).unwrap();
    let at = offset as usize + 13 + plen / 2;
    bytes[at] ^= 0x01;
    let bad = dir.path().join("s-bad.hrec");
    std::fs::write(&bad, &bytes).unwrap();
    match verify::verify(&bad, Some(digest)) {
        Err(VerifyError::Digest { index: i, offset: o, .. }) => assert_eq!((i, o), (index, offset)),
        other => panic!("expected a digest mismatch at record {index}: {other:?}"),
    }
    // Cut short inside a record: truncated, naming the torn record.
    let cut = dir.path().join("s-cut.hrec");
    std::fs::write(&cut, &bytes[..offset as usize + 5]).unwrap();
    match verify::verify(&cut, None) {
        Err(VerifyError::Truncated { index: i, offset: o, len: 5 }) => {
            assert_eq!((i, o), (index, offset))
        }
        other => panic!("expected truncated at record {index}: {other:?}"),
    }
    // Records cut off at a record boundary: the file is consistent on its own, and only the
    // digest the store kept tells.
    std::fs::write(&cut, &bytes[..offset as usize]).unwrap();
    assert_eq!(verify::verify(&cut, None).unwrap().records, index);
    match verify::verify(&cut, Some(digest)) {
        Err(VerifyError::FinalDigest { expected, records, .. }) => {
            assert_eq!((expected, records), (digest, index))
        }
        other => panic!("expected a final digest mismatch: {other:?}"),
    }
    rec.shutdown();
}

/// The asciicast export of a session read by the real asciinema player: it prints the
/// output, and the cast holds the input, the resize and the exit status.
#[test]
fn asciinema_cat_prints_the_exported_output() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, mut outcomes) = recorder(dir.path());
    let rt = runtime();
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let s = rec.start(&header("s-cast"), t0).unwrap();
    push(&rt, &s, ms(10), Event::Output(b"$ "));
    push(&rt, &s, ms(500), Event::Input(b"echo HATCH-"));
    push(&rt, &s, ms(700), Event::Input(b"MARKER-16; exit 4\r"));
    push(&rt, &s, ms(800), Event::Resize { cols: 100, rows: 30 });
    // The marker split across records, a euro sign split inside its bytes, an invalid byte.
    push(&rt, &s, ms(900), Event::Output(b"HATCH-MAR"));
    push(&rt, &s, ms(901), Event::Output(b"KER-16 costs 5 \xE2\x82"));
    push(&rt, &s, ms(902), Event::Output(b"\xAC \xFF\r\n"));
    s.finish(ms(1000), Some(4));
    let Outcome::Finished { digest, .. } = next(&rt, &mut outcomes) else { panic!() };
    let path = dir.path().join("s-cast.hrec");
    let cast = dir.path().join("s-cast.cast");
    let summary = asciicast::export(
        std::fs::File::open(&path).unwrap(),
        std::fs::File::create(&cast).unwrap(),
        &ExportOptions { term: Some("xterm-256color".into()), shell: Some("/bin/bash".into()) },
    )
    .unwrap();
    assert_eq!((summary.exit, summary.digest, summary.replaced), (Some(4), digest, 1));

    let text = std::fs::read_to_string(&cast).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["version"], 2);
    assert_eq!((lines[0]["width"].as_u64(), lines[0]["height"].as_u64()), (Some(80), Some(24)));
    assert_eq!(lines[0]["timestamp"], 1_765_000_000);
    assert_eq!(lines[0]["title"], "s-cast");
    assert_eq!(lines[0]["env"]["TERM"], "xterm-256color");
    let events: Vec<(f64, &str, &str)> = lines[1..]
        .iter()
        .map(|e| (e[0].as_f64().unwrap(), e[1].as_str().unwrap(), e[2].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [
            (0.01, "o", "$ "),
            (0.5, "i", "echo HATCH-"),
            (0.7, "i", "MARKER-16; exit 4\r"),
            (0.8, "r", "100x30"),
            (0.9, "o", "HATCH-MAR"),
            (0.901, "o", "KER-16 costs 5 "),
            (0.902, "o", "€ \u{FFFD}\r\n"),
            (1.0, "m", "exit 4"),
        ]
    );

    let out = Command::new("asciinema").arg("cat").arg(&cast).stdin(Stdio::null()).output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "asciinema is not installed: scripts/test installs it (pip install asciinema); \
             this test does not skip"
        ),
        Err(e) => panic!("running asciinema: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "asciinema cat: {}: {stderr}", out.status);
    assert!(stdout.contains("HATCH-MARKER-16 costs 5 € \u{FFFD}"), "asciinema printed {stdout:?}");
    // `cat` prints output only: the input is not echoed by the player.
    assert!(!stdout.contains("echo HATCH-"), "{stdout:?}");
    rec.shutdown();
}

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted when dropped (as the
/// end-to-end fault tests do); `None`, said loudly, where this process may not mount.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                eprintln!("\n*** cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {other:?}\n");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, how: &str) {
        let st =
            Command::new("mount").args(["-o", &format!("remount,{how}")]).arg(self.path()).status();
        assert!(st.is_ok_and(|s| s.success()), "remount,{how} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(self.path()).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

/// A recording directory that cannot be written: a new session's recording fails with the
/// error's kind, reported to the control plane at once and on every push, never a panic.
#[test]
fn a_read_only_directory_fails_the_recording_with_its_kind() {
    let rt = runtime();
    let tmpfs = Tmpfs::mount("1m");
    // Where no tmpfs can be mounted (not root), a directory without write permission stands
    // in (root ignores modes, so root needs the read-only mount).
    let fallback = tempfile::tempdir().unwrap();
    let (dir, want) = match &tmpfs {
        Some(fs) => (fs.path().join("rec"), io::ErrorKind::ReadOnlyFilesystem),
        None => (fallback.path().join("rec"), io::ErrorKind::PermissionDenied),
    };
    let (rec, mut outcomes) = recorder(&dir);
    match &tmpfs {
        Some(fs) => fs.remount("ro"),
        None => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
    }
    let t0 = Instant::now();
    let s = rec.start(&header("s-ro"), t0).unwrap();
    let Outcome::Failed { session_id, failure } = next(&rt, &mut outcomes) else { panic!() };
    eprintln!("{failure}");
    assert_eq!(session_id, "s-ro");
    assert_eq!((failure.op, failure.kind), (Op::Create, want), "{failure}");
    assert!(failure.path.ends_with("s-ro.hrec"));
    match s.try_push(t0, Event::Output(b"x")) {
        Err(PushError::Failed(f)) => assert_eq!(f, failure),
        other => panic!("push after failure: {other:?}"),
    }
    s.finish(t0, Some(0));
    rec.shutdown();
    assert!(outcomes.try_recv().is_err(), "one outcome for a failed session");
}

/// The disk fills while a session records: the recording fails with `StorageFull` on a
/// write, the live session learns it on its next push, and the file keeps what was written
/// (it verifies up to the torn record the failed write left).
#[test]
fn a_full_disk_fails_a_live_recording_with_its_kind() {
    let Some(fs) = Tmpfs::mount("256k") else {
        eprintln!("*** SKIPPED: the full-disk recording test needs a tmpfs");
        return;
    };
    let rt = runtime();
    let (rec, mut outcomes) = recorder(fs.path());
    let t0 = Instant::now();
    let s = rec.start(&header("s-full"), t0).unwrap();
    let chunk = vec![b'y'; 48 * 1024];
    let mut pushed = 0u64;
    let failure = loop {
        match s.try_push(t0, Event::Output(&chunk)) {
            Ok(()) => pushed += 1,
            Err(PushError::Full) => {
                rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), s.ready()).await
                })
                .expect("ready");
            }
            Err(PushError::Failed(f)) => break f,
            Err(other) => panic!("{other}"),
        }
        assert!(pushed < 1000, "256 KiB never filled");
    };
    eprintln!("after {pushed} pushes: {failure}");
    assert_eq!((failure.op, failure.kind), (Op::Write, io::ErrorKind::StorageFull));
    let Outcome::Failed { failure: reported, .. } = next(&rt, &mut outcomes) else { panic!() };
    assert_eq!(reported, failure);
    drop(s);
    rec.shutdown();
    assert!(outcomes.try_recv().is_err(), "one outcome for a failed session");
    match verify::verify(&fs.path().join("s-full.hrec"), None) {
        Ok(v) => assert!(v.records < pushed),
        Err(VerifyError::Truncated { index, .. }) => assert!(index < pushed),
        Err(other) => panic!("the part written does not verify: {other}"),
    }
}

/// Writer throughput: 512 MiB of output in 32 KiB records (the data plane's read size)
/// through the writer thread to a file, chain and all. Run by hand (see docs/RECORDING.md):
/// `cargo test --release -p hatch-relay --test recording -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn writer_throughput() {
    let dir = std::env::var_os("HATCH_RECORDING_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hatch-recording-bench"));
    let _ = std::fs::remove_dir_all(&dir);
    let (rec, mut outcomes) = recorder(&dir);
    let rt = runtime();
    let mut chunk = vec![0u8; 32 * 1024];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut chunk);
    let total: u64 = 512 << 20;
    let t0 = Instant::now();
    let s = rec.start(&header("s-bench"), t0).unwrap();
    let mut waits = 0;
    for _ in 0..total / chunk.len() as u64 {
        waits += push(&rt, &s, Instant::now(), Event::Output(&chunk));
    }
    let pushed = t0.elapsed().as_secs_f64();
    s.finish(Instant::now(), Some(0));
    let Outcome::Finished { len, .. } = next(&rt, &mut outcomes) else { panic!() };
    let secs = t0.elapsed().as_secs_f64();
    let mb = total as f64 / 1e6;
    println!(
        "writer: {mb:.0} MB in {secs:.2} s = {:.0} MB/s (file {len} bytes, fsync included, \
         {waits} waits for the queue); all pushed after {pushed:.2} s = {:.0} MB/s, the last \
         4 MiB and the fsync {:.2} s",
        mb / secs,
        mb / pushed,
        secs - pushed
    );
    // The chain alone, on this thread: the writer's CPU bound.
    let mut chain = hatch_relay::recording::format::Chain::new(b"");
    let t1 = Instant::now();
    for _ in 0..total / chunk.len() as u64 {
        chain.advance(&[&chunk]);
    }
    let hash = t1.elapsed().as_secs_f64();
    println!("sha-256 chain alone: {:.0} MB/s ({})", mb / hash, chain.digest());
    rec.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = io::stdout().flush();
}
