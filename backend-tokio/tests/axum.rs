//! The axum example through a restart storm: ten upgrades under keep-alive
//! load (and in-flight slow requests), with zero failed requests.
//!
//! This test binary is also the example: it includes `examples/axum.rs`
//! and, started with `BATON_AXUM_EXAMPLE=1`, runs the example's `main`.
//! The test starts itself that way, and each upgrade re-executes the same
//! binary (baton runs the program the process was started from), so every
//! generation runs the example's code.
//!
//! No libtest harness (`harness = false`): main decides which of the two
//! roles to play. It prints libtest-like lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[path = "../examples/axum.rs"]
mod example;

const ROLE: &str = "BATON_AXUM_EXAMPLE";
const TEST: &str = "axum_restart_storm";
const UPGRADES: usize = 10;

fn main() {
    if std::env::var_os(ROLE).is_some() {
        if let Err(e) = example::main() {
            eprintln!("[pid {}] error: {e}", std::process::id());
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
    let result = std::panic::catch_unwind(restart_storm);
    match result {
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

/// Every line the generations wrote on stderr, as events.
struct Server {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    pids: Vec<u32>,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["127.0.0.1:0", "1000"])
            .env(ROLE, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example");
        let stderr = child.stderr.take().unwrap();
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
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "no line with {needle:?} within {timeout:?}; log:\n{}",
                        self.log.lock().unwrap().join("\n")
                    )
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only the generations this test started (the child and the
        // processes it started by upgrading), and only those that have not
        // said they exit (an exited one's pid may belong to another process).
        let log = self.log.lock().unwrap().clone();
        for pid in &self.pids {
            if !log.contains(&format!("[pid {pid}] exit")) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct LoadShared {
    stop: AtomicBool,
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    pids: Mutex<std::collections::BTreeSet<u32>>,
    /// Notified after every response, for `wait_until`.
    answered: std::sync::Condvar,
}

/// Keep-alive clients that check every response; a `Connection: close`
/// answer means reconnect, anything else unexpected is a failure.
fn start_load(addr: SocketAddr, shared: &Arc<LoadShared>) -> Vec<JoinHandle<()>> {
    let paths = ["/", "/", "/", "/sleep/50"];
    paths
        .iter()
        .map(|path| {
            let shared = shared.clone();
            let path = path.to_string();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut conn: Option<TcpStream> = None;
                // Bounded in count and in time, besides the stop flag.
                for _ in 0..1_000_000 {
                    if shared.stop.load(Ordering::Relaxed)
                        || started.elapsed() > Duration::from_secs(60)
                    {
                        break;
                    }
                    match request(&mut conn, addr, &path) {
                        Ok((pid, close)) => {
                            shared.ok.fetch_add(1, Ordering::Relaxed);
                            let mut pids = shared.pids.lock().unwrap();
                            if let Some(pid) = pid {
                                pids.insert(pid);
                            }
                            drop(pids);
                            shared.answered.notify_all();
                            if close {
                                conn = None;
                            }
                        }
                        Err(e) => {
                            conn = None;
                            shared.failures.lock().unwrap().push(format!("{path}: {e}"));
                        }
                    }
                }
            })
        })
        .collect()
}

/// One request; returns the pid in the body (for `/`) and whether the server
/// asked to close.
fn request(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    path: &str,
) -> Result<(Option<u32>, bool), String> {
    let stream = match conn {
        Some(stream) => stream,
        None => {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.set_nodelay(true).unwrap();
            conn.insert(stream)
        }
    };
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: baton\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("eof after {} bytes of head", head.len())),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
        if head.len() > 16 * 1024 {
            return Err("head too long".into());
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(format!("bad status: {head:?}"));
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no content-length: {head:?}"))?;
    let mut body = vec![0u8; length];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    let body = String::from_utf8_lossy(&body);
    let close = head.lines().any(|l| l == "connection: close");
    if path == "/" {
        let pid = body
            .strip_prefix("hello from pid ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| format!("bad body: {body:?}"))?;
        return Ok((Some(pid), close));
    }
    if !body.starts_with("slept") {
        return Err(format!("bad body: {body:?}"));
    }
    Ok((None, close))
}

fn pid_in(line: &str) -> u32 {
    line.strip_prefix("[pid ")
        .and_then(|rest| rest.split(']').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

fn restart_storm() {
    let mut server = Server::start();
    let line = server.wait_for("listening on ", Duration::from_secs(20));
    let addr: SocketAddr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    server.wait_for("serving", Duration::from_secs(20));

    let shared = Arc::new(LoadShared::default());
    let threads = start_load(addr, &shared);
    let mut current = server.child.id();
    for round in 0..UPGRADES {
        // Some traffic on the current generation before each upgrade.
        let before = shared.ok.load(Ordering::Relaxed);
        wait_until(&shared, Duration::from_secs(20), |_| {
            shared.ok.load(Ordering::Relaxed) >= before + 20
        });
        kill(Pid::from_raw(current as i32), Signal::SIGHUP).unwrap();
        let started = server.wait_for("upgrade started: new process", Duration::from_secs(20));
        assert_eq!(pid_in(&started), current, "round {round}");
        let new: u32 = started.rsplit(' ').next().unwrap().parse().unwrap();
        server.pids.push(new);
        let done = server.wait_for("upgrade ", Duration::from_secs(20));
        assert!(done.contains("upgrade done"), "round {round}: {done}");
        current = new;
    }
    // The last generation serves the load.
    wait_until(&shared, Duration::from_secs(20), |pids| {
        pids.contains(&current)
    });
    shared.stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let failures = shared.failures.lock().unwrap().clone();
    let ok = shared.ok.load(Ordering::Relaxed);
    let pids = shared.pids.lock().unwrap().len();
    eprintln!(
        "axum restart storm: {ok} ok, {} failed, {pids} pids served",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}\nlog:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        server.log.lock().unwrap().join("\n")
    );
    assert!(pids >= 2, "the load saw only {pids} pids");

    // Every generation drains and exits; the last one on SIGTERM.
    kill(Pid::from_raw(current as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut exited = server
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.ends_with("] exit"))
        .count();
    while exited < UPGRADES + 1 {
        let left = deadline.saturating_duration_since(Instant::now());
        server.wait_for("] exit", left);
        exited += 1;
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "generation 0 exited with {status}");
    let log = server.log.lock().unwrap().join("\n");
    assert!(!log.contains("timed out"), "{log}");
}

/// Wait (bounded) until `condition` holds, woken by each response of the load.
/// The load threads take the same lock before they notify, so a response
/// between the check and the wait is not missed.
fn wait_until(
    shared: &LoadShared,
    timeout: Duration,
    condition: impl Fn(&std::collections::BTreeSet<u32>) -> bool,
) {
    let deadline = Instant::now() + timeout;
    let mut guard = shared.pids.lock().unwrap();
    while !condition(&guard) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "condition not met within {timeout:?}");
        guard = shared.answered.wait_timeout(guard, left).unwrap().0;
    }
}
