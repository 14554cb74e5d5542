//! The sans-IO core of Hatch, shared by the relay, the agent, the CLI and the load test.
//!
//! It does **not** do any I/O: no sockets, no clock (time is a parameter), no async runtime.
//! Callers feed it bytes and act on what it returns.
//!
//! ```text
//!  bytes from a socket ──▶ frame::FrameHeader::parse ──▶ header (opcode, len, mask)
//!                                                       │
//!          payload in place ◀── frame::unmask ◀─────────┘
//!                 │
//!                 ├──▶ (relay) forward::step re-frames in place, forwards unchanged
//!                 └──▶ (client, agent) channel::Message::decode ──▶ DATA / RESIZE / EXIT / ...
//! ```
//!
//! - [`frame`]: WebSocket frame headers (RFC 6455 §5), in-place unmasking, close payloads.
//! - [`forward`]: the relay's forward step, masked client frames re-framed in place as server
//!   frames, with the per-direction state carried between reads.
//! - [`channel`]: the end-to-end `hatch.v1` messages between client and agent.
//! - [`close`]: the close codes and their meaning.
//! - [`token`]: stream-token claims.
//! - [`api`], [`control`]: JSON bodies of the control-plane API and the agent control channel.
//! - [`logtext`]: peer-supplied text clipped and escaped for a log line.

#![forbid(unsafe_code)]

pub mod api;
pub mod channel;
pub mod close;
pub mod control;
pub mod forward;
pub mod frame;
pub mod logtext;
pub mod mux;
pub mod resume;
pub mod token;
