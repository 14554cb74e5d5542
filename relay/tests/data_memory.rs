//! Measurement, not a check (ignored by default): relay RSS per idle paired session, with the
//! relay in its own process so client memory does not count.
//!
//! `cargo test -p hatch-relay --test data_memory -- --ignored --nocapture`
//! (HATCH_MEM_SESSIONS, default 500; HATCH_MEM_IO=epoll|uring; HATCH_MEM_PLAIN=1 for plain WS)

mod data_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use data_support::*;
use futures_util::SinkExt;
use hatch_proto::token::Role;
use hatch_relay::data::{DataConfig, DataPlane, IoBackend};
use hatch_relay::token::{TokenSigner, TokenVerifier};

fn backend() -> IoBackend {
    match std::env::var("HATCH_MEM_IO").as_deref() {
        Ok("uring") => IoBackend::Uring,
        _ => IoBackend::Epoll,
    }
}

/// The relay process of the measurement (runs only when started by it).
#[test]
#[ignore]
fn relay_child() {
    let Ok(dir) = std::env::var("HATCH_MEM_CHILD") else { return };
    let dir = std::path::PathBuf::from(dir);
    let pki = hatch_relay::certs::ensure_dev_pki(&dir, &[]).unwrap();
    let tls = std::env::var("HATCH_MEM_PLAIN").is_err().then(|| {
        hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"]).unwrap()
    });
    let key = hex::decode(std::env::var("HATCH_MEM_KEY").unwrap()).unwrap();
    let signer = TokenSigner::from_pkcs8("k1", &key).unwrap();
    let mut cfg = DataConfig::new("127.0.0.1:0".parse().unwrap(), tls);
    cfg.io = backend();
    cfg.shards = 1;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The parent signs the tokens: accept its run, as a relay accepts its own control plane's.
    let mut verifier = TokenVerifier::for_signer(&signer);
    verifier.only_run(&std::env::var("HATCH_MEM_RUN").unwrap());
    let plane = DataPlane::start(cfg, verifier, tx).unwrap();
    std::fs::write(dir.join("addr.tmp"), plane.local_addr().to_string()).unwrap();
    std::fs::rename(dir.join("addr.tmp"), dir.join("addr")).unwrap();
    std::thread::spawn(move || while rx.blocking_recv().is_some() {});
    // Run until the parent closes our stdin.
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
    drop(plane);
}

fn rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test]
#[ignore]
async fn idle_rss_per_session() {
    let n: usize =
        std::env::var("HATCH_MEM_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    let pki = hatch_relay::certs::ensure_dev_pki(dir.path(), &[]).unwrap();
    let (signer, pkcs8) = TokenSigner::generate("k1").unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "relay_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("HATCH_MEM_CHILD", dir.path())
        .env("HATCH_MEM_KEY", hex::encode(&pkcs8))
        .env("HATCH_MEM_RUN", signer.run())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let addr: std::net::SocketAddr = loop {
        if let Ok(a) = std::fs::read_to_string(dir.path().join("addr")) {
            break a.parse().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "relay child did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    drop(tx);
    let relay = Relay {
        plane: None,
        addr,
        signer,
        events,
        client_tls: hatch_relay::certs::client_config_with_ca(&pki.ca_file).unwrap(),
        tls: std::env::var("HATCH_MEM_PLAIN").is_err(),
        _dir: tempfile::tempdir().unwrap(),
    };
    let pid = child.id();
    // Warm up (pool, allocator arenas), then measure.
    let mut legs = Vec::new();
    for i in 0..20 {
        let sid = format!("warm-{i}");
        let (mut c, mut a) = relay.pair(&sid).await;
        send_bin(&mut c, b"x").await;
        assert_eq!(recv_bin(&mut a).await, b"x");
        legs.push((c, a));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_of(pid);
    let mut unpaired = Vec::new();
    for i in 0..n {
        let sid = format!("idle-{i}");
        let mut c = relay.dial(&sid, Role::Client, &relay.token(&sid, Role::Client)).await.unwrap();
        if std::env::var("HATCH_MEM_UNPAIRED").is_ok() {
            c.flush().await.unwrap();
            unpaired.push(c);
            continue;
        }
        let mut a = relay.dial(&sid, Role::Agent, &relay.token(&sid, Role::Agent)).await.unwrap();
        send_bin(&mut c, b"hello").await;
        assert_eq!(recv_bin(&mut a).await, b"hello");
        legs.push((c, a));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_of(pid);
    println!(
        "io={:?} tls={} sessions={n}: relay RSS {} KiB -> {} KiB, {} bytes per idle session",
        backend(),
        relay.tls,
        before >> 10,
        after >> 10,
        after.saturating_sub(before) / n as u64
    );
    drop(legs);
    drop(child.stdin.take());
    let _ = child.wait();
}
