//! Run: cargo run -p baton-core --example adopt_and_spawn -- OUTPUT [ADDR]
//!
//! A minimal baton generation that spawns a process of its own: it adopts
//! the sockets its parent passed (`Generation::from_env`), claims the
//! listener `http` (or binds ADDR, default `127.0.0.1:0`, when started by
//! hand), then runs `sh -c 'ls -l /proc/self/fd; echo LISTEN_PID=… pid=$$'`
//! with its output in the file OUTPUT (after a line saying whether
//! `http` was inherited or bound), waits for it, reports ready and exits.
//!
//! `core/tests/hygiene.rs` starts it as a baton child and reads OUTPUT: the
//! grandchild must hold no socket (adopted sockets are close-on-exec) and
//! see a `LISTEN_PID` that is not its own (so it ignores the `LISTEN_*`
//! variables it inherited: the library never mutates the environment).

use std::fs::File;
use std::io::Write as _;
use std::process::{Command, ExitCode};

use baton_core::{Config, Generation, ListenAddr, ListenSocket};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(output) = args.next() else {
        eprintln!("usage: adopt_and_spawn OUTPUT [ADDR]");
        return ExitCode::from(2);
    };
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".to_owned());
    match run(&output, &addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("adopt_and_spawn: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(output: &str, addr: &str) -> Result<(), Box<dyn std::error::Error>> {
    let generation = Generation::from_env(Config::default())?;
    let addr: ListenAddr = addr.parse()?;
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let (listener, origin) = generation.listen::<ListenSocket>("http", &addr)?;
        let mut file = File::create(output)?;
        writeln!(file, "listener http: {origin:?}")?;
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg("ls -l /proc/self/fd; echo \"LISTEN_PID=$LISTEN_PID pid=$$\"")
            .stdout(file)
            .status()?;
        if !status.success() {
            return Err(format!("the grandchild ended with {status}").into());
        }
        // The listener is held until here, so the grandchild ran while it was open.
        drop(listener);
        Ok(())
    })();
    match result {
        Ok(()) => {
            generation.ready()?;
            Ok(())
        }
        Err(e) => {
            // Tell a baton parent why, so its upgrade fails with the reason.
            let _ = generation.report_error(&e.to_string());
            Err(e)
        }
    }
}
