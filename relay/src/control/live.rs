//! Live sessions in memory: which sessions are open, on which instance and account and for which
//! principal, so that limits, the account switch and the pending sweep need no store query. The
//! store remains the record. At start this map holds only what a previous run left resumable:
//! with a resume window, its paired sessions come back as `detached`
//! ([`LiveSessions::recover`]) with a deadline, kept in deadline order, after which those no
//! leg came back for are closed; without one, everything a previous run left open was closed
//! as `relay_shutdown` and the map starts empty.
//!
//! Also the admission rules of new sessions that are not about policy: [`Limits`] on open
//! sessions per instance, account and principal ([`LiveSessions::admit`]), and the rate of
//! session starts per access key ([`StartRate`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::plane::CloseReason;

/// Admission limits of new sessions.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open (pending, connected or detached) sessions per instance.
    pub per_instance: usize,
    /// Open sessions per account.
    pub per_account: usize,
    /// Open sessions per principal (a user, or the account owner), so that one caller cannot
    /// take every slot of an instance or account.
    pub per_user: usize,
    /// Session starts per access key.
    pub start_rate: Rate,
}

impl Limits {
    /// No open-session limit: for a session whose slot the store already counted (a fleet)
    /// or that held it before a restart.
    pub const NONE: Limits = Limits {
        per_instance: usize::MAX,
        per_account: usize::MAX,
        per_user: usize::MAX,
        start_rate: Rate::OFF,
    };

    /// The open-session limits, for the store to count.
    pub fn open(self) -> super::store::OpenLimits {
        super::store::OpenLimits {
            per_instance: self.per_instance,
            per_account: self.per_account,
            per_user: self.per_user,
        }
    }
}

/// A token-bucket rate: `per_sec` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Starts per second refilled; 0 turns the limit off.
    pub per_sec: f64,
    /// Starts allowed at once from a full bucket (at least 1 when the limit is on).
    pub burst: u32,
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate { per_sec: 0.0, burst: 0 };

    fn is_off(self) -> bool {
        self.per_sec <= 0.0
    }

    fn capacity(self) -> f64 {
        f64::from(self.burst.max(1))
    }
}

/// Which limit refused a session: the same answer whether this table or the store (a fleet)
/// counted.
pub use super::store::OverLimit as LimitHit;

/// Who a new session is for, and where.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// The instance's (and caller's) account.
    pub account: &'a str,
    /// The instance.
    pub instance: &'a str,
    /// The caller: a user id, or `owner`.
    pub principal: &'a str,
}

/// Where an open session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveState {
    /// Token issued, its legs not both paired yet.
    Pending,
    /// Both legs paired.
    Connected,
    /// Paired before, its legs lost: waiting for new ones within the resume window.
    Detached,
}

#[derive(Debug, Clone)]
struct Live {
    account: String,
    instance: String,
    /// Key of `per_user`: account and principal (principals are unique only in an account).
    user: String,
    state: LiveState,
    /// For a session recovered at start: when it is closed unless a leg pair came back (its
    /// key in [`Inner::recovered`]).
    recovered_deadline: Option<Instant>,
    /// For a recovered session: the reason it is closed with then (`relay_shutdown` for one
    /// this relay's previous run left, `node_lost` for one adopted from a dead fleet node).
    lost: CloseReason,
    /// When a session still pending with no report from the data plane is closed as
    /// `pair_timeout`: token expiry plus the data plane's pair timeout, after which no leg can
    /// be waiting any more.
    pending_deadline: Instant,
    /// Byte counts (client → agent, agent → client) a previous run of the relay recorded for a
    /// session recovered at start: this data plane counts from 0, so its reports add to them.
    base: [u64; 2],
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Live>,
    per_instance: HashMap<String, usize>,
    per_account: HashMap<String, usize>,
    per_user: HashMap<String, usize>,
    /// Sessions recovered at start, by deadline: the sweep looks at the front only.
    recovered: BTreeSet<(Instant, String)>,
}

/// The open sessions of this relay.
#[derive(Default)]
pub struct LiveSessions {
    inner: Mutex<Inner>,
}

/// A removed session: where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Its instance.
    pub instance: String,
    /// Its state when removed.
    pub state: LiveState,
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters; a panic elsewhere cannot leave them half-updated in a way that
        // matters more than refusing every request would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new session under the limits, or says which one is hit.
    pub fn admit(
        &self,
        id: &str,
        who: Admission<'_>,
        limits: Limits,
        pending_deadline: Instant,
    ) -> Result<(), LimitHit> {
        let user = format!("{}/{}", who.account, who.principal);
        let mut g = self.lock();
        let count = |m: &HashMap<String, usize>, k: &str| m.get(k).copied().unwrap_or(0);
        if count(&g.per_instance, who.instance) >= limits.per_instance {
            return Err(LimitHit::Instance(limits.per_instance));
        }
        if count(&g.per_account, who.account) >= limits.per_account {
            return Err(LimitHit::Account(limits.per_account));
        }
        if count(&g.per_user, &user) >= limits.per_user {
            return Err(LimitHit::User(limits.per_user));
        }
        *g.per_instance.entry(who.instance.to_owned()).or_default() += 1;
        *g.per_account.entry(who.account.to_owned()).or_default() += 1;
        *g.per_user.entry(user.clone()).or_default() += 1;
        g.by_id.insert(
            id.to_owned(),
            Live {
                account: who.account.to_owned(),
                instance: who.instance.to_owned(),
                user,
                state: LiveState::Pending,
                recovered_deadline: None,
                lost: CloseReason::RelayShutdown,
                pending_deadline,
                base: [0; 2],
            },
        );
        Ok(())
    }

    /// Takes back a session a previous run left paired (or a dead fleet node did), as
    /// `detached` until `deadline`, when it is closed as `lost` unless a leg pair came back;
    /// under no limit (it held its slot before). A session already open is left alone.
    pub fn recover(
        &self,
        id: &str,
        who: Admission<'_>,
        deadline: Instant,
        base: [u64; 2],
        lost: CloseReason,
    ) {
        let mut g = self.lock();
        if g.by_id.contains_key(id) {
            return;
        }
        let user = format!("{}/{}", who.account, who.principal);
        *g.per_instance.entry(who.instance.to_owned()).or_default() += 1;
        *g.per_account.entry(who.account.to_owned()).or_default() += 1;
        *g.per_user.entry(user.clone()).or_default() += 1;
        g.recovered.insert((deadline, id.to_owned()));
        g.by_id.insert(
            id.to_owned(),
            Live {
                account: who.account.to_owned(),
                instance: who.instance.to_owned(),
                user,
                state: LiveState::Detached,
                recovered_deadline: Some(deadline),
                lost,
                pending_deadline: deadline,
                base,
            },
        );
    }

    /// The data plane's counts of `id` as the session's own: plus what a previous run of the
    /// relay counted when it was recovered at start.
    pub fn with_base(&self, id: &str, c2a: u64, a2c: u64) -> (u64, u64) {
        let base = self.lock().by_id.get(id).map_or([0; 2], |l| l.base);
        (base[0].saturating_add(c2a), base[1].saturating_add(a2c))
    }

    /// Sets an open session's state; returns the state before (`None` when it is not open).
    /// Connected again, a recovered session is the data plane's from then on: its deadline
    /// here is dropped.
    pub fn set_state(&self, id: &str, state: LiveState) -> Option<LiveState> {
        let mut g = self.lock();
        let l = g.by_id.get_mut(id)?;
        let before = l.state;
        l.state = state;
        let dropped =
            if state == LiveState::Connected { l.recovered_deadline.take() } else { None };
        if let Some(d) = dropped {
            g.recovered.remove(&(d, id.to_owned()));
        }
        Some(before)
    }

    /// An open session's state.
    pub fn state(&self, id: &str) -> Option<LiveState> {
        self.lock().by_id.get(id).map(|l| l.state)
    }

    /// Removes a session; `None` when it was not open.
    pub fn remove(&self, id: &str) -> Option<Removed> {
        let mut g = self.lock();
        let live = g.by_id.remove(id)?;
        dec(&mut g.per_instance, &live.instance);
        dec(&mut g.per_account, &live.account);
        dec(&mut g.per_user, &live.user);
        if let Some(d) = live.recovered_deadline {
            g.recovered.remove(&(d, id.to_owned()));
        }
        Some(Removed { instance: live.instance, state: live.state })
    }

    /// Recovered sessions whose deadline passed at `now`, no leg pair having come back for
    /// them, with the reason each is closed with: only the front of the deadline order is read.
    pub fn recovered_overdue(&self, now: Instant) -> Vec<(String, CloseReason)> {
        let g = self.lock();
        g.recovered
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|(_, id)| {
                let lost = g.by_id.get(id).map_or(CloseReason::RelayShutdown, |l| l.lost);
                (id.clone(), lost)
            })
            .collect()
    }

    /// Recovered sessions still waiting.
    pub fn recovered_waiting(&self) -> usize {
        self.lock().recovered.len()
    }

    /// Whether a session is open.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().by_id.contains_key(id)
    }

    /// Ids of the open sessions of an account.
    pub fn of_account(&self, account: &str) -> Vec<String> {
        self.ids_where(|l| l.account == account)
    }

    /// Open sessions on an instance (a scan: for rare operator actions, not per request).
    pub fn of_instance(&self, instance: &str) -> Vec<String> {
        self.ids_where(|l| l.instance == instance)
    }

    fn ids_where(&self, keep: impl Fn(&Live) -> bool) -> Vec<String> {
        self.lock().by_id.iter().filter(|(_, l)| keep(l)).map(|(k, _)| k.clone()).collect()
    }

    /// Accounts with open sessions.
    pub fn accounts(&self) -> Vec<String> {
        self.lock().per_account.keys().cloned().collect()
    }

    /// Ids of every open session.
    pub fn all(&self) -> Vec<String> {
        self.lock().by_id.keys().cloned().collect()
    }

    /// Pending sessions past their deadline at `now`.
    pub fn overdue(&self, now: Instant) -> Vec<String> {
        self.lock()
            .by_id
            .iter()
            .filter(|(_, l)| l.state == LiveState::Pending && now >= l.pending_deadline)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// `(open, pending, detached)` counts.
    pub fn counts(&self) -> (usize, usize, usize) {
        let g = self.lock();
        let count = |s: LiveState| g.by_id.values().filter(|l| l.state == s).count();
        (g.by_id.len(), count(LiveState::Pending), count(LiveState::Detached))
    }
}

fn dec(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// When a [`StartRate`] holds more keys than this, the keys whose bucket has refilled are
/// forgotten (a full bucket is the same as no entry), so memory follows the keys active in the
/// last `burst / per_sec` seconds, not every key ever seen.
const RATE_KEYS_BEFORE_PRUNE: usize = 4096;

/// Session starts per access key: one token bucket per key, refilled at [`Rate::per_sec`] up to
/// [`Rate::burst`]. Time is a parameter, so tests need no clock.
#[derive(Default)]
pub struct StartRate {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, rate: Rate, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + dt * rate.per_sec).min(rate.capacity())
    }
}

impl StartRate {
    /// Takes one start for `key` at `now`; when its bucket is empty, how long until the next
    /// start would be allowed (rounded up to whole seconds for `Retry-After`, at least 1 s).
    pub fn take(&self, key: &str, rate: Rate, now: Instant) -> Result<(), Duration> {
        if rate.is_off() {
            return Ok(());
        }
        // Buckets only; a panic elsewhere cannot leave one in a state worse than full or empty.
        let mut g = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= RATE_KEYS_BEFORE_PRUNE && !g.contains_key(key) {
            g.retain(|_, b| b.refilled(rate, now) < rate.capacity());
        }
        let tokens = g.get(key).map_or(rate.capacity(), |b| b.refilled(rate, now));
        if tokens >= 1.0 {
            g.insert(key.to_owned(), Bucket { tokens: tokens - 1.0, at: now });
            return Ok(());
        }
        g.insert(key.to_owned(), Bucket { tokens, at: now });
        let wait = ((1.0 - tokens) / rate.per_sec).ceil().max(1.0);
        Err(Duration::from_secs_f64(wait.min(f64::from(u32::MAX))))
    }

    /// Keys with a bucket in memory.
    pub fn keys(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(per_instance: usize, per_account: usize, per_user: usize) -> Limits {
        Limits { per_instance, per_account, per_user, start_rate: Rate::OFF }
    }

    fn who<'a>(account: &'a str, instance: &'a str, principal: &'a str) -> Admission<'a> {
        Admission { account, instance, principal }
    }

    #[test]
    fn limits_count_open_sessions_and_free_on_remove() {
        let live = LiveSessions::default();
        let lim = lim(2, 3, 100);
        let t = Instant::now();
        live.admit("s1", who("a", "i1", "owner"), lim, t).unwrap();
        live.admit("s2", who("a", "i1", "owner"), lim, t).unwrap();
        assert_eq!(live.admit("s3", who("a", "i1", "owner"), lim, t), Err(LimitHit::Instance(2)));
        live.admit("s3", who("a", "i2", "owner"), lim, t).unwrap();
        assert_eq!(live.admit("s4", who("a", "i3", "owner"), lim, t), Err(LimitHit::Account(3)));
        live.admit("s4", who("b", "i3", "owner"), lim, t).unwrap();
        assert_eq!(live.set_state("s1", LiveState::Connected), Some(LiveState::Pending));
        let mut overdue = live.overdue(t);
        overdue.sort();
        assert_eq!(overdue, ["s2", "s3", "s4"]);
        let removed = Removed { instance: "i1".into(), state: LiveState::Connected };
        assert_eq!(live.remove("s1"), Some(removed));
        assert_eq!(live.remove("s1"), None);
        live.admit("s5", who("a", "i1", "owner"), lim, t).unwrap();
        assert_eq!(live.counts(), (4, 4, 0));
        assert_eq!(live.of_account("b"), vec!["s4".to_owned()]);
    }

    /// One principal's open sessions are capped, pending or connected; other principals, and
    /// the same user id in another account, keep their own count; a closed session frees it.
    #[test]
    fn per_user_limit_is_per_principal_of_an_account() {
        let live = LiveSessions::default();
        let lim = lim(1000, 1000, 2);
        let t = Instant::now();
        live.admit("s1", who("a", "i1", "u-1"), lim, t).unwrap();
        live.admit("s2", who("a", "i2", "u-1"), lim, t).unwrap();
        assert!(live.set_state("s2", LiveState::Connected).is_some());
        assert_eq!(live.admit("s3", who("a", "i3", "u-1"), lim, t), Err(LimitHit::User(2)));
        live.admit("s3", who("a", "i1", "u-2"), lim, t).unwrap();
        live.admit("s4", who("a", "i1", "owner"), lim, t).unwrap();
        live.admit("s5", who("b", "i9", "u-1"), lim, t).unwrap();
        live.remove("s1");
        live.admit("s6", who("a", "i3", "u-1"), lim, t).unwrap();
        assert_eq!(live.admit("s7", who("a", "i3", "u-1"), lim, t), Err(LimitHit::User(2)));
        // The refused admissions left no trace in the other counts.
        assert_eq!(live.counts(), (5, 4, 0));
    }

    /// Sessions recovered at start count under the limits (without being refused by them),
    /// are not pending, and come due in deadline order; one connected again or removed is no
    /// longer due.
    #[test]
    fn recovered_sessions_count_and_come_due_in_order() {
        let live = LiveSessions::default();
        let lim = lim(2, 100, 100);
        let t = Instant::now();
        let (d1, d2) = (t + Duration::from_secs(1), t + Duration::from_secs(2));
        let shut = CloseReason::RelayShutdown;
        live.recover("r2", who("a", "i1", "u-1"), d2, [0; 2], shut);
        live.recover("r1", who("a", "i1", "u-1"), d1, [0; 2], shut);
        live.recover("r3", who("a", "i1", "u-1"), d2, [0; 2], CloseReason::NodeLost);
        // Already open: left as it is.
        live.recover("r3", who("a", "i1", "u-1"), d1, [0; 2], shut);
        assert_eq!(live.counts(), (3, 0, 3));
        assert_eq!(live.admit("s1", who("a", "i1", "u-1"), lim, t), Err(LimitHit::Instance(2)));
        assert!(live.overdue(t + Duration::from_secs(9)).is_empty());
        assert!(live.recovered_overdue(t).is_empty());
        let ids =
            |v: Vec<(String, CloseReason)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(live.recovered_overdue(d1)), ["r1"]);
        assert_eq!(ids(live.recovered_overdue(d2)), ["r1", "r2", "r3"]);
        assert_eq!(live.set_state("r2", LiveState::Connected), Some(LiveState::Detached));
        live.remove("r1");
        // Each closed with its own reason: r3 came from a dead node.
        assert_eq!(live.recovered_overdue(d2), [("r3".to_owned(), CloseReason::NodeLost)]);
        assert_eq!(live.recovered_waiting(), 1);
        // Detached again later (by the data plane): the deadline is not taken back.
        live.set_state("r2", LiveState::Detached);
        assert_eq!(ids(live.recovered_overdue(d2)), ["r3"]);
        assert_eq!(live.counts(), (2, 0, 2));
    }

    #[test]
    fn start_rate_allows_a_burst_then_the_refill_rate() {
        let r = StartRate::default();
        let rate = Rate { per_sec: 2.0, burst: 3 };
        let t0 = Instant::now();
        for _ in 0..3 {
            r.take("ak-1", rate, t0).unwrap();
        }
        // Empty: one token comes back in half a second, told as 1 s (whole seconds).
        assert_eq!(r.take("ak-1", rate, t0), Err(Duration::from_secs(1)));
        // Another key has its own bucket.
        r.take("ak-2", rate, t0).unwrap();
        // A refused start costs nothing: half a second later one token is there.
        r.take("ak-1", rate, t0 + Duration::from_millis(500)).unwrap();
        assert!(r.take("ak-1", rate, t0 + Duration::from_millis(500)).is_err());
        // Ten seconds idle refill to the burst, not beyond.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            r.take("ak-1", rate, later).unwrap();
        }
        assert!(r.take("ak-1", rate, later).is_err());
        // A slow rate says how long to wait.
        let slow = Rate { per_sec: 0.1, burst: 1 };
        r.take("ak-3", slow, t0).unwrap();
        assert_eq!(r.take("ak-3", slow, t0), Err(Duration::from_secs(10)));
        // Off: no limit, no memory.
        let n = r.keys();
        for _ in 0..1000 {
            r.take("ak-4", Rate::OFF, t0).unwrap();
        }
        assert_eq!(r.keys(), n);
    }

    #[test]
    fn start_rate_forgets_refilled_keys_when_many() {
        let r = StartRate::default();
        let rate = Rate { per_sec: 2.0, burst: 2 };
        let t0 = Instant::now();
        for i in 0..RATE_KEYS_BEFORE_PRUNE {
            r.take(&format!("ak-{i}"), rate, t0).unwrap();
        }
        assert_eq!(r.keys(), RATE_KEYS_BEFORE_PRUNE);
        // One key starts again later, so its bucket is still short when the others are full.
        let t1 = t0 + Duration::from_millis(250);
        r.take("ak-7", rate, t1).unwrap();
        let t2 = t0 + Duration::from_millis(500);
        r.take("ak-new", rate, t2).unwrap();
        assert_eq!(r.keys(), 2);
        // ak-7 kept its count: 1.5 tokens after its second start, 0.5 then, 1 now.
        r.take("ak-7", rate, t2).unwrap();
        assert!(r.take("ak-7", rate, t2).is_err());
    }
}
