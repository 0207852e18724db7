//! Every raw system call baton makes, and the only place with `unsafe`.
//!
//! The contract the rest of the crate relies on:
//! - every fd that comes out of here is an [`OwnedFd`] with `FD_CLOEXEC` set,
//!   so nothing leaks into a process the application spawns;
//! - [`spawn`] runs only async-signal-safe code between `clone`/`fork` and
//!   `execve`: everything it needs (paths, argv, envp, the fd plan, the
//!   child's stack) is allocated before, and the child writes only into
//!   memory prepared for it;
//! - nothing here blocks (tests' helpers aside): a child is killed and
//!   waited for through [`Child`], which never waits.
//!
//! Outside the child, calls go through nix's safe wrappers (socket2 for the
//! socket options nix lacks); raw `libc` is left for the child and for the
//! syscalls nix does not wrap (`pidfd_open`, `pidfd_send_signal`, `clone`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

mod process;
pub(crate) mod seqpacket;
mod spawn;

pub use process::ExitStatus;
pub(crate) use process::{pidfd_open, try_wait_pidfd, Child};
pub use spawn::SpawnMethod;
pub(crate) use spawn::{spawn, SpawnPlan};

/// The pid of this process.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd's `MONOTONIC_USEC=` wants.
pub(crate) fn monotonic_usec() -> u64 {
    // CLOCK_MONOTONIC always exists on Linux; 0 would only mean "unknown".
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000)
        .unwrap_or(0)
}

/// True if a process with this pid exists (ours or another user's).
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == Errno::EPERM,
    }
}

/// Take ownership of an fd this process inherited by protocol.
///
/// Fails with `EBADF` if the fd is not open, so a lying `LISTEN_FDS` is an
/// error rather than a double close later. Sets `FD_CLOEXEC` at once.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD takes no pointer; on a closed or negative fd it fails
    // with EBADF, which is the check we want before taking ownership.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (F_GETFD succeeded), it was declared to us by the
    // socket-activation protocol, and the caller adopts each declared fd
    // exactly once (see `listeners::Inherited::from_env`), so no other owner
    // will close it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl(owned.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(owned)
}

/// True if `FD_CLOEXEC` is set on `fd`.
#[cfg(test)]
pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = fcntl(fd, FcntlArg::F_GETFD)?;
    Ok(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC))
}

/// True if the open file description is `O_NONBLOCK`.
pub(crate) fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    Ok(OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK))
}

/// True if `fd` is open for writing (`O_WRONLY` or `O_RDWR`).
pub(crate) fn is_writable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    Ok(matches!(
        flags & libc::O_ACCMODE,
        libc::O_WRONLY | libc::O_RDWR
    ))
}

/// A pipe, both ends `O_CLOEXEC`, the read end `O_NONBLOCK` so a reactor can
/// wait on it and a read never blocks. Returns `(read, write)`.
pub(crate) fn readiness_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let flags = OFlag::from_bits_truncate(fcntl(read.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(read.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok((read, write))
}

/// A placeholder fd (`/dev/null`, close-on-exec) at the lowest free
/// number: taken early, it keeps a low fd number for later use.
pub(crate) fn reserve_fd() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

/// `read(2)` into `buf`; `Ok(0)` is end of file.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(nix::unistd::read(fd, buf)?)
}

/// `write(2)` of all of `buf`, retrying on `EINTR` and short writes.
pub(crate) fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Wait up to `timeout` for `fd` to become readable; false on timeout.
/// Blocks: for tests, which have no reactor.
#[cfg(test)]
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    Ok(poll(&mut fds, timeout)? > 0)
}

/// Wait up to `timeout` for `fd` to become readable (or writable too, with
/// `write`), or to have an error or hang-up pending; false on timeout.
/// Blocks: for a generation that serves nothing yet.
pub(crate) fn wait_io(
    fd: BorrowedFd<'_>,
    write: bool,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut flags = PollFlags::POLLIN;
    if write {
        flags |= PollFlags::POLLOUT;
    }
    let mut fds = [PollFd::new(fd, flags)];
    match poll(&mut fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// True if nobody reads the pipe `fd` writes to any more (`POLLERR` on a
/// write end): writing would raise `SIGPIPE`.
pub(crate) fn reader_gone(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => true,
    }
}

/// The uid of the process at the other end of a Unix socket (`SO_PEERCRED`),
/// for a control socket that answers only its owner.
pub(crate) fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let cred = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.uid())
}

/// This process's effective uid.
pub(crate) fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// What a socket is, read from the kernel rather than assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    /// `SOCK_STREAM`, `SOCK_DGRAM`, …
    pub(crate) socket_type: libc::c_int,
    /// `AF_INET`, `AF_INET6`, `AF_UNIX`, …
    pub(crate) family: libc::c_int,
    /// `SO_ACCEPTCONN`: `listen(2)` was called on it.
    pub(crate) listening: bool,
}

/// Inspect `fd`: `ENOTSOCK` if it is not a socket.
pub(crate) fn socket_info(fd: BorrowedFd<'_>) -> io::Result<SocketInfo> {
    let stat = nix::sys::stat::fstat(fd)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
    }
    // socket2 rather than nix: nix has no SO_DOMAIN, and its SO_TYPE fails
    // on types it does not know.
    let socket = socket2::SockRef::from(&fd);
    Ok(SocketInfo {
        socket_type: socket.r#type()?.into(),
        family: socket.domain()?.into(),
        listening: socket.is_listener()?,
    })
}

/// The soft and hard `RLIMIT_NOFILE`.
pub(crate) fn nofile_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    Ok((soft, hard))
}

/// Set the soft `RLIMIT_NOFILE`, keeping the hard one.
pub(crate) fn set_nofile_soft_limit(soft: u64, hard: u64) -> io::Result<()> {
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    #[test]
    fn readiness_pipe_is_cloexec_and_read_end_nonblocking() {
        let (read, write) = readiness_pipe().unwrap();
        assert!(is_cloexec(read.as_fd()).unwrap());
        assert!(is_cloexec(write.as_fd()).unwrap());
        assert!(is_nonblocking(read.as_fd()).unwrap());
        let mut buf = [0u8; 4];
        let err = super::read(read.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn write_all_then_read_through_the_pipe() {
        let (read, write) = readiness_pipe().unwrap();
        write_all(write.as_fd(), b"error: x\n").unwrap();
        let mut buf = [0u8; 16];
        let n = super::read(read.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"error: x\n");
        assert!(is_writable(write.as_fd()).unwrap());
        assert!(!is_writable(read.as_fd()).unwrap());
    }

    #[test]
    fn adopting_a_closed_fd_is_ebadf() {
        let (read, _write) = readiness_pipe().unwrap();
        let raw = read.as_raw_fd();
        drop(read);
        let err = adopt_inherited_fd(raw).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert!(adopt_inherited_fd(-1).is_err());
    }

    #[test]
    fn peer_uid_of_a_socketpair_is_our_own() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(peer_uid(a.as_fd()).unwrap(), effective_uid());
    }

    #[test]
    fn socket_info_rejects_a_pipe_and_reads_a_listener() {
        let (read, _write) = readiness_pipe().unwrap();
        let err = socket_info(read.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let info = socket_info(listener.as_fd()).unwrap();
        assert_eq!(info.socket_type, libc::SOCK_STREAM);
        assert_eq!(info.family, libc::AF_INET);
        assert!(info.listening);
    }

    #[test]
    fn this_process_exists_and_monotonic_clock_moves() {
        assert!(process_exists(getpid()));
        assert!(!process_exists(0));
        assert!(!process_exists(u32::MAX));
        let a = monotonic_usec();
        assert!(a > 0);
        assert!(monotonic_usec() >= a);
    }
}
