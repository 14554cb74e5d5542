//! The Hatch relay: a shard-per-core WSS data plane and a thin control plane in one process.
//!
//! - [`data`]: the data plane (shards, TLS, upgrade, pairing, forwarding).

#![deny(unsafe_code)]

pub mod certs;
pub mod data;
pub mod plane;
pub mod token;
