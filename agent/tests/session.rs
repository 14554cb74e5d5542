//! The session runner over a real loopback WSS leg (dev PKI) with a real PTY.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hatch_agent::session::{Cancel, SessionEnd};
use hatch_proto::api::Mode;
use hatch_proto::channel::{self, Message};
use hatch_proto::close;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_echo_output_arrives_then_exit_0_and_close_1000() {
    let srv = LegServer::start().await;
    let (task, _cancel) =
        spawn_session(srv.spec("s-echo", Mode::Exec, Some(&["echo", "hi"])), &srv.cfg);
    let (path, client) = srv.accept().await;
    assert_eq!(path, "/v1/stream/s-echo?role=agent");
    let done = client.finish().await;
    // No TERM (the client is not a terminal): pipes, bytes unchanged.
    assert_eq!(done.output, "hi\n");
    assert_eq!(done.exit, Some(0));
    assert_eq!(done.close.as_ref().map(|c| c.0), Some(close::NORMAL), "{done:?}");
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_exit_7_gives_exit_7() {
    let srv = LegServer::start().await;
    let (task, _cancel) = spawn_session(srv.spec("s-exit", Mode::Shell, None), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.type_line("echo ready-$((40+2))\n").await;
    client.wait_for("ready-42").await;
    client.type_line("exit 7\n").await;
    let done = client.finish().await;
    assert_eq!(done.exit, Some(7), "{done:?}");
    assert_eq!(done.close.map(|c| c.0), Some(close::NORMAL));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_killed_by_sigkill_gives_137() {
    let srv = LegServer::start().await;
    let (task, _cancel) = spawn_session(srv.spec("s-kill", Mode::Shell, None), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.type_line("kill -9 $$\n").await;
    let done = client.finish().await;
    assert_eq!(done.exit, Some(137), "{done:?}");
    assert_eq!(done.close.map(|c| c.0), Some(close::NORMAL));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(137));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_is_seen_by_stty_size_and_sigwinch() {
    let srv = LegServer::start().await;
    let (task, _cancel) = spawn_session(srv.spec("s-size", Mode::Shell, None), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.type_line("stty size\n").await;
    client.wait_for("24 80\r\n").await;
    client.send(Message::Resize { cols: 100, rows: 40 }).await;
    client.type_line("stty size\n").await;
    client.wait_for("40 100\r\n").await;
    // A child in the foreground gets SIGWINCH when the size changes.
    client
        .type_line(
            "trap 'echo winch-$(stty size | tr \" \" x)' WINCH; echo armed-1; sleep 20 & wait\n",
        )
        .await;
    client.wait_for("armed-1\r\n").await;
    client.send(Message::Resize { cols: 120, rows: 50 }).await;
    client.wait_for("winch-50x120").await;
    client.type_line("exit 0\n").await;
    let done = client.finish().await;
    assert_eq!(done.exit, Some(0), "{done:?}");
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_defaults_term_lang_and_home() {
    let srv = LegServer::start().await;
    let cmd = ["sh", "-c", "echo \"[$TERM][$LANG][$HOME][$(pwd)][$USER]\""];
    let (task, _cancel) = spawn_session(srv.spec("s-env", Mode::Exec, Some(&cmd)), &srv.cfg);
    let (_, client) = srv.accept().await;
    let done = client.finish().await;
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap();
    let home = me.dir.display().to_string();
    assert_eq!(done.output, format!("[xterm-256color][C.UTF-8][{home}][{home}][{}]\n", me.name));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));

    for (term, seen) in [("vt100", "vt100"), ("../../tmp/evil", "xterm-256color")] {
        let mut spec = srv.spec("s-term", Mode::Exec, Some(&["sh", "-c", "echo $TERM"]));
        spec.term = Some(term.into());
        let (task, _cancel) = spawn_session(spec, &srv.cfg);
        let (_, client) = srv.accept().await;
        assert_eq!(client.finish().await.output, format!("{seen}\r\n"));
        assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));
    }

    // A plaintext stream URL is refused without dialing.
    let mut spec = srv.spec("s-plain", Mode::Exec, Some(&["true"]));
    spec.stream_url = spec.stream_url.replace("wss://", "ws://");
    let (task, _cancel) = spawn_session(spec, &srv.cfg);
    assert!(matches!(task.await.unwrap(), SessionEnd::Failed(m) if m.contains("wss://")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_run_as_user_gets_a_clear_error_and_close() {
    let srv = LegServer::start().await;
    let mut spec = srv.spec("s-nouser", Mode::Shell, None);
    spec.run_as = Some("no-such-user-hatch".into());
    let (task, _cancel) = spawn_session(spec, &srv.cfg);
    let (_, client) = srv.accept().await;
    let done = client.finish().await;
    assert_eq!(done.exit, None);
    assert_eq!(done.errors.len(), 1, "{done:?}");
    assert_eq!(done.errors[0].0, channel::ERROR_RUN_AS);
    assert!(done.errors[0].1.contains("\"no-such-user-hatch\" does not exist"), "{done:?}");
    assert_eq!(done.close.map(|c| c.0), Some(close::RUN_AS_UNAVAILABLE));
    assert!(matches!(task.await.unwrap(), SessionEnd::Failed(m) if m.contains("does not exist")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_open_naming_no_user_is_refused() {
    // A relay that predates the hello names no user: the agent cannot know whom the policy
    // allowed, so it runs nothing (before, it ran the session as itself: root).
    let srv = LegServer::start().await;
    let mut spec = srv.spec("s-nouser-named", Mode::Exec, Some(&["id", "-un"]));
    spec.run_as = None;
    let (task, _cancel) = spawn_session(spec, &srv.cfg);
    let (_, client) = srv.accept().await;
    let done = client.finish().await;
    assert_eq!(done.output, "", "{done:?}");
    assert_eq!(done.exit, None);
    assert_eq!(done.errors.len(), 1, "{done:?}");
    assert_eq!(done.errors[0].0, channel::ERROR_RUN_AS);
    assert!(done.errors[0].1.contains("did not say which user"), "{done:?}");
    assert_eq!(done.close.map(|c| c.0), Some(close::RUN_AS_UNAVAILABLE));
    assert!(matches!(task.await.unwrap(), SessionEnd::Failed(m) if m.contains("did not say")));
}

#[test]
fn identity_names_the_default_user_and_refuses_unknown_ones() {
    let me = hatch_agent::session::identity(None).unwrap();
    let euid = nix::unistd::geteuid();
    assert_eq!(me.default_user, nix::unistd::User::from_uid(euid).unwrap().unwrap().name);
    assert_eq!(me.switch_user, euid.is_root());
    let err = hatch_agent::session::identity(Some("no-such-user-hatch")).unwrap_err();
    assert!(err.contains("does not exist"), "{err}");
    let err = hatch_agent::session::identity(Some("-rf")).unwrap_err();
    assert!(err.contains("not a valid user name"), "{err}");
    if euid.is_root() {
        let nobody = hatch_agent::session::identity(Some("nobody")).unwrap();
        assert_eq!((nobody.default_user.as_str(), nobody.switch_user), ("nobody", true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_drops_privileges_when_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let srv = LegServer::start().await;
    let cmd = ["sh", "-c", "echo \"$(id -u):$(id -g):$(id -G):$(id -un):$HOME\""];
    let mut spec = srv.spec("s-nobody", Mode::Exec, Some(&cmd));
    spec.run_as = Some("nobody".into());
    let (task, _cancel) = spawn_session(spec, &srv.cfg);
    let (_, client) = srv.accept().await;
    let done = client.finish().await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let groups = nix::unistd::getgrouplist(c"nobody", nobody.gid).unwrap();
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    assert_eq!(
        done.output,
        format!(
            "{}:{}:{}:nobody:{}\n",
            nobody.uid,
            nobody.gid,
            groups.join(" "),
            nobody.dir.display()
        )
    );
    assert_eq!(done.exit, Some(0));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));
}

/// As a shell: a command that does not exist exits 127, one that cannot be executed 126, with
/// the shell's words on stderr (STDERR when the client keeps it apart, else the output).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_exits_127_or_126_with_words() {
    let srv = LegServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "echo never\n").unwrap();
    let plain = plain.to_str().unwrap().to_owned();
    let cases: [(&str, Option<bool>, i32, String); 5] = [
        (
            "/nonexistent/hatch-program",
            Some(false),
            127,
            "/nonexistent/hatch-program: No such file or directory".into(),
        ),
        (
            "hatch-no-such-command",
            Some(false),
            127,
            "hatch-no-such-command: command not found".into(),
        ),
        (&plain, Some(false), 126, format!("{plain}: Permission denied")),
        ("/tmp", None, 126, "/tmp: Permission denied".into()),
        (
            "hatch-no-such-command",
            Some(true),
            127,
            "hatch-no-such-command: command not found".into(),
        ),
    ];
    for (i, (program, tty, status, words)) in cases.into_iter().enumerate() {
        let mut spec = srv.spec(&format!("s-noprog-{i}"), Mode::Exec, Some(&[program]));
        spec.tty = tty;
        let (task, _cancel) = spawn_session(spec, &srv.cfg);
        let (_, client) = srv.accept().await;
        let done = client.finish().await;
        assert!(done.errors.is_empty(), "{done:?}");
        assert_eq!(done.exit, Some(status), "{program}: {done:?}");
        let line = format!("hatch-agent: {words}");
        match tty {
            Some(false) => {
                assert_eq!(done.stderr, format!("{line}\n"), "{done:?}");
                assert_eq!(done.output, "", "{done:?}");
            }
            Some(true) => assert_eq!(done.output, format!("{line}\r\n"), "{done:?}"),
            None => assert_eq!(done.output, format!("{line}\n"), "{done:?}"),
        }
        assert_eq!(done.close.map(|c| c.0), Some(close::NORMAL));
        assert_eq!(task.await.unwrap(), SessionEnd::Exited(status));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_closes_the_leg_with_the_reason_and_ends_the_shell() {
    let srv = LegServer::start().await;
    let (task, cancel) = spawn_session(srv.spec("s-cancel", Mode::Shell, None), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    let pid = client.shell_pid().await;
    assert!(!processes_in_session(pid).is_empty());
    cancel.send(Cancel { code: close::TERMINATED, reason: "terminated by test".into() }).unwrap();
    let done = client.finish().await;
    assert_eq!(done.close, Some((close::TERMINATED, "terminated by test".into())));
    assert_eq!(task.await.unwrap(), SessionEnd::Cancelled("terminated by test".into()));
    eventually("shell gone", || processes_in_session(pid).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_message_is_refused_with_protocol_error() {
    let srv = LegServer::start().await;
    let (task, _cancel) = spawn_session(srv.spec("s-text", Mode::Shell, None), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.ws.send(tokio_tungstenite::tungstenite::Message::Text("hello".into())).await.unwrap();
    let done = client.finish().await;
    assert_eq!(done.errors.first().map(|e| e.0), Some(channel::ERROR_BAD_MESSAGE), "{done:?}");
    assert_eq!(done.close.map(|c| c.0), Some(close::PROTOCOL_ERROR));
    assert!(matches!(task.await.unwrap(), SessionEnd::Lost(_)));
}

/// State letter and bytes written of `pid`, from /proc.
fn state_and_wchar(pid: i32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?.to_owned();
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let wchar = io.lines().find_map(|l| l.strip_prefix("wchar: "))?.trim().parse().ok()?;
    Some((state, wchar))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_stalls_the_producer_and_ctrl_c_still_gets_through() {
    let srv = LegServer::start().await;
    let cmd = ["sh", "-c", "echo pid=$$ e''nd; exec yes hatch-flood"];
    let mut spec = srv.spec("s-flood", Mode::Exec, Some(&cmd));
    // A terminal, so that Ctrl-C is a signal.
    spec.term = Some("xterm".into());
    let (task, _cancel) = spawn_session(spec, &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.wait_for(" end\r\n").await;
    let text = client.text();
    let pid: i32 = text[text.find("pid=").unwrap() + 4..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap();
    // The client reads nothing more: `yes` ends up asleep in write(2) (it never sleeps
    // otherwise), with a bounded amount written; the agent buffers nothing without limit.
    let mut last = 0;
    eventually("producer blocked by backpressure", || match state_and_wchar(pid) {
        Some((state, wchar)) => {
            let stalled = state == "S" && wchar == last;
            last = wchar;
            stalled
        }
        None => false,
    })
    .await;
    assert!(last < 64 << 20, "{last} bytes written before the stall");
    // Input still flows while output is stalled: Ctrl-C reaches the PTY and kills `yes`.
    client.send(Message::Data(b"\x03")).await;
    let done = client.finish().await;
    assert_eq!(done.exit, Some(130), "close {:?}", done.close);
    assert!(done.output.contains("hatch-flood\r\n"));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_client_is_flow_control_not_a_dead_leg() {
    let mut srv = LegServer::start().await;
    // The client sends nothing at all, for many times the dead-leg deadline, while output waits
    // for it: the session must survive and deliver every byte, then EXIT.
    srv.cfg.timing.dead_after = std::time::Duration::from_millis(300);
    srv.cfg.timing.ping_interval = std::time::Duration::from_millis(100);
    const BYTES: usize = 20 << 20;
    let cmd = ["sh", "-c", "head -c 20971520 /dev/zero | tr '\\0' x; exit 5"];
    let (task, _cancel) = spawn_session(srv.spec("s-pause", Mode::Exec, Some(&cmd)), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.wait_for("x").await;
    // The pause is the scenario (a user reading a pager), not a wait for an event.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let done = client.finish().await;
    assert_eq!(done.output.len(), BYTES);
    assert!(done.output.bytes().all(|b| b == b'x'));
    assert_eq!(done.exit, Some(5), "close {:?}", done.close);
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_without_a_terminal_passes_binary_bytes_and_ends_on_empty_data() {
    let srv = LegServer::start().await;
    let (task, _cancel) = spawn_session(srv.spec("s-cat", Mode::Exec, Some(&["cat"])), &srv.cfg);
    let (_, client) = srv.accept().await;
    // Every byte value, including the ones a terminal would interpret (^C, ^D, \r, \n).
    let data: Vec<u8> = (0..4 * 256 * 1024).map(|i| (i % 251) as u8).collect();
    // Output is read concurrently (cat's output would otherwise fill up and stall its input),
    // and acknowledged as `hatch` does, or the agent's window would stop cat.
    let (sink, mut stream) = client.ws.split();
    let sink = std::sync::Arc::new(tokio::sync::Mutex::new(sink));
    let acks = sink.clone();
    let reader = tokio::spawn(async move {
        let (mut out, mut exit) = (Vec::new(), None);
        let mut acked = 0;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(DEADLINE, stream.next()).await {
            if let WsMessage::Binary(b) = m {
                match Message::decode(&b).unwrap() {
                    Message::Data(d) => out.extend_from_slice(d),
                    Message::Exit(code) => exit = Some(code),
                    Message::Ack(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
                let received = out.len() as u64 + u64::from(exit.is_some());
                if received - acked >= 64 * 1024 || exit.is_some() {
                    acked = received;
                    let ack = Message::Ack(received).to_vec();
                    let _ = acks.lock().await.send(WsMessage::Binary(ack.into())).await;
                }
            }
        }
        (out, exit)
    });
    for chunk in data.chunks(16 * 1024) {
        let msg = WsMessage::Binary(Message::Data(chunk).to_vec().into());
        sink.lock().await.send(msg).await.unwrap();
    }
    let end = WsMessage::Binary(Message::Data(b"").to_vec().into());
    sink.lock().await.send(end).await.unwrap();
    let (out, exit) = reader.await.unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "bytes differ");
    assert_eq!(exit, Some(0));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));
    drop(sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_on_a_terminal_types_eof() {
    let srv = LegServer::start().await;
    let mut spec = srv.spec("s-tty-cat", Mode::Exec, Some(&["cat"]));
    spec.term = Some("xterm".into());
    let (task, _cancel) = spawn_session(spec, &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.type_line("line\n").await;
    client.wait_for("line\r\nline\r\n").await;
    client.send(Message::Data(b"")).await;
    let done = client.finish().await;
    assert_eq!(done.exit, Some(0), "{done:?}");
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_stops_at_the_window_until_the_client_acknowledges_and_exit_waits_for_it() {
    const WINDOW: usize = 64 * 1024;
    let mut srv = LegServer::start().await;
    srv.cfg.link.window = WINDOW;
    let cmd = ["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' y; exit 4"];
    let (task, _cancel) = spawn_session(srv.spec("s-window", Mode::Exec, Some(&cmd)), &srv.cfg);
    let (_, mut client) = srv.accept().await;
    // A client that reads but acknowledges nothing gets exactly one window of output.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut quiet_since = None;
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_millis(100), client.ws.next());
        match next.await {
            Ok(Some(Ok(WsMessage::Binary(b)))) => match Message::decode(&b).unwrap() {
                Message::Data(d) => {
                    client.output.extend_from_slice(d);
                    client.received += d.len() as u64;
                    quiet_since = None;
                }
                other => panic!("unexpected {other:?} before any acknowledgement"),
            },
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("leg ended: {other:?}"),
            // Once the window has arrived, half a second without more output shows it stopped.
            Err(_) if client.output.len() >= WINDOW => {
                let since = *quiet_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= std::time::Duration::from_millis(500) {
                    break;
                }
            }
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "no window of output"),
        }
    }
    assert_eq!(client.output.len(), WINDOW, "output beyond the window before an acknowledgement");
    // Acknowledged as it arrives (`finish` does, and EXIT at once), the rest comes, then EXIT.
    let ack = Message::Ack(client.received).to_vec();
    client.ws.send(WsMessage::Binary(ack.into())).await.unwrap();
    let done = client.finish().await;
    assert_eq!(done.output.len(), 1 << 20);
    assert!(done.output.bytes().all(|b| b == b'y'));
    assert_eq!(done.exit, Some(4), "close {:?}", done.close);
    assert_eq!(done.close.map(|c| c.0), Some(close::NORMAL));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(4));
}

/// Without a PTY (`tty: false`) stdout and stderr stay apart (stderr as STDERR), bytes pass
/// unchanged (no CRLF), and the end of the client's input closes the command's stdin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_without_a_tty_keeps_stderr_apart_and_bytes_unchanged() {
    let srv = LegServer::start().await;
    let cmd = [
        "sh",
        "-c",
        "printf 'out\\n'; printf 'err\\n' >&2; tr a-z A-Z; printf 'late\\n' >&2; exit 3",
    ];
    let mut spec = srv.spec("s-split", Mode::Exec, Some(&cmd));
    spec.tty = Some(false);
    let (task, _cancel) = spawn_session(spec, &srv.cfg);
    let (_, mut client) = srv.accept().await;
    client.send(Message::Data(b"line one\nline two\n")).await;
    client.send(Message::Data(b"")).await;
    let done = client.finish().await;
    assert_eq!(done.output, "out\nLINE ONE\nLINE TWO\n", "{done:?}");
    assert_eq!(done.stderr, "err\nlate\n", "{done:?}");
    assert_eq!(done.exit, Some(3));
    assert_eq!(task.await.unwrap(), SessionEnd::Exited(3));
}
