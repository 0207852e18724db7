//! Zero-downtime graceful restart for smol servers (async-io, any executor).
//!
//! Name your listeners, hand baton the function that serves one connection,
//! and the server gets the whole lifecycle: `SIGHUP` (or `batonctl upgrade`)
//! starts the new binary and hands it the sockets, a second upgrade while one
//! runs is refused, `SIGTERM`/`SIGINT` (or `batonctl stop`) stop gracefully
//! even during an upgrade, the drain is bounded, the old generation serves
//! again if the new one dies in its first seconds, and the control socket,
//! sd_notify and the PID file come with it. There is no tokio in its tree.
//!
//! ```no_run
//! use std::sync::Arc;
//! use baton_smol::{Config, Connection, Server, Smol, Stream};
//! use futures_lite::AsyncWriteExt;
//!
//! fn main() -> Result<(), baton_smol::Error> {
//!     let executor = Arc::new(async_executor::Executor::new());
//!     let mut server = Server::new(Smol::new(executor.clone()), Config::default())?;
//!     // Inherited from the previous generation (or systemd) if it passed "http", else bound.
//!     server.listen("http", &"127.0.0.1:8080".parse().unwrap())?;
//!     let serve = server.serve(|mut stream: Stream, mut conn: Connection| async move {
//!         conn.set_busy(); // a request is in progress: the drain lets it finish
//!         let _ = stream.write_all(b"hello\n").await;
//!         conn.set_idle();
//!     });
//!     let report = async_io::block_on(executor.run(serve))?;
//!     eprintln!("drained: {report}");
//!     Ok(())
//! }
//! ```
//!
//! Open connections can also move, open, to the next generation at an
//! upgrade instead of draining (the live handover): declare
//! `Config::state_versions`, serve moved connections with
//! `Server::on_moved(kind, task)`, and offer each connection at a safe point
//! while `Connection::can_move` says so (`Stream::into_fd` gives its socket,
//! `Stream::from_moved` takes it back). `examples/chat.rs` (`--example
//! smol-chat`) shows the whole path.
#![forbid(unsafe_code)]

mod listener;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Instant;

use async_executor::Executor;
use async_io::{Async, Timer};
use baton_core::runtime::{BoxFuture, Runtime};

pub use baton_core::server::Handle;
pub use baton_core::{handover, logger};
pub use baton_core::{
    Config, Connection, DrainReport, Error, ListenAddr, Origin, StopReason, StopToken, Tracker,
    UpgradeError, Upgraded,
};
pub use listener::{Listener, Stream};

/// A generation of a smol server: `Server::new(Smol::new(executor), config)`.
pub type Server = baton_core::server::Server<Smol, Listener>;

/// async-io's reactor and timers, with tasks spawned on an executor the
/// application runs.
#[derive(Debug, Clone)]
pub struct Smol {
    executor: Arc<Executor<'static>>,
}

impl Smol {
    /// Spawn baton's tasks (accept loops, connections, the control socket)
    /// on `executor`; the application runs it (`executor.run(…)`).
    pub fn new(executor: Arc<Executor<'static>>) -> Self {
        Smol { executor }
    }
}

impl Runtime for Smol {
    fn name(&self) -> &'static str {
        "smol"
    }

    fn spawn(&self, task: BoxFuture<'static, ()>) {
        self.executor.spawn(task).detach();
    }

    fn sleep_until(&self, deadline: Instant) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            Timer::at(deadline).await;
        })
    }

    fn readable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>> {
        // The fd is non-blocking already: register it as is, never touching
        // flags of a description another process may share.
        Box::pin(async move { Async::new_nonblocking(fd)?.readable().await })
    }

    fn writable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { Async::new_nonblocking(fd)?.writable().await })
    }
}
