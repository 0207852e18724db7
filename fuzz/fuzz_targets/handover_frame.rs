//! Fuzz target: `baton_core::handover::Frame::decode`, the parser of every
//! message a peer generation sends on the handover channel.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run handover_frame` (in `fuzz/`).
//! Checks, besides "no panic" (and no allocation beyond the input, which
//! the fuzzer's `-rss_limit_mb` would catch): what decodes re-encodes to a
//! frame that decodes the same, and never declares more fds than one
//! message can carry.
#![no_main]

use baton_core::handover::{frame::MAX_FDS_PER_FRAME, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        assert!(frame.fds() <= MAX_FDS_PER_FRAME);
        assert_eq!(Frame::decode(&frame.to_bytes()).as_ref(), Ok(&frame));
    }
});
