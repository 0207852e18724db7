//! `baton-demo upgrade` and `baton-demo status`: aliases of `batonctl
//! upgrade` and `status`, on the library's client
//! ([`baton_core::control::Client`]), kept with the demo's output.

use std::path::Path;
use std::time::Duration;

use baton_core::control::{Client, ControlError};

use crate::Failed;

/// `baton-demo upgrade`: start an upgrade through the control socket at
/// `path` and wait for its outcome. Prints `upgraded: pid P generation G,
/// ready after N ms` on stdout, or why it failed on stderr (then `Err`).
pub fn upgrade(path: &Path, timeout: Duration) -> Result<(), Failed> {
    match Client::new(path).timeout(timeout).upgrade() {
        Ok(done) => {
            println!(
                "upgraded: pid {} generation {}, ready after {} ms",
                done.pid, done.generation, done.ready_ms
            );
            Ok(())
        }
        Err(ControlError::UpgradeFailed { reason }) => {
            eprintln!("baton-demo: upgrade failed: {reason}");
            Err(Failed)
        }
        Err(e) => {
            eprintln!("baton-demo: upgrade failed: {e}");
            Err(Failed)
        }
    }
}

/// `baton-demo status`: print the server's status, or why it cannot be had.
pub fn status(path: &Path, timeout: Duration) -> Result<(), Failed> {
    match Client::new(path).timeout(timeout).status() {
        Ok(answer) => {
            print!("{answer}");
            Ok(())
        }
        Err(ControlError::Refused { reason }) => {
            eprintln!("baton-demo: status: {reason}");
            Err(Failed)
        }
        Err(e) => {
            eprintln!("baton-demo: status: {e}");
            Err(Failed)
        }
    }
}
