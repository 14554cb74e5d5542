//! The data plane: N shards pairing client and agent WSS legs and forwarding frames between
//! them.
//!
//! ```text
//!            SO_REUSEPORT (one listener per shard)
//!  leg ──▶ shard k: TLS + upgrade + token ──(owner = hash(sid) % N)──▶ shard j: pair, forward
//!                                 ▲ handoff: fd, TLS state, unread plaintext (bounded channel)
//!  control plane ── DataCommand ──▶ shards ── DataEvent (connected, ended) ──▶ control plane
//! ```
//!
//! Each shard is a thread with a single-threaded runtime (plain tokio or tokio-uring, see
//! [`io`]); everything inside a shard is `Rc`/`Cell`, and shards talk only through channels.
//! Pairing ([`pair`]), forwarding ([`forward`]) and TLS ([`tls`]) are written once above the
//! I/O interface. What it does not do: parse the `hatch.v1` messages it forwards (except to tell
//! an agent's normal close, and the recording tap of a recorded session, [`record`]), buffer
//! more than one read per direction, or log per frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::plane::{DataCommand, DataEvent};
use crate::token::TokenVerifier;

pub mod conn;
pub mod error;
pub mod io;
pub mod metrics;
pub mod pool;
pub mod pump;
pub mod record;
pub mod session;
pub mod shard;
pub mod tls;
pub mod upgrade;

/// Listen backlog of each shard's socket.
const BACKLOG: i32 = 4096;

/// Which I/O backend the shards run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoBackend {
    /// io_uring through tokio-uring (falls back to epoll where io_uring is unavailable).
    Uring,
    /// Plain tokio (epoll).
    Epoll,
}

/// Data plane configuration.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// Address every shard listens on (port 0: any, the same for all shards).
    pub listen: SocketAddr,
    /// Number of shards (threads).
    pub shards: usize,
    /// I/O backend.
    pub io: IoBackend,
    /// Pin shard `i` to core `i % cores`.
    pub pin_cores: bool,
    /// TLS configuration; `None` serves plain WS (`--danger-plaintext`, benchmarks only).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How long the first leg waits for its peer (then 4004).
    pub pair_timeout: Duration,
    /// TLS handshake plus upgrade request deadline.
    pub handshake_timeout: Duration,
    /// No client → agent data for this long closes the session with 4007.
    pub idle_timeout: Option<Duration>,
    /// Longest session (4008).
    pub max_duration: Option<Duration>,
    /// Drain period on shutdown before legs are closed with 4009.
    pub drain: Duration,
    /// A leg silent this long is pinged.
    pub ping_interval: Duration,
    /// A leg silent this long is dead.
    pub dead_after: Duration,
    /// Largest frame payload (above it: close 1009).
    pub max_payload: u64,
    /// How long a paired session that lost a leg is kept for both sides to put up new legs
    /// (`detached`); `None`: a lost leg ends the session.
    pub resume_window: Option<Duration>,
    /// Which browser pages may open legs (the console's origin); legs without `Origin` (not
    /// from a browser) are not affected.
    pub origins: upgrade::Origins,
    /// Where recorded sessions' recordings go (`<data dir>/recordings`); `None`: no recorder,
    /// and a session whose token says it is recorded ends with 4018.
    pub recording_dir: Option<std::path::PathBuf>,
}

impl DataConfig {
    /// Defaults of DESIGN.md for `listen`, with the given TLS configuration.
    pub fn new(listen: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        DataConfig {
            listen,
            shards: default_shards(),
            io: IoBackend::Epoll,
            pin_cores: false,
            tls,
            pair_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(20 * 60)),
            max_duration: None,
            drain: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            dead_after: Duration::from_secs(90),
            max_payload: hatch_proto::frame::DEFAULT_MAX_PAYLOAD,
            resume_window: Some(Duration::from_secs(600)),
            origins: upgrade::Origins::default(),
            recording_dir: None,
        }
    }
}

/// Shard `id`'s recording writer: one per shard, so that a session's bytes stay on its owner
/// shard's thread up to the writer's queue and the SHA-256 chain scales with the shards. A
/// directory that cannot be created is logged; the shard then has no recorder and ends the
/// sessions that must be recorded (4018) rather than run them unrecorded.
fn spawn_recorder(
    dir: Option<&std::path::Path>,
    id: usize,
) -> Option<(crate::recording::Recorder, mpsc::UnboundedReceiver<crate::recording::Outcome>)> {
    let dir = dir?;
    let (tx, rx) = mpsc::unbounded_channel();
    match crate::recording::Recorder::spawn(crate::recording::RecorderConfig::new(dir), tx) {
        Ok(r) => Some((r, rx)),
        Err(err) => {
            warn!(shard = id, dir = %dir.display(), %err, "recording directory unusable");
            None
        }
    }
}

fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Data plane command-line options (flattened into `hatch-relay serve` and `dev`).
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Data plane shards (threads); default: available cores.
    #[arg(long)]
    pub shards: Option<usize>,
    /// I/O backend; `uring` falls back to `epoll` with a warning where io_uring is disabled.
    #[arg(long, value_enum, default_value = "epoll")]
    pub io: IoBackend,
    /// Pin shard threads to cores.
    #[arg(long)]
    pub pin_cores: bool,
    /// Seconds the first leg of a session waits for the other (then close 4004).
    #[arg(long, default_value_t = 60)]
    pub pair_timeout: u64,
    /// Seconds for the TLS handshake and upgrade request.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Seconds without client input before closing with 4007; 0 = off.
    #[arg(long, default_value_t = 1200)]
    pub idle_timeout: u64,
    /// Longest session in seconds (4008); 0 = off.
    #[arg(long, default_value_t = 0)]
    pub max_duration: u64,
    /// Seconds to let sessions finish on SIGTERM before closing them with 4009.
    #[arg(long, default_value_t = 10)]
    pub drain: u64,
    /// Seconds of silence after which a leg is pinged.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub ping_interval: u64,
    /// Seconds of silence after which a leg is dead (lost: the session detaches or ends).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..))]
    pub dead_after: u64,
    /// Seconds a session that lost a leg (no close frame, silence, a relay restart) is kept
    /// for both sides to resume it; then it ends with the reason it would have ended with.
    /// 0 = off: a lost leg ends the session.
    #[arg(long, default_value_t = 600)]
    pub resume_window: u64,
    /// Serve plain WS without TLS. Benchmarks on loopback only.
    #[arg(long)]
    pub danger_plaintext: bool,
    /// Another origin (`https://host[:port]`) whose pages may open stream legs, besides the
    /// relay's own console (the API's port on the host the browser used, and
    /// --public-api-url): the console behind a proxy under another name. Repeatable.
    #[arg(long = "console-origin", value_name = "ORIGIN")]
    pub console_origins: Vec<String>,
}

impl DataArgs {
    /// The configuration these options describe (`tls` is ignored with `--danger-plaintext`).
    pub fn to_config(
        &self,
        listen: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> DataConfig {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        let mut c = DataConfig::new(listen, if self.danger_plaintext { None } else { tls });
        c.shards = self.shards.unwrap_or_else(default_shards).max(1);
        c.io = self.io;
        c.pin_cores = self.pin_cores;
        c.pair_timeout = Duration::from_secs(self.pair_timeout.max(1));
        c.handshake_timeout = Duration::from_secs(self.handshake_timeout.max(1));
        c.idle_timeout = secs(self.idle_timeout);
        c.max_duration = secs(self.max_duration);
        c.resume_window = secs(self.resume_window);
        c.ping_interval = Duration::from_secs(self.ping_interval);
        c.dead_after = Duration::from_secs(self.dead_after.max(self.ping_interval + 1));
        c.drain = Duration::from_secs(self.drain);
        c.origins.allowed =
            self.console_origins.iter().map(|o| o.trim_end_matches('/').to_owned()).collect();
        c
    }
}

/// The running data plane.
pub struct DataPlane {
    addr: SocketAddr,
    backend: IoBackend,
    ctrl: Vec<mpsc::UnboundedSender<shard::Ctrl>>,
    threads: Vec<JoinHandle<()>>,
    metrics: Vec<Arc<metrics::ShardMetrics>>,
}

impl DataPlane {
    /// Binds one listener per shard and starts the shard threads.
    pub fn start(
        cfg: DataConfig,
        verifier: TokenVerifier,
        events: mpsc::UnboundedSender<DataEvent>,
    ) -> anyhow::Result<DataPlane> {
        let mut cfg = cfg;
        cfg.shards = cfg.shards.max(1);
        if cfg.io == IoBackend::Uring
            && let Err(err) = io::uring::probe()
        {
            warn!(%err, "io_uring unavailable; falling back to --io epoll");
            cfg.io = IoBackend::Epoll;
        }
        if cfg.tls.is_none() {
            warn!("data plane serving plain WS (--danger-plaintext): benchmarks on loopback only");
        }
        let n = cfg.shards;
        let mut listeners = Vec::with_capacity(n);
        let mut addr = cfg.listen;
        for _ in 0..n {
            let l = bind(addr).with_context(|| format!("binding data listener {addr}"))?;
            addr = l.local_addr()?;
            listeners.push(l);
        }
        let cfg = Arc::new(cfg);
        let mut handoff_tx = Vec::with_capacity(n);
        let mut handoff_rx = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(1024);
            handoff_tx.push(tx);
            handoff_rx.push(rx);
        }
        let cores = if cfg.pin_cores { core_affinity::get_core_ids() } else { None };
        let mut plane = DataPlane {
            addr,
            backend: cfg.io,
            ctrl: Vec::new(),
            threads: Vec::new(),
            metrics: Vec::new(),
        };
        for (id, (listener, handoffs)) in listeners.into_iter().zip(handoff_rx).enumerate() {
            let (ctx, crx) = mpsc::unbounded_channel();
            let m = Arc::new(metrics::ShardMetrics::default());
            let init = shard::ShardInit {
                id,
                cfg: cfg.clone(),
                verifier: verifier.clone(),
                events: events.clone(),
                metrics: m.clone(),
                listener,
                ctrl: crx,
                handoffs,
                peers: handoff_tx.clone(),
                recorder: spawn_recorder(cfg.recording_dir.as_deref(), id),
            };
            let core = cores.as_ref().filter(|c| !c.is_empty()).map(|c| c[id % c.len()]);
            let backend = cfg.io;
            let t = std::thread::Builder::new()
                .name(format!("hatch-data-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    run_shard(backend, init);
                })
                .context("spawning shard thread")?;
            plane.ctrl.push(ctx);
            plane.threads.push(t);
            plane.metrics.push(m);
        }
        info!(%addr, shards = n, io = ?plane.backend, "data plane listening");
        Ok(plane)
    }

    /// The bound address (all shards share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend actually running (after any fallback).
    pub fn backend(&self) -> IoBackend {
        self.backend
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.ctrl.len()
    }

    /// Sends a command to the session's owner shard.
    pub fn command(&self, cmd: DataCommand) {
        let DataCommand::Terminate { session_id, .. } = &cmd;
        let owner = shard::owner_of(session_id, self.ctrl.len());
        let _ = self.ctrl[owner].send(shard::Ctrl::Command(cmd));
    }

    /// Replaces the certificate for new connections; live sessions keep theirs.
    pub fn reload_tls(&self, cfg: Arc<rustls::ServerConfig>) {
        for c in &self.ctrl {
            let _ = c.send(shard::Ctrl::ReloadTls(cfg.clone()));
        }
    }

    /// Prometheus text of the per-shard counters.
    pub fn metrics(&self) -> String {
        metrics::render(&self.metrics)
    }

    /// Stops accepting, lets sessions run for up to `drain`, closes the rest with 4009
    /// (reported as `relay_shutdown`) and joins the shard threads. Blocks the calling thread.
    pub fn shutdown(mut self, drain: Duration) {
        self.stop(drain);
    }

    fn stop(&mut self, drain: Duration) {
        for c in &self.ctrl {
            let _ = c.send(shard::Ctrl::Shutdown(drain));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

fn run_shard(backend: IoBackend, init: shard::ShardInit) {
    if backend == IoBackend::Uring {
        match io::uring::runtime() {
            Ok(rt) => return rt.block_on(shard::run::<io::uring::UringListener>(init)),
            Err(err) => warn!(%err, "io_uring ring setup failed; shard falls back to epoll"),
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            warn!(%err, "cannot build shard runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, shard::run::<io::epoll::EpollListener>(init));
}
