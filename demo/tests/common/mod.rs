//! Harness for the process-level tests: runs the real `baton-demo` binary and
//! watches every generation it becomes.
//!
//! A [`Server`] starts the binary on `127.0.0.1:0`, reads the lifecycle lines
//! that all its generations write to the one shared stderr, and lets a test
//! wait for a line (with a deadline, never a sleep), signal a pid it started,
//! and learn how each generation ended. The test process is a child
//! subreaper, so an old generation whose parent has exited is reparented to
//! it and reaped here, by pid: generation 0 through its `Child`, later ones
//! with `waitpid(pid)` once their parent generation is reaped. Nothing here
//! ever waits for "any child" (`waitpid(-1)`): other tests run in parallel in
//! the same process and own their children.
//!
//! As in ripgrep's tests, a failure prints the command that was run and every
//! log line seen so far. Dropping a [`Server`] kills (SIGKILL) and reaps every
//! process it started that is still running.
//!
//! Also here: raw HTTP requests ([`request`], [`get`], [`Conn`]), fd and
//! zombie counts from `/proc`, and temporary directories for binary copies.

// Each test crate that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Once;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// The backends compiled into the demo, by Cargo feature.
pub(crate) const BACKENDS: &[&str] = &[
    #[cfg(feature = "tokio")]
    "tokio",
    #[cfg(feature = "smol")]
    "smol",
    #[cfg(feature = "mio")]
    "mio",
];

/// One module of tests per compiled backend, each `#[test]` calling the
/// suite's function of the same name with the backend's name, so a failure
/// names its backend (`tokio::restart_storm`). Attributes written before a
/// `fn` (`#[ignore]`, docs) are kept.
#[allow(unused_macros)] // not every test crate has per-backend tests
macro_rules! per_backend {
    ($($(#[$attr:meta])* fn $test:ident;)*) => {
        #[cfg(feature = "tokio")]
        mod tokio {
            $( $(#[$attr])* #[test] fn $test() { super::$test("tokio"); } )*
        }
        #[cfg(feature = "smol")]
        mod smol {
            $( $(#[$attr])* #[test] fn $test() { super::$test("smol"); } )*
        }
        #[cfg(feature = "mio")]
        mod mio {
            $( $(#[$attr])* #[test] fn $test() { super::$test("mio"); } )*
        }
    };
}

/// The demo binary cargo built for these tests.
pub(crate) const BINARY: &str = env!("CARGO_BIN_EXE_baton-demo");

/// Default bound for waiting on a lifecycle line.
pub(crate) const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one HTTP request (connect + write + read).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response head or body the raw client accepts.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Make this test process a child subreaper, once. Orphaned old generations
/// are then reparented to it (not to init) and can be reaped and checked.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

/// One line a server wrote (stderr), or `[stdout] ...` for its stdout.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    /// When the reader thread got it.
    pub(crate) at: Instant,
    /// The line, without its newline.
    pub(crate) text: String,
}

impl Line {
    /// `(pid, generation, backend, message)` of a
    /// `baton-demo[PID] gen=G backend=B: MESSAGE` line.
    pub(crate) fn parts(&self) -> Option<(u32, u64, &str, &str)> {
        let rest = self.text.strip_prefix("baton-demo[")?;
        let (pid, rest) = rest.split_once("] gen=")?;
        let (generation, rest) = rest.split_once(" backend=")?;
        let (backend, message) = rest.split_once(": ")?;
        Some((
            pid.parse().ok()?,
            generation.parse().ok()?,
            backend,
            message,
        ))
    }

    /// Pid of the process that wrote it.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.parts().map(|p| p.0)
    }

    /// The MESSAGE part; for a line of another form, the whole line.
    pub(crate) fn message(&self) -> &str {
        self.parts().map_or(self.text.as_str(), |p| p.3)
    }

    /// Written by `pid`, with a message containing `needle`.
    pub(crate) fn is(&self, pid: u32, needle: &str) -> bool {
        self.pid() == Some(pid) && self.message().contains(needle)
    }
}

/// How a process the harness reaped ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exit {
    /// Its status; `None` when it was not our child to reap: its parent
    /// generation was still alive (watching it after the handover) and
    /// reaped it.
    pub(crate) status: Option<ExitStatus>,
}

/// A running `baton-demo` and every generation it became.
#[derive(Debug)]
pub(crate) struct Server {
    /// The command, for failure reports.
    command: String,
    /// Lines from the reader threads.
    lines_rx: Receiver<Line>,
    /// Every line received so far.
    lines: Vec<Line>,
    /// `wait_for` searches from here.
    cursor: usize,
    /// Pids for the reaper thread, in generation order.
    reap_tx: Option<Sender<u32>>,
    /// Exits from the reaper thread.
    exits_rx: Receiver<(u32, Exit)>,
    /// Every exit reaped so far.
    exits: HashMap<u32, Exit>,
    /// Every process started: generation 0 and each `upgrade started` child, in order.
    started: Vec<u32>,
    /// Children of failed upgrades, which their server kills and reaps itself.
    failed_children: HashSet<u32>,
    /// Pids handed to the reaper (generation 0 and each successful successor).
    reaped_by_us: HashSet<u32>,
    /// Running upgrade child per parent pid, from `upgrade started`.
    pending: HashMap<u32, u32>,
    first_pid: u32,
    pid: u32,
    generation: u64,
    addr: Option<SocketAddr>,
    /// Set once the lines were printed for a failure.
    dumped: Cell<bool>,
    /// When the command was started; lines are dumped with their time since.
    start: Instant,
}

impl Server {
    /// Start the test binary with `--listen 127.0.0.1:0 --backend BACKEND ARGS`
    /// and wait until it serves.
    pub(crate) fn start(backend: &str, extra_args: &[&str]) -> Server {
        Server::start_binary(Path::new(BINARY), backend, extra_args)
    }

    /// Like [`Server::start`], with another binary (e.g. a copy).
    pub(crate) fn start_binary(path: &Path, backend: &str, extra_args: &[&str]) -> Server {
        let mut command = Command::new(path);
        command
            .args(["--listen", "127.0.0.1:0", "--backend", backend])
            .args(extra_args);
        let mut server = Server::spawn(command);
        server.wait_serving();
        server
    }

    /// Spawn `command` (stdin null, stdout and stderr read line by line)
    /// without waiting for anything.
    pub(crate) fn spawn(mut command: Command) -> Server {
        become_subreaper();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let description = format!("{command:?}");
        let start = Instant::now();
        let mut child = spawn_retrying(&mut command, &description);
        let pid = child.id();
        let (lines_tx, lines_rx) = mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            read_lines(stderr, "", lines_tx.clone());
        }
        if let Some(stdout) = child.stdout.take() {
            read_lines(stdout, "[stdout] ", lines_tx);
        }
        let (reap_tx, reap_rx) = mpsc::channel();
        let (exits_tx, exits_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("reaper-{pid}"))
            .spawn(move || reaper(child, &reap_rx, &exits_tx))
            .expect("spawn the reaper thread");
        Server {
            command: description,
            lines_rx,
            lines: Vec::new(),
            cursor: 0,
            reap_tx: Some(reap_tx),
            exits_rx,
            exits: HashMap::new(),
            started: vec![pid],
            failed_children: HashSet::new(),
            reaped_by_us: HashSet::from([pid]),
            pending: HashMap::new(),
            first_pid: pid,
            pid,
            generation: 0,
            addr: None,
            dumped: Cell::new(false),
            start,
        }
    }

    /// Wait until generation 0 logged its `listening on` line and `serving`.
    #[track_caller]
    pub(crate) fn wait_serving(&mut self) {
        let first = self.first_pid;
        self.wait_until(
            "generation 0's `listening on` line",
            |l| l.is(first, "listening on "),
            LINE_TIMEOUT,
        );
        self.wait_until(
            "generation 0's `serving` line",
            |l| l.pid() == Some(first) && l.message() == "serving",
            LINE_TIMEOUT,
        );
        if self.addr.is_none() {
            self.fail("no address in generation 0's `listening on` line");
        }
    }

    /// Pid of the process that was started (generation 0).
    pub(crate) fn first_pid(&self) -> u32 {
        self.first_pid
    }

    /// Pid of the generation that serves now (the last one whose upgrade was seen to complete).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Generation number of [`Server::pid`].
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Address of the first listener, from generation 0's first `listening on` line.
    #[track_caller]
    pub(crate) fn addr(&self) -> SocketAddr {
        match self.addr {
            Some(addr) => addr,
            None => self.fail("the server has not reported its address"),
        }
    }

    /// Time from the start of the command to `at`, the clock of the dumped lines.
    pub(crate) fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    /// Every line received so far (call [`Server::poll`] first for the latest).
    pub(crate) fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// Panic with `message`, the command and every line seen so far.
    #[track_caller]
    pub(crate) fn fail(&self, message: impl std::fmt::Display) -> ! {
        self.dumped.set(true);
        panic!("{message}\n{}", self.dump());
    }

    /// `assert!` that prints the server's command and lines on failure.
    #[track_caller]
    pub(crate) fn check(&self, condition: bool, message: impl std::fmt::Display) {
        if !condition {
            self.fail(message);
        }
    }

    /// The command and every line received so far.
    pub(crate) fn dump(&self) -> String {
        let mut out = format!("\n--- command ---\n{}\n--- log lines ---\n", self.command);
        for line in &self.lines {
            let at = line.at.saturating_duration_since(self.start).as_secs_f64();
            let _ = writeln!(out, "[{at:7.3}s] {}", line.text);
        }
        let exits: BTreeMap<_, _> = self.exits.iter().map(|(p, e)| (p, e.status)).collect();
        let _ = writeln!(
            out,
            "--- reaped ---\n{exits:?}\n--- started ---\n{:?}",
            self.started
        );
        out
    }

    /// Take every line and exit already received, without waiting.
    pub(crate) fn poll(&mut self) {
        while let Ok(line) = self.lines_rx.try_recv() {
            self.push(line);
        }
        while let Ok((pid, exit)) = self.exits_rx.try_recv() {
            self.exits.insert(pid, exit);
        }
    }

    /// Record a line and follow the lifecycle it reports.
    fn push(&mut self, line: Line) {
        if let Some((pid, _, _, message)) = line.parts() {
            if let Some(rest) = message.strip_prefix("listening on ") {
                if self.addr.is_none() && pid == self.first_pid {
                    self.addr = rest
                        .split_once(" (")
                        .and_then(|(addr, _)| addr.parse().ok());
                }
            } else if let Some(rest) = message.strip_prefix("upgrade started: new process ") {
                if let Ok(child) = rest.trim().parse::<u32>() {
                    self.started.push(child);
                    self.pending.insert(pid, child);
                }
            } else if let Some(rest) = message.strip_prefix("upgrade done: pid ") {
                let mut words = rest.split_whitespace();
                let child = words.next().and_then(|w| w.parse::<u32>().ok());
                let generation = match (words.next(), words.next()) {
                    (Some("generation"), Some(g)) => g.parse::<u64>().ok(),
                    _ => None,
                };
                self.pending.remove(&pid);
                if let Some(child) = child {
                    if !self.started.contains(&child) {
                        self.started.push(child);
                    }
                    if pid == self.pid {
                        self.pid = child;
                        self.generation = generation.unwrap_or(self.generation + 1);
                    }
                    // Its parent generation exits next and it is reparented to
                    // us: the reaper takes it once the parent is reaped.
                    if self.reaped_by_us.insert(child) {
                        if let Some(tx) = &self.reap_tx {
                            let _ = tx.send(child);
                        }
                    }
                }
            } else if let Some(rest) = message.strip_prefix("resumed: new generation ") {
                // The generation that took over died while this one drained:
                // this one serves again.
                let successor = rest.split_whitespace().next().and_then(|w| w.parse().ok());
                if successor == Some(self.pid) {
                    self.pid = pid;
                    self.generation = line.parts().map_or(self.generation, |p| p.1);
                }
            } else if message.starts_with("upgrade failed: ")
                && !message.contains("already running")
            {
                // The server kills and reaps the child of a failed upgrade.
                if let Some(child) = self.pending.remove(&pid) {
                    self.failed_children.insert(child);
                }
            }
        }
        self.lines.push(line);
    }

    /// Wait for a line, after the last one a wait returned, containing `needle`.
    #[track_caller]
    pub(crate) fn wait_for(&mut self, needle: &str, timeout: Duration) -> Line {
        self.wait_until(
            &format!("a line containing {needle:?}"),
            |l| l.text.contains(needle),
            timeout,
        )
    }

    /// Wait for a line from `pid`, after the last one a wait returned, whose
    /// message contains `needle`.
    #[track_caller]
    pub(crate) fn wait_for_pid(&mut self, pid: u32, needle: &str, timeout: Duration) -> Line {
        self.wait_until(
            &format!("a line from pid {pid} containing {needle:?}"),
            |l| l.is(pid, needle),
            timeout,
        )
    }

    /// Wait for the `exit` line of `pid` (searching every line, not only those after the cursor).
    #[track_caller]
    pub(crate) fn wait_exit_line(&mut self, pid: u32, timeout: Duration) -> Line {
        if let Some(line) = self.find(pid, |m| m == "exit") {
            return line;
        }
        self.wait_until(
            &format!("the `exit` line of pid {pid}"),
            |l| l.pid() == Some(pid) && l.message() == "exit",
            timeout,
        )
    }

    /// First line received so far from `pid` whose message satisfies `predicate`.
    pub(crate) fn find(&mut self, pid: u32, predicate: impl Fn(&str) -> bool) -> Option<Line> {
        self.poll();
        self.lines
            .iter()
            .find(|l| l.pid() == Some(pid) && predicate(l.message()))
            .cloned()
    }

    /// Wait for the next line (after the cursor) satisfying `predicate`; the
    /// cursor moves past it. Fails after `timeout`, or when every writer of the
    /// shared stderr has exited.
    #[track_caller]
    pub(crate) fn wait_until(
        &mut self,
        description: &str,
        mut predicate: impl FnMut(&Line) -> bool,
        timeout: Duration,
    ) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(line) = self.lines.get(self.cursor) {
                self.cursor += 1;
                if predicate(line) {
                    return line.clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.fail(format_args!(
                    "timed out after {timeout:?} waiting for {description}"
                ));
            }
            match self.lines_rx.recv_timeout(left) {
                Ok(line) => self.push(line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.fail(format_args!(
                    "every process of the server closed its output while waiting for {description}"
                )),
            }
        }
    }

    /// Wait until `pid` is reaped and return how it ended. `pid` must be
    /// generation 0 or a generation whose `upgrade done` line was seen (the
    /// harness reaps them in order).
    #[track_caller]
    pub(crate) fn wait_exit(&mut self, pid: u32, timeout: Duration) -> Exit {
        self.poll();
        if !self.reaped_by_us.contains(&pid) {
            self.fail(format_args!(
                "pid {pid} is not a generation this harness reaps"
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.exits.get(&pid) {
                return *exit;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.poll();
                self.fail(format_args!("pid {pid} did not exit within {timeout:?}"));
            }
            match self.exits_rx.recv_timeout(left) {
                Ok((pid, exit)) => {
                    self.exits.insert(pid, exit);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.poll();
                    self.fail(format_args!("the reaper stopped before pid {pid} exited"));
                }
            }
        }
    }

    /// Whether `pid` was reaped already (as far as received so far).
    pub(crate) fn has_exited(&mut self, pid: u32) -> bool {
        self.poll();
        self.exits.contains_key(&pid)
    }

    /// Send `signal` to `pid`, which must be a process this server started.
    #[track_caller]
    pub(crate) fn signal(&mut self, pid: u32, signal: Signal) {
        self.poll();
        if !self.started.contains(&pid) || self.exits.contains_key(&pid) {
            self.fail(format_args!(
                "refusing to signal pid {pid}: not a live process of this server"
            ));
        }
        if let Err(e) = kill(nix_pid(pid), signal) {
            self.fail(format_args!("kill({pid}, {signal}): {e}"));
        }
    }

    /// SIGHUP the serving generation, wait for its `upgrade done` line, then
    /// until `GET /` is answered by the new generation. Returns its pid.
    #[track_caller]
    pub(crate) fn upgrade(&mut self) -> u32 {
        let old = self.pid;
        let expected = self.generation + 1;
        self.signal(old, Signal::SIGHUP);
        self.wait_for_pid(old, "upgrade done: ", LINE_TIMEOUT);
        if self.pid == old || self.generation != expected {
            self.fail(format_args!(
                "after the upgrade of pid {old}: serving pid {} generation {}, expected generation {expected}",
                self.pid, self.generation
            ));
        }
        self.wait_answered_by(expected);
        self.pid
    }

    /// Send `GET /` (one connection each) until generation `expected`
    /// answers; any failed request fails the test. Bounded in count and time.
    #[track_caller]
    pub(crate) fn wait_answered_by(&mut self, expected: u64) -> Reply {
        let deadline = Instant::now() + LINE_TIMEOUT;
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            match get(self.addr(), "/") {
                Ok(reply) if reply.status == 200 && reply.generation == Some(expected) => {
                    return reply
                }
                Ok(reply) => {
                    if seen.len() < 5 {
                        seen.push(reply);
                    }
                }
                Err(e) => self.fail(format_args!(
                    "GET / failed while waiting for generation {expected} to answer: {e}"
                )),
            }
            if Instant::now() > deadline {
                break;
            }
        }
        self.fail(format_args!(
            "generation {expected} never answered GET /; first other answers: {seen:?}"
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.poll();
        // Kill what may still run: every started pid not reaped yet, except
        // the children of failed upgrades, which their server reaped (their
        // pid may belong to someone else by now).
        for &pid in &self.started {
            let ours_to_kill = !self.exits.contains_key(&pid)
                && (!self.failed_children.contains(&pid) || self.pending_child(pid));
            if ours_to_kill {
                let _ = kill(nix_pid(pid), Signal::SIGKILL);
            }
        }
        // Started children that no server reaped (their parent died first)
        // are ours now: reap them too.
        if let Some(tx) = self.reap_tx.take() {
            let orphans: Vec<u32> = self.pending.values().copied().collect();
            for pid in orphans {
                if self.reaped_by_us.insert(pid) {
                    let _ = tx.send(pid);
                }
            }
        }
        // The reaper ends once every pid it was given is reaped; bounded.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.exits_rx.recv_timeout(left) {
                Ok((pid, exit)) => {
                    self.exits.insert(pid, exit);
                }
                Err(_) => break,
            }
        }
        if std::thread::panicking() && !self.dumped.get() {
            self.poll();
            eprintln!("{}", self.dump());
        }
    }
}

impl Server {
    /// Whether `pid` is the running upgrade child of some generation.
    fn pending_child(&self, pid: u32) -> bool {
        self.pending.values().any(|&p| p == pid)
    }
}

/// Spawn, retrying a few times on ETXTBSY: a binary copied just now may
/// still be open for writing in a child another test thread is forking.
fn spawn_retrying(command: &mut Command, description: &str) -> Child {
    let mut last = None;
    for _ in 0..50 {
        match command.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(Errno::ETXTBSY as i32) => {
                last = Some(e);
                std::thread::yield_now();
            }
            Err(e) => panic!("cannot run {description}: {e}"),
        }
    }
    panic!("cannot run {description}: {last:?}")
}

/// Send each line of `stream` to `tx`, prefixed, until EOF or the receiver is gone.
fn read_lines(stream: impl Read + Send + 'static, prefix: &'static str, tx: Sender<Line>) {
    let spawned = std::thread::Builder::new()
        .name("server-output".to_owned())
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let line = Line {
                            at: Instant::now(),
                            text: format!("{prefix}{}", text.trim_end_matches(['\n', '\r'])),
                        };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    spawned.expect("spawn an output reader thread");
}

/// Reap generation 0 with `Child::wait`, then each pid received, in order,
/// with `waitpid(pid)`. A later generation is our child once its parent
/// generation has exited; since pids arrive in generation order and each is
/// reaped before the next is waited for, that is always so by then.
fn reaper(mut child: Child, pids: &Receiver<u32>, exits: &Sender<(u32, Exit)>) {
    let status = child.wait().ok();
    let _ = exits.send((child.id(), Exit { status }));
    for pid in pids {
        let mut status = None;
        // Bounded: only EINTR repeats.
        for _ in 0..100 {
            match waitpid(nix_pid(pid), None) {
                Ok(WaitStatus::Exited(_, code)) => {
                    status = Some(ExitStatus::from_raw((code & 0xff) << 8));
                    break;
                }
                Ok(WaitStatus::Signaled(_, signal, _)) => {
                    status = Some(ExitStatus::from_raw(signal as i32));
                    break;
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                // ECHILD: its parent generation reaped it.
                Err(_) => break,
            }
        }
        let exit = Exit { status };
        if exits.send((pid, exit)).is_err() {
            break;
        }
    }
}

fn nix_pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"))
}

/// Open file descriptors of `pid`, from `/proc/PID/fd`.
pub(crate) fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Open fds of `pid` and what each points to, from `/proc/PID/fd`.
pub(crate) fn fd_links(pid: &str) -> BTreeMap<u32, String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Fds (3 and up) that `pid` inherited from this test process: those of
/// ours without close-on-exec, at the same number with the same target.
/// Generation 0 gets them from whatever runs the tests (a shell, CI); baton
/// rightly does not pass them on, so fd counts leave them out.
pub(crate) fn inherited_from_tests(pid: u32) -> Vec<(u32, String)> {
    let theirs = fd_links(&pid.to_string());
    fd_links("self")
        .into_iter()
        .filter(|(fd, target)| {
            *fd >= 3
                && theirs.get(fd) == Some(target)
                && std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).is_ok_and(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                        .is_some_and(|flags| flags & 0o2_000_000 == 0)
                })
        })
        .collect()
}

/// `(state, ppid)` of `pid` from `/proc/PID/stat`; None if there is no such process.
pub(crate) fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Zombie children of `pid`: processes in state `Z` whose parent is `pid`.
pub(crate) fn zombie_children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| matches!(proc_state(p), Some(('Z', parent)) if parent == pid))
        .collect()
}

/// A response as read from the wire.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    /// Status code.
    pub(crate) status: u16,
    /// Headers, in order.
    pub(crate) headers: Vec<(String, String)>,
    /// Body (Content-Length bytes, or up to EOF without one).
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// Value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `X-Baton-Pid`.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.header("x-baton-pid")?.trim().parse().ok()
    }

    /// `X-Baton-Generation`.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.header("x-baton-generation")?.trim().parse().ok()
    }

    /// Whether the server said `Connection: close`.
    pub(crate) fn close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// The body as text (lossy).
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection to a server on loopback, for targeted requests.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: TcpStream,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl Conn {
    /// Connect to `addr` (loopback only).
    pub(crate) fn connect(addr: SocketAddr) -> io::Result<Conn> {
        assert!(
            addr.ip().is_loopback(),
            "tests only talk to loopback, not {addr}"
        );
        let stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Write raw bytes.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Read one response, within `timeout`.
    pub(crate) fn read_response(&mut self, timeout: Duration) -> io::Result<Response> {
        let deadline = Instant::now() + timeout;
        let (head_len, status, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (n, parsed.code.unwrap_or(0), headers);
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_RESPONSE => {
                    return Err(io::Error::other("response head too large"));
                }
                Ok(httparse::Status::Partial) => {
                    if !self.fill(deadline)? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "connection closed before a complete response head (got {:?})",
                                String::from_utf8_lossy(&self.buf)
                            ),
                        ));
                    }
                }
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "bad response head {:?}: {e}",
                        String::from_utf8_lossy(&self.buf)
                    )))
                }
            }
        };
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| {
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n <= MAX_RESPONSE)
                    .ok_or_else(|| io::Error::other(format!("bad Content-Length {v:?}")))
            })
            .transpose()?;
        let end = match length {
            Some(length) => {
                let end = head_len + length;
                while self.buf.len() < end {
                    if !self.fill(deadline)? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before the end of the body",
                        ));
                    }
                }
                end
            }
            None => {
                while self.fill(deadline)? {
                    if self.buf.len() > head_len + MAX_RESPONSE {
                        return Err(io::Error::other("response body too large"));
                    }
                }
                self.buf.len()
            }
        };
        let body = self.buf[head_len..end].to_vec();
        self.buf.drain(..end);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Read more bytes; false on EOF.
    fn fill(&mut self, deadline: Instant) -> io::Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "response timeout"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 16 * 1024];
        // Bounded: only EINTR repeats.
        for _ in 0..100 {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("read interrupted too often"))
    }
}

/// One request on a new connection: write `raw`, read one response.
pub(crate) fn request(addr: SocketAddr, raw: &[u8]) -> io::Result<Response> {
    let mut conn = Conn::connect(addr)?;
    conn.send(raw)?;
    conn.read_response(REQUEST_TIMEOUT)
}

/// What `GET` answered: status and who answered.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// Status code.
    pub(crate) status: u16,
    /// `X-Baton-Generation`.
    pub(crate) generation: Option<u64>,
    /// `X-Baton-Pid`.
    pub(crate) pid: Option<u32>,
    /// Body text.
    pub(crate) body: String,
}

/// `GET path` on a new connection with `Connection: close`.
pub(crate) fn get(addr: SocketAddr, path: &str) -> io::Result<Reply> {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: baton-test\r\nConnection: close\r\n\r\n");
    let response = request(addr, raw.as_bytes())?;
    Ok(Reply {
        status: response.status,
        generation: response.generation(),
        pid: response.pid(),
        body: response.text(),
    })
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Create `$TMPDIR/baton-test-PID-N-LABEL`.
    pub(crate) fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("baton-test-{}-{n}-{label}", std::process::id()));
        // A leftover from an earlier run with the same pid: start clean.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Replace `target` as deploy tools do: write a new file next to it
/// (mode 0755), then `rename` it over the old one.
pub(crate) fn deploy_bytes(target: &Path, contents: &[u8]) {
    let tmp = sibling(target);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(&tmp)
        .expect("create the new binary");
    file.write_all(contents).expect("write the new binary");
    file.sync_all().expect("sync the new binary");
    drop(file);
    std::fs::rename(&tmp, target).expect("rename the new binary into place");
}

/// Replace `target` with a copy of `source` (copy next to it, then `rename`).
pub(crate) fn deploy_copy(source: &Path, target: &Path) {
    let tmp = sibling(target);
    std::fs::copy(source, &tmp).expect("copy the binary");
    std::fs::rename(&tmp, target).expect("rename the binary into place");
}

fn sibling(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .unwrap_or_else(|| OsStr::new("binary"))
        .to_string_lossy();
    target.with_file_name(format!(".{name}.new"))
}
