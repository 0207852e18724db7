//! `batonctl` against a real server built on baton: `baton-demo --control
//! SOCK` on its default backend (tokio).
//!
//! `baton-demo` is another package's binary: `testkit::workspace_binary`
//! finds it next to `batonctl` in the target directory, or builds it (its
//! docs say how). A stale binary is not rebuilt: `cargo test --workspace`,
//! or `cargo build -p baton-demo` before `cargo test -p batonctl`, keeps it
//! current.
//!
//! Every wait is bounded and synchronised on the server's log lines (one
//! stderr shared by all its generations), `batonctl`'s output and process
//! exits; nothing sleeps. A guard kills, by pid, what is still running of
//! the processes a test started (the server and the generations it started)
//! when the test ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BATONCTL: &str = env!("CARGO_BIN_EXE_batonctl");

/// How long a server may take to log a line we wait for.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// The `baton-demo` binary, built if missing (`testkit::workspace_binary`).
fn demo_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| testkit::workspace_binary("baton-demo", "baton-demo"))
}

/// What a `batonctl` run printed.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
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

/// Run `batonctl COMMAND --control PATH ARGS` (it bounds its own wait).
fn batonctl(command: &str, control: &Path, args: &[&str]) -> Ran {
    Command::new(BATONCTL)
        .arg(command)
        .arg("--control")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BATONCTL}: {e}"))
        .into()
}

/// A fresh directory, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("batonctl-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `baton-demo`, its log, and the pids of its generations.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Every generation's pid, first the child's.
    pids: Vec<u32>,
}

impl Server {
    /// Start `baton-demo --listen 127.0.0.1:0 --control SOCK ARGS` and wait
    /// until it serves.
    fn start(control: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(demo_binary())
            .args(["--listen", "127.0.0.1:0", "--control"])
            .arg(control)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start baton-demo");
        let stderr = child.stderr.take().expect("the server's stderr");
        let (tx, lines) = mpsc::channel();
        // Ends at EOF: once every generation, which all share this stderr,
        // has exited.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        let mut server = Server {
            child,
            lines,
            seen: Vec::new(),
            pids: vec![pid],
        };
        server.wait_line(pid, "serving");
        server
    }

    fn pid(&self) -> u32 {
        self.pids[0]
    }

    /// Wait for the line `message` from process `pid`; its whole line.
    fn wait_line(&mut self, pid: u32, message: &str) -> String {
        let prefix = format!("baton-demo[{pid}] ");
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.starts_with(&prefix)
                        && line
                            .split_once(": ")
                            .is_some_and(|(_, m)| m.starts_with(message));
                    self.seen.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line {message:?} from {pid} ({e:?}); the log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Wait until every generation has exited: the log ends.
    fn wait_all_exited(&mut self) {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "the server's processes did not all exit; the log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Server {
    /// Kill what still runs of the processes this test started, by pid.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for &pid in &self.pids[1..] {
            // A generation that already exited may have had its pid reused
            // only if it was reaped; check it is still baton-demo.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "baton-demo" {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// The pid in `upgraded: pid P generation G ready after N ms`.
fn upgraded_pid(stdout: &str) -> Option<u32> {
    stdout
        .strip_prefix("upgraded: pid ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

#[test]
fn status_upgrade_and_stop() {
    let dir = TempDir::new("cycle");
    let control = dir.0.join("control.sock");
    let mut server = Server::start(&control, &[]);
    let first = server.pid();

    let status = batonctl("status", &control, &[]);
    assert!(
        status.code == Some(0)
            && status.stdout.starts_with(&format!("pid: {first}\n"))
            && status.stdout.contains("\ngeneration: 0\n")
            && status.stderr.is_empty(),
        "status: {status:?}"
    );

    let ran = batonctl("upgrade", &control, &["--timeout", "60s"]);
    let new = upgraded_pid(&ran.stdout);
    if let Some(new) = new {
        server.pids.push(new);
    }
    assert!(
        ran.code == Some(0)
            && new.is_some_and(|new| new != first)
            && ran.stdout.contains(" generation 1 ready after ")
            && ran.stdout.ends_with(" ms\n")
            && ran.stderr.is_empty(),
        "upgrade: {ran:?}"
    );
    let new = new.expect("checked");
    server.wait_line(first, "exit");
    let exit = server.child.wait().expect("wait for the first generation");
    assert!(exit.success(), "the first generation ended with {exit}");

    let status = batonctl("status", &control, &[]);
    assert!(
        status.code == Some(0)
            && status
                .stdout
                .starts_with(&format!("pid: {new}\ngeneration: 1\n"))
            && status.stdout.contains("\nlast upgrade: none\n"),
        "status after the upgrade: {status:?}"
    );

    let ran = batonctl("stop", &control, &[]);
    assert!(
        ran.code == Some(0) && ran.stdout == "stopping\n" && ran.stderr.is_empty(),
        "stop: {ran:?}"
    );
    server.wait_line(new, "stopping: ");
    server.wait_line(new, "exit");
    server.wait_all_exited();
}

#[test]
fn failed_upgrade_exits_1_and_the_old_process_serves_on() {
    let dir = TempDir::new("failed");
    let control = dir.0.join("control.sock");
    let script = dir.0.join("broken");
    std::fs::write(&script, "#!/bin/sh\nexit 1\n").expect("write the script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .expect("make the script executable");
    }
    let script = script.to_str().expect("UTF-8 temp path");
    let mut server = Server::start(&control, &["--next-binary", script]);
    let pid = server.pid();

    let ran = batonctl("upgrade", &control, &[]);
    assert!(
        ran.code == Some(1)
            && ran.stdout.is_empty()
            && ran
                .stderr
                .starts_with("batonctl: upgrade failed: new process ")
            && ran
                .stderr
                .ends_with("exited before reporting ready (exit status 1)\n")
            && ran.stderr.lines().count() == 1,
        "upgrade to a binary that exits 1: {ran:?}"
    );
    server.wait_line(pid, "upgrade failed: ");

    let status = batonctl("status", &control, &[]);
    assert!(
        status.code == Some(0)
            && status
                .stdout
                .starts_with(&format!("pid: {pid}\ngeneration: 0\n"))
            && status.stdout.contains("\nlast upgrade: error new process "),
        "status after the failed upgrade: {status:?}"
    );

    let ran = batonctl("stop", &control, &["--timeout", "10s"]);
    assert_eq!(ran.code, Some(0), "stop: {ran:?}");
    server.wait_line(pid, "exit");
    let exit = server.child.wait().expect("wait for the server");
    assert!(exit.success(), "the server ended with {exit}");
}

#[test]
fn no_server_exits_2_with_one_line() {
    let dir = TempDir::new("missing");
    let control = dir.0.join("control.sock");
    for command in ["upgrade", "status", "stop"] {
        let ran = batonctl(command, &control, &[]);
        assert!(
            ran.code == Some(2)
                && ran.stdout.is_empty()
                && ran
                    .stderr
                    .starts_with("batonctl: error: cannot connect to the control socket ")
                && ran.stderr.lines().count() == 1,
            "{command} without a server: {ran:?}"
        );
    }
}
