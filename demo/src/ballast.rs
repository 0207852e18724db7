//! `--ballast SIZE`: memory allocated and touched at start-up, standing in
//! for an application's cache, so the cost of an upgrade can be measured on
//! a server with a large heap (baton-bench compares 0 with 1 GiB). A spawn
//! that copied the parent's page tables (`fork`) would take longer the
//! larger this is; baton's vfork-style spawn does not.
//!
//! It is filled on a thread of its own once the generation has reported
//! ready, as a cache warms while the server serves: a new generation's own
//! ballast is then not on its way to "ready", and what an upgrade measures
//! is the cost of starting it from a large parent. The line `ballast: SIZE allocated and
//! touched` says when it is all resident.

use std::fmt;

/// The largest ballast accepted: a typo (`1TiB`) must not take the machine.
pub const MAX_BALLAST: u64 = 64 << 30;

/// A size in bytes from `--ballast`: a whole number of bytes, optionally
/// followed by a binary unit (`B`, `KiB`, `MiB`, `GiB`); at most
/// [`MAX_BALLAST`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match units
            .iter()
            .find(|(unit, _)| self.0 >= *unit && self.0 % unit == 0)
        {
            Some((unit, name)) => write!(f, "{} {name}", self.0 / unit),
            None => write!(f, "{} bytes", self.0),
        }
    }
}

/// Parse `256MiB`, `1GiB`, `4096`, `512 KiB`. Errors say what is accepted.
pub fn parse_size(text: &str) -> Result<Size, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!("{text:?} is not a size like 4096, 512KiB, 256MiB or 1GiB (binary units: B, KiB, MiB, GiB)")
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    match number.checked_mul(unit) {
        Some(bytes) if bytes <= MAX_BALLAST => Ok(Size(bytes)),
        _ => Err(format!(
            "{text:?} is too large: the ballast is at most {}",
            Size(MAX_BALLAST)
        )),
    }
}

/// Fill a ballast of `size` on a thread of its own, after `delay`, and keep
/// it for the life of the process; log when done (or why it could not be
/// allocated: the server serves on). Nothing for 0.
///
/// A generation started by an upgrade waits out its predecessor's watch
/// window first: a cache warmed while the old generation still reads the
/// new one's readiness report and drains would compete with both on the
/// machine's cores (262 144 page faults for 1 GiB), and that is what an
/// operator schedules after a handover, not during it.
pub fn fill_in_background(size: Size, delay: std::time::Duration) {
    if size.0 == 0 {
        return;
    }
    let filled = std::thread::Builder::new()
        .name("baton-ballast".to_owned())
        .spawn(move || {
            // A background thread pausing for a configured time: no test
            // synchronises on it (they wait for the `ballast:` line).
            std::thread::sleep(delay);
            fill(size);
        });
    if let Err(e) = filled {
        log::error!("--ballast {size}: cannot start its thread: {e}");
    }
}

fn fill(size: Size) {
    match Ballast::allocate(size) {
        Ok(ballast) => {
            // Held until the process exits, like a cache.
            std::mem::forget(ballast);
            log::info!("ballast: {size} allocated and touched");
        }
        Err(e) => log::error!("{e}"),
    }
}

/// Memory held until dropped; every page of it written once, so it is
/// resident (counted in RSS), as a warm cache would be.
#[derive(Debug)]
pub struct Ballast {
    bytes: Vec<u8>,
}

impl Ballast {
    /// Allocate and touch `size`; a clear error (no abort) if the
    /// allocation is refused.
    pub fn allocate(size: Size) -> Result<Ballast, String> {
        let len = usize::try_from(size.0)
            .map_err(|_| format!("--ballast {size} does not fit in this address space"))?;
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len)
            .map_err(|e| format!("--ballast {size}: cannot allocate: {e}"))?;
        // Written, not just reserved: untouched pages would not be resident.
        // Not zero, so no page is left shared with the zero page.
        bytes.resize(len, 0xba);
        Ok(Ballast {
            bytes: std::hint::black_box(bytes),
        })
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it holds nothing (`--ballast 0`).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(Size(0)));
        assert_eq!(parse_size("4096"), Ok(Size(4096)));
        assert_eq!(parse_size("10B"), Ok(Size(10)));
        assert_eq!(parse_size("512KiB"), Ok(Size(512 << 10)));
        assert_eq!(parse_size("256MiB"), Ok(Size(256 << 20)));
        assert_eq!(parse_size(" 1 GiB "), Ok(Size(1 << 30)));
        assert_eq!(parse_size("64GiB"), Ok(Size(MAX_BALLAST)));
    }

    #[test]
    fn bad_sizes_are_clear_errors() {
        for bad in ["", "GiB", "-1", "1.5GiB", "1gb", "1 TiB", "ten", "1GiBx"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("is not a size like"), "{bad}: {err}");
        }
        for huge in ["65GiB", "99999999999999999999", "18446744073709551615GiB"] {
            let err = parse_size(huge).unwrap_err();
            assert!(
                err.contains("too large") || err.contains("not a size"),
                "{huge}: {err}"
            );
        }
    }

    #[test]
    fn display() {
        assert_eq!(Size(1 << 30).to_string(), "1 GiB");
        assert_eq!(Size(256 << 20).to_string(), "256 MiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
        assert_eq!(Size(0).to_string(), "0 bytes");
    }

    #[test]
    fn allocates_and_touches() {
        let ballast = Ballast::allocate(Size(1 << 20)).unwrap();
        assert_eq!(ballast.len(), 1 << 20);
        assert!(ballast.bytes.iter().all(|&b| b == 0xba));
        assert!(Ballast::allocate(Size(0)).unwrap().is_empty());
    }
}
