//! One generation of a server: what it inherited, and what it hands on.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::handover::{End, Item, Limits, Receiver, ReceiverEvent, Versions};
use crate::lifecycle::Timeouts;
use crate::listeners::{ListenAddr, ListenSocket, ListenerHandoff, Listeners, Origin};
use crate::notify::{self, Notifier};
use crate::pidfile::PidFile;
pub use crate::program::current_program;
use crate::protocol;
use crate::stop::{StopReason, StopToken};
use crate::sys::{self, ExitStatus};
use crate::tracker::Tracker;
use crate::upgrade::{PendingUpgrade, UpgradeError, Upgraded, Upgrader, ERROR_PREFIX, READY};
use crate::Error;

/// The next generation while this one drains: a pidfd that becomes
/// readable when it exits, and its readiness pipe, on which it reports a
/// hand-over to a generation newer still. Register [`fds`](Self::fds) in the
/// reactor and call [`check`](Self::check) when one is readable.
#[derive(Debug)]
pub struct SuccessorWatch {
    pid: u32,
    fd: OwnedFd,
    /// Its readiness pipe, until EOF.
    report: Option<OwnedFd>,
    /// It reported that a newer generation serves: its death is not ours
    /// to make up for.
    handed_over: bool,
}

impl SuccessorWatch {
    /// The successor's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The fds to watch: the pidfd, and the readiness pipe until EOF.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.fd.as_fd()];
        fds.extend(self.report.as_ref().map(AsFd::as_fd));
        fds
    }

    /// What has become of the successor, without waiting (an ended one is
    /// reaped here). Call it when a watched fd is readable.
    pub fn check(&mut self) -> Result<Successor, Error> {
        self.read_report();
        let exited = sys::try_wait_pidfd(self.fd.as_fd()).map_err(Error::Watch)?;
        if exited.is_some() {
            // What it wrote just before it died is in the pipe by now.
            self.read_report();
        }
        Ok(match exited {
            None => Successor::Running,
            Some(_) if self.handed_over => Successor::HandedOver,
            // Exit status 0 is deliberate: it handed over to its own
            // successor, or was stopped. Serving again would leave this
            // process serving beside the newest generation.
            Some(ExitStatus::Exited(0)) => Successor::Exited,
            Some(status) => Successor::Failed(status),
        })
    }

    /// Read what the successor reported since "ready", without blocking.
    fn read_report(&mut self) {
        let Some(fd) = &self.report else {
            return;
        };
        let mut buf = [0u8; 64];
        // Bounded: a successor writes one byte; stop after a few reads.
        for _ in 0..16 {
            match sys::read(fd.as_fd(), &mut buf) {
                Ok(0) => {
                    self.report = None;
                    return;
                }
                Ok(n) => self.handed_over |= buf[..n].contains(&HANDED_OVER),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.report = None;
                    return;
                }
            }
        }
    }
}

/// What [`SuccessorWatch::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Successor {
    /// Still running: keep watching.
    Running,
    /// Exited with status 0 on purpose: stop watching, do not resume.
    Exited,
    /// Ended after it had handed over to a newer generation, which serves:
    /// do not resume (two generations would serve side by side).
    HandedOver,
    /// Killed or failed: this generation must serve again ([`Generation::resume`]).
    Failed(ExitStatus),
}

/// Written on the readiness fd after [`READY`], when this generation hands
/// over to its own successor: the previous generation, if it still watches
/// this one, must not serve again when this one exits.
pub(crate) const HANDED_OVER: u8 = b'H';

/// Set once the inherited fds have owners, so a second `from_env` cannot
/// adopt (and later close) them twice.
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// How a generation starts its successor.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How long the next generation has to report ready before it is killed
    /// and the upgrade fails. Default 30 s.
    pub upgrade_timeout: Duration,
    /// The binary the next generation runs. Default: the path this process
    /// was started from, resolved at start-up (see [`current_program`]).
    pub program: Option<PathBuf>,
    /// Its arguments, `argv[0]` first. Default: this process's arguments.
    pub args: Option<Vec<OsString>>,
    /// A PID file naming the serving process: written when a generation is
    /// ready, removed at a graceful stop. Default: none.
    pub pid_file: Option<PathBuf>,
    /// The drain deadline, the successor watch, the idle grace and the
    /// force grace.
    pub timeouts: Timeouts,
    /// A control socket (a Unix socket, mode 0600, handed to every next
    /// generation) for `batonctl upgrade|status|stop`. Default: none.
    pub control: Option<PathBuf>,
    /// Most connections open at once: at the limit, accepting pauses and
    /// new clients wait in the kernel's listen queue. Default 10 000.
    pub max_connections: usize,
    /// Act on `SIGHUP` (upgrade), `SIGTERM` and `SIGINT` (stop). Default true.
    pub handle_signals: bool,
    /// The range of application-state versions this generation reads and
    /// writes. With it, each upgrade opens a [handover](crate::handover)
    /// channel to the next generation, which takes the state with
    /// [`Generation::receive_state`] before it reports ready. Default: none
    /// (no channel).
    pub state_versions: Option<Versions>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upgrade_timeout: Duration::from_secs(30),
            program: None,
            args: None,
            pid_file: None,
            timeouts: Timeouts::default(),
            control: None,
            max_connections: 10_000,
            handle_signals: true,
            state_versions: None,
        }
    }
}

impl Config {
    /// Set the upgrade timeout.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// Run `program` as the next generation instead of this binary.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// Start the next generation with these arguments (`argv[0]` first).
    pub fn args(mut self, args: Vec<OsString>) -> Self {
        self.args = Some(args);
        self
    }

    /// Keep a PID file at `path`.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// Set the drain deadline.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.drain = timeout;
        self
    }

    /// Watch the successor for at least `watch` after a handover.
    pub fn successor_watch(mut self, watch: Duration) -> Self {
        self.timeouts.successor_watch = watch;
        self
    }

    /// Open a control socket at `path`.
    pub fn control(mut self, path: impl Into<PathBuf>) -> Self {
        self.control = Some(path.into());
        self
    }

    /// Set the most connections open at once (at least 1).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Set the idle grace of the drain.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.timeouts.idle_grace = grace;
        self
    }

    /// Act on signals (the default), or leave them to the application.
    pub fn handle_signals(mut self, handle: bool) -> Self {
        self.handle_signals = handle;
        self
    }

    /// Move application state to the next generation, written and read at
    /// `versions` (see [`Config::state_versions`]).
    pub fn state_versions(mut self, versions: Versions) -> Self {
        self.state_versions = Some(versions);
        self
    }
}

/// This process as one generation of the server: the sockets it inherited or
/// bound, its readiness report to the parent, its stop token and connection
/// tracker, and the upgrader that starts the next generation.
///
/// Backends wrap it; applications use the backend's type.
#[derive(Debug)]
pub struct Generation {
    number: u64,
    listeners: Arc<Listeners>,
    ready: Mutex<Option<OwnedFd>>,
    has_parent: bool,
    upgrader: Upgrader,
    notifier: Option<Arc<Notifier>>,
    pid_file_path: Option<PathBuf>,
    pid_file: Arc<Mutex<Option<PidFile>>>,
    successor: Mutex<Option<u32>>,
    stop: StopToken,
    tracker: Tracker,
    state_versions: Option<Versions>,
    /// The previous generation's end of the state channel, until
    /// [`Generation::receive_state`] takes it; then the receiver, kept open
    /// so that the old generation's commit lands.
    state: Mutex<StateChannel>,
}

/// The new generation's side of the state channel.
#[derive(Debug)]
enum StateChannel {
    None,
    Inherited(End),
    Prepared { receiver: Box<Receiver> },
}

impl Generation {
    /// Read the protocol from this process's environment and adopt what the
    /// parent passed. Started by hand, this is generation 0 with nothing
    /// inherited.
    pub fn from_env(config: Config) -> Result<Self, Error> {
        let passed = protocol::parse(|name| std::env::var_os(name), sys::getpid())?;
        let anything_passed =
            !passed.names.is_empty() || passed.ready_fd.is_some() || passed.handover_fd.is_some();
        if anything_passed && ADOPTED.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyAdopted);
        }
        let listeners = Arc::new(Listeners::adopt(&passed)?);
        let ready = passed.ready_fd.map(adopt_ready_fd).transpose()?;
        let state = match passed.handover_fd.map(End::from_inherited) {
            Some(Ok(end)) if config.state_versions.is_some() => StateChannel::Inherited(end),
            // Closed at once: the old generation sees it and moves nothing.
            Some(Ok(_)) => {
                log::debug!("state: this generation declared no state versions; nothing moves");
                StateChannel::None
            }
            Some(Err(e)) => {
                log::warn!("state: ignoring BATON_HANDOVER_FD: {e}");
                StateChannel::None
            }
            None => StateChannel::None,
        };
        let program = match config.program {
            Some(program) => program,
            None => current_program().map_err(Error::Program)?,
        };
        let args = config.args.unwrap_or_else(|| std::env::args_os().collect());
        let notifier = match Notifier::from_env() {
            Ok(notifier) => notifier.map(Arc::new),
            Err(e) => {
                log::warn!("ignoring NOTIFY_SOCKET: {e}");
                None
            }
        };
        let stop = StopToken::new();
        let pid_file: Arc<Mutex<Option<PidFile>>> = Arc::default();
        // A graceful stop closes the held listeners (new clients are refused
        // at once instead of queueing for nobody), tells systemd and removes
        // the PID file; an exit after an upgrade leaves all three to the new
        // generation.
        let (hook_notifier, hook_pid_file, hook_stop, hook_listeners) = (
            notifier.clone(),
            pid_file.clone(),
            stop.clone(),
            listeners.clone(),
        );
        stop.on_stop(move || {
            if hook_stop.reason() != Some(StopReason::Shutdown) {
                return;
            }
            hook_listeners.close_held();
            if let Some(notifier) = &hook_notifier {
                send(
                    notifier,
                    "STOPPING=1\nSTATUS=stopping: draining connections",
                );
            }
            if let Some(file) = lock(&hook_pid_file).take() {
                if let Err(e) = file.remove() {
                    log::warn!("cannot remove the PID file: {e}");
                }
            }
        });
        Ok(Generation {
            number: passed.generation,
            listeners,
            has_parent: ready.is_some(),
            ready: Mutex::new(ready),
            upgrader: Upgrader::new(program, args, passed.generation, config.upgrade_timeout)
                .with_state_versions(config.state_versions),
            notifier,
            pid_file_path: config.pid_file,
            pid_file,
            successor: Mutex::new(None),
            tracker: Tracker::new(stop.clone()),
            stop,
            state_versions: config.state_versions,
            state: Mutex::new(state),
        })
    }

    /// The state versions this generation declared.
    pub(crate) fn state_versions(&self) -> Option<Versions> {
        self.state_versions
    }

    /// The receiver of the state taken by [`receive_state`](Self::receive_state),
    /// to be polled until the previous generation's commit arrives (the
    /// lifecycle does).
    pub(crate) fn take_state_receiver(&self) -> Option<Receiver> {
        let mut slot = lock(&self.state);
        match std::mem::replace(&mut *slot, StateChannel::None) {
            StateChannel::Prepared { receiver } => Some(*receiver),
            other => {
                *slot = other;
                None
            }
        }
    }

    /// Receive the application state the previous generation moves
    /// ([`Config::state_versions`]): blocks up to `timeout`, so call it
    /// before [`ready`](Self::ready), while this generation serves nothing.
    ///
    /// Returns the items of the transaction, having told the previous
    /// generation they are prepared (it commits once this generation
    /// reports ready). `Ok(vec![])` when there is nothing to receive: no
    /// channel (started by hand, by systemd, by a parent that moves no
    /// state, or no versions declared here), no common version, or the
    /// previous generation closed the channel. Once per generation; later
    /// calls return `Ok(vec![])`. An error leaves this generation without
    /// the state; it may serve anyway (the previous generation keeps its
    /// own).
    pub fn receive_state(&self, timeout: Duration) -> Result<Vec<Item>, Error> {
        let mut slot = lock(&self.state);
        let end = match std::mem::replace(&mut *slot, StateChannel::None) {
            StateChannel::Inherited(end) => end,
            other => {
                *slot = other;
                return Ok(Vec::new());
            }
        };
        let Some(versions) = self.state_versions else {
            return Ok(Vec::new());
        };
        let deadline = std::time::Instant::now() + timeout;
        let mut receiver = Receiver::new(end, versions, Limits::default());
        // Bounded by the deadline: every turn waits for the socket or ends.
        loop {
            match receiver.poll().map_err(Error::State)? {
                Some(ReceiverEvent::Negotiated(Some(version))) => {
                    log::debug!("state: version {version} negotiated");
                }
                Some(ReceiverEvent::Negotiated(None)) => {
                    log::info!(
                        "state: no state version in common with the previous generation; nothing moved"
                    );
                    return Ok(Vec::new());
                }
                Some(ReceiverEvent::Transaction { version, items }) => {
                    for item in &items {
                        log::info!(
                            "state: received {:?} v{} ({} bytes)",
                            item.name,
                            item.version,
                            item.payload.len()
                        );
                    }
                    log::debug!("state: {} items at version {version}", items.len());
                    receiver.prepared().map_err(Error::State)?;
                    // The "prepared" must be in the socket before ready.
                    while receiver.wants_write() {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            let _ = receiver.abort("timed out sending prepared");
                            return Err(Error::StateTimeout(timeout));
                        }
                        sys::wait_io(receiver.as_fd(), true, left)
                            .map_err(|e| Error::State(crate::handover::HandoverError::Io(e)))?;
                        if let Some(ReceiverEvent::Aborted(e)) =
                            receiver.poll().map_err(Error::State)?
                        {
                            return Err(Error::State(e));
                        }
                    }
                    *slot = StateChannel::Prepared {
                        receiver: Box::new(receiver),
                    };
                    return Ok(items);
                }
                Some(ReceiverEvent::Aborted(e)) => return Err(Error::State(e)),
                Some(ReceiverEvent::Closed) => {
                    log::info!("state: the previous generation closed the channel; nothing moved");
                    return Ok(Vec::new());
                }
                Some(ReceiverEvent::Committed) => {}
                None => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        let _ = receiver.abort("timed out waiting for the state");
                        return Err(Error::StateTimeout(timeout));
                    }
                    sys::wait_io(receiver.as_fd(), receiver.wants_write(), left)
                        .map_err(|e| Error::State(crate::handover::HandoverError::Io(e)))?;
                }
            }
        }
    }

    /// This generation's number: 0 when started by hand, +1 per upgrade.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The listener `name`: inherited if the parent passed it, else bound
    /// to `addr` (a stale Unix socket file there is replaced). Non-blocking
    /// and close-on-exec; this generation keeps its own copy to hand on.
    /// Returned as the runtime's listener type `L` (or as a plain
    /// [`ListenSocket`]).
    pub fn listen<L: ListenerHandoff>(
        &self,
        name: &str,
        addr: &ListenAddr,
    ) -> Result<(L, Origin), Error> {
        let (socket, origin) = self.listeners.listen(name, addr)?;
        log_listening(&socket, name, addr, origin);
        Ok((handoff(socket, name, &addr.to_string())?, origin))
    }

    /// The Unix listener `name` at `path`, reachable only by this user: a
    /// new socket is created with mode 0600 from the start (never a window
    /// with wider permissions) and a symlink at `path` is refused, never
    /// followed. For the control socket.
    pub fn listen_private<L: ListenerHandoff>(
        &self,
        name: &str,
        path: &Path,
    ) -> Result<(L, Origin), Error> {
        let (socket, origin) = self.listeners.listen_unix_private(name, path, 0o600)?;
        let addr = format!("unix:{}", path.display());
        log::info!("listening on {addr} ({name}, {})", origin_word(origin));
        Ok((handoff(socket, name, &addr)?, origin))
    }

    /// The UDP socket `name`: inherited if the parent passed it (it must be
    /// a datagram socket of `addr`'s family), else bound to `addr`.
    /// Non-blocking and close-on-exec; this generation keeps its own copy,
    /// handed on with the listeners. Datagrams queued on it are read by
    /// whichever generation reads first.
    pub fn datagram(
        &self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(std::net::UdpSocket, Origin), Error> {
        let (socket, origin) = self.listeners.datagram(name, addr)?;
        let local = socket
            .local_addr()
            .map_or_else(|_| addr.to_string(), |a| a.to_string());
        log::info!("listening on udp:{local} ({name}, {})", origin_word(origin));
        Ok((socket, origin))
    }

    /// Another handle on the datagram socket `name` this generation holds,
    /// to serve again after [`resume`](Self::resume).
    pub fn reopen_datagram(&self, name: &str) -> Result<std::net::UdpSocket, Error> {
        self.listeners.reopen_datagram(name)
    }

    /// Tell the parent this generation serves, so it stops accepting and
    /// drains. Inherited sockets nobody claimed are closed now. Without a
    /// parent (generation 0, systemd) this only closes them.
    ///
    /// With a PID file configured, it is claimed first, so a conflict is
    /// reported to the parent as this generation's error.
    pub fn ready(&self) -> Result<(), Error> {
        for name in self.listeners.close_unclaimed() {
            log::info!("closing inherited listener {name:?}: not used by this generation");
        }
        if let Some(path) = &self.pid_file_path {
            let predecessor = self.has_parent.then(std::os::unix::process::parent_id);
            *lock(&self.pid_file) = Some(PidFile::claim(path, predecessor)?);
        }
        // The fd stays open: a later hand-over of this generation to its own
        // successor is reported on it too (see `upgraded`).
        self.report(&[READY], true)?;
        // Started by a baton parent, the parent tells systemd (MAINPID=).
        if !self.has_parent {
            self.notify("READY=1\nSTATUS=serving");
        }
        Ok(())
    }

    /// Tell the parent this generation cannot serve, and why; the parent
    /// logs it and serves on. Call it, then exit.
    pub fn report_error(&self, message: &str) -> Result<(), Error> {
        let line = format!("{ERROR_PREFIX}{}\n", message.replace('\n', " "));
        self.report(line.as_bytes(), false)
    }

    /// Write `bytes` to the parent; close the fd unless `keep`.
    fn report(&self, bytes: &[u8], keep: bool) -> Result<(), Error> {
        let mut slot = lock(&self.ready);
        let Some(fd) = slot.as_ref() else {
            return Ok(());
        };
        let written = sys::write_all(fd.as_fd(), bytes).map_err(Error::Report);
        if !keep || written.is_err() {
            *slot = None;
        }
        written
    }

    /// Start the next generation with this generation's listeners. Refused
    /// once this generation is stopping, and in PID 1, whose exit would end
    /// its container.
    pub fn start_upgrade(&self) -> Result<PendingUpgrade, UpgradeError> {
        if self.stop.is_stopped() {
            return Err(UpgradeError::Stopping);
        }
        if std::process::id() == 1 {
            return Err(UpgradeError::Pid1);
        }
        let pending = self
            .listeners
            .with_handoff(|sockets| self.upgrader.start(sockets))?;
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=upgrading: waiting for new process {}",
            notify::monotonic_usec(),
            pending.pid()
        ));
        Ok(pending)
    }

    /// Record that the next generation serves: tells our own parent (see
    /// [`handed_over`](Self::handed_over)) and systemd to follow it, and
    /// stops this one.
    pub fn upgraded(&self, upgraded: &Upgraded) {
        log::debug!("upgraded: {upgraded}");
        self.handed_over();
        self.notify(&format!(
            "MAINPID={}\nREADY=1\nSTATUS=serving (generation {}, upgraded in {} ms)",
            upgraded.pid,
            upgraded.generation,
            upgraded.time_to_ready.as_millis()
        ));
        *lock(&self.successor) = Some(upgraded.pid);
        self.stop.stop_with(StopReason::Upgraded);
    }

    /// Tell our own parent, if it still watches us, that a newer generation
    /// serves now: our death must not make it serve again. The first thing
    /// to do once the next generation is ready; once only.
    pub fn handed_over(&self) {
        // A parent that has exited reads no more: then there is nobody to
        // tell (and writing would raise SIGPIPE).
        let parent_gone = lock(&self.ready)
            .as_ref()
            .is_none_or(|fd| sys::reader_gone(fd.as_fd()));
        if parent_gone {
            *lock(&self.ready) = None;
        } else if let Err(e) = self.report(&[HANDED_OVER], false) {
            log::debug!("cannot tell the previous generation about the hand-over: {e}");
        }
    }

    /// Watch the generation this one handed over to, while this one drains:
    /// if it dies now, [`resume`](Self::resume) keeps the port served. `None`
    /// before a successful upgrade.
    pub fn watch_successor(&self) -> Result<Option<SuccessorWatch>, Error> {
        let Some(pid) = *lock(&self.successor) else {
            return Ok(None);
        };
        // The pidfd from the spawn: it names the child even if its pid was
        // reaped and reused meanwhile. Opened from the pid only as a fallback.
        let (fd, report, after_ready) = match self.upgrader.take_successor() {
            Some(handover) if handover.child.pid() == pid => (
                handover.child.into_pidfd(),
                Some(handover.report),
                handover.after_ready,
            ),
            _ => (sys::pidfd_open(pid), None, Vec::new()),
        };
        Ok(Some(SuccessorWatch {
            pid,
            fd: fd.map_err(Error::Watch)?,
            report,
            handed_over: after_ready.contains(&HANDED_OVER),
        }))
    }

    /// Serve again: the successor died while this generation drained. The
    /// stop token is re-armed (accept loops may start again, on listeners
    /// from [`reopen`](Self::reopen)), systemd is told this process is the
    /// main one again, and the PID file names it.
    pub fn resume(&self, successor_status: ExitStatus) {
        let pid = lock(&self.successor).take();
        self.stop.resume();
        self.tracker.resume();
        // Serving again: upgrades are allowed again.
        self.upgrader.rearm();
        self.notify(&format!(
            "MAINPID={}\nREADY=1\nSTATUS=serving again: new generation {} ended ({successor_status})",
            std::process::id(),
            pid.unwrap_or_default()
        ));
        if let Some(path) = &self.pid_file_path {
            match PidFile::claim(path, None) {
                Ok(file) => *lock(&self.pid_file) = Some(file),
                Err(e) => log::warn!("{e}"),
            }
        }
    }

    /// Another listener on the socket `name` this generation holds, to
    /// accept again after [`resume`](Self::resume).
    pub fn reopen<L: ListenerHandoff>(&self, name: &str) -> Result<L, Error> {
        handoff(self.listeners.reopen(name)?, name, "(held)")
    }

    /// Reap killed children of failed upgrades that have ended, without
    /// waiting; returns how many are left. Call it on every turn of the
    /// event loop, and on a short timer while it is non-zero.
    pub fn reap_exited(&self) -> usize {
        self.upgrader.reap_exited()
    }

    /// Record that an upgrade failed and this generation serves on.
    pub fn upgrade_failed(&self, error: &UpgradeError) {
        if !matches!(
            error,
            UpgradeError::Stopping | UpgradeError::AlreadyRunning { .. }
        ) {
            let reason = error.to_string().replace('\n', " ");
            self.notify(&format!(
                "READY=1\nSTATUS=serving; last upgrade failed: {reason}"
            ));
            // The new process may have claimed the PID file before it failed:
            // this process serves, so the file names it again.
            if let Some(path) = &self.pid_file_path {
                match PidFile::claim(path, error.pid()) {
                    Ok(file) => *lock(&self.pid_file) = Some(file),
                    Err(e) => log::warn!("{e}"),
                }
            }
        }
    }

    fn notify(&self, state: &str) {
        if let Some(notifier) = &self.notifier {
            send(notifier, state);
        }
    }

    /// The binary the next generation runs.
    pub fn program(&self) -> &Path {
        self.upgrader.program()
    }

    /// The token that stops this generation.
    pub fn stop_token(&self) -> &StopToken {
        &self.stop
    }

    /// The tracker of this generation's connections.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }
}

/// `listening on ADDR (NAME, inherited|bound)`: which socket became which
/// listener, for the operator.
fn log_listening(socket: &ListenSocket, name: &str, addr: &ListenAddr, origin: Origin) {
    let local = match socket {
        ListenSocket::Tcp(listener) => listener.local_addr().map(|a| a.to_string()),
        ListenSocket::Unix(listener) => listener.local_addr().map(|a| {
            let path = a.as_pathname().map(|p| p.display().to_string());
            format!("unix:{}", path.unwrap_or_default())
        }),
    };
    let local = local.unwrap_or_else(|_| addr.to_string());
    log::info!("listening on {local} ({name}, {})", origin_word(origin));
}

/// How the log says where a socket came from.
fn origin_word(origin: Origin) -> &'static str {
    match origin {
        Origin::Inherited => "inherited",
        Origin::Bound => "bound",
    }
}

/// Turn `socket` into the runtime's listener type, naming it in the error.
fn handoff<L: ListenerHandoff>(socket: ListenSocket, name: &str, addr: &str) -> Result<L, Error> {
    L::from_listen_socket(socket).map_err(|source| Error::Listen {
        name: name.to_owned(),
        addr: addr.to_owned(),
        source,
    })
}

fn send(notifier: &Notifier, state: &str) {
    if let Err(e) = notifier.notify(state) {
        log::warn!("cannot notify systemd: {e}");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn adopt_ready_fd(fd: std::os::fd::RawFd) -> Result<OwnedFd, Error> {
    let problem = |problem: String| Error::ReadyFd { fd, problem };
    let owned = sys::adopt_inherited_fd(fd).map_err(|e| problem(e.to_string()))?;
    if !sys::is_writable(owned.as_fd()).map_err(|e| problem(e.to_string()))? {
        return Err(problem("not open for writing".to_owned()));
    }
    Ok(owned)
}
