//! Cross-runtime upgrade: the handoff protocol does not care which runtime
//! serves on either side. A demo started with `--backend-file F` (F says
//! `tokio`) is switched to smol by writing `smol` to F and sending SIGHUP,
//! then back to tokio the same way, under keep-alive and
//! connection-per-request load: no request may fail, and each generation
//! must answer with the backend the file named when it started.
//!
//! Needs both backends compiled in (`--features smol`, or `--all-features`).
#![cfg(all(feature = "tokio", feature = "smol"))]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{get, Server, TempDir, BINARY, LINE_TIMEOUT};
use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig};
use testkit::steps::assert_no_failures;

/// The backend `pid` logged its `serving` line with, waiting for the line
/// if it has not come yet (a new generation may log it after its parent
/// logged `upgrade done`).
fn backend_of(server: &mut Server, pid: u32) -> String {
    let line = match server.find(pid, |m| m == "serving") {
        Some(line) => line,
        None => server.wait_until(
            &format!("the `serving` line of pid {pid}"),
            |l| l.pid() == Some(pid) && l.message() == "serving",
            LINE_TIMEOUT,
        ),
    };
    line.parts().map(|p| p.2.to_owned()).unwrap_or_default()
}

/// Send our own requests until the load has `more` successes beyond what it
/// had: each round is a real round trip, so this waits on the server, not a
/// clock. Bounded in count; a failure of the load ends it early.
fn let_load_run(load: &Load, server: &Server, more: u64) {
    let target = load.ok() + more;
    for _ in 0..10_000 {
        if load.ok() >= target || load.failed() > 0 {
            return;
        }
        let _ = get(server.addr(), "/health");
    }
}

/// Write the backend name as an operator would: a new file renamed over the
/// old one, so a generation starting at that moment reads one name or the
/// other, never half of one.
fn choose_backend(file: &Path, backend: &str) {
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, format!("{backend}\n")).expect("write the backend file");
    std::fs::rename(&tmp, file).expect("rename the backend file into place");
}

#[test]
fn tokio_hands_over_to_smol_and_back_under_load() {
    let dir = TempDir::new("cross-runtime");
    let file = dir.path().join("backend");
    choose_backend(&file, "tokio");
    // `--backend smol` on the command line: the file overrides it.
    let file_arg = file.to_str().expect("a UTF-8 temp path");
    let mut server = Server::start(BINARY, "smol", &["--backend-file", file_arg]);
    let first = server.pid();
    let first_backend = backend_of(&mut server, first);
    server.check(
        first_backend == "tokio",
        format_args!("generation 0 serves with {first_backend:?}, the file says tokio"),
    );

    let load = Load::start(LoadConfig {
        keep_alive_connections: 8,
        per_request_connections: 4,
        max_duration: Duration::from_secs(120),
        ..LoadConfig::new(server.addr())
    })
    .expect("start the load");
    let_load_run(&load, &server, 200);

    let mut old_pids = vec![first];
    for backend in ["smol", "tokio"] {
        choose_backend(&file, backend);
        let old = server.pid();
        let new = server.upgrade();
        old_pids.push(new);
        let serving = backend_of(&mut server, new);
        server.check(
            serving == backend,
            format_args!(
                "generation {} (pid {new}) serves with {serving:?}, expected {backend}",
                server.generation()
            ),
        );
        // The response says so too.
        let reply = server.wait_answered_by(server.generation());
        server.check(
            reply.body.ends_with(&format!(" backend {backend}\n")),
            format_args!(
                "GET / answered {:?}, expected backend {backend}",
                reply.body
            ),
        );
        server.wait_exit_line(old, LINE_TIMEOUT);
        let_load_run(&load, &server, 200);
    }
    let report = load.stop();

    assert_no_failures(&server, &report, "across the runtime switches");
    // Generation 0 and 2 are tokio, 1 is smol: the load saw all three.
    for generation in 0..=2 {
        server.check(
            report
                .per_generation
                .get(&generation)
                .is_some_and(|&n| n > 0),
            format_args!(
                "no load response from generation {generation}: {:?}",
                report.per_generation
            ),
        );
    }

    // The last generation stops gracefully; every generation exited cleanly.
    let last = server.pid();
    server.signal(last, Signal::SIGTERM);
    for &pid in &old_pids {
        server.wait_exit_line(pid, LINE_TIMEOUT);
        let exit = server.wait_exit(pid, LINE_TIMEOUT);
        server.check(
            exit.status.is_some_and(|s| s.success()),
            format_args!("generation pid {pid} ended with {:?}", exit.status),
        );
    }
}

#[test]
fn a_backend_file_naming_an_unknown_backend_fails_the_upgrade_only() {
    let dir = TempDir::new("cross-runtime-bad");
    let file = dir.path().join("backend");
    choose_backend(&file, "smol");
    let file_arg = file.to_str().expect("a UTF-8 temp path");
    let mut server = Server::start(BINARY, "tokio", &["--backend-file", file_arg]);
    let pid = server.pid();
    choose_backend(&file, "nope");
    server.signal(pid, Signal::SIGHUP);
    let line = server.wait_for_pid(pid, "upgrade failed: ", LINE_TIMEOUT);
    server.check(
        line.message().contains("\"nope\"") && line.message().contains("available:"),
        format_args!("the failure does not say why: {:?}", line.text),
    );
    // Still serving, with smol; a good name upgrades normally.
    let reply = server.wait_answered_by(0);
    server.check(
        reply.body.ends_with(" backend smol\n"),
        format_args!("GET / answered {:?}", reply.body),
    );
    choose_backend(&file, "tokio");
    let new = server.upgrade();
    let serving = backend_of(&mut server, new);
    server.check(serving == "tokio", format_args!("serves with {serving:?}"));
}
