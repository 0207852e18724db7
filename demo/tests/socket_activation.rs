//! systemd socket activation as people write units, with the real
//! `systemd-socket-activate`, once per compiled backend (issue 12, items 1
//! and 2):
//!
//! - `-l 127.0.0.1:PORT` and no `--listen`: the lone passed socket (named
//!   `unknown`) serves the lone listener, though the demo's default address
//!   is 127.0.0.1:8080; nothing binds 8080;
//! - `--fdname=baton-demo.socket` (what a `.socket` unit without
//!   `FileDescriptorName=` passes) with `--listen 127.0.0.1:PORT`: claimed
//!   by address whatever its name, instead of `Address already in use`;
//! - `--fdname=http:admin` with two `-l` and a `--listen` for each: one
//!   claimed by name, the other by address;
//! - two unnamed sockets and one `--listen`: the one nobody asked for is
//!   kept open (a warning says so), across upgrades too;
//! - each then goes through three upgrades (SIGHUP) under keep-alive and
//!   per-request load on every passed address, with no failed request.
//!
//! Every wait is on a log line, a response or a pid, bounded in time;
//! traffic goes to loopback only.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;
use testkit::per_backend;
use testkit::steps::assert_no_failures;

use common::{get, Conn, Server, BINARY, LINE_TIMEOUT, REQUEST_TIMEOUT};
use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig};

per_backend! {
    fn lone_unnamed_socket_serves_the_default_listener;
    fn socket_named_after_the_unit_is_claimed_by_address;
    fn named_sockets_are_claimed_by_name_and_by_address;
    fn an_unclaimed_passed_socket_is_kept_open;
}

const TOOL: &str = "systemd-socket-activate";

/// `-l 127.0.0.1:PORT baton-demo` (no `--listen`): serves on PORT.
fn lone_unnamed_socket_serves_the_default_listener(backend: &str) {
    let addrs = free_addrs(1);
    let mut server = activate(backend, &addrs, None, &[]);
    expect_listening(&mut server, &[("http", addrs[0])]);
    let pid = server.first_pid();
    let taken = server.find(pid, |m| {
        m.contains("listener \"http\"")
            && m.contains("\"unknown\"")
            && m.contains(&addrs[0].to_string())
    });
    server.check(
        taken.is_some(),
        "a line saying which passed socket became listener \"http\"",
    );
    upgrade_three_times_under_load(&mut server, &addrs);
    server.poll();
    let default_bound = server
        .lines()
        .iter()
        .find(|l| l.message().starts_with("listening on 127.0.0.1:8080"))
        .cloned();
    server.check(
        default_bound.is_none(),
        format_args!("the default address was used: {default_bound:?}"),
    );
    stop(&mut server);
}

/// `--fdname=baton-demo.socket` and `--listen 127.0.0.1:PORT`: the socket
/// is claimed by its address, not bound again.
fn socket_named_after_the_unit_is_claimed_by_address(backend: &str) {
    let addrs = free_addrs(1);
    let listen = addrs[0].to_string();
    let mut server = activate(
        backend,
        &addrs,
        Some("baton-demo.socket"),
        &["--listen", &listen],
    );
    expect_listening(&mut server, &[("http", addrs[0])]);
    upgrade_three_times_under_load(&mut server, &addrs);
    stop(&mut server);
}

/// `--fdname=http:admin` with two sockets, and a `--listen` for each (the
/// demo names them `http` and `http-1`): `http` by name, `http-1` by the
/// address of `admin`.
fn named_sockets_are_claimed_by_name_and_by_address(backend: &str) {
    let addrs = free_addrs(2);
    let (first, second) = (addrs[0].to_string(), addrs[1].to_string());
    let mut server = activate(
        backend,
        &addrs,
        Some("http:admin"),
        &["--listen", &first, "--listen", &second],
    );
    expect_listening(&mut server, &[("http", addrs[0]), ("http-1", addrs[1])]);
    upgrade_three_times_under_load(&mut server, &addrs);
    stop(&mut server);
}

/// Two unnamed sockets, one `--listen`: the other socket is kept open with
/// a warning, by every generation, instead of being closed.
fn an_unclaimed_passed_socket_is_kept_open(backend: &str) {
    let addrs = free_addrs(2);
    let listen = addrs[0].to_string();
    let mut server = activate(backend, &addrs, None, &["--listen", &listen]);
    expect_listening(&mut server, &[("http", addrs[0])]);
    let kept = format!("({}) is not used by this generation; keeping it", addrs[1]);
    let pid = server.first_pid();
    let said = server.find(pid, |m| m.contains(&kept)).is_some();
    server.check(said, format_args!("generation 0 says {kept:?}"));
    upgrade_three_times_under_load(&mut server, &addrs[..1]);
    let last = server.pid();
    let said = server.find(last, |m| m.contains(&kept)).is_some();
    server.check(said, format_args!("generation 3 says {kept:?}"));
    server.poll();
    let closed = server
        .lines()
        .iter()
        .find(|l| l.text.contains("closing inherited listener"))
        .cloned();
    server.check(
        closed.is_none(),
        format_args!("a passed socket was closed: {closed:?}"),
    );
    // Still open: the kernel completes the handshake into its queue.
    server.check(
        TcpStream::connect_timeout(&addrs[1], REQUEST_TIMEOUT).is_ok(),
        format_args!("the kept socket {} refuses connections", addrs[1]),
    );
    stop(&mut server);
}

/// `n` distinct free loopback addresses: bound by us at once, then released
/// for the tool to bind.
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("find a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local address"))
        .collect()
}

/// Start `systemd-socket-activate -l ADDR... [--fdname=NAMES] baton-demo
/// --backend BACKEND DEMO_ARGS`, make it exec the server with a first
/// request, and wait until generation 0 serves and has answered it.
fn activate(
    backend: &str,
    addrs: &[SocketAddr],
    fdname: Option<&str>,
    demo_args: &[&str],
) -> Server {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .any(|dir| dir.join(TOOL).is_file());
    assert!(
        found,
        "{TOOL} is not installed: install the Debian package `systemd` (.ci/run does)"
    );
    let mut command = Command::new(TOOL);
    for addr in addrs {
        command.args(["-l", &addr.to_string()]);
    }
    if let Some(names) = fdname {
        command.arg(format!("--fdname={names}"));
    }
    command
        .args([BINARY, "--backend", backend])
        .args(demo_args)
        // A shell or CI may have set these; they would confuse the tool's child.
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    let mut server = Server::spawn(command);
    let last = addrs.len() + 2;
    server.wait_for(
        &format!("Listening on {} as {last}.", addrs[addrs.len() - 1]),
        LINE_TIMEOUT,
    );
    // The tool execs the server (same pid) at the first connection.
    let mut first = Conn::connect(addrs[0]).expect("connect");
    first
        .send(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send the first request");
    server.wait_serving();
    let pid = server.first_pid();
    match first.read_response(REQUEST_TIMEOUT) {
        Ok(response) => server.check(
            response.status == 200 && response.pid() == Some(pid),
            format_args!("the first request: {response:?}"),
        ),
        Err(e) => server.fail(format_args!("the first request, queued before exec: {e}")),
    }
    server
}

/// Generation 0 listens on exactly `expected` (name, address), all inherited.
fn expect_listening(server: &mut Server, expected: &[(&str, SocketAddr)]) {
    let pid = server.first_pid();
    server.poll();
    let listening: Vec<String> = server
        .lines()
        .iter()
        .filter(|l| l.pid() == Some(pid) && l.message().starts_with("listening on "))
        .map(|l| l.message().to_owned())
        .collect();
    let want: Vec<String> = expected
        .iter()
        .map(|(name, addr)| format!("listening on {addr} ({name}, inherited)"))
        .collect();
    server.check(
        listening == want,
        format_args!("listening lines {listening:?}, expected {want:?}"),
    );
}

/// Three upgrades (SIGHUP) under keep-alive and per-request load on each of
/// `addrs`: no failed request, and each old generation exits 0.
fn upgrade_three_times_under_load(server: &mut Server, addrs: &[SocketAddr]) {
    let loads: Vec<Load> = addrs
        .iter()
        .map(|&addr| {
            Load::start(LoadConfig {
                keep_alive_connections: 8,
                per_request_connections: 4,
                max_duration: Duration::from_secs(60),
                ..LoadConfig::new(addr)
            })
            .expect("start the load")
        })
        .collect();
    wait_loads(server, &loads, addrs, 32);
    for expected in 1..=3u64 {
        let old = server.pid();
        server.upgrade();
        server.check(
            server.generation() == expected,
            format_args!(
                "generation {} after upgrade {expected}",
                server.generation()
            ),
        );
        wait_loads(server, &loads, addrs, 32);
        // The old generation drains and exits 0 before the next upgrade.
        let exit = server.wait_exit(old, LINE_TIMEOUT);
        server.check(
            exit.status.is_some_and(|s| s.success()),
            format_args!("old generation {old} ended with {:?}", exit.status),
        );
    }
    for (load, addr) in loads.into_iter().zip(addrs) {
        let report = load.stop();
        assert_no_failures(server, &report, &format!("on {addr}"));
        server.check(
            report.per_generation.len() >= 3,
            format_args!(
                "{addr}: responses per generation: {:?}",
                report.per_generation
            ),
        );
    }
}

/// Wait until every load has `more` successful responses beyond now; each
/// round is one real request of our own per address. Bounded.
fn wait_loads(server: &mut Server, loads: &[Load], addrs: &[SocketAddr], more: u64) {
    let targets: Vec<u64> = loads.iter().map(|l| l.ok() + more).collect();
    for _ in 0..10_000 {
        let reached = loads.iter().zip(&targets).all(|(l, &t)| l.ok() >= t);
        if reached || loads.iter().any(|l| l.failed() > 0) {
            return;
        }
        for &addr in addrs {
            let _ = get(addr, "/health");
        }
    }
    server.fail(format_args!(
        "the loads did not reach {targets:?} responses"
    ));
}

/// SIGTERM to the serving generation; it exits 0.
fn stop(server: &mut Server) {
    let last = server.pid();
    server.signal(last, Signal::SIGTERM);
    let exit = server.wait_exit(last, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("the last generation ended with {:?}", exit.status),
    );
}
