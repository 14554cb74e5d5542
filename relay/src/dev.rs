//! `hatch-relay dev` and the in-process relay of tests and the load test: a data directory
//! with a generated CA and server certificate, a demo account with an owner access key and an
//! activation, the whole relay started on the given addresses, and `dev.json` describing it.
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let relay = hatch_relay::dev::DevRelay::start(hatch_relay::dev::DevOptions {
//!     data_dir: dir.path().to_owned(),
//!     ..Default::default()
//! })
//! .unwrap();
//! println!("{}", relay.info.api_url);
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::control::{ControlConfig, iam, live::Limits};
use crate::data::DataArgs;
use crate::server::{Server, ServerConfig};

/// What a development relay is, as written to `dev.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevInfo {
    /// `https://127.0.0.1:PORT`.
    pub api_url: String,
    /// `wss://127.0.0.1:PORT`.
    pub data_url: String,
    /// The demo account.
    pub account_id: String,
    /// The demo account owner's access key.
    pub access_key: String,
    /// An activation of the demo account (region `local`, 100,000 registrations, 30 days).
    pub activation_id: String,
    /// Its code.
    pub activation_code: String,
    /// The CA certificate to trust (absolute path).
    pub ca_file: String,
}

/// How to start a development relay.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Data directory (created if needed): store, keys, certificates, `dev.json`.
    pub data_dir: PathBuf,
    /// `--store`: a PostgreSQL URL; `None` is the SQLite file in the data directory.
    pub store: Option<String>,
    /// API address; port 0 picks one.
    pub api_listen: SocketAddr,
    /// Data-plane address; port 0 picks one.
    pub data_listen: SocketAddr,
    /// Region of the demo activation and of this relay.
    pub region: String,
    /// Open-session limits.
    pub limits: Limits,
    /// Agent heartbeat interval (the deadline is three times it).
    pub heartbeat_interval: Duration,
    /// How long a new session may wait for both legs before it is closed as `pair_timeout`.
    pub pending_timeout: Duration,
    /// How long closed session records are kept (zero: forever).
    pub session_retention: Duration,
    /// How long session recordings are kept (zero: forever).
    pub recording_retention: Duration,
    /// Most connections the API listener holds at once.
    pub max_api_connections: usize,
    /// Base URL of the data plane in stream URLs (`--public-data-url`); by default the host
    /// the caller used for the API, with the data port.
    pub public_data_url: Option<String>,
    /// The bearer token `GET /metrics` takes (`--metrics-token-file`).
    pub metrics_token: Option<String>,
    /// A fleet node's public API URL (`--public-api-url`).
    pub public_api_url: Option<String>,
    /// Silence after which another fleet node expires this one (`--node-timeout`).
    pub node_timeout: Duration,
    /// Extra data-plane flags, as on the command line (`["--shards", "2", "--io", "epoll"]`).
    pub data_args: Vec<String>,
    /// Data-plane options already parsed (wins over `data_args`).
    pub data: Option<DataArgs>,
}

/// Parses data-plane flags given as strings.
fn parse_data_args(args: &[String]) -> anyhow::Result<DataArgs> {
    #[derive(clap::Parser)]
    struct Only {
        #[command(flatten)]
        data: DataArgs,
    }
    let argv = std::iter::once("data-plane".to_owned()).chain(args.iter().cloned());
    Ok(<Only as clap::Parser>::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("data-plane options {args:?}: {e}"))?
        .data)
}

impl Default for DevOptions {
    fn default() -> Self {
        let c = ControlConfig::default();
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        DevOptions {
            data_dir: PathBuf::from("hatch-dev"),
            store: None,
            api_listen: SocketAddr::new(lo, 0),
            data_listen: SocketAddr::new(lo, 0),
            region: c.region,
            limits: c.limits,
            heartbeat_interval: c.heartbeat_interval,
            pending_timeout: c.pending_timeout,
            session_retention: c.session_retention,
            recording_retention: c.recording_retention,
            max_api_connections: c.max_api_connections,
            public_data_url: None,
            metrics_token: None,
            public_api_url: None,
            node_timeout: c.node_timeout,
            data_args: Vec::new(),
            data: None,
        }
    }
}

/// A running development relay; shuts down when dropped.
pub struct DevRelay {
    /// What it is (also in `dev.json`).
    pub info: DevInfo,
    server: Option<Server>,
    data_dir: PathBuf,
}

/// The demo account's name.
const DEMO_ACCOUNT: &str = "demo";
/// Registrations allowed by the demo activation (load tests register many agents).
const DEMO_REGISTRATIONS: u32 = 100_000;
/// Lifetime of the demo activation.
const DEMO_ACTIVATION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

fn url_host(addr: SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".into(),
        ip if ip.is_unspecified() => "[::1]".into(),
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

impl DevRelay {
    /// Creates what is missing in the data directory, starts the relay and writes `dev.json`.
    pub fn start(opts: DevOptions) -> anyhow::Result<DevRelay> {
        crate::server::ensure_data_dir(&opts.data_dir)?;
        let data_dir = std::fs::canonicalize(&opts.data_dir)
            .with_context(|| format!("resolving {}", opts.data_dir.display()))?;
        let pki = crate::certs::ensure_dev_pki(&data_dir.join("tls"), &[])?;
        let demo = ensure_demo(&data_dir, opts.store.as_deref(), &opts.region)?;
        let control = ControlConfig {
            region: opts.region.clone(),
            limits: opts.limits,
            heartbeat_interval: opts.heartbeat_interval,
            heartbeat_timeout: opts.heartbeat_interval * 3,
            pending_timeout: opts.pending_timeout,
            session_retention: opts.session_retention,
            recording_retention: opts.recording_retention,
            max_api_connections: opts.max_api_connections,
            public_data_url: opts.public_data_url.clone(),
            metrics_token: opts.metrics_token.clone(),
            public_api_url: opts.public_api_url.clone(),
            node_timeout: opts.node_timeout,
            ..ControlConfig::default()
        };
        let data = match &opts.data {
            Some(d) => d.clone(),
            None => parse_data_args(&opts.data_args)?,
        };
        // `--danger-plaintext` turns TLS off on the data plane only (the load test's plaintext
        // runs); the API, and with it the agents' control channels, keep TLS.
        let data_scheme = if data.danger_plaintext { "ws" } else { "wss" };
        let server = Server::start(ServerConfig {
            data_dir: data_dir.clone(),
            store: opts.store.clone(),
            api_listen: opts.api_listen,
            data_listen: opts.data_listen,
            tls: Some((pki.cert_file.clone(), pki.key_file.clone())),
            control,
            data,
        })?;
        let info = DevInfo {
            api_url: format!(
                "https://{}:{}",
                url_host(server.api_addr()),
                server.api_addr().port()
            ),
            data_url: format!(
                "{data_scheme}://{}:{}",
                url_host(server.data_addr()),
                server.data_addr().port()
            ),
            account_id: demo.account_id,
            access_key: demo.access_key,
            activation_id: demo.activation_id,
            activation_code: demo.activation_code,
            ca_file: pki.ca_file.display().to_string(),
        };
        // Written whole under another name and renamed: whoever waits for dev.json (scripts,
        // the e2e suite) never reads a half-written one. It is written only now, with both
        // listeners up and (in `hatch-relay dev`) the signal handlers installed.
        let tmp = data_dir.join("dev.json.tmp");
        crate::certs::write_private(
            &tmp,
            format!("{}\n", serde_json::to_string_pretty(&info)?).as_bytes(),
        )?;
        std::fs::rename(&tmp, data_dir.join("dev.json"))
            .with_context(|| format!("renaming {} to dev.json", tmp.display()))?;
        Ok(DevRelay { info, server: Some(server), data_dir })
    }

    /// The data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The relay itself.
    pub fn server(&self) -> &Server {
        // Present from `start` until drop.
        self.server.as_ref().expect("server present until drop")
    }

    /// Stops the relay, letting live sessions drain for up to `drain`.
    pub fn shutdown(mut self, drain: Duration) {
        if let Some(s) = self.server.take() {
            s.shutdown(drain);
        }
    }
}

impl Drop for DevRelay {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::ZERO);
        }
    }
}

struct Demo {
    account_id: String,
    access_key: String,
    activation_id: String,
    activation_code: String,
}

/// Reuses the demo account of an earlier `dev.json` when the store still has it, else creates
/// one with an owner key and an activation.
fn ensure_demo(data_dir: &Path, store: Option<&str>, region: &str) -> anyhow::Result<Demo> {
    let store = crate::control::store::open(store, data_dir)?;
    if let Ok(text) = std::fs::read_to_string(data_dir.join("dev.json"))
        && let Ok(old) = serde_json::from_str::<DevInfo>(&text)
        && store.account(&old.account_id)?.is_some()
        && store.access_key_owner(&crate::control::credentials::hash(&old.access_key))?.is_some()
    {
        return Ok(Demo {
            account_id: old.account_id,
            access_key: old.access_key,
            activation_id: old.activation_id,
            activation_code: old.activation_code,
        });
    }
    let account = iam::create_account(store.as_ref(), DEMO_ACCOUNT)?;
    let (_, access_key) = iam::create_access_key(store.as_ref(), &account.id, None)?;
    let (act, code) = iam::create_activation(
        store.as_ref(),
        &account.id,
        region,
        Default::default(),
        DEMO_REGISTRATIONS,
        DEMO_ACTIVATION_LIFETIME,
    )?;
    Ok(Demo { account_id: account.id, access_key, activation_id: act.id, activation_code: code })
}
