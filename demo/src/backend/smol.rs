//! The demo over baton-smol: a multi-threaded `smol::Executor` with
//! async-io's reactor driving [`super::server`].

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use baton_smol::handover::Item;
use baton_smol::{Listener, Smol, Stream};
use smol::io::AsyncWriteExt;
use smol::Executor;

use super::conn::Io;
use crate::cli::Options;
use crate::Failed;

/// Serve until upgraded or stopped, then drain. Errors are logged.
///
/// One executor runs on this thread and on one more thread per extra core,
/// as tokio's multi-threaded runtime does, so the two compare fairly.
pub fn run(options: &Options) -> Result<(), Failed> {
    let executor = Arc::new(Executor::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The workers run until `done` is dropped, which closes `shutdown`.
    let (done, shutdown) = smol::channel::bounded::<()>(1);
    let mut workers = Vec::new();
    for index in 1..threads {
        let executor = executor.clone();
        let shutdown = shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("baton-smol-{index}"))
            .spawn(move || smol::block_on(executor.run(shutdown.recv())));
        match spawned {
            Ok(worker) => workers.push(worker),
            Err(e) => log::warn!("cannot start a smol worker thread: {e}"),
        }
    }
    // The server runs as a task like the connections, so signals and
    // upgrades are scheduled fairly: the future given to `run` itself is
    // polled only between batches of tasks.
    let main = {
        let options = options.clone();
        let runtime = Smol::new(executor.clone());
        executor
            .spawn(async move { super::server::serve::<Smol, Listener>(runtime, &options).await })
    };
    let result = smol::block_on(executor.run(main));
    drop(done);
    for worker in workers {
        let _ = worker.join();
    }
    result
}

impl Io for Stream {
    async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.readable().await,
            Stream::Unix(stream) => stream.readable().await,
        }
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // The sockets are non-blocking: a read with nothing there is WouldBlock.
        match self {
            Stream::Tcp(stream) => stream.get_ref().read(buf),
            Stream::Unix(stream) => stream.get_ref().read(buf),
        }
    }

    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(self, buf).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        // baton-smol's streams shut down their write half on close.
        AsyncWriteExt::close(self).await
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        Stream::into_fd(self)
    }

    fn from_moved(item: &mut Item) -> io::Result<Self> {
        Stream::from_moved(item)
    }
}
