//! The chat example (`examples/chat.rs`, target `mio-chat`): its
//! connections move, open, through upgrades (see `testkit::chat` for each
//! scenario).
//!
//! `cargo test -p baton-mio` builds the example first; a `--test chat`
//! filter does not (a stale example is reported).

testkit::chat_tests!("mio-chat");
