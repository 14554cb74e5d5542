//! One leg's byte stream: plaintext or our own TLS over the [`Stream`] interface.
//!
//! rustls's buffered `ServerConnection` API is driven directly over owned, pooled buffers
//! (tokio-uring has no `AsyncRead`/`AsyncWrite`, and no maintained crate bridges it):
//!
//! ```text
//!  socket ──read──▶ ciphertext (pool) ──read_tls/process──▶ rustls ──reader()──▶ plaintext (pool)
//!  plaintext ──writer()──▶ rustls ──write_tls──▶ ciphertext (pool) ──write_all──▶ socket
//! ```
//!
//! One reader per connection at a time (the shard guarantees it); writers take the connection's
//! write gate, so TLS records and frames never interleave. Nothing here is `Sync`.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use rustls::ServerConnection;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::io::Stream;
use super::metrics::ShardMetrics;
use super::pool::Pool;

/// A leg's connection: the stream, its TLS state when not plaintext, and per-leg bookkeeping.
pub struct Conn<S> {
    pub(crate) io: S,
    tls: Option<RefCell<ServerConnection>>,
    pool: Rc<Pool>,
    gate: Gate,
    /// Plaintext read before this leg was handed over or upgraded (bytes after the HTTP head).
    pending: RefCell<Vec<u8>>,
    /// Ciphertext read from the socket but not yet taken by rustls.
    cipher: RefCell<Option<(Vec<u8>, Range<usize>)>>,
    /// The last socket read filled its buffer: read again before waiting for readiness.
    more: Cell<bool>,
    /// Last time anything arrived on this leg.
    pub(crate) last_rx: Cell<Instant>,
    /// A keepalive ping was sent and nothing arrived since.
    pub(crate) pinged: Cell<bool>,
    /// A task is reading this leg (its pump); otherwise the closer drains it.
    pub(crate) reading: Cell<bool>,
    _open: OpenGuard,
}

/// Counts the connection in the shard's open gauge while it lives on that shard.
struct OpenGuard(Arc<ShardMetrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        ShardMetrics::dec(&self.0.open);
    }
}

impl<S: Stream> Conn<S> {
    /// Wraps a stream; `tls` is `None` on a `--danger-plaintext` relay.
    pub fn new(
        io: S,
        tls: Option<ServerConnection>,
        pool: Rc<Pool>,
        pending: Vec<u8>,
        metrics: Arc<ShardMetrics>,
    ) -> Self {
        ShardMetrics::add(&metrics.open, 1);
        Conn {
            _open: OpenGuard(metrics),
            io,
            tls: tls.map(RefCell::new),
            pool,
            gate: Gate::default(),
            pending: RefCell::new(pending),
            cipher: RefCell::new(None),
            more: Cell::new(false),
            last_rx: Cell::new(Instant::now()),
            pinged: Cell::new(false),
            reading: Cell::new(false),
        }
    }

    /// Takes the connection apart for a handoff: stream, TLS state, unread plaintext. Fails
    /// (giving nothing back) while ciphertext is still held outside rustls, which the upgrade
    /// path never leaves.
    pub fn into_parts(self) -> (S, Option<ServerConnection>, Vec<u8>) {
        if let Some((buf, _)) = self.cipher.into_inner() {
            self.pool.give(buf);
        }
        (self.io, self.tls.map(RefCell::into_inner), self.pending.into_inner())
    }

    /// Makes the next read go to the socket without waiting for readiness first (used when a
    /// readiness edge may have been consumed while the leg waited for its peer).
    pub fn read_now(&self) {
        self.more.set(true);
    }

    /// Sets plaintext to return before reading the socket (bytes that followed the head).
    pub fn set_pending(&self, bytes: Vec<u8>) {
        *self.pending.borrow_mut() = bytes;
    }

    /// Whether ciphertext is held outside rustls (then the leg cannot be handed over).
    pub fn holds_cipher(&self) -> bool {
        self.cipher.borrow().is_some()
    }

    /// Reads plaintext: returns a pooled buffer holding `carry` followed by new bytes, and its
    /// filled length, or `None` at the end of the stream. Waits for readiness before taking a
    /// buffer, so a leg waiting for data pins none.
    pub async fn read_plain(&self, carry: &[u8]) -> io::Result<Option<(Vec<u8>, usize)>> {
        {
            let mut p = self.pending.borrow_mut();
            if !p.is_empty() {
                let mut buf = self.pool.take();
                buf[..carry.len()].copy_from_slice(carry);
                let n = p.len().min(buf.len() - carry.len());
                buf[carry.len()..carry.len() + n].copy_from_slice(&p[..n]);
                p.drain(..n);
                if p.is_empty() {
                    *p = Vec::new();
                }
                return Ok(Some((buf, carry.len() + n)));
            }
        }
        match &self.tls {
            None => loop {
                if !self.more.get() {
                    self.io.readable().await?;
                }
                let mut buf = self.pool.take();
                buf[..carry.len()].copy_from_slice(carry);
                let (r, buf) = self.io.read(buf, carry.len()).await;
                match r {
                    Ok(0) => {
                        self.pool.give(buf);
                        return Ok(None);
                    }
                    Ok(n) => {
                        self.more.set(carry.len() + n == buf.len());
                        return Ok(Some((buf, carry.len() + n)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.pool.give(buf);
                        self.more.set(false);
                    }
                    Err(e) => {
                        self.pool.give(buf);
                        return Err(e);
                    }
                }
            },
            Some(tls) => self.read_tls(tls, carry).await,
        }
    }

    async fn read_tls(
        &self,
        tls: &RefCell<ServerConnection>,
        carry: &[u8],
    ) -> io::Result<Option<(Vec<u8>, usize)>> {
        loop {
            // 1. Plaintext rustls already holds.
            let (avail, closed) = {
                let mut c = tls.borrow_mut();
                let st = c.process_new_packets().map_err(tls_err)?;
                (st.plaintext_bytes_to_read(), st.peer_has_closed())
            };
            if avail > 0 {
                let mut buf = self.pool.take();
                buf[..carry.len()].copy_from_slice(carry);
                let mut len = carry.len();
                let mut c = tls.borrow_mut();
                while len < buf.len() {
                    match c.reader().read(&mut buf[len..]) {
                        Ok(0) => break,
                        Ok(n) => len += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            drop(c);
                            self.pool.give(buf);
                            return Err(e);
                        }
                    }
                }
                return Ok(Some((buf, len)));
            }
            if closed {
                return Ok(None);
            }
            // 2. Ciphertext read earlier that rustls has not taken yet.
            let held = self.cipher.borrow_mut().take();
            if let Some((cbuf, mut range)) = held {
                let r = {
                    let mut c = tls.borrow_mut();
                    let r = c.read_tls(&mut &cbuf[range.clone()]);
                    if let Ok(n) = r {
                        range.start += n;
                    }
                    r.and_then(|_| c.process_new_packets().map(|_| ()).map_err(tls_err))
                };
                if range.is_empty() {
                    self.pool.give(cbuf);
                } else {
                    *self.cipher.borrow_mut() = Some((cbuf, range));
                }
                if let Err(e) = r {
                    // Send the alert rustls queued, if it can go.
                    let _ = self.flush().await;
                    return Err(e);
                }
                if tls.borrow().wants_write() {
                    self.flush().await?;
                }
                continue;
            }
            // 3. Read more ciphertext from the socket.
            if !self.more.get() {
                self.io.readable().await?;
            }
            let cbuf = self.pool.take();
            let (r, cbuf) = self.io.read(cbuf, 0).await;
            match r {
                Ok(0) => {
                    self.pool.give(cbuf);
                    return Ok(None);
                }
                Ok(n) => {
                    self.more.set(n == cbuf.len());
                    *self.cipher.borrow_mut() = Some((cbuf, 0..n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pool.give(cbuf);
                    self.more.set(false);
                }
                Err(e) => {
                    self.pool.give(cbuf);
                    return Err(e);
                }
            }
        }
    }

    /// Writes `buf[range]` as plaintext (encrypting it on a TLS leg), under the write gate.
    /// Gives the buffer back.
    pub async fn write_plain(
        &self,
        buf: Vec<u8>,
        range: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>) {
        let _g = self.gate.lock().await;
        match &self.tls {
            None => self.io.write_all(buf, range).await,
            Some(tls) => {
                let mut pos = range.start;
                while pos < range.end {
                    let n = match tls.borrow_mut().writer().write(&buf[pos..range.end]) {
                        Ok(n) => n,
                        Err(e) => return (Err(e), buf),
                    };
                    pos += n;
                    if let Err(e) = self.flush_locked(tls).await {
                        return (Err(e), buf);
                    }
                }
                (Ok(()), buf)
            }
        }
    }

    /// Writes a small relay-made message (HTTP response, control frame).
    pub async fn write_small(&self, bytes: &[u8]) -> io::Result<()> {
        let mut buf = self.pool.take();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        let (r, buf) = self.write_plain(buf, 0..n).await;
        self.pool.give(buf);
        r
    }

    /// Sends TLS close_notify (on a TLS leg) and then FIN: the relay closes first.
    pub async fn finish(&self) {
        if let Some(tls) = &self.tls {
            let _g = self.gate.lock().await;
            tls.borrow_mut().send_close_notify();
            let _ = self.flush_locked(tls).await;
        }
        self.io.shutdown(Shutdown::Write);
    }

    /// Sends whatever ciphertext rustls has queued (handshake messages, alerts).
    async fn flush(&self) -> io::Result<()> {
        let Some(tls) = &self.tls else { return Ok(()) };
        let _g = self.gate.lock().await;
        self.flush_locked(tls).await
    }

    async fn flush_locked(&self, tls: &RefCell<ServerConnection>) -> io::Result<()> {
        loop {
            let mut cbuf = self.pool.take();
            let n = {
                let mut c = tls.borrow_mut();
                if !c.wants_write() {
                    drop(c);
                    self.pool.give(cbuf);
                    return Ok(());
                }
                match c.write_tls(&mut &mut cbuf[..]) {
                    Ok(n) => n,
                    Err(e) => {
                        drop(c);
                        self.pool.give(cbuf);
                        return Err(e);
                    }
                }
            };
            let (r, cbuf) = self.io.write_all(cbuf, 0..n).await;
            self.pool.give(cbuf);
            r?;
        }
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Serializes writers of one connection. Shard-local: a flag and a wake-up, no lock.
#[derive(Default)]
struct Gate {
    busy: Cell<bool>,
    notify: Notify,
}

struct GateGuard<'a>(&'a Gate);

impl Gate {
    async fn lock(&self) -> GateGuard<'_> {
        while self.busy.get() {
            self.notify.notified().await;
        }
        self.busy.set(true);
        GateGuard(self)
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        self.0.notify.notify_one();
    }
}
