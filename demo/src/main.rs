//! `baton-demo`: run with `cargo run --release -p baton-demo -- --listen 127.0.0.1:8080`,
//! then `kill -HUP <pid>` to upgrade it in place and `kill -TERM <pid>` to stop it.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let options = baton_demo::cli::Options::parse();
    match baton_demo::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(baton_demo::Failed) => ExitCode::FAILURE,
    }
}
