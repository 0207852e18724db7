//! `batonctl`: the operator's command line for any server built on baton,
//! through its control socket (the protocol is `baton_core::control`).
//!
//! ```text
//! batonctl upgrade --control PATH [--timeout 60s]
//! batonctl status  --control PATH [--timeout 10s]
//! batonctl stop    --control PATH [--timeout 10s]
//! ```
//!
//! Exit status: 0 done; 1 the server answered with an error (for `upgrade`:
//! it failed and the old process serves on); 2 no usable answer (cannot
//! connect, timeout, malformed answer) or a usage error.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use baton_core::control::{Client, ControlError};
use clap::Parser;

/// Control a server built on baton through its control socket.
#[derive(Debug, clap::Parser)]
#[command(name = "batonctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The socket and how long to wait.
#[derive(Debug, clap::Args)]
struct Target {
    /// The server's control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// How long to wait for the answer [default: 60s for upgrade, 10s
    /// otherwise].
    #[arg(long, value_name = "DURATION", value_parser = baton_core::duration::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Upgrade the server and wait for the outcome: prints the new pid,
    /// generation and time to ready and exits 0, or prints why it failed
    /// (the old process serves on) and exits 1. Give it more time than the
    /// server's upgrade timeout.
    Upgrade(Target),
    /// Print the server's pid, generation, backend, uptime, connections and
    /// last upgrade.
    Status(Target),
    /// Stop the server gracefully, as SIGTERM does: prints `stopping` once
    /// it has answered (it may still be draining).
    Stop(Target),
}

/// What a run prints and its exit status.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    stdout: String,
    stderr: String,
    code: u8,
}

fn main() -> ExitCode {
    let outcome = run(Cli::parse().command);
    print!("{}", outcome.stdout);
    eprint!("{}", outcome.stderr);
    ExitCode::from(outcome.code)
}

fn run(command: Command) -> Outcome {
    let client = |target: &Target, default: Duration| {
        Client::new(&target.control).timeout(target.timeout.unwrap_or(default))
    };
    match &command {
        Command::Upgrade(target) => {
            let result = client(target, Duration::from_secs(60)).upgrade();
            report(
                "upgrade",
                result.map(|done| {
                    format!(
                        "upgraded: pid {} generation {} ready after {} ms\n",
                        done.pid, done.generation, done.ready_ms
                    )
                }),
            )
        }
        Command::Status(target) => {
            report("status", client(target, Duration::from_secs(10)).status())
        }
        Command::Stop(target) => report(
            "stop",
            client(target, Duration::from_secs(10))
                .stop()
                .map(|()| "stopping\n".to_owned()),
        ),
    }
}

/// Exit 0 with `done` on stdout; 1 with the server's reason when it
/// answered with an error; 2 with one `batonctl: error: …` line otherwise.
fn report(command: &str, done: Result<String, ControlError>) -> Outcome {
    let (stderr, code) = match done {
        Ok(stdout) => {
            return Outcome {
                stdout,
                stderr: String::new(),
                code: 0,
            }
        }
        Err(ControlError::UpgradeFailed { reason } | ControlError::Refused { reason }) => (
            format!("batonctl: {command} failed: {}", one_line(&reason)),
            1,
        ),
        Err(e) => (format!("batonctl: error: {}", one_line(&e.to_string())), 2),
    };
    Outcome {
        stdout: String::new(),
        stderr: format!("{stderr}\n"),
        code,
    }
}

fn one_line(text: &str) -> String {
    text.trim().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_the_librarys_bounded_ones() {
        let parse =
            |s: &str| Cli::try_parse_from(["batonctl", "status", "--control", "x", "--timeout", s]);
        assert!(parse("250ms").is_ok());
        assert!(parse("2m").is_ok());
        assert!(
            parse("18446744073709551615").is_err(),
            "longer than baton_core::duration::MAX_DURATION"
        );
    }

    #[test]
    fn arguments() {
        let cli = Cli::parse_from(["batonctl", "upgrade", "--control", "/s", "--timeout", "5s"]);
        let Command::Upgrade(target) = cli.command else {
            panic!("{cli:?}");
        };
        assert_eq!(target.control, PathBuf::from("/s"));
        assert_eq!(target.timeout, Some(Duration::from_secs(5)));
        for args in [
            &["batonctl", "status"][..],
            &["batonctl", "stop", "--control", "/s", "--timeout", "1h"],
            &["batonctl", "reboot", "--control", "/s"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn exit_statuses() {
        let failed = report(
            "upgrade",
            Err(ControlError::UpgradeFailed {
                reason: "new process 3 exited".into(),
            }),
        );
        assert_eq!(
            (failed.stderr.as_str(), failed.code),
            ("batonctl: upgrade failed: new process 3 exited\n", 1)
        );
        let refused = report(
            "stop",
            Err(ControlError::Refused {
                reason: "permission denied: uid 5 is not allowed".into(),
            }),
        );
        assert_eq!(refused.code, 1);
        let bad = report(
            "status",
            Err(ControlError::Malformed {
                answer: "x\ny".into(),
            }),
        );
        assert_eq!(
            (bad.stderr.as_str(), bad.code),
            ("batonctl: error: unexpected answer \"x\\ny\"\n", 2)
        );
        let done = report("stop", Ok("stopping\n".into()));
        assert_eq!((done.stdout.as_str(), done.code), ("stopping\n", 0));
    }
}
