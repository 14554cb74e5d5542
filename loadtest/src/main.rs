//! `hatch-loadtest`: the load-test binary.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    eprintln!("hatch-loadtest: not yet implemented");
    ExitCode::FAILURE
}
