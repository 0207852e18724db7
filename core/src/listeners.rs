//! Listener handoff, the runtime-free half: adopting inherited sockets,
//! binding fresh ones, and keeping a copy of each for the next generation.
//!
//! A listener is asked for by name ("inherit `http` if the parent passed it,
//! else bind it"). Whatever the answer, the registry keeps its own fd of the
//! socket until the process exits: that fd is what the next generation gets,
//! and it keeps the port served if the new generation dies while this one
//! drains. The runtime gets a duplicate, turned into its listener type by the
//! backend's [`ListenerHandoff`] implementation.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::protocol::{self, Passed, UNNAMED};
use crate::sys;
use crate::Error;

/// Backlog for sockets baton binds: deep enough that connections arriving
/// while two generations swap wait in the kernel queue instead of failing.
pub const BACKLOG: i32 = 1024;

/// A listening socket, ready for a runtime: non-blocking and close-on-exec.
#[derive(Debug)]
#[non_exhaustive]
pub enum ListenSocket {
    /// A TCP listener.
    Tcp(std::net::TcpListener),
    /// A Unix stream listener.
    Unix(UnixListener),
}

/// The listener-handoff trait: a runtime's listener type, built from an
/// adopted socket. Backends implement it for their listener types
/// (`tokio::net::TcpListener`, `async_io::Async<TcpListener>`, …).
pub trait ListenerHandoff: Sized {
    /// Wrap `socket` (non-blocking, close-on-exec, listening). Errors if the
    /// socket is of a kind this type cannot hold, or if the runtime refuses it.
    fn from_listen_socket(socket: ListenSocket) -> io::Result<Self>;
}

/// One socket of this process: its name and the fd kept for handoff.
#[derive(Debug)]
struct Held {
    name: String,
    fd: OwnedFd,
}

/// The socket as it is, for callers that convert it themselves.
impl ListenerHandoff for ListenSocket {
    fn from_listen_socket(socket: ListenSocket) -> io::Result<Self> {
        Ok(socket)
    }
}

/// Sockets inherited but not yet claimed, and sockets held for the next
/// generation.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    inherited: Mutex<Vec<Held>>,
    held: Mutex<Vec<Held>>,
}

/// Where a listener came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Passed by the parent (a previous generation or systemd).
    Inherited,
    /// Bound by this process.
    Bound,
}

impl Listeners {
    /// Adopt the sockets `passed` declares at fds 3... Each is made
    /// close-on-exec at once, so none leaks into a process the application
    /// starts even if the application never claims it, and each must be a
    /// socket: anything else means the environment lies. Type, family and
    /// listening state are checked when the application claims it, since
    /// only then is it known what it should be.
    pub(crate) fn adopt(passed: &Passed) -> Result<Self, Error> {
        let mut inherited = Vec::with_capacity(passed.names.len());
        for (index, name) in passed.names.iter().enumerate() {
            let fd = Passed::fd(index);
            let problem = |problem: String| Error::Inherited {
                name: name.clone(),
                fd,
                problem,
            };
            let owned = sys::adopt_inherited_fd(fd)
                .map_err(|source| problem(format!("cannot adopt: {source}")))?;
            sys::socket_info(owned.as_fd())
                .map_err(|source| problem(format!("not a socket: {source}")))?;
            inherited.push(Held {
                name: name.clone(),
                fd: owned,
            });
        }
        Ok(Listeners {
            inherited: Mutex::new(inherited),
            held: Mutex::default(),
        })
    }

    /// The listener `name`: inherited if passed, else bound to `addr`.
    pub(crate) fn listen(
        &self,
        name: &str,
        addr: &ListenAddr,
    ) -> Result<(ListenSocket, Origin), Error> {
        let (fd, origin) = self.claim(name, addr)?;
        let socket = match addr {
            ListenAddr::Tcp(_) => ListenSocket::Tcp(std::net::TcpListener::from(fd)),
            ListenAddr::Unix(_) => ListenSocket::Unix(UnixListener::from(fd)),
        };
        Ok((socket, origin))
    }

    /// Another duplicate of the held listener `name`, for a generation that
    /// accepts again after it had stopped (its successor died).
    pub(crate) fn reopen(&self, name: &str) -> Result<ListenSocket, Error> {
        let held = lock(&self.held);
        let missing = || Error::Listen {
            name: name.to_owned(),
            addr: "(held)".to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no listener of this name is open"),
        };
        let socket = held
            .iter()
            .find(|h| h.name == name && !is_datagram(h.fd.as_fd()))
            .ok_or_else(missing)?;
        let copy = socket.fd.try_clone().map_err(|source| Error::Listen {
            name: name.to_owned(),
            addr: "(held)".to_owned(),
            source,
        })?;
        let family = sys::socket_info(copy.as_fd()).map(|info| info.family);
        Ok(match family {
            Ok(libc::AF_UNIX) => ListenSocket::Unix(UnixListener::from(copy)),
            _ => ListenSocket::Tcp(std::net::TcpListener::from(copy)),
        })
    }

    /// The datagram socket `name`: inherited if passed (it must be a UDP
    /// socket of `addr`'s family), else bound to `addr`. Held for handoff in
    /// the same list as the listeners, so it is passed on with its name.
    pub(crate) fn datagram(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<(std::net::UdpSocket, Origin), Error> {
        protocol::validate_name(name)?;
        let listen_error = |source| Error::Listen {
            name: name.to_owned(),
            addr: format!("udp:{addr}"),
            source,
        };
        let mut held = lock(&self.held);
        if held.iter().any(|h| h.name == name) {
            return Err(listen_error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a socket of this name is already open",
            )));
        }
        let (fd, origin) = match self.take_inherited_datagram(name, addr)? {
            Some(fd) => (fd, Origin::Inherited),
            None => (bind_datagram(addr).map_err(listen_error)?, Origin::Bound),
        };
        let copy = fd.try_clone().map_err(listen_error)?;
        held.push(Held {
            name: name.to_owned(),
            fd,
        });
        Ok((std::net::UdpSocket::from(copy), origin))
    }

    /// Another duplicate of the held datagram socket `name`, for a
    /// generation that serves again after it had stopped.
    pub(crate) fn reopen_datagram(&self, name: &str) -> Result<std::net::UdpSocket, Error> {
        let held = lock(&self.held);
        let error = |source| Error::Listen {
            name: name.to_owned(),
            addr: "(held)".to_owned(),
            source,
        };
        let socket = held
            .iter()
            .find(|h| h.name == name && is_datagram(h.fd.as_fd()))
            .ok_or_else(|| {
                error(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no datagram socket of this name is open",
                ))
            })?;
        let copy = socket.fd.try_clone().map_err(error)?;
        Ok(std::net::UdpSocket::from(copy))
    }

    /// Like [`take_inherited`](Self::take_inherited), for a datagram socket.
    fn take_inherited_datagram(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<Option<OwnedFd>, Error> {
        let matches = |fd: BorrowedFd<'_>| {
            socket2::SockRef::from(&fd)
                .local_addr()
                .ok()
                .and_then(|local| local.as_socket())
                .is_some_and(|have| {
                    if addr.port() == 0 {
                        have.ip() == addr.ip()
                    } else {
                        have == addr
                    }
                })
        };
        let mut inherited = lock(&self.inherited);
        let position = inherited.iter().position(|h| h.name == name).or_else(|| {
            inherited.iter().position(|h| {
                h.name == UNNAMED && is_datagram(h.fd.as_fd()) && matches(h.fd.as_fd())
            })
        });
        let Some(index) = position else {
            return Ok(None);
        };
        let fd = inherited[index].fd.as_fd();
        check_datagram(fd, addr).map_err(|problem| Error::Inherited {
            name: name.to_owned(),
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            problem,
        })?;
        let held = inherited.remove(index);
        if matches(held.fd.as_fd()) {
            Ok(Some(held.fd))
        } else {
            log::info!(
                "inherited datagram socket {name:?} is not at {addr}: closing it and binding anew"
            );
            Ok(None)
        }
    }

    /// Inherit or bind, keep one fd for handoff, return a duplicate.
    fn claim(&self, name: &str, addr: &ListenAddr) -> Result<(OwnedFd, Origin), Error> {
        protocol::validate_name(name)?;
        let listen_error = |source| Error::Listen {
            name: name.to_owned(),
            addr: addr.to_string(),
            source,
        };
        let mut held = lock(&self.held);
        if held.iter().any(|h| h.name == name) {
            return Err(listen_error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a listener of this name is already open",
            )));
        }
        let (fd, origin) = match self.take_inherited(name, addr)? {
            Some(fd) => (fd, Origin::Inherited),
            None => (addr.bind().map_err(listen_error)?, Origin::Bound),
        };
        let copy = fd.try_clone().map_err(listen_error)?;
        held.push(Held {
            name: name.to_owned(),
            fd,
        });
        Ok((copy, origin))
    }

    /// Find the inherited socket for `name`: by name, or else an unnamed one
    /// bound to `addr` (systemd without `FileDescriptorName=`). A socket of
    /// the wrong kind is an error and stays in place; a socket of the right
    /// kind at another address (the operator changed `--listen`) is closed
    /// so the new address is bound.
    fn take_inherited(&self, name: &str, addr: &ListenAddr) -> Result<Option<OwnedFd>, Error> {
        let mut inherited = lock(&self.inherited);
        let position = inherited.iter().position(|h| h.name == name).or_else(|| {
            inherited.iter().position(|h| {
                h.name == UNNAMED && !is_datagram(h.fd.as_fd()) && addr.matches(h.fd.as_fd())
            })
        });
        let Some(index) = position else {
            return Ok(None);
        };
        let fd = inherited[index].fd.as_fd();
        check_listener(fd, addr).map_err(|problem| Error::Inherited {
            name: name.to_owned(),
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            problem,
        })?;
        let held = inherited.remove(index);
        if addr.matches(held.fd.as_fd()) {
            Ok(Some(held.fd))
        } else {
            log::info!("inherited listener {name:?} is not at {addr}: closing it and binding anew");
            Ok(None)
        }
    }

    /// Close inherited sockets nobody claimed (a listener removed from the
    /// configuration), returning their names for the log.
    pub(crate) fn close_unclaimed(&self) -> Vec<String> {
        lock(&self.inherited).drain(..).map(|h| h.name).collect()
    }

    /// Close every socket held for handoff: the process shuts down with no
    /// successor, so new clients should be refused at once rather than wait
    /// in a queue nobody will accept from (and be reset at exit).
    pub(crate) fn close_held(&self) {
        lock(&self.held).clear();
    }

    /// Run `f` with the sockets to hand over, in a stable order, while no
    /// listener can be added or removed.
    pub(crate) fn with_handoff<R>(&self, f: impl FnOnce(&[(&str, BorrowedFd<'_>)]) -> R) -> R {
        let held = lock(&self.held);
        let sockets: Vec<(&str, BorrowedFd<'_>)> = held
            .iter()
            .map(|h| (h.name.as_str(), h.fd.as_fd()))
            .collect();
        f(&sockets)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Validate that `fd` is a listening stream socket of `kind`, and make sure
/// it is non-blocking: a runtime needs that, and it is the only direction in
/// which baton ever changes a shared socket's flags.
fn check_listener(fd: BorrowedFd<'_>, addr: &ListenAddr) -> Result<(), String> {
    let info = sys::socket_info(fd).map_err(|e| format!("not a socket: {e}"))?;
    if info.socket_type != libc::SOCK_STREAM {
        return Err(format!(
            "socket type {} is not a stream socket",
            info.socket_type
        ));
    }
    let (family_ok, wanted) = match addr {
        ListenAddr::Tcp(_) => (matches!(info.family, libc::AF_INET | libc::AF_INET6), "TCP"),
        ListenAddr::Unix(_) => (info.family == libc::AF_UNIX, "Unix"),
    };
    if !family_ok {
        return Err(format!("address family {} is not {wanted}", info.family));
    }
    if !info.listening {
        return Err("socket is not listening".to_owned());
    }
    if !sys::is_nonblocking(fd).map_err(|e| e.to_string())? {
        socket2::SockRef::from(&fd)
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make it non-blocking: {e}"))?;
    }
    Ok(())
}

/// True if `fd` is a datagram socket.
fn is_datagram(fd: BorrowedFd<'_>) -> bool {
    sys::socket_info(fd).is_ok_and(|info| info.socket_type == libc::SOCK_DGRAM)
}

/// Validate that `fd` is a UDP socket of `addr`'s family, and make sure it
/// is non-blocking.
fn check_datagram(fd: BorrowedFd<'_>, addr: SocketAddr) -> Result<(), String> {
    let info = sys::socket_info(fd).map_err(|e| format!("not a socket: {e}"))?;
    if info.socket_type != libc::SOCK_DGRAM {
        return Err(format!(
            "socket type {} is not a datagram socket",
            info.socket_type
        ));
    }
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    if info.family != family {
        return Err(format!(
            "address family {} is not that of {addr}",
            info.family
        ));
    }
    if !sys::is_nonblocking(fd).map_err(|e| e.to_string())? {
        socket2::SockRef::from(&fd)
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make it non-blocking: {e}"))?;
    }
    Ok(())
}

/// Bind a fresh UDP socket: non-blocking, close-on-exec.
fn bind_datagram(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// An address to listen on: `127.0.0.1:8080`, `[::1]:8080` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address; port 0 picks a free port.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a path, as in unix:/run/app.sock".to_owned()),
            Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
            None => s
                .parse()
                .map(ListenAddr::Tcp)
                .map_err(|_| format!("{s:?} is neither IP:PORT nor unix:/path")),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// True if the socket `fd` is bound to this address. Port 0 matches any
    /// port of the same IP: the operator asked for "some port".
    fn matches(&self, fd: BorrowedFd<'_>) -> bool {
        let Ok(local) = socket2::SockRef::from(&fd).local_addr() else {
            return false;
        };
        match self {
            ListenAddr::Tcp(want) => match local.as_socket() {
                Some(have) if want.port() == 0 => have.ip() == want.ip(),
                Some(have) => have == *want,
                None => false,
            },
            ListenAddr::Unix(want) => local.as_pathname() == Some(want.as_path()),
        }
    }

    /// Bind a fresh listening socket: non-blocking, close-on-exec.
    fn bind(&self) -> io::Result<OwnedFd> {
        let socket = match self {
            ListenAddr::Tcp(addr) => {
                let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
                // Lets a restarted (not upgraded) server bind while old
                // connections linger in TIME_WAIT.
                socket.set_reuse_address(true)?;
                socket.bind(&SockAddr::from(*addr))?;
                socket
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
                socket.bind(&SockAddr::unix(path)?)?;
                socket
            }
        };
        socket.listen(BACKLOG)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    }
}

/// A socket file left by a process that died can be removed; one that a live
/// server answers on cannot, and binding must then fail with `AddrInUse`.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving on this socket",
                )),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("removing stale socket file {}", path.display());
                    std::fs::remove_file(path)
                }
                Err(e) => Err(e),
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn tcp(
        listeners: &Listeners,
        name: &str,
        addr: SocketAddr,
    ) -> Result<(std::net::TcpListener, Origin), Error> {
        match listeners.listen(name, &ListenAddr::Tcp(addr))? {
            (ListenSocket::Tcp(l), origin) => Ok((l, origin)),
            other => panic!("not TCP: {other:?}"),
        }
    }

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "[::1]:80".parse(),
            Ok(ListenAddr::Tcp("[::1]:80".parse().unwrap()))
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("localhost:80".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn bound_listener_is_nonblocking_cloexec_and_held_for_handoff() {
        let listeners = Listeners::default();
        let (listener, origin) = tcp(&listeners, "http", loopback()).unwrap();
        assert_eq!(origin, Origin::Bound);
        assert!(sys::is_nonblocking(listener.as_fd()).unwrap());
        assert!(sys::is_cloexec(listener.as_fd()).unwrap());
        listeners.with_handoff(|sockets| {
            assert_eq!(sockets.len(), 1);
            assert_eq!(sockets[0].0, "http");
            assert!(sys::is_cloexec(sockets[0].1).unwrap());
        });
    }

    #[test]
    fn a_held_listener_can_be_reopened() {
        let listeners = Listeners::default();
        let (first, _) = tcp(&listeners, "http", loopback()).unwrap();
        match listeners.reopen("http").unwrap() {
            ListenSocket::Tcp(again) => {
                assert_eq!(again.local_addr().unwrap(), first.local_addr().unwrap())
            }
            other => panic!("not TCP: {other:?}"),
        }
        assert!(listeners.reopen("other").is_err());
    }

    #[test]
    fn a_name_is_claimed_once() {
        let listeners = Listeners::default();
        let _first = tcp(&listeners, "http", loopback()).unwrap();
        let err = tcp(&listeners, "http", loopback()).unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
    }

    #[test]
    fn inherited_socket_is_found_by_name_and_checked_by_kind() {
        let listener = std::net::TcpListener::bind(loopback()).unwrap();
        let addr = listener.local_addr().unwrap();
        let listeners = Listeners {
            inherited: Mutex::new(vec![Held {
                name: "http".into(),
                fd: listener.into(),
            }]),
            held: Mutex::default(),
        };
        let dir = std::env::temp_dir().join(format!("baton-kind-{}", std::process::id()));
        let err = listeners
            .listen("http", &ListenAddr::Unix(dir))
            .unwrap_err();
        assert!(err.to_string().contains("is not Unix"), "{err}");
        let (adopted, origin) = tcp(&listeners, "http", addr).unwrap();
        assert_eq!(origin, Origin::Inherited);
        assert_eq!(adopted.local_addr().unwrap(), addr);
        assert!(
            sys::is_nonblocking(adopted.as_fd()).unwrap(),
            "made non-blocking on adoption"
        );
    }

    #[test]
    fn unnamed_inherited_socket_is_matched_by_address() {
        let listener = std::net::TcpListener::bind(loopback()).unwrap();
        let addr = listener.local_addr().unwrap();
        let listeners = Listeners {
            inherited: Mutex::new(vec![Held {
                name: UNNAMED.into(),
                fd: listener.into(),
            }]),
            held: Mutex::default(),
        };
        let (adopted, origin) = tcp(&listeners, "http", addr).unwrap();
        assert_eq!(
            (adopted.local_addr().unwrap(), origin),
            (addr, Origin::Inherited)
        );
    }

    #[test]
    fn inherited_socket_at_another_address_is_replaced() {
        let listener = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = Listeners {
            inherited: Mutex::new(vec![Held {
                name: "http".into(),
                fd: listener.into(),
            }]),
            held: Mutex::default(),
        };
        let other = std::net::TcpListener::bind(loopback()).unwrap();
        let wanted = other.local_addr().unwrap();
        drop(other);
        let (bound, origin) = tcp(&listeners, "http", wanted).unwrap();
        assert_eq!(
            (bound.local_addr().unwrap(), origin),
            (wanted, Origin::Bound)
        );
    }

    #[test]
    fn a_socket_that_is_not_listening_is_refused() {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&SockAddr::from(loopback())).unwrap();
        let listeners = Listeners {
            inherited: Mutex::new(vec![Held {
                name: "http".into(),
                fd: socket.into(),
            }]),
            held: Mutex::default(),
        };
        let err = tcp(&listeners, "http", loopback()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
    }

    #[test]
    fn bound_datagram_socket_is_nonblocking_cloexec_held_and_reopened() {
        let listeners = Listeners::default();
        let (socket, origin) = listeners.datagram("udp", loopback()).unwrap();
        assert_eq!(origin, Origin::Bound);
        assert!(sys::is_nonblocking(socket.as_fd()).unwrap());
        assert!(sys::is_cloexec(socket.as_fd()).unwrap());
        listeners.with_handoff(|sockets| {
            assert_eq!(sockets.len(), 1);
            assert_eq!(sockets[0].0, "udp");
        });
        let again = listeners.reopen_datagram("udp").unwrap();
        assert_eq!(again.local_addr().unwrap(), socket.local_addr().unwrap());
        assert!(listeners.reopen("udp").is_err(), "not a stream listener");
        let err = listeners.datagram("udp", loopback()).unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
    }

    #[test]
    fn inherited_datagram_socket_is_adopted_and_kinds_never_mix() {
        let udp = std::net::UdpSocket::bind(loopback()).unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp_listener = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = Listeners {
            inherited: Mutex::new(vec![
                Held {
                    name: "udp".into(),
                    fd: udp.into(),
                },
                Held {
                    name: "http".into(),
                    fd: tcp_listener.into(),
                },
            ]),
            held: Mutex::default(),
        };
        // A stream name is not satisfied by a datagram socket, nor the reverse.
        let err = tcp(&listeners, "udp", addr).unwrap_err();
        assert!(err.to_string().contains("not a stream socket"), "{err}");
        let err = listeners.datagram("http", loopback()).unwrap_err();
        assert!(err.to_string().contains("not a datagram socket"), "{err}");
        let (adopted, origin) = listeners.datagram("udp", addr).unwrap();
        assert_eq!(
            (adopted.local_addr().unwrap(), origin),
            (addr, Origin::Inherited)
        );
        assert!(sys::is_nonblocking(adopted.as_fd()).unwrap());
    }

    #[test]
    fn unnamed_sockets_are_matched_by_kind_and_address() {
        let udp = std::net::UdpSocket::bind(loopback()).unwrap();
        let addr = udp.local_addr().unwrap();
        let listeners = Listeners {
            inherited: Mutex::new(vec![Held {
                name: UNNAMED.into(),
                fd: udp.into(),
            }]),
            held: Mutex::default(),
        };
        // A TCP listener at the same port does not take the UDP socket.
        let tcp_port_free = std::net::TcpListener::bind(addr).is_ok();
        if tcp_port_free {
            let (_bound, origin) = tcp(&listeners, "http", addr).unwrap();
            assert_eq!(origin, Origin::Bound);
        }
        let (adopted, origin) = listeners.datagram("udp", addr).unwrap();
        assert_eq!(
            (adopted.local_addr().unwrap(), origin),
            (addr, Origin::Inherited)
        );
    }

    #[test]
    fn unix_listener_replaces_a_stale_socket_file_but_not_a_live_one() {
        let path = std::env::temp_dir().join(format!("baton-stale-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        drop(UnixListener::bind(&path).unwrap()); // leaves a stale file behind
        let listeners = Listeners::default();
        let (_live, _) = listeners
            .listen("api", &ListenAddr::Unix(path.clone()))
            .unwrap();
        let err = Listeners::default()
            .listen("api", &ListenAddr::Unix(path.clone()))
            .unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
