//! The `hatch-agent` binary: what an operator sees when registration cannot proceed.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hatch-agent"))
}

#[test]
fn register_refuses_to_replace_a_registration_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent.json");
    std::fs::write(
        &state,
        r#"{"instance_id":"i-00000000000000aa","instance_secret":"s","api_url":"https://127.0.0.1:1"}"#,
    )
    .unwrap();
    let out = agent()
        .args(["register", "--api", "https://127.0.0.1:1", "--activation-id", "a"])
        .args(["--activation-code", "c", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("i-00000000000000aa") && stderr.contains("--force"), "{stderr}");
}

#[test]
fn register_against_a_closed_port_fails_with_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ca = hatch_relay::certs::ensure_dev_pki(dir.path(), &[]).unwrap().ca_file;
    let state = dir.path().join("agent.json");
    let out = agent()
        .args(["register", "--api", &format!("https://127.0.0.1:{port}")])
        .args(["--activation-id", "a", "--activation-code", "c", "--ca"])
        .arg(&ca)
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!state.exists());
}

#[test]
fn run_without_registration_says_to_register() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent().args(["run", "--state"]).arg(dir.path().join("none.json")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("hatch-agent register"), "{stderr}");
}
