//! The Hatch relay: a shard-per-core WSS data plane and a thin control plane in one process.
//!
//! ```text
//!  hatch (client) ── HTTPS ──▶ control (API, policy, store, agent channels) ◀── WSS ── agent
//!        │                         │ tokens (TokenSigner)   ▲ DataEvent       (control channel)
//!        │                         ▼ DataCommand            │
//!        └──── WSS /v1/stream ──▶ data plane shards ◀──── WSS /v1/stream ──── agent
//! ```
//!
//! - [`cli`]: the `hatch-relay` command line (`serve`, `dev`, `admin`); `main.rs` calls
//!   [`cli::run`].
//! - [`server`]: starts and wires the control plane and the data plane, and stops them.
//! - [`dev`]: the development relay (generated PKI, demo account, `dev.json`) used by
//!   `hatch-relay dev`, tests and the load test.
//! - [`control`]: API, policy engine, store, agent control channels, session lifecycle.
//! - [`plane`]: the channel types between the data plane and the control plane.
//! - [`token`]: stream tokens (EdDSA JWT) signed by the control plane, verified by the data
//!   plane.
//! - [`data`]: the data plane (shards, TLS, upgrade, pairing, forwarding).
//! - [`certs`]: PEM loading into rustls (ring provider) and the development PKI.

#![deny(unsafe_code)]

pub mod certs;
pub mod cli;
pub mod control;
pub mod data;
pub mod dev;
pub mod plane;
pub mod recording;
pub mod server;
pub mod token;
