//! The Hatch load test: very many concurrent sessions through a real relay, keystroke round-trip
//! latency measured against a floor (the same clients talking to a plain echo server over the
//! same TLS + WebSocket transport, no relay).
//!
//! It does not measure the relay in-process: the relay, the floor's echo server and the
//! simulated clients and agents each run in their own process (this binary re-executed with a
//! hidden subcommand), because the open-file limit here is 20,000 per process and a wake-up
//! across processes is what a real deployment pays.
//!
//! ```text
//!  hatch-loadtest (parent: run)                       stderr: progress; stdout: report
//!    ├─ relay-process ── hatch_relay::cli::run("dev", ...)   ◀─ /proc/<pid> RSS + CPU (proc)
//!    │     or floor-process ── floor::serve (TLS + WS echo, same shard count)
//!    ├─ worker (agents)  ── sim::agents: register, control channel, echo DATA on each session
//!    └─ worker (clients) ── sim::clients: POST /v1/sessions, dial, DATA at --rate, hdrhistogram
//!          parent ⇄ worker: JSON lines on stdin/stdout (worker::Spec, worker::Event)
//! ```
//!
//! Modules:
//! - [`cli`]: command-line options and the hidden subcommands.
//! - [`run`]: the parent: phases (floor, relay per I/O backend), worker sizing, progress.
//! - [`floor`]: the direct TLS + WebSocket echo server (the floor).
//! - [`sim`]: simulated clients and agents (session setup, echo, PTY, throughput loops).
//! - [`net`]: dialing: source-address spreading, TLS, WebSocket upgrade, HTTPS JSON requests.
//! - [`worker`]: the worker process and its line protocol with the parent.
//! - [`report`]: histograms, the text and JSON reports, the baseline comparison.
//! - [`pty`]: the `--mode pty` agent session (`cat` in a raw PTY).
//! - [`tcp`]: `--mode forward`'s loopback TCP server (echo, sink, source) and its byte pattern;
//!   the forwarding clients and agents are in `sim::forward`, the phases in `run::forward`.
//! - [`proc`]: `/proc` readings (RSS, CPU time) and the open-file limit.

#![deny(unsafe_code)]

pub mod cli;
pub mod floor;
pub mod net;
pub mod proc;
#[allow(unsafe_code)] // registering the PTY master with the reactor
pub mod pty;
pub mod report;
pub mod run;
pub mod sim;
pub mod tcp;
pub mod worker;
