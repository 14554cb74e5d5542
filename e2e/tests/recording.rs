//! Session recording at the relay (issue 16, docs/RECORDING.md) with the real binaries: a
//! recorded shell on a real terminal read back as asciicast through the API and the CLI,
//! played by `asciinema cat` and `hatch play`; `hatch-relay admin recordings verify` before and
//! after one flipped byte; 10 MiB of binary output recorded byte for byte; and a recording
//! directory that cannot be written refusing new sessions (503 `RecordingUnavailable`) and
//! ending a live one (close 4018, `recording_failed`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hatch_e2e::*;
use hatch_relay::recording::format::Event;
use hatch_relay::recording::verify::Reader;
use serde_json::Value;

/// Sets the demo account's `recording` through `PUT /v1/account/settings`.
async fn set_recording(relay: &Relay, mode: &str) {
    let body = format!(r#"{{"recording":"{mode}"}}"#);
    let key = &relay.info.access_key;
    let r = relay.call("PUT", "/v1/account/settings", Some(key), Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["recording"], mode, "{}", r.text);
    let r = relay.call("GET", "/v1/account/settings", Some(key), None).await;
    assert_eq!(r.json()["recording"], mode, "{}", r.text);
}

fn recording_file(relay: &Relay, sid: &str) -> PathBuf {
    relay.data_dir.join("recordings").join(format!("{sid}.hrec"))
}

/// `hatch-relay admin recordings verify SID`: exit code, stdout, stderr.
fn verify(relay: &Relay, sid: &str) -> (Option<i32>, String, String) {
    let out = Command::new(bin("hatch-relay"))
        .args(["admin", "--data-dir"])
        .arg(&relay.data_dir)
        .args(["recordings", "verify", sid])
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// Waits until the store has the session's final recording digest (the writer syncs the file
/// after the session ended, then reports it).
async fn wait_digest(relay: &Relay, sid: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        let out = Command::new(bin("hatch-relay"))
            .args(["admin", "--json", "--data-dir"])
            .arg(&relay.data_dir)
            .args(["recordings", "verify", sid])
            .output()
            .unwrap();
        let stored = out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["digest_stored"] == true);
        if stored {
            return;
        }
        assert!(
            Instant::now() < end,
            "no final digest for {sid}: {out:?}\nrelay log:\n{}",
            relay.proc.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `hatch` on a real terminal: a pseudo-terminal of `cols`×`rows`, its output collected.
struct OnTerminal {
    child: std::process::Child,
    master: std::fs::File,
    slave_path: PathBuf,
    out: Arc<Mutex<Vec<u8>>>,
    err: PathBuf,
}

impl OnTerminal {
    fn spawn(relay: &Relay, home: &Path, args: &[&str], cols: u16, rows: u16) -> OnTerminal {
        let size = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        let slave_path = {
            use std::os::fd::AsRawFd;
            std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap()
        };
        let err = home.join("hatch.err");
        let mut cmd = hatch(relay, home, &relay.info.access_key);
        cmd.args(args)
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave))
            .stderr(std::fs::File::create(&err).unwrap());
        let child = cmd.spawn().unwrap();
        let master = std::fs::File::from(pty.master);
        let out = Arc::new(Mutex::new(Vec::new()));
        let (mut r, got) = (master.try_clone().unwrap(), out.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            // EIO once the last process holding the terminal is gone.
            while let Ok(n @ 1..) = r.read(&mut buf) {
                got.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        OnTerminal { child, master, slave_path, out, err }
    }

    fn type_text(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    async fn wait_output(&self, what: &str) {
        let end = Instant::now() + DEADLINE;
        while !self.output().contains(what) {
            assert!(Instant::now() < end, "never saw {what:?} in:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resizes the terminal and tells `hatch`, as a terminal emulator does.
    fn resize(&self, cols: u16, rows: u16) {
        let st = Command::new("stty")
            .arg("-F")
            .arg(&self.slave_path)
            .args(["cols", &cols.to_string(), "rows", &rows.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGWINCH).unwrap();
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    async fn exit_code(mut self) -> (Option<i32>, String) {
        let end = Instant::now() + DEADLINE;
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < end, "hatch did not exit: {}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (st.code(), self.stderr())
    }
}

/// The id of the newest session (`hatch exec` does not print it).
async fn newest_session(relay: &Relay) -> String {
    let r = relay.call("GET", "/v1/sessions?limit=1", Some(&relay.info.access_key), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["sessions"][0]["session_id"].as_str().expect("a session").to_owned()
}

/// asciicast v2 text: its header and its events as (code, data).
fn cast_events(cast: &str) -> (Value, Vec<(String, String)>) {
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header")).unwrap();
    let events = lines
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v[1].as_str().unwrap().to_owned(), v[2].as_str().unwrap().to_owned())
        })
        .collect();
    (header, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_recording_of_a_shell_is_replayed_verified_and_a_flipped_byte_is_named() {
    let (relay, _agent, iid, home) = relay_and_agent(&[]).await;
    set_recording(&relay, "full").await;
    let mut term = OnTerminal::spawn(&relay, home.path(), &["session", "-i", &iid], 100, 30);
    // Typed once the shell is up (its prompt came), so `hatch` has the terminal in raw mode.
    let end = Instant::now() + DEADLINE;
    while term.output().is_empty() {
        assert!(Instant::now() < end, "no prompt: {}", term.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The marker is computed by the shell: the input shows `$((6*7))`, the output `42`.
    term.type_text("echo MARK$((6*7))ER\r");
    term.wait_output("MARK42ER").await;
    term.resize(120, 40);
    // The remote terminal has the new size once `stty size` says so: the RESIZE went through
    // the relay, which records it before it forwards it.
    // `hatch` may read the typed line before it handles the SIGWINCH: the shell then answers
    // the old size, and the command is typed again until the new one shows.
    let end = Instant::now() + DEADLINE;
    'sized: loop {
        term.type_text("stty size\r");
        let once = Instant::now() + Duration::from_secs(1);
        while Instant::now() < once {
            if term.output().contains("40 120") {
                break 'sized;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(Instant::now() < end, "never saw \"40 120\" in:\n{}", term.output());
    }
    term.type_text("exit 4\r");
    let (code, err) = term.exit_code().await;
    assert_eq!(code, Some(4), "{err}");
    let sid = newest_session(&relay).await;
    let rec = relay.closed_session(&sid).await;
    assert_eq!(rec["close_reason"], "exit", "{rec}");
    wait_digest(&relay, &sid).await;

    // The recording through the CLI (GET /v1/sessions/{id}/recording).
    let cast_file = home.path().join("session.cast");
    let out = hatch(&relay, home.path(), &relay.info.access_key)
        .args(["sessions", "recording", &sid, "-o"])
        .arg(&cast_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cast = std::fs::read_to_string(&cast_file).unwrap();
    let (header, events) = cast_events(&cast);
    assert_eq!(header["version"], 2, "{header}");
    assert_eq!(header["title"], sid.as_str(), "{header}");
    let joined = |code: &str| -> String {
        events.iter().filter(|(c, _)| c == code).map(|(_, d)| d.as_str()).collect()
    };
    assert!(joined("o").contains("MARK42ER"), "output: {:?}", joined("o"));
    assert!(joined("i").contains("echo MARK$((6*7))ER\r"), "input: {:?}", joined("i"));
    assert!(joined("i").contains("exit 4\r"), "input: {:?}", joined("i"));
    let resizes: Vec<&str> =
        events.iter().filter(|(c, _)| c == "r").map(|(_, d)| d.as_str()).collect();
    assert_eq!(resizes, ["100x30", "120x40"], "{events:?}");
    assert_eq!(events.last().unwrap(), &("m".to_owned(), "exit 4".to_owned()), "{events:?}");

    // The asciinema player reads it.
    let cat = Command::new("asciinema").arg("cat").arg(&cast_file).output().unwrap();
    assert!(cat.status.success(), "{}", String::from_utf8_lossy(&cat.stderr));
    assert!(String::from_utf8_lossy(&cat.stdout).contains("MARK42ER"));

    // `hatch play` replays it, from the relay by id and from the file, ten times as fast.
    for target in [sid.as_str(), cast_file.to_str().unwrap()] {
        let out = hatch(&relay, home.path(), &relay.info.access_key)
            .args(["play", target, "--speed", "10"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("MARK42ER"));
    }

    // Verified against the digest the store kept; then one byte flipped in the file.
    let (code, out, err) = verify(&relay, &sid);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("ok\n"), "{out}");
    let file = recording_file(&relay, &sid);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let (code, out, err) = verify(&relay, &sid);
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains(&sid) && err.contains("record "), "{err}");
    // The API will not serve what the chain does not vouch for.
    let key = &relay.info.access_key;
    let r = relay.call("GET", &format!("/v1/sessions/{sid}/recording"), Some(key), None).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.json()["code"], "RecordingCorrupt", "{}", r.text);
}

/// `hatch exec -- cat FILE` of a file holding `data`, in `home`: its output and its stderr.
fn cat_through(
    relay: &Relay,
    home: &std::path::Path,
    iid: &str,
    data: &[u8],
) -> (std::process::Output, String) {
    let src = home.join("noise.bin");
    std::fs::write(&src, data).unwrap();
    let out = hatch(relay, home, &relay.info.access_key)
        .args(["exec", "-i", iid, "--", "cat"])
        .arg(&src)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_of_binary_output_are_recorded_byte_for_byte() {
    let (relay, _agent, iid, home) = relay_and_agent(&[]).await;
    set_recording(&relay, "output").await;
    let data = noise(10 << 20, 16);
    let (out, err) = cat_through(&relay, home.path(), &iid, &data);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(out.stdout == data, "hatch printed {} bytes, want {}", out.stdout.len(), data.len());
    let sid = newest_session(&relay).await;
    relay.closed_session(&sid).await;
    wait_digest(&relay, &sid).await;
    let (code, out, err) = verify(&relay, &sid);
    assert_eq!(code, Some(0), "{out}{err}");

    let mut r = Reader::new(std::fs::File::open(recording_file(&relay, &sid)).unwrap()).unwrap();
    let mut output = Vec::with_capacity(data.len());
    let (mut input, mut exit) = (0usize, None);
    while let Some(rec) = r.next_record().unwrap() {
        match rec.event {
            Event::Output(b) => output.extend_from_slice(b),
            Event::Input(b) => input += b.len(),
            Event::Exit(s) => exit = Some(s),
            _ => {}
        }
    }
    assert!(output == data, "recorded {} bytes of output, want {}", output.len(), data.len());
    assert_eq!(input, 0, "mode output records no input");
    assert_eq!(exit, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_directory_that_cannot_be_written_refuses_and_ends_sessions() {
    let (relay, _agent, iid, home) = relay_and_agent(&[]).await;
    set_recording(&relay, "output").await;
    let dir = relay.data_dir.join("recordings");
    // 256 KiB: a session printing 16 MiB fills it, and the writer's next write fails. What a
    // session may have queued for the writer (4 MiB, the high-water mark) can reach the client
    // before the failure does; nothing past it.
    let Some(fs) = Tmpfs::mount_on(&dir, "256k") else { return };
    let (out, err) = cat_through(&relay, home.path(), &iid, &noise(16 << 20, 7));
    let shown = out.stdout.len();
    assert!(shown < 8 << 20, "{shown} bytes went through past the failed recording");
    assert!(err.contains("4018"), "{err}");
    let sid = newest_session(&relay).await;
    let rec = relay.closed_session(&sid).await;
    assert_eq!(rec["close_reason"], "recording_failed", "{rec}");
    let log = relay.proc.output();
    assert!(log.contains("recording failed; ending the session (4018)"), "{log}");

    // Read-only: a new session of the account is refused before it starts.
    fs.remount("ro");
    let body = format!(r#"{{"instance_id":"{iid}","mode":"shell"}}"#);
    let key = &relay.info.access_key;
    let r = relay.call("POST", "/v1/sessions", Some(key), Some(&body)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["code"], "RecordingUnavailable", "{}", r.text);
    let out = hatch(&relay, home.path(), key).args(["exec", "-i", &iid, "--", "true"]).output();
    let out = out.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("RecordingUnavailable"), "{err}");
    // Sessions of an account that does not record are not affected.
    set_recording(&relay, "off").await;
    let out = hatch(&relay, home.path(), key).args(["exec", "-i", &iid, "--", "true"]).output();
    assert_eq!(out.unwrap().status.code(), Some(0));
    drop(fs);
}
