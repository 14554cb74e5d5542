//! `hatch`: the CLI a person types to open a terminal on an instance through the Hatch relay.
//!
//! It does not log to the terminal it puts in raw mode, and it never leaves that terminal in raw
//! mode: every exit path, panics and signals included, restores it.
//!
//! ```text
//!  argv ──▶ cli (clap) ──▶ commands ──▶ config (file + env) ──▶ api (HTTPS JSON)
//!                                  │                               │ StartSessionResponse
//!                                  │                               ▼
//!                                  └──────────────────────────▶ stream (WSS hatch.v1)
//!                                                                ▲ terminal (raw mode, size)
//!                                                                ▲ escape (`~.` `~~` `~?` `~^Z`)
//!  any failure ──▶ errors (message + exit code) ──▶ stderr, exit status
//! ```
//!
//! Modules:
//! - [`cli`]: commands, flags and arguments.
//! - [`commands`]: what each command does.
//! - [`config`]: the config file, profiles and environment overrides.
//! - [`api`]: the HTTPS JSON client of the control plane.
//! - [`stream`]: one session on the data plane (WSS, `hatch.v1`).
//! - [`terminal`]: raw mode guard, job control (stop and continue) and window size.
//! - [`escape`]: the `~` escape state machine.
//! - [`errors`]: every failure's message and exit code.
//! - [`output`]: tables and JSON for `sessions` and `instances`.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod commands;
pub mod config;
pub mod errors;
pub mod escape;
pub mod forward;
pub mod output;
pub mod play;
pub mod stream;
pub mod terminal;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Parses `args`, runs the command, prints a failure as one line on stderr and returns the
/// exit code (DESIGN.md "Client exit codes").
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return ExitCode::from(if e.use_stderr() { errors::exit::USAGE } else { 0 });
        }
    };
    let verbose = cli.verbose > 0;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hatch: LocalIo: cannot start the runtime: {e}");
            return ExitCode::from(errors::exit::IO);
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    let result = runtime.block_on(commands::dispatch(cli, &env));
    // The stdin reader thread may be blocked in read(2); do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            terminal::restore();
            eprintln!("hatch: {}", e.message(verbose));
            ExitCode::from(e.exit_code())
        }
    }
}
