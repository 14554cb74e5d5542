//! Forward mode's simulated clients and agents: `hatch port-forward` and `hatch-agent` port
//! sessions, with the real `hatch_forward::pump` on both ends and real TCP connections.
//!
//! Client session (relay): `POST /v1/sessions` with `mode: "port"` and the TCP server
//! (`crate::tcp`) as `remote_host:remote_port`, the data leg with `hatch`'s WebSocket settings,
//! and a local listener: each connection is a socket connected to that listener, whose accepted
//! half goes to the pump as a [`hatch_forward::Conn`], exactly what `hatch port-forward` does
//! with the connections it accepts; the load test reads and writes the other half. On the floor
//! the same connections go straight to the server. Agent: on a port `session.open`, the data
//! leg with `hatch-agent`'s settings and the pump with `hatch_agent::forward::dialer` (the
//! agent's own connect, `--allow-forward` default) as its dial.
//!
//! Latency part: the session's connections are set up one after the other (connect, accept,
//! the stream's OPEN, one echo), then after `go` each sends `payload` bytes every `1/rate` s
//! and times the echo; every echoed byte is checked in place ([`Check`]). At the end each
//! connection half-closes and reads to the echo's FIN; once all have, the client's pump ends
//! the session (close 1000). Throughput part: one session; after `go`, one connection uploads
//! for `duration_s` and then another downloads for as long, every byte checked against
//! [`Pattern`] and the count the far end reports.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hatch_forward::{End, Note, Role};
use hatch_proto::api::{Mode as ApiMode, StartSessionRequest, StartSessionResponse};
use hatch_proto::close;
use hatch_proto::resume::LinkConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use super::{API_TIMEOUT, Check, ECHO_TIMEOUT, SETUP_TIMEOUT, Shared, payload_of, settle_then_go};
use crate::net::{Dialer, Failure, agent_leg_config, api_error, client_leg_config};
use crate::report::{Buckets, Bulk, record};
use crate::tcp::{BULK_BUF, Pattern, STALL};
use crate::worker::{AgentSpec, ClientSpec, Ctl, Event, ForwardPart, ForwardSpec, Target, emit};

/// Local connections waiting for their stream, as in `hatch port-forward`.
const ACCEPT_QUEUE: usize = 64;
/// How long a session's pump may take to end once its streams have ended.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a forward-mode client worker: sets up its sessions and connections, reports `Ready`,
/// measures after `go`, reports `Done`, holds on until stdin closes.
pub async fn run_clients(
    spec: ClientSpec,
    fwd: ForwardSpec,
    mut ctl: watch::Receiver<Ctl>,
) -> anyhow::Result<()> {
    let tls = hatch_relay::certs::client_config_with_ca(&spec.ca_file)?;
    let dialer = Dialer::new(tls, spec.sources.clone()).danger_plaintext(spec.danger_plaintext);
    let sh = Shared::new();
    tokio::task::spawn_local(sh.clone().progress(ctl.clone()));
    tokio::task::spawn_local(sh.clone().watch_end(ctl.clone()));
    let spec = Rc::new(spec);
    let fwd = Rc::new(fwd);
    // What is set up and measured: connections (latency), sessions (throughput).
    let units: usize = match fwd.part {
        ForwardPart::Latency => {
            (0..spec.sessions).map(|i| fwd.connections_of(spec.first + i)).sum()
        }
        ForwardPart::Throughput => spec.sessions,
    };
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<bool>();
    let (measured_tx, mut measured_rx) = mpsc::unbounded_channel::<usize>();
    let sem = Arc::new(Semaphore::new(spec.setup_concurrency.max(1)));
    let t0 = Instant::now();
    {
        let (spec, fwd, sh, dialer) = (spec.clone(), fwd.clone(), sh.clone(), dialer.clone());
        let (go_rx, ctl) = (go_rx.clone(), ctl.clone());
        tokio::task::spawn_local(async move {
            let step = Duration::from_secs_f64(1.0 / spec.ramp.max(0.001));
            for i in 0..spec.sessions {
                tokio::time::sleep_until(t0 + step.mul_f64(i as f64)).await;
                // The semaphore is never closed, so acquiring only waits.
                let Ok(permit) = sem.clone().acquire_owned().await else { return };
                let s = PortSession {
                    n: spec.first + i,
                    spec: spec.clone(),
                    fwd: fwd.clone(),
                    sh: sh.clone(),
                    // Each session is its own `hatch port-forward` process.
                    dialer: dialer.own_process(),
                };
                let (go_rx, ctl, done, measured) =
                    (go_rx.clone(), ctl.clone(), done_tx.clone(), measured_tx.clone());
                tokio::task::spawn_local(s.run(permit, go_rx, ctl, done, measured));
            }
        });
    }
    let Some(go) =
        settle_then_go(&sh, units, spec.ramp, t0, &mut done_rx, &dialer, &mut ctl, &go_tx).await
    else {
        return Ok(());
    };
    let measuring = match fwd.part {
        ForwardPart::Latency => Duration::from_secs_f64(spec.duration_s) + ECHO_TIMEOUT,
        // Two transfers, each drained, answered and closed within its stall deadlines.
        ForwardPart::Throughput => Duration::from_secs_f64(2.0 * spec.duration_s) + 4 * STALL,
    };
    let end = go + measuring + CLOSE_TIMEOUT + Duration::from_secs(1);
    let up = sh.up.get();
    let mut finished = 0;
    while finished < up {
        match tokio::time::timeout_at(end, measured_rx.recv()).await {
            Ok(Some(n)) => finished += n,
            _ => break,
        }
    }
    emit(&Event::Done {
        up: sh.up.get(),
        rtt: Buckets::of(&sh.rtt.borrow()),
        bytes: sh.bytes.get(),
        errors: sh.errors.borrow().clone(),
        connections: dialer.connections(),
        stream: sh.stream_stats(),
        forward: Box::new(sh.forward.borrow().clone()),
    });
    let _ = ctl.wait_for(|c| *c == Ctl::Stop).await;
    Ok(())
}

/// The session window and timers of `hatch port-forward`'s pump, with `window`.
fn client_pump_config(window: usize) -> hatch_forward::Config {
    hatch_forward::Config {
        link: LinkConfig { window, ..LinkConfig::default() },
        ping_interval: hatch_client::stream::PING_EVERY,
        dead_after: hatch_client::stream::DEAD_AFTER,
    }
}

/// A stream's trouble as the report counts it.
fn note_failure(n: &Note) -> Failure {
    match n {
        Note::RemoteError { code, message } => {
            Failure::new(format!("remote_error_{code}"), message)
        }
        Note::OpenFailed { label, code, why } => {
            Failure::new(format!("open_failed_{code}"), format!("{label}: {why}"))
        }
        Note::Reset { label, code, why } => {
            Failure::new(format!("stream_reset_{code}"), format!("{label}: {why}"))
        }
    }
}

/// The relay side of a client session: the pump carrying its connections and the local
/// listener they arrive on.
struct Leg {
    conns: mpsc::Sender<hatch_forward::Conn>,
    listener: TcpListener,
    pump: JoinHandle<End>,
}

/// One simulated `hatch port-forward` (or, on the floor, its connections without it).
struct PortSession {
    n: usize,
    spec: Rc<ClientSpec>,
    fwd: Rc<ForwardSpec>,
    sh: Rc<Shared>,
    dialer: Dialer,
}

impl PortSession {
    async fn run(
        self,
        permit: OwnedSemaphorePermit,
        go: watch::Receiver<Option<Instant>>,
        mut ctl: watch::Receiver<Ctl>,
        done: mpsc::UnboundedSender<bool>,
        measured: mpsc::UnboundedSender<usize>,
    ) {
        let latency = self.fwd.part == ForwardPart::Latency;
        let k = if latency { self.fwd.connections_of(self.n) } else { 0 };
        let units = if latency { k } else { 1 };
        let start = Instant::now();
        let leg = match tokio::time::timeout(SETUP_TIMEOUT, self.open(&ctl)).await {
            Ok(Ok(leg)) => leg,
            Ok(Err(f)) => return self.failed(&f, units, &done),
            Err(_) => return self.failed(&Failure::new("setup_timeout", ""), units, &done),
        };
        let up = if latency {
            let tasks = self.connections(leg.as_ref(), k, &go, &ctl, &done).await;
            drop(permit);
            let mut up = 0;
            for t in tasks {
                up += usize::from(t.await.is_ok());
            }
            up
        } else {
            record(&mut self.sh.setup.borrow_mut(), start.elapsed().as_micros() as u64);
            self.sh.up.set(self.sh.up.get() + 1);
            let _ = done.send(true);
            drop(permit);
            match self.bulk(leg.as_ref(), go, &ctl).await {
                Ok(()) => {}
                Err(f) => {
                    self.sh.error(&f);
                    self.sh.up.set(self.sh.up.get() - 1);
                }
            }
            1
        };
        if let Some(leg) = leg {
            self.close(leg).await;
        }
        let _ = measured.send(up);
        // Hold on until the parent stops us, as the other modes do.
        let _ = ctl.wait_for(|c| *c == Ctl::Stop).await;
    }

    fn failed(&self, f: &Failure, units: usize, done: &mpsc::UnboundedSender<bool>) {
        self.sh.error(f);
        for _ in 0..units {
            let _ = done.send(false);
        }
    }

    /// The port session through the relay and its pump (`None` on the floor).
    async fn open(&self, ctl: &watch::Receiver<Ctl>) -> Result<Option<Leg>, Failure> {
        let Target::Relay { api_url, access_key, instances } = &self.spec.target else {
            return Ok(None);
        };
        if instances.is_empty() {
            return Err(Failure::new("no_instances", "no agent is online"));
        }
        let req = StartSessionRequest {
            instance_id: instances[self.n % instances.len()].clone(),
            mode: ApiMode::Port,
            command: None,
            run_as: None,
            term: None,
            tty: None,
            remote_host: Some(self.fwd.server.ip().to_string()),
            remote_port: Some(self.fwd.server.port()),
        };
        let body = serde_json::to_vec(&req).map_err(|e| Failure::new("json", e))?;
        let url = format!("{}/v1/sessions", api_url.trim_end_matches('/'));
        let (status, body) =
            self.dialer.post_json(&url, Some(access_key), body, API_TIMEOUT, self.n).await?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        let r: StartSessionResponse =
            serde_json::from_slice(&body).map_err(|e| Failure::new("api_body", e))?;
        let ws = self
            .dialer
            .ws_configured(&r.stream_url, Some(&r.token), self.n, true, client_leg_config())
            .await?;
        let listener =
            TcpListener::bind("127.0.0.1:0").await.map_err(|e| Failure::new("listen", e))?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let mut stop = ctl.clone();
        let cancel = async move {
            let _ = stop.wait_for(|c| *c == Ctl::Stop).await;
            (close::NORMAL, "load test stopped".to_owned())
        };
        let sh = self.sh.clone();
        let cfg = client_pump_config(self.fwd.link_window);
        let pump = tokio::task::spawn_local(hatch_forward::pump(
            ws,
            Role::Client { conns: rx },
            cfg,
            // A lost leg fails the run (forward mode has no --chaos).
            None,
            cancel,
            move |n| sh.error(&note_failure(&n)),
        ));
        Ok(Some(Leg { conns: tx, listener, pump }))
    }

    /// Ends the session as `hatch port-forward` ends it once nothing is left to carry: no
    /// more connections, the pump closes the leg (1000) after the last stream ended.
    async fn close(&self, leg: Leg) {
        drop(leg.conns);
        let mut pump = leg.pump;
        match timeout(CLOSE_TIMEOUT, &mut pump).await {
            Ok(Ok(End::Done(close::NORMAL))) => {
                self.sh.forward.borrow_mut().sessions_closed += 1;
            }
            Ok(Ok(end)) => self.sh.error(&Failure::new("session_end", format!("{end:?}"))),
            Ok(Err(e)) => self.sh.error(&Failure::new("session_end", e)),
            Err(_) => {
                pump.abort();
                self.sh.error(&Failure::new("session_end_timeout", "the pump did not end"));
            }
        }
    }

    /// A new connection: to the local listener, its accepted half handed to the pump (relay),
    /// or straight to the server (floor).
    async fn connect(&self, leg: Option<&Leg>) -> Result<TcpStream, Failure> {
        let Some(leg) = leg else {
            let s = TcpStream::connect(self.fwd.server)
                .await
                .map_err(|e| Failure::new("connect", e))?;
            let _ = s.set_nodelay(true);
            return Ok(s);
        };
        let at = leg.listener.local_addr().map_err(|e| Failure::new("listen", e))?;
        let ours = TcpStream::connect(at).await.map_err(|e| Failure::new("connect", e))?;
        let _ = ours.set_nodelay(true);
        let (theirs, from) = timeout(SETUP_TIMEOUT, leg.listener.accept())
            .await
            .map_err(|_| Failure::new("accept_timeout", ""))?
            .map_err(|e| Failure::new("accept", e))?;
        if Some(from) != ours.local_addr().ok() {
            return Err(Failure::new("accept", format!("accepted {from}, not ours")));
        }
        let _ = theirs.set_nodelay(true);
        let (read, write) = theirs.into_split();
        let conn = hatch_forward::Conn {
            read: Box::new(read),
            write: Box::new(write),
            label: from.to_string(),
        };
        leg.conns.send(conn).await.map_err(|_| Failure::new("pump_gone", "the session ended"))?;
        Ok(ours)
    }

    /// Sets up the session's `k` connections one after the other (each: connect, one echo)
    /// and starts each one's measurement; the tasks end `Ok` for a connection that stayed up.
    async fn connections(
        &self,
        leg: Option<&Leg>,
        k: usize,
        go: &watch::Receiver<Option<Instant>>,
        ctl: &watch::Receiver<Ctl>,
        done: &mpsc::UnboundedSender<bool>,
    ) -> Vec<JoinHandle<Result<(), ()>>> {
        let total = self.fwd.connections_total;
        let sessions = self.fwd.sessions_total.max(1);
        // Global index of this session's first connection: the payloads name their connection.
        let first = self.n * (total / sessions) + self.n.min(total % sessions);
        let mut tasks = Vec::with_capacity(k);
        for j in 0..k {
            let start = Instant::now();
            let res = tokio::time::timeout(SETUP_TIMEOUT, async {
                let mut s = self.connect(leg).await?;
                setup_echo(&mut s, self.spec.payload).await?;
                Ok::<_, Failure>(s)
            })
            .await
            .unwrap_or_else(|_| Err(Failure::new("setup_timeout", "")));
            let s = match res {
                Ok(s) => s,
                Err(f) => {
                    self.sh.error(&f);
                    let _ = done.send(false);
                    continue;
                }
            };
            record(&mut self.sh.setup.borrow_mut(), start.elapsed().as_micros() as u64);
            self.sh.up.set(self.sh.up.get() + 1);
            let _ = done.send(true);
            let c = Connection {
                id: first + j,
                spec: self.spec.clone(),
                sh: self.sh.clone(),
                check: Check::new(first + j, self.spec.payload),
                sent: 0,
            };
            let (go, ctl) = (go.clone(), ctl.clone());
            tasks.push(tokio::task::spawn_local(c.run(s, go, ctl)));
        }
        tasks
    }

    /// The throughput part: after `go`, an upload, then a download, each on a new connection.
    async fn bulk(
        &self,
        leg: Option<&Leg>,
        mut go: watch::Receiver<Option<Instant>>,
        ctl: &watch::Receiver<Ctl>,
    ) -> Result<(), Failure> {
        let mut stop = ctl.clone();
        tokio::select! {
            r = go.wait_for(|g| g.is_some()) => if r.is_err() { return Ok(()) },
            _ = stop.wait_for(|c| *c == Ctl::Stop) => return Ok(()),
        }
        let d = Duration::from_secs_f64(self.spec.duration_s);
        let up = upload(self.connect(leg).await?, d).await?;
        self.sh.forward.borrow_mut().upload = Some(up);
        let down = download(self.connect(leg).await?, d).await?;
        self.sh.forward.borrow_mut().download = Some(down);
        Ok(())
    }
}

/// `E`, then one message of the connection's letter, echoed back in full.
async fn setup_echo(s: &mut TcpStream, payload: usize) -> Result<(), Failure> {
    let mut msg = vec![b'E'];
    msg.resize(1 + payload, b'.');
    timeout(ECHO_TIMEOUT, async {
        s.write_all(&msg).await.map_err(|e| Failure::new("send", e))?;
        let mut back = vec![0u8; payload];
        s.read_exact(&mut back).await.map_err(|e| Failure::new("recv", e))?;
        if back.iter().any(|&b| b != b'.') {
            return Err(Failure::new("echo_out_of_order", "the setup echo differs"));
        }
        Ok(())
    })
    .await
    .map_err(|_| Failure::new("echo_timeout", "setup echo"))?
}

/// One forwarded connection of the latency part.
struct Connection {
    id: usize,
    spec: Rc<ClientSpec>,
    sh: Rc<Shared>,
    check: Check,
    sent: u64,
}

impl Connection {
    async fn run(
        mut self,
        mut s: TcpStream,
        mut go: watch::Receiver<Option<Instant>>,
        mut ctl: watch::Receiver<Ctl>,
    ) -> Result<(), ()> {
        let go_at = tokio::select! {
            r = go.wait_for(|g| g.is_some()) => match r {
                Ok(g) => g.unwrap_or_else(Instant::now),
                Err(_) => return Err(()),
            },
            _ = ctl.wait_for(|c| *c == Ctl::Stop) => return Err(()),
        };
        let end = go_at + Duration::from_secs_f64(self.spec.duration_s);
        let res = match self.keystrokes(&mut s, go_at, end).await {
            Ok(()) => self.finish(&mut s).await,
            Err(f) => Err(f),
        };
        {
            let mut fs = self.sh.forward.borrow_mut();
            fs.streams_closed += usize::from(res.is_ok());
            let mut st = self.sh.stream.borrow_mut();
            st.bytes_sent += self.sent;
            st.bytes_echoed += self.check.pos;
            st.bytes_out_of_order += self.check.out_of_order;
        }
        if self.check.out_of_order > 0 {
            self.sh
                .error(&Failure::new("echo_out_of_order", "an echoed byte was not the next sent"));
        }
        match res {
            Ok(()) => Ok(()),
            Err(f) => {
                self.sh.error(&f);
                self.sh.up.set(self.sh.up.get() - 1);
                Err(())
            }
        }
    }

    async fn keystrokes(
        &mut self,
        s: &mut TcpStream,
        go: Instant,
        end: Instant,
    ) -> Result<(), Failure> {
        let period = Duration::from_secs_f64(1.0 / self.spec.rate.max(0.001));
        // Spread the connections' sends over the period so they do not all fire together.
        let mut next = go + period.mul_f64(rand::random::<f64>());
        let (mut seq, mut msg) = (0u64, Vec::with_capacity(self.spec.payload));
        let mut buf = vec![0u8; self.spec.payload.max(4096)];
        while next < end {
            tokio::time::sleep_until(next).await;
            msg.clear();
            payload_of(self.id, seq, self.spec.payload, &mut msg);
            seq += 1;
            self.sent += msg.len() as u64;
            let want = self.check.pos + msg.len() as u64;
            let t = Instant::now();
            timeout(ECHO_TIMEOUT, async {
                s.write_all(&msg).await.map_err(|e| Failure::new("send", e))?;
                while self.check.pos < want {
                    match s.read(&mut buf).await {
                        Ok(0) => return Err(Failure::new("eof", "the connection ended")),
                        Ok(n) => self.check.feed(&buf[..n]),
                        Err(e) => return Err(Failure::new("recv", e)),
                    }
                }
                Ok(())
            })
            .await
            .map_err(|_| Failure::new("echo_timeout", ""))??;
            self.sh.round_trip(t.elapsed().as_micros() as u64);
            self.sh.bytes.set(self.sh.bytes.get() + msg.len() as u64);
            next += period;
            let now = Instant::now();
            if next < now {
                next = now;
            }
        }
        Ok(())
    }

    /// Half-closes and reads to the echo's FIN: every byte sent came back, and the stream's
    /// FIN went through both ways.
    async fn finish(&mut self, s: &mut TcpStream) -> Result<(), Failure> {
        timeout(ECHO_TIMEOUT, async {
            s.shutdown().await.map_err(|e| Failure::new("send", e))?;
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => self.check.feed(&buf[..n]),
                    Err(e) => return Err(Failure::new("recv", e)),
                }
            }
            if self.check.pos != self.sent {
                return Err(Failure::new(
                    "bytes_lost",
                    format!("{} sent, {} echoed", self.sent, self.check.pos),
                ));
            }
            Ok(())
        })
        .await
        .map_err(|_| Failure::new("fin_timeout", "no FIN from the echo"))?
    }
}

/// A wait on the peer with the bulk stall deadline; `kind` names a failure.
async fn within<T>(
    kind: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Failure> {
    match timeout(STALL, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::new(kind, e)),
        Err(_) => Err(Failure::new(format!("{kind}_stalled"), format!("{STALL:?}"))),
    }
}

fn bulk(bytes: u64, t0: Instant, bad_bytes: u64, verified: bool) -> Bulk {
    let seconds = t0.elapsed().as_secs_f64();
    let mb_s = if seconds > 0.0 { bytes as f64 / seconds / 1e6 } else { 0.0 };
    Bulk { bytes, seconds, mb_s, bad_bytes, verified }
}

/// `U`, the pattern for `d`, FIN; the sink's answer: the bytes it read and how many were out
/// of place.
async fn upload(mut s: TcpStream, d: Duration) -> Result<Bulk, Failure> {
    let t0 = Instant::now();
    within("bulk_send", s.write_all(b"U")).await?;
    let (mut p, mut buf) = (Pattern::default(), vec![0u8; BULK_BUF]);
    while t0.elapsed() < d {
        p.fill(&mut buf);
        within("bulk_send", s.write_all(&buf)).await?;
    }
    within("bulk_send", s.shutdown()).await?;
    let mut answer = [0u8; 16];
    within("bulk_answer", s.read_exact(&mut answer)).await?;
    let got = u64::from_be_bytes(answer[..8].try_into().expect("8 bytes"));
    let bad = u64::from_be_bytes(answer[8..].try_into().expect("8 bytes"));
    let b = bulk(got, t0, bad, got == p.pos && bad == 0);
    // The sink's FIN after its answer.
    let _ = within("bulk_fin", s.read(&mut buf)).await;
    Ok(b)
}

/// `D` and `d` in milliseconds; reads the pattern to the source's FIN, checking it in place.
/// The last 8 bytes are the source's count of what it sent.
async fn download(mut s: TcpStream, d: Duration) -> Result<Bulk, Failure> {
    let t0 = Instant::now();
    let mut req = vec![b'D'];
    req.extend_from_slice(&(d.as_millis() as u64).to_be_bytes());
    within("bulk_send", s.write_all(&req)).await?;
    // The 8 bytes held back (they may be the count) sit just before the read.
    let (mut p, mut buf, mut held, mut bad) = (Pattern::default(), vec![0u8; 8 + BULK_BUF], 0, 0);
    loop {
        let n = within("bulk_recv", s.read(&mut buf[8..])).await?;
        if n == 0 {
            break;
        }
        let region = &buf[8 - held..8 + n];
        let keep = region.len().min(8);
        bad += p.check(&region[..region.len() - keep]);
        let tail: Vec<u8> = region[region.len() - keep..].to_vec();
        held = keep;
        buf[8 - held..8].copy_from_slice(&tail);
    }
    let count = (held == 8).then(|| u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
    let b = bulk(p.pos, t0, bad, count == Some(p.pos) && bad == 0);
    within("bulk_send", s.shutdown()).await?;
    Ok(b)
}

/// A simulated `hatch-agent` port session: the data leg with the agent's WebSocket settings,
/// the pump with the agent's own dial to `dest` (`--allow-forward` default: loopback). Ends
/// `Ok` when the client ended the session or the parent stopped us.
#[allow(clippy::too_many_arguments)]
pub async fn agent_leg(
    spec: &AgentSpec,
    sh: &Shared,
    dialer: &Dialer,
    n: usize,
    url: &str,
    token: &str,
    dest: (String, Option<u16>),
    mut ctl: watch::Receiver<Ctl>,
) -> Result<(), Failure> {
    let port = dest.1.ok_or_else(|| Failure::new("port_no_remote_port", ""))?;
    let dial = dialer.ws_configured(url, Some(token), n, true, agent_leg_config());
    let ws = tokio::time::timeout(SETUP_TIMEOUT, dial)
        .await
        .map_err(|_| Failure::new("dial_timeout", ""))??;
    sh.up.set(sh.up.get() + 1);
    let allow = Arc::new(hatch_agent::forward::AllowForward::default());
    let role = Role::Agent { dial: hatch_agent::forward::dialer(dest.0, port, allow) };
    let timing = hatch_agent::session::SessionTiming::default();
    let cfg = hatch_forward::Config {
        link: LinkConfig { window: spec.link_window, ..LinkConfig::default() },
        ping_interval: timing.ping_interval,
        dead_after: timing.dead_after,
    };
    let cancel = async move {
        let _ = ctl.wait_for(|c| *c == Ctl::Stop).await;
        (close::AGENT_SHUTDOWN, "agent stopping".to_owned())
    };
    let end = hatch_forward::pump(ws, role, cfg, None, cancel, |_| {}).await;
    sh.up.set(sh.up.get() - 1);
    match end {
        End::Closed(close::NORMAL, _) | End::Done(_) => Ok(()),
        End::Closed(c, why) => Err(Failure::new(format!("port_closed_{c}"), why)),
        End::Lost(why) => Err(Failure::new("port_lost", why)),
        End::Bad(why) => Err(Failure::new("port_bad", why)),
        End::ResumeFailed(why) => Err(Failure::new("port_resume_failed", why)),
        End::NotResumed(why) => Err(Failure::new("port_not_resumed", why)),
    }
}
