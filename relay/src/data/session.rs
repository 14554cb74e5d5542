//! The session table: every rule of a session's life on its owner shard, as a pure state
//! machine.
//!
//! No sockets, no clock, no tasks: the shard (the driver) feeds in what happened — a leg
//! admitted, its `101` written, bytes read, a leg closed, a terminate command, the time — and
//! carries out the [`Action`]s the table queues, then arms one timer at
//! [`SessionTable::poll_timeout`]. The table is generic over the leg handle `H` the driver
//! gives it (the shard's `Rc` of a connection; a number in the tests) and hands it back in
//! the actions that concern that leg.
//!
//! ```text
//!            admit ─▶ Upgrading ─(101 written)─▶ Ready ─┐ both Ready
//!                                                       ▼
//!   (pair timeout 4004)  Waiting ──────────────────▶ Paired ──▶ pumps, pings, progress
//!        │                  │                        │   ▲
//!        │                  │    a leg lost (no close │   │ both legs back with
//!        │                  │    frame, dead leg),    ▼   │ resume tokens
//!        │                  │    resume window on:  Detached ──(window over)──┐
//!        └──── any leg closed, terminate, idle 4007, max 4008, 4009 ──────────┴─▶ Ended
//! ```
//!
//! A detached session has no legs: the lost one is closed without a close frame, the other
//! with 4015 (the other side is reconnecting), and both sides put up new legs with resume
//! tokens (`res` claim). It keeps its slot and counts under a new [`Key`], so that the old
//! pumps see their session gone and stop. A resume token for a session the table does not
//! know (the relay restarted) creates it detached; a resume token for a role whose leg is
//! present displaces that leg (4014: the client attached elsewhere; an agent's new leg
//! replaces one it has given up on), and the session detaches and re-pairs. With the window
//! on, a relay shutting down closes paired and detached sessions with 4009 and keeps them
//! out of the store's closed records (they resume on the next relay); they leave the table
//! without an end.
//!
//! An ended session leaves the table at once; what outlives it is in two sets the table also
//! owns: the used token ids (a token opens one leg, ever, until it expires) and the terminated
//! sessions (a later leg is answered `101` and closed with the terminate code, so its client
//! learns why).
//!
//! Deadlines live in a binary heap keyed by time, one entry per session at the earliest of
//! its deadlines (pair timeout, maximum duration, idle timeout, a leg's ping or death, the
//! next progress report). Bytes arriving move deadlines *later* without touching the heap:
//! when an entry comes due, the session is checked and re-armed at its real next deadline
//! ("lazy" timers, as TCP keepalive does). So the work per tick is the sessions due, never a
//! walk over all of them, and the hot path ([`SessionTable::handle_bytes`]) is a slab lookup
//! and a few stores.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::num::NonZeroU64;
use std::ops::Add;
use std::time::{Duration, Instant};

use hatch_proto::close;
use slab::Slab;
use tracing::{debug, info, warn};

use super::upgrade::Refusal;
use crate::plane::{CloseReason, SessionEnd};

/// How often a live session's changed byte counts are reported ([`Report::Progress`]), at
/// most: a relay killed without warning loses at most this much of each session's counts;
/// shorter means more store writes for busy sessions (one row update per changed session per
/// period, never per frame).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// The grain of session deadlines ([`Rules::grain`]).
pub const TIMER_GRAIN: Duration = Duration::from_millis(100);

/// How long after its first due entry the table purges the used-token and terminated sets:
/// one wake-up then removes every entry that expired meanwhile, instead of one per entry. An
/// entry kept this much longer refuses nothing more (its token has expired by then).
pub const PURGE_SLACK: Duration = Duration::from_secs(5);

/// A time inside the table: nanoseconds since the first time it was given, plus one (so that
/// `Option<Tick>` is one word). Half the size of an `Instant`, which matters where one is kept
/// per session or per heap entry (memory per idle session, ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Tick(NonZeroU64);

impl Tick {
    fn saturating_duration_since(self, earlier: Tick) -> Duration {
        Duration::from_nanos(self.0.get().saturating_sub(earlier.0.get()))
    }

    /// The first multiple of `grain` (counted from the epoch) at or after this time.
    fn ceil_to(self, grain: Duration) -> Tick {
        let g = u64::try_from(grain.as_nanos()).unwrap_or(u64::MAX).max(1);
        let n = self.0.get() - 1;
        Tick(NonZeroU64::MIN.saturating_add(n.div_ceil(g).saturating_mul(g)))
    }
}

impl Add<Duration> for Tick {
    type Output = Tick;

    fn add(self, d: Duration) -> Tick {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Tick(self.0.saturating_add(nanos))
    }
}

/// Which side of a session a leg is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    /// The `hatch` client (or a browser).
    Client,
    /// The agent.
    Agent,
}

impl Leg {
    /// Both legs, client first.
    pub const BOTH: [Leg; 2] = [Leg::Client, Leg::Agent];

    /// The other leg of the session.
    pub fn other(self) -> Leg {
        match self {
            Leg::Client => Leg::Agent,
            Leg::Agent => Leg::Client,
        }
    }

    /// Index into per-leg arrays (client 0, agent 1).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in logs and in the token's role.
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Client => "client",
            Leg::Agent => "agent",
        }
    }

    /// The leg a token's role opens.
    pub fn of_role(role: hatch_proto::token::Role) -> Leg {
        match role {
            hatch_proto::token::Role::Client => Leg::Client,
            hatch_proto::token::Role::Agent => Leg::Agent,
        }
    }
}

/// A WebSocket close code the relay may put in a close frame: valid on the wire by
/// construction (RFC 6455 §7.4), so no path can send 1005 or 1006.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(u16);

impl CloseCode {
    /// 1000: normal closure.
    pub const NORMAL: CloseCode = CloseCode(close::NORMAL);
    /// 1002: the leg broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(close::PROTOCOL_ERROR);
    /// 1007: a text payload that was not UTF-8.
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(close::INVALID_PAYLOAD);
    /// 4004: the other leg never came.
    pub const PEER_NEVER_CAME: CloseCode = CloseCode(close::PEER_NEVER_CAME);
    /// 4005: the other leg went away.
    pub const PEER_GONE: CloseCode = CloseCode(close::PEER_GONE);
    /// 4007: no client input for the idle timeout.
    pub const IDLE_TIMEOUT: CloseCode = CloseCode(close::IDLE_TIMEOUT);
    /// 4008: the maximum session duration.
    pub const MAX_DURATION: CloseCode = CloseCode(close::MAX_DURATION);
    /// 4009: the relay is shutting down.
    pub const RELAY_SHUTDOWN: CloseCode = CloseCode(close::RELAY_SHUTDOWN);
    /// 4014: another leg of this role took the session over.
    pub const ATTACHED_ELSEWHERE: CloseCode = CloseCode(close::ATTACHED_ELSEWHERE);
    /// 4015: the other leg was lost; resume.
    pub const PEER_RESUMING: CloseCode = CloseCode(close::PEER_RESUMING);
    /// 4018: the session's recording could not be written.
    pub const RECORDING_FAILED: CloseCode = CloseCode(close::RECORDING_FAILED);

    /// The code, if it may appear on the wire.
    pub fn new(code: u16) -> Option<CloseCode> {
        close::is_valid_on_wire(code).then_some(CloseCode(code))
    }

    /// The code a peer's frame violation calls for (1002 where the decoder named none that
    /// may be sent).
    pub fn violation(code: u16) -> CloseCode {
        CloseCode::new(code).unwrap_or(CloseCode::PROTOCOL_ERROR)
    }

    /// The numeric code.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// How a leg ended, as its pump (or the watcher of a waiting leg) saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegEnd {
    /// It sent a close frame with this code (1000 when the frame carried none); both legs get
    /// the code.
    Closed(CloseCode),
    /// It sent a close frame the relay could not parse; it gets `code`, the other leg 4005.
    BadClose(CloseCode),
    /// It broke the WebSocket protocol; it gets `code`, the other leg 4005.
    Violation(CloseCode),
    /// It went away without a close frame: end of stream, a failed read or write, or a
    /// hang-up while it waited for its peer. The other leg gets 4005.
    Lost,
    /// Its peer sent what the relay's TLS layer refuses (a record not under the session's
    /// key, an oversized record): a hostile or broken peer, not a lost one. It gets no close
    /// frame (its TLS has failed), the other leg 4005, and the session ends as an error.
    PeerFault,
}

/// The timing rules the table enforces (from the data plane's configuration).
#[derive(Debug, Clone)]
pub struct Rules {
    /// How long the first leg waits for the other (4004).
    pub pair_timeout: Duration,
    /// No client → agent data for this long ends the session (4007).
    pub idle_timeout: Option<Duration>,
    /// Longest session, counted from pairing (4008).
    pub max_duration: Option<Duration>,
    /// A leg silent this long is pinged (once, until it sends again).
    pub ping_interval: Duration,
    /// A leg silent this long is dead: the session ends as lost by that side.
    pub dead_after: Duration,
    /// How long after its first uncounted bytes a live session's counts are reported.
    pub progress_interval: Duration,
    /// How long a terminated session's later legs are refused (a token's lifetime).
    pub terminated_for: Duration,
    /// Session deadlines are rounded up to a multiple of this, so that sessions due at nearly
    /// the same time wake the shard once (a rule fires at most this much late).
    pub grain: Duration,
    /// How long a paired session that lost a leg waits for both legs to come back; `None`: a
    /// lost leg ends it.
    pub resume_window: Option<Duration>,
}

impl Rules {
    /// The rules of a data plane configuration.
    pub fn of(cfg: &super::DataConfig) -> Rules {
        Rules {
            pair_timeout: cfg.pair_timeout,
            idle_timeout: cfg.idle_timeout,
            max_duration: cfg.max_duration,
            ping_interval: cfg.ping_interval,
            dead_after: cfg.dead_after,
            progress_interval: PROGRESS_INTERVAL,
            terminated_for: Duration::from_secs(hatch_proto::token::TOKEN_LIFETIME_SECS),
            grain: TIMER_GRAIN,
            resume_window: cfg.resume_window,
        }
    }
}

/// A leg whose token verified, asking to join its session.
#[derive(Debug, Clone)]
pub struct Admit {
    /// Session id.
    pub sid: String,
    /// Which leg the token opens.
    pub leg: Leg,
    /// The token's id (single use).
    pub jti: TokenId,
    /// When the token expires (its id is remembered until then).
    pub expires: Instant,
    /// A resume token: a new leg of a session that was paired before.
    pub resume: bool,
    /// A port session's token: the idle timeout counts data in both directions.
    pub two_way: bool,
    /// The account's session preferences, signed into the token: they can only tighten the
    /// relay's [`Rules`] (the earlier deadline wins).
    pub limits: SessionLimits,
}

/// An idle timeout and a longest duration; `None`: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// No client input (no data either way for a port session) this long: 4007.
    pub idle_timeout: Option<Duration>,
    /// This long after the first pairing: 4008.
    pub max_duration: Option<Duration>,
}

impl SessionLimits {
    /// The tighter of both, limit by limit.
    pub fn tighter(self, other: SessionLimits) -> SessionLimits {
        let min = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        SessionLimits {
            idle_timeout: min(self.idle_timeout, other.idle_timeout),
            max_duration: min(self.max_duration, other.max_duration),
        }
    }
}

/// A session's place in the table. Stale keys (the session ended, its slot reused) are
/// ignored by every `handle_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    slot: u32,
    generation: u32,
}

/// What the table reports to the control plane (the driver adds wall-clock times).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Both legs are in.
    Connected {
        /// Session id.
        sid: String,
    },
    /// The session lost its legs and waits for both to come back (or the relay is stopping
    /// with it paired: it resumes on the next relay).
    Detached {
        /// Session id.
        sid: String,
    },
    /// A detached session has both legs again.
    Resumed {
        /// Session id.
        sid: String,
    },
    /// A live session's byte counts changed since the last report.
    Progress {
        /// Session id.
        sid: String,
        /// Payload bytes client → agent, agent → client.
        bytes: [u64; 2],
    },
    /// The session ended (exactly once per session).
    Ended(SessionEnd),
}

/// Something the driver must do.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Action<H> {
    /// Answer the upgrade with this refusal and close the connection.
    Refuse {
        /// The leg.
        handle: H,
        /// Why.
        refusal: Refusal,
    },
    /// Answer `101`, then report [`SessionTable::handle_upgraded`].
    Accept {
        /// The session.
        key: Key,
        /// Which leg.
        leg: Leg,
        /// The leg.
        handle: H,
    },
    /// Answer `101` and close at once with `code`: a leg of a terminated session.
    AcceptAndClose {
        /// The leg.
        handle: H,
        /// The terminate code.
        code: CloseCode,
    },
    /// Watch a leg waiting for its peer for a hang-up, without reading it; report it with
    /// [`SessionTable::handle_leg_closed`] and [`LegEnd::Lost`]. Stop once
    /// [`SessionTable::is_waiting`] no longer holds.
    Watch {
        /// The session.
        key: Key,
        /// Which leg.
        leg: Leg,
        /// The leg.
        handle: H,
    },
    /// Both legs are in: start one pump per direction.
    StartPumps {
        /// The session.
        key: Key,
        /// The client leg.
        client: H,
        /// The agent leg.
        agent: H,
    },
    /// Send the leg a keepalive ping.
    Ping {
        /// The leg.
        handle: H,
    },
    /// Close the leg: a close frame with `code` (none: the leg went away), then close_notify
    /// and FIN. The table has let go of the leg.
    Close {
        /// The leg.
        handle: H,
        /// The close frame's code.
        code: Option<CloseCode>,
    },
    /// Tell the control plane.
    Report(Report),
    /// Shutting down, and the last session has ended.
    Drained,
}

#[derive(Debug)]
struct Slot<H> {
    handle: Option<H>,
    /// Its `101` was written.
    ready: bool,
    /// Last time anything arrived on it.
    last_rx: Tick,
    /// A keepalive ping was sent and nothing arrived since.
    pinged: bool,
}

impl<H> Slot<H> {
    fn empty(now: Tick) -> Self {
        Slot { handle: None, ready: false, last_rx: now, pinged: false }
    }
}

#[derive(Debug)]
struct Session<H> {
    sid: String,
    generation: u32,
    created: Tick,
    paired: Option<Tick>,
    /// When it first paired (the maximum duration counts from here, across resumes).
    first_paired: Option<Tick>,
    /// Detached: since when, and how it ends if the window passes without both legs back.
    detached: Option<(Tick, Ending)>,
    legs: [Slot<H>; 2],
    /// Payload bytes read from each leg (client → agent, agent → client).
    bytes: [u64; 2],
    /// `bytes` as last reported.
    reported: [u64; 2],
    /// Last client → agent data, or data either way for a port session (the idle timeout's
    /// clock).
    last_c2a: Tick,
    /// A port session (a token said so): data from the agent resets the idle clock too.
    two_way: bool,
    /// The relay's limits, tightened by its tokens' (the account's preferences).
    limits: SessionLimits,
    /// When uncounted bytes are due to be reported.
    progress_due: Option<Tick>,
    /// The time of this session's live entry in the heap.
    armed: Option<Tick>,
}

/// Why a session ends, and the code (if any) each leg's close frame carries.
#[derive(Debug, Clone, Copy)]
struct Ending {
    reason: CloseReason,
    codes: [Option<CloseCode>; 2],
}

impl Ending {
    fn both(reason: CloseReason, code: CloseCode) -> Self {
        Ending { reason, codes: [Some(code); 2] }
    }

    /// `leg` ended as `how`.
    fn of_leg(leg: Leg, how: LegEnd) -> Self {
        let mut codes = [None, None];
        let reason = match how {
            LegEnd::Closed(code) => {
                codes = [Some(code); 2];
                closed_reason(leg, code)
            }
            LegEnd::BadClose(code) | LegEnd::Violation(code) => {
                codes[leg.index()] = Some(code);
                codes[leg.other().index()] = Some(CloseCode::PEER_GONE);
                CloseReason::Error
            }
            LegEnd::PeerFault => {
                codes[leg.other().index()] = Some(CloseCode::PEER_GONE);
                CloseReason::Error
            }
            LegEnd::Lost => {
                codes[leg.other().index()] = Some(CloseCode::PEER_GONE);
                match leg {
                    Leg::Client => CloseReason::ClientLost,
                    Leg::Agent => CloseReason::AgentLost,
                }
            }
        };
        Ending { reason, codes }
    }
}

/// The reason recorded when `leg` closes first with `code`: the agent's 1000 is the exit, its
/// 1008 and 1011 a session it refused or could not start (after an ERROR message).
fn closed_reason(leg: Leg, code: CloseCode) -> CloseReason {
    match (leg, code.get()) {
        (Leg::Client, _) => CloseReason::ClientClosed,
        (Leg::Agent, close::NORMAL) => CloseReason::Exit,
        (
            Leg::Agent,
            close::POLICY_VIOLATION | close::INTERNAL_ERROR | close::RUN_AS_UNAVAILABLE,
        ) => CloseReason::Error,
        (Leg::Agent, _) => CloseReason::AgentClosed,
    }
}

/// A token's id, as the single-use set keeps it: 16 bytes, no allocation. Our tokens' ids are
/// 32 hex digits (16 random bytes), taken as they are; any other id (none is issued) is
/// reduced to the first 16 bytes of its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId(u128);

impl TokenId {
    /// The id of a token whose `jti` claim is `jti`.
    pub fn of(jti: &str) -> TokenId {
        // Lowercase hex only, as issued: `from_str_radix` alone would also take a sign or
        // upper case, so two different ids could map to one.
        if jti.len() == 32
            && jti.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && let Ok(n) = u128::from_str_radix(jti, 16)
        {
            return TokenId(n);
        }
        let d = ring::digest::digest(&ring::digest::SHA256, jti.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d.as_ref()[..16]);
        TokenId(u128::from_be_bytes(b))
    }
}

/// The sessions of one shard (see the module docs).
#[derive(Debug)]
pub struct SessionTable<H> {
    rules: Rules,
    sessions: Slab<Session<H>>,
    index: HashMap<String, usize>,
    next_generation: u32,
    /// Session deadlines (lazy: an entry whose time is not its session's `armed` is stale).
    timers: BinaryHeap<Reverse<(Tick, Key)>>,
    /// Used token ids and until when they are kept.
    used: HashMap<TokenId, Tick>,
    used_expiries: BinaryHeap<Reverse<(Tick, TokenId)>>,
    /// Terminated sessions: the code later legs get, and until when.
    terminated: HashMap<String, (CloseCode, Tick)>,
    terminated_expiries: BinaryHeap<Reverse<(Tick, String)>>,
    /// Shutting down: the end of the drain period, once it has not yet passed.
    drain_until: Option<Tick>,
    /// What `Tick` counts from: the first time the table was given.
    epoch: Option<Instant>,
    stopping: bool,
    drained: bool,
    actions: VecDeque<Action<H>>,
}

impl<H: Clone> SessionTable<H> {
    /// An empty table enforcing `rules`.
    pub fn new(rules: Rules) -> Self {
        SessionTable {
            rules,
            sessions: Slab::new(),
            index: HashMap::new(),
            next_generation: 0,
            timers: BinaryHeap::new(),
            used: HashMap::new(),
            used_expiries: BinaryHeap::new(),
            terminated: HashMap::new(),
            terminated_expiries: BinaryHeap::new(),
            drain_until: None,
            epoch: None,
            stopping: false,
            drained: false,
            actions: VecDeque::new(),
        }
    }

    /// Live sessions (waiting or paired).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Whether the session is live.
    pub fn is_live(&self, key: Key) -> bool {
        self.get(key).is_some()
    }

    /// Whether the session is live and still waiting for a leg.
    pub fn is_waiting(&self, key: Key) -> bool {
        self.get(key).is_some_and(|s| s.paired.is_none())
    }

    /// The session's id, while it lives.
    pub fn sid(&self, key: Key) -> Option<&str> {
        self.get(key).map(|s| s.sid.as_str())
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action<H>> {
        self.actions.pop_front()
    }

    /// When [`SessionTable::handle_timeout`] must next be called, if ever. May be early (a
    /// deadline that activity has moved): then the call finds nothing due and re-arms.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let session = self.timers.peek().map(|Reverse((t, _))| *t);
        let used = self.used_expiries.peek().map(|Reverse((t, _))| *t + PURGE_SLACK);
        let terminated = self.terminated_expiries.peek().map(|Reverse((t, _))| *t + PURGE_SLACK);
        let next = [session, used, terminated, self.drain_until].into_iter().flatten().min()?;
        Some(self.epoch? + Duration::from_nanos(next.0.get() - 1))
    }

    /// A leg with a verified token asks to join its session.
    pub fn handle_admit(&mut self, now: Instant, adm: Admit, handle: H) {
        let now = self.tick(now);
        if self.stopping {
            return self
                .actions
                .push_back(Action::Refuse { handle, refusal: Refusal::Unavailable });
        }
        if self.used.contains_key(&adm.jti) {
            warn!(session = %adm.sid, role = adm.leg.as_str(), "token replayed");
            return self
                .actions
                .push_back(Action::Refuse { handle, refusal: Refusal::TokenAlreadyUsed });
        }
        let keep = self.tick(adm.expires).max(now);
        self.used_expiries.push(Reverse((keep, adm.jti)));
        self.used.insert(adm.jti, keep);
        if let Some(&(code, _)) = self.terminated.get(&adm.sid) {
            debug!(session = %adm.sid, role = adm.leg.as_str(), "leg of a terminated session");
            return self.actions.push_back(Action::AcceptAndClose { handle, code });
        }
        let resumable = adm.resume && self.rules.resume_window.is_some();
        let key = match self.index.get(&adm.sid) {
            Some(&slot) => self.key_of(slot),
            None => {
                let key = self.create(now, adm.sid.clone());
                if resumable {
                    // A session this relay does not know, resumed: it was paired on a relay
                    // that stopped. It waits for both legs for the window, as if just detached.
                    let s = &mut self.sessions[key.slot as usize];
                    s.first_paired = Some(now);
                    let ending = Ending::both(CloseReason::RelayShutdown, CloseCode::PEER_GONE);
                    s.detached = Some((now, ending));
                    info!(session = %adm.sid, role = adm.leg.as_str(), "resuming a session of an earlier relay");
                    self.arm(key);
                }
                key
            }
        };
        let mut key = key;
        let occupied = self.sessions[key.slot as usize].legs[adm.leg.index()].handle.is_some();
        if occupied {
            if !resumable || self.sessions[key.slot as usize].first_paired.is_none() {
                warn!(session = %adm.sid, role = adm.leg.as_str(), "second leg for one role");
                return self
                    .actions
                    .push_back(Action::Refuse { handle, refusal: Refusal::TokenAlreadyUsed });
            }
            // A resume token for a role whose leg is here: that leg is given up on (the agent
            // lost it, or a client attached elsewhere with --force). It goes, 4014, and the
            // session re-pairs with the new one.
            info!(session = %adm.sid, role = adm.leg.as_str(), "leg displaced by a resume");
            let ending = Ending::of_leg(adm.leg, LegEnd::Lost);
            key = self.detach(now, key, ending, Some((adm.leg, CloseCode::ATTACHED_ELSEWHERE)));
        }
        let s = &mut self.sessions[key.slot as usize];
        // Signed by the control plane with the session: any leg's token may say it.
        s.two_way |= adm.two_way;
        s.limits = s.limits.tighter(adm.limits);
        let slot = &mut s.legs[adm.leg.index()];
        slot.handle = Some(handle.clone());
        slot.ready = false;
        self.actions.push_back(Action::Accept { key, leg: adm.leg, handle });
    }

    /// The `101` of an [`Action::Accept`] was written (`ok`) or failed.
    pub fn handle_upgraded(&mut self, now: Instant, key: Key, leg: Leg, ok: bool) {
        let now = self.tick(now);
        let Some(s) = live_mut(&mut self.sessions, key) else { return };
        if !ok {
            debug!(session = %s.sid, role = leg.as_str(), "101 not delivered");
            return self.leg_lost(now, key, leg);
        }
        let slot = &mut s.legs[leg.index()];
        slot.ready = true;
        slot.last_rx = now;
        debug!(session = %s.sid, role = leg.as_str(), "leg admitted");
        let [c, a] = &s.legs;
        match (c.ready, a.ready, &c.handle, &a.handle) {
            (true, true, Some(client), Some(agent)) => {
                s.paired = Some(now);
                s.first_paired.get_or_insert(now);
                s.last_c2a = now;
                let (client, agent) = (client.clone(), agent.clone());
                let sid = s.sid.clone();
                let report = if s.detached.take().is_some() {
                    info!(session = %s.sid, "session resumed");
                    Report::Resumed { sid }
                } else {
                    info!(session = %s.sid, "session paired");
                    Report::Connected { sid }
                };
                self.actions.push_back(Action::Report(report));
                self.actions.push_back(Action::StartPumps { key, client, agent });
                self.arm(key);
            }
            _ => {
                let handle = s.legs[leg.index()].handle.clone();
                if let Some(handle) = handle {
                    self.actions.push_back(Action::Watch { key, leg, handle });
                }
            }
        }
    }

    /// `payload` data bytes (and perhaps control frames) arrived on `leg` and went on. Any
    /// arrival is liveness; only client data resets the idle timeout. Queues no action (this
    /// is the hot path: a pump calls it once per read). Returns whether
    /// [`SessionTable::poll_timeout`] may have moved earlier (rarely: the first uncounted
    /// bytes, or an answer to a ping), so that the driver looks at its timer only then.
    pub fn handle_bytes(&mut self, now: Instant, key: Key, leg: Leg, payload: u64) -> bool {
        let now = self.tick(now);
        let interval = self.rules.progress_interval;
        let Some(s) = self.get_mut(key) else { return false };
        let slot = &mut s.legs[leg.index()];
        slot.last_rx = now;
        // A leg that answers a ping is due its next one sooner than its death was.
        let rearm = std::mem::take(&mut slot.pinged);
        if payload > 0 {
            s.bytes[leg.index()] += payload;
            if leg == Leg::Client || s.two_way {
                s.last_c2a = now;
            }
        }
        let first_uncounted = payload > 0 && s.progress_due.is_none();
        if first_uncounted {
            // Rounded up to the timer grain like every deadline: the sessions due in one grain
            // report together, so the control plane writes them in one store call (not one
            // per session, nor all sessions at once every interval, which stalls the shard).
            s.progress_due = Some(now + interval);
        }
        (first_uncounted || rearm) && self.arm(key)
    }

    /// `leg` ended as `how`: the session ends, or detaches when the leg was lost (no close
    /// frame) and resuming is on.
    pub fn handle_leg_closed(&mut self, now: Instant, key: Key, leg: Leg, how: LegEnd) {
        let now = self.tick(now);
        if let Some(s) = self.get(key) {
            debug!(session = %s.sid, role = leg.as_str(), ?how, "leg ended");
            if how == LegEnd::Lost {
                return self.leg_lost(now, key, leg);
            }
            self.end(now, key, Ending::of_leg(leg, how));
        }
    }

    /// `leg` is gone without a close frame: a paired session detaches (with the window on), a
    /// detached one forgets the leg that had come back, a waiting one ends.
    fn leg_lost(&mut self, now: Tick, key: Key, leg: Leg) {
        let Some(s) = self.get_mut(key) else { return };
        if s.detached.is_some() {
            debug!(session = %s.sid, role = leg.as_str(), "returning leg lost again; still detached");
            let slot = std::mem::replace(&mut s.legs[leg.index()], Slot::empty(now));
            if let Some(handle) = slot.handle {
                self.actions.push_back(Action::Close { handle, code: None });
            }
            return;
        }
        let ending = Ending::of_leg(leg, LegEnd::Lost);
        if s.paired.is_some() && self.rules.resume_window.is_some() {
            self.detach(now, key, ending, None);
        } else {
            self.end(now, key, ending);
        }
    }

    /// Detaches a session: its legs are closed (the lost one with `ending`'s code for it, or
    /// `displaced`'s code, the other with 4015) and it waits, under a new key, for both to come
    /// back until the window passes; then it ends as `ending` says. Returns the new key.
    fn detach(
        &mut self,
        now: Tick,
        key: Key,
        ending: Ending,
        displaced: Option<(Leg, CloseCode)>,
    ) -> Key {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let s = &mut self.sessions[key.slot as usize];
        let was_detached = s.detached.is_some();
        s.generation = generation;
        s.paired = None;
        s.armed = None;
        if !was_detached {
            s.detached = Some((now, ending));
        }
        let legs = std::mem::replace(&mut s.legs, [Slot::empty(now), Slot::empty(now)]);
        for (leg, slot) in Leg::BOTH.into_iter().zip(legs) {
            let Some(handle) = slot.handle else { continue };
            let code = match displaced {
                Some((l, code)) if l == leg => Some(code),
                // The lost leg gets no close frame (it is gone); the other is told to resume.
                _ if ending.codes[leg.index()].is_none() => None,
                _ => Some(CloseCode::PEER_RESUMING),
            };
            self.actions.push_back(Action::Close { handle, code });
        }
        if !was_detached {
            info!(session = %s.sid, reason = ending.reason.as_str(), "session detached");
            let sid = s.sid.clone();
            self.actions.push_back(Action::Report(Report::Detached { sid }));
        }
        let key = Key { slot: key.slot, generation };
        self.arm(key);
        key
    }

    /// The control plane ends the session with `code` (4006, 4010, 4012), and its later legs
    /// are answered with the same code while a token could still open one.
    pub fn handle_terminate(&mut self, now: Instant, sid: &str, code: CloseCode) {
        let now = self.tick(now);
        let until = now + self.rules.terminated_for;
        self.terminated.insert(sid.to_owned(), (code, until));
        self.terminated_expiries.push(Reverse((until, sid.to_owned())));
        if let Some(&slot) = self.index.get(sid) {
            info!(session = %sid, code = code.get(), "session terminated");
            let key = self.key_of(slot);
            self.end(now, key, Ending::both(CloseReason::Terminated, code));
        }
    }

    /// The recording of session `sid` failed (it could not be started, written or synced):
    /// the session ends at once with 4018 on both legs, recorded `recording_failed`. A
    /// recorded session never runs on unrecorded.
    pub fn handle_recording_failed(&mut self, now: Instant, sid: &str) {
        let now = self.tick(now);
        if let Some(&slot) = self.index.get(sid) {
            let key = self.key_of(slot);
            let ending = Ending::both(CloseReason::RecordingFailed, CloseCode::RECORDING_FAILED);
            self.end(now, key, ending);
        }
    }

    /// Stop admitting legs; let live sessions run for `drain`, then close them with 4009.
    pub fn handle_shutdown(&mut self, now: Instant, drain: Duration) {
        let now = self.tick(now);
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.drain_until = Some(now + drain);
        self.check_drained();
    }

    /// Time has passed: enforce every deadline due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.tick(now);
        while let Some(Reverse((t, key))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.get_mut(key) else { continue };
            if s.armed != Some(t) {
                continue;
            }
            s.armed = None;
            self.check(now, key);
        }
        // An id renewed since its entry was queued has a later entry of its own.
        while let Some(&Reverse((t, jti))) = self.used_expiries.peek() {
            if t > now {
                break;
            }
            self.used_expiries.pop();
            if self.used.get(&jti).is_some_and(|&until| until <= now) {
                self.used.remove(&jti);
            }
        }
        while let Some(Reverse((t, _))) = self.terminated_expiries.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, sid))) = self.terminated_expiries.pop() else { break };
            if self.terminated.get(&sid).is_some_and(|&(_, until)| until <= now) {
                self.terminated.remove(&sid);
            }
        }
        if let Some(until) = self.drain_until
            && now >= until
        {
            self.drain_until = None;
            let live: Vec<usize> = self.sessions.iter().map(|(slot, _)| slot).collect();
            for slot in live {
                let key = self.key_of(slot);
                let resumable = self.rules.resume_window.is_some()
                    && self.sessions[slot].first_paired.is_some();
                if resumable {
                    self.suspend(key);
                } else {
                    self.end(
                        now,
                        key,
                        Ending::both(CloseReason::RelayShutdown, CloseCode::RELAY_SHUTDOWN),
                    );
                }
            }
        }
    }

    /// `now` on the table's clock (the first time given starts it).
    fn tick(&mut self, now: Instant) -> Tick {
        let epoch = *self.epoch.get_or_insert(now);
        let nanos =
            u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX - 1);
        Tick(NonZeroU64::MIN.saturating_add(nanos))
    }

    fn create(&mut self, now: Tick, sid: String) -> Key {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let slot = self.sessions.insert(Session {
            sid: sid.clone(),
            generation,
            created: now,
            paired: None,
            first_paired: None,
            detached: None,
            legs: [Slot::empty(now), Slot::empty(now)],
            bytes: [0; 2],
            reported: [0; 2],
            last_c2a: now,
            two_way: false,
            limits: SessionLimits {
                idle_timeout: self.rules.idle_timeout,
                max_duration: self.rules.max_duration,
            },
            progress_due: None,
            armed: None,
        });
        self.index.insert(sid, slot);
        let key = Key { slot: slot as u32, generation };
        self.arm(key);
        key
    }

    fn key_of(&self, slot: usize) -> Key {
        Key { slot: slot as u32, generation: self.sessions[slot].generation }
    }

    fn get(&self, key: Key) -> Option<&Session<H>> {
        self.sessions.get(key.slot as usize).filter(|s| s.generation == key.generation)
    }

    fn get_mut(&mut self, key: Key) -> Option<&mut Session<H>> {
        live_mut(&mut self.sessions, key)
    }

    /// Makes sure the session's heap entry is no later than its next deadline.
    /// Returns whether it queued an earlier entry.
    fn arm(&mut self, key: Key) -> bool {
        let rules = &self.rules;
        let Some(s) = self.sessions.get_mut(key.slot as usize) else { return false };
        let Some(due) = next_deadline(s, rules) else { return false };
        let due = due.ceil_to(rules.grain);
        if s.armed.is_some_and(|t| due >= t) {
            return false;
        }
        s.armed = Some(due);
        self.timers.push(Reverse((due, key)));
        true
    }

    /// Enforces the session's rules at `now`, then re-arms it.
    fn check(&mut self, now: Tick, key: Key) {
        let rules = &self.rules;
        let Some(s) = live_mut(&mut self.sessions, key) else { return };
        if let Some((since, ending)) = s.detached {
            let window = rules.resume_window.unwrap_or_default();
            if now >= since + window {
                info!(session = %s.sid, "not resumed within the window");
                // Whichever leg came back learns that the other never did.
                let e = Ending { codes: [Some(CloseCode::PEER_GONE); 2], ..ending };
                return self.end(now, key, e);
            }
            if s.limits
                .max_duration
                .is_some_and(|max| s.first_paired.is_some_and(|p| now >= p + max))
            {
                let e = Ending::both(CloseReason::MaxDuration, CloseCode::MAX_DURATION);
                return self.end(now, key, e);
            }
            if let Some(report) = progress(s, now) {
                self.actions.push_back(report);
            }
            self.arm(key);
            return;
        }
        let Some(paired) = s.paired else {
            if now >= s.created + rules.pair_timeout {
                info!(session = %s.sid, "peer never came");
                let e = Ending::both(CloseReason::PairTimeout, CloseCode::PEER_NEVER_CAME);
                return self.end(now, key, e);
            }
            self.arm(key);
            return;
        };
        let first = s.first_paired.unwrap_or(paired);
        if s.limits.max_duration.is_some_and(|max| now >= first + max) {
            let e = Ending::both(CloseReason::MaxDuration, CloseCode::MAX_DURATION);
            return self.end(now, key, e);
        }
        if s.limits.idle_timeout.is_some_and(|idle| now >= s.last_c2a + idle) {
            let e = Ending::both(CloseReason::IdleTimeout, CloseCode::IDLE_TIMEOUT);
            return self.end(now, key, e);
        }
        for leg in Leg::BOTH {
            let slot = &mut s.legs[leg.index()];
            if now >= slot.last_rx + rules.dead_after {
                info!(session = %s.sid, role = leg.as_str(), "leg silent too long");
                return self.leg_lost(now, key, leg);
            }
            if now >= slot.last_rx + rules.ping_interval && !slot.pinged {
                slot.pinged = true;
                if let Some(handle) = slot.handle.clone() {
                    self.actions.push_back(Action::Ping { handle });
                }
            }
        }
        if let Some(report) = progress(s, now) {
            self.actions.push_back(report);
        }
        self.arm(key);
    }

    /// Ends a live session: it leaves the table, is reported, and each leg is closed.
    fn end(&mut self, now: Tick, key: Key, ending: Ending) {
        if self.get(key).is_none() {
            return;
        }
        let s = self.sessions.remove(key.slot as usize);
        self.index.remove(&s.sid);
        let start = s.first_paired.or(s.paired).unwrap_or(s.created);
        let end = SessionEnd {
            session_id: s.sid,
            reason: ending.reason,
            bytes_client_to_agent: s.bytes[0],
            bytes_agent_to_client: s.bytes[1],
            duration: now.saturating_duration_since(start),
        };
        info!(
            session = %end.session_id, reason = ending.reason.as_str(),
            c2a = end.bytes_client_to_agent, a2c = end.bytes_agent_to_client, "session ended"
        );
        self.actions.push_back(Action::Report(Report::Ended(end)));
        let [c, a] = s.legs;
        for (slot, code) in [c, a].into_iter().zip(ending.codes) {
            if let Some(handle) = slot.handle {
                self.actions.push_back(Action::Close { handle, code });
            }
        }
        self.check_drained();
    }

    /// The relay stops with this session paired or detached: its legs are closed with 4009
    /// (both sides resume on the next relay) and it leaves the table without an end, reported
    /// detached, so that the store keeps it resumable.
    fn suspend(&mut self, key: Key) {
        let s = self.sessions.remove(key.slot as usize);
        self.index.remove(&s.sid);
        info!(session = %s.sid, "session left for the next relay to resume");
        if s.detached.is_none() {
            self.actions.push_back(Action::Report(Report::Detached { sid: s.sid.clone() }));
        }
        if s.bytes != s.reported {
            let (sid, bytes) = (s.sid.clone(), s.bytes);
            self.actions.push_back(Action::Report(Report::Progress { sid, bytes }));
        }
        for slot in s.legs {
            if let Some(handle) = slot.handle {
                let code = Some(CloseCode::RELAY_SHUTDOWN);
                self.actions.push_back(Action::Close { handle, code });
            }
        }
        self.check_drained();
    }

    fn check_drained(&mut self) {
        if self.stopping && !self.drained && self.sessions.is_empty() {
            self.drained = true;
            self.drain_until = None;
            self.actions.push_back(Action::Drained);
        }
    }
}

/// The session at `key`, if it is still that session (a field borrow, so that the caller can
/// queue actions while it holds it).
fn live_mut<H>(sessions: &mut Slab<Session<H>>, key: Key) -> Option<&mut Session<H>> {
    sessions.get_mut(key.slot as usize).filter(|s| s.generation == key.generation)
}

/// The progress report due at `now`, if one is (the counts changed since the last).
fn progress<H>(s: &mut Session<H>, now: Tick) -> Option<Action<H>> {
    if s.progress_due.is_none_or(|t| now < t) {
        return None;
    }
    s.progress_due = None;
    if s.bytes == s.reported {
        return None;
    }
    s.reported = s.bytes;
    Some(Action::Report(Report::Progress { sid: s.sid.clone(), bytes: s.bytes }))
}

/// The earliest of a session's deadlines.
fn next_deadline<H>(s: &Session<H>, rules: &Rules) -> Option<Tick> {
    if let Some((since, _)) = s.detached {
        let window = since + rules.resume_window.unwrap_or_default();
        let max = s.limits.max_duration.zip(s.first_paired).map(|(d, p)| p + d);
        return [Some(window), max, s.progress_due].into_iter().flatten().min();
    }
    let Some(paired) = s.paired else { return Some(s.created + rules.pair_timeout) };
    let first = s.first_paired.unwrap_or(paired);
    let mut due = [
        s.limits.max_duration.map(|d| first + d),
        s.limits.idle_timeout.map(|d| s.last_c2a + d),
        s.progress_due,
    ]
    .into_iter()
    .flatten()
    .min();
    for slot in &s.legs {
        let mut t = slot.last_rx + rules.dead_after;
        if !slot.pinged {
            t = t.min(slot.last_rx + rules.ping_interval);
        }
        due = Some(due.map_or(t, |d| d.min(t)));
    }
    due
}

#[cfg(test)]
mod tests {
    //! Every rule in virtual time: `t0` plus offsets, no clock, no sleeping. Each test asserts
    //! the exact actions the driver would carry out. Handles are numbers: client legs 1, 3,
    //! ...; agent legs 2, 4, ....

    use super::*;

    const SECS: fn(u64) -> Duration = Duration::from_secs;

    fn rules() -> Rules {
        Rules {
            pair_timeout: SECS(10),
            idle_timeout: Some(SECS(100)),
            max_duration: None,
            ping_interval: SECS(30),
            dead_after: SECS(90),
            progress_interval: SECS(2),
            terminated_for: SECS(600),
            grain: Duration::from_millis(100),
            resume_window: None,
        }
    }

    struct Case {
        t: SessionTable<u32>,
        t0: Instant,
    }

    impl Case {
        fn new(rules: Rules) -> Case {
            Case { t: SessionTable::new(rules), t0: Instant::now() }
        }

        fn at(&self, secs: f64) -> Instant {
            self.t0 + Duration::from_secs_f64(secs)
        }

        fn actions(&mut self) -> Vec<Action<u32>> {
            std::iter::from_fn(|| self.t.poll_action()).collect()
        }

        fn admit(&mut self, secs: f64, sid: &str, leg: Leg, jti: &str, handle: u32) {
            self.admit_terms(secs, sid, leg, jti, handle, (false, false), Default::default());
        }

        /// Admits a leg with a resume token.
        fn admit_resume(&mut self, secs: f64, sid: &str, leg: Leg, jti: &str, handle: u32) {
            self.admit_terms(secs, sid, leg, jti, handle, (true, false), Default::default());
        }

        /// Admits a leg whose token has these resume/two-way flags and limits.
        #[allow(clippy::too_many_arguments)]
        fn admit_terms(
            &mut self,
            secs: f64,
            sid: &str,
            leg: Leg,
            jti: &str,
            handle: u32,
            (resume, two_way): (bool, bool),
            limits: SessionLimits,
        ) {
            let adm = Admit {
                sid: sid.into(),
                leg,
                jti: TokenId::of(jti),
                expires: self.at(secs) + SECS(600),
                resume,
                two_way,
                limits,
            };
            self.t.handle_admit(self.at(secs), adm, handle);
        }

        /// Admits a leg that the table must accept (one `Accept`, nothing else); its key.
        fn accept(&mut self, secs: f64, sid: &str, leg: Leg, jti: &str, handle: u32) -> Key {
            self.admit(secs, sid, leg, jti, handle);
            match self.actions().as_slice() {
                [Action::Accept { key, leg: l, handle: h }] if *l == leg && *h == handle => *key,
                a => panic!("{a:?}"),
            }
        }

        /// Admits and upgrades both legs at `secs`; returns the key.
        fn pair(&mut self, secs: f64, sid: &str, client: u32, agent: u32) -> Key {
            let key = self.accept(secs, sid, Leg::Client, &format!("{sid}-c"), client);
            self.t.handle_upgraded(self.at(secs), key, Leg::Client, true);
            self.admit(secs, sid, Leg::Agent, &format!("{sid}-a"), agent);
            self.t.handle_upgraded(self.at(secs), key, Leg::Agent, true);
            let a = self.actions();
            assert_eq!(a.len(), 4, "{a:?}");
            assert!(
                matches!(a[3], Action::StartPumps { client: c, agent: g, .. } if c == client && g == agent)
            );
            key
        }

        /// Runs the timer at `secs` and returns what it did.
        fn tick(&mut self, secs: f64) -> Vec<Action<u32>> {
            self.t.handle_timeout(self.at(secs));
            self.actions()
        }

        /// Runs the timer at every deadline it asks for up to `secs`, as the driver does.
        fn run_until(&mut self, secs: f64) -> Vec<Action<u32>> {
            let end = self.at(secs);
            let mut out = Vec::new();
            while let Some(t) = self.t.poll_timeout().filter(|&t| t <= end) {
                self.t.handle_timeout(t);
                out.extend(self.actions());
            }
            out
        }
    }

    fn ended(sid: &str, reason: CloseReason, c2a: u64, a2c: u64, secs: u64) -> Action<u32> {
        Action::Report(Report::Ended(SessionEnd {
            session_id: sid.into(),
            reason,
            bytes_client_to_agent: c2a,
            bytes_agent_to_client: a2c,
            duration: SECS(secs),
        }))
    }

    fn close(handle: u32, code: Option<CloseCode>) -> Action<u32> {
        Action::Close { handle, code }
    }

    #[test]
    fn token_ids_are_kept_as_16_bytes_and_never_confused() {
        let hex = "00112233445566778899aabbccddeeff";
        assert_eq!(TokenId::of(hex), TokenId(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff));
        // Other shapes are digested, so they cannot collide with a hex id by construction.
        assert_ne!(TokenId::of("x"), TokenId::of("y"));
        assert_ne!(TokenId::of(&hex.to_uppercase()[..31]), TokenId::of(&hex[..31]));
        assert_eq!(TokenId::of("abc"), TokenId::of("abc"));
        // Spellings of the same number are different ids.
        let plus = format!("+{}", &hex[1..]);
        assert_ne!(TokenId::of(&plus), TokenId::of(hex));
        assert_ne!(TokenId::of(&hex.to_uppercase()), TokenId::of(hex));
    }

    #[test]
    fn a_leg_alone_waits_then_gets_4004_at_the_pair_timeout() {
        let mut c = Case::new(rules());
        let key = c.accept(0.0, "s", Leg::Client, "j1", 1);
        c.t.handle_upgraded(c.at(0.0), key, Leg::Client, true);
        assert_eq!(c.actions(), [Action::Watch { key, leg: Leg::Client, handle: 1 }]);
        assert!(c.t.is_waiting(key));
        assert_eq!(c.t.poll_timeout(), Some(c.at(10.0)));
        assert_eq!(c.tick(9.999), []);
        assert_eq!(
            c.tick(10.0),
            [
                ended("s", CloseReason::PairTimeout, 0, 0, 10),
                close(1, Some(CloseCode::PEER_NEVER_CAME))
            ]
        );
        assert!(!c.t.is_live(key));
        assert!(c.t.is_empty());
    }

    #[test]
    fn the_second_leg_pairs_reports_and_starts_the_pumps() {
        let mut c = Case::new(rules());
        let key = c.accept(0.0, "s", Leg::Agent, "ja", 2);
        c.t.handle_upgraded(c.at(0.0), key, Leg::Agent, true);
        assert_eq!(c.actions(), [Action::Watch { key, leg: Leg::Agent, handle: 2 }]);
        c.admit(3.0, "s", Leg::Client, "jc", 1);
        assert_eq!(c.actions(), [Action::Accept { key, leg: Leg::Client, handle: 1 }]);
        c.t.handle_upgraded(c.at(3.0), key, Leg::Client, true);
        assert_eq!(
            c.actions(),
            [
                Action::Report(Report::Connected { sid: "s".into() }),
                Action::StartPumps { key, client: 1, agent: 2 }
            ]
        );
        assert!(c.t.is_live(key) && !c.t.is_waiting(key));
        // The pair timeout no longer applies.
        assert_eq!(c.run_until(20.0), []);
    }

    #[test]
    fn idle_counts_client_data_only() {
        let mut c = Case::new(rules());
        let key = c.pair(0.0, "s", 1, 2);
        // The agent talks all along and the client answers pings (liveness without data):
        // neither resets the idle clock; the client's one keystroke at 50 s does.
        let mut out = Vec::new();
        for s in (5..=200).step_by(5) {
            let s = f64::from(s);
            out.extend(c.run_until(s));
            if !c.t.is_live(key) {
                break;
            }
            c.t.handle_bytes(c.at(s), key, Leg::Agent, 100);
            c.t.handle_bytes(c.at(s), key, Leg::Client, if s == 50.0 { 1 } else { 0 });
        }
        let end: Vec<_> = out
            .into_iter()
            .filter(|a| !matches!(a, Action::Report(Report::Progress { .. })))
            .collect();
        assert_eq!(
            end,
            [
                ended("s", CloseReason::IdleTimeout, 1, 100 * 29, 150),
                close(1, Some(CloseCode::IDLE_TIMEOUT)),
                close(2, Some(CloseCode::IDLE_TIMEOUT)),
            ]
        );
    }

    /// A port session (its tokens say `two_way`): data from the agent alone keeps it alive (a
    /// download is not idle); once no data moves either way, the idle timeout ends it.
    #[test]
    fn a_port_sessions_idle_clock_counts_both_directions() {
        let mut c = Case::new(rules());
        let key = c.accept(0.0, "p", Leg::Client, "p-c", 1);
        c.t.handle_upgraded(c.at(0.0), key, Leg::Client, true);
        c.admit_terms(0.0, "p", Leg::Agent, "p-a", 2, (false, true), Default::default());
        c.t.handle_upgraded(c.at(0.0), key, Leg::Agent, true);
        c.actions();
        let mut out = Vec::new();
        for s in (5..=400).step_by(5) {
            let s = f64::from(s);
            out.extend(c.run_until(s));
            if !c.t.is_live(key) {
                break;
            }
            // Only the instance sends, until 200 s; the client only answers pings.
            c.t.handle_bytes(c.at(s), key, Leg::Agent, if s <= 200.0 { 100 } else { 0 });
            c.t.handle_bytes(c.at(s), key, Leg::Client, 0);
        }
        let end: Vec<_> = out
            .into_iter()
            .filter(|a| !matches!(a, Action::Report(Report::Progress { .. })))
            .collect();
        assert_eq!(
            end,
            [
                ended("p", CloseReason::IdleTimeout, 0, 100 * 40, 300),
                close(1, Some(CloseCode::IDLE_TIMEOUT)),
                close(2, Some(CloseCode::IDLE_TIMEOUT)),
            ]
        );
    }

    /// An account's preferences, signed into its session's tokens, tighten the relay's rules
    /// (idle 100 s, no longest session) and never loosen them.
    #[test]
    fn an_accounts_limits_tighten_the_relays_and_never_loosen_them() {
        let idle = |s| SessionLimits { idle_timeout: Some(SECS(s)), max_duration: None };
        let max = |s| SessionLimits { idle_timeout: None, max_duration: Some(SECS(s)) };
        let cases = [
            (idle(20), 20.0, CloseReason::IdleTimeout, CloseCode::IDLE_TIMEOUT),
            (idle(300), 100.0, CloseReason::IdleTimeout, CloseCode::IDLE_TIMEOUT),
            (max(30), 30.0, CloseReason::MaxDuration, CloseCode::MAX_DURATION),
        ];
        for (limits, at, reason, code) in cases {
            let mut c = Case::new(rules());
            let key = c.accept(0.0, "s", Leg::Client, "s-c", 1);
            c.t.handle_upgraded(c.at(0.0), key, Leg::Client, true);
            // The agent's token carries them (a client's may as well: whichever leg says).
            c.admit_terms(0.0, "s", Leg::Agent, "s-a", 2, (false, false), limits);
            c.t.handle_upgraded(c.at(0.0), key, Leg::Agent, true);
            c.actions();
            let typing = reason == CloseReason::MaxDuration;
            let mut out = Vec::new();
            for s in 1..=200 {
                let s = f64::from(s);
                out.extend(c.run_until(s));
                if !c.t.is_live(key) {
                    break;
                }
                c.t.handle_bytes(c.at(s), key, Leg::Client, u64::from(typing));
                c.t.handle_bytes(c.at(s), key, Leg::Agent, 0);
            }
            let ends: Vec<_> = out
                .into_iter()
                .filter(|a| !matches!(a, Action::Report(Report::Progress { .. })))
                .collect();
            let typed = if typing { at as u64 - 1 } else { 0 };
            assert_eq!(
                ends,
                [
                    ended("s", reason, typed, 0, at as u64),
                    close(1, Some(code)),
                    close(2, Some(code))
                ],
                "{limits:?}"
            );
        }
    }

    #[test]
    fn max_duration_ends_a_busy_session() {
        let mut c = Case::new(Rules { max_duration: Some(SECS(60)), ..rules() });
        let key = c.pair(0.0, "s", 1, 2);
        for s in 1..=59 {
            c.t.handle_bytes(c.at(f64::from(s)), key, Leg::Client, 1);
            c.t.handle_bytes(c.at(f64::from(s)), key, Leg::Agent, 1);
        }
        let out: Vec<_> = c
            .run_until(61.0)
            .into_iter()
            .filter(|a| !matches!(a, Action::Report(Report::Progress { .. })))
            .collect();
        assert_eq!(
            out,
            [
                ended("s", CloseReason::MaxDuration, 59, 59, 60),
                close(1, Some(CloseCode::MAX_DURATION)),
                close(2, Some(CloseCode::MAX_DURATION)),
            ]
        );
    }

    #[test]
    fn a_silent_leg_is_pinged_once_then_declared_dead() {
        let mut c = Case::new(Rules { idle_timeout: None, ..rules() });
        let key = c.pair(0.0, "s", 1, 2);
        // The client keeps talking; the agent is silent from the start.
        let mut out = Vec::new();
        for s in 1..=100 {
            let s = f64::from(s);
            out.extend(c.run_until(s).into_iter().map(|a| (s, a)));
            if c.t.is_live(key) {
                c.t.handle_bytes(c.at(s), key, Leg::Client, 0);
            }
        }
        assert_eq!(
            out,
            [
                (30.0, Action::Ping { handle: 2 }),
                (90.0, ended("s", CloseReason::AgentLost, 0, 0, 90)),
                (90.0, close(1, Some(CloseCode::PEER_GONE))),
                (90.0, close(2, None)),
            ]
        );
    }

    #[test]
    fn anything_from_a_pinged_leg_makes_it_alive_again() {
        let mut c = Case::new(Rules { idle_timeout: None, ..rules() });
        let key = c.pair(0.0, "s", 1, 2);
        assert_eq!(c.run_until(30.0), [Action::Ping { handle: 1 }, Action::Ping { handle: 2 }]);
        // Pongs (no data) from both at 40 s: the next pings are due 30 s later.
        // The first answer moves the session's deadline earlier (from the death at 90 s to the
        // next ping at 70 s); the second is due at the same 70 s, and a second arrival at the same time changes nothing.
        assert!(c.t.handle_bytes(c.at(40.0), key, Leg::Client, 0));
        assert!(!c.t.handle_bytes(c.at(40.0), key, Leg::Agent, 0));
        assert!(!c.t.handle_bytes(c.at(40.0), key, Leg::Agent, 0));
        assert_eq!(c.run_until(69.9), []);
        assert_eq!(c.run_until(70.0), [Action::Ping { handle: 1 }, Action::Ping { handle: 2 }]);
        assert!(c.t.is_live(key));
    }

    #[test]
    fn terminate_before_pairing_closes_the_leg_and_answers_later_legs_with_the_code() {
        let mut c = Case::new(rules());
        let code = CloseCode::new(close::TERMINATED).unwrap();
        let key = c.accept(0.0, "s", Leg::Client, "jc", 1);
        c.t.handle_upgraded(c.at(0.0), key, Leg::Client, true);
        let _ = c.actions();
        c.t.handle_terminate(c.at(1.0), "s", code);
        assert_eq!(
            c.actions(),
            [ended("s", CloseReason::Terminated, 0, 0, 1), close(1, Some(code))]
        );
        c.admit(2.0, "s", Leg::Agent, "ja", 2);
        assert_eq!(c.actions(), [Action::AcceptAndClose { handle: 2, code }]);
        // A session terminated before any leg came: its first leg learns it too.
        c.t.handle_terminate(c.at(2.0), "t", code);
        assert_eq!(c.actions(), []);
        c.admit(3.0, "t", Leg::Client, "jt", 3);
        assert_eq!(c.actions(), [Action::AcceptAndClose { handle: 3, code }]);
        // Once a token could no longer open a leg, the session id is forgotten.
        assert_eq!(c.run_until(2.0 + 600.0 + PURGE_SLACK.as_secs_f64()), []);
        c.admit(700.0, "t", Leg::Client, "jt2", 5);
        assert!(matches!(c.actions().as_slice(), [Action::Accept { handle: 5, .. }]));
    }

    #[test]
    fn terminate_after_pairing_closes_both_legs_with_the_code() {
        let mut c = Case::new(rules());
        let code = CloseCode::new(close::ACCESS_REVOKED).unwrap();
        let key = c.pair(0.0, "s", 1, 2);
        c.t.handle_bytes(c.at(1.0), key, Leg::Client, 7);
        c.t.handle_terminate(c.at(5.0), "s", code);
        assert_eq!(
            c.actions(),
            [
                ended("s", CloseReason::Terminated, 7, 0, 5),
                close(1, Some(code)),
                close(2, Some(code))
            ]
        );
        // Stale inputs for the ended session change nothing.
        c.t.handle_bytes(c.at(6.0), key, Leg::Client, 1);
        c.t.handle_leg_closed(c.at(6.0), key, Leg::Agent, LegEnd::Lost);
        assert_eq!(c.actions(), []);
    }

    #[test]
    fn a_token_opens_one_leg_ever_until_it_expires() {
        let mut c = Case::new(rules());
        let key = c.pair(0.0, "s", 1, 2);
        // Replayed while the session lives.
        c.admit(1.0, "s", Leg::Client, "s-c", 3);
        assert_eq!(c.actions(), [Action::Refuse { handle: 3, refusal: Refusal::TokenAlreadyUsed }]);
        // A second leg for a role that has one, with a fresh token.
        c.admit(1.0, "s", Leg::Client, "fresh", 5);
        assert_eq!(c.actions(), [Action::Refuse { handle: 5, refusal: Refusal::TokenAlreadyUsed }]);
        c.t.handle_leg_closed(c.at(2.0), key, Leg::Client, LegEnd::Closed(CloseCode::NORMAL));
        let _ = c.actions();
        // Replayed after the session ended: still refused, and opens no new session.
        c.admit(3.0, "s", Leg::Client, "s-c", 7);
        assert_eq!(c.actions(), [Action::Refuse { handle: 7, refusal: Refusal::TokenAlreadyUsed }]);
        assert!(c.t.is_empty());
        // After its expiry (600 s after issue) and the purge, the id is forgotten (the token
        // check refuses such a token as expired before it gets here).
        let _ = c.run_until(601.0 + PURGE_SLACK.as_secs_f64());
        c.admit(700.0, "s", Leg::Client, "s-c", 9);
        assert!(matches!(c.actions().as_slice(), [Action::Accept { handle: 9, .. }]));
    }

    #[test]
    fn how_a_leg_ended_decides_the_reason_and_each_legs_code() {
        let code = |c| CloseCode::new(c).unwrap();
        let cases = [
            (
                Leg::Agent,
                LegEnd::Closed(CloseCode::NORMAL),
                CloseReason::Exit,
                [Some(CloseCode::NORMAL); 2],
            ),
            (
                Leg::Client,
                LegEnd::Closed(CloseCode::NORMAL),
                CloseReason::ClientClosed,
                [Some(CloseCode::NORMAL); 2],
            ),
            (Leg::Agent, LegEnd::Closed(code(1011)), CloseReason::Error, [Some(code(1011)); 2]),
            (Leg::Agent, LegEnd::Closed(code(1008)), CloseReason::Error, [Some(code(1008)); 2]),
            (
                Leg::Agent,
                LegEnd::Closed(code(4011)),
                CloseReason::AgentClosed,
                [Some(code(4011)); 2],
            ),
            (
                Leg::Client,
                LegEnd::Violation(CloseCode::PROTOCOL_ERROR),
                CloseReason::Error,
                [Some(CloseCode::PROTOCOL_ERROR), Some(CloseCode::PEER_GONE)],
            ),
            (
                Leg::Agent,
                LegEnd::Violation(code(1009)),
                CloseReason::Error,
                [Some(CloseCode::PEER_GONE), Some(code(1009))],
            ),
            (
                Leg::Client,
                LegEnd::BadClose(CloseCode::PROTOCOL_ERROR),
                CloseReason::Error,
                [Some(CloseCode::PROTOCOL_ERROR), Some(CloseCode::PEER_GONE)],
            ),
            (
                Leg::Client,
                LegEnd::Lost,
                CloseReason::ClientLost,
                [None, Some(CloseCode::PEER_GONE)],
            ),
            (Leg::Agent, LegEnd::Lost, CloseReason::AgentLost, [Some(CloseCode::PEER_GONE), None]),
            (
                Leg::Client,
                LegEnd::PeerFault,
                CloseReason::Error,
                [None, Some(CloseCode::PEER_GONE)],
            ),
            (Leg::Agent, LegEnd::PeerFault, CloseReason::Error, [Some(CloseCode::PEER_GONE), None]),
        ];
        for (leg, how, reason, [cc, ac]) in cases {
            let mut c = Case::new(rules());
            let key = c.pair(0.0, "s", 1, 2);
            c.t.handle_leg_closed(c.at(4.0), key, leg, how);
            assert_eq!(
                c.actions(),
                [ended("s", reason, 0, 0, 4), close(1, cc), close(2, ac)],
                "{leg:?} {how:?}"
            );
        }
    }

    #[test]
    fn a_101_that_fails_ends_the_session_as_lost_by_that_leg() {
        let mut c = Case::new(rules());
        let key = c.accept(0.0, "s", Leg::Agent, "ja", 2);
        c.t.handle_upgraded(c.at(0.0), key, Leg::Agent, true);
        let _ = c.actions();
        c.admit(1.0, "s", Leg::Client, "jc", 1);
        let _ = c.actions();
        c.t.handle_upgraded(c.at(1.0), key, Leg::Client, false);
        assert_eq!(
            c.actions(),
            [
                ended("s", CloseReason::ClientLost, 0, 0, 1),
                close(1, None),
                close(2, Some(CloseCode::PEER_GONE))
            ]
        );
        // The session ended while the other leg's 101 was in flight: its report is ignored.
        c.t.handle_upgraded(c.at(1.0), key, Leg::Agent, true);
        assert_eq!(c.actions(), []);
    }

    #[test]
    fn progress_is_reported_an_interval_after_the_first_uncounted_bytes() {
        let mut c = Case::new(rules());
        let key = c.pair(0.0, "s", 1, 2);
        c.t.handle_bytes(c.at(1.0), key, Leg::Client, 5);
        c.t.handle_bytes(c.at(1.5), key, Leg::Agent, 50);
        assert_eq!(c.run_until(2.9), []);
        assert_eq!(
            c.run_until(3.0),
            [Action::Report(Report::Progress { sid: "s".into(), bytes: [5, 50] })]
        );
        // Liveness alone (pongs) reports nothing.
        c.t.handle_bytes(c.at(4.0), key, Leg::Client, 0);
        assert_eq!(c.run_until(29.0), []);
        c.t.handle_bytes(c.at(29.0), key, Leg::Agent, 1);
        assert_eq!(
            c.run_until(31.0),
            [Action::Report(Report::Progress { sid: "s".into(), bytes: [5, 51] })]
        );
    }

    #[test]
    fn sessions_due_close_together_wake_the_shard_once() {
        // 100 sessions whose bytes arrive spread over one second report in ten batches, one
        // per 100 ms grain; so do their pings (due 30 s after the spread-out arrivals).
        let mut c = Case::new(Rules { idle_timeout: None, ..rules() });
        let keys: Vec<_> =
            (0..100).map(|i| c.pair(0.0, &format!("s{i}"), 2 * i + 1, 2 * i + 2)).collect();
        for (i, &k) in keys.iter().enumerate() {
            let at = 0.01 * i as f64;
            c.t.handle_bytes(c.at(at), k, Leg::Client, 1);
            c.t.handle_bytes(c.at(at), k, Leg::Agent, 1);
        }
        let mut reports = 0;
        let mut wakes = 0;
        while let Some(t) = c.t.poll_timeout().filter(|&t| t <= c.at(3.0)) {
            c.t.handle_timeout(t);
            let a = c.actions();
            assert!(a.iter().all(|a| matches!(a, Action::Report(Report::Progress { .. }))));
            reports += a.len();
            wakes += 1;
        }
        // 2.0, 2.1, ..., 3.0 s (the last arrivals at 0.99 s are due at 2.99, rounded to 3.0).
        assert_eq!((reports, wakes), (100, 11));
        let mut wakes = 0;
        while let Some(t) = c.t.poll_timeout().filter(|&t| t <= c.at(31.0)) {
            c.t.handle_timeout(t);
            let _ = c.actions();
            wakes += 1;
        }
        // One wake at 10 s (the pair deadlines armed before pairing, now early), then the pings
        // due from 30.00 s to 30.99 s in 100 ms steps (30.0, 30.1, ..., 31.0): 12 wakes for
        // 100 sessions, where exact deadlines would be 101.
        assert_eq!(wakes, 12);
    }

    #[test]
    fn shutdown_refuses_new_legs_drains_then_closes_with_4009() {
        let mut c = Case::new(rules());
        let a = c.pair(0.0, "a", 1, 2);
        let _b = c.pair(0.0, "b", 3, 4);
        c.t.handle_shutdown(c.at(1.0), SECS(10));
        assert_eq!(c.actions(), []);
        c.admit(2.0, "c", Leg::Client, "jc", 5);
        assert_eq!(c.actions(), [Action::Refuse { handle: 5, refusal: Refusal::Unavailable }]);
        // One session ends by itself during the drain.
        c.t.handle_leg_closed(c.at(3.0), a, Leg::Agent, LegEnd::Closed(CloseCode::NORMAL));
        assert_eq!(c.actions().len(), 3);
        assert_eq!(c.run_until(10.9), []);
        assert_eq!(
            c.tick(11.0),
            [
                ended("b", CloseReason::RelayShutdown, 0, 0, 11),
                close(3, Some(CloseCode::RELAY_SHUTDOWN)),
                close(4, Some(CloseCode::RELAY_SHUTDOWN)),
                Action::Drained,
            ]
        );
        assert_eq!(c.run_until(100.0), []);
    }

    #[test]
    fn shutdown_with_nothing_live_is_drained_at_once_and_a_drain_can_end_early() {
        let mut c = Case::new(rules());
        c.t.handle_shutdown(c.at(0.0), SECS(10));
        assert_eq!(c.actions(), [Action::Drained]);
        let mut c = Case::new(rules());
        let key = c.pair(0.0, "s", 1, 2);
        c.t.handle_shutdown(c.at(1.0), SECS(10));
        c.t.handle_leg_closed(c.at(2.0), key, Leg::Client, LegEnd::Lost);
        assert_eq!(
            c.actions(),
            [
                ended("s", CloseReason::ClientLost, 0, 0, 2),
                close(1, None),
                close(2, Some(CloseCode::PEER_GONE)),
                Action::Drained,
            ]
        );
    }

    fn resumable() -> Rules {
        Rules { resume_window: Some(SECS(60)), ..rules() }
    }

    /// Both legs of a detached session come back at `secs` (resume tokens); the new key.
    fn resume_both(c: &mut Case, secs: f64, sid: &str, client: u32, agent: u32) -> Key {
        c.admit_resume(secs, sid, Leg::Client, &format!("{sid}-rc{client}"), client);
        let a = c.actions();
        let [Action::Accept { key, .. }] = a.as_slice() else { panic!("{a:?}") };
        let key = *key;
        c.t.handle_upgraded(c.at(secs), key, Leg::Client, true);
        c.admit_resume(secs, sid, Leg::Agent, &format!("{sid}-ra{agent}"), agent);
        c.t.handle_upgraded(c.at(secs), key, Leg::Agent, true);
        let a = c.actions();
        assert_eq!(a.len(), 4, "{a:?}");
        assert_eq!(a[2], Action::Report(Report::Resumed { sid: sid.into() }));
        assert!(
            matches!(a[3], Action::StartPumps { client: x, agent: y, .. } if x == client && y == agent)
        );
        key
    }

    #[test]
    fn a_lost_leg_detaches_the_session_and_both_legs_resume_it_with_its_counts() {
        let mut c = Case::new(resumable());
        let key = c.pair(0.0, "s", 1, 2);
        c.t.handle_bytes(c.at(1.0), key, Leg::Client, 5);
        c.t.handle_bytes(c.at(1.0), key, Leg::Agent, 7);
        c.t.handle_leg_closed(c.at(3.0), key, Leg::Client, LegEnd::Lost);
        assert_eq!(
            c.actions(),
            [
                close(1, None),
                close(2, Some(CloseCode::PEER_RESUMING)),
                Action::Report(Report::Detached { sid: "s".into() }),
            ]
        );
        // The old key is gone (its pumps stop); the session waits for the window.
        assert!(!c.t.is_live(key));
        assert_eq!(c.t.len(), 1);
        assert_eq!(
            c.run_until(62.9),
            [Action::Report(Report::Progress { sid: "s".into(), bytes: [5, 7] })]
        );
        let key = resume_both(&mut c, 30.0, "s", 3, 4);
        c.t.handle_bytes(c.at(31.0), key, Leg::Client, 1);
        c.t.handle_leg_closed(c.at(40.0), key, Leg::Agent, LegEnd::Closed(CloseCode::NORMAL));
        assert_eq!(
            c.actions(),
            [
                ended("s", CloseReason::Exit, 6, 7, 40),
                close(3, Some(CloseCode::NORMAL)),
                close(4, Some(CloseCode::NORMAL)),
            ]
        );
    }

    #[test]
    fn a_detached_session_not_resumed_within_the_window_ends_as_it_was_lost() {
        let mut c = Case::new(resumable());
        let key = c.pair(0.0, "s", 1, 2);
        // The agent's leg falls silent past the dead-leg time (90 s), the client's does not:
        // detached at 90.
        let _ = c.run_until(50.0);
        c.t.handle_bytes(c.at(50.0), key, Leg::Client, 0);
        let _ = c.run_until(80.0);
        c.t.handle_bytes(c.at(80.0), key, Leg::Client, 0);
        let a = c.run_until(90.0);
        assert!(a.contains(&Action::Report(Report::Detached { sid: "s".into() })), "{a:?}");
        assert!(
            a.contains(&close(2, None)) && a.contains(&close(1, Some(CloseCode::PEER_RESUMING))),
            "{a:?}"
        );
        // Only the client comes back; it waits, then learns the agent never did.
        c.admit_resume(100.0, "s", Leg::Client, "r1", 3);
        let a = c.actions();
        let [Action::Accept { key, .. }] = a.as_slice() else { panic!("{a:?}") };
        c.t.handle_upgraded(c.at(100.0), *key, Leg::Client, true);
        assert_eq!(c.actions(), [Action::Watch { key: *key, leg: Leg::Client, handle: 3 }]);
        assert_eq!(c.run_until(149.9), []);
        assert_eq!(
            c.run_until(150.0),
            [ended("s", CloseReason::AgentLost, 0, 0, 150), close(3, Some(CloseCode::PEER_GONE))]
        );
        assert!(c.t.is_empty());
    }

    #[test]
    fn a_returning_leg_lost_again_leaves_the_session_detached() {
        let mut c = Case::new(resumable());
        let key = c.pair(0.0, "s", 1, 2);
        c.t.handle_leg_closed(c.at(1.0), key, Leg::Agent, LegEnd::Lost);
        let _ = c.actions();
        c.admit_resume(2.0, "s", Leg::Client, "r1", 3);
        let a = c.actions();
        let [Action::Accept { key, .. }] = a.as_slice() else { panic!("{a:?}") };
        let key = *key;
        c.t.handle_upgraded(c.at(2.0), key, Leg::Client, true);
        let _ = c.actions();
        c.t.handle_leg_closed(c.at(3.0), key, Leg::Client, LegEnd::Lost);
        assert_eq!(c.actions(), [close(3, None)]);
        assert_eq!(c.t.len(), 1);
        resume_both(&mut c, 4.0, "s", 5, 6);
    }

    #[test]
    fn a_resume_token_for_a_session_this_relay_does_not_know_waits_for_the_window() {
        let mut c = Case::new(resumable());
        c.admit_resume(0.0, "s", Leg::Agent, "r1", 2);
        let a = c.actions();
        let [Action::Accept { key, .. }] = a.as_slice() else { panic!("{a:?}") };
        c.t.handle_upgraded(c.at(0.0), *key, Leg::Agent, true);
        let _ = c.actions();
        // Far past the pair timeout (10 s): a resumed session waits for the window (60 s).
        assert_eq!(c.run_until(59.9), []);
        resume_both_after_agent(&mut c, 30.0);
        // And without the other leg, the window's end says the relay's restart ended it.
        let mut c = Case::new(resumable());
        c.admit_resume(0.0, "t", Leg::Client, "r2", 1);
        let _ = c.actions();
        assert_eq!(
            c.run_until(60.0),
            [
                ended("t", CloseReason::RelayShutdown, 0, 0, 60),
                close(1, Some(CloseCode::PEER_GONE))
            ]
        );
        // With resuming off, a resume token is an ordinary first leg.
        let mut c = Case::new(rules());
        let key = c.accept(0.0, "u", Leg::Client, "r3", 1);
        c.t.handle_upgraded(c.at(0.0), key, Leg::Client, true);
        let _ = c.actions();
        let a = c.run_until(10.0);
        assert_eq!(a[0], ended("u", CloseReason::PairTimeout, 0, 0, 10));
    }

    /// The client of session "s" comes back at `secs` to an agent leg (handle 2) waiting.
    fn resume_both_after_agent(c: &mut Case, secs: f64) {
        c.admit_resume(secs, "s", Leg::Client, "rc", 1);
        let a = c.actions();
        let [Action::Accept { key, .. }] = a.as_slice() else { panic!("{a:?}") };
        c.t.handle_upgraded(c.at(secs), *key, Leg::Client, true);
        let a = c.actions();
        assert_eq!(a[0], Action::Report(Report::Resumed { sid: "s".into() }), "{a:?}");
        assert!(matches!(a[1], Action::StartPumps { client: 1, agent: 2, .. }), "{a:?}");
    }

    #[test]
    fn a_resume_token_for_an_attached_role_displaces_that_leg_with_4014() {
        let mut c = Case::new(resumable());
        let key = c.pair(0.0, "s", 1, 2);
        c.admit_resume(5.0, "s", Leg::Client, "r1", 3);
        let a = c.actions();
        assert_eq!(a[0], close(1, Some(CloseCode::ATTACHED_ELSEWHERE)), "{a:?}");
        assert_eq!(a[1], close(2, Some(CloseCode::PEER_RESUMING)), "{a:?}");
        assert_eq!(a[2], Action::Report(Report::Detached { sid: "s".into() }), "{a:?}");
        assert!(matches!(a[3], Action::Accept { leg: Leg::Client, handle: 3, .. }), "{a:?}");
        assert!(!c.t.is_live(key));
        // An ordinary token for an attached role is still refused.
        let mut c = Case::new(resumable());
        c.pair(0.0, "s", 1, 2);
        c.admit(1.0, "s", Leg::Client, "j9", 3);
        assert_eq!(c.actions(), [Action::Refuse { handle: 3, refusal: Refusal::TokenAlreadyUsed }]);
    }

    #[test]
    fn a_relay_stopping_with_resuming_on_leaves_paired_sessions_for_the_next_relay() {
        let mut c = Case::new(resumable());
        let key = c.pair(0.0, "s", 1, 2);
        c.t.handle_bytes(c.at(0.5), key, Leg::Client, 3);
        let waiting = c.accept(0.0, "w", Leg::Client, "w1", 5);
        c.t.handle_upgraded(c.at(0.0), waiting, Leg::Client, true);
        let _ = c.actions();
        c.t.handle_shutdown(c.at(1.0), SECS(5));
        let a = c.run_until(6.0);
        assert!(a.contains(&Action::Report(Report::Detached { sid: "s".into() })), "{a:?}");
        assert!(
            a.contains(&Action::Report(Report::Progress { sid: "s".into(), bytes: [3, 0] })),
            "{a:?}"
        );
        assert!(a.contains(&close(1, Some(CloseCode::RELAY_SHUTDOWN))), "{a:?}");
        assert!(a.contains(&close(2, Some(CloseCode::RELAY_SHUTDOWN))), "{a:?}");
        // The never-paired session ends as before; the paired one has no end record.
        assert!(a.contains(&ended("w", CloseReason::RelayShutdown, 0, 0, 6)), "{a:?}");
        assert!(
            !a.iter().any(|x| matches!(x, Action::Report(Report::Ended(e)) if e.session_id == "s")),
            "{a:?}"
        );
        assert_eq!(a.last(), Some(&Action::Drained));
    }

    #[test]
    fn activity_does_not_grow_the_timer_heap() {
        // The hot path must not push a heap entry per read: 1,000 sessions, 100 reads each.
        let mut c = Case::new(rules());
        let keys: Vec<_> =
            (0..1000).map(|i| c.pair(0.0, &format!("s{i}"), 2 * i + 1, 2 * i + 2)).collect();
        for r in 0..100 {
            let now = 0.01 * f64::from(r);
            for &k in &keys {
                // Only a session's first bytes move its deadline earlier (the progress report):
                // the driver looks at its timer then, not on every read.
                assert_eq!(c.t.handle_bytes(c.at(now), k, Leg::Client, 1), r == 0);
                assert!(!c.t.handle_bytes(c.at(now), k, Leg::Agent, 1));
            }
        }
        assert!(c.t.timers.len() <= 2 * keys.len(), "{}", c.t.timers.len());
        // Nothing is due before the first progress report: a tick in between does no work.
        let before = c.t.timers.len();
        assert_eq!(c.tick(1.5), []);
        assert_eq!(c.t.timers.len(), before);
    }
}
