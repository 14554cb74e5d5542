//! Per-shard pool of read and ciphertext buffers.
//!
//! A connection takes a buffer only once its socket is readable (or it has bytes to write) and
//! lets go of it as soon as the bytes have moved on, so an idle session pins no buffer. A
//! [`Buf`] returns itself to its pool when dropped, so no path (an error, an early return) can
//! leak one; it lends its `Vec` only to the I/O interface, which moves buffers by value. The
//! pool is shard-local (`Rc`, no lock) and keeps at most [`KEEP`] free buffers.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;
use std::sync::Arc;

use super::metrics::ShardMetrics;

/// Size of every pooled buffer: one TLS record's plaintext (16 KiB) plus framing, twice, so a
/// read usually drains the socket in one go. Well under the per-direction bound.
pub const BUF_SIZE: usize = 32 * 1024;

/// Free buffers kept for reuse; more are freed.
const KEEP: usize = 256;

/// The pool. Buffers always have `len() == BUF_SIZE` when taken (zeroed once, at allocation).
pub struct Pool {
    free: RefCell<Vec<Vec<u8>>>,
    /// Where the buffers taken and not given back are counted (`hatch_data_buffers_in_use`):
    /// zero on an idle relay, which is what keeps idle sessions cheap.
    metrics: Arc<ShardMetrics>,
}

impl Pool {
    /// An empty pool counting its buffers in use in `metrics`.
    pub fn new(metrics: Arc<ShardMetrics>) -> Self {
        Pool { free: RefCell::default(), metrics }
    }

    /// A buffer of [`BUF_SIZE`] bytes; it comes back when dropped.
    pub fn take(self: &Rc<Self>) -> Buf {
        ShardMetrics::add(&self.metrics.buffers, 1);
        let vec = self.free.borrow_mut().pop().unwrap_or_else(|| vec![0u8; BUF_SIZE]);
        Buf { vec, pool: self.clone() }
    }

    fn put(&self, mut buf: Vec<u8>) {
        ShardMetrics::dec(&self.metrics.buffers);
        if buf.capacity() < BUF_SIZE {
            return;
        }
        buf.resize(BUF_SIZE, 0);
        let mut free = self.free.borrow_mut();
        if free.len() < KEEP {
            free.push(buf);
        }
    }
}

/// A pooled buffer (see the module docs).
pub struct Buf {
    vec: Vec<u8>,
    pool: Rc<Pool>,
}

impl Buf {
    /// Lends the buffer's `Vec` to an I/O operation (the I/O interface moves buffers by value):
    /// the `Vec` and the pool it goes back to. [`Lent::back`] makes it a `Buf` again. Were the
    /// operation's future dropped, the `Vec` would be freed, not pooled, and the in-use gauge
    /// would keep counting it; the I/O rules forbid dropping one anyway. (A plain pair, not an
    /// async wrapper: it sits in every read and write future of every leg.)
    pub fn lend(mut self) -> (Vec<u8>, Lent) {
        let vec = std::mem::take(&mut self.vec);
        let pool = self.pool.clone();
        std::mem::forget(self);
        (vec, Lent(pool))
    }

    /// Grows the buffer (one TLS message larger than what is left of it); the pool shrinks it
    /// back when it returns.
    pub fn grow_to(&mut self, len: usize) {
        if len > self.vec.len() {
            self.vec.resize(len, 0);
        }
    }
}

/// The pool a lent buffer goes back to.
pub struct Lent(Rc<Pool>);

impl Lent {
    /// The buffer, back from its I/O operation.
    pub fn back(self, vec: Vec<u8>) -> Buf {
        Buf { vec, pool: self.0 }
    }
}

impl Deref for Buf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.vec
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.vec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_use(p: &Pool) -> u64 {
        p.metrics.buffers.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn a_buffer_comes_back_when_dropped_also_after_growing_or_lending() {
        let pool = Rc::new(Pool::new(Arc::default()));
        let mut a = pool.take();
        let b = pool.take();
        assert_eq!(in_use(&pool), 2);
        a.grow_to(BUF_SIZE + 100);
        assert_eq!(a.len(), BUF_SIZE + 100);
        drop(a);
        drop(b);
        assert_eq!(in_use(&pool), 0);
        assert_eq!(pool.free.borrow().len(), 2);
        // Reused, and back to its size.
        let a = pool.take();
        assert_eq!(a.len(), BUF_SIZE);
        assert_eq!(pool.free.borrow().len(), 1);
        let (v, lent) = a.lend();
        assert_eq!((v.len(), in_use(&pool)), (BUF_SIZE, 1));
        drop(lent.back(v));
        assert_eq!(in_use(&pool), 0);
        assert_eq!(pool.free.borrow().len(), 2);
    }
}
