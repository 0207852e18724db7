//! Unix-socket listeners through upgrades, once per compiled backend.
//!
//! The demo listens on `127.0.0.1:0` (the harness's control address) and on
//! `unix:PATH`, where a stale socket file from an earlier run is waiting. It
//! must replace the stale file at start, then serve load on the Unix socket
//! through ten upgrades with zero failed requests. After every upgrade the
//! socket file is still there, with the inode generation 0 bound: the same
//! socket was handed over, never unlinked and re-bound (a re-bind makes a
//! new file). A missing file during the storm would show as refused
//! requests in the load report.

mod common;

use testkit::per_backend;
use testkit::steps::assert_no_failures;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Server, TempDir, BINARY, LINE_TIMEOUT};
use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig};

per_backend! {
    fn unix_socket_storm;
}

const UPGRADES: u64 = 10;

/// The socket file's inode; fails if it is missing or not a socket.
#[track_caller]
fn socket_inode(server: &Server, path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => meta.ino(),
        Ok(meta) => server.fail(format_args!(
            "{} is not a socket: {:?}",
            path.display(),
            meta.file_type()
        )),
        Err(e) => server.fail(format_args!("{} is gone: {e}", path.display())),
    }
}

/// The `listening on unix:...` line of `pid`, written before it reported
/// ready (so before the lines the harness already waited for).
#[track_caller]
fn listening_line(server: &mut Server, pid: u32, listen: &str) -> String {
    let needle = format!("listening on {listen} ");
    match server.find(pid, |m| m.starts_with(&needle)) {
        Some(line) => line.message().to_owned(),
        None => server.fail(format_args!("pid {pid} wrote no line {needle:?}")),
    }
}

fn unix_socket_storm(backend: &str) {
    let dir = TempDir::new("unix");
    let path = dir.path().join("http.sock");
    // A stale socket file: bound, then its listener closed.
    drop(UnixListener::bind(&path).expect("bind the stale socket"));
    let stale = std::fs::symlink_metadata(&path).unwrap().ino();
    // A second link keeps the stale inode allocated, so the new socket file
    // cannot get its number back and "replaced" shows as a new inode.
    std::fs::hard_link(&path, dir.path().join("stale.sock")).expect("link the stale socket");
    assert!(
        UnixStream::connect(&path).is_err(),
        "the stale socket answers"
    );

    let listen = format!("unix:{}", path.display());
    let mut command = Command::new(BINARY);
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--listen",
        &listen,
        "--backend",
        backend,
    ]);
    let mut server = Server::spawn(command);
    server.wait_serving();
    let first = server.pid();
    let line = listening_line(&mut server, first, &listen);
    server.check(
        line.ends_with("(http-1, bound)"),
        format_args!("unexpected line: {line}"),
    );
    let inode = socket_inode(&server, &path);
    server.check(inode != stale, "the stale socket file was not replaced");
    // Again a second link: an unlink and re-bind could not reuse the number.
    std::fs::hard_link(&path, dir.path().join("bound.sock")).expect("link the socket");

    let load = Load::start(LoadConfig {
        keep_alive_connections: 4,
        per_request_connections: 2,
        max_duration: Duration::from_secs(60),
        ..LoadConfig::unix(&path)
    })
    .expect("start the load");
    // The load reaches generation 0 before the first upgrade (bounded: each
    // round is a real request of our own).
    for _ in 0..10_000 {
        if load.ok() >= 20 || load.failed() > 0 {
            break;
        }
        let _ = common::get(server.addr(), "/health");
    }

    for _ in 0..UPGRADES {
        let new = server.upgrade();
        let line = listening_line(&mut server, new, &listen);
        server.check(
            line.ends_with("(http-1, inherited)"),
            format_args!("the Unix socket was not handed over: {line}"),
        );
        let now = socket_inode(&server, &path);
        server.check(
            now == inode,
            format_args!("the socket file changed (inode {inode} -> {now}): re-bound"),
        );
    }
    // Load on the last generation too.
    let seen = load.ok();
    for _ in 0..10_000 {
        if (load.ok() >= seen + 20 && load.max_generation() >= UPGRADES) || load.failed() > 0 {
            break;
        }
        let _ = common::get(server.addr(), "/health");
    }
    let report = load.stop();
    eprintln!(
        "unix socket storm ({backend}): {} ok, {} failed, per generation {:?}",
        report.ok,
        report.failed(),
        report.per_generation
    );
    assert_no_failures(&server, &report, "on the Unix socket");
    server.check(
        report.per_generation.len() as u64 > UPGRADES / 2
            && report.per_generation.contains_key(&UPGRADES),
        format_args!(
            "the Unix-socket load reached generations {:?}",
            report.per_generation
        ),
    );

    let last = server.pid();
    server.signal(last, Signal::SIGTERM);
    server.wait_exit_line(last, LINE_TIMEOUT);
}
