//! `cargo bench -p hatch-bench --bench latency`: the load test's core at a fixed small size —
//! 100 sessions over 10 simulated agents, 16-byte DATA at 10/s for 5 s, relay and floor — so a
//! CI run prints the same report as `hatch-loadtest` in well under a minute.
//!
//! The load test runs its relay, echo server and workers as separate processes by re-executing
//! the current binary with a hidden subcommand; this bench binary answers those subcommands
//! too, so it needs nothing but itself.

use std::process::ExitCode;

use clap::Parser;
use hatch_loadtest::cli::{Args, main as loadtest_main};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hidden subcommands of `hatch-loadtest` that the parent re-executes this binary with.
const SUBCOMMANDS: [&str; 3] = ["worker", "floor-process", "relay-process"];

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).is_some_and(|a| SUBCOMMANDS.contains(&a.as_str())) {
        return loadtest_main(Args::parse_from(argv));
    }
    // `cargo bench` passes `--bench` (and `cargo test --benches` nothing useful): this bench has
    // one fixed configuration, so other arguments are ignored; `--json` is kept.
    let json = argv.iter().any(|a| a == "--json");
    let mut fixed = vec![
        "hatch-loadtest",
        "--sessions",
        "100",
        "--instances",
        "10",
        "--ramp",
        "200",
        "--duration",
        "5",
    ];
    if json {
        fixed.push("--json");
    }
    loadtest_main(Args::parse_from(fixed))
}
