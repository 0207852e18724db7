//! The control socket served from the mio loop: `batonctl upgrade|status|stop`
//! (the protocol is [`baton_core::control`]'s). Each connection is checked
//! (peer uid), reads one command within [`control::COMMAND_TIMEOUT`], waits
//! for the lifecycle's answer, writes it and closes. Each is a tracked
//! [`Connection`], busy until answered, so a drain waits for its answer.
//! At most [`MAX_SESSIONS`] are served at once; more wait in the socket's
//! queue.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use baton_core::control::{self, Parsed};
use baton_core::lifecycle::{ReplyTo, Request};
use baton_core::{Connection, Generation, ListenSocket, ListenerHandoff, Tracker};
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

/// Control connections served at once.
pub(crate) const MAX_SESSIONS: usize = 16;

/// How long writing an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control listener, as the generation hands it over.
struct ControlListener(UnixListener);

impl ListenerHandoff for ControlListener {
    fn from_listen_socket(socket: ListenSocket) -> io::Result<Self> {
        match socket {
            ListenSocket::Unix(listener) => Ok(ControlListener(UnixListener::from_std(listener))),
            _ => Err(io::Error::other("not a Unix stream socket")),
        }
    }
}

/// Open the control socket at `path` (mode 0600, inherited if passed).
pub(crate) fn open(
    generation: &Generation,
    path: &Path,
) -> Result<UnixListener, baton_core::Error> {
    let (listener, _origin) =
        generation.listen_private::<ControlListener>(control::LISTENER_NAME, path)?;
    Ok(listener.0)
}

/// The control socket again, after a resume.
pub(crate) fn reopen(generation: &Generation) -> Result<UnixListener, baton_core::Error> {
    Ok(generation
        .reopen::<ControlListener>(control::LISTENER_NAME)?
        .0)
}

/// Where a control connection is.
#[derive(Debug)]
enum State {
    /// Reading its command line.
    Reading(control::Session),
    /// Waiting for the lifecycle's answer.
    Waiting,
    /// Writing the answer.
    Writing { out: Vec<u8>, written: usize },
}

#[derive(Debug)]
struct Session {
    serial: u64,
    stream: UnixStream,
    conn: Connection,
    state: State,
    /// The answer for a refused peer, written once its command is read.
    refusal: Option<String>,
    /// Of reading the command, or writing the answer.
    deadline: Option<Instant>,
}

/// The control listener and its connections.
#[derive(Debug)]
pub(crate) struct Server {
    registry: Option<Registry>,
    first_token: Token,
    listener: Option<UnixListener>,
    sessions: Vec<Option<Session>>,
    next_serial: u64,
    /// Connections may wait in the queue: all slots were taken, or
    /// accepting backs off after an error.
    more: bool,
    paused_until: Option<Instant>,
    requests: Vec<(ReplyTo, Request)>,
}

impl Server {
    pub(crate) fn new(registry: Option<Registry>, first_token: Token) -> Self {
        Server {
            registry,
            first_token,
            listener: None,
            sessions: (0..MAX_SESSIONS).map(|_| None).collect(),
            next_serial: 0,
            more: false,
            paused_until: None,
            requests: Vec::new(),
        }
    }

    /// Serve `listener` (registered already).
    pub(crate) fn listen(&mut self, listener: UnixListener) {
        self.listener = Some(listener);
        self.paused_until = None;
    }

    /// The stop: no new control connections; those open are answered.
    pub(crate) fn close_listener(&mut self, registry: &Registry) {
        if let Some(mut listener) = self.listener.take() {
            let _ = registry.deregister(&mut listener);
        }
        self.more = false;
        self.paused_until = None;
    }

    /// Accept what waits, while a slot is free.
    pub(crate) fn accept(&mut self, tracker: &Tracker) {
        self.more = false;
        if self.paused_until.is_some() {
            return;
        }
        // Bounded by the slots.
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let Some(slot) = self.sessions.iter().position(Option::is_none) else {
                // Accepted again when a session ends.
                self.more = true;
                return;
            };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if baton_core::server::is_resource_exhaustion(&e) => {
                    log::warn!("control accept: {e}; backing off");
                    self.paused_until = Some(Instant::now() + baton_core::server::ACCEPT_BACKOFF);
                    return;
                }
                Err(_) => continue,
            };
            self.start(slot, stream, tracker);
        }
    }

    fn start(&mut self, slot: usize, mut stream: UnixStream, tracker: &Tracker) {
        use std::os::fd::AsFd;
        let mut conn = tracker.track();
        conn.set_busy();
        // Check the peer first, but read its command either way: answering
        // before it is read would make the close reset the connection, and
        // the refused client would see a reset instead of the reason.
        let refusal = control::check_peer(stream.as_fd()).err().map(|refusal| {
            log::warn!("{}", refusal.log);
            refusal.answer
        });
        let token = Token(self.first_token.0 + slot);
        if let Some(registry) = &self.registry {
            if let Err(e) =
                registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            {
                log::warn!("control: cannot register a connection: {e}");
                return;
            }
        }
        self.next_serial += 1;
        self.sessions[slot] = Some(Session {
            serial: self.next_serial,
            stream,
            conn,
            state: State::Reading(control::Session::new()),
            refusal,
            deadline: Some(Instant::now() + control::COMMAND_TIMEOUT),
        });
        self.drive(slot);
    }

    /// Readiness of the connection under `token`.
    pub(crate) fn ready(&mut self, token: Token, tracker: &Tracker) {
        if let Some(slot) = token.0.checked_sub(self.first_token.0) {
            self.drive(slot);
        }
        if self.more {
            self.accept(tracker);
        }
    }

    /// Make the progress readiness allows (mio reports edges: reads and
    /// writes go on until they would block).
    fn drive(&mut self, slot: usize) {
        let Some(Some(session)) = self.sessions.get_mut(slot) else {
            return;
        };
        let mut chunk = [0u8; control::MAX_COMMAND];
        // Bounded: the session refuses more than MAX_COMMAND bytes, and an
        // answer is finite.
        for _ in 0..1024 {
            match &mut session.state {
                State::Reading(parser) => match session.stream.read(&mut chunk) {
                    Ok(0) => {
                        // EOF before a command: answered as a timeout.
                        let answer = session.refusal.take().unwrap_or_else(control::timed_out);
                        session.write(answer);
                    }
                    Ok(n) => match parser.push(&chunk[..n]) {
                        Parsed::Incomplete => {}
                        Parsed::Invalid(answer) => {
                            let answer = session.refusal.take().unwrap_or(answer);
                            session.write(answer);
                        }
                        Parsed::Command(command) => match session.refusal.take() {
                            Some(answer) => session.write(answer),
                            None => {
                                let request = match command {
                                    control::Command::Upgrade => Request::Upgrade,
                                    control::Command::Status => Request::Status,
                                    control::Command::Stop => Request::Stop,
                                    other => {
                                        session.write(control::error_line(&format!(
                                            "command {other} is not served by baton-mio"
                                        )));
                                        continue;
                                    }
                                };
                                session.state = State::Waiting;
                                session.deadline = None;
                                self.requests.push((ReplyTo(session.serial), request));
                                return;
                            }
                        },
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return self.end(slot),
                },
                State::Waiting => return,
                State::Writing { out, written } => {
                    if *written == out.len() {
                        let _ = session.stream.shutdown(std::net::Shutdown::Write);
                        // Answered: a drain counts it as finished, not forced.
                        session.conn.set_idle();
                        return self.end(slot);
                    }
                    match session.stream.write(&out[*written..]) {
                        Ok(0) => return self.end(slot),
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.end(slot),
                    }
                }
            }
        }
    }

    /// Close the session in `slot`.
    fn end(&mut self, slot: usize) {
        if let Some(mut session) = self.sessions.get_mut(slot).and_then(Option::take) {
            if let Some(registry) = &self.registry {
                let _ = registry.deregister(&mut session.stream);
            }
        }
    }

    /// The commands read since the last call, for the lifecycle.
    pub(crate) fn take_requests(&mut self) -> Vec<(ReplyTo, Request)> {
        std::mem::take(&mut self.requests)
    }

    /// The lifecycle's answer for `reply`.
    pub(crate) fn answer(&mut self, reply: ReplyTo, text: String) {
        let slot = self.sessions.iter().position(|s| {
            s.as_ref()
                .is_some_and(|s| s.serial == reply.0 && matches!(s.state, State::Waiting))
        });
        if let Some(slot) = slot {
            if let Some(Some(session)) = self.sessions.get_mut(slot) {
                session.write(text);
            }
            self.drive(slot);
        }
    }

    /// The drain deadline: sessions still waiting for an answer get
    /// "the server is stopping".
    pub(crate) fn force(&mut self) {
        for slot in 0..self.sessions.len() {
            if let Some(Some(session)) = self.sessions.get_mut(slot) {
                if matches!(session.state, State::Waiting) {
                    session.write(control::error_line("the server is stopping"));
                    self.drive(slot);
                }
            }
        }
    }

    /// Deadlines that passed: a command not read in time is answered so, a
    /// write that takes too long is given up; the accept back-off ends.
    pub(crate) fn expire(&mut self, now: Instant, tracker: &Tracker) {
        for slot in 0..self.sessions.len() {
            let Some(Some(session)) = self.sessions.get_mut(slot) else {
                continue;
            };
            if session.deadline.is_none_or(|at| at > now) {
                continue;
            }
            match session.state {
                State::Reading(_) => {
                    let answer = session.refusal.take().unwrap_or_else(control::timed_out);
                    session.write(answer);
                    self.drive(slot);
                }
                _ => {
                    session.conn.set_idle();
                    self.end(slot);
                }
            }
        }
        if self.paused_until.is_some_and(|at| at <= now) {
            self.paused_until = None;
            self.more = true;
        }
        if self.more {
            self.accept(tracker);
        }
    }

    /// The nearest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.sessions
            .iter()
            .flatten()
            .filter_map(|s| s.deadline)
            .chain(self.paused_until)
            .min()
    }

    /// The end: drop every session.
    pub(crate) fn close_all(&mut self) {
        for slot in 0..self.sessions.len() {
            self.end(slot);
        }
    }
}

impl Session {
    fn write(&mut self, answer: String) {
        self.state = State::Writing {
            out: answer.into_bytes(),
            written: 0,
        };
        self.deadline = Some(Instant::now() + WRITE_TIMEOUT);
    }
}
