//! End to end: a real relay (`hatch_relay::dev::DevRelay`: HTTPS API, WSS data plane, SQLite,
//! dev PKI), a real agent (registered with the demo activation, spawning real PTYs), and the
//! real `hatch` binary — interactive sessions on a real terminal driven by tmux, `exec` in
//! pipelines.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hatch_relay::dev::{DevOptions, DevRelay};
use support::{run, stderr, stdout};
use tokio_util::sync::CancellationToken;

/// Every wait in these tests ends within this.
const DEADLINE: Duration = Duration::from_secs(30);

struct Agent {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    instance_id: String,
}

impl Agent {
    fn start(relay: &DevRelay, dir: &Path) -> Agent {
        let state = dir.join("agent.json");
        let info = relay.info.clone();
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let state2 = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                hatch_agent::cli::register_command(hatch_agent::cli::RegisterArgs {
                    api: info.api_url.clone(),
                    activation_id: info.activation_id.clone(),
                    activation_code: info.activation_code.clone(),
                    ca: Some(PathBuf::from(&info.ca_file)),
                    state: state2.clone(),
                    force: true,
                })
                .await
                .unwrap();
                let state = hatch_agent::state::State::load(&state2).unwrap();
                tx.send(state.instance_id.clone()).unwrap();
                let tls = hatch_agent::tls::client_config(state.ca_pem.as_deref(), false).unwrap();
                let (timing, session_timing) = hatch_agent::cli::fast_timing();
                let cfg = hatch_agent::control::RunConfig {
                    session: hatch_agent::session::SessionConfig {
                        tls: tls.clone(),
                        allow_plaintext: false,
                        timing: session_timing,
                        link: Default::default(),
                        allow_forward: Default::default(),
                    },
                    state,
                    api_urls: Vec::new(),
                    tls,
                    timing,
                    max_sessions: 64,
                    identity: hatch_agent::session::identity(None).unwrap(),
                };
                let _ = hatch_agent::control::run(cfg, stop2).await;
            });
        });
        let instance_id = rx.recv_timeout(DEADLINE).expect("agent registered");
        Agent { stop, thread: Some(thread), instance_id }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct World {
    agent: Agent,
    relay: DevRelay,
    home: tempfile::TempDir,
}

impl World {
    fn start() -> World {
        Self::start_with(&[])
    }

    /// A world whose data plane gets these extra flags (`--idle-timeout 1`, ...).
    fn start_with(data_args: &[&str]) -> World {
        let home = tempfile::tempdir().unwrap();
        let relay = DevRelay::start(DevOptions {
            data_dir: home.path().join("relay"),
            data_args: data_args.iter().map(|a| a.to_string()).collect(),
            ..DevOptions::default()
        })
        .unwrap();
        let agent = Agent::start(&relay, home.path());
        let world = World { agent, relay, home };
        world.wait_online();
        world
    }

    fn instance(&self) -> &str {
        &self.agent.instance_id
    }

    /// `hatch` with this world's settings in the environment.
    fn hatch(&self) -> Command {
        let mut cmd = support::hatch(self.home.path());
        cmd.env("HATCH_API", &self.relay.info.api_url)
            .env("HATCH_ACCESS_KEY", &self.relay.info.access_key)
            .env("HATCH_CA", &self.relay.info.ca_file);
        cmd
    }

    /// The shell line that runs `hatch` with this world's settings.
    fn hatch_line(&self, args: &str) -> String {
        format!(
            "HATCH_API={} HATCH_ACCESS_KEY={} HATCH_CA={} {} {args}",
            self.relay.info.api_url,
            self.relay.info.access_key,
            self.relay.info.ca_file,
            env!("CARGO_BIN_EXE_hatch"),
        )
    }

    fn wait_online(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut cmd = self.hatch();
            cmd.args(["instances", "--json"]);
            let out = run(cmd);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let online = v["instances"].as_array().into_iter().flatten().any(|i| {
                    i["instance_id"] == self.instance() && i["online"] == serde_json::json!(true)
                });
                if online {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "agent never came online: {}", stderr(&out));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A tmux server of its own (socket in a temp dir) with one window running `command` on a real
/// PTY of `cols` × `rows`.
struct Tmux {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    fn start(command: &str, cols: u16, rows: u16) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux.sock");
        let t = Tmux { socket, _dir: dir };
        let status = t
            .cmd()
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x"])
            .arg(cols.to_string())
            .arg("-y")
            .arg(rows.to_string())
            .arg(command)
            .status()
            .expect("tmux is installed (apt-get install tmux)");
        assert!(status.success());
        assert!(
            t.cmd().args(["set-option", "-g", "window-size", "manual"]).status().unwrap().success()
        );
        assert!(
            t.cmd().args(["set-option", "-g", "remain-on-exit", "on"]).status().unwrap().success()
        );
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket).stdin(Stdio::null()).stdout(Stdio::piped());
        c
    }

    fn send(&self, keys: &[&str]) {
        assert!(self.cmd().args(["send-keys", "-t", "t"]).args(keys).status().unwrap().success());
    }

    /// Types text literally (no key-name lookup).
    fn type_text(&self, text: &str) {
        assert!(self.cmd().args(["send-keys", "-t", "t", "-l", text]).status().unwrap().success());
    }

    fn screen(&self) -> String {
        let out = self.cmd().args(["capture-pane", "-p", "-J", "-t", "t"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the screen until `pred` holds; panics with the screen at the deadline.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "waiting for {what}; screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&self, cols: u16, rows: u16) {
        let status = self
            .cmd()
            .args(["resize-window", "-t", "t", "-x"])
            .arg(cols.to_string())
            .arg("-y")
            .arg(rows.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Tmux {
    fn format(&self, format: &str) -> String {
        let out = self.cmd().args(["display-message", "-p", "-t", "t", format]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The process the pane runs (the shell).
    fn pane_pid(&self) -> u32 {
        self.format("#{pane_pid}").parse().expect("pane pid")
    }

    /// `stty -a` of the pane's terminal, read from outside (as the user's terminal has it).
    fn modes(&self) -> String {
        let tty = self.format("#{pane_tty}");
        let out = Command::new("stty").args(["-a", "-F", &tty]).output().unwrap();
        assert!(out.status.success(), "stty -F {tty}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the pane's terminal modes until `pred` holds; panics with them at the deadline.
    fn wait_modes(&self, what: &str, pred: impl Fn(&Modes) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let modes = self.modes();
            if pred(&Modes(&modes)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {what}; modes:\n{modes}\nscreen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `stty -a` output, asked about single flags (`icanon` on, `-icanon` off).
struct Modes<'a>(&'a str);

impl Modes<'_> {
    fn has(&self, flag: &str) -> bool {
        self.0.split_whitespace().any(|w| w == flag)
    }

    /// Line editing, local echo and Ctrl-C as a signal: what a shell's prompt expects.
    fn cooked(&self) -> bool {
        self.has("icanon") && self.has("echo") && self.has("isig")
    }

    /// What `hatch` sets: no line editing, no local echo, Ctrl-C and Ctrl-Z are bytes.
    fn raw(&self) -> bool {
        self.has("-icanon") && self.has("-echo") && self.has("-isig")
    }
}

/// The one child of `pid` (the `hatch` a shell runs).
fn child_of(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children.split_whitespace().next().expect("hatch is running").parse().unwrap()
}

/// The process state letter of `/proc/PID/stat` (`T` stopped, `S` sleeping, ...), if it exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

fn kill(signal: &str, pid: u32) {
    let st = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill {signal} {pid}");
}

fn wait_state(pid: u32, what: &str, pred: impl Fn(Option<char>) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !pred(proc_state(pid)) {
        assert!(Instant::now() < deadline, "hatch ({pid}) never {what}: {:?}", proc_state(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Types `sleep 100` and Ctrl-C, then a command: only if Ctrl-C reached the remote shell as a
/// byte (raw mode) does the command's output appear within the deadline, and `hatch` lives on.
fn ctrl_c_reaches_the_remote(tmux: &Tmux, hatch: u32) {
    tmux.type_text("sleep 100");
    tmux.send(&["Enter"]);
    tmux.wait_for("the remote echo of sleep", |s| {
        s.lines().any(|l| l.trim_end().ends_with("sleep 100"))
    });
    std::thread::sleep(Duration::from_millis(300)); // let the remote shell start sleep
    tmux.send(&["C-c"]);
    tmux.type_text("echo alive-$((1+2))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the remote shell after Ctrl-C", |s| has_line(s, "alive-3"));
    assert!(proc_state(hatch).is_some_and(|c| c != 'Z'), "hatch died on Ctrl-C");
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// Asks the remote shell for its size (`stty size`) until it prints `rows_cols`: a resize
/// reaches the remote PTY asynchronously.
fn remote_size_becomes(tmux: &Tmux, rows_cols: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        tmux.type_text("clear; stty size");
        tmux.send(&["Enter"]);
        std::thread::sleep(Duration::from_millis(200));
        if has_line(&tmux.screen(), rows_cols) {
            return;
        }
        assert!(Instant::now() < deadline, "size never became {rows_cols}:\n{}", tmux.screen());
    }
}

fn has_line(screen: &str, line: &str) -> bool {
    screen.lines().any(|l| l.trim_end() == line)
}

/// Waits for a file the shell in tmux writes when `hatch` exits; returns its trimmed content.
fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "{} never written", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `hatch session` in tmux between two `stty -g` snapshots; the status lands in `status`.
fn interactive(world: &World, cols: u16, rows: u16) -> (Tmux, PathBuf) {
    let dir = world.home.path();
    let status = dir.join(format!("status-{}", rand_suffix()));
    let line = format!(
        "stty -g > {s}.before; {hatch}; echo $? > {s}.tmp; stty -g > {s}.after; mv {s}.tmp {s}; \
         sleep 60",
        s = status.display(),
        hatch = world.hatch_line(&format!("session --instance {}", world.instance())),
    );
    let tmux = Tmux::start(&format!("sh -c '{line}'"), cols, rows);
    (tmux, status)
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn assert_terminal_restored(status: &Path) {
    let before = std::fs::read_to_string(status.with_extension("before")).unwrap();
    let after = std::fs::read_to_string(status.with_extension("after")).unwrap();
    assert_eq!(before, after, "terminal modes after hatch differ from before");
}

#[test]
fn shell_session_on_a_real_terminal() {
    let world = World::start();
    let (tmux, status) = interactive(&world, 80, 24);
    tmux.wait_for("the start line", |s| s.contains("Starting session s-"));

    tmux.type_text("echo $((6*7))");
    tmux.send(&["Enter"]);
    tmux.wait_for("42", |s| has_line(s, "42"));

    tmux.type_text("stty size");
    tmux.send(&["Enter"]);
    tmux.wait_for("the initial size", |s| has_line(s, "24 80"));

    tmux.resize(100, 30);
    remote_size_becomes(&tmux, "30 100");

    tmux.type_text("exit 3");
    tmux.send(&["Enter"]);
    assert_eq!(wait_file(&status), "3");
    assert_terminal_restored(&status);
}

#[test]
fn tilde_dot_disconnects_with_255_and_restores_the_terminal() {
    let world = World::start();
    let (tmux, status) = interactive(&world, 80, 24);
    tmux.wait_for("the start line", |s| s.contains("Starting session s-"));
    tmux.type_text("echo ready-$((1+1))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the shell", |s| has_line(s, "ready-2"));

    // `~~` sends one `~`; `~?` prints the escapes locally.
    tmux.type_text("~~");
    tmux.type_text("/x; echo tilde-ok\r");
    tmux.wait_for("the literal tilde", |s| s.contains("tilde-ok"));
    tmux.type_text("~?");
    tmux.wait_for("the escape list", |s| s.contains("~.  - terminate connection"));

    // `~^Z` without a job-control shell (`sh -c`): nothing could continue a stopped hatch, so
    // it does not stop, as the kernel ignores Ctrl-Z there; the session goes on.
    tmux.send(&["Enter"]);
    tmux.type_text("~");
    tmux.send(&["C-z"]);
    tmux.wait_for("the suspend line", |s| s.contains("~^Z [suspend hatch]"));
    tmux.type_text("echo still-$((2+3))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the shell after ~^Z", |s| has_line(s, "still-5"));

    tmux.send(&["Enter"]);
    tmux.type_text("~.");
    assert_eq!(wait_file(&status), "255");
    assert_terminal_restored(&status);
    let screen = tmux.wait_for("the message", |s| s.contains("hatch: Disconnected"));
    assert!(screen.contains("connection closed by `~.`"), "{screen}");
}

#[test]
fn terminate_closes_the_session_with_words_and_255() {
    let world = World::start();
    let (tmux, status) = interactive(&world, 80, 24);
    let screen = tmux.wait_for("the start line", |s| s.contains("Starting session s-"));
    let sid = screen.split_whitespace().find(|w| w.starts_with("s-")).unwrap().to_owned();
    tmux.type_text("echo up-$((2+2))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the shell", |s| has_line(s, "up-4"));

    let mut cmd = world.hatch();
    cmd.args(["terminate", &sid]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    assert_eq!(wait_file(&status), "255");
    assert_terminal_restored(&status);
    let screen = tmux.wait_for("the reason", |s| s.contains("Terminated (close 4006)"));
    assert!(screen.contains("the session was terminated through the API"), "{screen}");
}

#[test]
fn exec_exits_with_the_remote_status() {
    let world = World::start();
    let mut cmd = world.hatch();
    cmd.args(["exec", "--instance", world.instance(), "--", "sh", "-c", "echo out; exit 9"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert!(stdout(&out).contains("out"), "{}", stdout(&out));
    // As `ssh host cmd`: stderr piped carries only the command's (here nothing).
    assert_eq!(stderr(&out), "");
}

#[test]
fn exec_pipes_ten_mebibytes_through_cat_unchanged() {
    let world = World::start();
    // Binary, all byte values, not a repetition the PTY line discipline could hide.
    let mut data = Vec::with_capacity(10 << 20);
    let mut x: u32 = 0x1234_5678;
    while data.len() < 10 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let mut cmd = world.hatch();
    cmd.args(["exec", "--instance", world.instance(), "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn({
        let data = data.clone();
        move || {
            use std::io::Write;
            stdin.write_all(&data).unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        assert!(Instant::now() < deadline, "hatch exec cat did not finish in 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = waiter.join().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), data.len(), "length differs");
    assert!(out.stdout == data, "bytes differ");
}

#[test]
fn real_relay_errors_give_their_exit_codes() {
    let world = World::start();
    // An instance that does not exist.
    let mut cmd = world.hatch();
    cmd.args(["exec", "--instance", "i-00000000000000ff", "--", "true"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(68), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("InstanceNotFound: no instance i-00000000000000ff"),
        "{}",
        stderr(&out)
    );

    // A bad access key.
    let mut cmd = world.hatch();
    cmd.env("HATCH_ACCESS_KEY", "hk_not-a-key").args(["sessions"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(stderr(&out).contains("InvalidToken"), "{}", stderr(&out));

    // The agent stops: TargetNotConnected with when it was last seen.
    let World { agent, relay, home } = world;
    let instance = agent.instance_id.clone();
    drop(agent);
    let world = World {
        agent: Agent {
            stop: CancellationToken::new(),
            thread: None,
            instance_id: instance.clone(),
        },
        relay,
        home,
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut cmd = world.hatch();
        cmd.args(["exec", "--instance", &instance, "--", "true"]);
        let out = run(cmd);
        if out.status.code() == Some(69) {
            let err = stderr(&out);
            assert!(
                err.contains(&format!("TargetNotConnected: agent on {instance} last seen ")),
                "{err}"
            );
            assert!(err.contains("is hatch-agent running and can it reach the relay?"), "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "never TargetNotConnected: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn session_works_when_stdin_is_not_a_terminal() {
    let world = World::start();
    let mut cmd = world.hatch();
    cmd.args(["session", "--instance", world.instance()]).stdin(Stdio::piped());
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo piped-$((20+22))\nexit 5\n").unwrap();
        // Dropped here: EOF on stdin must not end the session before the shell exits.
    }
    let deadline = Instant::now() + DEADLINE;
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        assert!(Instant::now() < deadline, "hatch session did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = waiter.join().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stdout(&out).contains("piped-42"), "{}", stdout(&out));
}

/// Runs `hatch exec` (stdin null) to its end within the deadline.
fn exec_output(world: &World, command: &[&str]) -> std::process::Output {
    let mut cmd = world.hatch();
    cmd.args(["exec", "--instance", world.instance(), "--"]).args(command);
    run(cmd)
}

#[test]
fn idle_timeout_is_reported_in_words_with_75() {
    let world = World::start_with(&["--idle-timeout", "1"]);
    let out = exec_output(&world, &["sleep", "20"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains(
            "hatch: IdleTimeout (close 4007): the session was closed after being idle too long"
        ),
        "{err}"
    );
}

#[test]
fn max_duration_is_reported_in_words_with_75() {
    let world = World::start_with(&["--max-duration", "1"]);
    let out = exec_output(&world, &["sleep", "20"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("hatch: MaxDuration (close 4008)"), "{err}");
}

#[test]
fn relay_going_away_mid_session_exits_255_in_words() {
    // Without a resume window the client does not wait for the relay to come back (with one,
    // it reconnects: e2e/tests/resume.rs).
    let world = World::start_with(&["--resume-window", "0"]);
    let (tmux, status) = interactive(&world, 80, 24);
    tmux.wait_for("the start line", |s| s.contains("Starting session s-"));
    tmux.type_text("echo live-$((3+4))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the shell", |s| has_line(s, "live-7"));
    let World { agent, relay, home } = world;
    drop(relay);
    assert_eq!(wait_file(&status), "255");
    assert_terminal_restored(&status);
    let screen = tmux.wait_for("the reason", |s| s.contains("hatch: "));
    assert!(
        screen.contains("RelayShutdown (close 4009)") || screen.contains("ConnectionLost"),
        "{screen}"
    );
    drop((agent, home));
}

#[test]
fn sigterm_mid_session_restores_the_terminal_and_exits_143() {
    let world = World::start();
    let (tmux, status) = interactive(&world, 80, 24);
    tmux.wait_for("the start line", |s| s.contains("Starting session s-"));
    tmux.type_text("echo term-$((5+5))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the shell", |s| has_line(s, "term-10"));

    // The pane runs `sh -c '...'`; hatch is its only child.
    let out = tmux.cmd().args(["list-panes", "-t", "t", "-F", "#{pane_pid}"]).output().unwrap();
    let sh = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap();
    let hatch: i32 = children.split_whitespace().next().expect("hatch is running").parse().unwrap();
    let killed = Command::new("kill").args(["-TERM", &hatch.to_string()]).status().unwrap();
    assert!(killed.success());

    assert_eq!(wait_file(&status), "143");
    assert_terminal_restored(&status);
    tmux.wait_for("the message", |s| s.contains("hatch: Signal: SIGTERM received"));
}

/// A job-control shell (`shell`, prompt `local$ `) in tmux that saved its terminal modes and
/// started `hatch session`; returns the tmux, the modes file prefix and hatch's pid once the
/// remote shell answers.
fn in_job_control_shell(world: &World, shell: &str) -> (Tmux, PathBuf, u32) {
    let tmux = Tmux::start(&format!("env PS1='local$ ' HISTFILE=/dev/null {shell}"), 80, 24);
    tmux.wait_for("the local prompt", |s| s.contains("local$"));
    let st = world.home.path().join(format!("modes-{}", rand_suffix()));
    tmux.type_text(&format!("stty -g > {}.before", st.display()));
    tmux.send(&["Enter"]);
    tmux.type_text(&world.hatch_line(&format!("session --instance {}", world.instance())));
    tmux.send(&["Enter"]);
    tmux.wait_for("the start line", |s| s.contains("Starting session s-"));
    tmux.type_text("echo ready-$((1+1))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the shell", |s| has_line(s, "ready-2"));
    let hatch = child_of(tmux.pane_pid());
    tmux.wait_modes("raw mode", |m| m.raw());
    (tmux, st, hatch)
}

/// Ends the remote shell with `exit CODE`; the local shell sees that status and finds its
/// terminal modes as it left them.
fn exit_in_job_control_shell(tmux: &Tmux, st: &Path, hatch: u32, code: u8) {
    tmux.type_text(&format!("exit {code}"));
    tmux.send(&["Enter"]);
    wait_state(hatch, "gone", |s| s.is_none_or(|c| c == 'Z'));
    tmux.type_text(&format!("echo st=$?; stty -g > {}.after", st.display()));
    tmux.send(&["Enter"]);
    tmux.wait_for("the exit status", |s| has_line(s, &format!("st={code}")));
    let before = std::fs::read_to_string(st.with_extension("before")).unwrap();
    let after = wait_file(&st.with_extension("after"));
    assert_eq!(before.trim(), after, "terminal modes after hatch differ from before");
}

#[test]
fn sigtstp_restores_the_terminal_and_fg_brings_raw_mode_and_the_new_size() {
    let world = World::start();
    // dash: job control, and it leaves the terminal modes to its jobs (bash would fix them).
    let (tmux, st, hatch) = in_job_control_shell(&world, "sh -i");

    // Stopped from outside (`kill -TSTP`): the user's terminal is usable while hatch is
    // stopped.
    kill("-TSTP", hatch);
    wait_state(hatch, "stopped", |s| s == Some('T'));
    tmux.wait_modes("cooked modes while hatch is stopped", |m| m.cooked());

    // Resized while stopped; `fg` continues it (SIGCONT): raw mode again, and the remote sees
    // the new size.
    tmux.resize(100, 30);
    tmux.type_text("fg");
    tmux.send(&["Enter"]);
    wait_state(hatch, "running", |s| s.is_some_and(|c| c != 'T'));
    tmux.wait_modes("raw mode after fg", |m| m.raw());
    remote_size_becomes(&tmux, "30 100");
    ctrl_c_reaches_the_remote(&tmux, hatch);
    exit_in_job_control_shell(&tmux, &st, hatch, 3);
}

#[test]
fn sigstop_sigcont_then_fg_in_bash_gets_raw_mode_back() {
    let world = World::start();
    let (tmux, st, hatch) = in_job_control_shell(&world, "bash --norc --noprofile --noediting -i");

    // SIGSTOP cannot be caught: bash sees the job stop and puts its own modes on the terminal;
    // SIGCONT from outside leaves the job in the background; `fg` brings it back.
    kill("-STOP", hatch);
    tmux.wait_for("bash's job report", |s| s.contains("Stopped"));
    tmux.wait_modes("bash's cooked modes", |m| m.cooked());
    kill("-CONT", hatch);
    tmux.type_text("fg");
    tmux.send(&["Enter"]);
    tmux.wait_modes("raw mode after fg", |m| m.raw());

    // Typed text reaches the remote shell once: echoed by it, not also by the local terminal.
    tmux.type_text("echo fg-$((4+4))");
    tmux.send(&["Enter"]);
    let screen = tmux.wait_for("the remote shell after fg", |s| has_line(s, "fg-8"));
    let echoed = screen.matches("echo fg-$((4+4))").count();
    assert_eq!(echoed, 1, "typed text echoed {echoed} times:\n{screen}");
    ctrl_c_reaches_the_remote(&tmux, hatch);
    exit_in_job_control_shell(&tmux, &st, hatch, 4);
}

#[test]
fn tilde_ctrl_z_suspends_and_fg_resumes() {
    let world = World::start();
    let (tmux, st, hatch) = in_job_control_shell(&world, "sh -i");
    tmux.send(&["Enter"]);
    tmux.type_text("~");
    tmux.send(&["C-z"]);
    tmux.wait_for("the suspend line", |s| s.contains("~^Z [suspend hatch]"));
    wait_state(hatch, "stopped", |s| s == Some('T'));
    tmux.wait_modes("cooked modes while suspended", |m| m.cooked());
    tmux.type_text("fg");
    tmux.send(&["Enter"]);
    tmux.wait_modes("raw mode after fg", |m| m.raw());
    tmux.type_text("echo back-$((3*3))");
    tmux.send(&["Enter"]);
    tmux.wait_for("the remote shell after fg", |s| has_line(s, "back-9"));
    exit_in_job_control_shell(&tmux, &st, hatch, 0);
}

#[test]
fn policy_and_account_switch_refusals_from_the_real_relay() {
    use hatch_relay::control::iam;
    use hatch_relay::control::store::{SqliteStore, Store};
    let world = World::start();
    let store =
        SqliteStore::open(&hatch_relay::server::store_path(&world.home.path().join("relay")))
            .unwrap();
    let account = world.relay.info.account_id.clone();
    let user = iam::create_user(&store, &account, "alice").unwrap();
    let (_, key) = iam::create_access_key(&store, &account, Some(&user.id)).unwrap();

    // A user without a policy.
    let mut cmd = world.hatch();
    cmd.env("HATCH_ACCESS_KEY", &key).args(["exec", "--instance", world.instance(), "--", "true"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "hatch: AccessDenied: your policy does not allow hatch:StartSession on {}; ask an \
             administrator\n",
            world.instance()
        )
    );

    // Port forwarding is its own action, with the destination as condition keys: allowed to
    // one port, a proxy to it carries bytes; to another port, or a shell, is refused.
    let echo = instance_server(|s| {
        let mut r = s.try_clone().unwrap();
        let mut w = s;
        let _ = std::io::copy(&mut r, &mut w);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let doc = format!(
        r#"{{"Statement":{{"Effect":"Allow","Action":"hatch:StartPortForwarding","Resource":"*",
            "Condition":{{"NumericEquals":{{"hatch:RemotePort":"{echo}"}}}}}}}}"#
    );
    iam::put_policy(&store, &account, "forward-only", &doc).unwrap();
    iam::attach_policy(&store, &account, &user.id, "forward-only").unwrap();
    let input = world.home.path().join("proxy-input");
    std::fs::write(&input, "ping\n").unwrap();
    let proxy = |port: u16| {
        let mut cmd = world.hatch();
        let remote = format!("127.0.0.1:{port}");
        cmd.env("HATCH_ACCESS_KEY", &key)
            .args(["proxy", "-i", world.instance(), "--remote", &remote])
            .stdin(std::fs::File::open(&input).unwrap());
        run(cmd)
    };
    let out = proxy(echo);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ping\n");
    let out = proxy(if echo == 1 { 2 } else { echo - 1 });
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "hatch: AccessDenied: your policy does not allow hatch:StartPortForwarding on {}; \
             ask an administrator\n",
            world.instance()
        )
    );
    let mut cmd = world.hatch();
    cmd.env("HATCH_ACCESS_KEY", &key).args(["exec", "--instance", world.instance(), "--", "true"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not allow hatch:StartSession"), "{}", stderr(&out));

    // The account switch off.
    assert!(store.set_session_manager(&account, false).unwrap());
    let out = exec_output(&world, &["true"]);
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(stderr(&out).contains("SessionManagerDisabled: session management is switched off"));
}

/// `hatch ARGS` as the world's owner, or with `key`; exit code, stdout, stderr.
fn hatch_as(world: &World, key: Option<&str>, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = world.hatch();
    if let Some(k) = key {
        cmd.env("HATCH_ACCESS_KEY", k);
    }
    cmd.args(args);
    let out = run(cmd);
    (out.status.code(), stdout(&out), stderr(&out))
}

/// `hatch ARGS --json` that must succeed, its stdout parsed.
fn hatch_json(world: &World, key: Option<&str>, args: &[&str]) -> serde_json::Value {
    let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let (code, out, err) = hatch_as(world, key, &args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

#[test]
fn iam_through_the_cli_against_the_real_relay() {
    let world = World::start();
    let owner = None;

    // As the owner, through the CLI only: a user, a policy that allows only hatch:ListUsers,
    // attached, and a key for the user.
    let user = hatch_json(&world, owner, &["users", "create", "alice"]);
    assert_eq!(user["name"], "alice");
    assert!(user["user_id"].as_str().unwrap().starts_with("u-"), "{user}");
    let doc = world.home.path().join("list-users.json");
    std::fs::write(
        &doc,
        r#"{"Statement": {"Effect": "Allow", "Action": "hatch:ListUsers", "Resource": "*"}}"#,
    )
    .unwrap();
    let policy =
        hatch_json(&world, owner, &["policies", "put", "list-users", doc.to_str().unwrap()]);
    assert_eq!(policy["name"], "list-users");
    assert_eq!(policy["document"]["Statement"]["Action"], "hatch:ListUsers", "{policy}");
    let user = hatch_json(&world, owner, &["users", "attach", "alice", "list-users"]);
    assert_eq!(user["policies"], serde_json::json!(["list-users"]), "{user}");
    let key = hatch_json(&world, owner, &["keys", "create", "--user", "alice"]);
    assert_eq!(key["user"], "alice", "{key}");
    let key_id = key["access_key_id"].as_str().unwrap().to_owned();
    assert!(key_id.starts_with("ak-"), "{key}");
    let secret = key["secret"].as_str().expect("the secret, once").to_owned();
    let keys = hatch_json(&world, owner, &["keys", "list", "--user", "alice"]);
    let listed = keys["access_keys"].as_array().unwrap();
    assert!(listed.iter().any(|k| k["access_key_id"] == key_id.as_str()), "{keys}");
    assert!(listed.iter().all(|k| k.get("secret").is_none()), "a list never shows secrets");
    let (code, table, err) = hatch_as(&world, owner, &["policies", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(table.contains("\nlist-users  alice "), "{table}");

    // The user's key may list users and nothing else.
    let alice = Some(secret.as_str());
    let (code, table, err) = hatch_as(&world, alice, &["users", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(table.lines().any(|l| l.starts_with("alice ") && l.contains("list-users")), "{table}");
    let users = hatch_json(&world, alice, &["users", "list"]);
    assert!(users["users"].as_array().unwrap().iter().any(|u| u["name"] == "alice"), "{users}");
    let (code, _, err) = hatch_as(&world, alice, &["users", "create", "x"]);
    assert_eq!(code, Some(77), "{err}");
    assert_eq!(
        err,
        "hatch: AccessDenied: your policy does not allow hatch:CreateUser on this account; ask \
         an administrator\n"
    );
    let (code, _, err) = hatch_as(&world, alice, &["keys", "create"]);
    assert_eq!(code, Some(77), "{err}");
    assert_eq!(
        err,
        "hatch: AccessDenied: only the account owner may do this; use an owner access key\n"
    );

    // An attached policy cannot be deleted; a document the relay refuses names its field.
    let (code, _, err) = hatch_as(&world, owner, &["policies", "delete", "list-users"]);
    assert_eq!(code, Some(255), "{err}");
    assert!(
        err.starts_with(
            "hatch: DeleteConflict: policy list-users is attached to 1 user(s) (alice)"
        ),
        "{err}"
    );
    assert!(err.ends_with("`hatch users detach USER NAME` detaches it\n"), "{err}");
    let bad = world.home.path().join("bad.json");
    std::fs::write(&bad, r#"{"Statement": {"Effect": "Perhaps", "Action": "*", "Resource": "*"}}"#)
        .unwrap();
    let (code, _, err) = hatch_as(&world, owner, &["policies", "put", "p2", bad.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.starts_with("hatch: MalformedPolicyDocument: policy p2 refused: "), "{err}");
    assert!(err.contains("Effect"), "{err}");

    // Detached and deleted, the user's key authenticates nothing.
    let user = hatch_json(&world, owner, &["users", "detach", "alice", "list-users"]);
    assert_eq!(user["policies"], serde_json::json!([]), "{user}");
    let user = hatch_json(&world, owner, &["users", "delete", "alice"]);
    assert_eq!(user["name"], "alice");
    for args in [&["users", "list"][..], &["instances"], &["keys", "list"], &["sessions"]] {
        let (code, _, err) = hatch_as(&world, alice, args);
        assert_eq!(code, Some(77), "{args:?}: {err}");
        assert!(err.starts_with("hatch: InvalidToken: "), "{args:?}: {err}");
    }
    let (code, _, err) = hatch_as(&world, owner, &["users", "delete", "alice"]);
    assert_eq!(code, Some(68), "{err}");
    assert!(err.starts_with("hatch: NoSuchEntity: "), "{err}");

    // Detached, the policy goes.
    let policy = hatch_json(&world, owner, &["policies", "delete", "list-users"]);
    assert_eq!(policy["name"], "list-users");
    let policies = hatch_json(&world, owner, &["policies", "list"]);
    assert!(!policies.to_string().contains("list-users"), "{policies}");
}

#[test]
fn account_instances_and_activations_through_the_cli_against_the_real_relay() {
    let world = World::start();
    let owner = None;
    let instance = world.instance().to_owned();

    // The account's preferences, and back to the relay's.
    let settings = hatch_json(&world, owner, &["account", "show"]);
    assert_eq!(settings["session_manager_enabled"], true, "{settings}");
    let settings = hatch_json(&world, owner, &["account", "prefs", "--idle-timeout", "600"]);
    assert_eq!(settings["idle_timeout_s"], 600, "{settings}");
    let settings = hatch_json(&world, owner, &["account", "prefs", "--idle-timeout", "0"]);
    assert!(settings.get("idle_timeout_s").is_none(), "{settings}");
    let (code, out, err) = hatch_as(&world, owner, &["account", "switch", "off"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("Session manager off"), "{out}");
    let settings = hatch_json(&world, owner, &["account", "switch", "on"]);
    assert_eq!(settings["session_manager_enabled"], true, "{settings}");

    // Tags replace the instance's tags; `hatch instances` shows them.
    let info = hatch_json(&world, owner, &["instances", "tag", &instance, "env=prod", "role=web"]);
    assert_eq!(info["tags"], serde_json::json!({"env": "prod", "role": "web"}), "{info}");
    let (code, table, err) = hatch_as(&world, owner, &["instances"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(table.contains("env=prod,role=web"), "{table}");

    // An activation: the code once, then listed without it, then revoked.
    let made = hatch_json(
        &world,
        owner,
        &[
            "activations",
            "create",
            "--region",
            "local",
            "--tag",
            "env=dev",
            "--max-registrations",
            "2",
        ],
    );
    let activation = made["activation_id"].as_str().unwrap().to_owned();
    assert!(made["activation_code"].is_string(), "{made}");
    assert_eq!(made["max_registrations"], 2, "{made}");
    let list = hatch_json(&world, owner, &["activations", "list"]);
    let row = list["activations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["activation_id"] == activation.as_str())
        .cloned()
        .expect("the new activation is listed");
    assert!(row.get("activation_code").is_none(), "{row}");
    let revoked = hatch_json(&world, owner, &["activations", "revoke", &activation]);
    assert!(revoked["revoked_at"].is_string(), "{revoked}");

    // The agent's secret revoked, then the instance deregistered.
    let info = hatch_json(&world, owner, &["instances", "revoke-secret", &instance]);
    assert_eq!(info["instance_id"], instance.as_str(), "{info}");
    let info = hatch_json(&world, owner, &["instances", "deregister", &instance]);
    assert_eq!(info["instance_id"], instance.as_str(), "{info}");
    let list = hatch_json(&world, owner, &["instances"]);
    assert!(!list.to_string().contains(&instance), "{list}");
    let (code, _, err) = hatch_as(&world, owner, &["instances", "deregister", &instance]);
    assert_eq!(code, Some(68), "{err}");
}

#[test]
fn exec_streams_ten_mebibytes_of_output_in_order() {
    let world = World::start();
    // No newline in the stream: the remote PTY's output processing (onlcr) leaves it unchanged.
    let script = "yes 0123456789abcdefghijklmnopqrstuvwxyz | tr -d '\\n' | head -c 10485760";
    let started = Instant::now();
    let out = exec_output(&world, &["sh", "-c", script]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let unit = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let want: Vec<u8> = unit.iter().copied().cycle().take(10 << 20).collect();
    assert_eq!(out.stdout.len(), want.len());
    assert!(out.stdout == want, "output differs from what the command wrote");
    eprintln!("10 MiB of output through relay and agent in {took:?}");
}

/// Measurement, not a check: how long `hatch exec -- true` takes end to end (process start,
/// HTTPS start, WSS dial, pairing, spawn, EXIT). Run with `--ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn measure_exec_round_trip() {
    let world = World::start();
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let out = exec_output(&world, &["true"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        times.push(started.elapsed());
    }
    times.sort();
    eprintln!(
        "hatch exec -- true, 20 runs: min {:?} median {:?} max {:?}",
        times[0], times[10], times[19]
    );
}

#[test]
fn a_relay_restart_mid_session_shows_one_status_line_and_keeps_the_shell() {
    let world = World::start();
    let (tmux, status) = interactive(&world, 80, 24);
    tmux.wait_for("the start line", |s| s.contains("Starting session s-"));
    tmux.type_text("echo pid-$$-end");
    tmux.send(&["Enter"]);
    let pid_of = |s: &str| {
        s.lines()
            .filter_map(|l| l.trim_end().strip_prefix("pid-")?.strip_suffix("-end"))
            .next_back()
            .map(str::to_owned)
    };
    let screen = tmux.wait_for("the shell's pid", |s| pid_of(s).is_some());
    let pid = pid_of(&screen).expect("pid line");
    // The relay stops (legs closed with 4009) and starts again on the same ports and data
    // directory: `hatch` reconnects by itself.
    let World { agent, relay, home } = world;
    let (api, data) = (relay.server().api_addr(), relay.server().data_addr());
    let dir = relay.data_dir().to_owned();
    drop(relay);
    let relay = DevRelay::start(DevOptions {
        data_dir: dir,
        api_listen: api,
        data_listen: data,
        ..Default::default()
    })
    .unwrap();
    let screen = tmux.wait_for("the resume", |s| s.contains("hatch: reconnected"));
    // One status line however many attempts: it is rewritten in place.
    assert_eq!(screen.matches("hatch: connection lost").count(), 1, "{screen}");
    tmux.type_text("echo again-$$-end");
    tmux.send(&["Enter"]);
    let screen = tmux.wait_for("the same shell", |s| s.contains(&format!("again-{pid}-end")));
    assert!(screen.contains(&format!("again-{pid}-end")), "{screen}");
    tmux.type_text("exit 4");
    tmux.send(&["Enter"]);
    assert_eq!(wait_file(&status), "4");
    assert_terminal_restored(&status);
    drop((agent, relay, home));
}

/// As `ssh host cmd`, from a real terminal (tmux): `exec` gets pipes unless `-t` asks for a
/// PTY, so `cat f` returns `f` byte for byte (a PTY would turn LF into CRLF), and `-t` gives
/// the command a terminal of its own.
#[test]
fn exec_from_a_terminal_has_no_pty_unless_asked_with_t() {
    let world = World::start();
    let dir = world.home.path();
    // Every byte value, LF and CR among them.
    let mut data = Vec::with_capacity(1 << 20);
    let mut x: u32 = 0x9e37_79b9;
    while data.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
        data.push(b'\n');
    }
    let file = dir.join("f.bin");
    std::fs::write(&file, &data).unwrap();
    let (out, tty, st) = (dir.join("cat.out"), dir.join("tty.out"), dir.join("exec.status"));
    let line = format!(
        "{cat} > {out} 2> {out}.err; a=$?; {tty} > {tty_out}; echo \"$a $?\" > {st}.tmp; \
         mv {st}.tmp {st}; sleep 60",
        cat = world.hatch_line(&format!("exec -i {} -- cat {}", world.instance(), file.display())),
        tty = world.hatch_line(&format!("exec -t -i {} -- tty", world.instance())),
        out = out.display(),
        tty_out = tty.display(),
        st = st.display(),
    );
    let _tmux = Tmux::start(&format!("sh -c '{line}'"), 80, 24);
    assert_eq!(wait_file(&st), "0 0");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), data.len(), "length differs");
    assert!(got == data, "bytes differ");
    assert_eq!(std::fs::read_to_string(out.with_extension("out.err")).unwrap(), "");
    let tty = std::fs::read_to_string(&tty).unwrap();
    assert!(tty.starts_with("/dev/pts/") && tty.ends_with("\r\n"), "{tty:?}");
}

/// stdout and stderr stay apart; a command that cannot start exits as a shell says (127 not
/// found, 126 not executable) with the shell's words on stderr.
#[test]
fn exec_keeps_stderr_apart_and_exits_127_or_126_like_a_shell() {
    let world = World::start();
    let out = exec_output(&world, &["sh", "-c", "echo out; echo err >&2; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!((stdout(&out).as_str(), stderr(&out).as_str()), ("out\n", "err\n"));

    let out = exec_output(&world, &["/nonexistent"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "hatch-agent: /nonexistent: No such file or directory\n");

    let out = exec_output(&world, &["no-such-command-hatch"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert_eq!(stderr(&out), "hatch-agent: no-such-command-hatch: command not found\n");

    let plain = world.home.path().join("plain.txt");
    std::fs::write(&plain, "echo never\n").unwrap();
    let out = exec_output(&world, &[plain.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert_eq!(stderr(&out), format!("hatch-agent: {}: Permission denied\n", plain.display()));
}

/// `hatch port-forward --local 0` running in the background; the local port it printed.
struct Forward {
    child: std::process::Child,
    port: u16,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Forward {
    fn start(world: &World, remote: &str) -> Forward {
        use std::io::BufRead;
        let mut cmd = world.hatch();
        cmd.args(["port-forward", "-i", world.instance(), "--local", "0", "--remote", remote])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let err = std::io::BufReader::new(child.stderr.take().unwrap());
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("Forwarding 127.0.0.1:") {
                    let port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let _ = tx.send(port);
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let port = rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("no Forwarding line; stderr: {}", stderr.lock().unwrap()));
        Forward { child, port, stderr }
    }

    fn connect(&self) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    /// Ctrl-C: stops with 0.
    fn stop(mut self) -> String {
        kill("-INT", self.child.id());
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "port-forward did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.stderr.lock().unwrap().clone();
        assert_eq!(status.code(), Some(0), "{err}");
        err
    }
}

/// A TCP server on the instance side (loopback): `serve` runs per connection on its own thread.
fn instance_server(serve: fn(std::net::TcpStream)) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || serve(s));
        }
    });
    port
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().to_vec()
}

/// The bytes the "file" server sends: 100 MiB, not a repetition.
fn file_bytes() -> Vec<u8> {
    let mut data = Vec::with_capacity(100 << 20);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while data.len() < 100 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data
}

/// Through one forward: an HTTP server's 100 MiB file arrives with its sha256; 100 concurrent
/// connections each get their own bytes back; a connection nobody reads does not stall the
/// others; and a remote port where nothing listens closes the local connection with words.
#[test]
fn port_forward_carries_a_file_many_connections_and_says_when_the_remote_refuses() {
    use std::io::{Read, Write};
    let world = World::start();
    let http = instance_server(|mut s| {
        let mut req = [0u8; 1024];
        let _ = s.read(&mut req);
        let body = file_bytes();
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&body);
    });
    let fwd = Forward::start(&world, &format!("127.0.0.1:{http}"));
    let mut c = fwd.connect();
    c.write_all(b"GET /f HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    let at = got.windows(4).position(|w| w == b"\r\n\r\n").expect("headers") + 4;
    assert_eq!(got.len() - at, 100 << 20, "body length");
    assert_eq!(sha256(&got[at..]), sha256(&file_bytes()));
    fwd.stop();

    let echo = instance_server(|s| {
        let mut r = s.try_clone().unwrap();
        let mut w = s;
        let _ = std::io::copy(&mut r, &mut w);
    });
    let fwd = Forward::start(&world, &echo.to_string());
    // One connection that writes and never reads: its stream stalls at its credit, alone.
    let mut stalled = fwd.connect();
    let flood = std::thread::spawn(move || {
        let junk = vec![0x55u8; 64 * 1024];
        let _ = stalled.set_write_timeout(Some(Duration::from_secs(5)));
        for _ in 0..64 {
            if stalled.write_all(&junk).is_err() {
                break;
            }
        }
        stalled
    });
    let workers: Vec<_> = (0..100u32)
        .map(|i| {
            let mut s = fwd.connect();
            std::thread::spawn(move || {
                let mine: Vec<u8> = (0..64 * 1024u32).map(|j| (i * 31 + j * 7) as u8).collect();
                let mut r = s.try_clone().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut back = vec![0u8; mine.len()];
                    r.read_exact(&mut back).unwrap();
                    (back, mine)
                });
                let data: Vec<u8> = (0..64 * 1024u32).map(|j| (i * 31 + j * 7) as u8).collect();
                s.write_all(&data).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let (back, mine) = reader.join().unwrap();
                assert!(back == mine, "connection {i} got other bytes");
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty(), "connection {i}: end after the echo");
            })
        })
        .collect();
    let failed = workers.into_iter().map(|w| w.join()).filter(Result::is_err).count();
    drop(flood.join().unwrap());
    let err = fwd.stop();
    assert_eq!(failed, 0, "connections failed; port-forward said: {err}");

    // Nothing listens on the remote port: the local connection is closed, stderr says why.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nothing = closed.local_addr().unwrap().port();
    drop(closed);
    let fwd = Forward::start(&world, &nothing.to_string());
    let mut c = fwd.connect();
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).unwrap_or(0), 0, "the local connection is closed");
    let err = fwd.stop();
    assert!(err.contains("could not connect it (connection refused)"), "{err}");
}

/// A destination the agent does not allow (only loopback by default) refuses the session with
/// its own close code and exit status, in words.
#[test]
fn port_forward_to_a_destination_the_agent_does_not_allow_exits_66() {
    let world = World::start();
    let mut cmd = world.hatch();
    cmd.args([
        "port-forward",
        "-i",
        world.instance(),
        "--local",
        "0",
        "--remote",
        "10.255.255.1:80",
    ]);
    let out = run(cmd);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(66), "{err}");
    assert!(
        err.contains("10.255.255.1:80 is not allowed by this agent's --allow-forward"),
        "{err}"
    );
    assert!(err.contains("ForwardNotAllowed (close 4017)"), "{err}");
}

/// ssh through `hatch proxy` (ssh's ProxyCommand) to an sshd the test starts on the instance
/// side: a command runs, and scp copies a file whose sha256 matches. sshd is Debian's
/// `openssh-server` (scripts/test installs it), on a port of its own with throwaway keys.
#[test]
fn ssh_and_scp_run_through_hatch_proxy() {
    let world = World::start();
    let dir = world.home.path().join("ssh");
    std::fs::create_dir_all(&dir).unwrap();
    let keygen = |path: &Path| {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .expect("ssh-keygen (openssh-client)");
        assert!(st.success());
    };
    let (host_key, user_key) = (dir.join("host_key"), dir.join("user_key"));
    keygen(&host_key);
    keygen(&user_key);
    let authorized = dir.join("authorized_keys");
    std::fs::copy(user_key.with_extension("pub"), &authorized).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile {}\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n\
             PasswordAuthentication no\nSubsystem sftp internal-sftp\n",
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .unwrap();
    // sshd's privilege separation needs this directory (a package's service would make it).
    let _ = std::fs::create_dir_all("/run/sshd");
    let sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/sbin/sshd (openssh-server; scripts/test installs it)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _sshd = Kill(sshd);
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name;
    let proxy = format!("{} proxy -i %h --remote 127.0.0.1:{port}", env!("CARGO_BIN_EXE_hatch"));
    let ssh_opts = |cmd: &mut Command| {
        cmd.env("HOME", world.home.path())
            .env("XDG_CONFIG_HOME", world.home.path())
            .env("HATCH_API", &world.relay.info.api_url)
            .env("HATCH_ACCESS_KEY", &world.relay.info.access_key)
            .env("HATCH_CA", &world.relay.info.ca_file)
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "LogLevel=ERROR", "-i"])
            .arg(&user_key)
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"));
    };
    let mut ssh = Command::new("ssh");
    ssh_opts(&mut ssh);
    ssh.arg(format!("{user}@{}", world.instance())).arg("echo hello-through-hatch; exit 3");
    let out = run(ssh);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello-through-hatch\n", "{}", stderr(&out));

    let src = dir.join("payload.bin");
    let data: Vec<u8> =
        (0..5u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let dst = dir.join("copied.bin");
    let mut scp = Command::new("scp");
    ssh_opts(&mut scp);
    scp.arg(&src).arg(format!("{user}@{}:{}", world.instance(), dst.display()));
    let out = run(scp);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sha256(&std::fs::read(&dst).unwrap()), sha256(&data));
}

/// A port session's idle timeout counts data in both directions: a connection where only the
/// instance sends (a download, a log tail) is not idle; once nothing moves either way, the
/// session ends with 4007 and `hatch port-forward` exits 75.
#[test]
fn a_port_session_where_only_the_instance_sends_is_not_idle() {
    use std::io::Read;
    let world = World::start_with(&["--idle-timeout", "1"]);
    // One byte every 100 ms for 3 s (three idle timeouts), then nothing.
    let drip = instance_server(|mut s| {
        use std::io::Write;
        for _ in 0..30 {
            if s.write_all(b".").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let mut fwd = Forward::start(&world, &drip.to_string());
    let mut c = fwd.connect();
    let mut got = [0u8; 30];
    c.read_exact(&mut got).expect("all 30 bytes, over three idle timeouts");
    assert_eq!(&got, &[b'.'; 30]);
    // Now nothing moves: the relay ends the session.
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = fwd.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the idle port session was not closed");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The stderr reader thread may still be on the last line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fwd.stderr.lock().unwrap().contains("IdleTimeout") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = fwd.stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(err.contains("IdleTimeout (close 4007)"), "{err}");
}
