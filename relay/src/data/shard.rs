//! One shard: a single-threaded runtime with its own `SO_REUSEPORT` listener, its
//! [session table](super::session), its socket deadlines and its buffer pool. Nothing here is
//! `Sync`; shards talk through channels.
//!
//! ```text
//!  accept ─▶ handshake (TLS + upgrade head, deadline) ─▶ verify token
//!        ─▶ owner shard?  yes: admit        no: hand over (fd, TLS state, unread plaintext)
//!  admit ─▶ table.handle_admit ─▶ actions: 101 / refuse / watch / pumps / ping / close / report
//! ```
//!
//! The shard is the table's driver. Its loop takes control-plane commands and the one timer
//! (armed at the earliest of the table's [`poll_timeout`](super::session::SessionTable::
//! poll_timeout) and the socket deadlines); the accept, handshake, pump and closer tasks feed
//! what they saw into the table directly ([`Shard::feed`]) and the shard carries out the
//! actions it queued. Socket deadlines (a handshake's, a closing leg's linger) are entries in
//! one heap, not timer tasks: at its time the socket is shut down, which completes whatever
//! operation is pending on it (operations in flight are never dropped; see [`super::io`]).

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hatch_proto::api::RecordingMode;
use hatch_proto::token::Role;
use rustls::server::UnbufferedServerConnection;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::DataConfig;
use super::conn::{Conn, Open};
use super::io::{Listener, Stream};
use super::metrics::ShardMetrics;
use super::pool::Pool;
use super::pump::{self, CLOSE_LINGER, FRAME_FINISH_WAIT};
use super::record::Recording;
use super::session::{
    Action, Admit, CloseCode, Key, Leg, LegEnd, Report, Rules, SessionTable, TokenId,
};
use super::upgrade::{self, Refusal};
use crate::plane::{CloseReason, DataCommand, DataEvent};
use crate::recording::{Header, Outcome, PushError, Recorder};
use crate::token::{TokenError, TokenVerifier};

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
    resume: bool,
    two_way: bool,
    limits: crate::data::session::SessionLimits,
    accept: String,
    hatch_v1: bool,
    /// The token says the session is recorded.
    recording: Option<RecordTerms>,
}

/// How a session is recorded, and its recording header's names, from its token.
#[derive(Debug, Clone)]
struct RecordTerms {
    mode: RecordingMode,
    account: String,
    instance: String,
    principal: String,
}

/// Terminal size a recording's header starts with: the client's first RESIZE follows at once
/// and is recorded (the relay learns the size only from it).
const RECORDING_START_SIZE: (u16, u16) = (80, 24);

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
    /// This shard's recording writer (`None`: recording off, or its directory unusable, so
    /// that recorded sessions end with 4018), and its outcomes.
    pub(crate) recorder: Option<(Recorder, mpsc::UnboundedReceiver<Outcome>)>,
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

/// The table's clock: the runtime's (so that a paused test clock reaches the table too).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Hard socket deadlines: at its time a connection is shut down, unless cancelled first.
struct Deadlines<S> {
    heap: BinaryHeap<Reverse<(std::time::Instant, u64)>>,
    conns: HashMap<u64, Weak<Conn<S>>>,
    next_id: u64,
}

impl<S> Deadlines<S> {
    fn arm(&mut self, conn: &Rc<Conn<S>>, at: std::time::Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.heap.push(Reverse((at, id)));
        self.conns.insert(id, Rc::downgrade(conn));
        id
    }

    fn cancel(&mut self, id: u64) {
        self.conns.remove(&id);
    }

    /// The next live deadline (cancelled ones on top are dropped here).
    fn next(&mut self) -> Option<std::time::Instant> {
        while let Some(Reverse((t, id))) = self.heap.peek() {
            if self.conns.contains_key(id) {
                return Some(*t);
            }
            self.heap.pop();
        }
        None
    }

    /// The connections whose deadline has come (and that still exist).
    fn expire(&mut self, now: std::time::Instant) -> Vec<Rc<Conn<S>>> {
        let mut due = Vec::new();
        while let Some(&Reverse((t, id))) = self.heap.peek() {
            if t > now {
                break;
            }
            self.heap.pop();
            if let Some(c) = self.conns.remove(&id).and_then(|w| w.upgrade()) {
                due.push(c);
            }
        }
        due
    }
}

/// A shard's state, shared by its tasks through `Rc`.
pub struct Shard<S> {
    id: usize,
    cfg: Arc<DataConfig>,
    verifier: TokenVerifier,
    events: mpsc::UnboundedSender<DataEvent>,
    pool: Rc<Pool>,
    metrics: Arc<ShardMetrics>,
    tls: RefCell<Option<Arc<rustls::ServerConfig>>>,
    table: RefCell<SessionTable<Rc<Conn<S>>>>,
    deadlines: RefCell<Deadlines<S>>,
    /// The time the driver's timer is set for.
    armed: Cell<Option<std::time::Instant>>,
    /// Wakes the driver: a deadline earlier than `armed` appeared, or the table drained.
    wake: Notify,
    /// Shutting down and every session has ended.
    drained: Cell<bool>,
    open: Rc<Open>,
    peers: Vec<mpsc::Sender<Handoff>>,
    recorder: Option<Recorder>,
    /// The recorded sessions of this shard, by session id (kept across a detach).
    recordings: RefCell<HashMap<String, Rc<Recording>>>,
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
    let (recorder, outcomes) = init.recorder.map_or((None, None), |(r, o)| (Some(r), Some(o)));
    let shard = Rc::new(Shard::<L::Stream> {
        id: init.id,
        tls: RefCell::new(init.cfg.tls.clone()),
        table: RefCell::new(SessionTable::new(Rules::of(&init.cfg))),
        cfg: init.cfg,
        verifier: init.verifier,
        events: init.events,
        pool: Rc::new(Pool::new(init.metrics.clone())),
        open: Rc::new(Open::new(init.metrics.clone())),
        metrics: init.metrics,
        deadlines: RefCell::new(Deadlines {
            heap: BinaryHeap::new(),
            conns: HashMap::new(),
            next_id: 0,
        }),
        armed: Cell::new(None),
        wake: Notify::new(),
        drained: Cell::new(false),
        peers: init.peers,
        recorder,
        recordings: RefCell::new(HashMap::new()),
    });
    let outcomes = outcomes.map(|o| tokio::task::spawn_local(outcome_loop(shard.clone(), o)));
    let mut accept = Some(tokio::task::spawn_local(accept_loop(shard.clone(), listener.clone())));
    let mut listener = Some(listener);
    let handoffs = tokio::task::spawn_local(handoff_loop(shard.clone(), init.handoffs));
    let mut ctrl = init.ctrl;
    // After the drain: how long the closers get to send 4009 and FIN (their own deadlines
    // bound it; this only guards against a bug).
    let mut give_up: Option<Instant> = None;
    loop {
        if shard.drained.get() && give_up.is_none() {
            give_up = Some(Instant::now() + FRAME_FINISH_WAIT + CLOSE_LINGER * 2);
        }
        let next = shard.next_deadline();
        shard.armed.set(next);
        let sleep_to = [next.map(Instant::from_std), give_up].into_iter().flatten().min();
        let timer = async {
            match sleep_to {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shard.open.none(), if give_up.is_some() => break,
            cmd = ctrl.recv(), if accept.is_some() => match cmd {
                Some(Ctrl::Command(DataCommand::Terminate { session_id, code })) => {
                    match CloseCode::new(code) {
                        Some(code) => shard.feed(|t, now| t.handle_terminate(now, &session_id, code)),
                        None => warn!(session = %session_id, code, "terminate with a code not valid on the wire"),
                    }
                }
                Some(Ctrl::ReloadTls(cfg)) => {
                    *shard.tls.borrow_mut() = Some(cfg);
                    info!(shard = shard.id, "certificate reloaded");
                }
                Some(Ctrl::Shutdown(drain)) => stop(&shard, &mut listener, &mut accept, drain).await,
                None => stop(&shard, &mut listener, &mut accept, Duration::ZERO).await,
            },
            () = timer => {
                if give_up.is_some_and(|t| Instant::now() >= t) {
                    warn!(shard = shard.id, open = shard.open.count(), "legs still open after the drain");
                    break;
                }
                shard.on_timer();
            }
            () = shard.wake.notified() => {}
        }
    }
    handoffs.abort();
    // The writer thread syncs what is open and exits once the last handle is gone (it is not
    // joined: a pump still lingering would hold its handle past the shard's end).
    shard.recordings.borrow_mut().clear();
    if let Some(o) = outcomes {
        o.abort();
    }
}

/// Passes the recordings' outcomes to the control plane; a failed recording ends its session
/// at once (4018), also one that is idle.
async fn outcome_loop<S: Stream>(shard: Rc<Shard<S>>, mut rx: mpsc::UnboundedReceiver<Outcome>) {
    while let Some(outcome) = rx.recv().await {
        if let Outcome::Failed { session_id, failure } = &outcome {
            warn!(session = %session_id, op = ?failure.op, kind = ?failure.kind,
                err = %failure.message, "recording failed; ending the session (4018)");
            let sid = session_id.clone();
            shard.feed(|t, now| t.handle_recording_failed(now, &sid));
        }
        let _ = shard.events.send(DataEvent::Recording(outcome));
    }
}

/// Stops accepting, then starts the table's drain.
async fn stop<L: Listener>(
    shard: &Rc<Shard<L::Stream>>,
    listener: &mut Option<Rc<L>>,
    accept: &mut Option<tokio::task::JoinHandle<()>>,
    drain: Duration,
) {
    if let Some(l) = listener.as_ref() {
        l.stop();
    }
    if let Some(a) = accept.take() {
        let _ = a.await;
    }
    // Close the listening socket now, so that the kernel routes new connections to the other
    // listeners of the port (a new relay process during a graceful restart) instead of queueing
    // them here until the drain ends.
    listener.take();
    shard.feed(|t, now| t.handle_shutdown(now, drain));
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
        let deadline = shard.deadline(&conn, shard.cfg.handshake_timeout);
        shard.admit(conn, h.adm, deadline);
    }
}

enum HeadError {
    Io,
    TooLarge,
}

async fn read_head<S: Stream>(conn: &Conn<S>) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::new();
    loop {
        let (buf, n) = match conn.read_plain(&[]).await {
            Ok(Some(x)) => x,
            _ => return Err(HeadError::Io),
        };
        head.extend_from_slice(&buf[..n]);
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
    // The handshake deadline lasts until the 101 is written (see `accept`), or until the leg
    // is refused or handed over.
    let deadline = shard.deadline(&conn, shard.cfg.handshake_timeout);
    let head = read_head(&conn).await;
    let cancel = || shard.deadlines.borrow_mut().cancel(deadline);
    let head = match head {
        Ok(h) => h,
        Err(HeadError::Io) => {
            cancel();
            shard.metrics.refused("handshake_failed");
            debug!(shard = shard.id, "handshake failed or timed out");
            conn.io.shutdown(Shutdown::Both);
            return;
        }
        Err(HeadError::TooLarge) => {
            cancel();
            return refuse(shard, conn, Refusal::HeadTooLarge).await;
        }
    };
    let req = match upgrade::parse(&head) {
        Ok(r) => r,
        Err(r) => {
            cancel();
            return refuse(shard, conn, r).await;
        }
    };
    if let Err(r) = shard.cfg.origins.check(req.origin.as_deref(), req.host.as_deref()) {
        let origin = req.origin.as_deref().unwrap_or_default();
        info!(session = %req.session_id, role = req.role.as_str(),
            origin = %hatch_proto::logtext::peer(origin, 200),
            "stream upgrade from a page of a foreign origin refused");
        cancel();
        return refuse(shard, conn, r).await;
    }
    let claims = match shard.verifier.verify(&req.token, &req.session_id, req.role, now_secs()) {
        Ok(c) => c,
        Err(err) => {
            warn!(session = %req.session_id, role = req.role.as_str(), reason = err.label(), "token refused");
            let r = match err {
                TokenError::Expired => Refusal::TokenExpired,
                // Its session was closed when this relay started: as used as a token gets.
                TokenError::PreviousRun => Refusal::TokenAlreadyUsed,
                _ => Refusal::InvalidToken,
            };
            cancel();
            return refuse(shard, conn, r).await;
        }
    };
    let adm = Admission {
        sid: req.session_id,
        role: req.role,
        jti: claims.jti,
        exp: claims.exp,
        resume: claims.res,
        two_way: claims.two_way,
        limits: crate::data::session::SessionLimits {
            idle_timeout: claims.idle.map(Duration::from_secs),
            max_duration: claims.maxd.map(Duration::from_secs),
        },
        accept: req.accept,
        hatch_v1: req.hatch_v1,
        recording: claims.rec.filter(|m| m.is_on()).map(|mode| RecordTerms {
            mode,
            account: claims.account,
            instance: claims.instance,
            principal: claims.prn.unwrap_or_default(),
        }),
    };
    let owner = owner_of(&adm.sid, shard.peers.len());
    if owner == shard.id {
        return shard.admit(conn, adm, deadline);
    }
    cancel();
    // Hand over to the owner: no read is in flight (read_head returned), the deadline is
    // cancelled, and all ciphertext read so far is inside rustls.
    let peer = &shard.peers[owner];
    if peer.capacity() == 0 || conn.holds_cipher() {
        return refuse(shard, conn, Refusal::Unavailable).await;
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

async fn refuse<S: Stream>(shard: Rc<Shard<S>>, conn: Rc<Conn<S>>, r: Refusal) {
    shard.metrics.refused(r.label());
    debug!(shard = shard.id, status = r.parts().0, code = r.parts().2, "upgrade refused");
    shard.deadline(&conn, CLOSE_LINGER);
    let _ = conn.write_small(&r.response()).await;
    conn.finish().await;
    conn.drain().await;
}

/// The `101` of a leg being admitted, and its handshake deadline (which lasts until the 101
/// is written).
struct Upgrade {
    response: Vec<u8>,
    deadline: u64,
    /// The leg's token says the session is recorded: its recording starts (or, for a resume
    /// token, continues) when the leg is accepted.
    recording: Option<RecordTerms>,
    resume: bool,
}

/// Writes the `101` of an admitted leg (within the handshake deadline) and tells the table.
async fn accept<S: Stream>(
    shard: Rc<Shard<S>>,
    key: Key,
    leg: Leg,
    conn: Rc<Conn<S>>,
    up: Upgrade,
) {
    let r = conn.write_small(&up.response).await;
    shard.deadlines.borrow_mut().cancel(up.deadline);
    if let Err(err) = &r {
        debug!(shard = shard.id, %err, "101 not delivered");
    }
    shard.feed(|t, now| t.handle_upgraded(now, key, leg, r.is_ok()));
}

/// A leg of a terminated session: `101`, then the terminate code (so its client says why).
async fn accept_and_close<S: Stream>(
    shard: Rc<Shard<S>>,
    conn: Rc<Conn<S>>,
    up: Upgrade,
    code: CloseCode,
) {
    let r = conn.write_small(&up.response).await;
    shard.deadlines.borrow_mut().cancel(up.deadline);
    if r.is_ok() {
        pump::close_leg(shard, conn, Some(code)).await;
    }
}

/// Notices a waiting leg whose peer hangs up before the other leg arrives, so the session ends
/// as lost by that side at once instead of at the pair timeout. Reads nothing: the bytes the
/// leg sent meanwhile stay in the socket for the pump.
async fn watch_waiting<S: Stream>(shard: Rc<Shard<S>>, key: Key, leg: Leg, conn: Rc<Conn<S>>) {
    let waiting = || shard.table.borrow().is_waiting(key);
    loop {
        let gone = conn.io.hung_up(waiting).await;
        if !waiting() {
            return;
        }
        if gone {
            debug!(shard = shard.id, leg = leg.as_str(), "waiting leg hung up");
            return shard.feed(|t, now| t.handle_leg_closed(now, key, leg, LegEnd::Lost));
        }
    }
}

impl<S: Stream> Shard<S> {
    fn conn(&self, io: S, tls: Option<UnbufferedServerConnection>, pending: Vec<u8>) -> Conn<S> {
        Conn::new(io, tls, self.pool.clone(), pending, self.open.clone())
    }

    /// Shuts `conn` down `after` from now unless the returned deadline is cancelled first.
    fn deadline(&self, conn: &Rc<Conn<S>>, after: Duration) -> u64 {
        let id = self.deadlines.borrow_mut().arm(conn, now() + after);
        self.check_timer();
        id
    }

    /// The earliest of the table's and the sockets' deadlines.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        let table = self.table.borrow().poll_timeout();
        let socket = self.deadlines.borrow_mut().next();
        [table, socket].into_iter().flatten().min()
    }

    /// Wakes the driver if a deadline earlier than its timer appeared.
    fn check_timer(&self) {
        let next = self.table.borrow().poll_timeout();
        let socket = self.deadlines.borrow().heap.peek().map(|Reverse((t, _))| *t);
        let Some(next) = [next, socket].into_iter().flatten().min() else { return };
        if self.armed.get().is_none_or(|armed| next < armed) {
            // Set now, so that a burst of earlier deadlines wakes the driver once.
            self.armed.set(Some(next));
            self.wake.notify_one();
        }
    }

    fn on_timer(self: &Rc<Self>) {
        let due = self.deadlines.borrow_mut().expire(now());
        for c in due {
            c.io.shutdown(Shutdown::Both);
        }
        self.feed(|t, now| t.handle_timeout(now));
    }

    /// A verified leg on its owner shard goes to the table.
    fn admit(self: &Rc<Self>, conn: Rc<Conn<S>>, adm: Admission, deadline: u64) {
        let input = Admit {
            leg: Leg::of_role(adm.role),
            // The token's expiry on the table's clock.
            expires: now() + Duration::from_secs(adm.exp.saturating_sub(now_secs())),
            sid: adm.sid,
            jti: TokenId::of(&adm.jti),
            resume: adm.resume,
            two_way: adm.two_way,
            limits: adm.limits,
        };
        // The 101 for this leg, should the table accept it (it answers at once, below).
        let response = upgrade::switching(&adm.accept, adm.hatch_v1);
        let mut answer =
            Some(Upgrade { response, deadline, recording: adm.recording, resume: adm.resume });
        self.feed_with(|t, now| t.handle_admit(now, input, conn), &mut answer);
    }

    /// Feeds one input to the table, then carries out what it queued.
    fn feed(
        self: &Rc<Self>,
        input: impl FnOnce(&mut SessionTable<Rc<Conn<S>>>, std::time::Instant),
    ) {
        self.feed_with(input, &mut None);
    }

    /// [`Shard::feed`] for an admission, with the `101` its acceptance writes.
    fn feed_with(
        self: &Rc<Self>,
        input: impl FnOnce(&mut SessionTable<Rc<Conn<S>>>, std::time::Instant),
        answer: &mut Option<Upgrade>,
    ) {
        input(&mut self.table.borrow_mut(), now());
        loop {
            let action = self.table.borrow_mut().poll_action();
            let Some(action) = action else { break };
            self.carry_out(action, answer);
        }
        let live = self.table.borrow().len() as u64;
        self.metrics.sessions.store(live, std::sync::atomic::Ordering::Relaxed);
        self.check_timer();
    }

    fn carry_out(self: &Rc<Self>, action: Action<Rc<Conn<S>>>, answer: &mut Option<Upgrade>) {
        use tokio::task::spawn_local;
        match action {
            Action::Refuse { handle, refusal } => {
                if let Some(up) = answer.take() {
                    self.deadlines.borrow_mut().cancel(up.deadline);
                }
                spawn_local(refuse(self.clone(), handle, refusal));
            }
            Action::Accept { key, leg, handle } => match answer.take() {
                Some(mut a) => {
                    if let Some(terms) = a.recording.take() {
                        self.start_recording(key, terms, a.resume);
                    }
                    drop(spawn_local(accept(self.clone(), key, leg, handle, a)));
                }
                // Only an admission queues an acceptance, and it comes with its answer.
                None => warn!(shard = self.id, "acceptance without an answer"),
            },
            Action::AcceptAndClose { handle, code } => match answer.take() {
                Some(a) => drop(spawn_local(accept_and_close(self.clone(), handle, a, code))),
                None => warn!(shard = self.id, "acceptance without an answer"),
            },
            Action::Watch { key, leg, handle } => {
                spawn_local(watch_waiting(self.clone(), key, leg, handle));
            }
            Action::StartPumps { key, client, agent } => {
                ShardMetrics::add(&self.metrics.paired, 1);
                pump::start(self, key, client, agent);
            }
            Action::Ping { handle } => {
                // One ping owed at a time: a leg that sends now and then but does not read
                // cannot make writers pile up behind its write gate.
                if handle.owe_ping() {
                    spawn_local(async move {
                        let _ = handle.flush_owed().await;
                    });
                }
            }
            Action::Close { handle, code } => {
                spawn_local(pump::close_leg(self.clone(), handle, code));
            }
            Action::Report(r) => {
                let event = match r {
                    Report::Connected { sid } => {
                        DataEvent::Connected { session_id: sid, at: SystemTime::now() }
                    }
                    Report::Detached { sid } => {
                        DataEvent::Detached { session_id: sid, at: SystemTime::now() }
                    }
                    Report::Resumed { sid } => {
                        DataEvent::Resumed { session_id: sid, at: SystemTime::now() }
                    }
                    Report::Progress { sid, bytes } => DataEvent::Progress {
                        session_id: sid,
                        bytes_client_to_agent: bytes[0],
                        bytes_agent_to_client: bytes[1],
                    },
                    Report::Ended(end) => {
                        self.end_recording(&end.session_id, end.reason);
                        DataEvent::Ended(end)
                    }
                };
                let _ = self.events.send(event);
            }
            Action::Drained => {
                self.drained.set(true);
                self.wake.notify_one();
            }
        }
    }
}

impl<S: Stream> Shard<S> {
    /// Starts the recording of an accepted leg's session, unless it has one (the other leg's,
    /// or one kept across a detach); a resume token for a session this shard does not record
    /// (a relay restart) continues the file. When it cannot start, the session ends (4018)
    /// once the acceptance is under way.
    fn start_recording(self: &Rc<Self>, key: Key, terms: RecordTerms, resume: bool) {
        let Some(sid) = self.table.borrow().sid(key).map(str::to_owned) else { return };
        if self.recordings.borrow().contains_key(&sid) {
            return;
        }
        let started = match &self.recorder {
            None => Err("no recorder (the recording directory could not be used)".to_owned()),
            Some(r) if resume => {
                let unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                r.resume(&sid, None, unix_ms, now()).map_err(|e| e.to_string())
            }
            Some(r) => {
                let header = Header {
                    session_id: sid.clone(),
                    account: terms.account,
                    instance: terms.instance,
                    principal: terms.principal,
                    start_unix_ms: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    cols: RECORDING_START_SIZE.0,
                    rows: RECORDING_START_SIZE.1,
                };
                r.start(&header, now()).map_err(|e| e.to_string())
            }
        };
        match started {
            Ok(handle) => {
                debug!(session = %sid, mode = terms.mode.as_str(), resume, "recording started");
                let rec = Rc::new(Recording::new(handle, terms.mode));
                self.recordings.borrow_mut().insert(sid, rec);
            }
            Err(err) => {
                warn!(session = %sid, %err, "recording cannot start; ending the session (4018)");
                let shard = self.clone();
                // After the actions being carried out (this leg's acceptance among them).
                tokio::task::spawn_local(async move {
                    shard.feed(|t, now| t.handle_recording_failed(now, &sid));
                });
            }
        }
    }

    /// The session ended: its recording is finished (or, when the session outlives a relay
    /// shutdown, suspended for the next relay) once its pumps let go of it.
    fn end_recording(&self, sid: &str, reason: CloseReason) {
        let Some(rec) = self.recordings.borrow_mut().remove(sid) else { return };
        if reason == CloseReason::RelayShutdown && self.cfg.resume_window.is_some() {
            rec.suspend();
        } else {
            rec.finish_at(now());
        }
    }
}

impl<S: Stream> pump::Host for Rc<Shard<S>> {
    type S = S;

    fn metrics(&self) -> &ShardMetrics {
        &self.metrics
    }

    fn max_payload(&self) -> u64 {
        self.cfg.max_payload
    }

    fn live(&self, key: Key) -> bool {
        self.table.borrow().is_live(key)
    }

    fn sid(&self, key: Key) -> String {
        self.table.borrow().sid(key).unwrap_or("(ended)").to_owned()
    }

    fn bytes(&self, now: std::time::Instant, key: Key, leg: Leg, payload: u64) {
        if self.table.borrow_mut().handle_bytes(now, key, leg, payload) {
            self.check_timer();
        }
    }

    fn leg_ended(&self, key: Key, leg: Leg, how: LegEnd) {
        self.feed(|t, now| t.handle_leg_closed(now, key, leg, how));
    }

    fn shutdown_at(&self, conn: &Rc<Conn<S>>, at: Instant) {
        self.deadlines.borrow_mut().arm(conn, at.into_std());
        self.check_timer();
    }

    fn recording(&self, key: Key) -> Option<Rc<Recording>> {
        let recordings = self.recordings.borrow();
        if recordings.is_empty() {
            return None;
        }
        let table = self.table.borrow();
        recordings.get(table.sid(key)?).cloned()
    }

    fn recording_failed(&self, key: Key, err: &PushError) {
        let Some(sid) = self.table.borrow().sid(key).map(str::to_owned) else { return };
        warn!(session = %sid, %err, "recording failed; ending the session (4018)");
        self.feed(|t, now| t.handle_recording_failed(now, &sid));
    }
}
