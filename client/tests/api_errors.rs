//! The real `hatch` binary against a real HTTPS server on loopback: every API error code gives
//! its exit code and its message, TLS and TCP failures are named, `-v` adds the request id.

mod support;

use std::sync::Arc;

use serde_json::json;
use support::{TestApi, hatch, run, stderr, stdout};

const INSTANCE: &str = "i-0123456789abcdef";

fn error(code: &str, status: u16) -> support::Handler {
    let code = code.to_owned();
    Arc::new(move |method, path| {
        if method == "GET" && path == "/v1/instances" {
            let seen = time::OffsetDateTime::now_utc() - time::Duration::seconds(185);
            let seen = seen.format(&time::format_description::well_known::Rfc3339).unwrap();
            return (
                200,
                json!({"instances": [{"instance_id": INSTANCE, "region": "local",
                "tags": {}, "online": false, "last_seen": seen}]}),
            );
        }
        let mut body = json!({"code": code, "message": "relay words", "request_id": "req-42"});
        if code == "TargetNotConnected" {
            let seen = time::OffsetDateTime::now_utc() - time::Duration::seconds(605);
            body["last_seen"] =
                seen.format(&time::format_description::well_known::Rfc3339).unwrap().into();
        }
        (status, body)
    })
}

/// `hatch ARGS` against `api` with an access key.
fn call(api: &TestApi, home: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = hatch(home);
    cmd.env("HATCH_API", &api.url)
        .env("HATCH_ACCESS_KEY", "k")
        .env("HATCH_CA", &api.ca_file)
        .args(args);
    run(cmd)
}

fn exec(api: &TestApi, home: &std::path::Path, verbose: bool) -> std::process::Output {
    let mut cmd = hatch(home);
    cmd.env("HATCH_API", &api.url).env("HATCH_ACCESS_KEY", "key-1").env("HATCH_CA", &api.ca_file);
    if verbose {
        cmd.arg("-v");
    }
    cmd.args(["exec", "--instance", INSTANCE, "--", "true"]);
    run(cmd)
}

#[test]
fn every_start_session_error_code_gives_its_exit_code_and_message() {
    let home = tempfile::tempdir().unwrap();
    let table: &[(&str, u16, i32, &str)] = &[
        (
            "AccessDenied",
            403,
            77,
            "hatch: AccessDenied: your policy does not allow hatch:StartSession on \
             i-0123456789abcdef; ask an administrator\n",
        ),
        ("SessionManagerDisabled", 403, 77, "ask the account owner to turn it on"),
        ("InstanceNotFound", 404, 68, "no instance i-0123456789abcdef is visible to you"),
        (
            "TargetNotConnected",
            409,
            69,
            "hatch: TargetNotConnected: agent on i-0123456789abcdef last seen 10 min ago; is \
             hatch-agent running and can it reach the relay?\n",
        ),
        ("InvalidToken", 401, 77, "did not accept the access key"),
        ("TokenExpired", 401, 75, "expired"),
        ("TokenAlreadyUsed", 409, 75, "already used"),
        ("Throttled", 429, 75, "wait and try again"),
        ("InvalidRequest", 400, 64, "the relay rejected the request: relay words"),
        ("NotFound", 404, 76, "does not know this API path"),
        ("InternalError", 500, 70, "the relay failed (relay words)"),
    ];
    for &(code, status, want_exit, want) in table {
        let api = TestApi::start(error(code, status));
        let out = exec(&api, home.path(), false);
        assert_eq!(out.status.code(), Some(want_exit), "{code}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{code}: {}", stderr(&out));
        assert!(!stderr(&out).contains("req-42"), "request id only with -v");
        assert!(stdout(&out).is_empty());
        let seen = api.seen();
        assert_eq!(seen[0].method, "POST");
        assert_eq!(seen[0].path, "/v1/sessions");
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer key-1"));
        let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
        assert_eq!(
            body,
            json!({"instance_id": INSTANCE, "mode": "exec", "command": ["true"], "tty": false})
        );
    }
}

#[test]
fn verbose_shows_the_exchange_and_the_request_id() {
    let home = tempfile::tempdir().unwrap();
    let api = TestApi::start(error("AccessDenied", 403));
    let out = exec(&api, home.path(), true);
    assert_eq!(out.status.code(), Some(77));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("hatch: POST {}/v1/sessions -> 403 Forbidden in ", api.url)),
        "{err}"
    );
    assert!(err.contains("request id req-test-1"), "{err}");
    assert!(err.contains("[request id req-42]"), "{err}");
}

#[test]
fn an_untrusted_certificate_is_named() {
    let home = tempfile::tempdir().unwrap();
    let api = TestApi::start(error("AccessDenied", 403));
    // No HATCH_CA: the web's roots do not include the development CA.
    let mut cmd = hatch(home.path());
    cmd.env("HATCH_API", &api.url).env("HATCH_ACCESS_KEY", "k").arg("instances");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).contains(&format!(
            "hatch: TLS: cannot verify {}: the relay's certificate is signed by a CA that is not \
             trusted (unknown issuer)",
            api.url
        )),
        "{}",
        stderr(&out)
    );
    assert!(api.seen().is_empty(), "no request may be sent over an unverified connection");
}

#[test]
fn a_certificate_for_another_name_is_named() {
    let home = tempfile::tempdir().unwrap();
    // The development certificate names localhost, 127.0.0.1 and ::1, not 127.0.0.2.
    let api = TestApi::start_on("127.0.0.2:0", error("AccessDenied", 403));
    let out = call(&api, home.path(), &["instances"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(stderr(&out).contains("not valid for this host name"), "{}", stderr(&out));
}

#[test]
fn connection_refused_names_the_url() {
    let home = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = hatch(home.path());
    cmd.env("HATCH_API", format!("https://127.0.0.1:{port}"))
        .env("HATCH_ACCESS_KEY", "k")
        .args(["sessions"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        stderr(&out).starts_with(&format!(
            "hatch: ConnectionFailed: cannot connect to https://127.0.0.1:{port}: Connection refused"
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_server_that_is_not_hatch_is_a_protocol_error() {
    let home = tempfile::tempdir().unwrap();
    let api = TestApi::start(Arc::new(|_, _| (502, json!("<html>bad gateway</html>"))));
    let out = call(&api, home.path(), &["instances"]);
    assert_eq!(out.status.code(), Some(76), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HTTP 502 Bad Gateway without a Hatch error body"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn data_plane_refusal_gives_its_code() {
    // The API starts the session; the stream URL's upgrade is refused with TokenExpired.
    let home = tempfile::tempdir().unwrap();
    let url = Arc::new(std::sync::Mutex::new(String::new()));
    let url2 = url.clone();
    let api = TestApi::start(Arc::new(move |method, path| match (method, path) {
        ("POST", "/v1/sessions") => (
            201,
            json!({"session_id": "s-00000000000000aa",
                   "stream_url": format!("{}/v1/stream/s-00000000000000aa?role=client",
                                         url2.lock().unwrap().replace("https", "wss")),
                   "token": "tok", "expires_at": "2030-01-01T00:00:00Z"}),
        ),
        _ => (401, json!({"code": "TokenExpired", "message": "token expired"})),
    }));
    *url.lock().unwrap() = api.url.clone();
    let out = exec(&api, home.path(), false);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    // stderr is a pipe and there is no -v: no start line, the error alone.
    assert!(err.starts_with("hatch: TokenExpired"), "{err}");
    assert!(err.contains("hatch: TokenExpired: the session token expired"), "{err}");
    let seen = api.seen();
    assert_eq!(seen[1].method, "GET");
    assert_eq!(seen[1].path, "/v1/stream/s-00000000000000aa?role=client");
    assert_eq!(seen[1].authorization.as_deref(), Some("Bearer tok"));
}

#[test]
fn lists_print_tables_and_json() {
    let home = tempfile::tempdir().unwrap();
    let api = TestApi::start(Arc::new(|method, path| match (method, path) {
        ("GET", "/v1/sessions?state=active") => (
            200,
            json!({"sessions": [{"session_id": "s-00000000000000aa", "instance_id": INSTANCE,
                "principal": "owner", "source_ip": "127.0.0.1", "mode": "shell",
                "state": "connected", "created_at": "2020-01-01T00:00:00Z",
                "bytes_client_to_agent": 1, "bytes_agent_to_client": 2}]}),
        ),
        ("GET", "/v1/sessions/s-00000000000000aa") => (
            200,
            json!({"session_id": "s-00000000000000aa", "state": "closed", "close_reason": "exit"}),
        ),
        ("DELETE", "/v1/sessions/s-00000000000000aa") => {
            (200, json!({"session_id": "s-00000000000000aa"}))
        }
        ("DELETE", _) => (404, json!({"code": "SessionNotFound", "message": "no such session"})),
        ("GET", "/v1/instances") => (
            200,
            json!({"instances": [{"instance_id": INSTANCE, "region": "local", "hostname": "web-1",
                "tags": {"env": "dev"}, "online": true, "last_seen": "2020-01-01T00:00:00Z"}]}),
        ),
        _ => (404, json!({"code": "NotFound", "message": "no route"})),
    }));
    let go = |args: &[&str]| call(&api, home.path(), args);

    let out = go(&["sessions", "--active"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("SESSION             INSTANCE            STATE      MODE"),
        "{table}"
    );
    assert!(
        lines[1]
            .starts_with("s-00000000000000aa  i-0123456789abcdef  connected  shell  -       owner"),
        "{table}"
    );

    let out = go(&["sessions", "--active", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sessions"][0]["session_id"], "s-00000000000000aa");

    let out = go(&["sessions", "show", "s-00000000000000aa"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "close_reason  exit\nsession_id    s-00000000000000aa\nstate         closed\n"
    );

    let out = go(&["terminate", "s-00000000000000aa"]);
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(0), "Terminated session s-00000000000000aa\n")
    );
    let out = go(&["terminate", "s-00000000000000bb"]);
    assert_eq!(out.status.code(), Some(68));
    assert!(
        stderr(&out).contains("SessionNotFound: no session s-00000000000000bb is visible to you"),
        "{}",
        stderr(&out)
    );

    let out = go(&["instances"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("INSTANCE            HOSTNAME  STATUS  LAST SEEN"), "{table}");
    assert!(table.contains("i-0123456789abcdef  web-1     online  "), "{table}");
    assert!(table.trim_end().ends_with("local   env=dev"), "{table}");

    let out = go(&["instances", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["instances"][0]["hostname"], "web-1");

    let out = go(&["sessions", "show", "../v1/instances"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(!api.seen().iter().any(|r| r.path.contains("..")), "a path escaped the session id");
}

#[test]
fn sessions_all_follows_every_page() {
    let home = tempfile::tempdir().unwrap();
    let row = |id: &str| json!({"session_id": id, "instance_id": INSTANCE, "state": "closed"});
    let api = TestApi::start(Arc::new(move |_, path| match path {
        "/v1/sessions?state=closed&limit=1" => (
            200,
            json!({"sessions": [row("s-0000000000000003")], "next_token": "s-0000000000000003"}),
        ),
        "/v1/sessions?state=closed&limit=1&next_token=s-0000000000000003" => (
            200,
            json!({"sessions": [row("s-0000000000000002")], "next_token": "s-0000000000000002"}),
        ),
        "/v1/sessions?state=closed&limit=1&next_token=s-0000000000000002" => {
            (200, json!({"sessions": [row("s-0000000000000001")]}))
        }
        _ => (400, json!({"code": "InvalidRequest", "message": path})),
    }));
    let go = |args: &[&str]| call(&api, home.path(), args);
    let out = go(&["sessions", "--closed", "--limit", "1", "--all", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["s-0000000000000003", "s-0000000000000002", "s-0000000000000001"]);

    // Without --all: the first page and a hint.
    let out = go(&["sessions", "--closed", "--limit", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
    assert!(stderr(&out).contains("run with --all"), "{}", stderr(&out));
}

#[test]
fn target_not_connected_without_last_seen_asks_the_instance_list() {
    let home = tempfile::tempdir().unwrap();
    let instances = error("AccessDenied", 403);
    let api = TestApi::start(Arc::new(move |method, path| {
        if method == "POST" {
            return (409, json!({"code": "TargetNotConnected", "message": "offline"}));
        }
        instances(method, path)
    }));
    let out = exec(&api, home.path(), false);
    assert_eq!(out.status.code(), Some(69));
    assert!(
        stderr(&out).contains("agent on i-0123456789abcdef last seen 3 min ago"),
        "{}",
        stderr(&out)
    );
    assert_eq!(api.seen()[1].path, "/v1/instances");
}
