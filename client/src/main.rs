//! `hatch`: the CLI binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    hatch_client::run(std::env::args_os())
}
