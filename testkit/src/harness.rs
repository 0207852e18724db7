//! The process harness: runs a server binary built on baton and watches
//! every generation it becomes.
//!
//! A [`Server`] starts the binary (by default on `127.0.0.1:0`), reads the
//! lifecycle lines that all its generations write to the one shared stderr,
//! and lets a test wait for a line (with a deadline, never a sleep), signal a
//! pid it started, and learn how each generation ended. The test process is
//! a child subreaper, so an old generation whose parent has exited is
//! reparented to it and reaped here, by pid: generation 0 through its
//! `Child`, later ones with `waitpid(pid)` once their parent generation is
//! reaped. Nothing here ever waits for "any child" (`waitpid(-1)`): other
//! tests run in parallel in the same process and own their children.
//!
//! The lifecycle lines it follows have the form
//! `NAME[PID] gen=G backend=B: MESSAGE` (see [`Line::parts`]), whatever the
//! program's NAME: `listening on ADDR …`, `serving`, `upgrade started: new
//! process PID`, `upgrade done: pid PID generation G`, `upgrade failed: …`,
//! `resumed: new generation PID …` and `exit`.
//!
//! As in ripgrep's tests, a failure prints the command that was run and every
//! log line seen so far. Dropping a [`Server`] kills (SIGKILL) and reaps every
//! process it started that is still running.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Once;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::http::{get, Reply};

/// Default bound for waiting on a lifecycle line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(20);

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
pub struct Line {
    /// When the reader thread got it.
    pub at: Instant,
    /// The line, without its newline.
    pub text: String,
}

impl Line {
    /// `(pid, generation, backend, message)` of a
    /// `NAME[PID] gen=G backend=B: MESSAGE` line, where NAME is the
    /// program's name (`[A-Za-z0-9_.-]+`, e.g. `baton-demo`).
    pub fn parts(&self) -> Option<(u32, u64, &str, &str)> {
        let (name, rest) = self.text.split_once('[')?;
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if name.is_empty() || !name.chars().all(valid) {
            return None;
        }
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
    pub fn pid(&self) -> Option<u32> {
        self.parts().map(|p| p.0)
    }

    /// The MESSAGE part; for a line of another form, the whole line.
    pub fn message(&self) -> &str {
        self.parts().map_or(self.text.as_str(), |p| p.3)
    }

    /// Written by `pid`, with a message containing `needle`.
    pub fn is(&self, pid: u32, needle: &str) -> bool {
        self.pid() == Some(pid) && self.message().contains(needle)
    }
}

/// How a process the harness reaped ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// Its status; `None` when it was not our child to reap: its parent
    /// generation was still alive (watching it after the handover) and
    /// reaped it.
    pub status: Option<ExitStatus>,
}

/// A running `baton-demo` and every generation it became.
#[derive(Debug)]
pub struct Server {
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
    /// Start `binary --listen 127.0.0.1:0 --backend BACKEND ARGS` and wait
    /// until it serves (see [`Server::wait_serving`]).
    #[track_caller]
    pub fn start(binary: impl AsRef<Path>, backend: &str, extra_args: &[&str]) -> Server {
        let mut command = Command::new(binary.as_ref());
        command
            .args(["--listen", "127.0.0.1:0", "--backend", backend])
            .args(extra_args);
        Server::start_command(command)
    }

    /// Start `command` as it is (for a binary without `--backend`, say an
    /// example: give it its own `--listen 127.0.0.1:0`) and wait until it
    /// serves (see [`Server::wait_serving`]).
    #[track_caller]
    pub fn start_command(command: Command) -> Server {
        let mut server = Server::spawn(command);
        server.wait_serving();
        server
    }

    /// Spawn `command` (stdin null, stdout and stderr read line by line)
    /// without waiting for anything.
    pub fn spawn(mut command: Command) -> Server {
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

    /// Wait until generation 0 logged its `listening on ADDR` line and
    /// `serving`; [`Server::addr`] is then the ADDR of its first TCP
    /// listener. Needs only the line format, not any particular flag.
    #[track_caller]
    pub fn wait_serving(&mut self) {
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
    pub fn first_pid(&self) -> u32 {
        self.first_pid
    }

    /// Pid of the generation that serves now (the last one whose upgrade was seen to complete).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Generation number of [`Server::pid`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Address of the first listener, from generation 0's first `listening on` line.
    #[track_caller]
    pub fn addr(&self) -> SocketAddr {
        match self.addr {
            Some(addr) => addr,
            None => self.fail("the server has not reported its address"),
        }
    }

    /// Time from the start of the command to `at`, the clock of the dumped lines.
    pub fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    /// Every line received so far (call [`Server::poll`] first for the latest).
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// Panic with `message`, the command and every line seen so far.
    #[track_caller]
    pub fn fail(&self, message: impl std::fmt::Display) -> ! {
        self.dumped.set(true);
        panic!("{message}\n{}", self.dump());
    }

    /// `assert!` that prints the server's command and lines on failure.
    #[track_caller]
    pub fn check(&self, condition: bool, message: impl std::fmt::Display) {
        if !condition {
            self.fail(message);
        }
    }

    /// The command and every line received so far.
    pub fn dump(&self) -> String {
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
    pub fn poll(&mut self) {
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
                    // `listening on ADDR` with or without ` (details)`.
                    self.addr = rest
                        .split_whitespace()
                        .next()
                        .and_then(|addr| addr.parse().ok());
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
            } else if (message.starts_with("upgrade failed: ")
                && !message.contains("already running"))
                || message.starts_with("upgrade abandoned")
            {
                // The server kills and reaps the child of a failed (or
                // abandoned) upgrade.
                if let Some(child) = self.pending.remove(&pid) {
                    self.failed_children.insert(child);
                }
            }
        }
        self.lines.push(line);
    }

    /// Wait for a line, after the last one a wait returned, containing `needle`.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Line {
        self.wait_until(
            &format!("a line containing {needle:?}"),
            |l| l.text.contains(needle),
            timeout,
        )
    }

    /// Wait for a line from `pid`, after the last one a wait returned, whose
    /// message contains `needle`.
    #[track_caller]
    pub fn wait_for_pid(&mut self, pid: u32, needle: &str, timeout: Duration) -> Line {
        self.wait_until(
            &format!("a line from pid {pid} containing {needle:?}"),
            |l| l.is(pid, needle),
            timeout,
        )
    }

    /// Wait for the `exit` line of `pid` (searching every line, not only those after the cursor).
    #[track_caller]
    pub fn wait_exit_line(&mut self, pid: u32, timeout: Duration) -> Line {
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
    pub fn find(&mut self, pid: u32, predicate: impl Fn(&str) -> bool) -> Option<Line> {
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
    pub fn wait_until(
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
    pub fn wait_exit(&mut self, pid: u32, timeout: Duration) -> Exit {
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
    pub fn has_exited(&mut self, pid: u32) -> bool {
        self.poll();
        self.exits.contains_key(&pid)
    }

    /// Send `signal` to `pid`, which must be a process this server started.
    #[track_caller]
    pub fn signal(&mut self, pid: u32, signal: Signal) {
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
    pub fn upgrade(&mut self) -> u32 {
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
    pub fn wait_answered_by(&mut self, expected: u64) -> Reply {
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
    /// Assert that `child`, the process of a failed or abandoned upgrade of
    /// `parent`, is gone: `parent` logged that it reaped it (baton reaps
    /// killed children without blocking its event loop, so that may come
    /// just after the `upgrade failed` line), it is no child of `parent` nor
    /// an orphan of this test process, and `parent` has no zombie children.
    #[track_caller]
    pub fn assert_child_reaped(&mut self, parent: u32, child: u32) {
        let reaped = format!("reaped new process {child} (");
        if self.find(parent, |m| m.starts_with(&reaped)).is_none() {
            self.wait_for_pid(parent, &reaped, LINE_TIMEOUT);
        }
        let state = crate::proc::proc_state(child);
        let us = std::process::id();
        self.check(
            !matches!(state, Some((_, ppid)) if ppid == parent || ppid == us),
            format_args!("the upgrade's process {child} still exists: {state:?}"),
        );
        let zombies = crate::proc::zombie_children(parent);
        self.check(
            zombies.is_empty(),
            format_args!("zombie children of {parent}: {zombies:?}"),
        );
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
        let spawned = {
            let _guard = crate::tempdir::spawn_guard();
            command.spawn()
        };
        match spawned {
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
