//! Test support for baton's process-level tests (not published).
//!
//! - [`load`]: the load client: many connections, keep-alive and not, every
//!   response checked, failures counted by kind and successes by generation.
//!   The benchmark (`baton-bench`) uses it too.
//! - [`harness`]: the one process harness: [`Server`] runs a binary built on
//!   baton, follows every generation it becomes through its log lines, and
//!   signals and reaps only the processes it started.
//! - [`http`]: a raw HTTP/1.1 client for targeted requests ([`get`],
//!   [`request`], [`Conn`]).
//! - [`proc`]: fd and zombie counts from `/proc`.
//! - [`tempdir`]: temporary directories and deploy-style binary replacement.
//! - [`per_backend!`]: one test module per backend compiled into the calling
//!   crate; [`example_binary`]: an example cargo built for the tests.
//! - [`steps`]: steps tests share (who answers, how a generation ended,
//!   load around an event).
//! - [`batonctl`]: the real `batonctl` binary, found or built, and its runs.
//! - [`examples`]: the suite every crate's examples go through, one line per
//!   example with [`example_tests!`].
//! - [`chat`]: the chat examples' suite (connections that move, open,
//!   through upgrades), one line per backend with [`chat_tests!`].
//!
//! Every wait is bounded and synchronises on an event (a line, a response, a
//! pid), never on a sleep; traffic goes to loopback only.

#![forbid(unsafe_code)]

pub mod batonctl;
mod binaries;
pub mod chat;
pub mod examples;
pub mod harness;
pub mod http;
pub mod load;
pub mod proc;
pub mod steps;
pub mod tempdir;

use std::path::PathBuf;

pub use binaries::workspace_binary;
pub use harness::{Exit, Line, Server, LINE_TIMEOUT};
pub use http::{get, request, Conn, Reply, Response, REQUEST_TIMEOUT};
pub use proc::{fd_count, fd_links, inherited_from_tests, proc_state, zombie_children};
pub use tempdir::{deploy_bytes, deploy_copy, TempDir};

/// One module of tests per backend compiled into the calling crate, each
/// `#[test]` calling the suite's function of the same name with the
/// backend's name, so a failure names its backend (`tokio::restart_storm`).
/// Attributes written before a `fn` (`#[ignore]`, docs) are kept.
///
/// The `#[cfg(feature = "tokio")]` (and `smol`, `mio`) in the expansion are
/// evaluated in the calling crate: its features decide which modules exist.
///
/// ```text
/// testkit::per_backend! {
///     fn restart_storm;
/// }
/// fn restart_storm(backend: &str) { /* … */ }
/// ```
#[macro_export]
macro_rules! per_backend {
    ($($(#[$attr:meta])* fn $test:ident;)*) => {
        #[cfg(feature = "tokio")]
        mod tokio {
            $( $(#[$attr])* #[test] fn $test() { super::$test("tokio"); } )*
        }
        #[cfg(feature = "smol")]
        mod smol {
            $( $(#[$attr])* #[test] fn $test() { super::$test("smol"); } )*
        }
        #[cfg(feature = "mio")]
        mod mio {
            $( $(#[$attr])* #[test] fn $test() { super::$test("mio"); } )*
        }
    };
}

/// The example `name` that cargo built for the running test:
/// `target/<profile>/examples/NAME`, found from this test executable
/// (`target/<profile>/deps/TEST-HASH`). `cargo test` builds a package's
/// examples before its tests run.
///
/// # Panics
///
/// When the file is missing, with the cargo command that builds it.
#[track_caller]
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    // deps/TEST-HASH -> deps -> <profile>
    let profile_dir = exe.parent().and_then(|deps| deps.parent());
    let path = profile_dir.map(|dir| dir.join("examples").join(name));
    match path {
        Some(path) if path.is_file() => path,
        _ => panic!(
            "example {name:?} not found next to {} (expected <target>/<profile>/examples/{name}); \
             build it with `cargo build --example {name}` (add the package's `-p` and `--features` \
             it needs), or run the tests with `cargo test`, which builds examples first",
            exe.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn line(text: &str) -> Line {
        Line {
            at: Instant::now(),
            text: text.to_owned(),
        }
    }

    #[test]
    fn parts_accepts_any_program_name() {
        for name in ["baton-demo", "axum", "smol_server", "hyper.v1", "Ex-2"] {
            let l = line(&format!(
                "{name}[42] gen=3 backend=tokio: upgrade done: pid 43"
            ));
            assert_eq!(
                l.parts(),
                Some((42, 3, "tokio", "upgrade done: pid 43")),
                "{name}"
            );
            assert!(l.is(42, "upgrade done"));
        }
    }

    #[test]
    fn parts_rejects_other_lines() {
        for text in [
            "[42] gen=3 backend=tokio: serving",
            "a b[42] gen=3 backend=tokio: serving",
            "x/y[42] gen=3 backend=tokio: serving",
            "demo[pid] gen=3 backend=tokio: serving",
            "demo[42] gen=x backend=tokio: serving",
            "demo[42] backend=tokio: serving",
            "[stdout] demo[42] gen=3 backend=tokio: serving",
        ] {
            let l = line(text);
            assert_eq!(l.parts(), None, "{text}");
            assert_eq!(l.message(), text);
            assert_eq!(l.pid(), None);
        }
    }

    #[test]
    fn missing_example_names_the_command() {
        let panic =
            std::panic::catch_unwind(|| example_binary("no-such-example")).expect_err("must panic");
        let message = panic
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(
            message.contains("cargo build --example no-such-example"),
            "{message}"
        );
    }
}
