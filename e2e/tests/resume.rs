//! Durable sessions with the real binaries over real TLS (issue 14): output is exact and
//! complete, and the remote process the same, whatever breaks between the client and the
//! agent — a relay killed or stopped and started again, connections cut mid-stream, a client
//! stopped past the dead-leg time, a client that joins late; and port sessions (`hatch proxy`)
//! whose forwarded bytes come through exact across the same breaks.

use std::process::Stdio;
use std::time::{Duration, Instant};

use hatch_e2e::*;

/// `seq 1 n` as it prints.
fn seq(n: u32) -> Vec<u8> {
    (1..=n).map(|i| format!("{i}\n")).collect::<String>().into_bytes()
}

/// Waits for a child's exit (60 s at most) and returns its status.
fn wait_child(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("hatch still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `hatch exec -i <iid> -- seq 1 300000` with its stdout read through a gate that stops at
/// 300 kB (so that the session is mid-stream, held by flow control, when `break_it` runs on
/// the relay), then released; returns the relay `break_it` gave back, the exit status, stdout
/// and stderr.
async fn seq_through<F, Fut>(
    relay: Relay,
    iid: &str,
    home: &std::path::Path,
    break_it: F,
) -> (Relay, std::process::ExitStatus, Vec<u8>, String)
where
    F: FnOnce(Relay) -> Fut,
    Fut: std::future::Future<Output = Relay>,
{
    let err_path = home.join("hatch.err");
    let mut cmd = hatch(&relay, home, &relay.info.access_key);
    // -v: the start line (with the session id) even though stderr is a file.
    cmd.args(["-v", "exec", "-i", iid, "--", "seq", "1", "300000"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().unwrap();
    let reader = GatedReader::start(child.stdout.take().unwrap(), 300_000);
    wait_for("300 kB of output", DEADLINE, || reader.len() >= 300_000).await;
    let relay = break_it(relay).await;
    reader.release();
    let st = tokio::task::spawn_blocking(move || wait_child(&mut child, Duration::from_secs(90)))
        .await
        .unwrap();
    let out = reader.finish();
    (relay, st, out, std::fs::read_to_string(&err_path).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_is_exact_across_a_relay_sigkill_and_restart() {
    let (relay, _agent, iid, home) = relay_and_agent(&[]).await;
    // Killed (SIGKILL), then started again on the same ports and data directory.
    let (_relay, st, out, err) =
        seq_through(relay, &iid, home.path(), |r| async move { r.restart() }).await;
    eprintln!("hatch stderr: {err}");
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(out == seq(300_000), "{} bytes, want {}", out.len(), seq(300_000).len());
    assert!(err.contains("reconnected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_is_exact_across_a_graceful_relay_restart() {
    let (relay, _agent, iid, home) = relay_and_agent(&["--drain", "1"]).await;
    let (relay, st, out, err) = seq_through(relay, &iid, home.path(), |mut old| async move {
        old.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let exited = old.proc.wait_exit(DEADLINE);
        assert!(exited.success(), "relay exit {exited}");
        old.restart()
    })
    .await;
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(out == seq(300_000), "{} bytes, want {}", out.len(), seq(300_000).len());
    // The record counts what went through both relays: the second one's counts add to what
    // the first recorded as it stopped (the output, plus a type byte per DATA message).
    let sid = err.split_whitespace().find(|w| w.starts_with("s-")).expect("session id");
    let rec = relay.closed_session(sid).await;
    assert_eq!(rec["close_reason"], "exit", "{rec}");
    let a2c = rec["bytes_agent_to_client"].as_u64().unwrap();
    assert!(a2c > seq(300_000).len() as u64, "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_is_exact_when_the_connections_are_cut_mid_stream() {
    let proxy = CutProxy::start().await;
    let public = format!("wss://127.0.0.1:{}", proxy.addr.port());
    let (relay, _agent, iid, home) = relay_and_agent(&["--public-data-url", &public]).await;
    proxy.set_target(relay.data_addr());
    let (_relay, st, out, err) = seq_through(relay, &iid, home.path(), |r| async {
        // Both legs (client and agent) go through the proxy: both are cut, twice.
        assert_eq!(proxy.cut_all(), 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.cut_all();
        r
    })
    .await;
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(out == seq(300_000), "{} bytes, want {}", out.len(), seq(300_000).len());
    assert!(err.contains("reconnected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stopped_past_the_dead_leg_time_resumes_with_no_byte_lost() {
    let (relay, _agent, iid, home) =
        relay_and_agent(&["--ping-interval", "1", "--dead-after", "3"]).await;
    let err_path = home.path().join("hatch.err");
    let mut cmd = hatch(&relay, home.path(), &relay.info.access_key);
    // Without a terminal: pipes, so `cat` echoes exactly what it reads.
    cmd.args(["-v", "exec", "-i", &iid, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let reader = GatedReader::start(child.stdout.take().unwrap(), usize::MAX);
    use std::io::Write;
    stdin.write_all(b"before the stop\n").unwrap();
    wait_for("the first line echoed", DEADLINE, || reader.len() >= 16).await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Stopped well past the relay's dead-leg time (3 s): the relay drops its leg.
    tokio::time::sleep(Duration::from_secs(6)).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    stdin.write_all(b"after the stop\n").unwrap();
    drop(stdin);
    let st = tokio::task::spawn_blocking(move || wait_child(&mut child, Duration::from_secs(60)))
        .await
        .unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    eprintln!("agent log: {}", _agent.output());
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&reader.finish()),
        "before the stop\nafter the stop\n",
        "{err}"
    );
    assert!(err.contains("reconnected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_whose_client_joins_10_s_late_still_gets_all_its_output() {
    let (relay, _agent, iid, _home) = relay_and_agent(&[]).await;
    let body = format!(r#"{{"instance_id":"{iid}","mode":"exec","command":["seq","1","100000"]}}"#);
    let r = relay.call("POST", "/v1/sessions", Some(&relay.info.access_key), Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    // The agent starts the command at once; the client's leg comes 10 s later.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut ws = leg(&relay, v["stream_url"].as_str().unwrap(), v["token"].as_str().unwrap())
        .await
        .expect("client leg refused");
    let (out, exit, close) = read_session(&mut ws).await;
    assert!(out == seq(100_000), "{} bytes, want {}", out.len(), seq(100_000).len());
    assert_eq!((exit, close), (Some(0), Some(1000)));
}

/// A `hatch` process (session or attach) with stdin and stdout piped and stderr in a file.
struct Cli {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: GatedReader,
    err: std::path::PathBuf,
}

impl Cli {
    fn spawn(relay: &Relay, home: &std::path::Path, args: &[&str], name: &str) -> Cli {
        let err = home.join(format!("{name}.err"));
        let mut cmd = hatch(relay, home, &relay.info.access_key);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let out = GatedReader::start(child.stdout.take().unwrap(), usize::MAX);
        Cli { child, stdin, out, err }
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Asks the shell for its pid (a marker unique to `tag`) and waits for the answer.
    async fn shell_pid(&mut self, tag: &str) -> u32 {
        self.type_line(&format!("echo {tag}=$$ end\n"));
        let needle = format!("{tag}=");
        let out = &self.out;
        let mut pid = None;
        wait_for("the shell's pid", DEADLINE, || {
            let text = String::from_utf8_lossy(&out.got.lock().unwrap()).into_owned();
            pid = text.rfind(&needle).and_then(|i| {
                let rest = &text[i + needle.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                rest[digits.len()..].starts_with(" end").then(|| digits.parse().ok()).flatten()
            });
            pid.is_some()
        })
        .await;
        pid.unwrap()
    }

    async fn exit(mut self) -> (std::process::ExitStatus, String) {
        drop(self.stdin.take());
        let mut child = self.child;
        let st =
            tokio::task::spawn_blocking(move || wait_child(&mut child, DEADLINE)).await.unwrap();
        let err = std::fs::read_to_string(&self.err).unwrap_or_default();
        (st, err)
    }
}

/// The session id `hatch` printed on stderr ("Starting session s-... on i-...").
async fn session_id_of(cli: &Cli) -> String {
    let mut sid = None;
    wait_for("the session id on stderr", DEADLINE, || {
        sid = cli.stderr().split_whitespace().find(|w| w.starts_with("s-")).map(str::to_owned);
        sid.is_some()
    })
    .await;
    sid.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_is_replaced_by_hatch_attach_with_the_same_shell() {
    let (relay, _agent, iid, home) = relay_and_agent(&[]).await;
    let mut first = Cli::spawn(&relay, home.path(), &["session", "-i", &iid], "first");
    let sid = session_id_of(&first).await;
    let pid = first.shell_pid("before").await;
    // The client process is killed: the session waits for another.
    first.child.kill().unwrap();
    let _ = first.child.wait();
    // Attached from a new process: the same shell.
    let mut second = Cli::spawn(&relay, home.path(), &["attach", &sid], "second");
    assert_eq!(second.shell_pid("after").await, pid, "{}", second.stderr());
    // A third without --force is refused while the second is attached...
    let third = Cli::spawn(&relay, home.path(), &["attach", &sid], "third");
    let (st, err) = third.exit().await;
    assert_ne!(st.code(), Some(0));
    assert!(err.contains("SessionAttached"), "{err}");
    // ... and with it takes over: the second is detached with 4014 and ends.
    let mut fourth = Cli::spawn(&relay, home.path(), &["attach", "--force", &sid], "fourth");
    assert_eq!(fourth.shell_pid("taken").await, pid, "{}", fourth.stderr());
    let (st, err) = second.exit().await;
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("AttachedElsewhere"), "{err}");
    fourth.type_line("exit 3\n");
    let (st, err) = fourth.exit().await;
    assert_eq!(st.code(), Some(3), "{err}");
    // The session has ended: attach says so.
    let late = Cli::spawn(&relay, home.path(), &["attach", &sid], "late");
    let (st, err) = late.exit().await;
    assert_ne!(st.code(), Some(0));
    assert!(err.contains("SessionEnded"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_after_the_resume_window_is_refused_with_session_ended() {
    let (relay, _agent, iid, home) = relay_and_agent(&["--resume-window", "2"]).await;
    let mut first = Cli::spawn(&relay, home.path(), &["session", "-i", &iid], "first");
    let sid = session_id_of(&first).await;
    first.shell_pid("before").await;
    first.child.kill().unwrap();
    let _ = first.child.wait();
    let end = Instant::now() + DEADLINE;
    loop {
        let s = relay.session(&sid).await;
        if s["state"] == "closed" {
            assert_eq!(s["close_reason"], "client_lost", "{s}");
            break;
        }
        assert!(Instant::now() < end, "still {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let late = Cli::spawn(&relay, home.path(), &["attach", &sid], "late");
    let (st, err) = late.exit().await;
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("SessionEnded"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_keeps_its_pid_across_a_relay_restart() {
    let (relay, _agent, iid, home) = relay_and_agent(&[]).await;
    let mut cli = Cli::spawn(&relay, home.path(), &["session", "-i", &iid], "shell");
    let pid = cli.shell_pid("before").await;
    // Killed and started again; the client and the agent come back by themselves.
    let _relay = relay.restart();
    assert_eq!(cli.shell_pid("after").await, pid, "{}", cli.stderr());
    cli.type_line("exit 7\n");
    let (st, err) = cli.exit().await;
    assert_eq!(st.code(), Some(7), "{err}");
    assert!(err.contains("reconnected"), "{err}");
}

/// A TCP server on the instance side (loopback), one thread per connection.
fn instance_server(serve: impl Fn(std::net::TcpStream) + Send + Sync + Clone + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for sock in listener.incoming().map_while(Result::ok) {
            let serve = serve.clone();
            std::thread::spawn(move || serve(sock));
        }
    });
    port
}

/// `hatch proxy` to `port` on the instance, its stdin fed with `input` on a thread, its stdout
/// read through a gate that stops at `pause_at` bytes.
fn proxy_cli(
    relay: &Relay,
    home: &std::path::Path,
    iid: &str,
    port: u16,
    input: Vec<u8>,
    pause_at: usize,
) -> Proxied {
    let err = home.join("proxy.err");
    let remote = format!("127.0.0.1:{port}");
    let mut cmd = hatch(relay, home, &relay.info.access_key);
    cmd.args(["proxy", "-i", iid, "--remote", &remote])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        // Ends with the pipe's end: EOF, a FIN to the instance's side.
        let _ = stdin.write_all(&input);
    });
    let out = GatedReader::start(child.stdout.take().unwrap(), pause_at);
    Proxied { child, out, err }
}

/// A running `hatch proxy` ([`proxy_cli`]).
struct Proxied {
    child: std::process::Child,
    out: GatedReader,
    err: std::path::PathBuf,
}

impl Proxied {
    /// Opens the gate and waits (90 s at most): the exit status, all of stdout, stderr.
    async fn finish(self) -> (std::process::ExitStatus, Vec<u8>, String) {
        let Proxied { mut child, out, err } = self;
        out.release();
        let st =
            tokio::task::spawn_blocking(move || wait_child(&mut child, Duration::from_secs(90)))
                .await
                .unwrap();
        (st, out.finish(), std::fs::read_to_string(&err).unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_download_is_exact_across_a_relay_sigkill_and_restart() {
    // 24 MiB from a server on the instance through `hatch proxy`; the relay is killed and
    // started again while the stream is held mid-way by flow control.
    const SIZE: usize = 24 << 20;
    let (relay, _agent, iid, home) = relay_and_agent(&[]).await;
    let port = instance_server(|mut s| {
        use std::io::Write;
        let _ = s.write_all(&noise(SIZE, 7));
    });
    let proxied = proxy_cli(&relay, home.path(), &iid, port, Vec::new(), 4 << 20);
    wait_for("4 MiB through the forward", DEADLINE, || proxied.out.len() >= 4 << 20).await;
    let _relay = relay.restart();
    let (st, got, err) = proxied.finish().await;
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(got == noise(SIZE, 7), "{} bytes, want {SIZE}", got.len());
    assert!(err.contains("reconnected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_bytes_are_exact_both_ways_when_the_connections_are_cut_mid_stream() {
    // 8 MiB up to an echo server on the instance and back; both legs cut twice while the
    // echo is held mid-way: what comes back is what went up, in order.
    const SIZE: usize = 8 << 20;
    let proxy = CutProxy::start().await;
    let public = format!("wss://127.0.0.1:{}", proxy.addr.port());
    let (relay, _agent, iid, home) = relay_and_agent(&["--public-data-url", &public]).await;
    proxy.set_target(relay.data_addr());
    let port = instance_server(|s| {
        let mut r = s.try_clone().unwrap();
        let mut w = s;
        let _ = std::io::copy(&mut r, &mut w);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let input = noise(SIZE, 11);
    let proxied = proxy_cli(&relay, home.path(), &iid, port, input.clone(), 2 << 20);
    wait_for("2 MiB echoed", DEADLINE, || proxied.out.len() >= 2 << 20).await;
    assert_eq!(proxy.cut_all(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut_all();
    let (st, got, err) = proxied.finish().await;
    assert_eq!(st.code(), Some(0), "{err}");
    let first_diff = got.iter().zip(&input).position(|(a, b)| a != b);
    assert!(got == input, "{} bytes, want {SIZE}; first difference at {first_diff:?}", got.len());
    assert!(err.contains("reconnected"), "{err}");
}
