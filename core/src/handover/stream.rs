//! A connection's socket as it moves: out of a runtime's stream type into
//! an fd, and back into the std type of its family on the other side.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A connected stream socket received in a move, as the std type of its
/// family, non-blocking: what a runtime's stream type is made from.
#[derive(Debug)]
pub enum MovedStream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl MovedStream {
    /// Check that `fd` is a connected stream socket (TCP or Unix) and make
    /// it non-blocking. The flag belongs to the open file both generations
    /// share, so it is already set; setting it again costs one syscall.
    pub fn from_fd(fd: OwnedFd) -> io::Result<MovedStream> {
        let info = crate::sys::socket_info(fd.as_fd())?;
        if info.socket_type != libc::SOCK_STREAM || info.listening {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a moved connection must be a connected stream socket",
            ));
        }
        let stream = match info.family {
            libc::AF_INET | libc::AF_INET6 => MovedStream::Tcp(TcpStream::from(fd)),
            libc::AF_UNIX => MovedStream::Unix(UnixStream::from(fd)),
            family => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a moved connection of address family {family} is not supported"),
                ))
            }
        };
        match &stream {
            MovedStream::Tcp(s) => s.set_nonblocking(true)?,
            MovedStream::Unix(s) => s.set_nonblocking(true)?,
        }
        Ok(stream)
    }
}

/// The socket of the connection `item` moves: its one fd, as the std type
/// of its family.
pub fn take_stream(item: &mut super::Item) -> io::Result<MovedStream> {
    if item.fds.len() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a moved connection has one fd, {:?} came with {}",
                item.name,
                item.fds.len()
            ),
        ));
    }
    MovedStream::from_fd(item.fds.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_unix_streams_come_back_as_their_family_and_listeners_do_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let moved = MovedStream::from_fd(OwnedFd::from(client)).unwrap();
        assert!(matches!(moved, MovedStream::Tcp(s) if s.peer_addr().is_ok()));
        let (a, _b) = UnixStream::pair().unwrap();
        let mut item = super::super::Item::new("conn", 1, Vec::new()).with_fds([OwnedFd::from(a)]);
        assert!(matches!(take_stream(&mut item), Ok(MovedStream::Unix(_))));
        assert!(take_stream(&mut item).is_err(), "no fd left");
        assert!(MovedStream::from_fd(OwnedFd::from(listener)).is_err());
    }
}
