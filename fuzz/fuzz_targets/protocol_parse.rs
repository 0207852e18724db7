//! Fuzz target: `baton_core::protocol::parse` fed arbitrary values for the
//! six protocol variables (any bytes, not only UTF-8) and an arbitrary pid.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run protocol_parse` (in `fuzz/`).
//! Checks, besides "no panic": a successful parse is consistent (the
//! readiness and handover fds never collide with a passed socket or each
//! other, names are one per fd).
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use baton_core::protocol::{parse, Passed};
use libfuzzer_sys::fuzz_target;

const VARS: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "BATON_READY_FD",
    "BATON_GENERATION",
    "BATON_HANDOVER_FD",
];

fuzz_target!(|data: &[u8]| {
    // Layout: 4 bytes of pid, then the values separated by 0xff; a missing
    // value is an unset variable, an empty `\xfe` one is unset too.
    let (pid, rest) = match data.split_first_chunk::<4>() {
        Some((pid, rest)) => (u32::from_le_bytes(*pid), rest),
        None => (0, data),
    };
    let mut values: Vec<Option<Vec<u8>>> = rest
        .split(|&b| b == 0xff)
        .map(|v| if v == [0xfe] { None } else { Some(v.to_vec()) })
        .collect();
    values.resize(VARS.len(), None);
    // Half the inputs use "our" pid for LISTEN_PID, so the rest is reached.
    if pid & 1 == 0 {
        values[0] = Some(pid.to_string().into_bytes());
    }
    let lookup = |name: &str| {
        let index = VARS.iter().position(|v| *v == name)?;
        values[index].clone().map(OsString::from_vec)
    };
    if let Ok(passed) = parse(lookup, pid) {
        if let Some(fd) = passed.ready_fd {
            assert!(fd >= Passed::fd(passed.names.len()));
        }
        if let Some(fd) = passed.handover_fd {
            assert!(fd >= Passed::fd(passed.names.len()));
            assert_ne!(Some(fd), passed.ready_fd);
        }
        if !passed.names.is_empty() {
            assert_eq!(values[0], Some(pid.to_string().into_bytes()));
        }
    }
});
