//! The `--config FILE` of the demo server: named listeners, backend and
//! timeouts in TOML, read at start-up by every generation.
//!
//! ```toml
//! backend = "smol"              # optional
//! upgrade_timeout = "10s"       # optional, same syntax as the flags
//! drain_timeout = "30s"
//! [listeners]
//! http = "127.0.0.1:8080"
//! admin = "unix:/run/app/admin.sock"
//! ```
//!
//! An upgrade restarts the binary with the same arguments, so it re-reads
//! the file: a listener whose name stays is inherited, a new name is bound, a
//! name no longer there is closed, and a changed `backend` switches runtime.
//!
//! Precedence: with `--config`, the file is the only source of listeners,
//! backend and the timeouts it names; `--listen`, `--backend`,
//! `--backend-file` and the timeout flags cannot be given as well (a usage
//! error). A setting the file leaves out keeps the flag's default. Unknown
//! keys, bad addresses, bad names and bad durations are errors.

use std::io::Read;
use std::path::Path;

use baton_core::ListenAddr;

use crate::cli::{parse_duration, Options};

/// The file as written: every key optional, no other key allowed.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    backend: Option<String>,
    upgrade_timeout: Option<String>,
    drain_timeout: Option<String>,
    successor_watch: Option<String>,
    idle_grace: Option<String>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    write_timeout: Option<String>,
    /// In the file's order (fds are handed over in this order).
    #[serde(default)]
    listeners: toml::Table,
}

/// A configuration file bigger than this is certainly a wrong path.
const MAX_SIZE: u64 = 1 << 20;

/// `options` with the settings of its `--config` file applied, if it has
/// one; the error names the file and what is wrong in it.
pub fn apply(options: &Options) -> Result<Options, String> {
    let Some(path) = &options.config else {
        return Ok(options.clone());
    };
    let text = read(path)?;
    apply_text(options, &text).map_err(|e| format!("config {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SIZE).read_to_string(&mut text))
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    Ok(text)
}

/// Apply the TOML `text` to a copy of `options`.
fn apply_text(options: &Options, text: &str) -> Result<Options, String> {
    let file: File = toml::from_str(text).map_err(|e| {
        // One line (it ends up in the old generation's `upgrade failed:`).
        let message = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {message}")
            }
            None => message,
        }
    })?;
    let mut effective = options.clone();
    if let Some(backend) = file.backend {
        effective.backend = Some(backend);
    }
    let durations = [
        (
            "upgrade_timeout",
            file.upgrade_timeout,
            &mut effective.upgrade_timeout,
        ),
        (
            "drain_timeout",
            file.drain_timeout,
            &mut effective.drain_timeout,
        ),
        (
            "successor_watch",
            file.successor_watch,
            &mut effective.successor_watch,
        ),
        ("idle_grace", file.idle_grace, &mut effective.idle_grace),
        (
            "header_timeout",
            file.header_timeout,
            &mut effective.header_timeout,
        ),
        (
            "idle_timeout",
            file.idle_timeout,
            &mut effective.idle_timeout,
        ),
        (
            "write_timeout",
            file.write_timeout,
            &mut effective.write_timeout,
        ),
    ];
    for (key, text, field) in durations {
        if let Some(text) = text {
            *field = parse_duration(&text).map_err(|e| format!("{key}: {e}"))?;
        }
    }
    let mut listeners: Vec<(String, ListenAddr)> = Vec::new();
    for (name, addr) in file.listeners {
        validate_name(&name)?;
        let addr: ListenAddr = match addr {
            toml::Value::String(addr) => addr.parse(),
            other => Err(format!(
                "{} is not a string like \"127.0.0.1:8080\" or \"unix:/path\"",
                other.type_str()
            )),
        }
        .map_err(|e| format!("listener {name:?}: {e}"))?;
        listeners.push((name, addr));
    }
    if !listeners.is_empty() {
        effective.named_listeners = Some(listeners);
    }
    Ok(effective)
}

/// A listener name must be one the handoff protocol can carry
/// (`LISTEN_FDNAMES` is colon-separated) and not the control socket's.
fn validate_name(name: &str) -> Result<(), String> {
    if name == baton_core::control::LISTENER_NAME {
        return Err(format!(
            "listener name {name:?} is reserved for the --control socket"
        ));
    }
    baton_core::protocol::validate_name(name).map_err(|_| {
        format!("listener name {name:?} is invalid: use 1 to 255 printable ASCII characters, no ':' and no space")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;

    fn options() -> Options {
        Options::parse_from(["baton-demo", "--config", "/nonexistent"])
    }

    #[test]
    fn full_file() {
        let text = r#"
            backend = "smol"
            upgrade_timeout = "5s"
            drain_timeout = "250ms"
            [listeners]
            http = "127.0.0.1:8080"
            admin = "unix:/run/app/admin.sock"
        "#;
        let effective = apply_text(&options(), text).unwrap();
        assert_eq!(effective.backend.as_deref(), Some("smol"));
        assert_eq!(effective.upgrade_timeout, Duration::from_secs(5));
        assert_eq!(effective.drain_timeout, Duration::from_millis(250));
        assert_eq!(effective.idle_grace, options().idle_grace);
        assert_eq!(
            effective.listeners(),
            vec![
                ("http".to_owned(), "127.0.0.1:8080".parse().unwrap()),
                (
                    "admin".to_owned(),
                    "unix:/run/app/admin.sock".parse().unwrap()
                ),
            ]
        );
    }

    #[test]
    fn empty_file_keeps_the_defaults() {
        let effective = apply_text(&options(), "").unwrap();
        assert_eq!(effective.listeners(), options().listeners());
        assert_eq!(effective.listeners()[0].0, "http");
        assert_eq!(effective.backend, None);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |text: &str| apply_text(&options(), text).unwrap_err();
        let e = err("backend = \n");
        assert!(e.starts_with("line 1:"), "{e}");
        let e = err("\nport = 80\n");
        assert!(e.starts_with("line 2:") && e.contains("port"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("drain_timeout = \"10h\"\n");
        assert!(e.starts_with("drain_timeout:"), "{e}");
        let e = err("[listeners]\nhttp = \"localhost\"\n");
        assert!(e.contains("listener \"http\""), "{e}");
        let e = err("[listeners]\nhttp = 8080\n");
        assert!(
            e.contains("listener \"http\": integer is not a string"),
            "{e}"
        );
        let e = err("[listeners]\n\"a:b\" = \"127.0.0.1:1\"\n");
        assert!(e.contains("\"a:b\" is invalid"), "{e}");
        let e = err("[listeners]\ncontrol = \"127.0.0.1:1\"\n");
        assert!(e.contains("reserved"), "{e}");
        let e = apply(&options()).unwrap_err();
        assert!(e.starts_with("cannot read config /nonexistent"), "{e}");
    }

    #[test]
    fn config_conflicts_with_the_flags_it_sets() {
        for flag in [
            "--listen",
            "--backend",
            "--upgrade-timeout",
            "--drain-timeout",
        ] {
            let value = if flag == "--listen" {
                "127.0.0.1:1"
            } else {
                "tokio"
            };
            let value = if flag.ends_with("timeout") {
                "1s"
            } else {
                value
            };
            let parsed = Options::try_parse_from(["baton-demo", "--config", "/x", flag, value]);
            assert!(parsed.is_err(), "{flag} accepted with --config");
        }
    }
}
