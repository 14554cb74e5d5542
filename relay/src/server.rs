//! One relay process: the control plane (API on its own tokio runtime thread) wired to the
//! data plane (shards), started together and stopped together.
//!
//! ```text
//!   Server::start ─┬─ store (SQLite file in the data dir), signing keys (data dir/keys)
//!                  ├─ data plane shards ── DataEvent channel ──▶ control plane tasks
//!                  └─ "hatch-control" thread: tokio runtime, API listener, agent channels
//!   Server::shutdown(drain): API stops accepting → data plane drains (4009) → its events are
//!                  recorded → sessions still open recorded as relay_shutdown
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::control::http::TlsSlot;
use crate::control::store::Store;
use crate::control::{ControlConfig, ControlPlane, DataLink, signing};
use crate::data::{DataArgs, DataPlane};
use crate::plane::DataCommand;

/// Most blocking threads of the control plane's runtime (see where it is built).
const STORE_THREADS: usize = 4;

/// ALPN of the API: HTTP/1.1 only (WebSocket upgrades need it).
const API_ALPN: &[&[u8]] = &[b"http/1.1"];

/// Everything a relay process needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory: store file, signing keys.
    pub data_dir: PathBuf,
    /// `--store`: a PostgreSQL URL; `None` is the SQLite file in the data directory.
    pub store: Option<String>,
    /// Where the API listens (port 0 picks one).
    pub api_listen: SocketAddr,
    /// Where the data plane listens (port 0 picks one).
    pub data_listen: SocketAddr,
    /// Certificate and key PEM files; `None` serves both planes plaintext (`serve
    /// --danger-plaintext`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Control-plane settings (the data port is filled in once the data plane is bound).
    pub control: ControlConfig,
    /// Data-plane settings. `--danger-plaintext` in them turns TLS off on the data plane; the
    /// API keeps TLS when `tls` is given (`dev --danger-plaintext`, the load test).
    pub data: DataArgs,
}

/// The control plane's handle on the data plane; taken out at shutdown.
struct PlaneLink(std::sync::Mutex<Option<DataPlane>>);

impl PlaneLink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<DataPlane>> {
        // Holds only the handle; a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DataLink for PlaneLink {
    fn command(&self, cmd: DataCommand) {
        if let Some(p) = self.lock().as_ref() {
            p.command(cmd);
        }
    }

    fn metrics(&self) -> String {
        self.lock().as_ref().map(DataPlane::metrics).unwrap_or_default()
    }
}

/// A running relay. Shuts down on [`Server::shutdown`] or on drop (with no drain).
pub struct Server {
    api_addr: SocketAddr,
    data_addr: SocketAddr,
    tls_files: Option<(PathBuf, PathBuf)>,
    api_tls: TlsSlot,
    /// The data plane serves TLS (a certificate reload reaches it too).
    data_tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<Duration>>,
    thread: Option<std::thread::JoinHandle<()>>,
    control: ControlPlane,
    plane: Arc<PlaneLink>,
}

/// `scheme://host:port` for a listener at `addr`: an unspecified address (`0.0.0.0`, `::`)
/// names this host by its name, as other nodes of a fleet would reach it (`--public-api-url`
/// and `--public-data-url` say otherwise).
fn base_url(scheme: &str, addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| {
                !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            })
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{scheme}://{host}:{}", addr.port())
    } else {
        format!("{scheme}://{addr}")
    }
}

/// The store file inside a data directory.
pub fn store_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("hatch.db")
}

/// Creates the data directory (0700) if needed, or takes group and other access away from
/// one that has it: it holds the store and the signing keys.
pub fn ensure_data_dir(data_dir: &std::path::Path) -> anyhow::Result<()> {
    crate::certs::private_dir(data_dir)
        .with_context(|| format!("data directory {}", data_dir.display()))
}

impl Server {
    /// Starts the relay: opens the store, loads or creates the signing key, binds both
    /// listeners and spawns the control-plane thread. Returns once both are listening.
    pub fn start(cfg: ServerConfig) -> anyhow::Result<Server> {
        ensure_data_dir(&cfg.data_dir)?;
        let store: Arc<dyn Store> =
            crate::control::store::open(cfg.store.as_deref(), &cfg.data_dir)?.into();
        let (signer, verifier) = if store.shared() {
            signing::load_shared(store.as_ref(), &cfg.data_dir)?
        } else {
            signing::load_or_create(&cfg.data_dir)?
        };
        let node_id = crate::control::fleet::node_id(&cfg.data_dir)?;
        let tls = cfg.tls.clone();
        let (api_tls, data_tls) = match &tls {
            Some((cert, key)) => {
                // One configuration, and so one TLS session cache, for the API and the data
                // plane: a client's data leg can resume the session of its API call.
                let c = crate::certs::server_config(cert, key, API_ALPN)?;
                let data = (!cfg.data.danger_plaintext).then(|| c.clone());
                if data.is_none() {
                    warn!(
                        "serving the data plane WITHOUT TLS (--danger-plaintext); the API keeps TLS"
                    );
                }
                (TlsSlot::tls(c), data)
            }
            None => {
                warn!("serving the API and the data plane WITHOUT TLS (--danger-plaintext)");
                (TlsSlot::danger_plaintext(), None)
            }
        };
        let data_is_tls = data_tls.is_some();

        let api_std = std::net::TcpListener::bind(cfg.api_listen)
            .with_context(|| format!("binding the API listener on {}", cfg.api_listen))?;
        api_std.set_nonblocking(true)?;
        let api_addr = api_std.local_addr()?;

        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut data_cfg = cfg.data.to_config(cfg.data_listen, data_tls);
        // The console's pages come from the API listener: they may open stream legs.
        let api_scheme = if tls.is_some() { "https" } else { "http" };
        data_cfg.origins.api = Some((api_scheme, api_addr.port()));
        if let Some(u) = &cfg.control.public_api_url {
            data_cfg.origins.allowed.push(crate::control::console_origin(u));
        }
        data_cfg.recording_dir = Some(crate::recording::dir_of(&cfg.data_dir));
        let plane =
            DataPlane::start(data_cfg, verifier, events_tx).context("starting the data plane")?;
        let data_addr = plane.local_addr();
        let plane = Arc::new(PlaneLink(std::sync::Mutex::new(Some(plane))));
        let data: Arc<dyn DataLink> = plane.clone();

        let mut control_cfg = cfg.control.clone();
        control_cfg.data_port = data_addr.port();
        control_cfg.audit_file = Some(cfg.data_dir.join(crate::control::audit::FILE));
        control_cfg.data_scheme = if data_is_tls { "wss" } else { "ws" };
        control_cfg.node = crate::control::fleet::NodeSelf {
            id: node_id,
            api_url: control_cfg
                .public_api_url
                .clone()
                .unwrap_or_else(|| base_url(api_scheme, api_addr)),
            data_url: control_cfg
                .public_data_url
                .as_deref()
                .map(|u| u.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| base_url(control_cfg.data_scheme, data_addr)),
        };
        // One window for both planes: the data plane keeps detached sessions for it, the
        // control plane keeps a restart's paired sessions resumable for it.
        control_cfg.resume_window = Duration::from_secs(cfg.data.resume_window);
        control_cfg.recording_dir = Some(crate::recording::dir_of(&cfg.data_dir));
        let control = ControlPlane::new(control_cfg, store, signer, data)?;

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Duration>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread_control = control.clone();
        let thread_tls = api_tls.clone();
        let thread_plane = plane.clone();
        let thread = std::thread::Builder::new()
            .name("hatch-control".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    // The blocking pool runs the store's calls, which take turns on one SQLite
                    // connection: tokio's default of up to 512 threads let a burst of API
                    // requests start a thread each (stack page faults) only to park them on
                    // the store's mutex (futex wake-ups), about a fifth of the relay's CPU
                    // per session setup. A few threads keep the store busy; the rest queue.
                    .max_blocking_threads(STORE_THREADS)
                    .thread_name("hatch-control")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(api_std) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let events_done = thread_control.spawn_tasks(events_rx);
                    let stop_api = CancellationToken::new();
                    let api_control = thread_control.clone();
                    let stop = stop_api.clone();
                    let api = tokio::spawn(async move {
                        api_control.serve_api(listener, thread_tls, stop).await
                    });
                    let _ = ready_tx.send(Ok(()));
                    let drain = stop_rx.await.unwrap_or(Duration::ZERO);
                    stop_api.cancel();
                    let _ = api.await;
                    info!(drain_s = drain.as_secs_f64(), "relay shutting down");
                    let taken = thread_plane.lock().take();
                    if let Some(p) = taken {
                        // Joins the shard threads: blocking, so off the executor.
                        let _ = tokio::task::spawn_blocking(move || p.shutdown(drain)).await;
                    }
                    // Every event sender died with the shards: record what they reported.
                    let _ = tokio::time::timeout(Duration::from_secs(30), events_done).await;
                    thread_control.shutdown().await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("spawning the control-plane thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.context("starting the control plane"));
            }
            Err(_) => {
                let _ = thread.join();
                anyhow::bail!("the control-plane thread died while starting");
            }
        }
        info!(api = %api_addr, data = %data_addr, "relay listening");
        Ok(Server {
            api_addr,
            data_addr,
            tls_files: tls,
            api_tls,
            data_tls: data_is_tls,
            stop: Some(stop_tx),
            thread: Some(thread),
            control,
            plane,
        })
    }

    /// The API's bound address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The data plane's bound address.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The control plane (for in-process tools and tests).
    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    /// Re-reads the certificate and key files (SIGHUP); live connections keep theirs.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        let Some((cert, key)) = &self.tls_files else { return Ok(()) };
        let cfg = crate::certs::server_config(cert, key, API_ALPN)?;
        self.api_tls.replace(cfg.clone());
        // A plaintext data plane stays plaintext: its URLs say `ws://`.
        if self.data_tls
            && let Some(p) = self.plane.lock().as_ref()
        {
            p.reload_tls(cfg);
        }
        info!(cert = %cert.display(), "certificate reloaded");
        Ok(())
    }

    /// Stops accepting, lets the data plane drain for up to `drain`, records what is left,
    /// and joins the threads.
    pub fn shutdown(mut self, drain: Duration) {
        self.stop_and_join(drain);
    }

    fn stop_and_join(&mut self, drain: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(drain);
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("control-plane thread panicked");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join(Duration::ZERO);
    }
}
