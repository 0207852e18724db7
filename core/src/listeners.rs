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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::protocol::{self, Passed, UNNAMED};
use crate::sys;
use crate::Error;

mod private;

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

/// One socket this process holds for the next generation.
#[derive(Debug)]
struct Held {
    /// The listener's name in this process (what [`Listeners::reopen`] and
    /// the "already open" check go by).
    name: String,
    /// The name it is passed on under: the listener's name, except for a
    /// socket taken by the lone-socket rule, which keeps the name it came
    /// with so that the next generation takes it by the same rule.
    handoff_name: String,
    fd: OwnedFd,
}

/// One socket passed by the parent and not claimed yet.
#[derive(Debug)]
struct Inherited {
    /// Its name in `LISTEN_FDNAMES`.
    name: String,
    fd: OwnedFd,
    /// The warning that nobody uses it was logged.
    warned: bool,
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
    inherited: Mutex<Vec<Inherited>>,
    held: Mutex<Vec<Held>>,
    /// The parent is a baton generation (it passed `BATON_READY_FD`), not
    /// systemd or another socket activator.
    from_baton: bool,
}

/// Where a listener came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Passed by the parent (a previous generation or systemd).
    Inherited,
    /// Bound by this process.
    Bound,
}

/// How an inherited socket was matched to a listener, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    Name,
    Address,
    Lone,
}

impl std::fmt::Display for Match {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Match::Name => "same name",
            Match::Address => "same address",
            Match::Lone => "the only passed stream socket left, whatever its address",
        })
    }
}

/// True for a name someone chose (`http`, `control`), as opposed to what
/// systemd gives a socket nobody named: `unknown` (no `LISTEN_FDNAMES`),
/// empty, or the unit's name (`app.socket`, a unit without
/// `FileDescriptorName=`).
fn is_explicit_name(name: &str) -> bool {
    !(name.is_empty() || name == UNNAMED || name.ends_with(".socket"))
}

/// The name to pass a socket on under that came as `name`: itself, or
/// [`UNNAMED`] if it cannot travel in `LISTEN_FDNAMES` (systemd's empty
/// name, or whatever another activator sent), so that an upgrade never
/// fails on it and the next generation still treats it as unnamed.
fn passable_name(name: &str) -> &str {
    if protocol::validate_name(name).is_ok() {
        name
    } else {
        UNNAMED
    }
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
            inherited.push(Inherited {
                name: name.clone(),
                fd: owned,
                warned: false,
            });
        }
        Ok(Listeners {
            inherited: Mutex::new(inherited),
            held: Mutex::default(),
            from_baton: passed.ready_fd.is_some(),
        })
    }

    /// The listener `name`: inherited if passed, else bound to `addr`.
    ///
    /// A passed socket is claimed by name; else by address whatever its
    /// name; else, if exactly one passed stream socket is left unclaimed and
    /// nobody named it (`unknown`, empty, `*.socket`), that one, wherever it
    /// is bound (`systemd-socket-activate -l PORT app` serves on PORT even
    /// though the application asks for its default address). The returned
    /// socket's kind follows the socket, not `addr`.
    pub(crate) fn listen(
        &self,
        name: &str,
        addr: &ListenAddr,
    ) -> Result<(ListenSocket, Origin), Error> {
        let (fd, origin) = self.claim(name, addr, true, || addr.bind())?;
        Ok((listen_socket(fd), origin))
    }

    /// The Unix listener `name` at `path`, for a socket only some users may
    /// reach (a control socket: `mode` 0o600). Inherited if passed under
    /// `name` or bound at `path` (never by the lone-socket rule); else bound
    /// with its final permissions from the start: there is no moment at
    /// which it exists at `path` with wider ones, and a symbolic link at
    /// `path` is an error, never followed. A stale socket file is replaced.
    pub(crate) fn listen_unix_private(
        &self,
        name: &str,
        path: &Path,
        mode: u32,
    ) -> Result<(ListenSocket, Origin), Error> {
        let addr = ListenAddr::Unix(path.to_owned());
        let (fd, origin) = self.claim(name, &addr, false, || private::bind(path, mode))?;
        Ok((listen_socket(fd), origin))
    }

    /// Another duplicate of the held listener `name`, for a generation that
    /// accepts again after it had stopped (its successor died). Made
    /// non-blocking again: the successor shares the open file description
    /// and may have cleared `O_NONBLOCK` on it.
    pub(crate) fn reopen(&self, name: &str) -> Result<ListenSocket, Error> {
        let held = lock(&self.held);
        let error = |source| Error::Listen {
            name: name.to_owned(),
            addr: "(held)".to_owned(),
            source,
        };
        let socket = held
            .iter()
            .find(|h| h.name == name && !is_datagram(h.fd.as_fd()))
            .ok_or_else(|| {
                error(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no listener of this name is open",
                ))
            })?;
        let copy = socket.fd.try_clone().map_err(error)?;
        socket2::SockRef::from(&copy)
            .set_nonblocking(true)
            .map_err(error)?;
        Ok(listen_socket(copy))
    }

    /// The datagram socket `name`: inherited if passed (by name, or by
    /// address whatever its name; it must be a UDP socket of `addr`'s
    /// family), else bound to `addr`. Held for handoff in the same list as
    /// the listeners, so it is passed on with its name.
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
            handoff_name: name.to_owned(),
            fd,
        });
        Ok((std::net::UdpSocket::from(copy), origin))
    }

    /// Another duplicate of the held datagram socket `name`, for a
    /// generation that serves again after it had stopped; non-blocking
    /// again, as in [`reopen`](Self::reopen).
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
        let copy = std::net::UdpSocket::from(copy);
        copy.set_nonblocking(true).map_err(error)?;
        Ok(copy)
    }

    /// Like [`take_inherited`](Self::take_inherited), for a datagram socket
    /// (no lone-socket rule: a datagram socket is claimed by name or by
    /// address).
    fn take_inherited_datagram(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<Option<OwnedFd>, Error> {
        let matches = |fd: BorrowedFd<'_>, wildcard: bool| {
            socket2::SockRef::from(&fd)
                .local_addr()
                .ok()
                .and_then(|local| local.as_socket())
                .is_some_and(|have| {
                    if addr.port() == 0 {
                        wildcard && have.ip() == addr.ip()
                    } else {
                        have == addr
                    }
                })
        };
        let mut inherited = lock(&self.inherited);
        let found = inherited
            .iter()
            .position(|h| h.name == name)
            .map(|index| (index, Match::Name))
            .or_else(|| {
                inherited
                    .iter()
                    .position(|h| {
                        is_datagram(h.fd.as_fd())
                            && matches(h.fd.as_fd(), !is_explicit_name(&h.name))
                    })
                    .map(|index| (index, Match::Address))
            });
        let Some((index, how)) = found else {
            return Ok(None);
        };
        let fd = inherited[index].fd.as_fd();
        check_datagram(fd, addr).map_err(|problem| Error::Inherited {
            name: inherited[index].name.clone(),
            fd: fd.as_raw_fd(),
            problem,
        })?;
        let passed = inherited.remove(index);
        if matches(passed.fd.as_fd(), true) {
            log_claim(name, &format!("udp:{addr}"), &passed, how);
            Ok(Some(passed.fd))
        } else {
            log::info!(
                "inherited datagram socket {name:?} is not at {addr}: closing it and binding anew"
            );
            Ok(None)
        }
    }

    /// Inherit or bind, keep one fd for handoff, return a duplicate.
    fn claim(
        &self,
        name: &str,
        addr: &ListenAddr,
        lone: bool,
        bind: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> Result<(OwnedFd, Origin), Error> {
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
        let (fd, handoff_name, origin) = match self.take_inherited(name, addr, lone)? {
            Some((fd, handoff_name)) => (fd, handoff_name, Origin::Inherited),
            None => (
                bind().map_err(listen_error)?,
                name.to_owned(),
                Origin::Bound,
            ),
        };
        let copy = fd.try_clone().map_err(listen_error)?;
        held.push(Held {
            name: name.to_owned(),
            handoff_name,
            fd,
        });
        Ok((copy, origin))
    }

    /// Find the inherited socket for `name`, and the name to hand it on
    /// under: by name; else by address whatever its name (systemd without
    /// `FileDescriptorName=` names it `unknown` or after the unit); else, with
    /// `lone`, the only passed stream socket left if nobody named it.
    ///
    /// A socket of the wrong kind is an error and stays in place. A socket
    /// found by name at another address (the operator changed `--listen`) is
    /// closed so the new address is bound. The lone socket is taken whatever
    /// its address and family, and keeps its name for the next generation,
    /// which then takes it by the same rule.
    fn take_inherited(
        &self,
        name: &str,
        addr: &ListenAddr,
        lone: bool,
    ) -> Result<Option<(OwnedFd, String)>, Error> {
        let mut inherited = lock(&self.inherited);
        let found = inherited
            .iter()
            .position(|h| h.name == name)
            .map(|index| (index, Match::Name))
            .or_else(|| {
                inherited
                    .iter()
                    .position(|h| {
                        !is_datagram(h.fd.as_fd())
                            && addr.matches_passed(h.fd.as_fd(), !is_explicit_name(&h.name))
                    })
                    .map(|index| (index, Match::Address))
            })
            .or_else(|| {
                if !lone {
                    return None;
                }
                let mut streams = inherited
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| is_stream(h.fd.as_fd()));
                match (streams.next(), streams.next()) {
                    (Some((index, h)), None) if !is_explicit_name(&h.name) => {
                        Some((index, Match::Lone))
                    }
                    _ => None,
                }
            });
        let Some((index, how)) = found else {
            return Ok(None);
        };
        let fd = inherited[index].fd.as_fd();
        let wanted = (how != Match::Lone).then_some(addr);
        check_listener(fd, wanted).map_err(|problem| Error::Inherited {
            name: inherited[index].name.clone(),
            fd: fd.as_raw_fd(),
            problem,
        })?;
        let passed = inherited.remove(index);
        if how == Match::Lone || addr.matches(passed.fd.as_fd()) {
            log_claim(name, &addr.to_string(), &passed, how);
            let handoff_name = if how == Match::Lone {
                passable_name(&passed.name).to_owned()
            } else {
                name.to_owned()
            };
            Ok(Some((passed.fd, handoff_name)))
        } else {
            log::info!("inherited listener {name:?} is not at {addr}: closing it and binding anew");
            Ok(None)
        }
    }

    /// Deal with the inherited sockets nobody claimed when the generation is
    /// ready. Those a baton parent passed under a name someone chose (a
    /// listener removed from the configuration) are closed, and their names
    /// returned for the log. Any other (from systemd or another activator,
    /// or unnamed) is a socket that could serve: it is kept open, handed on
    /// at the next upgrade, and a warning says so, once.
    pub(crate) fn close_unclaimed(&self) -> Vec<String> {
        let mut closed = Vec::new();
        lock(&self.inherited).retain_mut(|passed| {
            if self.from_baton && is_explicit_name(&passed.name) {
                closed.push(passed.name.clone());
                return false;
            }
            if !passed.warned {
                passed.warned = true;
                log::warn!(
                    "inherited listener {:?} ({}) is not used by this generation; keeping it",
                    passed.name,
                    describe(passed.fd.as_fd())
                );
            }
            true
        });
        closed
    }

    /// Close every socket held for handoff, and any kept unclaimed: the
    /// process shuts down with no successor, so new clients should be
    /// refused at once rather than wait in a queue nobody will accept from
    /// (and be reset at exit).
    pub(crate) fn close_held(&self) {
        lock(&self.held).clear();
        lock(&self.inherited).clear();
    }

    /// Run `f` with the sockets to hand over, in a stable order (held ones,
    /// then inherited ones nobody claimed), while no listener can be added
    /// or removed.
    pub(crate) fn with_handoff<R>(&self, f: impl FnOnce(&[(&str, BorrowedFd<'_>)]) -> R) -> R {
        let held = lock(&self.held);
        let inherited = lock(&self.inherited);
        let sockets: Vec<(&str, BorrowedFd<'_>)> = held
            .iter()
            .map(|h| (h.handoff_name.as_str(), h.fd.as_fd()))
            .chain(
                inherited
                    .iter()
                    .map(|p| (passable_name(&p.name), p.fd.as_fd())),
            )
            .collect();
        f(&sockets)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The runtime-facing socket for the listening stream socket `fd`, by its
/// family (a lone inherited socket may not be of the requested kind).
fn listen_socket(fd: OwnedFd) -> ListenSocket {
    match sys::socket_info(fd.as_fd()).map(|info| info.family) {
        Ok(libc::AF_UNIX) => ListenSocket::Unix(UnixListener::from(fd)),
        _ => ListenSocket::Tcp(std::net::TcpListener::from(fd)),
    }
}

/// Say which passed socket became which listener. Claimed by its own name,
/// it is what every upgrade does (the `listening on … (inherited)` line says
/// it): only the other matches are worth the operator's attention.
fn log_claim(listener: &str, asked: &str, passed: &Inherited, how: Match) {
    let level = match how {
        Match::Name => log::Level::Debug,
        Match::Address | Match::Lone => log::Level::Info,
    };
    log::log!(
        level,
        "listener {listener:?} (asked for {asked}) uses inherited socket {:?} (fd {}, {}): {how}",
        passed.name,
        passed.fd.as_raw_fd(),
        describe(passed.fd.as_fd())
    );
}

/// Where the socket `fd` is bound, for the log: `127.0.0.1:80`,
/// `unix:/path`, `udp:127.0.0.1:53`.
fn describe(fd: BorrowedFd<'_>) -> String {
    let Ok(local) = socket2::SockRef::from(&fd).local_addr() else {
        return "address unknown".to_owned();
    };
    if let Some(addr) = local.as_socket() {
        if is_datagram(fd) {
            format!("udp:{addr}")
        } else {
            addr.to_string()
        }
    } else if let Some(path) = local.as_pathname() {
        format!("unix:{}", path.display())
    } else {
        "unnamed socket".to_owned()
    }
}

/// Validate that `fd` is a listening stream socket (of `addr`'s family,
/// when given), and make sure it is non-blocking: a runtime needs that, and
/// it is the only direction in which baton ever changes a shared socket's
/// flags.
fn check_listener(fd: BorrowedFd<'_>, addr: Option<&ListenAddr>) -> Result<(), String> {
    let info = sys::socket_info(fd).map_err(|e| format!("not a socket: {e}"))?;
    if info.socket_type != libc::SOCK_STREAM {
        return Err(format!(
            "socket type {} is not a stream socket",
            info.socket_type
        ));
    }
    let family = match addr {
        None => None,
        Some(ListenAddr::Tcp(_)) => {
            Some((matches!(info.family, libc::AF_INET | libc::AF_INET6), "TCP"))
        }
        Some(ListenAddr::Unix(_)) => Some((info.family == libc::AF_UNIX, "Unix")),
    };
    if let Some((false, wanted)) = family {
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

/// True if `fd` is a stream socket.
fn is_stream(fd: BorrowedFd<'_>) -> bool {
    sys::socket_info(fd).is_ok_and(|info| info.socket_type == libc::SOCK_STREAM)
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
        self.matches_passed(fd, true)
    }

    /// Like [`matches`](Self::matches); port 0 matches only with
    /// `wildcard` (a socket found by address whatever its name must be at
    /// the address asked for, not merely on the same IP). A Unix socket
    /// bound by [`Listeners::listen_unix_private`] reports the temporary
    /// path it was bound at before it was renamed into place: that counts.
    fn matches_passed(&self, fd: BorrowedFd<'_>, wildcard: bool) -> bool {
        let Ok(local) = socket2::SockRef::from(&fd).local_addr() else {
            return false;
        };
        match self {
            ListenAddr::Tcp(want) => match local.as_socket() {
                Some(have) if want.port() == 0 => wildcard && have.ip() == want.ip(),
                Some(have) => have == *want,
                None => false,
            },
            ListenAddr::Unix(want) => local
                .as_pathname()
                .is_some_and(|have| have == want || private::was_bound_for(have, want)),
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

    /// Listeners with `sockets` passed by a parent (a baton generation with
    /// `from_baton`, else systemd).
    fn passed(from_baton: bool, sockets: Vec<(&str, OwnedFd)>) -> Listeners {
        Listeners {
            inherited: Mutex::new(
                sockets
                    .into_iter()
                    .map(|(name, fd)| Inherited {
                        name: name.to_owned(),
                        fd,
                        warned: false,
                    })
                    .collect(),
            ),
            held: Mutex::default(),
            from_baton,
        }
    }

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
        let listeners = passed(true, vec![("http", listener.into())]);
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
        let listeners = passed(true, vec![(UNNAMED, listener.into())]);
        let (adopted, origin) = tcp(&listeners, "http", addr).unwrap();
        assert_eq!(
            (adopted.local_addr().unwrap(), origin),
            (addr, Origin::Inherited)
        );
    }

    #[test]
    fn inherited_socket_at_another_address_is_replaced() {
        let listener = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = passed(true, vec![("http", listener.into())]);
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
        let listeners = passed(true, vec![("http", socket.into())]);
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
        let listeners = passed(
            true,
            vec![("udp", udp.into()), ("http", tcp_listener.into())],
        );
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
        let listeners = passed(true, vec![(UNNAMED, udp.into())]);
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

    /// A fresh empty directory for one test.
    fn test_dir(label: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    fn handed_on(listeners: &Listeners) -> Vec<String> {
        listeners.with_handoff(|sockets| sockets.iter().map(|(n, _)| n.to_string()).collect())
    }

    #[test]
    fn passed_socket_is_claimed_by_address_whatever_its_name() {
        let unit = std::net::TcpListener::bind(loopback()).unwrap();
        let admin = std::net::TcpListener::bind(loopback()).unwrap();
        let (unit_addr, admin_addr) = (unit.local_addr().unwrap(), admin.local_addr().unwrap());
        let listeners = passed(
            false,
            vec![("baton-demo.socket", unit.into()), ("admin", admin.into())],
        );
        let (http, origin) = tcp(&listeners, "http", unit_addr).unwrap();
        assert_eq!(
            (http.local_addr().unwrap(), origin),
            (unit_addr, Origin::Inherited)
        );
        let (other, origin) = tcp(&listeners, "http-1", admin_addr).unwrap();
        assert_eq!(
            (other.local_addr().unwrap(), origin),
            (admin_addr, Origin::Inherited)
        );
        // Handed on under the names of the listeners they became.
        assert_eq!(handed_on(&listeners), ["http", "http-1"]);
    }

    #[test]
    fn a_socket_found_by_address_whatever_its_name_must_be_at_that_port() {
        // Port 0 ("some port") takes an unnamed socket on the same IP, not
        // one somebody named for another listener.
        let admin = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = passed(true, vec![("admin", admin.into())]);
        let (_bound, origin) = tcp(&listeners, "http", loopback()).unwrap();
        assert_eq!(origin, Origin::Bound);
    }

    #[test]
    fn lone_unnamed_socket_serves_a_listener_asked_for_elsewhere() {
        for name in [UNNAMED, "", "app.socket"] {
            let listener = std::net::TcpListener::bind(loopback()).unwrap();
            let addr = listener.local_addr().unwrap();
            let listeners = passed(false, vec![(name, listener.into())]);
            // Asked for a Unix socket: the family need not match either.
            let dir = test_dir("lone");
            let asked = ListenAddr::Unix(dir.join("never-bound.sock"));
            let (socket, origin) = listeners.listen("http", &asked).unwrap();
            assert_eq!(origin, Origin::Inherited, "{name:?}");
            match socket {
                ListenSocket::Tcp(l) => {
                    assert_eq!(l.local_addr().unwrap(), addr);
                    assert!(sys::is_nonblocking(l.as_fd()).unwrap());
                }
                other => panic!("not the TCP socket passed: {other:?}"),
            }
            assert!(!dir.join("never-bound.sock").exists());
            // Passed on under its own name, so the next generation takes it
            // by the same rule; reopened under the listener's.
            let passable = if name.is_empty() { UNNAMED } else { name };
            assert_eq!(handed_on(&listeners), [passable]);
            assert!(listeners.reopen("http").is_ok());
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn lone_rule_takes_no_named_socket_and_no_socket_among_several() {
        let admin = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = passed(false, vec![("admin", admin.into())]);
        let (_bound, origin) = tcp(&listeners, "http", loopback()).unwrap();
        assert_eq!(origin, Origin::Bound, "an explicit name is never taken");

        let one = std::net::TcpListener::bind(loopback()).unwrap();
        let two = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = passed(false, vec![(UNNAMED, one.into()), (UNNAMED, two.into())]);
        let dir = test_dir("several");
        let asked = ListenAddr::Unix(dir.join("api.sock"));
        let (_bound, origin) = listeners.listen("api", &asked).unwrap();
        assert_eq!(origin, Origin::Bound, "two unclaimed sockets: none is lone");
        std::fs::remove_dir_all(dir).unwrap();

        // Nor does a private listener (a control socket) take a lone socket.
        let lone = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = passed(false, vec![(UNNAMED, lone.into())]);
        let dir = test_dir("lone-private");
        let (_bound, origin) = listeners
            .listen_unix_private("control", &dir.join("c.sock"), 0o600)
            .unwrap();
        assert_eq!(origin, Origin::Bound);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lone_socket_must_be_listening() {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&SockAddr::from(loopback())).unwrap();
        let listeners = passed(false, vec![(UNNAMED, socket.into())]);
        let err = tcp(&listeners, "http", "127.0.0.1:1".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
    }

    #[test]
    fn unclaimed_systemd_sockets_are_kept_and_handed_on() {
        let http = std::net::TcpListener::bind(loopback()).unwrap();
        let admin = std::net::TcpListener::bind(loopback()).unwrap();
        let spare = std::net::TcpListener::bind(loopback()).unwrap();
        let http_addr = http.local_addr().unwrap();
        let listeners = passed(
            false,
            vec![
                ("http", http.into()),
                ("admin", admin.into()),
                (UNNAMED, spare.into()),
            ],
        );
        tcp(&listeners, "http", http_addr).unwrap();
        assert!(listeners.close_unclaimed().is_empty(), "none closed");
        assert!(lock(&listeners.inherited).iter().all(|p| p.warned));
        assert!(listeners.close_unclaimed().is_empty(), "still none");
        assert_eq!(handed_on(&listeners), ["http", "admin", UNNAMED]);
        // Still claimable later, by name.
        let (_admin, origin) = tcp(&listeners, "admin", loopback()).unwrap();
        assert_eq!(origin, Origin::Inherited);
        listeners.close_held();
        assert!(handed_on(&listeners).is_empty());
    }

    #[test]
    fn unclaimed_named_sockets_from_a_baton_parent_are_closed() {
        let removed = std::net::TcpListener::bind(loopback()).unwrap();
        let spare = std::net::TcpListener::bind(loopback()).unwrap();
        let unit = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = passed(
            true,
            vec![
                ("admin", removed.into()),
                (UNNAMED, spare.into()),
                ("app.socket", unit.into()),
            ],
        );
        assert_eq!(listeners.close_unclaimed(), ["admin"]);
        assert_eq!(handed_on(&listeners), [UNNAMED, "app.socket"]);
        // What cannot travel in LISTEN_FDNAMES goes on as unnamed.
        let empty = std::net::TcpListener::bind(loopback()).unwrap();
        let listeners = passed(false, vec![("", empty.into())]);
        assert!(listeners.close_unclaimed().is_empty());
        assert_eq!(handed_on(&listeners), [UNNAMED]);
    }

    #[test]
    fn reopen_makes_tcp_unix_and_udp_sockets_nonblocking_again() {
        let listeners = Listeners::default();
        let (first, _) = tcp(&listeners, "http", loopback()).unwrap();
        // The successor shares the open file description and cleared it.
        first.set_nonblocking(false).unwrap();
        match listeners.reopen("http").unwrap() {
            ListenSocket::Tcp(again) => assert!(sys::is_nonblocking(again.as_fd()).unwrap()),
            other => panic!("not TCP: {other:?}"),
        }
        assert!(sys::is_nonblocking(first.as_fd()).unwrap(), "shared");

        let dir = test_dir("reopen");
        let (unix, _) = listeners
            .listen("api", &ListenAddr::Unix(dir.join("api.sock")))
            .unwrap();
        let ListenSocket::Unix(unix) = unix else {
            panic!("not Unix")
        };
        unix.set_nonblocking(false).unwrap();
        match listeners.reopen("api").unwrap() {
            ListenSocket::Unix(again) => assert!(sys::is_nonblocking(again.as_fd()).unwrap()),
            other => panic!("not Unix: {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();

        let (udp, _) = listeners.datagram("udp", loopback()).unwrap();
        udp.set_nonblocking(false).unwrap();
        let again = listeners.reopen_datagram("udp").unwrap();
        assert!(sys::is_nonblocking(again.as_fd()).unwrap());
    }

    #[test]
    fn private_unix_listener_has_its_mode_from_the_start() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let dir = test_dir("private");
        let path = dir.join("control.sock");
        drop(UnixListener::bind(&path).unwrap()); // a stale file, replaced
        let listeners = Listeners::default();
        let (socket, origin) = listeners
            .listen_unix_private("control", &path, 0o600)
            .unwrap();
        assert_eq!(origin, Origin::Bound);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        let ListenSocket::Unix(socket) = socket else {
            panic!("not Unix")
        };
        assert!(sys::is_nonblocking(socket.as_fd()).unwrap());
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["control.sock"], "no temporary directory left");
        // A live one is not replaced.
        let err = Listeners::default()
            .listen_unix_private("control", &path, 0o600)
            .unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        // The next generation finds it by name at its path, though it was
        // bound under another one.
        let next = passed(true, vec![("control", socket.into())]);
        let (_again, origin) = next.listen_unix_private("control", &path, 0o600).unwrap();
        assert_eq!(origin, Origin::Inherited);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn private_unix_listener_never_follows_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = test_dir("symlink");
        let target = dir.join("precious");
        std::fs::write(&target, "keep me").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.join("control.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = Listeners::default()
            .listen_unix_private("control", &path, 0o600)
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // A regular file is not replaced either.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "not a socket").unwrap();
        let err = Listeners::default()
            .listen_unix_private("control", &path, 0o600)
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        let left = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(left, 2, "no temporary directory left");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
