//! Steps that process-level tests share, on top of [`Server`]: who answers,
//! how a generation ended, load started and finished around an event.
//!
//! They came from the demo's fault tests (`demo/tests/faults.rs`), which
//! keep their own copies for now; new tests use these.

use std::time::Duration;

use crate::harness::{Server, LINE_TIMEOUT};
use crate::http::get;
use crate::load::{Load, LoadConfig, Report};

/// The pid in an `upgrade started: new process PID` line.
#[track_caller]
pub fn child_pid(server: &Server, line: &str) -> u32 {
    match line
        .rsplit_once("new process ")
        .and_then(|(_, pid)| pid.trim().parse().ok())
    {
        Some(pid) => pid,
        None => server.fail(format_args!("no pid in {line:?}")),
    }
}

/// The pid in an `upgrade done: pid PID generation …` line.
#[track_caller]
pub fn done_pid(server: &Server, line: &str) -> u32 {
    match line
        .split_once("upgrade done: pid ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
    {
        Some(pid) => pid,
        None => server.fail(format_args!("no pid in {line:?}")),
    }
}

/// Assert that `pid` answers a `GET /` on a new connection itself, as
/// generation `generation`.
#[track_caller]
pub fn assert_serves(server: &Server, pid: u32, generation: u64) {
    match get(server.addr(), "/") {
        Ok(reply) => server.check(
            reply.status == 200 && reply.pid == Some(pid) && reply.generation == Some(generation),
            format_args!("expected pid {pid} generation {generation} to answer, got {reply:?}"),
        ),
        Err(e) => server.fail(format_args!("GET / failed: {e}")),
    }
}

/// Assert that generation `pid` logged `exit` and exited 0. Its status
/// is unknown (`None`) when it exited while its parent generation still
/// watched it (the parent reaped it): the `exit` line is the evidence then.
#[track_caller]
pub fn assert_exited_cleanly(server: &mut Server, pid: u32) {
    server.wait_exit_line(pid, LINE_TIMEOUT);
    let exit = server.wait_exit(pid, LINE_TIMEOUT);
    server.check(
        exit.status.is_none_or(|s| s.success()),
        format_args!("generation {pid} ended with {:?}", exit.status),
    );
}

/// Start `connections` keep-alive and as many connection-per-request load
/// threads, and let them reach the server (each round is one real request
/// of our own, so the wait is bounded by requests, not by a clock).
#[track_caller]
pub fn start_load(server: &Server, connections: usize) -> Load {
    let load = match Load::start(LoadConfig {
        keep_alive_connections: connections,
        per_request_connections: connections,
        max_duration: Duration::from_secs(90),
        ..LoadConfig::new(server.addr())
    }) {
        Ok(load) => load,
        Err(e) => server.fail(format_args!("cannot start the load: {e}")),
    };
    wait_load(server, &load, 2 * connections as u64);
    load
}

/// Wait until `load` has `more` successful responses beyond now (or a
/// failure); each round is one real request of our own. Bounded.
pub fn wait_load(server: &Server, load: &Load, more: u64) {
    let until = load.ok() + more;
    for _ in 0..10_000 {
        if load.ok() >= until || load.failed() > 0 {
            break;
        }
        let _ = get(server.addr(), "/");
    }
}

/// Let `load` make `n` more successful requests (bounded), then stop it.
pub fn finish_load(server: &Server, load: Load, n: u64) -> Report {
    wait_load(server, &load, n);
    load.stop()
}

/// Fail with the load's failures, if any.
#[track_caller]
pub fn assert_no_failures(server: &Server, report: &Report, during: &str) {
    server.check(
        report.failed() == 0,
        format_args!(
            "{} failed requests {during} ({} ok): {:?}\nsamples:\n{}",
            report.failed(),
            report.ok,
            report.failures,
            report.failure_samples.join("\n")
        ),
    );
}
