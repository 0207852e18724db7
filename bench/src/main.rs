//! `baton-bench`: compare the backends of baton-demo under load, steady,
//! during upgrades, and against a restart without handoff.
//!
//! `cargo run --release -p baton-bench` builds the demo with every backend
//! first and compares them all; `-- --duration 10s --backend tokio,mio`
//! and the other flags are in `--help`. What it measures and how is in
//! `baton_bench`'s docs.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let options = baton_bench::Options::parse();
    match baton_bench::run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        // The table is printed; failures in baton's rows or failed runs make it exit 1.
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("baton-bench: error: {e}");
            ExitCode::from(2)
        }
    }
}
