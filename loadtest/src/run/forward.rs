//! `--mode forward`, the parent's side: starts the TCP server (`crate::tcp`, its own process),
//! then per part (latency: `--connections` connections over `--sessions` port sessions;
//! throughput: one session, an upload and a download) the floor (the same client workers
//! dialing the server straight over loopback TCP) and the relay phase (relay, agents, port
//! sessions, the pump on both ends), and puts the four together in one report.

use std::net::SocketAddr;

use anyhow::Context;
use hatch_proto::resume::LinkConfig;

use super::{KillOnDrop, Measured, Plan, Pool, listening, stop_process};
use crate::report::{self, Errors, Forward, Report, Side};
use crate::worker::{ForwardPart, ForwardSpec, Target};

/// Forwarded connections per port session when `--sessions` is not given: one
/// `hatch port-forward` carries every connection made to its local port (a browser, a
/// connection pool), and 100 share one session's window and leg while staying well inside the
/// mux's 1,024 streams.
pub(super) const CONNECTIONS_PER_SESSION: usize = 100;

/// Runs forward mode; `plan` is sized for the latency part's sessions, `per_proc` the
/// connections a worker may hold.
pub(super) fn run(plan: Plan<'_>, base: Report, per_proc: usize) -> anyhow::Result<Report> {
    let args = plan.args;
    anyhow::ensure!(!args.compare_io, "--mode forward runs one I/O backend (no --compare-io)");
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        plan.sessions <= args.connections,
        "--sessions {} exceeds --connections {}: every port session carries a connection",
        plan.sessions,
        args.connections
    );
    let per_session = args.connections.div_ceil(plan.sessions);
    anyhow::ensure!(
        per_session <= hatch_proto::mux::MAX_STREAMS && 2 * per_session + 1 < per_proc,
        "{per_session} connections per session: at most {} streams in one session",
        hatch_proto::mux::MAX_STREAMS
    );
    let link_window =
        args.link_window_kib.map_or(LinkConfig::default().window, |k| k as usize * 1024);
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut server = std::process::Command::new(&exe)
        .arg("forward-server")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the forward-mode TCP server")?;
    let mut guard = KillOnDrop(Some(server.id()));
    let addr: SocketAddr =
        listening(&mut server, "TCP server")?.parse().context("the TCP server's address")?;
    if !args.quiet {
        eprintln!("[forward] TCP server on {addr}");
    }

    // Client side: both ends of each local connection, one leg per session. Agent side: one
    // leg per session, one connection to the server per forwarded connection, a control
    // channel per agent.
    let instances = args.instances.min(plan.sessions).max(1);
    let latency = Plan {
        fwd: Some(ForwardSpec {
            part: ForwardPart::Latency,
            server: addr,
            connections_total: args.connections,
            sessions_total: plan.sessions,
            link_window,
        }),
        client_workers: (2 * args.connections + plan.sessions)
            .div_ceil(per_proc)
            .clamp(1, plan.sessions),
        agent_workers: (args.connections + plan.sessions + instances).div_ceil(per_proc),
        instances,
        ..plan.clone()
    };
    let throughput = Plan {
        sessions: 1,
        fwd: Some(ForwardSpec {
            part: ForwardPart::Throughput,
            server: addr,
            connections_total: 1,
            sessions_total: 1,
            link_window,
        }),
        client_workers: 1,
        agent_workers: 1,
        instances: 1,
        // Two transfers, each given its stall deadlines on top.
        measure_s: 2.0 * args.duration + 4.0 * crate::tcp::STALL.as_secs_f64(),
        ..plan.clone()
    };

    let mut floor = None;
    if !args.skip_floor {
        let lat = latency.direct_phase()?;
        let thr = throughput.direct_phase()?;
        floor = Some((lat, thr));
    }
    let mut relay = None;
    if !args.skip_relay {
        let lat = latency.relay_phase(args.io, base.clone())?;
        let thr = throughput.relay_phase(args.io, base.clone())?;
        relay = Some((lat, thr));
    }
    drop(server.stdin.take());
    stop_process(&mut server);
    guard.0 = None;
    Ok(compose(base, &latency, floor, relay))
}

impl Plan<'_> {
    /// The floor of a forward-mode part: the client workers dial the TCP server directly.
    fn direct_phase(&self) -> anyhow::Result<Measured> {
        // The workers' dialer wants a CA even where nothing speaks TLS.
        let pki = hatch_relay::certs::ensure_dev_pki(&self.work.join("floor-pki"), &[])?;
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut pool = Pool::default();
        for spec in self.client_specs(Target::Direct, &pki.ca_file) {
            pool.spawn(&exe, &spec)?;
        }
        let part = self.fwd.as_ref().map_or("", |f| f.part.as_str());
        let m = pool.measure(self, &format!("floor tcp forward {part}"), None, None)?;
        pool.send_all("end");
        pool.finish();
        Ok(m)
    }
}

/// One side's latency figures with the bulk transfers of its throughput part.
fn side_of(lat: &Side, thr: Option<&Side>) -> Side {
    let mut s = lat.clone();
    if let (Some(f), Some(t)) = (s.forward.as_mut(), thr.and_then(|t| t.forward.as_ref())) {
        f.stats.upload.clone_from(&t.stats.upload);
        f.stats.download.clone_from(&t.stats.download);
    }
    if let Some(t) = thr {
        s.errors += t.errors;
    }
    s
}

fn prefixed(into: &mut Errors, prefix: &str, from: &Errors) {
    for (k, v) in from {
        *into.entry(format!("{prefix}{k}")).or_default() += v;
    }
}

/// Whether every connection of `s` came up and closed with every byte back, and (`sessions`)
/// that many port sessions closed cleanly, and both transfers were verified.
fn side_whole(s: &Side, connections: usize, sessions: Option<usize>) -> bool {
    let Some(f) = &s.forward else { return false };
    let verified = |b: &Option<report::Bulk>| b.as_ref().is_some_and(|b| b.verified && b.bytes > 0);
    s.errors == 0
        && s.sessions_up == connections
        && f.bytes_sent > 0
        && f.bytes_echoed == f.bytes_sent
        && f.bytes_out_of_order == 0
        && f.stats.streams_closed == connections
        && sessions.is_none_or(|n| f.stats.sessions_closed == n)
        && verified(&f.stats.upload)
        && verified(&f.stats.download)
}

/// Bytes both bulk transfers of a side carried.
fn carried(f: Option<&report::ForwardSide>) -> u64 {
    f.map_or(0, |f| {
        f.stats.upload.as_ref().map_or(0, |b| b.bytes)
            + f.stats.download.as_ref().map_or(0, |b| b.bytes)
    })
}

/// CPU seconds over `bytes`, in microseconds per MB.
fn per_mb(cpu_s: Option<f64>, bytes: u64) -> Option<f64> {
    cpu_s.filter(|_| bytes > 0).map(|c| c / (bytes as f64 / 1e6) * 1e6)
}

fn compose(
    base: Report,
    latency: &Plan<'_>,
    floor: Option<(Measured, Measured)>,
    relay: Option<(Report, Report)>,
) -> Report {
    let connections = latency.fwd.as_ref().map_or(0, |f| f.connections_total);
    let link_window = latency.fwd.as_ref().map_or(0, |f| f.link_window);
    let mut errors = Errors::new();
    let floor_cpu =
        floor.as_ref().and_then(|(_, thr)| per_mb(thr.cpu_s, carried(Some(&thr.forward_side()))));
    let floor_side = floor.map(|(lat, thr)| {
        let side = |m: &Measured| {
            let mut s = Side::of(&m.rtt, m.errors.values().sum(), m.up);
            s.forward = Some(m.forward_side());
            s
        };
        prefixed(&mut errors, "floor.", &lat.errors);
        prefixed(&mut errors, "floor.throughput.", &thr.errors);
        side_of(&side(&lat), Some(&side(&thr)))
    });
    let mut r = match relay {
        Some((mut lat, thr)) => {
            lat.relay = lat.relay.as_ref().map(|s| side_of(s, thr.relay.as_ref()));
            prefixed(&mut lat.errors_by_kind, "throughput.", &thr.errors_by_kind);
            let c = std::mem::take(&mut lat.connections);
            for (k, v) in c {
                *lat.connections.entry(format!("latency.{k}")).or_default() += v;
            }
            prefixed(&mut lat.connections, "throughput.", &thr.connections);
            let carried = carried(thr.relay.as_ref().and_then(|s| s.forward.as_ref()));
            let rts = lat.relay.as_ref().map_or(0, |s| s.count);
            let per_rt = |c: Option<f64>| c.filter(|_| rts > 0).map(|c| c / rts as f64 * 1e6);
            lat.forward = Some(Forward {
                client_cpu_us_per_round_trip: per_rt(lat.client_cpu_s),
                agent_cpu_us_per_round_trip: per_rt(lat.agent_cpu_s),
                relay_cpu_us_per_mb: per_mb(thr.relay_cpu_s, carried),
                client_cpu_us_per_mb: per_mb(thr.client_cpu_s, carried),
                agent_cpu_us_per_mb: per_mb(thr.agent_cpu_s, carried),
                ..Forward::default()
            });
            lat
        }
        None => {
            let mut r = base;
            r.io = "none".into();
            r.forward = Some(Forward::default());
            r
        }
    };
    report::merge_errors(&mut r.errors_by_kind, &errors);
    r.floor = floor_side;
    r.set_ratio();
    let mb_s = |s: &Option<Side>, up: bool| {
        let f = s.as_ref()?.forward.as_ref()?;
        let b = if up { &f.stats.upload } else { &f.stats.download };
        b.as_ref().map(|b| b.mb_s)
    };
    let ratio = |up: bool| match (mb_s(&r.relay, up), mb_s(&r.floor, up)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let whole = (r.relay.is_some() || r.floor.is_some())
        && r.errors_by_kind.is_empty()
        && r.relay.as_ref().is_none_or(|s| side_whole(s, connections, Some(r.sessions)))
        && r.floor.as_ref().is_none_or(|s| side_whole(s, connections, None));
    let (upload_ratio, download_ratio) = (ratio(true), ratio(false));
    if let Some(f) = r.forward.as_mut() {
        *f = Forward {
            connections,
            sessions: r.sessions,
            floor: "tcp".into(),
            link_window_bytes: link_window,
            upload_ratio,
            download_ratio,
            floor_client_cpu_us_per_mb: floor_cpu,
            whole,
            ..f.clone()
        };
    }
    r
}
