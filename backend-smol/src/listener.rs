//! Listener handoff over async-io: adopted sockets as `Async` listeners.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::pin::Pin;
use std::task::{Context, Poll};

use async_io::Async;
use std::os::fd::OwnedFd;

use baton_core::handover::{take_stream, Item, MovedStream};
use baton_core::{ListenSocket, ListenerHandoff};
use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::ready;

/// An async-io listener, TCP or Unix, made from a socket that was inherited
/// or bound by baton. Works on any executor: async-io drives its own reactor.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(Async<TcpListener>),
    /// Unix stream socket.
    Unix(Async<UnixListener>),
}

impl ListenerHandoff for Listener {
    fn from_listen_socket(socket: ListenSocket) -> io::Result<Self> {
        // The core hands over non-blocking sockets, and the flag belongs to
        // the file description both generations share: register it as is
        // instead of setting the flag again.
        match socket {
            ListenSocket::Tcp(listener) => Async::new_nonblocking(listener).map(Listener::Tcp),
            ListenSocket::Unix(listener) => Async::new_nonblocking(listener).map(Listener::Unix),
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("baton-smol cannot listen on {other:?}"),
            )),
        }
    }
}

impl Listener {
    /// Accept the next connection. Never blocks the thread: the socket is
    /// non-blocking and async-io waits for readiness.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a connection is taken from the queue only when this
    /// returns it.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                // Responses are small and written whole: do not wait for Nagle.
                stream.get_ref().set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            Listener::Unix(listener) => Ok(Stream::Unix(listener.accept().await?.0)),
        }
    }

    /// The address it listens on, as `127.0.0.1:8080` or `unix:/path`.
    pub fn local_addr(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(listener) => Ok(listener.get_ref().local_addr()?.to_string()),
            Listener::Unix(listener) => {
                let addr = listener.get_ref().local_addr()?;
                let path = addr.as_pathname().map(|p| p.display().to_string());
                Ok(format!("unix:{}", path.unwrap_or_default()))
            }
        }
    }
}

/// An accepted connection, TCP or Unix.
///
/// Closing it ([`AsyncWriteExt::close`](futures_lite::AsyncWriteExt::close))
/// shuts down the write half, as tokio's `shutdown` does: the peer reads EOF
/// while this side can still read what it sends. (async-io's own `close`
/// only flushes.)
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(Async<TcpStream>),
    /// Unix stream socket.
    Unix(Async<UnixStream>),
}

impl Stream {
    /// The socket as an fd, to move the connection to the next generation
    /// ([`baton_core::Connection::offer`]): async-io stops watching it, so
    /// this generation reads nothing more from it.
    pub fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(match self {
            Stream::Tcp(stream) => stream.into_inner()?.into(),
            Stream::Unix(stream) => stream.into_inner()?.into(),
        })
    }

    /// The connection `item` moved here (its one fd), as an async-io
    /// stream.
    pub fn from_moved(item: &mut Item) -> io::Result<Stream> {
        match take_stream(item)? {
            MovedStream::Tcp(stream) => {
                stream.set_nodelay(true)?;
                Async::new_nonblocking(stream).map(Stream::Tcp)
            }
            MovedStream::Unix(stream) => Async::new_nonblocking(stream).map(Stream::Unix),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this {
            Stream::Tcp(s) => {
                ready!(Pin::new(&mut *s).poll_flush(cx))?;
                Poll::Ready(s.get_ref().shutdown(Shutdown::Write))
            }
            Stream::Unix(s) => {
                ready!(Pin::new(&mut *s).poll_flush(cx))?;
                Poll::Ready(s.get_ref().shutdown(Shutdown::Write))
            }
        }
    }
}

impl baton_core::runtime::Accept for Listener {
    type Stream = Stream;

    fn accept(&self) -> impl std::future::Future<Output = io::Result<Stream>> + Send {
        // The inherent method: sets TCP_NODELAY on TCP streams.
        Listener::accept(self)
    }
}
