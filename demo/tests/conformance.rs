//! The conformance suite: the real `baton-demo` binary, once per compiled
//! backend, must keep baton's promises as an operator sees them.
//!
//! - Under continuous load (keep-alive and connection-per-request), 30
//!   upgrades in a row lose no request, every old generation exits, and the
//!   last one holds no more fds and no zombie children than the first.
//! - A request in flight at an upgrade, or at SIGTERM, is finished by the old
//!   process before it exits (exit status 0); after SIGTERM the port is closed.
//! - A bad deploy (a new binary that exits, or never reports ready) leaves the
//!   old process serving with a clear `upgrade failed` line and no zombie;
//!   putting the real binary back upgrades normally; a second SIGHUP during an
//!   upgrade is refused.
//! - Bad socket-activation input (`LISTEN_FDS`) is a clear start-up error,
//!   input meant for another pid is ignored, and bad HTTP gets 400/413/431/501
//!   without affecting the server.
//!
//! Every wait is on a log line, a response or a pid, bounded in time; the
//! servers listen on `127.0.0.1:0`, so the tests run in parallel.

mod common;

use testkit::per_backend;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    deploy_bytes, deploy_copy, fd_count, fd_links, get, inherited_from_tests, request,
    zombie_children, Conn, Server, TempDir, BACKENDS, BINARY, LINE_TIMEOUT, REQUEST_TIMEOUT,
};
use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig};

per_backend! {
    fn restart_storm;
    fn in_flight_request_survives_upgrade;
    fn failed_upgrade_keeps_serving;
    fn graceful_sigterm;
    fn bad_protocol_input;
    fn bad_http_input;
    fn second_sighup_during_upgrade_is_refused;
}

/// Upgrades in the storm.
const STORM_UPGRADES: u64 = 30;

/// The deployment a bad-deploy test works on: a copy of the demo binary in
/// its own temp dir, which the test replaces as a deploy tool would.
struct Deploy {
    dir: TempDir,
}

impl Deploy {
    fn new(label: &str) -> Deploy {
        let deploy = Deploy {
            dir: TempDir::new(label),
        };
        deploy_copy(Path::new(BINARY), &deploy.binary());
        deploy
    }

    fn binary(&self) -> std::path::PathBuf {
        self.dir.path().join("baton-demo")
    }

    fn replace_with_script(&self, script: &str) {
        deploy_bytes(&self.binary(), script.as_bytes());
    }

    fn restore(&self) {
        deploy_copy(Path::new(BINARY), &self.binary());
    }
}

/// Assert the serving pid still answers `GET /` itself, as generation `generation`.
fn assert_still_serves(server: &mut Server, pid: u32, generation: u64) {
    match get(server.addr(), "/") {
        Ok(reply) => server.check(
            reply.status == 200
                && reply.pid == Some(pid)
                && reply.generation == Some(generation)
                && reply
                    .body
                    .starts_with(&format!("hello from pid {pid} generation {generation} ")),
            format_args!("expected pid {pid} generation {generation} to answer, got {reply:?}"),
        ),
        Err(e) => server.fail(format_args!("GET / failed: {e}")),
    }
}

/// 30 upgrades under continuous keep-alive and connection-per-request load,
/// each drained: every generation answers the load (with the live handover,
/// a generation replaced within milliseconds may answer none of it, and the
/// previous one's handover channel stays open a while: `tests/handover.rs`
/// has that storm).
fn restart_storm(backend: &str) {
    let mut server = Server::start(BINARY, backend, &["--handover", "off"]);
    let first = server.pid();
    let addr = server.addr();
    // Without what it inherited from the test process (see inherited_from_tests).
    let stray = inherited_from_tests(first);
    let first_fds = fd_count(first).expect("fd count of the first process") - stray.len();
    let first_links = fd_links(&first.to_string());

    let load_start = server.since_start(Instant::now());
    let load = Load::start(LoadConfig {
        keep_alive_connections: 16,
        per_request_connections: 16,
        max_duration: Duration::from_secs(120),
        ..LoadConfig::new(addr)
    })
    .expect("start the load");
    // Let the load reach the server before the first upgrade: each round is
    // a real request round trip of our own.
    for _ in 0..10_000 {
        if load.ok() >= 32 || load.failed() > 0 {
            break;
        }
        let _ = get(addr, "/health");
    }

    let mut old_pids = Vec::new();
    for _ in 0..STORM_UPGRADES {
        old_pids.push(server.pid());
        server.upgrade();
    }
    // Some load on the last generation too.
    let seen_last = load.ok();
    for _ in 0..10_000 {
        if load.ok() >= seen_last + 32 || load.failed() > 0 {
            break;
        }
        let _ = get(addr, "/health");
    }
    let report = load.stop();

    // When the failures happened, on the clock of the dumped log lines.
    let failed_at: Vec<String> = report
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, (_, failed))| *failed > 0)
        .map(|(bucket, (_, failed))| {
            let at = load_start + Duration::from_millis(100) * bucket as u32;
            format!("{failed} at {:.1}s", at.as_secs_f64())
        })
        .collect();
    server.check(
        report.failed() == 0,
        format_args!(
            "{} failed requests during the storm ({} ok): {:?}\nwhen (per 100 ms, since the server started): {}\nsamples:\n{}",
            report.failed(),
            report.ok,
            report.failures,
            failed_at.join(", "),
            report.failure_samples.join("\n")
        ),
    );
    server.check(
        report.per_generation.len() as u64 >= STORM_UPGRADES,
        format_args!(
            "responses came from {} generations, expected at least {STORM_UPGRADES}: {:?}",
            report.per_generation.len(),
            report.per_generation
        ),
    );

    for &pid in &old_pids {
        server.wait_exit_line(pid, LINE_TIMEOUT);
        let exit = server.wait_exit(pid, LINE_TIMEOUT);
        // No status: its parent generation, still watching its successor
        // (`--successor-watch`), reaped it; its `exit` line above shows it
        // ended on its own.
        server.check(
            exit.status.is_none_or(|s| s.success()),
            format_args!("old generation {pid} ended with {:?}", exit.status),
        );
    }

    let last = server.pid();
    server.check(
        server.generation() == STORM_UPGRADES,
        format_args!("serving generation {}", server.generation()),
    );
    // A generation started by an upgrade holds one fd more than generation
    // 0: its readiness pipe to its parent, kept open to report a hand-over
    // of its own (DESIGN.md, the wire protocol). Anything else is a leak.
    let first_fds = first_fds + 1;
    // Connections of the load may still be closing: re-count after each real
    // round trip, a bounded number of times.
    let mut last_fds = 0;
    for _ in 0..500 {
        last_fds = fd_count(last).expect("fd count of the last process");
        if last_fds == first_fds {
            break;
        }
        match get(addr, "/health") {
            Ok(reply) if reply.status == 200 => {}
            other => server.fail(format_args!("GET /health after the storm: {other:?}")),
        }
    }
    server.check(
        last_fds == first_fds,
        format_args!(
            "the last generation (pid {last}) has {last_fds} fds, the first had {first_fds} \
             (not counting {stray:?}, inherited from the tests)\nfirst: {first_links:?}\nlast: {:?}",
            fd_links(&last.to_string())
        ),
    );
    let zombies = zombie_children(last);
    server.check(
        zombies.is_empty(),
        format_args!("zombie children of the last generation {last}: {zombies:?}"),
    );
}

/// A `/sleep/2000` in flight at SIGHUP is answered by the old process, before it exits.
/// The drain's promise, so without the live handover (with it, the connection
/// moves on after the answer: `tests/handover.rs`).
fn in_flight_request_survives_upgrade(backend: &str) {
    let mut server = Server::start(BINARY, backend, &["--handover", "off"]);
    let old = server.pid();
    // A request on the connection first: it proves the old process owns it.
    let mut conn = Conn::connect(server.addr()).expect("connect");
    conn.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send /health");
    let health = conn.read_response(REQUEST_TIMEOUT).expect("read /health");
    server.check(
        health.status == 200 && health.pid() == Some(old),
        format_args!("/health: {health:?}"),
    );
    conn.send(b"GET /sleep/2000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send /sleep/2000");
    server.signal(old, Signal::SIGHUP);
    server.wait_for_pid(old, "upgrade started: ", LINE_TIMEOUT);

    let response = conn.read_response(REQUEST_TIMEOUT);
    let received = Instant::now();
    let exited_before = server.has_exited(old);
    let exit_line_before = server
        .find(old, |m| m == "exit")
        .filter(|line| line.at < received);
    let response = match response {
        Ok(response) => response,
        Err(e) => server.fail(format_args!("the in-flight /sleep/2000 failed: {e}")),
    };
    server.check(
        response.status == 200 && response.text() == "slept 2000 ms\n",
        format_args!("in-flight response: {response:?}"),
    );
    server.check(
        response.pid() == Some(old),
        format_args!(
            "in-flight request answered by {:?}, not the old pid {old}",
            response.pid()
        ),
    );
    server.check(
        response.close(),
        format_args!(
            "an in-flight request finished during drain must say Connection: close: {response:?}"
        ),
    );
    server.check(
        !exited_before && exit_line_before.is_none(),
        format_args!(
            "the old process exited before its in-flight response arrived (reaped: {exited_before}, exit line: {exit_line_before:?})"
        ),
    );

    server.wait_for_pid(old, "upgrade done: ", LINE_TIMEOUT);
    server.wait_answered_by(1);
    let drained = server.wait_for_pid(old, "drained: ", LINE_TIMEOUT);
    server.check(
        drained.message().contains(" 0 forced"),
        format_args!("the drain forced a connection: {}", drained.text),
    );
    server.wait_exit_line(old, LINE_TIMEOUT);
    let exit = server.wait_exit(old, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("old process ended with {:?}", exit.status),
    );
}

/// A bad deploy leaves the old process serving; the good binary upgrades.
fn failed_upgrade_keeps_serving(backend: &str) {
    let deploy = Deploy::new("bad-deploy");
    let mut server = Server::start(deploy.binary(), backend, &["--upgrade-timeout", "1s"]);
    let pid = server.pid();

    // (a) A binary that exits at once.
    deploy.replace_with_script("#!/bin/sh\nexit 0\n");
    server.signal(pid, Signal::SIGHUP);
    let started = server.wait_for_pid(pid, "upgrade started: new process ", LINE_TIMEOUT);
    let child = child_pid(&server, &started.text);
    let failed = server.wait_for_pid(pid, "upgrade failed: ", LINE_TIMEOUT);
    server.check(
        failed.message().contains("exited before reporting ready")
            && failed.message().ends_with("; still serving"),
        format_args!("unexpected failure line: {}", failed.text),
    );
    assert_still_serves(&mut server, pid, 0);
    server.assert_child_reaped(pid, child);

    // (b) A binary that never reports ready.
    deploy.replace_with_script("#!/bin/sh\nexec sleep 30\n");
    server.signal(pid, Signal::SIGHUP);
    let started = server.wait_for_pid(pid, "upgrade started: new process ", LINE_TIMEOUT);
    let child = child_pid(&server, &started.text);
    let failed = server.wait_for_pid(pid, "upgrade failed: ", LINE_TIMEOUT);
    server.check(
        failed.message().contains("did not report ready within")
            && failed.message().ends_with("; still serving"),
        format_args!("unexpected failure line: {}", failed.text),
    );
    assert_still_serves(&mut server, pid, 0);
    server.assert_child_reaped(pid, child);

    // (c) The real binary again.
    deploy.restore();
    let new = server.upgrade();
    assert_still_serves(&mut server, new, 1);
    server.wait_exit_line(pid, LINE_TIMEOUT);
    let exit = server.wait_exit(pid, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("old process ended with {:?}", exit.status),
    );
}

/// The pid in an `upgrade started: new process PID` line.
fn child_pid(server: &Server, line: &str) -> u32 {
    match line
        .rsplit_once("new process ")
        .and_then(|(_, pid)| pid.trim().parse().ok())
    {
        Some(pid) => pid,
        None => server.fail(format_args!("no pid in {line:?}")),
    }
}

/// SIGTERM with a request in flight: it finishes, the process drains and
/// exits 0, and the port is closed.
fn graceful_sigterm(backend: &str) {
    let mut server = Server::start(BINARY, backend, &[]);
    let pid = server.pid();
    let addr = server.addr();
    let mut conn = Conn::connect(addr).expect("connect");
    conn.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send /health");
    let health = conn.read_response(REQUEST_TIMEOUT).expect("read /health");
    server.check(health.status == 200, format_args!("/health: {health:?}"));
    conn.send(b"GET /sleep/1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send /sleep/1000");
    server.signal(pid, Signal::SIGTERM);

    match conn.read_response(REQUEST_TIMEOUT) {
        Ok(response) => server.check(
            response.status == 200 && response.pid() == Some(pid) && response.close(),
            format_args!("in-flight response during SIGTERM: {response:?}"),
        ),
        Err(e) => server.fail(format_args!("the in-flight /sleep/1000 failed: {e}")),
    }
    server.wait_for_pid(pid, "draining ", LINE_TIMEOUT);
    let drained = server.wait_for_pid(pid, "drained: ", LINE_TIMEOUT);
    server.check(
        drained.message().contains(" 0 forced"),
        format_args!("the drain forced a connection: {}", drained.text),
    );
    server.wait_until(
        "the `exit` line",
        |l| l.pid() == Some(pid) && l.message() == "exit",
        LINE_TIMEOUT,
    );
    let exit = server.wait_exit(pid, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.code() == Some(0)),
        format_args!("exit status {:?}, expected 0", exit.status),
    );
    match std::net::TcpStream::connect(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => server.fail(format_args!(
            "connecting to {addr} after the exit: {other:?}, expected refused"
        )),
    }
}

/// Start the binary through `sh -c SCRIPT BINARY` (so `$$` is the server's pid).
fn spawn_via_sh(script: &str) -> Server {
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script).arg(BINARY);
    Server::spawn(command)
}

/// Socket activation input: bad `LISTEN_FDS`, a non-socket fd, another pid's fds.
fn bad_protocol_input(backend: &str) {
    let args = format!("--listen 127.0.0.1:0 --backend {backend}");
    for (script, expected) in [
        (
            format!("LISTEN_PID=$$ LISTEN_FDS=abc exec \"$0\" {args}"),
            "LISTEN_FDS",
        ),
        (
            format!("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" {args} 3</dev/null"),
            "not a socket",
        ),
        (
            format!(
                "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec \"$0\" {args} 3</dev/null"
            ),
            "not a socket",
        ),
    ] {
        let mut server = spawn_via_sh(&script);
        let pid = server.first_pid();
        let line = server.wait_until(
            "an error line (or `serving`)",
            |l| is_error_line(l) || l.message() == "serving",
            LINE_TIMEOUT,
        );
        server.check(
            is_error_line(&line),
            format_args!("expected an error mentioning {expected:?}, but the server started"),
        );
        server.check(
            line.text.contains(expected),
            format_args!(
                "the error line does not mention {expected:?}: {}",
                line.text
            ),
        );
        let exit = server.wait_exit(pid, LINE_TIMEOUT);
        server.check(
            exit.status.is_some_and(|s| s.code() == Some(1)),
            format_args!("exit status {:?}, expected 1", exit.status),
        );
    }

    // LISTEN_PID names another process: the variables are not for us.
    let mut server = spawn_via_sh(&format!(
        "LISTEN_PID=1 LISTEN_FDS=1 LISTEN_FDNAMES=http exec \"$0\" {args} 3</dev/null"
    ));
    server.wait_serving();
    let pid = server.pid();
    let listening = server
        .find(pid, |m| m.starts_with("listening on "))
        .expect("a listening line");
    server.check(
        listening.message().ends_with("(http, bound)"),
        format_args!("expected a bound listener: {}", listening.text),
    );
    assert_still_serves(&mut server, pid, 0);
}

/// A fatal start-up error line: `baton-demo[PID] gen=G backend=B: error: …` or `baton-demo: error: …`.
fn is_error_line(line: &common::Line) -> bool {
    line.text.starts_with("baton-demo: error: ") || line.message().starts_with("error: ")
}

/// Bad requests get their status and leave the server serving.
fn bad_http_input(backend: &str) {
    let server = Server::start(BINARY, backend, &[]);
    let addr = server.addr();
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let cases: [(&str, &[u8], u16); 5] = [
        ("garbage request line", b"\x00\x01garbage\r\n\r\n", 400),
        ("not HTTP", b"this is not http at all\r\n\r\n", 400),
        ("20 KiB header", big_header.as_bytes(), 431),
        (
            "huge Content-Length",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n",
            413,
        ),
        (
            "Transfer-Encoding: gzip",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
        ),
    ];
    for (what, raw, status) in cases {
        match request(addr, raw) {
            Ok(response) => server.check(
                response.status == status,
                format_args!("{what}: expected {status}, got {response:?}"),
            ),
            Err(e) => server.fail(format_args!("{what}: expected {status}, got {e}")),
        }
        assert_unaffected(&server, what);
    }

    // Two requests in one write: two answers, in order (the first is slower).
    let mut conn = Conn::connect(addr).expect("connect");
    conn.send(
        b"GET /sleep/50 HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    )
    .expect("send two pipelined requests");
    for expected in ["slept 50 ms\n", "hello"] {
        match conn.read_response(REQUEST_TIMEOUT) {
            Ok(response) => server.check(
                response.status == 200 && response.text() == expected,
                format_args!("pipelined: expected 200 {expected:?}, got {response:?}"),
            ),
            Err(e) => server.fail(format_args!("pipelined: expected {expected:?}, got {e}")),
        }
    }
    assert_unaffected(&server, "pipelined requests");
}

/// A fresh `GET /` on a new connection still answers 200.
fn assert_unaffected(server: &Server, after: &str) {
    match get(server.addr(), "/") {
        Ok(reply) => server.check(
            reply.status == 200 && reply.pid == Some(server.pid()),
            format_args!("after {after}: GET / answered {reply:?}"),
        ),
        Err(e) => server.fail(format_args!("after {after}: GET / failed: {e}")),
    }
}

/// A second SIGHUP while an upgrade runs is refused; the first one goes on
/// to its own outcome; the server serves throughout.
fn second_sighup_during_upgrade_is_refused(backend: &str) {
    let deploy = Deploy::new("second-sighup");
    let mut server = Server::start(deploy.binary(), backend, &["--upgrade-timeout", "5s"]);
    let pid = server.pid();
    deploy.replace_with_script("#!/bin/sh\nexec sleep 30\n");

    server.signal(pid, Signal::SIGHUP);
    let started = server.wait_for_pid(pid, "upgrade started: new process ", LINE_TIMEOUT);
    let child = child_pid(&server, &started.text);
    server.signal(pid, Signal::SIGHUP);
    let refused = server.wait_until(
        "the second SIGHUP's refusal",
        |l| {
            l.pid() == Some(pid)
                && (l.message().starts_with("upgrade refused")
                    || (l.message().starts_with("upgrade failed: ")
                        && l.message().contains("already running")))
        },
        LINE_TIMEOUT,
    );
    server.check(
        refused.message().contains(&child.to_string()),
        format_args!(
            "the refusal does not name the running upgrade's process {child}: {}",
            refused.text
        ),
    );
    assert_still_serves(&mut server, pid, 0);

    let failed = server.wait_for_pid(pid, "upgrade failed: ", LINE_TIMEOUT);
    server.check(
        failed.message().contains("did not report ready within"),
        format_args!("expected the first upgrade's timeout, got: {}", failed.text),
    );
    let others = server
        .lines()
        .iter()
        .filter(|l| l.is(pid, "upgrade started: "))
        .count();
    server.check(
        others == 1,
        format_args!("{others} upgrades were started, expected 1"),
    );
    assert_still_serves(&mut server, pid, 0);
    server.assert_child_reaped(pid, child);
}

/// `--backend` naming a backend that is not compiled in is a clear error
/// listing the ones that are.
#[test]
fn unknown_backend_is_a_clear_error() {
    let mut command = Command::new(BINARY);
    command.args(["--listen", "127.0.0.1:0", "--backend", "no-such-backend"]);
    let mut server = Server::spawn(command);
    let pid = server.first_pid();
    let line = server.wait_for("error: ", LINE_TIMEOUT);
    for backend in BACKENDS {
        server.check(
            line.text.contains(backend),
            format_args!("the error does not list {backend:?}: {}", line.text),
        );
    }
    let exit = server.wait_exit(pid, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.code() == Some(1)),
        format_args!("exit status {:?}, expected 1", exit.status),
    );
}
