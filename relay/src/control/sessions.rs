//! Live sessions in memory: which sessions are open, on which instance and account, so that
//! limits, the account switch and the pending sweep need no store query. The store remains the
//! record; this map is rebuilt empty at start (every session left open by a previous run is
//! closed as `relay_shutdown`, since the data plane's legs died with that process).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Concurrency limits on open (pending or connected) sessions.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per instance.
    pub per_instance: usize,
    /// Per account.
    pub per_account: usize,
}

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// Too many open sessions on the instance.
    Instance(usize),
    /// Too many open sessions in the account.
    Account(usize),
}

#[derive(Debug, Clone)]
struct Live {
    account: String,
    instance: String,
    connected: bool,
    /// When a session still pending with no report from the data plane is closed as
    /// `pair_timeout`: token expiry plus the data plane's pair timeout, after which no leg can
    /// be waiting any more.
    pending_deadline: Instant,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Live>,
    per_instance: HashMap<String, usize>,
    per_account: HashMap<String, usize>,
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
    /// Whether both legs had paired.
    pub connected: bool,
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
        account: &str,
        instance: &str,
        limits: Limits,
        pending_deadline: Instant,
    ) -> Result<(), LimitHit> {
        let mut g = self.lock();
        let on_instance = g.per_instance.get(instance).copied().unwrap_or(0);
        if on_instance >= limits.per_instance {
            return Err(LimitHit::Instance(limits.per_instance));
        }
        let on_account = g.per_account.get(account).copied().unwrap_or(0);
        if on_account >= limits.per_account {
            return Err(LimitHit::Account(limits.per_account));
        }
        *g.per_instance.entry(instance.to_owned()).or_default() += 1;
        *g.per_account.entry(account.to_owned()).or_default() += 1;
        g.by_id.insert(
            id.to_owned(),
            Live {
                account: account.to_owned(),
                instance: instance.to_owned(),
                connected: false,
                pending_deadline,
            },
        );
        Ok(())
    }

    /// Marks a session connected; false when it is not open.
    pub fn connected(&self, id: &str) -> bool {
        match self.lock().by_id.get_mut(id) {
            Some(l) => {
                l.connected = true;
                true
            }
            None => false,
        }
    }

    /// Removes a session; `None` when it was not open.
    pub fn remove(&self, id: &str) -> Option<Removed> {
        let mut g = self.lock();
        let live = g.by_id.remove(id)?;
        dec(&mut g.per_instance, &live.instance);
        dec(&mut g.per_account, &live.account);
        Some(Removed { instance: live.instance, connected: live.connected })
    }

    /// Whether a session is open.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().by_id.contains_key(id)
    }

    /// Ids of the open sessions of an account.
    pub fn of_account(&self, account: &str) -> Vec<String> {
        self.lock()
            .by_id
            .iter()
            .filter(|(_, l)| l.account == account)
            .map(|(k, _)| k.clone())
            .collect()
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
            .filter(|(_, l)| !l.connected && now >= l.pending_deadline)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// `(open, pending)` counts.
    pub fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.by_id.len(), g.by_id.values().filter(|l| !l.connected).count())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_open_sessions_and_free_on_remove() {
        let live = LiveSessions::default();
        let lim = Limits { per_instance: 2, per_account: 3 };
        let t = Instant::now();
        live.admit("s1", "a", "i1", lim, t).unwrap();
        live.admit("s2", "a", "i1", lim, t).unwrap();
        assert_eq!(live.admit("s3", "a", "i1", lim, t), Err(LimitHit::Instance(2)));
        live.admit("s3", "a", "i2", lim, t).unwrap();
        assert_eq!(live.admit("s4", "a", "i3", lim, t), Err(LimitHit::Account(3)));
        live.admit("s4", "b", "i3", lim, t).unwrap();
        assert!(live.connected("s1"));
        let mut overdue = live.overdue(t);
        overdue.sort();
        assert_eq!(overdue, ["s2", "s3", "s4"]);
        assert_eq!(live.remove("s1"), Some(Removed { instance: "i1".into(), connected: true }));
        assert_eq!(live.remove("s1"), None);
        live.admit("s5", "a", "i1", lim, t).unwrap();
        assert_eq!(live.counts(), (4, 4));
        assert_eq!(live.of_account("b"), vec!["s4".to_owned()]);
    }
}
