//! The demo's log: one line per lifecycle event, on stderr.
//!
//! Every line reads `baton-demo[PID] gen=G backend=B: MESSAGE`, so the lines
//! of all generations, which share one stderr, stay apart. Each line is one
//! `write`, below `PIPE_BUF`, so lines of two processes never interleave.
//! The library's own `log` records go through the same format.

use std::io::Write;
use std::sync::OnceLock;

/// Who is logging.
#[derive(Debug, Clone)]
pub struct Events {
    prefix: String,
}

impl Events {
    /// Events of this process, at `generation`, served by `backend`.
    pub fn new(generation: u64, backend: &str) -> Self {
        Events {
            prefix: format!(
                "baton-demo[{}] gen={generation} backend={backend}",
                std::process::id()
            ),
        }
    }

    /// Write one line.
    pub fn emit(&self, message: impl std::fmt::Display) {
        let line = format!("{}: {message}\n", self.prefix);
        // Nothing sensible to do if stderr is gone; the server goes on.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    #[cfg(feature = "mio")]
    /// Log how an upgrade ended, as every backend does, and return the
    /// control socket's answer line for it.
    pub fn upgrade_outcome(
        &self,
        result: &Result<baton_core::Upgraded, baton_core::UpgradeError>,
    ) -> String {
        match result {
            Ok(done) => {
                self.emit(format_args!(
                    "upgrade done: pid {} generation {} ready after {} ms",
                    done.pid,
                    done.generation,
                    done.time_to_ready.as_millis()
                ));
                crate::control::outcome_line(Ok(crate::control::Upgraded {
                    pid: done.pid,
                    generation: done.generation,
                    ready_ms: done.time_to_ready.as_millis(),
                }))
            }
            Err(e) => {
                if matches!(e, baton_core::UpgradeError::Stopping) {
                    self.emit("upgrade abandoned: the server is stopping");
                } else {
                    self.emit(format_args!("upgrade failed: {e}; still serving"));
                }
                crate::control::outcome_line(Err(&e.to_string()))
            }
        }
    }

    /// Route the `log` records of baton's libraries through these events
    /// (info and above). Only the first call installs the logger.
    pub fn install_as_logger(&self) {
        static LOGGER: OnceLock<Events> = OnceLock::new();
        if LOGGER.set(self.clone()).is_ok() {
            if let Some(events) = LOGGER.get() {
                if log::set_logger(events).is_ok() {
                    log::set_max_level(log::LevelFilter::Info);
                }
            }
        }
    }
}

impl log::Log for Events {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.emit(format_args!(
                "{}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}

/// A fatal error before the generation is known: `baton-demo: error: …`.
pub fn fatal(message: impl std::fmt::Display) -> crate::Failed {
    let _ = std::io::stderr().write_all(format!("baton-demo: error: {message}\n").as_bytes());
    crate::Failed
}
