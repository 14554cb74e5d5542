//! The real `hatch-relay` binary: `admin` on its store, `serve` on port 0, SIGHUP reloading the
//! certificate, SIGTERM draining the data plane and keeping paired sessions for the next start.

mod api_support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use api_support::{DEADLINE, close_code, connect_control, dial_stream_with, next_message, request};
use hatch_proto::control::ToAgent;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hatch-relay");

fn admin(dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(["admin", "--data-dir"])
        .arg(dir)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Kills the child if a test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, sig).unwrap();
}

#[tokio::test]
async fn serve_reloads_on_sighup_and_drains_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let pki = hatch_relay::certs::ensure_dev_pki(&tmp.path().join("tls"), &[]).unwrap();
    let mut child = Child(
        Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(&data)
            .arg("--cert")
            .arg(&pki.cert_file)
            .arg("--key")
            .arg(&pki.key_file)
            .args(["--api-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0", "--shards", "1"])
            .args(["--drain", "0"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // "hatch-relay: API on A, data plane on B"
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let api: SocketAddr = loop {
        let line = rx.recv_timeout(DEADLINE).expect("relay did not start");
        if let Some(rest) = line.strip_prefix("hatch-relay: API on ") {
            break rest.split(',').next().unwrap().parse().unwrap();
        }
    };

    let acct = admin(&data, &["accounts", "create", "prod"]);
    let acct = acct["id"].as_str().unwrap().to_owned();
    let key = admin(&data, &["keys", "create", "--account", &acct]);
    let key = key["access_key"].as_str().unwrap().to_owned();
    let act = admin(&data, &["activations", "create", "--account", &acct, "--tag", "env=dev"]);
    let listed = admin(&data, &["activations", "list"]);
    assert_eq!(listed[0]["tags"]["env"], "dev");

    let tls = hatch_relay::certs::client_config_with_ca(&pki.ca_file).unwrap();
    let lo = "127.0.0.1".parse().unwrap();
    let body = format!(
        r#"{{"activation_id":"{}","activation_code":"{}"}}"#,
        act["activation_id"].as_str().unwrap(),
        act["activation_code"].as_str().unwrap()
    );
    let r =
        request(tls.clone(), api, lo, "POST", "/v1/agent/register", None, Some(body.into_bytes()))
            .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let reg: Value = r.json();
    let iid = reg["instance_id"].as_str().unwrap().to_owned();
    let mut control =
        connect_control(tls.clone(), api, reg["instance_secret"].as_str().unwrap()).await.unwrap();

    // Start a session once the channel is registered (poll: TargetNotConnected until then).
    let start = format!(r#"{{"instance_id":"{iid}","mode":"shell"}}"#).into_bytes();
    let end = tokio::time::Instant::now() + DEADLINE;
    let r = loop {
        let r =
            request(tls.clone(), api, lo, "POST", "/v1/sessions", Some(&key), Some(start.clone()))
                .await;
        if r.status != 409 || tokio::time::Instant::now() > end {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.status, 201, "{}", r.text);
    let s: Value = r.json();
    let sid = s["session_id"].as_str().unwrap().to_owned();
    let Some(ToAgent::SessionOpen { stream_url, token, .. }) = next_message(&mut control).await
    else {
        panic!("expected session.open")
    };
    let mut leg = dial_stream_with(tls.clone(), &stream_url, &token).await.unwrap();
    let mut client = dial_stream_with(
        tls.clone(),
        s["stream_url"].as_str().unwrap(),
        s["token"].as_str().unwrap(),
    )
    .await
    .unwrap();

    // SIGHUP with a certificate from another CA: new connections get it.
    let pki2 = hatch_relay::certs::ensure_dev_pki(&tmp.path().join("tls2"), &[]).unwrap();
    std::fs::copy(&pki2.cert_file, &pki.cert_file).unwrap();
    std::fs::copy(&pki2.key_file, &pki.key_file).unwrap();
    signal(&child, nix::sys::signal::Signal::SIGHUP);
    let tls2 = hatch_relay::certs::client_config_with_ca(&pki2.ca_file).unwrap();
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let ok = tokio::spawn(request(tls2.clone(), api, lo, "GET", "/healthz", None, None)).await;
        if ok.is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM: legs closed with 4009 (resumable), process exits 0; with the default resume
    // window the paired session stays open in the store (`detached`) for the next start.
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(close_code(&mut client).await, Some(4009));
    assert_eq!(close_code(&mut leg).await, Some(4009));
    let end = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < end, "relay did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let sessions = admin(&data, &["sessions", "list"]);
    assert_eq!(sessions[0]["id"], sid.as_str());
    assert_eq!(sessions[0]["state"], "detached", "{sessions}");
    assert!(sessions[0]["close_reason"].is_null(), "{sessions}");
}

#[test]
fn serve_names_the_store_file_it_cannot_open() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // A directory where the store file should be: it cannot be opened as a database.
    std::fs::create_dir_all(data.join("hatch.db")).unwrap();
    let pki = hatch_relay::certs::ensure_dev_pki(&tmp.path().join("tls"), &[]).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .arg("--cert")
        .arg(&pki.cert_file)
        .arg("--key")
        .arg(&pki.key_file)
        .args(["--api-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&data.join("hatch.db").display().to_string()), "{err}");
}

#[test]
fn admin_refuses_a_bad_policy_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    hatch_relay::server::ensure_data_dir(&data).unwrap();
    drop(hatch_relay::control::store::SqliteStore::open(&data.join("hatch.db")).unwrap());
    let acct = admin(&data, &["accounts", "create", "a"]);
    let acct = acct["id"].as_str().unwrap();
    let file = tmp.path().join("p.json");
    std::fs::write(&file, r#"{"Statement":[{"Effect":"Alow","Action":"*","Resource":"*"}]}"#)
        .unwrap();
    let out = Command::new(BIN)
        .args(["admin", "--data-dir"])
        .arg(&data)
        .args(["policies", "put", "--account", acct, "p"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Statement[0].Effect"), "{err}");
    let user = admin(&data, &["users", "create", "--account", acct, "bob"]);
    assert_eq!(user["name"], "bob");
    let k = admin(&data, &["keys", "create", "--account", acct, "--user", "bob"]);
    assert!(k["access_key"].as_str().unwrap().starts_with("hatch_ak_"));
    let revoked = admin(&data, &["keys", "revoke", k["key_id"].as_str().unwrap()]);
    assert_eq!(revoked["revoked"], k["key_id"]);
}
