//! Codec benchmarks: header parse, in-place unmask, channel-message decode.

use criterion::{Criterion, criterion_group, criterion_main};

fn unmask(c: &mut Criterion) {
    let mut buf = vec![0u8; 1024];
    c.bench_function("unmask/1KiB", |b| {
        b.iter(|| hatch_proto::frame::unmask(&mut buf, [1, 2, 3, 4], 0))
    });
}

criterion_group!(benches, unmask);
criterion_main!(benches);
