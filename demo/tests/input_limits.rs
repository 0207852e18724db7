//! Bad numbers from the command line, the configuration file and the
//! environment: the real `baton-demo` refuses them at start-up with one clear
//! line and a usage (2) or failure (1) status, and never panics.
//!
//! Before these checks, `--upgrade-timeout 18446744073709551615` (and every
//! other duration) was accepted and the server panicked at its first upgrade
//! or stop (`Instant + Duration` overflow), and `BATON_GENERATION=2⁶⁴-1`
//! overflowed `generation + 1` at the first upgrade. So a run that gets as
//! far as serving is a failure here: the process is killed at once (by its
//! pid) and the test fails with everything it wrote.
//!
//! Each run is bounded: stderr is read by a thread until EOF, the test waits
//! for it with a deadline.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{TempDir, BACKENDS, BINARY};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a refused start may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a refused start wrote and how it ended.
#[derive(Debug)]
struct Refused {
    command: String,
    status: ExitStatus,
    stderr: Vec<String>,
}

impl Refused {
    /// The lines that say something (clap adds a blank line and a hint).
    fn lines(&self) -> Vec<&str> {
        self.stderr
            .iter()
            .map(String::as_str)
            .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
            .collect()
    }

    /// Assert: status 1 or 2, no panic, exactly one line, containing every
    /// one of `needles`.
    #[track_caller]
    fn assert_one_clear_line(&self, needles: &[&str]) {
        let code = self.status.code();
        let lines = self.lines();
        let ok = matches!(code, Some(1 | 2))
            && !self.stderr.iter().any(|l| l.contains("panicked"))
            && lines.len() == 1
            && needles.iter().all(|n| lines[0].contains(n));
        assert!(
            ok,
            "expected exit status 1 or 2 and one line containing {needles:?}\n\
             command: {}\nstatus: {}\nstderr:\n{}",
            self.command,
            self.status,
            self.stderr.join("\n")
        );
    }
}

/// Run `command` (stdin and stdout null, stderr read line by line) and
/// expect it to exit on its own. If it reports `serving` instead, it
/// accepted the input: kill it (it is our child, by pid) and fail.
#[track_caller]
fn run_refused(mut command: Command) -> Refused {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let description = format!("{command:?}");
    let mut child = command.spawn().expect("spawn baton-demo");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let mut lines = Vec::new();
    let mut accepted = false;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                // `baton-demo[PID] gen=G backend=B: serving`
                let serving = line.ends_with(": serving");
                lines.push(line);
                if serving {
                    accepted = true;
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }
    if accepted || timed_out {
        // Ours, still running: SIGKILL by pid, then reap it.
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        panic!(
            "{}: the input was accepted instead of refused at start-up\n\
             command: {description}\nstderr:\n{}",
            if accepted {
                "the server started serving"
            } else {
                "no exit within the deadline"
            },
            lines.join("\n")
        );
    }
    // Stderr is closed: the process has exited (or is exiting).
    let status = child.wait().expect("wait for baton-demo");
    Refused {
        command: description,
        status,
        stderr: lines,
    }
}

/// `baton-demo --listen 127.0.0.1:0 --backend B ARGS`.
fn demo(args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(["--listen", "127.0.0.1:0", "--backend", BACKENDS[0]])
        .args(args);
    command
}

/// Every duration flag of the server.
const SERVER_FLAGS: &[&str] = &[
    "--upgrade-timeout",
    "--drain-timeout",
    "--successor-watch",
    "--idle-grace",
    "--header-timeout",
    "--idle-timeout",
    "--write-timeout",
];

/// Values no timeout may have: the first two overflow `Instant + Duration`,
/// the third has a unit the parser does not know (it must stay an error).
const HUGE: &[(&str, &str)] = &[
    ("18446744073709551615", "is too long: at most 86400s"),
    ("99999999999m", "is too long: at most 86400s"),
    ("99999999999h", "unknown unit \"h\""),
];

#[test]
fn every_duration_flag_refuses_a_huge_value() {
    for flag in SERVER_FLAGS {
        for (value, why) in HUGE {
            let refused = run_refused(demo(&[flag, value]));
            assert_eq!(refused.status.code(), Some(2), "{refused:?}");
            refused.assert_one_clear_line(&[flag, value, why]);
        }
    }
}

#[test]
fn client_timeouts_refuse_a_huge_value() {
    for subcommand in ["upgrade", "status"] {
        for (value, why) in HUGE {
            let mut command = Command::new(BINARY);
            command.args([
                subcommand,
                "--control",
                "/nonexistent/baton.sock",
                "--timeout",
                value,
            ]);
            let refused = run_refused(command);
            assert_eq!(refused.status.code(), Some(2), "{refused:?}");
            refused.assert_one_clear_line(&["--timeout", value, why]);
        }
    }
}

#[test]
fn every_duration_key_of_the_config_file_refuses_a_huge_value() {
    let dir = TempDir::new("input-limits");
    let path = dir.path().join("baton.toml");
    for flag in SERVER_FLAGS {
        let key = flag.trim_start_matches("--").replace('-', "_");
        for (value, why) in HUGE {
            std::fs::write(
                &path,
                format!(
                    "backend = \"{}\"\n{key} = \"{value}\"\n[listeners]\nhttp = \"127.0.0.1:0\"\n",
                    BACKENDS[0]
                ),
            )
            .expect("write the config file");
            let mut command = Command::new(BINARY);
            command.arg("--config").arg(&path);
            let refused = run_refused(command);
            assert_eq!(refused.status.code(), Some(1), "{refused:?}");
            refused.assert_one_clear_line(&[&format!("{key}: "), value, why]);
        }
    }
}

/// `BATON_GENERATION` is only read when `LISTEN_PID` names the process, so
/// a shell sets `LISTEN_PID=$$` and execs the demo in its own pid.
#[test]
fn a_generation_without_a_successor_number_is_refused() {
    let mut command = Command::new("/bin/sh");
    command
        .args([
            "-c",
            "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"",
            BINARY,
            "--listen",
            "127.0.0.1:0",
            "--backend",
            BACKENDS[0],
        ])
        .env("BATON_GENERATION", "18446744073709551615");
    let refused = run_refused(command);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    refused.assert_one_clear_line(&["BATON_GENERATION", "18446744073709551615"]);
}
