//! The server process: started so that it cannot outlive the test process, stopped on request.
//!
//! The shared cluster lives in a static, and statics are never dropped, so the server must die
//! with the process some other way. Two ways, for two kinds of exit:
//!
//! - an orderly exit (the test harness returns from `main` or calls `exit`): an `atexit` hook
//!   ([`at_exit`]) stops the server and removes its directory;
//! - any exit at all, a crash or SIGKILL included: the kernel sends the server SIGINT when its
//!   parent dies (`PR_SET_PDEATHSIG`). The directory stays behind then, in the temp dir.
//!
//! The "parent" of `PR_SET_PDEATHSIG` is the *thread* that forked the child, not the process.
//! The test harness runs each test in a thread of its own that ends with the test, so spawning
//! from the test's thread would kill the shared server as soon as the first test finished.
//! Every server is therefore spawned by one thread that lives as long as the process.
//!
//! The module holds the crate's only unsafe code: the `pre_exec` hook and `atexit`.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Sender, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a stopping server gets to shut down before it is killed: a fast shutdown of a test
/// cluster takes well under a second; this is for a machine under heavy load.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a stopping server is checked for having exited: short, as a test that drops a
/// cluster waits on it.
const STOP_POLL: Duration = Duration::from_millis(10);

/// The signal that stops the server, on request and when the test process dies: SIGINT is
/// PostgreSQL's "fast shutdown", which disconnects open sessions. (SIGTERM, "smart shutdown",
/// would wait for them: a test still holding a connection would stall the drop until the
/// deadline.)
const STOP_SIGNAL: Signal = Signal::SIGINT;

/// A command to spawn, and where to send the child.
type Request = (Command, SyncSender<io::Result<Child>>);

/// Spawns `command` from the process's long-lived spawner thread, with the child set to receive
/// [`STOP_SIGNAL`] when this process dies.
pub(crate) fn spawn(mut command: Command) -> io::Result<Child> {
    let parent = Pid::this();
    // SAFETY: the hook runs in the forked child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes two system calls (prctl, getppid) and
    // builds an io::Error from an errno, without allocating or taking a lock. std runs it after
    // setuid, which matters: a change of user clears the parent-death signal.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(STOP_SIGNAL)?;
            // The parent may have died before prctl took effect: then no signal will come.
            if nix::unistd::getppid() != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
    let (reply, child) = mpsc::sync_channel(1);
    spawner()
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread has exited"))?;
    child.recv().map_err(|_| io::Error::other("the spawner thread has exited"))?
}

/// The thread that spawns every server. It lives until the process exits: its queue's sender
/// sits in a static, never dropped, so its loop never ends.
fn spawner() -> &'static Sender<Request> {
    static SPAWNER: OnceLock<Sender<Request>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, queue) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("pgtest-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in queue {
                    // The requester may have given up; the child is then dropped unwaited,
                    // and dies with the process.
                    let _ = reply.send(command.spawn());
                }
            })
            .unwrap_or_else(|err| panic!("starting the thread that spawns postgres: {err}"));
        requests
    })
}

/// Stops the server: [`STOP_SIGNAL`], up to [`STOP_TIMEOUT`] to exit, then SIGKILL. Returns
/// once the process has been reaped.
pub(crate) fn stop(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return; // exited already, or not ours to wait for
    }
    // The child is not reaped until `wait` below, so its pid cannot have been reused.
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), STOP_SIGNAL);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => thread::sleep(STOP_POLL),
            Ok(Some(_)) | Err(_) => return,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Registers `hook` to run when the process exits normally.
pub(crate) fn at_exit(hook: extern "C" fn()) -> io::Result<()> {
    // SAFETY: atexit only records the function pointer, which is valid for the whole life of
    // the process; the hooks given here catch their own panics, so none unwinds into libc.
    match unsafe { libc::atexit(hook) } {
        0 => Ok(()),
        _ => Err(io::Error::other("atexit refused the hook")),
    }
}
