//! `hatch-agent`: the agent binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = hatch_agent::cli::Cli::parse();
    hatch_agent::cli::init_tracing(cli.verbose, cli.log_format);
    hatch_agent::cli::run(cli)
}
