//! The demo's view of `testkit`: everything it exports, plus the demo binary
//! cargo built for these tests and the backends compiled into it.
//!
//! The harness itself (`Server`, the raw HTTP client, `/proc` counts,
//! `TempDir`, `per_backend!`) lives in `testkit/`, shared by every
//! process-level test in the workspace.

// Each test crate that includes this module uses a different subset of it.
#![allow(dead_code, unused_imports)]

pub(crate) use testkit::*;

/// The demo binary cargo built for these tests.
pub(crate) const BINARY: &str = env!("CARGO_BIN_EXE_baton-demo");

/// The backends compiled into the demo, by Cargo feature.
pub(crate) const BACKENDS: &[&str] = &[
    #[cfg(feature = "tokio")]
    "tokio",
    #[cfg(feature = "smol")]
    "smol",
    #[cfg(feature = "mio")]
    "mio",
];
