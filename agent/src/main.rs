//! `hatch-agent`: the agent binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("hatch-agent: not yet implemented");
    ExitCode::FAILURE
}
