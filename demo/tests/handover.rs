//! Live handover of the demo's keep-alive connections, once per compiled
//! backend: at each upgrade, every open connection moves to the new
//! generation at its next request boundary, with the bytes read and not yet
//! answered, and its client never notices.
//!
//! - The storm: 16 keep-alive clients through 30 upgrades, one after
//!   another: no failed request, no reconnect, each connection answered by
//!   at least 30 generations, and each old generation moved all 16.
//! - The same storm with a connection per request besides (each may move
//!   before its request is read): no failure, no keep-alive reconnect.
//! - `--handover off`: the same load through upgrades drains as before:
//!   no failure, the clients reconnect, no connection moves.
//! - A new generation of another state version: nothing moves, the upgrade
//!   succeeds, the old generation drains, the clients reconnect.
//! - A pipelined request and a partial one move with their connection:
//!   written behind a request the old generation answers after the moves
//!   opened, they are answered by the new one, on the same connection.
//!
//! Every wait is on a log line, a response or a status answer, bounded.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_core::control::Client;
use common::{Conn, Server, TempDir, BINARY, LINE_TIMEOUT, REQUEST_TIMEOUT};
use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig, Report};
use testkit::per_backend;
use testkit::steps::{assert_no_failures, finish_load, wait_load};

per_backend! {
    fn storm_of_upgrades_moves_every_connection;
    fn storm_with_new_connections_loses_nothing;
    fn handover_off_drains_and_clients_reconnect;
    fn another_state_version_drains_and_the_upgrade_succeeds;
    fn pipelined_and_partial_requests_move_unread;
}

/// Keep-alive clients of the storm.
const STORM_CLIENTS: usize = 16;
/// Upgrades of the storm.
const STORM_UPGRADES: u64 = 30;
/// Keep-alive clients of the drain runs.
const DRAIN_CLIENTS: usize = 8;

/// A control socket in a temp dir of its own.
struct Control {
    _dir: TempDir,
    path: PathBuf,
}

impl Control {
    fn new() -> Control {
        let dir = TempDir::new("handover");
        let path = dir.path().join("control.sock");
        Control { _dir: dir, path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 temp path")
    }

    /// Open connections of the serving generation (not counting the one
    /// asking), from its `status` answer.
    #[track_caller]
    fn open_connections(&self, server: &Server) -> usize {
        let status = Client::new(&self.path)
            .status()
            .unwrap_or_else(|e| server.fail(format_args!("control status: {e}")));
        status
            .lines()
            .find_map(|l| l.strip_prefix("connections: "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| server.fail(format_args!("no connections in {status:?}")))
    }
}

/// Keep-alive load only: `clients` threads, each on one connection.
#[track_caller]
fn keep_alive_load(server: &Server, clients: usize) -> Load {
    Load::start(LoadConfig {
        keep_alive_connections: clients,
        per_request_connections: 0,
        max_duration: Duration::from_secs(90),
        ..LoadConfig::new(server.addr())
    })
    .unwrap_or_else(|e| server.fail(format_args!("cannot start the load: {e}")))
}

/// Until `n` connections are open, asking the control socket (each round
/// is one real round trip to the server). Bounded.
#[track_caller]
fn wait_open(server: &Server, control: &Control, n: usize) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    for _ in 0..10_000 {
        if control.open_connections(server) == n {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    server.fail(format_args!("{n} connections never were open"));
}

/// Until every keep-alive connection of `load` was answered by
/// `generation` (or the load failed), each round one status round trip to
/// the server. Bounded.
#[track_caller]
fn wait_answered_by(server: &Server, control: &Control, load: &Load, generation: u64) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    for _ in 0..100_000 {
        if load.min_keep_alive_generation() >= Some(generation) || load.failed() > 0 {
            return;
        }
        if Instant::now() > deadline {
            break;
        }
        control.open_connections(server);
    }
    server.fail(format_args!(
        "not every connection was answered by generation {generation}: the least recent answer came from {:?}",
        load.min_keep_alive_generation()
    ));
}

/// Wait for the `moved N connections to new process NEW` lines of `old`
/// and return how many connections they moved in all, at least `n`. A
/// `moves: …` line of `old` (a move failed) fails the test.
#[track_caller]
fn wait_moved(server: &mut Server, old: u32, new: u32, n: usize) -> usize {
    let tail = format!(" connections to new process {new}");
    let mut moved = 0;
    // Bounded: each line moves at least one connection.
    for _ in 0..n {
        let line = server.wait_until(
            &format!("pid {old} moving {n} connections to {new} ({moved} so far)"),
            |l| l.is(old, "moved ") || l.is(old, "moves: "),
            LINE_TIMEOUT,
        );
        let count = line
            .message()
            .strip_prefix("moved ")
            .and_then(|rest| rest.strip_suffix(&tail))
            .and_then(|count| count.parse::<usize>().ok());
        match count {
            Some(count) => moved += count,
            None => server.fail(format_args!("while moving: {:?}", line.text)),
        }
        if moved >= n {
            break;
        }
    }
    moved
}

/// Print what a run measured, for the test's output.
fn print(backend: &str, what: &str, report: &Report, took: Duration) {
    eprintln!(
        "{backend} {what}: {} ok, {} failed, {} connects, {} reconnects, generations per connection {:?}, {took:.2?}",
        report.ok,
        report.failed(),
        report.connects,
        report.reconnects,
        report.generations_per_connection
    );
}

fn storm_of_upgrades_moves_every_connection(backend: &str) {
    let start = Instant::now();
    let control = Control::new();
    let mut server = Server::start(BINARY, backend, &["--control", control.arg()]);
    let load = keep_alive_load(&server, STORM_CLIENTS);
    // Every client on generation 0 before the first upgrade.
    wait_open(&server, &control, STORM_CLIENTS);
    for generation in 1..=STORM_UPGRADES {
        let old = server.pid();
        server.signal(old, Signal::SIGHUP);
        server.wait_for_pid(old, "upgrade done: ", LINE_TIMEOUT);
        let new = server.pid();
        server.check(
            new != old && server.generation() == generation,
            format_args!(
                "after upgrade {generation}: pid {new} generation {}",
                server.generation()
            ),
        );
        // All of them moved (a client that reconnected would be accepted by
        // the new generation and not counted here)...
        let moved = wait_moved(&mut server, old, new, STORM_CLIENTS);
        server.check(
            moved == STORM_CLIENTS,
            format_args!("pid {old} moved {moved} connections, expected {STORM_CLIENTS}"),
        );
        // ... and the new generation answers each of them before it moves
        // them on.
        wait_answered_by(&server, &control, &load, generation);
    }
    let upgrades_took = start.elapsed();
    // The last generation answers every connection before the load stops.
    let report = finish_load(&server, load, 4 * STORM_CLIENTS as u64);
    print(backend, "storm", &report, start.elapsed());
    eprintln!("{backend} storm: {STORM_UPGRADES} upgrades in {upgrades_took:.2?}");
    assert_no_failures(&server, &report, "during the storm");
    server.check(
        report.reconnects == 0 && report.connects == STORM_CLIENTS as u64,
        format_args!(
            "{} connects, {} reconnects: every client should keep its one connection",
            report.connects, report.reconnects
        ),
    );
    let per_connection = &report.generations_per_connection;
    let generations = STORM_UPGRADES as usize + 1;
    server.check(
        per_connection.len() == STORM_CLIENTS && per_connection.iter().all(|&n| n == generations),
        format_args!(
            "generations answering each connection: {per_connection:?}; expected {STORM_CLIENTS} connections, each answered by all {generations}"
        ),
    );
}

fn storm_with_new_connections_loses_nothing(backend: &str) {
    let start = Instant::now();
    let mut server = Server::start(BINARY, backend, &[]);
    let load = Load::start(LoadConfig {
        keep_alive_connections: STORM_CLIENTS,
        per_request_connections: STORM_CLIENTS / 2,
        max_duration: Duration::from_secs(90),
        ..LoadConfig::new(server.addr())
    })
    .unwrap_or_else(|e| server.fail(format_args!("cannot start the load: {e}")));
    wait_load(&server, &load, 2 * STORM_CLIENTS as u64);
    for _ in 0..STORM_UPGRADES {
        // SIGHUP, `upgrade done`, a new connection answered by the new one.
        server.upgrade();
    }
    let report = finish_load(&server, load, 4 * STORM_CLIENTS as u64);
    print(
        backend,
        "storm with new connections",
        &report,
        start.elapsed(),
    );
    assert_no_failures(&server, &report, "during the storm");
    server.check(
        report.reconnects == 0,
        format_args!("{} keep-alive reconnects", report.reconnects),
    );
}

/// Upgrade under keep-alive load, as `args` make the server drain: the old
/// generations move nothing, clients reconnect, no request fails, and no
/// connection is answered by two generations. `before_upgrade` runs before
/// each upgrade.
fn upgrades_drain(backend: &str, args: &[&str], upgrades: u64, before_upgrade: impl Fn()) {
    let start = Instant::now();
    let mut all = vec!["--successor-watch", "100ms"];
    all.extend_from_slice(args);
    let mut server = Server::start(BINARY, backend, &all);
    let load = keep_alive_load(&server, DRAIN_CLIENTS);
    wait_load(&server, &load, 4 * DRAIN_CLIENTS as u64);
    for _ in 0..upgrades {
        before_upgrade();
        let old = server.pid();
        server.upgrade();
        let drained = server.wait_for_pid(old, "drained: ", LINE_TIMEOUT);
        server.check(
            !drained.message().contains("moved"),
            format_args!("with a plain drain: {:?}", drained.text),
        );
        let moved = server.find(old, |m| m.starts_with("moved "));
        server.check(moved.is_none(), format_args!("{moved:?}"));
        wait_load(&server, &load, 2 * DRAIN_CLIENTS as u64);
    }
    let report = finish_load(&server, load, 2 * DRAIN_CLIENTS as u64);
    print(
        backend,
        &format!("drain {args:?}"),
        &report,
        start.elapsed(),
    );
    assert_no_failures(&server, &report, "through the drains");
    server.check(
        report.reconnects > 0,
        "no client connected again after a drain",
    );
    let per_connection = &report.generations_per_connection;
    server.check(
        per_connection.iter().all(|&n| n == 1),
        format_args!("a drained connection is answered by one generation: {per_connection:?}"),
    );
}

fn handover_off_drains_and_clients_reconnect(backend: &str) {
    upgrades_drain(backend, &["--handover", "off"], 3, || {});
}

fn another_state_version_drains_and_the_upgrade_succeeds(backend: &str) {
    let dir = TempDir::new("handover-version");
    let file = dir.path().join("state-version");
    std::fs::write(&file, "1\n").expect("write the state version");
    let path = file.to_str().expect("UTF-8 temp path");
    // The next generation reads version 2: none in common with 1.
    upgrades_drain(backend, &["--state-version-file", path], 1, || {
        std::fs::write(&file, "2\n").expect("write the state version");
    });
}

/// Write `bytes` on `conn`.
#[track_caller]
fn send(conn: &mut Conn, server: &Server, bytes: &[u8]) {
    conn.send(bytes).unwrap_or_else(|e| server.fail(e));
}

/// Read one response on `conn`: a 200.
#[track_caller]
fn read(conn: &mut Conn, server: &Server, what: &str) -> testkit::Response {
    let response = conn
        .read_response(REQUEST_TIMEOUT)
        .unwrap_or_else(|e| server.fail(format_args!("{what}: {e}")));
    server.check(response.status == 200, format_args!("{what}: {response:?}"));
    response
}

fn pipelined_and_partial_requests_move_unread(backend: &str) {
    let mut server = Server::start(BINARY, backend, &[]);
    let old = server.pid();
    let mut conn = Conn::connect(server.addr()).unwrap_or_else(|e| server.fail(e));
    // One request answered, and the head of the next one without its end,
    // in one write: generation 0 reads both (one segment on loopback) and
    // waits for the rest of the second one.
    send(
        &mut conn,
        &server,
        b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n",
    );
    let first = read(&mut conn, &server, "the first request");
    server.check(
        first.pid() == Some(old) && !first.close(),
        format_args!("the first request: {first:?}"),
    );
    // Moves open: the connection, mid-request, waits for its next boundary.
    let new = server.upgrade();
    // The end of that request, a whole one behind it and the start of a
    // third, in one write: generation 0 answers the first (keep-alive: it
    // moves) and moves the rest unread.
    send(
        &mut conn,
        &server,
        b"\r\nGET /stats HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHos",
    );
    let answered = read(
        &mut conn,
        &server,
        "the request completed after the upgrade",
    );
    server.check(
        answered.pid() == Some(old) && !answered.close(),
        format_args!("expected generation 0 to answer with keep-alive: {answered:?}"),
    );
    let pipelined = read(&mut conn, &server, "the pipelined request");
    server.check(
        pipelined.pid() == Some(new) && pipelined.text().starts_with("requests "),
        format_args!("expected the new generation to answer /stats: {pipelined:?}"),
    );
    send(&mut conn, &server, b"t: t\r\n\r\n");
    let partial = read(&mut conn, &server, "the partial request");
    server.check(
        partial.pid() == Some(new) && partial.generation() == Some(1) && !partial.close(),
        format_args!("expected the new generation to answer: {partial:?}"),
    );
    server.wait_for_pid(
        old,
        &format!("moved 1 connections to new process {new}"),
        LINE_TIMEOUT,
    );
}
