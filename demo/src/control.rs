//! The control socket's protocol, sans I/O: parsing a command, formatting
//! the answers. Every backend drives it over its own runtime; the
//! `baton-demo upgrade` and `status` commands are its client
//! ([`crate::control_client`]).
//!
//! # The protocol
//!
//! `baton-demo --control PATH` listens on the Unix stream socket `PATH`
//! (mode 0600). The socket is a listener like the HTTP ones, named
//! `control`: each generation hands it to the next, so the path never
//! disappears and never changes owner during an upgrade.
//!
//! One connection carries one command:
//!
//! 1. The server checks the peer's credentials (`SO_PEERCRED`): only the
//!    server's own user and root are obeyed. Anyone else gets
//!    `error permission denied: uid N is not allowed` and the server logs
//!    `control: refused connection from uid N`.
//! 2. The client sends one command line, ended by `\n`, of at most
//!    [`MAX_COMMAND`] bytes, within [`COMMAND_TIMEOUT`] (an optional `\r`
//!    before the `\n` is ignored).
//! 3. The server writes its answer (one or more lines, each ended by `\n`)
//!    and closes the connection: the answer ends at EOF.
//!
//! Commands:
//!
//! - `upgrade`: start an upgrade exactly as `SIGHUP` does (same log lines,
//!   same one-at-a-time rule), and answer once it has an outcome, which may
//!   take up to the server's `--upgrade-timeout`:
//!   - `ok pid=P generation=G ready_ms=N`: process `P`, generation `G`, now
//!     serves; it reported ready `N` ms after it was started. The answer is
//!     written before the old generation exits.
//!   - `error REASON`: the upgrade failed and the old generation serves on.
//!     `REASON` is one line: the new process's exit status, the error it
//!     reported, the readiness timeout, `an upgrade is already running (new
//!     process P)`, `this process is PID 1: …`, or `the server is stopping`.
//! - `status`: one `key: value` line per field, in this order: `pid`,
//!   `generation`, `backend`, `uptime` (like `12.345s`), `connections`
//!   (`O open, B busy`, HTTP and control connections, not counting the one
//!   asking), `last upgrade` (`none`, or the answer an `upgrade` command got
//!   or would have got: `ok pid=…` or `error …`).
//!
//! Anything else is answered `error unknown command "…"` (or `error command
//! too long`, `error no command within 5s`).

use std::fmt::Write as _;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest command line accepted, newline included.
pub const MAX_COMMAND: usize = 256;

/// How long a client has to send its command line once connected.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The name of the control socket among the listeners handed to the next
/// generation.
pub const LISTENER_NAME: &str = "control";

/// A command a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start an upgrade and answer with its outcome.
    Upgrade,
    /// Describe the server.
    Status,
}

/// What the bytes received so far on a control connection amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// No complete line yet: read more (while under [`MAX_COMMAND`]).
    Incomplete,
    /// A command to carry out.
    Command(Command),
    /// A bad command; answer with this `error …` line and close.
    Invalid(String),
}

/// Parse the bytes received so far (`buf`): a complete line is a command or
/// an error; more than [`MAX_COMMAND`] bytes without a newline is an error;
/// anything shorter is [`Parsed::Incomplete`].
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_COMMAND {
            Parsed::Invalid(error_line("command too long"))
        } else {
            Parsed::Incomplete
        };
    };
    if end >= MAX_COMMAND {
        return Parsed::Invalid(error_line("command too long"));
    }
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line {
        b"upgrade" => Parsed::Command(Command::Upgrade),
        b"status" => Parsed::Command(Command::Status),
        other => Parsed::Invalid(error_line(&format!(
            "unknown command {:?} (commands: upgrade, status)",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// The answer to a command that took too long to arrive.
pub fn timed_out() -> String {
    error_line(&format!("no command within {}s", COMMAND_TIMEOUT.as_secs()))
}

/// The answer to a peer whose uid is not trusted.
pub fn refused(uid: u32) -> String {
    error_line(&format!("permission denied: uid {uid} is not allowed"))
}

/// `error REASON\n`, the reason on one line.
pub fn error_line(reason: &str) -> String {
    format!("error {}\n", one_line(reason))
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// Why a control connection is refused: the log line and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// For the server's log: `control: refused connection from uid N`.
    pub log: String,
    /// For the client: an `error …` line.
    pub answer: String,
}

/// Check the peer of an accepted control connection (`SO_PEERCRED`, which
/// never blocks): only this process's user and root are obeyed.
pub fn check_peer(fd: BorrowedFd<'_>) -> Result<(), Refusal> {
    match (baton_core::peer_is_trusted(fd), baton_core::peer_uid(fd)) {
        (Ok(true), _) => Ok(()),
        (Ok(false), Ok(uid)) => Err(Refusal {
            log: format!("control: refused connection from uid {uid}"),
            answer: refused(uid),
        }),
        (Err(e), _) | (_, Err(e)) => Err(Refusal {
            log: format!("control: refused connection: cannot read its credentials: {e}"),
            answer: error_line("permission denied: cannot read your credentials"),
        }),
    }
}

/// Make a freshly bound control socket reachable by its owner only (mode
/// 0600). Until this returns the mode follows the umask, which is why every
/// connection's peer is checked too.
pub fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot make {} mode 0600: {e}", path.display()),
        )
    })
}

/// A successful upgrade, as the `upgrade` command reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upgraded {
    /// The new serving process.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// Milliseconds from its start to its readiness report.
    pub ready_ms: u128,
}

/// The outcome of an upgrade, formatted as the answer line (without its
/// newline): `ok pid=P generation=G ready_ms=N` or `error REASON`.
pub fn outcome_line(outcome: Result<Upgraded, &str>) -> String {
    match outcome {
        Ok(done) => format!(
            "ok pid={} generation={} ready_ms={}",
            done.pid, done.generation, done.ready_ms
        ),
        Err(reason) => format!("error {}", one_line(reason)),
    }
}

/// Read an `upgrade` answer: the outcome, or the reason it failed (also for
/// an answer that is not one of the two forms).
pub fn parse_outcome(answer: &str) -> Result<Upgraded, String> {
    let line = answer.lines().next().unwrap_or("").trim();
    if let Some(reason) = line.strip_prefix("error ") {
        return Err(reason.to_owned());
    }
    let bad = || format!("unexpected answer {answer:?}");
    let rest = line.strip_prefix("ok ").ok_or_else(bad)?;
    let (mut pid, mut generation, mut ready_ms) = (None, None, None);
    for field in rest.split_whitespace() {
        match field.split_once('=') {
            Some(("pid", v)) => pid = v.parse().ok(),
            Some(("generation", v)) => generation = v.parse().ok(),
            Some(("ready_ms", v)) => ready_ms = v.parse().ok(),
            _ => {}
        }
    }
    match (pid, generation, ready_ms) {
        (Some(pid), Some(generation), Some(ready_ms)) => Ok(Upgraded {
            pid,
            generation,
            ready_ms,
        }),
        _ => Err(bad()),
    }
}

/// What the `status` command reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This process.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// The backend serving.
    pub backend: &'static str,
    /// Time since this process started.
    pub uptime: Duration,
    /// Open connections, not counting the control connection asking.
    pub open: usize,
    /// Busy connections, not counting the control connection asking.
    pub busy: usize,
    /// The last upgrade's [`outcome_line`], if this process tried one.
    pub last_upgrade: Option<String>,
}

impl Status {
    /// The answer to `status`.
    pub fn answer(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "pid: {}", self.pid);
        let _ = writeln!(out, "generation: {}", self.generation);
        let _ = writeln!(out, "backend: {}", self.backend);
        let _ = writeln!(out, "uptime: {:.3}s", self.uptime.as_secs_f64());
        let _ = writeln!(out, "connections: {} open, {} busy", self.open, self.busy);
        let last = self.last_upgrade.as_deref().unwrap_or("none");
        let _ = writeln!(out, "last upgrade: {}", one_line(last));
        out
    }
}

/// What a server remembers for `status`: who it is, when it started, how
/// its last upgrade ended. Shared by its control connections.
#[derive(Debug)]
pub struct Memory {
    pid: u32,
    generation: u64,
    backend: &'static str,
    started: Instant,
    last_upgrade: Mutex<Option<String>>,
}

impl Memory {
    /// This process, at `generation`, served by `backend`, starting now.
    pub fn new(generation: u64, backend: &'static str) -> Self {
        Memory {
            pid: std::process::id(),
            generation,
            backend,
            started: Instant::now(),
            last_upgrade: Mutex::new(None),
        }
    }

    /// Remember an upgrade's [`outcome_line`].
    pub fn record(&self, outcome: &str) {
        *self.last_upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome.to_owned());
    }

    /// The status, given the tracker's counts of open and busy connections,
    /// which include the control connection asking.
    pub fn status(&self, open: usize, busy: usize) -> Status {
        Status {
            pid: self.pid,
            generation: self.generation,
            backend: self.backend,
            uptime: self.started.elapsed(),
            open: open.saturating_sub(1),
            busy: busy.saturating_sub(1),
            last_upgrade: self
                .last_upgrade
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_peer_is_trusted() {
        use std::os::fd::AsFd;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(check_peer(a.as_fd()), Ok(()));
    }

    #[test]
    fn restrict_sets_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("baton-control-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        restrict(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn commands() {
        assert_eq!(parse(b"upgrade\n"), Parsed::Command(Command::Upgrade));
        assert_eq!(parse(b"status\r\n"), Parsed::Command(Command::Status));
        assert_eq!(parse(b"stat"), Parsed::Incomplete);
        assert_eq!(parse(b""), Parsed::Incomplete);
        let Parsed::Invalid(answer) = parse(b"reboot\nmore") else {
            panic!("reboot accepted");
        };
        assert!(answer.starts_with("error unknown command \"reboot\""));
        assert!(answer.ends_with('\n') && answer.matches('\n').count() == 1);
    }

    #[test]
    fn long_lines_are_refused() {
        let long = vec![b'a'; MAX_COMMAND];
        assert_eq!(
            parse(&long),
            Parsed::Invalid("error command too long\n".into())
        );
        assert_eq!(parse(&long[..MAX_COMMAND - 1]), Parsed::Incomplete);
        let mut line = long.clone();
        line.push(b'\n');
        assert_eq!(
            parse(&line),
            Parsed::Invalid("error command too long\n".into())
        );
    }

    #[test]
    fn outcomes_round_trip() {
        let done = Upgraded {
            pid: 42,
            generation: 3,
            ready_ms: 17,
        };
        let line = outcome_line(Ok(done));
        assert_eq!(line, "ok pid=42 generation=3 ready_ms=17");
        assert_eq!(parse_outcome(&format!("{line}\n")), Ok(done));
        let line = outcome_line(Err("new process 7 exited\nbadly"));
        assert_eq!(line, "error new process 7 exited badly");
        assert_eq!(
            parse_outcome(&line),
            Err("new process 7 exited badly".to_owned())
        );
        assert!(parse_outcome("ok pid=1")
            .unwrap_err()
            .contains("unexpected"));
        assert!(parse_outcome("").unwrap_err().contains("unexpected"));
    }

    #[test]
    fn refusals_and_timeouts_are_error_lines() {
        assert_eq!(
            refused(65534),
            "error permission denied: uid 65534 is not allowed\n"
        );
        assert_eq!(timed_out(), "error no command within 5s\n");
    }

    #[test]
    fn memory_does_not_count_the_asking_connection() {
        let memory = Memory::new(4, "smol");
        let status = memory.status(3, 1);
        assert_eq!((status.open, status.busy, status.generation), (2, 0, 4));
        assert_eq!(status.last_upgrade, None);
        memory.record("ok pid=1 generation=5 ready_ms=3");
        assert_eq!(
            memory.status(1, 1).last_upgrade.as_deref(),
            Some("ok pid=1 generation=5 ready_ms=3")
        );
    }

    #[test]
    fn status_answer() {
        let status = Status {
            pid: 10,
            generation: 2,
            backend: "tokio",
            uptime: Duration::from_millis(1500),
            open: 3,
            busy: 1,
            last_upgrade: None,
        };
        assert_eq!(
            status.answer(),
            "pid: 10\ngeneration: 2\nbackend: tokio\nuptime: 1.500s\n\
             connections: 3 open, 1 busy\nlast upgrade: none\n"
        );
        let status = Status {
            last_upgrade: Some("error timed out".into()),
            ..status
        };
        assert!(status.answer().ends_with("last upgrade: error timed out\n"));
    }
}
