//! `baton-bench`: compare the compiled backends of baton-demo under load,
//! steady, during upgrades, and against a restart without handoff.
//! Build both binaries, then run it: `cargo build --release -p baton-demo --all-features --bins`,
//! `target/release/baton-bench --duration 10s`;
//! what it measures and how is in `baton_demo::bench`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let options = baton_demo::bench::Options::parse();
    match baton_demo::bench::run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        // The table is printed; failures in baton's rows or failed runs make it exit 1.
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("baton-bench: error: {e}");
            ExitCode::from(2)
        }
    }
}
