//! The local terminal: raw mode with a guard that restores it on every exit path (normal
//! return, error, panic via a panic hook, and signals, which the session loop turns into a
//! normal return), and the window size. crossterm does the termios calls, so this crate stays
//! free of `unsafe`.

use std::io::IsTerminal;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process put the terminal in raw mode and has not restored it yet.
static RAW: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// Whether standard input is a terminal (then: raw mode, RESIZE, escapes).
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

/// The terminal size as (columns, rows), if there is a terminal.
pub fn size() -> Option<(u16, u16)> {
    crossterm::terminal::size().ok().filter(|&(c, r)| c > 0 && r > 0)
}

/// Raw mode for as long as the guard lives.
#[derive(Debug)]
pub struct RawGuard(());

impl RawGuard {
    /// Puts the terminal in raw mode and arms the restore-on-panic hook.
    pub fn enable() -> std::io::Result<RawGuard> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        crossterm::terminal::enable_raw_mode()?;
        RAW.store(true, Ordering::SeqCst);
        Ok(RawGuard(()))
    }
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the terminal mode saved when raw mode was enabled; does nothing otherwise.
pub fn restore() {
    if RAW.swap(false, Ordering::SeqCst) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}
