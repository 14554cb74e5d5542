//! Simulated clients and agents. Each worker is one single-threaded runtime (like a relay
//! shard); sessions are local tasks sharing counters through `Rc`.
//!
//! Client session: (relay) `POST /v1/sessions` → dial `stream_url` with the client token, send
//! RESIZE; (floor) dial the echo server. Setup ends with the first echoed DATA. Then, after the
//! parent's `go`, one DATA of `payload` bytes every `1/rate` s, each timed until all its bytes
//! came back. Agent: register, hold the control channel (answer heartbeats), and on
//! `session.open` dial the data URL with the agent token and echo DATA back at once (or through
//! `cat` in a PTY).
//!
//! TLS sessions are resumed where a real client would resume them: each simulated session has
//! the resumption store of one `hatch` process (its data leg resumes its API call's session) and
//! each simulated agent that of one `hatch-agent` process (its data legs resume the session of
//! its control channel or of a previous leg). No store is shared across sessions or agents.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hatch_proto::api::{Mode as ApiMode, StartSessionRequest, StartSessionResponse};
use hatch_proto::channel::Message as Chan;
use hatch_proto::control::{FromAgent, RegisterRequest, RegisterResponse, ToAgent};
use hatch_proto::resume::{Link, LinkConfig};
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Mode;
use crate::net::{Dialer, Failure, Ws, api_error};
use crate::report::{Buckets, Errors, new_hist, record};
use crate::worker::{AgentSpec, ClientSpec, Ctl, Event, Target, emit};

/// A round trip not answered within this counts as `echo_timeout` and ends the session.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// One session's setup (API call, dial, first echo) must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// One API call must finish within this.
const API_TIMEOUT: Duration = Duration::from_secs(20);
/// Registrations and control-channel dials in flight at once.
const REGISTER_CONCURRENCY: usize = 16;

/// Slowest setup pace a run is given time for, sessions per second: a loaded machine sets up
/// far fewer sessions than `--ramp` asks (measured here: about 165/s with TLS on both legs and
/// the API), and a deadline based on the ramp alone cut off the last few hundred.
const SLOWEST_SETUP_RATE: f64 = 100.0;

/// Time allowed for `sessions` setups asked at `ramp` per second, beyond one setup's timeout.
pub fn setup_allowance(sessions: usize, ramp: f64) -> Duration {
    Duration::from_secs_f64(sessions as f64 / ramp.clamp(0.001, SLOWEST_SETUP_RATE))
        + Duration::from_secs(5)
}

/// Counters shared by the sessions of one worker.
struct Shared {
    rtt: RefCell<Histogram<u64>>,
    interval: RefCell<Histogram<u64>>,
    setup: RefCell<Histogram<u64>>,
    errors: RefCell<Errors>,
    up: Cell<usize>,
    msgs: Cell<u64>,
    bytes: Cell<u64>,
    /// Set once the parent said `end`: connections dropping then are the relay stopping.
    ended: Cell<bool>,
}

impl Shared {
    fn new() -> Rc<Self> {
        Rc::new(Shared {
            rtt: RefCell::new(new_hist()),
            interval: RefCell::new(new_hist()),
            setup: RefCell::new(new_hist()),
            errors: RefCell::new(Errors::new()),
            up: Cell::new(0),
            msgs: Cell::new(0),
            bytes: Cell::new(0),
            ended: Cell::new(false),
        })
    }

    fn error(&self, f: &Failure) {
        if self.ended.get() {
            return;
        }
        let mut errors = self.errors.borrow_mut();
        let n = errors.entry(f.kind.clone()).or_default();
        if *n == 0 {
            // The first of each kind, with its detail, for whoever reads the worker's stderr.
            eprintln!("hatch-loadtest worker: {f}");
        }
        *n += 1;
    }

    fn round_trip(&self, us: u64) {
        record(&mut self.rtt.borrow_mut(), us);
        record(&mut self.interval.borrow_mut(), us);
        self.msgs.set(self.msgs.get() + 1);
    }

    /// Marks the run ended once the parent says `end` (or stops us).
    async fn watch_end(self: Rc<Self>, mut ctl: watch::Receiver<Ctl>) {
        let _ = ctl.wait_for(|c| *c >= Ctl::End).await;
        self.ended.set(true);
    }

    /// Emits a progress event every second until the run ends.
    async fn progress(self: Rc<Self>, mut stop: watch::Receiver<Ctl>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|c| *c >= Ctl::End) => return,
            }
            let rtt = {
                let mut h = self.interval.borrow_mut();
                let b = Buckets::of(&h);
                h.reset();
                b
            };
            emit(&Event::Progress { up: self.up.get(), msgs: self.msgs.replace(0), rtt });
        }
    }
}

/// Runs a client worker: sets up its sessions at its ramp, reports `Ready`, measures after
/// `go`, reports `Done`, holds the sessions until stdin closes.
pub async fn run_clients(spec: ClientSpec, mut ctl: watch::Receiver<Ctl>) -> anyhow::Result<()> {
    let tls = hatch_relay::certs::client_config_with_ca(&spec.ca_file)?;
    let dialer = Dialer::new(tls, spec.sources.clone()).danger_plaintext(spec.danger_plaintext);
    let sh = Shared::new();
    tokio::task::spawn_local(sh.clone().progress(ctl.clone()));
    tokio::task::spawn_local(sh.clone().watch_end(ctl.clone()));
    let spec = Rc::new(spec);
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<bool>();
    let (measured_tx, mut measured_rx) = mpsc::unbounded_channel::<()>();
    let sem = Arc::new(Semaphore::new(spec.setup_concurrency.max(1)));
    let t0 = Instant::now();
    let spawner = {
        let (spec, sh, dialer, sem) = (spec.clone(), sh.clone(), dialer.clone(), sem.clone());
        let (go_rx, ctl) = (go_rx.clone(), ctl.clone());
        async move {
            let step = Duration::from_secs_f64(1.0 / spec.ramp.max(0.001));
            for i in 0..spec.sessions {
                tokio::time::sleep_until(t0 + step.mul_f64(i as f64)).await;
                // The semaphore is never closed, so acquiring only waits.
                let Ok(permit) = sem.clone().acquire_owned().await else { return };
                let s = Session {
                    n: spec.first + i,
                    spec: spec.clone(),
                    sh: sh.clone(),
                    // Each session is its own `hatch` process: its data leg can resume the TLS
                    // session of its own API call, not those of other sessions.
                    dialer: dialer.own_process(),
                };
                let (go_rx, ctl, done_tx, measured_tx) =
                    (go_rx.clone(), ctl.clone(), done_tx.clone(), measured_tx.clone());
                tokio::task::spawn_local(async move {
                    s.run(permit, go_rx, ctl, done_tx, measured_tx).await;
                });
            }
        }
    };
    tokio::task::spawn_local(spawner);
    let setup_deadline = t0 + setup_allowance(spec.sessions, spec.ramp) + SETUP_TIMEOUT;
    let mut settled = 0;
    let mut last = t0;
    while settled < spec.sessions {
        match tokio::time::timeout_at(setup_deadline, done_rx.recv()).await {
            Ok(Some(_)) => {
                settled += 1;
                last = Instant::now();
            }
            _ => break,
        }
    }
    if settled < spec.sessions {
        // Still in flight at the deadline: neither up nor failed yet, so counted here.
        *sh.errors.borrow_mut().entry("setup_unfinished".into()).or_default() +=
            (spec.sessions - settled) as u64;
    }
    emit(&Event::Ready {
        up: sh.up.get(),
        setup_wall_s: (last - t0).as_secs_f64(),
        setup: Buckets::of(&sh.setup.borrow()),
        errors: sh.errors.borrow().clone(),
        connections: dialer.connections(),
    });
    let _ = ctl.wait_for(|c| *c != Ctl::Wait).await;
    if *ctl.borrow() >= Ctl::End {
        return Ok(());
    }
    let go = Instant::now();
    let _ = go_tx.send(Some(go));
    let end = go + Duration::from_secs_f64(spec.duration_s) + ECHO_TIMEOUT + Duration::from_secs(1);
    let up = sh.up.get();
    let mut finished = 0;
    while finished < up {
        match tokio::time::timeout_at(end, measured_rx.recv()).await {
            Ok(Some(())) => finished += 1,
            _ => break,
        }
    }
    emit(&Event::Done {
        up: sh.up.get(),
        rtt: Buckets::of(&sh.rtt.borrow()),
        bytes: sh.bytes.get(),
        errors: sh.errors.borrow().clone(),
        connections: dialer.connections(),
    });
    let _ = ctl.wait_for(|c| *c == Ctl::Stop).await;
    Ok(())
}

/// One simulated client session.
struct Session {
    n: usize,
    spec: Rc<ClientSpec>,
    sh: Rc<Shared>,
    dialer: Dialer,
}

impl Session {
    async fn run(
        self,
        permit: tokio::sync::OwnedSemaphorePermit,
        mut go: watch::Receiver<Option<Instant>>,
        mut ctl: watch::Receiver<Ctl>,
        done: mpsc::UnboundedSender<bool>,
        measured: mpsc::UnboundedSender<()>,
    ) {
        let start = Instant::now();
        let payload = self.payload();
        // The offsets a real client keeps (`--acks on`), or none.
        let mut acks = self.spec.acks.then(|| Link::new(LinkConfig::default()));
        let res = tokio::time::timeout(SETUP_TIMEOUT, self.setup(&payload, &mut acks)).await;
        drop(permit);
        let mut ws = match res {
            Ok(Ok(ws)) => ws,
            Ok(Err(f)) => {
                self.sh.error(&f);
                let _ = done.send(false);
                return;
            }
            Err(_) => {
                self.sh.error(&Failure::new("setup_timeout", ""));
                let _ = done.send(false);
                return;
            }
        };
        record(&mut self.sh.setup.borrow_mut(), start.elapsed().as_micros() as u64);
        self.sh.up.set(self.sh.up.get() + 1);
        let _ = done.send(true);
        let go_at = tokio::select! {
            r = go.wait_for(|g| g.is_some()) => match r { Ok(g) => g.unwrap_or_else(Instant::now), Err(_) => return },
            _ = ctl.wait_for(|c| *c == Ctl::Stop) => return,
        };
        let end = go_at + Duration::from_secs_f64(self.spec.duration_s);
        let res = match self.spec.mode {
            Mode::Echo | Mode::Pty => {
                self.keystrokes(&mut ws, &payload, go_at, end, &mut acks).await
            }
            Mode::Throughput => self.throughput(&mut ws, &payload, end, &mut acks).await,
        };
        if let Err(f) = res {
            self.sh.error(&f);
            self.sh.up.set(self.sh.up.get() - 1);
        }
        let _ = measured.send(());
        // Hold the connection until the parent stops us: the relay (or echo server) is stopped
        // first, so it closes first and TIME_WAIT stays on its side.
        let _ = ctl.wait_for(|c| *c == Ctl::Stop).await;
    }

    /// One DATA message: printable bytes (a PTY in raw mode passes them through unchanged).
    fn payload(&self) -> Bytes {
        let mut v = Vec::with_capacity(self.spec.payload + 1);
        Chan::Data(&vec![b'a' + (self.n % 26) as u8; self.spec.payload]).encode(&mut v);
        Bytes::from(v)
    }

    async fn setup(&self, payload: &Bytes, acks: &mut Option<Link>) -> Result<Ws, Failure> {
        let mut ws = match &self.spec.target {
            Target::Floor { url } => self.dialer.ws(url, None, self.n).await?,
            Target::Relay { api_url, access_key, instances } => {
                if instances.is_empty() {
                    return Err(Failure::new("no_instances", "no agent is online"));
                }
                let req = StartSessionRequest {
                    instance_id: instances[self.n % instances.len()].clone(),
                    mode: ApiMode::Shell,
                    command: None,
                    run_as: None,
                    term: None,
                };
                let body = serde_json::to_vec(&req).map_err(|e| Failure::new("json", e))?;
                let url = format!("{}/v1/sessions", api_url.trim_end_matches('/'));
                let (status, body) = self
                    .dialer
                    .post_json(&url, Some(access_key), body, API_TIMEOUT, self.n)
                    .await?;
                if !status.is_success() {
                    return Err(api_error(status, &body));
                }
                let r: StartSessionResponse =
                    serde_json::from_slice(&body).map_err(|e| Failure::new("api_body", e))?;
                let mut ws = self.dialer.ws(&r.stream_url, Some(&r.token), self.n).await?;
                let mut resize = Vec::new();
                Chan::Resize { cols: 80, rows: 24 }.encode(&mut resize);
                ws.send(Message::Binary(resize.into()))
                    .await
                    .map_err(|e| Failure::new("send", e))?;
                ws
            }
        };
        round_trip(&mut ws, payload, self.spec.payload, acks).await?;
        Ok(ws)
    }

    async fn keystrokes(
        &self,
        ws: &mut Ws,
        payload: &Bytes,
        go: Instant,
        end: Instant,
        acks: &mut Option<Link>,
    ) -> Result<(), Failure> {
        let period = Duration::from_secs_f64(1.0 / self.spec.rate.max(0.001));
        // Spread the sessions' sends over the period so they do not all fire together.
        let mut next = go + period.mul_f64(rand::random::<f64>());
        while next < end {
            // Between keystrokes, a delayed acknowledgement of the echoes goes out when due,
            // as `hatch` sends it.
            let ack_at = acks.as_ref().and_then(|l| l.rx.poll_timeout());
            if let Some(at) = ack_at.map(Instant::from_std).filter(|&at| at < next) {
                tokio::time::sleep_until(at).await;
                send_due_ack(ws, acks).await?;
                continue;
            }
            tokio::time::sleep_until(next).await;
            let t = Instant::now();
            round_trip(ws, payload, self.spec.payload, acks).await?;
            self.sh.round_trip(t.elapsed().as_micros() as u64);
            self.sh.bytes.set(self.sh.bytes.get() + self.spec.payload as u64);
            next += period;
            let now = Instant::now();
            if next < now {
                next = now;
            }
        }
        Ok(())
    }

    async fn throughput(
        &self,
        ws: &mut Ws,
        payload: &Bytes,
        end: Instant,
        acks: &mut Option<Link>,
    ) -> Result<(), Failure> {
        let size = self.spec.payload as u64;
        let mut sent = std::collections::VecDeque::with_capacity(self.spec.window);
        let mut got: u64 = 0;
        let mut acked: u64 = 0;
        while Instant::now() < end {
            while sent.len() < self.spec.window.max(1) {
                send_data(ws, payload, acks).await?;
                sent.push_back(Instant::now());
            }
            got += recv_data(ws, acks).await? as u64;
            while got >= (acked + 1) * size {
                acked += 1;
                if let Some(t) = sent.pop_front() {
                    self.sh.round_trip(t.elapsed().as_micros() as u64);
                }
                self.sh.bytes.set(self.sh.bytes.get() + size);
            }
        }
        // Drain what is still in flight so the next phase starts clean.
        let _ = tokio::time::timeout(ECHO_TIMEOUT, async {
            while got < (acked + sent.len() as u64) * size {
                got += recv_data(ws, acks).await? as u64;
            }
            Ok::<(), Failure>(())
        })
        .await;
        Ok(())
    }
}

/// Sends `msg` and waits until `expect` DATA bytes came back.
async fn round_trip(
    ws: &mut Ws,
    msg: &Bytes,
    expect: usize,
    acks: &mut Option<Link>,
) -> Result<(), Failure> {
    send_data(ws, msg, acks).await?;
    tokio::time::timeout(ECHO_TIMEOUT, async {
        let mut got = 0;
        while got < expect {
            got += recv_data(ws, acks).await?;
        }
        Ok(())
    })
    .await
    .map_err(|_| Failure::new("echo_timeout", ""))?
}

/// Sends one DATA message (already encoded); with offsets, counts it and lets an
/// acknowledgement of what arrived ride in the same write, as `hatch` does.
async fn send_data(ws: &mut Ws, msg: &Bytes, acks: &mut Option<Link>) -> Result<(), Failure> {
    let send = |e| Failure::new("send", e);
    let ack = acks.as_mut().and_then(|l| {
        let took = l.tx.push(&msg[1..]);
        if took < msg.len() - 1 {
            return Some(Err(Failure::new("window_full", "the agent acknowledged nothing")));
        }
        l.rx.take_ack().map(Ok)
    });
    match ack {
        None => ws.send(Message::Binary(msg.clone())).await.map_err(send),
        Some(Err(f)) => Err(f),
        Some(Ok(n)) => {
            ws.feed(Message::Binary(msg.clone())).await.map_err(send)?;
            ws.feed(Message::Binary(Chan::Ack(n).to_vec().into())).await.map_err(send)?;
            ws.flush().await.map_err(send)
        }
    }
}

/// Sends the acknowledgement that is due, if one is.
async fn send_due_ack(ws: &mut Ws, acks: &mut Option<Link>) -> Result<(), Failure> {
    let now = Instant::now().into_std();
    if let Some(n) = acks.as_mut().and_then(|l| l.rx.poll_ack(now)) {
        let ack = Chan::Ack(n).to_vec();
        ws.send(Message::Binary(ack.into())).await.map_err(|e| Failure::new("send", e))?;
    }
    Ok(())
}

/// Receives messages until one DATA arrives; returns its length. Ping, pong, RESIZE and
/// unknown messages are skipped, ACKs counted; close, EXIT and ERROR end the session with
/// their kind.
async fn recv_data(ws: &mut Ws, acks: &mut Option<Link>) -> Result<usize, Failure> {
    loop {
        match ws.next().await {
            None => return Err(Failure::new("eof", "connection ended without close")),
            Some(Err(e)) => return Err(Failure::new("recv", e)),
            Some(Ok(Message::Binary(b))) => match Chan::decode(&b) {
                Ok(Chan::Data(d)) => {
                    if let Some(l) = acks.as_mut() {
                        l.on_data(Instant::now().into_std(), d.len());
                    }
                    return Ok(d.len());
                }
                Ok(Chan::Ack(n)) => {
                    if let Some(l) = acks.as_mut() {
                        l.on_ack(n).map_err(|e| Failure::new("bad_ack", e))?;
                    }
                }
                Ok(Chan::Exit(s)) => return Err(Failure::new("exit", s)),
                Ok(Chan::Error { code, message }) => {
                    return Err(Failure::new(format!("error_{code}"), message));
                }
                Ok(_) => {}
                Err(e) => return Err(Failure::new("bad_message", e)),
            },
            Some(Ok(Message::Close(f))) => {
                let code = f.as_ref().map_or(1005, |f| u16::from(f.code));
                return Err(Failure::new(
                    format!("closed_{code}"),
                    hatch_proto::close::describe(code),
                ));
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Runs an agent worker: registers its agents and holds their control channels; each
/// `session.open` becomes an echoing data connection. Ends when stdin closes.
pub async fn run_agents(spec: AgentSpec, ctl: watch::Receiver<Ctl>) -> anyhow::Result<()> {
    let tls = hatch_relay::certs::client_config_with_ca(&spec.ca_file)?;
    let dialer = Dialer::new(tls, spec.sources.clone()).danger_plaintext(spec.danger_plaintext);
    let sh = Shared::new();
    tokio::task::spawn_local(sh.clone().watch_end(ctl.clone()));
    let spec = Rc::new(spec);
    let sem = Arc::new(Semaphore::new(REGISTER_CONCURRENCY));
    let (reg_tx, mut reg_rx) = mpsc::unbounded_channel::<Option<String>>();
    let counter = Rc::new(Cell::new(0usize));
    for i in 0..spec.instances {
        // Each agent is its own `hatch-agent` process, with its own resumption store.
        let (spec, sh, dialer, sem, ctl) =
            (spec.clone(), sh.clone(), dialer.own_process(), sem.clone(), ctl.clone());
        let (reg_tx, counter) = (reg_tx.clone(), counter.clone());
        tokio::task::spawn_local(async move {
            let permit = sem.acquire_owned().await;
            let res = tokio::time::timeout(SETUP_TIMEOUT, agent_connect(&spec, &dialer, i)).await;
            drop(permit);
            let (id, ws) = match res {
                Ok(Ok(x)) => x,
                Ok(Err(f)) => {
                    sh.error(&f);
                    let _ = reg_tx.send(None);
                    return;
                }
                Err(_) => {
                    sh.error(&Failure::new("register_timeout", ""));
                    let _ = reg_tx.send(None);
                    return;
                }
            };
            let _ = reg_tx.send(Some(id));
            control_loop(ws, spec, sh, dialer, ctl, counter).await;
        });
    }
    drop(reg_tx);
    // Each agent task sends exactly one result (it keeps its sender for its whole life, so the
    // channel never closes while agents run); every registration has its own deadline.
    let mut ids = Vec::new();
    for _ in 0..spec.instances {
        match reg_rx.recv().await {
            Some(r) => ids.extend(r),
            None => break,
        }
    }
    emit(&Event::Registered { instance_ids: ids, errors: sh.errors.borrow().clone() });
    let mut stop = ctl.clone();
    let _ = stop.wait_for(|c| *c == Ctl::Stop).await;
    emit(&Event::Done {
        up: sh.up.get(),
        rtt: Buckets::default(),
        bytes: sh.bytes.get(),
        errors: sh.errors.borrow().clone(),
        connections: dialer.connections(),
    });
    Ok(())
}

async fn agent_connect(
    spec: &AgentSpec,
    dialer: &Dialer,
    i: usize,
) -> Result<(String, Ws), Failure> {
    let api = spec.api_url.trim_end_matches('/');
    let body = serde_json::to_vec(&RegisterRequest {
        activation_id: spec.activation_id.clone(),
        activation_code: spec.activation_code.clone(),
        hostname: Some(format!("loadtest-{i}")),
    })
    .map_err(|e| Failure::new("json", e))?;
    let (status, body) =
        dialer.post_json(&format!("{api}/v1/agent/register"), None, body, API_TIMEOUT, i).await?;
    if !status.is_success() {
        let f = api_error(status, &body);
        return Err(Failure::new(format!("register_{}", f.kind), f.detail));
    }
    let reg: RegisterResponse =
        serde_json::from_slice(&body).map_err(|e| Failure::new("api_body", e))?;
    let ws_url = format!("{}/v1/agent/connect", api.replacen("https://", "wss://", 1));
    let mut ws = dialer
        .ws_with(&ws_url, Some(&reg.instance_secret), i, false)
        .await
        .map_err(|f| Failure::new(format!("control_{}", f.kind), f.detail))?;
    // As a real agent does first; the relay counts the instance online after it.
    let hello = serde_json::to_string(&FromAgent::hello("loadtest", false))
        .map_err(|e| Failure::new("json", e))?;
    ws.send(Message::Text(hello.into())).await.map_err(|e| Failure::new("control_send", e))?;
    Ok((reg.instance_id, ws))
}

async fn control_loop(
    mut ws: Ws,
    spec: Rc<AgentSpec>,
    sh: Rc<Shared>,
    dialer: Dialer,
    mut ctl: watch::Receiver<Ctl>,
    counter: Rc<Cell<usize>>,
) {
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = ctl.wait_for(|c| *c == Ctl::Stop) => return,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => {
                sh.error(&Failure::new("control_closed", ""));
                return;
            }
            Some(Err(e)) => {
                sh.error(&Failure::new("control_recv", e));
                return;
            }
            Some(Ok(_)) => continue,
        };
        match serde_json::from_str::<ToAgent>(&text) {
            Ok(ToAgent::Heartbeat { seq }) => {
                let reply =
                    serde_json::to_string(&FromAgent::Heartbeat { seq }).unwrap_or_default();
                if let Err(e) = ws.send(Message::Text(reply.into())).await {
                    sh.error(&Failure::new("control_send", e));
                    return;
                }
            }
            Ok(ToAgent::SessionOpen { stream_url, token, .. }) => {
                let n = counter.get();
                counter.set(n + 1);
                let (sh, dialer, ctl, spec) =
                    (sh.clone(), dialer.clone(), ctl.clone(), spec.clone());
                tokio::task::spawn_local(async move {
                    if let Err(f) =
                        agent_session(&dialer, &stream_url, &token, n, &spec, &sh, ctl).await
                    {
                        sh.error(&Failure::new(format!("agent_{}", f.kind), f.detail));
                    }
                });
            }
            Ok(ToAgent::SessionClose { .. } | ToAgent::SessionResume { .. }) => {}
            Err(_) => sh.error(&Failure::new("control_bad_message", "")),
        }
    }
}

async fn agent_session(
    dialer: &Dialer,
    url: &str,
    token: &str,
    n: usize,
    spec: &AgentSpec,
    sh: &Shared,
    mut ctl: watch::Receiver<Ctl>,
) -> Result<(), Failure> {
    let mut ws = tokio::time::timeout(SETUP_TIMEOUT, dialer.ws(url, Some(token), n))
        .await
        .map_err(|_| Failure::new("dial_timeout", ""))??;
    sh.up.set(sh.up.get() + 1);
    let res = if spec.mode == Mode::Pty {
        crate::pty::serve_cat(&mut ws, &mut ctl).await
    } else {
        echo(&mut ws, &mut ctl, spec.acks.then(|| Link::new(LinkConfig::default()))).await
    };
    sh.up.set(sh.up.get() - 1);
    res
}

/// Echoes every DATA message back as it came (the same bytes, no copy); with offsets, counts
/// both ways as `hatch-agent` does and lets an acknowledgement ride with each echo.
async fn echo(
    ws: &mut Ws,
    ctl: &mut watch::Receiver<Ctl>,
    mut acks: Option<Link>,
) -> Result<(), Failure> {
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = ctl.wait_for(|c| *c == Ctl::Stop) => return Ok(()),
        };
        match msg {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&hatch_proto::channel::TYPE_DATA) => {
                let Some(l) = acks.as_mut() else {
                    ws.send(Message::Binary(b)).await.map_err(|e| Failure::new("send", e))?;
                    continue;
                };
                l.on_data(Instant::now().into_std(), b.len() - 1);
                if l.tx.push(&b[1..]) < b.len() - 1 {
                    return Err(Failure::new("window_full", "the client acknowledged nothing"));
                }
                let send = |e| Failure::new("send", e);
                ws.feed(Message::Binary(b)).await.map_err(send)?;
                if let Some(n) = l.rx.take_ack() {
                    ws.feed(Message::Binary(Chan::Ack(n).to_vec().into())).await.map_err(send)?;
                }
                ws.flush().await.map_err(send)?;
            }
            Some(Ok(Message::Binary(b))) => {
                if let (Some(l), Ok(Chan::Ack(n))) = (acks.as_mut(), Chan::decode(&b)) {
                    l.on_ack(n).map_err(|e| Failure::new("bad_ack", e))?;
                }
            }
            Some(Ok(Message::Close(_))) | None => return Ok(()),
            Some(Err(e)) => return Err(Failure::new("recv", e)),
            Some(Ok(_)) => {}
        }
    }
}
