//! `hatch-relay`: the relay binary.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    eprintln!("hatch-relay: not yet implemented");
    ExitCode::FAILURE
}
