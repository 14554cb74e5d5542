//! Startup of the real `hatch-relay`: a SIGTERM sent the instant a readiness line appears takes
//! the drain path (exit 0, the drain and the store update logged), never the default action.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hatch_e2e::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Starts `hatch-relay <args>`, sends SIGTERM as soon as a stderr line contains `on_line`, and
/// returns (exit status, everything it wrote).
fn term_on_line(args: &[String], on_line: &str) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(bin("hatch-relay"))
        .args(args)
        .args(io_args())
        .env("HATCH_LOG", "info")
        // No colour: the lines are matched as text.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning hatch-relay");
    let pid = Pid::from_raw(child.id() as i32);
    let stderr = child.stderr.take().expect("piped stderr");
    // Read on a thread so that the signal goes out the moment the line arrives; the thread also
    // keeps reading after it, so the relay never blocks on a full pipe.
    let (line_tx, line_rx) = std::sync::mpsc::channel::<()>();
    let wanted = on_line.to_owned();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&wanted) {
                let _ = kill(pid, Signal::SIGTERM);
                sent = true;
                let _ = line_tx.send(());
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    });
    let end = Instant::now() + DEADLINE + DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hatch-relay {args:?} still running {:?} after SIGTERM", DEADLINE + DEADLINE);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = reader.join().unwrap();
    assert!(line_rx.try_recv().is_ok(), "no line with {on_line:?} before exit:\n{out}");
    (status, out)
}

#[test]
fn sigterm_on_the_readiness_line_drains_both_commands() {
    const ROUNDS: usize = 12;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relay").display().to_string();
    let args = |cmd: &str| -> Vec<String> {
        let mut a = vec![cmd.to_owned(), "--data-dir".into(), dir.clone()];
        for x in ["--api-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0", "--shards", "1"] {
            a.push(x.into());
        }
        if cmd == "serve" {
            // The development PKI that the first `dev` round created.
            a.extend(["--cert".into(), format!("{dir}/tls/server.pem")]);
            a.extend(["--key".into(), format!("{dir}/tls/server-key.pem")]);
        }
        a
    };
    // Both commands; SIGTERM on the first readiness line (the data plane's, logged before the
    // API listens) and on the relay's own.
    for round in 0..ROUNDS {
        let cmd = if round % 2 == 0 { "dev" } else { "serve" };
        let line = if round % 4 < 2 { "data plane listening" } else { "relay listening" };
        let (status, out) = term_on_line(&args(cmd), line);
        let what = format!("round {round}: `hatch-relay {cmd}` signalled on {line:?}");
        // Before the handlers came first, the default action killed it: "signal: 15".
        assert_eq!(status.code(), Some(0), "{what} ended {status}:\n{out}");
        // The drain path: the API stopped, the data plane drained, the store updated.
        for step in ["stop requested; draining", "relay shutting down", "recorded open sessions"] {
            assert!(out.contains(step), "{what}: no {step:?} line:\n{out}");
        }
    }
}
