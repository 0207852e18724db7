//! The real `batonctl` binary, for tests outside its own package.
//!
//! `batonctl` is another package's binary: Cargo neither builds it for a
//! backend's tests nor says where it is (`CARGO_BIN_EXE_batonctl` exists only
//! in batonctl's own tests). [`binary`] looks for it next to the running
//! test (`target/<profile>/batonctl`, where `cargo test --workspace` and
//! `cargo build -p batonctl` put it); if it is missing, it runs
//! `cargo build -p batonctl` into the same target directory, and fails with
//! that advice if another cargo holds the build directory (a running
//! `cargo test` does). A stale binary is not rebuilt: `cargo build -p
//! batonctl` before `cargo test -p baton-tokio` keeps it current.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The `batonctl` binary, built if missing (see the module docs).
///
/// # Panics
///
/// When it is missing and cannot be built, with the command that builds it.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| crate::workspace_binary("batonctl", "batonctl"))
}

/// What a `batonctl` run printed, and how it exited.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The command line, for failure messages.
    pub command: String,
    /// Exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    fn new(command: String, output: Output) -> Ran {
        Ran {
            command,
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// The value of the `KEY: VALUE` line of stdout (`status` output).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.stdout.lines().find_map(|line| {
            line.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(": "))
                .map(str::trim)
        })
    }

    /// The pid in `upgraded: pid PID generation G …`.
    pub fn upgraded_pid(&self) -> Option<u32> {
        self.upgraded().map(|(pid, _)| pid)
    }

    /// `(pid, generation)` from `upgraded: pid PID generation G …`.
    pub fn upgraded(&self) -> Option<(u32, u64)> {
        let rest = self.stdout.strip_prefix("upgraded: pid ")?;
        let mut words = rest.split_whitespace();
        let pid = words.next()?.parse().ok()?;
        let generation = match (words.next(), words.next()) {
            (Some("generation"), Some(g)) => g.parse().ok()?,
            _ => return None,
        };
        Some((pid, generation))
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.command, self.code, self.stdout, self.stderr
        )
    }
}

/// Run `batonctl COMMAND --control CONTROL ARGS` and wait for it (it bounds
/// its own wait: `--timeout`, 60 s for `upgrade` and 10 s otherwise).
///
/// # Panics
///
/// When it cannot be started.
pub fn run(command: &str, control: &Path, args: &[&str]) -> Ran {
    let binary = binary();
    let description = format!(
        "{} {command} --control {} {}",
        binary.display(),
        control.display(),
        args.join(" ")
    );
    let child = {
        let _guard = crate::tempdir::spawn_guard();
        Command::new(binary)
            .arg(command)
            .arg("--control")
            .arg(control)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let output = child
        .and_then(|child| child.wait_with_output())
        .unwrap_or_else(|e| panic!("cannot run {description}: {e}"));
    Ran::new(description, output)
}
