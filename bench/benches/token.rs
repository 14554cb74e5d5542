//! Stream-token benchmarks: what the data plane pays per leg upgrade to verify a token (JWT,
//! Ed25519), and what the control plane pays to issue one.
//!
//! `cargo bench -p hatch-bench --bench token`; figures in docs/BENCHMARKING.md.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hatch_proto::token::Role;
use hatch_relay::token::{TokenError, TokenSigner, TokenVerifier};

/// A fixed clock, seconds since the Unix epoch: the tokens are issued and verified at it.
const NOW: u64 = 1_800_000_000;

fn token(c: &mut Criterion) {
    let (signer, _) = TokenSigner::generate("k1").expect("key generation");
    let verifier = TokenVerifier::for_signer(&signer);
    let (token, claims) = signer
        .issue("s-0123456789abcdef", Role::Client, "i-0123456789abcdef", "a-1", NOW)
        .expect("issue");
    assert_eq!(verifier.verify(&token, "s-0123456789abcdef", Role::Client, NOW), Ok(claims));

    // A token signed by another key with the same kid: full signature check, then refused.
    let (other, _) = TokenSigner::generate("k1").expect("key generation");
    let (forged, _) = other
        .issue("s-0123456789abcdef", Role::Client, "i-0123456789abcdef", "a-1", NOW)
        .expect("issue");
    assert_eq!(
        verifier.verify(&forged, "s-0123456789abcdef", Role::Client, NOW),
        Err(TokenError::BadSignature)
    );

    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify", |b| {
        b.iter(|| verifier.verify(black_box(&token), "s-0123456789abcdef", Role::Client, NOW))
    });
    g.bench_function("verify_bad_signature", |b| {
        b.iter(|| verifier.verify(black_box(&forged), "s-0123456789abcdef", Role::Client, NOW))
    });
    g.bench_function("verify_garbage", |b| {
        b.iter(|| {
            verifier.verify(black_box("not.a.token"), "s-0123456789abcdef", Role::Client, NOW)
        })
    });
    g.bench_function("issue", |b| {
        b.iter(|| {
            signer.issue("s-0123456789abcdef", Role::Client, "i-0123456789abcdef", "a-1", NOW)
        })
    });
    g.finish();
}

criterion_group!(benches, token);
criterion_main!(benches);
