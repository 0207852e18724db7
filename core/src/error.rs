//! The errors of setting up a generation.

use std::io;
use std::os::fd::RawFd;

use crate::protocol::ProtocolError;

/// Why a generation could not start serving, or could not report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The protocol variables are malformed.
    #[error("invalid socket-activation environment: {0}")]
    Protocol(#[from] ProtocolError),
    /// An inherited fd is not what the protocol or the caller says it is.
    #[error("inherited socket {name:?} (fd {fd}): {problem}")]
    Inherited {
        /// Its name in `LISTEN_FDNAMES`.
        name: String,
        /// Its fd.
        fd: RawFd,
        /// What is wrong.
        problem: String,
    },
    /// Binding a listener failed.
    #[error("cannot listen on {addr} ({name}): {source}")]
    Listen {
        /// The listener's name.
        name: String,
        /// Its address.
        addr: String,
        /// The bind or listen error.
        #[source]
        source: io::Error,
    },
    /// The inherited fds were already adopted by an earlier
    /// [`Generation::from_env`](crate::Generation::from_env) in this process.
    #[error("the inherited sockets were already adopted in this process")]
    AlreadyAdopted,
    /// `BATON_READY_FD` does not name a writable fd.
    #[error("BATON_READY_FD {fd}: {problem}")]
    ReadyFd {
        /// The fd.
        fd: RawFd,
        /// What is wrong.
        problem: String,
    },
    /// Writing the readiness report failed (the parent may have gone).
    #[error("cannot report readiness to the parent: {0}")]
    Report(#[source] io::Error),
    /// The PID file names another live process, or cannot be written.
    #[error(transparent)]
    PidFile(#[from] crate::pidfile::PidFileError),
    /// Watching the next generation failed.
    #[error("cannot watch the new generation: {0}")]
    Watch(#[source] io::Error),
    /// The signal handlers could not be installed.
    #[error("cannot handle signals: {0}")]
    Signals(#[source] io::Error),
    /// Receiving the previous generation's state failed
    /// ([`Generation::receive_state`](crate::Generation::receive_state)).
    #[error("cannot receive the previous generation's state: {0}")]
    State(#[source] crate::handover::HandoverError),
    /// The previous generation's state did not arrive in time.
    #[error("the previous generation's state did not arrive within {0:?}")]
    StateTimeout(std::time::Duration),
    /// The path of the running binary could not be found.
    #[error("cannot find the path of the running binary: {0}")]
    Program(#[source] io::Error),
}
