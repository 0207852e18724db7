//! The mio example (`examples/mio.rs`), a library user's code, through the
//! suite every example goes through: an upgrade storm through `batonctl`,
//! failed upgrades, resume, refusal, stops and the PID file (see
//! `testkit::examples` for each scenario).
//!
//! `cargo test -p baton-mio` builds the example first; a `--test examples`
//! filter does not (a stale example is reported).

testkit::example_tests!(mio);
