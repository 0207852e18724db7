//! The control socket's protocol, as the demo's per-backend control servers
//! use it: a thin adapter over [`baton_core::control`], which owns the
//! protocol (documented there) and its client, so any server built on baton
//! speaks it and `batonctl` talks to all of them. `baton-demo upgrade` and
//! `status` are aliases of `batonctl upgrade` and `status`
//! ([`crate::control_client`]).
//!
//! What is left here serves the demo's own servers until the library's
//! lifecycle replaces them: an exhaustive [`Command`] to match on, a shared
//! [`Memory`], [`restrict`], and [`stop`], which carries out `stop` as a
//! `SIGTERM` to this process.

use std::path::Path;
use std::sync::Mutex;

use crate::events::Events;

pub use baton_core::control::{
    check_peer, error_line, outcome_line, parse_outcome, refused, timed_out, Refusal, Status,
    Upgraded, COMMAND_TIMEOUT, LISTENER_NAME, MAX_COMMAND, STOPPING,
};

/// A command a client sent: [`baton_core::control::Command`], those the
/// demo's servers carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start an upgrade and answer with its outcome.
    Upgrade,
    /// Describe the server.
    Status,
    /// Answer [`STOPPING`] and stop gracefully: see [`stop`].
    Stop,
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

/// [`baton_core::control::parse`], for the demo's [`Command`]s.
pub fn parse(buf: &[u8]) -> Parsed {
    use baton_core::control::{self as core, Parsed as P};
    match core::parse(buf) {
        P::Incomplete => Parsed::Incomplete,
        P::Invalid(answer) => Parsed::Invalid(answer),
        P::Command(core::Command::Upgrade) => Parsed::Command(Command::Upgrade),
        P::Command(core::Command::Status) => Parsed::Command(Command::Status),
        P::Command(core::Command::Stop) => Parsed::Command(Command::Stop),
        P::Command(other) => Parsed::Invalid(error_line(&format!(
            "command {other:?} is not served by baton-demo"
        ))),
    }
}

/// Carry out `stop` for a peer that passed [`check_peer`]: send this
/// process `SIGTERM`, so the server stops exactly as on `SIGTERM` (same
/// log lines, an upgrade pending is abandoned, then the drain, which waits
/// for this control connection), and return the answer to write,
/// [`STOPPING`].
pub fn stop(events: &Events) -> String {
    use nix::sys::signal::{kill, Signal};
    events.emit("control: stop requested");
    match kill(nix::unistd::Pid::this(), Signal::SIGTERM) {
        Ok(()) => STOPPING.to_owned(),
        Err(e) => {
            events.emit(format_args!("error: control: cannot stop: {e}"));
            error_line(&format!("cannot stop: {e}"))
        }
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

/// What a server remembers for `status`
/// ([`baton_core::control::StatusBoard`]), shared by its control
/// connections.
#[derive(Debug)]
pub struct Memory(Mutex<baton_core::control::StatusBoard>);

impl Memory {
    /// This process, at `generation`, served by `backend`, starting now.
    pub fn new(generation: u64, backend: &'static str) -> Self {
        Memory(Mutex::new(baton_core::control::StatusBoard::new(
            generation, backend,
        )))
    }

    /// Remember an upgrade's [`outcome_line`].
    pub fn record(&self, outcome: &str) {
        let outcome = parse_outcome(outcome);
        self.board()
            .record_outcome(outcome.as_ref().copied().map_err(String::as_str));
    }

    /// The status, given the tracker's counts of open and busy connections,
    /// which include the control connection asking.
    pub fn status(&self, open: usize, busy: usize) -> Status {
        self.board().status(open, busy)
    }

    fn board(&self) -> std::sync::MutexGuard<'_, baton_core::control::StatusBoard> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn commands_map_to_the_demos() {
        assert_eq!(parse(b"upgrade\n"), Parsed::Command(Command::Upgrade));
        assert_eq!(parse(b"status\r\n"), Parsed::Command(Command::Status));
        assert_eq!(parse(b"stop\n"), Parsed::Command(Command::Stop));
        assert_eq!(parse(b"sto"), Parsed::Incomplete);
        assert!(matches!(parse(b"reboot\n"), Parsed::Invalid(a) if a.starts_with("error unknown")));
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
        memory.record("error new process 3 exited");
        assert_eq!(
            memory.status(1, 1).last_upgrade.as_deref(),
            Some("error new process 3 exited")
        );
    }
}
