//! The worker process (`hatch-loadtest worker`): simulated clients or agents, driven by the
//! parent over JSON lines. The parent writes one [`Spec`] line, later a `go` line, and closes
//! stdin to stop; the worker writes [`Event`] lines on stdout.

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cli::Mode;
use crate::report::{Buckets, Errors, ForwardStats, StreamStats};

/// What a worker simulates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Spec {
    /// Simulated clients.
    Clients(ClientSpec),
    /// Simulated agents.
    Agents(AgentSpec),
}

/// The sessions a client worker opens and how it drives them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientSpec {
    /// What the clients dial.
    pub target: Target,
    /// Sessions this worker opens.
    pub sessions: usize,
    /// Global index of this worker's first session (spreads instances and source addresses).
    pub first: usize,
    /// Setup pace of this worker, sessions per second.
    pub ramp: f64,
    /// DATA messages per second per session.
    pub rate: f64,
    /// DATA payload bytes.
    pub payload: usize,
    /// Messages in flight per session in throughput mode.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Measurement time, seconds.
    pub duration_s: f64,
    /// Session behaviour.
    pub mode: Mode,
    /// CA the clients trust.
    pub ca_file: PathBuf,
    /// Source addresses for data connections (empty: kernel's choice).
    pub sources: Vec<Ipv4Addr>,
    /// `ws://` stream URLs are dialed without TLS (`--danger-plaintext`).
    #[serde(default)]
    pub danger_plaintext: bool,
    /// Keep offsets and send acknowledgements as `hatch` does (`--acks on`).
    #[serde(default)]
    pub acks: bool,
    /// Take up a lost connection again as `hatch` does (`--chaos`): a resume token, a new
    /// leg, RESUME and the replay of what the agent has not acknowledged. Needs `acks`.
    #[serde(default)]
    pub resume: bool,
    /// Forward mode: what the connections do and where they go.
    #[serde(default)]
    pub forward: Option<ForwardSpec>,
    /// Setups in flight at most.
    pub setup_concurrency: usize,
    /// The worker exits after this many seconds whatever happens.
    pub lifetime_s: f64,
}

fn default_window() -> usize {
    4
}

fn default_link_window() -> usize {
    hatch_proto::resume::LinkConfig::default().window
}

/// Which part of forward mode a client worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardPart {
    /// Connections carrying `payload` bytes at `rate` to the echo; round trips timed.
    Latency,
    /// One session, one connection at a time: an upload for `duration_s`, then a download for
    /// as long; every byte checked.
    Throughput,
}

impl ForwardPart {
    /// The name in progress lines.
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardPart::Latency => "latency",
            ForwardPart::Throughput => "throughput",
        }
    }
}

/// Forward mode's client side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardSpec {
    /// What the connections do.
    pub part: ForwardPart,
    /// The TCP server (`tcp`): the port sessions' destination, or what `Target::Direct` dials.
    pub server: SocketAddr,
    /// Connections over all workers, spread evenly over `sessions_total` sessions (session `i`
    /// carries `connections_total / sessions_total`, one more for `i` below the remainder).
    pub connections_total: usize,
    /// Sessions over all workers.
    pub sessions_total: usize,
    /// The session window of the pump's offsets, bytes.
    #[serde(default = "default_link_window")]
    pub link_window: usize,
}

impl ForwardSpec {
    /// The connections session `i` (global index) carries.
    pub fn connections_of(&self, i: usize) -> usize {
        let n = self.sessions_total.max(1);
        self.connections_total / n + usize::from(i < self.connections_total % n)
    }
}
/// Where the clients' sessions go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// The floor's echo server at this `wss://` URL.
    Floor {
        /// The echo server's URL.
        url: String,
    },
    /// Forward mode's floor: the TCP server at `ForwardSpec::server`, dialed straight over
    /// loopback TCP, no TLS, no WebSocket, no session.
    Direct,
    /// A relay: start sessions through its API, on these instances in turn.
    Relay {
        /// `https://host:port` of the API.
        api_url: String,
        /// Access key for `POST /v1/sessions`.
        access_key: String,
        /// Instance ids of the simulated agents.
        instances: Vec<String>,
    },
}

/// The agents an agent worker registers and serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSpec {
    /// `https://host:port` of the API.
    pub api_url: String,
    /// CA the agents trust.
    pub ca_file: PathBuf,
    /// Activation id to register with.
    pub activation_id: String,
    /// Activation code to register with.
    pub activation_code: String,
    /// Agents (instances) in this worker.
    pub instances: usize,
    /// Session behaviour.
    pub mode: Mode,
    /// Source addresses for data connections (empty: kernel's choice).
    pub sources: Vec<Ipv4Addr>,
    /// `ws://` data URLs in `session.open` are dialed without TLS (`--danger-plaintext`).
    #[serde(default)]
    pub danger_plaintext: bool,
    /// Keep offsets and send acknowledgements as `hatch-agent` does (`--acks on`).
    #[serde(default)]
    pub acks: bool,
    /// Reconnect a lost control channel and take up lost data legs again as `hatch-agent`
    /// does (`--chaos`), with its backoff. Needs `acks`.
    #[serde(default)]
    pub resume: bool,
    /// The session window of port sessions' offsets, bytes (forward mode, `--link-window-kib`).
    #[serde(default = "default_link_window")]
    pub link_window: usize,
    /// The worker exits after this many seconds whatever happens.
    pub lifetime_s: f64,
}

/// What a worker reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// Once a second: sessions up, round trips and their histogram since the last progress.
    Progress {
        /// Sessions up.
        up: usize,
        /// Round trips since the last progress event.
        msgs: u64,
        /// Their round-trip times, microseconds.
        rtt: Buckets,
    },
    /// Agents registered and holding their control channel.
    Registered {
        /// Instance ids online.
        instance_ids: Vec<String>,
        /// Failures by kind.
        errors: Errors,
    },
    /// Every session of a client worker is set up (or failed).
    Ready {
        /// Sessions up.
        up: usize,
        /// First setup start to last setup end, seconds.
        setup_wall_s: f64,
        /// Setup times, microseconds.
        setup: Buckets,
        /// Failures by kind.
        errors: Errors,
        /// Connections made during setup, by scheme and TLS handshake kind
        /// ([`crate::net::Dialer::connections`]).
        #[serde(default)]
        connections: Errors,
    },
    /// The measurement is over (clients) or the worker is stopping (agents).
    Done {
        /// Sessions still up at the end.
        up: usize,
        /// Round-trip times of the whole measurement, microseconds.
        rtt: Buckets,
        /// Payload bytes echoed back during the measurement.
        bytes: u64,
        /// Failures by kind.
        errors: Errors,
        /// Connections made over the worker's life, by scheme and TLS handshake kind.
        #[serde(default)]
        connections: Errors,
        /// What the echoes carried and how lost connections were taken up (clients).
        #[serde(default)]
        stream: StreamStats,
        /// Forward mode: how the streams and sessions ended, the bulk transfers.
        #[serde(default)]
        forward: Box<ForwardStats>,
    },
    /// The worker heard `end`: from now on it counts no failure, so the relay may be stopped.
    Ended,
    /// The worker could not run at all.
    Fatal {
        /// Why.
        message: String,
    },
}

/// What the parent has said so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ctl {
    /// Set up, then wait.
    Wait,
    /// Start measuring.
    Go,
    /// The run is over: the relay is about to be stopped, so failures are no longer counted,
    /// but connections are held so that the relay closes first.
    End,
    /// Stop and exit (stdin closed).
    Stop,
}

/// Writes one event line on stdout.
pub fn emit(ev: &Event) {
    // A failed write means the parent is gone; the stop signal (stdin EOF) ends us then.
    if let Ok(line) = serde_json::to_string(ev) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Entry point of `hatch-loadtest worker`.
pub fn main() -> ExitCode {
    if let Err(e) = crate::proc::raise_nofile() {
        eprintln!("worker: {e:#}");
    }
    let mut first = String::new();
    if std::io::stdin().lock().read_line(&mut first).unwrap_or(0) == 0 {
        eprintln!("worker: no spec on stdin");
        return ExitCode::FAILURE;
    }
    let spec: Spec = match serde_json::from_str(&first) {
        Ok(s) => s,
        Err(e) => {
            emit(&Event::Fatal { message: format!("bad spec: {e}") });
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = watch::channel(Ctl::Wait);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.trim() == "go" => {
                    let _ = tx.send(Ctl::Go);
                }
                Ok(_) if line.trim() == "end" => {
                    let _ = tx.send(Ctl::End);
                }
                Ok(_) => {}
            }
        }
        let _ = tx.send(Ctl::Stop);
    });
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            emit(&Event::Fatal { message: format!("runtime: {e}") });
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let lifetime = match &spec {
        Spec::Clients(c) => c.lifetime_s,
        Spec::Agents(a) => a.lifetime_s,
    };
    let res = local.block_on(&rt, async move {
        let work = async {
            match spec {
                Spec::Clients(c) => crate::sim::run_clients(c, rx).await,
                Spec::Agents(a) => crate::sim::run_agents(a, rx).await,
            }
        };
        match tokio::time::timeout(std::time::Duration::from_secs_f64(lifetime), work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("lifetime of {lifetime} s reached")),
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(&Event::Fatal { message: format!("{e:#}") });
            ExitCode::FAILURE
        }
    }
}
