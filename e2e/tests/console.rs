//! The browser console (docs/CONSOLE.md) against the real `hatch-relay dev`, a real
//! `hatch-agent` and, for the browser tests, a real headless Chromium (Debian's `chromium`,
//! driven over the DevTools protocol by `hatch_e2e::cdp`): what a person sees in the page
//! (the terminal's buffer, the status line, the lists), and what the relay answers to requests
//! a page of another site, or a script without the cookie, could make.
//!
//! `HATCH_CONSOLE_SCREENSHOT=docs/console.png` saves the screenshot of the console with a live
//! terminal that docs/CONSOLE.md shows.

use std::time::Duration;

use hatch_e2e::cdp::{Browser, Page};
use hatch_e2e::*;
use serde_json::{Value, json};

/// A key of the right shape that the relay never issued.
const WRONG_KEY: &str = "hatch_ak_00000000000000ff_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// A JavaScript string literal of `s`.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Types `key` into the login form and submits it, as a person would.
async fn submit_login(b: &mut Browser, page: &Page, key: &str) {
    b.wait_for(page, "the login form", "document.getElementById('login-view').checkVisibility()")
        .await;
    let expr = format!(
        "(() => {{ const f = document.getElementById('access-key'); f.focus(); \
         f.value = {}; document.getElementById('login-form').requestSubmit(); return true; }})()",
        js(key)
    );
    b.eval(page, &expr).await.unwrap();
}

/// The text of the page's notice line.
const NOTICE: &str = "document.getElementById('notice').textContent";

/// Focuses the terminal, types `line` and Enter into it.
async fn type_line(b: &mut Browser, page: &Page, line: &str) {
    b.eval(page, "document.querySelector('#terminal .xterm-helper-textarea').focus()")
        .await
        .unwrap();
    b.insert_text(page, line).await;
    b.press_enter(page).await;
}

/// Waits until a line of the terminal's buffer, trimmed, is exactly `want`.
async fn wait_line(b: &mut Browser, page: &Page, want: &str) {
    let expr = format!("window.hatchConsole.lines().some(l => l.trim() === {})", js(want));
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        if b.eval(page, &expr).await == Ok(Value::Bool(true)) {
            return;
        }
        if std::time::Instant::now() > end {
            let lines = b.eval(page, "window.hatchConsole.lines().join('\\n')").await;
            panic!("no terminal line {want:?} within {DEADLINE:?}; the terminal shows:\n{lines:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The terminal's size as the page has it: (cols, rows).
async fn term_size(b: &mut Browser, page: &Page) -> (u64, u64) {
    let v = b.eval(page, "window.hatchConsole.size()").await.unwrap();
    (v["cols"].as_u64().unwrap(), v["rows"].as_u64().unwrap())
}

/// Waits until the terminal's WebSocket is open and the shell has printed something.
async fn wait_live(b: &mut Browser, page: &Page) {
    b.wait_for(
        page,
        "the terminal to connect",
        "document.getElementById('term-status').textContent === 'connected'",
    )
    .await;
    b.wait_for(
        page,
        "the shell's first output",
        "window.hatchConsole.lines().some(l => l.trim() !== '')",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_logs_in_opens_a_terminal_follows_resizes_and_shows_the_exit_status() {
    let (relay, _agent, iid, _dir) = relay_and_agent(&[]).await;
    admin(&relay, &["instances", "tag", &iid, "env=dev", "team=web"]);
    let mut b = Browser::launch(1280, 860).await;
    let page = b.page().await;
    let console = format!("{}/console/", relay.info.api_url);
    b.navigate(&page, &console).await;

    // A wrong key: refused in words, no cookie, still the login form.
    submit_login(&mut b, &page, WRONG_KEY).await;
    let notice = b.wait_value(&page, "the refusal", NOTICE, |v| v != "").await;
    assert!(
        notice.as_str().unwrap().starts_with("InvalidToken: access key not recognised"),
        "{notice}"
    );
    assert!(b.cookies(&page, &console).await.is_empty());
    assert_eq!(
        b.eval(&page, "document.getElementById('app-view').checkVisibility()").await,
        Ok(json!(false))
    );

    // The right key: logged in; the cookie is HttpOnly, Secure, SameSite=Strict and expires;
    // the key is nowhere in the page or its storage.
    let key = relay.info.access_key.clone();
    submit_login(&mut b, &page, &key).await;
    b.wait_for(&page, "the console", "document.getElementById('app-view').checkVisibility()").await;
    let login_shown = "document.getElementById('login-view').checkVisibility()";
    assert_eq!(b.eval(&page, login_shown).await, Ok(json!(false)));
    let cookies = b.cookies(&page, &console).await;
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let c = &cookies[0];
    assert_eq!(c["name"], "__Host-hatch_console");
    assert_eq!(
        (&c["httpOnly"], &c["secure"], &c["sameSite"]),
        (&json!(true), &json!(true), &json!("Strict"))
    );
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let expires = c["expires"].as_f64().unwrap();
    assert!(expires > now + 7.0 * 3600.0 && expires < now + 8.0 * 3600.0 + 60.0, "{c}");
    let leaks = format!(
        "document.documentElement.outerHTML.includes({k}) || localStorage.length + \
         sessionStorage.length > 0 || document.getElementById('access-key').value !== '' \
         || document.cookie.includes('hatch_console')",
        k = js(&key)
    );
    assert_eq!(b.eval(&page, &leaks).await, Ok(json!(false)));

    // The instance is listed online, with its last-seen time.
    let row = format!("document.querySelector('tr[data-instance={}]')", js(&iid));
    b.wait_for(
        &page,
        "the instance online",
        &format!("{row} !== null && {row}.querySelector('.status').textContent === 'online'"),
    )
    .await;
    let cells =
        b.eval(&page, &format!("Array.from({row}.cells).map(c => c.textContent)")).await.unwrap();
    assert_eq!(cells[0], json!(iid));
    assert_ne!(cells[4], json!(""), "last seen: {cells}");
    assert_eq!(cells[5], json!("env=devteam=web"), "tags: {cells}");

    // Open a terminal on it, and use it.
    b.eval(&page, &format!("{row}.querySelector('button.open').click()")).await.unwrap();
    wait_live(&mut b, &page).await;
    type_line(&mut b, &page, "echo $((6*7))").await;
    wait_line(&mut b, &page, "42").await;

    // The shell's terminal has the size xterm.js fitted to the window...
    let (cols, rows) = term_size(&mut b, &page).await;
    type_line(&mut b, &page, "stty size").await;
    wait_line(&mut b, &page, &format!("{rows} {cols}")).await;
    // ...and follows the window when it is made smaller.
    b.resize_window(&page, 900, 640).await;
    let (cols2, rows2) = {
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            let s = term_size(&mut b, &page).await;
            if s != (cols, rows) {
                break s;
            }
            assert!(std::time::Instant::now() < end, "the terminal kept {cols}x{rows}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(cols2 < cols && rows2 < rows, "{cols}x{rows} -> {cols2}x{rows2}");
    type_line(&mut b, &page, "stty size").await;
    wait_line(&mut b, &page, &format!("{rows2} {cols2}")).await;

    // The session is in the list, as active.
    let sid = b.eval(&page, "window.hatchConsole.sessionId()").await.unwrap();
    let sid = sid.as_str().unwrap().to_owned();
    let srow = format!("document.querySelector('tr[data-session={}]')", js(&sid));
    b.wait_for(&page, "the session listed", &format!("{srow} !== null")).await;

    // The screenshot of docs/CONSOLE.md: back at the full size, a few commands in.
    b.resize_window(&page, 1280, 860).await;
    b.wait_value(&page, "the terminal to grow back", "window.hatchConsole.size().cols", |v| {
        v.as_u64() == Some(cols)
    })
    .await;
    type_line(&mut b, &page, "uname -sr; id -un; stty size").await;
    wait_line(&mut b, &page, &format!("{rows} {cols}")).await;
    if let Some(path) = std::env::var_os("HATCH_CONSOLE_SCREENSHOT") {
        tokio::time::sleep(Duration::from_millis(300)).await; // the cursor's blink and paint
        std::fs::write(&path, b.screenshot(&page).await).unwrap();
    }

    // `exit 5`: the page says so, and the record says exit.
    type_line(&mut b, &page, "exit 5").await;
    b.wait_for(
        &page,
        "the exit status",
        "document.getElementById('term-status').textContent === 'process exited with status 5'",
    )
    .await;
    wait_line(&mut b, &page, "[process exited with status 5]").await;
    let rec = relay.closed_session(&sid).await;
    assert_eq!(rec["close_reason"], "exit", "{rec}");
    assert_eq!(rec["principal"], "owner");
    b.wait_for(&page, "the session gone from the active list", &format!("{srow} === null")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_link_works_once_and_only_once() {
    let (relay, _agent, iid, dir) = relay_and_agent(&[]).await;
    let console_link = |args: &[&str]| {
        let out = hatch(&relay, dir.path(), &relay.info.access_key)
            .arg("console")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "hatch console: {stderr}");
        assert!(stderr.contains("it works once"), "{stderr}");
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let prefix = format!("{}/console/#link=", relay.info.api_url);
        assert!(url.starts_with(&prefix), "{url}");
        url
    };
    let mut b = Browser::launch(1100, 760).await;
    let page = b.page().await;

    // `hatch console -i I`: the link lands on a live terminal on I, logged in.
    let url = console_link(&["-i", &iid]);
    b.navigate(&page, &url).await;
    wait_live(&mut b, &page).await;
    assert_eq!(
        b.eval(&page, "location.hash").await,
        Ok(json!("")),
        "the code leaves the address bar"
    );
    let title = b.eval(&page, "document.getElementById('term-title').textContent").await.unwrap();
    assert!(title.as_str().unwrap().starts_with(&iid), "{title}");
    type_line(&mut b, &page, "echo link-$((40+2))").await;
    wait_line(&mut b, &page, "link-42").await;
    assert_eq!(b.cookies(&page, &url).await.len(), 1);

    // "Terminate" in the sessions list ends it; the terminal says why, in words.
    let sid = b.eval(&page, "window.hatchConsole.sessionId()").await.unwrap();
    let srow = format!("document.querySelector('tr[data-session={}]')", js(sid.as_str().unwrap()));
    b.wait_for(&page, "the session listed", &format!("{srow} !== null")).await;
    b.eval(&page, &format!("{srow}.querySelector('button.terminate').click()")).await.unwrap();
    let status = b
        .wait_value(&page, "the close", "document.getElementById('term-status').textContent", |v| {
            v.as_str().is_some_and(|t| t.starts_with("session closed"))
        })
        .await;
    assert_eq!(status, "session closed: terminated through the API (4006)");
    assert_eq!(relay.closed_session(sid.as_str().unwrap()).await["close_reason"], "terminated");

    // The same link again, in a browser without the cookie: refused, not logged in.
    b.clear_cookies(&page).await;
    b.navigate(&page, "about:blank").await;
    b.navigate(&page, &url).await;
    let notice = b.wait_value(&page, "the refusal", NOTICE, |v| v != "").await;
    let notice = notice.as_str().unwrap();
    assert!(
        notice.starts_with("InvalidToken: this login link is unknown, was used already"),
        "{notice}"
    );
    let shown = "[document.getElementById('login-view').checkVisibility(), \
                 document.getElementById('app-view').checkVisibility()]";
    assert_eq!(b.eval(&page, shown).await, Ok(json!([true, false])), "login shown, console not");
    assert!(b.cookies(&page, &url).await.is_empty());

    // Spent for any client, not only for that browser.
    let code = url.split("#link=").nth(1).unwrap();
    let body = json!({"code": code}).to_string();
    let r = relay.call_with("POST", "/console/api/link", &[("Origin", OWN)], Some(&body)).await;
    assert_eq!((r.status, r.json()["code"].clone()), (401, json!("InvalidToken")), "{}", r.text);

    // `hatch console` without -i: logged in, no terminal opened.
    let url = console_link(&[]);
    b.navigate(&page, &url).await;
    b.wait_for(&page, "the console", "document.getElementById('app-view').checkVisibility()").await;
    let shown = "[document.getElementById('login-view').checkVisibility(), \
                 document.getElementById('terminal-view').checkVisibility()]";
    assert_eq!(b.eval(&page, shown).await, Ok(json!([false, false])), "no login, no terminal");

    // --open hands the link to $BROWSER (here a script that writes down what it was given).
    let opener = dir.path().join("browser.sh");
    let opened = dir.path().join("opened.txt");
    std::fs::write(&opener, format!("#!/bin/sh\nprintf '%s' \"$1\" > {}\n", opened.display()))
        .unwrap();
    let exec = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&opener, exec).unwrap();
    let out = hatch(&relay, dir.path(), &relay.info.access_key)
        .env("BROWSER", &opener)
        .args(["console", "--open"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    wait_for("the browser to be handed the link", DEADLINE, || {
        std::fs::read_to_string(&opened).is_ok_and(|t| t == printed)
    })
    .await;

    // An instance the caller cannot see: no link.
    let out = hatch(&relay, dir.path(), &relay.info.access_key)
        .args(["console", "-i", "i-00000000000000ff"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(68), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("InstanceNotFound"), "{err}");
}

/// Session cookie, CSRF token and Origin of an HTTP-level console client.
struct Cookie {
    cookie: String,
    csrf: String,
}

/// `Origin` of the console as the e2e client reaches it (`Host: localhost`).
const OWN: &str = "https://localhost";

async fn http_login(relay: &Relay, key: &str) -> Cookie {
    let body = json!({"access_key": key}).to_string();
    let r = relay.call_with("POST", "/console/api/login", &[("Origin", OWN)], Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let set = r.header("set-cookie").unwrap().to_owned();
    for attr in ["Path=/", "Max-Age=28800", "Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(set.split("; ").any(|a| a == attr), "{attr} missing: {set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("__Host-hatch_console=") && cookie.len() > 40, "{cookie}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    Cookie { cookie, csrf: r.json()["csrf"].as_str().unwrap().to_owned() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_writes_need_the_cookie_the_csrf_token_and_the_consoles_origin() {
    let (relay, _agent, iid, _dir) = relay_and_agent(&[]).await;

    // The page: a strict CSP, no inline script.
    let r = relay.call_with("GET", "/console/", &[], None).await;
    assert_eq!(r.status, 200);
    let csp = r.header("content-security-policy").unwrap().to_owned();
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        !csp.contains("unsafe-eval") && !csp.contains("script-src 'self' 'unsafe-inline'"),
        "{csp}"
    );
    let data_port = relay.data_addr().port();
    assert!(csp.contains(&format!("connect-src 'self' wss://localhost:{data_port};")), "{csp}");
    assert!(
        r.text.matches("<script").count() == r.text.matches("<script src=").count(),
        "inline script"
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    for asset in ["/console/console.js", "/console/vendor/xterm.js", "/console/vendor/addon-fit.js"]
    {
        let a = relay.call_with("GET", asset, &[], None).await;
        assert_eq!(
            (a.status, a.header("content-type")),
            (200, Some("text/javascript; charset=utf-8")),
            "{asset}"
        );
    }
    assert_eq!(relay.call_with("GET", "/console/vendor/nope.js", &[], None).await.status, 404);

    // Logins: a wrong key, a foreign page, no Origin.
    let key = relay.info.access_key.clone();
    let login = |origin: Option<&'static str>, key: String| {
        let relay = &relay;
        async move {
            let h: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
            let body = json!({"access_key": key}).to_string();
            relay.call_with("POST", "/console/api/login", &h, Some(&body)).await
        }
    };
    let r = login(Some(OWN), WRONG_KEY.into()).await;
    assert_eq!((r.status, r.json()["code"].clone()), (401, json!("InvalidToken")), "{}", r.text);
    assert!(r.header("set-cookie").is_none());
    let r = login(Some("https://evil.example"), key.clone()).await;
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (403, json!("OriginNotAllowed")),
        "{}",
        r.text
    );
    assert!(r.header("set-cookie").is_none());
    let r = login(None, key.clone()).await;
    assert_eq!((r.status, r.json()["code"].clone()), (403, json!("OriginNotAllowed")));

    let c = http_login(&relay, &key).await;
    // An exec of `sleep`, not a shell: these sessions end (terminated) within moments of
    // their start, and a login shell killed inside its start-up files can leave their state
    // half-written (a lock of the host's pyenv left behind once made every later root shell
    // of the machine wait a minute for it).
    let start = json!({"instance_id": iid, "mode": "exec", "command": ["sleep", "60"]}).to_string();
    let post = |headers: Vec<(&'static str, String)>| {
        let relay = &relay;
        let start = start.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            relay.call_with("POST", "/console/api/sessions", &h, Some(&start)).await
        }
    };
    let code = |r: &Resp| (r.status, r.json()["code"].as_str().unwrap_or_default().to_owned());
    let (cookie, csrf, own) = (c.cookie.clone(), c.csrf.clone(), OWN.to_owned());

    // Without the cookie (everything else right): no session.
    let r = post(vec![("Origin", own.clone()), ("x-hatch-csrf", csrf.clone())]).await;
    assert_eq!(code(&r), (401, "InvalidToken".into()), "{}", r.text);
    // A cookie that is not a console session's.
    let r = post(vec![
        ("Cookie", "__Host-hatch_console=forged".into()),
        ("Origin", own.clone()),
        ("x-hatch-csrf", csrf.clone()),
    ])
    .await;
    assert_eq!(code(&r), (401, "InvalidToken".into()));
    // The cookie without the CSRF token, or with another.
    let r = post(vec![("Cookie", cookie.clone()), ("Origin", own.clone())]).await;
    assert_eq!(code(&r), (403, "CsrfTokenMismatch".into()), "{}", r.text);
    let r = post(vec![
        ("Cookie", cookie.clone()),
        ("Origin", own.clone()),
        ("x-hatch-csrf", "0".repeat(32)),
    ])
    .await;
    assert_eq!(code(&r), (403, "CsrfTokenMismatch".into()));
    // The cookie and the token from a page of another origin, or with no Origin.
    let r = post(vec![
        ("Cookie", cookie.clone()),
        ("Origin", "https://evil.example".into()),
        ("x-hatch-csrf", csrf.clone()),
    ])
    .await;
    assert_eq!(code(&r), (403, "OriginNotAllowed".into()));
    let r = post(vec![("Cookie", cookie.clone()), ("x-hatch-csrf", csrf.clone())]).await;
    assert_eq!(code(&r), (403, "OriginNotAllowed".into()));
    // The cookie authenticates nothing under /v1/.
    let r = relay
        .call_with(
            "POST",
            "/v1/sessions",
            &[("Cookie", &cookie), ("Origin", OWN), ("x-hatch-csrf", &csrf)],
            Some(&start),
        )
        .await;
    assert_eq!(code(&r), (401, "InvalidToken".into()));
    assert_eq!(relay.call_with("GET", "/v1/sessions?state=active", &[], None).await.status, 401);
    let active = relay.call("GET", "/v1/sessions?state=active", Some(&key), None).await.json();
    assert_eq!(
        active["sessions"].as_array().unwrap().len(),
        0,
        "a refused write started a session: {active}"
    );

    // Everything right: the API's own answers, through the console's routes.
    let r = post(vec![
        ("Cookie", cookie.clone()),
        ("Origin", own.clone()),
        ("x-hatch-csrf", csrf.clone()),
    ])
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    let ro = |path: String| {
        let relay = &relay;
        let cookie = cookie.clone();
        async move { relay.call_with("GET", &path, &[("Cookie", &cookie)], None).await }
    };
    let list = ro("/console/api/instances".into()).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["instances"][0]["instance_id"], json!(iid));
    let listed = ro("/console/api/sessions?state=active".into()).await.json();
    assert_eq!(listed["sessions"][0]["session_id"], json!(sid), "{listed}");
    let del = relay
        .call_with(
            "DELETE",
            &format!("/console/api/sessions/{sid}"),
            &[("Cookie", &cookie), ("Origin", OWN)],
            None,
        )
        .await;
    assert_eq!(code(&del), (403, "CsrfTokenMismatch".into()), "a terminate is a write too");
    let del = relay
        .call_with(
            "DELETE",
            &format!("/console/api/sessions/{sid}"),
            &[("Cookie", &cookie), ("Origin", OWN), ("x-hatch-csrf", &csrf)],
            None,
        )
        .await;
    assert_eq!(del.status, 200, "{}", del.text);
    assert_eq!(relay.closed_session(&sid).await["close_reason"], "terminated");

    // After a reload the page asks who it is and gets the token again; after logout, nothing.
    let me = ro("/console/api/me".into()).await;
    assert_eq!((me.status, me.json()["csrf"].clone()), (200, json!(csrf)));
    let out = relay
        .call_with(
            "POST",
            "/console/api/logout",
            &[("Cookie", &cookie), ("Origin", OWN), ("x-hatch-csrf", &csrf)],
            None,
        )
        .await;
    assert_eq!(out.status, 204);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(code(&ro("/console/api/me".into()).await), (401, "InvalidToken".into()));

    // A user's console session ends with the user's key.
    let account = relay.info.account_id.clone();
    admin(&relay, &["users", "create", "--account", &account, "carol"]);
    let k = admin(&relay, &["keys", "create", "--account", &account, "--user", "carol"]);
    let (ukey, kid) = (k["access_key"].as_str().unwrap(), k["key_id"].as_str().unwrap());
    let u = http_login(&relay, ukey).await;
    let r = relay.call_with("GET", "/console/api/me", &[("Cookie", &u.cookie)], None).await;
    assert_eq!(
        (r.status, r.json()["principal"].as_str().map(|p| p.starts_with("u-"))),
        (200, Some(true))
    );
    admin(&relay, &["keys", "revoke", kid]);
    let r = relay.call_with("GET", "/console/api/instances", &[("Cookie", &u.cookie)], None).await;
    assert_eq!(code(&r), (401, "InvalidToken".into()), "{}", r.text);
}

/// A site of its own on loopback (`http://127.0.0.1:PORT/`) that serves one page to anyone,
/// for the browser to be on another origin than the console; it lives as long as the test's
/// runtime.
async fn another_site() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    tokio::spawn(async move {
        const PAGE: &str = "<!doctype html><title>elsewhere</title><p>another site</p>";
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(DEADLINE, s.read(&mut buf)).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{PAGE}",
                    PAGE.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_upgrade_from_a_page_of_a_foreign_origin_is_refused() {
    let (relay, _agent, iid, _dir) = relay_and_agent(&[]).await;
    // A `sleep`, not a shell: the legs opened here are dropped at once, and a login shell
    // killed inside its start-up files can leave the host's state half-written.
    let start = json!({"instance_id": iid, "mode": "exec", "command": ["sleep", "60"]}).to_string();
    let r = relay.call("POST", "/v1/sessions", Some(&relay.info.access_key), Some(&start)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let (url, token) = (
        r.json()["stream_url"].as_str().unwrap().to_owned(),
        r.json()["token"].as_str().unwrap().to_owned(),
    );
    let proto = format!("hatch.v1, bearer.{token}");

    // A real browser on a page of another origin: another site on this host.
    let elsewhere = another_site().await;
    let mut b = Browser::launch(800, 600).await;
    let page = b.page().await;
    b.navigate(&page, &elsewhere).await;
    let probe = format!(
        "new Promise(done => {{ const ws = new WebSocket({u}, ['hatch.v1', {t}]); \
         let opened = false; ws.onopen = () => {{ opened = true; ws.close(); }}; \
         ws.onclose = (e) => done({{ opened, code: e.code }}); }})",
        u = js(&url),
        t = js(&format!("bearer.{token}"))
    );
    let got = b.eval(&page, &probe).await.unwrap();
    assert_eq!(got, json!({"opened": false, "code": 1006}), "the browser's view of the refusal");
    wait_for("the refusal in the relay's log", DEADLINE, || {
        relay.proc.output().contains("stream upgrade from a page of a foreign origin refused")
    })
    .await;
    let logged = format!("origin=\"{}\"", elsewhere.trim_end_matches('/'));
    assert!(relay.proc.output().contains(&logged), "{logged}: {}", relay.proc.output());

    // The same refusal by hand: status and code; other origins likewise.
    for origin in ["https://evil.example", "null", "https://localhost:1"] {
        let r = dial(&relay, &url, &[("origin", origin), ("sec-websocket-protocol", &proto)]).await;
        assert_eq!(r.err(), Some((403, "OriginNotAllowed".to_owned())), "{origin}");
    }
    // The token was not spent by the refusals: a client that is not a browser (no Origin)
    // opens the leg with it.
    let api_port = relay.api_addr().port();
    let leg = dial(&relay, &url, &[("sec-websocket-protocol", &proto)]).await;
    assert!(leg.is_ok(), "{:?}", leg.err());
    drop(leg);

    // The console's own origin may: a new session's leg with the API's origin opens.
    let r = relay.call("POST", "/v1/sessions", Some(&relay.info.access_key), Some(&start)).await;
    let (url, token) = (
        r.json()["stream_url"].as_str().unwrap().to_owned(),
        r.json()["token"].as_str().unwrap().to_owned(),
    );
    let own = format!("https://localhost:{api_port}");
    let proto = format!("hatch.v1, bearer.{token}");
    let leg = dial(&relay, &url, &[("origin", &own), ("sec-websocket-protocol", &proto)]).await;
    assert!(leg.is_ok(), "{:?}", leg.err());
}
