//! [`SqliteStore`]: the embedded default store, one file in WAL mode.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

use super::schema::MIGRATIONS;
use super::{
    AccessKey, Account, Activation, AgentChannel, AuditRecord, CloseReason, ExpiredNode, Instance,
    KeyOwner, Mode, Node, OpenLimits, OverLimit, PolicyDeleted, PolicyRecord, RecordingMode,
    RegisterError, SessionPrefs, SessionRecord, SessionState, StateFilter, Store, Tags, User,
};

/// Compiled statements kept per connection: every query the API and the session life run, with
/// room to spare (rusqlite's default is 16).
const STATEMENT_CACHE: usize = 64;

/// Raises an account's IAM generation (inside the caller's statement sequence).
fn bump_iam(conn: &Connection, account_id: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE accounts SET iam_generation = iam_generation + 1 WHERE id = ?1",
        [account_id],
    )?;
    Ok(())
}
/// Deletes a batch of old closed sessions (`?1` closed before, `?2` at most).
const PRUNE_CLOSED: &str = "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions \
     WHERE closed_at IS NOT NULL AND closed_at < ?1 AND state = 'closed' \
     ORDER BY closed_at LIMIT ?2)";

/// The embedded SQLite store: one file, WAL journal, one connection behind a mutex.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file and runs pending migrations. Fails with a
    /// message naming the file when it cannot be written.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        // SQLite reports a full file system as "disk I/O error" when it cannot grow the WAL
        // index of an existing store: say what the operator has to fix.
        Self::open_inner(path).map_err(|e| {
            if file_system_full(path) {
                e.context(format!(
                    "store file {}: no space left on the file system holding it",
                    path.display()
                ))
            } else {
                e
            }
        })
    }

    fn open_inner(path: &Path) -> anyhow::Result<Self> {
        // Open (or create) the file ourselves first: the OS error ("Read-only file system")
        // is clearer than SQLite's "unable to open database file".
        use std::os::unix::fs::OpenOptionsExt;
        if path.exists() {
            std::fs::OpenOptions::new().read(true).write(true).open(path).with_context(|| {
                format!("store file {} is not writable by this process", path.display())
            })?;
        } else {
            // Owner only: SQLite gives its -wal and -shm files the store file's mode.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!("store file {} cannot be created by this process", path.display())
                })?;
        }
        // An older relay created it (and its -wal, -shm) readable by every local user.
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            crate::certs::owner_only(Path::new(&p), 0o600)?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening store file {}", path.display()))?;
        let ctx = || format!("store file {} is not writable", path.display());
        conn.busy_timeout(std::time::Duration::from_secs(5)).with_context(ctx)?;
        let mode: String =
            conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).with_context(ctx)?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "store file {}: could not enable WAL (journal_mode={mode})",
            path.display()
        );
        // NORMAL with WAL: a power cut may lose the last transactions, never corrupts.
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .with_context(ctx)?;
        // Statements are compiled once and kept (see `one`, `all`, `cached`): compiling the SQL
        // was a third of the store's CPU per session setup.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let store = SqliteStore { path: path.to_owned(), conn: Mutex::new(conn) };
        store.migrate().with_context(ctx)?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&self) -> anyhow::Result<()> {
        let mut conn = self.lock();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let version = usize::try_from(version).unwrap_or(0);
        anyhow::ensure!(
            version <= MIGRATIONS.len(),
            "store schema version {version} is newer than this relay ({})",
            MIGRATIONS.len()
        );
        // Write even when up to date: proves at start that the file is writable.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql).with_context(|| format!("migration {}", i + 1))?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {}", MIGRATIONS.len()))?;
        tx.commit()?;
        Ok(())
    }

    /// Writes a consistent copy of the store to `path` (`VACUUM INTO`: one read transaction,
    /// so the relay keeps running and writing), readable by its owner only. `path` must not
    /// exist, or be empty.
    pub fn backup_to(&self, path: &Path) -> anyhow::Result<()> {
        let empty = std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true);
        anyhow::ensure!(empty, "{} exists and is not empty", path.display());
        // An empty owner-only file, which VACUUM INTO fills.
        crate::certs::write_private(path, &[])?;
        let target = path.to_str().context("the backup path is not UTF-8")?;
        self.lock()
            .execute("VACUUM INTO ?1", [target])
            .with_context(|| format!("writing the backup {}", path.display()))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite rolls back the
        // open transaction when it is dropped), so poisoning is ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first row `sql` selects, mapped by `row`.
    fn one<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> anyhow::Result<Option<T>> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(sql)?;
        Ok(st.query_row(params, row).optional()?)
    }

    /// Runs `sql` (a statement of the session-setup path, compiled once) and returns the rows
    /// it changed.
    fn cached(&self, sql: &str, params: impl rusqlite::Params) -> anyhow::Result<usize> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(sql)?;
        Ok(st.execute(params)?)
    }

    /// Every row `sql` selects, mapped by `row`.
    fn all<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> anyhow::Result<Vec<T>> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(sql)?;
        let rows = st.query_map(params, row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

/// Whether the file system holding `path` has no block left for this process.
fn file_system_full(path: &Path) -> bool {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    nix::sys::statvfs::statvfs(dir).is_ok_and(|s| s.blocks_available() == 0)
}

/// Column `col` of `r`, a JSON text; a failure names the column.
fn json_col<T: serde::de::DeserializeOwned>(
    r: &rusqlite::Row<'_>,
    col: usize,
) -> rusqlite::Result<T> {
    from_json(col, &r.get::<_, String>(col)?)
}

fn from_json<T: serde::de::DeserializeOwned>(col: usize, s: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: r.get(0)?,
        name: r.get(1)?,
        session_manager_enabled: r.get(2)?,
        created_at: r.get(3)?,
        prefs: SessionPrefs {
            idle_timeout_s: r.get::<_, Option<i64>>(4)?.and_then(|v| u64::try_from(v).ok()),
            max_duration_s: r.get::<_, Option<i64>>(5)?.and_then(|v| u64::try_from(v).ok()),
            recording: enum_col(6, r, RecordingMode::parse)?,
        },
    })
}

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        account_id: r.get(1)?,
        name: r.get(2)?,
        created_at: r.get(3)?,
        disabled_at: r.get(4)?,
    })
}

fn policy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRecord> {
    Ok(PolicyRecord {
        account_id: r.get(0)?,
        name: r.get(1)?,
        document: r.get(2)?,
        updated_at: r.get(3)?,
    })
}

const ACTIVATION_COLS: &str = "id, account_id, region, tags, max_registrations, registrations, expires_at, created_at, \
     revoked_at";

fn activation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Activation> {
    Ok(Activation {
        id: r.get(0)?,
        account_id: r.get(1)?,
        region: r.get(2)?,
        tags: json_col(r, 3)?,
        max_registrations: r.get(4)?,
        registrations: r.get(5)?,
        expires_at: r.get(6)?,
        created_at: r.get(7)?,
        revoked_at: r.get(8)?,
    })
}

const INSTANCE_COLS: &str = "id, account_id, region, tags, hostname, activation_id, registered_at, last_seen, \
     secret_revoked_at";

fn instance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Instance> {
    Ok(Instance {
        id: r.get(0)?,
        account_id: r.get(1)?,
        region: r.get(2)?,
        tags: json_col(r, 3)?,
        hostname: r.get(4)?,
        activation_id: r.get(5)?,
        registered_at: r.get(6)?,
        last_seen: r.get(7)?,
        secret_revoked_at: r.get(8)?,
    })
}

const SESSION_COLS: &str = "id, account_id, principal, access_key_id, source_ip, instance_id, \
     mode, command, run_as, state, created_at, expires_at, connected_at, closed_at, \
     close_reason, bytes_client_to_agent, bytes_agent_to_client, detached_at, remote_host, \
     remote_port, node_id, recording, recording_digest";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    let command = r.get::<_, Option<String>>(7)?.map(|c| from_json(7, &c)).transpose()?;
    let c2a: i64 = r.get(15)?;
    let a2c: i64 = r.get(16)?;
    Ok(SessionRecord {
        id: r.get(0)?,
        account_id: r.get(1)?,
        principal: r.get(2)?,
        access_key_id: r.get(3)?,
        source_ip: r.get(4)?,
        instance_id: r.get(5)?,
        mode: enum_col(6, r, Mode::parse)?,
        command,
        run_as: r.get(8)?,
        state: enum_col(9, r, SessionState::parse)?,
        created_at: r.get(10)?,
        expires_at: r.get(11)?,
        connected_at: r.get(12)?,
        closed_at: r.get(13)?,
        close_reason: match r.get_ref(14)?.as_str_or_null()? {
            None => None,
            Some(s) => Some(CloseReason::parse(s).ok_or_else(|| unknown_name(14, s))?),
        },
        bytes_client_to_agent: u64::try_from(c2a).unwrap_or(0),
        bytes_agent_to_client: u64::try_from(a2c).unwrap_or(0),
        detached_at: r.get(17)?,
        remote_host: r.get(18)?,
        remote_port: r.get::<_, Option<i64>>(19)?.and_then(|p| u16::try_from(p).ok()),
        node_id: r.get(20)?,
        recording: enum_col(21, r, RecordingMode::parse)?,
        recording_digest: r.get(22)?,
    })
}

/// SQLite stores integers as i64; byte counts beyond i64::MAX saturate.
/// A name column read into its enum; a name this version does not know is an error naming the
/// column and the value (a store written by a newer relay), never a silent default.
fn enum_col<T>(
    col: usize,
    r: &rusqlite::Row<'_>,
    parse: fn(&str) -> Option<T>,
) -> rusqlite::Result<T> {
    let s = r.get_ref(col)?.as_str()?;
    parse(s).ok_or_else(|| unknown_name(col, s))
}

fn unknown_name(col: usize, s: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unknown name {s:?}").into(),
    )
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn create_account(&self, a: &Account) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO accounts (id, name, session_manager_enabled, created_at, idle_timeout_s, \
             max_duration_s, recording) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                a.id,
                a.name,
                a.session_manager_enabled,
                a.created_at,
                a.prefs.idle_timeout_s.map(to_i64),
                a.prefs.max_duration_s.map(to_i64),
                a.prefs.recording.as_str()
            ],
        )?;
        Ok(())
    }

    fn account(&self, id: &str) -> anyhow::Result<Option<Account>> {
        self.one(
            "SELECT id, name, session_manager_enabled, created_at, idle_timeout_s, max_duration_s, \
             recording FROM accounts WHERE id = ?1",
            [id],
            account_row,
        )
    }

    fn accounts(&self) -> anyhow::Result<Vec<Account>> {
        self.all(
            "SELECT id, name, session_manager_enabled, created_at, idle_timeout_s, max_duration_s, \
             recording FROM accounts ORDER BY created_at, id",
            [],
            account_row,
        )
    }

    fn set_session_prefs(&self, account_id: &str, prefs: SessionPrefs) -> anyhow::Result<bool> {
        let n = self.lock().execute(
            "UPDATE accounts SET idle_timeout_s = ?2, max_duration_s = ?3, recording = ?4 \
             WHERE id = ?1",
            params![
                account_id,
                prefs.idle_timeout_s.map(to_i64),
                prefs.max_duration_s.map(to_i64),
                prefs.recording.as_str()
            ],
        )?;
        Ok(n == 1)
    }

    fn set_session_manager(&self, account_id: &str, enabled: bool) -> anyhow::Result<bool> {
        let n = self.lock().execute(
            "UPDATE accounts SET session_manager_enabled = ?2 WHERE id = ?1",
            params![account_id, enabled],
        )?;
        Ok(n == 1)
    }

    fn create_user(&self, u: &User) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO users (id, account_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![u.id, u.account_id, u.name, u.created_at],
        )?;
        Ok(())
    }

    fn user(&self, id: &str) -> anyhow::Result<Option<User>> {
        self.one(
            "SELECT id, account_id, name, created_at, disabled_at FROM users WHERE id = ?1",
            [id],
            user_row,
        )
    }

    fn user_by_name(&self, account_id: &str, name: &str) -> anyhow::Result<Option<User>> {
        self.one(
            "SELECT id, account_id, name, created_at, disabled_at FROM users \
             WHERE account_id = ?1 AND name = ?2",
            [account_id, name],
            user_row,
        )
    }

    fn users(&self, account_id: &str) -> anyhow::Result<Vec<User>> {
        self.all(
            "SELECT id, account_id, name, created_at, disabled_at FROM users WHERE account_id = ?1 \
             ORDER BY name",
            [account_id],
            user_row,
        )
    }

    fn set_user_disabled(&self, user_id: &str, disabled_at: Option<i64>) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let account: Option<String> = tx
            .query_row("SELECT account_id FROM users WHERE id = ?1", [user_id], |r| r.get(0))
            .optional()?;
        let Some(account) = account else { return Ok(false) };
        tx.execute(
            "UPDATE users SET disabled_at = ?2 WHERE id = ?1",
            params![user_id, disabled_at],
        )?;
        bump_iam(&tx, &account)?;
        tx.commit()?;
        Ok(true)
    }

    fn delete_user(&self, user_id: &str) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let account: Option<String> = tx
            .query_row("SELECT account_id FROM users WHERE id = ?1", [user_id], |r| r.get(0))
            .optional()?;
        let Some(account) = account else { return Ok(false) };
        tx.execute("DELETE FROM policy_attachments WHERE user_id = ?1", [user_id])?;
        tx.execute("DELETE FROM access_keys WHERE user_id = ?1", [user_id])?;
        tx.execute("DELETE FROM users WHERE id = ?1", [user_id])?;
        bump_iam(&tx, &account)?;
        tx.commit()?;
        Ok(true)
    }

    fn iam_generation(&self, account_id: &str) -> anyhow::Result<i64> {
        Ok(self
            .one("SELECT iam_generation FROM accounts WHERE id = ?1", [account_id], |r| r.get(0))?
            .unwrap_or(0))
    }

    fn insert_access_key(&self, k: &AccessKey, secret_hash: &[u8; 32]) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO access_keys (id, account_id, user_id, secret_hash, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![k.id, k.account_id, k.user_id, &secret_hash[..], k.created_at],
        )?;
        Ok(())
    }

    fn access_key_owner(&self, secret_hash: &[u8; 32]) -> anyhow::Result<Option<KeyOwner>> {
        self.one(
            "SELECT k.id, k.account_id, k.user_id FROM access_keys k \
             LEFT JOIN users u ON u.id = k.user_id \
             WHERE k.secret_hash = ?1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL",
            [&secret_hash[..]],
            |r| Ok(KeyOwner { key_id: r.get(0)?, account_id: r.get(1)?, user_id: r.get(2)? }),
        )
    }

    fn access_keys(&self, account_id: &str) -> anyhow::Result<Vec<AccessKey>> {
        self.all(
            "SELECT id, account_id, user_id, created_at, revoked_at FROM access_keys \
             WHERE account_id = ?1 ORDER BY created_at, id",
            [account_id],
            |r| {
                Ok(AccessKey {
                    id: r.get(0)?,
                    account_id: r.get(1)?,
                    user_id: r.get(2)?,
                    created_at: r.get(3)?,
                    revoked_at: r.get(4)?,
                })
            },
        )
    }

    fn revoke_access_key(&self, key_id: &str, now: i64) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE access_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![key_id, now],
        )?;
        if n == 1 {
            let account: String =
                tx.query_row("SELECT account_id FROM access_keys WHERE id = ?1", [key_id], |r| {
                    r.get(0)
                })?;
            bump_iam(&tx, &account)?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    fn put_policy(&self, p: &PolicyRecord) -> anyhow::Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO policies (account_id, name, document, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (account_id, name) DO UPDATE SET document = ?3, updated_at = ?4",
            params![p.account_id, p.name, p.document, p.updated_at],
        )?;
        // A replaced document may allow less.
        bump_iam(&tx, &p.account_id)?;
        tx.commit()?;
        Ok(())
    }

    fn policies(&self, account_id: &str) -> anyhow::Result<Vec<PolicyRecord>> {
        self.all(
            "SELECT account_id, name, document, updated_at FROM policies \
             WHERE account_id = ?1 ORDER BY name",
            [account_id],
            policy_row,
        )
    }

    fn attach_policy(&self, account_id: &str, user_id: &str, name: &str) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM policies WHERE account_id = ?1 AND name = ?2)",
            [account_id, name],
            |r| r.get(0),
        )?;
        if !exists {
            return Ok(false);
        }
        let n = tx.execute(
            "INSERT OR IGNORE INTO policy_attachments (account_id, user_id, policy_name) \
             VALUES (?1, ?2, ?3)",
            [account_id, user_id, name],
        )?;
        if n == 1 {
            // An attached policy can take access away too: its Deny wins over every Allow (the
            // usual way to quarantine a user is to attach a deny-all policy).
            bump_iam(&tx, account_id)?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn detach_policy(&self, account_id: &str, user_id: &str, name: &str) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM policy_attachments WHERE account_id = ?1 AND user_id = ?2 \
             AND policy_name = ?3",
            [account_id, user_id, name],
        )?;
        if n == 1 {
            bump_iam(&tx, account_id)?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    fn policy_attachments(&self, account_id: &str) -> anyhow::Result<Vec<(String, String)>> {
        self.all(
            "SELECT user_id, policy_name FROM policy_attachments WHERE account_id = ?1 \
             ORDER BY user_id, policy_name",
            [account_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    fn delete_policy(&self, account_id: &str, name: &str) -> anyhow::Result<PolicyDeleted> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let users: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT user_id FROM policy_attachments WHERE account_id = ?1 \
                 AND policy_name = ?2 ORDER BY user_id",
            )?;
            st.query_map([account_id, name], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        if !users.is_empty() {
            return Ok(PolicyDeleted::Attached(users));
        }
        let n = tx.execute(
            "DELETE FROM policies WHERE account_id = ?1 AND name = ?2",
            [account_id, name],
        )?;
        tx.commit()?;
        Ok(if n == 1 { PolicyDeleted::Deleted } else { PolicyDeleted::NotFound })
    }

    fn user_policies(&self, user_id: &str) -> anyhow::Result<Vec<PolicyRecord>> {
        self.all(
            "SELECT p.account_id, p.name, p.document, p.updated_at FROM policy_attachments a \
             JOIN policies p ON p.account_id = a.account_id AND p.name = a.policy_name \
             WHERE a.user_id = ?1 ORDER BY p.name",
            [user_id],
            policy_row,
        )
    }

    fn insert_activation(&self, a: &Activation, code_hash: &[u8; 32]) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO activations (id, account_id, code_hash, region, tags, max_registrations, \
             registrations, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                a.id,
                a.account_id,
                &code_hash[..],
                a.region,
                serde_json::to_string(&a.tags)?,
                a.max_registrations,
                a.registrations,
                a.expires_at,
                a.created_at
            ],
        )?;
        Ok(())
    }

    fn activations(&self, account_id: Option<&str>) -> anyhow::Result<Vec<Activation>> {
        self.all(
            &format!(
                "SELECT {ACTIVATION_COLS} FROM activations \
                 WHERE ?1 IS NULL OR account_id = ?1 ORDER BY created_at, id"
            ),
            [account_id],
            activation_row,
        )
    }

    fn revoke_activation(&self, account_id: &str, id: &str, now: i64) -> anyhow::Result<bool> {
        let n = self.lock().execute(
            "UPDATE activations SET revoked_at = ?3 \
             WHERE id = ?1 AND account_id = ?2 AND revoked_at IS NULL",
            params![id, account_id, now],
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
        let store = |e: rusqlite::Error| RegisterError::Store(e.to_string());
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(store)?;
        let row: Option<(Activation, Vec<u8>)> = tx
            .query_row(
                &format!("SELECT {ACTIVATION_COLS}, code_hash FROM activations WHERE id = ?1"),
                [activation_id],
                |r| Ok((activation_row(r)?, r.get(9)?)),
            )
            .optional()
            .map_err(store)?;
        let Some((act, stored)) = row else {
            return Err(RegisterError::BadActivation);
        };
        let inst = act.admit(&stored, code_hash, instance_id, hostname, now)?;
        let tags =
            serde_json::to_string(&inst.tags).map_err(|e| RegisterError::Store(e.to_string()))?;
        tx.execute(
            "UPDATE activations SET registrations = registrations + 1 WHERE id = ?1",
            [activation_id],
        )
        .map_err(store)?;
        tx.execute(
            "INSERT INTO instances (id, account_id, activation_id, region, tags, hostname, \
             secret_hash, registered_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                inst.id,
                inst.account_id,
                inst.activation_id,
                inst.region,
                tags,
                inst.hostname,
                &secret_hash[..],
                now
            ],
        )
        .map_err(store)?;
        tx.commit().map_err(store)?;
        Ok(inst)
    }

    fn instance_by_secret(&self, secret_hash: &[u8; 32]) -> anyhow::Result<Option<Instance>> {
        self.one(
            &format!("SELECT {INSTANCE_COLS} FROM instances WHERE secret_hash = ?1"),
            [&secret_hash[..]],
            instance_row,
        )
    }

    fn instance(&self, account_id: &str, id: &str) -> anyhow::Result<Option<Instance>> {
        self.one(
            &format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = ?1 AND account_id = ?2"),
            [id, account_id],
            instance_row,
        )
    }

    fn instances(&self, account_id: Option<&str>) -> anyhow::Result<Vec<Instance>> {
        self.all(
            &format!(
                "SELECT {INSTANCE_COLS} FROM instances WHERE ?1 IS NULL OR account_id = ?1 \
                 ORDER BY registered_at, id"
            ),
            [account_id],
            instance_row,
        )
    }

    fn set_instance_tags(&self, id: &str, tags: &Tags) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let account: Option<String> = tx
            .query_row("SELECT account_id FROM instances WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        let Some(account) = account else { return Ok(false) };
        tx.execute(
            "UPDATE instances SET tags = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(tags)?],
        )?;
        // Policies condition on tags (`hatch:tag/env`): new tags may allow less, or bring an
        // instance under a Deny.
        bump_iam(&tx, &account)?;
        tx.commit()?;
        Ok(true)
    }

    fn deregister_instance(&self, account_id: &str, id: &str) -> anyhow::Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx
            .execute("DELETE FROM instances WHERE id = ?1 AND account_id = ?2", [id, account_id])?;
        if n == 1 {
            bump_iam(&tx, account_id)?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    fn revoke_instance_secret(&self, account_id: &str, id: &str, now: i64) -> anyhow::Result<bool> {
        // A fresh random hash: no secret hashes to it, and the column stays UNIQUE NOT NULL.
        let worthless = crate::control::credentials::random_bytes::<32>();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE instances SET secret_hash = ?3, secret_revoked_at = ?4 \
             WHERE id = ?1 AND account_id = ?2",
            params![id, account_id, &worthless[..], now],
        )?;
        if n == 1 {
            bump_iam(&tx, account_id)?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    fn touch_instance(&self, id: &str, now: i64) -> anyhow::Result<()> {
        self.cached("UPDATE instances SET last_seen = ?2 WHERE id = ?1", params![id, now])?;
        Ok(())
    }

    fn insert_session(&self, s: &SessionRecord) -> anyhow::Result<()> {
        insert_session(&self.lock(), s)
    }

    fn session(&self, account_id: Option<&str>, id: &str) -> anyhow::Result<Option<SessionRecord>> {
        self.one(
            &format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE id = ?1 \
                 AND (?2 IS NULL OR account_id = ?2)"
            ),
            params![id, account_id],
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
            StateFilter::Active => " AND state != 'closed'",
            StateFilter::Closed => " AND state = 'closed'",
        };
        self.all(
            &format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE (?1 IS NULL OR account_id = ?1){state} \
                 AND (?2 IS NULL OR seq < (SELECT seq FROM sessions WHERE id = ?2)) \
                 ORDER BY seq DESC LIMIT ?3"
            ),
            params![account_id, before, limit],
            session_row,
        )
    }

    fn mark_connected(&self, id: &str, at: i64) -> anyhow::Result<bool> {
        let n = self.cached(
            "UPDATE sessions SET state = 'connected', connected_at = ?2 \
             WHERE id = ?1 AND state = 'pending'",
            params![id, at],
        )?;
        Ok(n == 1)
    }

    fn mark_detached(&self, id: &str, at: i64) -> anyhow::Result<bool> {
        let n = self.cached(
            "UPDATE sessions SET state = 'detached', detached_at = ?2 \
             WHERE id = ?1 AND state = 'connected'",
            params![id, at],
        )?;
        Ok(n == 1)
    }

    fn mark_resumed(&self, id: &str) -> anyhow::Result<bool> {
        let n = self.cached(
            "UPDATE sessions SET state = 'connected' WHERE id = ?1 AND state = 'detached'",
            params![id],
        )?;
        Ok(n == 1)
    }

    fn recover_open(
        &self,
        node: &str,
        reason: CloseReason,
        at: i64,
    ) -> anyhow::Result<(usize, Vec<SessionRecord>)> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let closed = tx.execute(
            &format!(
                "UPDATE sessions SET state = 'closed', close_reason = ?1, closed_at = ?2 \
                 WHERE state = 'pending' AND {OF_NODE_3}"
            ),
            params![reason.as_str(), at, node],
        )?;
        tx.execute(
            &format!(
                "UPDATE sessions SET state = 'detached', detached_at = ?1 \
                 WHERE state IN ('connected', 'detached') AND {OF_NODE_2}"
            ),
            params![at, node],
        )?;
        let recs = {
            let mut st = tx.prepare(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE state = 'detached' AND {OF_NODE_1} \
                 ORDER BY seq"
            ))?;
            st.query_map([node], session_row)?.collect::<Result<Vec<_>, _>>()?
        };
        tx.commit()?;
        Ok((closed, recs))
    }

    fn close_pending(&self, node: &str, reason: CloseReason, at: i64) -> anyhow::Result<usize> {
        let n = self.lock().execute(
            &format!(
                "UPDATE sessions SET state = 'closed', close_reason = ?1, closed_at = ?2 \
                 WHERE state = 'pending' AND {OF_NODE_3}"
            ),
            params![reason.as_str(), at, node],
        )?;
        Ok(n)
    }

    fn close_session(
        &self,
        id: &str,
        reason: CloseReason,
        c2a: u64,
        a2c: u64,
        at: i64,
    ) -> anyhow::Result<bool> {
        let conn = self.lock();
        let n = conn.execute(
            // Counts only grow: a close that brings none (terminate, a sweep) keeps those a
            // progress report recorded.
            "UPDATE sessions SET state = 'closed', close_reason = ?2, closed_at = ?3, \
             bytes_client_to_agent = MAX(bytes_client_to_agent, ?4), \
             bytes_agent_to_client = MAX(bytes_agent_to_client, ?5) \
             WHERE id = ?1 AND state != 'closed'",
            params![id, reason.as_str(), at, to_i64(c2a), to_i64(a2c)],
        )?;
        if n == 0 && (c2a > 0 || a2c > 0) {
            // Closed earlier (terminate, switch): the data plane's later report still brings
            // the byte counts.
            conn.execute(
                "UPDATE sessions SET bytes_client_to_agent = MAX(bytes_client_to_agent, ?2), \
                 bytes_agent_to_client = MAX(bytes_agent_to_client, ?3) WHERE id = ?1",
                params![id, to_i64(c2a), to_i64(a2c)],
            )?;
        }
        Ok(n == 1)
    }

    fn closed_since(&self, at: i64) -> anyhow::Result<Vec<(String, String)>> {
        self.all(
            "SELECT id, instance_id FROM sessions WHERE closed_at IS NOT NULL AND closed_at >= ?1",
            [at],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    fn prune_closed(&self, before: i64, limit: u32) -> anyhow::Result<usize> {
        // The inner select walks `sessions_closed_at` from its oldest end and stops at
        // `before` or `limit`, so a call costs what it deletes, not the size of the table.
        let n = self.lock().execute(PRUNE_CLOSED, params![before, limit])?;
        Ok(n)
    }

    fn record_progress(&self, rows: &[(String, u64, u64)]) -> anyhow::Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE sessions SET bytes_client_to_agent = MAX(bytes_client_to_agent, ?2), \
                 bytes_agent_to_client = MAX(bytes_agent_to_client, ?3) \
                 WHERE id = ?1 AND state != 'closed'",
            )?;
            for (id, c2a, a2c) in rows {
                st.execute(params![id, to_i64(*c2a), to_i64(*a2c)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn set_recording_digest(&self, id: &str, digest: &str) -> anyhow::Result<bool> {
        let n = self.cached(
            "UPDATE sessions SET recording_digest = ?2 WHERE id = ?1",
            params![id, digest],
        )?;
        Ok(n == 1)
    }

    fn record_lost_counts(
        &self,
        id: &str,
        instance_id: &str,
        reason: CloseReason,
        c2a: u64,
        a2c: u64,
    ) -> anyhow::Result<bool> {
        let n = self.lock().execute(
            "UPDATE sessions SET bytes_client_to_agent = MAX(bytes_client_to_agent, ?4), \
             bytes_agent_to_client = MAX(bytes_agent_to_client, ?5) \
             WHERE id = ?1 AND instance_id = ?2 AND state = 'closed' AND close_reason = ?3",
            params![id, instance_id, reason.as_str(), to_i64(c2a), to_i64(a2c)],
        )?;
        Ok(n == 1)
    }

    fn append_audit(&self, at: i64, account: Option<&str>, line: &str) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO audit_events (at, account_id, line) VALUES (?1, ?2, ?3)",
            params![at, account, line],
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
             WHERE account_id = ?1 AND seq > ?2 AND at >= ?3 ORDER BY seq LIMIT ?4",
            params![account, after, since, limit],
            |r| {
                Ok(AuditRecord {
                    seq: r.get(0)?,
                    at: r.get(1)?,
                    account_id: r.get(2)?,
                    line: r.get(3)?,
                })
            },
        )
    }

    fn close_all_open(&self, node: &str, reason: CloseReason, at: i64) -> anyhow::Result<usize> {
        let n = self.lock().execute(
            &format!(
                "UPDATE sessions SET state = 'closed', close_reason = ?1, closed_at = ?2 \
                 WHERE state != 'closed' AND {OF_NODE_3}"
            ),
            params![reason.as_str(), at, node],
        )?;
        Ok(n)
    }

    fn admit_session(
        &self,
        s: &SessionRecord,
        limits: OpenLimits,
    ) -> anyhow::Result<Result<(), OverLimit>> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let counted = tx.query_row(
            "SELECT COUNT(*) FILTER (WHERE instance_id = ?2), COUNT(*), \
                 COUNT(*) FILTER (WHERE principal = ?3) FROM sessions \
                 WHERE account_id = ?1 AND state != 'closed'",
            params![s.account_id, s.instance_id, s.principal],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
        )?;
        let n = |v: i64| usize::try_from(v).unwrap_or(usize::MAX);
        if let Err(hit) = limits.check(n(counted.0), n(counted.1), n(counted.2)) {
            return Ok(Err(hit));
        }
        // Inside the immediate transaction: nobody wrote between the count and the insert.
        insert_session(&tx, s)?;
        tx.commit()?;
        Ok(Ok(()))
    }

    fn register_node(&self, n: &Node) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO nodes (id, api_url, data_url, run, started_at, heartbeat_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET \
             api_url = excluded.api_url, data_url = excluded.data_url, run = excluded.run, \
             started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
            params![n.id, n.api_url, n.data_url, n.run, n.started_at, n.heartbeat_at],
        )?;
        Ok(())
    }

    fn heartbeat_node(&self, id: &str, run: &str, now: i64) -> anyhow::Result<bool> {
        let n = self.lock().execute(
            "UPDATE nodes SET heartbeat_at = MAX(heartbeat_at, ?3) WHERE id = ?1 AND run = ?2",
            params![id, run, now],
        )?;
        Ok(n == 1)
    }

    fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        self.all(
            "SELECT id, api_url, data_url, run, started_at, heartbeat_at FROM nodes ORDER BY id",
            [],
            |r| {
                Ok(Node {
                    id: r.get(0)?,
                    api_url: r.get(1)?,
                    data_url: r.get(2)?,
                    run: r.get(3)?,
                    started_at: r.get(4)?,
                    heartbeat_at: r.get(5)?,
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
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let dead: Vec<String> = {
            let mut st = tx.prepare("SELECT id FROM nodes WHERE heartbeat_at < ?1 ORDER BY id")?;
            st.query_map([before], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(dead.len());
        for id in dead {
            let mut adopted = match adopter {
                Some(to) => {
                    let mut st = tx.prepare(&format!(
                        "UPDATE sessions SET state = 'detached', detached_at = ?1, node_id = ?2 \
                         WHERE state IN ('connected', 'detached') AND node_id = ?3 \
                         RETURNING {SESSION_COLS}"
                    ))?;
                    st.query_map(params![now, to, id], session_row)?
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => Vec::new(),
            };
            adopted.sort_by(|x, y| (x.created_at, &x.id).cmp(&(y.created_at, &y.id)));
            let closed = tx.execute(
                "UPDATE sessions SET state = 'closed', close_reason = ?1, closed_at = ?2 \
                 WHERE state != 'closed' AND node_id = ?3",
                params![reason.as_str(), now, id],
            )?;
            tx.execute("DELETE FROM agent_channels WHERE node_id = ?1", [&id])?;
            tx.execute("DELETE FROM node_mail WHERE node_id = ?1", [&id])?;
            tx.execute("DELETE FROM nodes WHERE id = ?1", [&id])?;
            out.push(ExpiredNode { id, closed, adopted });
        }
        tx.commit()?;
        Ok(out)
    }

    fn set_agent_channel(&self, instance: &str, ch: &AgentChannel) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO agent_channels (instance_id, node_id, default_user, switch_user) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (instance_id) DO UPDATE SET \
             node_id = excluded.node_id, default_user = excluded.default_user, \
             switch_user = excluded.switch_user",
            params![instance, ch.node_id, ch.default_user, ch.switch_user],
        )?;
        Ok(())
    }

    fn clear_agent_channel(&self, instance: &str, node: &str) -> anyhow::Result<bool> {
        let n = self.lock().execute(
            "DELETE FROM agent_channels WHERE instance_id = ?1 AND node_id = ?2",
            params![instance, node],
        )?;
        Ok(n == 1)
    }

    fn clear_agent_channels(&self, node: &str) -> anyhow::Result<usize> {
        Ok(self.lock().execute("DELETE FROM agent_channels WHERE node_id = ?1", [node])?)
    }

    fn online_instances(&self, since: i64) -> anyhow::Result<Vec<(String, String)>> {
        self.all(
            "SELECT a.instance_id, a.node_id FROM agent_channels a JOIN nodes n \
             ON n.id = a.node_id WHERE n.heartbeat_at >= ?1",
            [since],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    fn agent_channel(&self, instance: &str) -> anyhow::Result<Option<AgentChannel>> {
        self.one(
            "SELECT node_id, default_user, switch_user FROM agent_channels WHERE instance_id = ?1",
            [instance],
            |r| {
                Ok(AgentChannel {
                    node_id: r.get(0)?,
                    default_user: r.get(1)?,
                    switch_user: r.get(2)?,
                })
            },
        )
    }

    fn send_mail(&self, node: &str, body: &str, now: i64) -> anyhow::Result<()> {
        self.lock().execute(
            "INSERT INTO node_mail (node_id, body, created_at) VALUES (?1, ?2, ?3)",
            params![node, body, now],
        )?;
        Ok(())
    }

    fn take_mail(&self, node: &str, limit: u32) -> anyhow::Result<Vec<String>> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let rows: Vec<(i64, String)> = {
            let mut st = tx.prepare(
                "SELECT id, body FROM node_mail WHERE node_id = ?1 ORDER BY id LIMIT ?2",
            )?;
            st.query_map(params![node, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        if let Some((last, _)) = rows.last() {
            tx.execute(
                "DELETE FROM node_mail WHERE node_id = ?1 AND id <= ?2",
                params![node, last],
            )?;
        }
        tx.commit()?;
        Ok(rows.into_iter().map(|(_, b)| b).collect())
    }

    fn signing_keys(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        self.all("SELECT kid, pkcs8 FROM signing_keys ORDER BY kid", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
    }

    fn add_signing_key(
        &self,
        kid: &str,
        pkcs8: &[u8],
        now: i64,
        only_if_none: bool,
    ) -> anyhow::Result<bool> {
        // One connection: the statement is atomic on its own.
        let n = self.lock().execute(
            "INSERT INTO signing_keys (kid, pkcs8, created_at) SELECT ?1, ?2, ?3 \
             WHERE NOT ?4 OR NOT EXISTS (SELECT 1 FROM signing_keys) \
             ON CONFLICT (kid) DO NOTHING",
            params![kid, pkcs8, now, only_if_none],
        )?;
        Ok(n == 1)
    }
}

/// Inserts a session record on `conn` (inside the caller's transaction, if any).
fn insert_session(conn: &Connection, s: &SessionRecord) -> anyhow::Result<()> {
    let command = s.command.as_ref().map(serde_json::to_string).transpose()?;
    conn.prepare_cached(&format!(
        "INSERT INTO sessions ({SESSION_COLS}, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
             ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, \
             (SELECT COALESCE(MAX(seq), 0) + 1 FROM sessions))"
    ))?
    .execute(params![
        s.id,
        s.account_id,
        s.principal,
        s.access_key_id,
        s.source_ip,
        s.instance_id,
        s.mode.as_str(),
        command,
        s.run_as,
        s.state.as_str(),
        s.created_at,
        s.expires_at,
        s.connected_at,
        s.closed_at,
        s.close_reason.map(CloseReason::as_str),
        to_i64(s.bytes_client_to_agent),
        to_i64(s.bytes_agent_to_client),
        s.detached_at,
        s.remote_host,
        s.remote_port,
        s.node_id,
        s.recording.as_str(),
        s.recording_digest
    ])?;
    Ok(())
}

/// "Held by node `?N`, or by none" (a record from before fleets), for the queries above.
const OF_NODE_1: &str = "(node_id = ?1 OR node_id IS NULL)";
const OF_NODE_2: &str = "(node_id = ?2 OR node_id IS NULL)";
const OF_NODE_3: &str = "(node_id = ?3 OR node_id IS NULL)";

#[cfg(test)]
mod tests {
    //! What only the SQLite engine has: its file, WAL, query plans and old schemas. What every
    //! store must do is in `store/suite.rs`, run on both engines.
    use super::*;

    fn account(s: &SqliteStore, id: &str) {
        s.create_account(&Account {
            id: id.into(),
            name: id.into(),
            session_manager_enabled: true,
            created_at: 1,
            prefs: SessionPrefs::default(),
        })
        .unwrap();
    }

    #[test]
    fn migrations_run_once_and_reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hatch.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            account(&s, "acct-1");
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.accounts().unwrap().len(), 1);
        let mode: String = s.lock().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    /// A store written by the relay before durable sessions (four migrations) opens, gains
    /// `detached_at` and the later columns, and keeps its sessions.
    #[test]
    fn an_old_store_migrates_and_keeps_its_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hatch.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 4; \
                 INSERT INTO accounts (id, name, created_at) VALUES ('acct-1', 'a', 1); \
                 INSERT INTO sessions (id, account_id, principal, access_key_id, source_ip, \
                 instance_id, mode, state, created_at, expires_at, connected_at, seq) VALUES \
                 ('s-old', 'acct-1', 'owner', 'ak', '127.0.0.1', 'i-1', 'shell', 'connected', \
                 1, 601, 2, 1);",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let old = s.session(None, "s-old").unwrap().unwrap();
        assert_eq!((old.state, old.detached_at), (SessionState::Connected, None));
        assert!(s.mark_detached("s-old", 10).unwrap());
        let version: i64 = s.lock().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    /// A stored name this relay does not know is an error naming it, not a default.
    #[test]
    fn an_unknown_state_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("hatch.db")).unwrap();
        account(&s, "acct-1");
        s.lock()
            .execute_batch(
                "INSERT INTO sessions (id, account_id, principal, access_key_id, source_ip, \
                 instance_id, mode, state, created_at, expires_at, seq) VALUES \
                 ('s-x', 'acct-1', 'owner', 'ak', '127.0.0.1', 'i-1', 'shell', 'paused', \
                 1, 601, 1);",
            )
            .unwrap();
        let e = s.session(None, "s-x").unwrap_err();
        assert!(format!("{e:#}").contains("unknown name \"paused\""), "{e:#}");
    }

    /// Pruning walks `sessions_closed_at` from its oldest end: a call costs what it deletes,
    /// never a scan of the table.
    #[test]
    fn prune_uses_the_closed_at_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("hatch.db")).unwrap();
        let plan: Vec<String> = {
            let conn = s.lock();
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {PRUNE_CLOSED}")).unwrap();
            st.query_map(params![0, 1], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert!(plan.iter().any(|l| l.contains("sessions_closed_at")), "{plan:?}");
        assert!(!plan.iter().any(|l| l == "SCAN sessions"), "{plan:?}");
    }
}
