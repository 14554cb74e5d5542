//! The Hatch agent: one outbound control channel to the relay and a PTY per session. It never
//! listens on a port.
//!
//! ```text
//!  hatch-agent register ──HTTPS POST /v1/agent/register──▶ API ──▶ state file (0600)
//!
//!  hatch-agent run
//!    control ──WSS /v1/agent/connect (bearer instance secret)──▶ API
//!       │ session.open {stream_url, token, mode, command, run_as, term}
//!       ▼
//!    session (one tokio task each) ──WSS /v1/stream/{sid}?role=agent (hatch.v1)──▶ data plane
//!       │ DATA / RESIZE in, DATA / EXIT out
//!       ▼
//!    pty: nonblocking master (AsyncFd) ◀──▶ child: setsid, TIOCSCTTY, setgid/initgroups/setuid
//! ```
//!
//! Modules:
//! - [`cli`]: the command line (`register`, `run`) and what each command does.
//! - [`state`]: the registration file (instance id, secret, API URL, CA).
//! - [`tls`]: rustls client configurations (configured CA or system bundle; ring).
//! - [`register`]: the HTTPS registration exchange.
//! - [`control`]: the control channel, reconnect with backoff, the set of live sessions.
//! - [`session`]: one session: data leg, PTY pumps, exit, hang-up.
//! - [`pty`]: pseudo-terminals and spawning on them (the only module with `unsafe`).

#![deny(unsafe_code)]

pub mod cli;
pub mod control;
pub mod forward;
pub mod pty;
pub mod register;
pub mod session;
pub mod state;
pub mod tls;
