//! Listener handoff over mio: adopted sockets as mio listeners, and the
//! streams they accept.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;

use baton_core::handover::{take_stream, Item, MovedStream};
use baton_core::{ListenSocket, ListenerHandoff};
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

/// A mio listener, TCP or Unix, made from a socket that baton inherited or
/// bound (already non-blocking and close-on-exec).
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket.
    Unix(UnixListener),
}

impl ListenerHandoff for Listener {
    fn from_listen_socket(socket: ListenSocket) -> io::Result<Self> {
        match socket {
            ListenSocket::Tcp(listener) => Ok(Listener::Tcp(TcpListener::from_std(listener))),
            ListenSocket::Unix(listener) => Ok(Listener::Unix(UnixListener::from_std(listener))),
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("baton-mio cannot listen on {other:?}"),
            )),
        }
    }
}

impl Listener {
    /// Accept one connection without blocking; `WouldBlock` when none waits.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept()?;
                // Responses are small and written whole: do not wait for
                // Nagle. Failing that only costs latency, so it is ignored.
                let _ = stream.set_nodelay(true);
                Ok(Stream::Tcp(stream))
            }
            Listener::Unix(listener) => Ok(Stream::Unix(listener.accept()?.0)),
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

impl Source for Listener {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.register(registry, token, interest),
            Listener::Unix(l) => l.register(registry, token, interest),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.reregister(registry, token, interest),
            Listener::Unix(l) => l.reregister(registry, token, interest),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.deregister(registry),
            Listener::Unix(l) => l.deregister(registry),
        }
    }
}

/// An accepted connection, TCP or Unix: non-blocking, to be registered by
/// the application under one of its own tokens.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// Shut down the read half, the write half or both. Shutting down the
    /// write half sends FIN and lets the client read the response to its end.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// The socket as an fd, to move the connection to the next generation
    /// ([`baton_core::Connection::offer`]): it is deregistered from
    /// `registry` first (a stream never registered is fine), so this
    /// generation hears nothing more of it.
    pub fn into_fd(mut self, registry: &Registry) -> io::Result<OwnedFd> {
        match self.deregister(registry) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(match self {
            Stream::Tcp(stream) => stream.into(),
            Stream::Unix(stream) => stream.into(),
        })
    }

    /// The connection `item` moved here (its one fd), as a mio stream, to
    /// register like an accepted one.
    pub fn from_moved(item: &mut Item) -> io::Result<Stream> {
        match take_stream(item)? {
            MovedStream::Tcp(stream) => {
                // As accepted ones: no Nagle delay.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(TcpStream::from_std(stream)))
            }
            MovedStream::Unix(stream) => Ok(Stream::Unix(UnixStream::from_std(stream))),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Source for Stream {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(registry, token, interest),
            Stream::Unix(s) => s.register(registry, token, interest),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(registry, token, interest),
            Stream::Unix(s) => s.reregister(registry, token, interest),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(registry),
            Stream::Unix(s) => s.deregister(registry),
        }
    }
}
