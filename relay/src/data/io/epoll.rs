//! The plain-tokio backend (`--io epoll`): readiness-based, for hosts where io_uring is
//! disabled (Docker's default seccomp profile, `kernel.io_uring_disabled`), and the baseline.

use std::cell::Cell;
use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::os::fd::OwnedFd;

use tokio::sync::Notify;

/// A tokio TCP stream.
pub struct EpollStream(tokio::net::TcpStream);

impl super::Stream for EpollStream {
    async fn readable(&self) -> io::Result<()> {
        self.0.readable().await
    }

    async fn read(&self, mut buf: Vec<u8>, off: usize) -> (io::Result<usize>, Vec<u8>) {
        // A stale readiness ends in WouldBlock: returned to the caller, which gives the buffer
        // back before waiting again (waiting here would pin it for as long as the leg idles).
        let r = match self.0.try_read(&mut buf[off..]) {
            // tokio answers WouldBlock from its cached readiness without asking the kernel; a
            // leg whose edge was consumed while it waited for its peer has data regardless, so
            // ask the kernel once (readiness is already clear: a later arrival raises an edge).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                use std::io::Read;
                (&*socket2::SockRef::from(&self.0)).read(&mut buf[off..])
            }
            r => r,
        };
        // A short read drained the socket (TCP hands over everything queued, up to the space
        // given). tokio keeps its readiness until a read fails with WouldBlock, so without this
        // the next read would cost two more syscalls (tokio's try, then ours) to learn so.
        // Clearing is safe against a race: bytes arriving after the read raise a new edge,
        // which tokio's driver records at its next turn, after this clear.
        if let Ok(n) = &r
            && *n > 0
            && off + n < buf.len()
        {
            let _ = self.0.try_io(tokio::io::Interest::READABLE, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
        (r, buf)
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        let mut pos = range.start;
        while pos < range.end {
            match self.0.try_write(&buf[pos..range.end]) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.0.writable().await {
                        return (Err(e), buf);
                    }
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn hung_up(&self, keep_waiting: impl Fn() -> bool) -> bool {
        let Ok(r) = self.0.ready(tokio::io::Interest::READABLE).await else { return true };
        if r.is_read_closed() || r.is_error() {
            return true;
        }
        if keep_waiting() {
            // Data is waiting for the pump: forget this edge, wait for the next (FIN raises one).
            let _ = self.0.try_io(tokio::io::Interest::READABLE, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
        false
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = socket2::SockRef::from(&self.0).shutdown(how);
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(self.0.into_std()?.into())
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        Ok(EpollStream(tokio::net::TcpStream::from_std(s)?))
    }
}

/// A tokio TCP listener.
pub struct EpollListener {
    inner: tokio::net::TcpListener,
    stopped: Cell<bool>,
    stop: Notify,
}

impl super::Listener for EpollListener {
    type Stream = EpollStream;

    fn from_std(l: std::net::TcpListener) -> io::Result<Self> {
        l.set_nonblocking(true)?;
        Ok(EpollListener {
            inner: tokio::net::TcpListener::from_std(l)?,
            stopped: Cell::new(false),
            stop: Notify::new(),
        })
    }

    async fn accept(&self) -> io::Result<Option<EpollStream>> {
        if self.stopped.get() {
            return Ok(None);
        }
        // tokio's accept is cancel-safe, so racing it against the stop signal loses nothing.
        tokio::select! {
            r = self.inner.accept() => {
                let (s, _) = r?;
                let _ = s.set_nodelay(true);
                Ok(Some(EpollStream(s)))
            }
            _ = self.stop.notified() => Ok(None),
        }
    }

    fn stop(&self) {
        self.stopped.set(true);
        self.stop.notify_waiters();
    }
}
