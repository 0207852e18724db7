//! The client of the control socket ([`crate::control`]): the
//! `baton-demo upgrade` and `baton-demo status` commands. Blocking std I/O,
//! every wait bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::control;
use crate::Failed;

/// Largest answer read.
const MAX_ANSWER: u64 = 64 * 1024;

/// Send `command` to the control socket at `path` and return the whole
/// answer, read until the server closes, within `timeout`.
pub fn request(path: &Path, command: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let context = |what: &str, e: std::io::Error| {
        format!("{what} the control socket {}: {e}", path.display())
    };
    let mut stream = UnixStream::connect(path).map_err(|e| context("cannot connect to", e))?;
    stream
        .set_write_timeout(Some(control::COMMAND_TIMEOUT))
        .and_then(|()| stream.write_all(format!("{command}\n").as_bytes()))
        .map_err(|e| context("cannot send the command to", e))?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    // Bounded by the deadline and by MAX_ANSWER.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no answer from {} within {timeout:?}",
                path.display()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| context("cannot read from", e))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.len() as u64 > MAX_ANSWER {
                    return Err("the answer is too long".to_owned());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no answer from {} within {timeout:?}",
                    path.display()
                ))
            }
            Err(e) => return Err(context("cannot read from", e)),
        }
    }
    String::from_utf8(answer).map_err(|_| "the answer is not UTF-8".to_owned())
}

/// `baton-demo upgrade`: start an upgrade through the control socket at
/// `path` and wait for its outcome. Prints `upgraded: pid P generation G,
/// ready after N ms` on stdout, or why it failed on stderr (then `Err`).
pub fn upgrade(path: &Path, timeout: Duration) -> Result<(), Failed> {
    let outcome = request(path, "upgrade", timeout).and_then(|a| control::parse_outcome(&a));
    match outcome {
        Ok(done) => {
            println!(
                "upgraded: pid {} generation {}, ready after {} ms",
                done.pid, done.generation, done.ready_ms
            );
            Ok(())
        }
        Err(reason) => {
            eprintln!("baton-demo: upgrade failed: {reason}");
            Err(Failed)
        }
    }
}

/// `baton-demo status`: print the server's status, or why it cannot be had.
pub fn status(path: &Path, timeout: Duration) -> Result<(), Failed> {
    match request(path, "status", timeout) {
        Ok(answer) if !answer.starts_with("error ") && !answer.is_empty() => {
            print!("{answer}");
            Ok(())
        }
        Ok(answer) => {
            let reason = answer.trim().strip_prefix("error ").unwrap_or("no answer");
            eprintln!("baton-demo: status: {reason}");
            Err(Failed)
        }
        Err(reason) => {
            eprintln!("baton-demo: status: {reason}");
            Err(Failed)
        }
    }
}
