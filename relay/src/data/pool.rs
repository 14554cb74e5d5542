//! Per-shard pool of read and ciphertext buffers.
//!
//! A connection takes a buffer only once its socket is readable (or it has bytes to write) and
//! gives it back as soon as the bytes have moved on, so an idle session pins no buffer. The pool
//! is shard-local (`Rc`, no lock) and keeps at most [`KEEP`] free buffers.

use std::cell::RefCell;
use std::sync::Arc;

use super::metrics::ShardMetrics;

/// Size of every pooled buffer: one TLS record's plaintext (16 KiB) plus framing, twice, so a
/// read usually drains the socket in one go. Well under the per-direction bound.
pub const BUF_SIZE: usize = 32 * 1024;

/// Free buffers kept for reuse; more are freed.
const KEEP: usize = 256;

/// The pool. Buffers always have `len() == BUF_SIZE` (zeroed once, at allocation).
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

    /// A buffer of [`BUF_SIZE`] bytes.
    pub fn take(&self) -> Vec<u8> {
        ShardMetrics::add(&self.metrics.buffers, 1);
        self.free.borrow_mut().pop().unwrap_or_else(|| vec![0u8; BUF_SIZE])
    }

    /// Returns a buffer taken from [`Pool::take`] (every taken buffer comes back here, also on
    /// error paths, or the gauge shows it as held).
    pub fn give(&self, mut buf: Vec<u8>) {
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
