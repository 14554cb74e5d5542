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
use hatch_proto::api::{
    Mode as ApiMode, ResumeSessionRequest, StartSessionRequest, StartSessionResponse,
};
use hatch_proto::channel::Message as Chan;
use hatch_proto::control::{FromAgent, RegisterRequest, RegisterResponse, ToAgent};
use hatch_proto::resume::{Deliver, Link, LinkConfig};
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Mode;
use crate::net::{Dialer, Failure, Ws, api_error};
use crate::report::{Buckets, Errors, ForwardStats, StreamStats, new_hist, record};
use crate::worker::{AgentSpec, ClientSpec, Ctl, Event, Target, emit};

mod forward;

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
    /// The echoes' check and the losses taken up, of the sessions that finished.
    stream: RefCell<StreamStats>,
    /// Resume times, microseconds.
    resume_time: RefCell<Histogram<u64>>,
    /// Forward mode: how streams and sessions ended, the bulk transfers.
    forward: RefCell<ForwardStats>,
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
            stream: RefCell::new(StreamStats::default()),
            resume_time: RefCell::new(new_hist()),
            forward: RefCell::new(ForwardStats::default()),
        })
    }

    /// Adds what one session's connection saw, once its measurement is over.
    fn account(&self, c: &Conn) {
        let mut st = self.stream.borrow_mut();
        st.bytes_sent += c.sent;
        st.bytes_echoed += c.check.pos;
        st.bytes_out_of_order += c.check.out_of_order;
        if c.check.out_of_order > 0 {
            drop(st);
            self.error(&Failure::new("echo_out_of_order", "an echoed byte was not the next sent"));
            st = self.stream.borrow_mut();
        }
        let lost = c.legs > 0 || c.lost_at.is_some();
        st.sessions_lost += usize::from(lost);
        st.sessions_resumed += usize::from(lost && c.lost_at.is_none());
        st.resumes += u64::from(c.legs);
    }

    /// The stream figures so far, resume times included.
    fn stream_stats(&self) -> StreamStats {
        let mut st = self.stream.borrow().clone();
        st.resume_time = Buckets::of(&self.resume_time.borrow());
        st
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

    /// Marks the run ended once the parent says `end` (or stops us), and tells the parent.
    async fn watch_end(self: Rc<Self>, mut ctl: watch::Receiver<Ctl>) {
        let _ = ctl.wait_for(|c| *c >= Ctl::End).await;
        self.ended.set(true);
        emit(&Event::Ended);
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

/// Waits for `units` setups (sessions or connections) started at `t0` to settle, within the
/// ramp's allowance; reports `Ready`; waits for the parent's `go` and passes its instant on to
/// the sessions. `None` when the parent said `end` instead.
#[allow(clippy::too_many_arguments)]
async fn settle_then_go(
    sh: &Shared,
    units: usize,
    ramp: f64,
    t0: Instant,
    done_rx: &mut mpsc::UnboundedReceiver<bool>,
    dialer: &Dialer,
    ctl: &mut watch::Receiver<Ctl>,
    go_tx: &watch::Sender<Option<Instant>>,
) -> Option<Instant> {
    let setup_deadline = t0 + setup_allowance(units, ramp) + SETUP_TIMEOUT;
    let (mut settled, mut last) = (0, t0);
    while settled < units {
        match tokio::time::timeout_at(setup_deadline, done_rx.recv()).await {
            Ok(Some(_)) => {
                settled += 1;
                last = Instant::now();
            }
            _ => break,
        }
    }
    if settled < units {
        // Still in flight at the deadline: neither up nor failed yet, so counted here.
        *sh.errors.borrow_mut().entry("setup_unfinished".into()).or_default() +=
            (units - settled) as u64;
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
        return None;
    }
    let go = Instant::now();
    let _ = go_tx.send(Some(go));
    Some(go)
}

/// Runs a client worker: sets up its sessions at its ramp, reports `Ready`, measures after
/// `go`, reports `Done`, holds the sessions until stdin closes.
pub async fn run_clients(spec: ClientSpec, mut ctl: watch::Receiver<Ctl>) -> anyhow::Result<()> {
    if let Some(fwd) = spec.forward.clone() {
        return forward::run_clients(spec, fwd, ctl).await;
    }
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
    let Some(go) =
        settle_then_go(&sh, spec.sessions, spec.ramp, t0, &mut done_rx, &dialer, &mut ctl, &go_tx)
            .await
    else {
        return Ok(());
    };
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
        stream: sh.stream_stats(),
        forward: Default::default(),
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

/// One session's connection and what it knows of the stream.
struct Conn {
    ws: Ws,
    /// The offsets a real client keeps (`--acks on`), or none.
    link: Option<Link>,
    /// The relay's session id (none against the floor): what a resume names.
    sid: Option<String>,
    /// The echo, byte by byte against what was sent.
    check: Check,
    /// Connections put up again so far.
    legs: u32,
    /// While a loss is not yet taken up (until the agent's RESUME on a new connection): when
    /// it was noticed.
    lost_at: Option<Instant>,
    /// Payload bytes of the keystrokes sent.
    sent: u64,
}

/// The payload of keystroke `seq` of session `n`: the sequence number in 8 hex digits, then
/// the session's letter (printable: a PTY in raw mode passes it through unchanged). Shorter
/// payloads carry the sequence number's last digits.
fn payload_of(n: usize, seq: u64, len: usize, out: &mut Vec<u8>) {
    let digits = format!("{seq:08x}");
    let shown = &digits.as_bytes()[digits.len() - digits.len().min(len)..];
    let fill = b'a' + (n % 26) as u8;
    out.extend((0..len).map(|i| shown.get(i).copied().unwrap_or(fill)));
}

/// Compares the echo with the stream that was sent, byte by byte.
struct Check {
    n: usize,
    payload: usize,
    /// Bytes compared so far: the stream position of the next one.
    pos: u64,
    /// The payload the next byte belongs to (sequence number `pos / payload`).
    cur: Vec<u8>,
    out_of_order: u64,
}

impl Check {
    fn new(n: usize, payload: usize) -> Self {
        Check { n, payload, pos: 0, cur: Vec::new(), out_of_order: 0 }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let size = self.payload.max(1) as u64;
        for &b in bytes {
            let (seq, off) = (self.pos / size, (self.pos % size) as usize);
            if off == 0 || self.cur.is_empty() {
                self.cur.clear();
                payload_of(self.n, seq, self.payload, &mut self.cur);
            }
            if self.cur.get(off) != Some(&b) {
                self.out_of_order += 1;
            }
            self.pos += 1;
        }
    }
}

/// Whether a failure is a lost connection that `hatch` takes up again: no close frame, or a
/// close code that says the session waits (`hatch_proto::close::is_resumable`).
fn resumable(f: &Failure) -> bool {
    matches!(f.kind.as_str(), "eof" | "recv" | "send")
        || f.kind
            .strip_prefix("closed_")
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(hatch_proto::close::is_resumable)
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
        let res = tokio::time::timeout(SETUP_TIMEOUT, self.setup()).await;
        drop(permit);
        let mut conn = match res {
            Ok(Ok(c)) => c,
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
        // Read while waiting for `go`, as `hatch` reads an idle session: tungstenite answers the
        // relay's pings as it reads, so a long setup (25,000 sessions at 120/s is 3.5 min) does
        // not leave the first sessions silent past the relay's dead-leg limit (90 s).
        let go_at = loop {
            let lost = tokio::select! {
                r = go.wait_for(|g| g.is_some()) => match r {
                    Ok(g) => break g.unwrap_or_else(Instant::now),
                    Err(_) => return,
                },
                _ = ctl.wait_for(|c| *c == Ctl::Stop) => return,
                r = recv_data(&mut conn, false) => r.err(),
            };
            if let Some(f) = lost {
                self.sh.error(&f);
                self.sh.up.set(self.sh.up.get() - 1);
                let _ = measured.send(());
                let _ = ctl.wait_for(|c| *c == Ctl::Stop).await;
                return;
            }
        };
        let end = go_at + Duration::from_secs_f64(self.spec.duration_s);
        let res = match self.spec.mode {
            // Forward mode's clients run in `forward`, never here.
            Mode::Echo | Mode::Pty | Mode::Forward => self.keystrokes(&mut conn, go_at, end).await,
            Mode::Throughput => {
                let payload = self.fixed_payload();
                self.throughput(&mut conn, &payload, end).await
            }
        };
        if let Err(f) = res {
            self.sh.error(&f);
            self.sh.up.set(self.sh.up.get() - 1);
        }
        self.sh.account(&conn);
        let _ = measured.send(());
        // Hold the connection until the parent stops us: the relay (or echo server) is stopped
        // first, so it closes first and TIME_WAIT stays on its side.
        let _ = ctl.wait_for(|c| *c == Ctl::Stop).await;
    }

    /// One DATA message of the setup echo and of throughput mode: the session's letter.
    fn fixed_payload(&self) -> Bytes {
        let mut v = Vec::with_capacity(self.spec.payload + 1);
        Chan::Data(&vec![b'a' + (self.n % 26) as u8; self.spec.payload]).encode(&mut v);
        Bytes::from(v)
    }

    /// Keystroke `seq` as one encoded DATA message.
    fn keystroke(&self, seq: u64) -> Bytes {
        let mut v = Vec::with_capacity(self.spec.payload + 1);
        v.push(hatch_proto::channel::TYPE_DATA);
        payload_of(self.n, seq, self.spec.payload, &mut v);
        Bytes::from(v)
    }

    async fn setup(&self) -> Result<Conn, Failure> {
        let (ws, sid) = match &self.spec.target {
            Target::Floor { url } => (self.dialer.ws(url, None, self.n).await?, None),
            Target::Direct => {
                return Err(Failure::new("no_websocket", "a direct target is forward mode's"));
            }
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
                    tty: None,
                    remote_host: None,
                    remote_port: None,
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
                (ws, Some(r.session_id))
            }
        };
        let mut conn = Conn {
            ws,
            link: self.spec.acks.then(|| Link::new(LinkConfig::default())),
            sid,
            // The setup echo is not part of the checked stream: it is checked by length.
            check: Check::new(self.n, self.spec.payload),
            legs: 0,
            lost_at: None,
            sent: 0,
        };
        let first = self.fixed_payload();
        send_data(&mut conn, &first).await?;
        let mut got = 0;
        tokio::time::timeout(ECHO_TIMEOUT, async {
            while got < self.spec.payload {
                got += recv_data(&mut conn, false).await?;
            }
            Ok::<(), Failure>(())
        })
        .await
        .map_err(|_| Failure::new("echo_timeout", ""))??;
        // The stream check starts after the setup echo.
        conn.check.pos = 0;
        Ok(conn)
    }

    async fn keystrokes(&self, c: &mut Conn, go: Instant, end: Instant) -> Result<(), Failure> {
        let period = Duration::from_secs_f64(1.0 / self.spec.rate.max(0.001));
        // Spread the sessions' sends over the period so they do not all fire together.
        let mut next = go + period.mul_f64(rand::random::<f64>());
        let mut seq = 0u64;
        while next < end {
            // Between keystrokes, a delayed acknowledgement of the echoes goes out when due,
            // as `hatch` sends it.
            let ack_at = c.link.as_ref().and_then(|l| l.rx.poll_timeout());
            if let Some(at) = ack_at.map(Instant::from_std).filter(|&at| at < next) {
                tokio::time::sleep_until(at).await;
                if let Err(f) = send_due_ack(c).await {
                    self.take_up(c, f).await?;
                }
                continue;
            }
            tokio::time::sleep_until(next).await;
            let msg = self.keystroke(seq);
            seq += 1;
            c.sent += self.spec.payload as u64;
            let t = Instant::now();
            if self.round_trip(c, &msg).await? {
                self.sh.round_trip(t.elapsed().as_micros() as u64);
            } else {
                self.sh.stream.borrow_mut().round_trips_interrupted += 1;
            }
            self.sh.bytes.set(self.sh.bytes.get() + self.spec.payload as u64);
            next += period;
            let now = Instant::now();
            if next < now {
                next = now;
            }
        }
        Ok(())
    }

    /// Sends one keystroke and waits until all of it came back. False when the connection was
    /// lost and taken up again meanwhile (the time is then the outage's, not a round trip's).
    async fn round_trip(&self, c: &mut Conn, msg: &Bytes) -> Result<bool, Failure> {
        let legs = c.legs;
        let want = c.check.pos + (msg.len() - 1) as u64;
        if let Err(f) = send_data(c, msg).await {
            self.take_up(c, f).await?;
        }
        while c.check.pos < want {
            match tokio::time::timeout(ECHO_TIMEOUT, recv_data(c, true)).await {
                Ok(Ok(_)) => {}
                Ok(Err(f)) => self.take_up(c, f).await?,
                Err(_) => return Err(Failure::new("echo_timeout", "")),
            }
            self.resumed(c);
        }
        Ok(c.legs == legs)
    }

    /// The agent's RESUME arrived on a new connection: the loss is taken up.
    fn resumed(&self, c: &mut Conn) {
        if c.link.as_ref().is_some_and(Link::awaiting) {
            return;
        }
        if let Some(at) = c.lost_at.take() {
            record(&mut self.sh.resume_time.borrow_mut(), at.elapsed().as_micros() as u64);
        }
    }

    /// A failure on the connection: with `resume` and a loss `hatch` takes up, a new
    /// connection as `hatch` puts it up (a resume token, the dial, RESUME and the replay of
    /// what the agent has not acknowledged); anything else ends the session.
    async fn take_up(&self, c: &mut Conn, f: Failure) -> Result<(), Failure> {
        let may = self.spec.resume && !self.sh.ended.get() && resumable(&f) && c.sid.is_some();
        let Some(sid) = c.sid.clone().filter(|_| may) else { return Err(f) };
        // Lost again before the agent answered: still the same loss.
        c.lost_at.get_or_insert_with(Instant::now);
        let started = Instant::now();
        let mut attempt = 0u32;
        let ws = loop {
            attempt += 1;
            // Every attempt has a deadline: the API call its own, the dial this one.
            let once = tokio::time::timeout(SETUP_TIMEOUT, self.resume_once(&sid)).await;
            match once.unwrap_or_else(|_| Err(Failure::new("dial_timeout", ""))) {
                Ok(ws) => break ws,
                Err(e) if e.kind.starts_with("resume_") => return Err(e),
                Err(e) if started.elapsed() >= RESUME_FOR => {
                    return Err(Failure::new("resume_timeout", e));
                }
                Err(_) => {}
            }
            tokio::time::sleep(hatch_client::stream::reconnect_delay(attempt)).await;
        };
        c.ws = ws;
        c.legs += 1;
        let Some(link) = c.link.as_mut() else {
            return Err(Failure::new("resume_without_acks", "--chaos needs --acks on"));
        };
        let msgs = {
            let (r, replay) = link.reconnected();
            hatch_proto::channel::replay_messages(r, replay, REPLAY_CHUNK, Chan::Data(&[]))
        };
        send_all(&mut c.ws, msgs).await
    }

    /// One resume: `POST /v1/sessions/{id}/resume` (taking the session over: this session's
    /// own connection is the one lost), then the dial.
    async fn resume_once(&self, sid: &str) -> Result<Ws, Failure> {
        let Target::Relay { api_url, access_key, .. } = &self.spec.target else {
            return Err(Failure::new("resume_floor", "the floor has no sessions to resume"));
        };
        let url = format!("{}/v1/sessions/{sid}/resume", api_url.trim_end_matches('/'));
        let body = serde_json::to_vec(&ResumeSessionRequest { force: true })
            .map_err(|e| Failure::new("json", e))?;
        let (status, body) =
            self.dialer.post_json(&url, Some(access_key), body, API_TIMEOUT, self.n).await?;
        if !status.is_success() {
            let f = api_error(status, &body);
            // Final as `hatch` takes it: the session ended, is not ours, or may not be resumed
            // by us. Anything else (the relay starting, throttling) is tried again.
            let last = matches!(status.as_u16(), 401 | 403 | 404)
                || (status.as_u16() == 409 && f.kind != "api_TokenAlreadyUsed");
            return Err(if last {
                Failure::new(format!("resume_{}", f.kind), f.detail)
            } else {
                f
            });
        }
        let r: StartSessionResponse =
            serde_json::from_slice(&body).map_err(|e| Failure::new("api_body", e))?;
        self.dialer.ws(&r.stream_url, Some(&r.token), self.n).await
    }

    async fn throughput(&self, c: &mut Conn, payload: &Bytes, end: Instant) -> Result<(), Failure> {
        let size = self.spec.payload as u64;
        let mut sent = std::collections::VecDeque::with_capacity(self.spec.window);
        let mut got: u64 = 0;
        let mut acked: u64 = 0;
        while Instant::now() < end {
            while sent.len() < self.spec.window.max(1) {
                send_data(c, payload).await?;
                sent.push_back(Instant::now());
            }
            got += recv_data(c, false).await? as u64;
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
                got += recv_data(c, false).await? as u64;
            }
            Ok::<(), Failure>(())
        })
        .await;
        Ok(())
    }
}

/// Largest DATA message of a replay.
const REPLAY_CHUNK: usize = 16 * 1024;

/// How long a session keeps trying to take up a lost connection.
const RESUME_FOR: Duration = Duration::from_secs(60);

/// Sends one DATA message (already encoded); with offsets, counts it and lets an
/// acknowledgement of what arrived ride in the same write, as `hatch` does.
async fn send_data(c: &mut Conn, msg: &Bytes) -> Result<(), Failure> {
    let send = |e| Failure::new("send", e);
    let ack = c.link.as_mut().and_then(|l| {
        let took = l.tx.push(&msg[1..]);
        if took < msg.len() - 1 {
            return Some(Err(Failure::new("window_full", "the agent acknowledged nothing")));
        }
        l.rx.take_ack().map(Ok)
    });
    match ack {
        None => c.ws.send(Message::Binary(msg.clone())).await.map_err(send),
        Some(Err(f)) => Err(f),
        Some(Ok(n)) => {
            c.ws.feed(Message::Binary(msg.clone())).await.map_err(send)?;
            c.ws.feed(Message::Binary(Chan::Ack(n).to_vec().into())).await.map_err(send)?;
            c.ws.flush().await.map_err(send)
        }
    }
}

/// Sends the acknowledgement that is due, if one is.
async fn send_due_ack(c: &mut Conn) -> Result<(), Failure> {
    let now = Instant::now().into_std();
    if let Some(n) = c.link.as_mut().and_then(|l| l.rx.poll_ack(now)) {
        let ack = Chan::Ack(n).to_vec();
        c.ws.send(Message::Binary(ack.into())).await.map_err(|e| Failure::new("send", e))?;
    }
    Ok(())
}

/// Receives messages until one DATA arrives; returns how many of its bytes are new (with
/// offsets, what arrived before is dropped, and nothing while a new connection waits for the
/// agent's RESUME), which go to the stream check when `check`. Ping, pong, RESIZE and unknown
/// messages are skipped, ACKs counted, a RESUME answered as `hatch` answers it; close, EXIT
/// and ERROR end the session with their kind.
async fn recv_data(c: &mut Conn, check: bool) -> Result<usize, Failure> {
    loop {
        match c.ws.next().await {
            None => return Err(Failure::new("eof", "connection ended without close")),
            Some(Err(e)) => return Err(Failure::new("recv", e)),
            Some(Ok(Message::Binary(b))) => match Chan::decode(&b) {
                Ok(Chan::Data(d)) => {
                    let new = match c.link.as_mut() {
                        None => d,
                        Some(l) => match l.on_data(Instant::now().into_std(), d.len()) {
                            Deliver::From(i) => &d[i..],
                            Deliver::Drop => &[],
                        },
                    };
                    if check {
                        c.check.feed(new);
                    }
                    return Ok(new.len());
                }
                Ok(Chan::Ack(n)) => {
                    if let Some(l) = c.link.as_mut() {
                        l.on_ack(n).map_err(|e| Failure::new("bad_ack", e))?;
                    }
                }
                Ok(Chan::Resume(r)) => {
                    let Some(l) = c.link.as_mut() else { continue };
                    let answer = l.on_resume(r).map_err(|e| Failure::new("resume_offsets", e))?;
                    if let Some((answer, replay)) = answer {
                        let msgs = hatch_proto::channel::replay_messages(
                            answer,
                            replay,
                            REPLAY_CHUNK,
                            Chan::Data(&[]),
                        );
                        send_all(&mut c.ws, msgs).await?;
                    }
                    if !l.awaiting() {
                        return Ok(0);
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
        let agent = Agent {
            i,
            spec: spec.clone(),
            sh: sh.clone(),
            dialer: dialer.own_process(),
            counter: counter.clone(),
            waiting: Rc::default(),
        };
        let (sem, ctl, reg_tx) = (sem.clone(), ctl.clone(), reg_tx.clone());
        tokio::task::spawn_local(async move {
            let permit = sem.acquire_owned().await;
            let res = tokio::time::timeout(SETUP_TIMEOUT, agent.register()).await;
            let connected = match res {
                Ok(Ok(reg)) => tokio::time::timeout(SETUP_TIMEOUT, agent.connect(&reg))
                    .await
                    .unwrap_or_else(|_| Err(Failure::new("control_timeout", "")))
                    .map(|ws| (reg, ws)),
                Ok(Err(f)) => Err(f),
                Err(_) => Err(Failure::new("register_timeout", "")),
            };
            drop(permit);
            let (reg, ws) = match connected {
                Ok(x) => x,
                Err(f) => {
                    agent.sh.error(&f);
                    let _ = reg_tx.send(None);
                    return;
                }
            };
            let _ = reg_tx.send(Some(reg.instance_id.clone()));
            agent.control(ws, &reg, ctl).await;
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
        stream: StreamStats::default(),
        forward: Default::default(),
    });
    Ok(())
}

/// Resume tokens asked for at once per agent at most (`hatch-agent` bounds its queue too).
const ASK_QUEUE: usize = 1024;

/// Sessions of an agent whose data leg was lost, by id: where the relay's `session.resume`
/// answer (stream URL, token) goes.
type Waiting = Rc<RefCell<std::collections::HashMap<String, mpsc::Sender<(String, String)>>>>;

/// One simulated `hatch-agent`.
struct Agent {
    i: usize,
    spec: Rc<AgentSpec>,
    sh: Rc<Shared>,
    dialer: Dialer,
    /// Numbers the data connections of the worker (spreads source addresses).
    counter: Rc<Cell<usize>>,
    /// Sessions whose data leg was lost, by id: where the relay's `session.resume` answer goes.
    waiting: Waiting,
}

impl Agent {
    async fn register(&self) -> Result<RegisterResponse, Failure> {
        let api = self.spec.api_url.trim_end_matches('/');
        let body = serde_json::to_vec(&RegisterRequest {
            activation_id: self.spec.activation_id.clone(),
            activation_code: self.spec.activation_code.clone(),
            hostname: Some(format!("loadtest-{}", self.i)),
        })
        .map_err(|e| Failure::new("json", e))?;
        let url = format!("{api}/v1/agent/register");
        let (status, body) = self.dialer.post_json(&url, None, body, API_TIMEOUT, self.i).await?;
        if !status.is_success() {
            let f = api_error(status, &body);
            return Err(Failure::new(format!("register_{}", f.kind), f.detail));
        }
        serde_json::from_slice(&body).map_err(|e| Failure::new("api_body", e))
    }

    /// Opens the control channel and says hello, as a real agent does first (the relay counts
    /// the instance online after it).
    async fn connect(&self, reg: &RegisterResponse) -> Result<Ws, Failure> {
        let api = self.spec.api_url.trim_end_matches('/');
        let ws_url = format!("{}/v1/agent/connect", api.replacen("https://", "wss://", 1));
        let mut ws = self
            .dialer
            .ws_with(&ws_url, Some(&reg.instance_secret), self.i, false)
            .await
            .map_err(|f| Failure::new(format!("control_{}", f.kind), f.detail))?;
        let hello = serde_json::to_string(&FromAgent::hello("loadtest", false))
            .map_err(|e| Failure::new("json", e))?;
        ws.send(Message::Text(hello.into())).await.map_err(|e| Failure::new("control_send", e))?;
        Ok(ws)
    }

    /// Serves the control channel until the parent stops us; with `resume`, a lost channel is
    /// reconnected as `hatch-agent` reconnects it (capped exponential backoff, full jitter).
    async fn control(self, mut ws: Ws, reg: &RegisterResponse, mut ctl: watch::Receiver<Ctl>) {
        let (ask_tx, mut ask_rx) = mpsc::channel::<FromAgent>(ASK_QUEUE);
        let timing = hatch_agent::control::ControlTiming::default();
        let mut attempt = 0u32;
        loop {
            let since = Instant::now();
            let lost = self.serve(&mut ws, &ask_tx, &mut ask_rx, &mut ctl).await;
            let Some(f) = lost else { return };
            if !self.spec.resume || self.sh.ended.get() {
                self.sh.error(&f);
                return;
            }
            if since.elapsed() >= timing.stable_after {
                attempt = 0;
            }
            ws = loop {
                let delay = hatch_agent::control::backoff_delay(
                    attempt,
                    timing.backoff_base,
                    timing.backoff_cap,
                );
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = ctl.wait_for(|c| *c == Ctl::Stop) => return,
                }
                if let Ok(Ok(ws)) =
                    tokio::time::timeout(timing.connect_timeout, self.connect(reg)).await
                {
                    break ws;
                }
            };
        }
    }

    /// One control channel: heartbeats answered, `session.open` served, resume requests of
    /// lost legs sent and their answers handed over. `None` when the parent stops us.
    async fn serve(
        &self,
        ws: &mut Ws,
        ask_tx: &mpsc::Sender<FromAgent>,
        ask_rx: &mut mpsc::Receiver<FromAgent>,
        ctl: &mut watch::Receiver<Ctl>,
    ) -> Option<Failure> {
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                Some(ask) = ask_rx.recv() => {
                    let text = serde_json::to_string(&ask).unwrap_or_default();
                    if let Err(e) = ws.send(Message::Text(text.into())).await {
                        // Asked again by the session after its backoff.
                        return Some(Failure::new("control_send", e));
                    }
                    continue;
                }
                _ = ctl.wait_for(|c| *c == Ctl::Stop) => return None,
            };
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None => {
                    return Some(Failure::new("control_closed", ""));
                }
                Some(Err(e)) => return Some(Failure::new("control_recv", e)),
                Some(Ok(_)) => continue,
            };
            match serde_json::from_str::<ToAgent>(&text) {
                Ok(ToAgent::Heartbeat { seq }) => {
                    let reply =
                        serde_json::to_string(&FromAgent::Heartbeat { seq }).unwrap_or_default();
                    if let Err(e) = ws.send(Message::Text(reply.into())).await {
                        return Some(Failure::new("control_send", e));
                    }
                }
                Ok(ToAgent::SessionOpen {
                    mode: ApiMode::Port,
                    stream_url,
                    token,
                    remote_host,
                    remote_port,
                    ..
                }) => {
                    let n = self.counter.get();
                    self.counter.set(n + 1);
                    let (spec, sh, dialer, ctl) =
                        (self.spec.clone(), self.sh.clone(), self.dialer.clone(), ctl.clone());
                    tokio::task::spawn_local(async move {
                        let dest = (remote_host.unwrap_or_else(|| "localhost".into()), remote_port);
                        let res = forward::agent_leg(
                            &spec,
                            &sh,
                            &dialer,
                            n,
                            &stream_url,
                            &token,
                            dest,
                            ctl,
                        )
                        .await;
                        if let Err(f) = res {
                            sh.error(&Failure::new(format!("agent_{}", f.kind), f.detail));
                        }
                    });
                }
                Ok(ToAgent::SessionOpen { session_id, stream_url, token, .. }) => {
                    let n = self.counter.get();
                    self.counter.set(n + 1);
                    let leg = DataLeg {
                        sid: session_id,
                        n,
                        spec: self.spec.clone(),
                        sh: self.sh.clone(),
                        dialer: self.dialer.clone(),
                        ask: ask_tx.clone(),
                        waiting: self.waiting.clone(),
                    };
                    let ctl = ctl.clone();
                    tokio::task::spawn_local(async move {
                        if let Err(f) = leg.run(&stream_url, &token, ctl).await {
                            leg.sh.error(&Failure::new(format!("agent_{}", f.kind), f.detail));
                        }
                    });
                }
                Ok(ToAgent::SessionResume { session_id, stream_url, token }) => {
                    if let Some(tx) = self.waiting.borrow().get(&session_id) {
                        let _ = tx.try_send((stream_url, token));
                    }
                }
                Ok(ToAgent::SessionClose { session_id, .. }) => {
                    // It ended: a session waiting to resume it hears so by its channel closing.
                    self.waiting.borrow_mut().remove(&session_id);
                }
                Err(_) => self.sh.error(&Failure::new("control_bad_message", "")),
            }
        }
    }
}

/// The data leg of one session of a simulated agent.
struct DataLeg {
    sid: String,
    n: usize,
    spec: Rc<AgentSpec>,
    sh: Rc<Shared>,
    dialer: Dialer,
    ask: mpsc::Sender<FromAgent>,
    waiting: Waiting,
}

impl DataLeg {
    async fn run(
        &self,
        url: &str,
        token: &str,
        mut ctl: watch::Receiver<Ctl>,
    ) -> Result<(), Failure> {
        let mut ws = tokio::time::timeout(SETUP_TIMEOUT, self.dialer.ws(url, Some(token), self.n))
            .await
            .map_err(|_| Failure::new("dial_timeout", ""))??;
        self.sh.up.set(self.sh.up.get() + 1);
        let res = if self.spec.mode == Mode::Pty {
            crate::pty::serve_cat(&mut ws, &mut ctl).await
        } else {
            let mut link = self.spec.acks.then(|| Link::new(LinkConfig::default()));
            loop {
                match echo(&mut ws, &mut ctl, &mut link).await {
                    Err(f) if self.resume(&f) => match self.reattach(&mut link, &mut ctl).await {
                        Ok(Some(new)) => ws = new,
                        Ok(None) => break Ok(()),
                        Err(f) => break Err(f),
                    },
                    other => break other,
                }
            }
        };
        self.sh.up.set(self.sh.up.get() - 1);
        res
    }

    fn resume(&self, f: &Failure) -> bool {
        self.spec.resume && self.spec.acks && !self.sh.ended.get() && resumable(f)
    }

    /// Puts up a new leg as `hatch-agent` does: asks the relay for a resume token through the
    /// control channel (again with backoff while unanswered: the channel may be reconnecting),
    /// dials, and sends RESUME with what the client has not acknowledged. `None`: the session
    /// ended meanwhile, or the parent stopped us.
    async fn reattach(
        &self,
        link: &mut Option<Link>,
        ctl: &mut watch::Receiver<Ctl>,
    ) -> Result<Option<Ws>, Failure> {
        let (tx, mut answers) = mpsc::channel(4);
        self.waiting.borrow_mut().insert(self.sid.clone(), tx);
        let deadline = Instant::now() + RESUME_FOR;
        let mut backoff = hatch_agent::session::RESUME_ASK_FIRST;
        let res = loop {
            let _ = self.ask.try_send(FromAgent::SessionResume { session_id: self.sid.clone() });
            let wait =
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            tokio::select! {
                answer = answers.recv() => {
                    let Some((url, token)) = answer else { break Ok(None) };
                    let dialed = tokio::time::timeout(SETUP_TIMEOUT, self.dialer.ws(&url, Some(&token), self.n)).await;
                    if let Ok(Ok(mut ws)) = dialed {
                        let Some(l) = link.as_mut() else { break Ok(None) };
                        let msgs = {
                            let (r, replay) = l.reconnected();
                            hatch_proto::channel::replay_messages(r, replay, REPLAY_CHUNK, Chan::Exit(255))
                        };
                        if send_all(&mut ws, msgs).await.is_ok() {
                            break Ok(Some(ws));
                        }
                    }
                }
                () = wait => {}
                _ = ctl.wait_for(|c| *c == Ctl::Stop) => break Ok(None),
            }
            if Instant::now() >= deadline {
                break Err(Failure::new(
                    "resume_timeout",
                    format!("no new data leg within {RESUME_FOR:?}"),
                ));
            }
            backoff = (backoff * 2).min(hatch_agent::session::RESUME_ASK_MAX);
        };
        self.waiting.borrow_mut().remove(&self.sid);
        res
    }
}

/// Sends encoded messages in one flush.
async fn send_all(ws: &mut Ws, msgs: Vec<Vec<u8>>) -> Result<(), Failure> {
    let send = |e| Failure::new("send", e);
    for m in msgs {
        ws.feed(Message::Binary(m.into())).await.map_err(send)?;
    }
    ws.flush().await.map_err(send)
}

/// Echoes every DATA message back as it came (the same bytes, no copy); with offsets, counts
/// both ways as `hatch-agent` does, lets an acknowledgement ride with each echo, echoes only
/// what is new and answers a RESUME. Ends `Ok` when the parent stops us or the relay closes
/// for good; a lost leg is an error [`resumable`] says can be taken up.
async fn echo(
    ws: &mut Ws,
    ctl: &mut watch::Receiver<Ctl>,
    acks: &mut Option<Link>,
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
                let out = match l.on_data(Instant::now().into_std(), b.len() - 1) {
                    Deliver::Drop => continue,
                    Deliver::From(0) => b,
                    Deliver::From(i) if i + 1 >= b.len() => continue,
                    Deliver::From(i) => Bytes::from(Chan::Data(&b[1 + i..]).to_vec()),
                };
                if l.tx.push(&out[1..]) < out.len() - 1 {
                    return Err(Failure::new("window_full", "the client acknowledged nothing"));
                }
                let send = |e| Failure::new("send", e);
                ws.feed(Message::Binary(out)).await.map_err(send)?;
                if let Some(n) = l.rx.take_ack() {
                    ws.feed(Message::Binary(Chan::Ack(n).to_vec().into())).await.map_err(send)?;
                }
                ws.flush().await.map_err(send)?;
            }
            Some(Ok(Message::Binary(b))) => {
                let Some(l) = acks.as_mut() else { continue };
                match Chan::decode(&b) {
                    Ok(Chan::Ack(n)) => l.on_ack(n).map_err(|e| Failure::new("bad_ack", e))?,
                    Ok(Chan::Resume(r)) => {
                        let answer =
                            l.on_resume(r).map_err(|e| Failure::new("resume_offsets", e))?;
                        if let Some((answer, replay)) = answer {
                            let msgs = hatch_proto::channel::replay_messages(
                                answer,
                                replay,
                                REPLAY_CHUNK,
                                Chan::Exit(255),
                            );
                            send_all(ws, msgs).await?;
                        }
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Close(f))) => {
                let code = f.as_ref().map_or(1005, |f| u16::from(f.code));
                if hatch_proto::close::is_resumable(code) {
                    return Err(Failure::new(format!("closed_{code}"), "the relay will resume it"));
                }
                return Ok(());
            }
            None => return Err(Failure::new("eof", "connection ended without close")),
            Some(Err(e)) => return Err(Failure::new("recv", e)),
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_passes_the_stream_sent_in_any_cut_and_counts_what_is_out_of_place() {
        let mut sent = Vec::new();
        for seq in 0..300 {
            payload_of(3, seq, 16, &mut sent);
        }
        assert_eq!(&sent[16..32], b"00000001dddddddd");
        let mut c = Check::new(3, 16);
        for part in sent.chunks(7) {
            c.feed(part);
        }
        assert_eq!((c.pos, c.out_of_order), (sent.len() as u64, 0));
        // Two keystrokes swapped: each of their differing bytes is out of place.
        let mut swapped = sent.clone();
        swapped[32..64].rotate_left(16);
        let mut c = Check::new(3, 16);
        c.feed(&swapped);
        assert!(c.out_of_order > 0);
        // A short payload carries the sequence number's last digits.
        let mut short = Vec::new();
        payload_of(0, 0x1234, 2, &mut short);
        assert_eq!(short, b"34");
    }

    #[test]
    fn losses_without_a_close_and_resumable_close_codes_are_taken_up() {
        for kind in ["eof", "recv", "send", "closed_4009", "closed_4015"] {
            assert!(resumable(&Failure::new(kind, "")), "{kind}");
        }
        for kind in ["closed_1000", "closed_4014", "echo_timeout", "exit", "closed_x"] {
            assert!(!resumable(&Failure::new(kind, "")), "{kind}");
        }
    }
}
