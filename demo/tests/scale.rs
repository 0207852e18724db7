//! Scale: the demo at 10,000 connections and under a low open-file limit.
//!
//! - 10,000 keep-alive connections (loopback), each answered once, are held
//!   open through an upgrade, per backend. None fails: half of them send one
//!   more request during the drain and get it answered by the old generation
//!   with `Connection: close`, then a clean close; the other half stay idle
//!   and see a clean close (EOF, never a reset) when the idle grace ends; the
//!   old generation then exits 0 and the new one serves. Failures are
//!   counted by kind, as testkit's load client does, and reported together.
//! - Started under `prlimit --nofile=1024:4096`, the demo raises its soft
//!   open-file limit to the hard one, logs it, and warns that
//!   `--max-connections 10000` does not fit.
//!
//! Memory per connection and upgrade times are measured by baton-bench
//! (README: Scale), not asserted here. Every wait is bounded and on an
//! event (a line, a response, an EOF); the phases' times are printed.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Server, BINARY, LINE_TIMEOUT};

testkit::per_backend! {
    fn ten_thousand_connections_through_an_upgrade;
    fn open_file_limit_raised_and_checked;
}

/// Connections held through the upgrade.
const CONNECTIONS: usize = 10_000;
/// Connections opened (and answered) at a time: well within the listen
/// backlog (1024), so no SYN waits for a retransmission.
const BATCH: usize = 256;
/// Bound on each read or write of the client.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The old generation's idle grace: the requests sent during the drain
/// (a few hundred ms for 5,000 of them) must reach it within this.
const IDLE_GRACE: &str = "5s";
/// Largest response the client reads.
const MAX_RESPONSE: usize = 64 * 1024;

/// The 10,000-connection tests hold 10,000 client fds each: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Failures by kind, with the first few described.
#[derive(Debug, Default)]
struct Failures {
    by_kind: BTreeMap<&'static str, u64>,
    samples: Vec<String>,
}

impl Failures {
    fn add(&mut self, kind: &'static str, detail: String) {
        *self.by_kind.entry(kind).or_default() += 1;
        if self.samples.len() < 10 {
            self.samples.push(format!("{kind}: {detail}"));
        }
    }

    fn io(&mut self, what: &str, index: usize, e: &io::Error) {
        self.add(classify(e), format!("connection {index}: {what}: {e}"));
    }

    fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }
}

/// The kinds of testkit's load client.
fn classify(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "reset",
        io::ErrorKind::UnexpectedEof => "eof",
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout",
        _ => "other",
    }
}

/// One response as this client needs it.
#[derive(Debug)]
struct Answer {
    status: u16,
    generation: Option<u64>,
    close: bool,
}

/// A keep-alive connection of the test.
#[derive(Debug)]
struct Client {
    stream: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> io::Result<Client> {
        assert!(addr.ip().is_loopback(), "loopback only, not {addr}");
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client { stream })
    }

    fn send_get(&mut self) -> io::Result<()> {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: scale\r\n\r\n")
    }

    /// Read one response (head and Content-Length body).
    fn read_answer(&mut self) -> io::Result<Answer> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Bounded: each read takes at least a byte or fails, up to MAX_RESPONSE.
        loop {
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(head) = response
                .parse(&buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
                };
                let length: usize = header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let answer = Answer {
                    status: response.code.unwrap_or(0),
                    generation: header("x-baton-generation").and_then(|v| v.parse().ok()),
                    close: header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
                };
                if buf.len() >= head + length {
                    if buf.len() > head + length {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "bytes after the response",
                        ));
                    }
                    return Ok(answer);
                }
            }
            if buf.len() > MAX_RESPONSE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response too large",
                ));
            }
            match self.stream.read(&mut chunk)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("closed after {} bytes of a response", buf.len()),
                    ))
                }
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Wait for the server's clean close: EOF with nothing before it.
    fn read_eof(&mut self) -> io::Result<()> {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte)? {
            0 => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bytes instead of a close",
            )),
        }
    }
}

/// Raise this process's soft open-file limit (the server inherits it) and
/// check that 10,000 connections fit on both sides.
fn raise_own_fd_limit() {
    let limit = baton_core::raise_fd_limit().expect("raise the open-file limit");
    let needed = (CONNECTIONS + 512) as u64;
    assert!(
        limit.now >= needed,
        "this test needs an open-file limit of at least {needed} (client and server each hold \
         {CONNECTIONS} connections); the hard limit here allows {}: raise it (ulimit -Hn)",
        limit.now
    );
}

fn ten_thousand_connections_through_an_upgrade(backend: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    raise_own_fd_limit();
    let max = (CONNECTIONS + 100).to_string();
    let mut server = Server::start(
        BINARY,
        backend,
        // The drain at scale: connections end in the old generation.
        &[
            "--max-connections",
            &max,
            "--idle-grace",
            IDLE_GRACE,
            "--handover",
            "off",
        ],
    );
    let addr = server.addr();
    let mut failures = Failures::default();
    let mut times = Vec::new();

    // 10,000 connections, each answered once by generation 0.
    let start = Instant::now();
    let mut clients: Vec<Option<Client>> = Vec::with_capacity(CONNECTIONS);
    for first in (0..CONNECTIONS).step_by(BATCH) {
        let batch = first..(first + BATCH).min(CONNECTIONS);
        for index in batch.clone() {
            let client = Client::connect(addr).and_then(|mut c| c.send_get().map(|()| c));
            match client {
                Ok(client) => clients.push(Some(client)),
                Err(e) => {
                    failures.io("connect and send", index, &e);
                    clients.push(None);
                }
            }
        }
        for index in batch {
            let Some(client) = clients[index].as_mut() else {
                continue;
            };
            match client.read_answer() {
                Ok(answer) if answer.status == 200 && answer.generation == Some(0) => {}
                Ok(answer) => failures.add("bad status", format!("connection {index}: {answer:?}")),
                Err(e) => failures.io("first response", index, &e),
            }
        }
    }
    times.push(("open and answer 10,000", start.elapsed()));
    let open = clients.iter().flatten().count();

    // Upgrade under them: SIGHUP, `upgrade done`, a fresh connection
    // answered by generation 1.
    let old = server.pid();
    let start = Instant::now();
    server.upgrade();
    times.push(("upgrade (SIGHUP to answered by gen 1)", start.elapsed()));

    // The drain: every even connection sends one more request, answered by
    // the old generation with `Connection: close`, then closed cleanly.
    let start = Instant::now();
    for (index, slot) in clients.iter_mut().enumerate().step_by(2) {
        if let Some(client) = slot {
            if let Err(e) = client.send_get() {
                failures.io("request during the drain", index, &e);
                *slot = None;
            }
        }
    }
    for (index, slot) in clients.iter_mut().enumerate().step_by(2) {
        let Some(client) = slot.as_mut() else {
            continue;
        };
        match client.read_answer() {
            Ok(answer) if answer.status == 200 && answer.generation == Some(0) && answer.close => {
                if let Err(e) = client.read_eof() {
                    failures.io("close after the last response", index, &e);
                }
            }
            Ok(answer) => failures.add(
                "bad status",
                format!("connection {index}: during the drain, expected 200 from generation 0 with Connection: close: {answer:?}"),
            ),
            Err(e) => failures.io("response during the drain", index, &e),
        }
        *slot = None;
    }
    times.push(("5,000 answered during the drain", start.elapsed()));

    // Every odd connection stayed idle: closed cleanly at the idle grace.
    let start = Instant::now();
    for (index, slot) in clients.iter_mut().enumerate().skip(1).step_by(2) {
        if let Some(client) = slot.as_mut() {
            if let Err(e) = client.read_eof() {
                failures.io("idle close during the drain", index, &e);
            }
        }
        *slot = None;
    }
    times.push(("5,000 idle closed (idle grace)", start.elapsed()));

    let start = Instant::now();
    let drained = server.wait_for_pid(old, "drained: ", LINE_TIMEOUT);
    let exit = server.wait_exit(old, LINE_TIMEOUT);
    times.push(("old generation exited", start.elapsed()));
    let reply = common::get(addr, "/");

    eprintln!("{backend}: {open} connections held through the upgrade");
    for (what, took) in &times {
        eprintln!("{backend}:   {what}: {took:.2?}");
    }
    server.check(
        failures.total() == 0,
        format_args!(
            "{} of {CONNECTIONS} connections failed: {:?}; first: {:#?}",
            failures.total(),
            failures.by_kind,
            failures.samples
        ),
    );
    server.check(
        exit.status.is_none_or(|s| s.success()),
        format_args!("the old generation exited with {:?}", exit.status),
    );
    eprintln!("{backend}: old generation {}", drained.message());
    match reply {
        Ok(reply) => server.check(
            reply.status == 200 && reply.generation == Some(1),
            format_args!("after the drain, expected generation 1 to answer: {reply:?}"),
        ),
        Err(e) => server.fail(format_args!("GET / after the drain: {e}")),
    }
}

fn open_file_limit_raised_and_checked(backend: &str) {
    // prlimit sets the limits, then execs the demo in the same process.
    let mut command = Command::new("prlimit");
    command.args(["--nofile=1024:4096", "--", BINARY]).args([
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend,
        "--max-connections",
        "10000",
    ]);
    let mut server = Server::spawn(command);
    // Both lines come before `serving`, on the same stderr.
    server.wait_serving();
    let pid = server.first_pid();
    let raised = server.find(pid, |m| {
        m == "open files: soft limit raised from 1024 to 4096"
    });
    server.check(
        raised.is_some(),
        "no `open files: soft limit raised from 1024 to 4096` line before `serving`",
    );
    let warning = server.find(pid, |m| m.contains("--max-connections 10000 is above"));
    server.check(
        warning.as_ref().is_some_and(|w| {
            w.message().starts_with("warning: ")
                && w.message().contains("4096 files")
                && w.message().contains("room for 4032 connections")
        }),
        format_args!("expected a warning naming the limit, got {warning:?}"),
    );
    // Within the limit, no warning.
    let mut quiet = Command::new("prlimit");
    quiet.args(["--nofile=1024:4096", "--", BINARY]).args([
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend,
        "--max-connections",
        "4000",
    ]);
    let mut quiet = Server::spawn(quiet);
    quiet.wait_serving();
    quiet.poll();
    let quiet_pid = quiet.first_pid();
    let warned = quiet.find(quiet_pid, |m| m.contains("is above"));
    quiet.check(
        warned.is_none(),
        "a warning for --max-connections 4000 under 4096 files",
    );
    let raised = quiet.find(quiet_pid, |m| {
        m == "open files: soft limit raised from 1024 to 4096"
    });
    quiet.check(raised.is_some(), "no `open files` line before `serving`");
}
