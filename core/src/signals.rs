//! The process signals baton acts on, as fds a backend's reactor can watch.
//!
//! Each signal handler (installed through `signal-hook`, which chains with
//! handlers of tokio, async-io or the application) writes one byte into a
//! socket pair: `SIGHUP` into one, `SIGTERM` and `SIGINT` into the other.
//! The read ends are non-blocking fds, so an executor-less mio loop and the
//! async driver wait on them the same way, and [`SignalPipes::take`] counts
//! what arrived without ever blocking.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::SigId;

/// What arrived since the last [`SignalPipes::take`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Arrived {
    /// `SIGHUP`s: upgrade.
    pub(crate) upgrade: usize,
    /// `SIGTERM`s and `SIGINT`s: graceful stop; a further one ends the drain.
    pub(crate) stop: usize,
}

/// `SIGHUP`, `SIGTERM` and `SIGINT` turned into two readable fds.
/// Dropping it uninstalls the handlers.
#[derive(Debug)]
pub(crate) struct SignalPipes {
    upgrade: UnixStream,
    stop: UnixStream,
    ids: Vec<SigId>,
}

impl SignalPipes {
    /// Install the handlers.
    pub(crate) fn install() -> io::Result<Self> {
        let (upgrade, upgrade_writer) = UnixStream::pair()?;
        let (stop, stop_writer) = UnixStream::pair()?;
        upgrade.set_nonblocking(true)?;
        stop.set_nonblocking(true)?;
        let mut pipes = SignalPipes {
            upgrade,
            stop,
            ids: Vec::new(),
        };
        // On error, `pipes` is dropped and uninstalls what was installed.
        pipes.ids.push(register(SIGHUP, upgrade_writer)?);
        pipes.ids.push(register(SIGTERM, stop_writer.try_clone()?)?);
        pipes.ids.push(register(SIGINT, stop_writer)?);
        Ok(pipes)
    }

    /// The fds to watch for readability.
    pub(crate) fn fds(&self) -> [BorrowedFd<'_>; 2] {
        [self.upgrade.as_fd(), self.stop.as_fd()]
    }

    /// Count the signals that arrived, without blocking.
    pub(crate) fn take(&mut self) -> Arrived {
        Arrived {
            upgrade: drain(&mut self.upgrade),
            stop: drain(&mut self.stop),
        }
    }
}

impl Drop for SignalPipes {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

fn register(signal: i32, writer: UnixStream) -> io::Result<SigId> {
    signal_hook::low_level::pipe::register(signal, writer)
}

/// Read and count every byte queued on `pipe`.
fn drain(pipe: &mut UnixStream) -> usize {
    let mut count = 0;
    let mut buf = [0u8; 64];
    // Bounded: the pipe's buffer holds a finite number of bytes, and a
    // signal storm cannot outpace this loop forever; stop after 1 MiB anyway.
    for _ in 0..16_384 {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => count += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_arrive_as_bytes_on_the_pipes() {
        let mut pipes = SignalPipes::install().unwrap();
        assert_eq!(pipes.take(), Arrived::default());
        signal_hook::low_level::raise(SIGHUP).unwrap();
        signal_hook::low_level::raise(SIGHUP).unwrap();
        // raise() runs the handler before it returns, in this thread.
        let arrived = pipes.take();
        assert_eq!(arrived.upgrade, 2);
        assert_eq!(arrived.stop, 0);
    }
}
