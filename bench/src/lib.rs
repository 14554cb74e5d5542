//! Criterion benchmarks of Hatch live in `benches/`; this library holds what they share.
