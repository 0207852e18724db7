//! One module per backend, each serving [`crate::http`] with its runtime.
//! tokio and smol share [`server`] and [`conn`]: baton's async driver runs
//! the lifecycle, and only the stream type differs.

#[cfg(any(feature = "tokio", feature = "smol"))]
pub mod conn;
#[cfg(feature = "mio")]
pub mod mio;
#[cfg(any(feature = "tokio", feature = "smol"))]
pub mod server;
#[cfg(feature = "smol")]
pub mod smol;
#[cfg(feature = "tokio")]
pub mod tokio;

use baton_core::Config;

use crate::cli::Options;

/// The library's configuration, from the demo's flags.
pub fn config(options: &Options) -> Config {
    let mut config = Config::default()
        .upgrade_timeout(options.upgrade_timeout)
        .drain_timeout(options.drain_timeout)
        .successor_watch(options.successor_watch)
        .idle_grace(options.idle_grace)
        .max_connections(options.max_connections);
    if let Ok(version @ 1..) = options.state_version() {
        config = config.state_versions(baton_core::handover::Versions::single(version));
    }
    if let Some(path) = &options.next_binary {
        config = config.program(path);
    }
    if let Some(path) = &options.pid_file {
        config = config.pid_file(path);
    }
    if let Some(path) = &options.control {
        config = config.control(path);
    }
    config
}

/// Take the request count the previous generation moved, before ready.
/// Without it (an error, a timeout), this generation counts from 0.
pub fn restore_state(
    receive: impl FnOnce(std::time::Duration) -> Result<Vec<baton_core::handover::Item>, String>,
    options: &Options,
) {
    match receive(options.upgrade_timeout) {
        Ok(items) => crate::stats::restore(&items),
        Err(e) => log::warn!("state: {e}; counting from 0"),
    }
}

/// When a generation fills its `--ballast`: at once when started by hand,
/// after its predecessor's watch window when started by an upgrade
/// ([`crate::ballast::fill_in_background`] says why).
pub fn ballast_delay(generation: u64, options: &Options) -> std::time::Duration {
    if generation == 0 {
        std::time::Duration::ZERO
    } else {
        options.successor_watch
    }
}
