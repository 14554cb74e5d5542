//! One forward step of the relay (`hatch_proto::forward::step`): masked client frames in a
//! read buffer become server frames in place (unmask, re-header into the headroom, compact).
//!
//! `cargo bench -p hatch-bench --bench forward`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hatch_proto::forward::{Deframer, step};
use hatch_proto::frame::{self, OpCode, ParseConfig};

/// `count` masked binary frames of `size` bytes each, back to back.
fn frames(size: usize, count: usize) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = Vec::new();
    for _ in 0..count {
        let mut h = [0u8; frame::MAX_HEADER_LEN];
        let n = frame::encode_header(true, OpCode::Binary, size as u64, Some(key), &mut h);
        out.extend_from_slice(&h[..n]);
        let mut p = vec![0x61u8; size];
        frame::unmask(&mut p, key, 0);
        out.extend_from_slice(&p);
    }
    out
}

fn forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward_step");
    for (name, size, count) in [("16B", 16, 1), ("16KiB", 16 * 1024, 1), ("64x16B", 16, 64)] {
        let input = frames(size, count);
        g.throughput(Throughput::Bytes((size * count) as u64));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || input.clone(),
                |buf| {
                    let len = buf.len();
                    let s = step(buf, 0, len, &mut Deframer::default(), &ParseConfig::SERVER);
                    assert_eq!(s.consumed, len);
                    s.out
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
