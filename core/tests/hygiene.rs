//! fd and environment hygiene of an adopted generation, with a real
//! grandchild: `examples/adopt_and_spawn.rs` is started as a baton child
//! (through [`Upgrader`], as a server's upgrade would), adopts the listener
//! it is passed, and spawns `sh -c 'ls -l /proc/self/fd; echo LISTEN_PID=…'`.
//!
//! - The grandchild holds no socket at fd 3 or above: adopted sockets are
//!   close-on-exec, and no undeclared fd crosses the exec.
//! - It sees `LISTEN_PID` naming its parent, not itself, so it ignores the
//!   `LISTEN_*` variables (the library never mutates the environment).
//! - The shared listener is still non-blocking afterwards: adopting it never
//!   switched the shared file description to blocking mode.
//!
//! - The next generation starts with every signal disposition at its
//!   default and nothing blocked, whatever the parent ignored, caught or
//!   blocked; the parent's own mask is restored after the spawn.
//!
//! Every wait is on the readiness fd or the child's exit, bounded in time.

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::Command;
use std::task::Poll;
use std::time::{Duration, Instant};

use baton_core::{PendingUpgrade, UpgradeError, Upgraded, Upgrader};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// The example's binary, next to this test's (`target/PROFILE/examples/`),
/// built first if `cargo test` did not build examples (e.g. `--test hygiene`).
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/PROFILE/deps/hygiene-HASH -> target/PROFILE/examples/adopt_and_spawn
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/PROFILE");
    let path = profile_dir.join("examples").join("adopt_and_spawn");
    if !path.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "baton-core", "--example", "adopt_and_spawn"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build --example");
        assert!(status.success(), "building the example failed: {status}");
    }
    path
}

/// `flags` of our own `fd`, from `/proc/self/fdinfo` (octal).
fn fd_flags(fd: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .expect("read fdinfo")
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .expect("flags in fdinfo")
}

#[test]
fn grandchild_inherits_no_socket_and_ignores_listen_vars() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("set_nonblocking");
    let output = std::env::temp_dir().join(format!("baton-hygiene-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&output);

    let program = example();
    let upgrader = Upgrader::new(
        program.clone(),
        vec![program.clone().into(), output.clone().into()],
        0,
        Duration::from_secs(20),
    );
    let mut pending = upgrader
        .start(&[("http", listener.as_fd())])
        .expect("start the example as a baton child");
    let child = pending.pid();
    let deadline = pending.deadline();
    // Bounded: each round waits for the readiness fd (or the deadline).
    let mut outcome = None;
    for _ in 0..1000 {
        if let Poll::Ready(result) = pending.poll() {
            outcome = Some(result);
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        let mut fds = [PollFd::new(pending.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
    let upgraded = match outcome {
        Some(Ok(upgraded)) => upgraded,
        Some(Err(e)) => panic!("the example failed: {e}"),
        None => panic!("the example did not report ready: {}", pending.time_out()),
    };
    assert_eq!(upgraded.pid, child);
    let status = waitpid(Pid::from_raw(child as i32), None).expect("waitpid");
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "the example ended with {status:?}"
    );

    let text = std::fs::read_to_string(&output).expect("read the grandchild's output");
    let _ = std::fs::remove_file(&output);
    assert!(
        text.starts_with("listener http: Inherited\n"),
        "the example did not adopt the passed listener:\n{text}"
    );
    // `ls -l` lines: "lrwx------ 1 u g 64 DATE 3 -> socket:[123]".
    let fds: Vec<(u32, &str)> = text
        .lines()
        .filter_map(|line| {
            let (left, target) = line.split_once(" -> ")?;
            let fd = left.split_whitespace().last()?.parse().ok()?;
            Some((fd, target))
        })
        .collect();
    assert!(
        fds.iter().any(|&(fd, _)| fd <= 2),
        "no fd listing in the grandchild's output:\n{text}"
    );
    let sockets: Vec<_> = fds
        .iter()
        .filter(|(fd, target)| *fd >= 3 && target.starts_with("socket:"))
        .collect();
    assert!(
        sockets.is_empty(),
        "the grandchild inherited sockets {sockets:?}:\n{text}"
    );

    let vars = text
        .lines()
        .find_map(|l| l.strip_prefix("LISTEN_PID="))
        .unwrap_or_else(|| panic!("no LISTEN_PID line:\n{text}"));
    let (listen_pid, own) = vars.split_once(" pid=").expect("LISTEN_PID=X pid=Y");
    assert_eq!(
        listen_pid,
        child.to_string(),
        "LISTEN_PID should still name the example (its parent)"
    );
    assert_ne!(listen_pid, own, "LISTEN_PID names the grandchild itself");

    let flags = fd_flags(listener.as_raw_fd());
    assert!(
        flags & libc::O_NONBLOCK as u32 != 0,
        "the shared listener was switched to blocking: flags {flags:o}"
    );
}

/// Poll `pending` on its readiness and exit fds until it settles; bounded
/// by its deadline and a round count.
fn settle(mut pending: PendingUpgrade) -> Result<Upgraded, UpgradeError> {
    for _ in 0..1000 {
        if let Poll::Ready(result) = pending.poll() {
            return result;
        }
        let left = pending.deadline().saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        let mut fds = vec![PollFd::new(pending.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            pending
                .exit_fd()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
        );
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
    Err(pending.time_out())
}

/// `SigBlk`, `SigIgn` and `SigCgt` of a `/proc/.../status` text, as masks.
fn signal_masks(status: &str) -> [u64; 3] {
    ["SigBlk:", "SigIgn:", "SigCgt:"].map(|key| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{status}"))
    })
}

fn bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

const SIGNAL_PARENT: &str = "BATON_TEST_SIGNAL_PARENT";

/// The parent side runs in a fresh copy of this test binary, started
/// through perl with `SIGCHLD` ignored (an ignored disposition survives
/// exec): ignoring it here would reap the other tests' children.
#[test]
fn next_generation_starts_with_default_signal_dispositions() {
    let exe = std::env::current_exe().expect("current_exe");
    let output = Command::new("perl")
        .args([
            "-e",
            "$SIG{CHLD} = 'IGNORE'; exec @ARGV or die \"exec: $!\"",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "signal_parent",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SIGNAL_PARENT, "1")
        .output()
        .expect("run perl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{exe:?} signal_parent: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
}

#[test]
#[ignore = "run by next_generation_starts_with_default_signal_dispositions"]
fn signal_parent() {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    if std::env::var_os(SIGNAL_PARENT).is_none() {
        return;
    }
    // A handler (SIGUSR1), a blocked signal (SIGUSR2) on this thread, and
    // from the environment SIGCHLD ignored; Rust ignores SIGPIPE.
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGUSR1, flag).expect("install a handler");
    let mut usr2 = SigSet::empty();
    usr2.add(Signal::SIGUSR2);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&usr2), None).expect("block SIGUSR2");
    let own = || std::fs::read_to_string("/proc/thread-self/status").expect("read own status");
    let [blocked, ignored, caught] = signal_masks(&own());
    assert_eq!(blocked, bit(libc::SIGUSR2), "precondition: SIGUSR2 blocked");
    assert_ne!(
        ignored & bit(libc::SIGCHLD),
        0,
        "precondition: SIGCHLD ignored"
    );
    assert_ne!(
        ignored & bit(libc::SIGPIPE),
        0,
        "precondition: SIGPIPE ignored"
    );
    assert_ne!(
        caught & bit(libc::SIGUSR1),
        0,
        "precondition: SIGUSR1 caught"
    );

    // cp copies its own status as exec left it (cp sets no handler).
    let out = std::env::temp_dir().join(format!("baton-signals-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let cp = PathBuf::from("/bin/cp");
    let upgrader = Upgrader::new(
        cp.clone(),
        vec![cp.into(), "/proc/self/status".into(), out.clone().into()],
        0,
        Duration::from_secs(20),
    );
    let pending = upgrader.start(&[]).expect("start cp as a baton child");
    // With SIGCHLD ignored the kernel reaps cp itself: the upgrade ends in
    // an error either way; what matters is what cp saw.
    let result = settle(pending);
    assert!(result.is_err(), "cp never reports ready: {result:?}");

    let [blocked_after, ..] = signal_masks(&own());
    assert_eq!(
        blocked_after,
        bit(libc::SIGUSR2),
        "the parent's mask is restored"
    );
    let status = std::fs::read_to_string(&out).expect("read cp's status");
    let _ = std::fs::remove_file(&out);
    assert_eq!(
        signal_masks(&status),
        [0, 0, 0],
        "SigBlk, SigIgn, SigCgt of the next generation:\n{status}"
    );
}
