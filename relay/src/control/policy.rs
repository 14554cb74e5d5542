//! The policy language (RAM/IAM-shaped JSON, see `docs/POLICY.md`) and its evaluation.
//!
//! A document is parsed and validated once, when it is put or attached, into a [`Policy`];
//! a bad document is refused with a [`PolicyError`] naming the field
//! (`Statement[1].Condition.IpAddress.hatch:SourceIp`). Evaluation is pure and allocation-light:
//! statements whose action, resource and every condition match apply; any matching `Deny` wins;
//! otherwise any matching `Allow` allows; otherwise the request is denied by default.
//!
//! Conditions follow IAM semantics: several values of one key are ORed; several keys, and
//! several operators, are ANDed. A key absent from the request makes a condition false, except
//! for the negated operators (`StringNotEquals`, `NotIpAddress`, `NumericNotEquals`) and the
//! `...IfExists` forms, which are then true; `Null` tests for absence itself.
//!
//! Numeric operators (`NumericEquals`, `NumericLessThan`, ...) compare numbers: a JSON number or
//! a string holding one in the document (anything else is refused when parsed), and the key's
//! value read as a number in the request (a value that is not one makes the condition false).
//!
//! Absent keys are rare by construction, so that a `Deny` never silently stops applying: every
//! key an action defines ([`action_keys`]) is always in its context — `hatch:RunAs` of a
//! StartSession is the user the session will run as (the caller's `run_as` or the agent's
//! default user), never absent; `hatch:RemoteHost` and `hatch:RemotePort` of a
//! StartPortForwarding are the destination asked for — and only instance tags can be missing. A
//! condition on a key that none of its statement's actions define, with an operator that is then
//! false (so the statement could never apply), is refused when the document is parsed.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

/// Largest document accepted, in bytes of JSON.
pub const MAX_DOCUMENT_BYTES: usize = 32 * 1024;

/// Actions the API checks. Patterns in `Action` must match at least one of them.
pub const ACTIONS: &[&str] = &[
    "hatch:StartSession",
    "hatch:StartPortForwarding",
    "hatch:DescribeSessions",
    "hatch:TerminateSession",
    "hatch:GetSessionRecording",
    "hatch:DescribeInstances",
    "hatch:TagInstance",
    "hatch:DeregisterInstance",
    "hatch:RevokeInstanceSecret",
    "hatch:ListUsers",
    "hatch:CreateUser",
    "hatch:DeleteUser",
    "hatch:AttachUserPolicy",
    "hatch:DetachUserPolicy",
    "hatch:ListAccessKeys",
    "hatch:CreateAccessKey",
    "hatch:DeleteAccessKey",
    "hatch:ListPolicies",
    "hatch:PutPolicy",
    "hatch:DeletePolicy",
    "hatch:ListActivations",
    "hatch:CreateActivation",
    "hatch:DeleteActivation",
    "hatch:ReadAudit",
];

/// The IAM actions on instances: evaluated on the instance, with its keys.
pub const INSTANCE_IAM_ACTIONS: &[&str] =
    &["hatch:TagInstance", "hatch:DeregisterInstance", "hatch:RevokeInstanceSecret"];

/// The actions on an account's users, keys, policies and activations (the rest of
/// [`ACTIONS`] act on an instance).
pub const ACCOUNT_ACTIONS: &[&str] = &[
    "hatch:ListUsers",
    "hatch:CreateUser",
    "hatch:DeleteUser",
    "hatch:AttachUserPolicy",
    "hatch:DetachUserPolicy",
    "hatch:ListAccessKeys",
    "hatch:CreateAccessKey",
    "hatch:DeleteAccessKey",
    "hatch:ListPolicies",
    "hatch:PutPolicy",
    "hatch:DeletePolicy",
    "hatch:ListActivations",
    "hatch:CreateActivation",
    "hatch:DeleteActivation",
    "hatch:ReadAudit",
];

/// Start a session on an instance.
pub const START_SESSION: &str = "hatch:StartSession";
/// Start forwarding a port through an instance to a destination it can reach.
pub const START_PORT_FORWARDING: &str = "hatch:StartPortForwarding";
/// See sessions on an instance.
pub const DESCRIBE_SESSIONS: &str = "hatch:DescribeSessions";
/// Terminate sessions on an instance.
pub const TERMINATE_SESSION: &str = "hatch:TerminateSession";
/// Read the recording of a session on an instance (`GET /v1/sessions/{id}/recording`).
pub const GET_SESSION_RECORDING: &str = "hatch:GetSessionRecording";
/// See an instance in `GET /v1/instances`.
pub const DESCRIBE_INSTANCES: &str = "hatch:DescribeInstances";
/// Replace an instance's tags.
pub const TAG_INSTANCE: &str = "hatch:TagInstance";
/// Remove an instance from the account (its agent can no longer connect).
pub const DEREGISTER_INSTANCE: &str = "hatch:DeregisterInstance";
/// Make an instance's secret worthless (its agent must register again).
pub const REVOKE_INSTANCE_SECRET: &str = "hatch:RevokeInstanceSecret";
/// List users (resource `user/*`).
pub const LIST_USERS: &str = "hatch:ListUsers";
/// Create a user (resource `user/{name}`).
pub const CREATE_USER: &str = "hatch:CreateUser";
/// Delete a user, with their keys and attachments.
pub const DELETE_USER: &str = "hatch:DeleteUser";
/// Attach a policy to a user (resource: the user).
pub const ATTACH_USER_POLICY: &str = "hatch:AttachUserPolicy";
/// Detach a policy from a user (resource: the user).
pub const DETACH_USER_POLICY: &str = "hatch:DetachUserPolicy";
/// List a user's access keys (resource: the user; `user/*` for every user's).
pub const LIST_ACCESS_KEYS: &str = "hatch:ListAccessKeys";
/// Create an access key for a user (resource: the user).
pub const CREATE_ACCESS_KEY: &str = "hatch:CreateAccessKey";
/// Revoke a user's access key (resource: the user).
pub const DELETE_ACCESS_KEY: &str = "hatch:DeleteAccessKey";
/// List policies (resource `policy/*`).
pub const LIST_POLICIES: &str = "hatch:ListPolicies";
/// Create or replace a policy (resource `policy/{name}`).
pub const PUT_POLICY: &str = "hatch:PutPolicy";
/// Delete a policy that no user has attached.
pub const DELETE_POLICY: &str = "hatch:DeletePolicy";
/// List activations (resource `activation/*`).
pub const LIST_ACTIVATIONS: &str = "hatch:ListActivations";
/// Create an activation (resource `activation/*`).
pub const CREATE_ACTIVATION: &str = "hatch:CreateActivation";
/// Revoke an activation (resource `activation/{id}`).
pub const DELETE_ACTIVATION: &str = "hatch:DeleteActivation";
/// Read the account's audit log (`GET /v1/audit`).
pub const READ_AUDIT: &str = "hatch:ReadAudit";

/// A refused document: the path of the bad field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// JSON path of the bad field, e.g. `Statement[0].Effect`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError { field: field.into(), message: message.into() }
}

/// Allow or Deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Allows when it matches and nothing denies.
    Allow,
    /// Denies when it matches, whatever allows.
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    StringEquals,
    StringNotEquals,
    StringLike,
    IpAddress,
    NotIpAddress,
    Bool,
    NumericEquals,
    NumericNotEquals,
    NumericLessThan,
    NumericLessThanEquals,
    NumericGreaterThan,
    NumericGreaterThanEquals,
    /// True when the key is absent (`true`) or present (`false`).
    Null,
}

impl Op {
    /// The operator and whether it has the `IfExists` suffix (true when the key is absent).
    fn parse(s: &str) -> Option<(Op, bool)> {
        let (base, if_exists) = match s.strip_suffix("IfExists") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let op = match base {
            "StringEquals" => Op::StringEquals,
            "StringNotEquals" => Op::StringNotEquals,
            "StringLike" => Op::StringLike,
            "IpAddress" => Op::IpAddress,
            "NotIpAddress" => Op::NotIpAddress,
            "Bool" => Op::Bool,
            "NumericEquals" => Op::NumericEquals,
            "NumericNotEquals" => Op::NumericNotEquals,
            "NumericLessThan" => Op::NumericLessThan,
            "NumericLessThanEquals" => Op::NumericLessThanEquals,
            "NumericGreaterThan" => Op::NumericGreaterThan,
            "NumericGreaterThanEquals" => Op::NumericGreaterThanEquals,
            "Null" if !if_exists => Op::Null,
            _ => return None,
        };
        Some((op, if_exists))
    }

    /// Whether a condition with this operator holds when its key is absent: the negated
    /// operators are, as in IAM (the value equals none of the values).
    fn holds_when_absent(self, if_exists: bool) -> bool {
        if_exists || matches!(self, Op::StringNotEquals | Op::NotIpAddress | Op::NumericNotEquals)
    }

    fn is_numeric(self) -> bool {
        matches!(
            self,
            Op::NumericEquals
                | Op::NumericNotEquals
                | Op::NumericLessThan
                | Op::NumericLessThanEquals
                | Op::NumericGreaterThan
                | Op::NumericGreaterThanEquals
        )
    }
}

/// A number of a numeric condition. IAM's numeric operators take integers and decimals, so both
/// are accepted. An integer is kept as an `i64`, which compares exactly over its whole range (an
/// `f64` holds integers exactly only up to 2^53, so two large distinct ids could compare equal);
/// a decimal is an `f64`, and a comparison that involves one is made in `f64`. Infinities and
/// NaN are not numbers here (Rust would parse `"inf"` and `"NaN"`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i64),
    Dec(f64),
}

impl Num {
    fn parse(s: &str) -> Option<Num> {
        if let Ok(i) = s.parse::<i64>() {
            return Some(Num::Int(i));
        }
        s.parse::<f64>().ok().filter(|f| f.is_finite()).map(Num::Dec)
    }

    /// A JSON number, or a string holding one.
    fn from_json(v: &Value) -> Option<Num> {
        match v {
            Value::Number(n) => n
                .as_i64()
                .map(Num::Int)
                .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(Num::Dec)),
            Value::String(s) => Num::parse(s),
            _ => None,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            // Beyond 2^53 this rounds; only a comparison with a decimal gets here.
            Num::Int(i) => i as f64,
            Num::Dec(f) => f,
        }
    }

    /// `None` never occurs for finite numbers; it makes a condition false.
    fn compare(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }
}

/// A condition key of the request context.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    SourceIp,
    Region,
    InstanceId,
    RunAs,
    Mode,
    RemoteHost,
    RemotePort,
    Tag(String),
}

impl Key {
    /// The canonical name of a key that is not a tag.
    fn fixed_name(&self) -> Option<&'static str> {
        Some(match self {
            Key::SourceIp => "hatch:SourceIp",
            Key::Region => "hatch:Region",
            Key::InstanceId => "hatch:InstanceId",
            Key::RunAs => "hatch:RunAs",
            Key::Mode => "hatch:Mode",
            Key::RemoteHost => "hatch:RemoteHost",
            Key::RemotePort => "hatch:RemotePort",
            Key::Tag(_) => return None,
        })
    }

    fn parse(s: &str) -> Option<Key> {
        if let Some(tag) = s.strip_prefix("hatch:tag/") {
            return (!tag.is_empty()).then(|| Key::Tag(tag.to_owned()));
        }
        Some(match s.to_ascii_lowercase().as_str() {
            "hatch:sourceip" => Key::SourceIp,
            "hatch:region" => Key::Region,
            "hatch:instanceid" => Key::InstanceId,
            "hatch:runas" => Key::RunAs,
            "hatch:mode" => Key::Mode,
            "hatch:remotehost" => Key::RemoteHost,
            "hatch:remoteport" => Key::RemotePort,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
enum Values {
    Strings(Vec<String>),
    Nets(Vec<IpNet>),
    Nums(Vec<Num>),
    Bool(bool),
}

#[derive(Debug, Clone)]
struct Condition {
    op: Op,
    /// `...IfExists`: true when the key is absent.
    if_exists: bool,
    key: Key,
    values: Values,
}

#[derive(Debug, Clone)]
struct Statement {
    effect: Effect,
    /// Lower-cased patterns (actions compare case-insensitively, as in IAM).
    actions: Vec<String>,
    resources: Vec<String>,
    conditions: Vec<Condition>,
}

/// A validated policy document.
#[derive(Debug, Clone)]
pub struct Policy {
    statements: Vec<Statement>,
}

/// The request context conditions are evaluated against.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The caller's address (IPv4-mapped IPv6 addresses are given as IPv4).
    pub source_ip: Option<IpAddr>,
    /// The instance's region.
    pub region: Option<String>,
    /// The instance id.
    pub instance_id: Option<String>,
    /// The user the session will run as (StartSession: the caller's `run_as`, or the agent's
    /// default user when the caller named none).
    pub run_as: Option<String>,
    /// `shell` or `exec` (absent for actions other than StartSession).
    pub mode: Option<String>,
    /// The destination host of a port forwarding as the caller asked for it (`127.0.0.1`,
    /// `db.internal`), not resolved (absent for actions other than StartPortForwarding).
    pub remote_host: Option<String>,
    /// The destination port of a port forwarding, 1–65535 (absent for actions other than
    /// StartPortForwarding).
    pub remote_port: Option<u16>,
    /// The instance's tags.
    pub tags: BTreeMap<String, String>,
}

/// The outcome of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// An Allow matched and no Deny did.
    Allow,
    /// A Deny matched.
    ExplicitDeny,
    /// Nothing matched.
    ImplicitDeny,
}

impl Decision {
    /// Whether the request may proceed.
    pub fn allowed(self) -> bool {
        self == Decision::Allow
    }
}

/// Which condition keys `action` always has in its context (the instance tags it has, too).
/// `hatch:RunAs` and `hatch:Mode` exist only for StartSession, `hatch:RemoteHost` and
/// `hatch:RemotePort` only for StartPortForwarding.
pub fn action_keys(action: &str) -> &'static [&'static str] {
    const INSTANCE: &[&str] = &["hatch:SourceIp", "hatch:Region", "hatch:InstanceId"];
    const START: &[&str] =
        &["hatch:SourceIp", "hatch:Region", "hatch:InstanceId", "hatch:RunAs", "hatch:Mode"];
    const PORT: &[&str] = &[
        "hatch:SourceIp",
        "hatch:Region",
        "hatch:InstanceId",
        "hatch:RemoteHost",
        "hatch:RemotePort",
    ];
    const ACCOUNT: &[&str] = &["hatch:SourceIp"];
    if action.eq_ignore_ascii_case(START_SESSION) {
        START
    } else if action.eq_ignore_ascii_case(START_PORT_FORWARDING) {
        PORT
    } else if is_account_action(action) {
        ACCOUNT
    } else {
        INSTANCE
    }
}

/// Whether `action` acts on an account's users, keys, policies or activations (not on an
/// instance): its resource is `hrn:hatch::{account}:{kind}/{name}` and its only key is
/// `hatch:SourceIp`.
pub fn is_account_action(action: &str) -> bool {
    ACCOUNT_ACTIONS.iter().any(|a| a.eq_ignore_ascii_case(action))
}

/// The kinds of resource an account has besides instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `user/{name}`.
    User,
    /// `policy/{name}`.
    Policy,
    /// `activation/{id}`.
    Activation,
    /// `audit/*`: the account's audit log.
    Audit,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Policy => "policy",
            Kind::Activation => "activation",
            Kind::Audit => "audit",
        }
    }
}

/// The resource name of an account's user, policy or activation (`name` `*` for every one
/// of them, as List and CreateActivation are evaluated): `hrn:hatch::{account}:{kind}/{name}`.
pub fn account_hrn(account: &str, kind: Kind, name: &str) -> String {
    format!("hrn:hatch::{account}:{}/{name}", kind.as_str())
}

/// The resource name of an instance: `hrn:hatch:{region}:{account}:instance/{id}`.
pub fn instance_hrn(region: &str, account: &str, instance: &str) -> String {
    format!("hrn:hatch:{region}:{account}:instance/{instance}")
}

impl Policy {
    /// Parses and validates a document.
    pub fn parse(doc: &str) -> Result<Policy, PolicyError> {
        if doc.len() > MAX_DOCUMENT_BYTES {
            return Err(err("(document)", format!("larger than {MAX_DOCUMENT_BYTES} bytes")));
        }
        let v: Value = serde_json::from_str(doc)
            .map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| err("(document)", "must be a JSON object"))?;
        for k in obj.keys() {
            if k != "Version" && k != "Statement" {
                return Err(err(k.as_str(), "unknown field (expected Version, Statement)"));
            }
        }
        if let Some(ver) = obj.get("Version")
            && ver.as_str() != Some("1")
        {
            return Err(err("Version", "must be \"1\""));
        }
        let stmts = match obj.get("Statement") {
            Some(Value::Array(a)) => a.iter().collect::<Vec<_>>(),
            Some(o @ Value::Object(_)) => vec![o],
            Some(_) => return Err(err("Statement", "must be an object or an array of objects")),
            None => return Err(err("Statement", "is required")),
        };
        if stmts.is_empty() {
            return Err(err("Statement", "must not be empty"));
        }
        let statements = stmts
            .into_iter()
            .enumerate()
            .map(|(i, s)| parse_statement(&format!("Statement[{i}]"), s))
            .collect::<Result<_, _>>()?;
        Ok(Policy { statements })
    }
}

fn parse_statement(at: &str, v: &Value) -> Result<Statement, PolicyError> {
    let obj = v.as_object().ok_or_else(|| err(at, "must be an object"))?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "Sid" | "Effect" | "Action" | "Resource" | "Condition") {
            return Err(err(
                format!("{at}.{k}"),
                "unknown field (expected Sid, Effect, Action, Resource, Condition)",
            ));
        }
    }
    if let Some(sid) = obj.get("Sid")
        && !sid.is_string()
    {
        return Err(err(format!("{at}.Sid"), "must be a string"));
    }
    let effect = match obj.get("Effect").and_then(Value::as_str) {
        Some("Allow") => Effect::Allow,
        Some("Deny") => Effect::Deny,
        Some(other) => {
            return Err(err(
                format!("{at}.Effect"),
                format!("must be Allow or Deny, not {other:?}"),
            ));
        }
        None => return Err(err(format!("{at}.Effect"), "is required (Allow or Deny)")),
    };
    let actions = strings(&format!("{at}.Action"), obj.get("Action"), true)?;
    for (i, a) in actions.iter().enumerate() {
        let field = format!("{at}.Action[{i}]");
        if a != "*" && !a.to_ascii_lowercase().starts_with("hatch:") {
            return Err(err(field, format!("{a:?} must be \"*\" or start with \"hatch:\"")));
        }
        let lower = a.to_ascii_lowercase();
        if !ACTIONS.iter().any(|known| glob(&lower, &known.to_ascii_lowercase())) {
            return Err(err(
                field,
                format!("{a:?} matches no action (known: {})", ACTIONS.join(", ")),
            ));
        }
    }
    let resources = strings(&format!("{at}.Resource"), obj.get("Resource"), true)?;
    for (i, r) in resources.iter().enumerate() {
        let field = format!("{at}.Resource[{i}]");
        if r == "*" {
            continue;
        }
        if !r.starts_with("hrn:hatch:") {
            return Err(err(field, format!("{r:?} must be \"*\" or start with \"hrn:hatch:\"")));
        }
        // Wildcards or not, the shape is checked: a misspelt part (`instanc/*`) would match
        // nothing and allow (or deny) nothing, silently. Instances have a region; users,
        // policies and activations belong to the account (an empty region, or a wildcard).
        let parts: Vec<&str> = r.split(':').collect();
        let named = |kind: &str| {
            parts[4]
                .strip_prefix(kind)
                .and_then(|n| n.strip_prefix('/'))
                .is_some_and(|n| !n.is_empty())
        };
        let shaped = parts.len() == 5
            && !parts[3].is_empty()
            && (parts[4] == "*"
                || (named("instance") && !parts[2].is_empty())
                || named("user")
                || named("policy")
                || named("activation")
                || named("audit"));
        if !shaped {
            return Err(err(
                field,
                format!(
                    "{r:?} is not hrn:hatch:{{region}}:{{account}}:instance/{{id}} or \
                     hrn:hatch::{{account}}:user/{{name}}, policy/{{name}}, activation/{{id}} or audit/* \
                     (wildcards * and ? allowed in each part)"
                ),
            ));
        }
    }
    let mut conditions = Vec::new();
    if let Some(c) = obj.get("Condition") {
        let at = format!("{at}.Condition");
        let ops = c.as_object().ok_or_else(|| err(&at, "must be an object"))?;
        for (op_name, keys) in ops {
            let at = format!("{at}.{op_name}");
            let (op, if_exists) = Op::parse(op_name).ok_or_else(|| {
                err(
                    &at,
                    "unknown operator (expected StringEquals, StringNotEquals, StringLike, \
                     IpAddress, NotIpAddress, Bool, NumericEquals, NumericNotEquals, \
                     NumericLessThan, NumericLessThanEquals, NumericGreaterThan, \
                     NumericGreaterThanEquals, each optionally ...IfExists, or Null)",
                )
            })?;
            let keys = keys.as_object().ok_or_else(|| err(&at, "must be an object"))?;
            if keys.is_empty() {
                return Err(err(&at, "must name at least one key"));
            }
            for (key_name, vals) in keys {
                let at = format!("{at}.{key_name}");
                let key = Key::parse(key_name).ok_or_else(|| {
                    err(
                        &at,
                        "unknown condition key (expected hatch:SourceIp, hatch:Region, \
                         hatch:InstanceId, hatch:RunAs, hatch:Mode, hatch:RemoteHost, \
                         hatch:RemotePort, hatch:tag/<key>)",
                    )
                })?;
                let values = match op {
                    Op::Null => match vals {
                        Value::Bool(b) => Values::Bool(*b),
                        Value::String(s) if s.eq_ignore_ascii_case("true") => Values::Bool(true),
                        Value::String(s) if s.eq_ignore_ascii_case("false") => Values::Bool(false),
                        _ => return Err(err(&at, "must be true or false")),
                    },
                    Op::IpAddress | Op::NotIpAddress => {
                        if key != Key::SourceIp {
                            return Err(err(
                                &at,
                                format!("{op_name} applies only to hatch:SourceIp"),
                            ));
                        }
                        let raw = strings(&at, Some(vals), false)?;
                        Values::Nets(
                            raw.iter()
                                .map(|s| {
                                    parse_net(s).ok_or_else(|| {
                                        err(&at, format!("{s:?} is not an IP address or CIDR"))
                                    })
                                })
                                .collect::<Result<_, _>>()?,
                        )
                    }
                    Op::Bool => {
                        let b = match vals {
                            Value::Bool(b) => *b,
                            Value::String(s) if s.eq_ignore_ascii_case("true") => true,
                            Value::String(s) if s.eq_ignore_ascii_case("false") => false,
                            _ => return Err(err(&at, "must be true or false")),
                        };
                        Values::Bool(b)
                    }
                    _ if op.is_numeric() => {
                        if key == Key::SourceIp {
                            return Err(err(&at, "hatch:SourceIp takes IpAddress or NotIpAddress"));
                        }
                        Values::Nums(numbers(&at, op_name, key_name, vals)?)
                    }
                    _ => {
                        if key == Key::SourceIp {
                            return Err(err(&at, "hatch:SourceIp takes IpAddress or NotIpAddress"));
                        }
                        Values::Strings(strings(&at, Some(vals), false)?)
                    }
                };
                let holds_when_absent = match (op, &values) {
                    (Op::Null, Values::Bool(absent)) => *absent,
                    _ => op.holds_when_absent(if_exists),
                };
                if !holds_when_absent
                    && let Some(name) = key.fixed_name()
                    && !actions.iter().any(|a| {
                        let a = a.to_ascii_lowercase();
                        ACTIONS.iter().any(|known| {
                            glob(&a, &known.to_ascii_lowercase())
                                && action_keys(known).iter().any(|k| k.eq_ignore_ascii_case(name))
                        })
                    })
                {
                    // The statement could never apply: a Deny that reads as applying would
                    // silently not.
                    let defining: Vec<&str> = ACTIONS
                        .iter()
                        .copied()
                        .filter(|known| {
                            action_keys(known).iter().any(|k| k.eq_ignore_ascii_case(name))
                        })
                        .collect();
                    return Err(err(
                        &at,
                        format!(
                            "{name} is never present for this statement's actions (it exists \
                             only for {}), so this condition could never hold",
                            defining.join(", ")
                        ),
                    ));
                }
                conditions.push(Condition { op, if_exists, key, values });
            }
        }
    }
    Ok(Statement {
        effect,
        actions: actions.iter().map(|a| a.to_ascii_lowercase()).collect(),
        resources,
        conditions,
    })
}

/// A string or a non-empty array of strings.
fn strings(at: &str, v: Option<&Value>, required: bool) -> Result<Vec<String>, PolicyError> {
    match v {
        None if required => Err(err(at, "is required")),
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| err(format!("{at}[{i}]"), "must be a string"))
            })
            .collect(),
        Some(Value::Array(_)) => Err(err(at, "must not be empty")),
        Some(_) => Err(err(at, "must be a string or an array of strings")),
    }
}

/// The values of numeric operator `op` on `key`: a number, a string holding one (`"5432"`), or a
/// non-empty array of them.
fn numbers(at: &str, op: &str, key: &str, v: &Value) -> Result<Vec<Num>, PolicyError> {
    let one = |x: &Value| {
        Num::from_json(x).ok_or_else(|| {
            let shown = match x {
                Value::String(s) => format!("{s:?}"),
                other => other.to_string(),
            };
            err(at, format!("{op} on {key}: {shown} is not a number (an integer or a decimal)"))
        })
    };
    match v {
        Value::Array(a) if a.is_empty() => Err(err(at, "must not be empty")),
        Value::Array(a) => a.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// A CIDR or a single address. Networks written in the IPv4-mapped form (`::ffff:10.0.0.0/104`,
/// `::ffff:127.0.0.1`, `::ffff:0:0/96`: inside `::ffff:0:0/96` with a prefix of 96 or more)
/// are the IPv4 networks they stand for, so they match IPv4 callers (whose address the API gives
/// as IPv4 even on a dual-stack listener).
fn parse_net(s: &str) -> Option<IpNet> {
    let net = s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))?;
    Some(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            // The prefix is at most 128, so the IPv4 one is at most 32: `new` cannot fail.
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map(IpNet::V4).unwrap_or(net),
            None => net,
        },
        other => other,
    })
}

/// Whether `net` holds the caller `ip`. An IPv4-mapped caller is taken as IPv4, and an IPv4
/// caller also matches an IPv6 network holding its mapped form (`::/0` holds every caller, as
/// it did when a dual-stack listener reported IPv4 callers as `::ffff:a.b.c.d`).
fn net_holds(net: &IpNet, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (net, ip) {
        (IpNet::V6(n), IpAddr::V4(v4)) => n.contains(&v4.to_ipv6_mapped()),
        (n, ip) => n.contains(&ip),
    }
}

/// Glob match: `*` any run (also empty), `?` one character; everything else literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Condition {
    fn matches(&self, ctx: &Context) -> bool {
        let present = match &self.key {
            Key::SourceIp => ctx.source_ip.is_some(),
            Key::Region => ctx.region.is_some(),
            Key::InstanceId => ctx.instance_id.is_some(),
            Key::RunAs => ctx.run_as.is_some(),
            Key::Mode => ctx.mode.is_some(),
            Key::RemoteHost => ctx.remote_host.is_some(),
            Key::RemotePort => ctx.remote_port.is_some(),
            Key::Tag(t) => ctx.tags.contains_key(t),
        };
        if let (Op::Null, Values::Bool(absent)) = (self.op, &self.values) {
            return present != *absent;
        }
        if !present {
            return self.op.holds_when_absent(self.if_exists);
        }
        match (&self.values, self.op) {
            (Values::Nets(nets), Op::IpAddress) => {
                ctx.source_ip.is_some_and(|ip| nets.iter().any(|n| net_holds(n, ip)))
            }
            (Values::Nets(nets), Op::NotIpAddress) => {
                ctx.source_ip.is_none_or(|ip| !nets.iter().any(|n| net_holds(n, ip)))
            }
            (Values::Nums(nums), op) => {
                // A present value that is not a number (a tag `env` of `prod`) compares with
                // nothing: every numeric condition on it is false, NumericNotEquals included.
                let Some(v) = self.number(ctx) else { return false };
                let cmp = |x: &Num| v.compare(*x);
                match op {
                    Op::NumericEquals => nums.iter().any(|x| cmp(x) == Some(Ordering::Equal)),
                    Op::NumericNotEquals => nums.iter().all(|x| cmp(x) != Some(Ordering::Equal)),
                    Op::NumericLessThan => nums.iter().any(|x| cmp(x) == Some(Ordering::Less)),
                    Op::NumericLessThanEquals => nums
                        .iter()
                        .any(|x| matches!(cmp(x), Some(Ordering::Less | Ordering::Equal))),
                    Op::NumericGreaterThan => {
                        nums.iter().any(|x| cmp(x) == Some(Ordering::Greater))
                    }
                    Op::NumericGreaterThanEquals => nums
                        .iter()
                        .any(|x| matches!(cmp(x), Some(Ordering::Greater | Ordering::Equal))),
                    _ => false,
                }
            }
            (Values::Bool(b), _) => self.string(ctx).is_some_and(|v| {
                (v.eq_ignore_ascii_case("true") && *b) || (v.eq_ignore_ascii_case("false") && !*b)
            }),
            (Values::Strings(vals), Op::StringEquals) => {
                self.string(ctx).is_some_and(|v| vals.iter().any(|x| *x == *v))
            }
            (Values::Strings(vals), Op::StringNotEquals) => {
                self.string(ctx).is_none_or(|v| !vals.iter().any(|x| *x == *v))
            }
            (Values::Strings(vals), Op::StringLike) => {
                self.string(ctx).is_some_and(|v| vals.iter().any(|x| glob(x, &v)))
            }
            // Parsing pairs each operator with its value kind; other pairs cannot occur.
            _ => false,
        }
    }

    /// The key's value for the string operators and `Bool`: `hatch:RemotePort` in its decimal
    /// form (`"22"`), so that `StringEquals` on it works as well as `NumericEquals`.
    fn string<'a>(&self, ctx: &'a Context) -> Option<Cow<'a, str>> {
        let s = match &self.key {
            Key::SourceIp => None,
            Key::Region => ctx.region.as_deref(),
            Key::InstanceId => ctx.instance_id.as_deref(),
            Key::RunAs => ctx.run_as.as_deref(),
            Key::Mode => ctx.mode.as_deref(),
            Key::RemoteHost => ctx.remote_host.as_deref(),
            Key::RemotePort => return ctx.remote_port.map(|p| Cow::Owned(p.to_string())),
            Key::Tag(t) => ctx.tags.get(t).map(String::as_str),
        };
        s.map(Cow::Borrowed)
    }

    /// The key's value for the numeric operators: a string value read as a number (`None` when
    /// it is not one).
    fn number(&self, ctx: &Context) -> Option<Num> {
        match &self.key {
            Key::RemotePort => ctx.remote_port.map(|p| Num::Int(p.into())),
            _ => self.string(ctx).and_then(|s| Num::parse(&s)),
        }
    }
}

/// Evaluates `action` on `resource` in `ctx` against every policy of the caller.
pub fn evaluate(policies: &[Policy], action: &str, resource: &str, ctx: &Context) -> Decision {
    let action = action.to_ascii_lowercase();
    let mut allowed = false;
    for st in policies.iter().flat_map(|p| &p.statements) {
        let applies = st.actions.iter().any(|a| glob(a, &action))
            && st.resources.iter().any(|r| glob(r, resource))
            && st.conditions.iter().all(|c| c.matches(ctx));
        if applies {
            match st.effect {
                Effect::Deny => return Decision::ExplicitDeny,
                Effect::Allow => allowed = true,
            }
        }
    }
    if allowed { Decision::Allow } else { Decision::ImplicitDeny }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;

    const I1: &str = "hrn:hatch:eu-1:acct-1:instance/i-00000000000000a1";

    fn ctx(ip: &str) -> Context {
        Context {
            source_ip: Some(ip.parse().unwrap()),
            region: Some("eu-1".into()),
            instance_id: Some("i-00000000000000a1".into()),
            run_as: Some("deploy".into()),
            mode: Some("shell".into()),
            remote_host: None,
            remote_port: None,
            tags: [("env".to_owned(), "prod".to_owned()), ("web".to_owned(), "true".to_owned())]
                .into(),
        }
    }

    fn allow(cond: &str) -> String {
        format!(
            r#"{{"Version":"1","Statement":[{{"Effect":"Allow","Action":"hatch:StartSession",
            "Resource":"*","Condition":{cond}}}]}}"#
        )
    }

    /// Allow StartPortForwarding on every instance when `cond` holds.
    fn allow_pf(cond: &str) -> String {
        format!(
            r#"{{"Version":"1","Statement":[{{"Effect":"Allow","Action":"hatch:StartPortForwarding",
            "Resource":"*","Condition":{cond}}}]}}"#
        )
    }

    /// The context of a StartPortForwarding to `127.0.0.1:5432`: no RunAs or Mode.
    fn pf(c: &mut Context) {
        c.run_as = None;
        c.mode = None;
        c.remote_host = Some("127.0.0.1".into());
        c.remote_port = Some(5432);
    }

    /// Allow everything, but Deny when `op` (`IpAddress`, `NotIpAddress`) holds for `net`.
    fn deny_ip(op: &str, net: &str) -> String {
        format!(
            r#"{{"Statement":[{{"Effect":"Allow","Action":"*","Resource":"*"}},
            {{"Effect":"Deny","Action":"*","Resource":"*",
            "Condition":{{"{op}":{{"hatch:SourceIp":"{net}"}}}}}}]}}"#
        )
    }

    #[test]
    fn mapped_networks_are_read_as_ipv4() {
        let cases = [
            ("::ffff:127.0.0.1", "127.0.0.1/32"),
            ("::ffff:127.0.0.1/128", "127.0.0.1/32"),
            ("::ffff:7f00:1", "127.0.0.1/32"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            // Host bits below the prefix are dropped, as for any network.
            ("::ffff:10.9.9.9/104", "10.0.0.0/8"),
            // Not the mapped form: kept as written.
            ("::ffff:0:0/95", "::ffff:0.0.0.0/95"),
            ("::1", "::1/128"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::/0", "::/0"),
            ("::a00:1/128", "::a00:1/128"),
            ("10.0.0.0/8", "10.0.0.0/8"),
        ];
        for (written, read) in cases {
            assert_eq!(
                parse_net(written).map(|n| n.to_string()).as_deref(),
                Some(read),
                "{written}"
            );
        }
    }

    /// (name, documents, action, resource, source ip, context tweak, expected)
    #[test]
    fn evaluation_table() {
        type Tweak = fn(&mut Context);
        type Case =
            (&'static str, Vec<String>, &'static str, &'static str, &'static str, Tweak, Decision);
        let none: Tweak = |_| {};
        let cases: Vec<Case> = vec![
            ("no policy: default deny", vec![], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("exact action and resource", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"hrn:hatch:eu-1:acct-1:instance/i-00000000000000a1"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("other action not allowed", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"*"}}"#.into()], TERMINATE_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("action wildcard hatch:*", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:*","Resource":"*"}}"#.into()], TERMINATE_SESSION, I1, "10.0.0.1", none, Allow),
            ("action wildcard *", vec![r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#.into()], DESCRIBE_INSTANCES, I1, "10.0.0.1", none, Allow),
            ("action prefix wildcard", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:Describe*","Resource":"*"}}"#.into()], DESCRIBE_SESSIONS, I1, "10.0.0.1", none, Allow),
            ("action prefix wildcard misses", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:Describe*","Resource":"*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("action case-insensitive", vec![r#"{"Statement":{"Effect":"Allow","Action":"HATCH:startsession","Resource":"*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("action list", vec![r#"{"Statement":{"Effect":"Allow","Action":["hatch:TerminateSession","hatch:StartSession"],"Resource":"*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("resource wildcard instance/*", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"hrn:hatch:eu-1:acct-1:instance/*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("resource other region", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"hrn:hatch:us-1:acct-1:instance/*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("resource region wildcard", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"hrn:hatch:*:acct-1:instance/*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("resource ? wildcard", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"hrn:hatch:eu-1:acct-1:instance/i-00000000000000a?"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("resource other instance", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"hrn:hatch:eu-1:acct-1:instance/i-00000000000000b2"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("resource list", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":["hrn:hatch:eu-1:acct-1:instance/x","hrn:hatch:eu-1:acct-1:instance/i-*"]}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("explicit deny wins in same policy", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*"}]}"#.into()], START_SESSION, I1, "10.0.0.1", none, ExplicitDeny),
            ("explicit deny wins across policies", vec![r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#.into(), r#"{"Statement":{"Effect":"Deny","Action":"*","Resource":"hrn:hatch:*:*:instance/i-00000000000000a1"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, ExplicitDeny),
            ("deny only: still denied", vec![r#"{"Statement":{"Effect":"Deny","Action":"hatch:TerminateSession","Resource":"*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("deny with false condition does not apply", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"StringEquals":{"hatch:tag/env":"dev"}}}]}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("StringEquals tag matches", vec![allow(r#"{"StringEquals":{"hatch:tag/env":"prod"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("StringEquals tag differs", vec![allow(r#"{"StringEquals":{"hatch:tag/env":"dev"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("StringEquals is case-sensitive", vec![allow(r#"{"StringEquals":{"hatch:tag/env":"PROD"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("StringEquals any of values", vec![allow(r#"{"StringEquals":{"hatch:tag/env":["dev","prod"]}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("StringEquals missing tag is false", vec![allow(r#"{"StringEquals":{"hatch:tag/team":"ops"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("StringNotEquals missing tag is true", vec![allow(r#"{"StringNotEquals":{"hatch:tag/team":"ops"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("StringNotEquals matching value is false", vec![allow(r#"{"StringNotEquals":{"hatch:RunAs":"root"}}"#)], START_SESSION, I1, "10.0.0.1", |c| c.run_as = Some("root".into()), ImplicitDeny),
            ("StringNotEquals other value is true", vec![allow(r#"{"StringNotEquals":{"hatch:RunAs":"root"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("StringLike glob", vec![allow(r#"{"StringLike":{"hatch:InstanceId":"i-0000*a1"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("StringLike glob misses", vec![allow(r#"{"StringLike":{"hatch:InstanceId":"i-ffff*"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("Region condition", vec![allow(r#"{"StringEquals":{"hatch:Region":"eu-1"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Region condition other", vec![allow(r#"{"StringEquals":{"hatch:Region":"us-1"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("Mode exec only refuses shell", vec![allow(r#"{"StringEquals":{"hatch:Mode":"exec"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("Mode exec only allows exec", vec![allow(r#"{"StringEquals":{"hatch:Mode":"exec"}}"#)], START_SESSION, I1, "10.0.0.1", |c| c.mode = Some("exec".into()), Allow),
            ("RunAs absent is false for StringEquals", vec![allow(r#"{"StringEquals":{"hatch:RunAs":"deploy"}}"#)], START_SESSION, I1, "10.0.0.1", |c| c.run_as = None, ImplicitDeny),
            ("condition key names case-insensitive", vec![allow(r#"{"StringEquals":{"HATCH:RUNAS":"deploy"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("IpAddress v4 CIDR in", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"10.0.0.0/8"}}"#)], START_SESSION, I1, "10.1.2.3", none, Allow),
            ("IpAddress v4 CIDR out", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"10.0.0.0/8"}}"#)], START_SESSION, I1, "192.168.1.1", none, ImplicitDeny),
            ("IpAddress single address", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"127.0.0.1"}}"#)], START_SESSION, I1, "127.0.0.1", none, Allow),
            ("IpAddress single address other", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"127.0.0.1"}}"#)], START_SESSION, I1, "127.0.0.2", none, ImplicitDeny),
            ("IpAddress v6 CIDR in", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"2001:db8::/32"}}"#)], START_SESSION, I1, "2001:db8:1::5", none, Allow),
            ("IpAddress v6 CIDR out", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"2001:db8::/32"}}"#)], START_SESSION, I1, "2001:db9::5", none, ImplicitDeny),
            ("IpAddress v4 list with v6 caller", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":["10.0.0.0/8","::1/128"]}}"#)], START_SESSION, I1, "::1", none, Allow),
            ("NotIpAddress outside allows", vec![allow(r#"{"NotIpAddress":{"hatch:SourceIp":"10.0.0.0/8"}}"#)], START_SESSION, I1, "192.168.1.1", none, Allow),
            ("NotIpAddress inside denies", vec![allow(r#"{"NotIpAddress":{"hatch:SourceIp":"10.0.0.0/8"}}"#)], START_SESSION, I1, "10.9.9.9", none, ImplicitDeny),
            ("Deny NotIpAddress blocks outsiders", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"NotIpAddress":{"hatch:SourceIp":"127.0.0.1/32"}}}]}"#.into()], START_SESSION, I1, "127.0.0.2", none, ExplicitDeny),
            ("Deny NotIpAddress lets insiders", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"NotIpAddress":{"hatch:SourceIp":"127.0.0.1/32"}}}]}"#.into()], START_SESSION, I1, "127.0.0.1", none, Allow),
            ("Bool tag true", vec![allow(r#"{"Bool":{"hatch:tag/web":true}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Bool tag false mismatch", vec![allow(r#"{"Bool":{"hatch:tag/web":"false"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("Bool missing key is false", vec![allow(r#"{"Bool":{"hatch:tag/gpu":true}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("two keys are ANDed", vec![allow(r#"{"StringEquals":{"hatch:tag/env":"prod","hatch:RunAs":"root"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("two operators are ANDed", vec![allow(r#"{"StringEquals":{"hatch:tag/env":"prod"},"IpAddress":{"hatch:SourceIp":"10.0.0.0/24"}}"#)], START_SESSION, I1, "10.0.0.7", none, Allow),
            ("two operators, one false", vec![allow(r#"{"StringEquals":{"hatch:tag/env":"prod"},"IpAddress":{"hatch:SourceIp":"10.0.0.0/24"}}"#)], START_SESSION, I1, "10.0.1.7", none, ImplicitDeny),
            ("StringEqualsIfExists absent key is true", vec![allow(r#"{"StringEqualsIfExists":{"hatch:tag/team":"ops"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("StringEqualsIfExists present key must match", vec![allow(r#"{"StringEqualsIfExists":{"hatch:tag/env":"dev"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("StringLikeIfExists present key matches", vec![allow(r#"{"StringLikeIfExists":{"hatch:tag/env":"pr*"}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Null true: key absent", vec![allow(r#"{"Null":{"hatch:tag/team":true}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Null true: key present is false", vec![allow(r#"{"Null":{"hatch:tag/env":"true"}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("Null false: key present", vec![allow(r#"{"Null":{"hatch:tag/env":false}}"#)], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Deny RunAs root applies to the effective user root", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#.into()], START_SESSION, I1, "10.0.0.1", |c| c.run_as = Some("root".into()), ExplicitDeny),
            ("Deny RunAs root lets another user", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Deny hatch:* on RunAs does not reach DescribeInstances", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:*","Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#.into()], DESCRIBE_INSTANCES, I1, "10.0.0.1", |c| c.run_as = None, Allow),
            ("Deny on a mapped address refuses its IPv4 caller", vec![deny_ip("IpAddress", "::ffff:127.0.0.1")], START_SESSION, I1, "127.0.0.1", none, ExplicitDeny),
            ("Deny on a mapped address spares other callers", vec![deny_ip("IpAddress", "::ffff:127.0.0.1")], START_SESSION, I1, "127.0.0.2", none, Allow),
            ("Deny on a mapped /128 refuses its IPv4 caller", vec![deny_ip("IpAddress", "::ffff:127.0.0.1/128")], START_SESSION, I1, "127.0.0.1", none, ExplicitDeny),
            ("Deny on the mapped range refuses every IPv4 caller", vec![deny_ip("IpAddress", "::ffff:0:0/96")], START_SESSION, I1, "192.0.2.7", none, ExplicitDeny),
            ("Deny on the mapped range spares IPv6 callers", vec![deny_ip("IpAddress", "::ffff:0:0/96")], START_SESSION, I1, "2001:db8::7", none, Allow),
            ("Deny on a mapped /104 refuses inside", vec![deny_ip("IpAddress", "::ffff:10.0.0.0/104")], START_SESSION, I1, "10.200.0.1", none, ExplicitDeny),
            ("Deny on a mapped /104 spares outside", vec![deny_ip("IpAddress", "::ffff:10.0.0.0/104")], START_SESSION, I1, "11.0.0.1", none, Allow),
            ("Deny on a mapped address written in hex", vec![deny_ip("IpAddress", "::ffff:7f00:1")], START_SESSION, I1, "127.0.0.1", none, ExplicitDeny),
            ("Deny on ::/0 holds IPv4 callers too", vec![deny_ip("IpAddress", "::/0")], START_SESSION, I1, "198.51.100.1", none, ExplicitDeny),
            ("Deny on an IPv6 prefix short of the mapped range spares IPv4", vec![deny_ip("IpAddress", "2001:db8::/32")], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Deny NotIpAddress on a mapped address lets its caller in", vec![deny_ip("NotIpAddress", "::ffff:127.0.0.1")], START_SESSION, I1, "127.0.0.1", none, Allow),
            ("Deny NotIpAddress on a mapped address keeps others out", vec![deny_ip("NotIpAddress", "::ffff:127.0.0.1")], START_SESSION, I1, "127.0.0.9", none, ExplicitDeny),
            ("Allow on a mapped /120 admits inside", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"::ffff:192.0.2.0/120"}}"#)], START_SESSION, I1, "192.0.2.200", none, Allow),
            ("Allow on a mapped /120 misses outside", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"::ffff:192.0.2.0/120"}}"#)], START_SESSION, I1, "192.0.3.1", none, ImplicitDeny),
            ("IPv4 network holds a caller given in mapped form", vec![deny_ip("IpAddress", "10.0.0.0/8")], START_SESSION, I1, "::ffff:10.1.2.3", none, ExplicitDeny),
            ("mapped network holds a caller given in mapped form", vec![deny_ip("IpAddress", "::ffff:10.0.0.0/104")], START_SESSION, I1, "::ffff:10.1.2.3", none, ExplicitDeny),
            ("IPv4 network never holds a plain IPv6 caller", vec![deny_ip("IpAddress", "0.0.0.0/0")], START_SESSION, I1, "2001:db8::1", none, Allow),
            ("IpAddress with no source ip is false", vec![allow(r#"{"IpAddress":{"hatch:SourceIp":"0.0.0.0/0"}}"#)], START_SESSION, I1, "10.0.0.1", |c| c.source_ip = None, ImplicitDeny),
            ("PF NumericEquals port matches", vec![allow_pf(r#"{"NumericEquals":{"hatch:RemotePort":5432}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF NumericEquals port differs", vec![allow_pf(r#"{"NumericEquals":{"hatch:RemotePort":5432}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(22) }, ImplicitDeny),
            ("PF NumericEquals string value in the policy", vec![allow_pf(r#"{"NumericEquals":{"hatch:RemotePort":"5432"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF NumericEquals any of values, mixed forms", vec![allow_pf(r#"{"NumericEquals":{"hatch:RemotePort":[22,"5432"]}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF NumericEquals none of values", vec![allow_pf(r#"{"NumericEquals":{"hatch:RemotePort":[22,"3306"]}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ImplicitDeny),
            ("PF NumericEquals decimal equal to the port", vec![allow_pf(r#"{"NumericEquals":{"hatch:RemotePort":"5432.0"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF NumericLessThan below", vec![allow_pf(r#"{"NumericLessThan":{"hatch:RemotePort":1024}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1023) }, Allow),
            ("PF NumericLessThan at the bound", vec![allow_pf(r#"{"NumericLessThan":{"hatch:RemotePort":1024}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1024) }, ImplicitDeny),
            ("PF NumericLessThan a decimal bound", vec![allow_pf(r#"{"NumericLessThan":{"hatch:RemotePort":5432.5}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF NumericLessThanEquals at the bound", vec![allow_pf(r#"{"NumericLessThanEquals":{"hatch:RemotePort":"1024"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1024) }, Allow),
            ("PF NumericLessThanEquals above", vec![allow_pf(r#"{"NumericLessThanEquals":{"hatch:RemotePort":"1024"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1025) }, ImplicitDeny),
            ("PF NumericGreaterThanEquals at the bound", vec![allow_pf(r#"{"NumericGreaterThanEquals":{"hatch:RemotePort":1024}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1024) }, Allow),
            ("PF NumericGreaterThanEquals below", vec![allow_pf(r#"{"NumericGreaterThanEquals":{"hatch:RemotePort":1024}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1023) }, ImplicitDeny),
            ("PF NumericGreaterThan at the bound", vec![allow_pf(r#"{"NumericGreaterThan":{"hatch:RemotePort":1024}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1024) }, ImplicitDeny),
            ("PF NumericGreaterThan above", vec![allow_pf(r#"{"NumericGreaterThan":{"hatch:RemotePort":1024}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(1025) }, Allow),
            ("PF range is two ANDed operators", vec![allow_pf(r#"{"NumericGreaterThanEquals":{"hatch:RemotePort":5000},"NumericLessThan":{"hatch:RemotePort":6000}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF range is two ANDed operators, outside", vec![allow_pf(r#"{"NumericGreaterThanEquals":{"hatch:RemotePort":5000},"NumericLessThan":{"hatch:RemotePort":6000}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(6000) }, ImplicitDeny),
            ("PF NumericNotEquals neither value", vec![allow_pf(r#"{"NumericNotEquals":{"hatch:RemotePort":[22,"3389"]}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF NumericNotEquals first value", vec![allow_pf(r#"{"NumericNotEquals":{"hatch:RemotePort":[22,"3389"]}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(22) }, ImplicitDeny),
            ("PF NumericNotEquals second value", vec![allow_pf(r#"{"NumericNotEquals":{"hatch:RemotePort":[22,"3389"]}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(3389) }, ImplicitDeny),
            ("PF Deny NumericNotEquals keeps other ports out", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:StartPortForwarding","Resource":"*","Condition":{"NumericNotEquals":{"hatch:RemotePort":[5432,6379]}}}]}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(22) }, ExplicitDeny),
            ("PF Deny NumericNotEquals lets a listed port", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:StartPortForwarding","Resource":"*","Condition":{"NumericNotEquals":{"hatch:RemotePort":[5432,6379]}}}]}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("NumericEqualsIfExists absent port is true", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:Start*","Resource":"*","Condition":{"NumericEqualsIfExists":{"hatch:RemotePort":22}}}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("NumericEquals absent port is false", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:Start*","Resource":"*","Condition":{"NumericEquals":{"hatch:RemotePort":22}}}}"#.into()], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("NumericLessThanIfExists present port must hold", vec![allow_pf(r#"{"NumericLessThanIfExists":{"hatch:RemotePort":1024}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ImplicitDeny),
            ("NumericNotEquals absent port is true (negated, as in IAM)", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:Start*","Resource":"*","Condition":{"NumericNotEquals":{"hatch:RemotePort":22}}}}"#.into()], START_SESSION, I1, "10.0.0.1", none, Allow),
            ("Numeric on a numeric tag", vec![allow(r#"{"NumericGreaterThan":{"hatch:tag/tier":"2"}}"#)], START_SESSION, I1, "10.0.0.1", |c| { c.tags.insert("tier".into(), "3".into()); }, Allow),
            ("Numeric on a tag that is not a number is false", vec![allow(r#"{"NumericLessThan":{"hatch:tag/env":1000}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("NumericNotEquals on a tag that is not a number is false", vec![allow(r#"{"NumericNotEquals":{"hatch:tag/env":1}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("Numeric on a missing tag is false", vec![allow(r#"{"NumericEquals":{"hatch:tag/tier":3}}"#)], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("Numeric integers compare exactly beyond 2^53", vec![allow(r#"{"NumericEquals":{"hatch:tag/id":9007199254740993}}"#)], START_SESSION, I1, "10.0.0.1", |c| { c.tags.insert("id".into(), "9007199254740992".into()); }, ImplicitDeny),
            ("Numeric integer tag against a decimal", vec![allow(r#"{"NumericGreaterThan":{"hatch:tag/tier":"2.5"}}"#)], START_SESSION, I1, "10.0.0.1", |c| { c.tags.insert("tier".into(), "3".into()); }, Allow),
            ("PF RemotePort key name case-insensitive", vec![allow_pf(r#"{"NumericEquals":{"HATCH:REMOTEPORT":5432}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF StringEquals on RemotePort uses its decimal form", vec![allow_pf(r#"{"StringEquals":{"hatch:RemotePort":"22"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_port = Some(22) }, Allow),
            ("PF StringEquals on RemotePort differs", vec![allow_pf(r#"{"StringEquals":{"hatch:RemotePort":"22"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ImplicitDeny),
            ("PF StringLike on RemotePort", vec![allow_pf(r#"{"StringLike":{"hatch:RemotePort":"54*"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF StringEquals RemoteHost", vec![allow_pf(r#"{"StringEquals":{"hatch:RemoteHost":["127.0.0.1","localhost"]}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF StringLike RemoteHost", vec![allow_pf(r#"{"StringLike":{"hatch:remotehost":"*.internal"}}"#)], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_host = Some("db.internal".into()) }, Allow),
            ("PF Deny StringEquals RemoteHost overrides Allow", vec![r#"{"Statement":[{"Effect":"Allow","Action":"hatch:StartPortForwarding","Resource":"*"},{"Effect":"Deny","Action":"hatch:StartPortForwarding","Resource":"*","Condition":{"StringEquals":{"hatch:RemoteHost":"169.254.169.254"}}}]}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", |c| { pf(c); c.remote_host = Some("169.254.169.254".into()) }, ExplicitDeny),
            ("PF Deny StringEquals RemoteHost spares other hosts", vec![r#"{"Statement":[{"Effect":"Allow","Action":"hatch:StartPortForwarding","Resource":"*"},{"Effect":"Deny","Action":"hatch:StartPortForwarding","Resource":"*","Condition":{"StringEquals":{"hatch:RemoteHost":"169.254.169.254"}}}]}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("PF Deny in another policy overrides Allow *", vec![r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#.into(), r#"{"Statement":{"Effect":"Deny","Action":"hatch:Start*","Resource":"*","Condition":{"StringEquals":{"hatch:RemoteHost":"127.0.0.1"}}}}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ExplicitDeny),
            ("StartSession allowed does not allow StartPortForwarding", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"*"}}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ImplicitDeny),
            ("StartPortForwarding allowed does not allow StartSession", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartPortForwarding","Resource":"*"}}"#.into()], START_SESSION, I1, "10.0.0.1", none, ImplicitDeny),
            ("hatch:Start* allows StartPortForwarding", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:Start*","Resource":"*"}}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("* allows StartPortForwarding", vec![r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("hatch:Describe* does not allow StartPortForwarding", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:Describe*","Resource":"*"}}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ImplicitDeny),
            ("StartPortForwarding action case-insensitive", vec![r#"{"Statement":{"Effect":"Allow","Action":"HATCH:startportforwarding","Resource":"hrn:hatch:eu-1:acct-1:instance/i-*"}}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("StartPortForwarding resource other instance", vec![r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartPortForwarding","Resource":"hrn:hatch:eu-1:acct-1:instance/i-00000000000000b2"}}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ImplicitDeny),
            ("Deny hatch:Start* on RunAs does not reach StartPortForwarding", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:Start*","Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, Allow),
            ("Deny hatch:Start* on a mode other than exec reaches StartPortForwarding", vec![r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"hatch:Start*","Resource":"*","Condition":{"StringNotEquals":{"hatch:Mode":"exec"}}}]}"#.into()], START_PORT_FORWARDING, I1, "10.0.0.1", pf, ExplicitDeny),
        ];
        assert!(cases.len() >= 40, "{} cases", cases.len());
        for (name, docs, action, resource, ip, tweak, want) in cases {
            let policies: Vec<Policy> = docs
                .iter()
                .map(|d| Policy::parse(d).unwrap_or_else(|e| panic!("{name}: {e}")))
                .collect();
            let mut c = ctx(ip);
            tweak(&mut c);
            assert_eq!(evaluate(&policies, action, resource, &c), want, "{name}");
        }
    }

    #[test]
    fn malformed_documents_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("not json", "(document)"),
            ("[]", "(document)"),
            (r#"{"Statement":[]}"#, "Statement"),
            (r#"{"Version":"2012-10-17","Statement":[]}"#, "Version"),
            (r#"{"Statment":[]}"#, "Statment"),
            (
                r#"{"Statement":[{"Effect":"Permit","Action":"*","Resource":"*"}]}"#,
                "Statement[0].Effect",
            ),
            (r#"{"Statement":[{"Action":"*","Resource":"*"}]}"#, "Statement[0].Effect"),
            (r#"{"Statement":[{"Effect":"Allow","Resource":"*"}]}"#, "Statement[0].Action"),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"hatch:StartSesion","Resource":"*"}]}"#,
                "Statement[0].Action[0]",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"ssm:StartSession","Resource":"*"}]}"#,
                "Statement[0].Action[0]",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"arn:aws:ec2:*"}]}"#,
                "Statement[0].Resource[0]",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"hrn:hatch:eu:acct:host/x"}]}"#,
                "Statement[0].Resource[0]",
            ),
            // A wildcard does not excuse a misspelt part.
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"hrn:hatch:eu-1:acct-1:instanc/*"}]}"#,
                "Statement[0].Resource[0]",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":["*","hrn:hatch:*:instance/*"]}]}"#,
                "Statement[0].Resource[1]",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"hrn:hatch:eu-1::instance/*"}]}"#,
                "Statement[0].Resource[0]",
            ),
            (r#"{"Statement":[{"Effect":"Allow","Action":"*"}]}"#, "Statement[0].Resource"),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":[],"Resource":"*"}]}"#,
                "Statement[0].Action",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":[1],"Resource":"*"}]}"#,
                "Statement[0].Action[0]",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Conditions":{}}]}"#,
                "Statement[0].Conditions",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringMatches":{"hatch:Mode":"x"}}}]}"#,
                "Statement[1].Condition.StringMatches",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"hatch:Colour":"x"}}}]}"#,
                "Statement[0].Condition.StringEquals.hatch:Colour",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"hatch:tag/":"x"}}}]}"#,
                "Statement[0].Condition.StringEquals.hatch:tag/",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"hatch:SourceIp":"10.0.0.300/8"}}}]}"#,
                "Statement[0].Condition.IpAddress.hatch:SourceIp",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"hatch:Region":"10.0.0.0/8"}}}]}"#,
                "Statement[0].Condition.IpAddress.hatch:Region",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"hatch:SourceIp":"10.0.0.1"}}}]}"#,
                "Statement[0].Condition.StringEquals.hatch:SourceIp",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Bool":{"hatch:tag/x":"yes"}}}]}"#,
                "Statement[0].Condition.Bool.hatch:tag/x",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"hatch:Mode":[]}}}]}"#,
                "Statement[0].Condition.StringEquals.hatch:Mode",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{}}}]}"#,
                "Statement[0].Condition.StringEquals",
            ),
            // A condition that could never hold for the statement's actions: a Deny that reads
            // as applying would silently not.
            (
                r#"{"Statement":[{"Effect":"Deny","Action":"hatch:TerminateSession","Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#,
                "Statement[0].Condition.StringEquals.hatch:RunAs",
            ),
            (
                r#"{"Statement":[{"Effect":"Deny","Action":"hatch:Describe*","Resource":"*","Condition":{"StringLike":{"hatch:Mode":"sh*"}}}]}"#,
                "Statement[0].Condition.StringLike.hatch:Mode",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NullIfExists":{"hatch:tag/x":true}}}]}"#,
                "Statement[0].Condition.NullIfExists",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Null":{"hatch:tag/x":"maybe"}}}]}"#,
                "Statement[0].Condition.Null.hatch:tag/x",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"hatch:StartPortForward","Resource":"*"}]}"#,
                "Statement[0].Action[0]",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericEquals":{"hatch:RemotePort":"ssh"}}}]}"#,
                "Statement[0].Condition.NumericEquals.hatch:RemotePort",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericLessThanIfExists":{"hatch:RemotePort":[22,true]}}}]}"#,
                "Statement[0].Condition.NumericLessThanIfExists.hatch:RemotePort",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericEquals":{"hatch:RemotePort":[]}}}]}"#,
                "Statement[0].Condition.NumericEquals.hatch:RemotePort",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericGreaterThan":{"hatch:tag/n":"inf"}}}]}"#,
                "Statement[0].Condition.NumericGreaterThan.hatch:tag/n",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericEquals":{"hatch:SourceIp":1}}}]}"#,
                "Statement[0].Condition.NumericEquals.hatch:SourceIp",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericLike":{"hatch:RemotePort":1}}}]}"#,
                "Statement[0].Condition.NumericLike",
            ),
            (
                r#"{"Statement":[{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*","Condition":{"NumericEquals":{"hatch:RemotePort":22}}}]}"#,
                "Statement[0].Condition.NumericEquals.hatch:RemotePort",
            ),
            (
                r#"{"Statement":[{"Effect":"Deny","Action":"hatch:Describe*","Resource":"*","Condition":{"StringEquals":{"hatch:RemoteHost":"db"}}}]}"#,
                "Statement[0].Condition.StringEquals.hatch:RemoteHost",
            ),
            (
                r#"{"Statement":[{"Effect":"Deny","Action":"hatch:StartPortForwarding","Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#,
                "Statement[0].Condition.StringEquals.hatch:RunAs",
            ),
        ];
        for (doc, field) in cases {
            let e = Policy::parse(doc).expect_err(doc);
            assert_eq!(&e.field, field, "{doc}: {e}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
        let big = format!(
            r#"{{"Statement":[{}]}}"#,
            vec![r#"{"Effect":"Allow","Action":"*","Resource":"*"}"#; 1000].join(",")
        );
        assert_eq!(Policy::parse(&big).unwrap_err().field, "(document)");
    }

    #[test]
    fn conditions_that_hold_when_absent_are_accepted_on_any_action() {
        // These can apply to an action without the key (they are then true), so they are not
        // refused as never holding.
        for doc in [
            r#"{"Statement":{"Effect":"Deny","Action":"hatch:DescribeInstances","Resource":"*","Condition":{"StringNotEquals":{"hatch:RunAs":"deploy"}}}}"#,
            r#"{"Statement":{"Effect":"Deny","Action":"hatch:TerminateSession","Resource":"*","Condition":{"StringEqualsIfExists":{"hatch:Mode":"exec"}}}}"#,
            r#"{"Statement":{"Effect":"Deny","Action":"hatch:TerminateSession","Resource":"*","Condition":{"Null":{"hatch:RunAs":"true"}}}}"#,
            r#"{"Statement":{"Effect":"Deny","Action":"hatch:DescribeInstances","Resource":"*","Condition":{"NumericNotEquals":{"hatch:RemotePort":22}}}}"#,
            r#"{"Statement":{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*","Condition":{"NumericLessThanIfExists":{"hatch:RemotePort":1024}}}}"#,
            // A key some matching action defines: hatch:Start* covers StartPortForwarding.
            r#"{"Statement":{"Effect":"Deny","Action":"hatch:Start*","Resource":"*","Condition":{"NumericLessThan":{"hatch:RemotePort":1024}}}}"#,
            r#"{"Statement":{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"StringEquals":{"hatch:RemoteHost":"169.254.169.254"}}}}"#,
        ] {
            Policy::parse(doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
        }
    }

    #[test]
    fn every_example_in_the_docs_parses() {
        let doc = include_str!("../../../docs/POLICY.md");
        let mut n = 0;
        for block in doc.split("```json").skip(1) {
            let json = block.split("```").next().unwrap();
            Policy::parse(json).unwrap_or_else(|e| panic!("{e}\n{json}"));
            n += 1;
        }
        assert!(n >= 6, "{n} examples");
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericEquals":{"hatch:RemotePort":"ssh"}}}}"#,
                r#"Statement[0].Condition.NumericEquals.hatch:RemotePort: NumericEquals on hatch:RemotePort: "ssh" is not a number (an integer or a decimal)"#,
            ),
            (
                r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericLessThanIfExists":{"hatch:RemotePort":[22,true]}}}}"#,
                "Statement[0].Condition.NumericLessThanIfExists.hatch:RemotePort: NumericLessThanIfExists on hatch:RemotePort: true is not a number (an integer or a decimal)",
            ),
            (
                r#"{"Statement":{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*","Condition":{"NumericEquals":{"hatch:RemotePort":22}}}}"#,
                "Statement[0].Condition.NumericEquals.hatch:RemotePort: hatch:RemotePort is never present for this statement's actions (it exists only for hatch:StartPortForwarding), so this condition could never hold",
            ),
            (
                r#"{"Statement":{"Effect":"Deny","Action":"hatch:TerminateSession","Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}}"#,
                "Statement[0].Condition.StringEquals.hatch:RunAs: hatch:RunAs is never present for this statement's actions (it exists only for hatch:StartSession), so this condition could never hold",
            ),
            (
                r#"{"Statement":{"Effect":"Deny","Action":"hatch:Describe*","Resource":"*","Condition":{"StringLike":{"hatch:remotehost":"*.internal"}}}}"#,
                "Statement[0].Condition.StringLike.hatch:remotehost: hatch:RemoteHost is never present for this statement's actions (it exists only for hatch:StartPortForwarding), so this condition could never hold",
            ),
        ];
        for (doc, want) in cases {
            assert_eq!(Policy::parse(doc).expect_err(doc).to_string(), *want);
        }
        let e = Policy::parse(
            r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericLike":{"hatch:RemotePort":1}}}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("NumericGreaterThanEquals, each optionally ...IfExists"), "{e}");
        let e = Policy::parse(
            r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"hatch:RemotePorts":"22"}}}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("hatch:RemoteHost, hatch:RemotePort"), "{e}");
        let e = Policy::parse(
            r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartPortForward","Resource":"*"}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("hatch:StartPortForwarding"), "{e}");
    }

    #[test]
    fn numbers_are_integers_or_finite_decimals() {
        let cases: &[(&str, Option<Num>)] = &[
            ("22", Some(Num::Int(22))),
            ("-5", Some(Num::Int(-5))),
            ("+5", Some(Num::Int(5))),
            ("9223372036854775807", Some(Num::Int(i64::MAX))),
            ("5432.5", Some(Num::Dec(5432.5))),
            ("1e3", Some(Num::Dec(1000.0))),
            ("ssh", None),
            ("", None),
            (" 22", None),
            ("0x16", None),
            ("inf", None),
            ("NaN", None),
            ("1e400", None),
        ];
        for (s, want) in cases {
            assert_eq!(Num::parse(s), *want, "{s:?}");
        }
        assert_eq!(Num::Int(5).compare(Num::Dec(5.0)), Some(Ordering::Equal));
        assert_eq!(Num::Int(i64::MAX).compare(Num::Int(i64::MAX - 1)), Some(Ordering::Greater));
        let json: Value = serde_json::from_str("[22, 2.5, 18446744073709551615, \"7\"]").unwrap();
        let nums: Vec<Num> = json.as_array().unwrap().iter().filter_map(Num::from_json).collect();
        assert_eq!(
            nums,
            [Num::Int(22), Num::Dec(2.5), Num::Dec(18446744073709551615.0), Num::Int(7)]
        );
    }

    /// The IAM lists are parts of ACTIONS, written out twice (consts cannot be joined): every
    /// entry of each is in ACTIONS, and an account action is never an instance one.
    #[test]
    fn the_action_lists_agree() {
        for a in INSTANCE_IAM_ACTIONS.iter().chain(ACCOUNT_ACTIONS) {
            assert!(ACTIONS.contains(a), "{a} is not in ACTIONS");
        }
        for a in INSTANCE_IAM_ACTIONS {
            assert!(!is_account_action(a), "{a}");
            assert_eq!(action_keys(a), action_keys(DESCRIBE_INSTANCES), "{a}");
        }
        for a in ACCOUNT_ACTIONS {
            assert_eq!(action_keys(a), ["hatch:SourceIp"], "{a}");
        }
        let sessions = ACTIONS.len() - INSTANCE_IAM_ACTIONS.len() - ACCOUNT_ACTIONS.len();
        assert_eq!(
            sessions, 6,
            "StartSession, StartPortForwarding, Describe*, Terminate and GetSessionRecording"
        );
        assert_eq!(action_keys(GET_SESSION_RECORDING), action_keys(DESCRIBE_SESSIONS));
    }

    #[test]
    fn glob_cases() {
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("**", "x"));
        assert!(!glob("abc", "abcd"));
    }
}
