//! A throwaway PostgreSQL server for tests. [`Cluster::start`] runs `initdb` in a temporary
//! directory and starts `postgres` on a free loopback port; [`Cluster::fresh_database`] gives
//! each test an empty database of its own; dropping a [`Cluster`] stops the server and removes
//! the directory. [`shared`] is the one cluster of a test process, started by its first caller:
//!
//! ```no_run
//! let url = hatch_pgtest::shared().fresh_database();
//! let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
//! db.batch_execute("CREATE TABLE t (x int)").unwrap();
//! ```
//!
//! It does not install PostgreSQL (scripts/test installs Debian's `postgresql` package), and
//! it never uses a server the machine may already run. It never skips a test either: a server
//! that cannot start is a panic that says what is missing or what failed.
//!
//! ```text
//! Cluster::start
//!   binaries::find          pg_config --bindir, else the highest /usr/lib/postgresql/*/bin
//!   Owner::for_server       this user; as root, `postgres` (or `nobody`)
//!   Owner::temp_dir         <temp dir>/hatch-pgtest-XXXXXX, mode 0700, owned by that user
//!   initdb                  <dir>/data, output captured for the panic message
//!   postmaster::spawn       postgres on 127.0.0.1:<free port>, socket in <dir>,
//!                           log in <dir>/postgres.log, dies with the test process
//!   wait_ready              TCP connect, then SELECT 1, every 50 ms, for up to 30 s
//! ```
//!
//! Modules: `binaries` finds `initdb` and `postgres`, `owner` decides which user runs them and
//! gives it the directory, `postmaster` spawns and stops the server process.

mod binaries;
mod owner;
mod postmaster;

use std::collections::hash_map::RandomState;
use std::error::Error;
use std::fs::File;
use std::hash::BuildHasher;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binaries::Binaries;
use crate::owner::Owner;

/// The superuser `initdb` creates; every URL connects as it, without a password (`-A trust`,
/// and the server listens on loopback only).
const USER: &str = "hatch";

/// How long a new server gets to accept a query. A start takes one to two seconds; this is for a
/// machine busy with a parallel build and other test binaries.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a starting server is probed.
const START_POLL: Duration = Duration::from_millis(50);

/// The longest a single probe's TCP or PostgreSQL connect may take, so that one hung attempt
/// cannot overrun [`START_TIMEOUT`] by much.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many free ports a start tries: a port found free can be taken by another process before
/// the server binds it, which shows as the server exiting with "Address already in use".
const PORT_ATTEMPTS: usize = 3;

/// How many lines of the server log a panic message quotes.
const LOG_TAIL_LINES: usize = 40;

/// Server settings for a disposable cluster: durability off (nothing survives the test run, so
/// nothing needs to survive a crash), loopback only, and enough connections for many tests
/// that each hold a pool.
const SETTINGS: [&str; 5] = [
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=300",
];

/// One running PostgreSQL server in a temporary directory, stopped and removed on drop.
///
/// For tests only: it keeps nothing durable, and any local user may connect to it as its
/// superuser without a password (`trust` authentication on 127.0.0.1).
///
/// ```no_run
/// let cluster = hatch_pgtest::Cluster::start();
/// let url = cluster.fresh_database(); // postgres://hatch@127.0.0.1:<port>/t_0_<random>
/// drop(cluster); // server stopped, directory removed
/// ```
#[derive(Debug)]
pub struct Cluster {
    /// The loopback TCP port the server listens on.
    port: u16,
    /// The server process; `None` once stopped.
    postmaster: Mutex<Option<Child>>,
    /// Holds the data directory, the Unix socket and the log; `None` once removed.
    dir: Mutex<Option<TempDir>>,
    /// Numbers the databases of [`Cluster::fresh_database`].
    databases: AtomicU64,
}

impl Cluster {
    /// Creates and starts a new cluster, ready for connections.
    ///
    /// # Panics
    ///
    /// If PostgreSQL is not installed, or `initdb` or the server fails or does not answer a
    /// query within 30 s: the message says which, with `initdb`'s output or the server log.
    pub fn start() -> Cluster {
        start().unwrap_or_else(|err| panic!("{err}"))
    }

    /// [`Cluster::start`] for tools (the load test's fleet): the failure as a message.
    pub fn try_start() -> Result<Cluster, String> {
        start()
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The loopback TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a new, empty database with a name no other call returns, and returns its URL.
    ///
    /// # Panics
    ///
    /// If the server does not accept the connection or the `CREATE DATABASE`.
    pub fn fresh_database(&self) -> String {
        let number = self.databases.fetch_add(1, Ordering::Relaxed);
        // The counter alone is unique within this cluster; the random part keeps names from
        // repeating across clusters and runs, so a name in a log points at one database.
        let name = format!("t_{number}_{:016x}", RandomState::new().hash_one(number));
        let mut admin = self.connect("postgres").unwrap_or_else(|err| {
            panic!("connecting to the test cluster at {}: {}", self.url(), chain(&err))
        });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|err| panic!("creating the test database {name}: {}", chain(&err)));
        self.database_url(&name)
    }

    /// The URL of the database `name`.
    fn database_url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// A connection to the database `name`, giving up after [`PROBE_TIMEOUT`].
    fn connect(&self, name: &str) -> Result<postgres::Client, postgres::Error> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(USER)
            .dbname(name)
            .connect_timeout(PROBE_TIMEOUT)
            .connect(postgres::NoTls)
    }

    /// Probes the server until it answers `SELECT 1`, it exits, or [`START_TIMEOUT`] passes.
    fn wait_ready(&self) -> Result<(), NotReady> {
        let deadline = Instant::now() + START_TIMEOUT;
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(status) = self.postmaster().as_mut().and_then(|c| c.try_wait().ok()?) {
                return Err(NotReady::Exited(status));
            }
            // The TCP connect first: it fails fast while the server is not listening yet,
            // without the cost of a PostgreSQL client (a Tokio runtime) per probe.
            let last_error = match TcpStream::connect_timeout(&address, PROBE_TIMEOUT) {
                Err(err) => format!("TCP connect to {address}: {err}"),
                Ok(_) => {
                    match self.connect("postgres").and_then(|mut c| c.simple_query("SELECT 1")) {
                        Ok(_) => return Ok(()),
                        Err(err) => format!("SELECT 1: {}", chain(&err)),
                    }
                }
            };
            if Instant::now() >= deadline {
                return Err(NotReady::TimedOut(last_error));
            }
            // Polling a foreign process: it offers no readiness notification to wait on.
            thread::sleep(START_POLL);
        }
    }

    /// The server process slot, whatever a panicking holder left in it.
    fn postmaster(&self) -> MutexGuard<'_, Option<Child>> {
        self.postmaster.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the server, if running.
    fn stop_server(&self) {
        if let Some(mut child) = self.postmaster().take() {
            postmaster::stop(&mut child);
        }
    }

    /// Stops the server and removes its directory. Safe to call more than once.
    fn stop(&self) {
        self.stop_server();
        if let Some(dir) = self.dir.lock().unwrap_or_else(PoisonError::into_inner).take() {
            // A directory that cannot be removed is litter in /tmp, not a test failure.
            let _ = dir.close();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a started server is not ready.
enum NotReady {
    /// The server exited, with this status.
    Exited(ExitStatus),
    /// The server did not answer in time; the last probe failed with this.
    TimedOut(String),
}

/// The cluster of this test process, started by the first call.
///
/// A test binary with many tests starts one server, and each test takes its own database with
/// [`Cluster::fresh_database`]. The server is stopped and its directory removed when the process
/// exits; if the process dies instead, the server dies with it.
///
/// # Panics
///
/// As [`Cluster::start`]. A cluster that failed to start is not retried: every later call
/// panics with the same message, rather than each test waiting out its own timeout.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

    /// Stops the shared cluster at exit: statics are never dropped.
    extern "C" fn stop_at_exit() {
        // A panic must not unwind out of an `extern "C"` function: that would abort a process
        // whose tests passed.
        let _ = std::panic::catch_unwind(|| {
            if let Some(Ok(cluster)) = SHARED.get() {
                cluster.stop();
            }
        });
    }

    let started = SHARED.get_or_init(|| {
        // Without the hook the server still dies with the process (see `postmaster`); only
        // the directory would stay behind. Not worth failing a test over.
        let _ = postmaster::at_exit(stop_at_exit);
        start()
    });
    match started {
        Ok(cluster) => cluster,
        Err(err) => panic!("the shared test cluster did not start: {err}"),
    }
}

/// [`Cluster::start`], with the reason for a failure.
fn start() -> Result<Cluster, String> {
    let binaries = binaries::find()?;
    let owner = Owner::for_server()?;
    let temp = owner.temp_dir()?;
    let dir = temp.path().to_owned();
    let data = dir.join("data");
    let log = dir.join("postgres.log");
    // From here on, dropping `cluster` removes the directory, on every error path.
    let mut cluster = Cluster {
        port: 0,
        postmaster: Mutex::new(None),
        dir: Mutex::new(Some(temp)),
        databases: AtomicU64::new(0),
    };
    initdb(&binaries, &owner, &dir, &data)?;
    for attempt in 1..=PORT_ATTEMPTS {
        cluster.port = free_port()?;
        let child = spawn_server(&binaries, &owner, &dir, &data, &log, cluster.port)?;
        *cluster.postmaster() = Some(child);
        let failure = match cluster.wait_ready() {
            Ok(()) => return Ok(cluster),
            Err(NotReady::Exited(status)) => format!("postgres exited ({status})"),
            Err(NotReady::TimedOut(last)) => {
                format!("postgres did not answer within {START_TIMEOUT:?} (last probe: {last})")
            }
        };
        cluster.stop_server();
        let tail = log_tail(&log);
        if attempt < PORT_ATTEMPTS && tail.contains("Address already in use") {
            continue; // another process took the port in the meantime
        }
        return Err(format!(
            "{failure}; started {owner} on port {} with {}; the end of its log:\n{tail}",
            cluster.port,
            binaries.postgres.display(),
        ));
    }
    unreachable!("the last attempt returns")
}

/// Runs `initdb` for a new data directory `data` inside `dir`.
fn initdb(binaries: &Binaries, owner: &Owner, dir: &Path, data: &Path) -> Result<(), String> {
    let output = owner
        .command(&binaries.initdb)
        .arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync"])
        .current_dir(dir)
        // The C locale exists everywhere, and keeps messages in English.
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("running {} {owner}: {err}", binaries.initdb.display()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "initdb failed ({}): `{} -D {}` {owner}:\n{}{}",
        output.status,
        binaries.initdb.display(),
        data.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    ))
}

/// Starts the server on `port`, its Unix socket in `dir` and its output in the file `log`.
fn spawn_server(
    binaries: &Binaries,
    owner: &Owner,
    dir: &Path,
    data: &Path,
    log: &Path,
    port: u16,
) -> Result<Child, String> {
    let log_file = File::create(log).map_err(|err| format!("creating {}: {err}", log.display()))?;
    let log_err = log_file.try_clone().map_err(|err| format!("duplicating a descriptor: {err}"))?;
    let mut command = owner.command(&binaries.postgres);
    command.arg("-D").arg(data).arg("-p").arg(port.to_string()).arg("-k").arg(dir);
    for setting in SETTINGS {
        command.args(["-c", setting]);
    }
    command
        .current_dir(dir)
        // English messages: a port clash is recognised by its text in the log.
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    postmaster::spawn(command)
        .map_err(|err| format!("starting {} {owner}: {err}", binaries.postgres.display()))
}

/// A loopback TCP port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|err| format!("finding a free port on 127.0.0.1: {err}"))
}

/// `err` and its sources: a `postgres::Error` displays as its kind alone ("db error"), the
/// server's message is its source.
fn chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The last [`LOG_TAIL_LINES`] lines of the server log.
fn log_tail(log: &Path) -> String {
    match std::fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(err) => format!("(cannot read the log: {err})"),
    }
}
