//! Configuration reload: a demo started with `--config FILE` re-reads the
//! file at each upgrade. Per compiled backend: two listeners `http` and
//! `extra` under keep-alive and connection-per-request load on `http`; the
//! file is rewritten (keep `http`, drop `extra`, add `third`, switch to the
//! next compiled backend) and SIGHUP upgrades: `http` is inherited, `third`
//! bound, `extra` closed (logged, then refused once the old generation has
//! exited), the new generation serves with the new backend, and no request
//! on `http` fails. Then an invalid file fails the next upgrade with the
//! config error in the old generation's `upgrade failed:` line, and it
//! serves on. Generation 0 with an invalid file exits 1 with the error.
//!
//! Every wait is on a log line, a response or a pid; loopback, port 0.

mod common;

use testkit::per_backend;
use testkit::steps::assert_no_failures;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{get, Server, TempDir, BACKENDS, BINARY, LINE_TIMEOUT, REQUEST_TIMEOUT};
use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig};

per_backend! {
    fn reload_switches_listeners_and_backend;
}

/// The backend the reload switches to: the next compiled one (itself if it
/// is the only one).
fn next_backend(backend: &str) -> &'static str {
    let index = BACKENDS.iter().position(|b| *b == backend).unwrap_or(0);
    BACKENDS[(index + 1) % BACKENDS.len()]
}

/// Write the file as an operator should: a new file renamed over the old
/// one, so a generation starting at that moment reads one or the other.
fn write_config(file: &Path, text: &str) {
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, text).expect("write the config file");
    std::fs::rename(&tmp, file).expect("rename the config file into place");
}

/// The address `pid` logged for listener `name` with `origin`
/// (`listening on ADDR (NAME, ORIGIN)`), waiting for the line if needed.
fn listener_addr(server: &mut Server, pid: u32, name: &str, origin: &str) -> SocketAddr {
    let suffix = format!(" ({name}, {origin})");
    let matches = |m: &str| m.starts_with("listening on ") && m.ends_with(&suffix);
    let line = match server.find(pid, matches) {
        Some(line) => line,
        None => server.wait_until(
            &format!("pid {pid} listening{suffix}"),
            |l| l.pid() == Some(pid) && matches(l.message()),
            LINE_TIMEOUT,
        ),
    };
    let message = line.message();
    let addr = &message["listening on ".len()..message.len() - suffix.len()];
    match addr.parse() {
        Ok(addr) => addr,
        Err(e) => server.fail(format_args!("bad address in {:?}: {e}", line.text)),
    }
}

/// The backend `pid` logged its `serving` line with.
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
/// had: waits on the server, not a clock. Bounded in count.
fn let_load_run(load: &Load, server: &Server, more: u64) {
    let target = load.ok() + more;
    for _ in 0..10_000 {
        if load.ok() >= target || load.failed() > 0 {
            return;
        }
        let _ = get(server.addr(), "/health");
    }
}

fn reload_switches_listeners_and_backend(backend: &str) {
    let next = next_backend(backend);
    let dir = TempDir::new(&format!("config-{backend}"));
    let file = dir.path().join("baton.toml");
    write_config(
        &file,
        &format!(
            "backend = \"{backend}\"\nupgrade_timeout = \"20s\"\ndrain_timeout = \"10s\"\n\
             [listeners]\nhttp = \"127.0.0.1:0\"\nextra = \"127.0.0.1:0\"\n"
        ),
    );
    let mut command = Command::new(BINARY);
    command.arg("--config").arg(&file);
    let mut server = Server::spawn(command);
    server.wait_serving();
    let first = server.pid();
    let http = listener_addr(&mut server, first, "http", "bound");
    server.check(
        http == server.addr(),
        "`http` is not the first listener (file order)",
    );
    let extra = listener_addr(&mut server, first, "extra", "bound");
    let serving = backend_of(&mut server, first);
    server.check(
        serving == backend,
        format_args!("generation 0 serves with {serving:?}, the file says {backend}"),
    );
    match get(extra, "/") {
        Ok(reply) if reply.status == 200 => {}
        other => server.fail(format_args!("GET / on `extra` ({extra}): {other:?}")),
    }

    let load = Load::start(LoadConfig {
        keep_alive_connections: 8,
        per_request_connections: 4,
        max_duration: Duration::from_secs(120),
        ..LoadConfig::new(http)
    })
    .expect("start the load");
    let_load_run(&load, &server, 200);

    // Keep `http`, drop `extra`, add `third`, switch backend.
    write_config(
        &file,
        &format!(
            "backend = \"{next}\"\ndrain_timeout = \"10s\"\n\
             [listeners]\nhttp = \"127.0.0.1:0\"\nthird = \"127.0.0.1:0\"\n"
        ),
    );
    let new = server.upgrade();
    let inherited = listener_addr(&mut server, new, "http", "inherited");
    server.check(
        inherited == http,
        format_args!("`http` inherited at {inherited}, was {http}"),
    );
    let third = listener_addr(&mut server, new, "third", "bound");
    let serving = backend_of(&mut server, new);
    server.check(
        serving == next,
        format_args!("generation 1 serves with {serving:?}, the file says {next}"),
    );
    if server
        .find(new, |m| m.contains("closing inherited listener \"extra\""))
        .is_none()
    {
        server.wait_until(
            "generation 1 closing `extra`",
            |l| l.is(new, "closing inherited listener \"extra\""),
            LINE_TIMEOUT,
        );
    }
    match get(third, "/") {
        Ok(reply) if reply.status == 200 && reply.generation == Some(1) => {}
        other => server.fail(format_args!("GET / on `third` ({third}): {other:?}")),
    }
    let_load_run(&load, &server, 200);
    server.wait_exit_line(first, LINE_TIMEOUT);
    let exit = server.wait_exit(first, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("generation 0 ended with {:?}", exit.status),
    );
    // Nobody holds `extra` any more: the kernel refuses the connection.
    match TcpStream::connect_timeout(&extra, REQUEST_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => server.fail(format_args!(
            "connecting to the removed `extra` ({extra}): {other:?}, expected refused"
        )),
    }

    // An invalid file fails the upgrade with the reason; generation 1 serves on.
    write_config(
        &file,
        "backend = \"tokio\"\ndrain_timeout = \"10h\"\n[listeners]\nhttp = \"127.0.0.1:0\"\n",
    );
    server.signal(new, Signal::SIGHUP);
    let line = server.wait_for_pid(new, "upgrade failed: ", LINE_TIMEOUT);
    server.check(
        line.message().contains("drain_timeout")
            && line.message().contains("unknown unit")
            && line.message().ends_with("still serving"),
        format_args!("the failure does not say why: {:?}", line.text),
    );
    let_load_run(&load, &server, 200);
    let reply = server.wait_answered_by(1);
    server.check(
        reply.pid == Some(new),
        format_args!("answered by {:?}, expected {new}", reply.pid),
    );

    let report = load.stop();
    assert_no_failures(&server, &report, "on `http` across the reload");
    server.check(
        report.per_generation.get(&1).is_some_and(|&n| n > 0),
        format_args!(
            "no load response from generation 1: {:?}",
            report.per_generation
        ),
    );
    server.signal(new, Signal::SIGTERM);
    server.wait_exit_line(new, LINE_TIMEOUT);
}

#[test]
fn invalid_config_at_start_exits_1_with_the_error() {
    let dir = TempDir::new("config-invalid");
    let file = dir.path().join("baton.toml");
    for (text, expected) in [
        ("[listeners\n", "line 1"),
        ("port = 80\n", "unknown field `port`"),
        ("[listeners]\nhttp = \"localhost\"\n", "listener \"http\""),
        ("upgrade_timeout = \"1h\"\n", "upgrade_timeout"),
    ] {
        write_config(&file, text);
        let output = Command::new(BINARY)
            .arg("--config")
            .arg(&file)
            .output()
            .expect("run the demo");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{text:?}: {stderr}");
        assert!(
            stderr.contains("error: config ") && stderr.contains(expected),
            "{text:?}: {stderr}"
        );
    }
    // --config with --listen is a usage error.
    let output = Command::new(BINARY)
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("run the demo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
