//! The wire protocol between generations, as pure functions.
//!
//! It is systemd's socket activation (`sd_listen_fds(3)`) plus two variables
//! of our own, so a baton server runs unchanged under a systemd `.socket`
//! unit and a baton parent can hand over to any program that speaks systemd's
//! protocol:
//!
//! | variable | meaning |
//! |---|---|
//! | `LISTEN_FDS` | number of passed sockets, starting at fd 3 |
//! | `LISTEN_PID` | the pid they are meant for; any other pid means "not for me" |
//! | `LISTEN_FDNAMES` | colon-separated names, one per fd |
//! | `BATON_READY_FD` | where the child reports readiness: `1`, or `error: <message>\n` |
//! | `BATON_GENERATION` | 0 for a process started by hand, +1 per upgrade |
//! | `BATON_HANDOVER_FD` | the child's end of the [handover](crate::handover) channel, when the parent offers one |
//!
//! Nothing here touches the process environment: reading takes a lookup
//! function, writing returns the pairs to put in the child's environment.
//!
//! So the variables stay in this process's environment, and every process
//! the application spawns would inherit them (and `NOTIFY_SOCKET`): give
//! such a `Command` to [`clear_inherited_env`] first.

use std::ffi::OsString;
use std::os::fd::RawFd;

/// Number of passed sockets.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// Pid the passed sockets are meant for.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// Colon-separated socket names.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// Fd on which a baton child reports readiness.
pub const BATON_READY_FD: &str = "BATON_READY_FD";
/// Generation number of the process.
pub const BATON_GENERATION: &str = "BATON_GENERATION";
/// Fd of the child's end of the [handover](crate::handover) channel.
pub const BATON_HANDOVER_FD: &str = "BATON_HANDOVER_FD";
/// The first passed fd, as in systemd.
pub const FIRST_FD: RawFd = 3;
/// The name systemd gives a socket that was passed without one.
pub const UNNAMED: &str = "unknown";
/// More sockets than this is a corrupt environment, not a real deployment.
pub const MAX_FDS: usize = 1024;

/// Why the protocol variables could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A variable is not valid Unicode or not a number where one is needed.
    #[error("{name} has an invalid value {value:?}")]
    InvalidValue {
        /// The variable.
        name: &'static str,
        /// What it held.
        value: String,
    },
    /// `LISTEN_FDS` is larger than [`MAX_FDS`].
    #[error("LISTEN_FDS is {0}, more than the {MAX_FDS} baton accepts")]
    TooManyFds(usize),
    /// `LISTEN_FDNAMES` has a different number of names than `LISTEN_FDS`.
    #[error("LISTEN_FDNAMES has {names} names but LISTEN_FDS is {fds}")]
    NameCount {
        /// Names given.
        names: usize,
        /// Fds declared.
        fds: usize,
    },
    /// The readiness fd is one of the passed sockets or below fd 3.
    #[error("BATON_READY_FD {ready_fd} collides with stdio or a passed socket (fds 3..{end})")]
    ReadyFdCollides {
        /// The readiness fd.
        ready_fd: RawFd,
        /// One past the last passed socket.
        end: RawFd,
    },
    /// The handover fd is below fd 3, one of the passed sockets, or the
    /// readiness fd.
    #[error("BATON_HANDOVER_FD {handover_fd} collides with stdio, a passed socket (fds 3..{end}) or BATON_READY_FD")]
    HandoverFdCollides {
        /// The handover fd.
        handover_fd: RawFd,
        /// One past the last passed socket.
        end: RawFd,
    },
    /// A socket name cannot be passed: empty, too long, or with `:` or a
    /// control character.
    #[error("invalid socket name {0:?}: 1 to 255 printable characters, no ':'")]
    InvalidName(String),
    /// `BATON_GENERATION` is the largest number there is: no generation
    /// can follow it ([`next_generation`]).
    #[error("BATON_GENERATION is {0}: too large for a next generation to be numbered")]
    GenerationOverflow(u64),
}

/// What a parent passed to this process, read from its environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Passed {
    /// One name per passed fd, fd 3 first; [`UNNAMED`] where none was given.
    pub names: Vec<String>,
    /// Where to report readiness, when the parent is a baton process.
    pub ready_fd: Option<RawFd>,
    /// The child's end of the handover channel, when the parent offers
    /// one: take it with [`End::from_inherited`](crate::handover::End::from_inherited).
    pub handover_fd: Option<RawFd>,
    /// Generation of this process: 0 when started by hand or by systemd.
    pub generation: u64,
}

impl Passed {
    /// The fd number of the `index`-th passed socket.
    pub fn fd(index: usize) -> RawFd {
        FIRST_FD + index as RawFd
    }

    /// Where a baton parent puts the handover channel for a child that
    /// gets `sockets` sockets: right after the readiness fd.
    pub fn handover_fd_for(sockets: usize) -> RawFd {
        Passed::fd(sockets) + 1
    }
}

/// Read the protocol from an environment lookup, for the process `my_pid`.
///
/// Returns an empty [`Passed`] (generation 0, no sockets) when `LISTEN_PID`
/// is absent or names another process: the variables were then inherited by
/// accident, and systemd's rule is to ignore them.
pub fn parse(
    lookup: impl Fn(&str) -> Option<OsString>,
    my_pid: u32,
) -> Result<Passed, ProtocolError> {
    let var = |name: &'static str| -> Result<Option<String>, ProtocolError> {
        match lookup(name) {
            None => Ok(None),
            Some(value) => {
                value
                    .into_string()
                    .map(Some)
                    .map_err(|value| ProtocolError::InvalidValue {
                        name,
                        value: value.to_string_lossy().into_owned(),
                    })
            }
        }
    };
    let number = |name: &'static str| -> Result<Option<u64>, ProtocolError> {
        var(name)?
            .map(|value| {
                value
                    .parse::<u64>()
                    .map_err(|_| ProtocolError::InvalidValue { name, value })
            })
            .transpose()
    };

    match number(LISTEN_PID)? {
        Some(pid) if pid == u64::from(my_pid) => {}
        _ => return Ok(Passed::default()),
    }
    let count = number(LISTEN_FDS)?.unwrap_or(0);
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > MAX_FDS {
        return Err(ProtocolError::TooManyFds(count));
    }
    let names = match var(LISTEN_FDNAMES)? {
        None => vec![UNNAMED.to_owned(); count],
        Some(joined) => {
            let names: Vec<String> = if joined.is_empty() {
                Vec::new()
            } else {
                joined.split(':').map(str::to_owned).collect()
            };
            if names.len() != count {
                return Err(ProtocolError::NameCount {
                    names: names.len(),
                    fds: count,
                });
            }
            names
        }
    };
    let end = Passed::fd(count);
    let ready_fd = match number(BATON_READY_FD)? {
        None => None,
        Some(fd) => {
            let fd = RawFd::try_from(fd).map_err(|_| ProtocolError::InvalidValue {
                name: BATON_READY_FD,
                value: fd.to_string(),
            })?;
            if fd < end {
                return Err(ProtocolError::ReadyFdCollides { ready_fd: fd, end });
            }
            Some(fd)
        }
    };
    let handover_fd = match number(BATON_HANDOVER_FD)? {
        None => None,
        Some(fd) => {
            let fd = RawFd::try_from(fd).map_err(|_| ProtocolError::InvalidValue {
                name: BATON_HANDOVER_FD,
                value: fd.to_string(),
            })?;
            if fd < end || Some(fd) == ready_fd {
                return Err(ProtocolError::HandoverFdCollides {
                    handover_fd: fd,
                    end,
                });
            }
            Some(fd)
        }
    };
    let generation = number(BATON_GENERATION)?.unwrap_or(0);
    // Refused here, at start-up, rather than at the first upgrade: the value
    // came from the environment, and a server that cannot upgrade should say
    // so before it serves.
    next_generation(generation)?;
    Ok(Passed {
        names,
        ready_fd,
        handover_fd,
        generation,
    })
}

/// The number of the generation after `generation`, checked:
/// [`ProtocolError::GenerationOverflow`] instead of an overflow when
/// `generation` is `u64::MAX` (only a forged `BATON_GENERATION` gets there,
/// and [`parse`] already refuses it).
pub fn next_generation(generation: u64) -> Result<u64, ProtocolError> {
    generation
        .checked_add(1)
        .ok_or(ProtocolError::GenerationOverflow(generation))
}

/// True for the variables this protocol owns: a parent strips them from the
/// environment it passes on, so a stale value never reaches the child.
pub fn is_protocol_var(name: &str) -> bool {
    matches!(
        name,
        LISTEN_FDS
            | LISTEN_PID
            | LISTEN_FDNAMES
            | BATON_READY_FD
            | BATON_GENERATION
            | BATON_HANDOVER_FD
    )
}

/// The variables [`clear_inherited_env`] removes: the protocol's own
/// ([`is_protocol_var`]) and systemd's `NOTIFY_SOCKET`.
pub const INHERITED_VARS: &[&str] = &[
    LISTEN_FDS,
    LISTEN_PID,
    LISTEN_FDNAMES,
    BATON_READY_FD,
    BATON_GENERATION,
    BATON_HANDOVER_FD,
    crate::notify::NOTIFY_SOCKET,
];

/// Remove the variables a server inherited from its parent or from systemd
/// ([`INHERITED_VARS`]: `LISTEN_*`, `BATON_*`, `NOTIFY_SOCKET`) from the
/// environment of `command`, one of the application's own subprocesses.
///
/// baton never mutates the process environment (`set_var` is unsound in a
/// threaded program), so these variables stay in it and every process the
/// application spawns inherits them. `LISTEN_PID` keeps a well-behaved
/// subprocess from taking the `LISTEN_*` sockets, but not every program
/// checks it, and with `NotifyAccess=all` any process that finds
/// `NOTIFY_SOCKET` can tell systemd `MAINPID=` or `READY=1` on the server's
/// behalf. Call this on every `Command` the application builds, unless the
/// subprocess is meant to speak systemd's protocol itself. Other variables
/// are left as they are.
///
/// ```
/// use std::process::Command;
///
/// let output = baton_core::clear_inherited_env(Command::new("/bin/sh").args(["-c", "env"]))
///     .env("GREETING", "hello")
///     .output()?;
/// let env = String::from_utf8_lossy(&output.stdout);
/// assert!(!env.lines().any(|l| l.starts_with("LISTEN_PID=") || l.starts_with("NOTIFY_SOCKET=")));
/// assert!(env.lines().any(|l| l == "GREETING=hello"));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn clear_inherited_env(command: &mut std::process::Command) -> &mut std::process::Command {
    for name in INHERITED_VARS {
        command.env_remove(name);
    }
    command
}

/// Check that `name` can travel in `LISTEN_FDNAMES` (systemd's rule: at most
/// 255 printable ASCII characters, no `:`).
pub fn validate_name(name: &str) -> Result<(), ProtocolError> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if valid {
        Ok(())
    } else {
        Err(ProtocolError::InvalidName(name.to_owned()))
    }
}

/// The protocol variables for a child that gets `names.len()` sockets at
/// fds 3.. and reports readiness on `3 + names.len()`. `LISTEN_PID` is not
/// among them: only the child knows its pid, and it writes it itself
/// between fork and exec.
pub fn child_vars(
    names: &[&str],
    generation: u64,
) -> Result<Vec<(&'static str, String)>, ProtocolError> {
    for name in names {
        validate_name(name)?;
    }
    Ok(vec![
        (LISTEN_FDS, names.len().to_string()),
        (LISTEN_FDNAMES, names.join(":")),
        (BATON_READY_FD, Passed::fd(names.len()).to_string()),
        (BATON_GENERATION, generation.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn nothing_passed_without_listen_pid() {
        let passed = parse(env(&[("LISTEN_FDS", "2")]), 42).unwrap();
        assert_eq!(passed, Passed::default());
    }

    #[test]
    fn another_pid_means_not_for_me() {
        let vars = env(&[
            ("LISTEN_PID", "41"),
            ("LISTEN_FDS", "2"),
            ("BATON_GENERATION", "7"),
        ]);
        assert_eq!(parse(vars, 42).unwrap(), Passed::default());
    }

    #[test]
    fn systemd_style_without_names_or_baton_vars() {
        let passed = parse(env(&[("LISTEN_PID", "42"), ("LISTEN_FDS", "2")]), 42).unwrap();
        assert_eq!(passed.names, vec!["unknown", "unknown"]);
        assert_eq!(passed.ready_fd, None);
        assert_eq!(passed.generation, 0);
    }

    #[test]
    fn full_baton_environment() {
        let vars = env(&[
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "2"),
            ("LISTEN_FDNAMES", "http:control"),
            ("BATON_READY_FD", "5"),
            ("BATON_GENERATION", "3"),
        ]);
        let passed = parse(vars, 42).unwrap();
        assert_eq!(passed.names, vec!["http", "control"]);
        assert_eq!(passed.ready_fd, Some(5));
        assert_eq!(passed.generation, 3);
    }

    #[test]
    fn zero_fds_with_empty_names() {
        let vars = env(&[
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "0"),
            ("LISTEN_FDNAMES", ""),
        ]);
        assert!(parse(vars, 42).unwrap().names.is_empty());
    }

    #[test]
    fn bad_values_are_errors() {
        let cases: &[(&[(&str, &str)], ProtocolError)] = &[
            (
                &[("LISTEN_PID", "x")],
                ProtocolError::InvalidValue {
                    name: LISTEN_PID,
                    value: "x".into(),
                },
            ),
            (
                &[("LISTEN_PID", "42"), ("LISTEN_FDS", "-1")],
                ProtocolError::InvalidValue {
                    name: LISTEN_FDS,
                    value: "-1".into(),
                },
            ),
            (
                &[("LISTEN_PID", "42"), ("LISTEN_FDS", "5000")],
                ProtocolError::TooManyFds(5000),
            ),
            (
                &[
                    ("LISTEN_PID", "42"),
                    ("LISTEN_FDS", "2"),
                    ("LISTEN_FDNAMES", "http"),
                ],
                ProtocolError::NameCount { names: 1, fds: 2 },
            ),
            (
                &[
                    ("LISTEN_PID", "42"),
                    ("LISTEN_FDS", "2"),
                    ("BATON_READY_FD", "4"),
                ],
                ProtocolError::ReadyFdCollides {
                    ready_fd: 4,
                    end: 5,
                },
            ),
            (
                &[("LISTEN_PID", "42"), ("BATON_READY_FD", "1")],
                ProtocolError::ReadyFdCollides {
                    ready_fd: 1,
                    end: 3,
                },
            ),
            (
                &[("LISTEN_PID", "42"), ("BATON_GENERATION", "1.5")],
                ProtocolError::InvalidValue {
                    name: BATON_GENERATION,
                    value: "1.5".into(),
                },
            ),
            (
                &[
                    ("LISTEN_PID", "42"),
                    ("BATON_GENERATION", "18446744073709551615"),
                ],
                ProtocolError::GenerationOverflow(u64::MAX),
            ),
            (
                &[
                    ("LISTEN_PID", "42"),
                    ("BATON_GENERATION", "18446744073709551616"),
                ],
                ProtocolError::InvalidValue {
                    name: BATON_GENERATION,
                    value: "18446744073709551616".into(),
                },
            ),
        ];
        for (vars, expected) in cases {
            assert_eq!(parse(env(vars), 42).unwrap_err(), *expected, "{vars:?}");
        }
    }

    #[test]
    fn handover_fd_is_read_and_checked_like_the_ready_fd() {
        let base = [
            ("LISTEN_PID", "42"),
            ("LISTEN_FDS", "2"),
            ("BATON_READY_FD", "5"),
        ];
        let with = |fd: &'static str| {
            let mut vars = base.to_vec();
            vars.push((BATON_HANDOVER_FD, fd));
            parse(env(&vars), 42)
        };
        assert_eq!(parse(env(&base), 42).unwrap().handover_fd, None);
        let fd = Passed::handover_fd_for(2);
        assert_eq!(fd, 6);
        assert_eq!(with("6").unwrap().handover_fd, Some(fd));
        for collides in ["0", "2", "4", "5"] {
            assert!(
                matches!(
                    with(collides),
                    Err(ProtocolError::HandoverFdCollides { end: 5, .. })
                ),
                "{collides}"
            );
        }
        assert!(matches!(
            with("-1"),
            Err(ProtocolError::InvalidValue {
                name: BATON_HANDOVER_FD,
                ..
            })
        ));
        assert!(matches!(
            with("99999999999"),
            Err(ProtocolError::InvalidValue {
                name: BATON_HANDOVER_FD,
                ..
            })
        ));
        // Not for this pid: ignored like every other variable.
        let vars = env(&[("LISTEN_PID", "41"), (BATON_HANDOVER_FD, "6")]);
        assert_eq!(parse(vars, 42).unwrap().handover_fd, None);
    }

    #[test]
    fn child_vars_round_trip_through_parse() {
        let vars = child_vars(&["http", "control"], 4).unwrap();
        let mut pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        pairs.push(("LISTEN_PID", "9"));
        let passed = parse(env(&pairs), 9).unwrap();
        assert_eq!(passed.names, vec!["http", "control"]);
        assert_eq!(passed.ready_fd, Some(5));
        assert_eq!(passed.generation, 4);
    }

    #[test]
    fn names_that_cannot_travel_are_refused() {
        for bad in ["", "a:b", "with space", "tab\t", &"x".repeat(256)] {
            assert!(child_vars(&[bad], 1).is_err(), "{bad:?}");
        }
        assert!(child_vars(&["http-1.v2_ok"], 1).is_ok());
    }

    #[test]
    fn protocol_vars_are_recognised() {
        for name in [
            LISTEN_FDS,
            LISTEN_PID,
            LISTEN_FDNAMES,
            BATON_READY_FD,
            BATON_GENERATION,
            BATON_HANDOVER_FD,
        ] {
            assert!(is_protocol_var(name));
            assert!(INHERITED_VARS.contains(&name));
        }
        assert!(!is_protocol_var("NOTIFY_SOCKET"));
        assert!(!is_protocol_var("PATH"));
    }

    #[test]
    fn next_generation_is_checked() {
        assert_eq!(next_generation(0), Ok(1));
        assert_eq!(next_generation(u64::MAX - 1), Ok(u64::MAX));
        assert_eq!(
            next_generation(u64::MAX),
            Err(ProtocolError::GenerationOverflow(u64::MAX))
        );
        let passed = parse(
            env(&[
                ("LISTEN_PID", "42"),
                ("BATON_GENERATION", "18446744073709551614"),
            ]),
            42,
        )
        .unwrap();
        assert_eq!(next_generation(passed.generation), Ok(u64::MAX));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn parse_never_panics(
            fds in proptest::option::of(".{0,12}"),
            names in proptest::option::of(".{0,40}"),
            ready in proptest::option::of(".{0,12}"),
            handover in proptest::option::of(".{0,12}"),
            generation in proptest::option::of(".{0,12}"),
        ) {
            let mut pairs = vec![("LISTEN_PID".to_string(), "7".to_string())];
            for (k, v) in [(LISTEN_FDS, fds), (LISTEN_FDNAMES, names), (BATON_READY_FD, ready), (BATON_HANDOVER_FD, handover), (BATON_GENERATION, generation)] {
                if let Some(v) = v { pairs.push((k.to_string(), v)); }
            }
            let map: HashMap<String, OsString> = pairs.into_iter().map(|(k, v)| (k, v.into())).collect();
            if let Ok(passed) = parse(|n| map.get(n).cloned(), 7) {
                if let Some(fd) = passed.ready_fd {
                    proptest::prop_assert!(fd >= Passed::fd(passed.names.len()));
                }
                if let Some(fd) = passed.handover_fd {
                    proptest::prop_assert!(fd >= Passed::fd(passed.names.len()));
                    proptest::prop_assert_ne!(Some(fd), passed.ready_fd);
                }
                // Whatever was accepted can be upgraded from.
                proptest::prop_assert!(next_generation(passed.generation).is_ok());
            }
        }

        #[test]
        fn every_accepted_generation_has_a_successor_and_round_trips(generation in proptest::prelude::any::<u64>()) {
            let text = generation.to_string();
            let parsed = parse(env(&[("LISTEN_PID", "7"), (BATON_GENERATION, &text)]), 7);
            match next_generation(generation) {
                Ok(next) => {
                    proptest::prop_assert_eq!(parsed.map(|p| p.generation), Ok(generation));
                    // What a parent writes for its child parses back.
                    let vars = child_vars(&["http"], next).unwrap();
                    let mut pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    pairs.push(("LISTEN_PID", "9"));
                    let child = parse(env(&pairs), 9);
                    if next == u64::MAX {
                        proptest::prop_assert_eq!(child, Err(ProtocolError::GenerationOverflow(next)));
                    } else {
                        proptest::prop_assert_eq!(child.map(|p| p.generation), Ok(next));
                    }
                }
                Err(e) => proptest::prop_assert_eq!(parsed, Err(e)),
            }
        }
    }
}
