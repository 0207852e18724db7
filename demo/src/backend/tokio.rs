//! The demo over baton-tokio: a multi-threaded tokio runtime driving
//! [`super::server`].

use std::io;
use std::os::fd::OwnedFd;

use baton_tokio::handover::Item;
use baton_tokio::{Listener, Stream, Tokio};
use tokio::io::AsyncWriteExt;

use super::conn::Io;
use crate::cli::Options;
use crate::Failed;

/// Serve until upgraded or stopped, then drain. Errors are logged.
pub fn run(options: &Options) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            log::error!("cannot start the tokio runtime: {e}");
            Failed
        })?;
    runtime.block_on(super::server::serve::<Tokio, Listener>(Tokio, options))
}

impl Io for Stream {
    async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.readable().await,
            Stream::Unix(stream) => stream.readable().await,
        }
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.try_read(buf),
            Stream::Unix(stream) => stream.try_read(buf),
        }
    }

    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(self, buf).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        AsyncWriteExt::shutdown(self).await
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        Stream::into_fd(self)
    }

    fn from_moved(item: &mut Item) -> io::Result<Self> {
        Stream::from_moved(item)
    }
}
