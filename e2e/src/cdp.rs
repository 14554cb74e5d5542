//! A small client of the Chrome DevTools Protocol, to drive a real headless Chromium (Debian's
//! `chromium` package, which `scripts/test` installs) in the browser console's tests.
//!
//! [`Browser::launch`] starts `chromium --headless` with a new, empty profile directory and
//! `--remote-debugging-port=0`, reads the port it chose from the profile's `DevToolsActivePort`
//! file, and connects to its browser endpoint over a plain WebSocket on loopback. A [`Page`]
//! is a tab attached in flat mode: its commands carry the session id on the same socket.
//! Commands are sent one at a time and answered in order; events are not used (each wait polls
//! the page with [`Page::eval`] under a deadline). The process is killed when the browser drops.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::DEADLINE;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Most events kept while waiting for a command's answer (they are not read; this bounds them).
const MAX_EVENTS: usize = 256;

/// The Chromium binary: `$HATCH_CHROMIUM`, else Debian's `chromium` on the `PATH`.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HATCH_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("chromium")).find(|p| p.is_file())
}

/// A headless Chromium process and its DevTools connection.
pub struct Browser {
    child: Child,
    socket: Socket,
    next_id: u64,
    events: VecDeque<Value>,
    /// The profile directory (removed with the browser).
    _profile: tempfile::TempDir,
    log: PathBuf,
}

/// A tab of the browser, attached in flat mode.
pub struct Page {
    session: String,
    target: String,
}

impl Browser {
    /// Starts headless Chromium with `width`×`height` windows and connects to it. Panics (the
    /// test fails) when no `chromium` is installed or it does not come up within [`DEADLINE`].
    pub async fn launch(width: u32, height: u32) -> Browser {
        let bin = chromium().expect(
            "no chromium on the PATH: scripts/test installs Debian's chromium package \
             (apt-get install chromium), or set HATCH_CHROMIUM",
        );
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--ignore-certificate-errors",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut browser_child = Some(child);
        let port_file = profile.path().join("DevToolsActivePort");
        let end = Instant::now() + DEADLINE;
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            let c = browser_child.as_mut().unwrap();
            if let Some(st) = c.try_wait().unwrap() {
                panic!("chromium exited ({st}):\n{}", std::fs::read_to_string(&log).unwrap());
            }
            assert!(Instant::now() < end, "chromium did not start:\n{}", read(&log));
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (socket, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(&url))
            .await
            .expect("DevTools connect timed out")
            .expect("DevTools connect");
        Browser {
            child: browser_child.take().unwrap(),
            socket,
            next_id: 1,
            events: VecDeque::new(),
            _profile: profile,
            log,
        }
    }

    /// What Chromium wrote on stdout and stderr.
    pub fn log(&self) -> String {
        read(&self.log)
    }

    /// One DevTools command (on a page's session when `session` is given); its `result`, or
    /// the protocol's `error` object as `Err`.
    pub async fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s.to_owned());
        }
        let send = self.socket.send(Message::text(msg.to_string()));
        tokio::time::timeout(DEADLINE, send).await.expect("DevTools send timed out").unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools {method}: no answer within {DEADLINE:?}"));
            let text = match next {
                Some(Ok(Message::Text(t))) => t.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("DevTools connection ended during {method}: {other:?}"),
            };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                return match v.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
            if self.events.len() == MAX_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(v);
        }
    }

    /// A new tab at `about:blank`, attached.
    pub async fn page(&mut self) -> Page {
        let t = self.call(None, "Target.createTarget", json!({"url": "about:blank"})).await;
        let target = t.unwrap()["targetId"].as_str().unwrap().to_owned();
        let a = self
            .call(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true}))
            .await;
        let session = a.unwrap()["sessionId"].as_str().unwrap().to_owned();
        let page = Page { session, target };
        self.on(&page, "Page.enable", json!({})).await.unwrap();
        self.on(&page, "Runtime.enable", json!({})).await.unwrap();
        page
    }

    /// A command on `page`.
    pub async fn on(&mut self, page: &Page, method: &str, params: Value) -> Result<Value, Value> {
        let s = page.session.clone();
        self.call(Some(&s), method, params).await
    }

    /// Loads `url` in `page` and waits until its document has loaded.
    pub async fn navigate(&mut self, page: &Page, url: &str) {
        let r = self.on(page, "Page.navigate", json!({"url": url})).await.unwrap();
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
        self.wait_for(page, "the page to load", "document.readyState === 'complete'").await;
    }

    /// Evaluates `expr` in `page` (awaiting a promise) and returns its value; a thrown
    /// exception is `Err` with its description.
    pub async fn eval(&mut self, page: &Page, expr: &str) -> Result<Value, String> {
        let r = self
            .on(
                page,
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
            )
            .await
            .map_err(|e| e.to_string())?;
        if let Some(ex) = r.get("exceptionDetails") {
            return Err(ex["exception"]["description"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| ex.to_string()));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` in `page` until it is `true` (at most [`DEADLINE`]).
    pub async fn wait_for(&mut self, page: &Page, what: &str, expr: &str) {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok(Value::Bool(true)) = self.eval(page, expr).await {
                return;
            }
            assert!(Instant::now() < end, "waited {DEADLINE:?} for {what} ({expr})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `expr` until it gives a value `ok` accepts; returns that value.
    pub async fn wait_value(
        &mut self,
        page: &Page,
        what: &str,
        expr: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let v = self.eval(page, expr).await;
            if let Ok(v) = &v
                && ok(v)
            {
                return v.clone();
            }
            assert!(Instant::now() < end, "waited {DEADLINE:?} for {what}; last: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types `text` into the focused element, as a keyboard's input method would.
    pub async fn insert_text(&mut self, page: &Page, text: &str) {
        self.on(page, "Input.insertText", json!({"text": text})).await.unwrap();
    }

    /// Presses and releases Enter in the focused element.
    pub async fn press_enter(&mut self, page: &Page) {
        for kind in ["keyDown", "keyUp"] {
            let mut p = json!({"type": kind, "key": "Enter", "code": "Enter",
                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13});
            if kind == "keyDown" {
                p["text"] = Value::String("\r".into());
            }
            self.on(page, "Input.dispatchKeyEvent", p).await.unwrap();
        }
    }

    /// Sets the size of the window `page` is in, as a person dragging its corner would.
    pub async fn resize_window(&mut self, page: &Page, width: u32, height: u32) {
        let target = page.target.clone();
        let w = self.call(None, "Browser.getWindowForTarget", json!({"targetId": target})).await;
        let id = w.unwrap()["windowId"].clone();
        let bounds = json!({"width": width, "height": height, "windowState": "normal"});
        self.call(None, "Browser.setWindowBounds", json!({"windowId": id, "bounds": bounds}))
            .await
            .unwrap();
    }

    /// A PNG screenshot of what `page` shows.
    pub async fn screenshot(&mut self, page: &Page) -> Vec<u8> {
        use base64::Engine;
        let r = self.on(page, "Page.captureScreenshot", json!({"format": "png"})).await.unwrap();
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap()
    }

    /// The browser's cookies for `url` (`Network.getCookies` on a page).
    pub async fn cookies(&mut self, page: &Page, url: &str) -> Vec<Value> {
        let r = self.on(page, "Network.getCookies", json!({"urls": [url]})).await.unwrap();
        r["cookies"].as_array().cloned().unwrap_or_default()
    }

    /// Forgets every cookie of the browser (a new browser profile, as far as the relay sees).
    pub async fn clear_cookies(&mut self, page: &Page) {
        self.on(page, "Network.clearBrowserCookies", json!({})).await.unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
