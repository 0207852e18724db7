//! The demo's application state: how many requests every generation so far
//! has served. It moves to the next generation at each upgrade as the item
//! `"requests"` (the decimal count), read by the new generation before it
//! reports ready; `/stats` answers `requests N`.

use std::sync::atomic::{AtomicU64, Ordering};

use baton_core::handover::Item;

/// The item's name.
pub const ITEM: &str = "requests";

/// Requests served by this generation and those before it.
static TOTAL: AtomicU64 = AtomicU64::new(0);

/// Count one request; returns the new total.
pub fn count() -> u64 {
    TOTAL.fetch_add(1, Ordering::Relaxed) + 1
}

/// The total so far.
pub fn total() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

/// The state to move, written at the negotiated `version`.
pub fn save(version: u32) -> Vec<Item> {
    vec![Item::new(ITEM, version, total().to_string().into_bytes())]
}

/// Take the previous generations' count from `items`; anything else is
/// ignored (and logged).
pub fn restore(items: &[Item]) {
    for item in items {
        let count = (item.name == ITEM)
            .then(|| std::str::from_utf8(&item.payload).ok()?.parse::<u64>().ok())
            .flatten();
        match count {
            Some(count) => {
                TOTAL.fetch_add(count, Ordering::Relaxed);
            }
            None => log::warn!("state: ignoring item {:?} v{}", item.name, item.version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_restore_adds_the_count() {
        let before = total();
        let items = save(1);
        assert_eq!(items[0].name, ITEM);
        restore(&items);
        assert!(total() >= 2 * before);
        restore(&[
            Item::new("other", 1, b"x".to_vec()),
            Item::new(ITEM, 1, b"nope".to_vec()),
        ]);
    }
}
