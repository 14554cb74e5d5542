//! The `hatch-relay` command line: `serve`, `dev`, `admin ...`. [`run`] is the whole program,
//! so that `main.rs` stays thin and the load test can run a relay by re-executing itself.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::control::live::{Limits, Rate};
use crate::control::store::{RecordingMode, SqliteStore, StateFilter, Store};
use crate::control::{ControlConfig, iam, signing};
use crate::data::DataArgs;
use crate::dev::{DevOptions, DevRelay};
use crate::server::{Server, ServerConfig, store_path};

/// Exit code for usage errors (BSD sysexits EX_USAGE), as the CLI uses.
const EXIT_USAGE: u8 = 64;

/// hatch-relay: the Hatch relay (data plane + control plane) and its administration.
#[derive(Debug, Parser)]
#[command(name = "hatch-relay", version, about)]
pub struct Cli {
    /// Log lines as text (colour only when stderr is a terminal) or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "HATCH_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when stderr is a terminal.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`), for log
    /// shippers.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay with a certificate from PEM files.
    Serve(ServeArgs),
    /// Run a development relay: generated CA and certificate, demo account, printed next steps.
    Dev(DevArgs),
    /// Manage accounts, users, keys, policies, activations, instances and sessions in the store.
    Admin(AdminArgs),
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// Data directory: store file, signing keys.
    #[arg(long, env = "HATCH_DATA_DIR")]
    data_dir: PathBuf,
    /// The store: a PostgreSQL URL (`postgres://user:password@host:5432/db`, libpq's form)
    /// shared by the relays of a fleet; by default the SQLite file `hatch.db` in the data
    /// directory.
    #[arg(long, env = "HATCH_STORE", value_name = "URL")]
    store: Option<String>,
    /// API address (port 0 picks a free one).
    #[arg(long, default_value = "0.0.0.0:7444")]
    api_listen: SocketAddr,
    /// Data-plane address (port 0 picks a free one).
    #[arg(long, default_value = "0.0.0.0:7443")]
    data_listen: SocketAddr,
    /// Region of this relay.
    #[arg(long, default_value = "local")]
    region: String,
    /// Public base URL of the data plane in stream URLs (e.g. wss://relay.example.com:7443);
    /// by default the host the caller used for the API, with the data port.
    #[arg(long)]
    public_data_url: Option<String>,
    /// Public base URL of the API (e.g. https://relay-1.example.com:7444), as this node
    /// registers itself in a fleet; by default the API listener's address.
    #[arg(long)]
    public_api_url: Option<String>,
    /// Seconds a fleet node (a relay on a shared PostgreSQL store) may miss heartbeats before
    /// another node expires it and closes its sessions as node_lost.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
    node_timeout: u64,
    /// Most open sessions per instance (beyond: Throttled).
    #[arg(long, default_value_t = 1000)]
    max_sessions_per_instance: usize,
    /// Most open sessions per account (beyond: Throttled).
    #[arg(long, default_value_t = 20_000)]
    max_sessions_per_account: usize,
    /// Most open sessions per user, and for the account owner (beyond: Throttled).
    #[arg(long, default_value_t = 100)]
    max_sessions_per_user: usize,
    /// Session starts per second per access key, on average (beyond: Throttled with
    /// Retry-After); 0 turns the limit off.
    #[arg(long, default_value_t = 20.0, value_parser = non_negative)]
    session_rate: f64,
    /// Session starts allowed at once per access key, on top of the rate.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    session_burst: u32,
    /// Seconds a new session may wait for both its legs; then it is closed as pair_timeout
    /// and its slot under the limits is free again.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pending_timeout: u64,
    /// Days closed session records are kept in the store; 0 keeps them forever.
    #[arg(long, default_value_t = 90)]
    session_retention: u64,
    /// Days session recordings are kept, counted from their last record (fractions allowed);
    /// 0 keeps them forever. Recordings of live sessions are never deleted.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    recording_retention: f64,
    /// Most connections the API listener holds at once, agents' control channels included;
    /// beyond it new connections are reset.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    max_api_connections: u64,
    /// A file holding the bearer token `GET /metrics` takes (at least 16 characters; read at
    /// start). Without it, `/metrics` answers loopback peers only.
    #[arg(long)]
    metrics_token_file: Option<PathBuf>,
}

/// The `--metrics-token-file` token: the file's first line, at least 16 characters.
fn metrics_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --metrics-token-file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    anyhow::ensure!(
        token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic()),
        "--metrics-token-file {}: the token must be at least 16 printable characters",
        path.display()
    );
    Ok(token)
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of 0 or more")),
    }
}

impl RelayArgs {
    fn control(&self) -> anyhow::Result<ControlConfig> {
        let metrics_token = self.metrics_token_file.as_deref().map(metrics_token).transpose()?;
        Ok(ControlConfig {
            region: self.region.clone(),
            public_data_url: self.public_data_url.clone(),
            public_api_url: self.public_api_url.clone(),
            node_timeout: Duration::from_secs(self.node_timeout),
            limits: Limits {
                per_instance: self.max_sessions_per_instance,
                per_account: self.max_sessions_per_account,
                per_user: self.max_sessions_per_user,
                start_rate: Rate { per_sec: self.session_rate, burst: self.session_burst },
            },
            pending_timeout: Duration::from_secs(self.pending_timeout),
            session_retention: Duration::from_secs(self.session_retention.saturating_mul(86_400)),
            recording_retention: Duration::try_from_secs_f64(self.recording_retention * 86_400.0)
                .unwrap_or(Duration::MAX),
            max_api_connections: usize::try_from(self.max_api_connections).unwrap_or(usize::MAX),
            metrics_token,
            ..ControlConfig::default()
        })
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    relay: RelayArgs,
    /// Certificate chain (PEM), for the API and the data plane; re-read on SIGHUP.
    #[arg(long, required_unless_present = "danger_plaintext")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, required_unless_present = "danger_plaintext")]
    key: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, Args)]
struct DevArgs {
    #[command(flatten)]
    relay: RelayArgs,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Debug, Args)]
struct AdminArgs {
    /// Data directory of the relay (its store file is `hatch.db` in it).
    #[arg(long, env = "HATCH_DATA_DIR")]
    data_dir: PathBuf,
    /// The relay's PostgreSQL store, when it has one (as `serve --store`).
    #[arg(long, env = "HATCH_STORE", value_name = "URL", global = true)]
    store: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Accounts and their session-manager switch.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Users inside an account.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Access keys (owner or user).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Policy documents and their attachment to users.
    #[command(subcommand)]
    Policies(PoliciesCmd),
    /// Activations agents register with.
    #[command(subcommand)]
    Activations(ActivationsCmd),
    /// Registered instances.
    #[command(subcommand)]
    Instances(InstancesCmd),
    /// Sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Token signing keys.
    #[command(subcommand)]
    SigningKeys(SigningCmd),
    /// Session recordings (docs/RECORDING.md).
    #[command(subcommand)]
    Recordings(RecordingsCmd),
    /// Write a consistent copy of the store to FILE (owner-only), while the relay runs.
    Backup {
        /// The copy; must not exist (or be empty).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AccountsCmd {
    /// Create an account (session management on).
    Create { name: String },
    /// List accounts.
    List,
    /// Turn session management on for an account.
    Enable { account: String },
    /// Turn session management off: new sessions are refused (SessionManagerDisabled) and a
    /// running relay ends the live ones (4010) within its reconcile interval (2 s).
    Disable { account: String },
    /// Show or set an account's session preferences (sessions started afterwards): idle
    /// timeout and longest session in seconds, 0 for the relay's own (which are also caps),
    /// and session recording.
    Prefs {
        account: String,
        /// Idle timeout, seconds (0: the relay's --idle-timeout).
        #[arg(long)]
        idle_timeout: Option<u64>,
        /// Longest session, seconds (0: the relay's --max-duration).
        #[arg(long)]
        max_duration: Option<u64>,
        /// Session recording: off, output (what the sessions show) or full (and what is typed).
        #[arg(long, value_parser = recording_mode)]
        recording: Option<RecordingMode>,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCmd {
    /// Create a user.
    Create {
        #[arg(long)]
        account: String,
        name: String,
    },
    /// List users of an account.
    List {
        #[arg(long)]
        account: String,
    },
    /// Disable a user: their keys authenticate nothing, and a running relay ends their live
    /// sessions (4012) within its reconcile interval.
    Disable {
        #[arg(long)]
        account: String,
        /// User id or name.
        user: String,
    },
    /// Enable a disabled user again.
    Enable {
        #[arg(long)]
        account: String,
        /// User id or name.
        user: String,
    },
    /// Delete a user with their access keys and policy attachments; a running relay ends
    /// their live sessions (4012).
    Delete {
        #[arg(long)]
        account: String,
        /// User id or name.
        user: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Create an access key (printed once): the owner's, or a user's with --user.
    Create {
        #[arg(long)]
        account: String,
        /// User id or name; omit for an owner key.
        #[arg(long)]
        user: Option<String>,
    },
    /// List keys of an account.
    List {
        #[arg(long)]
        account: String,
    },
    /// Revoke a key by id (`ak-...`).
    Revoke { key_id: String },
}

#[derive(Debug, Subcommand)]
enum PoliciesCmd {
    /// Create or replace a policy from a JSON file (validated first).
    Put {
        #[arg(long)]
        account: String,
        name: String,
        file: PathBuf,
    },
    /// List policies of an account.
    List {
        #[arg(long)]
        account: String,
    },
    /// Attach a policy to a user.
    Attach {
        #[arg(long)]
        account: String,
        #[arg(long)]
        user: String,
        name: String,
    },
    /// Detach a policy from a user.
    Detach {
        #[arg(long)]
        account: String,
        #[arg(long)]
        user: String,
        name: String,
    },
    /// Delete a policy no user has attached.
    Delete {
        #[arg(long)]
        account: String,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum ActivationsCmd {
    /// Create an activation (code printed once).
    Create {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "local")]
        region: String,
        /// Tag for each instance, key=value (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// How many instances may register with it.
        #[arg(long, default_value_t = 1)]
        max_registrations: u32,
        /// Hours until it expires.
        #[arg(long, default_value_t = 24)]
        expires_in_hours: u64,
    },
    /// List activations.
    List {
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke an activation: no instance registers with it after (those that did stay).
    Revoke { activation_id: String },
}

#[derive(Debug, Subcommand)]
enum InstancesCmd {
    /// List instances.
    List {
        #[arg(long)]
        account: Option<String>,
    },
    /// Replace an instance's tags (key=value ...; none clears them).
    Tag { instance: String, tags: Vec<String> },
    /// Remove an instance: its agent can no longer connect. A running relay keeps an open
    /// control channel until it drops; `DELETE /v1/instances/{id}` closes it at once.
    Deregister { instance: String },
    /// Make an instance's secret worthless: its agent must register again. As with
    /// `deregister`, the API's `revoke-secret` also closes a live control channel.
    RevokeSecret { instance: String },
}

#[derive(Debug, Subcommand)]
enum SessionsCmd {
    /// List sessions, newest first.
    List {
        #[arg(long)]
        account: Option<String>,
        /// active, closed or all.
        #[arg(long, default_value = "all")]
        state: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Record a session as terminated; a running relay closes its legs (4006) within its
    /// reconcile interval (2 s).
    Terminate { session_id: String },
}

#[derive(Debug, Subcommand)]
enum RecordingsCmd {
    /// Check a session's recording record by record, and its end against the digest the store
    /// kept: prints `ok`, or names the first record that does not match; the exit code says
    /// which (docs/CLI.md).
    Verify { session_id: String },
}

/// Exit codes of `admin recordings verify` (docs/CLI.md), one per class of failure.
mod verify_exit {
    /// A record (or the header) was changed: it does not decode, its digest does not follow
    /// the chain, or its time goes back.
    pub const BROKEN: u8 = 3;
    /// The file ends inside a record or inside its header.
    pub const TRUNCATED: u8 = 4;
    /// The chain is whole but does not end at the digest the store kept (records cut off the
    /// end, or the file replaced by another).
    pub const FINAL_DIGEST: u8 = 5;
    /// The recording is missing or cannot be read.
    pub const UNREADABLE: u8 = 6;
}

/// An admin command's failure that has its own exit code (its message is printed as is).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct ExitWith {
    code: u8,
    message: String,
}

#[derive(Debug, Subcommand)]
enum SigningCmd {
    /// Add a new signing key; the relay signs with it after its next start.
    Rotate,
}

/// Runs `hatch-relay` with `args` (the first is the program name) and returns its exit code.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_tracing(cli.log_format);
    let res = match cli.command {
        Command::Serve(a) => serve(a, cli.log_format),
        Command::Dev(a) => dev(a),
        Command::Admin(a) => admin_cmd(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ExitWith>().is_some() => {
            let code = e.downcast_ref::<ExitWith>().map_or(1, |x| x.code);
            eprintln!("hatch-relay: {e}");
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("hatch-relay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second call (the load test running several relays in one process) keeps the first.
    let _ = match format {
        LogFormat::Json => fmt.json().try_init(),
        // No colour codes in a file or the journal.
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

/// The relay's SIGTERM, SIGINT and SIGHUP handlers.
///
/// Installed before the relay starts, so that from the first line that says it is listening
/// (and `dev.json`) a signal takes the drain path: a SIGTERM that came before the handlers
/// killed the process by the default action, with no drain and no store update. Signals that
/// arrive before [`Signals::wait`] are kept and acted on there.
struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let entered = rt.enter();
        let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        drop(entered);
        Ok(Signals { rt, term, int, hup })
    }

    /// Waits for SIGTERM or SIGINT; reloads the certificate on SIGHUP.
    fn wait(self, server: &Server) {
        let Signals { rt, mut term, mut int, mut hup } = self;
        rt.block_on(async {
            loop {
                tokio::select! {
                    _ = term.recv() => {
                        tracing::info!(signal = "SIGTERM", "stop requested; draining");
                        break;
                    }
                    _ = int.recv() => {
                        tracing::info!(signal = "SIGINT", "stop requested; draining");
                        break;
                    }
                    _ = hup.recv() => {
                        if let Err(e) = server.reload_tls() {
                            tracing::error!(err = %format!("{e:#}"), "certificate reload failed; keeping the old one");
                        }
                    }
                }
            }
        });
    }
}

fn serve(a: ServeArgs, log: LogFormat) -> anyhow::Result<()> {
    let tls = match (a.data.danger_plaintext, a.cert, a.key) {
        (true, _, _) => None,
        (false, Some(c), Some(k)) => Some((c, k)),
        _ => anyhow::bail!("--cert and --key are required (or --danger-plaintext)"),
    };
    let control = a.relay.control()?;
    let drain = Duration::from_secs(a.data.drain);
    let signals = Signals::install()?;
    let server = Server::start(ServerConfig {
        data_dir: a.relay.data_dir.clone(),
        store: a.relay.store.clone(),
        api_listen: a.relay.api_listen,
        data_listen: a.relay.data_listen,
        tls,
        control,
        data: a.data,
    })?;
    // In JSON, the "relay listening" log line says it (stderr is one object per line).
    if log == LogFormat::Text {
        eprintln!(
            "hatch-relay: API on {}, data plane on {}",
            server.api_addr(),
            server.data_addr()
        );
    }
    signals.wait(&server);
    server.shutdown(drain);
    Ok(())
}

fn dev(a: DevArgs) -> anyhow::Result<()> {
    let control = a.relay.control()?;
    let signals = Signals::install()?;
    let relay = DevRelay::start(DevOptions {
        data_dir: a.relay.data_dir.clone(),
        store: a.relay.store.clone(),
        api_listen: a.relay.api_listen,
        data_listen: a.relay.data_listen,
        region: control.region.clone(),
        limits: control.limits,
        pending_timeout: control.pending_timeout,
        session_retention: control.session_retention,
        recording_retention: control.recording_retention,
        max_api_connections: control.max_api_connections,
        public_data_url: control.public_data_url.clone(),
        metrics_token: control.metrics_token.clone(),
        public_api_url: control.public_api_url.clone(),
        node_timeout: control.node_timeout,
        data: Some(a.data.clone()),
        ..DevOptions::default()
    })?;
    let i = &relay.info;
    let dir = relay.data_dir().display().to_string();
    println!(
        "Hatch development relay\n  API:        {api}\n  data plane: {data}\n  CA:         {ca}\n  \
         details:    {dir}/dev.json\n\n\
         Register an agent (in another terminal):\n  \
         hatch-agent register --api {api} --ca {ca} --activation-id {aid} --activation-code {acode} --state {dir}/agent.json\n  \
         hatch-agent run --state {dir}/agent.json\n\n\
         Open a session:\n  \
         export HATCH_API={api} HATCH_CA={ca} HATCH_ACCESS_KEY={key}\n  \
         hatch instances\n  \
         hatch session --instance <instance id from above>\n\n\
         Ctrl-C stops the relay.",
        api = i.api_url,
        data = i.data_url,
        ca = i.ca_file,
        aid = i.activation_id,
        acode = i.activation_code,
        key = i.access_key,
    );
    signals.wait(relay.server());
    relay.shutdown(Duration::from_secs(a.data.drain));
    Ok(())
}

fn open_sqlite(data_dir: &Path) -> anyhow::Result<SqliteStore> {
    let path = store_path(data_dir);
    anyhow::ensure!(
        path.exists(),
        "no store at {} (start the relay once, or check --data-dir)",
        path.display()
    );
    SqliteStore::open(&path)
}

/// The store `admin` works on: `--store`'s PostgreSQL, else the data directory's file (which
/// must exist: admin never creates an empty store by mistake).
fn open_store(data_dir: &Path, url: Option<&str>) -> anyhow::Result<Box<dyn Store>> {
    match url {
        Some(u) => crate::control::store::open(Some(u), data_dir),
        None => Ok(Box::new(open_sqlite(data_dir)?)),
    }
}

fn print<T: Serialize>(json: bool, v: &T, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

fn ts(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// `admin users disable|enable`.
fn set_user_disabled(
    s: &dyn Store,
    json: bool,
    account: &str,
    user: &str,
    disable: bool,
) -> anyhow::Result<()> {
    let u = iam::set_user_disabled(s, account, user, disable)?;
    let v = serde_json::json!({"user_id": u.id, "name": u.name, "disabled": disable});
    print(json, &v, || {
        if disable {
            format!("disabled user {} ({}); a running relay ends their sessions", u.id, u.name)
        } else {
            format!("enabled user {} ({})", u.id, u.name)
        }
    })
}

fn admin_cmd(a: AdminArgs) -> anyhow::Result<()> {
    let json = a.json;
    if let AdminCommand::SigningKeys(SigningCmd::Rotate) = a.what {
        let kid = match &a.store {
            // A fleet's keys are in its store: every node verifies them once restarted.
            Some(url) => signing::rotate_shared(
                crate::control::store::open(Some(url), &a.data_dir)?.as_ref(),
            )?,
            None => signing::create_key(&a.data_dir)?,
        };
        return print(json, &serde_json::json!({ "kid": kid }), || {
            format!("new signing key {kid}; restart the relay to sign with it")
        });
    }
    if let AdminCommand::Backup { file } = &a.what {
        anyhow::ensure!(
            a.store.is_none(),
            "admin backup copies the SQLite store file; back a PostgreSQL store up with \
             pg_dump (docs/OPERATIONS.md)"
        );
        open_sqlite(&a.data_dir)?.backup_to(file)?;
        let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        return print(json, &serde_json::json!({"backup": file, "bytes": bytes}), || {
            format!("wrote {} ({bytes} bytes)", file.display())
        });
    }
    let store = open_store(&a.data_dir, a.store.as_deref())?;
    let s: &dyn Store = store.as_ref();
    match a.what {
        AdminCommand::Accounts(c) => match c {
            AccountsCmd::Create { name } => {
                let acc = iam::create_account(s, &name)?;
                print(json, &acc, || format!("created account {} ({})", acc.id, acc.name))
            }
            AccountsCmd::List => {
                let all = s.accounts()?;
                print(json, &all, || {
                    all.iter()
                        .map(|a| {
                            format!(
                                "{}\t{}\tsession manager {}",
                                a.id,
                                a.name,
                                if a.session_manager_enabled { "on" } else { "off" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            AccountsCmd::Enable { account } => switch(s, json, &account, true),
            AccountsCmd::Disable { account } => switch(s, json, &account, false),
            AccountsCmd::Prefs { account, idle_timeout, max_duration, recording } => {
                let update = hatch_proto::api::AccountSettingsUpdate {
                    idle_timeout_s: idle_timeout,
                    max_duration_s: max_duration,
                    recording,
                    ..Default::default()
                };
                let prefs = iam::update_settings(s, &account, &update)?.prefs;
                let secs =
                    |v: Option<u64>| v.map_or("the relay's".to_owned(), |s| format!("{s} s"));
                print(json, &prefs, || {
                    format!(
                        "{account}: idle timeout {}, longest session {}, recording {}",
                        secs(prefs.idle_timeout_s),
                        secs(prefs.max_duration_s),
                        prefs.recording.as_str()
                    )
                })
            }
        },
        AdminCommand::Users(c) => match c {
            UsersCmd::Create { account, name } => {
                let u = iam::create_user(s, &account, &name)?;
                print(json, &u, || format!("created user {} ({})", u.id, u.name))
            }
            UsersCmd::List { account } => {
                let all = s.users(&account)?;
                print(json, &all, || {
                    all.iter()
                        .map(|u| {
                            let state = u
                                .disabled_at
                                .map(|t| format!("disabled {}", ts(t)))
                                .unwrap_or("enabled".into());
                            format!("{}\t{}\t{state}", u.id, u.name)
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            UsersCmd::Disable { account, user } => {
                set_user_disabled(s, json, &account, &user, true)
            }
            UsersCmd::Enable { account, user } => {
                set_user_disabled(s, json, &account, &user, false)
            }
            UsersCmd::Delete { account, user } => {
                let u = iam::delete_user(s, &account, &user)?;
                print(json, &u, || {
                    format!(
                        "deleted user {} ({}) with their keys; a running relay ends their sessions",
                        u.id, u.name
                    )
                })
            }
        },
        AdminCommand::Keys(c) => match c {
            KeysCmd::Create { account, user } => {
                let user_id = match &user {
                    Some(u) => Some(iam::user(s, &account, u)?.id),
                    None => None,
                };
                let (k, secret) = iam::create_access_key(s, &account, user_id.as_deref())?;
                let v = serde_json::json!({
                    "key_id": k.id, "account_id": k.account_id, "user_id": k.user_id,
                    "access_key": secret,
                });
                print(json, &v, || {
                    format!(
                        "access key {} for {} (shown once, store it now):\n{secret}",
                        k.id,
                        k.user_id.as_deref().unwrap_or("the account owner")
                    )
                })
            }
            KeysCmd::List { account } => {
                let all = s.access_keys(&account)?;
                print(json, &all, || {
                    all.iter()
                        .map(|k| {
                            format!(
                                "{}\t{}\t{}",
                                k.id,
                                k.user_id.as_deref().unwrap_or("owner"),
                                k.revoked_at
                                    .map(|t| format!("revoked {}", ts(t)))
                                    .unwrap_or("active".into())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            KeysCmd::Revoke { key_id } => {
                let account =
                    account_of(s, |a| Ok(s.access_keys(a)?.iter().any(|k| k.id == key_id)))?
                        .with_context(|| format!("no access key {key_id}"))?;
                let k = iam::revoke_access_key(s, &account, &key_id)?;
                let v = serde_json::json!({"revoked": k.id, "revoked_at": k.revoked_at});
                print(json, &v, || format!("revoked {key_id}"))
            }
        },
        AdminCommand::Policies(c) => match c {
            PoliciesCmd::Put { account, name, file } => {
                let doc = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let p = iam::put_policy(s, &account, &name, &doc)?;
                print(json, &p, || format!("stored policy {}", p.name))
            }
            PoliciesCmd::List { account } => {
                let all = s.policies(&account)?;
                print(json, &all, || {
                    all.iter()
                        .map(|p| format!("{}\n{}\n", p.name, p.document))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            PoliciesCmd::Attach { account, user, name } => {
                let u = iam::user(s, &account, &user)?;
                iam::attach_policy(s, &account, &u.id, &name)?;
                print(json, &serde_json::json!({"attached": name, "user_id": u.id}), || {
                    format!("attached {name} to {} ({})", u.id, u.name)
                })
            }
            PoliciesCmd::Delete { account, name } => {
                let p = iam::delete_policy(s, &account, &name)?;
                print(json, &p, || format!("deleted policy {}", p.name))
            }
            PoliciesCmd::Detach { account, user, name } => {
                let u = iam::user(s, &account, &user)?;
                iam::detach_policy(s, &account, &u, &name)?;
                print(json, &serde_json::json!({"detached": name, "user_id": u.id}), || {
                    format!("detached {name} from {} ({})", u.id, u.name)
                })
            }
        },
        AdminCommand::Activations(c) => match c {
            ActivationsCmd::Create {
                account,
                region,
                tags,
                max_registrations,
                expires_in_hours,
            } => {
                let tags = iam::parse_tags(&tags)?;
                let (act, code) = iam::create_activation(
                    s,
                    &account,
                    &region,
                    tags,
                    max_registrations,
                    Duration::from_secs(expires_in_hours.saturating_mul(3600)),
                )?;
                let v = serde_json::json!({
                    "activation_id": act.id, "activation_code": code, "account_id": act.account_id,
                    "region": act.region, "tags": act.tags, "max_registrations": act.max_registrations,
                    "expires_at": ts(act.expires_at),
                });
                print(json, &v, || {
                    format!(
                        "activation {} (code shown once):\n  --activation-id {} --activation-code {code}",
                        act.id, act.id
                    )
                })
            }
            ActivationsCmd::Revoke { activation_id } => {
                let account = account_of(s, |a| {
                    Ok(s.activations(Some(a))?.iter().any(|x| x.id == activation_id))
                })?
                .with_context(|| format!("no activation {activation_id}"))?;
                let a = iam::revoke_activation(s, &account, &activation_id)?;
                print(json, &a, || format!("revoked {}", a.id))
            }
            ActivationsCmd::List { account } => {
                let all = s.activations(account.as_deref())?;
                print(json, &all, || {
                    all.iter()
                        .map(|a| {
                            format!(
                                "{}\t{}\t{}\t{}/{} registered\texpires {}",
                                a.id,
                                a.account_id,
                                a.region,
                                a.registrations,
                                a.max_registrations,
                                ts(a.expires_at)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
        },
        AdminCommand::Instances(c) => match c {
            InstancesCmd::List { account } => {
                let all = s.instances(account.as_deref())?;
                print(json, &all, || {
                    all.iter()
                        .map(|i| {
                            format!(
                                "{}\t{}\t{}\t{}\tlast seen {}",
                                i.id,
                                i.account_id,
                                i.region,
                                i.tags
                                    .iter()
                                    .map(|(k, v)| format!("{k}={v}"))
                                    .collect::<Vec<_>>()
                                    .join(","),
                                i.last_seen.map(ts).unwrap_or_else(|| "never".into())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            InstancesCmd::Tag { instance, tags } => {
                let tags = iam::parse_tags(&tags)?;
                let i = iam::tag_instance(s, &instance_account(s, &instance)?, &instance, tags)?;
                print(json, &serde_json::json!({"instance_id": i.id, "tags": i.tags}), || {
                    format!("tagged {instance}")
                })
            }
            InstancesCmd::Deregister { instance } => {
                let i = iam::deregister_instance(s, &instance_account(s, &instance)?, &instance)?;
                print(json, &i, || format!("deregistered {}", i.id))
            }
            InstancesCmd::RevokeSecret { instance } => {
                let account = instance_account(s, &instance)?;
                let i = iam::revoke_instance_secret(s, &account, &instance)?;
                print(json, &i, || {
                    format!("revoked the secret of {}; its agent must register again", i.id)
                })
            }
        },
        AdminCommand::Sessions(c) => match c {
            SessionsCmd::List { account, state, limit } => {
                let filter = match state.as_str() {
                    "all" => StateFilter::All,
                    "active" => StateFilter::Active,
                    "closed" => StateFilter::Closed,
                    other => anyhow::bail!("--state {other:?} is not active, closed or all"),
                };
                let all = s.sessions(account.as_deref(), filter, limit, None)?;
                print(json, &all, || {
                    all.iter()
                        .map(|x| {
                            format!(
                                "{}\t{}\t{}\t{}\t{}\t{}",
                                x.id,
                                x.instance_id,
                                x.principal,
                                x.state,
                                x.close_reason.map_or("-", |r| r.as_str()),
                                ts(x.created_at)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            SessionsCmd::Terminate { session_id } => {
                let done = s.close_session(
                    &session_id,
                    crate::plane::CloseReason::Terminated,
                    0,
                    0,
                    crate::control::unix_now(),
                )?;
                anyhow::ensure!(done, "no open session {session_id}");
                print(json, &serde_json::json!({"terminated": session_id}), || {
                    format!("recorded {session_id} as terminated")
                })
            }
        },
        AdminCommand::Recordings(RecordingsCmd::Verify { session_id }) => {
            verify_recording(s, json, &a.data_dir, &session_id)
        }
        // Handled before the store is opened.
        AdminCommand::SigningKeys(SigningCmd::Rotate) | AdminCommand::Backup { .. } => Ok(()),
    }
}

/// The account holding something an admin command names by id alone (a scan of every
/// account: for an operator's command, not a request path).
fn account_of(
    s: &dyn Store,
    mut holds: impl FnMut(&str) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<String>> {
    for a in s.accounts()? {
        if holds(&a.id)? {
            return Ok(Some(a.id));
        }
    }
    Ok(None)
}

/// `admin recordings verify`: the session's recording against its stored digest.
fn verify_recording(s: &dyn Store, json: bool, data_dir: &Path, sid: &str) -> anyhow::Result<()> {
    use crate::recording::verify::VerifyError;
    let rec = s.session(None, sid)?.with_context(|| format!("no session {sid}"))?;
    anyhow::ensure!(rec.recording.is_on(), "session {sid} was not recorded");
    let expected = match rec.recording_digest.as_deref() {
        Some(h) => Some(
            crate::recording::Digest::from_hex(h)
                .with_context(|| format!("the stored digest of {sid} is not 64 hex digits"))?,
        ),
        None => None,
    };
    let path = crate::recording::file_path(&crate::recording::dir_of(data_dir), sid)
        .with_context(|| format!("{sid:?} cannot name a recording"))?;
    match crate::recording::verify::verify(&path, expected) {
        Ok(v) => {
            let digest = v.final_digest.to_string();
            let body = serde_json::json!({
                "session_id": sid, "ok": true, "records": v.records, "bytes": v.len,
                "exit": v.exit, "final_digest": digest, "digest_stored": expected.is_some(),
            });
            print(json, &body, || {
                let against = if expected.is_some() {
                    "matches the stored digest"
                } else {
                    "no digest stored yet (the session has not ended)"
                };
                format!(
                    "ok\n{} records, {} bytes, final digest {digest} ({against})",
                    v.records, v.len
                )
            })
        }
        Err(err) => {
            let code = match &err {
                VerifyError::Io { .. } => verify_exit::UNREADABLE,
                VerifyError::TruncatedHeader { .. } | VerifyError::Truncated { .. } => {
                    verify_exit::TRUNCATED
                }
                VerifyError::FinalDigest { .. } => verify_exit::FINAL_DIGEST,
                _ => verify_exit::BROKEN,
            };
            Err(ExitWith { code, message: format!("{sid} ({}): {err}", path.display()) }.into())
        }
    }
}

/// `--recording`'s value.
fn recording_mode(s: &str) -> Result<RecordingMode, String> {
    RecordingMode::parse(s).ok_or_else(|| format!("{s:?} is not off, output or full"))
}

fn instance_account(s: &dyn Store, instance: &str) -> anyhow::Result<String> {
    s.instances(None)?
        .into_iter()
        .find(|i| i.id == instance)
        .map(|i| i.account_id)
        .with_context(|| format!("no instance {instance}"))
}

fn switch(s: &dyn Store, json: bool, account: &str, on: bool) -> anyhow::Result<()> {
    let update = hatch_proto::api::AccountSettingsUpdate {
        session_manager_enabled: Some(on),
        ..Default::default()
    };
    iam::update_settings(s, account, &update)?;
    print(json, &serde_json::json!({"account_id": account, "session_manager_enabled": on}), || {
        format!("session manager {} for {account}", if on { "on" } else { "off" })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(args: &[&str]) -> Result<ControlConfig, clap::Error> {
        let argv = ["hatch-relay", "serve", "--data-dir", "d", "--danger-plaintext"];
        let cli = Cli::try_parse_from(argv.iter().chain(args))?;
        let Command::Serve(a) = cli.command else { unreachable!("parsed as serve") };
        Ok(a.relay.control().expect("no token file in these tests"))
    }

    #[test]
    fn session_admission_flags_and_their_defaults() {
        let c = control(&[]).unwrap();
        assert_eq!(c.limits.per_user, 100);
        assert_eq!(c.limits.start_rate, Rate { per_sec: 20.0, burst: 100 });
        assert_eq!(c.pending_timeout, Duration::from_secs(60));
        assert_eq!(c.session_retention, Duration::from_secs(90 * 86_400));
        assert_eq!(c.max_api_connections, 4096);
        let c = control(&[
            "--max-sessions-per-user",
            "7",
            "--session-rate",
            "0.5",
            "--session-burst",
            "3",
            "--pending-timeout",
            "5",
            "--session-retention",
            "0",
            "--max-api-connections",
            "9",
        ])
        .unwrap();
        assert_eq!(c.limits.per_user, 7);
        assert_eq!(c.limits.start_rate, Rate { per_sec: 0.5, burst: 3 });
        assert_eq!(c.pending_timeout, Duration::from_secs(5));
        assert!(c.session_retention.is_zero());
        assert_eq!(c.max_api_connections, 9);
        assert_eq!(control(&["--session-rate", "0"]).unwrap().limits.start_rate.per_sec, 0.0);
        for bad in [
            &["--session-rate", "-1"][..],
            &["--session-rate", "NaN"],
            &["--session-burst", "0"],
            &["--pending-timeout", "0"],
            &["--max-api-connections", "0"],
        ] {
            assert!(control(bad).is_err(), "{bad:?}");
        }
    }
}
