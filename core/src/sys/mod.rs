//! Every raw system call baton makes, and the only place with `unsafe`.
//!
//! The contract the rest of the crate relies on:
//! - every fd that comes out of here is an [`OwnedFd`] with `FD_CLOEXEC` set,
//!   so nothing leaks into a process the application spawns;
//! - [`spawn`] runs only async-signal-safe code between `fork` and `execve`:
//!   everything it needs (paths, argv, envp, the fd plan) is allocated before
//!   the fork, and the child only writes into memory it already owns;
//! - nothing here blocks, except [`reap`] on a child that was just sent
//!   `SIGKILL`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Call a libc function and turn its `-1` into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($fn: ident ( $($arg: expr),* $(,)* ) ) => {{
        // SAFETY: every call site passes valid fds and pointers to memory it
        // owns for the duration of the call; see the comment at each use.
        let res = unsafe { libc::$fn($($arg, )*) };
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// The pid of this process.
pub(crate) fn getpid() -> u32 {
    std::process::id()
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd's `MONOTONIC_USEC=` wants.
pub(crate) fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill;
    // CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// True if a process with this pid exists (ours or another user's).
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    match syscall!(kill(pid, 0)) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EPERM),
    }
}

/// Take ownership of an fd this process inherited by protocol.
///
/// Fails with `EBADF` if the fd is not open, so a lying `LISTEN_FDS` is an
/// error rather than a double close later. Sets `FD_CLOEXEC` at once.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    let flags = syscall!(fcntl(fd, libc::F_GETFD))?;
    syscall!(fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC))?;
    // SAFETY: the fd is open (F_GETFD succeeded), it was declared to us by the
    // socket-activation protocol, and the caller adopts each declared fd
    // exactly once (see `listeners::Inherited::from_env`), so no other owner
    // will close it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// True if `FD_CLOEXEC` is set on `fd`.
#[cfg(test)]
pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFD))?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// True if the open file description is `O_NONBLOCK`.
pub(crate) fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    Ok(flags & libc::O_NONBLOCK != 0)
}

/// True if `fd` is open for writing (`O_WRONLY` or `O_RDWR`).
pub(crate) fn is_writable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    Ok(matches!(
        flags & libc::O_ACCMODE,
        libc::O_WRONLY | libc::O_RDWR
    ))
}

/// A pipe, both ends `O_CLOEXEC`, the read end `O_NONBLOCK` so a reactor can
/// wait on it and a read never blocks. Returns `(read, write)`.
pub(crate) fn readiness_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let res = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if res == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let flags = syscall!(fcntl(read.as_raw_fd(), libc::F_GETFL))?;
    syscall!(fcntl(
        read.as_raw_fd(),
        libc::F_SETFL,
        flags | libc::O_NONBLOCK
    ))?;
    Ok((read, write))
}

/// `read(2)` into `buf`; `Ok(0)` is end of file.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `write(2)` of all of `buf`, retrying on `EINTR` and short writes.
pub(crate) fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for `buf.len()` bytes of reads.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Send `SIGKILL` to `pid`. A child that already exited (a zombie) is not an
/// error: its exit status stays for [`reap`].
pub(crate) fn kill(pid: u32) -> io::Result<()> {
    match syscall!(kill(pid as libc::pid_t, libc::SIGKILL)) {
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other.map(drop),
    }
}

/// An fd that becomes readable when the child `pid` exits (Linux 5.3+).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd (O_CLOEXEC by default) that
    // nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit status {code}"),
            ExitStatus::Signaled(sig) => write!(f, "killed by signal {sig}"),
        }
    }
}

/// Wait for `pid` to end and collect its status. Blocks: call it only on a
/// child that has exited or was sent `SIGKILL`.
pub(crate) fn reap(pid: u32) -> io::Result<ExitStatus> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid int for waitpid to fill.
        let res = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if res == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        break;
    }
    if libc::WIFSIGNALED(status) {
        Ok(ExitStatus::Signaled(libc::WTERMSIG(status)))
    } else {
        Ok(ExitStatus::Exited(libc::WEXITSTATUS(status)))
    }
}

/// Collect `pid`'s status if it has ended, without waiting.
pub(crate) fn try_reap(pid: u32) -> io::Result<Option<ExitStatus>> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid int for waitpid to fill.
    let res = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    match res {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        _ if libc::WIFSIGNALED(status) => Ok(Some(ExitStatus::Signaled(libc::WTERMSIG(status)))),
        _ => Ok(Some(ExitStatus::Exited(libc::WEXITSTATUS(status)))),
    }
}

/// What [`spawn`] starts: everything is prepared before the fork.
#[derive(Debug)]
pub(crate) struct SpawnPlan<'a> {
    /// Absolute path of the binary.
    pub(crate) program: CString,
    /// `argv`, including `argv[0]`.
    pub(crate) args: Vec<CString>,
    /// The environment, without `LISTEN_PID` (the child writes its own).
    pub(crate) env: Vec<CString>,
    /// Sockets that become fds 3, 4, … in the child, in this order.
    pub(crate) sockets: Vec<BorrowedFd<'a>>,
    /// Write end of the readiness pipe; becomes fd `3 + sockets.len()`.
    pub(crate) ready: BorrowedFd<'a>,
}

/// Room for `LISTEN_PID=` and the decimal digits of any pid, NUL-terminated.
const PID_VAR: &[u8] = b"LISTEN_PID=";
const PID_SLOT_LEN: usize = PID_VAR.len() + 21;

/// Fork and exec `plan` with its sockets at fds 3.. and nothing else open
/// but stdio. Returns the child's pid. Exec failure is not reported here: the
/// child writes `error: exec: errno N` on the readiness fd and exits 127, so
/// the caller learns it the same way as any other failure before "ready".
pub(crate) fn spawn(plan: &SpawnPlan<'_>) -> io::Result<u32> {
    let first_free = 3 + plan.sockets.len() as RawFd + 1;
    // Move every fd the child needs above the target range first, so that
    // the dup2 calls in the child can never overwrite a source they still
    // need. These copies are CLOEXEC and closed in the child before exec.
    let mut sources = Vec::with_capacity(plan.sockets.len() + 1);
    for fd in plan.sockets.iter().chain(std::iter::once(&plan.ready)) {
        let raw = syscall!(fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, first_free))?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nobody else owns.
        sources.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    let raw_sources: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();

    let mut pid_slot = [0u8; PID_SLOT_LEN];
    pid_slot[..PID_VAR.len()].copy_from_slice(PID_VAR);
    let mut argv: Vec<*const libc::c_char> = plan.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(pid_slot.as_ptr().cast());
    envp.push(std::ptr::null());
    let program: &CStr = &plan.program;

    // SAFETY: fork is safe to call; the child branch below runs only
    // async-signal-safe functions (getpid, dup2, close_range/close,
    // sigprocmask, signal, execve, write, _exit) on memory allocated before
    // the fork, and never returns.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork; see child_after_fork.
        unsafe { child_after_fork(program, &argv, &envp, &mut pid_slot, &raw_sources) }
    }
    drop(sources);
    Ok(pid as u32)
}

/// The child's side of [`spawn`]. Async-signal-safe only: no allocation, no
/// locks, no panics (no indexing that could fail, no formatting machinery).
///
/// # Safety
///
/// Must be called only in the child right after `fork`, with pointers into
/// memory the parent prepared before forking.
unsafe fn child_after_fork(
    program: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    pid_slot: &mut [u8; PID_SLOT_LEN],
    sources: &[RawFd],
) -> ! {
    // LISTEN_PID=<our pid>, as systemd writes it: a grandchild that inherits
    // the variable sees another pid and ignores the protocol.
    // SAFETY: getpid is async-signal-safe and cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    write_decimal(&mut pid_slot[PID_VAR.len()..], pid as u64);

    let ready_target = sources.len() as RawFd + 2; // 3 + (sources.len() - 1)
    for (i, &src) in sources.iter().enumerate() {
        // dup2 onto the target clears FD_CLOEXEC there: these, and only
        // these, cross the exec.
        // SAFETY: `src` is open (prepared by the parent); dup2 is async-signal-safe.
        if unsafe { libc::dup2(src, 3 + i as RawFd) } == -1 {
            // SAFETY: _exit is async-signal-safe and never returns.
            unsafe { libc::_exit(126) };
        }
    }
    close_from(ready_target + 1);

    // A clean slate for the next program: Rust ignores SIGPIPE and a runtime
    // may have blocked signals; both survive exec otherwise.
    // SAFETY: sigemptyset/sigprocmask/signal are async-signal-safe; `set`
    // is a valid sigset_t on our stack.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }

    // SAFETY: program, argv and envp are NUL-terminated and valid; execve
    // only returns on failure.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };

    // Report the failure on the readiness fd: "error: exec: errno N\n".
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut msg = [0u8; 64];
    let prefix = crate::upgrade::EXEC_ERROR_PREFIX.as_bytes();
    let mut len = 0;
    for (dst, src) in msg.iter_mut().zip(prefix) {
        *dst = *src;
        len += 1;
    }
    if let Some(rest) = msg.get_mut(len..) {
        len += write_decimal(rest, errno as u64);
    }
    if let Some(slot) = msg.get_mut(len) {
        *slot = b'\n';
        len += 1;
    }
    // SAFETY: write and _exit are async-signal-safe; `msg` is on our stack.
    unsafe {
        libc::write(ready_target, msg.as_ptr().cast(), len);
        libc::_exit(127)
    }
}

/// Write `n` in decimal followed by a NUL into `out` without allocating;
/// returns the number of digits. Used between fork and exec.
fn write_decimal(out: &mut [u8], mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut count = 0;
    loop {
        if let Some(d) = digits.get_mut(count) {
            *d = b'0' + (n % 10) as u8;
        }
        count += 1;
        n /= 10;
        if n == 0 || count == digits.len() {
            break;
        }
    }
    let mut written = 0;
    for i in (0..count).rev() {
        if let (Some(dst), Some(src)) = (out.get_mut(written), digits.get(i)) {
            *dst = *src;
            written += 1;
        }
    }
    if let Some(nul) = out.get_mut(written) {
        *nul = 0;
    }
    written
}

/// Close every fd from `first` up. Async-signal-safe.
fn close_from(first: RawFd) {
    // SAFETY: close_range is a plain syscall without memory arguments.
    let res = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if res == 0 {
        return;
    }
    // Kernels before 5.9: close one by one up to the fd limit.
    // SAFETY: sysconf is async-signal-safe in practice (a getrlimit syscall
    // in glibc and musl).
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    let max = if max <= 0 {
        65_536
    } else {
        max.min(1 << 20) as RawFd
    };
    for fd in first..max {
        // SAFETY: closing an fd number we do not use again; EBADF is fine.
        unsafe { libc::close(fd) };
    }
}

/// Wait up to `timeout` for `fd` to become readable; false on timeout.
/// Blocks: for tests, which have no reactor.
#[cfg(test)]
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    let n = syscall!(poll(&mut pfd, 1, millis))?;
    Ok(n > 0)
}

/// The uid of the process at the other end of a Unix socket (`SO_PEERCRED`),
/// for a control socket that answers only its owner.
pub(crate) fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_PEERCRED,
        (&mut cred as *mut libc::ucred).cast(),
        &mut len,
    ))?;
    Ok(cred.uid)
}

/// This process's effective uid.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
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
    // SAFETY: `stat` is a valid, zeroed struct for fstat to fill.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(fstat(fd.as_raw_fd(), &mut stat))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::ENOTSOCK));
    }
    Ok(SocketInfo {
        socket_type: getsockopt_int(fd, libc::SO_TYPE)?,
        family: getsockopt_int(fd, libc::SO_DOMAIN)?,
        listening: getsockopt_int(fd, libc::SO_ACCEPTCONN)? != 0,
    })
}

fn getsockopt_int(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        option,
        (&mut value as *mut libc::c_int).cast(),
        &mut len,
    ))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn write_decimal_writes_digits_and_nul() {
        let mut out = [0xffu8; 24];
        assert_eq!(write_decimal(&mut out, 0), 1);
        assert_eq!(&out[..2], b"0\0");
        assert_eq!(write_decimal(&mut out, 4_194_304), 7);
        assert_eq!(&out[..8], b"4194304\0");
        assert_eq!(write_decimal(&mut out, u64::MAX), 20);
        assert_eq!(&out[..21], b"18446744073709551615\0");
        let mut small = [0u8; 3];
        assert_eq!(
            write_decimal(&mut small, 12345),
            3,
            "truncates, never panics"
        );
    }

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
}
