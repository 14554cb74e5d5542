//! `hatch-relay`: the relay binary. Everything is in the library ([`hatch_relay::cli::run`]).

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    hatch_relay::cli::run(std::env::args_os())
}
