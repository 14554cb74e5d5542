//! What the commands print: aligned tables and `key  value` lines for people, the relay's JSON
//! (pretty-printed, unchanged) for scripts.
//!
//! Tables read the JSON by field name, with alternatives where the API's naming could vary,
//! and print `-` for an absent field, so that a newer relay with more fields still prints.
//! Time is a parameter (`now`, Unix seconds) so that "3 min ago" is testable.
//!
//! Tables and details go to a person's terminal, and their text is other people's: a session's
//! command is whatever its user typed, a host name what an agent sent at registration. A
//! terminal acts on escape sequences in it (repaint the screen, set the title, write the
//! clipboard with OSC 52, hide the rest of a line), so every control character and every
//! character that reorders or hides text is shown escaped (`\u{1b}`, `\n`), never written raw.
//! `--json` output is JSON and escapes them itself.

use serde_json::Value;

/// One table column: its title and the JSON fields that may hold its value, first found wins.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Header text.
    pub title: &'static str,
    /// Candidate field names.
    pub keys: &'static [&'static str],
    /// How to show the value.
    pub kind: Kind,
}

/// How a column shows its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// As text.
    Text,
    /// A timestamp (RFC 3339 or Unix seconds) shown as "N min ago".
    Ago,
    /// A boolean shown as `online` / `offline`.
    Online,
    /// An object shown as `k=v,k=v`.
    Tags,
    /// An array shown as `a,b`; `-` when empty.
    List,
    /// The user an access key belongs to; absent: `owner` (the account owner's key).
    KeyOwner,
    /// A timestamp that may be ahead (an expiry): "in 3 h", or "N min ago" once past.
    Until,
}

/// Columns of `hatch sessions`.
pub const SESSION_COLUMNS: &[Column] = &[
    Column { title: "SESSION", keys: &["session_id", "id"], kind: Kind::Text },
    Column { title: "INSTANCE", keys: &["instance_id"], kind: Kind::Text },
    Column { title: "STATE", keys: &["state"], kind: Kind::Text },
    Column { title: "MODE", keys: &["mode"], kind: Kind::Text },
    Column { title: "RUN AS", keys: &["run_as"], kind: Kind::Text },
    Column { title: "OWNER", keys: &["principal", "user_id", "user"], kind: Kind::Text },
    Column { title: "STARTED", keys: &["created_at", "started_at"], kind: Kind::Ago },
    Column { title: "REASON", keys: &["close_reason", "reason"], kind: Kind::Text },
];

/// Columns of `hatch instances`.
pub const INSTANCE_COLUMNS: &[Column] = &[
    Column { title: "INSTANCE", keys: &["instance_id", "id"], kind: Kind::Text },
    Column { title: "HOSTNAME", keys: &["hostname", "name"], kind: Kind::Text },
    Column { title: "STATUS", keys: &["online", "status"], kind: Kind::Online },
    Column { title: "LAST SEEN", keys: &["last_seen", "last_seen_at"], kind: Kind::Ago },
    Column { title: "REGION", keys: &["region"], kind: Kind::Text },
    Column { title: "TAGS", keys: &["tags"], kind: Kind::Tags },
];

/// Columns of `hatch audit`.
pub const AUDIT_COLUMNS: &[Column] = &[
    Column { title: "TIME", keys: &["time"], kind: Kind::Text },
    Column { title: "CALLER", keys: &["caller"], kind: Kind::Text },
    Column { title: "SOURCE", keys: &["source_ip"], kind: Kind::Text },
    Column { title: "ACTION", keys: &["action"], kind: Kind::Text },
    Column { title: "TARGET", keys: &["target"], kind: Kind::Text },
    Column { title: "OUTCOME", keys: &["outcome"], kind: Kind::Text },
];

/// Columns of `hatch users list`.
pub const USER_COLUMNS: &[Column] = &[
    Column { title: "USER", keys: &["name"], kind: Kind::Text },
    Column { title: "ID", keys: &["user_id", "id"], kind: Kind::Text },
    Column { title: "POLICIES", keys: &["policies"], kind: Kind::List },
    Column { title: "CREATED", keys: &["created_at"], kind: Kind::Ago },
    Column { title: "DISABLED", keys: &["disabled_at"], kind: Kind::Ago },
];

/// Columns of `hatch keys list`.
pub const ACCESS_KEY_COLUMNS: &[Column] = &[
    Column { title: "ACCESS KEY", keys: &["access_key_id", "id"], kind: Kind::Text },
    Column { title: "USER", keys: &["user"], kind: Kind::KeyOwner },
    Column { title: "CREATED", keys: &["created_at"], kind: Kind::Ago },
    Column { title: "REVOKED", keys: &["revoked_at"], kind: Kind::Ago },
];

/// Columns of `hatch policies list`.
pub const POLICY_COLUMNS: &[Column] = &[
    Column { title: "POLICY", keys: &["name"], kind: Kind::Text },
    Column { title: "ATTACHED TO", keys: &["attached_to"], kind: Kind::List },
    Column { title: "UPDATED", keys: &["updated_at"], kind: Kind::Ago },
];

/// Columns of `hatch activations list`.
pub const ACTIVATION_COLUMNS: &[Column] = &[
    Column { title: "ACTIVATION", keys: &["activation_id", "id"], kind: Kind::Text },
    Column { title: "REGION", keys: &["region"], kind: Kind::Text },
    Column { title: "USED", keys: &["registrations"], kind: Kind::Text },
    Column { title: "MAX", keys: &["max_registrations"], kind: Kind::Text },
    Column { title: "EXPIRES", keys: &["expires_at"], kind: Kind::Until },
    Column { title: "REVOKED", keys: &["revoked_at"], kind: Kind::Ago },
    Column { title: "TAGS", keys: &["tags"], kind: Kind::Tags },
];

/// The items of a list answer: the answer itself if it is an array, else its `key` array.
pub fn items<'a>(answer: &'a Value, key: &str) -> Vec<&'a Value> {
    match answer {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => match o.get(key) {
            Some(Value::Array(a)) => a.iter().collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// An aligned table with a header row; columns separated by two spaces, no trailing blanks.
pub fn table(rows: &[&Value], columns: &[Column], now: i64) -> String {
    let cells: Vec<Vec<String>> =
        rows.iter().map(|row| columns.iter().map(|c| cell(row, c, now)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells.iter().map(|r| r[i].chars().count()).chain([c.title.len()]).max().unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |values: Vec<&str>| {
        let mut l = String::new();
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(v);
            if i + 1 < values.len() {
                l.extend(std::iter::repeat_n(' ', widths[i] - v.chars().count()));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(columns.iter().map(|c| c.title).collect());
    for r in &cells {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `key: value` lines of one object (`hatch sessions show`), keys aligned and sorted.
pub fn details(obj: &Value, now: i64) -> String {
    let Value::Object(map) = obj else { return format!("{}\n", printable(&obj.to_string())) };
    let width = map.keys().map(|k| printable(k).chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in map {
        let mut shown = text(v);
        if (k.ends_with("_at") || k == "last_seen")
            && let Some(ago) = ago(v, now)
        {
            shown = format!("{shown} ({ago})");
        }
        let k = printable(k);
        out.push_str(&format!("{k:<width$}  {shown}\n"));
    }
    out
}

/// `key  value` lines of `keys` of one object, in that order and aligned (what a person needs
/// of an answer, such as a new key's id and secret); an absent key prints `-`.
pub fn fields(obj: &Value, keys: &[&str]) -> String {
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for k in keys {
        out.push_str(&format!("{k:<width$}  {}\n", field(obj, k)));
    }
    out
}

/// `hatch account show`: the switch as on/off, each preference in seconds or as the relay's.
pub fn account_settings(settings: &Value) -> String {
    let switch = match settings.get("session_manager_enabled") {
        Some(Value::Bool(true)) => "on".to_owned(),
        Some(Value::Bool(false)) => "off (no session can start)".to_owned(),
        Some(other) => text(other),
        None => "-".to_owned(),
    };
    let pref = |key: &str, flag: &str| match settings.get(key) {
        None | Some(Value::Null) => format!("the relay's ({flag})"),
        Some(Value::Number(n)) => format!("{n} s"),
        Some(other) => text(other),
    };
    let recording = settings.get("recording").map_or_else(|| "off".to_owned(), text);
    format!(
        "session manager  {switch}\nidle timeout     {}\nmax duration     {}\nrecording        {recording}\n",
        pref("idle_timeout_s", "--idle-timeout"),
        pref("max_duration_s", "--max-duration"),
    )
}

fn cell(row: &Value, column: &Column, now: i64) -> String {
    let Some(v) = column.keys.iter().find_map(|k| row.get(k)).filter(|v| !v.is_null()) else {
        let absent = if column.kind == Kind::KeyOwner { "owner" } else { "-" };
        return absent.to_owned();
    };
    match column.kind {
        Kind::Text => text(v),
        Kind::Ago => ago(v, now).unwrap_or_else(|| text(v)),
        Kind::Online => match v {
            Value::Bool(true) => "online".to_owned(),
            Value::Bool(false) => "offline".to_owned(),
            other => text(other),
        },
        Kind::Tags => tags(v),
        Kind::List => match v {
            Value::Array(a) if a.is_empty() => "-".to_owned(),
            Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
            other => text(other),
        },
        Kind::KeyOwner => text(v),
        Kind::Until => until(v, now).unwrap_or_else(|| text(v)),
    }
}

/// Tags as `k=v,k=v` (`-` for none), safe to print.
pub fn tags(v: &Value) -> String {
    match v {
        Value::Object(m) if m.is_empty() => "-".to_owned(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{}={}", printable(k), text(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => text(other),
    }
}

/// One field of an answer as text safe to print; `-` when absent.
pub fn field(obj: &Value, key: &str) -> String {
    obj.get(key).map(text).unwrap_or_else(|| "-".to_owned())
}

/// "in 3 h" for a time ahead of `now` (rounded down, as [`ago`]), else as [`ago`].
pub fn until(v: &Value, now: i64) -> Option<String> {
    let secs = unix_seconds(v)?.saturating_sub(now);
    if secs <= 0 {
        return ago(v, now);
    }
    Some(match secs {
        1..=59 => format!("in {secs} s"),
        60..=3599 => format!("in {} min", secs / 60),
        3600..=86_399 => format!("in {} h", secs / 3600),
        _ => format!("in {} d", secs / 86_400),
    })
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => printable(s),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(" "),
        // JSON text escapes C0 controls but not DEL or the C1 controls (U+009B is a CSI).
        other => printable(&other.to_string()),
    }
}

/// `s` safe to write to a terminal: control characters (C0, DEL, C1) and the invisible
/// characters that reorder or hide text (bidi overrides and isolates, zero-width characters,
/// line and paragraph separators) escaped as `\n`, `\r`, `\t` or `\u{..}`; the rest as is.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || hides_text(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Unicode format characters a terminal draws as nothing while they change what the text
/// around them looks like.
fn hides_text(c: char) -> bool {
    matches!(c,
        '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Unix seconds of a timestamp given as RFC 3339 text or as a number of seconds.
pub fn unix_seconds(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| t.unix_timestamp())
        }
        _ => None,
    }
}

/// "12 s ago", "3 min ago", "2 h ago", "5 d ago" (rounded down); "just now" under a second.
pub fn ago(v: &Value, now: i64) -> Option<String> {
    let secs = now.saturating_sub(unix_seconds(v)?).max(0);
    Some(match secs {
        0 => "just now".to_owned(),
        1..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    })
}

/// The current time in Unix seconds.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;

    #[test]
    fn ago_table() {
        for (v, want) in [
            (json!(NOW), Some("just now")),
            (json!(NOW - 12), Some("12 s ago")),
            (json!(NOW - 180), Some("3 min ago")),
            (json!(NOW - 7300), Some("2 h ago")),
            (json!(NOW - 5 * 86_400 - 5), Some("5 d ago")),
            (json!(NOW + 30), Some("just now")),
            (json!("2023-11-14T22:10:20Z"), Some("3 min ago")),
            (json!("yesterday"), None),
            (json!(null), None),
        ] {
            assert_eq!(ago(&v, NOW).as_deref(), want, "{v}");
        }
    }

    #[test]
    fn instances_table() {
        let answer = json!({"instances": [
            {"instance_id": "i-0123456789abcdef", "hostname": "web-1", "online": true,
             "last_seen": NOW - 5, "region": "eu-1", "tags": {"env": "prod", "role": "web"}},
            {"instance_id": "i-fedcba9876543210", "online": false,
             "last_seen": "2023-11-14T22:10:20Z", "tags": {}},
        ]});
        let rows = items(&answer, "instances");
        assert_eq!(
            table(&rows, INSTANCE_COLUMNS, NOW),
            "INSTANCE            HOSTNAME  STATUS   LAST SEEN  REGION  TAGS\n\
             i-0123456789abcdef  web-1     online   5 s ago    eu-1    env=prod,role=web\n\
             i-fedcba9876543210  -         offline  3 min ago  -       -\n"
        );
    }

    #[test]
    fn sessions_table_from_a_bare_array() {
        let answer = json!([
            {"session_id": "s-00000000000000aa", "instance_id": "i-0123456789abcdef",
             "state": "closed", "mode": "exec", "run_as": "root", "user_id": "u-1",
             "created_at": NOW - 120, "close_reason": "exit"},
        ]);
        let rows = items(&answer, "sessions");
        assert_eq!(
            table(&rows, SESSION_COLUMNS, NOW),
            "SESSION             INSTANCE            STATE   MODE  RUN AS  OWNER  STARTED    REASON\n\
             s-00000000000000aa  i-0123456789abcdef  closed  exec  root    u-1    2 min ago  exit\n"
        );
    }

    /// A session waiting to be resumed shows the relay's state as it is, with no reason yet.
    #[test]
    fn sessions_table_shows_a_detached_session() {
        let answer = json!({"sessions": [
            {"session_id": "s-00000000000000ab", "instance_id": "i-0123456789abcdef",
             "state": "detached", "mode": "shell", "run_as": "deploy", "principal": "owner",
             "created_at": NOW - 60, "detached_at": NOW - 5},
        ]});
        let rows = items(&answer, "sessions");
        assert_eq!(
            table(&rows, SESSION_COLUMNS, NOW),
            "SESSION             INSTANCE            STATE     MODE   RUN AS  OWNER  STARTED    REASON\n\
             s-00000000000000ab  i-0123456789abcdef  detached  shell  deploy  owner  1 min ago  -\n"
        );
    }

    #[test]
    fn empty_list_prints_only_the_header() {
        let answer = json!({"sessions": []});
        let rows = items(&answer, "sessions");
        assert_eq!(
            table(&rows, SESSION_COLUMNS, NOW),
            "SESSION  INSTANCE  STATE  MODE  RUN AS  OWNER  STARTED  REASON\n"
        );
    }

    #[test]
    fn terminal_escapes_in_peer_text_are_shown_escaped_never_written_raw() {
        // A user's command (OSC 52 writes the viewer's clipboard, CSI 2J clears the screen, a
        // C1 CSI, a bidi override) and an agent's host name, as another person's
        // `hatch sessions show` and `hatch instances` print them.
        let session = json!({"session_id": "s-1",
            "command": ["sh", "-c", "x\u{1b}]52;c;Y3VybCBldmlsfHNo\u{7}\u{1b}[2J\u{9b}31m\r\n"],
            "run_as": "root\u{202e}toor", "bytes_in": 1});
        let shown = details(&session, NOW);
        assert_eq!(
            shown,
            "bytes_in    1\n\
             command     sh -c x\\u{1b}]52;c;Y3VybCBldmlsfHNo\\u{7}\\u{1b}[2J\\u{9b}31m\\r\\n\n\
             run_as      root\\u{202e}toor\n\
             session_id  s-1\n"
        );
        let instances = json!([{"instance_id": "i-1", "hostname": "web\u{1b}[8m-1",
            "tags": {"e\u{7f}nv": "pr\u{1b}od"}}]);
        let table = table(&items(&instances, "instances"), INSTANCE_COLUMNS, NOW);
        assert_eq!(
            table,
            "INSTANCE  HOSTNAME        STATUS  LAST SEEN  REGION  TAGS\n\
             i-1       web\\u{1b}[8m-1  -       -          -       e\\u{7f}nv=pr\\u{1b}od\n"
        );
        for out in [&shown, &table] {
            assert!(
                !out.chars().any(|c| (c.is_control() && c != '\n') || hides_text(c)),
                "{out:?}"
            );
        }
    }

    #[test]
    fn iam_tables() {
        let users = json!({"users": [
            {"user_id": "u-00000000000000a1", "name": "alice", "created_at": NOW - 120,
             "policies": ["read-only", "ops"]},
            {"user_id": "u-00000000000000b2", "name": "bob@example.com", "created_at": NOW - 60,
             "disabled_at": NOW - 5, "policies": []},
        ]});
        assert_eq!(
            table(&items(&users, "users"), USER_COLUMNS, NOW),
            "USER             ID                  POLICIES       CREATED    DISABLED\n\
             alice            u-00000000000000a1  read-only,ops  2 min ago  -\n\
             bob@example.com  u-00000000000000b2  -              1 min ago  5 s ago\n"
        );
        let keys = json!({"access_keys": [
            {"access_key_id": "ak-00000000000000a1", "created_at": NOW - 60},
            {"access_key_id": "ak-00000000000000b2", "user": "alice", "created_at": NOW - 60,
             "revoked_at": NOW - 1},
        ]});
        assert_eq!(
            table(&items(&keys, "access_keys"), ACCESS_KEY_COLUMNS, NOW),
            "ACCESS KEY           USER   CREATED    REVOKED\n\
             ak-00000000000000a1  owner  1 min ago  -\n\
             ak-00000000000000b2  alice  1 min ago  1 s ago\n"
        );
        let policies = json!({"policies": [
            {"name": "read-only", "document": {}, "updated_at": NOW - 3600,
             "attached_to": ["alice"]},
        ]});
        assert_eq!(
            table(&items(&policies, "policies"), POLICY_COLUMNS, NOW),
            "POLICY     ATTACHED TO  UPDATED\nread-only  alice        1 h ago\n"
        );
        let activations = json!({"activations": [
            {"activation_id": "act-00000000000000a1", "region": "eu-1", "tags": {"env": "dev"},
             "max_registrations": 5, "registrations": 2, "expires_at": NOW + 7300,
             "created_at": NOW - 10},
            {"activation_id": "act-00000000000000b2", "region": "eu-1", "tags": {},
             "max_registrations": 1, "registrations": 0, "expires_at": NOW - 60,
             "created_at": NOW - 100, "revoked_at": NOW - 90},
        ]});
        assert_eq!(
            table(&items(&activations, "activations"), ACTIVATION_COLUMNS, NOW),
            "ACTIVATION            REGION  USED  MAX  EXPIRES    REVOKED    TAGS\n\
             act-00000000000000a1  eu-1    2     5    in 2 h     -          env=dev\n\
             act-00000000000000b2  eu-1    0     1    1 min ago  1 min ago  -\n"
        );
    }

    #[test]
    fn until_looks_ahead() {
        for (v, want) in [
            (json!(NOW + 30), "in 30 s"),
            (json!(NOW + 180), "in 3 min"),
            (json!(NOW + 7300), "in 2 h"),
            (json!(NOW + 2 * 86_400 + 1), "in 2 d"),
            (json!(NOW), "just now"),
            (json!(NOW - 180), "3 min ago"),
        ] {
            assert_eq!(until(&v, NOW).as_deref(), Some(want), "{v}");
        }
        assert_eq!(until(&json!("soon"), NOW), None);
    }

    #[test]
    fn fields_and_account_settings() {
        let key = json!({"access_key_id": "ak-1", "secret": "hk_1_x\u{1b}[2J", "created_at": 1});
        assert_eq!(
            fields(&key, &["access_key_id", "secret", "user"]),
            "access_key_id  ak-1\nsecret         hk_1_x\\u{1b}[2J\nuser           -\n"
        );
        assert_eq!(
            account_settings(&json!({"session_manager_enabled": true, "max_duration_s": 3600})),
            "session manager  on\n\
             idle timeout     the relay's (--idle-timeout)\n\
             max duration     3600 s\n\
             recording        off\n"
        );
        assert!(
            account_settings(&json!({"session_manager_enabled": true, "recording": "full"}))
                .ends_with("recording        full\n")
        );
        assert!(
            account_settings(&json!({"session_manager_enabled": false}))
                .starts_with("session manager  off (no session can start)\n")
        );
    }

    #[test]
    fn details_align_keys_and_explain_times() {
        let obj = json!({"session_id": "s-1", "state": "active", "created_at": NOW - 60,
                         "bytes_in": 12});
        assert_eq!(
            details(&obj, NOW),
            "bytes_in    12\ncreated_at  1699999940 (1 min ago)\nsession_id  s-1\nstate       active\n"
        );
    }
}
