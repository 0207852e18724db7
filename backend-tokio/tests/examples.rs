//! The axum and hyper examples (`examples/axum.rs`, `examples/hyper.rs`), a
//! library user's code, through the suite every example goes through: an
//! upgrade storm through `batonctl`, failed upgrades, resume, refusal,
//! stops and the PID file (see `testkit::examples` for each scenario).
//! Needs `--all-features` (or `--features axum`), which builds them.
//!
//! `cargo test -p baton-tokio --all-features` builds the examples first; a
//! `--test examples` filter does not (a stale example is reported).

testkit::example_tests!(axum, hyper);
