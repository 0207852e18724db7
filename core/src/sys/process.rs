//! A started child, killed and waited for by pidfd where the kernel has one,
//! and never waited for in a blocking call.
//!
//! With a pidfd, a signal can only reach the process that was started, never
//! another one that reused its pid after an application reaped it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

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

/// A child this process started and has not reaped yet.
#[derive(Debug)]
pub(crate) struct Child {
    pid: u32,
    /// Readable once the child has exited (Linux 5.3+); `None` on kernels
    /// without pidfds, where the pid is used instead.
    pidfd: Option<OwnedFd>,
}

impl Child {
    pub(crate) fn new(pid: u32, pidfd: Option<OwnedFd>) -> Self {
        Child { pid, pidfd }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The pidfd, readable once the child has exited.
    pub(crate) fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(AsFd::as_fd)
    }

    /// The pidfd, opened now from the pid if the spawn did not give one.
    pub(crate) fn into_pidfd(self) -> io::Result<OwnedFd> {
        match self.pidfd {
            Some(fd) => Ok(fd),
            None => pidfd_open(self.pid),
        }
    }

    /// Send `SIGKILL`. A child that already exited (a zombie) is not an
    /// error: its exit status stays for [`try_wait`](Self::try_wait).
    pub(crate) fn kill(&self) -> io::Result<()> {
        let res = match &self.pidfd {
            Some(fd) => pidfd_send_signal(fd.as_fd(), libc::SIGKILL),
            None => nix::sys::signal::kill(pid(self.pid)?, nix::sys::signal::SIGKILL)
                .map_err(io::Error::from),
        };
        match res {
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// Collect the child's status if it has ended, without waiting. Once it
    /// returned `Some`, the child is reaped: drop this value.
    pub(crate) fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        match &self.pidfd {
            Some(fd) => try_wait_pidfd(fd.as_fd()),
            None => status(waitpid(pid(self.pid)?, Some(WaitPidFlag::WNOHANG))),
        }
    }

    /// Wait up to `timeout` for the child to end, on its pidfd. For tests,
    /// which have no reactor.
    #[cfg(test)]
    pub(crate) fn wait_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> io::Result<Option<ExitStatus>> {
        if let Some(fd) = self.pidfd() {
            super::wait_readable(fd, timeout)?;
        }
        self.try_wait()
    }
}

/// Collect the status of the child behind `pidfd` if it has ended, without
/// waiting (`waitid(P_PIDFD, WEXITED | WNOHANG)`).
pub(crate) fn try_wait_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    match status(waitid(
        Id::PIDFd(pidfd),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
    )) {
        // A pidfd made non-blocking (a reactor may do that to a duplicate)
        // says "still running" this way.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(None),
        other => other,
    }
}

fn status(status: nix::Result<WaitStatus>) -> io::Result<Option<ExitStatus>> {
    Ok(match status? {
        WaitStatus::Exited(_, code) => Some(ExitStatus::Exited(code)),
        WaitStatus::Signaled(_, signal, _) => Some(ExitStatus::Signaled(signal as i32)),
        // WNOHANG and nothing yet; stops and continues are not asked for.
        _ => None,
    })
}

fn pid(pid: u32) -> io::Result<Pid> {
    match libc::pid_t::try_from(pid) {
        Ok(pid) if pid > 0 => Ok(Pid::from_raw(pid)),
        _ => Err(io::Error::from(Errno::ESRCH)),
    }
}

/// An fd that becomes readable when the child `pid` exits (Linux 5.3+).
/// Raw syscall: nix has no wrapper for it.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = self::pid(pid)?;
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd (O_CLOEXEC by default) that
    // nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`: raw syscall, nix has no wrapper for it.
fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: integers only, and a null siginfo (the kernel fills in one as
    // for kill(2)); `pidfd` is open for the duration of the call.
    let res = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if res == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
