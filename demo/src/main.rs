//! `baton-demo`: run with `cargo run --release -p baton-demo -- --listen 127.0.0.1:8080`,
//! then `kill -HUP <pid>` to upgrade it in place and `kill -TERM <pid>` to stop it.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    use baton_demo::cli::Subcommand;
    let options = baton_demo::cli::Options::parse();
    let result = match &options.command {
        None => baton_demo::run(&options),
        Some(Subcommand::Upgrade { control, timeout }) => {
            baton_demo::control_client::upgrade(control, *timeout)
        }
        Some(Subcommand::Status { control, timeout }) => {
            baton_demo::control_client::status(control, *timeout)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(baton_demo::Failed) => ExitCode::FAILURE,
    }
}
