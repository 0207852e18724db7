//! Keep-alive connections of the hyper and axum examples move to the next
//! generation at each upgrade (issue 13 item 5; how: `baton_tokio::hyper`).
//!
//! Under keep-alive load (requests racing each move), through
//! [`UPGRADES`] upgrades (`SIGHUP`, so that no control connection is open
//! at the stop): no request fails, no client connects again, and each old
//! generation drains with every connection moved (none finished with
//! `Connection: close`, closed idle or forced).
//! Connections the test drives itself show it request by request: an idle
//! one is answered by each generation in turn, and one holding half a
//! request head keeps those bytes through every move.
//!
//! Needs `--all-features`; `cargo test -p baton-tokio --all-features`
//! builds the examples first (a `--test hyper_moves` filter does not:
//! `cargo build -p baton-tokio --all-features --examples`).

use std::process::Command;

use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig};
use testkit::steps::{assert_exited_cleanly, assert_no_failures, done_pid};
use testkit::{example_binary, Conn, Server, LINE_TIMEOUT, REQUEST_TIMEOUT};

/// Upgrades per example.
const UPGRADES: u64 = 5;
/// Keep-alive load threads.
const LOAD_CONNECTIONS: usize = 4;

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: baton-test\r\n\r\n";
const POST: &[u8] = b"POST / HTTP/1.1\r\nHost: baton-test\r\nContent-Length: 4\r\n\r\nbody";
/// [`GET`] in two parts: one sent before the upgrades, one after.
const HALF_GET: (&[u8], &[u8]) = (b"GET / HTTP/1.1\r\nHost: bat", b"on-test\r\n\r\n");

#[test]
fn hyper_connections_move_through_upgrades() {
    connections_move_through_upgrades("hyper");
}

#[test]
fn axum_connections_move_through_upgrades() {
    connections_move_through_upgrades("axum");
}

/// A request with a body keeps its connection here until a request
/// without one (hyper does not say whether it read the body to its end):
/// the connection does not move while idle, is not closed either (within
/// the idle grace, 2 s), and moves right after its next answer.
#[test]
fn a_connection_moves_after_a_request_without_a_body() {
    let mut server = start("hyper");
    let mut conn = connect(&server);
    expect_answer(&server, &mut conn, POST, 0);
    let (old, new) = upgrade(&mut server);
    server.wait_for_pid(old, "draining 1 connections", LINE_TIMEOUT);
    expect_answer(&server, &mut conn, GET, 0);
    let moved = format!("moved 1 connections to new process {new}");
    server.wait_for_pid(old, &moved, LINE_TIMEOUT);
    expect_answer(&server, &mut conn, GET, 1);
}

fn connections_move_through_upgrades(example: &str) {
    let mut server = start(example);
    let mut probe = connect(&server);
    expect_answer(&server, &mut probe, GET, 0);
    let mut half = connect(&server);
    send(&server, &mut half, HALF_GET.0);
    let load = match Load::start(LoadConfig {
        keep_alive_connections: LOAD_CONNECTIONS,
        ..LoadConfig::new(server.addr())
    }) {
        Ok(load) => load,
        Err(e) => server.fail(format_args!("cannot start the load: {e}")),
    };
    pace(&server, &load, &mut probe, 0);

    let mut old_generations = Vec::new();
    for round in 1..=UPGRADES {
        let (old, new) = upgrade(&mut server);
        wait_all_moved(&mut server, old, new);
        // Moved while idle: the next request is the new generation's.
        expect_answer(&server, &mut probe, GET, round);
        pace(&server, &load, &mut probe, round);
        old_generations.push(old);
    }

    // The half request moved with every generation: the last one answers it.
    expect_answer(&server, &mut half, HALF_GET.1, UPGRADES);
    let report = load.stop();
    assert_no_failures(&server, &report, "through the upgrades");
    server.check(
        report.connects == LOAD_CONNECTIONS as u64 && report.reconnects == 0,
        format_args!(
            "{} connects, {} reconnects for {LOAD_CONNECTIONS} keep-alive connections",
            report.connects, report.reconnects
        ),
    );
    for old in old_generations {
        assert_exited_cleanly(&mut server, old);
        let drained = server.find(old, |m| m.starts_with("drained: "));
        let counts = drained.as_ref().and_then(|l| drain_counts(l.message()));
        server.check(
            counts.is_some_and(|(moved, others)| moved >= 2 && others == 0),
            format_args!("generation {old} did not move every connection: {drained:?}"),
        );
    }
    let generations = UPGRADES as usize + 1;
    server.check(
        report.generations_per_connection == vec![generations; LOAD_CONNECTIONS],
        format_args!(
            "generations answering each load connection: {:?}, expected all {generations}",
            report.generations_per_connection
        ),
    );
}

/// Start the example, listening on a port of its own.
#[track_caller]
fn start(example: &str) -> Server {
    let mut command = Command::new(example_binary(example));
    command.args(["--listen", "127.0.0.1:0"]);
    Server::start_command(command)
}

#[track_caller]
fn connect(server: &Server) -> Conn {
    match Conn::connect(server.addr()) {
        Ok(conn) => conn,
        Err(e) => server.fail(format_args!("connect: {e}")),
    }
}

/// `SIGHUP` (no control connection stays open at the stop, unlike
/// `batonctl`'s); returns the old and the new pid once it is done.
#[track_caller]
fn upgrade(server: &mut Server) -> (u32, u32) {
    let old = server.pid();
    server.signal(old, Signal::SIGHUP);
    let done = server.wait_for_pid(old, "upgrade done: ", LINE_TIMEOUT);
    (old, done_pid(server, &done.text))
}

#[track_caller]
fn send(server: &Server, conn: &mut Conn, bytes: &[u8]) {
    if let Err(e) = conn.send(bytes) {
        server.fail(format_args!("send: {e}"));
    }
}

/// Send `bytes` on `conn`: a keep-alive response of `generation` answers.
#[track_caller]
fn expect_answer(server: &Server, conn: &mut Conn, bytes: &[u8], generation: u64) {
    send(server, conn, bytes);
    match conn.read_response(REQUEST_TIMEOUT) {
        Ok(response)
            if response.status == 200
                && response.generation() == Some(generation)
                && !response.close() => {}
        Ok(response) => server.fail(format_args!(
            "expected a keep-alive answer of generation {generation}: {} {:?}",
            response.status, response.headers
        )),
        Err(e) => server.fail(format_args!(
            "expected an answer of generation {generation}: {e}"
        )),
    }
}

/// Until `generation` has answered every load connection (or the load
/// failed), each round one request of our own on `probe`, which
/// `generation` answers. Bounded.
#[track_caller]
fn pace(server: &Server, load: &Load, probe: &mut Conn, generation: u64) {
    for _ in 0..100_000 {
        if load.min_keep_alive_generation() >= Some(generation) || load.failed() > 0 {
            return;
        }
        expect_answer(server, probe, GET, generation);
    }
    server.fail(format_args!(
        "generation {generation} never answered every load connection: the least recent answer came from {:?}",
        load.min_keep_alive_generation()
    ));
}

/// Wait until generation `old` has moved to `new` every connection it had
/// open at its stop (`draining N connections`, then `moved K connections to
/// new process NEW` lines that add up to N).
#[track_caller]
fn wait_all_moved(server: &mut Server, old: u32, new: u32) {
    let draining = server.wait_for_pid(old, "draining ", LINE_TIMEOUT);
    let open: u64 = match draining
        .message()
        .strip_prefix("draining ")
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    {
        Some(open) => open,
        None => server.fail(format_args!("unexpected line: {}", draining.text)),
    };
    let suffix = format!(" connections to new process {new}");
    let mut moved = 0;
    while moved < open {
        let line = server.wait_until(
            &format!("generation {old} moving its {open} connections ({moved} so far)"),
            |l| {
                l.pid() == Some(old)
                    && l.message().starts_with("moved ")
                    && l.message().ends_with(&suffix)
            },
            LINE_TIMEOUT,
        );
        let count = line
            .message()
            .strip_prefix("moved ")
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok());
        moved +=
            count.unwrap_or_else(|| server.fail(format_args!("unexpected line: {}", line.text)));
    }
}

/// `(moved, finished + closed idle + forced)` of a `drained: N moved / F
/// finished / I closed idle / X forced` message (no `moved` part: 0).
fn drain_counts(message: &str) -> Option<(u64, u64)> {
    let mut moved = 0;
    let mut others = 0;
    for part in message.strip_prefix("drained: ")?.split(" / ") {
        let (count, what) = part.split_once(' ')?;
        let count: u64 = count.parse().ok()?;
        match what {
            "moved" => moved = count,
            _ => others += count,
        }
    }
    Some((moved, others))
}

#[test]
fn drain_counts_read_the_drained_line() {
    let counts = drain_counts;
    assert_eq!(
        counts("drained: 7 moved / 0 finished / 0 closed idle / 0 forced"),
        Some((7, 0))
    );
    assert_eq!(
        counts("drained: 1 finished / 2 closed idle / 0 forced"),
        Some((0, 3))
    );
    assert_eq!(counts("draining 3 connections"), None);
}
