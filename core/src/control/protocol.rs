//! The control protocol, sans I/O: commands, their parsing (whole or a
//! connection's bytes as they arrive, [`Session`]), the answers, the peer
//! check and the answers to the lifecycle's requests ([`answer_text`]).

use std::fmt::Write as _;
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// Longest command line accepted, newline included.
pub const MAX_COMMAND: usize = 256;

/// How long a client has to send its command line once connected.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The name of the control socket among the listeners handed to the next
/// generation.
pub const LISTENER_NAME: &str = "control";

/// The answer to `stop`: written before the server closes the connection
/// and stops gracefully, exactly as on `SIGTERM`.
pub const STOPPING: &str = "ok stopping\n";

/// A command a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Command {
    /// Start an upgrade and answer with its outcome.
    Upgrade,
    /// Describe the server.
    Status,
    /// Answer [`STOPPING`], then stop gracefully, as on `SIGTERM`.
    Stop,
}

impl Command {
    /// Every command, in the order the protocol documents them.
    pub const ALL: [Command; 3] = [Command::Upgrade, Command::Status, Command::Stop];

    /// The command as sent on the wire, without its newline.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Upgrade => "upgrade",
            Command::Status => "status",
            Command::Stop => "stop",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    match Command::ALL
        .into_iter()
        .find(|command| command.as_str().as_bytes() == line)
    {
        Some(command) => Parsed::Command(command),
        None => Parsed::Invalid(error_line(&format!(
            "unknown command {:?} (commands: upgrade, status, stop)",
            String::from_utf8_lossy(line)
        ))),
    }
}

/// One control connection's command, read as its bytes arrive: the part of
/// the protocol a server's reader needs, whatever drives its I/O (a future,
/// a mio loop). Feed it what each read returns; it keeps at most
/// [`MAX_COMMAND`] bytes. The driver bounds the wait with
/// [`COMMAND_TIMEOUT`] (answering [`timed_out`]) and closes without an
/// answer at EOF before a complete line.
///
/// ```
/// use baton_core::control::{Command, Parsed, Session};
///
/// let mut session = Session::new();
/// assert_eq!(session.push(b"sta"), Parsed::Incomplete);
/// assert_eq!(session.push(b"tus\n"), Parsed::Command(Command::Status));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Session {
    buf: Vec<u8>,
    done: Option<Parsed>,
}

impl Session {
    /// A connection that has sent nothing yet.
    pub fn new() -> Self {
        Session::default()
    }

    /// Add the bytes just read, and say what they amount to. Once the
    /// answer is not [`Parsed::Incomplete`] it is final: later bytes
    /// (anything after the command line) are ignored and the same answer
    /// is returned.
    pub fn push(&mut self, bytes: &[u8]) -> Parsed {
        if let Some(done) = &self.done {
            return done.clone();
        }
        // The first MAX_COMMAND bytes decide: a newline among them ends the
        // command, none is a line too long.
        let room = MAX_COMMAND.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        let parsed = parse(&self.buf);
        if parsed != Parsed::Incomplete {
            self.done = Some(parsed.clone());
            self.buf = Vec::new();
        }
        parsed
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
///
/// Read the command even from a refused peer before answering with
/// [`Refusal::answer`]: closing with unread bytes resets the connection,
/// and the client would see a reset instead of the reason.
pub fn check_peer(fd: BorrowedFd<'_>) -> Result<(), Refusal> {
    match (crate::peer_is_trusted(fd), crate::peer_uid(fd)) {
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

/// The control protocol's text for the lifecycle's `answer`, from a server
/// whose backend is `backend`: what every driver writes back.
pub fn answer_text(answer: crate::lifecycle::Answer, backend: &'static str) -> String {
    use crate::lifecycle::Answer;
    match answer {
        Answer::Upgraded(done) => {
            let line = outcome_line(Ok(control_upgraded(&done)));
            format!("{line}\n")
        }
        Answer::UpgradeFailed(reason) => format!("{}\n", outcome_line(Err(&reason))),
        Answer::Stopping => STOPPING.to_owned(),
        Answer::Status(status) => {
            let last_upgrade = status.last_upgrade.map(|outcome| match outcome {
                Ok(done) => outcome_line(Ok(control_upgraded(&done))),
                Err(reason) => outcome_line(Err(&reason)),
            });
            Status {
                pid: status.pid,
                generation: status.generation,
                backend,
                uptime: status.uptime,
                // Not counting the connection that asks.
                open: status.open.saturating_sub(1),
                busy: status.busy.saturating_sub(1),
                last_upgrade,
            }
            .answer()
        }
    }
}

fn control_upgraded(done: &crate::Upgraded) -> Upgraded {
    Upgraded {
        pid: done.pid,
        generation: done.generation,
        ready_ms: done.time_to_ready.as_millis(),
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
        for command in Command::ALL {
            let line = format!("{command}\n");
            assert_eq!(parse(line.as_bytes()), Parsed::Command(command));
        }
    }

    #[test]
    fn stop_is_a_command() {
        assert_eq!(parse(b"stop\n"), Parsed::Command(Command::Stop));
        assert_eq!(parse(b"stop\r\n"), Parsed::Command(Command::Stop));
        assert_eq!(parse(b"sto"), Parsed::Incomplete);
        assert!(matches!(parse(b"stop now\n"), Parsed::Invalid(_)));
        assert!(matches!(parse(b"STOP\n"), Parsed::Invalid(_)));
        assert_eq!(Command::Stop.as_str(), "stop");
        assert_eq!(STOPPING, "ok stopping\n");
        let Parsed::Invalid(answer) = parse(b"halt\n") else {
            panic!("halt accepted");
        };
        assert!(
            answer.contains("commands: upgrade, status, stop"),
            "{answer}"
        );
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
    fn session_reads_a_command_in_pieces() {
        let mut session = Session::new();
        assert_eq!(session.push(b""), Parsed::Incomplete);
        assert_eq!(session.push(b"up"), Parsed::Incomplete);
        assert_eq!(session.push(b"gra"), Parsed::Incomplete);
        assert_eq!(session.push(b"de\r"), Parsed::Incomplete);
        assert_eq!(session.push(b"\n"), Parsed::Command(Command::Upgrade));
        // Final: what follows the line changes nothing.
        assert_eq!(session.push(b"status\n"), Parsed::Command(Command::Upgrade));
        let mut session = Session::new();
        assert_eq!(session.push(b"stop\nrest"), Parsed::Command(Command::Stop));
        let mut session = Session::new();
        let Parsed::Invalid(answer) = session.push(b"what\n") else {
            panic!("what accepted");
        };
        assert!(answer.starts_with("error unknown command \"what\""));
        assert_eq!(session.push(b"stop\n"), Parsed::Invalid(answer));
    }

    #[test]
    fn session_bounds_what_it_keeps() {
        let too_long = Parsed::Invalid("error command too long\n".into());
        // One big read, and the same bytes one at a time.
        let mut session = Session::new();
        assert_eq!(session.push(&[b'a'; 10 * MAX_COMMAND]), too_long);
        let mut session = Session::new();
        for _ in 0..MAX_COMMAND - 1 {
            assert_eq!(session.push(b"a"), Parsed::Incomplete);
        }
        assert_eq!(session.buf.len(), MAX_COMMAND - 1);
        assert_eq!(session.push(b"a"), too_long);
        // A newline as the MAX_COMMAND-th byte is fine, one later is too far.
        let mut line = vec![b'a'; MAX_COMMAND - 1];
        line.push(b'\n');
        let mut session = Session::new();
        assert!(matches!(session.push(&line), Parsed::Invalid(a) if a.contains("unknown")));
        line.insert(0, b'a');
        let mut session = Session::new();
        assert_eq!(session.push(&line[..10]), Parsed::Incomplete);
        assert_eq!(session.push(&line[10..]), too_long);
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
        assert!(parse_outcome(STOPPING).unwrap_err().contains("unexpected"));
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
    fn status_answer_does_not_count_the_asking_connection() {
        use crate::lifecycle::{Answer, Status as LifecycleStatus};
        let status = |open, busy, last_upgrade| {
            answer_text(
                Answer::Status(LifecycleStatus {
                    pid: 42,
                    generation: 4,
                    uptime: Duration::from_millis(1500),
                    open,
                    busy,
                    last_upgrade,
                }),
                "smol",
            )
        };
        let answer = status(3, 1, None);
        assert!(answer.contains("connections: 2 open, 0 busy"), "{answer}");
        assert!(answer.contains("backend: smol") && answer.contains("last upgrade: none"));
        let done = crate::Upgraded {
            pid: 1,
            generation: 5,
            time_to_ready: Duration::from_millis(3),
        };
        let answer = status(1, 1, Some(Ok(done)));
        assert!(
            answer.contains("last upgrade: ok pid=1 generation=5 ready_ms=3"),
            "{answer}"
        );
        let answer = status(1, 1, Some(Err("timed\nout".to_owned())));
        assert!(answer.contains("last upgrade: error timed out"), "{answer}");
        assert_eq!(answer_text(Answer::Stopping, "smol"), STOPPING);
        assert_eq!(
            answer_text(Answer::Upgraded(done), "smol"),
            "ok pid=1 generation=5 ready_ms=3\n"
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
