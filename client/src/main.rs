//! `hatch`: the CLI binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("hatch: not yet implemented");
    ExitCode::FAILURE
}
