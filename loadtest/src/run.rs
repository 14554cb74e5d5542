//! The parent process: sizes the workers from the open-file limit, runs the floor phase and one
//! relay phase per I/O backend, prints progress on stderr and the report on stdout.
//!
//! Phase (relay): start the relay process (`relay-process -- dev ...`), read its `dev.json`,
//! start agent workers (register + control channel), read the relay's RSS, start client
//! workers (sessions at `--ramp`), wait until all are `Ready`, read CPU, `go`, wait for `Done`,
//! read RSS and CPU, `end`, stop the relay (so it closes every connection first), close the
//! workers' stdin. The floor phase is the same with the echo server and no agents.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use hatch_relay::dev::DevInfo;

use crate::cli::{Io, Mode, RunArgs};
use crate::proc::FD_RESERVE;
use crate::report::ForwardStats;
use crate::report::{self, Chaos, Errors, Limits, Report, Setup, Side, StreamStats, new_hist};
use crate::worker::{AgentSpec, ClientSpec, Event, ForwardSpec, Spec, Target};

mod forward;

/// API connections a client worker may have open during setup, on top of its sessions.
const SETUP_CONCURRENCY: usize = 128;
/// How long the relay or echo server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long agents may take to register, beyond one second per 50 agents.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace after the measurement for workers to report.
const REPORT_GRACE: Duration = Duration::from_secs(30);
/// How long workers may take to say they heard `end`.
const ENDED_TIMEOUT: Duration = Duration::from_secs(5);
/// More of it after a chaos: a session may take this long to take up its connection.
const RESUME_GRACE: Duration = Duration::from_secs(60);

/// Entry point of a run.
pub fn main(args: RunArgs) -> ExitCode {
    match run(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("hatch-loadtest: {e}"),
                }
            } else {
                print!("{}", report.text());
            }
            if report.forward.as_ref().is_some_and(|f| !f.whole) {
                eprintln!(
                    "hatch-loadtest: FAIL: not every forwarded connection came up and closed \
                     cleanly with every byte back, or a bulk transfer was not verified"
                );
                return ExitCode::FAILURE;
            }
            let broken: Vec<&Report> = std::iter::once(&report)
                .chain(report.other_io.as_deref())
                .filter(|r| r.chaos.as_ref().is_some_and(|c| !c.whole()))
                .collect();
            if !broken.is_empty() {
                eprintln!(
                    "hatch-loadtest: FAIL: not every live session came through the chaos whole \
                     (io {})",
                    broken.iter().map(|r| r.io.as_str()).collect::<Vec<_>>().join(", ")
                );
                return ExitCode::FAILURE;
            }
            if let Some(path) = &args.baseline {
                match report::check_baseline(&report, path, args.max_regression) {
                    Ok(msg) => eprintln!("hatch-loadtest: {msg}"),
                    Err(e) => {
                        eprintln!("hatch-loadtest: FAIL: {e:#}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hatch-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Entry point of `hatch-loadtest relay-process -- <hatch-relay args>`.
pub fn relay_process_main(args: Vec<String>) -> ExitCode {
    let _ = crate::proc::raise_nofile();
    let argv = std::iter::once("hatch-relay".to_owned()).chain(args).map(std::ffi::OsString::from);
    hatch_relay::cli::run(argv)
}

/// What a set of client workers measured.
struct Measured {
    rtt: Histogram<u64>,
    setup: Histogram<u64>,
    setup_wall_s: f64,
    up: usize,
    bytes: u64,
    errors: Errors,
    /// Client connections made during setup, by scheme and TLS handshake kind.
    connections: Errors,
    /// What the echoes carried, and the losses taken up.
    stream: StreamStats,
    /// Sessions still up when the measurement ended.
    up_end: usize,
    /// Forward mode: streams and sessions closed, bulk transfers.
    forward: ForwardStats,
    /// CPU seconds (user + system) of the client workers from `go` to the last `Done`.
    cpu_s: Option<f64>,
}

impl Measured {
    /// Forward mode's figures of this side.
    fn forward_side(&self) -> crate::report::ForwardSide {
        crate::report::ForwardSide {
            bytes_sent: self.stream.bytes_sent,
            bytes_echoed: self.stream.bytes_echoed,
            bytes_out_of_order: self.stream.bytes_out_of_order,
            stats: self.forward.clone(),
        }
    }
}

/// Runs the whole load test and returns its report.
pub fn run(args: &RunArgs) -> anyhow::Result<Report> {
    let nofile = crate::proc::raise_nofile()?;
    let shards =
        args.shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let payload = args.payload.unwrap_or(if args.mode == Mode::Throughput { 16384 } else { 16 });
    let forward = args.mode == Mode::Forward;
    let asked = args.sessions.unwrap_or(if forward {
        args.connections.div_ceil(forward::CONNECTIONS_PER_SESSION)
    } else {
        1000
    });
    anyhow::ensure!(asked > 0, "--sessions must be at least 1");
    anyhow::ensure!(args.rate > 0.0 && args.ramp > 0.0, "--rate and --ramp must be positive");
    anyhow::ensure!(args.duration > 0.0, "--duration must be positive");
    anyhow::ensure!((1..=1 << 20).contains(&payload), "--payload must be 1 B to 1 MiB");
    if args.chaos.is_some() {
        anyhow::ensure!(
            args.api.is_none() && !args.skip_relay,
            "--chaos breaks the relay this run starts: not with --api or --skip-relay"
        );
        anyhow::ensure!(
            args.mode == Mode::Echo && args.acks == crate::cli::Acks::On,
            "--chaos needs --mode echo and --acks on (a resume replays what is unacknowledged)"
        );
    }
    let per_proc = (nofile.saturating_sub(FD_RESERVE) as usize).saturating_sub(SETUP_CONCURRENCY);
    anyhow::ensure!(per_proc > 100, "open-file limit {nofile} is too low for a load test");
    // The relay holds two connections per session plus one control channel per agent.
    // A fleet spreads the agents, and so the sessions, evenly over its nodes.
    let relays = usize::from(args.relays);
    let relay_max = (nofile.saturating_sub(FD_RESERVE) as usize)
        .saturating_sub(args.instances.div_ceil(relays))
        / 2
        * relays;
    let mut sessions = asked;
    let mut capped_by = None;
    if !args.skip_relay && args.api.is_none() && sessions > relay_max {
        capped_by = Some(format!(
            "the open-file limit of {nofile} per relay process ({relays} of them; 2 per session \
             + {} agents): {relay_max} sessions",
            args.instances
        ));
        sessions = relay_max;
    }
    // A fleet: at least one client and one agent worker per node, so both spread over them.
    let client_workers = sessions.div_ceil(per_proc).max(relays);
    let agent_workers = (sessions + args.instances).div_ceil(per_proc).max(relays);
    let limits = Limits {
        nofile,
        relay_max_sessions: relay_max,
        client_workers,
        agent_workers: if args.skip_relay { 0 } else { agent_workers },
        capped_by,
    };
    if let Some(c) = &limits.capped_by {
        eprintln!("hatch-loadtest: {} sessions asked, running {sessions}: capped by {c}", asked);
    }
    let tmp;
    let work: PathBuf = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().to_owned()
        }
    };
    let base = Report {
        sessions,
        sessions_requested: asked,
        duration_s: args.duration,
        mode: format!("{:?}", args.mode).to_lowercase(),
        io: String::new(),
        shards,
        payload_bytes: payload,
        rate_per_s: args.rate,
        transport: if args.danger_plaintext { "plaintext" } else { "tls" }.into(),
        limits,
        ..Report::default()
    };
    // Kept to the end of the run: dropping it stops the cluster.
    let (store_url, _cluster) =
        if args.api.is_some() || args.skip_relay { (None, None) } else { fleet_store(args)? };
    let plan = Plan {
        args,
        sessions,
        payload,
        client_workers,
        agent_workers,
        shards,
        work,
        fwd: None,
        measure_s: args.duration,
        instances: args.instances,
        store: store_url,
    };
    if forward {
        anyhow::ensure!(args.relays == 1, "--relays is for echo, pty and throughput modes");
        return forward::run(plan, base, per_proc);
    }
    anyhow::ensure!(
        args.relays == 1 || (args.api.is_none() && args.chaos.is_none()),
        "--relays starts its own relays: not with --api or --chaos"
    );

    let mut floor_side = None;
    let mut floor_errors = Errors::new();
    if !args.skip_floor {
        let m = plan.floor_phase()?;
        let mut side = Side::of(&m.rtt, m.errors.values().sum(), m.up);
        side.throughput_mb_s_per_session = plan.throughput(&m);
        floor_side = Some(side);
        for (k, v) in m.errors {
            floor_errors.insert(format!("floor.{k}"), v);
        }
    }
    if args.skip_relay {
        let mut r = base;
        r.io = "none".into();
        r.floor = floor_side;
        r.errors_by_kind = floor_errors;
        return Ok(r);
    }
    let ios: Vec<Option<Io>> = match (args.compare_io, args.io) {
        (true, Some(Io::Epoll)) => vec![Some(Io::Epoll), Some(Io::Uring)],
        (true, _) => vec![Some(Io::Uring), Some(Io::Epoll)],
        (false, io) => vec![io],
    };
    let mut reports = Vec::new();
    for io in ios {
        let mut r = plan.relay_phase(io, base.clone())?;
        r.floor = floor_side.clone();
        report::merge_errors(&mut r.errors_by_kind, &floor_errors);
        r.set_ratio();
        reports.push(r);
    }
    let mut first = reports.remove(0);
    if let Some(other) = reports.pop() {
        first.other_io = Some(Box::new(other));
    }
    Ok(first)
}

#[derive(Clone)]
struct Plan<'a> {
    args: &'a RunArgs,
    sessions: usize,
    payload: usize,
    client_workers: usize,
    agent_workers: usize,
    shards: usize,
    work: PathBuf,
    /// Forward mode: the part run and where its connections go.
    fwd: Option<ForwardSpec>,
    /// How long the clients measure after `go`, seconds.
    measure_s: f64,
    /// Simulated agents.
    instances: usize,
    /// The relays' `--store` (a PostgreSQL URL), if not the SQLite default.
    store: Option<String>,
}

/// The relays' store: `--store`, or for a fleet a throwaway PostgreSQL cluster kept for the
/// run (dropped, and so stopped, when the run ends).
fn fleet_store(args: &RunArgs) -> anyhow::Result<(Option<String>, Option<hatch_pgtest::Cluster>)> {
    if let Some(url) = &args.store {
        return Ok((Some(url.clone()), None));
    }
    if args.relays <= 1 {
        return Ok((None, None));
    }
    let cluster = hatch_pgtest::Cluster::try_start()
        .map_err(|e| anyhow::anyhow!("starting PostgreSQL for --relays: {e}"))?;
    let url = cluster.fresh_database();
    Ok((Some(url), Some(cluster)))
}

impl Plan<'_> {
    /// What the clients set up one by one: connections in forward mode's latency part, else
    /// sessions.
    fn units(&self) -> usize {
        match &self.fwd {
            Some(f) if f.part == crate::worker::ForwardPart::Latency => f.connections_total,
            _ => self.sessions,
        }
    }

    fn lifetime_s(&self) -> f64 {
        // Setup at the ramp, the measurement, and generous margins; a worker never outlives it.
        self.units() as f64 / self.args.ramp + self.measure_s + 600.0
    }

    fn throughput(&self, m: &Measured) -> Option<f64> {
        (self.args.mode == Mode::Throughput && m.up > 0)
            .then(|| m.bytes as f64 / self.args.duration / m.up as f64 / 1e6)
    }

    fn client_specs(&self, target: Target, ca: &Path) -> Vec<Spec> {
        let n = self.client_workers.max(1);
        let sources = crate::net::source_addresses(self.sessions);
        let mut first = 0;
        (0..n)
            .map(|w| {
                let count = self.sessions / n + usize::from(w < self.sessions % n);
                let spec = Spec::Clients(ClientSpec {
                    target: target.clone(),
                    forward: self.fwd.clone(),
                    sessions: count,
                    first,
                    ramp: self.args.ramp / n as f64,
                    rate: self.args.rate,
                    payload: self.payload,
                    window: usize::from(self.args.window),
                    duration_s: self.args.duration,
                    mode: self.args.mode,
                    ca_file: ca.to_owned(),
                    sources: sources.clone(),
                    danger_plaintext: self.args.danger_plaintext,
                    acks: self.args.acks == crate::cli::Acks::On,
                    resume: self.args.chaos.is_some(),
                    setup_concurrency: SETUP_CONCURRENCY,
                    lifetime_s: self.lifetime_s(),
                });
                first += count;
                spec
            })
            .collect()
    }

    fn floor_phase(&self) -> anyhow::Result<Measured> {
        let pki = hatch_relay::certs::ensure_dev_pki(&self.work.join("floor-pki"), &[])?;
        let exe = std::env::current_exe().context("locating this executable")?;
        // As many echo servers as relays (`--relays`): a floor in one process would hit that
        // process's open-file limit where the fleet does not.
        let mut servers = Vec::new();
        let mut guards = Vec::new();
        let mut urls = Vec::new();
        for _ in 0..self.args.relays.max(1) {
            let mut server = Command::new(&exe)
                .arg("floor-process")
                .arg("--cert")
                .arg(&pki.cert_file)
                .arg("--key")
                .arg(&pki.key_file)
                .arg("--threads")
                .arg(self.shards.to_string())
                .args(self.args.danger_plaintext.then_some("--danger-plaintext"))
                .args((self.args.acks == crate::cli::Acks::On).then_some("--acks"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the floor echo server")?;
            guards.push(KillOnDrop(Some(server.id())));
            let addr = listening(&mut server, "echo server")?;
            let scheme = if self.args.danger_plaintext { "ws" } else { "wss" };
            urls.push(format!("{scheme}://{addr}/echo"));
            servers.push(server);
        }
        let mut pool = Pool::default();
        let target = Target::Floor { url: urls[0].clone() };
        for (w, mut spec) in self.client_specs(target, &pki.ca_file).into_iter().enumerate() {
            if let Spec::Clients(c) = &mut spec
                && let Target::Floor { url } = &mut c.target
            {
                *url = urls[w % urls.len()].clone();
            }
            pool.spawn(&exe, &spec)?;
        }
        let label = if self.args.danger_plaintext { "floor plaintext" } else { "floor" };
        let m = pool.measure(self, label, None, None)?;
        pool.send_all("end");
        pool.wait_ended();
        for (mut server, mut guard) in servers.into_iter().zip(guards) {
            drop(server.stdin.take());
            stop_process(&mut server);
            // Reaped: its pid may belong to another process now.
            guard.0.take();
        }
        pool.finish();
        Ok(m)
    }

    fn relay_phase(&self, io: Option<Io>, mut report: Report) -> anyhow::Result<Report> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut relay = None;
        let info = match &self.args.api {
            Some(api) => {
                report.io = "external".into();
                DevInfo {
                    api_url: api.clone(),
                    data_url: String::new(),
                    account_id: String::new(),
                    access_key: self.args.access_key.clone().unwrap_or_default(),
                    activation_id: self
                        .args
                        .activation_id
                        .clone()
                        .context("--activation-id is needed to register agents")?,
                    activation_code: self
                        .args
                        .activation_code
                        .clone()
                        .context("--activation-code is needed to register agents")?,
                    ca_file: self
                        .args
                        .ca
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                }
            }
            None => {
                report.io = io.map_or("default", Io::as_str).into();
                let (child, info) = self.start_relay(&exe, io)?;
                relay = Some(child);
                if let Some(mode) = self.args.record {
                    self.set_recording(io, &info, mode)?;
                }
                info
            }
        };
        let mut guard = KillOnDrop(relay.as_ref().map(|c| c.id()));
        let pid = relay.as_ref().map(|c| c.id());
        // The other nodes of a fleet, with the first node's certificate: their clients and
        // agents trust the one CA.
        let mut others = Vec::new();
        for n in 1..usize::from(self.args.relays) {
            others.push(self.start_node(&exe, io, n)?);
        }
        let other_guards: Vec<KillOnDrop> =
            others.iter().map(|(c, _): &(Child, DevInfo)| KillOnDrop(Some(c.id()))).collect();
        let api_urls: Vec<String> = std::iter::once(info.api_url.clone())
            .chain(others.iter().map(|(_, i)| i.api_url.clone()))
            .collect();
        let pids: Vec<u32> = pid.into_iter().chain(others.iter().map(|(c, _)| c.id())).collect();
        let node_cpu = |pids: &[u32]| -> Vec<Option<f64>> {
            pids.iter().map(|&p| crate::proc::cpu_seconds(p).ok()).collect()
        };
        let total = |v: &[Option<f64>]| -> Option<f64> { v.iter().copied().sum() };
        let mut agents_per_node = vec![0usize; api_urls.len()];
        let label = match &self.fwd {
            Some(f) => {
                format!("relay {} {} forward {}", report.io, report.transport, f.part.as_str())
            }
            None => format!("relay {} {}", report.io, report.transport),
        };

        // Agents first: every instance online before the first session is started.
        let mut agents = Pool::default();
        // Worker w's agents are on node w mod N (there are at least N workers).
        let n = self.agent_workers.max(1);
        for w in 0..n {
            let count = self.instances / n + usize::from(w < self.instances % n);
            agents_per_node[w % api_urls.len()] += count;
            let spec = Spec::Agents(AgentSpec {
                api_url: api_urls[w % api_urls.len()].clone(),
                ca_file: PathBuf::from(&info.ca_file),
                activation_id: info.activation_id.clone(),
                activation_code: info.activation_code.clone(),
                instances: count,
                mode: self.args.mode,
                sources: Vec::new(),
                danger_plaintext: self.args.danger_plaintext,
                acks: self.args.acks == crate::cli::Acks::On,
                resume: self.args.chaos.is_some(),
                link_window: self.fwd.as_ref().map_or_else(
                    || hatch_proto::resume::LinkConfig::default().window,
                    |f| f.link_window,
                ),
                lifetime_s: self.lifetime_s(),
            });
            agents.spawn(&exe, &spec)?;
        }
        let deadline =
            Instant::now() + REGISTER_TIMEOUT + Duration::from_secs((self.instances / 50) as u64);
        let mut instances = Vec::new();
        let mut errors = Errors::new();
        let mut registered = 0;
        while registered < agents.len() {
            match agents.next(deadline)? {
                (_, Event::Registered { instance_ids, errors: e }) => {
                    instances.extend(instance_ids);
                    report::merge_errors(&mut errors, &e);
                    registered += 1;
                }
                (_, Event::Fatal { message }) => bail!("agent worker failed: {message}"),
                _ => {}
            }
        }
        if instances.is_empty() {
            bail!("no simulated agent could register and connect: {errors:?}");
        }
        if !self.args.quiet {
            eprintln!("[{label}] {} agents online", instances.len());
        }
        let rss_before = pids.iter().map(|&p| crate::proc::rss_bytes(p).ok()).sum::<Option<u64>>();

        let mut clients = Pool::default();
        let target = Target::Relay {
            api_url: info.api_url.clone(),
            access_key: info.access_key.clone(),
            instances,
        };
        let cpu_setup_start = total(&node_cpu(&pids));
        let threads_setup_start = pid.and_then(|p| crate::proc::thread_cpu_seconds(p).ok());
        // A fleet: client worker w starts its sessions through node w mod N's API.
        for (w, mut spec) in
            self.client_specs(target, Path::new(&info.ca_file)).into_iter().enumerate()
        {
            if let Spec::Clients(c) = &mut spec
                && let Target::Relay { api_url, .. } = &mut c.target
            {
                *api_url = api_urls[w % api_urls.len()].clone();
            }
            clients.spawn(&exe, &spec)?;
        }
        let mut nodes_at_go: Vec<Option<f64>> = Vec::new();
        let mut sockets_at_go: Vec<Option<u64>> = Vec::new();
        let mut rss_at_go: Vec<Option<u64>> = Vec::new();
        let mut at_go = None;
        let mut threads_at_go = None;
        let mut agents_at_go = None;
        let mut restarted = None;
        let chaos_at = Duration::from_secs_f64(self.args.duration / 3.0);
        let mut restart = || -> anyhow::Result<()> {
            let Some(old) = relay.as_mut() else { return Ok(()) };
            let (child, down) = self.restart_relay(&exe, io, old, &info)?;
            guard.0 = Some(child.id());
            relay = Some(child);
            restarted = Some(down);
            if !self.args.quiet {
                eprintln!("[{label}] relay killed and started again: down {down:?}");
            }
            Ok(())
        };
        let m = clients.measure(
            self,
            &label,
            Some(
                (&mut |_| {
                    nodes_at_go = node_cpu(&pids);
                    at_go = total(&nodes_at_go);
                    threads_at_go = pid.and_then(|p| crate::proc::thread_cpu_seconds(p).ok());
                    agents_at_go = agents.cpu_seconds();
                    sockets_at_go = pids.iter().map(|&p| crate::proc::sockets(p).ok()).collect();
                    rss_at_go = pids.iter().map(|&p| crate::proc::rss_bytes(p).ok()).collect();
                }) as &mut dyn FnMut(()),
            ),
            self.args
                .chaos
                .map(|_| (chaos_at, &mut restart as &mut dyn FnMut() -> anyhow::Result<()>)),
        )?;
        // After a restart the process measured at `go` is gone: its CPU and memory figures
        // would mix two processes, so they are left out.
        let pid = if restarted.is_some() { None } else { pid };
        let nodes_end = node_cpu(&pids);
        let cpu_end = if pid.is_some() { total(&nodes_end) } else { None };
        if pids.len() > 1 {
            report.nodes = (0..pids.len())
                .map(|i| crate::report::NodeFigures {
                    api_url: api_urls[i].clone(),
                    agents: agents_per_node[i],
                    sockets_at_go: sockets_at_go.get(i).copied().flatten(),
                    cpu_s: nodes_at_go
                        .get(i)
                        .copied()
                        .flatten()
                        .zip(nodes_end[i])
                        .map(|(a, b)| b - a),
                    rss_bytes: rss_at_go.get(i).copied().flatten(),
                })
                .collect();
        }
        report.agent_cpu_s = agents_at_go.zip(agents.cpu_seconds()).map(|(a, b)| b - a);
        report.client_cpu_s = m.cpu_s;
        let rss_end = if pid.is_some() {
            pids.iter().map(|&p| crate::proc::rss_bytes(p).ok()).sum::<Option<u64>>()
        } else {
            None
        };
        clients.send_all("end");
        agents.send_all("end");
        // The relay's closing connections are not failures once every worker has heard `end`.
        clients.wait_ended();
        agents.wait_ended();
        if let Some(mut r) = relay.take() {
            stop_process(&mut r);
            // Reaped: its pid may belong to another process now.
            guard.0 = None;
        }
        for ((mut c, _), mut g) in others.into_iter().zip(other_guards) {
            stop_process(&mut c);
            // Reaped: nothing for the guard to kill.
            g.0.take();
        }
        clients.finish();
        let mut connections: Errors =
            m.connections.iter().map(|(k, v)| (format!("client.{k}"), *v)).collect();
        for (_, ev) in agents.finish() {
            if let Event::Done { errors: e, connections: c, .. } = ev {
                report::merge_errors(&mut errors, &e);
                for (k, v) in c {
                    *connections.entry(format!("agent.{k}")).or_default() += v;
                }
            }
        }
        report.connections = connections;
        report::merge_errors(&mut errors, &m.errors);

        let mut side = Side::of(&m.rtt, m.errors.values().sum(), m.up);
        side.throughput_mb_s_per_session = self.throughput(&m);
        side.forward = self.fwd.as_ref().map(|_| m.forward_side());
        // The relay does nothing but set up sessions between the clients' start and `go` (the
        // agents' heartbeats aside), so its CPU over that time, per session up, is a setup's.
        let per_setup = |a: f64, b: f64| (m.up > 0).then(|| (b - a) / m.up as f64 * 1e6);
        report.setup = Setup {
            sessions_per_s: if m.setup_wall_s > 0.0 { m.up as f64 / m.setup_wall_s } else { 0.0 },
            p99_ms: m.setup.value_at_quantile(0.99) as f64 / 1000.0,
            relay_cpu_us_per_session: match (cpu_setup_start, at_go) {
                (Some(a), Some(b)) => per_setup(a, b),
                _ => None,
            },
            relay_cpu_us_per_session_by_thread: match (&threads_setup_start, &threads_at_go) {
                (Some(a), Some(b)) => b
                    .iter()
                    .filter_map(|(k, &t)| {
                        per_setup(a.get(k).copied().unwrap_or(0.0), t).map(|us| (k.clone(), us))
                    })
                    .collect(),
                _ => Default::default(),
            },
        };
        report.relay_rss_bytes = rss_end;
        report.rss_per_session_bytes = match (rss_before, rss_end) {
            (Some(a), Some(b)) if m.up > 0 => Some(b.saturating_sub(a) / m.up as u64),
            _ => None,
        };
        report.cpu_s_per_million_msgs = match (at_go, cpu_end) {
            // Each round trip is two relayed DATA messages (client → agent, agent → client).
            (Some(a), Some(b)) if side.count > 0 => Some((b - a) / (2 * side.count) as f64 * 1e6),
            _ => None,
        };
        report.cpu_us_per_round_trip = report.cpu_s_per_million_msgs.map(|c| 2.0 * c);
        report.relay_cpu_s = match (at_go, cpu_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        if let Some(chaos) = self.args.chaos {
            let mut h = new_hist();
            m.stream.resume_time.add_to(&mut h);
            let ms = |us: u64| us as f64 / 1000.0;
            report.chaos = Some(Chaos {
                scenario: chaos.as_str().into(),
                at_s: chaos_at.as_secs_f64(),
                relay_down_ms: restarted.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                sessions_live: m.up,
                sessions_lost: m.stream.sessions_lost,
                sessions_resumed: m.stream.sessions_resumed,
                sessions_up_at_end: m.up_end,
                bytes_sent: m.stream.bytes_sent,
                bytes_lost: m.stream.bytes_sent.saturating_sub(m.stream.bytes_echoed),
                bytes_out_of_order: m.stream.bytes_out_of_order,
                round_trips_interrupted: m.stream.round_trips_interrupted,
                resume_p50_ms: ms(h.value_at_quantile(0.50)),
                resume_p99_ms: ms(h.value_at_quantile(0.99)),
                resume_max_ms: ms(h.max()),
            });
        }
        report.relay = Some(side);
        report.errors_by_kind = errors;
        Ok(report)
    }

    /// `--record`: the demo account records its sessions from now on, set in the relay's store
    /// as `hatch-relay admin accounts prefs --recording` does (the relay reads the account at
    /// each session start).
    fn set_recording(
        &self,
        io: Option<Io>,
        info: &DevInfo,
        mode: hatch_proto::api::RecordingMode,
    ) -> anyhow::Result<()> {
        // A fleet's throwaway store is not where this run could name it.
        anyhow::ensure!(self.args.relays == 1, "--record runs against one relay");
        let dir = self.relay_dir(io);
        let store = hatch_relay::control::store::open(self.args.store.as_deref(), &dir)?;
        let update =
            hatch_proto::api::AccountSettingsUpdate { recording: Some(mode), ..Default::default() };
        hatch_relay::control::iam::update_settings(store.as_ref(), &info.account_id, &update)
            .context("setting the account's recording")?;
        if !self.args.quiet {
            eprintln!(
                "recording: {} (into {})",
                mode.as_str(),
                hatch_relay::recording::dir_of(&dir).display()
            );
        }
        Ok(())
    }

    fn start_relay(&self, exe: &Path, io: Option<Io>) -> anyhow::Result<(Child, DevInfo)> {
        let dir = self.relay_dir(io);
        let _ = std::fs::remove_file(dir.join("dev.json"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let listen = ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned());
        let child = self.launch_relay(exe, io, &listen, false)?;
        self.wait_for_relay(child, io, None)
    }

    /// Starts fleet node `n` (1..) in its own data directory, with node 0's TLS files.
    fn start_node(&self, exe: &Path, io: Option<Io>, n: usize) -> anyhow::Result<(Child, DevInfo)> {
        let dir = self.node_dir(io, n);
        let _ = std::fs::remove_file(dir.join("dev.json"));
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).with_context(|| format!("creating {}", tls.display()))?;
        for e in std::fs::read_dir(self.relay_dir(io).join("tls"))? {
            let e = e?;
            std::fs::copy(e.path(), tls.join(e.file_name()))?;
        }
        let log_path =
            self.work.join(format!("relay-{}-node{n}.log", io.map_or("default", Io::as_str)));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = spawn_relay_process(exe, self.relay_args_for(&dir, io), log)
            .with_context(|| format!("starting relay node {n}"))?;
        wait_for_dev_json(child, &dir, &log_path, None, &format!("relay node {n}"))
    }

    fn node_dir(&self, io: Option<Io>, n: usize) -> PathBuf {
        self.work.join(format!("relay-{}-node{n}", io.map_or("default", Io::as_str)))
    }

    /// [`relay_args`] with this run's store.
    fn relay_args_for(&self, dir: &Path, io: Option<Io>) -> Vec<String> {
        let mut args = relay_args(dir, io, self.shards, self.args.danger_plaintext);
        if let Some(url) = &self.store {
            args.extend(["--store".into(), url.clone()]);
        }
        args
    }

    /// Kills the relay (SIGKILL: no close frame, nothing written at the end) and starts it
    /// again at once on the same ports and data directory, as a supervisor would. Returns the
    /// new process and the time from the kill until it serves (its new `dev.json`).
    fn restart_relay(
        &self,
        exe: &Path,
        io: Option<Io>,
        old: &mut Child,
        info: &DevInfo,
    ) -> anyhow::Result<(Child, Duration)> {
        let dev_json = self.relay_dir(io).join("dev.json");
        let before =
            std::fs::metadata(&dev_json).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let killed = Instant::now();
        let _ = old.kill();
        let _ = old.wait();
        let addr = |url: &str| url.split_once("://").map_or(url, |(_, a)| a).to_owned();
        let listen = (addr(&info.api_url), addr(&info.data_url));
        let child = self.launch_relay(exe, io, &listen, true)?;
        let (child, _) = self.wait_for_relay(child, io, before)?;
        Ok((child, killed.elapsed()))
    }

    fn relay_dir(&self, io: Option<Io>) -> PathBuf {
        self.work.join(format!("relay-{}", io.map_or("default", Io::as_str)))
    }

    fn relay_log(&self, io: Option<Io>) -> PathBuf {
        self.work.join(format!("relay-{}.log", io.map_or("default", Io::as_str)))
    }

    /// Starts the relay process on `listen` (API, data plane); `append` keeps the log of an
    /// earlier process.
    fn launch_relay(
        &self,
        exe: &Path,
        io: Option<Io>,
        listen: &(String, String),
        append: bool,
    ) -> anyhow::Result<Child> {
        let log_path = self.relay_log(io);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut args = self.relay_args_for(&self.relay_dir(io), io);
        for (flag, addr) in [("--api-listen", &listen.0), ("--data-listen", &listen.1)] {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = addr.clone();
            }
        }
        spawn_relay_process(exe, args, log).context("starting the relay process")
    }

    /// Waits until the relay has written a `dev.json` (a new one: not the file with inode
    /// `stale`, an earlier process's) and returns what it says.
    fn wait_for_relay(
        &self,
        child: Child,
        io: Option<Io>,
        stale: Option<u64>,
    ) -> anyhow::Result<(Child, DevInfo)> {
        wait_for_dev_json(child, &self.relay_dir(io), &self.relay_log(io), stale, "the relay")
    }
}

/// Starts this binary's `relay-process` with `args`, its stdout and stderr to `log`.
fn spawn_relay_process(exe: &Path, args: Vec<String>, log: std::fs::File) -> anyhow::Result<Child> {
    Ok(Command::new(exe)
        .arg("relay-process")
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Waits until the relay `child` (`what`, for errors) has written a `dev.json` in `dir` (a
/// new one: not the file with inode `stale`, an earlier process's) and returns what it says;
/// its exit or [`START_TIMEOUT`] first is an error with the tail of its log.
fn wait_for_dev_json(
    mut child: Child,
    dir: &Path,
    log_path: &Path,
    stale: Option<u64>,
    what: &str,
) -> anyhow::Result<(Child, DevInfo)> {
    let deadline = Instant::now() + START_TIMEOUT;
    let dev_json = dir.join("dev.json");
    loop {
        let fresh = std::fs::metadata(&dev_json)
            .is_ok_and(|m| Some(std::os::unix::fs::MetadataExt::ino(&m)) != stale);
        if fresh
            && let Ok(text) = std::fs::read_to_string(&dev_json)
            && let Ok(info) = serde_json::from_str::<DevInfo>(&text)
        {
            return Ok((child, info));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}) before writing {}; its log:\n{}",
                dev_json.display(),
                tail(log_path)
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "{what} did not write {} in time; its log:\n{}",
                dev_json.display(),
                tail(log_path)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Arguments of the relay process: `dev` on loopback port 0 with this backend and shard count,
/// and with `danger_plaintext` a data plane without TLS (the API keeps it).
fn relay_args(dir: &Path, io: Option<Io>, shards: usize, danger_plaintext: bool) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "dev".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--api-listen".into(),
        "127.0.0.1:0".into(),
        "--data-listen".into(),
        "127.0.0.1:0".into(),
        "--shards".into(),
        shards.to_string(),
        // One owner key starts every session at --ramp: the relay's per-key rate and
        // per-user limits (abuse guards, 20/s and 100 by default) would refuse most of them.
        "--session-rate".into(),
        "0".into(),
        "--max-sessions-per-user".into(),
        "1000000".into(),
        // A fleet's runs hold more sessions than one relay's default account limit.
        "--max-sessions-per-account".into(),
        "10000000".into(),
        "--max-sessions-per-instance".into(),
        "1000000".into(),
    ];
    if let Some(io) = io {
        args.extend(["--io".into(), io.as_str().into()]);
    }
    if danger_plaintext {
        args.push("--danger-plaintext".into());
    }
    args
}

/// The address a server process we started prints (`listening <addr>`), within
/// [`START_TIMEOUT`].
fn listening(server: &mut Child, what: &str) -> anyhow::Result<String> {
    let out = server.stdout.take().with_context(|| format!("{what} stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(START_TIMEOUT).with_context(|| format!("{what} did not start"))?;
    let addr = line.trim().strip_prefix("listening ");
    Ok(addr.with_context(|| format!("{what} did not start"))?.to_owned())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Stops a server process: SIGTERM, then SIGKILL if it is still there after 1 s. Either way the
/// server closes its connections first.
fn stop_process(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills a process on drop (error paths), so no relay or echo server outlives the run. Cleared
/// once the process has been stopped and reaped, so a reused pid is never signalled.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

enum Msg {
    Ev(usize, Event),
    Exit(usize),
}

/// Worker processes of one kind and their event stream.
#[derive(Default)]
struct Pool {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    rx: Option<mpsc::Receiver<Msg>>,
    tx: Option<mpsc::Sender<Msg>>,
    exited: usize,
}

impl Pool {
    fn len(&self) -> usize {
        self.children.len()
    }

    fn spawn(&mut self, exe: &Path, spec: &Spec) -> anyhow::Result<()> {
        if self.tx.is_none() {
            let (tx, rx) = mpsc::channel();
            self.tx = Some(tx);
            self.rx = Some(rx);
        }
        let idx = self.children.len();
        let mut child = Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a worker process")?;
        let mut stdin = child.stdin.take().context("worker stdin")?;
        writeln!(stdin, "{}", serde_json::to_string(spec)?)?;
        stdin.flush()?;
        let out = child.stdout.take().context("worker stdout")?;
        let tx = self.tx.clone().context("event channel")?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Event>(&line) {
                    Ok(ev) => {
                        if tx.send(Msg::Ev(idx, ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("hatch-loadtest: worker {idx}: bad event line: {e}"),
                }
            }
            let _ = tx.send(Msg::Exit(idx));
        });
        self.children.push(child);
        self.stdins.push(Some(stdin));
        Ok(())
    }

    /// CPU seconds (user + system) of all the workers so far, if every one could be read.
    fn cpu_seconds(&self) -> Option<f64> {
        self.children.iter().map(|c| crate::proc::cpu_seconds(c.id()).ok()).sum()
    }

    fn send_all(&mut self, line: &str) {
        for s in self.stdins.iter_mut().flatten() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// Waits (bounded) until every worker has said it heard `end`; events meanwhile are
    /// dropped (after their `Done`, workers send only progress until they stop).
    fn wait_ended(&mut self) {
        let deadline = Instant::now() + ENDED_TIMEOUT;
        let mut ended = vec![false; self.len()];
        while ended.iter().any(|e| !e) {
            match self.poll(deadline) {
                Ok(Some((i, Event::Ended))) => {
                    if let Some(e) = ended.get_mut(i) {
                        *e = true;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// The next event before `deadline`; a worker exiting early is an error.
    fn next(&mut self, deadline: Instant) -> anyhow::Result<(usize, Event)> {
        self.poll(deadline)?.context("timed out waiting for the workers")
    }

    /// The next event before `deadline`, or `None` at it; a worker exiting early is an error.
    fn poll(&mut self, deadline: Instant) -> anyhow::Result<Option<(usize, Event)>> {
        let rx = self.rx.as_ref().context("no workers")?;
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Ev(i, ev)) => Ok(Some((i, ev))),
            Ok(Msg::Exit(i)) => {
                self.exited += 1;
                bail!("worker {i} exited early (its stderr is above)");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("every worker is gone"),
        }
    }

    /// Waits for every client worker's `Ready`, says `go`, prints progress, and collects `Done`.
    ///
    /// `mid`, when given, runs once that long after `go` (the chaos), and the workers get
    /// [`RESUME_GRACE`] longer to report.
    fn measure(
        &mut self,
        plan: &Plan<'_>,
        label: &str,
        mut at_go: Option<&mut dyn FnMut(())>,
        mut mid: Option<(Duration, &mut dyn FnMut() -> anyhow::Result<()>)>,
    ) -> anyhow::Result<Measured> {
        let n = self.len();
        let args = plan.args;
        let mut m = Measured {
            rtt: new_hist(),
            setup: new_hist(),
            setup_wall_s: 0.0,
            up: 0,
            bytes: 0,
            errors: Errors::new(),
            connections: Errors::new(),
            stream: StreamStats::default(),
            up_end: 0,
            forward: ForwardStats::default(),
            cpu_s: None,
        };
        let mut ups = vec![0usize; n];
        let mut interval = new_hist();
        let mut msgs = 0u64;
        let mut last_print = Instant::now();
        let mut print =
            |ups: &[usize], interval: &mut Histogram<u64>, msgs: &mut u64, phase: &str| {
                if args.quiet || last_print.elapsed() < Duration::from_secs(1) {
                    return;
                }
                let secs = last_print.elapsed().as_secs_f64();
                last_print = Instant::now();
                eprintln!(
                    "[{label}] {phase}: {} up {}/{}, {:.0} msgs/s, p99 {} us",
                    if plan.fwd.is_some() { "connections" } else { "sessions" },
                    ups.iter().sum::<usize>(),
                    plan.units(),
                    *msgs as f64 / secs,
                    interval.value_at_quantile(0.99)
                );
                interval.reset();
                *msgs = 0;
            };
        let setup_deadline = Instant::now()
            + crate::sim::setup_allowance(plan.units(), args.ramp)
            + Duration::from_secs(120);
        let mut ready = 0;
        while ready < n {
            let (i, ev) = self.next(setup_deadline)?;
            match ev {
                Event::Progress { up, .. } => ups[i] = up,
                Event::Ready { up, setup_wall_s, setup, errors, connections } => {
                    ups[i] = up;
                    m.up += up;
                    report::merge_errors(&mut m.connections, &connections);
                    m.setup_wall_s = m.setup_wall_s.max(setup_wall_s);
                    setup.add_to(&mut m.setup);
                    report::merge_errors(&mut m.errors, &errors);
                    ready += 1;
                }
                Event::Fatal { message } => bail!("client worker {i} failed: {message}"),
                _ => {}
            }
            print(&ups, &mut interval, &mut msgs, "setup");
        }
        if m.up == 0 {
            bail!("no session could be set up: {:?}", m.errors);
        }
        if let Some(f) = at_go.as_mut() {
            f(());
        }
        let cpu_go = self.cpu_seconds();
        self.send_all("go");
        let go = Instant::now();
        let grace = if mid.is_some() { REPORT_GRACE + RESUME_GRACE } else { REPORT_GRACE };
        let deadline = go + Duration::from_secs_f64(plan.measure_s) + grace;
        let mut done = 0;
        let mut up_end = 0;
        while done < n {
            let due = mid.as_ref().map(|(after, _)| go + *after);
            let got = self.poll(due.map_or(deadline, |d| d.min(deadline)))?;
            let Some((i, ev)) = got else {
                match mid.take() {
                    Some((_, f)) => f()?,
                    None => bail!("timed out waiting for the workers"),
                }
                continue;
            };
            match ev {
                Event::Progress { up, msgs: k, rtt } => {
                    ups[i] = up;
                    msgs += k;
                    rtt.add_to(&mut interval);
                }
                Event::Done { up, rtt, bytes, errors, stream, forward, .. } => {
                    up_end += up;
                    m.stream.merge(&stream);
                    m.forward.merge(&forward);
                    rtt.add_to(&mut m.rtt);
                    m.bytes += bytes;
                    report::merge_errors(&mut m.errors, &errors);
                    done += 1;
                }
                Event::Fatal { message } => bail!("client worker {i} failed: {message}"),
                _ => {}
            }
            print(&ups, &mut interval, &mut msgs, "measure");
        }
        if up_end < m.up && !args.quiet {
            eprintln!("[{label}] {} sessions failed during the measurement", m.up - up_end);
        }
        m.up_end = up_end;
        m.cpu_s = cpu_go.zip(self.cpu_seconds()).map(|(a, b)| b - a);
        Ok(m)
    }

    /// Closes every worker's stdin and waits (bounded) for them to exit; returns the events
    /// they sent meanwhile.
    fn finish(&mut self) -> Vec<(usize, Event)> {
        for s in &mut self.stdins {
            drop(s.take());
        }
        drop(self.tx.take());
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        if let Some(rx) = &self.rx {
            while self.exited < self.children.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(Msg::Ev(i, ev)) => out.push((i, ev)),
                    Ok(Msg::Exit(_)) => self.exited += 1,
                    Err(_) => break,
                }
            }
        }
        for c in &mut self.children {
            if !matches!(c.try_wait(), Ok(Some(_))) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        out
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for c in &mut self.children {
            if !matches!(c.try_wait(), Ok(Some(_))) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
