//! The browser console's server-side state: cookie sessions and one-time login links, in
//! memory, bounded, with time as a parameter (no clock, no sockets, no timers here).
//!
//! What it does *not* do: authenticate anyone. A console session and a login link only name
//! the access key (by its SHA-256, as the store has it) that logged in or asked for the link;
//! every request through them is authenticated again from that hash by [`super::auth`], so a
//! revoked key, a disabled user or a narrowed policy applies to the console at once, exactly as
//! to the key's own API calls. The routes and cookies are in [`super::console_api`].
//!
//! ```text
//!  POST /console/api/login {access_key} ─ auth ─▶ Book::open(now, cookie#, csrf, key#)
//!  hatch console ─ POST /v1/console/links ─▶ Book::add_link(now, code#, key#, instance)
//!  POST /console/api/link {code} ─▶ Book::take_link(now, code#) (gone after one try) ─▶ open
//!  every cookie request ─▶ Book::session(now, cookie#) ─▶ key# ─ auth ─▶ Caller
//! ```
//!
//! Secrets (the cookie value, the link code) are 256 random bits and kept only as their
//! SHA-256, like every other secret of the relay (`credentials`). The CSRF token is kept as is:
//! the page must be told it again after a reload, and it is worth nothing without the cookie.
//!
//! Bounds: at most [`MAX_SESSIONS`] sessions and [`MAX_LINKS`] links in all (refused beyond,
//! once the expired ones are gone), and [`MAX_SESSIONS_PER_KEY`] / [`MAX_LINKS_PER_KEY`] per
//! access key (its oldest is dropped for a new one), so one key cannot crowd the others out.
//! Expired entries are dropped in expiry order as new ones come and when they are looked up:
//! no scan of the whole table, ever.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use axum::http::StatusCode;
use hatch_proto::api::codes;
use tracing::{info, warn};

use super::api::ApiError;
use super::auth::{self, Caller};
use super::sessions::SessionError;
use super::{Shared, credentials, policy, unix_now};

/// How long a console session lasts after its login, in seconds: a working day. Absolute, not
/// renewed by use: a stolen cookie is worth at most this long, and the person logs in again.
pub const SESSION_LIFETIME_S: i64 = 8 * 3600;
/// How long a login link may wait to be opened, in seconds: long enough to switch from the
/// terminal to the browser, short enough that a link in a scroll-back or a chat log is dead.
pub const LINK_LIFETIME_S: i64 = 120;
/// Most console sessions held at once (about 200 bytes each): far above the people one relay
/// serves, and a bound on what logins can make the relay keep.
pub const MAX_SESSIONS: usize = 10_000;
/// Most console sessions of one access key: a few browsers and tabs; a new login beyond it
/// ends that key's oldest console session.
pub const MAX_SESSIONS_PER_KEY: usize = 8;
/// Most login links waiting at once.
pub const MAX_LINKS: usize = 10_000;
/// Most login links of one access key waiting at once; a new one beyond it voids the oldest.
pub const MAX_LINKS_PER_KEY: usize = 8;

/// SHA-256 of a secret (`credentials::hash`).
pub type Digest = [u8; 32];

/// A console session: who logged in, the CSRF token of its writes, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 of the access key that logged in.
    pub key_hash: Digest,
    /// The token a write must carry in its `x-hatch-csrf` header.
    pub csrf: String,
    /// Seconds since the epoch when it ends.
    pub expires_at: i64,
}

/// A login link not yet used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// SHA-256 of the access key that asked for it.
    pub key_hash: Digest,
    /// The instance whose terminal the console opens after logging in, when one was named.
    pub instance_id: Option<String>,
    /// Seconds since the epoch when it dies unused.
    pub expires_at: i64,
}

/// Why a session or a link was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// [`MAX_SESSIONS`] live console sessions.
    Sessions,
    /// [`MAX_LINKS`] links waiting.
    Links,
}

/// One table of entries keyed by a digest, with an expiry index and a per-key index: the same
/// bookkeeping for sessions and links.
#[derive(Debug)]
struct Table<T> {
    /// id → (value, access key, sequence, expires_at).
    entries: HashMap<Digest, (T, Digest, u64, i64)>,
    /// (expires_at, id): the front is the next to expire.
    by_expiry: BTreeSet<(i64, Digest)>,
    /// Per access key: (sequence, id) in the order they were added.
    by_key: HashMap<Digest, BTreeSet<(u64, Digest)>>,
    seq: u64,
    max: usize,
    max_per_key: usize,
}

impl<T> Table<T> {
    fn new(max: usize, max_per_key: usize) -> Self {
        Table {
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            by_key: HashMap::new(),
            seq: 0,
            max,
            max_per_key,
        }
    }

    /// Drops every entry that has expired by `now` (the front of the expiry index only).
    fn expire(&mut self, now: i64) {
        while let Some(&(at, id)) = self.by_expiry.first() {
            if at > now {
                break;
            }
            self.remove(&id);
        }
    }

    fn remove(&mut self, id: &Digest) -> Option<T> {
        let (v, key, seq, expires_at) = self.entries.remove(id)?;
        // Every entry is in both indexes with these values (insert puts it there).
        self.by_expiry.remove(&(expires_at, *id));
        if let Some(set) = self.by_key.get_mut(&key) {
            set.remove(&(seq, *id));
            if set.is_empty() {
                self.by_key.remove(&key);
            }
        }
        Some(v)
    }

    /// Adds `v` under `id` for `key`, expiring at `expires_at`. The key's oldest goes when it
    /// has `max_per_key`; `false` when the table is full of live entries of other keys.
    fn insert(&mut self, now: i64, id: Digest, key: Digest, expires_at: i64, v: T) -> bool {
        self.expire(now);
        if let Some(set) = self.by_key.get(&key)
            && set.len() >= self.max_per_key
            && let Some(&(_, oldest)) = set.first()
        {
            self.remove(&oldest);
        }
        if self.entries.len() >= self.max {
            return false;
        }
        self.remove(&id);
        self.seq += 1;
        self.entries.insert(id, (v, key, self.seq, expires_at));
        self.by_expiry.insert((expires_at, id));
        self.by_key.entry(key).or_default().insert((self.seq, id));
        true
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The console's sessions and links.
#[derive(Debug)]
pub struct Book {
    sessions: Table<ConsoleSession>,
    links: Table<Link>,
}

impl Default for Book {
    fn default() -> Self {
        Book::with_limits(MAX_SESSIONS, MAX_SESSIONS_PER_KEY, MAX_LINKS, MAX_LINKS_PER_KEY)
    }
}

impl Book {
    /// A book with other bounds (tests).
    pub fn with_limits(
        sessions: usize,
        sessions_per_key: usize,
        links: usize,
        links_per_key: usize,
    ) -> Self {
        Book {
            sessions: Table::new(sessions, sessions_per_key),
            links: Table::new(links, links_per_key),
        }
    }

    /// A new console session under the cookie whose hash is `cookie`, for the access key whose
    /// hash is `key_hash`, from `now` for [`SESSION_LIFETIME_S`].
    pub fn open(
        &mut self,
        now: i64,
        cookie: Digest,
        csrf: String,
        key_hash: Digest,
    ) -> Result<ConsoleSession, Full> {
        let s = ConsoleSession { key_hash, csrf, expires_at: now + SESSION_LIFETIME_S };
        if self.sessions.insert(now, cookie, key_hash, s.expires_at, s.clone()) {
            Ok(s)
        } else {
            Err(Full::Sessions)
        }
    }

    /// The live console session of a cookie, if any (an expired one is dropped).
    pub fn session(&mut self, now: i64, cookie: &Digest) -> Option<ConsoleSession> {
        let s = self.sessions.entries.get(cookie).map(|e| e.0.clone())?;
        if s.expires_at <= now {
            self.sessions.remove(cookie);
            return None;
        }
        Some(s)
    }

    /// Ends a console session (logout, or its key no longer authenticates).
    pub fn close(&mut self, cookie: &Digest) -> bool {
        self.sessions.remove(cookie).is_some()
    }

    /// A new login link under the code whose hash is `code`, for [`LINK_LIFETIME_S`].
    pub fn add_link(
        &mut self,
        now: i64,
        code: Digest,
        key_hash: Digest,
        instance_id: Option<String>,
    ) -> Result<Link, Full> {
        let l = Link { key_hash, instance_id, expires_at: now + LINK_LIFETIME_S };
        if self.links.insert(now, code, key_hash, l.expires_at, l.clone()) {
            Ok(l)
        } else {
            Err(Full::Links)
        }
    }

    /// Takes a link: it is gone after this, whether it was still good or not (single use).
    pub fn take_link(&mut self, now: i64, code: &Digest) -> Option<Link> {
        let l = self.links.remove(code)?;
        (l.expires_at > now).then_some(l)
    }

    /// Live console sessions and waiting links (for tests and metrics).
    pub fn counts(&self) -> (usize, usize) {
        (self.sessions.len(), self.links.len())
    }
}

/// A console session just opened: the cookie's value (given to the browser once, kept here
/// only as its hash) and the session.
pub(crate) struct Opened {
    /// The cookie's value.
    pub cookie: String,
    /// The session (its CSRF token, its end).
    pub session: ConsoleSession,
    /// Who logged in.
    pub caller: Caller,
}

/// A login link just made: its code (in the URL, kept here only as its hash) and the link.
pub(crate) struct NewLink {
    /// The code.
    pub code: String,
    /// The link.
    pub link: Link,
}

/// The console's operations, for the handlers of [`super::console_api`]: log in with an
/// access key or a link, make a link, look a cookie up, log out.
impl Shared {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // Only map operations run under the lock; a panic in one leaves the maps consistent
        // enough to go on (at worst an index entry without its entry, dropped when it expires).
        self.console.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs in with an access key: a new console session for it, once the key authenticates.
    pub(crate) async fn console_login(
        &self,
        access_key: &str,
        peer: SocketAddr,
    ) -> Result<Opened, ApiError> {
        let caller = auth::authenticate_key(self, credentials::hash(access_key), peer).await?;
        self.console_open(caller)
    }

    /// Logs in with a login link's code: the link is spent by the try, good or not; its key
    /// must still authenticate. Answers the session and the instance the link names.
    pub(crate) async fn console_link_login(
        &self,
        code: &str,
        peer: SocketAddr,
    ) -> Result<(Opened, Option<String>), ApiError> {
        let taken = self.book().take_link(unix_now(), &credentials::hash(code));
        let Some(link) = taken else {
            self.metrics.auth_failed("console_link");
            info!(%peer, "console login link unknown, used or expired");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                codes::INVALID_TOKEN,
                "this login link is unknown, was used already or has expired: run hatch console \
                 again",
            ));
        };
        let caller = auth::authenticate_key(self, link.key_hash, peer).await?;
        Ok((self.console_open(caller)?, link.instance_id))
    }

    fn console_open(&self, caller: Caller) -> Result<Opened, ApiError> {
        let cookie = credentials::new_secret("");
        let csrf = hex::encode(credentials::random_bytes::<16>());
        let opened =
            self.book().open(unix_now(), credentials::hash(&cookie), csrf, caller.key_hash);
        match opened {
            Ok(session) => {
                info!(principal = caller.principal(), account = %caller.account.id,
                    key = %caller.key_id, "console login");
                Ok(Opened { cookie, session, caller })
            }
            Err(_) => {
                warn!(
                    max = MAX_SESSIONS,
                    "console login refused: the console session table is full"
                );
                Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    codes::THROTTLED,
                    "too many console sessions on this relay; try again later",
                ))
            }
        }
    }

    /// A one-time login link for the caller (and, with `instance_id`, for a terminal on that
    /// instance, which must be one the caller can see).
    pub(crate) async fn console_new_link(
        &self,
        caller: &Caller,
        instance_id: Option<String>,
    ) -> Result<NewLink, ApiError> {
        if let Some(id) = &instance_id {
            let not_found = || SessionError::InstanceNotFound(id.clone());
            if !credentials::valid_id(id, "i-") {
                return Err(not_found().into());
            }
            let (account, iid) = (caller.account.id.clone(), id.clone());
            let inst = self.blocking(move |s| s.instance(&account, &iid)).await?;
            let visible = inst
                .is_some_and(|i| caller.may(policy::DESCRIBE_INSTANCES, &i, &caller.context(&i)));
            if !visible {
                return Err(not_found().into());
            }
        }
        let code = credentials::new_secret("");
        let added = self.book().add_link(
            unix_now(),
            credentials::hash(&code),
            caller.key_hash,
            instance_id,
        );
        match added {
            Ok(link) => {
                info!(principal = caller.principal(), key = %caller.key_id,
                    instance = ?link.instance_id, "console login link issued");
                Ok(NewLink { code, link })
            }
            Err(_) => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                codes::THROTTLED,
                "too many login links waiting on this relay; try again later",
            )),
        }
    }

    /// The live console session of a cookie's value.
    pub(crate) fn console_session(&self, cookie: &str) -> Option<(Digest, ConsoleSession)> {
        let hash = credentials::hash(cookie);
        self.book().session(unix_now(), &hash).map(|s| (hash, s))
    }

    /// Ends a console session (logout; its key no longer authenticates).
    pub(crate) fn console_logout(&self, cookie: &Digest) {
        self.book().close(cookie);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        [n; 32]
    }

    #[test]
    fn a_session_lasts_its_lifetime_and_not_a_second_more() {
        let mut b = Book::default();
        let s = b.open(1000, d(1), "csrf".into(), d(9)).unwrap();
        assert_eq!(s.expires_at, 1000 + SESSION_LIFETIME_S);
        assert_eq!(b.session(1000 + SESSION_LIFETIME_S - 1, &d(1)), Some(s));
        assert_eq!(b.session(1000 + SESSION_LIFETIME_S, &d(1)), None);
        assert_eq!(b.counts(), (0, 0), "the expired session is dropped when looked up");
        assert_eq!(b.session(1000, &d(2)), None, "unknown cookie");
    }

    #[test]
    fn logout_ends_the_session() {
        let mut b = Book::default();
        b.open(0, d(1), "c".into(), d(9)).unwrap();
        assert!(b.close(&d(1)));
        assert!(!b.close(&d(1)));
        assert_eq!(b.session(1, &d(1)), None);
    }

    #[test]
    fn one_key_beyond_its_share_loses_its_oldest_session_not_others() {
        let mut b = Book::with_limits(100, 3, 10, 2);
        b.open(0, d(50), "other".into(), d(8)).unwrap();
        for i in 1..=4 {
            b.open(i, d(i as u8), format!("c{i}"), d(9)).unwrap();
        }
        assert_eq!(b.session(10, &d(1)), None, "the key's oldest went");
        for i in 2..=4 {
            assert!(b.session(10, &d(i)).is_some(), "{i}");
        }
        assert!(b.session(10, &d(50)).is_some(), "another key's session stays");
        assert_eq!(b.counts().0, 4);
    }

    #[test]
    fn a_full_book_refuses_until_sessions_expire() {
        let mut b = Book::with_limits(2, 8, 10, 2);
        b.open(0, d(1), "a".into(), d(7)).unwrap();
        b.open(5, d(2), "b".into(), d(8)).unwrap();
        assert_eq!(b.open(6, d(3), "c".into(), d(9)), Err(Full::Sessions));
        // The first expires at SESSION_LIFETIME_S: then there is room.
        assert_eq!(b.open(SESSION_LIFETIME_S - 1, d(3), "c".into(), d(9)), Err(Full::Sessions));
        assert!(b.open(SESSION_LIFETIME_S, d(3), "c".into(), d(9)).is_ok());
        assert_eq!(b.session(SESSION_LIFETIME_S, &d(1)), None);
        assert!(b.session(SESSION_LIFETIME_S, &d(2)).is_some());
        assert_eq!(b.counts().0, 2);
    }

    #[test]
    fn a_link_works_once_and_only_before_it_expires() {
        let mut b = Book::default();
        let l = b.add_link(100, d(1), d(9), Some("i-0123456789abcdef".into())).unwrap();
        assert_eq!(l.expires_at, 100 + LINK_LIFETIME_S);
        assert_eq!(b.take_link(101, &d(1)), Some(l));
        assert_eq!(b.take_link(101, &d(1)), None, "second use");

        b.add_link(100, d(2), d(9), None).unwrap();
        assert_eq!(b.take_link(100 + LINK_LIFETIME_S, &d(2)), None, "expired");
        assert_eq!(b.counts(), (0, 0), "an expired link is gone after the try too");
        assert_eq!(b.take_link(0, &d(3)), None, "unknown");
    }

    #[test]
    fn links_are_bounded_per_key_and_in_all() {
        let mut b = Book::with_limits(10, 2, 3, 2);
        b.add_link(0, d(1), d(9), None).unwrap();
        b.add_link(1, d(2), d(9), None).unwrap();
        b.add_link(2, d(3), d(9), None).unwrap();
        assert_eq!(b.take_link(3, &d(1)), None, "the key's oldest link was voided");
        b.add_link(3, d(4), d(8), None).unwrap();
        assert_eq!(b.add_link(4, d(5), d(7), None), Err(Full::Links));
        // Expired links make room.
        assert!(b.add_link(LINK_LIFETIME_S + 3, d(5), d(7), None).is_ok());
        assert_eq!(b.counts().1, 1);
    }

    #[test]
    fn expired_entries_go_in_expiry_order_as_new_ones_come() {
        let mut b = Book::with_limits(1000, 1000, 10, 10);
        for i in 0..100u8 {
            b.open(i as i64, d(i), "c".into(), d(200)).unwrap();
        }
        // At 50 + lifetime the first 51 have expired; a new login drops exactly them.
        b.open(50 + SESSION_LIFETIME_S, d(250), "c".into(), d(201)).unwrap();
        assert_eq!(b.counts().0, 100 - 51 + 1);
        assert!(b.session(50 + SESSION_LIFETIME_S, &d(51)).is_some());
    }
}
