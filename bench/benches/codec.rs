//! Codec benchmarks: frame header parse, header parse plus unmask of a whole client frame,
//! in-place unmask next to the plain byte loop, and `hatch.v1` channel-message decode and
//! encode.
//!
//! `cargo bench -p hatch-bench --bench codec`; figures in docs/BENCHMARKING.md.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hatch_bench::{KEY, frame_header, masked_frame};
use hatch_proto::channel::{ERROR_SPAWN, Message};
use hatch_proto::frame::{FrameHeader, OpCode, ParseConfig, unmask, unmask_bytewise};

fn header_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("header_parse");
    // A server reading client frames (masked): 7-bit, 16-bit and 64-bit lengths.
    for (name, len) in [("masked_7bit", 5), ("masked_16bit", 256), ("masked_64bit", 65536)] {
        let wire = frame_header(OpCode::Binary, len, Some(KEY));
        g.bench_function(name, |b| {
            b.iter(|| FrameHeader::parse(black_box(&wire), black_box(&ParseConfig::SERVER)))
        });
    }
    // A client reading server frames (unmasked).
    let wire = frame_header(OpCode::Binary, 5, None);
    g.bench_function("unmasked_7bit", |b| {
        b.iter(|| FrameHeader::parse(black_box(&wire), black_box(&ParseConfig::CLIENT)))
    });
    g.finish();

    // The relay's read step for one client frame: parse the header, unmask the payload in place.
    let mut g = c.benchmark_group("frame_read");
    for len in [16usize, 1024] {
        let mut wire = masked_frame(OpCode::Binary, len);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::new("masked", len), &len, |b, _| {
            b.iter(|| {
                let h = FrameHeader::parse(black_box(&wire), &ParseConfig::SERVER)
                    .expect("fixture is valid")
                    .expect("fixture is complete");
                let key = h.mask.expect("fixture is masked");
                unmask(&mut wire[h.header_len..], key, 0);
            })
        });
    }
    g.finish();
}

fn unmask_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for size in [16usize, 1024, 64 * 1024] {
        g.throughput(Throughput::Bytes(size as u64));
        // Start one byte into the buffer so that the payload is not 8-byte aligned, as a payload
        // after a 2- or 6-byte header is not.
        let mut buf = vec![0x5Au8; size + 1];
        g.bench_with_input(BenchmarkId::new("word", size), &size, |b, &size| {
            b.iter(|| unmask(black_box(&mut buf[1..=size]), black_box(KEY), black_box(0)))
        });
        g.bench_with_input(BenchmarkId::new("bytewise", size), &size, |b, &size| {
            b.iter(|| unmask_bytewise(black_box(&mut buf[1..=size]), black_box(KEY), black_box(0)))
        });
    }
    g.finish();
}

fn channel(c: &mut Criterion) {
    let mut g = c.benchmark_group("channel");
    let data = Message::Data(&[b'x'; 1024]).to_vec();
    let keystroke = Message::Data(b"l").to_vec();
    let resize = Message::Resize { cols: 80, rows: 24 }.to_vec();
    let exit = Message::Exit(137).to_vec();
    let error = Message::Error { code: ERROR_SPAWN, message: "no such shell" }.to_vec();
    for (name, wire) in [
        ("decode/data_1KiB", &data),
        ("decode/data_1B", &keystroke),
        ("decode/resize", &resize),
        ("decode/exit", &exit),
        ("decode/error", &error),
    ] {
        g.bench_function(name, |b| b.iter(|| Message::decode(black_box(wire))));
    }

    let payload = [b'x'; 1024];
    let mut out = Vec::with_capacity(2048);
    for (name, msg) in [
        ("encode/data_1KiB", Message::Data(&payload)),
        ("encode/data_1B", Message::Data(b"l")),
        ("encode/resize", Message::Resize { cols: 80, rows: 24 }),
        ("encode/exit", Message::Exit(137)),
    ] {
        // Into a reused buffer, as a sender reusing its write buffer does.
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                black_box(msg).encode(&mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, header_parse, unmask_throughput, channel);
criterion_main!(benches);
