//! The smol example (`examples/smol_server.rs`, a line echo server) through
//! a restart storm: ten upgrades under keep-alive and
//! connection-per-request load, with zero failed requests.
//!
//! This test binary is also the example: it includes the example's code and,
//! started with `BATON_SMOL_EXAMPLE=1`, runs its `main`. The test starts
//! itself that way, and each upgrade re-executes the same binary (baton runs
//! the program the process was started from), so every generation runs the
//! example's code.
//!
//! The example's protocol: a greeting line with the pid, then every line
//! sent comes back; after a stop, an idle connection is told `bye` and
//! closed. A `bye` in place of an echo is the server saying "not served,
//! reconnect" (the new generation accepts), as `Connection: close` is in
//! HTTP: the client resends on a new connection, and that is not a failure.
//! Anything else (refused, reset, EOF without `bye`, a wrong echo) is.
//!
//! Waits are on log lines and on responses, never on a clock; every loop is
//! bounded. No libtest harness (`harness = false`): main decides which of
//! the two roles to play, and prints libtest-like lines.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[path = "../examples/smol_server.rs"]
mod example;

const ROLE: &str = "BATON_SMOL_EXAMPLE";
const TEST: &str = "smol_example_restart_storm";
const UPGRADES: u64 = 10;
const LINE_TIMEOUT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    if std::env::var_os(ROLE).is_some() {
        if let Err(e) = example::main() {
            eprintln!("[{}] error: {e}", std::process::id());
            std::process::exit(1);
        }
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{TEST}: test");
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| TEST.contains(f.as_str())) {
        println!("0 passed, 0 failed");
        return;
    }
    println!("running 1 test");
    match std::panic::catch_unwind(restart_storm) {
        Ok(()) => {
            println!("test {TEST} ... ok");
            println!("1 passed, 0 failed");
        }
        Err(_) => {
            println!("test {TEST} ... FAILED");
            println!("0 passed, 1 failed");
            std::process::exit(101);
        }
    }
}

/// The example running as generation 0, and every line its generations
/// wrote on the shared stderr.
struct Server {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    /// Every generation started: only these are ever signalled.
    pids: Vec<u32>,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(std::env::current_exe().expect("the test binary's path"))
            .arg("127.0.0.1:0")
            .env(ROLE, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        Server {
            child,
            lines,
            log,
            pids: vec![pid],
        }
    }

    /// The next line containing `needle`, within `timeout`.
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "no line with {needle:?} within {timeout:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Send `signal` to `pid`, a generation this test started.
    fn signal(&self, pid: u32, signal: Signal) {
        assert!(self.pids.contains(&pid), "pid {pid} is not ours");
        kill(Pid::from_raw(pid as i32), signal).expect("kill");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only the generations this test started, and only those that have
        // not said they exit (an exited one's pid may be reused).
        let log = self.log.lock().unwrap().clone();
        for &pid in &self.pids {
            let prefix = format!("[{pid}] drained: ");
            if !log.iter().any(|l| l.starts_with(&prefix)) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

fn pid_in(line: &str) -> u32 {
    line.strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

#[derive(Default)]
struct LoadShared {
    stop: AtomicBool,
    ok: AtomicU64,
    /// `bye` answers: resent on a new connection.
    byes: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Pids that greeted a load connection.
    pids: Mutex<BTreeSet<u32>>,
}

/// A connection to the echo server, after its greeting.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connect and read the greeting; returns the greeting pid too.
    fn open(addr: SocketAddr) -> Result<(Conn, u32), String> {
        let stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let writer = stream.try_clone().map_err(|e| format!("clone: {e}"))?;
        let mut conn = Conn {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = conn.read_line()?;
        let pid = greeting
            .strip_prefix("hello from pid ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| format!("bad greeting {greeting:?}"))?;
        Ok((conn, pid))
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("eof".to_owned()),
            Ok(_) if line.ends_with('\n') => Ok(line),
            Ok(_) => Err(format!("eof after {line:?}")),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// Send `line` and read the answer: `Ok(true)` echoed, `Ok(false)` bye.
    fn echo(&mut self, line: &str) -> Result<bool, String> {
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        match self.read_line()? {
            answer if answer == line => Ok(true),
            answer if answer == "bye\n" => Ok(false),
            answer => Err(format!("sent {line:?}, got {answer:?}")),
        }
    }
}

/// One echo on `conn` (opened if needed), resent on a new connection after
/// a `bye` (bounded). The connection is kept if `keep_alive`.
fn one_request(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    line: &str,
    keep_alive: bool,
    shared: &LoadShared,
) -> Result<(), String> {
    for _ in 0..100 {
        let current = match conn {
            Some(current) => current,
            None => {
                let (opened, pid) = Conn::open(addr)?;
                shared.pids.lock().unwrap().insert(pid);
                conn.insert(opened)
            }
        };
        let echoed = current.echo(line);
        if !keep_alive || !matches!(echoed, Ok(true)) {
            *conn = None;
        }
        match echoed {
            Ok(true) => return Ok(()),
            Ok(false) => {
                shared.byes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    Err("told bye 100 times in a row".to_owned())
}

/// Keep-alive and connection-per-request clients until told to stop
/// (bounded in count and time too).
fn start_load(addr: SocketAddr, shared: &Arc<LoadShared>) -> Vec<JoinHandle<()>> {
    (0..6)
        .map(|client| {
            let shared = shared.clone();
            let keep_alive = client < 4;
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut conn = None;
                for n in 0..1_000_000u64 {
                    if shared.stop.load(Ordering::Relaxed)
                        || started.elapsed() > Duration::from_secs(120)
                    {
                        break;
                    }
                    let line = format!("client {client} line {n}\n");
                    match one_request(&mut conn, addr, &line, keep_alive, &shared) {
                        Ok(()) => {
                            shared.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            conn = None;
                            shared
                                .failures
                                .lock()
                                .unwrap()
                                .push(format!("client {client}: {e}"));
                        }
                    }
                }
            })
        })
        .collect()
}

/// Echo on our own connections until the load has `more` successes beyond
/// what it had: each round is a real round trip, so this waits on the
/// server, not a clock. Bounded in count.
fn let_load_run(shared: &LoadShared, addr: SocketAddr, more: u64) {
    let target = shared.ok.load(Ordering::Relaxed) + more;
    let mut conn = None;
    for n in 0..100_000 {
        if shared.ok.load(Ordering::Relaxed) >= target {
            return;
        }
        let line = format!("pacer line {n}\n");
        let _ = one_request(&mut conn, addr, &line, true, shared);
    }
}

fn restart_storm() {
    let mut server = Server::start();
    let line = server.wait_for("echoing on ", LINE_TIMEOUT);
    let addr: SocketAddr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    let shared = Arc::new(LoadShared::default());
    let threads = start_load(addr, &shared);
    let mut current = server.child.id();
    for generation in 1..=UPGRADES {
        let_load_run(&shared, addr, 50);
        server.signal(current, Signal::SIGHUP);
        // The new generation logs its listener before it reports ready,
        // the old one its outcome after.
        let started = server.wait_for(&format!("generation {generation} echoing on"), LINE_TIMEOUT);
        let new = pid_in(&started);
        server.pids.push(new);
        let outcome = server.wait_for(&format!("[{current}] upgrade"), LINE_TIMEOUT);
        assert!(
            outcome.contains("upgraded"),
            "generation {generation}: {outcome}\nlog:\n{}",
            server.log()
        );
        current = new;
    }
    // The last generation serves the load.
    let_load_run(&shared, addr, 50);
    for _ in 0..100_000 {
        if shared.pids.lock().unwrap().contains(&current) {
            break;
        }
        let _ = Conn::open(addr).map(|(_, pid)| shared.pids.lock().unwrap().insert(pid));
    }
    shared.stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("a load thread panicked");
    }
    let failures = shared.failures.lock().unwrap().clone();
    let ok = shared.ok.load(Ordering::Relaxed);
    let byes = shared.byes.load(Ordering::Relaxed);
    let pids = shared.pids.lock().unwrap().clone();
    eprintln!(
        "smol example restart storm: {ok} ok, {} failed, {byes} told bye and resent, {} pids served",
        failures.len(),
        pids.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}\nlog:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        server.log()
    );
    assert!(
        pids.contains(&current) && pids.len() >= 2,
        "the load saw pids {pids:?}"
    );

    // Every generation drains and exits; the last one on SIGTERM.
    server.signal(current, Signal::SIGTERM);
    for &pid in &server.pids.clone() {
        let prefix = format!("[{pid}] drained: ");
        if !server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with(&prefix))
        {
            server.wait_for(&prefix, LINE_TIMEOUT);
        }
    }
    let status = server.child.wait().expect("wait for generation 0");
    assert!(status.success(), "generation 0 exited with {status}");
}
