//! The chat example (`examples/chat.rs`, target `smol-chat`): its
//! connections move, open, through upgrades (see `testkit::chat` for each
//! scenario).
//!
//! `cargo test -p baton-smol` builds the example first; a `--test chat`
//! filter does not (a stale example is reported).

testkit::chat_tests!("smol-chat");
