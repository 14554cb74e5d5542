//! The SQLite store's schema: its migrations, applied in order at open.

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    session_manager_enabled INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL
);
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (account_id, name)
);
CREATE TABLE access_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    user_id TEXT REFERENCES users(id),
    secret_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE policies (
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    document TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, name)
);
CREATE TABLE policy_attachments (
    account_id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    policy_name TEXT NOT NULL,
    PRIMARY KEY (user_id, policy_name),
    FOREIGN KEY (account_id, policy_name) REFERENCES policies(account_id, name)
);
CREATE TABLE activations (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    code_hash BLOB NOT NULL,
    region TEXT NOT NULL,
    tags TEXT NOT NULL,
    max_registrations INTEGER NOT NULL,
    registrations INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    activation_id TEXT NOT NULL,
    region TEXT NOT NULL,
    tags TEXT NOT NULL,
    hostname TEXT,
    secret_hash BLOB NOT NULL UNIQUE,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER
);
CREATE INDEX instances_account ON instances (account_id);
CREATE TABLE sessions (
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
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    connected_at INTEGER,
    closed_at INTEGER,
    close_reason TEXT,
    bytes_client_to_agent INTEGER NOT NULL DEFAULT 0,
    bytes_agent_to_client INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL
);
CREATE INDEX sessions_account_seq ON sessions (account_id, seq);
CREATE INDEX sessions_open ON sessions (state) WHERE state != 'closed';
"#,
    // New sessions take MAX(seq) + 1: without this index that is a scan of every session.
    r#"
CREATE INDEX sessions_seq ON sessions (seq);
"#,
    // The running relay looks for sessions closed by `hatch-relay admin` (another process).
    r#"
CREATE INDEX sessions_closed_at ON sessions (closed_at) WHERE closed_at IS NOT NULL;
"#,
    // Revocation reaches live sessions: disabled users, and a counter of access-removing
    // changes per account that the running relay watches.
    r#"
ALTER TABLE users ADD COLUMN disabled_at INTEGER;
ALTER TABLE accounts ADD COLUMN iam_generation INTEGER NOT NULL DEFAULT 0;
"#,
    // Durable sessions: state `detached` (a `state` value, no schema change) and when.
    r#"
ALTER TABLE sessions ADD COLUMN detached_at INTEGER;
"#,
    // Port sessions: the destination, so that a resume and a recheck evaluate
    // StartPortForwarding with the keys the start was evaluated with.
    r#"
ALTER TABLE sessions ADD COLUMN remote_host TEXT;
ALTER TABLE sessions ADD COLUMN remote_port INTEGER;
"#,
    // Per-account session preferences (NULL: the relay's flags).
    r#"
ALTER TABLE accounts ADD COLUMN idle_timeout_s INTEGER;
ALTER TABLE accounts ADD COLUMN max_duration_s INTEGER;
"#,
    // IAM through the API: an activation can be revoked, an instance's secret too (the record
    // stays, for its sessions' history; its agent must register again).
    r#"
ALTER TABLE activations ADD COLUMN revoked_at INTEGER;
ALTER TABLE instances ADD COLUMN secret_revoked_at INTEGER;
"#,
    // Fleets: the node holding each session, the nodes, which node holds each agent's control
    // channel, mail between nodes, and signing keys shared by them. One SQLite relay uses the
    // first and the second only; the others exist so that both engines keep one contract.
    r#"
ALTER TABLE sessions ADD COLUMN node_id TEXT;
CREATE INDEX sessions_open_account ON sessions (account_id, instance_id) WHERE state != 'closed';
CREATE INDEX sessions_open_node ON sessions (node_id) WHERE state != 'closed';
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    api_url TEXT NOT NULL,
    data_url TEXT NOT NULL,
    run TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
CREATE TABLE agent_channels (
    instance_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    default_user TEXT NOT NULL,
    switch_user INTEGER NOT NULL
);
CREATE TABLE node_mail (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX node_mail_node ON node_mail (node_id, id);
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    pkcs8 BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
    // Session recording (issue 16): the account's setting, the mode each session was started
    // with (its resumes keep it), and the final digest of its recording once it ended.
    r#"
ALTER TABLE accounts ADD COLUMN recording TEXT NOT NULL DEFAULT 'off';
ALTER TABLE sessions ADD COLUMN recording TEXT NOT NULL DEFAULT 'off';
ALTER TABLE sessions ADD COLUMN recording_digest TEXT;
"#,
    // The audit log (control::audit): one JSON line per event, found by account and order.
    r#"
CREATE TABLE audit_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    account_id TEXT,
    line TEXT NOT NULL
);
CREATE INDEX audit_events_account ON audit_events (account_id, seq);
"#,
];
