//! Listener handoff over tokio: adopted sockets as tokio listeners.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::os::fd::OwnedFd;

use baton_core::handover::{take_stream, Item, MovedStream};
use baton_core::{ListenSocket, ListenerHandoff};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A tokio listener, TCP or Unix, made from a socket that was inherited or
/// bound by baton.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket.
    Unix(UnixListener),
}

impl ListenerHandoff for Listener {
    fn from_listen_socket(socket: ListenSocket) -> io::Result<Self> {
        // tokio's from_std panics outside a runtime; a library returns an error.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "baton-tokio listeners must be created inside a tokio runtime",
            ));
        }
        match socket {
            ListenSocket::Tcp(listener) => TcpListener::from_std(listener).map(Listener::Tcp),
            ListenSocket::Unix(listener) => UnixListener::from_std(listener).map(Listener::Unix),
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("baton-tokio cannot listen on {other:?}"),
            )),
        }
    }
}

impl Listener {
    /// Accept the next connection. Never blocks the thread: the socket is
    /// non-blocking and tokio waits for readiness.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as tokio's `accept`.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                // Responses are small and written whole: do not wait for Nagle.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            Listener::Unix(listener) => Ok(Stream::Unix(listener.accept().await?.0)),
        }
    }

    /// The address it listens on, as `127.0.0.1:8080` or `unix:/path`.
    pub fn local_addr(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(listener) => Ok(listener.local_addr()?.to_string()),
            Listener::Unix(listener) => {
                let addr = listener.local_addr()?;
                let path = addr.as_pathname().map(|p| p.display().to_string());
                Ok(format!("unix:{}", path.unwrap_or_default()))
            }
        }
    }
}

/// An accepted connection, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// The socket as an fd, to move the connection to the next generation
    /// ([`baton_core::Connection::offer`]): tokio stops watching it, so
    /// this generation reads nothing more from it.
    pub fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(match self {
            Stream::Tcp(stream) => stream.into_std()?.into(),
            Stream::Unix(stream) => stream.into_std()?.into(),
        })
    }

    /// The connection `item` moved here (its one fd), as a tokio stream.
    /// Inside a tokio runtime only (an error outside one).
    pub fn from_moved(item: &mut Item) -> io::Result<Stream> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "baton-tokio streams must be created inside a tokio runtime",
            ));
        }
        match take_stream(item)? {
            MovedStream::Tcp(stream) => {
                stream.set_nodelay(true)?;
                TcpStream::from_std(stream).map(Stream::Tcp)
            }
            MovedStream::Unix(stream) => UnixStream::from_std(stream).map(Stream::Unix),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
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
