//! The small trait an async runtime implements so that the one async driver
//! ([`crate::server`]) runs on it — the shape of quinn's `Runtime`.
//!
//! Everything the lifecycle waits for is an fd or a deadline, so a runtime
//! only has to say when an fd is readable or writable, sleep until an
//! instant, and spawn a task. baton-tokio and baton-smol implement it as unit
//! structs; the trait is object-safe.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::time::Instant;

/// A boxed, sendable future: what [`Runtime`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An async runtime, as baton's driver needs it.
pub trait Runtime: Send + Sync + fmt::Debug + 'static {
    /// Its name, for logs and `status` (`tokio`, `smol`).
    fn name(&self) -> &'static str;

    /// Run `task` in the background.
    fn spawn(&self, task: BoxFuture<'static, ()>);

    /// Resolve at `deadline` (at once if it has passed).
    fn sleep_until(&self, deadline: Instant) -> BoxFuture<'static, ()>;

    /// Resolve once `fd` is readable (or has an error or hang-up pending).
    /// `fd` is non-blocking and may be registered only for as long as the
    /// future lives; it is never registered twice at once.
    fn readable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>>;

    /// Resolve once `fd` is writable. Same rules as [`readable`](Self::readable).
    fn writable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>>;
}

/// A runtime's listener that the driver's accept loops accept on: the
/// listener types of baton-tokio and baton-smol.
pub trait Accept: crate::ListenerHandoff + Send + Sync + 'static {
    /// An accepted connection.
    type Stream: Send + 'static;

    /// The next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}
