//! The io_uring backend (`--io uring`) on tokio-uring 0.5.
//!
//! Facts this file is built around (each seen in a prototype here):
//! - the ring is set up with COOP_TASKRUN + TASKRUN_FLAG (about 3x better p99 at 1,000 sessions
//!   than the default setup); never DEFER_TASKRUN (tokio-uring hangs with it); no SQPOLL;
//! - a read abandoned by `select!` or a timeout is not cancelled and later swallows data, so the
//!   callers never drop one: deadlines shut the socket down ([`Stream::shutdown`]);
//! - a stream dropped with a read pending keeps its fd open: callers shut down first;
//! - `read()` fills from offset 0 of what it is given: appending goes through `slice(off..)`;
//! - a tokio-uring stream cannot give its fd back: a handoff sends a `dup`;
//! - waiting for data without pinning a buffer: tokio's `AsyncFd` on the same fd (its epoll
//!   reactor runs under tokio-uring), then one ring read into a pooled buffer;
//! - a ring read on a socket with no data parks in the kernel with its buffer, `O_NONBLOCK` or
//!   not (seen on 6.18: it arms a poll instead of failing `EAGAIN`). So only a read that follows a
//!   readiness wait goes to the ring; a speculative read (the last one filled its buffer, or the
//!   leg was just paired and its edge may have been consumed) is one `recv(MSG_DONTWAIT)`, which
//!   answers `WouldBlock` at once and lets the caller give the buffer back before it waits.

use std::cell::Cell;
use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio_uring::buf::BoundedBuf;

/// Entries of each shard's submission queue.
const RING_ENTRIES: u32 = 1024;

fn ring_builder() -> tokio_uring::Builder {
    let mut urb = tokio_uring::uring_builder();
    urb.setup_coop_taskrun().setup_taskrun_flag();
    let mut b = tokio_uring::builder();
    b.entries(RING_ENTRIES).uring_builder(&urb);
    b
}

/// Checks that an io_uring ring with our flags can be set up here (Docker's default seccomp
/// profile and `kernel.io_uring_disabled` forbid it).
pub fn probe() -> io::Result<()> {
    let mut urb = tokio_uring::uring_builder();
    urb.setup_coop_taskrun().setup_taskrun_flag();
    urb.build(8).map(drop)
}

/// A tokio-uring runtime for one shard, with the ring set up as [`probe`] checks it can be.
pub fn runtime() -> io::Result<tokio_uring::Runtime> {
    tokio_uring::Runtime::new(&ring_builder())
}

/// The raw fd, for `AsyncFd` (which does not own it: the stream does).
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A tokio-uring TCP stream plus a readiness registration on the same fd.
pub struct UringStream {
    // Field order matters: the registration is dropped before the stream closes the fd.
    ready: AsyncFd<Fd>,
    s: tokio_uring::net::TcpStream,
    /// A readiness wait completed since the last read: the next read goes to the ring.
    armed: Cell<bool>,
}

impl UringStream {
    #[allow(unsafe_code)]
    fn new(s: tokio_uring::net::TcpStream) -> io::Result<Self> {
        let _ = s.set_nodelay(true);
        // SAFETY: the fd belongs to `s`, which is stored next to the registration and dropped
        // after it (field order), so the fd stays open and the same for the registration's life.
        let ready =
            unsafe { AsyncFd::register_with_interest(Fd(s.as_raw_fd()), Interest::READABLE) }
                .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(UringStream { ready, s, armed: Cell::new(false) })
    }
}

impl super::Stream for UringStream {
    async fn readable(&self) -> io::Result<()> {
        let mut g = self.ready.readable().await?;
        // Clear before the ring read: bytes arriving after it raise a fresh edge.
        g.clear_ready();
        self.armed.set(true);
        Ok(())
    }

    async fn read(&self, mut buf: Vec<u8>, off: usize) -> (io::Result<usize>, Vec<u8>) {
        if self.armed.replace(false) {
            let (r, slice) = self.s.read(buf.slice(off..)).await;
            return (r, slice.into_inner());
        }
        // Speculative: never park a buffer in the kernel on a socket that may have nothing.
        let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        let r = nix::sys::socket::recv(self.s.as_raw_fd(), &mut buf[off..], flags)
            .map_err(io::Error::from);
        (r, buf)
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        if range.is_empty() {
            return (Ok(()), buf);
        }
        let (r, slice) = self.s.write_all(buf.slice(range)).await;
        (r, slice.into_inner())
    }

    async fn hung_up(&self, keep_waiting: impl Fn() -> bool) -> bool {
        let Ok(mut g) = self.ready.readable().await else { return true };
        if g.ready().is_read_closed() || g.ready().is_error() {
            return true;
        }
        if keep_waiting() {
            g.clear_ready();
        }
        false
    }

    fn shutdown(&self, how: Shutdown) {
        let how = match how {
            Shutdown::Read => nix::sys::socket::Shutdown::Read,
            Shutdown::Write => nix::sys::socket::Shutdown::Write,
            Shutdown::Both => nix::sys::socket::Shutdown::Both,
        };
        let _ = nix::sys::socket::shutdown(self.s.as_raw_fd(), how);
    }

    #[allow(unsafe_code)]
    fn into_fd(self) -> io::Result<OwnedFd> {
        // SAFETY: `self.s` owns this fd and is alive for the whole borrow, which ends before
        // `self` (and with it the original fd) is dropped below.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.s.as_raw_fd()) };
        let dup = fd.try_clone_to_owned()?;
        drop(self);
        Ok(dup)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let s = std::net::TcpStream::from(fd);
        // The ring waits for data itself; a non-blocking socket would make reads fail EAGAIN.
        s.set_nonblocking(false)?;
        UringStream::new(tokio_uring::net::TcpStream::from_std(s))
    }
}

/// A tokio-uring TCP listener.
pub struct UringListener {
    inner: tokio_uring::net::TcpListener,
    stopped: Cell<bool>,
}

impl super::Listener for UringListener {
    type Stream = UringStream;

    fn from_std(l: std::net::TcpListener) -> io::Result<Self> {
        l.set_nonblocking(false)?;
        Ok(UringListener {
            inner: tokio_uring::net::TcpListener::from_std(l),
            stopped: Cell::new(false),
        })
    }

    async fn accept(&self) -> io::Result<Option<UringStream>> {
        // Never cancelled (cancelling a ring accept can leak fds): `stop` shuts the listening
        // socket down, which completes the pending accept with an error.
        if self.stopped.get() {
            return Ok(None);
        }
        match self.inner.accept().await {
            Ok((s, _)) => {
                if self.stopped.get() {
                    let _ = s.shutdown(Shutdown::Both);
                    return Ok(None);
                }
                UringStream::new(s).map(Some)
            }
            Err(_) if self.stopped.get() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn stop(&self) {
        self.stopped.set(true);
        let fd = self.inner.as_raw_fd();
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
    }
}
