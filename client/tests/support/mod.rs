//! A real HTTPS server on 127.0.0.x port 0 (hyper over tokio-rustls with the development PKI of
//! `hatch_relay::certs`) that answers the API requests of the tests as the test says, and
//! records what the client sent. It stands in for the control plane only where a test needs an
//! answer the real relay cannot be made to give on demand (every error code); TLS, TCP and HTTP
//! are all real.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// The answer function: (method, path and query) → (status, JSON body).
pub type Handler = Arc<dyn Fn(&str, &str) -> (u16, Value) + Send + Sync>;

pub struct TestApi {
    pub addr: SocketAddr,
    pub url: String,
    pub ca_file: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestApi {
    pub fn start(handler: Handler) -> TestApi {
        Self::start_on("127.0.0.1:0", handler)
    }

    pub fn start_on(bind: &str, handler: Handler) -> TestApi {
        let dir = tempfile::tempdir().unwrap();
        let pki = hatch_relay::certs::ensure_dev_pki(&dir.path().join("pki"), &[]).unwrap();
        let tls = hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"])
            .unwrap();
        let listener = std::net::TcpListener::bind(bind).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let seen2 = seen.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                loop {
                    let (tcp, _) = tokio::select! {
                        r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
                        _ = &mut stopped => return,
                    };
                    let acceptor = acceptor.clone();
                    let handler = handler.clone();
                    let seen = seen2.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let handler = handler.clone();
                            let seen = seen.clone();
                            async move {
                                use http_body_util::BodyExt;
                                let method = req.method().to_string();
                                let path = req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.as_str().to_owned())
                                    .unwrap_or_default();
                                let authorization = req
                                    .headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned);
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().to_vec())
                                    .unwrap_or_default();
                                seen.lock().unwrap().push(Seen {
                                    method: method.clone(),
                                    path: path.clone(),
                                    authorization,
                                    body,
                                });
                                let (status, json) = handler(&method, &path);
                                let resp = Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .header("x-request-id", "req-test-1")
                                    .body(Full::new(Bytes::from(json.to_string())))
                                    .unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .with_upgrades()
                            .await;
                    });
                }
            });
        });
        TestApi {
            addr,
            url: format!("https://{addr}"),
            ca_file: pki.ca_file,
            seen,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The real `hatch` binary with a clean environment: HOME in `home`, no HATCH_* variables.
pub fn hatch(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hatch"));
    cmd.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    cmd
}

/// Runs with a deadline: a hang fails the test instead of blocking it. Output is collected
/// while the command runs (a full pipe must not stall it).
pub fn run(mut cmd: Command) -> Output {
    use std::time::{Duration, Instant};
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            // Kill exactly the child this test started, by its id.
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            let out = waiter.join().unwrap();
            panic!("hatch did not exit in 60 s; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
