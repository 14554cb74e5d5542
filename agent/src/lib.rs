//! The Hatch agent: one outbound control channel to the relay and a PTY per session.

#![deny(unsafe_code)]
