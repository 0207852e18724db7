//! Operations, as an operator or a service manager sees them, on the real
//! `baton-demo` binary, once per compiled backend:
//!
//! - started by the real `systemd-socket-activate`, the server serves on the
//!   socket it was given and upgrades three times under load without a
//!   failed request;
//! - with `NOTIFY_SOCKET` set (a datagram socket this test owns), systemd's
//!   messages arrive in order: `READY=1`; `RELOADING=1` + `MONOTONIC_USEC`
//!   then `MAINPID=` + `READY=1` for a good upgrade; `RELOADING=1` then
//!   `READY=1` + `STATUS=` for a failed one; `STOPPING=1` at SIGTERM;
//! - `--pid-file` names the serving process after start and after each
//!   upgrade, is removed at a graceful stop, replaces a stale file and
//!   refuses one naming a live process;
//! - `baton-demo upgrade` prints the outcome and exits 0, or prints why and
//!   exits 1 (child exit status, child error report, timeout, an upgrade
//!   already running); `baton-demo status` describes the server;
//! - the control socket refuses another uid (as root, the client runs as
//!   `nobody`), and an upgrade in PID 1 of a pid namespace is refused.
//!
//! Every wait is on a log line, a datagram, a command's exit or a pid,
//! bounded in time; servers listen on loopback.

mod common;

use testkit::per_backend;
use testkit::steps::assert_no_failures;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{
    deploy_bytes, deploy_copy, get, proc_state, Conn, Server, TempDir, BINARY, LINE_TIMEOUT,
    REQUEST_TIMEOUT,
};
use nix::sys::signal::Signal;
use testkit::load::{Load, LoadConfig};

per_backend! {
    fn socket_activated_upgrades_under_load;
    fn sd_notify_sequence;
    fn pid_file_follows_the_serving_process;
    fn upgrade_command_reports_outcomes;
    fn upgrade_command_timeout;
    fn upgrade_command_already_running;
    fn control_refuses_another_uid;
    fn upgrade_refused_in_pid_1;
}

/// A deployment: a copy of the demo binary in its own temp dir, which a test
/// replaces as a deploy tool would, plus room for sockets and files.
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

    fn binary(&self) -> PathBuf {
        self.dir.path().join("baton-demo")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn control(&self) -> PathBuf {
        self.path("control.sock")
    }

    fn replace_with_script(&self, script: &str) {
        deploy_bytes(&self.binary(), script.as_bytes());
    }

    fn restore(&self) {
        deploy_copy(Path::new(BINARY), &self.binary());
    }

    /// Start the deployed binary with `--control` and `args`, and wait until
    /// it serves.
    fn start(&self, backend: &str, args: &[&str]) -> Server {
        let control = self.control();
        let mut all = vec!["--control", control.to_str().expect("UTF-8 temp path")];
        all.extend_from_slice(args);
        Server::start(self.binary(), backend, &all)
    }
}

/// What a `baton-demo upgrade|status` run printed.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl From<Output> for Ran {
    fn from(output: Output) -> Ran {
        Ran {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Run `baton-demo COMMAND --control PATH` (the client bounds its own wait
/// with `--timeout`).
fn control_command(command: &str, control: &Path) -> Ran {
    let output = Command::new(BINARY)
        .arg(command)
        .arg("--control")
        .arg(control)
        .args(["--timeout", "60s"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BINARY} {command}: {e}"));
    output.into()
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Notify { socket, path }
    }

    /// The next datagram, within [`LINE_TIMEOUT`].
    #[track_caller]
    fn next(&self, server: &Server, expecting: &str) -> String {
        self.socket
            .set_read_timeout(Some(LINE_TIMEOUT))
            .expect("set the notify socket's timeout");
        let mut buf = [0u8; 4096];
        // Bounded: only EINTR repeats.
        for _ in 0..100 {
            match self.socket.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => server.fail(format_args!(
                    "no sd_notify datagram ({expecting}) within {LINE_TIMEOUT:?}: {e}"
                )),
            }
        }
        server.fail("recv on the notify socket interrupted too often")
    }

    /// Receive the next datagram and check it has every `KEY=VALUE` (or
    /// `KEY=` prefix) in `expected`, in any order; returns its fields.
    #[track_caller]
    fn expect(&self, server: &Server, expected: &[&str]) -> Vec<String> {
        let message = self.next(server, &expected.join(" "));
        let fields: Vec<String> = message.lines().map(str::to_owned).collect();
        for want in expected {
            let found = if want.ends_with('=') {
                fields.iter().any(|f| f.starts_with(want))
            } else {
                fields.iter().any(|f| f == want)
            };
            server.check(
                found,
                format_args!(
                    "sd_notify message {message:?} lacks {want:?} (expected {expected:?})"
                ),
            );
        }
        fields
    }

    /// Fail if a datagram is already waiting: every message was expected.
    #[track_caller]
    fn expect_none_pending(&self, server: &Server) {
        self.socket
            .set_nonblocking(true)
            .expect("make the notify socket non-blocking");
        let mut buf = [0u8; 4096];
        let extra = self.socket.recv(&mut buf);
        self.socket
            .set_nonblocking(false)
            .expect("make the notify socket blocking");
        if let Ok(n) = extra {
            server.fail(format_args!(
                "unexpected sd_notify message {:?}",
                String::from_utf8_lossy(&buf[..n])
            ));
        }
    }
}

fn field<'a>(fields: &'a [String], key: &str) -> Option<&'a str> {
    fields.iter().find_map(|f| f.strip_prefix(key))
}

/// Under `systemd-socket-activate -l 127.0.0.1:PORT`, the server adopts the
/// socket it was given (by address: the tool names it `unknown`), then three
/// upgrades under keep-alive and per-request load lose no request.
fn socket_activated_upgrades_under_load(backend: &str) {
    let tool = "systemd-socket-activate";
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .any(|dir| dir.join(tool).is_file());
    assert!(
        found,
        "{tool} is not installed: install the Debian package `systemd` (.ci/run does)"
    );
    // A free port: bound by us, then released for the tool to bind.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut command = Command::new(tool);
    command
        .args(["-l", &addr, BINARY, "--listen", &addr, "--backend", backend])
        // A shell or CI may have set these; they would confuse the tool's child.
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    let mut server = Server::spawn(command);
    server.wait_for(&format!("Listening on {addr} as 3."), LINE_TIMEOUT);
    // The tool execs the server (same pid) at the first connection.
    let mut first = Conn::connect(addr.parse().expect("loopback address")).expect("connect");
    first
        .send(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send the first request");
    server.wait_serving();
    let pid = server.first_pid();
    server.poll();
    let listening = server
        .find(pid, |m| m.starts_with("listening on "))
        .expect("a listening line");
    server.check(
        listening.message() == format!("listening on {addr} (http, inherited)"),
        format_args!("expected the socket from systemd-socket-activate: {listening:?}"),
    );
    match first.read_response(REQUEST_TIMEOUT) {
        Ok(response) => server.check(
            response.status == 200 && response.pid() == Some(pid),
            format_args!("the first request: {response:?}"),
        ),
        Err(e) => server.fail(format_args!("the first request, queued before exec: {e}")),
    }

    let load = Load::start(LoadConfig {
        keep_alive_connections: 8,
        per_request_connections: 8,
        max_duration: Duration::from_secs(60),
        ..LoadConfig::new(server.addr())
    })
    .expect("start the load");
    wait_load(&mut server, &load, 32);
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
        wait_load(&mut server, &load, 32);
        // The old generation drains and exits 0 before the next upgrade:
        // while it watches its successor it would reap one that exits, and
        // this test could not see how that one ended.
        let exit = server.wait_exit(old, LINE_TIMEOUT);
        server.check(
            exit.status.is_some_and(|s| s.success()),
            format_args!("old generation {old} ended with {:?}", exit.status),
        );
    }
    let report = load.stop();
    assert_no_failures(&server, &report, "under load");
    server.check(
        report.per_generation.len() >= 3,
        format_args!("responses per generation: {:?}", report.per_generation),
    );
    // Every old generation exits 0 (before the stop: an old generation
    // that still drains would serve again if its successor stopped).
    let last = server.pid();
    server.signal(last, Signal::SIGTERM);
    let exit = server.wait_exit(last, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("the last generation ended with {:?}", exit.status),
    );
}

/// Wait until the load has `more` successful responses beyond now; each
/// round is one real request of our own. Bounded.
fn wait_load(server: &mut Server, load: &Load, more: u64) {
    let target = load.ok() + more;
    for _ in 0..10_000 {
        if load.ok() >= target || load.failed() > 0 {
            return;
        }
        let _ = get(server.addr(), "/health");
    }
    server.fail(format_args!("the load did not reach {target} responses"));
}

/// sd_notify across start, a good upgrade, a failed upgrade and a stop.
fn sd_notify_sequence(backend: &str) {
    let deploy = Deploy::new("notify");
    let notify = Notify::bind(deploy.dir.path());
    let mut command = Command::new(deploy.binary());
    command
        .args(["--listen", "127.0.0.1:0", "--backend", backend])
        .env("NOTIFY_SOCKET", &notify.path);
    let mut server = Server::spawn(command);
    server.wait_serving();

    notify.expect(&server, &["READY=1", "STATUS="]);

    // A good upgrade.
    let old = server.pid();
    let new = server.upgrade();
    let reloading = notify.expect(&server, &["RELOADING=1", "MONOTONIC_USEC="]);
    let usec = field(&reloading, "MONOTONIC_USEC=").and_then(|v| v.parse::<u64>().ok());
    server.check(
        usec.is_some_and(|v| v > 0),
        format_args!("MONOTONIC_USEC is not a positive number: {reloading:?}"),
    );
    let ready = notify.expect(&server, &[&format!("MAINPID={new}"), "READY=1", "STATUS="]);
    server.check(
        field(&ready, "STATUS=").is_some_and(|s| s.contains("generation 1")),
        format_args!("STATUS after the upgrade: {ready:?}"),
    );
    server.wait_exit(old, LINE_TIMEOUT);

    // A failed upgrade: the deployed binary exits at once.
    deploy.replace_with_script("#!/bin/sh\nexit 0\n");
    server.signal(new, Signal::SIGHUP);
    server.wait_for_pid(new, "upgrade failed: ", LINE_TIMEOUT);
    notify.expect(&server, &["RELOADING=1", "MONOTONIC_USEC="]);
    let failed = notify.expect(&server, &["READY=1", "STATUS="]);
    server.check(
        field(&failed, "STATUS=").is_some_and(|s| s.contains("upgrade failed")),
        format_args!("STATUS after the failed upgrade: {failed:?}"),
    );
    server.check(
        field(&failed, "MAINPID=").is_none(),
        format_args!("a failed upgrade must not move MAINPID: {failed:?}"),
    );

    // A graceful stop.
    server.signal(new, Signal::SIGTERM);
    notify.expect(&server, &["STOPPING=1"]);
    server.wait_exit_line(new, LINE_TIMEOUT);
    let exit = server.wait_exit(new, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("stopped with {:?}", exit.status),
    );
    notify.expect_none_pending(&server);
}

/// Read a PID file, if there is one.
fn read_pid(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `--pid-file`: the serving pid after start and each upgrade, gone after a
/// stop; a stale file is replaced, a live other process's refused.
fn pid_file_follows_the_serving_process(backend: &str) {
    let dir = TempDir::new("pidfile");
    let pid_file = dir.path().join("baton-demo.pid");
    let arg = pid_file.to_str().expect("UTF-8 temp path");

    // A stale file (a process that has exited) is replaced.
    let mut dead = Command::new("true").spawn().expect("run true");
    let dead_pid = dead.id();
    dead.wait().expect("reap true");
    std::fs::write(&pid_file, format!("{dead_pid}\n")).expect("write a stale PID file");

    let mut server = Server::start(BINARY, backend, &["--pid-file", arg]);
    let expect = |server: &Server, pid: u32, when: &str| {
        let content = read_pid(&pid_file);
        server.check(
            content.as_deref().map(str::trim) == Some(pid.to_string().as_str()),
            format_args!("PID file {when}: {content:?}, expected {pid}"),
        );
    };
    expect(&server, server.pid(), "after start (over a stale file)");
    for n in 1..=2 {
        let old = server.pid();
        let pid = server.upgrade();
        expect(&server, pid, &format!("after upgrade {n}"));
        // The old generation leaves the file alone as it exits.
        server.wait_exit(old, LINE_TIMEOUT);
        expect(
            &server,
            pid,
            &format!("after the exit of generation {}", n - 1),
        );
    }
    let last = server.pid();
    server.signal(last, Signal::SIGTERM);
    let exit = server.wait_exit(last, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("stopped with {:?}", exit.status),
    );
    let left = read_pid(&pid_file);
    server.check(
        left.is_none(),
        format_args!("PID file still there after a graceful stop: {left:?}"),
    );

    // A file naming another live server (a baton-demo this test started) is
    // a clear start-up error. (A pid now used by an unrelated program is
    // replaced: `core/src/pidfile.rs` tests that.)
    let other = Server::start(BINARY, backend, &[]);
    let owner = other.pid();
    std::fs::write(&pid_file, format!("{owner}\n")).expect("write a PID file");
    let output = Command::new(BINARY)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--backend",
            backend,
            "--pid-file",
            arg,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the demo");
    let ran = Ran::from(output);
    assert!(
        ran.code == Some(1)
            && ran
                .stderr
                .contains(&format!("names process {owner}, which is running")),
        "a PID file naming a live server must stop the start: {ran:?}"
    );
    assert_eq!(
        read_pid(&pid_file).map(|s| s.trim().to_owned()),
        Some(owner.to_string()),
        "the other server's PID file was touched"
    );
}

/// `baton-demo upgrade`: success, a child that exits, a child that reports
/// an error; `baton-demo status` before and after.
fn upgrade_command_reports_outcomes(backend: &str) {
    let deploy = Deploy::new("upgrade-cmd");
    let backend_file = deploy.path("backend");
    std::fs::write(&backend_file, backend).expect("write the backend file");
    let mut server = deploy.start(
        backend,
        &["--backend-file", backend_file.to_str().expect("UTF-8")],
    );
    let control = deploy.control();
    let mode = std::fs::metadata(&control)
        .expect("the control socket exists")
        .permissions()
        .mode();
    server.check(
        mode & 0o777 == 0o600,
        format_args!("control socket mode {:o}, expected 600", mode & 0o777),
    );

    let status = control_command("status", &control);
    let first = server.pid();
    let expected = format!("pid: {first}\ngeneration: 0\nbackend: {backend}\nuptime: ");
    server.check(
        status.code == Some(0)
            && status.stdout.starts_with(&expected)
            && status.stdout.contains("\nconnections: 0 open, 0 busy\n")
            && status.stdout.ends_with("\nlast upgrade: none\n"),
        format_args!("status of generation 0: {status:?}"),
    );

    // Success: the answer names the process that now serves.
    let ran = control_command("upgrade", &control);
    server.wait_for_pid(first, "upgrade done: ", LINE_TIMEOUT);
    let new = server.pid();
    server.check(
        ran.code == Some(0)
            && ran
                .stdout
                .starts_with(&format!("upgraded: pid {new} generation 1, ready after "))
            && ran.stdout.ends_with(" ms\n"),
        format_args!("upgrade command, success: {ran:?}"),
    );
    server.wait_answered_by(1);
    server.wait_exit(first, LINE_TIMEOUT);

    // The new binary exits before it is ready.
    deploy.replace_with_script("#!/bin/sh\nexit 3\n");
    let ran = control_command("upgrade", &control);
    server.check(
        ran.code == Some(1)
            && ran.stdout.is_empty()
            && ran.stderr.contains("upgrade failed: new process ")
            && ran
                .stderr
                .contains("exited before reporting ready (exit status 3)"),
        format_args!("upgrade command, child exits: {ran:?}"),
    );
    server.wait_for_pid(new, "upgrade failed: ", LINE_TIMEOUT);

    // The new binary starts, and reports why it cannot serve.
    deploy.restore();
    std::fs::write(&backend_file, "nope\n").expect("write the backend file");
    let ran = control_command("upgrade", &control);
    server.check(
        ran.code == Some(1)
            && ran
                .stderr
                .contains("failed to start: backend \"nope\" is not compiled in"),
        format_args!("upgrade command, child reports an error: {ran:?}"),
    );
    server.wait_for_pid(new, "upgrade failed: ", LINE_TIMEOUT);

    let status = control_command("status", &control);
    server.check(
        status.code == Some(0)
            && status
                .stdout
                .starts_with(&format!("pid: {new}\ngeneration: 1\n"))
            && status.stdout.contains("\nlast upgrade: error new process ")
            && status.stdout.contains("is not compiled in"),
        format_args!("status after a failed upgrade: {status:?}"),
    );
    // Still serving, itself.
    match get(server.addr(), "/") {
        Ok(reply) => server.check(
            reply.status == 200 && reply.pid == Some(new),
            format_args!("after the failed upgrades: {reply:?}"),
        ),
        Err(e) => server.fail(format_args!("GET / after the failed upgrades: {e}")),
    }
}

/// `baton-demo upgrade` against a new binary that never reports ready.
fn upgrade_command_timeout(backend: &str) {
    let deploy = Deploy::new("upgrade-timeout");
    let mut server = deploy.start(backend, &["--upgrade-timeout", "1s"]);
    let pid = server.pid();
    deploy.replace_with_script("#!/bin/sh\nexec sleep 60\n");
    let ran = control_command("upgrade", &deploy.control());
    server.check(
        ran.code == Some(1) && ran.stderr.contains("did not report ready within 1s"),
        format_args!("upgrade command, timeout: {ran:?}"),
    );
    server.wait_for_pid(pid, "upgrade failed: ", LINE_TIMEOUT);
    match get(server.addr(), "/") {
        Ok(reply) => server.check(
            reply.status == 200 && reply.pid == Some(pid),
            format_args!("after the timeout: {reply:?}"),
        ),
        Err(e) => server.fail(format_args!("GET / after the timeout: {e}")),
    }
}

/// `baton-demo upgrade` while a SIGHUP upgrade is still waiting.
fn upgrade_command_already_running(backend: &str) {
    let deploy = Deploy::new("upgrade-busy");
    let mut server = deploy.start(backend, &["--upgrade-timeout", "60s"]);
    let pid = server.pid();
    deploy.replace_with_script("#!/bin/sh\nexec sleep 60\n");
    server.signal(pid, Signal::SIGHUP);
    let started = server.wait_for_pid(pid, "upgrade started: new process ", LINE_TIMEOUT);
    let child = started
        .message()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    let ran = control_command("upgrade", &deploy.control());
    server.check(
        ran.code == Some(1)
            && ran.stderr.contains(&format!(
                "upgrade failed: an upgrade is already running (new process {child})"
            )),
        format_args!("upgrade command during an upgrade: {ran:?}"),
    );
    // A stop abandons the pending upgrade (its process is killed).
    server.signal(pid, Signal::SIGTERM);
    server.wait_for_pid(pid, "upgrade abandoned", LINE_TIMEOUT);
    let exit = server.wait_exit(pid, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("stopped with {:?}", exit.status),
    );
}

/// Whether this test process runs as root (from `/proc/self/status`).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false)
    })
}

/// Whether `program` runs (`program ARGS` exits 0).
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A client running as `nobody` is refused, and the refusal is logged.
fn control_refuses_another_uid(backend: &str) {
    if !running_as_root() {
        eprintln!("skipping: running as nobody needs root");
        return;
    }
    let setpriv = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];
    if !runs("setpriv", &[&setpriv[..], &["true"]].concat()) {
        eprintln!("skipping: setpriv cannot switch to nobody here");
        return;
    }
    let deploy = Deploy::new("control-uid");
    let mut server = deploy.start(backend, &[]);
    let control = deploy.control();
    // Let nobody reach the socket, so the server's own check is what refuses.
    for (path, mode) in [(deploy.dir.path(), 0o755), (control.as_path(), 0o666)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .expect("open up the control socket");
    }
    let output = Command::new("setpriv")
        .args(setpriv)
        .arg(BINARY)
        .arg("status")
        .arg("--control")
        .arg(&control)
        .output()
        .expect("run setpriv");
    let ran = Ran::from(output);
    server.check(
        ran.code == Some(1)
            && ran.stdout.is_empty()
            && ran
                .stderr
                .contains("permission denied: uid 65534 is not allowed"),
        format_args!("status as nobody: {ran:?}"),
    );
    let pid = server.pid();
    server.wait_for_pid(
        pid,
        "control: refused connection from uid 65534",
        LINE_TIMEOUT,
    );
    // And our own user is still obeyed.
    let ran = control_command("status", &control);
    server.check(
        ran.code == Some(0) && ran.stdout.starts_with(&format!("pid: {pid}\n")),
        format_args!("status as root after the refusal: {ran:?}"),
    );
}

/// In PID 1 of a new pid namespace, an upgrade is refused with a message
/// that says how to run it.
fn upgrade_refused_in_pid_1(backend: &str) {
    let unshare = ["--pid", "--fork", "--mount-proc", "--kill-child"];
    if !runs("unshare", &[&unshare[..], &["true"]].concat()) {
        eprintln!("skipping: cannot create a pid namespace here (needs root and unshare)");
        return;
    }
    let dir = TempDir::new("pid1");
    let control = dir.path().join("control.sock");
    let mut command = Command::new("unshare");
    command
        .args(unshare)
        .args([BINARY, "--listen", "127.0.0.1:0", "--backend", backend])
        .arg("--control")
        .arg(&control);
    let mut server = Server::spawn(command);
    let serving = server.wait_until(
        "the `serving` line of PID 1",
        |l| l.pid() == Some(1) && l.message() == "serving",
        LINE_TIMEOUT,
    );
    let ran = control_command("upgrade", &control);
    server.check(
        ran.code == Some(1)
            && ran.stderr.contains("this process is PID 1")
            && ran.stderr.contains("--init"),
        format_args!("upgrade in PID 1: {ran:?} (serving since {:?})", serving.at),
    );
    server.wait_until(
        "PID 1's `upgrade failed` line",
        |l| {
            l.pid() == Some(1)
                && l.message()
                    .starts_with("upgrade failed: this process is PID 1")
        },
        LINE_TIMEOUT,
    );
    // Stop it gracefully: SIGTERM to the namespace's init, the child of the
    // unshare process this test started; unshare then exits with its status.
    let unshare_pid = server.first_pid();
    let deadline = Instant::now() + LINE_TIMEOUT;
    let init = loop {
        let children: Vec<u32> = std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|&p| matches!(proc_state(p), Some((_, ppid)) if ppid == unshare_pid))
                    .collect()
            })
            .unwrap_or_default();
        if let [init] = children[..] {
            break init;
        }
        if Instant::now() > deadline {
            server.fail(format_args!("children of unshare: {children:?}"));
        }
        std::thread::yield_now();
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(init).expect("pid fits")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM the namespace's init");
    let exit = server.wait_exit(unshare_pid, LINE_TIMEOUT);
    server.check(
        exit.status.is_some_and(|s| s.success()),
        format_args!("PID 1 stopped with {:?}", exit.status),
    );
}
