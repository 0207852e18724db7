//! baton-demo: an HTTP/1.1 server that upgrades itself without dropping a
//! request. The load client that proves it and the process harness of its
//! tests live in `baton-testkit` (`testkit/`); the benchmark in
//! `baton-bench` (`bench/`).
//!
//! The HTTP handling is one sans-IO module ([`http`]) that every backend
//! drives, so comparing backends compares runtimes, not HTTP stacks.
//! The control socket (`--control PATH`: `batonctl upgrade|status|stop`,
//! or the aliases `baton-demo upgrade|status`) and every lifecycle log line
//! are the library's.

#![forbid(unsafe_code)]

pub mod backend;
pub mod ballast;
pub mod cli;
pub mod config;
pub mod control_client;
pub mod http;
pub mod stats;

/// The server could not start or serve; the reason is already logged.
#[derive(Debug)]
pub struct Failed;

/// Run the server with the backend `options` selects, until it has upgraded
/// or stopped and drained. Errors are logged before `Err` is returned.
pub fn run(options: &cli::Options) -> Result<(), Failed> {
    let report = |message: String| {
        // Started by an upgrade (say with a bad --config or --backend-file),
        // tell the parent why, so its upgrade fails with the reason and it
        // serves on.
        if let Ok(generation) = baton_core::Generation::from_env(baton_core::Config::default()) {
            let _ = generation.report_error(&message);
        }
        fatal(message)
    };
    // Read the --config file once: backend, listeners and timeouts all come
    // from the same version of it.
    let options = &config::apply(options).map_err(report)?;
    let backend = options.backend().map_err(report)?;
    options.state_version().map_err(report)?;
    // One line per lifecycle event, from baton's libraries and the demo.
    baton_core::logger::init("baton-demo", backend);
    open_files(options.max_connections);
    match backend {
        #[cfg(feature = "tokio")]
        "tokio" => backend::tokio::run(options),
        #[cfg(feature = "smol")]
        "smol" => backend::smol::run(options),
        #[cfg(feature = "mio")]
        "mio" => backend::mio::run(options),
        other => Err(fatal(format_args!("backend {other:?} is not compiled in"))),
    }
}

/// A fatal error before the server runs: `baton-demo: error: …`.
fn fatal(message: impl std::fmt::Display) -> Failed {
    use std::io::Write;
    let line = format!("baton-demo: error: {message}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    Failed
}

/// File descriptors a generation needs besides its connections: listeners,
/// the control socket, the readiness pipe and the fds of an upgrade.
pub const RESERVED_FDS: u64 = 64;

/// Raise the soft open-file limit to the hard one (every connection is an
/// fd; systemd's default soft limit is 1024), log it, and warn when
/// `max_connections` cannot be reached under it.
fn open_files(max_connections: usize) {
    let limit = match baton_core::raise_fd_limit() {
        Ok(limit) => limit,
        Err(e) => {
            log::warn!("open files: cannot raise the soft limit: {e}");
            return;
        }
    };
    if limit.now > limit.before {
        log::info!(
            "open files: soft limit raised from {} to {}",
            limit.before,
            limit.now
        );
    } else {
        log::debug!("open files: soft limit {} (the hard limit)", limit.now);
    }
    let room = limit.now.saturating_sub(RESERVED_FDS);
    if u64::try_from(max_connections).unwrap_or(u64::MAX) > room {
        log::warn!(
            "--max-connections {max_connections} is above what the open-file limit allows: \
             {} files, {RESERVED_FDS} of them kept for listeners and upgrades, leave room for \
             {room} connections; raise the hard limit (ulimit -Hn, LimitNOFILE= in a systemd unit) \
             or lower --max-connections",
            limit.now
        );
    }
}
