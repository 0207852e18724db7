//! Command line of the demo server, and the choice of backend.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_core::ListenAddr;

/// The backends compiled into this binary, by Cargo feature.
pub const BACKENDS: &[&str] = &[
    #[cfg(feature = "tokio")]
    "tokio",
    #[cfg(feature = "smol")]
    "smol",
    #[cfg(feature = "mio")]
    "mio",
];

/// An HTTP/1.1 server that upgrades itself without dropping a request.
///
/// SIGHUP starts the binary it was started from and hands it the listening
/// sockets; SIGTERM or SIGINT stops gracefully.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "baton-demo", version)]
pub struct Options {
    /// Address to listen on: IP:PORT, or unix:/path. Repeatable; the
    /// listeners are named http, http-1, http-2, … in this order.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: Vec<ListenAddr>,
    /// Also serve a UDP echo on this IP:PORT (socket named `udp`, handed to
    /// each next generation like a listener). Each datagram is answered
    /// with `gen=G pid=P ` followed by the datagram.
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<std::net::SocketAddr>,
    /// Runtime to serve with, among those compiled in.
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Read the backend's name from this file at start-up; it overrides
    /// --backend. An upgrade restarts with the same arguments, so writing
    /// another name here and sending SIGHUP switches the next generation to
    /// that runtime (tokio to smol and back) without losing a request.
    #[arg(long, value_name = "PATH")]
    pub backend_file: Option<PathBuf>,
    /// The binary an upgrade starts. Default: the path this process was
    /// started from (made absolute at start-up, symlinks not resolved), so a
    /// binary replaced by rename or a switched `current -> releases/vN`
    /// symlink is what the next generation runs. A missing or
    /// non-executable file fails the upgrade before anything is started.
    #[arg(long, value_name = "PATH")]
    pub next_binary: Option<PathBuf>,
    /// How long a new generation has to report ready before the upgrade fails.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub upgrade_timeout: Duration,
    /// How long in-flight requests get after a stop before they are cut.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How long an old generation keeps watching the new one after handing
    /// over (at least; longer while it drains): if the new one dies in that
    /// window, the old one serves again.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub successor_watch: Duration,
    /// How long an idle keep-alive connection may still send one last
    /// request after a stop. Closing an idle connection races with a client
    /// that is just sending on it, so this must exceed the clients' pause
    /// between requests, including when the machine is busy.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub idle_grace: Duration,
    /// How long a client may take to send a whole request (head and body)
    /// once its first byte arrived; trickling bytes does not extend it
    /// (slowloris). The client gets 408 and the connection closes.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// How long a keep-alive connection may stay idle.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long writing a response may take (a client that never reads).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// Most connections open at once (HTTP and control; at least 1). At the
    /// limit the server stops accepting: new clients wait in the kernel's
    /// listen queue and are served as soon as a connection closes, instead
    /// of being accepted and closed. With several listeners it may be
    /// exceeded by at most one connection per extra listener.
    #[arg(long, value_name = "N", default_value = "10000", value_parser = parse_max_connections)]
    pub max_connections: usize,
    /// Allocate and touch this much memory at start-up and hold it, standing
    /// in for an application's cache (to measure upgrades of a large
    /// server): bytes, or with a binary unit, e.g. `256MiB`, `1GiB`; at most
    /// 64 GiB. Filled on a thread of its own while the server starts;
    /// `ballast: SIZE allocated and touched` is logged when it is resident.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = crate::ballast::parse_size)]
    pub ballast: crate::ballast::Size,
    /// The version of the application state (the request count of
    /// `/stats`) this generation reads and writes; it moves to the next
    /// generation when both have the same. 0: move nothing.
    #[arg(long, value_name = "N", default_value = "1")]
    pub state_version: u32,
    /// At each upgrade, move open keep-alive connections to the new
    /// generation at their next request boundary, with any bytes read and
    /// not yet answered (`on`): clients never reconnect. `off`: end them
    /// as a plain drain does (`Connection: close`; idle ones closed after
    /// --idle-grace). Moving needs a common state version (--state-version
    /// at least 1 in both generations); without one, connections drain.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub handover: bool,
    /// Read --state-version from this file at start-up (every generation
    /// re-reads it), to upgrade to a generation of another state version.
    #[arg(long, value_name = "PATH")]
    pub state_version_file: Option<PathBuf>,
    /// Keep a PID file here naming the process that serves: written by each
    /// generation once ready, removed at a graceful stop.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Listen for control commands (upgrade, status, stop) on this Unix socket,
    /// mode 0600, handed to each next generation. See `baton-demo upgrade`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Read named listeners, backend and timeouts from this TOML file at
    /// start-up (every generation re-reads it, so edit it and send SIGHUP to
    /// add, remove or keep listeners and switch runtime). It replaces
    /// --listen, --backend, --backend-file and the timeout flags, which
    /// cannot be given with it. Keys: backend, the timeouts by their flag
    /// names (upgrade_timeout = "10s", …), and a `[listeners]` table of
    /// NAME = "IP:PORT" or "unix:/path" (README: Configuration file).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "listen", "backend", "backend_file", "upgrade_timeout", "drain_timeout",
            "successor_watch", "idle_grace", "header_timeout", "idle_timeout", "write_timeout",
        ]
    )]
    pub config: Option<PathBuf>,
    /// The listeners named in the --config file, once it is applied
    /// (`baton_demo::config::apply`); see [`Options::listeners`].
    #[arg(skip)]
    pub named_listeners: Option<Vec<(String, ListenAddr)>>,
    /// A command for a running server instead of serving.
    #[command(subcommand)]
    pub command: Option<Subcommand>,
}

/// Commands for a running server, through its `--control` socket.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Subcommand {
    /// Upgrade the server and wait for the outcome: prints the new pid,
    /// generation and time to ready and exits 0, or prints why it failed
    /// (the old process serves on) and exits 1.
    Upgrade {
        /// The server's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// How long to wait for the outcome.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Print the server's pid, generation, backend, uptime, connections and
    /// last upgrade.
    Status {
        /// The server's --control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// How long to wait for the answer.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// The name of the --udp socket, in the handoff.
pub const UDP_NAME: &str = "udp";

/// The answer to the UDP datagram `data`: `gen=G pid=P ` then `data`,
/// cut to fit in one datagram.
pub fn udp_echo(info: &crate::http::ServerInfo, data: &[u8]) -> Vec<u8> {
    let mut reply = format!("gen={} pid={} ", info.generation, info.pid).into_bytes();
    let room = 65_507usize.saturating_sub(reply.len());
    reply.extend_from_slice(&data[..data.len().min(room)]);
    reply
}

impl Options {
    /// The name of the `index`-th listener: `http`, `http-1`, `http-2`, …
    pub fn listener_name(index: usize) -> String {
        match index {
            0 => "http".to_owned(),
            n => format!("http-{n}"),
        }
    }

    /// The listeners to serve, by name: those of the --config file, else
    /// the --listen addresses named by [`Options::listener_name`].
    pub fn listeners(&self) -> Vec<(String, ListenAddr)> {
        match &self.named_listeners {
            Some(named) => named.clone(),
            None => self
                .listen
                .iter()
                .enumerate()
                .map(|(index, addr)| (Self::listener_name(index), addr.clone()))
                .collect(),
        }
    }

    /// The backend to run: the one named in --backend-file or else
    /// --backend, if compiled in; else the only one compiled in, or tokio.
    pub fn backend(&self) -> Result<&'static str, String> {
        let available = BACKENDS.join(", ");
        let from_file = match &self.backend_file {
            Some(path) => Some(read_backend_file(path)?),
            None => None,
        };
        match from_file.as_deref().or(self.backend.as_deref()) {
            Some(name) => BACKENDS
                .iter()
                .copied()
                .find(|b| *b == name)
                .ok_or_else(|| {
                    format!("backend {name:?} is not compiled in; available: {available}")
                }),
            None => match BACKENDS {
                [] => Err("no backend compiled in: enable a feature (tokio, smol, mio)".to_owned()),
                [only] => Ok(only),
                _ if BACKENDS.contains(&"tokio") => Ok("tokio"),
                [first, ..] => Ok(first),
            },
        }
    }
}

impl Options {
    /// The state version: from --state-version-file, else --state-version.
    pub fn state_version(&self) -> Result<u32, String> {
        let Some(path) = &self.state_version_file else {
            return Ok(self.state_version);
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(64).read_to_string(&mut text))
            .map_err(|e| format!("cannot read --state-version-file {}: {e}", path.display()))?;
        text.trim().parse().map_err(|_| {
            format!(
                "--state-version-file {} holds no version: {:?}",
                path.display(),
                text.trim()
            )
        })
    }
}

/// The backend name in `path`, trimmed. Read at start-up by every
/// generation, so it is how an operator picks the next generation's runtime.
fn read_backend_file(path: &Path) -> Result<String, String> {
    let error = |e: std::io::Error| format!("cannot read --backend-file {}: {e}", path.display());
    let mut text = String::new();
    // A name is short; the bound keeps a wrong path (a device) from hanging us.
    std::fs::File::open(path)
        .and_then(|file| file.take(4096).read_to_string(&mut text))
        .map_err(error)?;
    match text.trim() {
        "" => Err(format!(
            "--backend-file {} is empty: write a backend name in it",
            path.display()
        )),
        name => Ok(name.to_owned()),
    }
}

/// `on` or `off`.
fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{text:?} is neither on nor off")),
    }
}

/// A connection limit: a whole number, at least 1.
fn parse_max_connections(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("--max-connections must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a number of connections")),
    }
}

/// Parse `250ms`, `10s`, `2m`, or a bare number of seconds, at most
/// [`MAX_DURATION`](baton_core::duration::MAX_DURATION) (24 hours): one
/// parser for every flag and config key, so no timeout can overflow a
/// deadline.
pub use baton_core::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn max_connections_defaults_and_bounds() {
        assert_eq!(Options::parse_from(["baton-demo"]).max_connections, 10_000);
        let options = Options::parse_from(["baton-demo", "--max-connections", "2"]);
        assert_eq!(options.max_connections, 2);
        for bad in ["0", "-1", "many"] {
            assert!(
                Options::try_parse_from(["baton-demo", "--max-connections", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn handover_on_by_default_and_off_on_request() {
        assert!(Options::parse_from(["baton-demo"]).handover);
        assert!(Options::parse_from(["baton-demo", "--handover", "on"]).handover);
        assert!(!Options::parse_from(["baton-demo", "--handover", "off"]).handover);
        assert!(Options::try_parse_from(["baton-demo", "--handover", "yes"]).is_err());
        assert!(Options::try_parse_from(["baton-demo", "--handover"]).is_err());
    }

    #[test]
    fn unknown_backend_lists_the_available_ones() {
        let options = Options::parse_from(["baton-demo", "--backend", "nope"]);
        let err = options.backend().unwrap_err();
        assert!(
            err.contains("\"nope\"") && err.contains("available:"),
            "{err}"
        );
    }

    #[test]
    fn backend_file_overrides_backend() {
        let Some(&first) = BACKENDS.first() else {
            return; // nothing compiled in to choose
        };
        let path = std::env::temp_dir().join(format!("baton-cli-{}-backend", std::process::id()));
        let args = |file: &Path| {
            Options::parse_from([
                "baton-demo".as_ref(),
                "--backend".as_ref(),
                "nope".as_ref(),
                "--backend-file".as_ref(),
                file.as_os_str(),
            ])
        };
        std::fs::write(&path, format!(" {first}\n")).unwrap();
        assert_eq!(args(&path).backend(), Ok(first));
        std::fs::write(&path, "other\n").unwrap();
        let err = args(&path).backend().unwrap_err();
        assert!(
            err.contains("\"other\"") && err.contains("available:"),
            "{err}"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(args(&path).backend().unwrap_err().contains("is empty"));
        std::fs::remove_file(&path).unwrap();
        let err = args(&path).backend().unwrap_err();
        assert!(err.starts_with("cannot read --backend-file"), "{err}");
    }

    #[test]
    fn ballast_flag() {
        use crate::ballast::Size;
        assert_eq!(Options::parse_from(["baton-demo"]).ballast, Size(0));
        let options = Options::parse_from(["baton-demo", "--ballast", "1GiB"]);
        assert_eq!(options.ballast, Size(1 << 30));
        for bad in ["1TiB", "lots", "1.5GiB", "100GiB"] {
            let err = Options::try_parse_from(["baton-demo", "--ballast", bad]).unwrap_err();
            assert!(err.to_string().contains("--ballast"), "{bad}: {err}");
        }
    }

    #[test]
    fn listen_is_repeatable_with_a_default() {
        let options = Options::parse_from(["baton-demo"]);
        assert_eq!(options.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        let options = Options::parse_from([
            "baton-demo",
            "--listen",
            "127.0.0.1:1",
            "--listen",
            "unix:/tmp/x",
        ]);
        assert_eq!(options.listen.len(), 2);
        assert_eq!(Options::listener_name(1), "http-1");
    }
}
