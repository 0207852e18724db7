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

/// Most bytes of a `STATUS=` value that [`Notifier::notify`] sends; a
/// longer one is cut (on a character boundary) and ends with `...`.
pub const MAX_STATUS: usize = 512;

/// Largest notification [`Notifier::notify`] sends: systemd reads at most
/// `NOTIFY_BUFFER_MAX` (`PIPE_BUF`, 4096) bytes per datagram and ignores
/// a longer one whole, `READY=1` included.
pub const MAX_MESSAGE: usize = 4096;

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
    ///
    /// The `STATUS=` value is free text (it can carry a child's error
    /// report), so it is made to fit whatever the caller passes: a line
    /// after it that is not an assignment continues it (newlines and other
    /// control characters become spaces), and it is cut to [`MAX_STATUS`]
    /// bytes. If the datagram would still be longer than [`MAX_MESSAGE`],
    /// which systemd would drop whole, it is sent without `STATUS=`, so
    /// `READY=1` and the other states always arrive. A message too long
    /// even without it is an [`io::ErrorKind::InvalidInput`] error and
    /// nothing is sent.
    ///
    /// A line of status text that looks like an assignment (`KEY=…`) cannot
    /// be told from one: pass text from elsewhere (a child's error report)
    /// to [`notify_status`](Self::notify_status) instead.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.send(&message(state, None)?)
    }

    /// Send the assignments `state` (as [`notify`](Self::notify) does) and
    /// `status` as the `STATUS=` text, whatever it contains: on one line,
    /// at most [`MAX_STATUS`] bytes, left out if the datagram would be
    /// longer than [`MAX_MESSAGE`]. No text in `status` can add an
    /// assignment.
    pub fn notify_status(&self, state: &str, status: &str) -> io::Result<()> {
        self.send(&message(state, Some(status))?)
    }

    fn send(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(drop)
    }
}

/// The datagram [`Notifier::notify`] sends for `state`, with `status` as
/// a last `STATUS=` assignment when given.
fn message(state: &str, status: Option<&str>) -> io::Result<String> {
    // (key, value) in order; lines that are not assignments and follow a
    // `STATUS=` line are part of its text.
    let mut lines: Vec<(&str, String)> = Vec::new();
    for line in state.split('\n') {
        match line.split_once('=') {
            Some((key, value)) if is_key(key) => lines.push((key, value.to_owned())),
            _ => match lines.last_mut() {
                Some(("STATUS", status)) => {
                    status.push(' ');
                    status.push_str(line);
                }
                // Not ours to fix: systemd ignores it and says so.
                _ if !line.is_empty() => lines.push(("", line.to_owned())),
                _ => {}
            },
        }
    }
    if let Some(status) = status {
        lines.retain(|(key, _)| *key != "STATUS");
        lines.push(("STATUS", status.to_owned()));
    }
    for (key, value) in &mut lines {
        if *key == "STATUS" {
            *value = cap_status(value);
        }
    }
    let join = |with_status: bool| {
        let kept: Vec<String> = lines
            .iter()
            .filter(|(key, _)| with_status || *key != "STATUS")
            .map(|(key, value)| match *key {
                "" => value.clone(),
                key => format!("{key}={value}"),
            })
            .collect();
        kept.join("\n")
    };
    let message = join(true);
    if message.len() <= MAX_MESSAGE {
        return Ok(message);
    }
    let message = join(false);
    if message.len() <= MAX_MESSAGE {
        return Ok(message);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "notification of {} bytes is longer than the {MAX_MESSAGE} systemd reads",
            message.len()
        ),
    ))
}

/// An assignment's key, as systemd writes them: `READY`, `MAINPID`,
/// `X_CUSTOM`…
fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// `status` on one line and at most [`MAX_STATUS`] bytes, cut on a
/// character boundary and ending with `...` when cut.
fn cap_status(status: &str) -> String {
    let one_line: String = status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() <= MAX_STATUS {
        return one_line;
    }
    const ELLIPSIS: &str = "...";
    let mut end = MAX_STATUS - ELLIPSIS.len();
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &one_line[..end])
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

    /// A bound datagram socket in a fresh directory, and a notifier for it.
    fn pair(label: &str) -> (UnixDatagram, Notifier, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("baton-notify-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let notifier = Notifier::from_value(Some(path.into())).unwrap().unwrap();
        (server, notifier, dir)
    }

    /// The one datagram waiting on `server` (sent before this is called).
    fn received(server: &UnixDatagram) -> String {
        let mut buf = vec![0u8; 64 * 1024];
        let n = server.recv(&mut buf).expect("a datagram was sent");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
    }

    fn status_of(message: &str) -> Option<&str> {
        message.lines().find_map(|l| l.strip_prefix("STATUS="))
    }

    #[test]
    fn a_long_status_is_capped_and_ready_arrives() {
        let (server, notifier, dir) = pair("long");
        // What a child's error report can put there: 4 KiB and more.
        let reason = "x".repeat(8 * 1024);
        notifier
            .notify(&format!(
                "READY=1\nSTATUS=serving; last upgrade failed: {reason}"
            ))
            .unwrap();
        let message = received(&server);
        assert!(message.len() <= MAX_MESSAGE, "{} bytes", message.len());
        assert!(message.starts_with("READY=1\n"), "{message:.80}");
        let status = status_of(&message).expect("STATUS kept, capped");
        assert!(status.len() <= MAX_STATUS, "{} bytes", status.len());
        assert!(status.starts_with("serving; last upgrade failed: xxx"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_status_is_cut_on_a_char_boundary_and_kept_on_one_line() {
        let (server, notifier, dir) = pair("chars");
        notifier
            .notify(&format!("STATUS={}\nREADY=1", "é".repeat(MAX_STATUS)))
            .unwrap();
        let message = received(&server);
        let status = status_of(&message).unwrap();
        assert!(status.len() <= MAX_STATUS && status.starts_with("éé"));
        assert!(message.lines().any(|l| l == "READY=1"), "{message}");

        notifier
            .notify("READY=1\nSTATUS=first line\nsecond line\r\n\tthird")
            .unwrap();
        assert_eq!(
            received(&server),
            "READY=1\nSTATUS=first line second line   third"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_oversized_message_is_sent_without_its_status() {
        let (server, notifier, dir) = pair("oversized");
        let big = "y".repeat(MAX_MESSAGE - 200);
        notifier
            .notify(&format!(
                "MAINPID=42\nREADY=1\nX_BIG={big}\nSTATUS={}",
                "z".repeat(400)
            ))
            .unwrap();
        let message = received(&server);
        assert!(message.len() <= MAX_MESSAGE, "{} bytes", message.len());
        assert!(message.starts_with("MAINPID=42\nREADY=1\nX_BIG=yyy"));
        assert_eq!(status_of(&message), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_message_too_large_even_without_status_is_an_error_not_a_lost_datagram() {
        let (server, notifier, dir) = pair("too-large");
        let big = "y".repeat(MAX_MESSAGE);
        let err = notifier
            .notify(&format!("READY=1\nX_BIG={big}"))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        let mut buf = [0u8; 16];
        assert_eq!(
            server.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing was sent"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_text_cannot_add_assignments() {
        let (server, notifier, dir) = pair("text");
        notifier
            .notify_status("READY=1", "child said:\nMAINPID=1\nSTOPPING=1")
            .unwrap();
        assert_eq!(
            received(&server),
            "READY=1\nSTATUS=child said: MAINPID=1 STOPPING=1"
        );
        notifier
            .notify_status("READY=1\nSTATUS=replaced", &"w".repeat(MAX_MESSAGE))
            .unwrap();
        let message = received(&server);
        assert!(message.starts_with("READY=1\nSTATUS=www") && message.ends_with("..."));
        assert_eq!(status_of(&message).unwrap().len(), MAX_STATUS);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn short_messages_are_sent_as_they_are() {
        let (server, notifier, dir) = pair("short");
        let state =
            "RELOADING=1\nMONOTONIC_USEC=12345\nSTATUS=upgrading: waiting for new process 7";
        notifier.notify(state).unwrap();
        assert_eq!(received(&server), state);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn any_status_text_fits_and_ready_is_never_lost(status in "(?s).{0,3000}", repeat in 0usize..4) {
            let status = status.repeat(repeat);
            let message = message("MAINPID=9\nREADY=1", Some(&status)).unwrap();
            proptest::prop_assert!(message.len() <= MAX_MESSAGE);
            proptest::prop_assert!(message.starts_with("MAINPID=9\nREADY=1\nSTATUS="));
            let sent = status_of(&message).unwrap_or_default();
            proptest::prop_assert!(sent.len() <= MAX_STATUS);
            // No text can add a line (an assignment).
            proptest::prop_assert_eq!(message.lines().count(), 3);
        }

        #[test]
        fn notify_never_panics_and_sends_what_fits(state in "(?s).{0,3000}", repeat in 0usize..4) {
            let state = format!("READY=1\nSTATUS={}", state.repeat(repeat));
            match message(&state, None) {
                Ok(message) => {
                    proptest::prop_assert!(message.len() <= MAX_MESSAGE);
                    proptest::prop_assert!(message.starts_with("READY=1\n") || message == "READY=1");
                    if let Some(sent) = status_of(&message) {
                        proptest::prop_assert!(sent.len() <= MAX_STATUS);
                    }
                }
                // Only when the text held assignments too large on their own.
                Err(e) => proptest::prop_assert_eq!(e.kind(), io::ErrorKind::InvalidInput),
            }
        }
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }
}
