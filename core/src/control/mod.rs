//! The control socket: a server's operator interface, and its client.
//!
//! Every server built on baton can listen on a control socket, and
//! `batonctl` (or [`Client`]) talks to it: `batonctl upgrade` is the
//! `ExecReload=` of a systemd unit, blocking until the upgrade has an
//! outcome and failing with its reason. This module is the protocol, sans
//! I/O ([`parse`], [`Session`], the answers: [`answer_text`]), which a
//! server's lifecycle drives over its runtime, and the blocking [`Client`].
//!
//! # The protocol
//!
//! The server listens on a Unix stream socket, created with mode 0600. The
//! socket is a listener like the others, named [`LISTENER_NAME`]
//! (`control`): each generation hands it to the next, so the path never
//! disappears and never changes owner during an upgrade.
//!
//! One connection carries one command:
//!
//! 1. The server checks the peer's credentials ([`check_peer`],
//!    `SO_PEERCRED`): only the server's own user and root are obeyed.
//!    Anyone else gets `error permission denied: uid N is not allowed` and
//!    the server logs `control: refused connection from uid N`.
//! 2. The client sends one command line, ended by `\n`, of at most
//!    [`MAX_COMMAND`] bytes, within [`COMMAND_TIMEOUT`] (an optional `\r`
//!    before the `\n` is ignored).
//! 3. The server writes its answer (one or more lines, each ended by `\n`)
//!    and closes the connection: the answer ends at EOF.
//!
//! Commands ([`Command`]):
//!
//! - `upgrade`: start an upgrade exactly as `SIGHUP` does (same log lines,
//!   same one-at-a-time rule), and answer once it has an outcome, which may
//!   take up to the server's upgrade timeout:
//!   - `ok pid=P generation=G ready_ms=N`: process `P`, generation `G`, now
//!     serves; it reported ready `N` ms after it was started. The answer is
//!     written before the old generation exits.
//!   - `error REASON`: the upgrade failed and the old generation serves on.
//!     `REASON` is one line: the new process's exit status, the error it
//!     reported, the readiness timeout, `an upgrade is already running (new
//!     process P)`, `this process is PID 1: …`, or `the server is stopping`.
//!
//!   [`outcome_line`] writes both forms, [`parse_outcome`] reads them.
//! - `status`: one `key: value` line per field, in this order: `pid`,
//!   `generation`, `backend`, `uptime` (like `12.345s`), `connections`
//!   (`O open, B busy`, all connections, not counting the one asking),
//!   `last upgrade` (`none`, or the answer an `upgrade` command got or
//!   would have got: `ok pid=…` or `error …`). See [`Status::answer`].
//! - `stop`: answered `ok stopping` ([`STOPPING`]); the server writes the
//!   answer, closes the connection, and stops gracefully, exactly as on
//!   `SIGTERM` (an upgrade still pending is abandoned, then the drain).
//!   A server already stopping answers the same.
//!
//! Anything else is answered `error unknown command "…" (commands: …)` (or
//! `error command too long`, `error no command within 5s`).

mod client;
mod protocol;

pub use client::{Client, ControlError};
pub use protocol::{
    answer_text, check_peer, error_line, outcome_line, parse, parse_outcome, refused, timed_out,
    Command, Parsed, Refusal, Session, Status, Upgraded, COMMAND_TIMEOUT, LISTENER_NAME,
    MAX_COMMAND, STOPPING,
};
