//! The upgrade state machine: start the next generation, wait for its report,
//! and on any failure before "ready" kill and reap it so the old process
//! serves on.
//!
//! It is sans-IO in the sense of quinn-proto: [`Upgrader::start`] forks and
//! execs (syscalls that never block) and returns a [`PendingUpgrade`] whose
//! readiness fd the backend registers in its own reactor; on each wake-up the
//! backend calls [`PendingUpgrade::poll`], and at [`PendingUpgrade::deadline`]
//! it calls [`PendingUpgrade::time_out`].

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::protocol::{self, ProtocolError};
use crate::sys::{self, ExitStatus, SpawnPlan};

/// The byte a child writes on its readiness fd when it serves.
pub const READY: u8 = b'1';
/// How a child's error report starts: `error: <message>\n`.
pub const ERROR_PREFIX: &str = "error: ";
/// What the child writes when `execve` fails, followed by the errno.
pub(crate) const EXEC_ERROR_PREFIX: &str = "error: exec: errno ";
/// Longest error report kept; the rest is cut.
const MAX_REPORT: usize = 4096;

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
        }
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
        let generation = self.generation + 1;
        let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
        let vars = protocol::child_vars(&names, generation)?;
        let (ready_read, ready_write) = sys::readiness_pipe().map_err(UpgradeError::Spawn)?;
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
            ready: ready_write.as_fd(),
        };
        let pid = sys::spawn(&plan).map_err(UpgradeError::Spawn)?;
        // Only the child may hold the write end, so that EOF means the
        // child has gone.
        drop(plan);
        drop(ready_write);
        self.running_pid.store(pid, Ordering::Release);
        log::debug!(
            "started {} as pid {pid}, generation {generation}",
            self.program.display()
        );
        Ok(PendingUpgrade {
            pid,
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
/// kills and reaps the child: a cancelled upgrade never leaves a half-started
/// generation behind.
#[derive(Debug)]
#[must_use = "dropping a pending upgrade kills the new process"]
pub struct PendingUpgrade {
    pid: u32,
    generation: u64,
    program: PathBuf,
    ready: OwnedFd,
    report: Vec<u8>,
    started: Instant,
    timeout: Duration,
    settled: bool,
    running: RunningGuard,
}

impl PendingUpgrade {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When the child must have reported; call [`time_out`](Self::time_out) then.
    pub fn deadline(&self) -> Instant {
        self.started + self.timeout
    }

    /// Read what the child reported so far, without blocking. Call it when
    /// the readiness fd ([`AsFd`]) is readable. `Pending` means "wait for
    /// the fd again"; anything else settles the upgrade.
    pub fn poll(&mut self) -> Poll<Result<Upgraded, UpgradeError>> {
        if self.settled {
            return Poll::Ready(Err(UpgradeError::Io {
                pid: self.pid,
                source: io::Error::other("upgrade already settled"),
            }));
        }
        let mut buf = [0u8; 512];
        loop {
            match sys::read(self.ready.as_fd(), &mut buf) {
                Ok(0) => return Poll::Ready(self.settle_eof()),
                Ok(n) => {
                    let room = MAX_REPORT.saturating_sub(self.report.len());
                    self.report.extend_from_slice(&buf[..n.min(room)]);
                    if let Some(result) = self.parse_report() {
                        return Poll::Ready(result);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
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
    }

    /// The deadline passed: kill and reap the child.
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

    /// The child closed the fd: with a partial report, that is the report;
    /// without one, the child died (or closed it and will be killed).
    fn settle_eof(&mut self) -> Result<Upgraded, UpgradeError> {
        if !self.report.is_empty() {
            return self.settle_report(self.report.len());
        }
        let status = self.fail();
        Err(UpgradeError::ChildExited {
            pid: self.pid,
            status,
        })
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

    /// Kill and reap the child. Killing a child that already exited is
    /// harmless and keeps its real exit status for the reap.
    fn fail(&mut self) -> ExitStatus {
        self.settled = true;
        if let Err(e) = sys::kill(self.pid) {
            log::warn!("cannot kill new process {}: {e}", self.pid);
        }
        match sys::reap(self.pid) {
            Ok(status) => status,
            Err(e) => {
                log::warn!("cannot reap new process {}: {e}", self.pid);
                ExitStatus::Signaled(libc::SIGKILL)
            }
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
            log::warn!("upgrade to pid {} abandoned: killing it", self.pid);
            self.fail();
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

    /// Wait for the readiness fd with poll(2): the tests' stand-in for a reactor.
    fn run(mut pending: PendingUpgrade) -> Result<Upgraded, UpgradeError> {
        loop {
            let timeout = pending.deadline().saturating_duration_since(Instant::now());
            if !sys::wait_readable(pending.as_fd(), timeout).unwrap() {
                return Err(pending.time_out());
            }
            if let Poll::Ready(result) = pending.poll() {
                return result;
            }
        }
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
        let upgraded = run(pending).unwrap();
        assert_eq!((upgraded.pid, upgraded.generation), (pid, 5));
        let seen = std::fs::read_to_string(&out).unwrap();
        let fields: Vec<&str> = seen.split_whitespace().collect();
        assert_eq!(&fields[..4], ["1", "http", "4", "5"]);
        assert_eq!(fields[4], fields[5], "LISTEN_PID is the child's own pid");
        sys::kill(pid).unwrap();
        sys::reap(pid).unwrap();
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
        sys::kill(pid).unwrap();
        sys::reap(pid).unwrap();
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

    #[test]
    fn hanging_child_times_out_and_is_reaped() {
        let path = script("silent.sh", "exec sleep 30");
        let pending = upgrader(&path, Duration::from_millis(200))
            .start(&[])
            .unwrap();
        let pid = pending.pid();
        let err = run(pending).unwrap_err();
        assert!(matches!(err, UpgradeError::Timeout { .. }), "{err}");
        assert!(sys::try_reap(pid).is_err(), "already reaped: no such child");
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
