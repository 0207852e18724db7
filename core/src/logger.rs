//! A one-line-per-event logger on stderr, for servers that have none.
//!
//! baton logs its lifecycle through the `log` crate, so an application with
//! a logger of its own sees the lines there. One without gets them on stderr
//! with [`init`], each line saying which process and generation wrote it,
//! since every generation shares one stderr:
//!
//! ```text
//! my-server[4242] gen=0 backend=tokio: upgrade started: new process 4250
//! my-server[4250] gen=1 backend=tokio: serving
//! ```
//!
//! Each line is one `write` shorter than `PIPE_BUF`, so lines of two
//! generations never interleave. Warnings and errors say so
//! (`warning: …`); debug lines appear with `BATON_LOG=debug`.

use std::io::Write;
use std::sync::OnceLock;

/// The prefix and level of this process's lines.
#[derive(Debug)]
struct StderrLog {
    prefix: String,
    level: log::LevelFilter,
}

/// Log to stderr as `NAME[PID] gen=G backend=BACKEND: MESSAGE`. Only the
/// first call in a process installs the logger; later ones, or a logger
/// installed by someone else, win over it silently.
pub fn init(name: &str, backend: &str) {
    static LOGGER: OnceLock<StderrLog> = OnceLock::new();
    let pid = std::process::id();
    // The generation the environment declares, as `Generation::from_env`
    // will read it; malformed variables are that call's error to report.
    let generation = crate::protocol::parse(|var| std::env::var_os(var), pid)
        .map(|passed| passed.generation)
        .unwrap_or(0);
    let level = match std::env::var("BATON_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    let logger = LOGGER.get_or_init(|| StderrLog {
        prefix: format!("{name}[{pid}] gen={generation} backend={backend}"),
        level,
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            log::Level::Info => "",
            log::Level::Debug | log::Level::Trace => "debug: ",
        };
        let line = format!("{}: {level}{}\n", self.prefix, record.args());
        // Nothing sensible to do if stderr is gone; the server goes on.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
