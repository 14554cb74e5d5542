//! The store test suite: what every [`Store`] must do, run against each engine — SQLite in a
//! temporary file and PostgreSQL in a throwaway cluster the tests start themselves
//! (`hatch-pgtest`; a test fails, never skips, when the server cannot start). Engine-specific
//! checks (SQLite's WAL and query plans, old SQLite schemas) stay next to their engine.

use std::sync::Arc;

use super::{
    Account, Activation, AgentChannel, CloseReason, ExpiredNode, Mode, Node, OpenLimits, OverLimit,
    PgStore, RecordingMode, RegisterError, SessionPrefs, SessionRecord, SessionState, SqliteStore,
    StateFilter, Store,
};
use crate::control::iam::{self, IamError};

/// A store and what keeps it alive (a temporary directory for SQLite).
struct Engine {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

fn sqlite() -> Engine {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hatch.db")).unwrap();
    Engine { store: Arc::new(store), _dir: Some(dir) }
}

fn postgres() -> Engine {
    let url = hatch_pgtest::shared().fresh_database();
    Engine { store: Arc::new(PgStore::open(&url).unwrap()), _dir: None }
}

/// Each named test of this module, once per engine.
macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[test] fn $name() { super::$name(super::sqlite().store.as_ref()); } )*
        }
        mod on_postgres {
            $( #[test] fn $name() { super::$name(super::postgres().store.as_ref()); } )*
        }
    };
}

on_every_engine!(
    account_switch_and_preferences,
    activation_limits_and_codes,
    session_paging_and_close_once,
    sessions_detach_resume_and_recover_at_start,
    prune_deletes_old_closed_sessions_in_batches,
    progress_counts_survive_closing_what_a_crash_left_open,
    iam_life_of_users_keys_policies_and_instances,
    last_activation_slot_goes_to_exactly_one_of_many_racing,
    fleet_limits_nodes_mail_keys_and_expiry,
    a_dead_nodes_paired_sessions_move_to_the_adopter,
    audit_events_by_account_time_and_cursor,
    open_limits_hold_against_admissions_racing,
);

fn account(s: &dyn Store, id: &str) {
    s.create_account(&Account {
        id: id.into(),
        name: id.into(),
        session_manager_enabled: true,
        created_at: 1,
        prefs: SessionPrefs::default(),
    })
    .unwrap();
}

fn pending(id: &str, created_at: i64) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        account_id: "acct-1".into(),
        principal: "owner".into(),
        access_key_id: "ak".into(),
        source_ip: "127.0.0.1".into(),
        instance_id: "i-1".into(),
        mode: Mode::Shell,
        command: None,
        run_as: None,
        state: SessionState::Pending,
        created_at,
        expires_at: created_at + 600,
        connected_at: None,
        closed_at: None,
        close_reason: None,
        bytes_client_to_agent: 0,
        bytes_agent_to_client: 0,
        detached_at: None,
        remote_host: None,
        remote_port: None,
        node_id: None,
        recording: RecordingMode::Off,
        recording_digest: None,
    }
}

fn activation(id: &str, max: u32, expires_at: i64) -> Activation {
    Activation {
        id: id.into(),
        account_id: "acct-1".into(),
        region: "r1".into(),
        tags: [("env".to_owned(), "dev".to_owned())].into(),
        max_registrations: max,
        registrations: 0,
        expires_at,
        created_at: 1,
        revoked_at: None,
    }
}

fn account_switch_and_preferences(s: &dyn Store) {
    account(s, "acct-1");
    let p = SessionPrefs { idle_timeout_s: Some(60), ..Default::default() };
    assert!(s.set_session_prefs("acct-1", p).unwrap());
    assert!(!s.set_session_prefs("acct-none", p).unwrap());
    let a = s.account("acct-1").unwrap().unwrap();
    assert_eq!((a.prefs.idle_timeout_s, a.prefs.max_duration_s), (Some(60), None));
    assert_eq!(a.prefs.recording, RecordingMode::Off);
    let p = SessionPrefs { recording: RecordingMode::Full, ..p };
    assert!(s.set_session_prefs("acct-1", p).unwrap());
    assert_eq!(s.account("acct-1").unwrap().unwrap().prefs, p);
    assert!(s.set_session_manager("acct-1", false).unwrap());
    assert!(!s.account("acct-1").unwrap().unwrap().session_manager_enabled);
    assert_eq!(s.accounts().unwrap().len(), 1);
}

fn activation_limits_and_codes(s: &dyn Store) {
    account(s, "acct-1");
    s.insert_activation(&activation("act-1", 1, 100), &[7; 32]).unwrap();
    assert_eq!(
        s.register_instance("act-1", &[8; 32], "i-1", &[1; 32], None, 10),
        Err(RegisterError::BadActivation)
    );
    assert_eq!(
        s.register_instance("act-x", &[7; 32], "i-1", &[1; 32], None, 10),
        Err(RegisterError::BadActivation)
    );
    assert_eq!(
        s.register_instance("act-1", &[7; 32], "i-1", &[1; 32], None, 100),
        Err(RegisterError::Expired)
    );
    let inst = s.register_instance("act-1", &[7; 32], "i-1", &[1; 32], Some("h"), 10).unwrap();
    assert_eq!(inst.tags.get("env").map(String::as_str), Some("dev"));
    assert_eq!(
        s.register_instance("act-1", &[7; 32], "i-2", &[2; 32], None, 10),
        Err(RegisterError::Exhausted)
    );
    let got = s.instance_by_secret(&[1; 32]).unwrap().unwrap();
    assert_eq!((got.id.as_str(), got.hostname.as_deref()), ("i-1", Some("h")));
    assert!(s.instance("acct-other", "i-1").unwrap().is_none());
    assert_eq!(s.activations(Some("acct-1")).unwrap()[0].registrations, 1);
    // Revoked: refused before its expiry and its slots are looked at.
    s.insert_activation(&activation("act-2", 5, 100), &[9; 32]).unwrap();
    assert!(s.revoke_activation("acct-1", "act-2", 11).unwrap());
    assert!(!s.revoke_activation("acct-1", "act-2", 12).unwrap());
    assert!(!s.revoke_activation("acct-other", "act-1", 12).unwrap());
    assert_eq!(
        s.register_instance("act-2", &[9; 32], "i-3", &[3; 32], None, 10),
        Err(RegisterError::Revoked)
    );
    assert_eq!(s.activations(None).unwrap().len(), 2);
}

fn session_paging_and_close_once(s: &dyn Store) {
    account(s, "acct-1");
    for i in 0..5 {
        s.insert_session(&pending(&format!("s-{i}"), i)).unwrap();
    }
    let mut exec = pending("s-exec", 9);
    exec.mode = Mode::Port;
    exec.remote_host = Some("db".into());
    exec.remote_port = Some(5432);
    exec.command = Some(vec!["a b".into(), "c".into()]);
    exec.recording = RecordingMode::Output;
    s.insert_session(&exec).unwrap();
    assert_eq!(s.session(Some("acct-1"), "s-exec").unwrap().unwrap(), exec);
    assert!(s.session(Some("acct-other"), "s-exec").unwrap().is_none());
    let page = s.sessions(Some("acct-1"), StateFilter::All, 2, Some("s-exec")).unwrap();
    assert_eq!(page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s-4", "s-3"]);
    let page = s.sessions(Some("acct-1"), StateFilter::All, 2, Some("s-3")).unwrap();
    assert_eq!(page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s-2", "s-1"]);
    assert!(s.mark_connected("s-1", 5).unwrap());
    assert!(!s.mark_connected("s-1", 5).unwrap());
    // A close that brings lower counts than a progress report keeps the higher ones.
    s.record_progress(&[("s-1".into(), 3, 9)]).unwrap();
    assert!(s.close_session("s-1", CloseReason::Exit, 3, 4, 6).unwrap());
    assert_eq!(s.session(None, "s-1").unwrap().unwrap().bytes_agent_to_client, 9);
    assert!(!s.close_session("s-1", CloseReason::Error, 0, 0, 7).unwrap());
    // A later, larger report of a closed session still raises its counts.
    assert!(!s.close_session("s-1", CloseReason::Error, 30, 0, 7).unwrap());
    let got = s.session(Some("acct-1"), "s-1").unwrap().unwrap();
    assert_eq!((got.close_reason, got.bytes_client_to_agent), (Some(CloseReason::Exit), 30));
    assert_eq!(got.closed_at, Some(6));
    assert_eq!(s.closed_since(6).unwrap(), [("s-1".to_owned(), "i-1".to_owned())]);
    assert!(s.closed_since(7).unwrap().is_empty());
    let digest = "ab".repeat(32);
    assert!(s.set_recording_digest("s-exec", &digest).unwrap());
    assert!(!s.set_recording_digest("s-none", &digest).unwrap());
    let got = s.session(None, "s-exec").unwrap().unwrap();
    assert_eq!((got.recording, got.recording_digest), (RecordingMode::Output, Some(digest)));
    assert_eq!(s.sessions(None, StateFilter::Closed, 10, None).unwrap().len(), 1);
    assert_eq!(s.sessions(None, StateFilter::Active, 10, None).unwrap().len(), 5);
    assert_eq!(s.close_all_open("n-a", CloseReason::RelayShutdown, 9).unwrap(), 5);
}

fn sessions_detach_resume_and_recover_at_start(s: &dyn Store) {
    account(s, "acct-1");
    s.insert_session(&pending("s-old", 1)).unwrap();
    assert!(s.mark_connected("s-old", 2).unwrap());
    assert!(s.mark_detached("s-old", 10).unwrap());
    assert!(!s.mark_detached("s-old", 11).unwrap());
    let got = s.session(None, "s-old").unwrap().unwrap();
    assert_eq!((got.state, got.detached_at), (SessionState::Detached, Some(10)));
    // Detached is open: listed as active, not as closed.
    assert_eq!(s.sessions(None, StateFilter::Active, 10, None).unwrap().len(), 1);
    assert!(s.mark_resumed("s-old").unwrap());
    assert!(!s.mark_resumed("s-old").unwrap());
    assert_eq!(s.session(None, "s-old").unwrap().unwrap().state, SessionState::Connected);

    s.insert_session(&pending("s-pend", 3)).unwrap();
    s.insert_session(&pending("s-det", 4)).unwrap();
    assert!(s.mark_connected("s-det", 5).unwrap());
    assert!(s.mark_detached("s-det", 6).unwrap());
    s.insert_session(&pending("s-done", 4)).unwrap();
    assert!(s.close_session("s-done", CloseReason::Exit, 1, 1, 7).unwrap());
    let (closed, recs) = s.recover_open("n-a", CloseReason::RelayShutdown, 20).unwrap();
    assert_eq!(closed, 1);
    let ids: Vec<(&str, Option<i64>)> =
        recs.iter().map(|r| (r.id.as_str(), r.detached_at)).collect();
    assert_eq!(ids, [("s-old", Some(20)), ("s-det", Some(20))]);
    let pend = s.session(None, "s-pend").unwrap().unwrap();
    assert_eq!(pend.close_reason, Some(CloseReason::RelayShutdown));
    let done = s.session(None, "s-done").unwrap().unwrap();
    assert_eq!(done.close_reason, Some(CloseReason::Exit));

    s.insert_session(&pending("s-pend2", 8)).unwrap();
    assert_eq!(s.close_pending("n-a", CloseReason::RelayShutdown, 21).unwrap(), 1);
    assert_eq!(s.session(None, "s-old").unwrap().unwrap().state, SessionState::Detached);
}

/// Closed records older than the cut are deleted oldest first, a batch at a time; open ones,
/// however old, and newer closed ones stay.
fn prune_deletes_old_closed_sessions_in_batches(s: &dyn Store) {
    account(s, "acct-1");
    for i in 0..10 {
        s.insert_session(&pending(&format!("s-old{i}"), i)).unwrap();
        assert!(s.close_session(&format!("s-old{i}"), CloseReason::Exit, 1, 1, 100 + i).unwrap());
    }
    s.insert_session(&pending("s-new", 5)).unwrap();
    assert!(s.close_session("s-new", CloseReason::Exit, 1, 1, 500).unwrap());
    s.insert_session(&pending("s-open", 0)).unwrap();
    s.insert_session(&pending("s-live", 1)).unwrap();
    assert!(s.mark_connected("s-live", 2).unwrap());

    let left = |s: &dyn Store| {
        let mut ids: Vec<String> = s
            .sessions(None, StateFilter::All, 100, None)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(s.prune_closed(200, 4).unwrap(), 4);
    // The four closed first went.
    assert!(
        left(s).iter().all(|id| !["s-old0", "s-old1", "s-old2", "s-old3"].contains(&id.as_str()))
    );
    assert_eq!(left(s).len(), 9);
    assert_eq!(s.prune_closed(200, 4).unwrap(), 4);
    assert_eq!(s.prune_closed(200, 4).unwrap(), 2);
    assert_eq!(s.prune_closed(200, 4).unwrap(), 0);
    assert_eq!(left(s), ["s-live", "s-new", "s-open"]);
    // The cut is strict: closed exactly at it stays.
    assert_eq!(s.prune_closed(500, 100).unwrap(), 0);
    assert_eq!(s.prune_closed(501, 100).unwrap(), 1);
    assert_eq!(left(s), ["s-live", "s-open"]);
}

fn progress_counts_survive_closing_what_a_crash_left_open(s: &dyn Store) {
    account(s, "acct-1");
    s.insert_session(&pending("s-1", 1)).unwrap();
    assert!(s.mark_connected("s-1", 2).unwrap());
    s.record_progress(&[("s-1".into(), 10, 200), ("s-gone".into(), 1, 1)]).unwrap();
    // An older report arriving late never lowers the counts.
    s.record_progress(&[("s-1".into(), 5, 100)]).unwrap();
    let got = s.session(Some("acct-1"), "s-1").unwrap().unwrap();
    assert_eq!((got.bytes_client_to_agent, got.bytes_agent_to_client), (10, 200));
    // The next start closes what the killed relay left open, keeping the counts.
    assert_eq!(s.close_all_open("n-a", CloseReason::RelayShutdown, 9).unwrap(), 1);
    let got = s.session(Some("acct-1"), "s-1").unwrap().unwrap();
    assert_eq!(got.close_reason, Some(CloseReason::RelayShutdown));
    assert_eq!((got.bytes_client_to_agent, got.bytes_agent_to_client), (10, 200));
    // The agent's counts of the lost end raise them; another instance's agent, a lower count,
    // or a session that ended otherwise change nothing.
    let counts = |s: &dyn Store, id: &str| {
        let r = s.session(None, id).unwrap().unwrap();
        (r.state, r.close_reason, r.bytes_client_to_agent, r.bytes_agent_to_client)
    };
    assert!(!s.record_lost_counts("s-1", "i-2", CloseReason::RelayShutdown, 99, 999).unwrap());
    assert_eq!(counts(s, "s-1").2, 10);
    assert!(s.record_lost_counts("s-1", "i-1", CloseReason::RelayShutdown, 12, 150).unwrap());
    let want = (SessionState::Closed, Some(CloseReason::RelayShutdown), 12, 200);
    assert_eq!(counts(s, "s-1"), want);
    assert!(s.record_lost_counts("s-1", "i-1", CloseReason::RelayShutdown, 3, 4).unwrap());
    assert_eq!(counts(s, "s-1"), want);
    assert!(!s.record_lost_counts("s-nope", "i-1", CloseReason::RelayShutdown, 1, 1).unwrap());
    let mut other = s.session(None, "s-1").unwrap().unwrap();
    other.id = "s-2".into();
    other.state = SessionState::Pending;
    other.close_reason = None;
    other.closed_at = None;
    (other.bytes_client_to_agent, other.bytes_agent_to_client) = (0, 0);
    s.insert_session(&other).unwrap();
    assert!(!s.record_lost_counts("s-2", "i-1", CloseReason::RelayShutdown, 50, 50).unwrap());
    assert!(s.close_session("s-2", CloseReason::ClientClosed, 1, 2, 10).unwrap());
    assert!(!s.record_lost_counts("s-2", "i-1", CloseReason::RelayShutdown, 50, 50).unwrap());
    assert_eq!(counts(s, "s-2"), (SessionState::Closed, Some(CloseReason::ClientClosed), 1, 2));
}

const ALLOW_LIST: &str =
    r#"{"Statement":{"Effect":"Allow","Action":"hatch:ListUsers","Resource":"*"}}"#;

/// The IAM operations over the store: each change that takes access away moves the
/// account's generation; refusals are typed.
fn iam_life_of_users_keys_policies_and_instances(s: &dyn Store) {
    let a = iam::create_account(s, "test").unwrap();
    let gen_ = || s.iam_generation(&a.id).unwrap();
    let u = iam::create_user(s, &a.id, "alice").unwrap();
    assert!(matches!(iam::create_user(s, &a.id, "alice"), Err(IamError::AlreadyExists(_))));
    assert_eq!(iam::user(s, &a.id, "alice").unwrap(), u);
    assert_eq!(iam::user(s, &a.id, &u.id).unwrap(), u);
    iam::put_policy(s, &a.id, "list", ALLOW_LIST).unwrap();
    let typo = r#"{"Statement":{"Effect":"Allow","Action":"hatch:ListUsers",
        "Resource":"hrn:hatch::acct-1:usr/*"}}"#;
    let e = iam::put_policy(s, &a.id, "bad", typo).unwrap_err();
    assert!(
        matches!(&e, IamError::MalformedPolicy(m) if m.contains("Statement[0].Resource[0]")),
        "{e}"
    );
    assert!(matches!(iam::create_user(s, &a.id, "a b"), Err(IamError::Invalid(_))));
    let g = gen_();
    iam::attach_policy(s, &a.id, &u.id, "list").unwrap();
    assert!(gen_() > g);
    assert_eq!(s.user_policies(&u.id).unwrap()[0].name, "list");
    assert!(matches!(iam::attach_policy(s, &a.id, &u.id, "nope"), Err(IamError::NoSuchEntity(_))));
    let e = iam::delete_policy(s, &a.id, "list").unwrap_err();
    assert!(matches!(&e, IamError::DeleteConflict(m) if m.ends_with("(alice)")), "{e}");
    let (k, secret) = iam::create_access_key(s, &a.id, Some(&u.id)).unwrap();
    let owner = s.access_key_owner(&crate::control::credentials::hash(&secret)).unwrap().unwrap();
    assert_eq!((owner.key_id.as_str(), owner.user_id.as_deref()), (k.id.as_str(), Some(&*u.id)));
    // Disabled: the key authenticates nothing; enabled again, it does.
    let hash = crate::control::credentials::hash(&secret);
    iam::set_user_disabled(s, &a.id, "alice", true).unwrap();
    assert!(s.access_key_owner(&hash).unwrap().is_none());
    iam::set_user_disabled(s, &a.id, "alice", false).unwrap();
    assert!(s.access_key_owner(&hash).unwrap().is_some());
    let g = gen_();
    assert_eq!(iam::delete_user(s, &a.id, "alice").unwrap().id, u.id);
    assert!(gen_() > g);
    assert!(s.access_key_owner(&hash).unwrap().is_none());
    assert!(s.user_policies(&u.id).unwrap().is_empty());
    iam::delete_policy(s, &a.id, "list").unwrap();
    assert!(s.policies(&a.id).unwrap().is_empty());
    let (ok, _) = iam::create_access_key(s, &a.id, None).unwrap();
    let g = gen_();
    iam::revoke_access_key(s, &a.id, &ok.id).unwrap();
    assert!(gen_() > g);
    assert!(matches!(iam::revoke_access_key(s, &a.id, &ok.id), Err(IamError::NoSuchEntity(_))));
    // Another account's key is not this account's to revoke.
    let b = iam::create_account(s, "other").unwrap();
    let (bk, _) = iam::create_access_key(s, &b.id, None).unwrap();
    assert!(matches!(iam::revoke_access_key(s, &a.id, &bk.id), Err(IamError::NoSuchEntity(_))));
    assert!(matches!(iam::parse_tags(&["novalue"]), Err(IamError::Invalid(_))));

    // An instance: tagged, its secret revoked, deregistered.
    let (act, code) = iam::create_activation(
        s,
        &a.id,
        "eu-1",
        Default::default(),
        2,
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let code_hash = crate::control::credentials::hash(&code);
    let inst = s
        .register_instance(&act.id, &code_hash, "i-00000000000000a1", &[5; 32], None, iam_now())
        .unwrap();
    s.touch_instance(&inst.id, 42).unwrap();
    assert_eq!(s.instance(&a.id, &inst.id).unwrap().unwrap().last_seen, Some(42));
    let g = gen_();
    iam::tag_instance(s, &a.id, &inst.id, iam::parse_tags(&["env=prod"]).unwrap()).unwrap();
    assert!(gen_() > g);
    assert_eq!(s.instances(Some(&a.id)).unwrap()[0].tags.get("env").unwrap(), "prod");
    iam::revoke_instance_secret(s, &a.id, &inst.id).unwrap();
    assert!(s.instance_by_secret(&[5; 32]).unwrap().is_none());
    assert!(s.instance(&a.id, &inst.id).unwrap().unwrap().secret_revoked_at.is_some());
    iam::deregister_instance(s, &a.id, &inst.id).unwrap();
    assert!(s.instances(Some(&a.id)).unwrap().is_empty());
    assert!(matches!(
        iam::deregister_instance(s, &a.id, &inst.id),
        Err(IamError::InstanceNotFound(_))
    ));
}

fn iam_now() -> i64 {
    crate::control::unix_now()
}

/// Eight threads register with an activation that has one slot left: exactly one gets it,
/// the others are refused `Exhausted`, and the count is exact.
fn last_activation_slot_goes_to_exactly_one_of_many_racing(s: &dyn Store) {
    account(s, "acct-1");
    s.insert_activation(&activation("act-1", 3, i64::MAX), &[7; 32]).unwrap();
    s.register_instance("act-1", &[7; 32], "i-0", &[100; 32], None, 1).unwrap();
    s.register_instance("act-1", &[7; 32], "i-1", &[101; 32], None, 1).unwrap();
    let results: Vec<Result<String, RegisterError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (2u8..10)
            .map(|i| {
                scope.spawn(move || {
                    s.register_instance("act-1", &[7; 32], &format!("i-{i}"), &[i; 32], None, 1)
                        .map(|inst| inst.id)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(
        results.iter().all(|r| r.is_ok() || *r == Err(RegisterError::Exhausted)),
        "{results:?}"
    );
    assert_eq!(s.activations(Some("acct-1")).unwrap()[0].registrations, 3);
    assert_eq!(s.instances(Some("acct-1")).unwrap().len(), 3);
}

fn on_node(id: &str, instance: &str, principal: &str, node: &str) -> SessionRecord {
    SessionRecord {
        instance_id: instance.into(),
        principal: principal.into(),
        node_id: Some(node.into()),
        ..pending(id, 1)
    }
}

fn node(id: &str, run: &str, heartbeat_at: i64) -> Node {
    Node {
        id: id.into(),
        api_url: format!("https://{id}:7444"),
        data_url: format!("wss://{id}:7443"),
        run: run.into(),
        started_at: 1,
        heartbeat_at,
    }
}

/// What a fleet keeps in the store: open-session limits counted at insert, nodes and their
/// heartbeats, agents' channels, mail, signing keys, and the expiry of a silent node.
fn fleet_limits_nodes_mail_keys_and_expiry(s: &dyn Store) {
    account(s, "acct-1");
    let limits = OpenLimits { per_instance: 2, per_account: 3, per_user: 10 };
    let wide = OpenLimits { per_instance: 2, per_account: 100, per_user: 100 };
    assert_eq!(s.admit_session(&on_node("s-1", "i-1", "owner", "n-b"), limits).unwrap(), Ok(()));
    assert_eq!(s.admit_session(&on_node("s-2", "i-1", "owner", "n-b"), limits).unwrap(), Ok(()));
    let third = s.admit_session(&on_node("s-3", "i-1", "owner", "n-a"), limits).unwrap();
    assert_eq!(third, Err(OverLimit::Instance(2)));
    assert!(s.session(None, "s-3").unwrap().is_none(), "a refused session is not stored");
    assert_eq!(s.admit_session(&on_node("s-4", "i-2", "u-1", "n-a"), limits).unwrap(), Ok(()));
    let over = s.admit_session(&on_node("s-5", "i-3", "u-1", "n-a"), limits).unwrap();
    assert_eq!(over, Err(OverLimit::Account(3)));
    let mine =
        OpenLimits { per_user: 1, ..OpenLimits { per_instance: 9, per_account: 9, per_user: 9 } };
    assert_eq!(
        s.admit_session(&on_node("s-6", "i-3", "u-1", "n-a"), mine).unwrap(),
        Err(OverLimit::User(1))
    );
    // A closed session frees its slot.
    assert!(s.close_session("s-4", CloseReason::Exit, 0, 0, 5).unwrap());
    assert_eq!(s.admit_session(&on_node("s-5", "i-3", "u-1", "n-a"), limits).unwrap(), Ok(()));
    assert_eq!(s.session(None, "s-5").unwrap().unwrap().node_id.as_deref(), Some("n-a"));

    s.register_node(&node("n-a", "run-a", 100)).unwrap();
    s.register_node(&node("n-b", "run-b", 50)).unwrap();
    assert!(s.heartbeat_node("n-a", "run-a", 120).unwrap());
    assert!(!s.heartbeat_node("n-a", "run-old", 130).unwrap(), "another run's heartbeat");
    assert!(!s.heartbeat_node("n-z", "run-z", 130).unwrap(), "an unregistered node");
    let ids: Vec<(String, i64)> =
        s.nodes().unwrap().into_iter().map(|n| (n.id, n.heartbeat_at)).collect();
    assert_eq!(ids, [("n-a".to_owned(), 120), ("n-b".to_owned(), 50)]);

    let ch = |n: &str| AgentChannel {
        node_id: n.into(),
        default_user: "ec2-user".into(),
        switch_user: true,
    };
    s.set_agent_channel("i-1", &ch("n-a")).unwrap();
    s.set_agent_channel("i-1", &ch("n-b")).unwrap();
    s.set_agent_channel("i-2", &ch("n-a")).unwrap();
    assert_eq!(s.agent_channel("i-1").unwrap(), Some(ch("n-b")));
    assert!(!s.clear_agent_channel("i-1", "n-a").unwrap(), "n-a no longer holds it");
    let mut online = s.online_instances(100).unwrap();
    online.sort();
    assert_eq!(online, [("i-2".to_owned(), "n-a".to_owned())], "n-b is past the cut");

    for i in 0..3 {
        s.send_mail("n-a", &format!("to a {i}"), 1).unwrap();
    }
    s.send_mail("n-b", "to b", 1).unwrap();
    assert_eq!(s.take_mail("n-a", 2).unwrap(), ["to a 0", "to a 1"]);
    assert_eq!(s.take_mail("n-a", 2).unwrap(), ["to a 2"]);
    assert!(s.take_mail("n-a", 2).unwrap().is_empty());

    // n-b is silent past the cut: expired once, its sessions closed, its records gone.
    // No adopter (no resume window): all of them closed.
    let expired = s.expire_nodes(60, CloseReason::NodeLost, 200, None).unwrap();
    assert_eq!(expired, [ExpiredNode { id: "n-b".into(), closed: 2, adopted: vec![] }]);
    assert!(s.expire_nodes(60, CloseReason::NodeLost, 201, None).unwrap().is_empty());
    let lost = s.session(None, "s-1").unwrap().unwrap();
    assert_eq!(
        (lost.state, lost.close_reason, lost.closed_at),
        (SessionState::Closed, Some(CloseReason::NodeLost), Some(200))
    );
    assert!(s.session(None, "s-5").unwrap().unwrap().state.is_open(), "n-a's session stays");
    assert_eq!(s.agent_channel("i-1").unwrap(), None);
    assert!(s.take_mail("n-b", 10).unwrap().is_empty());
    assert_eq!(s.nodes().unwrap().len(), 1);
    // Another node's start does not close n-a's session.
    assert_eq!(s.close_all_open("n-c", CloseReason::RelayShutdown, 300).unwrap(), 0);
    // The expired sessions' slots are free again: i-1 takes two, not a third.
    for id in ["s-7", "s-8"] {
        assert_eq!(s.admit_session(&on_node(id, "i-1", "owner", "n-a"), wide).unwrap(), Ok(()));
    }
    let third = s.admit_session(&on_node("s-9", "i-1", "owner", "n-a"), wide).unwrap();
    assert_eq!(third, Err(OverLimit::Instance(2)));
    // A start's bulk close frees every slot it closes.
    assert_eq!(s.close_all_open("n-a", CloseReason::RelayShutdown, 301).unwrap(), 3);
    assert_eq!(s.admit_session(&on_node("s-9", "i-1", "owner", "n-a"), wide).unwrap(), Ok(()));
    assert!(s.close_session("s-9", CloseReason::Exit, 0, 0, 302).unwrap());
    assert_eq!(s.clear_agent_channels("n-a").unwrap(), 1);

    assert!(s.signing_keys().unwrap().is_empty());
    assert!(s.add_signing_key("k2", b"two", 1, true).unwrap());
    assert!(!s.add_signing_key("k1", b"one", 1, true).unwrap(), "the store has a key already");
    assert!(!s.add_signing_key("k2", b"dup", 1, false).unwrap(), "the kid exists");
    assert!(s.add_signing_key("k3", b"three", 1, false).unwrap());
    let keys = s.signing_keys().unwrap();
    assert_eq!(keys, [("k2".to_owned(), b"two".to_vec()), ("k3".to_owned(), b"three".to_vec())]);
}

/// With an adopter, a dead node's paired sessions (connected or detached) become the
/// adopter's, detached, with their counts; the ones that never paired are closed; another
/// node's sessions are left alone; the slots stay taken.
fn a_dead_nodes_paired_sessions_move_to_the_adopter(s: &dyn Store) {
    account(s, "acct-1");
    let limits = OpenLimits { per_instance: 4, per_account: 10, per_user: 10 };
    for (id, node) in [("s-1", "n-b"), ("s-2", "n-b"), ("s-3", "n-b"), ("s-4", "n-c")] {
        let rec = SessionRecord { created_at: 10, ..on_node(id, "i-1", "owner", node) };
        assert_eq!(s.admit_session(&rec, limits).unwrap(), Ok(()));
    }
    for id in ["s-1", "s-2", "s-4"] {
        assert!(s.mark_connected(id, 20).unwrap());
    }
    assert!(s.mark_detached("s-2", 30).unwrap());
    s.record_progress(&[("s-1".into(), 7, 9)]).unwrap();
    s.register_node(&node("n-a", "run-a", 100)).unwrap();
    s.register_node(&node("n-b", "run-b", 50)).unwrap();
    s.register_node(&node("n-c", "run-c", 100)).unwrap();

    let expired = s.expire_nodes(60, CloseReason::NodeLost, 200, Some("n-a")).unwrap();
    let [ExpiredNode { id, closed, adopted }] = expired.as_slice() else { panic!("{expired:?}") };
    assert_eq!((id.as_str(), *closed), ("n-b", 1));
    let ids: Vec<&str> = adopted.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["s-1", "s-2"]);
    for r in adopted {
        assert_eq!((r.state, r.node_id.as_deref()), (SessionState::Detached, Some("n-a")));
    }
    let s1 = s.session(None, "s-1").unwrap().unwrap();
    assert_eq!(
        (s1.state, s1.node_id.as_deref(), s1.bytes_client_to_agent, s1.bytes_agent_to_client),
        (SessionState::Detached, Some("n-a"), 7, 9)
    );
    assert_eq!(s1.detached_at, Some(200));
    let s3 = s.session(None, "s-3").unwrap().unwrap();
    assert_eq!((s3.state, s3.close_reason), (SessionState::Closed, Some(CloseReason::NodeLost)));
    let s4 = s.session(None, "s-4").unwrap().unwrap();
    assert_eq!((s4.state, s4.node_id.as_deref()), (SessionState::Connected, Some("n-c")));
    // The adopted sessions keep their slots: i-1 holds three open (s-1, s-2, s-4).
    let three = OpenLimits { per_instance: 3, ..limits };
    let over = s.admit_session(&on_node("s-5", "i-1", "owner", "n-a"), three).unwrap();
    assert_eq!(over, Err(OverLimit::Instance(3)));
    // The adopter's own start (after a crash of its own) recovers them as its own.
    let (closed, recovered) = s.recover_open("n-a", CloseReason::RelayShutdown, 300).unwrap();
    assert_eq!(closed, 0);
    let ids: Vec<&str> = recovered.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["s-1", "s-2"]);
}

/// Audit events come back per account, oldest first, from a time and after a cursor.
fn audit_events_by_account_time_and_cursor(s: &dyn Store) {
    for (at, acct, line) in [
        (10, Some("acct-1"), "a"),
        (20, Some("acct-2"), "b"),
        (30, Some("acct-1"), "c"),
        (40, None, "d"),
        (50, Some("acct-1"), "e"),
    ] {
        s.append_audit(at, acct, line).unwrap();
    }
    let lines = |v: Vec<super::AuditRecord>| v.into_iter().map(|r| r.line).collect::<Vec<_>>();
    assert_eq!(lines(s.audit_events("acct-1", 0, 0, 10).unwrap()), ["a", "c", "e"]);
    assert_eq!(lines(s.audit_events("acct-1", 30, 0, 10).unwrap()), ["c", "e"]);
    let first = s.audit_events("acct-1", 0, 0, 2).unwrap();
    assert_eq!(first.len(), 2);
    let after = first[1].seq;
    assert_eq!(lines(s.audit_events("acct-1", 0, after, 2).unwrap()), ["e"]);
    assert!(s.audit_events("acct-3", 0, 0, 10).unwrap().is_empty());
    assert_eq!(first[0].account_id.as_deref(), Some("acct-1"));
    assert_eq!(first[0].at, 10);
}

/// Admissions racing from many threads (as from many nodes) never pass the account's limit.
fn open_limits_hold_against_admissions_racing(s: &dyn Store) {
    account(s, "acct-1");
    let limits = OpenLimits { per_instance: 100, per_account: 5, per_user: 100 };
    let admitted = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..8 {
            let admitted = &admitted;
            scope.spawn(move || {
                for i in 0..4 {
                    let rec = on_node(&format!("s-{t}-{i}"), &format!("i-{i}"), "owner", "n-a");
                    if s.admit_session(&rec, limits).unwrap().is_ok() {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.into_inner(), 5);
    assert_eq!(s.sessions(None, StateFilter::Active, 100, None).unwrap().len(), 5);
}
