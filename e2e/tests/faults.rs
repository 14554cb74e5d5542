//! Faults with the real binaries as processes: `hatch-relay dev`, `hatch-agent run` (real
//! PTYs and shells) and `hatch exec`. A process is killed mid-session; the survivors report it
//! in words and exit codes, and the session record keeps the right close reason.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hatch_e2e::*;

/// `hatch exec` of a command that prints its shell's pid then waits; returns the process,
/// the session id and the remote pid once the first line arrived.
fn exec(relay: &Relay, dir: &Path, instance: &str) -> (std::process::Child, String, u32) {
    let mut child = Command::new(bin("hatch"))
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .env("HATCH_API", &relay.info.api_url)
        .env("HATCH_ACCESS_KEY", &relay.info.access_key)
        .env("HATCH_CA", &relay.info.ca_file)
        // -v: the start line (with the session id) on a piped stderr.
        .args(["-v", "exec", "--instance", instance, "--", "sh", "-c", "echo $$; exec sleep 120"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(("out", l));
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(("err", l));
        }
    });
    let (mut sid, mut pid) = (None, None);
    while sid.is_none() || pid.is_none() {
        let (k, l) = rx.recv_timeout(DEADLINE).expect("hatch exec did not start");
        if k == "err"
            && let Some(w) = l.split_whitespace().find(|w| w.starts_with("s-"))
        {
            sid = Some(w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned());
        }
        if k == "out"
            && let Ok(p) = l.trim().parse()
        {
            pid = Some(p);
        }
    }
    // Later stderr lines go to a file the test reads at the end.
    let log = dir.join("hatch.err");
    std::thread::spawn(move || {
        let mut all = String::new();
        while let Ok((_, l)) = rx.recv() {
            all.push_str(&l);
            all.push('\n');
            let _ = std::fs::write(&log, &all);
        }
    });
    (child, sid.unwrap(), pid.unwrap())
}

fn wait_child(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < end, "hatch did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn gone(pid: u32) -> bool {
    // A zombie is gone too: the shell has exited and only waits to be reaped.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn agent_killed_client_killed_and_relay_killed() {
    // Without a resume window: lost legs end their sessions, and a restart closes what the
    // killed relay left open (`relay_shutdown`, the agent's counts completing the record).
    let relay = Relay::start(&["--resume-window", "0"]);
    let tmp = tempfile::tempdir().unwrap();
    let (agent, iid) = start_agent(&relay, tmp.path(), &[]);
    wait_online(&relay, &iid, true).await;

    // 1. The agent process is killed mid-session: the client says so and exits 255.
    let (mut client, sid, shell) = exec(&relay, tmp.path(), &iid);
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    let st = wait_child(&mut client, DEADLINE);
    let lost_after = t0.elapsed();
    std::thread::sleep(Duration::from_millis(100)); // let the stderr reader flush its file
    let err = std::fs::read_to_string(tmp.path().join("hatch.err")).unwrap_or_default();
    eprintln!("agent killed: hatch exited {st:?} after {lost_after:?}: {err}");
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("agent connection lost"), "{err}");
    let rec = relay.closed_session(&sid).await;
    assert_eq!(rec["close_reason"], "agent_lost", "{rec}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shell as i32),
        nix::sys::signal::Signal::SIGKILL,
    );

    // 2. The client is killed mid-session: the agent hangs up the shell; `client_lost`.
    let (mut agent, _) = {
        let mut cmd = Command::new(bin("hatch-agent"));
        cmd.args(["run", "--state"]).arg(tmp.path().join("agent.json"));
        (Proc::spawn(cmd, &tmp.path().join("agent2.log")), ())
    };
    wait_online(&relay, &iid, true).await;
    let (mut client, sid, shell) = exec(&relay, tmp.path(), &iid);
    client.kill().unwrap();
    let _ = client.wait();
    let rec = relay.closed_session(&sid).await;
    eprintln!("client killed: record {rec}");
    assert_eq!(rec["close_reason"], "client_lost", "{rec}");
    assert!(rec["bytes_agent_to_client"].as_u64().unwrap() > 0, "{rec}");
    wait_for("the agent hangs up the shell", DEADLINE, || gone(shell)).await;

    // 3. The relay is killed with sessions live: the client exits 255; when the relay comes
    //    back on the same data directory and ports, the agent's control channel reconnects,
    //    and the agent's own byte counts of the sessions whose legs died complete their
    //    records, exactly. A second session, `cat` behind a WebSocket client leg of this test,
    //    carries a known number of bytes each way right before the kill: no wait for the data
    //    plane's 2 s progress tick.
    let (mut client, sid, shell) = exec(&relay, tmp.path(), &iid);
    let line = shell.to_string().len() as u64 + 2; // DATA type byte + "<pid>\n"
    let body = format!(r#"{{"instance_id":"{iid}","mode":"exec","command":["cat"]}}"#);
    let r = relay.call("POST", "/v1/sessions", Some(&relay.info.access_key), Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    let cat_sid = v["session_id"].as_str().unwrap().to_owned();
    let mut leg_c = leg(&relay, v["stream_url"].as_str().unwrap(), v["token"].as_str().unwrap())
        .await
        .expect("client leg refused");
    let mut sent = 0u64;
    for (i, n) in [1000usize, 5000, 37].into_iter().enumerate() {
        let mut m = vec![b'a' + i as u8; 1 + n];
        m[0] = 0x01; // DATA
        send_bin(&mut leg_c, &m).await;
        sent += m.len() as u64;
    }
    // cat echoes every data byte; the messages carrying them, and the acknowledgements of
    // the input riding with them, are what the agent sent.
    // The agent acknowledges with the output it sends, so the last echo is followed by the
    // acknowledgement of all 6037 bytes.
    let (mut echoed, mut received, mut acked) = (0u64, 0u64, 0u64);
    while echoed < 6037 || acked < 6037 {
        let m = recv_bin(&mut leg_c).await;
        received += m.len() as u64;
        if m[0] == 0x04 {
            acked = u64::from_be_bytes(m[1..9].try_into().unwrap());
            continue;
        }
        assert_eq!(m[0], 0x01, "{m:?}");
        echoed += m.len() as u64 - 1;
    }
    assert_eq!(echoed, 6037);
    let before = relay.session(&cat_sid).await;
    relay.proc.signal(nix::sys::signal::Signal::SIGKILL);
    eprintln!(
        "relay killed after {sent} bytes client → agent and {received} agent → client; \
         stored before the kill: {before}"
    );
    let st = wait_child(&mut client, DEADLINE);
    std::thread::sleep(Duration::from_millis(100));
    let err = std::fs::read_to_string(tmp.path().join("hatch.err")).unwrap_or_default();
    eprintln!("relay killed: hatch exited {st:?}: {err}");
    assert_eq!(st.code(), Some(255), "{err}");
    let relay = relay.restart();
    let t1 = Instant::now();
    wait_online(&relay, &iid, true).await;
    eprintln!("agent reconnected {:?} after the relay came back", t1.elapsed());
    // The restarted relay closed what the dead one left open (`relay_shutdown`); the agent's
    // `session.report`s, sent on its new control channel, bring the exact byte counts.
    let want = [(&sid, 0, line), (&cat_sid, sent, received)];
    let end = Instant::now() + DEADLINE;
    for (id, c2a, a2c) in want {
        let rec = loop {
            let rec = relay.session(id).await;
            let got = (&rec["bytes_client_to_agent"], &rec["bytes_agent_to_client"]);
            if got == (&c2a.into(), &a2c.into()) || Instant::now() > end {
                break rec;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!("session live when the relay was killed, after restart: {rec}");
        assert_eq!(
            (&rec["state"], &rec["close_reason"]),
            (&"closed".into(), &"relay_shutdown".into())
        );
        assert_eq!(rec["bytes_client_to_agent"], c2a, "{rec}");
        assert_eq!(rec["bytes_agent_to_client"], a2c, "{rec}");
    }
    wait_for("the agent hangs up the orphaned shell", DEADLINE, || gone(shell)).await;
    // And the restarted relay serves a fresh session through the reconnected agent.
    let (mut client, sid, _) = exec(&relay, tmp.path(), &iid);
    client.kill().unwrap();
    let _ = client.wait();
    assert_eq!(relay.closed_session(&sid).await["close_reason"], "client_lost");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).success(), "{}", agent.output());
}

#[tokio::test]
async fn relay_sigterm_closes_legs_with_4009_and_records_relay_shutdown() {
    // Without a resume window, a shutdown closes its sessions (with one, they stay open in the
    // store for the next start: relay/tests/control_serve.rs).
    let relay = Relay::start(&["--drain", "0", "--resume-window", "0"]);
    let tmp = tempfile::tempdir().unwrap();
    let (agent, iid) = start_agent(&relay, tmp.path(), &[]);
    wait_online(&relay, &iid, true).await;
    let (mut client, sid, _shell) = exec(&relay, tmp.path(), &iid);
    let mut relay = relay;
    relay.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let st = wait_child(&mut client, DEADLINE);
    std::thread::sleep(Duration::from_millis(100));
    let err = std::fs::read_to_string(tmp.path().join("hatch.err")).unwrap_or_default();
    eprintln!("relay SIGTERM: hatch exited {st:?}: {err}");
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("4009") && err.contains("shutting down"), "{err}");
    let rst = relay.proc.wait_exit(DEADLINE);
    assert!(rst.success(), "relay exit {rst:?}");
    // The record, read by the restarted relay: relay_shutdown with the bytes that went through.
    let relay = relay.restart();
    let rec = relay.session(&sid).await;
    eprintln!("after SIGTERM: {rec}");
    assert_eq!(rec["close_reason"], "relay_shutdown", "{rec}");
    assert!(rec["bytes_agent_to_client"].as_u64().unwrap() > 0, "{rec}");
    // The agent came back too, and the relay serves it.
    wait_online(&relay, &iid, true).await;
    let (mut client, sid, _) = exec(&relay, tmp.path(), &iid);
    client.kill().unwrap();
    let _ = client.wait();
    assert_eq!(relay.closed_session(&sid).await["close_reason"], "client_lost");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
}

#[tokio::test]
async fn agent_sigterm_mid_session_is_told_as_the_agent_shutting_down() {
    let relay = Relay::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (mut agent, iid) = start_agent(&relay, tmp.path(), &[]);
    wait_online(&relay, &iid, true).await;
    let (mut client, sid, _shell) = exec(&relay, tmp.path(), &iid);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let st = wait_child(&mut client, DEADLINE);
    std::thread::sleep(Duration::from_millis(100)); // let the stderr reader flush its file
    let err = std::fs::read_to_string(tmp.path().join("hatch.err")).unwrap_or_default();
    eprintln!("agent SIGTERM: hatch exited {st:?}: {err}");
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(
        err.contains(&format!(
            "hatch: AgentShutdown (close 4011): the agent on {iid} is shutting down; start the \
             session again once `hatch instances` shows the instance online"
        )),
        "{err}"
    );
    let rec = relay.closed_session(&sid).await;
    assert_eq!(rec["close_reason"], "agent_closed", "{rec}");
    assert!(agent.wait_exit(DEADLINE).success(), "{}", agent.output());
}

#[tokio::test]
async fn a_run_as_user_that_does_not_exist_is_refused_in_words_and_recorded_error() {
    let relay = Relay::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (_agent, iid) = start_agent(&relay, tmp.path(), &[]);
    wait_online(&relay, &iid, true).await;
    // Several times: the agent may refuse before or after the client leg arrives.
    for _ in 0..3 {
        let out = Command::new(bin("hatch"))
            .env("HOME", tmp.path())
            .env("XDG_CONFIG_HOME", tmp.path())
            .env("HATCH_API", &relay.info.api_url)
            .env("HATCH_ACCESS_KEY", &relay.info.access_key)
            .env("HATCH_CA", &relay.info.ca_file)
            .args(["-v", "exec", "--instance", &iid, "--user", "nosuchuser-e2e", "--", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("--user nosuchuser-e2e: hatch exited {:?}: {err}", out.status);
        // Its own close code and exit status (EX_NOUSER), not a generic refusal.
        assert_eq!(out.status.code(), Some(67), "{err}");
        assert!(err.contains("nosuchuser-e2e"), "the agent's reason: {err}");
        assert!(
            err.contains(&format!(
                "hatch: RunAsUnavailable (close 4016): the agent on {iid} cannot run the session \
                 as the user asked for"
            )),
            "{err}"
        );
        let sid = err.split_whitespace().find(|w| w.starts_with("s-")).expect("session id");
        let rec = relay.closed_session(sid).await;
        assert_eq!(rec["close_reason"], "error", "{rec}");
    }
}

/// `hatch-relay serve` with its data directory at `data` and a development certificate kept
/// outside it (so that the store is the first thing the relay writes there).
fn serve(data: &Path, pki: &hatch_relay::certs::DevPki, log: &Path) -> Proc {
    let mut cmd = Command::new(bin("hatch-relay"));
    cmd.args(["serve", "--data-dir"]).arg(data);
    cmd.arg("--cert").arg(&pki.cert_file).arg("--key").arg(&pki.key_file);
    cmd.args(["--api-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0", "--shards", "1"]);
    cmd.args(io_args());
    cmd.env("HATCH_LOG", "info");
    Proc::spawn(cmd, log)
}

/// Starts the relay on `data` expecting it to refuse: it exits 1 within [`DEADLINE`], without a
/// panic, and its message names the store file and contains `says`.
fn refuses_to_start(case: &str, data: &Path, pki: &hatch_relay::certs::DevPki, says: &str) {
    let log = pki.ca_file.with_file_name(format!("{case}.log"));
    let t0 = Instant::now();
    let mut relay = serve(data, pki, &log);
    let st = relay.wait_exit(DEADLINE);
    let out = relay.output();
    eprintln!("{case}: {st} after {:?}: {}", t0.elapsed(), out.trim());
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    let store = data.join("hatch.db").display().to_string();
    assert!(out.contains(&format!("store file {store}")), "message does not name {store}: {out}");
    assert!(out.contains(says), "expected {says:?}: {out}");
}

/// A first, successful start of the relay on `data` (creating its store), then SIGTERM.
fn first_start(data: &Path, pki: &hatch_relay::certs::DevPki) {
    // A log of its own: the readiness line of an earlier start must not count.
    let log = pki.ca_file.with_file_name("first.log");
    let _ = std::fs::remove_file(&log);
    let mut relay = serve(data, pki, &log);
    let end = Instant::now() + DEADLINE;
    while !relay.output().contains("relay listening") {
        assert!(relay.child.try_wait().unwrap().is_none(), "relay died: {}", relay.output());
        assert!(Instant::now() < end, "relay did not start: {}", relay.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_io_backend(&relay.output());
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(relay.wait_exit(DEADLINE).success(), "{}", relay.output());
    assert!(data.join("hatch.db").exists());
}

#[test]
fn relay_refuses_to_start_on_a_read_only_or_full_store_naming_the_file() {
    let tls = tempfile::tempdir().unwrap();
    let pki = hatch_relay::certs::ensure_dev_pki(tls.path(), &[]).unwrap();

    // (a) A store that the relay created, then its file system remounted read-only (root
    //     ignores file modes, so only a read-only mount shows this).
    let Some(fs) = Tmpfs::mount("1m") else { return };
    let data = fs.path().join("data");
    first_start(&data, &pki);
    let empty = fs.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fs.remount("ro");
    refuses_to_start(
        "read-only",
        &data,
        &pki,
        "is not writable by this process: Read-only file system",
    );
    // ... and a read-only data directory with no store in it yet.
    refuses_to_start(
        "read-only, no store yet",
        &empty,
        &pki,
        "cannot be created by this process: Read-only file system",
    );
    drop(fs);

    // (b) The disk full before the relay's first start: a 64 KiB tmpfs filled to the brim.
    let Some(fs) = Tmpfs::mount("64k") else { return };
    let data = fs.path().join("data");
    std::fs::create_dir(&data).unwrap();
    fs.fill();
    refuses_to_start(
        "full before the first start",
        &data,
        &pki,
        "no space left on the file system",
    );
    drop(fs);

    // (c) A valid store (made by a first start), then the disk filled, then the relay started.
    let Some(fs) = Tmpfs::mount("1m") else { return };
    let data = fs.path().join("data");
    first_start(&data, &pki);
    fs.fill();
    refuses_to_start("full after a first start", &data, &pki, "no space left on the file system");
    // Space freed: the same store opens again (the refusal broke nothing).
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    first_start(&data, &pki);
}
