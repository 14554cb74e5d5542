//! Shared fixtures of the end-to-end suite (`e2e/tests/*.rs`): the real `hatch-relay`,
//! `hatch-agent` and `hatch` binaries run as processes on loopback, an HTTPS API client, an
//! agent control-channel client, WebSocket legs, and a raw TLS client that can send any bytes.
//!
//! Every wait has a deadline ([`DEADLINE`]); every process is killed when its handle drops.
//! `HATCH_E2E_IO=uring` runs every relay of the suite with `--io uring` (default: the relay's
//! default, epoll), and fails a test whose relay fell back to another backend.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hatch_proto::control::{FromAgent, ToAgent};
use hatch_relay::dev::DevInfo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

pub mod cdp;

/// Every wait on a peer in these tests ends within this.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A WebSocket leg or control channel.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The `target/<profile>` directory the test executable was built into.
fn profile_dir() -> PathBuf {
    // target/debug/deps/<test>-<hash> → target/debug
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_owned()
}

/// Set once this process ran `cargo build --bins`.
static BUILT: Mutex<bool> = Mutex::new(false);

/// Path of a workspace binary (`hatch-relay`, `hatch-agent`, `hatch`).
///
/// `cargo test --workspace` builds all three fresh before any test runs (their own crates'
/// tests use `CARGO_BIN_EXE_*`), so they are taken from next to the test executable. When one
/// is missing (e.g. `cargo test -p hatch-e2e` on a clean clone), or with `HATCH_E2E_BUILD=1`,
/// the first call runs `cargo build --bins` for the three packages. The build gets a clean
/// environment: the variables cargo sets for a test process would make it rebuild
/// dependencies whose build scripts watch the environment.
pub fn bin(name: &str) -> PathBuf {
    let dir = profile_dir();
    let p = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let missing = ["hatch-relay", "hatch-agent", "hatch"].iter().any(|b| !dir.join(b).exists());
    if !*built && (missing || std::env::var_os("HATCH_E2E_BUILD").is_some()) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.env_clear();
        for keep in ["PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN", "TMPDIR"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.args(["build", "--bins", "--manifest-path"]).arg(&manifest);
        for pkg in ["hatch-relay", "hatch-agent", "hatch-client"] {
            cmd.args(["-p", pkg]);
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        // target/<profile> → target
        cmd.arg("--target-dir").arg(dir.parent().expect("target dir"));
        let st = cmd.status().expect("running cargo build");
        assert!(st.success(), "cargo build --bins failed: {st:?}");
        *built = true;
    }
    assert!(p.exists(), "{} missing", p.display());
    p
}

/// The relay's I/O backend for this run: `HATCH_E2E_IO` (`epoll` or `uring`), passed to every
/// relay the tests start as `--io`; `None` (the relay's default, epoll) when unset or empty.
pub fn io_backend() -> Option<String> {
    std::env::var("HATCH_E2E_IO").ok().filter(|v| !v.is_empty())
}

/// The `--io` flag for [`io_backend`] (nothing when it is unset).
pub fn io_args() -> Vec<String> {
    io_backend().map(|io| vec!["--io".to_owned(), io]).unwrap_or_default()
}

/// Panics unless the relay whose log is `log` runs its data plane on the backend
/// `HATCH_E2E_IO` asked for: a silent fallback to epoll would make a uring run test epoll.
pub fn assert_io_backend(log: &str) {
    let Some(want) = io_backend() else { return };
    let Some(line) = log.lines().find(|l| l.contains("data plane listening")) else {
        panic!("no 'data plane listening' line in the relay log:\n{log}");
    };
    // The log may be coloured: compare without the escape sequences.
    let plain: String = {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    assert!(
        plain.to_ascii_lowercase().contains(&format!("io={}", want.to_ascii_lowercase())),
        "HATCH_E2E_IO={want} but the relay runs: {plain}\n{log}"
    );
}

/// Raises this process's soft open-file limit to the hard limit (children inherit it).
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    hard
}

/// Polls `f` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        cmd.stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc { child, log: log.to_owned() }
    }

    /// Process id.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Waits for the exit status, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "process {} still running after {limit:?}", self.pid());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything it wrote so far.
    pub fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

/// Lines of a process's log a failing test prints.
const LOG_TAIL_LINES: usize = 150;

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what its processes said last: a run that fails once on a
        // clean clone can then be read, not only rerun.
        if std::thread::panicking() {
            let out = self.output();
            let lines: Vec<&str> = out.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// `hatch-agent register` then `hatch-agent run` with `extra` flags, as an operator would, with
/// its state and log (`agent.log`) in `dir`. Returns the process and the instance id.
pub fn start_agent(relay: &Relay, dir: &Path, extra: &[&str]) -> (Proc, String) {
    let i = &relay.info;
    let ca = Path::new(&i.ca_file);
    start_agent_with(&i.api_url, ca, &i.activation_id, &i.activation_code, dir, extra)
}

/// [`start_agent`] against the API at `api` (trusting `ca`) with the given activation.
pub fn start_agent_with(
    api: &str,
    ca: &Path,
    activation_id: &str,
    activation_code: &str,
    dir: &Path,
    extra: &[&str],
) -> (Proc, String) {
    let state = dir.join("agent.json");
    let out = Command::new(bin("hatch-agent"))
        .args(["register", "--api", api, "--activation-id", activation_id])
        .args(["--activation-code", activation_code, "--ca"])
        .arg(ca)
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "register: {}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(id.starts_with("i-"), "{id}");
    let mut cmd = Command::new(bin("hatch-agent"));
    cmd.args(["run", "--state"]).arg(&state).args(extra);
    (Proc::spawn(cmd, &dir.join("agent.log")), id)
}

/// A relay started with `extra` flags and one real agent on it, online; the agent's instance
/// id and the directory holding its state (a home for `hatch` too).
pub async fn relay_and_agent(extra: &[&str]) -> (Relay, Proc, String, tempfile::TempDir) {
    let relay = Relay::start(extra);
    let dir = tempfile::tempdir().unwrap();
    let (agent, iid) = start_agent(&relay, dir.path(), &[]);
    wait_online(&relay, &iid, true).await;
    (relay, agent, iid, dir)
}

/// Waits until the API lists instance `id` with `online` as given (40 s at most).
pub async fn wait_online(relay: &Relay, id: &str, online: bool) {
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let r = relay.call("GET", "/v1/instances", Some(&relay.info.access_key), None).await;
        let now = r.status == 200
            && r.json()["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["instance_id"] == id && i["online"] == true);
        if now == online {
            return;
        }
        assert!(Instant::now() < end, "instance {id} online={online} never seen: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real `hatch` CLI against `relay` with access key `key`, its config home in `home`.
pub fn hatch(relay: &Relay, home: &Path, key: &str) -> Command {
    let mut cmd = Command::new(bin("hatch"));
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home)
        .env("HATCH_API", &relay.info.api_url)
        .env("HATCH_ACCESS_KEY", key)
        .env("HATCH_CA", &relay.info.ca_file)
        .stdin(Stdio::null());
    cmd
}

/// `hatch-relay admin --json ARGS` on the relay's data directory (the store is shared with
/// the running relay, as an operator's admin commands are); the parsed JSON it printed.
pub fn admin(relay: &Relay, args: &[&str]) -> Value {
    let out = Command::new(bin("hatch-relay"))
        .args(["admin", "--json", "--data-dir"])
        .arg(&relay.data_dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("admin {args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A `hatch-relay dev` process in a temporary data directory.
pub struct Relay {
    /// The process.
    pub proc: Proc,
    /// What `dev.json` says.
    pub info: DevInfo,
    /// TLS client configuration trusting the relay's CA.
    pub tls: Arc<rustls::ClientConfig>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Extra flags it was started with (kept for [`Relay::restart`]).
    extra: Vec<String>,
    /// Keeps the directory alive.
    pub tmp: Arc<tempfile::TempDir>,
}

impl Relay {
    /// Starts `hatch-relay dev --shards 1` on loopback port 0 with `extra` flags.
    pub fn start(extra: &[&str]) -> Relay {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let data_dir = tmp.path().join("relay");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::launch(tmp, data_dir, "127.0.0.1:0", "127.0.0.1:0", extra)
    }

    /// Starts another relay ([`Relay::start`]) with `other`'s certificate and CA (its `tls`
    /// directory copied into the new data directory): a node of the same fleet, which clients
    /// and agents of `other` trust.
    pub fn start_sharing_tls(other: &Relay, extra: &[&str]) -> Relay {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let data_dir = tmp.path().join("relay");
        let tls = data_dir.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        for e in std::fs::read_dir(other.data_dir.join("tls")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), tls.join(e.file_name())).unwrap();
        }
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::launch(tmp, data_dir, "127.0.0.1:0", "127.0.0.1:0", extra)
    }

    fn launch(
        tmp: Arc<tempfile::TempDir>,
        data_dir: PathBuf,
        api: &str,
        data: &str,
        extra: Vec<String>,
    ) -> Relay {
        let dev_json = data_dir.join("dev.json");
        // A restart keeps dev.json (the demo account is reused only when it names it); the new
        // process is ready when its banner line appears in the log once more.
        const BANNER: &str = "Hatch development relay";
        let log = tmp.path().join("relay.log");
        let banners = std::fs::read_to_string(&log).unwrap_or_default().matches(BANNER).count();
        let mut cmd = Command::new(bin("hatch-relay"));
        cmd.args(["dev", "--data-dir"]).arg(&data_dir);
        cmd.args(["--api-listen", api, "--data-listen", data, "--shards", "1"]);
        cmd.args(io_args());
        cmd.args(&extra);
        cmd.env("HATCH_LOG", "info");
        let mut proc = Proc::spawn(cmd, &log);
        let end = Instant::now() + DEADLINE;
        let info: DevInfo = loop {
            if let Some(st) = proc.child.try_wait().unwrap() {
                panic!("relay exited ({st}) before starting:\n{}", proc.output());
            }
            if proc.output().matches(BANNER).count() > banners
                && let Ok(text) = std::fs::read_to_string(&dev_json)
                && let Ok(info) = serde_json::from_str(&text)
            {
                break info;
            }
            assert!(Instant::now() < end, "relay did not start:\n{}", proc.output());
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_io_backend(&proc.output());
        let tls = hatch_relay::certs::client_config_with_ca(Path::new(&info.ca_file)).unwrap();
        Relay { proc, info, tls, data_dir, extra, tmp }
    }

    /// Starts the relay again on the same data directory and the same ports (after it died).
    pub fn restart(self) -> Relay {
        let Relay { mut proc, info, data_dir, extra, tmp, .. } = self;
        let _ = proc.child.kill();
        let _ = proc.child.wait();
        let api = info.api_url.trim_start_matches("https://").to_owned();
        let data = info.data_url.trim_start_matches("wss://").to_owned();
        Self::launch(tmp, data_dir, &api, &data, extra)
    }

    /// The API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.info.api_url.trim_start_matches("https://").parse().unwrap()
    }

    /// The data-plane address.
    pub fn data_addr(&self) -> SocketAddr {
        self.info.data_url.trim_start_matches("wss://").parse().unwrap()
    }

    /// One HTTPS request to the API with the owner's key (`key = None`: no credentials).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Resp {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> =
            auth.as_deref().map(|a| ("Authorization", a)).into_iter().collect();
        self.call_with(method, path, &headers, body).await
    }

    /// One HTTPS request to the API with the given header fields (`Host: localhost` and the
    /// body's are added).
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        tokio::time::timeout(DEADLINE, https(self, method, path, headers, body))
            .await
            .expect("API request timed out")
    }

    /// The session record `GET /v1/sessions/{id}`.
    pub async fn session(&self, sid: &str) -> Value {
        let r = self
            .call("GET", &format!("/v1/sessions/{sid}"), Some(&self.info.access_key), None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    }

    /// Polls the session record until it is closed; returns it.
    pub async fn closed_session(&self, sid: &str) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let s = self.session(sid).await;
            if s["state"] == "closed" {
                return s;
            }
            assert!(Instant::now() < end, "session {sid} not closed: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Registers an agent with the demo activation and opens its control channel.
    pub async fn agent(&self) -> ControlAgent {
        let body = format!(
            r#"{{"activation_id":"{}","activation_code":"{}","hostname":"e2e"}}"#,
            self.info.activation_id, self.info.activation_code
        );
        let r = self.call("POST", "/v1/agent/register", None, Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let v = r.json();
        let id = v["instance_id"].as_str().unwrap().to_owned();
        let secret = v["instance_secret"].as_str().unwrap().to_owned();
        let ws = self.control_channel(&secret).await.expect("control channel refused");
        let agent = ControlAgent { id, secret, ws };
        // Online once the relay registered the channel.
        let end = Instant::now() + DEADLINE;
        loop {
            let r = self.call("GET", "/v1/instances", Some(&self.info.access_key), None).await;
            let online = r.json()["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["instance_id"] == agent.id.as_str() && i["online"] == true);
            if online {
                break;
            }
            assert!(Instant::now() < end, "agent never online: {}", r.text);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent
    }

    /// Opens one more control channel with an instance secret (`GET /v1/agent/connect`).
    pub async fn control_channel(&self, secret: &str) -> Result<Ws, (u16, String)> {
        let url = format!("wss://localhost:{}/v1/agent/connect", self.api_addr().port());
        let mut ws = dial(self, &url, &[("authorization", &format!("Bearer {secret}"))]).await?;
        // As a real agent does first: whom it runs sessions as (the relay counts the instance
        // online after it).
        let hello = serde_json::to_string(&FromAgent::hello("hatch-e2e", true)).unwrap();
        ws.send(Message::Text(hello.into())).await.map_err(|e| (0, e.to_string()))?;
        Ok(ws)
    }

    /// Starts a session on `agent` and reads the agent's `session.open`.
    pub async fn start_session(&self, agent: &mut ControlAgent) -> Session {
        let body = format!(r#"{{"instance_id":"{}","mode":"shell"}}"#, agent.id);
        let r = self.call("POST", "/v1/sessions", Some(&self.info.access_key), Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let v = r.json();
        let Some(ToAgent::SessionOpen { stream_url, token, session_id, .. }) = agent.next().await
        else {
            panic!("expected session.open");
        };
        assert_eq!(session_id, v["session_id"].as_str().unwrap());
        Session {
            id: session_id,
            client_url: v["stream_url"].as_str().unwrap().to_owned(),
            client_token: v["token"].as_str().unwrap().to_owned(),
            agent_url: stream_url,
            agent_token: token,
        }
    }

    /// Starts a session and dials both legs: (session, client leg, agent leg).
    pub async fn open(&self, agent: &mut ControlAgent) -> (Session, Ws, Ws) {
        let s = self.start_session(agent).await;
        let a = leg(self, &s.agent_url, &s.agent_token).await.expect("agent leg refused");
        let c = leg(self, &s.client_url, &s.client_token).await.expect("client leg refused");
        (s, c, a)
    }

    /// A fresh session pairs, carries bytes both ways, and is recorded `client_closed` with
    /// its byte counts: the relay still serves correctly.
    pub async fn still_serves(&self, agent: &mut ControlAgent) {
        let (s, mut c, mut a) = self.open(agent).await;
        send_bin(&mut c, b"\x01still?").await;
        assert_eq!(recv_bin(&mut a).await, b"\x01still?");
        send_bin(&mut a, b"\x01yes\n").await;
        assert_eq!(recv_bin(&mut c).await, b"\x01yes\n");
        c.close(None).await.unwrap();
        let rec = self.closed_session(&s.id).await;
        assert_eq!(rec["close_reason"], "client_closed", "{rec}");
        assert_eq!(rec["bytes_client_to_agent"], 7, "{rec}");
        assert_eq!(rec["bytes_agent_to_client"], 5, "{rec}");
    }
}

/// The two legs' URLs and tokens of one session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Session id.
    pub id: String,
    /// Client leg URL.
    pub client_url: String,
    /// Client token.
    pub client_token: String,
    /// Agent leg URL.
    pub agent_url: String,
    /// Agent token.
    pub agent_token: String,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Body.
    pub text: String,
    /// The header fields, names in lower case, in order.
    pub headers: Vec<(String, String)>,
}

impl Resp {
    /// The first header field of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

async fn https(
    relay: &Relay,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let tcp = TcpStream::connect(relay.api_addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s =
        tokio_rustls::TlsConnector::from(relay.tls.clone()).connect(name, tcp).await.unwrap();
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    // A peer that ends TLS without close_notify is still a complete answer here.
    let _ = s.read_to_end(&mut got).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {text}"));
    let status = head[9..12].parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Resp { status, text: body, headers }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// An agent's control channel, as the real agent speaks it.
pub struct ControlAgent {
    /// Instance id.
    pub id: String,
    /// Instance secret (to open further channels as this instance).
    pub secret: String,
    /// The channel.
    pub ws: Ws,
}

impl ControlAgent {
    /// The next message other than a heartbeat (heartbeats are answered).
    pub async fn next(&mut self) -> Option<ToAgent> {
        loop {
            let m = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("control read timed out");
            match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(t))) => {
                    let msg: ToAgent = serde_json::from_str(&t).unwrap();
                    if let ToAgent::Heartbeat { seq } = msg {
                        let reply = serde_json::to_string(&FromAgent::Heartbeat { seq }).unwrap();
                        self.ws.send(Message::Text(reply.into())).await.unwrap();
                        continue;
                    }
                    return Some(msg);
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// Dials a WebSocket URL of the relay with extra headers; on refusal, the HTTP status and the
/// `code` of the JSON body.
pub async fn dial(relay: &Relay, url: &str, headers: &[(&str, &str)]) -> Result<Ws, (u16, String)> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let fut = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(relay.tls.clone())),
    );
    match tokio::time::timeout(DEADLINE, fut).await.expect("dial timed out") {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            Err((status, v["code"].as_str().unwrap_or("").to_owned()))
        }
        Err(e) => Err((0, format!("{e}"))),
    }
}

/// Dials a leg with a bearer token and the `hatch.v1` subprotocol.
pub async fn leg(relay: &Relay, url: &str, token: &str) -> Result<Ws, (u16, String)> {
    let auth = format!("Bearer {token}");
    dial(relay, url, &[("authorization", &auth), ("sec-websocket-protocol", "hatch.v1")]).await
}

/// Receives the next binary message, skipping pings and pongs.
pub async fn recv_bin(ws: &mut Ws) -> Vec<u8> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await.expect("recv timed out") {
            Some(Ok(Message::Binary(b))) => return b.to_vec(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
}

/// Sends one binary message.
pub async fn send_bin(ws: &mut Ws, b: &[u8]) {
    ws.send(Message::binary(b.to_vec())).await.unwrap();
}

/// Reads until the close frame; its code (None when the connection just ended).
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await.expect("no close before the deadline")
        {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// A raw TLS byte stream to the data plane, for hand-made requests and frames.
pub struct Raw(pub tokio_rustls::client::TlsStream<TcpStream>);

impl Raw {
    /// TLS to the data port, nothing sent yet.
    pub async fn connect(relay: &Relay) -> Raw {
        let tcp = TcpStream::connect(relay.data_addr()).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let c = tokio_rustls::TlsConnector::from(relay.tls.clone());
        Raw(tokio::time::timeout(DEADLINE, c.connect(name, tcp)).await.unwrap().unwrap())
    }

    /// Writes all of `b`.
    pub async fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.write_all(b).await?;
        self.0.flush().await
    }

    /// One read, bounded by [`DEADLINE`].
    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        tokio::time::timeout(DEADLINE, self.0.read(buf)).await.expect("raw read timed out")
    }

    /// Reads until the stream ends (or fails); returns what arrived.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Sends a request head and reads the answer to the end: (status, JSON `code`).
    pub async fn refused(relay: &Relay, head: &[u8]) -> (u16, String) {
        let mut r = Raw::connect(relay).await;
        // The relay may answer and close before the whole head is in (431).
        let _ = r.write(head).await;
        parse_refusal(&r.read_to_end().await)
    }

    /// Upgrades with `token` and returns the stream after the 101 head.
    pub async fn upgrade(relay: &Relay, url: &str, token: &str) -> Raw {
        let mut raw = Raw::connect(relay).await;
        let (path, _) = url_path(url);
        raw.write(upgrade_head(&path, &format!("Authorization: Bearer {token}\r\n")).as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1];
        // Byte by byte so nothing after the head is consumed here.
        while !got.ends_with(b"\r\n\r\n") {
            let n = raw.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the 101: {}", String::from_utf8_lossy(&got));
            got.push(buf[0]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
        raw
    }

    /// Reads exactly `out.len()` bytes.
    pub async fn read_exact(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        tokio::time::timeout(DEADLINE, self.0.read_exact(out)).await.expect("read timed out")?;
        Ok(())
    }

    /// Reads one server frame: (first byte, payload).
    pub async fn read_frame(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.read_exact(&mut h).await?;
        assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
        let mut len = u64::from(h[1] & 0x7F);
        if len == 126 {
            let mut b = [0u8; 2];
            self.read_exact(&mut b).await?;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            self.read_exact(&mut b).await?;
            len = u64::from_be_bytes(b);
        }
        let mut p = vec![0u8; len as usize];
        self.read_exact(&mut p).await?;
        Ok((h[0], p))
    }

    /// Reads frames until a close; its code (payload-less close: 1005).
    pub async fn read_close(&mut self) -> u16 {
        loop {
            let (b0, p) = self.read_frame().await.expect("connection ended before a close frame");
            if b0 & 0x0F == 0x8 {
                return if p.len() >= 2 { u16::from_be_bytes([p[0], p[1]]) } else { 1005 };
            }
        }
    }
}

/// The path and query of a `wss://host:port/path?query` URL, and the host.
pub fn url_path(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    (format!("/{path}"), host.to_owned())
}

/// A well-formed upgrade request head for `path` with `extra` header lines.
pub fn upgrade_head(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: hatch.v1\r\n{extra}\r\n"
    )
}

/// The status and JSON `code` of an HTTP refusal read to the end.
pub fn parse_refusal(got: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(got);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, format!("no HTTP answer: {text:?}"));
    };
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, v["code"].as_str().unwrap_or("").to_owned())
}

/// A masked client frame whose first byte is `first` (FIN, RSV and opcode bits as given).
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut h = [0u8; 14];
    let op = hatch_proto::frame::OpCode::Binary;
    let n = hatch_proto::frame::encode_header(true, op, payload.len() as u64, Some(key), &mut h);
    h[0] = first;
    let mut v = h[..n].to_vec();
    let mut p = payload.to_vec();
    hatch_proto::frame::unmask(&mut p, key, 0);
    v.extend_from_slice(&p);
    v
}

/// The bytes of a real TLS ClientHello for `localhost` (to send and then go silent).
pub fn client_hello(tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(tls.clone(), name).unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

/// Reads a client leg to its end as `hatch` does: DATA is collected and acknowledged every
/// 64 KiB, EXIT at once (the agent ends the session only once its EXIT is acknowledged).
/// Returns (output, EXIT status, close code).
pub async fn read_session(ws: &mut Ws) -> (Vec<u8>, Option<i32>, Option<u16>) {
    use hatch_proto::channel::Message as Chan;
    let (mut out, mut exit, mut received, mut acked) = (Vec::new(), None, 0u64, 0u64);
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next()).await.expect("leg silent");
        match msg {
            Some(Ok(Message::Binary(b))) => match Chan::decode(&b).expect("hatch.v1 message") {
                Chan::Data(d) => {
                    out.extend_from_slice(d);
                    received += d.len() as u64;
                }
                Chan::Exit(s) => {
                    assert!(exit.is_none(), "a second EXIT");
                    exit = Some(s);
                    received += 1;
                }
                _ => {}
            },
            Some(Ok(Message::Close(f))) => return (out, exit, f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (out, exit, None),
        }
        if received - acked >= hatch_proto::resume::DEFAULT_ACK_BYTES
            || (exit.is_some() && received > acked)
        {
            acked = received;
            let ack = Chan::Ack(received).to_vec();
            let _ = ws.send(Message::binary(ack)).await;
        }
    }
}

/// A TCP proxy on loopback in front of the relay's data plane (the relay advertises it with
/// `--public-data-url`), which cuts the connections through it on demand with a reset, as a
/// network drop or a NAT timeout does.
pub struct CutProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port; forwards to the target set with
    /// [`CutProxy::set_target`].
    pub async fn start() -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (t, c) = (target.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Some(to) = *t.lock().unwrap() else { continue };
                let task = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else { return };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    // Dropped (cut) with SO_LINGER 0: both ends see a reset. (The deprecation
                    // is about a lingering close blocking the thread; a zero linger resets at
                    // once and never blocks.)
                    #[allow(deprecated)]
                    {
                        let _ = inbound.set_linger(Some(Duration::ZERO));
                        let _ = outbound.set_linger(Some(Duration::ZERO));
                    }
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                let mut open = c.lock().unwrap();
                open.retain(|h| !h.is_finished());
                open.push(task.abort_handle());
            }
        });
        CutProxy { addr, target, conns, accept }
    }

    /// Where new connections go.
    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = Some(to);
    }

    /// Cuts every connection open now; returns how many there were.
    pub fn cut_all(&self) -> usize {
        let mut open = self.conns.lock().unwrap();
        let n = open.iter().filter(|h| !h.is_finished()).count();
        for h in open.drain(..) {
            h.abort();
        }
        n
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

/// Reads a child's stdout on a thread, stopping (so that the child blocks writing, and the
/// session's flow control holds everything upstream) once `pause_at` bytes are in, until
/// [`GatedReader::release`].
pub struct GatedReader {
    /// What was read so far.
    pub got: Arc<Mutex<Vec<u8>>>,
    go: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GatedReader {
    /// Starts reading `from`.
    pub fn start(mut from: impl Read + Send + 'static, pause_at: usize) -> GatedReader {
        let got: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (go, wait) = std::sync::mpsc::channel();
        let g = got.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            let mut paused = false;
            loop {
                if !paused && g.lock().unwrap().len() >= pause_at {
                    paused = true;
                    if wait.recv().is_err() {
                        return;
                    }
                }
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => g.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        GatedReader { got, go, thread: Some(thread) }
    }

    /// Bytes read so far.
    pub fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Whether nothing was read yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads on to the end.
    pub fn release(&self) {
        let _ = self.go.send(());
    }

    /// Everything, once the stream ended.
    pub fn finish(mut self) -> Vec<u8> {
        self.release();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

/// A tmpfs of `size` mounted on a fresh temporary directory (or on a given one); unmounted
/// when dropped, also when the test panics. `None` (after saying so loudly on stderr) where
/// this process may not mount.
pub struct Tmpfs {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts one (`size` as `mount -o size=` takes it), or says why not and gives `None`.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let tmp = tempfile::tempdir().unwrap();
        let mut fs = Self::mount_on(tmp.path(), size)?;
        fs._tmp = Some(tmp);
        Some(fs)
    }

    /// [`Tmpfs::mount`] on the existing directory `dir` (what it held is hidden meanwhile).
    pub fn mount_on(dir: &Path, size: &str) -> Option<Tmpfs> {
        let opts = format!("size={size}");
        let out =
            Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir: dir.to_owned(), _tmp: None }),
            other => {
                eprintln!(
                    "\n*** SKIPPED: cannot mount a tmpfs (needs root or CAP_SYS_ADMIN), so the \
                     read-only / full-disk test did NOT run: {other:?}\n"
                );
                None
            }
        }
    }

    /// Its mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `mount -o remount,HOW` (`ro`, `rw`).
    pub fn remount(&self, how: &str) {
        let st =
            Command::new("mount").args(["-o", &format!("remount,{how}")]).arg(self.path()).status();
        assert!(st.is_ok_and(|s| s.success()), "remount,{how} of {} failed", self.path().display());
    }

    /// Writes zeroes to a file until the file system says it is full (ENOSPC).
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let block = [0u8; 4096];
        let err = loop {
            if let Err(e) = f.write_all(&block) {
                break e;
            }
        };
        assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::ENOSPC as i32), "{err}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(self.path()).status().is_ok_and(|s| s.success());
        if !ok {
            // Busy (a process still holds a file there): detach it now, freed when released.
            eprintln!("umount {} failed; detaching it lazily", self.path().display());
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

/// `n` bytes that repeat nowhere a shifted copy would match (xorshift), for byte-exact checks.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
