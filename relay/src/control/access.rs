//! What a caller may do, and whether the caller of a live session still may.
//!
//! [`Grants`] are a principal's policies as the API evaluates them: the owner may do everything
//! in the account; a user only what their policies allow, and nothing at all while one of them
//! does not parse (skipping it could drop a Deny). The API loads them per request;
//! [`recheck`] loads them again for the live sessions of an account whose IAM generation moved
//! (a key revoked, a policy replaced or detached, a user disabled) and says which sessions'
//! callers lost the access that started them, so that revocation reaches running shells
//! within the reconcile interval instead of only refusing new requests.

use std::collections::HashMap;
use std::net::IpAddr;

use tracing::warn;

use super::policy::{self, Context, Policy};
use super::store::{Instance, Mode, SessionRecord, SessionState, Store};

/// The policies a principal acts under.
#[derive(Debug, Clone)]
pub struct Grants {
    /// The account owner: everything in the account, no policy evaluated.
    owner: bool,
    policies: Vec<Policy>,
    /// An attached policy that no longer parses: every action is denied (fail closed).
    unreadable: Option<String>,
}

impl Grants {
    /// The account owner's grants.
    pub fn owner() -> Grants {
        Grants { owner: true, policies: Vec::new(), unreadable: None }
    }

    /// A user's grants from their stored policy documents.
    pub fn of_user(docs: &[super::store::PolicyRecord]) -> Grants {
        let mut policies = Vec::with_capacity(docs.len());
        let mut unreadable = None;
        for d in docs {
            // Documents are validated before they are stored; one that no longer parses (an
            // older relay's, or one a newer rule refuses) may hold a Deny: skipping it would
            // widen what the others allow, so the user is allowed nothing until it is fixed.
            match Policy::parse(&d.document) {
                Ok(p) => policies.push(p),
                Err(e) => {
                    warn!(policy = %d.name, err = %e,
                        "stored policy does not parse; its user is denied every action");
                    unreadable = Some(d.name.clone());
                }
            }
        }
        Grants { owner: false, policies, unreadable }
    }

    /// Whether `action` on `inst` (in `account`) is allowed in `ctx`.
    pub fn may(&self, action: &str, account: &str, inst: &Instance, ctx: &Context) -> bool {
        if self.owner {
            return true;
        }
        if self.unreadable.is_some() {
            return false;
        }
        let hrn = policy::instance_hrn(&inst.region, account, &inst.id);
        self.may_on(action, &hrn, ctx)
    }

    /// Whether `action` on the resource named `hrn` is allowed in `ctx`.
    pub fn may_on(&self, action: &str, hrn: &str, ctx: &Context) -> bool {
        if self.owner {
            return true;
        }
        if self.unreadable.is_some() {
            return false;
        }
        policy::evaluate(&self.policies, action, hrn, ctx).allowed()
    }
}

/// The action and context a session's start was evaluated with, rebuilt from its record:
/// StartSession with the run-as user and the mode, or, for a port session,
/// StartPortForwarding with the destination (and no user or mode: nothing runs as anyone).
pub fn start_context(rec: &SessionRecord, inst: &Instance) -> (&'static str, Context) {
    let port = rec.mode == Mode::Port;
    let ctx = Context {
        source_ip: rec.source_ip.parse::<IpAddr>().ok(),
        region: Some(inst.region.clone()),
        instance_id: Some(inst.id.clone()),
        run_as: if port { None } else { rec.run_as.clone() },
        mode: (!port).then(|| rec.mode.as_str().to_owned()),
        remote_host: rec.remote_host.clone().filter(|_| port),
        remote_port: rec.remote_port.filter(|_| port),
        tags: inst.tags.clone(),
    };
    (if port { policy::START_PORT_FORWARDING } else { policy::START_SESSION }, ctx)
}

/// Why a caller may not resume a session (`POST /v1/sessions/{id}/resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefused {
    /// Not the caller's own session: answered as an unknown one, so that nobody learns that
    /// another principal's session exists.
    NotFound,
    /// The caller's policies no longer allow StartSession of it (or its instance is gone).
    Denied,
    /// Closed, or never paired (`pending`: nothing to resume; start a new session).
    Ended,
    /// A client is attached (`connected`) and `force` was not given.
    Attached,
}

/// Whether `principal`, acting under `grants` from `source_ip`, may resume `rec` now: only its
/// own principal (the user, or the owner, that started it), allowed StartSession on its
/// instance exactly as a new start with the same run-as user and mode would be (the user is
/// the one recorded; for records without one, the agent's default user, as a start names it),
/// and only a session that paired and has not closed.
pub fn may_resume(
    principal: &str,
    grants: &Grants,
    source_ip: IpAddr,
    rec: &SessionRecord,
    inst: Option<&Instance>,
    agent_default_user: Option<&str>,
    force: bool,
) -> Result<(), ResumeRefused> {
    if rec.principal != principal {
        return Err(ResumeRefused::NotFound);
    }
    let Some(inst) = inst else { return Err(ResumeRefused::Denied) };
    let (action, mut ctx) = start_context(rec, inst);
    ctx.source_ip = Some(source_ip);
    if ctx.run_as.is_none() && action == policy::START_SESSION {
        ctx.run_as = agent_default_user.map(str::to_owned);
    }
    if !grants.may(action, &rec.account_id, inst, &ctx) {
        return Err(ResumeRefused::Denied);
    }
    match rec.state {
        SessionState::Detached => Ok(()),
        SessionState::Connected if force => Ok(()),
        SessionState::Connected => Err(ResumeRefused::Attached),
        SessionState::Pending | SessionState::Closed => Err(ResumeRefused::Ended),
    }
}

/// Why a live session's caller no longer has access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The access key that started it was revoked (or is gone).
    KeyRevoked,
    /// The user was disabled (or is gone).
    UserDisabled,
    /// The user's policies no longer allow StartSession of it (or its instance is gone).
    PolicyDenies,
}

impl Lost {
    /// Words for logs and the close reason on the legs (at most 123 bytes).
    pub fn words(self) -> &'static str {
        match self {
            Lost::KeyRevoked => "access revoked: the access key was revoked",
            Lost::UserDisabled => "access revoked: the user was disabled",
            Lost::PolicyDenies => "access revoked: the policy no longer allows this session",
        }
    }
}

/// Evaluates the live `sessions` of `account` again against the store as it is now, as the
/// API would evaluate a new StartSession of each; returns those whose caller lost access.
pub fn recheck(
    store: &dyn Store,
    account: &str,
    sessions: &[SessionRecord],
) -> anyhow::Result<Vec<(SessionRecord, Lost)>> {
    if sessions.is_empty() {
        return Ok(Vec::new());
    }
    let keys: HashMap<String, bool> =
        store.access_keys(account)?.into_iter().map(|k| (k.id, k.revoked_at.is_none())).collect();
    let users: HashMap<String, bool> =
        store.users(account)?.into_iter().map(|u| (u.id, u.disabled_at.is_none())).collect();
    let mut grants: HashMap<String, Grants> = HashMap::new();
    let mut instances: HashMap<String, Option<Instance>> = HashMap::new();
    let mut lost = Vec::new();
    for rec in sessions {
        if rec.account_id != account {
            continue;
        }
        if !keys.get(&rec.access_key_id).copied().unwrap_or(false) {
            lost.push((rec.clone(), Lost::KeyRevoked));
            continue;
        }
        if rec.principal == "owner" {
            continue;
        }
        if !users.get(&rec.principal).copied().unwrap_or(false) {
            lost.push((rec.clone(), Lost::UserDisabled));
            continue;
        }
        let g = match grants.get(&rec.principal) {
            Some(g) => g,
            None => {
                let g = Grants::of_user(&store.user_policies(&rec.principal)?);
                grants.entry(rec.principal.clone()).or_insert(g)
            }
        };
        let inst = match instances.get(&rec.instance_id) {
            Some(i) => i,
            None => {
                let i = store.instance(account, &rec.instance_id)?;
                instances.entry(rec.instance_id.clone()).or_insert(i)
            }
        };
        let allowed = inst.as_ref().is_some_and(|inst| {
            let (action, ctx) = start_context(rec, inst);
            g.may(action, account, inst, &ctx)
        });
        if !allowed {
            lost.push((rec.clone(), Lost::PolicyDenies));
        }
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::credentials;
    use crate::control::iam;
    use crate::control::store::SqliteStore;

    /// A store with one account, one instance (`env=dev`) and a live record per principal.
    struct World {
        _dir: tempfile::TempDir,
        store: SqliteStore,
        account: String,
        instance: String,
    }

    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("hatch.db")).unwrap();
        let account = iam::create_account(&store, "a").unwrap().id;
        let tags = iam::parse_tags(&["env=dev"]).unwrap();
        let (act, code) = iam::create_activation(
            &store,
            &account,
            "eu-1",
            tags,
            1,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let inst = store
            .register_instance(
                &act.id,
                &credentials::hash(&code),
                "i-00000000000000a1",
                &credentials::hash("secret"),
                None,
                0,
            )
            .unwrap();
        World { _dir: dir, store, account, instance: inst.id }
    }

    impl World {
        /// A user with `doc` attached, and a live session record of theirs.
        fn user(&self, name: &str, doc: &str) -> (String, SessionRecord) {
            let u = iam::create_user(&self.store, &self.account, name).unwrap();
            iam::put_policy(&self.store, &self.account, name, doc).unwrap();
            iam::attach_policy(&self.store, &self.account, &u.id, name).unwrap();
            let (k, _) = iam::create_access_key(&self.store, &self.account, Some(&u.id)).unwrap();
            (u.id.clone(), self.record(&u.id, &k.id, "deploy"))
        }

        fn record(&self, principal: &str, key: &str, run_as: &str) -> SessionRecord {
            SessionRecord {
                id: credentials::new_id("s-"),
                account_id: self.account.clone(),
                principal: principal.into(),
                access_key_id: key.into(),
                source_ip: "10.0.0.1".into(),
                instance_id: self.instance.clone(),
                mode: Mode::Shell,
                command: None,
                run_as: Some(run_as.into()),
                state: SessionState::Connected,
                created_at: 0,
                expires_at: 600,
                connected_at: Some(1),
                closed_at: None,
                close_reason: None,
                bytes_client_to_agent: 0,
                bytes_agent_to_client: 0,
                detached_at: None,
                remote_host: None,
                remote_port: None,
                node_id: None,
                recording: Default::default(),
                recording_digest: None,
            }
        }

        fn lost(&self, recs: &[SessionRecord]) -> Vec<(String, Lost)> {
            recheck(&self.store, &self.account, recs)
                .unwrap()
                .into_iter()
                .map(|(r, why)| (r.id, why))
                .collect()
        }
    }

    const DEV_NOT_ROOT: &str = r#"{"Statement":[
        {"Effect":"Allow","Action":"hatch:StartSession","Resource":"*",
         "Condition":{"StringEquals":{"hatch:tag/env":"dev"}}},
        {"Effect":"Deny","Action":"hatch:StartSession","Resource":"*",
         "Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#;

    #[test]
    fn each_loss_of_access_is_named_and_everything_else_keeps_running() {
        let w = world();
        let s = &w.store;
        let (owner_key, _) = iam::create_access_key(s, &w.account, None).unwrap();
        let owner = w.record("owner", &owner_key.id, "root");
        let (_, a) = w.user("alice", DEV_NOT_ROOT);
        let (bob, b) = w.user("bob", DEV_NOT_ROOT);
        let (_, c) = w.user("carol", DEV_NOT_ROOT);
        let (_, d) = w.user("dave", DEV_NOT_ROOT);
        let all = [owner.clone(), a.clone(), b.clone(), c.clone(), d.clone()];
        assert_eq!(w.lost(&all), vec![]);

        let g0 = s.iam_generation(&w.account).unwrap();
        // alice's key revoked, bob disabled, carol's policy detached, dave's made stricter
        // (the instance is no longer allowed).
        assert!(s.revoke_access_key(&a.access_key_id, 5).unwrap());
        assert!(s.set_user_disabled(&bob, Some(5)).unwrap());
        assert!(s.detach_policy(&w.account, &c.principal, "carol").unwrap());
        iam::put_policy(s, &w.account, "dave", &DEV_NOT_ROOT.replace("\"dev\"", "\"prod\""))
            .unwrap();
        assert_eq!(s.iam_generation(&w.account).unwrap(), g0 + 4, "every change counts");
        assert_eq!(
            w.lost(&all),
            vec![
                (a.id.clone(), Lost::KeyRevoked),
                (b.id.clone(), Lost::UserDisabled),
                (c.id.clone(), Lost::PolicyDenies),
                (d.id.clone(), Lost::PolicyDenies),
            ]
        );
        // A disabled user's key authenticates nothing; enabled again, it does.
        let (_, secret) = iam::create_access_key(s, &w.account, Some(&bob)).unwrap();
        assert!(s.access_key_owner(&credentials::hash(&secret)).unwrap().is_none());
        assert!(s.set_user_disabled(&bob, None).unwrap());
        assert!(s.access_key_owner(&credentials::hash(&secret)).unwrap().is_some());
        // The owner's key revoked ends the owner's session too.
        assert!(s.revoke_access_key(&owner_key.id, 6).unwrap());
        assert_eq!(w.lost(std::slice::from_ref(&owner)), vec![(owner.id, Lost::KeyRevoked)]);
    }

    #[test]
    fn an_attached_deny_and_a_retagged_instance_raise_the_generation_and_end_sessions() {
        // The relay re-checks an account's live sessions only when its IAM generation moved:
        // every change that can take access away must move it. Attaching a deny-all policy (to
        // quarantine a user) and retagging an instance out of `env=dev` both can.
        let w = world();
        let s = &w.store;
        let (erin, e) = w.user("erin", DEV_NOT_ROOT);
        let (_, f) = w.user("frank", DEV_NOT_ROOT);
        const DENY_ALL: &str =
            r#"{"Statement":{"Effect":"Deny","Action":"hatch:*","Resource":"*"}}"#;
        iam::put_policy(s, &w.account, "quarantine", DENY_ALL).unwrap();

        let g0 = s.iam_generation(&w.account).unwrap();
        iam::attach_policy(s, &w.account, &erin, "quarantine").unwrap();
        let g1 = s.iam_generation(&w.account).unwrap();
        assert!(g1 > g0, "attaching a policy must raise the IAM generation ({g0} -> {g1})");
        assert_eq!(w.lost(&[e.clone(), f.clone()]), vec![(e.id.clone(), Lost::PolicyDenies)]);
        // Attaching it again changes nothing, so nothing is re-checked.
        iam::attach_policy(s, &w.account, &erin, "quarantine").unwrap();
        assert_eq!(s.iam_generation(&w.account).unwrap(), g1);

        let prod = iam::parse_tags(&["env=prod"]).unwrap();
        assert!(s.set_instance_tags(&w.instance, &prod).unwrap());
        let g2 = s.iam_generation(&w.account).unwrap();
        assert!(g2 > g1, "retagging an instance must raise the IAM generation ({g1} -> {g2})");
        assert_eq!(w.lost(std::slice::from_ref(&f)), vec![(f.id.clone(), Lost::PolicyDenies)]);
        // No such instance: false, and nothing moves.
        assert!(!s.set_instance_tags("i-00000000000000ff", &prod).unwrap());
        assert_eq!(s.iam_generation(&w.account).unwrap(), g2);
    }

    #[test]
    fn the_effective_run_as_user_is_evaluated_again() {
        // The policy denies root: a session running as root (the agent's default user when
        // none was named) loses access once that Deny is added.
        let w = world();
        let (_, mut rec) =
            w.user("ops", r#"{"Statement":{"Effect":"Allow","Action":"hatch:*","Resource":"*"}}"#);
        rec.run_as = Some("root".into());
        assert_eq!(w.lost(std::slice::from_ref(&rec)), vec![]);
        iam::put_policy(&w.store, &w.account, "ops", DEV_NOT_ROOT).unwrap();
        assert_eq!(w.lost(std::slice::from_ref(&rec)), vec![(rec.id.clone(), Lost::PolicyDenies)]);
    }

    /// A port session, as `POST /v1/sessions` records one (the agent's default user in
    /// `run_as`, which a port session does not run as).
    fn port(mut rec: SessionRecord, port: u16) -> SessionRecord {
        rec.mode = Mode::Port;
        rec.remote_host = Some("127.0.0.1".into());
        rec.remote_port = Some(port);
        rec
    }

    const FORWARD_5432: &str = r#"{"Statement":{"Effect":"Allow",
        "Action":"hatch:StartPortForwarding","Resource":"*",
        "Condition":{"NumericEquals":{"hatch:RemotePort":"5432"}}}}"#;

    #[test]
    fn a_port_session_is_evaluated_again_as_port_forwarding_to_its_destination() {
        // A user allowed port forwarding to 5432 and nothing else: any IAM change re-checks
        // the account's sessions, and theirs must not end for lack of StartSession; the
        // resume is allowed for the same reason. A change of the port condition ends it.
        let w = world();
        let (_, rec) = w.user("db", FORWARD_5432);
        let rec = port(rec, 5432);
        let (_, other) = w.user("db2", FORWARD_5432);
        let other = port(other, 22);
        assert_eq!(
            w.lost(&[rec.clone(), other.clone()]),
            vec![(other.id.clone(), Lost::PolicyDenies)]
        );
        let g = Grants::of_user(&w.store.user_policies(&rec.principal).unwrap());
        let inst = w.store.instance(&w.account, &w.instance).unwrap().unwrap();
        let mut detached = rec.clone();
        detached.state = SessionState::Detached;
        let ip = "10.0.0.1".parse().unwrap();
        let resume = |r: &SessionRecord| {
            may_resume(&r.principal, &g, ip, r, Some(&inst), Some("root"), false)
        };
        assert_eq!(resume(&detached), Ok(()));
        let mut to_22 = port(detached.clone(), 22);
        to_22.id = "s-other".into();
        assert_eq!(resume(&to_22), Err(ResumeRefused::Denied));
        iam::put_policy(&w.store, &w.account, "db", &FORWARD_5432.replace("5432", "5433")).unwrap();
        assert_eq!(w.lost(std::slice::from_ref(&rec)), vec![(rec.id.clone(), Lost::PolicyDenies)]);
    }
}
