//! [`PgStore`]: the store on PostgreSQL, for relays that share one database (a fleet).
//!
//! The same [`Store`] contract as the SQLite store, method for method: the store test suite
//! (`store/suite.rs`) runs against both. Calls are synchronous, as the trait is (the control
//! plane runs them in `spawn_blocking`), on a small fixed set of connections opened lazily and
//! reopened when the server dropped one.
//!
//! Concurrency between relays comes from the database: every read-then-write is one
//! transaction that locks the rows it read (`FOR UPDATE`), so two relays registering the last
//! slot of an activation, or deleting a policy while another attaches it, serialize there.
//! Schema migrations run under a transaction-scoped advisory lock, so relays starting together
//! migrate once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Transaction};

use super::{
    AccessKey, Account, Activation, AgentChannel, AuditRecord, CloseReason, ExpiredNode, Instance,
    KeyOwner, Mode, Node, OpenLimits, OverLimit, PolicyDeleted, PolicyRecord, RecordingMode,
    RegisterError, SessionPrefs, SessionRecord, SessionState, StateFilter, Store, Tags, User, Wake,
};

/// Connections per store: the API's blocking pool runs store calls in parallel; more than a
/// few gains nothing on a 2-core relay and costs the server a backend each.
const CONNECTIONS: usize = 8;

/// Key of the advisory lock migrations run under ("hatch" in ASCII).
const MIGRATION_LOCK: i64 = 0x0068_6174_6368;

/// Schema migrations, applied in order; `hatch_schema.version` counts those applied. The
/// first is the SQLite store's schema as of its migration 8, in PostgreSQL's types; the second
/// its migration 9 (fleets), with the triggers that wake other nodes.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    session_manager_enabled BOOLEAN NOT NULL DEFAULT TRUE,
    created_at BIGINT NOT NULL,
    iam_generation BIGINT NOT NULL DEFAULT 0,
    idle_timeout_s BIGINT,
    max_duration_s BIGINT
);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    disabled_at BIGINT,
    UNIQUE (account_id, name)
);
CREATE TABLE access_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    user_id TEXT REFERENCES users(id),
    secret_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX access_keys_account ON access_keys (account_id);
CREATE TABLE policies (
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    document TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, name)
);
CREATE TABLE policy_attachments (
    account_id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    policy_name TEXT NOT NULL,
    PRIMARY KEY (user_id, policy_name),
    FOREIGN KEY (account_id, policy_name) REFERENCES policies(account_id, name)
);
CREATE INDEX policy_attachments_policy ON policy_attachments (account_id, policy_name);
CREATE TABLE activations (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    code_hash BYTEA NOT NULL,
    region TEXT NOT NULL,
    tags TEXT NOT NULL,
    max_registrations INTEGER NOT NULL,
    registrations INTEGER NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    activation_id TEXT NOT NULL,
    region TEXT NOT NULL,
    tags TEXT NOT NULL,
    hostname TEXT,
    secret_hash BYTEA NOT NULL UNIQUE,
    registered_at BIGINT NOT NULL,
    last_seen BIGINT,
    secret_revoked_at BIGINT
);
CREATE INDEX instances_account ON instances (account_id);
CREATE TABLE sessions (
    seq BIGSERIAL UNIQUE,
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    access_key_id TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    command TEXT,
    run_as TEXT,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    connected_at BIGINT,
    closed_at BIGINT,
    close_reason TEXT,
    bytes_client_to_agent BIGINT NOT NULL DEFAULT 0,
    bytes_agent_to_client BIGINT NOT NULL DEFAULT 0,
    detached_at BIGINT,
    remote_host TEXT,
    remote_port INTEGER
);
CREATE INDEX sessions_account_seq ON sessions (account_id, seq);
CREATE INDEX sessions_open ON sessions (state) WHERE state <> 'closed';
CREATE INDEX sessions_closed_at ON sessions (closed_at) WHERE closed_at IS NOT NULL;
"#,
    // Fleets: the node holding each session, the nodes, which node holds each agent's control
    // channel, mail between nodes, the signing keys they share, and the notifications that wake
    // them (a hint only: every change is in the tables, and each node polls them anyway).
    r#"
ALTER TABLE sessions ADD COLUMN node_id TEXT;
CREATE INDEX sessions_open_account ON sessions (account_id, instance_id) WHERE state <> 'closed';
CREATE INDEX sessions_open_node ON sessions (node_id) WHERE state <> 'closed';
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    api_url TEXT NOT NULL,
    data_url TEXT NOT NULL,
    run TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
CREATE TABLE agent_channels (
    instance_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    default_user TEXT NOT NULL,
    switch_user BOOLEAN NOT NULL
);
CREATE TABLE node_mail (
    id BIGSERIAL PRIMARY KEY,
    node_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX node_mail_node ON node_mail (node_id, id);
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    pkcs8 BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE FUNCTION hatch_wake_mail() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hatch_mail', NEW.node_id);
    RETURN NULL;
END $$;
CREATE TRIGGER node_mail_wake AFTER INSERT ON node_mail
    FOR EACH ROW EXECUTE FUNCTION hatch_wake_mail();
CREATE FUNCTION hatch_wake_reconcile() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hatch_reconcile', '');
    RETURN NULL;
END $$;
CREATE TRIGGER sessions_ended_elsewhere AFTER UPDATE OF state ON sessions
    FOR EACH ROW WHEN (NEW.state = 'closed' AND OLD.state <> 'closed'
        AND NEW.close_reason IN ('terminated', 'access_revoked'))
    EXECUTE FUNCTION hatch_wake_reconcile();
CREATE TRIGGER accounts_changed AFTER UPDATE ON accounts
    FOR EACH ROW WHEN (OLD.session_manager_enabled IS DISTINCT FROM NEW.session_manager_enabled
        OR OLD.iam_generation IS DISTINCT FROM NEW.iam_generation)
    EXECUTE FUNCTION hatch_wake_reconcile();
"#,
    // Open sessions counted per account, instance and principal as they open and close, so
    // that admitting a session reads three rows instead of counting an account's open sessions
    // (which made a fleet's admissions quadratic in its sessions).
    r#"
CREATE TABLE open_counts (
    scope TEXT PRIMARY KEY,
    n BIGINT NOT NULL
);
CREATE FUNCTION hatch_count_open() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d INTEGER := 0;
    r sessions%ROWTYPE;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state <> 'closed' THEN d := 1; r := NEW; END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF OLD.state <> 'closed' THEN d := -1; r := OLD; END IF;
    ELSIF OLD.state <> 'closed' AND NEW.state = 'closed' THEN
        d := -1; r := NEW;
    ELSIF OLD.state = 'closed' AND NEW.state <> 'closed' THEN
        d := 1; r := NEW;
    END IF;
    IF d <> 0 THEN
        INSERT INTO open_counts AS c (scope, n) VALUES
            ('a:' || r.account_id, d),
            ('i:' || r.instance_id, d),
            ('u:' || r.account_id || '/' || r.principal, d)
        ON CONFLICT (scope) DO UPDATE SET n = c.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sessions_count_open AFTER INSERT OR DELETE OR UPDATE OF state ON sessions
    FOR EACH ROW EXECUTE FUNCTION hatch_count_open();
INSERT INTO open_counts (scope, n)
    SELECT 'a:' || account_id, COUNT(*) FROM sessions WHERE state <> 'closed' GROUP BY account_id
    UNION ALL
    SELECT 'i:' || instance_id, COUNT(*) FROM sessions WHERE state <> 'closed' GROUP BY instance_id
    UNION ALL
    SELECT 'u:' || account_id || '/' || principal, COUNT(*) FROM sessions
        WHERE state <> 'closed' GROUP BY account_id, principal;
"#,
    // Session recording (issue 16): the account's setting, the mode each session was started
    // with (its resumes keep it), and the final digest of its recording once it ended.
    r#"
ALTER TABLE accounts ADD COLUMN recording TEXT NOT NULL DEFAULT 'off';
ALTER TABLE sessions ADD COLUMN recording TEXT NOT NULL DEFAULT 'off';
ALTER TABLE sessions ADD COLUMN recording_digest TEXT;
"#,
    // The audit log (control::audit), as SQLite's migration 11.
    r#"
CREATE TABLE audit_events (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    account_id TEXT,
    line TEXT NOT NULL
);
CREATE INDEX audit_events_account ON audit_events (account_id, seq);
"#,
];

/// The PostgreSQL store.
pub struct PgStore {
    url: String,
    conns: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &redacted(&self.url)).finish_non_exhaustive()
    }
}

/// A URL with its password, if any, replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((auth, host)) = rest.rsplit_once('@') else { return url.to_owned() };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, libpq's URL form) and runs pending
    /// migrations. Fails with a message naming the server (never the password).
    pub fn open(url: &str) -> anyhow::Result<Self> {
        let store = PgStore {
            url: url.to_owned(),
            conns: (0..CONNECTIONS).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        };
        store.migrate().with_context(|| format!("PostgreSQL store {}", redacted(url)))?;
        Ok(store)
    }

    fn connect(&self) -> anyhow::Result<Client> {
        let mut cfg: postgres::Config = self.url.parse().context("not a PostgreSQL URL")?;
        // Every wait on the server has a deadline.
        cfg.connect_timeout(std::time::Duration::from_secs(10));
        cfg.application_name("hatch-relay");
        let mut c = cfg.connect(NoTls).context("connecting")?;
        // A statement stuck on a lock fails instead of holding a blocking thread forever.
        c.batch_execute("SET statement_timeout = '30s'; SET lock_timeout = '10s'")?;
        Ok(c)
    }

    /// Runs `f` on a connection: a free one if any, else waits for the next in turn. A
    /// connection the server closed is replaced; `f` is not retried (it may have written).
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.conns.len();
        let mut guard = (0..n)
            .find_map(|i| self.conns[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| self.conns[start % n].lock().unwrap_or_else(|p| p.into_inner()));
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect()?);
        }
        let client = guard.as_mut().expect("connected above");
        let out = f(client);
        if client.is_closed() {
            *guard = None;
        }
        out
    }

    /// [`Self::exec`] for a bulk close, which PostgreSQL may abort as a deadlock's victim:
    /// through [`Self::tx`], which runs it again then.
    fn exec_retried(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> anyhow::Result<u64> {
        self.tx(|tx| Ok(tx.execute(sql, params)?))
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`. A transaction the server
    /// aborted as a deadlock's victim (two bulk closes updating the same open-session counters
    /// in different orders: a node starting while another expires a dead one) is run again, up
    /// to [`DEADLOCK_RETRIES`] times: it had no effect.
    fn tx<T>(
        &self,
        mut f: impl FnMut(&mut Transaction<'_>) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut tries = 0;
        loop {
            let res = self.with(|c| {
                let mut tx = c.transaction()?;
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            });
            match res {
                Err(e) if tries < DEADLOCK_RETRIES && is_deadlock(&e) => {
                    tries += 1;
                    tracing::info!(
                        tries,
                        "PostgreSQL chose this transaction as a deadlock's victim; running it again"
                    );
                }
                other => return other,
            }
        }
    }

    fn one<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        row: impl FnOnce(&Row) -> anyhow::Result<T>,
    ) -> anyhow::Result<Option<T>> {
        self.with(|c| c.query_opt(sql, params)?.as_ref().map(row).transpose())
    }

    fn all<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        row: impl FnMut(&Row) -> anyhow::Result<T>,
    ) -> anyhow::Result<Vec<T>> {
        self.with(|c| c.query(sql, params)?.iter().map(row).collect())
    }

    fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> anyhow::Result<u64> {
        self.with(|c| Ok(c.execute(sql, params)?))
    }

    fn migrate(&self) -> anyhow::Result<()> {
        self.tx(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS hatch_schema (version INTEGER NOT NULL)")?;
            let version: Option<i32> =
                tx.query_opt("SELECT version FROM hatch_schema", &[])?.map(|r| r.get(0));
            let version = usize::try_from(version.unwrap_or(0)).unwrap_or(0);
            anyhow::ensure!(
                version <= MIGRATIONS.len(),
                "store schema version {version} is newer than this relay ({})",
                MIGRATIONS.len()
            );
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
                tx.batch_execute(sql).with_context(|| format!("migration {}", i + 1))?;
            }
            let v = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
            tx.execute("DELETE FROM hatch_schema", &[])?;
            tx.execute("INSERT INTO hatch_schema (version) VALUES ($1)", &[&v])?;
            Ok(())
        })
    }
}

/// Inserts a session record on `c` (a connection, or the caller's transaction).
fn insert_session(c: &mut impl GenericClient, s: &SessionRecord) -> anyhow::Result<()> {
    let command = s.command.as_ref().map(serde_json::to_string).transpose()?;
    let port = s.remote_port.map(i32::from);
    c.execute(
        &format!(
            "INSERT INTO sessions ({SESSION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
             $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)"
        ),
        &[
            &s.id,
            &s.account_id,
            &s.principal,
            &s.access_key_id,
            &s.source_ip,
            &s.instance_id,
            &s.mode.as_str(),
            &command,
            &s.run_as,
            &s.state.as_str(),
            &s.created_at,
            &s.expires_at,
            &s.connected_at,
            &s.closed_at,
            &s.close_reason.map(CloseReason::as_str),
            &to_i64(s.bytes_client_to_agent),
            &to_i64(s.bytes_agent_to_client),
            &s.detached_at,
            &s.remote_host,
            &port,
            &s.node_id,
            &s.recording.as_str(),
            &s.recording_digest,
        ],
    )?;
    Ok(())
}

/// Times a transaction aborted as a deadlock's victim is run again.
const DEADLOCK_RETRIES: u32 = 5;

/// Whether `e` is PostgreSQL's "deadlock detected" (SQLSTATE 40P01).
fn is_deadlock(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<postgres::Error>()
            .and_then(postgres::Error::code)
            .is_some_and(|code| *code == postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
    })
}

/// Key of the advisory locks that serialize session admissions per account (with the
/// account's hash as the second key): "admit" in ASCII.
const ADMIT_LOCK: i32 = 0x6164_6d69;

/// How long the listener waits for a notification before it checks that its receiver is still
/// there (the relay did not shut down).
const LISTEN_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The listener thread of [`Store::listen`]: its own connection, `LISTEN` on both channels,
/// each notification turned into a [`Wake`] (coalesced by `try_send` on a channel of two).
/// Reconnects after a second when the server goes away, waking both kinds then. Returns when
/// the receiver is dropped.
fn listen_loop(url: &str, node: &str, tx: &tokio::sync::mpsc::Sender<Wake>) {
    use tokio::sync::mpsc::error::TrySendError;
    let send = |w: Wake| !matches!(tx.try_send(w), Err(TrySendError::Closed(_)));
    let mut first = true;
    loop {
        let conn = (|| {
            let mut cfg: postgres::Config = url.parse().context("not a PostgreSQL URL")?;
            cfg.connect_timeout(std::time::Duration::from_secs(10));
            cfg.application_name("hatch-relay listen");
            let mut c = cfg.connect(NoTls).context("connecting")?;
            c.batch_execute("LISTEN hatch_mail; LISTEN hatch_reconcile")?;
            anyhow::Ok(c)
        })();
        let mut c = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(err = %format!("{e:#}"), "PostgreSQL listener cannot connect; \
                    retrying in 1 s (nodes poll the store meanwhile)");
                std::thread::sleep(std::time::Duration::from_secs(1));
                if tx.is_closed() {
                    return;
                }
                continue;
            }
        };
        // Anything sent while no connection listened was missed: look at both now.
        if !first {
            let delivered = send(Wake::Mail) && send(Wake::Reconcile);
            if !delivered {
                return;
            }
        }
        first = false;
        loop {
            if tx.is_closed() {
                return;
            }
            let next = {
                let mut notes = c.notifications();
                let mut it = notes.timeout_iter(LISTEN_POLL);
                postgres::fallible_iterator::FallibleIterator::next(&mut it)
                    .map(|n| n.map(|n| (n.channel().to_owned(), n.payload().to_owned())))
            };
            match next {
                Ok(Some((channel, payload))) => {
                    let wake = match channel.as_str() {
                        "hatch_mail" if payload == node => Wake::Mail,
                        "hatch_mail" => continue,
                        _ => Wake::Reconcile,
                    };
                    if !send(wake) {
                        return;
                    }
                }
                Ok(None) => {
                    if c.is_closed() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(err = %e, "PostgreSQL listener lost its connection; reconnecting");
                    break;
                }
            }
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn bump_iam(tx: &mut Transaction<'_>, account_id: &str) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE accounts SET iam_generation = iam_generation + 1 WHERE id = $1",
        &[&account_id],
    )?;
    Ok(())
}

fn tags_of(r: &Row, col: usize) -> anyhow::Result<Tags> {
    let s: String = r.try_get(col)?;
    serde_json::from_str(&s).with_context(|| format!("column {col}: tags are not JSON"))
}

fn account_row(r: &Row) -> anyhow::Result<Account> {
    Ok(Account {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        session_manager_enabled: r.try_get(2)?,
        created_at: r.try_get(3)?,
        prefs: SessionPrefs {
            idle_timeout_s: r.try_get::<_, Option<i64>>(4)?.map(to_u64),
            max_duration_s: r.try_get::<_, Option<i64>>(5)?.map(to_u64),
            recording: named(r, 6, RecordingMode::parse)?,
        },
    })
}

const ACCOUNT_COLS: &str =
    "id, name, session_manager_enabled, created_at, idle_timeout_s, max_duration_s, recording";

const USER_COLS: &str = "id, account_id, name, created_at, disabled_at";

fn user_row(r: &Row) -> anyhow::Result<User> {
    Ok(User {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        name: r.try_get(2)?,
        created_at: r.try_get(3)?,
        disabled_at: r.try_get(4)?,
    })
}

fn key_row(r: &Row) -> anyhow::Result<AccessKey> {
    Ok(AccessKey {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        user_id: r.try_get(2)?,
        created_at: r.try_get(3)?,
        revoked_at: r.try_get(4)?,
    })
}

fn policy_row(r: &Row) -> anyhow::Result<PolicyRecord> {
    Ok(PolicyRecord {
        account_id: r.try_get(0)?,
        name: r.try_get(1)?,
        document: r.try_get(2)?,
        updated_at: r.try_get(3)?,
    })
}

const ACTIVATION_COLS: &str = "id, account_id, region, tags, max_registrations, registrations, \
     expires_at, created_at, revoked_at";

fn activation_row(r: &Row) -> anyhow::Result<Activation> {
    Ok(Activation {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        region: r.try_get(2)?,
        tags: tags_of(r, 3)?,
        max_registrations: u32::try_from(r.try_get::<_, i32>(4)?).unwrap_or(0),
        registrations: u32::try_from(r.try_get::<_, i32>(5)?).unwrap_or(0),
        expires_at: r.try_get(6)?,
        created_at: r.try_get(7)?,
        revoked_at: r.try_get(8)?,
    })
}

const INSTANCE_COLS: &str = "id, account_id, region, tags, hostname, activation_id, \
     registered_at, last_seen, secret_revoked_at";

fn instance_row(r: &Row) -> anyhow::Result<Instance> {
    Ok(Instance {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        region: r.try_get(2)?,
        tags: tags_of(r, 3)?,
        hostname: r.try_get(4)?,
        activation_id: r.try_get(5)?,
        registered_at: r.try_get(6)?,
        last_seen: r.try_get(7)?,
        secret_revoked_at: r.try_get(8)?,
    })
}

const SESSION_COLS: &str = "id, account_id, principal, access_key_id, source_ip, instance_id, \
     mode, command, run_as, state, created_at, expires_at, connected_at, closed_at, \
     close_reason, bytes_client_to_agent, bytes_agent_to_client, detached_at, remote_host, \
     remote_port, node_id, recording, recording_digest";

/// A name column read into its enum; a name this version does not know is an error naming the
/// column and the value, never a silent default.
fn named<T>(r: &Row, col: usize, parse: fn(&str) -> Option<T>) -> anyhow::Result<T> {
    let s: String = r.try_get(col)?;
    parse(&s).with_context(|| format!("column {col}: unknown name {s:?}"))
}

fn session_row(r: &Row) -> anyhow::Result<SessionRecord> {
    let command: Option<String> = r.try_get(7)?;
    Ok(SessionRecord {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        principal: r.try_get(2)?,
        access_key_id: r.try_get(3)?,
        source_ip: r.try_get(4)?,
        instance_id: r.try_get(5)?,
        mode: named(r, 6, Mode::parse)?,
        command: command
            .map(|c| serde_json::from_str(&c))
            .transpose()
            .context("column 7: command is not JSON")?,
        run_as: r.try_get(8)?,
        state: named(r, 9, SessionState::parse)?,
        created_at: r.try_get(10)?,
        expires_at: r.try_get(11)?,
        connected_at: r.try_get(12)?,
        closed_at: r.try_get(13)?,
        close_reason: match r.try_get::<_, Option<String>>(14)? {
            None => None,
            Some(s) => {
                Some(CloseReason::parse(&s).with_context(|| format!("column 14: unknown {s:?}"))?)
            }
        },
        bytes_client_to_agent: to_u64(r.try_get(15)?),
        bytes_agent_to_client: to_u64(r.try_get(16)?),
        detached_at: r.try_get(17)?,
        remote_host: r.try_get(18)?,
        remote_port: r.try_get::<_, Option<i32>>(19)?.and_then(|p| u16::try_from(p).ok()),
        node_id: r.try_get(20)?,
        recording: named(r, 21, RecordingMode::parse)?,
        recording_digest: r.try_get(22)?,
    })
}

impl Store for PgStore {
    fn create_account(&self, a: &Account) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO accounts (id, name, session_manager_enabled, created_at, idle_timeout_s, \
             max_duration_s, recording) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &a.id,
                &a.name,
                &a.session_manager_enabled,
                &a.created_at,
                &a.prefs.idle_timeout_s.map(to_i64),
                &a.prefs.max_duration_s.map(to_i64),
                &a.prefs.recording.as_str(),
            ],
        )?;
        Ok(())
    }

    fn account(&self, id: &str) -> anyhow::Result<Option<Account>> {
        self.one(&format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE id = $1"), &[&id], account_row)
    }

    fn accounts(&self) -> anyhow::Result<Vec<Account>> {
        self.all(
            &format!("SELECT {ACCOUNT_COLS} FROM accounts ORDER BY created_at, id"),
            &[],
            account_row,
        )
    }

    fn set_session_manager(&self, account_id: &str, enabled: bool) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE accounts SET session_manager_enabled = $2 WHERE id = $1",
            &[&account_id, &enabled],
        )?;
        Ok(n == 1)
    }

    fn set_session_prefs(&self, account_id: &str, prefs: SessionPrefs) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE accounts SET idle_timeout_s = $2, max_duration_s = $3, recording = $4 \
             WHERE id = $1",
            &[
                &account_id,
                &prefs.idle_timeout_s.map(to_i64),
                &prefs.max_duration_s.map(to_i64),
                &prefs.recording.as_str(),
            ],
        )?;
        Ok(n == 1)
    }

    fn create_user(&self, u: &User) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO users (id, account_id, name, created_at) VALUES ($1, $2, $3, $4)",
            &[&u.id, &u.account_id, &u.name, &u.created_at],
        )?;
        Ok(())
    }

    fn user(&self, id: &str) -> anyhow::Result<Option<User>> {
        self.one(&format!("SELECT {USER_COLS} FROM users WHERE id = $1"), &[&id], user_row)
    }

    fn user_by_name(&self, account_id: &str, name: &str) -> anyhow::Result<Option<User>> {
        self.one(
            &format!("SELECT {USER_COLS} FROM users WHERE account_id = $1 AND name = $2"),
            &[&account_id, &name],
            user_row,
        )
    }

    fn users(&self, account_id: &str) -> anyhow::Result<Vec<User>> {
        self.all(
            &format!("SELECT {USER_COLS} FROM users WHERE account_id = $1 ORDER BY name"),
            &[&account_id],
            user_row,
        )
    }

    fn set_user_disabled(&self, user_id: &str, disabled_at: Option<i64>) -> anyhow::Result<bool> {
        self.tx(|tx| {
            let Some(r) =
                tx.query_opt("SELECT account_id FROM users WHERE id = $1 FOR UPDATE", &[&user_id])?
            else {
                return Ok(false);
            };
            let account: String = r.try_get(0)?;
            tx.execute(
                "UPDATE users SET disabled_at = $2 WHERE id = $1",
                &[&user_id, &disabled_at],
            )?;
            bump_iam(tx, &account)?;
            Ok(true)
        })
    }

    fn delete_user(&self, user_id: &str) -> anyhow::Result<bool> {
        self.tx(|tx| {
            let Some(r) =
                tx.query_opt("SELECT account_id FROM users WHERE id = $1 FOR UPDATE", &[&user_id])?
            else {
                return Ok(false);
            };
            let account: String = r.try_get(0)?;
            tx.execute("DELETE FROM policy_attachments WHERE user_id = $1", &[&user_id])?;
            tx.execute("DELETE FROM access_keys WHERE user_id = $1", &[&user_id])?;
            tx.execute("DELETE FROM users WHERE id = $1", &[&user_id])?;
            bump_iam(tx, &account)?;
            Ok(true)
        })
    }

    fn iam_generation(&self, account_id: &str) -> anyhow::Result<i64> {
        Ok(self
            .one("SELECT iam_generation FROM accounts WHERE id = $1", &[&account_id], |r| {
                Ok(r.try_get(0)?)
            })?
            .unwrap_or(0))
    }

    fn insert_access_key(&self, k: &AccessKey, secret_hash: &[u8; 32]) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO access_keys (id, account_id, user_id, secret_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&k.id, &k.account_id, &k.user_id, &&secret_hash[..], &k.created_at],
        )?;
        Ok(())
    }

    fn access_key_owner(&self, secret_hash: &[u8; 32]) -> anyhow::Result<Option<KeyOwner>> {
        self.one(
            "SELECT k.id, k.account_id, k.user_id FROM access_keys k \
             LEFT JOIN users u ON u.id = k.user_id \
             WHERE k.secret_hash = $1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL",
            &[&&secret_hash[..]],
            |r| {
                Ok(KeyOwner {
                    key_id: r.try_get(0)?,
                    account_id: r.try_get(1)?,
                    user_id: r.try_get(2)?,
                })
            },
        )
    }

    fn access_keys(&self, account_id: &str) -> anyhow::Result<Vec<AccessKey>> {
        self.all(
            "SELECT id, account_id, user_id, created_at, revoked_at FROM access_keys \
             WHERE account_id = $1 ORDER BY created_at, id",
            &[&account_id],
            key_row,
        )
    }

    fn revoke_access_key(&self, key_id: &str, now: i64) -> anyhow::Result<bool> {
        self.tx(|tx| {
            let Some(r) = tx.query_opt(
                "UPDATE access_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL \
                 RETURNING account_id",
                &[&key_id, &now],
            )?
            else {
                return Ok(false);
            };
            let account: String = r.try_get(0)?;
            bump_iam(tx, &account)?;
            Ok(true)
        })
    }

    fn put_policy(&self, p: &PolicyRecord) -> anyhow::Result<()> {
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO policies (account_id, name, document, updated_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, name) \
                 DO UPDATE SET document = $3, updated_at = $4",
                &[&p.account_id, &p.name, &p.document, &p.updated_at],
            )?;
            // A replaced document may allow less.
            bump_iam(tx, &p.account_id)
        })
    }

    fn policies(&self, account_id: &str) -> anyhow::Result<Vec<PolicyRecord>> {
        self.all(
            "SELECT account_id, name, document, updated_at FROM policies WHERE account_id = $1 \
             ORDER BY name",
            &[&account_id],
            policy_row,
        )
    }

    fn attach_policy(&self, account_id: &str, user_id: &str, name: &str) -> anyhow::Result<bool> {
        self.tx(|tx| {
            // FOR SHARE: a concurrent delete of the policy waits for this attachment, then
            // sees it.
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM policies WHERE account_id = $1 AND name = $2 FOR SHARE",
                    &[&account_id, &name],
                )?
                .is_some();
            if !exists {
                return Ok(false);
            }
            let n = tx.execute(
                "INSERT INTO policy_attachments (account_id, user_id, policy_name) \
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&account_id, &user_id, &name],
            )?;
            if n == 1 {
                // A Deny attached takes access away too.
                bump_iam(tx, account_id)?;
            }
            Ok(true)
        })
    }

    fn detach_policy(&self, account_id: &str, user_id: &str, name: &str) -> anyhow::Result<bool> {
        self.tx(|tx| {
            let n = tx.execute(
                "DELETE FROM policy_attachments WHERE account_id = $1 AND user_id = $2 \
                 AND policy_name = $3",
                &[&account_id, &user_id, &name],
            )?;
            if n == 1 {
                bump_iam(tx, account_id)?;
            }
            Ok(n == 1)
        })
    }

    fn user_policies(&self, user_id: &str) -> anyhow::Result<Vec<PolicyRecord>> {
        self.all(
            "SELECT p.account_id, p.name, p.document, p.updated_at FROM policy_attachments a \
             JOIN policies p ON p.account_id = a.account_id AND p.name = a.policy_name \
             WHERE a.user_id = $1 ORDER BY p.name",
            &[&user_id],
            policy_row,
        )
    }

    fn policy_attachments(&self, account_id: &str) -> anyhow::Result<Vec<(String, String)>> {
        self.all(
            "SELECT user_id, policy_name FROM policy_attachments WHERE account_id = $1 \
             ORDER BY user_id, policy_name",
            &[&account_id],
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )
    }

    fn delete_policy(&self, account_id: &str, name: &str) -> anyhow::Result<PolicyDeleted> {
        self.tx(|tx| {
            let locked = tx.query_opt(
                "SELECT 1 FROM policies WHERE account_id = $1 AND name = $2 FOR UPDATE",
                &[&account_id, &name],
            )?;
            if locked.is_none() {
                return Ok(PolicyDeleted::NotFound);
            }
            let users: Vec<String> = tx
                .query(
                    "SELECT user_id FROM policy_attachments WHERE account_id = $1 \
                     AND policy_name = $2 ORDER BY user_id",
                    &[&account_id, &name],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if !users.is_empty() {
                return Ok(PolicyDeleted::Attached(users));
            }
            tx.execute(
                "DELETE FROM policies WHERE account_id = $1 AND name = $2",
                &[&account_id, &name],
            )?;
            Ok(PolicyDeleted::Deleted)
        })
    }

    fn insert_activation(&self, a: &Activation, code_hash: &[u8; 32]) -> anyhow::Result<()> {
        let max = i32::try_from(a.max_registrations).context("max registrations")?;
        let done = i32::try_from(a.registrations).context("registrations")?;
        self.exec(
            "INSERT INTO activations (id, account_id, code_hash, region, tags, max_registrations, \
             registrations, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &a.id,
                &a.account_id,
                &&code_hash[..],
                &a.region,
                &serde_json::to_string(&a.tags)?,
                &max,
                &done,
                &a.expires_at,
                &a.created_at,
            ],
        )?;
        Ok(())
    }

    fn activations(&self, account_id: Option<&str>) -> anyhow::Result<Vec<Activation>> {
        self.all(
            &format!(
                "SELECT {ACTIVATION_COLS} FROM activations \
                 WHERE $1::text IS NULL OR account_id = $1 ORDER BY created_at, id"
            ),
            &[&account_id],
            activation_row,
        )
    }

    fn revoke_activation(&self, account_id: &str, id: &str, now: i64) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE activations SET revoked_at = $3 \
             WHERE id = $1 AND account_id = $2 AND revoked_at IS NULL",
            &[&id, &account_id, &now],
        )?;
        Ok(n == 1)
    }

    fn register_instance(
        &self,
        activation_id: &str,
        code_hash: &[u8; 32],
        instance_id: &str,
        secret_hash: &[u8; 32],
        hostname: Option<&str>,
        now: i64,
    ) -> Result<Instance, RegisterError> {
        let res = self.tx(|tx| {
            // FOR UPDATE: relays registering with the same activation take its slots in turn.
            let row = tx.query_opt(
                &format!(
                    "SELECT {ACTIVATION_COLS}, code_hash FROM activations WHERE id = $1 FOR UPDATE"
                ),
                &[&activation_id],
            )?;
            let Some(row) = row else { return Ok(Err(RegisterError::BadActivation)) };
            let act = activation_row(&row)?;
            let stored: Vec<u8> = row.try_get(9)?;
            let inst = match act.admit(&stored, code_hash, instance_id, hostname, now) {
                Ok(i) => i,
                Err(refused) => return Ok(Err(refused)),
            };
            tx.execute(
                "UPDATE activations SET registrations = registrations + 1 WHERE id = $1",
                &[&activation_id],
            )?;
            tx.execute(
                "INSERT INTO instances (id, account_id, activation_id, region, tags, hostname, \
                 secret_hash, registered_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &inst.id,
                    &inst.account_id,
                    &inst.activation_id,
                    &inst.region,
                    &serde_json::to_string(&inst.tags)?,
                    &inst.hostname,
                    &&secret_hash[..],
                    &now,
                ],
            )?;
            Ok(Ok(inst))
        });
        match res {
            Ok(r) => r,
            Err(e) => Err(RegisterError::Store(format!("{e:#}"))),
        }
    }

    fn instance_by_secret(&self, secret_hash: &[u8; 32]) -> anyhow::Result<Option<Instance>> {
        self.one(
            &format!("SELECT {INSTANCE_COLS} FROM instances WHERE secret_hash = $1"),
            &[&&secret_hash[..]],
            instance_row,
        )
    }

    fn instance(&self, account_id: &str, id: &str) -> anyhow::Result<Option<Instance>> {
        self.one(
            &format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = $1 AND account_id = $2"),
            &[&id, &account_id],
            instance_row,
        )
    }

    fn instances(&self, account_id: Option<&str>) -> anyhow::Result<Vec<Instance>> {
        self.all(
            &format!(
                "SELECT {INSTANCE_COLS} FROM instances WHERE $1::text IS NULL OR account_id = $1 \
                 ORDER BY registered_at, id"
            ),
            &[&account_id],
            instance_row,
        )
    }

    fn set_instance_tags(&self, id: &str, tags: &Tags) -> anyhow::Result<bool> {
        let json = serde_json::to_string(tags)?;
        self.tx(|tx| {
            let Some(r) = tx.query_opt(
                "UPDATE instances SET tags = $2 WHERE id = $1 RETURNING account_id",
                &[&id, &json],
            )?
            else {
                return Ok(false);
            };
            let account: String = r.try_get(0)?;
            // Policies condition on tags: new tags may allow less.
            bump_iam(tx, &account)?;
            Ok(true)
        })
    }

    fn touch_instance(&self, id: &str, now: i64) -> anyhow::Result<()> {
        self.exec("UPDATE instances SET last_seen = $2 WHERE id = $1", &[&id, &now])?;
        Ok(())
    }

    fn deregister_instance(&self, account_id: &str, id: &str) -> anyhow::Result<bool> {
        self.tx(|tx| {
            let n = tx.execute(
                "DELETE FROM instances WHERE id = $1 AND account_id = $2",
                &[&id, &account_id],
            )?;
            if n == 1 {
                bump_iam(tx, account_id)?;
            }
            Ok(n == 1)
        })
    }

    fn revoke_instance_secret(&self, account_id: &str, id: &str, now: i64) -> anyhow::Result<bool> {
        let worthless = crate::control::credentials::random_bytes::<32>();
        self.tx(|tx| {
            let n = tx.execute(
                "UPDATE instances SET secret_hash = $3, secret_revoked_at = $4 \
                 WHERE id = $1 AND account_id = $2",
                &[&id, &account_id, &&worthless[..], &now],
            )?;
            if n == 1 {
                bump_iam(tx, account_id)?;
            }
            Ok(n == 1)
        })
    }

    fn insert_session(&self, s: &SessionRecord) -> anyhow::Result<()> {
        self.with(|c| insert_session(c, s))
    }

    fn session(&self, account_id: Option<&str>, id: &str) -> anyhow::Result<Option<SessionRecord>> {
        self.one(
            &format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE id = $1 \
                 AND ($2::text IS NULL OR account_id = $2)"
            ),
            &[&id, &account_id],
            session_row,
        )
    }

    fn sessions(
        &self,
        account_id: Option<&str>,
        filter: StateFilter,
        limit: u32,
        before: Option<&str>,
    ) -> anyhow::Result<Vec<SessionRecord>> {
        let state = match filter {
            StateFilter::All => "",
            StateFilter::Active => " AND state <> 'closed'",
            StateFilter::Closed => " AND state = 'closed'",
        };
        self.all(
            &format!(
                "SELECT {SESSION_COLS} FROM sessions \
                 WHERE ($1::text IS NULL OR account_id = $1){state} \
                 AND ($2::text IS NULL OR seq < (SELECT seq FROM sessions WHERE id = $2)) \
                 ORDER BY seq DESC LIMIT $3"
            ),
            &[&account_id, &before, &i64::from(limit)],
            session_row,
        )
    }

    fn mark_connected(&self, id: &str, at: i64) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE sessions SET state = 'connected', connected_at = $2 \
             WHERE id = $1 AND state = 'pending'",
            &[&id, &at],
        )?;
        Ok(n == 1)
    }

    fn mark_detached(&self, id: &str, at: i64) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE sessions SET state = 'detached', detached_at = $2 \
             WHERE id = $1 AND state = 'connected'",
            &[&id, &at],
        )?;
        Ok(n == 1)
    }

    fn mark_resumed(&self, id: &str) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE sessions SET state = 'connected' WHERE id = $1 AND state = 'detached'",
            &[&id],
        )?;
        Ok(n == 1)
    }

    fn recover_open(
        &self,
        node: &str,
        reason: CloseReason,
        at: i64,
    ) -> anyhow::Result<(usize, Vec<SessionRecord>)> {
        self.tx(|tx| {
            let closed = tx.execute(
                "UPDATE sessions SET state = 'closed', close_reason = $1, closed_at = $2 \
                 WHERE state = 'pending' AND (node_id = $3 OR node_id IS NULL)",
                &[&reason.as_str(), &at, &node],
            )?;
            tx.execute(
                "UPDATE sessions SET state = 'detached', detached_at = $1 \
                 WHERE state IN ('connected', 'detached') AND (node_id = $2 OR node_id IS NULL)",
                &[&at, &node],
            )?;
            let recs = tx
                .query(
                    &format!(
                        "SELECT {SESSION_COLS} FROM sessions WHERE state = 'detached' \
                         AND (node_id = $1 OR node_id IS NULL) ORDER BY seq"
                    ),
                    &[&node],
                )?
                .iter()
                .map(session_row)
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((usize::try_from(closed).unwrap_or(usize::MAX), recs))
        })
    }

    fn close_pending(&self, node: &str, reason: CloseReason, at: i64) -> anyhow::Result<usize> {
        let n = self.exec_retried(
            "UPDATE sessions SET state = 'closed', close_reason = $1, closed_at = $2 \
             WHERE state = 'pending' AND (node_id = $3 OR node_id IS NULL)",
            &[&reason.as_str(), &at, &node],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn close_session(
        &self,
        id: &str,
        reason: CloseReason,
        c2a: u64,
        a2c: u64,
        at: i64,
    ) -> anyhow::Result<bool> {
        let (c2a, a2c) = (to_i64(c2a), to_i64(a2c));
        self.with(|c| {
            // Counts only grow: a close that brings none keeps those a progress report recorded.
            let n = c.execute(
                "UPDATE sessions SET state = 'closed', close_reason = $2, closed_at = $3, \
                 bytes_client_to_agent = GREATEST(bytes_client_to_agent, $4), \
                 bytes_agent_to_client = GREATEST(bytes_agent_to_client, $5) \
                 WHERE id = $1 AND state <> 'closed'",
                &[&id, &reason.as_str(), &at, &c2a, &a2c],
            )?;
            if n == 0 && (c2a > 0 || a2c > 0) {
                // Closed earlier: the data plane's later report still brings the counts.
                c.execute(
                    "UPDATE sessions SET \
                     bytes_client_to_agent = GREATEST(bytes_client_to_agent, $2), \
                     bytes_agent_to_client = GREATEST(bytes_agent_to_client, $3) WHERE id = $1",
                    &[&id, &c2a, &a2c],
                )?;
            }
            Ok(n == 1)
        })
    }

    fn set_recording_digest(&self, id: &str, digest: &str) -> anyhow::Result<bool> {
        let n =
            self.exec("UPDATE sessions SET recording_digest = $2 WHERE id = $1", &[&id, &digest])?;
        Ok(n == 1)
    }

    fn record_progress(&self, rows: &[(String, u64, u64)]) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.tx(|tx| {
            let st = tx.prepare(
                "UPDATE sessions SET bytes_client_to_agent = GREATEST(bytes_client_to_agent, $2), \
                 bytes_agent_to_client = GREATEST(bytes_agent_to_client, $3) \
                 WHERE id = $1 AND state <> 'closed'",
            )?;
            for (id, c2a, a2c) in rows {
                tx.execute(&st, &[id, &to_i64(*c2a), &to_i64(*a2c)])?;
            }
            Ok(())
        })
    }

    fn close_all_open(&self, node: &str, reason: CloseReason, at: i64) -> anyhow::Result<usize> {
        let n = self.exec_retried(
            "UPDATE sessions SET state = 'closed', close_reason = $1, closed_at = $2 \
             WHERE state <> 'closed' AND (node_id = $3 OR node_id IS NULL)",
            &[&reason.as_str(), &at, &node],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn shared(&self) -> bool {
        true
    }

    fn admit_session(
        &self,
        s: &SessionRecord,
        limits: OpenLimits,
    ) -> anyhow::Result<Result<(), OverLimit>> {
        self.tx(|tx| {
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&ADMIT_LOCK, &s.account_id],
            )?;
            // Kept by the trigger on sessions (migration 3); a missing row is zero.
            let r = tx.query_one(
                "SELECT \
                 COALESCE((SELECT n FROM open_counts WHERE scope = 'i:' || $2), 0), \
                 COALESCE((SELECT n FROM open_counts WHERE scope = 'a:' || $1), 0), \
                 COALESCE((SELECT n FROM open_counts WHERE scope = 'u:' || $1 || '/' || $3), 0)",
                &[&s.account_id, &s.instance_id, &s.principal],
            )?;
            let n = |i: usize| r.try_get::<_, i64>(i).map(|v| usize::try_from(v).unwrap_or(0));
            if let Err(hit) = limits.check(n(0)?, n(1)?, n(2)?) {
                return Ok(Err(hit));
            }
            insert_session(tx, s)?;
            Ok(Ok(()))
        })
    }

    fn register_node(&self, n: &Node) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO nodes (id, api_url, data_url, run, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
             api_url = EXCLUDED.api_url, data_url = EXCLUDED.data_url, run = EXCLUDED.run, \
             started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at",
            &[&n.id, &n.api_url, &n.data_url, &n.run, &n.started_at, &n.heartbeat_at],
        )?;
        Ok(())
    }

    fn heartbeat_node(&self, id: &str, run: &str, now: i64) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE nodes SET heartbeat_at = GREATEST(heartbeat_at, $3) WHERE id = $1 AND run = $2",
            &[&id, &run, &now],
        )?;
        Ok(n == 1)
    }

    fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        self.all(
            "SELECT id, api_url, data_url, run, started_at, heartbeat_at FROM nodes ORDER BY id",
            &[],
            |r| {
                Ok(Node {
                    id: r.try_get(0)?,
                    api_url: r.try_get(1)?,
                    data_url: r.try_get(2)?,
                    run: r.try_get(3)?,
                    started_at: r.try_get(4)?,
                    heartbeat_at: r.try_get(5)?,
                })
            },
        )
    }

    fn expire_nodes(
        &self,
        before: i64,
        reason: CloseReason,
        now: i64,
        adopter: Option<&str>,
    ) -> anyhow::Result<Vec<ExpiredNode>> {
        self.tx(|tx| {
            // SKIP LOCKED: a node another survivor is expiring right now is its to expire.
            let dead: Vec<String> = tx
                .query(
                    "SELECT id FROM nodes WHERE heartbeat_at < $1 ORDER BY id \
                     FOR UPDATE SKIP LOCKED",
                    &[&before],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(dead.len());
            for id in dead {
                let mut adopted = match adopter {
                    Some(to) => tx
                        .query(
                            &format!(
                                "UPDATE sessions SET state = 'detached', detached_at = $1, \
                                 node_id = $2 WHERE state IN ('connected', 'detached') \
                                 AND node_id = $3 RETURNING {SESSION_COLS}"
                            ),
                            &[&now, &to, &id],
                        )?
                        .iter()
                        .map(session_row)
                        .collect::<anyhow::Result<Vec<_>>>()?,
                    None => Vec::new(),
                };
                let closed = tx.execute(
                    "UPDATE sessions SET state = 'closed', close_reason = $1, closed_at = $2 \
                     WHERE state <> 'closed' AND node_id = $3",
                    &[&reason.as_str(), &now, &id],
                )?;
                tx.execute("DELETE FROM agent_channels WHERE node_id = $1", &[&id])?;
                tx.execute("DELETE FROM node_mail WHERE node_id = $1", &[&id])?;
                tx.execute("DELETE FROM nodes WHERE id = $1", &[&id])?;
                adopted.sort_by(|x, y| (x.created_at, &x.id).cmp(&(y.created_at, &y.id)));
                out.push(ExpiredNode {
                    id,
                    closed: usize::try_from(closed).unwrap_or(usize::MAX),
                    adopted,
                });
            }
            Ok(out)
        })
    }

    fn set_agent_channel(&self, instance: &str, ch: &AgentChannel) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO agent_channels (instance_id, node_id, default_user, switch_user) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (instance_id) DO UPDATE SET \
             node_id = EXCLUDED.node_id, default_user = EXCLUDED.default_user, \
             switch_user = EXCLUDED.switch_user",
            &[&instance, &ch.node_id, &ch.default_user, &ch.switch_user],
        )?;
        Ok(())
    }

    fn clear_agent_channel(&self, instance: &str, node: &str) -> anyhow::Result<bool> {
        let n = self.exec(
            "DELETE FROM agent_channels WHERE instance_id = $1 AND node_id = $2",
            &[&instance, &node],
        )?;
        Ok(n == 1)
    }

    fn clear_agent_channels(&self, node: &str) -> anyhow::Result<usize> {
        let n = self.exec("DELETE FROM agent_channels WHERE node_id = $1", &[&node])?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn online_instances(&self, since: i64) -> anyhow::Result<Vec<(String, String)>> {
        self.all(
            "SELECT a.instance_id, a.node_id FROM agent_channels a JOIN nodes n \
             ON n.id = a.node_id WHERE n.heartbeat_at >= $1",
            &[&since],
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )
    }

    fn agent_channel(&self, instance: &str) -> anyhow::Result<Option<AgentChannel>> {
        self.one(
            "SELECT node_id, default_user, switch_user FROM agent_channels WHERE instance_id = $1",
            &[&instance],
            |r| {
                Ok(AgentChannel {
                    node_id: r.try_get(0)?,
                    default_user: r.try_get(1)?,
                    switch_user: r.try_get(2)?,
                })
            },
        )
    }

    fn send_mail(&self, node: &str, body: &str, now: i64) -> anyhow::Result<()> {
        // The trigger on node_mail notifies `hatch_mail` with the node's id.
        self.exec(
            "INSERT INTO node_mail (node_id, body, created_at) VALUES ($1, $2, $3)",
            &[&node, &body, &now],
        )?;
        Ok(())
    }

    fn take_mail(&self, node: &str, limit: u32) -> anyhow::Result<Vec<String>> {
        self.all(
            "DELETE FROM node_mail WHERE id IN (SELECT id FROM node_mail WHERE node_id = $1 \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id, body",
            &[&node, &i64::from(limit)],
            |r| Ok((r.try_get::<_, i64>(0)?, r.try_get::<_, String>(1)?)),
        )
        .map(|mut rows| {
            rows.sort_by_key(|(id, _)| *id);
            rows.into_iter().map(|(_, b)| b).collect()
        })
    }

    fn listen(&self, node: &str) -> anyhow::Result<Option<tokio::sync::mpsc::Receiver<Wake>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (url, node) = (self.url.clone(), node.to_owned());
        std::thread::Builder::new()
            .name("hatch-pg-listen".into())
            .spawn(move || listen_loop(&url, &node, &tx))
            .context("starting the PostgreSQL listener thread")?;
        Ok(Some(rx))
    }

    fn signing_keys(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        self.all("SELECT kid, pkcs8 FROM signing_keys ORDER BY kid", &[], |r| {
            Ok((r.try_get(0)?, r.try_get(1)?))
        })
    }

    fn add_signing_key(
        &self,
        kid: &str,
        pkcs8: &[u8],
        now: i64,
        only_if_none: bool,
    ) -> anyhow::Result<bool> {
        self.tx(|tx| {
            // Nodes starting at once see the table empty together: the lock makes one of them
            // insert and the others see its key.
            tx.batch_execute("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")?;
            let n = tx.execute(
                "INSERT INTO signing_keys (kid, pkcs8, created_at) SELECT $1, $2, $3 \
                 WHERE NOT $4 OR NOT EXISTS (SELECT 1 FROM signing_keys) \
                 ON CONFLICT (kid) DO NOTHING",
                &[&kid, &pkcs8, &now, &only_if_none],
            )?;
            Ok(n == 1)
        })
    }

    fn closed_since(&self, at: i64) -> anyhow::Result<Vec<(String, String)>> {
        self.all(
            "SELECT id, instance_id FROM sessions WHERE closed_at IS NOT NULL AND closed_at >= $1",
            &[&at],
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )
    }

    fn prune_closed(&self, before: i64, limit: u32) -> anyhow::Result<usize> {
        let n = self.exec(
            "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions \
             WHERE closed_at IS NOT NULL AND closed_at < $1 AND state = 'closed' \
             ORDER BY closed_at LIMIT $2)",
            &[&before, &i64::from(limit)],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn record_lost_counts(
        &self,
        id: &str,
        instance_id: &str,
        reason: CloseReason,
        c2a: u64,
        a2c: u64,
    ) -> anyhow::Result<bool> {
        let n = self.exec(
            "UPDATE sessions SET bytes_client_to_agent = GREATEST(bytes_client_to_agent, $4), \
             bytes_agent_to_client = GREATEST(bytes_agent_to_client, $5) \
             WHERE id = $1 AND instance_id = $2 AND state = 'closed' AND close_reason = $3",
            &[&id, &instance_id, &reason.as_str(), &to_i64(c2a), &to_i64(a2c)],
        )?;
        Ok(n == 1)
    }

    fn append_audit(&self, at: i64, account: Option<&str>, line: &str) -> anyhow::Result<()> {
        self.exec(
            "INSERT INTO audit_events (at, account_id, line) VALUES ($1, $2, $3)",
            &[&at, &account, &line],
        )?;
        Ok(())
    }

    fn audit_events(
        &self,
        account: &str,
        since: i64,
        after: i64,
        limit: u32,
    ) -> anyhow::Result<Vec<AuditRecord>> {
        self.all(
            "SELECT seq, at, account_id, line FROM audit_events \
             WHERE account_id = $1 AND seq > $2 AND at >= $3 ORDER BY seq LIMIT $4",
            &[&account, &after, &since, &i64::from(limit)],
            |r| {
                Ok(AuditRecord {
                    seq: r.try_get(0)?,
                    at: r.try_get(1)?,
                    account_id: r.try_get(2)?,
                    line: r.try_get(3)?,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relays starting together on one database migrate it once, under the advisory lock;
    /// reopening finds it current.
    #[test]
    fn concurrent_opens_migrate_once() {
        let url = hatch_pgtest::shared().fresh_database();
        std::thread::scope(|s| {
            let opens: Vec<_> = (0..4).map(|_| s.spawn(|| PgStore::open(&url))).collect();
            for o in opens {
                o.join().unwrap().unwrap();
            }
        });
        let s = PgStore::open(&url).unwrap();
        let rows: Vec<i32> =
            s.all("SELECT version FROM hatch_schema", &[], |r| Ok(r.try_get(0)?)).unwrap();
        assert_eq!(rows, [MIGRATIONS.len() as i32]);
    }

    #[test]
    fn a_server_that_is_not_there_is_named_without_its_password() {
        let e = PgStore::open("postgres://u:hunter2@127.0.0.1:1/db").unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("postgres://u:***@127.0.0.1:1/db"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(redacted("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redacted("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(redacted("host=h user=u"), "host=h user=u");
    }
}
