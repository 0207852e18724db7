//! The runtime-free core of baton: zero-downtime graceful restart for Rust
//! network servers.
//!
//! A running server starts its new binary, hands it the listening sockets,
//! waits until the new process says it serves, then stops accepting,
//! finishes its in-flight requests and exits. An application uses a
//! backend crate — `baton-tokio`, `baton-smol` or `baton-mio` — whose first
//! example is the path to take; this crate is what they share:
//!
//! - [`lifecycle`]: everything from "serving" to "exit", written once, as a
//!   sans-IO state machine (in the manner of quinn-proto): upgrades and
//!   their refusal, stops (sticky; a second one ends the drain), the drain
//!   with its deadline, the successor watch and resume, sd_notify and the
//!   PID file. It waits for nothing: a backend feeds it readable fds,
//!   requests and the time, and acts on its events.
//! - [`server`]: the one async driver of the lifecycle, over the small
//!   [`runtime::Runtime`] trait that baton-tokio and baton-smol implement
//!   (readiness of an fd, a timer, spawn): accept loops, the control socket,
//!   resume. baton-mio drives the lifecycle from a `mio::Poll` instead.
//! - [`control`]: the control socket's protocol (`upgrade`, `status`,
//!   `stop`) and its client, which `batonctl` is built on.
//! - the wire protocol ([`protocol`]: systemd's `LISTEN_FDS` plus a
//!   readiness fd), adopting and binding listeners ([`Generation`]),
//!   starting the next generation ([`upgrade`], with `vfork` semantics),
//!   [`StopToken`] and the connection [`Tracker`] (runtime-agnostic: futures
//!   on any executor, or flags a mio loop reads).
//!
//! Two traits are the points where backends plug in: [`ListenerHandoff`]
//! (a runtime's listener type from an adopted socket) and
//! [`runtime::Runtime`] (with [`runtime::Accept`] for its listeners).
//!
//! The library never changes the process environment, so the variables a
//! generation inherited (`LISTEN_*`, `BATON_*`, `NOTIFY_SOCKET`) stay in it:
//! pass every `std::process::Command` the application spawns through
//! [`clear_inherited_env`] so its subprocesses do not inherit them.
//!
//! # Example
//!
//! The lifecycle driven by hand, with poll(2) as the reactor — what a
//! backend does:
//!
//! ```no_run
//! use std::time::Instant;
//! use baton_core::lifecycle::{Event, Lifecycle, Timeouts};
//! use baton_core::{Config, Generation, ListenSocket};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let generation = Generation::from_env(Config::default())?;
//! let (_listener, _origin) =
//!     generation.listen::<ListenSocket>("http", &"127.0.0.1:8080".parse()?)?;
//! let mut lifecycle = Lifecycle::new(generation, Timeouts::default());
//! lifecycle.handle_signals()?; // SIGHUP upgrades, SIGTERM/SIGINT stop
//! lifecycle.ready()?; // the previous generation, if any, drains now
//! loop {
//!     while let Some(event) = lifecycle.poll_event() {
//!         match event {
//!             Event::Exit(report) => return Ok(println!("drained: {report}")),
//!             Event::StopAccepting(_) => { /* drop the listeners */ }
//!             _ => { /* resume accepting, close idle connections, … */ }
//!         }
//!     }
//!     // Wait until an fd of `lifecycle.watched()` is readable or
//!     // `lifecycle.poll_timeout()` passes, then:
//!     lifecycle.handle_readable(Instant::now());
//! }
//! # }
//! ```

pub mod control;
pub mod duration;
pub mod handover;
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
pub use tracker::{Connection, DrainReport, Offer, Tracker};
pub use upgrade::{PendingUpgrade, UpgradeError, Upgraded, Upgrader};
