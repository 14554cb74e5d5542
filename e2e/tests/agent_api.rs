//! `hatch-agent run --api`: the URL given wins over the one saved at registration (a relay that
//! moved strands no agent), and several are dialled in turn, the next at once when one fails.

use std::process::Command;
use std::time::{Duration, Instant};

use hatch_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_api_overrides_the_saved_url_and_fails_over_to_the_next() {
    let relay = Relay::start(&[]);
    let home = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the agent fails there and goes on to the relay.
    let dead = "https://127.0.0.1:1";
    let live = relay.info.api_url.clone();
    let (mut agent, iid) = start_agent(&relay, home.path(), &["--api", dead, "--api", &live]);
    wait_online(&relay, &iid, true).await;
    let out = hatch(&relay, home.path(), &relay.info.access_key)
        .args(["exec", "-i", &iid, "--", "echo", "failed over"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "failed over\n", "{out:?}");
    let log = agent.output();
    assert!(log.contains("trying the next API URL"), "{log}");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).success());
    wait_online(&relay, &iid, false).await;

    // Only the dead URL: it overrides the saved (live) one, so the agent stays offline and
    // says where it dials.
    let mut cmd = Command::new(bin("hatch-agent"));
    cmd.args(["run", "--state"]).arg(home.path().join("agent.json")).args(["--api", dead]);
    let mut stranded = Proc::spawn(cmd, &home.path().join("agent2.log"));
    let end = Instant::now() + DEADLINE;
    while !stranded.output().contains("cannot open the control channel") {
        assert!(Instant::now() < end, "no dial failure logged: {}", stranded.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stranded.output().contains("127.0.0.1:1"), "{}", stranded.output());
    let r = relay.call("GET", "/v1/instances", Some(&relay.info.access_key), None).await;
    assert_eq!(r.json()["instances"][0]["online"], false, "{}", r.text);
    stranded.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(stranded.wait_exit(DEADLINE).success());

    // A URL that is not one is refused at start, by name.
    let out = Command::new(bin("hatch-agent"))
        .args(["run", "--state"])
        .arg(home.path().join("agent.json"))
        .args(["--api", "ftp://relay"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ftp://relay"), "{out:?}");
}
