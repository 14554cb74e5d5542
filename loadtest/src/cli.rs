//! Command-line options of `hatch-loadtest` and dispatch to the parent run or to one of the
//! hidden subcommands the parent re-executes this binary with.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Measure Hatch's keystroke round trip at very many sessions against a floor.
#[derive(Debug, Parser)]
#[command(name = "hatch-loadtest", version)]
pub struct Args {
    /// Hidden subcommands used by the parent to start its own processes.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The run options (when no subcommand is given).
    #[command(flatten)]
    pub run: RunArgs,
}

/// `--acks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Acks {
    /// Offsets and delayed acknowledgements, as `hatch` and `hatch-agent` keep them.
    On,
    /// No acknowledgements.
    Off,
}

/// `--chaos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Chaos {
    /// Kill the relay process (SIGKILL) a third of the way into the measurement and start it
    /// again at once on the same ports and data directory, as a supervisor would.
    RelayRestart,
}

impl Chaos {
    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Chaos::RelayRestart => "relay-restart",
        }
    }
}

/// Options of a load-test run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Concurrent sessions to hold (capped by the open-file limit; the report says so). Default
    /// 1,000; in forward mode, one port session per 100 `--connections`.
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Forward mode: forwarded TCP connections carrying small messages, spread evenly over the
    /// `--sessions` port sessions.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Forward mode: the session window of both ends' `hatch.v1` offsets (bytes in flight per
    /// direction, `hatch_proto::resume::LinkConfig::window`), in KiB. Default: the window
    /// `hatch` and `hatch-agent` use (2 MiB).
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..=262_144))]
    pub link_window_kib: Option<u32>,
    /// Simulated agents (instances) the sessions are spread over.
    #[arg(long, default_value_t = 100)]
    pub instances: usize,
    /// Session setup pace, sessions per second (over all workers).
    #[arg(long, default_value_t = 500.0)]
    pub ramp: f64,
    /// DATA messages per second per session (latency and pty modes).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// DATA payload in bytes (default 16; 16384 in throughput mode).
    #[arg(long)]
    pub payload: Option<usize>,
    /// Messages in flight per session in throughput mode (1–64). The echo is latency-bound with
    /// a small window: 4 × 16 KiB measures round trips as much as bulk transfer; a real bulk
    /// transfer (a file through `cat`) has TCP's window of megabytes in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub window: u16,
    /// Acknowledgements in the hatch.v1 stream, as the real client and agent send them
    /// (`off`: none, to measure what they cost). The floor's echo server acknowledges as the
    /// agent does, so that the ratio compares like with like.
    #[arg(long, value_enum, default_value_t = Acks::On)]
    pub acks: Acks,
    /// Break something mid-measurement and report how the sessions came through: sessions
    /// resumed of sessions live, bytes lost or out of order (every keystroke carries its
    /// sequence number), resume time. Exits 1 unless every live session came through whole.
    /// Echo mode with `--acks on`, against the relay this run starts.
    #[arg(long, value_enum)]
    pub chaos: Option<Chaos>,
    /// Measurement time in seconds, after every session is up.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// What the agents run and what the clients measure.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    pub mode: Mode,
    /// I/O backend of the relay (`--io` of hatch-relay; default: the relay's own default).
    #[arg(long, value_enum)]
    pub io: Option<Io>,
    /// Run the relay with both I/O backends back to back and report them side by side.
    #[arg(long)]
    pub compare_io: bool,
    /// Relay shards and floor echo-server threads (default: available cores).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Relay processes to start, nodes of one fleet on one PostgreSQL store (`--store`, or a
    /// throwaway cluster the run starts when more than one is asked for). Agents and the
    /// clients' API calls are spread over the nodes; each session runs on its agent's node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub relays: u16,
    /// Record every session at the relay this run starts (its demo account's `recording`
    /// setting, docs/RECORDING.md): `output`, or `full` (output and input). Off by default.
    #[arg(long, value_parser = record_mode)]
    pub record: Option<hatch_proto::api::RecordingMode>,
    /// The relays' store: a PostgreSQL URL (default: SQLite for one relay, a throwaway
    /// PostgreSQL cluster for `--relays` above 1).
    #[arg(long)]
    pub store: Option<String>,
    /// Drive an external relay's API at this URL instead of starting one.
    #[arg(long, requires_all = ["access_key", "ca"])]
    pub api: Option<String>,
    /// Access key for `POST /v1/sessions` on the external relay.
    #[arg(long, env = "HATCH_ACCESS_KEY")]
    pub access_key: Option<String>,
    /// CA certificate (PEM) that signed the external relay's certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Activation id the simulated agents register with (external relay).
    #[arg(long)]
    pub activation_id: Option<String>,
    /// Activation code the simulated agents register with (external relay).
    #[arg(long, env = "HATCH_ACTIVATION_CODE")]
    pub activation_code: Option<String>,
    /// Run the relay's data plane, the simulated clients' and agents' data legs and the floor
    /// without TLS (plain WebSocket), to compare with plaintext relays. The API and the agents'
    /// control channels keep TLS. Loopback benchmarks only.
    #[arg(long)]
    pub danger_plaintext: bool,
    /// Skip the floor phase (then no ratio is reported).
    #[arg(long)]
    pub skip_floor: bool,
    /// Skip the relay phase (measure only the floor).
    #[arg(long)]
    pub skip_relay: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Compare the relay/floor p99 ratio with this baseline file; exit 1 when it is more than
    /// `--max-regression` times the baseline's.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Allowed factor over the baseline's p99 ratio.
    #[arg(long, default_value_t = 1.5)]
    pub max_regression: f64,
    /// Keep the relay's log and data directory here instead of a temporary directory.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Quiet: no progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// What each session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Agents echo DATA at once; clients send `--payload` bytes at `--rate` and time the echo.
    Echo,
    /// Agents run `cat` in a real PTY (raw mode) and forward its output.
    Pty,
    /// Clients push bulk DATA with a window of messages in flight; reports MB/s per session.
    Throughput,
    /// Port forwarding (`hatch port-forward`): TCP connections through port sessions, the
    /// `hatch-forward` pump on both ends, to a loopback TCP server the run starts. Measures the
    /// round trips of `--connections` connections carrying `--payload` bytes at `--rate`, and
    /// the throughput of one bulk connection each way, both against the same connections made
    /// straight to the server over loopback TCP.
    Forward,
}

/// Relay I/O backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Io {
    /// io_uring (tokio-uring).
    Uring,
    /// epoll (plain tokio).
    Epoll,
}

impl Io {
    /// The value passed to `hatch-relay --io`.
    pub fn as_str(self) -> &'static str {
        match self {
            Io::Uring => "uring",
            Io::Epoll => "epoll",
        }
    }
}

/// The hidden subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a worker (simulated clients or agents); spec on stdin, events on stdout.
    #[command(hide = true)]
    Worker,
    /// Run the floor's echo server; prints `listening <addr>` on stdout, stops at stdin EOF.
    #[command(hide = true)]
    FloorProcess {
        /// Server certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Server private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// Threads, each a single-threaded runtime with its own SO_REUSEPORT listener.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Serve plain WebSocket, no TLS.
        #[arg(long)]
        danger_plaintext: bool,
        /// Acknowledge echoed bytes as the agent does (an ACK with each echo).
        #[arg(long)]
        acks: bool,
    },
    /// Run forward mode's loopback TCP server (echo, sink, source); prints `listening <addr>`
    /// on stdout, stops at stdin EOF.
    #[command(hide = true)]
    ForwardServer,
    /// Run the relay (`hatch_relay::cli::run`) in this process with the given arguments.
    #[command(hide = true)]
    RelayProcess {
        /// Arguments of `hatch-relay` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Runs what the arguments ask for.
pub fn main(args: Args) -> ExitCode {
    match args.command {
        Some(Command::Worker) => crate::worker::main(),
        Some(Command::FloorProcess { cert, key, threads, danger_plaintext, acks }) => {
            crate::floor::process_main(&cert, &key, threads, danger_plaintext, acks)
        }
        Some(Command::ForwardServer) => crate::tcp::process_main(),
        Some(Command::RelayProcess { args }) => crate::run::relay_process_main(args),
        None => crate::run::main(args.run),
    }
}

/// `--record`'s value: `output` or `full`.
fn record_mode(s: &str) -> Result<hatch_proto::api::RecordingMode, String> {
    match hatch_proto::api::RecordingMode::parse(s) {
        Some(m) if m.is_on() => Ok(m),
        _ => Err(format!("{s:?} is not output or full")),
    }
}
