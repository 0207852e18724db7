//! The runtime-free core of baton: zero-downtime graceful restart for Rust
//! network servers.
//!
//! A running server starts its new binary, hands it the listening sockets,
//! waits until the new process says it serves, then stops accepting,
//! finishes its in-flight requests and exits. This crate holds everything
//! that does not wait: the wire protocol ([`protocol`], systemd's
//! `LISTEN_FDS` plus a readiness fd), adopting and binding listeners,
//! fork/exec of the next generation and its state machine ([`upgrade`]),
//! stop signalling ([`StopToken`]) and connection tracking ([`Tracker`]).
//! Everything that waits is an fd or a future that a backend (`baton-tokio`,
//! `baton-smol`, `baton-mio`) drives in its own reactor.
//!
//! The library never changes the process environment, so the variables a
//! generation inherited (`LISTEN_*`, `BATON_*`, `NOTIFY_SOCKET`) stay in it:
//! pass every `std::process::Command` the application spawns through
//! [`clear_inherited_env`] so its subprocesses do not inherit them.
//!
//! The three traits a backend implements or uses are [`ListenerHandoff`],
//! [`StopSignal`] and [`ConnectionState`].
//!
//! # Example
//!
//! A whole upgrade with a blocking wait, as a backend would drive it:
//!
//! ```no_run
//! use std::task::Poll;
//! use baton_core::{Config, Generation};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let generation = Generation::from_env(Config::default())?;
//! let (listener, _origin) =
//!     generation.listen::<baton_core::ListenSocket>("http", &"127.0.0.1:8080".parse()?)?;
//! generation.ready()?; // tell the parent, if any, that we serve
//! // ... serve `listener` in your runtime; then, on SIGHUP:
//! let mut pending = generation.start_upgrade()?;
//! // A backend registers `pending` (it is `AsFd`) in its reactor and calls
//! // `poll` when it is readable, or `time_out` at `pending.deadline()`.
//! let upgraded = loop {
//!     if let Poll::Ready(result) = pending.poll() {
//!         break result?;
//!     }
//!     # break return Ok(());
//! };
//! generation.upgraded(&upgraded); // stops this generation: drain and exit
//! # Ok(())
//! # }
//! ```

pub mod control;
pub mod duration;
pub mod lifecycle;
pub mod notify;
pub mod pidfile;
pub mod protocol;
pub mod runtime;
pub mod server;
pub mod upgrade;

mod error;
mod generation;
mod limits;
mod listeners;
pub mod logger;
mod program;
mod signals;
mod stop;
mod sys;
mod tracker;

pub use error::Error;

/// True if the peer of the Unix socket `fd` runs as this process's user or
/// as root: the check a control socket makes before it obeys (`SO_PEERCRED`).
pub fn peer_is_trusted(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<bool> {
    let uid = sys::peer_uid(fd)?;
    Ok(uid == 0 || uid == sys::effective_uid())
}

/// The user id of the peer of the Unix socket `fd` (`SO_PEERCRED`), to say
/// whom a control socket refused.
pub fn peer_uid(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u32> {
    sys::peer_uid(fd)
}
pub use generation::{current_program, Config, Generation, Successor, SuccessorWatch};
pub use limits::{raise_fd_limit, FdLimit};
pub use listeners::{ListenAddr, ListenSocket, ListenerHandoff, Origin, BACKLOG};
pub use protocol::clear_inherited_env;
pub use stop::{StopReason, StopToken};
pub use sys::{ExitStatus, SpawnMethod};
pub use tracker::{Connection, DrainReport, Tracker};
pub use upgrade::{PendingUpgrade, UpgradeError, Upgraded, Upgrader};
