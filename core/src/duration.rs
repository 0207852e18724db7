//! Durations as operators write them (`250ms`, `10s`, `2m`), bounded.
//!
//! Every timeout a server takes from its command line or configuration ends
//! up added to an [`Instant`](std::time::Instant) (a deadline) or converted to
//! milliseconds for `epoll_wait`. `Instant + Duration` panics on overflow, so
//! an unbounded value (`--drain-timeout 18446744073709551615`) would be
//! accepted at start-up and crash the server at its first upgrade or stop.
//! [`parse_duration`] therefore refuses anything above [`MAX_DURATION`] when
//! the value is read, with an error that states the maximum.
//!
//! ```
//! use std::time::Duration;
//! use baton_core::duration::{parse_duration, DurationError, MAX_DURATION};
//!
//! assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
//! assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
//! assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
//! assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
//! assert_eq!(parse_duration("1440m"), Ok(MAX_DURATION));
//! assert!(matches!(
//!     parse_duration("18446744073709551615"),
//!     Err(DurationError::TooLong { .. })
//! ));
//! ```

use std::time::Duration;

/// The longest duration [`parse_duration`] accepts: 24 hours.
///
/// Generous for any timeout a server has (an upgrade, a drain, an idle
/// connection), and small enough that a deadline `now + MAX_DURATION`
/// never overflows an [`Instant`](std::time::Instant) on any clock, and that
/// it fits in `epoll_wait`'s `int` milliseconds (86 400 000 < 2³¹).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Not a whole number followed by an optional unit.
    #[error("{text:?} is not a duration like 250ms, 10s or 2m")]
    Invalid {
        /// The text, trimmed.
        text: String,
    },
    /// A number followed by a unit other than `ms`, `s` or `m`.
    #[error("{text:?}: unknown unit {unit:?} (use ms, s or m)")]
    UnknownUnit {
        /// The text, trimmed.
        text: String,
        /// The unit it has.
        unit: String,
    },
    /// Longer than [`MAX_DURATION`].
    #[error("duration {text:?} is too long: at most 86400s (24 hours)")]
    TooLong {
        /// The text, trimmed.
        text: String,
    },
}

/// Parse `250ms`, `10s`, `2m` or a bare number of seconds (surrounding
/// whitespace is ignored), refusing anything longer than [`MAX_DURATION`].
///
/// Never panics: a number too large for any type is [`DurationError::TooLong`]
/// like one that merely exceeds the maximum.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let invalid = || DurationError::Invalid {
        text: text.to_owned(),
    };
    let too_long = || DurationError::TooLong {
        text: text.to_owned(),
    };
    if digits.is_empty() {
        return Err(invalid());
    }
    // Only ASCII digits: the one way parsing can fail is overflow.
    let number: u64 = digits.parse().map_err(|_| too_long())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    let millis = number.checked_mul(millis_per_unit).ok_or_else(too_long)?;
    let duration = Duration::from_millis(millis);
    if duration > MAX_DURATION {
        return Err(too_long());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 10s "), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("86400s"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("86400000ms"), Ok(MAX_DURATION));
    }

    #[test]
    fn refused_forms_say_why() {
        for (text, expected) in [
            ("", "\"\" is not a duration like 250ms, 10s or 2m"),
            ("ms", "\"ms\" is not a duration like 250ms, 10s or 2m"),
            ("-1s", "\"-1s\" is not a duration like 250ms, 10s or 2m"),
            ("10h", "\"10h\": unknown unit \"h\" (use ms, s or m)"),
            ("1.5s", "\"1.5s\": unknown unit \".5s\" (use ms, s or m)"),
            (
                "18446744073709551615",
                "duration \"18446744073709551615\" is too long: at most 86400s (24 hours)",
            ),
            (
                "99999999999999999999999m",
                "duration \"99999999999999999999999m\" is too long: at most 86400s (24 hours)",
            ),
            (
                "307445734561825861m",
                "duration \"307445734561825861m\" is too long: at most 86400s (24 hours)",
            ),
            (
                "86401s",
                "duration \"86401s\" is too long: at most 86400s (24 hours)",
            ),
            (
                "86400001ms",
                "duration \"86400001ms\" is too long: at most 86400s (24 hours)",
            ),
        ] {
            assert_eq!(
                parse_duration(text).unwrap_err().to_string(),
                expected,
                "{text:?}"
            );
        }
    }

    #[test]
    fn the_maximum_is_a_safe_deadline() {
        let now = std::time::Instant::now();
        assert!(now.checked_add(MAX_DURATION).is_some());
        assert!(MAX_DURATION.as_millis() < i32::MAX as u128);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn no_input_panics_and_every_accepted_duration_is_bounded(text in ".{0,30}") {
            if let Ok(duration) = parse_duration(&text) {
                prop_assert!(duration <= MAX_DURATION);
            }
        }

        #[test]
        fn numbers_with_units_never_panic(number in any::<u64>(), unit in "(ms|s|m|h|)") {
            let text = format!("{number}{unit}");
            match parse_duration(&text) {
                Ok(duration) => prop_assert!(duration <= MAX_DURATION),
                Err(DurationError::TooLong { .. } | DurationError::UnknownUnit { .. }) => {}
                Err(e) => prop_assert!(false, "{text}: {e}"),
            }
        }

        #[test]
        fn round_trips(millis in 0..=MAX_DURATION.as_millis() as u64) {
            let duration = Duration::from_millis(millis);
            prop_assert_eq!(parse_duration(&format!("{millis}ms")), Ok(duration));
            let secs = millis / 1000;
            prop_assert_eq!(parse_duration(&format!("{secs}s")), Ok(Duration::from_secs(secs)));
            prop_assert_eq!(parse_duration(&format!("{secs}")), Ok(Duration::from_secs(secs)));
            let mins = secs / 60;
            prop_assert_eq!(parse_duration(&format!("{mins}m")), Ok(Duration::from_secs(mins * 60)));
        }

        #[test]
        fn anything_above_the_maximum_is_too_long(extra in 1..=u64::MAX / 2) {
            let millis = (MAX_DURATION.as_millis() as u64).saturating_add(extra);
            let is_too_long = matches!(
                parse_duration(&format!("{millis}ms")),
                Err(DurationError::TooLong { .. })
            );
            prop_assert!(is_too_long);
        }
    }
}
