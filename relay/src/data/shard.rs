//! One shard: a single-threaded runtime with its own `SO_REUSEPORT` listener, its sessions, its
//! used-token set and its buffer pool. Nothing here is `Sync`; shards talk through channels.
//!
//! ```text
//!  accept ─▶ handshake (TLS + upgrade head, deadline) ─▶ verify token
//!        ─▶ owner shard?  yes: admit        no: hand over (fd, TLS state, unread plaintext)
//!  admit  ─▶ single use (jti) ─▶ 101 ─▶ wait for the peer leg ─▶ pair ─▶ two pumps
//! ```

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hatch_proto::close;
use hatch_proto::token::Role;
use rustls::server::UnbufferedServerConnection;
use slab::Slab;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::DataConfig;
use super::io::{Listener, Stream};
use super::metrics::ShardMetrics;
use super::pair::{self, AGENT, CLIENT, Phase, Session};
use super::pool::Pool;
use super::tls::Conn;
use super::upgrade::{self, Refusal};
use crate::plane::{CloseReason, DataCommand, DataEvent, SessionEnd};
use crate::token::{TokenError, TokenVerifier};

/// How long a closing leg may take to send its close and FIN before its socket is shut down.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How long a closing leg's close frame waits for a forwarded frame to that leg, half written
/// when the session ended, to complete (its sender wrote it whole and TCP split it, so the rest
/// is normally in flight already). After that the leg is closed without a close frame: one
/// inside the payload would corrupt it. Short, because a dripping sender would hold the close.
pub const FRAME_FINISH_WAIT: Duration = Duration::from_secs(1);

/// How often a shard reports the byte counts of its live sessions that changed
/// ([`DataEvent::Progress`]). A relay killed without warning loses at most this much of each
/// session's counts; shorter means more store writes for busy sessions (one row update per
/// changed session per period, never per frame).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Messages from the data plane's handle to a shard.
pub enum Ctrl {
    /// A control-plane command.
    Command(DataCommand),
    /// New certificate.
    ReloadTls(Arc<rustls::ServerConfig>),
    /// Stop accepting, wait up to the drain period, close everything with 4009, exit.
    Shutdown(Duration),
}

/// A leg accepted on one shard and handed to its session's owner shard.
pub struct Handoff {
    fd: OwnedFd,
    tls: Option<UnbufferedServerConnection>,
    pending: Vec<u8>,
    adm: Admission,
}

/// A leg whose token verified, not yet admitted (single use, pairing).
#[derive(Debug, Clone)]
struct Admission {
    sid: String,
    role: Role,
    jti: String,
    exp: u64,
    accept: String,
    hatch_v1: bool,
}

/// What a shard thread starts with.
pub struct ShardInit {
    pub(crate) id: usize,
    pub(crate) cfg: Arc<DataConfig>,
    pub(crate) verifier: TokenVerifier,
    pub(crate) events: mpsc::UnboundedSender<DataEvent>,
    pub(crate) metrics: Arc<ShardMetrics>,
    pub(crate) listener: std::net::TcpListener,
    pub(crate) ctrl: mpsc::UnboundedReceiver<Ctrl>,
    pub(crate) handoffs: mpsc::Receiver<Handoff>,
    pub(crate) peers: Vec<mpsc::Sender<Handoff>>,
}

/// The owner shard of a session: FNV-1a of its id, modulo the shard count.
pub fn owner_of(sid: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A shard's state, shared by its tasks through `Rc`.
pub struct Shard<S> {
    pub(crate) id: usize,
    pub(crate) cfg: Arc<DataConfig>,
    verifier: TokenVerifier,
    events: mpsc::UnboundedSender<DataEvent>,
    pub(crate) pool: Rc<Pool>,
    pub(crate) metrics: Arc<ShardMetrics>,
    tls: RefCell<Option<Arc<rustls::ServerConfig>>>,
    sessions: RefCell<Slab<Rc<Session<S>>>>,
    index: RefCell<HashMap<String, usize>>,
    /// Used token ids and their expiry (seconds): refused until then, also after the session.
    used: RefCell<HashMap<String, u64>>,
    /// Terminated sessions: code and until when later legs are refused.
    terminated: RefCell<HashMap<String, (u16, u64)>>,
    peers: Vec<mpsc::Sender<Handoff>>,
    stopping: Cell<bool>,
}

/// Runs a shard until it is shut down.
pub async fn run<L: Listener>(init: ShardInit) {
    let listener = match L::from_std(init.listener) {
        Ok(l) => Rc::new(l),
        Err(err) => {
            warn!(shard = init.id, %err, "cannot adopt listener");
            return;
        }
    };
    let shard = Rc::new(Shard::<L::Stream> {
        id: init.id,
        tls: RefCell::new(init.cfg.tls.clone()),
        cfg: init.cfg,
        verifier: init.verifier,
        events: init.events,
        pool: Rc::new(Pool::new(init.metrics.clone())),
        metrics: init.metrics,
        sessions: RefCell::new(Slab::new()),
        index: RefCell::new(HashMap::new()),
        used: RefCell::new(HashMap::new()),
        terminated: RefCell::new(HashMap::new()),
        peers: init.peers,
        stopping: Cell::new(false),
    });
    let accept = tokio::task::spawn_local(accept_loop(shard.clone(), listener.clone()));
    let handoffs = tokio::task::spawn_local(handoff_loop(shard.clone(), init.handoffs));
    let watchdog = tokio::task::spawn_local(watchdog(shard.clone()));
    let progress = tokio::task::spawn_local(progress(shard.clone()));
    let mut ctrl = init.ctrl;
    let drain = loop {
        match ctrl.recv().await {
            Some(Ctrl::Command(DataCommand::Terminate { session_id, code })) => {
                shard.terminate(&session_id, code);
            }
            Some(Ctrl::ReloadTls(cfg)) => {
                *shard.tls.borrow_mut() = Some(cfg);
                info!(shard = shard.id, "certificate reloaded");
            }
            Some(Ctrl::Shutdown(d)) => break d,
            None => break Duration::ZERO,
        }
    };
    shard.stopping.set(true);
    listener.stop();
    let _ = accept.await;
    // Close the listening socket now, so that the kernel routes new connections to the other
    // listeners of the port (a new relay process during a graceful restart) instead of queueing
    // them here until the drain ends.
    drop(listener);
    let deadline = Instant::now() + drain;
    while !shard.sessions.borrow().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(shard.tick().min(deadline - Instant::now())).await;
    }
    let live: Vec<_> = shard.sessions.borrow().iter().map(|(_, s)| s.clone()).collect();
    for s in &live {
        shard.end(s, CloseReason::RelayShutdown, [Some(close::RELAY_SHUTDOWN); 2]);
    }
    // Let the closers send 4009 and FIN; their hard deadline bounds this.
    let deadline = Instant::now() + FRAME_FINISH_WAIT + CLOSE_LINGER + Duration::from_millis(200);
    while shard.metrics.open.load(std::sync::atomic::Ordering::Relaxed) > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handoffs.abort();
    watchdog.abort();
    progress.abort();
}

async fn accept_loop<L: Listener>(shard: Rc<Shard<L::Stream>>, listener: Rc<L>) {
    loop {
        match listener.accept().await {
            Ok(Some(s)) => {
                tokio::task::spawn_local(handshake(shard.clone(), s));
            }
            Ok(None) => return,
            Err(err) => {
                // EMFILE and friends: back off briefly rather than spin.
                warn!(shard = shard.id, %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handoff_loop<S: Stream>(shard: Rc<Shard<S>>, mut rx: mpsc::Receiver<Handoff>) {
    while let Some(h) = rx.recv().await {
        ShardMetrics::add(&shard.metrics.handoffs_in, 1);
        let io = match S::from_fd(h.fd) {
            Ok(io) => io,
            Err(err) => {
                warn!(shard = shard.id, %err, "cannot adopt handed-over leg");
                continue;
            }
        };
        let conn = Rc::new(shard.conn(io, h.tls, h.pending));
        let timer = arm_shutdown(&conn, shard.cfg.handshake_timeout);
        tokio::task::spawn_local(admit(shard.clone(), conn, h.adm, timer));
    }
}

/// Shuts `conn` down after `after` unless aborted first: deadlines never drop a read.
pub fn arm_shutdown<S: Stream>(conn: &Rc<Conn<S>>, after: Duration) -> JoinHandle<()> {
    let weak: Weak<Conn<S>> = Rc::downgrade(conn);
    tokio::task::spawn_local(async move {
        tokio::time::sleep(after).await;
        if let Some(c) = weak.upgrade() {
            c.io.shutdown(Shutdown::Both);
        }
    })
}

enum HeadError {
    Io,
    TooLarge,
}

async fn read_head<S: Stream>(shard: &Shard<S>, conn: &Conn<S>) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::new();
    loop {
        let (buf, n) = match conn.read_plain(&[]).await {
            Ok(Some(x)) => x,
            _ => return Err(HeadError::Io),
        };
        head.extend_from_slice(&buf[..n]);
        shard.pool.give(buf);
        if let Some(end) = upgrade::head_end(&head[..head.len().min(upgrade::MAX_HEAD)]) {
            conn.set_pending(head.split_off(end));
            return Ok(head);
        }
        if head.len() >= upgrade::MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

async fn handshake<S: Stream>(shard: Rc<Shard<S>>, io: S) {
    ShardMetrics::add(&shard.metrics.accepted, 1);
    let tls = match shard.tls.borrow().clone() {
        Some(cfg) => match UnbufferedServerConnection::new(cfg) {
            Ok(c) => Some(c),
            Err(err) => {
                warn!(shard = shard.id, %err, "tls setup failed");
                return;
            }
        },
        None => None,
    };
    let conn = Rc::new(shard.conn(io, tls, Vec::new()));
    let timer = arm_shutdown(&conn, shard.cfg.handshake_timeout);
    let head = match read_head(&shard, &conn).await {
        Ok(h) => h,
        Err(HeadError::Io) => {
            timer.abort();
            shard.metrics.refused("handshake_failed");
            debug!(shard = shard.id, "handshake failed or timed out");
            conn.io.shutdown(Shutdown::Both);
            return;
        }
        Err(HeadError::TooLarge) => {
            timer.abort();
            return refuse(&shard, conn, Refusal::HeadTooLarge).await;
        }
    };
    let req = match upgrade::parse(&head) {
        Ok(r) => r,
        Err(r) => {
            timer.abort();
            return refuse(&shard, conn, r).await;
        }
    };
    let claims = match shard.verifier.verify(&req.token, &req.session_id, req.role, now_secs()) {
        Ok(c) => c,
        Err(err) => {
            timer.abort();
            warn!(session = %req.session_id, role = req.role.as_str(), reason = err.label(), "token refused");
            let r = match err {
                TokenError::Expired => Refusal::TokenExpired,
                // Its session was closed when this relay started: as used as a token gets.
                TokenError::PreviousRun => Refusal::TokenAlreadyUsed,
                _ => Refusal::InvalidToken,
            };
            return refuse(&shard, conn, r).await;
        }
    };
    let adm = Admission {
        sid: req.session_id,
        role: req.role,
        jti: claims.jti,
        exp: claims.exp,
        accept: req.accept,
        hatch_v1: req.hatch_v1,
    };
    let owner = owner_of(&adm.sid, shard.peers.len());
    if owner == shard.id {
        return admit(shard, conn, adm, timer).await;
    }
    // Hand over to the owner: no read is in flight (read_head returned), the timer only holds
    // a weak reference, and all ciphertext read so far is inside rustls.
    timer.abort();
    let peer = &shard.peers[owner];
    if peer.capacity() == 0 || conn.holds_cipher() {
        return refuse(&shard, conn, Refusal::Unavailable).await;
    }
    let Ok(conn) = Rc::try_unwrap(conn) else {
        // Invariant: nothing else holds a strong reference before admission.
        warn!(shard = shard.id, "leg still referenced at handoff");
        return;
    };
    let (io, tls, pending) = conn.into_parts();
    let fd = match io.into_fd() {
        Ok(fd) => fd,
        Err(err) => {
            warn!(shard = shard.id, %err, "handoff failed");
            return;
        }
    };
    match peer.try_send(Handoff { fd, tls, pending, adm }) {
        Ok(()) => ShardMetrics::add(&shard.metrics.handoffs_out, 1),
        Err(_) => warn!(shard = shard.id, owner, "owner shard queue full; leg dropped"),
    }
}

async fn refuse<S: Stream>(shard: &Rc<Shard<S>>, conn: Rc<Conn<S>>, r: Refusal) {
    shard.metrics.refused(r.label());
    debug!(shard = shard.id, status = r.parts().0, code = r.parts().2, "upgrade refused");
    drop(arm_shutdown(&conn, CLOSE_LINGER));
    let _ = conn.write_small(&r.response()).await;
    conn.finish().await;
    pair::drain(shard, &conn).await;
}

async fn admit<S: Stream>(
    shard: Rc<Shard<S>>,
    conn: Rc<Conn<S>>,
    adm: Admission,
    timer: JoinHandle<()>,
) {
    if shard.stopping.get() {
        timer.abort();
        return refuse(&shard, conn, Refusal::Unavailable).await;
    }
    let now = now_secs();
    if shard.used.borrow().contains_key(&adm.jti) {
        timer.abort();
        warn!(session = %adm.sid, role = adm.role.as_str(), "token replayed");
        return refuse(&shard, conn, Refusal::TokenAlreadyUsed).await;
    }
    shard.used.borrow_mut().insert(adm.jti.clone(), adm.exp.max(now));
    let terminated = shard.terminated.borrow().get(&adm.sid).map(|t| t.0);
    if let Some(code) = terminated {
        let r = conn.write_small(&upgrade::switching(&adm.accept, adm.hatch_v1)).await;
        timer.abort();
        if r.is_ok() {
            close_leg(shard.clone(), conn, Some(code)).await;
        }
        return;
    }
    let slot = if adm.role == Role::Client { CLIENT } else { AGENT };
    let existing = shard.index.borrow().get(&adm.sid).copied();
    let s = match existing {
        Some(k) => shard.sessions.borrow()[k].clone(),
        None => {
            let s = Rc::new(Session::new(adm.sid.clone()));
            let k = shard.sessions.borrow_mut().insert(s.clone());
            s.key.set(k);
            shard.index.borrow_mut().insert(adm.sid.clone(), k);
            ShardMetrics::add(&shard.metrics.sessions, 1);
            s
        }
    };
    if s.legs[slot].borrow().is_some() {
        timer.abort();
        warn!(session = %adm.sid, role = adm.role.as_str(), "second leg for one role");
        return refuse(&shard, conn, Refusal::TokenAlreadyUsed).await;
    }
    *s.legs[slot].borrow_mut() = Some(conn.clone());
    let r = conn.write_small(&upgrade::switching(&adm.accept, adm.hatch_v1)).await;
    timer.abort();
    if s.ended() {
        return;
    }
    if let Err(err) = r {
        debug!(session = %adm.sid, %err, "101 not delivered");
        shard.gone(&s, slot);
        return;
    }
    debug!(session = %adm.sid, role = adm.role.as_str(), shard = shard.id, "leg admitted");
    s.ready[slot].set(true);
    conn.last_rx.set(Instant::now());
    if s.ready[CLIENT].get() && s.ready[AGENT].get() {
        let now = Instant::now();
        s.phase.set(Phase::Paired);
        s.paired.set(Some(now));
        s.last_c2a.set(now);
        ShardMetrics::add(&shard.metrics.paired, 1);
        let _ = shard
            .events
            .send(DataEvent::Connected { session_id: s.sid.clone(), at: SystemTime::now() });
        info!(session = %s.sid, shard = shard.id, "session paired");
        for i in [CLIENT, AGENT] {
            if let Some(c) = s.leg(i) {
                c.read_now();
            }
        }
        pair::start_pumps(&shard, &s);
    } else {
        tokio::task::spawn_local(watch_waiting(shard.clone(), s.clone(), conn, slot));
    }
}

/// Notices a waiting leg whose peer hangs up before the other leg arrives, so the session ends
/// as closed by that side at once instead of at the pair timeout. Reads nothing: the bytes the
/// leg sent meanwhile stay in the socket for the pump.
async fn watch_waiting<S: Stream>(
    shard: Rc<Shard<S>>,
    s: Rc<Session<S>>,
    conn: Rc<Conn<S>>,
    slot: usize,
) {
    let waiting = || s.phase.get() == Phase::Waiting;
    loop {
        let gone = conn.io.hung_up(waiting).await;
        if !waiting() {
            return;
        }
        if gone {
            debug!(session = %s.sid, leg = slot, "waiting leg hung up");
            shard.gone(&s, slot);
            return;
        }
    }
}

/// Closes one leg: the close frame (if any; only between frames, see [`FRAME_FINISH_WAIT`]),
/// TLS close_notify and FIN, then reads until the peer's FIN unless its pump does; a hard
/// deadline shuts the socket down regardless.
async fn close_leg<S: Stream>(shard: Rc<Shard<S>>, conn: Rc<Conn<S>>, code: Option<u16>) {
    let linger = if conn.mid_frame() { FRAME_FINISH_WAIT + CLOSE_LINGER } else { CLOSE_LINGER };
    drop(arm_shutdown(&conn, linger));
    match code {
        Some(code) => {
            if !conn.send_close(&pair::close_frame(code), FRAME_FINISH_WAIT).await {
                debug!(code, "leg closed without a close frame (inside a frame, or gone)");
            }
        }
        // A leg that gets no close frame (it went away) needs no frame finished either.
        None => conn.abandon_frame(),
    }
    conn.finish().await;
    if !conn.reading.get() {
        pair::drain(&shard, &conn).await;
    }
}

impl<S: Stream> Shard<S> {
    fn conn(&self, io: S, tls: Option<UnbufferedServerConnection>, pending: Vec<u8>) -> Conn<S> {
        Conn::new(io, tls, self.pool.clone(), pending, self.metrics.clone())
    }

    /// The watchdog's period: a fraction of the shortest configured timer.
    fn tick(&self) -> Duration {
        let c = &self.cfg;
        let mut t = c.pair_timeout.min(c.ping_interval).min(c.dead_after);
        if let Some(i) = c.idle_timeout {
            t = t.min(i);
        }
        if let Some(m) = c.max_duration {
            t = t.min(m);
        }
        (t / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
    }

    /// Leg `i` went away: the session ends as closed by that side; the other leg gets 4005.
    pub fn gone(self: &Rc<Self>, s: &Rc<Session<S>>, i: usize) {
        let mut codes = [None, None];
        codes[1 - i] = Some(close::PEER_GONE);
        self.end(s, pair::gone_reason(i), codes);
    }

    /// Ends a session once: reports it, then closes each leg with its code.
    pub fn end(self: &Rc<Self>, s: &Rc<Session<S>>, reason: CloseReason, codes: [Option<u16>; 2]) {
        if s.ended() {
            return;
        }
        s.phase.set(Phase::Ended);
        {
            let mut sessions = self.sessions.borrow_mut();
            if sessions.contains(s.key.get()) {
                sessions.remove(s.key.get());
            }
        }
        self.index.borrow_mut().remove(&s.sid);
        ShardMetrics::dec(&self.metrics.sessions);
        let start = s.paired.get().unwrap_or(s.created);
        let end = SessionEnd {
            session_id: s.sid.clone(),
            reason,
            bytes_client_to_agent: s.bytes[CLIENT].get(),
            bytes_agent_to_client: s.bytes[AGENT].get(),
            duration: start.elapsed(),
        };
        info!(
            session = %s.sid, reason = reason.as_str(), c2a = end.bytes_client_to_agent,
            a2c = end.bytes_agent_to_client, "session ended"
        );
        let _ = self.events.send(DataEvent::Ended(end));
        for (i, code) in codes.into_iter().enumerate() {
            if let Some(c) = s.legs[i].borrow_mut().take() {
                tokio::task::spawn_local(close_leg(self.clone(), c, code));
            }
        }
    }

    fn terminate(self: &Rc<Self>, sid: &str, code: u16) {
        let until = now_secs() + hatch_proto::token::TOKEN_LIFETIME_SECS;
        self.terminated.borrow_mut().insert(sid.to_owned(), (code, until));
        let s = self.index.borrow().get(sid).map(|&k| self.sessions.borrow()[k].clone());
        if let Some(s) = s {
            info!(session = %sid, code, "session terminated");
            self.end(&s, CloseReason::Terminated, [Some(code), Some(code)]);
        }
    }
}

/// Every [`PROGRESS_INTERVAL`], reports the byte counts of each live session whose counts
/// changed since its last report.
async fn progress<S: Stream>(shard: Rc<Shard<S>>) {
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (_, s) in shard.sessions.borrow().iter() {
            if s.ended() {
                continue;
            }
            let now = [s.bytes[CLIENT].get(), s.bytes[AGENT].get()];
            if now == [s.reported[CLIENT].get(), s.reported[AGENT].get()] {
                continue;
            }
            s.reported[CLIENT].set(now[CLIENT]);
            s.reported[AGENT].set(now[AGENT]);
            let _ = shard.events.send(DataEvent::Progress {
                session_id: s.sid.clone(),
                bytes_client_to_agent: now[CLIENT],
                bytes_agent_to_client: now[AGENT],
            });
        }
    }
}

async fn watchdog<S: Stream>(shard: Rc<Shard<S>>) {
    let tick = shard.tick();
    let mut last_purge = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        let cfg = shard.cfg.clone();
        let live: Vec<_> = shard.sessions.borrow().iter().map(|(_, s)| s.clone()).collect();
        for s in live {
            match s.phase.get() {
                Phase::Ended => {}
                Phase::Waiting => {
                    if now.duration_since(s.created) >= cfg.pair_timeout {
                        info!(session = %s.sid, "peer never came");
                        shard.end(&s, CloseReason::PairTimeout, [Some(close::PEER_NEVER_CAME); 2]);
                    }
                }
                Phase::Paired => check_paired(&shard, &s, now, &cfg),
            }
        }
        if now.duration_since(last_purge) >= Duration::from_secs(10) {
            last_purge = now;
            let secs = now_secs();
            shard.used.borrow_mut().retain(|_, exp| *exp >= secs);
            shard.terminated.borrow_mut().retain(|_, t| t.1 >= secs);
        }
    }
}

fn check_paired<S: Stream>(
    shard: &Rc<Shard<S>>,
    s: &Rc<Session<S>>,
    now: Instant,
    cfg: &DataConfig,
) {
    if let Some(max) = cfg.max_duration
        && s.paired.get().is_some_and(|p| now.duration_since(p) >= max)
    {
        shard.end(s, CloseReason::MaxDuration, [Some(close::MAX_DURATION); 2]);
        return;
    }
    if let Some(idle) = cfg.idle_timeout
        && now.duration_since(s.last_c2a.get()) >= idle
    {
        shard.end(s, CloseReason::IdleTimeout, [Some(close::IDLE_TIMEOUT); 2]);
        return;
    }
    for i in [CLIENT, AGENT] {
        let Some(c) = s.leg(i) else { continue };
        let silent = now.duration_since(c.last_rx.get());
        if silent >= cfg.dead_after {
            info!(session = %s.sid, leg = i, "leg silent too long");
            shard.gone(s, i);
            return;
        }
        // One ping owed at a time: a leg that sends now and then but does not read cannot
        // make writers pile up behind its write gate.
        if silent >= cfg.ping_interval && !c.pinged.get() {
            c.pinged.set(true);
            if c.owe_ping() {
                tokio::task::spawn_local(async move {
                    let _ = c.flush_owed().await;
                });
            }
        }
    }
}
