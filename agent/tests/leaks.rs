//! Many sessions at once, and hang-ups: every session gets its own output, a dropped data leg
//! leaves no process, no zombie and no descriptor behind. One test in its own binary, because it
//! counts this process's descriptors and children.

mod common;

use std::collections::HashMap;

use common::*;
use hatch_agent::session::SessionEnd;
use hatch_proto::api::Mode;
use hatch_proto::close;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Sessions run at once.
const SESSIONS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_sessions_and_hangups_leave_nothing_behind() {
    let srv = LegServer::start().await;
    let fds_before = open_fds();

    // 50 concurrent exec sessions; each echoes back what its own client typed.
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let cmd = ["sh", "-c", "read line; echo got-$line"];
        let spec = srv.spec(&format!("s-many-{i}"), Mode::Exec, Some(&cmd));
        tasks.push(spawn_session(spec, &srv.cfg));
    }
    let mut clients = HashMap::new();
    for _ in 0..SESSIONS {
        let (path, client) = srv.accept().await;
        let sid = path.trim_start_matches("/v1/stream/").split('?').next().unwrap().to_owned();
        clients.insert(sid, client);
    }
    // All 50 are live at once before any gets input.
    for (sid, client) in clients.iter_mut() {
        let n = sid.trim_start_matches("s-many-");
        client.type_line(&format!("{n}\n")).await;
    }
    let mut finishing = Vec::new();
    for (sid, client) in clients {
        finishing.push(tokio::spawn(async move { (sid, client.finish().await) }));
    }
    for f in finishing {
        let (sid, done) = f.await.unwrap();
        let n = sid.trim_start_matches("s-many-");
        // No terminal (no TERM): no echo, just the program's answer.
        assert_eq!(done.output, format!("got-{n}\n"), "{sid}");
        assert_eq!(done.exit, Some(0), "{sid}");
        assert_eq!(done.close.map(|c| c.0), Some(close::NORMAL), "{sid}");
    }
    for (task, _cancel) in tasks {
        assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));
    }

    // Dropping the client's leg hangs up the shell and its background job.
    let (task, _cancel) = spawn_session(srv.spec("s-drop", Mode::Shell, None), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.type_line("sleep 1000 &\n").await;
    let pid = client.shell_pid().await;
    eventually("shell and sleep both running", || processes_in_session(pid).len() >= 2).await;
    drop(client);
    let end = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    assert!(matches!(end, SessionEnd::Lost(_)), "{end:?}");
    eventually("no process left in the session", || processes_in_session(pid).is_empty()).await;

    // A shell that ignores SIGHUP is killed after the grace period.
    let (task, _cancel) = spawn_session(srv.spec("s-stubborn", Mode::Shell, None), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.type_line("trap '' HUP; echo trapped\n").await;
    client.wait_for("trapped\r\n").await;
    let pid = client.shell_pid().await;
    drop(client);
    let end = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    assert!(matches!(end, SessionEnd::Lost(_)), "{end:?}");
    eventually("stubborn shell killed", || processes_in_session(pid).is_empty()).await;

    assert!(zombie_children().is_empty(), "zombies: {:?}", zombie_children());
    // Every PTY and socket of the sessions is closed (the reactor's own fds were counted before).
    eventually("descriptors back to the baseline", || open_fds() <= fds_before).await;
}
