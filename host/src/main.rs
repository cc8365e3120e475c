//! The `switchyard` binary: parse the command line, run the command.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = switchyard::cli::Cli::parse();
    switchyard::cli::main(cli)
}
