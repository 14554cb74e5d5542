//! One leg's connection: the stream, its TLS driver when not plaintext, the write gate and
//! the frames the relay owes the leg. Liveness (when it last sent, whether it was pinged)
//! belongs to the [session table](super::session), not here.
//!
//! ```text
//!  socket ──read──▶ ciphertext (pool buf) ──Tls::process──▶ carry + plaintext ──▶ the pump
//!  the pump ──write_forwarded──▶ Tls::encrypt ──▶ `out` ──write_all──▶ socket (write gate)
//! ```
//!
//! A partial record left after a read stays in one held pool buffer until the rest arrives; an
//! idle leg holds no buffer. One reader per connection at a time (the shard guarantees it), and
//! one writer: the holder of the write gate. Nothing here is `Sync`.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use tokio::sync::Notify;
use tokio::time::Instant;

use hatch_proto::frame::{self, OpCode};

use super::error::{LegError, LegResult, PeerRule};
use super::io::Stream;
use super::metrics::ShardMetrics;
use super::pool::{Buf, Pool};
use super::tls::{Step, Tls};

/// A leg's connection: the stream, its TLS state when not plaintext, and per-leg bookkeeping.
pub struct Conn<S> {
    pub(crate) io: S,
    tls: Option<Tls>,
    pool: Rc<Pool>,
    gate: Gate,
    /// Plaintext read before this leg was handed over or upgraded (bytes after the HTTP head).
    pending: RefCell<Vec<u8>>,
    /// Ciphertext read from the socket but not yet complete enough for rustls (a partial record),
    /// in a held pool buffer.
    cipher: RefCell<Option<(Buf, Range<usize>)>>,
    /// The last socket read filled its buffer: read again before waiting for readiness.
    more: Cell<bool>,
    /// A task is reading this leg (its pump); otherwise the closer drains it.
    pub(crate) reading: Cell<bool>,
    /// Frames the relay makes for this leg, held while a forwarded frame to it is half written.
    outbox: RefCell<Outbox>,
    /// Woken when a half-written frame to this leg completes or is given up.
    frame_done: Notify,
    _open: OpenGuard,
}

/// What the relay owes a leg of its own, and whether it may write it now.
///
/// RFC 6455 §5.4 allows a control frame between the frames of a message, never inside one. The
/// relay streams a frame to a leg as its chunks arrive from the other leg, so between those
/// writes the leg's byte stream is inside a frame; a pong, ping or close written then would
/// land in the middle of the payload. They wait here, bounded: at most one pong (a newer ping's
/// pong replaces the older one, as §5.5.3 allows) and one ping.
#[derive(Default)]
struct Outbox {
    /// A forwarded frame to this leg is half written.
    mid_frame: bool,
    /// Nothing more may be written as WebSocket frames: our close frame went out, or the leg was
    /// left inside a frame that will never complete.
    shut: bool,
    /// The pong owed for the newest ping: its payload (≤ 125 bytes). Boxed: every leg carries
    /// an `Outbox`, and an inline 125-byte array cost ~700 B per idle session (two legs, and
    /// the allocator's size class), where a pong is owed only for a moment after a ping.
    pong: Option<Box<[u8]>>,
    /// A keepalive ping is owed (or being written).
    ping: bool,
}

/// The connections alive on one shard: counted in its open gauge, with a signal when the
/// last one is gone (what a shutting-down shard waits for).
pub struct Open {
    n: Cell<usize>,
    none: Notify,
    metrics: Arc<ShardMetrics>,
}

impl Open {
    /// No connection yet; `metrics.open` follows the count.
    pub fn new(metrics: Arc<ShardMetrics>) -> Self {
        Open { n: Cell::new(0), none: Notify::new(), metrics }
    }

    /// Connections alive.
    pub fn count(&self) -> usize {
        self.n.get()
    }

    /// Returns once no connection is alive.
    pub async fn none(&self) {
        loop {
            let gone = self.none.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if self.n.get() == 0 {
                return;
            }
            gone.await;
        }
    }
}

/// Counts the connection in [`Open`] while it lives on that shard.
struct OpenGuard(Rc<Open>);

impl OpenGuard {
    fn new(open: Rc<Open>) -> Self {
        open.n.set(open.n.get() + 1);
        ShardMetrics::add(&open.metrics.open, 1);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let open = &self.0;
        open.n.set(open.n.get().saturating_sub(1));
        ShardMetrics::dec(&open.metrics.open);
        if open.n.get() == 0 {
            open.none.notify_waiters();
        }
    }
}
impl<S: Stream> Conn<S> {
    /// Wraps a stream; `tls` is `None` on a `--danger-plaintext` relay.
    pub fn new(
        io: S,
        tls: Option<UnbufferedServerConnection>,
        pool: Rc<Pool>,
        pending: Vec<u8>,
        open: Rc<Open>,
    ) -> Self {
        Conn {
            _open: OpenGuard::new(open),
            io,
            tls: tls.map(Tls::new),
            pool,
            gate: Gate::default(),
            pending: RefCell::new(pending),
            cipher: RefCell::new(None),
            more: Cell::new(false),
            reading: Cell::new(false),
            outbox: RefCell::default(),
            frame_done: Notify::new(),
        }
    }

    /// Takes the connection apart for a handoff: stream, TLS state, unread plaintext. Callers
    /// check [`Conn::holds_cipher`] first: TLS bytes held outside rustls are dropped here.
    pub fn into_parts(self) -> (S, Option<UnbufferedServerConnection>, Vec<u8>) {
        drop(self.cipher.into_inner());
        let tls = self.tls.map(Tls::into_conn);
        (self.io, tls, self.pending.into_inner())
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

    /// Whether TLS bytes are held outside rustls (a partial record read, or encoded bytes not yet
    /// sent): then the leg cannot be handed over.
    pub fn holds_cipher(&self) -> bool {
        self.cipher.borrow().is_some() || self.tls.as_ref().is_some_and(Tls::holds_out)
    }

    /// Reads plaintext: returns a pooled buffer holding `carry` followed by new bytes, and its
    /// filled length, or `None` at the end of the stream. Waits for readiness before taking a
    /// buffer, so a leg waiting for data pins none.
    pub async fn read_plain(&self, carry: &[u8]) -> LegResult<Option<(Buf, usize)>> {
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
                let (v, lent) = buf.lend();
                let (r, v) = self.io.read(v, carry.len()).await;
                let buf = lent.back(v);
                match r {
                    Ok(0) => {
                        return Ok(None);
                    }
                    Ok(n) => {
                        self.more.set(carry.len() + n == buf.len());
                        return Ok(Some((buf, carry.len() + n)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.more.set(false);
                    }
                    Err(e) => {
                        return Err(e.into());
                    }
                }
            },
            Some(tls) => self.read_tls(tls, carry).await,
        }
    }

    /// The TLS read: ciphertext goes into a pool buffer after `carry`, rustls decrypts it in
    /// place, and the payloads are moved to the front (after `carry`) of that same buffer.
    async fn read_tls(&self, tls: &Tls, carry: &[u8]) -> LegResult<Option<(Buf, usize)>> {
        if tls.peer_closed() {
            return Ok(None);
        }
        if tls.failed() {
            return Err(LegError::local("TLS connection failed"));
        }
        let c = carry.len();
        // A buffer with `carry` at the front and unprocessed ciphertext (a partial record) after
        // it, and where that ends.
        let mut held: Option<(Buf, usize)> = None;
        if let Some((mut buf, r)) = self.cipher.borrow_mut().take() {
            let n = r.len();
            if c + n >= buf.len() {
                return Err(LegError::Peer(PeerRule::RecordTooLarge));
            }
            buf.copy_within(r, c);
            buf[..c].copy_from_slice(carry);
            held = Some((buf, c + n));
        }
        loop {
            if !self.more.get()
                && let Err(e) = self.io.readable().await
            {
                drop(held);
                return Err(e.into());
            }
            let (buf, filled) = match held.take() {
                Some(h) => h,
                None => {
                    let mut buf = self.pool.take();
                    buf[..c].copy_from_slice(carry);
                    (buf, c)
                }
            };
            if filled == buf.len() {
                // Cannot happen for a record (at most ~18 KiB); a handshake message spread over
                // more records than a buffer holds is refused.
                tls.fail();
                return Err(LegError::Peer(PeerRule::InputTooLarge));
            }
            let (v, lent) = buf.lend();
            let (r, v) = self.io.read(v, filled).await;
            let mut buf = lent.back(v);
            let end = match r {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    self.more.set(filled + n == buf.len());
                    filled + n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.more.set(false);
                    // Keep a partial record read before; an empty buffer goes back.
                    if filled > c {
                        held = Some((buf, filled));
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut start = c;
            let mut w = c;
            loop {
                match tls.process(&self.pool, &mut buf[..end], &mut w, &mut start) {
                    Step::NeedInput => break,
                    Step::Transmit => {
                        let _g = self.gate.lock().await;
                        self.send_out().await?;
                    }
                    Step::PeerClosed => {
                        if w > c {
                            return Ok(Some((buf, w)));
                        }
                        return Ok(None);
                    }
                    Step::Failed(e) => {
                        tls.fail();
                        // Send the alert rustls queued, if the write side is free.
                        if let Some(_g) = self.gate.try_lock() {
                            let _ = self.send_out().await;
                        }
                        return Err(e);
                    }
                }
            }
            let rest = start..end;
            if w > c {
                // Plaintext to return: a partial record left over moves to a held buffer.
                if !rest.is_empty() {
                    let mut h = self.pool.take();
                    h[..rest.len()].copy_from_slice(&buf[rest.clone()]);
                    *self.cipher.borrow_mut() = Some((h, 0..rest.len()));
                }
                return Ok(Some((buf, w)));
            }
            // Nothing decrypted yet (handshake, or a record still arriving): keep what is left.
            if rest.is_empty() {
            } else {
                let n = rest.len();
                buf.copy_within(rest, c);
                held = Some((buf, c + n));
            }
        }
    }
    /// Sends `out` until it is empty. The caller holds the write gate.
    async fn send_out(&self) -> LegResult<()> {
        let Some(tls) = &self.tls else { return Ok(()) };
        loop {
            let next = tls.take_out();
            let Some((buf, n)) = next else { return Ok(()) };
            let (v, lent) = buf.lend();
            let (r, v) = self.io.write_all(v, 0..n).await;
            drop(lent.back(v));
            r?;
        }
    }

    /// Writes `buf[range]` as plaintext (encrypting it on a TLS leg), under the write gate.
    /// Gives the buffer back (for the caller's next read).
    pub async fn write_plain(&self, buf: Buf, range: Range<usize>) -> (LegResult<()>, Buf) {
        let _g = self.gate.lock().await;
        self.write_locked(buf, range).await
    }

    /// [`Conn::write_plain`] for a caller holding the write gate.
    async fn write_locked(&self, buf: Buf, range: Range<usize>) -> (LegResult<()>, Buf) {
        match &self.tls {
            None => {
                let (v, lent) = buf.lend();
                let (r, v) = self.io.write_all(v, range).await;
                let buf = lent.back(v);
                (r.map_err(LegError::Io), buf)
            }
            Some(tls) => {
                let mut data = &buf[range];
                loop {
                    // Whatever is already in `out` goes first (it was made earlier).
                    if let Err(e) = self.send_out().await {
                        return (Err(e), buf);
                    }
                    if data.is_empty() {
                        return (Ok(()), buf);
                    }
                    if let Err(e) = tls.encrypt(&self.pool, &mut data) {
                        return (Err(e), buf);
                    }
                }
            }
        }
    }
    /// Writes forwarded frame bytes; `mid_frame`: afterwards the leg is inside a frame (see
    /// [`Step::mid_frame`](hatch_proto::forward::Step::mid_frame)). When a frame completes, the
    /// control frames owed to the leg follow at once, under the same hold of the write gate.
    pub async fn write_forwarded(
        &self,
        buf: Buf,
        range: Range<usize>,
        mid_frame: bool,
    ) -> (LegResult<()>, Buf) {
        let _g = self.gate.lock().await;
        if self.outbox.borrow().shut {
            return (Err(LegError::local("leg closed")), buf);
        }
        let (r, buf) = self.write_locked(buf, range).await;
        if r.is_err() {
            return (r, buf);
        }
        let was_mid = std::mem::replace(&mut self.outbox.borrow_mut().mid_frame, mid_frame);
        if was_mid && !mid_frame {
            self.frame_done.notify_waiters();
            if let Err(e) = self.write_owed().await {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// Answers a ping with `payload` (≤ 125 bytes): now, or once the frame this leg is inside
    /// is complete (replacing a pong still owed). Waits for the write gate, so a leg that does
    /// not read stops being read (its pings stay in the kernel).
    pub async fn send_pong(&self, payload: &[u8]) -> LegResult<()> {
        {
            let mut ob = self.outbox.borrow_mut();
            let n = payload.len().min(frame::MAX_CONTROL_PAYLOAD as usize);
            ob.pong = Some(payload[..n].into());
        }
        self.flush_owed().await
    }

    /// Owes the leg a keepalive ping; false if one is already owed (then nothing is to be done:
    /// its writer is on the way, or the forwarder sends it when the frame ends).
    pub fn owe_ping(&self) -> bool {
        let mut ob = self.outbox.borrow_mut();
        if ob.ping || ob.shut {
            return false;
        }
        ob.ping = true;
        true
    }

    /// Writes the control frames owed to the leg unless it is inside a frame.
    pub async fn flush_owed(&self) -> LegResult<()> {
        let _g = self.gate.lock().await;
        if self.outbox.borrow().mid_frame {
            return Ok(());
        }
        self.write_owed().await
    }

    /// Sends our close frame once the leg is not inside a frame, waiting at most `wait` for a
    /// half-written one to complete; after that, or if the frame was given up, the leg gets no
    /// close frame (a close inside a payload would corrupt it). Either way no frame follows.
    /// Returns whether the close frame was written.
    pub async fn send_close(&self, close: &[u8], wait: std::time::Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let g = self.gate.lock().await;
            let (shut, mid) = {
                let ob = self.outbox.borrow();
                (ob.shut, ob.mid_frame)
            };
            if shut {
                return false;
            }
            if !mid {
                self.shut_frames();
                let mut buf = self.pool.take();
                let n = close.len().min(buf.len());
                buf[..n].copy_from_slice(&close[..n]);
                let (r, _) = self.write_locked(buf, 0..n).await;
                return r.is_ok();
            }
            let done = self.frame_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            drop(g);
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                self.shut_frames();
                return false;
            }
        }
    }

    /// The frame this leg is inside will never complete (its source is gone): no relay frame
    /// may follow on this leg.
    pub fn abandon_frame(&self) {
        if self.outbox.borrow().mid_frame {
            self.shut_frames();
        }
    }

    /// Whether a forwarded frame to this leg is half written.
    pub fn mid_frame(&self) -> bool {
        self.outbox.borrow().mid_frame
    }

    fn shut_frames(&self) {
        let mut ob = self.outbox.borrow_mut();
        ob.shut = true;
        ob.pong = None;
        ob.ping = false;
        drop(ob);
        self.frame_done.notify_waiters();
    }

    /// Writes what is owed (pong first: it answers the peer; then our ping). The caller holds the
    /// write gate and has checked that the leg is not inside a frame.
    async fn write_owed(&self) -> LegResult<()> {
        let mut out = [0u8; 2 * (2 + frame::MAX_CONTROL_PAYLOAD as usize)];
        let mut n = 0;
        {
            let mut ob = self.outbox.borrow_mut();
            if ob.shut {
                ob.pong = None;
                ob.ping = false;
                return Ok(());
            }
            // A server control frame's header is two bytes: FIN + opcode, then the length
            // (≤ 125, so no extended length and no mask).
            if let Some(p) = ob.pong.take() {
                // At most 125 bytes (`send_pong` clips), so the length fits the header's 7 bits.
                let len = p.len().min(frame::MAX_CONTROL_PAYLOAD as usize);
                out[..2].copy_from_slice(&[0x80 | OpCode::Pong as u8, len as u8]);
                out[2..2 + len].copy_from_slice(&p[..len]);
                n = 2 + len;
            }
            if std::mem::take(&mut ob.ping) {
                out[n..n + 2].copy_from_slice(&[0x80 | OpCode::Ping as u8, 0]);
                n += 2;
            }
        }
        if n == 0 {
            return Ok(());
        }
        let mut buf = self.pool.take();
        buf[..n].copy_from_slice(&out[..n]);
        let (r, _) = self.write_locked(buf, 0..n).await;
        r
    }

    /// Reads and discards until the end of the stream or an error (a closing leg's last
    /// bytes, so that closing never resets them).
    pub async fn drain(&self) {
        while let Ok(Some(_)) = self.read_plain(&[]).await {}
    }

    /// Writes a small relay-made message (HTTP response, control frame).
    pub async fn write_small(&self, bytes: &[u8]) -> LegResult<()> {
        let mut buf = self.pool.take();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        let (r, _) = self.write_plain(buf, 0..n).await;
        r
    }

    /// Sends TLS close_notify (on a TLS leg) and then FIN: the relay closes first.
    pub async fn finish(&self) {
        if let Some(tls) = &self.tls {
            let _g = self.gate.lock().await;
            tls.queue_close_notify(&self.pool);
            let _ = self.send_out().await;
        }
        self.io.shutdown(Shutdown::Write);
    }
}

/// Serializes writers of one connection. Shard-local: a flag and a wake-up, no lock.
#[derive(Default)]
struct Gate {
    busy: Cell<bool>,
    notify: Notify,
}

struct GateGuard<'a>(&'a Gate);

impl Gate {
    /// The gate if it is free now.
    fn try_lock(&self) -> Option<GateGuard<'_>> {
        if self.busy.get() {
            return None;
        }
        self.busy.set(true);
        Some(GateGuard(self))
    }

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
