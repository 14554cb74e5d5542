//! The local terminal: raw mode with a guard that restores it on every exit path (normal
//! return, error, panic via a panic hook, and signals, which the session loop turns into a
//! normal return), job control (cooked mode while the client is stopped, raw mode again when
//! it continues), and the window size. nix's safe termios and signal wrappers do the system
//! calls, so this crate stays free of `unsafe`.
//!
//! Job control, as in OpenSSH: a stop that the client sees coming (SIGTSTP sent by someone, or
//! `~^Z`) restores the saved modes and then stops the process ([`RawGuard::stop_self`]). A
//! stop it cannot see (SIGSTOP) leaves the modes as they are, and a job-control shell then puts
//! its own cooked modes on the terminal; so on every SIGCONT the session loop calls
//! [`RawGuard::resume`], which puts raw mode back whatever happened meanwhile.

use std::io::IsTerminal;
use std::sync::{Mutex, Once};

use nix::errno::Errno;
use nix::sys::signal::{Signal, raise};
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
use nix::unistd::{getpgid, getpgrp, getppid, getsid};

/// The modes the terminal had before raw mode, while this process owns the terminal's modes.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();

/// Whether standard input is a terminal (then: raw mode, RESIZE, escapes).
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

/// The terminal size as (columns, rows), if there is a terminal.
pub fn size() -> Option<(u16, u16)> {
    crossterm::terminal::size().ok().filter(|&(c, r)| c > 0 && r > 0)
}

/// Raw mode for as long as the guard lives (at most one at a time).
#[derive(Debug)]
pub struct RawGuard(());

impl RawGuard {
    /// Saves the terminal's modes, puts it in raw mode and arms the restore-on-panic hook.
    pub fn enable() -> std::io::Result<RawGuard> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        let original = tcgetattr(std::io::stdin())?;
        *lock() = Some(original.clone());
        // Built before the change, so that a failed change is undone by its drop.
        let guard = RawGuard(());
        set(&raw_of(&original))?;
        Ok(guard)
    }

    /// Puts the saved modes back (cooked, echo, signals), keeping them saved for
    /// [`RawGuard::resume`]: for a stop the client sees coming.
    pub fn suspend(&self) -> std::io::Result<()> {
        let saved = lock().clone();
        if let Some(original) = saved {
            set(&original)?;
        }
        Ok(())
    }

    /// Puts raw mode back, computed from the saved modes (not from whatever modes a shell left
    /// while the client was stopped). Idempotent. Called while the process is in the
    /// background, it gets SIGTTOU and stops until the shell brings it to the foreground; the
    /// call then completes.
    pub fn resume(&self) -> std::io::Result<()> {
        let saved = lock().clone();
        if let Some(original) = saved {
            set(&raw_of(&original))?;
        }
        Ok(())
    }

    /// Suspends the client as a shell's Ctrl-Z would: the saved modes back on the terminal,
    /// then SIGSTOP to this process (SIGTSTP would only come back to the session loop, which
    /// catches it), then raw mode again once continued. As the kernel does for SIGTSTP, there
    /// is no stop when no job-control shell could continue the process (an orphaned process
    /// group, such as `sh -c 'hatch ...'` without job control): the modes are just put back.
    /// The SIGCONT that continued the process also reaches the session loop, which sends the
    /// window size.
    pub fn stop_self(&self) -> std::io::Result<()> {
        self.suspend()?;
        if has_job_control_parent() {
            raise(Signal::SIGSTOP)?;
        }
        self.resume()
    }
}

/// Whether this process's group is not orphaned (POSIX), judged by the usual member: the
/// parent is in another process group of the same session, as a job-control shell is.
fn has_job_control_parent() -> bool {
    let parent = getppid();
    match (getpgid(Some(parent)), getsid(Some(parent)), getsid(None)) {
        (Ok(group), Ok(session), Ok(own)) => group != getpgrp() && session == own,
        _ => false,
    }
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the terminal modes saved when raw mode was enabled and forgets them; does nothing
/// when no guard is live. Safe to call from a panic hook: it never waits for the lock.
pub fn restore() {
    let Ok(mut saved) = SAVED.try_lock() else { return };
    if let Some(original) = saved.take() {
        let _ = set(&original);
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<Termios>> {
    // A poisoned lock still holds valid modes: a panic cannot leave a Termios half-written.
    SAVED.lock().unwrap_or_else(|e| e.into_inner())
}

fn raw_of(original: &Termios) -> Termios {
    let mut raw = original.clone();
    cfmakeraw(&mut raw);
    raw
}

/// tcsetattr on stdin, now; retried when a signal interrupts it (SIGCONT after a SIGTTOU
/// stop, SIGWINCH).
fn set(modes: &Termios) -> std::io::Result<()> {
    loop {
        match tcsetattr(std::io::stdin(), SetArg::TCSANOW, modes) {
            Err(Errno::EINTR) => continue,
            r => return r.map_err(std::io::Error::from),
        }
    }
}
