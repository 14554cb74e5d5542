//! The narrow I/O interface the data plane is written against, and its two implementations.
//!
//! Everything above this module (TLS, upgrade, pairing, forwarding) is generic over
//! [`Stream`] and [`Listener`]. Buffers move by value (completion-style, as io_uring needs):
//! a read or write takes a `Vec<u8>` and gives it back with the result.
//!
//! Rules every caller keeps (they matter for io_uring, where an operation in flight cannot be
//! cancelled): never drop a read or write future before it completes; enforce deadlines by
//! shutting the socket down ([`Stream::shutdown`]), which completes any pending operation; hand a
//! stream to another shard only with no operation in flight.

use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::os::fd::OwnedFd;

pub mod epoll;
pub mod uring;

/// A connected TCP stream owned by one shard.
#[allow(async_fn_in_trait)]
pub trait Stream: Sized + 'static {
    /// Waits until the socket is readable, without pinning a buffer.
    async fn readable(&self) -> io::Result<()>;
    /// Reads into `buf[off..]`; `Ok(0)` is end of stream. May fail with `WouldBlock` after a
    /// stale readiness (the caller then waits for [`Stream::readable`] again).
    async fn read(&self, buf: Vec<u8>, off: usize) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf[range]`.
    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>);
    /// Waits for a readiness event without reading: `true` when the peer hung up (or the socket
    /// failed). On plain data it returns `false`, clearing the readiness only if `keep_waiting()`
    /// still holds at that moment (so a reader that took over the leg never misses an edge).
    async fn hung_up(&self, keep_waiting: impl Fn() -> bool) -> bool;
    /// Shuts the socket down; pending operations complete.
    fn shutdown(&self, how: Shutdown);
    /// Gives up the stream as a file descriptor for another shard (no operation in flight).
    fn into_fd(self) -> io::Result<OwnedFd>;
    /// Adopts a stream handed over by another shard.
    fn from_fd(fd: OwnedFd) -> io::Result<Self>;
}

/// A listening socket owned by one shard.
#[allow(async_fn_in_trait)]
pub trait Listener: Sized + 'static {
    /// Its streams.
    type Stream: Stream;
    /// Adopts a bound, listening std socket.
    fn from_std(l: std::net::TcpListener) -> io::Result<Self>;
    /// The next connection; `Ok(None)` once [`Listener::stop`] was called.
    async fn accept(&self) -> io::Result<Option<Self::Stream>>;
    /// Stops accepting: a pending and every later `accept` returns `Ok(None)`.
    fn stop(&self);
}
