//! The Hatch relay: a shard-per-core WSS data plane and a thin control plane in one process.

#![deny(unsafe_code)]

pub mod certs;
pub mod plane;
pub mod token;
