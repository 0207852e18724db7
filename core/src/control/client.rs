//! The client side of the control socket: one blocking request per
//! connection, every wait bounded by the client's timeout.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::protocol::{self, Command, Upgraded};

/// Largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// Why a control request got no answer, or not the one wanted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Connecting to the socket failed: no server there (`ENOENT`,
    /// `ECONNREFUSED`), not allowed (`EACCES`), or its queue is full.
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// Sending the command failed.
    #[error("cannot send the command to the control socket {path}: {source}")]
    Send {
        /// The socket's path.
        path: PathBuf,
        /// The write error.
        #[source]
        source: io::Error,
    },
    /// Reading the answer failed.
    #[error("cannot read the answer from the control socket {path}: {source}")]
    Receive {
        /// The socket's path.
        path: PathBuf,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// The whole answer did not arrive within the client's timeout.
    #[error("no answer from the control socket {path} within {timeout:?}")]
    Timeout {
        /// The socket's path.
        path: PathBuf,
        /// The client's timeout.
        timeout: Duration,
    },
    /// The server answered `upgrade` with `error REASON`: the upgrade did
    /// not happen (or was refused) and the old process serves on.
    #[error("upgrade failed: {reason}")]
    UpgradeFailed {
        /// The server's reason, one line.
        reason: String,
    },
    /// The server answered another command with `error REASON` (say, the
    /// peer check refused this user).
    #[error("refused: {reason}")]
    Refused {
        /// The server's reason, one line.
        reason: String,
    },
    /// The answer is not one the protocol allows for the command (a server
    /// that is not baton's, or one that closed without answering).
    #[error("unexpected answer {answer:?}")]
    Malformed {
        /// The answer, lossily decoded.
        answer: String,
    },
    /// The answer exceeds what a control answer can be.
    #[error("the answer is longer than {limit} bytes")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// The command cannot be sent: empty, several lines or too long.
    #[error("invalid command {command:?}: one line of at most {} bytes", protocol::MAX_COMMAND - 1)]
    InvalidCommand {
        /// The command given.
        command: String,
    },
}

/// A client of a server's control socket (a server built on baton, started
/// with a control socket at `path`). Each call connects, sends one command
/// and reads the answer until the server closes, within the timeout
/// ([`Client::DEFAULT_TIMEOUT`] unless set).
///
/// ```no_run
/// use std::time::Duration;
/// use baton_core::control::{Client, ControlError};
///
/// let client = Client::new("/run/my-server/control").timeout(Duration::from_secs(60));
/// match client.upgrade() {
///     Ok(done) => println!("pid {} serves, ready after {} ms", done.pid, done.ready_ms),
///     Err(ControlError::UpgradeFailed { reason }) => eprintln!("old process serves on: {reason}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// How long a request may take unless [`Client::timeout`] says
    /// otherwise. An `upgrade` waits for the new process to be ready: give
    /// it more than the server's upgrade timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A client of the control socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client {
            path: path.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Bound each request (connect, send, the whole answer) by `timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The control socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Start an upgrade and wait for its outcome: the new process serves,
    /// or [`ControlError::UpgradeFailed`] with the server's reason (the old
    /// process serves on).
    pub fn upgrade(&self) -> Result<Upgraded, ControlError> {
        let answer = self.request(Command::Upgrade.as_str())?;
        if let Some(reason) = error_reason(&answer) {
            return Err(ControlError::UpgradeFailed { reason });
        }
        protocol::parse_outcome(&answer).map_err(|_| ControlError::Malformed { answer })
    }

    /// The server's status: its `key: value` lines (`pid: …` first), each
    /// ended by a newline.
    pub fn status(&self) -> Result<String, ControlError> {
        let answer = self.request(Command::Status.as_str())?;
        if let Some(reason) = error_reason(&answer) {
            return Err(ControlError::Refused { reason });
        }
        if !answer.starts_with("pid: ") || !answer.ends_with('\n') {
            return Err(ControlError::Malformed { answer });
        }
        Ok(answer)
    }

    /// Ask the server to stop gracefully (as `SIGTERM` does). Returns once
    /// it has answered that it stops; it may still be draining.
    pub fn stop(&self) -> Result<(), ControlError> {
        let answer = self.request(Command::Stop.as_str())?;
        if let Some(reason) = error_reason(&answer) {
            return Err(ControlError::Refused { reason });
        }
        if answer != protocol::STOPPING {
            return Err(ControlError::Malformed { answer });
        }
        Ok(())
    }

    /// Send `command` (one line, without its newline) and return the whole
    /// answer as the server wrote it, `error …` lines included.
    pub fn request(&self, command: &str) -> Result<String, ControlError> {
        if command.is_empty()
            || command.contains(['\n', '\r'])
            || command.len() >= protocol::MAX_COMMAND
        {
            return Err(ControlError::InvalidCommand {
                command: command.to_owned(),
            });
        }
        let deadline = Instant::now() + self.timeout;
        let mut stream = self.connect()?;
        let send = |source| ControlError::Send {
            path: self.path.clone(),
            source,
        };
        self.bound(&stream, deadline, UnixStream::set_write_timeout, send)?;
        match stream.write_all(format!("{command}\n").as_bytes()) {
            Ok(()) => {}
            Err(e) if is_timeout(&e) => return Err(self.timed_out()),
            Err(e) => return Err(send(e)),
        }
        let receive = |source| ControlError::Receive {
            path: self.path.clone(),
            source,
        };
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        // Bounded by the deadline and by MAX_ANSWER.
        loop {
            self.bound(&stream, deadline, UnixStream::set_read_timeout, receive)?;
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&chunk[..n]);
                    if answer.len() > MAX_ANSWER {
                        return Err(ControlError::TooLong { limit: MAX_ANSWER });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(self.timed_out()),
                Err(e) => return Err(receive(e)),
            }
        }
        String::from_utf8(answer).map_err(|e| ControlError::Malformed {
            answer: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Connect without waiting: a Unix socket connects at once or not at
    /// all, except when the server's queue is full, where a blocking
    /// connect would wait unbounded; that fails at once instead.
    fn connect(&self) -> Result<UnixStream, ControlError> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let connect = || -> io::Result<UnixStream> {
            let address = SockAddr::unix(&self.path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
            socket.set_nonblocking(true)?;
            match socket.connect(&address) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        e.kind(),
                        "its queue is full: the server does not accept connections",
                    ))
                }
                Err(e) => return Err(e),
            }
            socket.set_nonblocking(false)?;
            Ok(socket.into())
        };
        connect().map_err(|source| ControlError::Connect {
            path: self.path.clone(),
            source,
        })
    }

    /// Set a read or write timeout to what is left until `deadline`.
    fn bound(
        &self,
        stream: &UnixStream,
        deadline: Instant,
        set: fn(&UnixStream, Option<Duration>) -> io::Result<()>,
        error: impl Fn(io::Error) -> ControlError,
    ) -> Result<(), ControlError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        set(stream, Some(left)).map_err(error)
    }

    fn timed_out(&self) -> ControlError {
        ControlError::Timeout {
            path: self.path.clone(),
            timeout: self.timeout,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The reason of an `error REASON` answer.
fn error_reason(answer: &str) -> Option<String> {
    let line = answer.lines().next()?;
    line.strip_prefix("error ")
        .map(|reason| reason.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A socket path in a fresh directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("baton-client-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("control.sock")
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A server that answers one connection with `answer` once it has read
    /// a line, and returns the line it read.
    fn serve_once(path: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut session = protocol::Session::new();
            let mut received = Vec::new();
            let mut chunk = [0u8; 64];
            while let Ok(n @ 1..) = stream.read(&mut chunk) {
                received.extend_from_slice(&chunk[..n]);
                if session.push(&chunk[..n]) != protocol::Parsed::Incomplete {
                    break;
                }
            }
            stream.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(received).unwrap()
        })
    }

    #[test]
    fn upgrade_outcomes() {
        let dir = Dir::new("upgrade");
        let path = dir.socket();
        let server = serve_once(&path, "ok pid=7 generation=2 ready_ms=40\n");
        let done = Client::new(&path).upgrade().unwrap();
        assert_eq!(server.join().unwrap(), "upgrade\n");
        assert_eq!(
            done,
            Upgraded {
                pid: 7,
                generation: 2,
                ready_ms: 40
            }
        );
        std::fs::remove_file(&path).unwrap();
        let server = serve_once(&path, "error new process 9 exited (exit status 1)\n");
        let err = Client::new(&path).upgrade().unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(&err, ControlError::UpgradeFailed { reason }
                if reason == "new process 9 exited (exit status 1)"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "upgrade failed: new process 9 exited (exit status 1)"
        );
        std::fs::remove_file(&path).unwrap();
        let server = serve_once(&path, "");
        let err = Client::new(&path).upgrade().unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, ControlError::Malformed { .. }), "{err:?}");
    }

    #[test]
    fn status_and_stop() {
        let dir = Dir::new("status");
        let path = dir.socket();
        let lines = "pid: 1\ngeneration: 0\nbackend: mio\n";
        let server = serve_once(&path, lines);
        assert_eq!(Client::new(&path).status().unwrap(), lines);
        assert_eq!(server.join().unwrap(), "status\n");
        std::fs::remove_file(&path).unwrap();
        let server = serve_once(&path, "error permission denied: uid 5 is not allowed\n");
        let err = Client::new(&path).status().unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(&err, ControlError::Refused { reason }
                if reason == "permission denied: uid 5 is not allowed"),
            "{err:?}"
        );
        std::fs::remove_file(&path).unwrap();
        let server = serve_once(&path, protocol::STOPPING);
        Client::new(&path).stop().unwrap();
        assert_eq!(server.join().unwrap(), "stop\n");
        std::fs::remove_file(&path).unwrap();
        let server = serve_once(&path, "ok pid=1 generation=1 ready_ms=1\n");
        let err = Client::new(&path).stop().unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, ControlError::Malformed { .. }), "{err:?}");
    }

    #[test]
    fn raw_requests_return_the_answer_as_is() {
        let dir = Dir::new("raw");
        let path = dir.socket();
        let server = serve_once(&path, "error unknown command \"x\"\n");
        let answer = Client::new(&path).request("x").unwrap();
        assert_eq!(answer, "error unknown command \"x\"\n");
        assert_eq!(server.join().unwrap(), "x\n");
        let client = Client::new(&path);
        for bad in ["", "a\nb", "a\r", &"a".repeat(protocol::MAX_COMMAND)] {
            let err = client.request(bad).unwrap_err();
            assert!(
                matches!(err, ControlError::InvalidCommand { .. }),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn no_server_is_a_connect_error() {
        let dir = Dir::new("missing");
        let path = dir.socket();
        let err = Client::new(&path).status().unwrap_err();
        let ControlError::Connect { source, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        let message = err.to_string();
        assert!(
            message.starts_with("cannot connect to the control socket ") && !message.contains('\n'),
            "{message}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn a_silent_server_times_out() {
        let dir = Dir::new("silent");
        let path = dir.socket();
        // Accepted by the kernel, never answered.
        let _listener = UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let err = Client::new(&path)
            .timeout(Duration::from_millis(100))
            .status()
            .unwrap_err();
        assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err
            .to_string()
            .starts_with("no answer from the control socket"));
    }
}
