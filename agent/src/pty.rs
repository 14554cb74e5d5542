//! Pseudo-terminals and the processes that run on them. The only module with `unsafe`: the
//! `ioctl`s on the PTY and the code that runs in the forked child before `exec`.
//!
//! The master side is non-blocking and registered with tokio ([`AsyncFd`]), so thousands of
//! sessions need no thread each. Every descriptor is opened close-on-exec, so a child spawned by
//! one session never inherits another session's PTY (which would keep that PTY from hanging up).
//! The child is a `tokio::process` child: reaped asynchronously, never a zombie.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::pty::PtyMaster;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::unix::AsyncFd;

/// The master side of a PTY, non-blocking, driven by the tokio reactor.
#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<PtyMaster>,
}

/// The slave side, handed to [`spawn`] and closed in the agent once the child has it.
#[derive(Debug)]
pub struct PtySlave(OwnedFd);

impl Pty {
    /// Opens a new PTY pair (master non-blocking; both close-on-exec).
    pub fn open() -> io::Result<(Pty, PtySlave)> {
        let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let master = nix::pty::posix_openpt(flags)?;
        nix::pty::grantpt(&master)?;
        nix::pty::unlockpt(&master)?;
        let name = nix::pty::ptsname_r(&master)?;
        let slave = nix::fcntl::open(
            name.as_str(),
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: `PtyMaster` owns its descriptor, and the `AsyncFd` owns the `PtyMaster` for
        // its whole life: the descriptor is neither closed nor replaced while registered.
        let master = unsafe { AsyncFd::register(master)? };
        Ok((Pty { master }, PtySlave(slave)))
    }

    /// Reads output. `Ok(0)` once no process holds the slave side any more (Linux reports that
    /// as `EIO` on the master).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|m| nix::unistd::read(m.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EIO as i32) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes some of `buf` (at least one byte unless it is empty), waiting while the PTY's
    /// input queue is full; how much.
    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|m| nix::unistd::write(m.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    /// Writes all of `buf`, waiting while the PTY's input queue is full (this wait is the
    /// backpressure towards the client: the data leg is not read meanwhile).
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|m| nix::unistd::write(m.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// The terminal's end-of-file character (`VEOF`, normally Ctrl-D).
    pub fn eof_char(&self) -> u8 {
        nix::sys::termios::tcgetattr(self.master.get_ref())
            .map(|t| t.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize])
            .unwrap_or(0x04)
    }

    /// Sets the window size; the kernel sends SIGWINCH to the PTY's foreground process group.
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: the descriptor is an open PTY master owned by `self` for the whole call, and
        // TIOCSWINSZ reads exactly one `winsize` from the valid pointer we pass.
        let r = unsafe { libc::ioctl(self.master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// The identity a child switches to before `exec` (only when the agent runs as root).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User id.
    pub uid: Uid,
    /// Primary group id.
    pub gid: Gid,
    /// Supplementary groups, resolved in the agent (as `initgroups` would) because reading
    /// `/etc/group` is not allowed between `fork` and `exec`.
    pub groups: Vec<Gid>,
}

/// What to run on the PTY.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The program (looked up in the `PATH` of `env` when it has no slash).
    pub program: String,
    /// `argv[0]` when it differs from the program (`-bash` for a login shell).
    pub arg0: Option<String>,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// The whole environment (nothing is inherited from the agent).
    pub env: Vec<(String, String)>,
    /// Working directory, entered after the identity switch; `/` when it cannot be entered.
    pub cwd: String,
    /// The identity to switch to, or `None` to keep the agent's.
    pub credentials: Option<Credentials>,
}

/// Starts `launch` as the leader of a new session whose controlling terminal is `slave`.
/// The slave is closed in the agent when this returns.
pub fn spawn(launch: &Launch, slave: PtySlave) -> io::Result<tokio::process::Child> {
    let stdin = slave.0.try_clone()?;
    let stdout = slave.0.try_clone()?;
    spawn_on(launch, stdin, stdout, slave.0, true)
}

/// The agent's ends of a command run without a terminal.
#[derive(Debug)]
pub struct Pipes {
    /// The command's stdin; dropping it is end of input.
    pub input: tokio::net::unix::pipe::Sender,
    /// The command's stdout, and its stderr too unless `errors` is there.
    pub output: tokio::net::unix::pipe::Receiver,
    /// The command's stderr, when it is kept apart.
    pub errors: Option<tokio::net::unix::pipe::Receiver>,
}

/// Starts `launch` as the leader of a new session with no controlling terminal: stdin a pipe,
/// stdout a pipe, stderr a pipe of its own when `split_stderr`, else the stdout pipe (for a
/// client that knows only DATA). Bytes pass unchanged (no line discipline).
pub fn spawn_piped(
    launch: &Launch,
    split_stderr: bool,
) -> io::Result<(tokio::process::Child, Pipes)> {
    let (child_in, agent_in) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (agent_out, child_out) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (agent_err, child_err) = if split_stderr {
        let (a, c) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        (Some(a), c)
    } else {
        (None, child_out.try_clone()?)
    };
    let child = spawn_on(launch, child_in, child_out, child_err, false)?;
    // The agent's ends become non-blocking (their own open file descriptions; the child's
    // ends stay blocking). They were close-on-exec from the start, so no other session's
    // child holds them open.
    let pipes = Pipes {
        input: tokio::net::unix::pipe::Sender::from_owned_fd(agent_in)?,
        output: tokio::net::unix::pipe::Receiver::from_owned_fd(agent_out)?,
        errors: agent_err.map(tokio::net::unix::pipe::Receiver::from_owned_fd).transpose()?,
    };
    Ok((child, pipes))
}

/// What a shell says and exits with when `program` cannot be started for `err` (`ENOENT`: 127,
/// not executable: 126), as `bash -c` would; `None` for a failure that is not the command's
/// (the identity switch, resources), which stays an agent error.
pub fn not_started(program: &str, err: &io::Error) -> Option<(i32, String)> {
    let (status, words) = match err.raw_os_error()? {
        libc::ENOENT if !program.contains('/') => (127, "command not found"),
        libc::ENOENT => (127, "No such file or directory"),
        libc::ENOTDIR => (127, "Not a directory"),
        libc::EACCES => (126, "Permission denied"),
        libc::EISDIR => (126, "Is a directory"),
        libc::ENOEXEC => (126, "cannot execute binary file: Exec format error"),
        libc::ETXTBSY => (126, "Text file busy"),
        _ => return None,
    };
    Some((status, format!("hatch-agent: {program}: {words}")))
}

fn spawn_on(
    launch: &Launch,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    controlling_tty: bool,
) -> io::Result<tokio::process::Child> {
    let cwd = CString::new(launch.cwd.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "working directory has NUL"))?;

    let mut cmd = std::process::Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    if let Some(arg0) = &launch.arg0 {
        cmd.arg0(arg0);
    }
    let creds = launch.credentials.clone();
    let groups: Vec<libc::gid_t> =
        creds.as_ref().map(|c| c.groups.iter().map(|g| g.as_raw()).collect()).unwrap_or_default();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called. It calls only setsid, ioctl, setgid,
    // setgroups, setuid and chdir (all async-signal-safe system calls), reads data prepared
    // before the fork (`groups`, `cwd`, `creds`), and allocates nothing: errors are built
    // from errno with `io::Error::last_os_error`, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            // A new session: the child leads it and its own process group, so a hang-up or a
            // kill of the group reaches exactly this session's processes.
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            // Make the PTY (already on fd 0) the session's controlling terminal.
            if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(c) = &creds {
                // The order matters: groups first, while still privileged; uid last.
                if libc::setgid(c.gid.as_raw()) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgroups(groups.len() as _, groups.as_ptr()) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setuid(c.uid.as_raw()) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(cwd.as_ptr()) == -1 {
                libc::chdir(c"/".as_ptr());
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    cmd.spawn()
}

/// Sends `signal` to the process group led by `pid` (a session's child is its group leader).
/// A group that is already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) -> io::Result<()> {
    let Ok(raw) = i32::try_from(pid) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"));
    };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sends `signal` to every process of the session led by `sid` (what a terminal hang-up does,
/// extended to background jobs, whose shell may exit on the PTY's EOF before it forwards the
/// hang-up to them). Processes that started their own session (daemons) are not touched;
/// `nohup`'d ones ignore SIGHUP. Returns how many processes were signalled.
pub fn signal_session(sid: u32, signal: Signal) -> usize {
    let Ok(sid) = i32::try_from(sid) else { return 0 };
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    let mut n = 0;
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if session_of(pid) == Some(sid)
            && nix::sys::signal::kill(Pid::from_raw(pid), signal).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// The session id of `pid` from `/proc/<pid>/stat`, `None` when it is gone, a zombie or
/// unreadable.
fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields follow the last ')':
    // state ppid pgrp session ...
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // A zombie has already ended: it waits only for its parent (or init) to reap it.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(2)?.parse().ok()
}

impl AsFd for Pty {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.master.get_ref().as_fd()
    }
}
