//! The TLS driver: rustls's *unbuffered* API (`UnbufferedServerConnection`) over owned,
//! pooled buffers, with no I/O of its own (the leg, [`super::conn`], reads and writes).
//!
//! tokio-uring has no `AsyncRead`/`AsyncWrite`, and no maintained crate bridges it, so rustls is
//! driven directly. Between calls rustls holds none of the connection's bytes: it decrypts in
//! the caller's buffer, and what it hands out (plaintext, messages to send) is drained at once.
//! (rustls 0.23 still copies each record's plaintext through a short-lived `Vec`, and encrypts
//! each record through one.)
//!
//! ```text
//!  ciphertext (pool buf, after carry) ──process_tls_records──▶ decrypted in place
//!         ──ReadTraffic──▶ payloads compacted to the front of the same buf ──▶ carry + plaintext
//!  plaintext ──WriteTraffic::encrypt──▶ ciphertext (pool buf `out`) ──▶ the leg writes it
//!  handshake flights, KeyUpdate replies, alerts ──EncodeTlsData──▶ `out` ──▶ the leg writes it
//! ```
//!
//! Everything rustls asks to send goes into the one `out` buffer in the order rustls produced
//! it, and only the holder of the leg's write gate sends it, so TLS records and frames never
//! interleave and a KeyUpdate reply always precedes records under the new key.

use std::cell::{Cell, RefCell, RefMut};
use std::io;
use std::rc::Rc;

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, EncryptError};

use super::error::{LegError, LegResult, PeerRule};
use super::pool::{Buf, Pool};

/// Largest plaintext of one TLS record (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 16 * 1024;

/// TLS record header length.
const RECORD_HEADER: usize = 5;

/// A leg's TLS state: rustls and the bytes it made that are not yet sent.
pub struct Tls {
    conn: RefCell<UnbufferedServerConnection>,
    /// Encoded TLS bytes not yet sent (pool buffer, filled length), in the order rustls made them.
    /// Appended to while `conn` is borrowed; sent only by the write gate's holder.
    out: RefCell<Option<(Buf, usize)>>,
    /// The peer's close_notify arrived (rustls reports it once; whoever sees it records it).
    peer_closed: Cell<bool>,
    /// Our close_notify went into `out`: nothing more is written.
    sent_close: Cell<bool>,
    /// rustls failed (or refused input): nobody calls into it again.
    failed: Cell<bool>,
}
/// What one pass of the reader over its input ended with.
pub(super) enum Step {
    /// All complete records are processed; more bytes are needed.
    NeedInput,
    /// Encoded bytes wait in `out`: send them, then process again.
    Transmit,
    /// The peer sent close_notify.
    PeerClosed,
    /// rustls (or our own checks) refused the input; an alert may wait in `out`.
    Failed(LegError),
}

impl Tls {
    /// A connection in its handshake.
    pub fn new(conn: UnbufferedServerConnection) -> Tls {
        Tls {
            conn: RefCell::new(conn),
            out: RefCell::new(None),
            peer_closed: Cell::new(false),
            sent_close: Cell::new(false),
            failed: Cell::new(false),
        }
    }

    /// rustls's state, for a handoff (bytes not yet sent are dropped: the caller checks
    /// [`Tls::holds_out`] first).
    pub fn into_conn(self) -> UnbufferedServerConnection {
        self.conn.into_inner()
    }

    /// Whether encoded bytes wait to be sent.
    pub fn holds_out(&self) -> bool {
        self.out.borrow().is_some()
    }

    /// Takes the encoded bytes to send (buffer, filled length). Only the write gate's holder.
    pub fn take_out(&self) -> Option<(Buf, usize)> {
        self.out.borrow_mut().take()
    }

    /// The peer's close_notify arrived.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed.get()
    }

    /// rustls failed; nobody calls into it again.
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// Records a failure seen by the caller (a record too large, input over a buffer).
    pub fn fail(&self) {
        self.failed.set(true);
    }

    /// Runs rustls over `buf[*start..]` until it needs more input or bytes must be sent.
    /// Decrypted payloads are appended at `buf[*w..]` (always in front of `*start`: a record's
    /// plaintext is shorter than the record); `*start` advances by what rustls discards.
    pub(super) fn process(
        &self,
        pool: &Rc<Pool>,
        buf: &mut [u8],
        w: &mut usize,
        start: &mut usize,
    ) -> Step {
        let mut conn = self.conn.borrow_mut();
        loop {
            let (head, input) = buf.split_at_mut(*start);
            let status = conn.process_tls_records(input);
            let discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    *start += discard;
                    drop(conn);
                    self.queue_alert(pool, &mut buf[*start..]);
                    return Step::Failed(tls_err(e));
                }
            };
            let step = match state {
                ConnectionState::ReadTraffic(mut rt) => {
                    let mut stuck = false;
                    loop {
                        if let Some(n) = rt.peek_len()
                            && *w + n.get() > head.len()
                        {
                            // The record is not yet discarded: copy after applying `discard`.
                            stuck = discard == 0;
                            break;
                        }
                        match rt.next_record() {
                            None => break,
                            Some(Ok(rec)) => {
                                let n = rec.payload.len();
                                head[*w..*w + n].copy_from_slice(rec.payload);
                                *w += n;
                            }
                            Some(Err(e)) => {
                                *start += discard;
                                return Step::Failed(tls_err(e));
                            }
                        }
                    }
                    stuck.then(|| Step::Failed(LegError::Peer(PeerRule::PlaintextDoesNotFit)))
                }
                ConnectionState::EncodeTlsData(mut enc) => {
                    self.append_encoded(pool, &mut enc).err().map(Step::Failed)
                }
                ConnectionState::TransmitTlsData(t) => {
                    if self.out.borrow().is_some() {
                        Some(Step::Transmit)
                    } else {
                        // Whoever took `out` under the write gate is sending it.
                        t.done();
                        None
                    }
                }
                ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => {
                    Some(Step::NeedInput)
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.peer_closed.set(true);
                    Some(Step::PeerClosed)
                }
                _ => Some(Step::Failed(LegError::Peer(PeerRule::UnexpectedState))),
            };
            *start += discard;
            match step {
                None => continue,
                Some(Step::NeedInput) if self.peer_closed.get() => return Step::PeerClosed,
                Some(Step::NeedInput | Step::Transmit)
                    if !conn.is_handshaking() && holds_whole_record(&buf[*start..]) =>
                {
                    // rustls keeps whole records only to reassemble a handshake message split
                    // across them. Writers call rustls with no input, which is only sound while
                    // it keeps none, so after the handshake this (legal, but never seen from
                    // a real client) fragmentation is refused.
                    return Step::Failed(LegError::Peer(PeerRule::FragmentedAfterHandshake));
                }
                Some(s) => return s,
            }
        }
    }

    /// After rustls failed: encodes the alert it queued (if any) into `out`.
    pub(super) fn queue_alert(&self, pool: &Rc<Pool>, input: &mut [u8]) {
        let mut conn = self.conn.borrow_mut();
        // Only while messages are queued: rustls then hands them out before it looks at the
        // input again (which would fail a second time).
        while conn.wants_write() {
            let status = conn.process_tls_records(input);
            let Ok(ConnectionState::EncodeTlsData(mut enc)) = status.state else { return };
            if self.append_encoded(pool, &mut enc).is_err() {
                return;
            }
        }
    }

    /// Appends a message rustls queued (handshake, alert) to `out`.
    pub(super) fn append_encoded(
        &self,
        pool: &Rc<Pool>,
        enc: &mut EncodeTlsData<'_, ServerConnectionData>,
    ) -> LegResult<()> {
        self.append_out(pool, |out| match enc.encode(out) {
            Ok(n) => Ok(n),
            Err(EncodeError::InsufficientSize(s)) => Err(Some(s.required_size)),
            Err(EncodeError::AlreadyEncoded) => Err(None),
        })
    }

    /// Appends to `out` (taking a pool buffer if there is none) with `f`, which returns the
    /// bytes written or the space it needs (`None`: it cannot write at all). Grows the buffer
    /// when one message needs more than is left.
    pub(super) fn append_out(
        &self,
        pool: &Rc<Pool>,
        mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
    ) -> LegResult<()> {
        let mut out = self.out.borrow_mut();
        let (buf, len) = out.get_or_insert_with(|| (pool.take(), 0));
        let n = match f(&mut buf[*len..]) {
            Ok(n) => n,
            Err(Some(need)) => {
                buf.grow_to(*len + need);
                f(&mut buf[*len..]).map_err(|_| tls_other("TLS encoding failed"))?
            }
            Err(None) => return Err(tls_other("TLS encoding failed")),
        };
        *len += n;
        Ok(())
    }

    /// Encrypts from the front of `data` into `out` until all of it is in or `out` is full.
    pub(super) fn encrypt(&self, pool: &Rc<Pool>, data: &mut &[u8]) -> LegResult<()> {
        let mut conn = self.usable()?;
        loop {
            // No input: the reader leaves rustls with none pending (see `process`).
            let status = conn.process_tls_records(&mut []);
            match status.state.map_err(tls_err)? {
                ConnectionState::EncodeTlsData(mut enc) => self.append_encoded(pool, &mut enc)?,
                // What was encoded is in `out`, which our caller sends before the gate opens.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::PeerClosed => self.peer_closed.set(true),
                ConnectionState::WriteTraffic(mut wt) => {
                    while !data.is_empty() {
                        let n = data.len().min(MAX_FRAGMENT);
                        let mut out = self.out.borrow_mut();
                        let (buf, len) = out.get_or_insert_with(|| (pool.take(), 0));
                        match wt.encrypt(&data[..n], &mut buf[*len..]) {
                            Ok(k) => {
                                *len += k;
                                *data = &data[n..];
                            }
                            // Full: send what is there first.
                            Err(EncryptError::InsufficientSize(_)) if *len > 0 => return Ok(()),
                            Err(EncryptError::InsufficientSize(s)) => {
                                buf.grow_to(s.required_size);
                            }
                            Err(e) => {
                                self.failed.set(true);
                                return Err(tls_other(e));
                            }
                        }
                    }
                    return Ok(());
                }
                ConnectionState::Closed => {
                    return Err(LegError::local("TLS connection closed"));
                }
                ConnectionState::BlockedHandshake => {
                    return Err(LegError::local("TLS handshake not complete"));
                }
                _ => return Err(tls_other("unexpected TLS state")),
            }
        }
    }

    /// The connection for a writer: not after a failure or our close_notify, and not during the
    /// handshake (only the reader drives rustls then; writes start after the request head).
    pub(super) fn usable<'a>(&'a self) -> LegResult<RefMut<'a, UnbufferedServerConnection>> {
        if self.failed.get() {
            return Err(LegError::local("TLS connection failed"));
        }
        if self.sent_close.get() {
            return Err(LegError::local("TLS close_notify sent"));
        }
        let conn = self.conn.borrow_mut();
        if conn.is_handshaking() {
            return Err(LegError::local("TLS handshake not complete"));
        }
        Ok(conn)
    }

    /// Encodes what rustls still has queued, then close_notify, into `out` (best effort: not
    /// after a failure, before the handshake completed, or twice).
    pub(super) fn queue_close_notify(&self, pool: &Rc<Pool>) {
        let Ok(mut conn) = self.usable() else { return };
        // Bounded: each pass either takes one queued message or ends.
        for _ in 0..16 {
            let status = conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if self.append_encoded(pool, &mut enc).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::PeerClosed) => self.peer_closed.set(true),
                Ok(ConnectionState::WriteTraffic(mut wt)) => {
                    self.sent_close.set(true);
                    let _ = self.append_out(pool, |out| match wt.queue_close_notify(out) {
                        Ok(n) => Ok(n),
                        Err(EncryptError::InsufficientSize(s)) => Err(Some(s.required_size)),
                        Err(_) => Err(None),
                    });
                    return;
                }
                _ => return,
            }
        }
    }
}

/// Whether `b` starts with a complete TLS record.
fn holds_whole_record(b: &[u8]) -> bool {
    b.len() >= RECORD_HEADER
        && RECORD_HEADER + usize::from(u16::from_be_bytes([b[3], b[4]])) <= b.len()
}

fn tls_other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> LegError {
    LegError::Io(io::Error::other(e))
}

fn tls_err(e: rustls::Error) -> LegError {
    LegError::from(e)
}
