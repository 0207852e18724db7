//! The upgrade state machine: start the next generation, wait for its report,
//! and on any failure before "ready" kill it so the old process serves on.
//!
//! It is sans-IO in the sense of quinn-proto: [`Upgrader::start`] spawns
//! (syscalls that never block) and returns a [`PendingUpgrade`]. Nothing
//! here ever waits for the child, so the event loop that drives it keeps
//! serving while a killed child takes its time to die. The driver:
//!
//! - registers the readiness fd ([`AsFd`]) and, where there is one, the
//!   exit fd ([`PendingUpgrade::exit_fd`], the child's pidfd), and calls
//!   [`PendingUpgrade::poll`] whenever either is readable;
//! - without an exit fd (kernels before 5.3), also calls `poll` at
//!   [`PendingUpgrade::retry_at`] while that is `Some`;
//! - calls [`PendingUpgrade::time_out`] at [`PendingUpgrade::deadline`];
//! - calls [`Upgrader::reap_exited`] on every turn, and on a short timer
//!   while it returns non-zero: killed children that had not ended yet wait
//!   there to be reaped.
//!
//! # Children and the application
//!
//! Baton waits for its children by pidfd (`waitid(P_PIDFD)`) and signals
//! them by pidfd (`pidfd_send_signal`), so a pid reused by an unrelated
//! process is never signalled, even if the application reaped the child
//! behind baton's back. An application must still not reap baton's
//! children itself: neither `waitpid(-1, …)` / `wait()` in a loop nor
//! `SIGCHLD` set to `SIG_IGN` (which reaps every child at once). Either
//! steals the exit status: a failed upgrade is then reported as an I/O
//! error instead of the child's status, and a successor's death can go
//! unnoticed. Wait for your own children by pid.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::handover::{self, Versions};
use crate::protocol::{self, ProtocolError};
use crate::sys::{self, Child, ExitStatus, SpawnMethod, SpawnPlan};

/// The byte a child writes on its readiness fd when it serves.
pub const READY: u8 = b'1';
/// How a child's error report starts: `error: <message>\n`.
pub const ERROR_PREFIX: &str = "error: ";
/// What the child writes when `execve` fails, followed by the errno.
pub(crate) const EXEC_ERROR_PREFIX: &str = "error: exec: errno ";
/// Longest error report kept; the rest is cut.
const MAX_REPORT: usize = 4096;
/// Without a pidfd, how often a driver retries [`PendingUpgrade::poll`]
/// while the child is dying.
const EXIT_RETRY: Duration = Duration::from_millis(10);

/// Why an upgrade did not happen. In every case the old process still serves.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// Another upgrade is running; only one runs at a time.
    #[error("an upgrade is already running (new process {pid})")]
    AlreadyRunning {
        /// The child of the running upgrade.
        pid: u32,
    },
    /// This process is PID 1 (a container's init): when it exits after the
    /// upgrade, the kernel ends the container and the new generation with it.
    #[error(
        "this process is PID 1: exiting after an upgrade would end the container; \
         run it under an init (docker run --init, tini, dumb-init) to upgrade in place"
    )]
    Pid1,
    /// The server is stopping: an upgrade is refused, and one pending is
    /// abandoned (its process killed).
    #[error("the server is stopping")]
    Stopping,
    /// The binary to start is missing or not executable.
    #[error("cannot start {}: {source}", path.display())]
    Binary {
        /// The binary.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: io::Error,
    },
    /// The environment for the child could not be built.
    #[error("cannot build the new process's environment: {0}")]
    Protocol(#[from] ProtocolError),
    /// `pipe` or `fork` failed.
    #[error("cannot start the new process: {0}")]
    Spawn(#[source] io::Error),
    /// `execve` failed in the child.
    #[error("new process {pid} could not exec {}: {source}", path.display())]
    Exec {
        /// The child.
        pid: u32,
        /// The binary.
        path: PathBuf,
        /// The exec error.
        #[source]
        source: io::Error,
    },
    /// The child ended, or closed its readiness fd, before reporting ready.
    #[error("new process {pid} exited before reporting ready ({status})")]
    ChildExited {
        /// The child.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
    },
    /// The child reported an error instead of ready.
    #[error("new process {pid} failed to start: {message}")]
    ChildFailed {
        /// The child.
        pid: u32,
        /// Its report, without the `error: ` prefix.
        message: String,
    },
    /// The child wrote something that is not part of the protocol.
    #[error("new process {pid} wrote an invalid readiness report {report:?}")]
    BadReport {
        /// The child.
        pid: u32,
        /// What it wrote.
        report: String,
    },
    /// The child did not report within the upgrade timeout.
    #[error("new process {pid} did not report ready within {timeout:?}")]
    Timeout {
        /// The child.
        pid: u32,
        /// The timeout.
        timeout: Duration,
    },
    /// Reading the readiness fd failed.
    #[error("reading the readiness report of new process {pid}: {source}")]
    Io {
        /// The child.
        pid: u32,
        /// The read error.
        #[source]
        source: io::Error,
    },
}

/// The next generation serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upgraded {
    /// Its pid.
    pub pid: u32,
    /// Its generation number.
    pub generation: u64,
    /// From fork to its "ready".
    pub time_to_ready: Duration,
}

/// Starts the next generation; one at a time.
#[derive(Debug)]
pub struct Upgrader {
    program: PathBuf,
    args: Vec<OsString>,
    generation: u64,
    timeout: Duration,
    running: Arc<AtomicBool>,
    running_pid: Arc<std::sync::atomic::AtomicU32>,
    /// Killed children not reaped yet: [`Upgrader::reap_exited`] collects them.
    reaper: Arc<Mutex<Vec<Child>>>,
    /// The child of the last successful upgrade, with its pidfd and its
    /// readiness fd, until the generation watches it.
    successor: Arc<Mutex<Option<Handover>>>,
    /// An fd number taken at start-up, below the connections to come, where
    /// the readiness fd is put for the spawn (see [`Upgrader::start`]).
    low_slot: Mutex<Option<OwnedFd>>,
    /// The state versions this generation writes: with them, every spawn
    /// gets a [handover] channel; without, none.
    state_versions: Option<Versions>,
    /// A second low slot, for the child's end of the handover channel.
    state_slot: Mutex<Option<OwnedFd>>,
}

/// A successor as the generation watches it: its process, and the rest of
/// what it reports after "ready" ([`crate::generation`]'s `HANDED_OVER`).
#[derive(Debug)]
pub(crate) struct Handover {
    pub(crate) child: Child,
    /// The read end of its readiness pipe.
    pub(crate) report: OwnedFd,
    /// What it wrote after "ready" in the same read, if anything.
    pub(crate) after_ready: Vec<u8>,
}

impl Upgrader {
    /// An upgrader that starts `program` with `args` (`argv[0]` first) as
    /// generation `generation + 1`, giving it `timeout` to report ready.
    pub fn new(program: PathBuf, args: Vec<OsString>, generation: u64, timeout: Duration) -> Self {
        Upgrader {
            program,
            args,
            generation,
            timeout,
            running: Arc::default(),
            running_pid: Arc::default(),
            reaper: Arc::default(),
            successor: Arc::default(),
            low_slot: Mutex::new(sys::reserve_fd().ok()),
            state_versions: None,
            state_slot: Mutex::new(None),
        }
    }

    /// Offer every next generation a [handover] channel
    /// for application state written at `versions` (none: no channel, as
    /// before). Reserves a second low fd slot for the child's end.
    pub fn with_state_versions(mut self, versions: Option<Versions>) -> Self {
        self.state_versions = versions;
        *lock(&self.state_slot) = versions.and_then(|_| sys::reserve_fd().ok());
        self
    }

    /// Reap the killed children that have ended since, without waiting;
    /// returns how many are still unreaped. Call it on every turn of the
    /// event loop, and on a short timer while it is non-zero.
    pub fn reap_exited(&self) -> usize {
        let mut children = lock(&self.reaper);
        children.retain(|child| match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                log::info!("reaped new process {} ({status})", child.pid());
                false
            }
            Err(e) => {
                log::warn!("cannot reap new process {}: {e}", child.pid());
                false
            }
        });
        children.len()
    }

    /// The child of the last successful upgrade, with its pidfd: the
    /// generation watches it while it drains.
    pub(crate) fn take_successor(&self) -> Option<Handover> {
        lock(&self.successor).take()
    }

    /// Allow upgrades again after a successful one: this process serves
    /// again because its new generation died ([`Generation::resume`] calls
    /// it). Until then, every upgrade after a success is refused with
    /// [`UpgradeError::AlreadyRunning`].
    ///
    /// [`Generation::resume`]: crate::Generation::resume
    pub fn rearm(&self) {
        self.running.store(false, Ordering::Release);
    }

    /// The binary the next generation runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Start the next generation with `sockets` at fds 3.., in order.
    ///
    /// Fails at once with [`UpgradeError::AlreadyRunning`] while another
    /// upgrade is pending or after one succeeded (until
    /// [`rearm`](Self::rearm)), and with [`UpgradeError::Binary`] before
    /// forking if the binary is missing or not executable.
    pub fn start(
        &self,
        sockets: &[(&str, BorrowedFd<'_>)],
    ) -> Result<PendingUpgrade, UpgradeError> {
        self.reap_exited();
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(UpgradeError::AlreadyRunning {
                pid: self.running_pid.load(Ordering::Acquire),
            });
        }
        let running = RunningGuard {
            running: self.running.clone(),
            handed_over: false,
        };
        check_executable(&self.program).map_err(|source| UpgradeError::Binary {
            path: self.program.clone(),
            source,
        })?;
        let generation = protocol::next_generation(self.generation)?;
        let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
        let mut vars = protocol::child_vars(&names, generation)?;
        let (ready_read, ready_write) = sys::readiness_pipe().map_err(UpgradeError::Spawn)?;
        // The state channel: our end stays here, the child's goes to it at
        // 3 + sockets + 1, from a second low slot like the readiness fd.
        let channel = match self.state_versions {
            Some(_) => Some(handover::pair().map_err(UpgradeError::Spawn)?),
            None => None,
        };
        let mut state_slot = channel.as_ref().and_then(|_| lock(&self.state_slot).take());
        if let (Some(fd), Some((_, theirs))) = (state_slot.as_mut(), channel.as_ref()) {
            if nix::unistd::dup3(theirs, fd, nix::fcntl::OFlag::O_CLOEXEC).is_err() {
                state_slot = None;
            }
        }
        if channel.is_some() {
            vars.push((
                protocol::BATON_HANDOVER_FD,
                protocol::Passed::handover_fd_for(names.len()).to_string(),
            ));
        }
        // The write end goes to the child from the low slot, if we hold one:
        // the child then copies only the low end of our fd table (see
        // sys::spawn), however many connections are open above it.
        let mut slot = lock(&self.low_slot).take();
        if let Some(fd) = slot.as_mut() {
            if nix::unistd::dup3(&ready_write, fd, nix::fcntl::OFlag::O_CLOEXEC).is_err() {
                slot = None;
            }
        }
        let plan = SpawnPlan {
            program: cstring(self.program.as_os_str()).map_err(UpgradeError::Spawn)?,
            args: self
                .args
                .iter()
                .map(|a| cstring(a))
                .collect::<io::Result<_>>()
                .map_err(UpgradeError::Spawn)?,
            env: child_env(&vars).map_err(UpgradeError::Spawn)?,
            sockets: sockets.iter().map(|(_, fd)| *fd).collect(),
            ready: slot.as_ref().map_or(ready_write.as_fd(), AsFd::as_fd),
            handover: channel.as_ref().map(|(_, theirs)| {
                state_slot
                    .as_ref()
                    .map_or(theirs.as_fd(), |fd: &OwnedFd| fd.as_fd())
            }),
        };
        let spawned = sys::spawn(&plan);
        // Only the child may hold the write end, so that EOF means the
        // child has gone: the slot's copy goes too, and the lowest free fd
        // (most likely the same number) becomes the next slot.
        drop(plan);
        drop(slot);
        drop(ready_write);
        *lock(&self.low_slot) = sys::reserve_fd().ok();
        // Likewise the child's end of the channel: only the child holds it,
        // so that its death is an end of file on ours.
        let ours = channel.map(|(ours, theirs)| {
            drop(theirs);
            ours
        });
        drop(state_slot);
        if ours.is_some() {
            *lock(&self.state_slot) = sys::reserve_fd().ok();
        }
        let (child, method) = spawned.map_err(UpgradeError::Spawn)?;
        let pid = child.pid();
        self.running_pid.store(pid, Ordering::Release);
        log::debug!(
            "started {} as pid {pid}, generation {generation} (spawned with {method})",
            self.program.display()
        );
        let exit = child.pidfd().and_then(|fd| fd.try_clone_to_owned().ok());
        let state = ours.zip(self.state_versions).map(|(end, versions)| {
            handover::Sender::new(end, versions, handover::Limits::default())
        });
        Ok(PendingUpgrade {
            state,
            pid,
            exit,
            child: Some(child),
            method,
            exiting: false,
            retry_at: None,
            reaper: self.reaper.clone(),
            successor: self.successor.clone(),
            generation,
            program: self.program.clone(),
            ready: ready_read,
            report: Vec::new(),
            started: Instant::now(),
            timeout: self.timeout,
            settled: false,
            running,
        })
    }
}

/// Clears the "upgrade running" flag when the pending upgrade fails, however
/// it fails. After a success the flag stays set until
/// [`Upgrader::rearm`]: the generation is handing over, and clearing it
/// would let a second upgrade start between the ready report and the stop
/// that follows it (two new generations from one old one).
#[derive(Debug)]
struct RunningGuard {
    running: Arc<AtomicBool>,
    handed_over: bool,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if !self.handed_over {
            self.running.store(false, Ordering::Release);
        }
    }
}

/// A started child that has not reported yet. Dropping it before it settles
/// kills the child (reaped later by [`Upgrader::reap_exited`] if it has not
/// ended at once): a cancelled upgrade never leaves a half-started
/// generation behind, and never blocks the caller.
#[derive(Debug)]
#[must_use = "dropping a pending upgrade kills the new process"]
pub struct PendingUpgrade {
    pid: u32,
    /// `None` once reaped or handed on (to the reaper, or as the successor).
    child: Option<Child>,
    /// A duplicate of the child's pidfd, kept until drop so that a driver
    /// can deregister what it registered, even after the child moved on.
    exit: Option<OwnedFd>,
    method: SpawnMethod,
    /// EOF without a report: the child is dying, its status is awaited.
    exiting: bool,
    /// Without a pidfd, when a dying child's status is looked for again.
    retry_at: Option<Instant>,
    reaper: Arc<Mutex<Vec<Child>>>,
    successor: Arc<Mutex<Option<Handover>>>,
    generation: u64,
    program: PathBuf,
    ready: OwnedFd,
    report: Vec<u8>,
    started: Instant,
    timeout: Duration,
    settled: bool,
    running: RunningGuard,
    /// Our end of the state channel, until the lifecycle takes it.
    state: Option<handover::Sender>,
}

impl PendingUpgrade {
    /// The old generation's end of the [handover] channel
    /// to the child, when the generation declared state versions
    /// ([`crate::Config::state_versions`]); once. Drive it (readable, and
    /// writable while it [`wants_write`](handover::Sender::wants_write))
    /// next to the readiness fd; commit after [`poll`](Self::poll) says
    /// ready. Dropping it takes nothing from the upgrade.
    pub fn take_state_sender(&mut self) -> Option<handover::Sender> {
        self.state.take()
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How the child was started: [`SpawnMethod::Vfork`] wherever the
    /// kernel allows it.
    pub fn spawn_method(&self) -> SpawnMethod {
        self.method
    }

    /// When the child must have reported; call [`time_out`](Self::time_out) then.
    pub fn deadline(&self) -> Instant {
        // A timeout too large for an Instant (set through the API, not a
        // parsed flag) means "never": a year is as good.
        let never = Duration::from_secs(365 * 24 * 3600);
        self.started
            .checked_add(self.timeout)
            .or_else(|| self.started.checked_add(never))
            .unwrap_or(self.started)
    }

    /// The child's pidfd, readable once it has exited: register it next to
    /// the readiness fd and call [`poll`](Self::poll) when either is
    /// readable. The same fd until this value is dropped (deregister it
    /// then); `None` on kernels without pidfds (see
    /// [`retry_at`](Self::retry_at)).
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.exit.as_ref().map(AsFd::as_fd)
    }

    /// Without an exit fd, when to call [`poll`](Self::poll) again: `Some`
    /// (10 ms after the last `poll`) only while the child closed its
    /// readiness fd and its exit status is awaited. With a pidfd, `None`:
    /// the exit fd says when.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| !self.settled)
    }

    /// Read what the child reported so far, and whether it has ended,
    /// without blocking. Call it when the readiness fd ([`AsFd`]) or the
    /// [`exit_fd`](Self::exit_fd) is readable. `Pending` means "wait for
    /// them again"; anything else settles the upgrade.
    pub fn poll(&mut self) -> Poll<Result<Upgraded, UpgradeError>> {
        if self.settled {
            return Poll::Ready(Err(UpgradeError::Io {
                pid: self.pid,
                source: io::Error::other("upgrade already settled"),
            }));
        }
        let mut buf = [0u8; 512];
        while !self.exiting {
            match sys::read(self.ready.as_fd(), &mut buf) {
                Ok(0) if !self.report.is_empty() => {
                    return Poll::Ready(self.settle_report(self.report.len()))
                }
                Ok(0) => {
                    // No report and no way left to send one: the child is
                    // exiting, or closed the fd and is killed now (harmless
                    // to one that exited: its status stays).
                    self.exiting = true;
                    self.kill();
                }
                Ok(n) => {
                    let room = MAX_REPORT.saturating_sub(self.report.len());
                    self.report.extend_from_slice(&buf[..n.min(room)]);
                    if let Some(result) = self.parse_report() {
                        return Poll::Ready(result);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    self.fail();
                    return Poll::Ready(Err(UpgradeError::Io {
                        pid: self.pid,
                        source,
                    }));
                }
            }
        }
        // No report yet: has the child ended? Without EOF too, when a
        // grandchild still holds the write end.
        let Some(child) = &self.child else {
            return Poll::Pending;
        };
        match child.try_wait() {
            Ok(None) => {
                self.retry_at =
                    (self.exiting && self.exit.is_none()).then(|| Instant::now() + EXIT_RETRY);
                Poll::Pending
            }
            Ok(Some(status)) => {
                self.child = None;
                log::info!("reaped new process {} ({status})", self.pid);
                if !self.report.is_empty() {
                    return Poll::Ready(self.settle_report(self.report.len()));
                }
                self.settled = true;
                Poll::Ready(Err(UpgradeError::ChildExited {
                    pid: self.pid,
                    status,
                }))
            }
            Err(source) => {
                // ECHILD: the application reaped it (see the module docs).
                self.fail();
                Poll::Ready(Err(UpgradeError::Io {
                    pid: self.pid,
                    source,
                }))
            }
        }
    }

    /// The deadline passed: kill the child. Never waits for it.
    pub fn time_out(mut self) -> UpgradeError {
        self.fail();
        UpgradeError::Timeout {
            pid: self.pid,
            timeout: self.timeout,
        }
    }

    /// A complete report, if the bytes so far make one.
    fn parse_report(&mut self) -> Option<Result<Upgraded, UpgradeError>> {
        if self.report.first() == Some(&READY) {
            self.settled = true;
            self.running.handed_over = true;
            if let Some(child) = self.child.take() {
                // The generation reads on from a duplicate of the pipe (the
                // same description): a hand-over the successor reports later.
                match self.ready.try_clone() {
                    Ok(report) => {
                        let handover = Handover {
                            child,
                            report,
                            after_ready: self.report[1..].to_vec(),
                        };
                        // A previous successor died before this upgrade
                        // could start: it goes to the reaper if nobody
                        // watched it.
                        if let Some(old) = lock(&self.successor).replace(handover) {
                            lock(&self.reaper).push(old.child);
                        }
                    }
                    Err(e) => {
                        log::warn!("cannot keep watching new process {}: {e}", self.pid);
                        lock(&self.reaper).push(child);
                    }
                }
            }
            return Some(Ok(Upgraded {
                pid: self.pid,
                generation: self.generation,
                time_to_ready: self.started.elapsed(),
            }));
        }
        let newline = self.report.iter().position(|&b| b == b'\n');
        if newline.is_some() || self.report.len() >= MAX_REPORT {
            return Some(self.settle_report(newline.unwrap_or(self.report.len())));
        }
        None
    }

    fn settle_report(&mut self, end: usize) -> Result<Upgraded, UpgradeError> {
        let line = String::from_utf8_lossy(&self.report[..end])
            .trim_end()
            .to_owned();
        self.fail();
        let pid = self.pid;
        if let Some(errno) = line.strip_prefix(EXEC_ERROR_PREFIX) {
            let errno = errno.parse().unwrap_or(0);
            return Err(UpgradeError::Exec {
                pid,
                path: self.program.clone(),
                source: io::Error::from_raw_os_error(errno),
            });
        }
        match line.strip_prefix(ERROR_PREFIX) {
            Some(message) => Err(UpgradeError::ChildFailed {
                pid,
                message: message.to_owned(),
            }),
            None => Err(UpgradeError::BadReport { pid, report: line }),
        }
    }

    fn kill(&self) {
        if let Some(child) = &self.child {
            if let Err(e) = child.kill() {
                log::warn!("cannot kill new process {}: {e}", self.pid);
            }
        }
    }

    /// Settle as failed: kill the child and reap it if it has already
    /// ended; otherwise hand it to the upgrader's reaper. Never waits.
    fn fail(&mut self) {
        self.settled = true;
        self.kill();
        let Some(child) = self.child.take() else {
            return;
        };
        match child.try_wait() {
            Ok(Some(status)) => log::info!("reaped new process {} ({status})", self.pid),
            Ok(None) => {
                log::debug!("new process {} killed, reaped later", self.pid);
                lock(&self.reaper).push(child);
            }
            Err(e) => log::warn!("cannot reap new process {}: {e}", self.pid),
        }
    }
}

impl AsFd for PendingUpgrade {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }
}

impl AsRawFd for PendingUpgrade {
    fn as_raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

impl Drop for PendingUpgrade {
    fn drop(&mut self) {
        if !self.settled {
            log::debug!("upgrade to pid {} abandoned: killing it", self.pid);
            self.fail();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl UpgradeError {
    /// The new process this error is about, if one was started.
    pub fn pid(&self) -> Option<u32> {
        match self {
            UpgradeError::Exec { pid, .. }
            | UpgradeError::ChildExited { pid, .. }
            | UpgradeError::ChildFailed { pid, .. }
            | UpgradeError::BadReport { pid, .. }
            | UpgradeError::Timeout { pid, .. }
            | UpgradeError::Io { pid, .. } => Some(*pid),
            _ => None,
        }
    }
}

impl fmt::Display for Upgraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} generation {} ready after {} ms",
            self.pid,
            self.generation,
            self.time_to_ready.as_millis()
        )
    }
}

/// A regular file we may execute; checked before forking so the error is
/// clear and nothing is started.
fn check_executable(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not executable",
        ));
    }
    Ok(())
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// This process's environment without the protocol's variables, plus the
/// child's. Read, never written: `set_var` is unsound in threaded programs.
fn child_env(vars: &[(&'static str, String)]) -> io::Result<Vec<CString>> {
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        if key.to_str().is_some_and(protocol::is_protocol_var) {
            continue;
        }
        let mut entry = key.into_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env.push(cstring(OsStr::from_bytes(&entry))?);
    }
    for (key, value) in vars {
        env.push(cstring(OsStr::new(&format!("{key}={value}")))?);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A shell script as the "next generation", written to a temporary file.
    fn script(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn upgrader(path: &Path, timeout: Duration) -> Upgrader {
        Upgrader::new(
            path.to_owned(),
            vec![path.as_os_str().to_owned()],
            4,
            timeout,
        )
    }

    /// Wait for the readiness fd and the exit fd with poll(2), as a driver
    /// does: the tests' stand-in for a reactor. Bounded by the deadline and
    /// a round count.
    fn run(mut pending: PendingUpgrade) -> Result<Upgraded, UpgradeError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        for _ in 0..10_000 {
            if let Poll::Ready(result) = pending.poll() {
                return result;
            }
            let left = pending.deadline().saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut fds = vec![PollFd::new(pending.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                pending
                    .exit_fd()
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
            );
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let _ = poll(&mut fds, timeout).unwrap();
        }
        Err(pending.time_out())
    }

    /// Kill the successor a test made and wait for it, on its pidfd.
    fn end_successor(upgrader: &Upgrader, pid: u32) {
        let child = upgrader
            .take_successor()
            .expect("the successor is kept")
            .child;
        assert_eq!(child.pid(), pid);
        child.kill().unwrap();
        let status = child.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status, Some(ExitStatus::Signaled(libc::SIGKILL)));
    }

    #[test]
    fn child_reports_ready_with_the_protocol_environment() {
        let out = std::env::temp_dir().join(format!("baton-env-{}", std::process::id()));
        let path = script(
            "ready.sh",
            &format!(
                "echo \"$LISTEN_FDS $LISTEN_FDNAMES $BATON_READY_FD $BATON_GENERATION $LISTEN_PID $$\" > {}\nprintf 1 >&4\nexec sleep 30",
                out.display()
            ),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upgrader = upgrader(&path, Duration::from_secs(10));
        let pending = upgrader.start(&[("http", listener.as_fd())]).unwrap();
        let pid = pending.pid();
        assert_eq!(
            pending.spawn_method(),
            SpawnMethod::Vfork,
            "Linux 6.x allows clone(CLONE_VM|CLONE_VFORK)"
        );
        assert!(pending.exit_fd().is_some(), "a pidfd from the spawn");
        let upgraded = run(pending).unwrap();
        assert_eq!((upgraded.pid, upgraded.generation), (pid, 5));
        let seen = std::fs::read_to_string(&out).unwrap();
        let fields: Vec<&str> = seen.split_whitespace().collect();
        assert_eq!(&fields[..4], ["1", "http", "4", "5"]);
        assert_eq!(fields[4], fields[5], "LISTEN_PID is the child's own pid");
        end_successor(&upgrader, pid);
    }

    #[test]
    fn with_state_versions_the_child_gets_the_handover_end_after_the_readiness_fd() {
        // One socket: ready at 4, the handover end at 5, a seqpacket socket.
        let path = script(
            "state.sh",
            "if [ \"$BATON_HANDOVER_FD\" = 5 ] && [ -S /proc/self/fd/5 ]; then printf 1 >&4; \
             else echo \"error: handover fd $BATON_HANDOVER_FD\" >&4; fi\nexec sleep 30",
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upgrader = upgrader(&path, Duration::from_secs(10))
            .with_state_versions(Some(handover::Versions::single(1)));
        let mut pending = upgrader.start(&[("http", listener.as_fd())]).unwrap();
        let pid = pending.pid();
        let mut sender = pending.take_state_sender().expect("a state channel");
        assert!(pending.take_state_sender().is_none(), "taken once");
        run(pending).unwrap();
        end_successor(&upgrader, pid);
        // The child held the only other copy of its end: its death is the
        // end of the channel (bounded: one wait per round).
        let mut gone = false;
        for _ in 0..100 {
            match sender.poll() {
                Ok(Some(handover::SenderEvent::Closed))
                | Err(handover::HandoverError::PeerGone) => {
                    gone = true;
                    break;
                }
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Ok(None) => {
                    sys::wait_readable(sender.as_fd(), Duration::from_secs(10)).unwrap();
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(gone, "the parent closed its copy of the child's end");
    }

    #[test]
    fn without_state_versions_there_is_no_channel() {
        let path = script(
            "nostate.sh",
            "if [ -z \"$BATON_HANDOVER_FD\" ]; then printf 1 >&3; else echo \"error: channel\" >&3; fi\nexec sleep 30",
        );
        let upgrader = upgrader(&path, Duration::from_secs(10));
        let mut pending = upgrader.start(&[]).unwrap();
        let pid = pending.pid();
        assert!(pending.take_state_sender().is_none());
        run(pending).unwrap();
        end_successor(&upgrader, pid);
    }

    #[test]
    fn one_upgrade_at_a_time() {
        let path = script("hang.sh", "exec sleep 30");
        let upgrader = upgrader(&path, Duration::from_secs(10));
        let first = upgrader.start(&[]).unwrap();
        let err = upgrader.start(&[]).unwrap_err();
        assert!(
            matches!(err, UpgradeError::AlreadyRunning { pid } if pid == first.pid()),
            "{err}"
        );
        let err = first.time_out();
        assert!(matches!(err, UpgradeError::Timeout { .. }), "{err}");
        let again = upgrader.start(&[]).unwrap();
        drop(again); // killed and reaped, flag cleared
        assert!(upgrader.start(&[]).is_ok());
    }

    #[test]
    fn no_second_upgrade_after_a_success_until_rearmed() {
        // With no socket passed, the readiness fd is 3.
        let path = script("ready-then-hang.sh", "printf 1 >&3\nexec sleep 30");
        let upgrader = upgrader(&path, Duration::from_secs(10));
        let pending = upgrader.start(&[]).unwrap();
        let pid = pending.pid();
        run(pending).unwrap();
        // Between the ready report and the stop of this generation, a
        // second upgrade would start a second new generation.
        let err = upgrader.start(&[]).unwrap_err();
        assert!(
            matches!(err, UpgradeError::AlreadyRunning { pid: p } if p == pid),
            "{err}"
        );
        end_successor(&upgrader, pid);
        upgrader.rearm(); // the new generation died: serving again
        let again = upgrader.start(&[]).unwrap();
        drop(again);
    }

    #[test]
    fn child_exit_before_ready_reports_its_status() {
        let path = script("exit3.sh", "exit 3");
        let err = run(upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                UpgradeError::ChildExited {
                    status: ExitStatus::Exited(3),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn child_error_report_reaches_the_parent() {
        let path = script(
            "fail.sh",
            "echo 'error: config: no such file' >&3; exec sleep 30",
        );
        let err = run(upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap()).unwrap_err();
        match err {
            UpgradeError::ChildFailed { message, .. } => {
                assert_eq!(message, "config: no such file")
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn garbage_on_the_readiness_fd_is_a_bad_report() {
        let path = script("garbage.sh", "echo hello >&3");
        let err = run(upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap()).unwrap_err();
        assert!(
            matches!(err, UpgradeError::BadReport { ref report, .. } if report == "hello"),
            "{err}"
        );
    }

    /// Wait on our own pidfd of `pid` until it has ended, then let the
    /// upgrader's reaper collect it; bounded in rounds and time.
    fn reaped_by(upgrader: &Upgrader, watch: &OwnedFd) {
        assert!(
            sys::wait_readable(watch.as_fd(), Duration::from_secs(10)).unwrap(),
            "the killed child did not end"
        );
        let mut left = usize::MAX;
        for _ in 0..100 {
            left = upgrader.reap_exited();
            if left == 0 {
                break;
            }
            sys::wait_readable(watch.as_fd(), Duration::from_millis(10)).unwrap();
        }
        assert_eq!(left, 0, "the reaper still holds children");
        let err = sys::try_wait_pidfd(watch.as_fd()).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ECHILD),
            "reaped: no such child"
        );
    }

    #[test]
    fn hanging_child_times_out_and_is_reaped() {
        let path = script("silent.sh", "exec sleep 30");
        let upgrader = upgrader(&path, Duration::from_millis(200));
        let pending = upgrader.start(&[]).unwrap();
        let watch = sys::pidfd_open(pending.pid()).unwrap();
        let err = run(pending).unwrap_err();
        assert!(matches!(err, UpgradeError::Timeout { .. }), "{err}");
        reaped_by(&upgrader, &watch);
    }

    #[test]
    fn time_out_and_drop_never_wait_for_the_child() {
        // SIGTERM ignored, as by a child slow to stop; SIGKILL still ends it,
        // but the kernel may take its time: neither call waits for that.
        let path = script("stubborn.sh", "trap '' TERM\nexec sleep 30");
        let upgrader = upgrader(&path, Duration::from_secs(10));
        let pending = upgrader.start(&[]).unwrap();
        let watch = sys::pidfd_open(pending.pid()).unwrap();
        let err = pending.time_out();
        assert!(matches!(err, UpgradeError::Timeout { .. }), "{err}");
        reaped_by(&upgrader, &watch);

        let pending = upgrader.start(&[]).unwrap();
        let watch = sys::pidfd_open(pending.pid()).unwrap();
        drop(pending);
        reaped_by(&upgrader, &watch);
    }

    #[test]
    fn the_reaper_holds_a_live_child_without_waiting() {
        // A child that has not ended stays in the list: reap_exited returns
        // at once with it still counted, then collects it once it ends.
        let path = script("live.sh", "exec sleep 30");
        let upgrader = upgrader(&path, Duration::from_secs(10));
        let (_read, write) = sys::readiness_pipe().unwrap();
        let plan = SpawnPlan {
            program: cstring(path.as_os_str()).unwrap(),
            args: vec![cstring(path.as_os_str()).unwrap()],
            env: Vec::new(),
            sockets: Vec::new(),
            ready: write.as_fd(),
            handover: None,
        };
        let (child, _) = sys::spawn(&plan).unwrap();
        let watch = sys::pidfd_open(child.pid()).unwrap();
        let pid = child.pid();
        lock(&upgrader.reaper).push(child);
        assert_eq!(upgrader.reap_exited(), 1, "alive: still held, and no wait");
        assert_eq!(upgrader.reap_exited(), 1);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        reaped_by(&upgrader, &watch);
    }

    #[test]
    fn child_exit_is_seen_on_the_exit_fd_while_a_grandchild_holds_the_pipe() {
        // The grandchild keeps the readiness pipe open: no EOF comes, only
        // the pidfd says the child ended.
        let grandchild =
            std::env::temp_dir().join(format!("baton-grandchild-{}", std::process::id()));
        let path = script(
            "orphan.sh",
            &format!("sleep 30 &\necho $! > {}\nexit 3", grandchild.display()),
        );
        let err = run(upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap()).unwrap_err();
        let pid: i32 = std::fs::read_to_string(&grandchild)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = std::fs::remove_file(&grandchild);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
        assert!(
            matches!(
                err,
                UpgradeError::ChildExited {
                    status: ExitStatus::Exited(3),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_child_closing_its_readiness_fd_is_killed_and_reported() {
        // EOF without a report from a child that lives on: it can never
        // report, so it is killed; poll waits for its exit on the exit fd.
        let path = script("close.sh", "exec 3>&-\nexec sleep 30");
        let err = run(upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                UpgradeError::ChildExited {
                    status: ExitStatus::Signaled(libc::SIGKILL),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn without_a_pidfd_a_dying_child_is_polled_on_retry_at() {
        // As on a kernel before 5.3: the child's pid only.
        let path = script("close-nopidfd.sh", "exec 3>&-\nexec sleep 30");
        let mut pending = upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap();
        let pid = pending.pid();
        pending.child = Some(Child::new(pid, None));
        pending.exit = None;
        assert!(pending.exit_fd().is_none());
        assert_eq!(pending.retry_at(), None, "nothing to retry before EOF");
        // The test's own pidfd stands in for the driver's timer.
        let watch = sys::pidfd_open(pid).unwrap();
        let mut outcome = None;
        for _ in 0..1000 {
            if let Poll::Ready(result) = pending.poll() {
                outcome = Some(result);
                break;
            }
            if pending.exiting {
                assert!(pending.retry_at().is_some(), "dying, no pidfd: retry");
            }
            let fds = [pending.as_fd(), watch.as_fd()];
            let fd = if pending.exiting { fds[1] } else { fds[0] };
            sys::wait_readable(fd, Duration::from_secs(1)).unwrap();
        }
        let err = outcome.expect("settled").unwrap_err();
        assert!(
            matches!(
                err,
                UpgradeError::ChildExited {
                    status: ExitStatus::Signaled(libc::SIGKILL),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(pending.retry_at(), None, "settled: no retry");
    }

    #[test]
    fn retry_at_is_none_with_a_pidfd() {
        let path = script("exit0.sh", "exit 0");
        let mut pending = upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap();
        assert!(pending.exit_fd().is_some());
        let _ = pending.poll();
        assert_eq!(pending.retry_at(), None);
    }

    #[test]
    fn missing_or_non_executable_binary_fails_before_fork() {
        let missing = upgrader(Path::new("/nonexistent/baton-next"), Duration::from_secs(1));
        assert!(matches!(
            missing.start(&[]),
            Err(UpgradeError::Binary { .. })
        ));
        let path = script("noexec.sh", "exit 0");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = upgrader(&path, Duration::from_secs(1))
            .start(&[])
            .unwrap_err();
        assert!(err.to_string().contains("not executable"), "{err}");
    }

    #[test]
    fn exec_failure_is_reported_with_its_errno() {
        // Executable but not a valid program and no shebang: execve fails
        // with ENOEXEC in the child.
        let dir = std::env::temp_dir().join(format!("baton-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-program");
        std::fs::write(&path, [0u8, 1, 2, 3]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = run(upgrader(&path, Duration::from_secs(10)).start(&[]).unwrap()).unwrap_err();
        match err {
            UpgradeError::Exec { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOEXEC))
            }
            other => panic!("unexpected {other}"),
        }
    }
}
