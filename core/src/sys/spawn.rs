//! Start the next generation with vfork semantics: `clone(CLONE_VM |
//! CLONE_VFORK | CLONE_PIDFD)` on a small stack of its own, as glibc's
//! `posix_spawn` does, so the cost does not grow with the parent's memory
//! (no page tables copied, no commit charge for a copy under strict
//! overcommit). `fork` is the fallback where the kernel or a seccomp
//! filter refuses that clone.
//!
//! Why sharing memory with the child is sound: with `CLONE_VFORK` the
//! calling thread is suspended until the child has exec'd or exited, so
//! nothing on its stack (the prepared argv, envp, fd plan) moves or is freed
//! meanwhile. The child touches only its own stack (a buffer allocated here,
//! used by nobody else) and the `LISTEN_PID=` slot prepared for it, which the
//! parent never reads. It allocates nothing and takes no lock, so other
//! threads of the parent, which keep running, never see shared state in an
//! inconsistent shape. It runs with every signal blocked and resets every
//! disposition before it unblocks them, so no handler of the parent's ever
//! runs in it. The one shared word it may write is the calling thread's
//! `errno` (same TLS) when `execve` fails; the parent reads `errno` only
//! after a call of its own fails.
//!
//! The fd table is shared too (`CLONE_FILES`): copying it would cost time
//! in proportion to the parent's open fds (10 000 idle connections are
//! 10 000 fds), while the parent thread waits. The child's first call
//! replaces the shared table with a private copy of its low end only
//! (`close_range(highest + 1, ~0, CLOSE_RANGE_UNSHARE)`, Linux 5.9; else
//! `unshare(CLONE_FILES)`, a full copy), so it reads nothing from and
//! changes nothing in the parent's table: everything it needs (the
//! sockets, the readiness fd, the handover end) is at or below `highest`.
//! The caller keeps those fds low (the upgrader reserves a low slot for the
//! readiness fd, and a second one for the handover end when state moves).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};

use super::process::{pidfd_open, Child};

/// How the next generation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpawnMethod {
    /// `clone(CLONE_VM | CLONE_VFORK)`: cost independent of this process's
    /// memory.
    Vfork,
    /// `fork`: the kernel refused the other; costs a copy of the page tables.
    Fork,
}

impl std::fmt::Display for SpawnMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpawnMethod::Vfork => "vfork",
            SpawnMethod::Fork => "fork",
        })
    }
}

/// What [`spawn`] starts: everything is prepared before the clone.
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
    /// The child's end of the handover channel, if any; becomes fd
    /// `3 + sockets.len() + 1` ([`crate::protocol::Passed::handover_fd_for`]).
    pub(crate) handover: Option<BorrowedFd<'a>>,
}

/// Room for `LISTEN_PID=` and the decimal digits of any pid, NUL-terminated.
const PID_VAR: &[u8] = b"LISTEN_PID=";
const PID_SLOT_LEN: usize = PID_VAR.len() + 21;

/// The child's stack. It needs well under a page (no allocation, a 64-byte
/// message buffer, a few calls into libc); 64 KiB leaves room for libc's
/// own frames, like glibc's `posix_spawn`.
const CHILD_STACK: usize = 64 * 1024;

/// The kernel's `struct sigaction` (x86_64, aarch64 and other 64-bit
/// ABIs with a 64-signal set); all zero is `SIG_DFL`. An ABI that reads
/// fewer fields reads zeros too.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Everything the child reads, by raw pointer: it runs on another stack,
/// possibly in the same memory, while the parent's references are frozen.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The digits go after `LISTEN_PID=`; `PID_SLOT_LEN` bytes.
    pid_slot: *mut u8,
    sources: *const RawFd,
    sources_len: usize,
    /// Room for `sources_len` fds: the child's copies of the sources,
    /// moved above the target range. Written only by the child.
    moved: *mut RawFd,
    /// Where the readiness fd ends up: `3 + sockets`, also where an exec
    /// failure is reported.
    ready_target: RawFd,
    /// The highest signal number, read before the clone.
    max_signal: libc::c_int,
}

/// Start `plan` with its sockets at fds 3.. and nothing else open but
/// stdio. Exec failure is not reported here: the child writes
/// `error: exec: errno N` on the readiness fd and exits 127, so the caller
/// learns it the same way as any other failure before "ready".
pub(crate) fn spawn(plan: &SpawnPlan<'_>) -> io::Result<(Child, SpawnMethod)> {
    spawn_with(plan, true)
}

/// [`spawn`], with `vfork: false` to force the fallback (for measuring it).
pub(crate) fn spawn_with(plan: &SpawnPlan<'_>, vfork: bool) -> io::Result<(Child, SpawnMethod)> {
    // The child moves these above its target range itself (see child_main):
    // source i becomes fd 3 + i.
    let raw_sources: Vec<RawFd> = plan
        .sockets
        .iter()
        .chain(std::iter::once(&plan.ready))
        .chain(plan.handover.as_ref())
        .map(AsRawFd::as_raw_fd)
        .collect();
    let ready_target = 3 + plan.sockets.len() as RawFd;
    let mut moved: Vec<RawFd> = vec![-1; raw_sources.len()];

    let mut pid_slot = [0u8; PID_SLOT_LEN];
    pid_slot[..PID_VAR.len()].copy_from_slice(PID_VAR);
    let pid_slot_ptr = pid_slot.as_mut_ptr();
    let mut argv: Vec<*const libc::c_char> = plan.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(pid_slot_ptr.cast_const().cast());
    envp.push(std::ptr::null());
    let program: &CStr = &plan.program;
    let mut args = ChildArgs {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        pid_slot: pid_slot_ptr,
        sources: raw_sources.as_ptr(),
        sources_len: raw_sources.len(),
        moved: moved.as_mut_ptr(),
        ready_target,
        max_signal: libc::SIGRTMAX(),
    };
    // u128 for the 16-byte alignment the ABI wants of a stack pointer.
    let mut stack = vec![0u128; CHILD_STACK / std::mem::size_of::<u128>()];

    // No handler of ours may run in the child, not even before it resets
    // them: block everything around the clone (the child inherits the mask
    // and unblocks it just before exec); restored below whatever happens.
    let mut old_mask = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )?;
    let result = if vfork {
        match clone_vfork(&mut args, &mut stack) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
                ) =>
            {
                log::debug!("clone(CLONE_VM|CLONE_VFORK) refused ({e}): falling back to fork");
                fork(&mut args)
            }
            other => other,
        }
    } else {
        fork(&mut args)
    };
    if let Err(e) = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None) {
        log::warn!("cannot restore the signal mask after spawning: {e}");
    }
    // The child has exec'd (vfork) or runs on its own copy (fork).
    drop(moved);
    drop(stack);
    result
}

/// `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)` on `stack`. Returns once
/// the child has exec'd or exited.
fn clone_vfork(args: &mut ChildArgs, stack: &mut [u128]) -> io::Result<(Child, SpawnMethod)> {
    let stack_top = stack.as_mut_ptr_range().end.cast::<libc::c_void>();
    let mut pidfd: libc::c_int = -1;
    let flags =
        libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::CLONE_PIDFD | libc::SIGCHLD;
    // SAFETY: see the module docs. `stack_top` is the 16-byte aligned end of
    // a buffer only the child uses, big enough for `child_main`; `args` and
    // everything it points to live in this frame, which cannot return (this
    // thread is suspended by CLONE_VFORK) until the child has exec'd or
    // exited; the shared fd table (CLONE_FILES) is left for a private copy
    // before the child touches any fd; `pidfd` is a valid int for the kernel
    // to fill (CLONE_PIDFD
    // uses the parent_tid argument). `child_main` runs only
    // async-signal-safe code with all signals blocked and never returns.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack_top,
            flags,
            (args as *mut ChildArgs).cast::<libc::c_void>(),
            &mut pidfd as *mut libc::c_int,
        )
    };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = if pidfd >= 0 {
        // SAFETY: the kernel wrote a new pidfd (O_CLOEXEC) that nobody owns.
        Some(unsafe { OwnedFd::from_raw_fd(pidfd) })
    } else {
        // A kernel before 5.2 ignores CLONE_PIDFD.
        pidfd_open(pid as u32).ok()
    };
    Ok((Child::new(pid as u32, pidfd), SpawnMethod::Vfork))
}

/// The fallback: `fork`, then a pidfd from the pid (none before Linux 5.3).
fn fork(args: &mut ChildArgs) -> io::Result<(Child, SpawnMethod)> {
    // SAFETY: the child branch runs only `child_main` (async-signal-safe, on
    // its own copy of memory prepared before the fork) and never returns.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        child_main((args as *mut ChildArgs).cast());
        // SAFETY: not reached (child_main never returns); _exit is
        // async-signal-safe.
        unsafe { libc::_exit(127) };
    }
    let pidfd = pidfd_open(pid as u32).ok();
    Ok((Child::new(pid as u32, pidfd), SpawnMethod::Fork))
}

/// The child's side of [`spawn`]: async-signal-safe only, no allocation, no
/// locks, no panics (no indexing that could fail, no formatting). Never
/// returns: it execs or `_exit`s. `arg` points to a [`ChildArgs`] whose
/// pointers the parent keeps valid until then.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent passes a pointer to a live ChildArgs (see spawn),
    // which we only read; `sources` points to `sources_len` fds it
    // prepared; `pid_slot` to PID_SLOT_LEN bytes reserved for us, which the
    // parent only hands to execve through envp.
    let (args, sources, moved, pid_slot) = unsafe {
        let args = &*arg.cast::<ChildArgs>();
        (
            args,
            std::slice::from_raw_parts(args.sources, args.sources_len),
            std::slice::from_raw_parts_mut(args.moved, args.sources_len),
            std::slice::from_raw_parts_mut(args.pid_slot, PID_SLOT_LEN),
        )
    };

    // A private fd table before anything else: with CLONE_FILES the table
    // is the parent's. Keep only its low end, where the sources are.
    let highest = sources.iter().copied().max().unwrap_or(2);
    if !unshare_fds_above(highest) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(126) };
    }

    // LISTEN_PID=<our pid>, as systemd writes it: a grandchild that inherits
    // the variable sees another pid and ignores the protocol.
    // SAFETY: getpid is async-signal-safe and cannot fail (glibc no longer
    // caches it, so it is right in a clone child).
    let pid = unsafe { libc::getpid() } as u64;
    if let Some(digits) = pid_slot.get_mut(PID_VAR.len()..) {
        write_decimal(digits, pid);
    }

    // Move every source above the target range first, so that the dup2
    // calls below never overwrite a source still needed.
    let first_free = 3 + sources.len() as RawFd;
    for (slot, &src) in moved.iter_mut().zip(sources) {
        // SAFETY: fcntl and _exit are async-signal-safe; `src` is open in
        // our private table (copied from the parent's, which holds it).
        unsafe {
            *slot = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, first_free);
            if *slot == -1 {
                libc::_exit(126);
            }
        }
    }
    let ready_target = args.ready_target;
    for (i, &src) in moved.iter().enumerate() {
        // dup2 onto the target clears FD_CLOEXEC there: these, and only
        // these, cross the exec.
        // SAFETY: `src` is open (moved above); dup2 and _exit are
        // async-signal-safe.
        unsafe {
            if libc::dup2(src, 3 + i as RawFd) == -1 {
                libc::_exit(126);
            }
        }
    }
    close_from(first_free);

    // A clean slate for the next program: every disposition back to
    // SIG_DFL (an ignored SIGCHLD or SIGPIPE would otherwise cross exec, a
    // handler could run here before it), then an empty mask. The raw
    // syscall, because glibc's sigaction refuses its internal signals (32,
    // 33), which can be ignored too; glibc's for the rare ABI where the
    // kernel's struct differs. SIGKILL and SIGSTOP cannot be changed.
    let kernel_default = KernelSigaction::default();
    // SAFETY: rt_sigaction, sigaction, sigemptyset and sigprocmask are
    // async-signal-safe; every struct is a local on our stack, all zero
    // (SIG_DFL, no flags, empty mask).
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=args.max_signal {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let res = libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &kernel_default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            );
            if res != 0 {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }

    // SAFETY: program, argv and envp are NUL-terminated and valid; execve
    // only returns on failure.
    unsafe { libc::execve(args.program, args.argv, args.envp) };

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
/// returns the number of digits. Used between clone and exec.
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

/// Leave a shared fd table for a private one holding only fds up to
/// `highest` (the rest closed in the copy, never in the parent's):
/// `close_range(highest + 1, ~0, CLOSE_RANGE_UNSHARE)`, or on kernels
/// before 5.9 `unshare(CLONE_FILES)` (a full copy; the rest is closed
/// later). False if neither works: the table is still shared and the child
/// must not touch it. Async-signal-safe.
fn unshare_fds_above(highest: RawFd) -> bool {
    // SAFETY: close_range and unshare are plain syscalls without memory
    // arguments.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (highest + 1) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        ) == 0
            || libc::unshare(libc::CLONE_FILES) == 0
    }
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
    // in glibc and musl); close takes no memory, and EBADF is fine.
    unsafe {
        let max = libc::sysconf(libc::_SC_OPEN_MAX);
        let max = if max <= 0 {
            65_536
        } else {
            max.min(1 << 20) as RawFd
        };
        for fd in first..max {
            libc::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

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

    fn plan<'a>(program: &str, ready: BorrowedFd<'a>) -> SpawnPlan<'a> {
        SpawnPlan {
            program: CString::new(program).unwrap(),
            args: vec![CString::new(program).unwrap()],
            env: Vec::new(),
            sockets: Vec::new(),
            ready,
            handover: None,
        }
    }

    #[test]
    fn spawn_uses_vfork_and_gives_a_pidfd() {
        let (read, write) = super::super::readiness_pipe().unwrap();
        let (child, method) = spawn(&plan("/bin/true", write.as_fd())).unwrap();
        assert_eq!(
            method,
            SpawnMethod::Vfork,
            "Linux 6.x accepts CLONE_VM|CLONE_VFORK|CLONE_PIDFD"
        );
        assert!(child.pidfd().is_some());
        drop(write);
        let status = child.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status, Some(crate::sys::ExitStatus::Exited(0)));
        drop(read);
    }

    #[test]
    fn fork_fallback_still_works() {
        let (_read, write) = super::super::readiness_pipe().unwrap();
        let (child, method) = spawn_with(&plan("/bin/true", write.as_fd()), false).unwrap();
        assert_eq!(method, SpawnMethod::Fork);
        assert!(child.pidfd().is_some(), "pidfd_open after fork");
        let status = child.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status, Some(crate::sys::ExitStatus::Exited(0)));
    }

    /// The parent's blocking time in `spawn`, fork against vfork, with a
    /// 1 GiB touched heap. Ignored: it allocates 1 GiB. Run with
    /// `cargo test -p baton-core --release -- --ignored --nocapture spawn_cost`.
    #[test]
    #[ignore = "allocates 1 GiB; a measurement, not a check"]
    fn spawn_cost_with_a_large_heap() {
        fn median_spawn(vfork: bool) -> Duration {
            let mut times: Vec<Duration> = (0..7)
                .map(|_| {
                    let (_read, write) = super::super::readiness_pipe().unwrap();
                    let started = Instant::now();
                    let (child, _) = spawn_with(&plan("/bin/true", write.as_fd()), vfork).unwrap();
                    let took = started.elapsed();
                    child.wait_timeout(Duration::from_secs(10)).unwrap();
                    took
                })
                .collect();
            times.sort();
            times[times.len() / 2]
        }
        let small = (median_spawn(false), median_spawn(true));
        let ballast = vec![1u8; 1 << 30];
        let large = (median_spawn(false), median_spawn(true));
        eprintln!(
            "spawn, parent blocked (median of 7): empty heap: fork {:?}, vfork {:?}; \
             1 GiB touched: fork {:?}, vfork {:?}",
            small.0, small.1, large.0, large.1
        );
        assert_eq!(
            ballast
                .iter()
                .step_by(4096)
                .map(|&b| b as usize)
                .sum::<usize>(),
            1 << 18
        );
    }
}
