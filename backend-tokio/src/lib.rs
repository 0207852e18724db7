//! Zero-downtime graceful restart for tokio servers.
//!
//! Name your listeners, hand baton the function that serves one connection,
//! and the server gets the whole lifecycle: `SIGHUP` (or `batonctl upgrade`)
//! starts the new binary and hands it the sockets, a second upgrade while one
//! runs is refused, `SIGTERM`/`SIGINT` (or `batonctl stop`) stop gracefully
//! even during an upgrade, the drain is bounded, the old generation serves
//! again if the new one dies in its first seconds, and the control socket,
//! sd_notify and the PID file come with it.
//!
//! ```no_run
//! use baton_tokio::{Config, Connection, Server, Stream, Tokio};
//! use tokio::io::AsyncWriteExt;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), baton_tokio::Error> {
//!     let config = Config::default().control("/run/app/control.sock");
//!     let mut server = Server::new(Tokio, config)?;
//!     // Inherited from the previous generation (or systemd) if it passed "http", else bound.
//!     server.listen("http", &"127.0.0.1:8080".parse().unwrap())?;
//!     let report = server
//!         .serve(|mut stream: Stream, mut conn: Connection| async move {
//!             conn.set_busy(); // a request is in progress: the drain lets it finish
//!             let _ = stream.write_all(b"hello\n").await;
//!             conn.set_idle();
//!         })
//!         .await?;
//!     eprintln!("drained: {report}");
//!     Ok(())
//! }
//! ```
//!
//! With the `hyper` feature, `hyper::serve_connection` serves a hyper 1.x
//! service on each connection with baton's drain semantics; with `axum`,
//! `axum::serve` does it for an `axum::Router` (see `examples/axum.rs`
//! and `examples/hyper.rs`). With `Config::state_versions` in both
//! generations, their keep-alive connections move to the next generation
//! open at an upgrade, with the bytes hyper read and did not parse
//! (`hyper::serve_moved` resumes them; `axum::serve` registers it). A
//! connection whose last request had a body, that asked for an HTTP
//! upgrade, or that hyper closes anyway drains instead: the `hyper`
//! module says what hyper's API allows and why those cannot move.
//!
//! Open connections can also move, open, to the next generation at an
//! upgrade instead of draining (the live handover): declare
//! `Config::state_versions`, serve moved connections with
//! `Server::on_moved(kind, task)`, and offer each connection at a safe point
//! while `Connection::can_move` says so (`Stream::into_fd` gives its socket,
//! `Stream::from_moved` takes it back). `examples/chat.rs` (`--example
//! tokio-chat`) shows the whole path.
#![forbid(unsafe_code)]

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "hyper")]
pub mod hyper;
mod listener;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Instant;

use baton_core::runtime::{BoxFuture, Runtime};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub use baton_core::server::Handle;
pub use baton_core::{handover, logger};
pub use baton_core::{
    Config, Connection, DrainReport, Error, ListenAddr, Origin, StopReason, StopToken, Tracker,
    UpgradeError, Upgraded,
};
pub use listener::{Listener, Stream};

/// A generation of a tokio server: `Server::new(Tokio, config)`.
pub type Server = baton_core::server::Server<Tokio, Listener>;

/// The tokio runtime, as baton's driver uses it. The server must be
/// created and served inside a tokio runtime with I/O and time enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokio;

/// A raw fd that tokio may watch but never closes: the lifecycle owns it.
struct Watch(RawFd);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Runtime for Tokio {
    fn name(&self) -> &'static str {
        "tokio"
    }

    fn spawn(&self, task: BoxFuture<'static, ()>) {
        tokio::spawn(task);
    }

    fn sleep_until(&self, deadline: Instant) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep_until(deadline.into()))
    }

    fn readable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>> {
        ready(fd, Interest::READABLE)
    }

    fn writable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>> {
        ready(fd, Interest::WRITABLE)
    }
}

/// Register `fd` for as long as the future lives and wait for `interest`.
fn ready(fd: BorrowedFd<'_>, interest: Interest) -> BoxFuture<'_, io::Result<()>> {
    Box::pin(async move {
        // tokio deprecated this constructor because an arbitrary `AsRawFd`
        // may close its fd while registered; its replacement cannot be
        // called under this crate's `forbid(unsafe_code)`. Here the fd is
        // borrowed (`BorrowedFd<'_>`) for longer than the `AsyncFd` lives,
        // and `Watch` never closes it: the condition the replacement's
        // contract asks for holds.
        #[allow(deprecated)]
        let watch = AsyncFd::with_interest(Watch(fd.as_raw_fd()), interest)?;
        let _guard = watch.ready(interest).await?;
        Ok(())
    })
}
