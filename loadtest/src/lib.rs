//! The Hatch load test.
