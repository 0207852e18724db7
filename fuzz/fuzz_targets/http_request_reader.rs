//! Fuzz target: the demo's sans-IO `RequestReader` fed arbitrary bytes in
//! arbitrary splits.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run http_request_reader` (in `fuzz/`).
//! Checks, besides "no panic": the requests and the error a reader yields do
//! not depend on how the bytes were split into reads, and an error sticks.
#![no_main]

use baton_demo::http::RequestReader;
use libfuzzer_sys::fuzz_target;

/// Requests (method, path, keep-alive, body) and the final error, if any.
type Outcome = (Vec<(String, String, bool, Vec<u8>)>, Option<u16>);

/// Feed `chunks` one by one, taking every complete request after each.
fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut reader = RequestReader::new();
    let mut requests = Vec::new();
    for chunk in chunks {
        reader.push(chunk);
        // Bounded: each request consumes at least one byte of the input.
        for _ in 0..=chunk.len() + 1 {
            match reader.next_request() {
                Ok(Some(r)) => requests.push((r.method, r.path, r.keep_alive, r.body)),
                Ok(None) => break,
                Err(status) => {
                    assert!(matches!(status, 400 | 413 | 431 | 501), "status {status}");
                    assert_eq!(reader.next_request(), Err(status), "the error sticks");
                    return (requests, Some(status));
                }
            }
        }
    }
    (requests, None)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the split sizes (1..=256 bytes, cycling).
    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    let whole = run(std::iter::once(bytes));
    let mut sizes = (0usize..).map(|i| 1 + (usize::from(seed) * 7 + i * 13) % 256);
    let mut rest = bytes;
    let split = run(std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        let n = sizes.next().unwrap_or(1).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    }));
    assert_eq!(whole, split, "the outcome depends on the split");
});
