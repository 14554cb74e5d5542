//! The `hatch` CLI.

#![forbid(unsafe_code)]
