//! The `dejavu` binary: parse, dispatch, print errors. Exit 0 on success, 1 on failure, 2 on bad usage.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        std::process::exit(cli::exit_code(&e));
    }
}
