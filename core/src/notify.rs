//! systemd's readiness notification (`sd_notify(3)`), without libsystemd.
//!
//! When `NOTIFY_SOCKET` is set, the service manager waits for datagrams such
//! as `READY=1` on that Unix socket. baton sends, in order:
//!
//! - `READY=1` when generation 0 serves;
//! - `RELOADING=1` and `MONOTONIC_USEC=…` when an upgrade starts;
//! - `MAINPID=<new pid>` and `READY=1` when the new generation is ready, so
//!   systemd follows the new process (the service needs `NotifyAccess=all`
//!   or `main`: the old main process sends it);
//! - `READY=1` with a `STATUS=` reason when the upgrade failed and the old
//!   generation serves on;
//! - `STOPPING=1` at a graceful stop (not when exiting after an upgrade).
//!
//! Sending never blocks: the socket is non-blocking and a full queue is
//! reported as an error the caller may log and ignore.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable naming systemd's notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names, or `None` when it is unset (not
    /// run by systemd, or `Type=` is not `notify`).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        Self::from_value(std::env::var_os(NOTIFY_SOCKET))
    }

    fn from_value(value: Option<OsString>) -> io::Result<Option<Notifier>> {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let bytes = value.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // A leading '@' names a socket in the abstract namespace.
            Some(name) => abstract_addr(name)?,
            None if bytes.first() == Some(&b'/') => {
                SocketAddr::from_pathname(std::path::Path::new(&value))?
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET {value:?} is neither an absolute path nor @abstract"),
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Some(Notifier { socket, addr }))
    }

    /// Send one notification: newline-separated `KEY=VALUE` assignments.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets are Linux-only",
    ))
}

/// `MONOTONIC_USEC=` for `RELOADING=1`: systemd wants the time of the reload
/// on `CLOCK_MONOTONIC`, in microseconds.
pub fn monotonic_usec() -> u64 {
    crate::sys::monotonic_usec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_means_no_notifier() {
        assert!(Notifier::from_value(None).unwrap().is_none());
        assert!(Notifier::from_value(Some("".into())).unwrap().is_none());
    }

    #[test]
    fn relative_path_is_an_error() {
        assert!(Notifier::from_value(Some("relative/sock".into())).is_err());
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("baton-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_value(Some(path.clone().into()))
            .unwrap()
            .unwrap();
        notifier.notify("READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("baton-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let notifier = Notifier::from_value(Some(format!("@{name}").into()))
            .unwrap()
            .unwrap();
        notifier.notify("STOPPING=1").unwrap();
        let mut buf = [0u8; 16];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }
}
