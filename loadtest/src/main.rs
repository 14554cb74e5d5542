//! `hatch-loadtest`: the load-test binary (see the library's module map).

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = hatch_loadtest::cli::Args::parse();
    hatch_loadtest::cli::main(args)
}
