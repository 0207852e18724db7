//! What the mio backend promises beyond the conformance suite: a loop with
//! no executor must never spin, idle or out of fds, and its generations
//! hand over to and from the other runtimes under load.
//!
//! - An idle server (with an idle keep-alive connection open) uses almost no
//!   CPU while one request sleeps on it for 2 s.
//! - Out of fds, accepting backs off instead of retrying at once: the same
//!   2 s cost almost no CPU, and once fds are free again it serves new
//!   connections.
//! - A new generation that dies while the old one drains makes the old one
//!   serve again (its successor watch, a pidfd in the mio loop).
//! - tokio → mio → tokio (and through smol when compiled in), switched with
//!   `--backend-file`, under keep-alive and connection-per-request load:
//!   no request fails, and each generation serves with the runtime named.
//!
//! The idle periods are requests to `/sleep/2000` on the server itself: the
//! test waits for a response, never on a clock.
#![cfg(feature = "mio")]

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use common::{
    deploy_bytes, deploy_copy, get, Conn, Server, TempDir, BINARY, LINE_TIMEOUT, REQUEST_TIMEOUT,
};
use nix::sys::signal::Signal;

/// CPU ticks (`utime + stime`, in `CLK_TCK` units, 100 a second here) a
/// process may use while it should be idle for 2 s: a spinning loop uses
/// 200. Serving the one request of the idle period costs well under one.
const IDLE_TICKS: u64 = 5;

/// `utime + stime` of `pid`, from `/proc/PID/stat`.
fn cpu_ticks(server: &Server, pid: u32) -> u64 {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) => server.fail(format_args!("cannot read /proc/{pid}/stat: {e}")),
    };
    // "PID (COMM) STATE ...": COMM may hold spaces; fields count from STATE,
    // which is field 3, so utime (14) and stime (15) are at 11 and 12.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (field(11), field(12)) {
        (Some(utime), Some(stime)) => utime + stime,
        _ => server.fail(format_args!("unexpected /proc/{pid}/stat: {stat}")),
    }
}

/// CPU ticks `pid` used while `conn` waited for `/sleep/2000`.
fn ticks_during_sleep(server: &Server, pid: u32, conn: &mut Conn) -> u64 {
    let before = cpu_ticks(server, pid);
    if let Err(e) = conn.send(b"GET /sleep/2000 HTTP/1.1\r\nHost: t\r\n\r\n") {
        server.fail(format_args!("sending /sleep/2000: {e}"));
    }
    match conn.read_response(REQUEST_TIMEOUT) {
        Ok(response) if response.status == 200 => {}
        Ok(response) => server.fail(format_args!("/sleep/2000: {}", response.text())),
        Err(e) => server.fail(format_args!("/sleep/2000: {e}")),
    }
    cpu_ticks(server, pid).saturating_sub(before)
}

/// A keep-alive connection that has been served once, so it is accepted.
fn served_conn(server: &Server) -> Conn {
    let mut conn = match Conn::connect(server.addr()) {
        Ok(conn) => conn,
        Err(e) => server.fail(format_args!("connect: {e}")),
    };
    let answered = conn
        .send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .and_then(|()| conn.read_response(REQUEST_TIMEOUT));
    match answered {
        Ok(response) if response.status == 200 && !response.close() => conn,
        Ok(response) => server.fail(format_args!("GET /: {}", response.text())),
        Err(e) => server.fail(format_args!("GET /: {e}")),
    }
}

#[test]
fn an_idle_server_does_not_spin() {
    let server = Server::start(BINARY, "mio", &[]);
    let pid = server.pid();
    let mut conn = served_conn(&server);
    // Another connection, idle with its idle timeout armed meanwhile.
    let _idle = served_conn(&server);
    let ticks = ticks_during_sleep(&server, pid, &mut conn);
    eprintln!("mio server used {ticks} CPU ticks in 2 s of idling");
    server.check(
        ticks <= IDLE_TICKS,
        format_args!("{ticks} CPU ticks in 2 idle seconds (at most {IDLE_TICKS} expected)"),
    );
}

#[test]
fn accept_backs_off_when_out_of_fds() {
    // A low fd limit for the server alone, set by the shell it execs from.
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("ulimit -n 32 && exec \"$0\" --listen 127.0.0.1:0 --backend mio")
        .arg(BINARY);
    let mut server = Server::spawn(command);
    server.wait_serving();
    let pid = server.pid();
    let mut conn = served_conn(&server);

    // More connections than fds: the kernel queues them (the backlog is
    // 1024), the server accepts until EMFILE.
    let flood: Vec<TcpStream> = (0..64)
        .map_while(|_| TcpStream::connect(server.addr()).ok())
        .collect();
    let line = server.wait_for("warning: accept: ", LINE_TIMEOUT);
    server.check(
        line.message().contains("Too many open files"),
        format_args!("expected EMFILE: {}", line.text),
    );
    let ticks = ticks_during_sleep(&server, pid, &mut conn);
    eprintln!("mio server used {ticks} CPU ticks in 2 s out of fds");
    server.check(
        ticks <= IDLE_TICKS,
        format_args!("{ticks} CPU ticks in 2 s out of fds (at most {IDLE_TICKS} expected)"),
    );

    // Once the clients go, fds are free again and new connections are served.
    drop(flood);
    drop(conn);
    match get(server.addr(), "/health") {
        Ok(reply) if reply.status == 200 => {}
        Ok(reply) => server.fail(format_args!("GET /health after the flood: {reply:?}")),
        Err(e) => server.fail(format_args!("GET /health after the flood: {e}")),
    }
}

#[test]
fn the_old_generation_serves_again_when_the_new_one_dies_while_it_drains() {
    let dir = TempDir::new("mio-resume");
    let binary = dir.path().join("baton-demo");
    deploy_copy(Path::new(BINARY), &binary);
    let mut server = Server::start(&binary, "mio", &[]);
    let old = server.pid();
    // The next "generation" reports ready, then dies at once.
    deploy_bytes(
        &binary,
        b"#!/bin/sh\neval \"printf 1 >&$BATON_READY_FD\"\nexit 3\n",
    );
    server.signal(old, Signal::SIGHUP);
    server.wait_for_pid(old, "upgrade done: ", LINE_TIMEOUT);
    let line = server.wait_for_pid(old, "resumed: new generation ", LINE_TIMEOUT);
    server.check(
        line.message().contains("(exit status 3)"),
        format_args!("expected the successor's exit status: {}", line.text),
    );
    match get(server.addr(), "/") {
        Ok(reply) if reply.pid == Some(old) && reply.generation == Some(0) => {}
        Ok(reply) => server.fail(format_args!("expected pid {old} to answer: {reply:?}")),
        Err(e) => server.fail(format_args!("GET / after the resume: {e}")),
    }
    server.signal(old, Signal::SIGTERM);
    server.wait_exit_line(old, LINE_TIMEOUT);
    let exit = server.wait_exit(old, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("pid {old} ended with {:?}", exit.status),
    );
}

#[cfg(feature = "tokio")]
mod cross_runtime {
    //! tokio → mio → tokio under load, switched by `--backend-file`.

    use std::path::Path;
    use std::time::Duration;

    use nix::sys::signal::Signal;
    use testkit::load::{Load, LoadConfig};

    use super::common::{get, Server, TempDir, BINARY, LINE_TIMEOUT};
    use testkit::steps::assert_no_failures;

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

    /// Our own requests until the load has `more` successes beyond what it
    /// had: waits on the server, not a clock; bounded in count.
    fn let_load_run(load: &Load, server: &Server, more: u64) {
        let target = load.ok() + more;
        for _ in 0..10_000 {
            if load.ok() >= target || load.failed() > 0 {
                return;
            }
            let _ = get(server.addr(), "/health");
        }
    }

    /// Name the next generation's backend: a new file renamed into place.
    fn choose_backend(file: &Path, backend: &str) {
        let tmp = file.with_extension("new");
        std::fs::write(&tmp, format!("{backend}\n")).expect("write the backend file");
        std::fs::rename(&tmp, file).expect("rename the backend file into place");
    }

    #[test]
    fn tokio_hands_over_to_mio_and_back_under_load() {
        let mut route = vec!["mio"];
        if cfg!(feature = "smol") {
            route.extend(["smol", "mio"]);
        }
        route.push("tokio");

        let dir = TempDir::new("mio-cross");
        let file = dir.path().join("backend");
        choose_backend(&file, "tokio");
        let file_arg = file.to_str().expect("a UTF-8 temp path");
        let mut server = Server::start(BINARY, "tokio", &["--backend-file", file_arg]);
        let first = server.pid();
        let load = Load::start(LoadConfig {
            keep_alive_connections: 8,
            per_request_connections: 4,
            max_duration: Duration::from_secs(120),
            ..LoadConfig::new(server.addr())
        })
        .expect("start the load");
        let_load_run(&load, &server, 200);

        let mut pids = vec![first];
        for backend in &route {
            choose_backend(&file, backend);
            let old = server.pid();
            let new = server.upgrade();
            pids.push(new);
            let serving = backend_of(&mut server, new);
            server.check(
                serving == *backend,
                format_args!("pid {new} serves with {serving:?}, expected {backend}"),
            );
            let reply = server.wait_answered_by(server.generation());
            server.check(
                reply.body.ends_with(&format!(" backend {backend}\n")),
                format_args!("GET / answered {:?}, expected {backend}", reply.body),
            );
            server.wait_exit_line(old, LINE_TIMEOUT);
            let_load_run(&load, &server, 200);
        }
        let report = load.stop();
        assert_no_failures(&server, &report, &format!("across {route:?}"));
        for generation in 0..=route.len() as u64 {
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

        let last = server.pid();
        server.signal(last, Signal::SIGTERM);
        for &pid in &pids {
            server.wait_exit_line(pid, LINE_TIMEOUT);
            let exit = server.wait_exit(pid, LINE_TIMEOUT);
            server.check(
                exit.status.is_some_and(|s| s.success()),
                format_args!("generation pid {pid} ended with {:?}", exit.status),
            );
        }
    }
}
