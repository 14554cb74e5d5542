//! The command line: `hatch-agent register` and `hatch-agent run`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hatch_proto::control::RegisterRequest;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::control::{self, ControlTiming, RunConfig};
use crate::register::{self, ApiUrl};
use crate::session::{SessionConfig, SessionTiming};
use crate::state::{self, State};
use crate::tls;

/// Exit status for a configuration problem (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

/// Hatch agent: keeps one outbound control channel to the relay and runs a PTY per session.
#[derive(Debug, Parser)]
#[command(name = "hatch-agent", version)]
pub struct Cli {
    /// More logging (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as text (colour only when stderr is a terminal) or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "HATCH_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trade an activation for an instance id and secret, and save them.
    Register(RegisterArgs),
    /// Keep the control channel open and serve sessions until SIGTERM.
    Run(RunArgs),
}

/// `hatch-agent register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// API base URL, e.g. https://relay.example.com:7444.
    #[arg(long, env = "HATCH_API")]
    pub api: String,
    /// Activation id from the administrator.
    #[arg(long)]
    pub activation_id: String,
    /// Activation code from the administrator.
    #[arg(long, env = "HATCH_ACTIVATION_CODE", hide_env_values = true)]
    pub activation_code: String,
    /// PEM file of the CA that signs the relay's certificate (saved in the state file); the
    /// system's CA bundle when absent.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// State file to write.
    #[arg(long, default_value = state::DEFAULT_STATE_PATH)]
    pub state: PathBuf,
    /// Replace an existing registration.
    #[arg(long)]
    pub force: bool,
}

/// `hatch-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// State file written by `register`.
    #[arg(long, default_value = state::DEFAULT_STATE_PATH)]
    pub state: PathBuf,
    /// API URL to connect to instead of the one saved at registration (a relay that moved);
    /// repeat it for the nodes of a fleet, in order of preference: the agent dials the next
    /// one when one fails, and backs off only when all did.
    #[arg(long = "api", value_name = "URL")]
    pub api: Vec<String>,
    /// Accept any server certificate. Only for throwaway test setups: anyone on the path can
    /// then impersonate the relay and run commands on this machine.
    #[arg(long)]
    pub danger_accept_invalid_certs: bool,
    /// Accept plaintext `ws://` data legs from a relay run with `--danger-plaintext`
    /// (benchmarks on loopback only: session bytes and tokens travel unencrypted).
    #[arg(long)]
    pub danger_allow_plaintext: bool,
    /// Run-as user for sessions that name none (default: the agent's own user).
    #[arg(long)]
    pub default_user: Option<String>,
    /// Most concurrent sessions; further `session.open`s are refused.
    #[arg(long, default_value_t = control::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// Bytes of output a session may have in flight before the client acknowledges them (at
    /// least 1024): the replay buffer a resume is served from. The PTY is not read while the
    /// window is full.
    #[arg(long, default_value_t = hatch_proto::resume::DEFAULT_WINDOW)]
    pub window: usize,
    /// Where port sessions may connect, `HOST:PORT`, `HOST:LOW-HIGH` or `HOST:*` (HOST a name,
    /// an address, a network such as `10.0.0.0/8`, `[::1]`, or `*`); repeat for more. Without
    /// it only the instance's loopback (`127.0.0.0/8:*`, `[::1]:*`).
    #[arg(long = "allow-forward", value_name = "HOST:PORTS")]
    pub allow_forward: Vec<String>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when stderr is a terminal.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Sets up logging to stderr (`RUST_LOG` wins over `-v`).
pub fn init_tracing(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().init(),
        // No colour codes when stderr is a file or the journal.
        LogFormat::Text => {
            fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
    }
}

/// Runs the parsed command and maps failures to an exit status and one line on stderr.
pub fn run(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        // An agent is a guest on its machine: a few workers serve thousands of sessions.
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hatch-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Register(args) => rt.block_on(register_command(args)),
        Command::Run(args) => rt.block_on(run_command(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hatch-agent: error: {e:#}");
            if e.downcast_ref::<state::StateError>().is_some()
                || e.downcast_ref::<tls::TlsError>().is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `register`: refuse early when already registered (an activation is not spent for nothing),
/// register, save, print the instance id on stdout.
pub async fn register_command(args: RegisterArgs) -> anyhow::Result<()> {
    if !args.force {
        state::refuse_existing(&args.state)?;
    }
    let api = ApiUrl::parse(&args.api)?;
    let ca_pem = match &args.ca {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading CA file {}", path.display()))?;
            tls::parse_ca_pem(&pem).with_context(|| format!("CA file {}", path.display()))?;
            Some(pem)
        }
        None => None,
    };
    let cfg = tls::client_config(ca_pem.as_deref(), false)?;
    let req = RegisterRequest {
        activation_id: args.activation_id,
        activation_code: args.activation_code,
        hostname: hostname(),
    };
    let answer = register::register(&api, cfg, &req).await?;
    let state = State {
        instance_id: answer.instance_id,
        instance_secret: answer.instance_secret,
        api_url: args.api.trim_end_matches('/').to_owned(),
        ca_pem,
    };
    state.save(&args.state, args.force)?;
    eprintln!("registered as {}; state saved to {}", state.instance_id, args.state.display());
    println!("{}", state.instance_id);
    Ok(())
}

/// `run`: load the state, serve until SIGTERM or SIGINT.
pub async fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let state = State::load(&args.state)?;
    if args.danger_accept_invalid_certs {
        warn!("--danger-accept-invalid-certs: the relay's certificate is NOT verified");
    }
    let cfg = tls::client_config(state.ca_pem.as_deref(), args.danger_accept_invalid_certs)?;
    raise_fd_limit();
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    // Both handlers exist before anything says the agent started: a signal in between would
    // otherwise take the default action (SIGINT was only installed once the task first ran).
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received; shutting down"),
            _ = int.recv() => info!("SIGINT received; shutting down"),
        }
        on_signal.cancel();
    });
    let identity =
        crate::session::identity(args.default_user.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    info!(default_user = %identity.default_user, switch_user = identity.switch_user,
        "sessions that name no user run as the default user");
    let allow_forward =
        crate::forward::AllowForward::parse(&args.allow_forward).map_err(|e| anyhow::anyhow!(e))?;
    let config = RunConfig {
        session: SessionConfig {
            tls: cfg.clone(),
            allow_plaintext: args.danger_allow_plaintext,
            timing: SessionTiming::default(),
            link: hatch_proto::resume::LinkConfig {
                window: args.window.max(1024),
                ..Default::default()
            },
            allow_forward: std::sync::Arc::new(allow_forward),
        },
        state,
        api_urls: args.api.iter().map(|a| a.trim_end_matches('/').to_owned()).collect(),
        tls: cfg,
        timing: ControlTiming::default(),
        max_sessions: args.max_sessions.max(1),
        identity,
    };
    control::run(config, shutdown).await
}

/// The host name, for people reading instance lists.
fn hostname() -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys/kernel/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Raises the soft open-file limit to the hard limit: each session holds two descriptors.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!(?e, soft, hard, "cannot raise the open-file limit");
    }
}

/// Shortens every timer, for tests that exercise reconnects and hang-ups.
pub fn fast_timing() -> (ControlTiming, SessionTiming) {
    let ms = Duration::from_millis;
    (
        ControlTiming {
            connect_timeout: ms(5_000),
            ping_interval: ms(500),
            dead_after: ms(3_000),
            backoff_base: ms(100),
            backoff_cap: ms(1_000),
            stable_after: ms(2_000),
            shutdown_grace: ms(5_000),
        },
        SessionTiming {
            dial_timeout: ms(5_000),
            ping_interval: ms(500),
            dead_after: ms(5_000),
            drain_timeout: ms(1_000),
            hangup_grace: ms(2_000),
            close_timeout: ms(2_000),
            exit_timeout: ms(5_000),
            resume_for: ms(30_000),
        },
    )
}
