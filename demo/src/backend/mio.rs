//! The demo server over baton-mio: one thread, one `mio::Poll`, and every
//! connection an explicit state machine driving [`crate::http`]
//! (reading → handling → writing → closing).
//!
//! It behaves as the tokio server does, line for line in the log: after a
//! stop, a request in progress is finished and answered with
//! `Connection: close`, an idle connection waits `--idle-grace` for one last
//! request, and what is left at `--drain-timeout` is cut. Every wait is a
//! deadline in a timer heap, so an idle server blocks in `poll` until the
//! nearest one (or forever).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use baton_mio::{
    Baton, Config, Connection, ConnectionState, Event, ListenAddr, ListenerId, Stream, UpgradeError,
};
use mio::{Interest, Poll, Registry, Token};

use crate::cli::Options;
use crate::control::{self, Memory, Parsed};
use crate::events::{self, Events};
use crate::http::{self, Action, RequestReader, Response, ServerInfo};
use crate::Failed;

const BACKEND: &str = "mio";
/// Baton takes tokens `0..TOKENS`; connection `n` is `FIRST_CONN + n`.
const FIRST_CONN: usize = baton_mio::TOKENS;
/// Steps (a read, a request, a state change) one connection may take per
/// turn of the loop, so a client pipelining without pause cannot starve
/// the others; the rest waits for the next turn.
const STEPS_PER_TURN: u32 = 64;
/// Control connection `n` is `FIRST_CONTROL + n`, far above the HTTP ones.
const FIRST_CONTROL: usize = usize::MAX / 2;
/// The `--udp` socket, between the HTTP and the control connections.
const UDP: Token = Token(FIRST_CONTROL - 1);

/// Serve until upgraded or stopped, then drain. Errors are logged.
pub fn run(options: &Options) -> Result<(), Failed> {
    let mut poll =
        Poll::new().map_err(|e| events::fatal(format_args!("cannot create the mio poll: {e}")))?;
    let mut config = Config::default().upgrade_timeout(options.upgrade_timeout);
    if let Some(path) = &options.next_binary {
        config = config.program(path);
    }
    if let Some(path) = &options.pid_file {
        config = config.pid_file(path);
    }
    let mut baton = Baton::new(config, poll.registry(), Token(0)).map_err(events::fatal)?;
    let events = Events::new(baton.generation(), BACKEND);
    events.install_as_logger();
    let fail = |baton: &Baton, message: String| {
        events.emit(format_args!("error: {message}"));
        // Tell the previous generation why, so its upgrade fails with it.
        let _ = baton.report_error(&message);
        Failed
    };

    for (name, addr) in &options.listeners() {
        let (id, origin) = match baton.listen_with_origin(name, addr) {
            Ok(listener) => listener,
            Err(e) => return Err(fail(&baton, e.to_string())),
        };
        let local = baton
            .listener(id)
            .and_then(|l| l.local_addr().ok())
            .unwrap_or_else(|| addr.to_string());
        let origin = match origin {
            baton_mio::Origin::Inherited => "inherited",
            baton_mio::Origin::Bound => "bound",
        };
        events.emit(format_args!("listening on {local} ({name}, {origin})"));
    }
    let control_id = match &options.control {
        Some(path) => {
            let addr = ListenAddr::Unix(path.clone());
            let (id, origin) = match baton.listen_with_origin(control::LISTENER_NAME, &addr) {
                Ok(listener) => listener,
                Err(e) => return Err(fail(&baton, e.to_string())),
            };
            let origin = match origin {
                baton_mio::Origin::Inherited => "inherited",
                baton_mio::Origin::Bound => {
                    if let Err(e) = control::restrict(path) {
                        return Err(fail(&baton, e.to_string()));
                    }
                    "bound"
                }
            };
            events.emit(format_args!(
                "listening on unix:{} ({}, {origin})",
                path.display(),
                control::LISTENER_NAME
            ));
            Some(id)
        }
        None => None,
    };
    let info = ServerInfo {
        pid: std::process::id(),
        generation: baton.generation(),
        backend: BACKEND,
    };
    let mut udp = match options.udp {
        Some(addr) => {
            let (socket, origin) = match baton.datagram(crate::cli::UDP_NAME, addr) {
                Ok(datagram) => datagram,
                Err(e) => return Err(fail(&baton, e.to_string())),
            };
            let local = socket
                .local_addr()
                .map_or_else(|_| addr.to_string(), |a| a.to_string());
            let origin = match origin {
                baton_mio::Origin::Inherited => "inherited",
                baton_mio::Origin::Bound => "bound",
            };
            events.emit(format_args!(
                "listening on udp:{local} ({}, {origin})",
                crate::cli::UDP_NAME
            ));
            let registry = match poll.registry().try_clone() {
                Ok(registry) => registry,
                Err(e) => return Err(fail(&baton, format!("cannot clone the mio registry: {e}"))),
            };
            let mut udp = Udp::new(registry, info.clone(), events.clone());
            if let Err(e) = udp.serve(socket) {
                return Err(fail(&baton, format!("udp: {e}")));
            }
            Some(udp)
        }
        None => None,
    };
    let registry = match poll.registry().try_clone() {
        Ok(registry) => registry,
        Err(e) => return Err(fail(&baton, format!("cannot clone the mio registry: {e}"))),
    };
    if let Err(e) = baton.handle_signals() {
        return Err(fail(&baton, format!("cannot handle signals: {e}")));
    }
    let controls_registry = match poll.registry().try_clone() {
        Ok(registry) => registry,
        Err(e) => return Err(fail(&baton, format!("cannot clone the mio registry: {e}"))),
    };
    match baton.ready() {
        Ok(()) => {}
        // Another live process owns the PID file: refuse to start, and tell
        // the previous generation why (its upgrade fails, it serves on).
        Err(e @ baton_core::Error::PidFile(_)) => return Err(fail(&baton, e.to_string())),
        Err(e) => events.emit(format_args!("warning: {e}; serving anyway")),
    }
    events.emit("serving");
    let memory = Memory::new(baton.generation(), BACKEND);
    let mut controls = Controls::new(controls_registry, options.write_timeout, events.clone());

    let mut server = Server::new(registry, options, info);
    let mut ready = mio::Events::with_capacity(1024);
    // Listeners left with clients waiting at --max-connections.
    let mut held: Vec<ListenerId> = Vec::new();
    loop {
        let timeout = earliest(
            earliest(baton.next_timeout(), server.next_timeout()),
            controls.next_timeout(),
        );
        match poll.poll(&mut ready, timeout) {
            Ok(()) => {}
            // A signal arrived; its pipe is readable on the next poll.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                events.emit(format_args!("error: poll: {e}"));
                return Err(Failed);
            }
        }
        baton.process(&ready);
        while let Some(event) = baton.next_event() {
            match event {
                Event::Accept { listener } if Some(listener) != control_id => {
                    accept_http(&mut baton, listener, &mut server, &events, &mut held);
                }
                Event::Accept { listener } => loop {
                    match baton.accept(listener) {
                        Ok(Some((stream, conn))) => controls.add(stream, conn),
                        Ok(None) => break,
                        // EMFILE and friends: baton pauses the listener.
                        Err(e) => {
                            events.emit(format_args!("warning: accept: {e}; backing off"));
                            break;
                        }
                    }
                },
                Event::Upgrade => {
                    begin_upgrade(&mut baton, &memory, &events, &mut controls, None);
                }
                Event::UpgradeDone(result) => {
                    let line = events.upgrade_outcome(&result);
                    memory.record(&line);
                    // Answered before the drain starts: the old generation
                    // exits only once the control connection is closed.
                    controls.answer_waiting(&line);
                }
                Event::Shutdown => {
                    events.emit("stopping: signal received");
                    baton.stop();
                }
                Event::Stop { .. } => {
                    events.emit(format_args!(
                        "draining {} connections",
                        baton.tracker().open()
                    ));
                    // After an upgrade, serve again if the new generation dies
                    // while this one drains.
                    let watch = options.successor_watch;
                    if let Err(e) = baton.drain_watching(options.drain_timeout, watch) {
                        events.emit(format_args!("warning: {e}; draining without watching"));
                        baton.drain(options.drain_timeout);
                    }
                    server.stop();
                    // The next generation reads the rest of the shared queue.
                    if let Some(udp) = udp.as_mut() {
                        udp.stop();
                    }
                }
                Event::Resumed { successor, status } => {
                    events.emit(format_args!(
                        "resumed: new generation {successor} ended ({status}) while this one drained; serving again"
                    ));
                    if let Some(udp) = udp.as_mut() {
                        let reopened = baton
                            .reopen_datagram(crate::cli::UDP_NAME)
                            .map_err(|e| e.to_string())
                            .and_then(|socket| udp.serve(socket).map_err(|e| e.to_string()));
                        if let Err(e) = reopened {
                            events.emit(format_args!("error: udp: {e}"));
                        }
                    }
                }
                Event::ForceClose => {
                    server.close_all();
                    controls.close_all();
                }
                Event::Drained(report) => {
                    events.emit(format_args!("drained: {report}"));
                    events.emit("exit");
                    return Ok(());
                }
                _ => {}
            }
        }
        server.resume();
        for event in ready.iter().filter(|e| !baton.owns(e.token())) {
            if event.token() == UDP {
                if let Some(udp) = udp.as_mut() {
                    udp.ready();
                }
            } else if event.token().0 >= FIRST_CONTROL {
                controls.ready(event.token());
            } else {
                server.ready(event);
            }
        }
        server.expire(Instant::now());
        controls.expire(Instant::now());
        // Connections closed: accept again on the listeners held at the limit.
        if !held.is_empty() && baton.tracker().open() < options.max_connections {
            for listener in std::mem::take(&mut held) {
                accept_http(&mut baton, listener, &mut server, &events, &mut held);
            }
        }
        // Control connections that asked for an upgrade, or their status.
        for (slot, command) in controls.take_requests() {
            match command {
                control::Command::Upgrade => {
                    begin_upgrade(&mut baton, &memory, &events, &mut controls, Some(slot));
                }
                control::Command::Stop => controls.answer(slot, control::stop(&events)),
                control::Command::Status => {
                    let tracker = baton.tracker();
                    let answer = memory.status(tracker.open(), tracker.busy()).answer();
                    controls.answer(slot, answer);
                }
            }
        }
    }
}

/// The `--udp` echo: registered under [`UDP`] while this generation serves.
struct Udp {
    registry: Registry,
    socket: Option<mio::net::UdpSocket>,
    info: ServerInfo,
    events: Events,
    buf: Vec<u8>,
}

impl Udp {
    fn new(registry: Registry, info: ServerInfo, events: Events) -> Self {
        Udp {
            registry,
            socket: None,
            info,
            events,
            buf: vec![0; 65_536],
        }
    }

    /// Serve `socket` (from the generation): register it under [`UDP`].
    /// Datagrams already queued are reported by the registration.
    fn serve(&mut self, socket: std::net::UdpSocket) -> io::Result<()> {
        let mut socket = mio::net::UdpSocket::from_std(socket);
        self.registry
            .register(&mut socket, UDP, Interest::READABLE)?;
        self.socket = Some(socket);
        Ok(())
    }

    /// Echo every datagram waiting (readiness is edge-triggered). A
    /// datagram received is always answered, unless the send buffer is
    /// full: that reply is dropped, as UDP may.
    fn ready(&mut self) {
        let Some(socket) = self.socket.as_ref() else {
            return;
        };
        loop {
            let (len, peer) = match socket.recv_from(&mut self.buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ECONNREFUSED from the ICMP answer to an earlier reply
                // concerns that peer only.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    self.events.emit(format_args!("warning: udp: {e}"));
                    return;
                }
            };
            let reply = crate::cli::udp_echo(&self.info, &self.buf[..len]);
            match socket.send_to(&reply, peer) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self
                    .events
                    .emit(format_args!("warning: udp reply to {peer}: {e}")),
            }
        }
    }

    /// The stop: deregister and drop this handle. The generation's own copy
    /// keeps the socket open for the next generation (and a resume).
    fn stop(&mut self) {
        if let Some(mut socket) = self.socket.take() {
            let _ = self.registry.deregister(&mut socket);
        }
    }
}

/// Accept HTTP connections on `listener` until none is waiting. At
/// --max-connections it stops and records the listener in `held`: the
/// clients wait in the kernel's accept queue (backpressure, not a refusal),
/// and the loop accepts again once a connection closes. The listener's
/// readiness is edge-triggered, so leaving it unaccepted cannot spin.
fn accept_http(
    baton: &mut Baton,
    listener: ListenerId,
    server: &mut Server<'_>,
    events: &Events,
    held: &mut Vec<ListenerId>,
) {
    loop {
        if baton.tracker().open() >= server.ctx.options.max_connections {
            if !held.contains(&listener) {
                held.push(listener);
            }
            return;
        }
        match baton.accept(listener) {
            Ok(Some((stream, conn))) => server.add(stream, conn),
            Ok(None) => return,
            // EMFILE and friends: baton pauses the listener.
            Err(e) => {
                events.emit(format_args!("warning: accept: {e}; backing off"));
                return;
            }
        }
    }
}

/// Start an upgrade (SIGHUP, or the control connection in `slot`). Its
/// outcome comes as [`Event::UpgradeDone`]; if it cannot start, that is
/// logged and answered now.
fn begin_upgrade(
    baton: &mut Baton,
    memory: &Memory,
    events: &Events,
    controls: &mut Controls,
    slot: Option<(usize, u64)>,
) {
    match baton.start_upgrade() {
        Ok(pid) => {
            events.emit(format_args!("upgrade started: new process {pid}"));
            if let Some(slot) = slot {
                controls.wait_for_outcome(slot);
            }
        }
        Err(e) => {
            events.emit(format_args!("upgrade failed: {e}; still serving"));
            let line = control::outcome_line(Err(&e.to_string()));
            if !matches!(
                e,
                UpgradeError::AlreadyRunning { .. } | UpgradeError::Stopping
            ) {
                memory.record(&line);
            }
            if let Some(slot) = slot {
                controls.answer(slot, format!("{line}\n"));
            }
        }
    }
}

/// The control connections ([`crate::control`]): each reads one command,
/// is answered, and closes. Tracked like HTTP connections, so a drain waits
/// for an answer in flight; few, so deadlines are found by a scan.
struct Controls {
    registry: Registry,
    conns: Vec<Option<ControlConn>>,
    free: Vec<usize>,
    next_serial: u64,
    /// `(slot, serial)` and command of connections whose command was read.
    requests: Vec<((usize, u64), control::Command)>,
    write_timeout: Duration,
    events: Events,
}

/// Where a control connection is.
enum ControlState {
    /// Reading the command line, until the command deadline.
    Reading,
    /// Waiting for the main loop: a status, or (`upgrade`) the outcome of
    /// the upgrade it started.
    Waiting { upgrade: bool },
    /// Writing `out`, until the write deadline.
    Writing,
    /// FIN sent: reading until the client closes too (bounded).
    Closing,
}

struct ControlConn {
    serial: u64,
    stream: Stream,
    _conn: Connection,
    state: ControlState,
    buf: Vec<u8>,
    /// The answer for a refused peer, sent once its command is read.
    refusal: Option<String>,
    out: Vec<u8>,
    written: usize,
    deadline: Option<Instant>,
}

impl Controls {
    fn new(registry: Registry, write_timeout: Duration, events: Events) -> Self {
        Controls {
            registry,
            conns: Vec::new(),
            free: Vec::new(),
            next_serial: 0,
            requests: Vec::new(),
            write_timeout,
            events,
        }
    }

    fn add(&mut self, mut stream: Stream, mut conn: Connection) {
        use std::os::fd::AsFd;
        conn.set_busy();
        // Checked now, but the command is read either way: answering before
        // it is read would make the close reset the connection.
        let peer = match &stream {
            Stream::Unix(unix) => control::check_peer(unix.as_fd()),
            Stream::Tcp(_) => return,
        };
        let refusal = peer.err().map(|refusal| {
            self.events.emit(&refusal.log);
            refusal.answer
        });
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = Token(FIRST_CONTROL + slot);
        if self
            .registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.free.push(slot);
            return;
        }
        self.next_serial += 1;
        self.conns[slot] = Some(ControlConn {
            serial: self.next_serial,
            stream,
            _conn: conn,
            state: ControlState::Reading,
            buf: Vec::new(),
            refusal,
            out: Vec::new(),
            written: 0,
            deadline: Some(Instant::now() + control::COMMAND_TIMEOUT),
        });
        self.drive(slot);
    }

    fn ready(&mut self, token: Token) {
        if let Some(slot) = token.0.checked_sub(FIRST_CONTROL) {
            self.drive(slot);
        }
    }

    /// Make the progress readiness allows (mio reports edges: every read
    /// and write goes on until it would block).
    fn drive(&mut self, slot: usize) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        let mut chunk = [0u8; control::MAX_COMMAND];
        // Bounded: each turn reads (at most MAX_COMMAND + a chunk) or writes.
        for _ in 0..64 {
            match conn.state {
                ControlState::Reading => match control::parse(&conn.buf) {
                    Parsed::Incomplete => match conn.stream.read(&mut chunk) {
                        Ok(0) => return self.remove(slot),
                        Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.remove(slot),
                    },
                    Parsed::Invalid(answer) => {
                        let answer = conn.refusal.take().unwrap_or(answer);
                        conn.write(answer, self.write_timeout);
                    }
                    Parsed::Command(command) => match conn.refusal.take() {
                        Some(answer) => conn.write(answer, self.write_timeout),
                        None => {
                            conn.state = ControlState::Waiting { upgrade: false };
                            conn.deadline = None;
                            self.requests.push(((slot, conn.serial), command));
                            return;
                        }
                    },
                },
                ControlState::Waiting { .. } => return,
                ControlState::Writing => {
                    if conn.written == conn.out.len() {
                        if conn.stream.shutdown(Shutdown::Write).is_err() {
                            return self.remove(slot);
                        }
                        conn.state = ControlState::Closing;
                        conn.deadline = Some(Instant::now() + Duration::from_secs(1));
                        continue;
                    }
                    match conn.stream.write(&conn.out[conn.written..]) {
                        Ok(0) => return self.remove(slot),
                        Ok(n) => conn.written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.remove(slot),
                    }
                }
                ControlState::Closing => match conn.stream.read(&mut chunk) {
                    Ok(0) => return self.remove(slot),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return self.remove(slot),
                },
            }
        }
    }

    /// The connections whose command was read, for the main loop.
    fn take_requests(&mut self) -> Vec<((usize, u64), control::Command)> {
        std::mem::take(&mut self.requests)
    }

    /// The connection `(slot, serial)` started the running upgrade and
    /// waits for its outcome.
    fn wait_for_outcome(&mut self, (slot, serial): (usize, u64)) {
        if let Some(Some(conn)) = self.conns.get_mut(slot) {
            if conn.serial == serial {
                conn.state = ControlState::Waiting { upgrade: true };
            }
        }
    }

    /// Answer the connection `(slot, serial)`, if it is still there.
    fn answer(&mut self, (slot, serial): (usize, u64), answer: String) {
        if let Some(Some(conn)) = self.conns.get_mut(slot) {
            if conn.serial == serial && matches!(conn.state, ControlState::Waiting { .. }) {
                conn.write(answer, self.write_timeout);
                self.drive(slot);
            }
        }
    }

    /// An upgrade's outcome, to the connection that started it.
    fn answer_waiting(&mut self, line: &str) {
        for slot in 0..self.conns.len() {
            if let Some(Some(conn)) = self.conns.get_mut(slot) {
                if matches!(conn.state, ControlState::Waiting { upgrade: true }) {
                    conn.write(format!("{line}\n"), self.write_timeout);
                    self.drive(slot);
                }
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.registry.deregister(&mut conn.stream);
            self.free.push(slot);
        }
    }

    fn close_all(&mut self) {
        for slot in 0..self.conns.len() {
            self.remove(slot);
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        self.conns
            .iter()
            .flatten()
            .filter_map(|conn| conn.deadline)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Deadlines that passed: a command not read in time is answered so; a
    /// write or a close that takes too long is cut.
    fn expire(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.deadline.is_none_or(|at| at > now) {
                continue;
            }
            match conn.state {
                ControlState::Reading => {
                    let answer = conn.refusal.take().unwrap_or_else(control::timed_out);
                    conn.write(answer, self.write_timeout);
                    self.drive(slot);
                }
                _ => self.remove(slot),
            }
        }
    }
}

impl ControlConn {
    fn write(&mut self, answer: String, timeout: Duration) {
        self.out = answer.into_bytes();
        self.written = 0;
        self.state = ControlState::Writing;
        self.deadline = Some(Instant::now() + timeout);
    }
}

/// The nearer of two poll timeouts, `None` meaning "no deadline".
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Every connection, and the heap of their deadlines.
struct Server<'a> {
    registry: Registry,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// `(deadline, slot, serial)`. A connection has at most one live entry
    /// (`Conn::armed`); later deadlines are re-armed when it pops, so a
    /// keep-alive request does not push a timer.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// `(slot, serial)` of connections that used up their turn with work left.
    yielded: Vec<(usize, u64)>,
    next_serial: u64,
    ctx: Ctx<'a>,
}

/// What every connection needs to make progress.
struct Ctx<'a> {
    options: &'a Options,
    info: ServerInfo,
    buf: Vec<u8>,
}

impl<'a> Server<'a> {
    fn new(registry: Registry, options: &'a Options, info: ServerInfo) -> Self {
        Server {
            registry,
            conns: Vec::new(),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            yielded: Vec::new(),
            next_serial: 0,
            ctx: Ctx {
                options,
                info,
                buf: vec![0u8; 16 * 1024],
            },
        }
    }

    /// Take an accepted connection; it may have sent its request already.
    fn add(&mut self, mut stream: Stream, conn: Connection) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = Token(FIRST_CONN + slot);
        if self
            .registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.free.push(slot);
            return;
        }
        self.next_serial += 1;
        self.conns[slot] = Some(Conn::new(self.next_serial, stream, conn));
        self.drive(slot, |conn, ctx| conn.drive(ctx));
    }

    /// Readiness of a connection.
    fn ready(&mut self, event: &mio::event::Event) {
        let Some(slot) = event.token().0.checked_sub(FIRST_CONN) else {
            return;
        };
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            conn.readable = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            conn.writable = true;
        }
        self.drive(slot, |conn, ctx| conn.drive(ctx));
    }

    /// Run `step` on the connection in `slot`, then drop it or arm its timer.
    fn drive(&mut self, slot: usize, step: impl FnOnce(&mut Conn, &mut Ctx<'_>) -> Next) {
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return;
        };
        conn.steps = STEPS_PER_TURN;
        let next = step(conn, &mut self.ctx);
        if let Next::Drop = next {
            return self.remove(slot);
        }
        if let Next::Yield = next {
            self.yielded.push((slot, conn.serial));
        }
        if let Some(at) = conn.deadline {
            if conn.armed.is_none_or(|armed| at < armed) {
                conn.armed = Some(at);
                self.timers.push(Reverse((at, slot, conn.serial)));
            }
        }
    }

    /// Give the connections that yielded their next turn.
    fn resume(&mut self) {
        for (slot, serial) in std::mem::take(&mut self.yielded) {
            if matches!(self.conns.get(slot), Some(Some(conn)) if conn.serial == serial) {
                self.drive(slot, |conn, ctx| conn.drive(ctx));
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.registry.deregister(&mut conn.stream);
            self.free.push(slot);
        }
    }

    /// The stop: idle connections now wait only the grace for a last request.
    fn stop(&mut self) {
        for slot in 0..self.conns.len() {
            self.drive(slot, |conn, ctx| conn.stop(ctx));
        }
    }

    /// The drain deadline: cut every connection.
    fn close_all(&mut self) {
        for slot in 0..self.conns.len() {
            self.remove(slot);
        }
    }

    /// How long until the nearest deadline; zero if a connection yielded.
    fn next_timeout(&self) -> Option<Duration> {
        if !self.yielded.is_empty() {
            return Some(Duration::ZERO);
        }
        let Reverse((at, _, _)) = self.timers.peek()?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    /// Fire the deadlines that have passed.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((at, slot, serial))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            // Another connection in the slot, or an entry superseded by an
            // earlier one.
            if conn.serial != serial || conn.armed != Some(at) {
                continue;
            }
            conn.armed = None;
            self.drive(slot, |conn, ctx| match conn.deadline {
                Some(deadline) if deadline <= now => conn.time_out(ctx),
                // Moved later meanwhile: wait on (re-armed by `drive`).
                _ => Next::Wait,
            });
        }
    }
}

/// What a connection needs next.
enum Next {
    /// Readiness or its deadline.
    Wait,
    /// Its next turn: it has work left.
    Yield,
    /// Nothing: close it now (no graceful close).
    Drop,
}

/// Where a connection is in its life.
enum State {
    /// Waiting for request bytes; the deadline is the idle timeout, the
    /// header timeout, or the drain's idle grace.
    Reading,
    /// Handling `/sleep`: the response goes out at the deadline.
    Sleeping { then: Response, keep_alive: bool },
    /// Writing `out`; then idle (unless `stay_busy`), and closing if `close`.
    Writing { close: bool, stay_busy: bool },
    /// FIN sent: discarding what the client still sends until it closes,
    /// so unread bytes never turn into an RST that destroys the response.
    Closing,
}

/// One connection's state machine.
struct Conn {
    serial: u64,
    stream: Stream,
    conn: Connection,
    reader: RequestReader,
    state: State,
    /// Readiness seen and not yet used up (mio reports edges).
    readable: bool,
    writable: bool,
    out: Vec<u8>,
    written: usize,
    deadline: Option<Instant>,
    /// The deadline of this connection's live entry in the timer heap.
    armed: Option<Instant>,
    /// The read deadline must be set anew (new wait, or bytes arrived).
    rearm: bool,
    /// The read deadline is the drain's idle grace.
    in_grace: bool,
    /// Steps left in this turn of the loop.
    steps: u32,
    /// When the first byte of the request being read arrived: the header
    /// timeout bounds the whole request, so trickling bytes cannot extend it.
    request_started: Option<Instant>,
}

/// What one read brought.
enum Got {
    Data,
    WouldBlock,
    Closed,
}

impl Conn {
    fn new(serial: u64, stream: Stream, conn: Connection) -> Self {
        Conn {
            serial,
            stream,
            conn,
            reader: RequestReader::new(),
            state: State::Reading,
            // Try at once: the request may be there already.
            readable: true,
            writable: true,
            out: Vec::with_capacity(1024),
            written: 0,
            deadline: None,
            armed: None,
            rearm: true,
            in_grace: false,
            steps: STEPS_PER_TURN,
            request_started: None,
        }
    }

    /// Make all the progress readiness allows.
    fn drive(&mut self, ctx: &mut Ctx<'_>) -> Next {
        loop {
            if self.steps == 0 {
                return Next::Yield;
            }
            self.steps -= 1;
            match self.state {
                State::Reading => {
                    match self.reader.next_request() {
                        Ok(Some(request)) => {
                            self.conn.set_busy();
                            self.request_started = None;
                            self.handle(&request, ctx);
                            continue;
                        }
                        Err(status) => {
                            self.conn.set_busy();
                            self.respond(&http::error_response(status), true, false, ctx);
                            continue;
                        }
                        Ok(None) => {}
                    }
                    let idle = self.reader.is_idle();
                    if idle {
                        self.conn.set_idle();
                    } else {
                        self.conn.set_busy();
                    }
                    if self.readable {
                        match self.read(&mut ctx.buf) {
                            Got::Data => {
                                self.rearm = true;
                                continue;
                            }
                            Got::WouldBlock => self.readable = false,
                            Got::Closed => return Next::Drop,
                        }
                    }
                    if self.rearm {
                        self.rearm = false;
                        let options = ctx.options;
                        self.in_grace = idle && self.conn.is_draining();
                        let now = Instant::now();
                        self.deadline = Some(match (idle, self.in_grace) {
                            (true, true) => now + options.idle_grace,
                            (true, false) => now + options.idle_timeout,
                            (false, _) => {
                                *self.request_started.get_or_insert(now) + options.header_timeout
                            }
                        });
                    }
                    return Next::Wait;
                }
                State::Sleeping { .. } => return Next::Wait,
                State::Writing { close, stay_busy } => {
                    while self.written < self.out.len() {
                        if !self.writable {
                            return Next::Wait;
                        }
                        match self.stream.write(&self.out[self.written..]) {
                            Ok(0) => return Next::Drop,
                            Ok(n) => self.written += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                self.writable = false
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Next::Drop,
                        }
                    }
                    if !stay_busy {
                        self.conn.set_idle();
                    }
                    if close {
                        return self.close(ctx);
                    }
                    self.state = State::Reading;
                    self.rearm = true;
                }
                State::Closing => {
                    if !self.readable {
                        return Next::Wait;
                    }
                    match self.read(&mut ctx.buf) {
                        Got::Data => {}
                        Got::WouldBlock => self.readable = false,
                        Got::Closed => return Next::Drop,
                    }
                }
            }
        }
    }

    /// The deadline passed.
    fn time_out(&mut self, ctx: &mut Ctx<'_>) -> Next {
        self.deadline = None;
        match std::mem::replace(&mut self.state, State::Reading) {
            // A request that raced the deadline is served, not cut off.
            State::Reading if self.reader.is_idle() => match self.read(&mut ctx.buf) {
                Got::Data => {
                    self.rearm = true;
                    self.drive(ctx)
                }
                Got::WouldBlock => self.close(ctx),
                Got::Closed => Next::Drop,
            },
            State::Reading => {
                self.respond(&http::error_response(408), true, true, ctx);
                self.drive(ctx)
            }
            State::Sleeping { then, keep_alive } => {
                // Decided after the work: a stop during a /sleep still gets a close.
                let close = !keep_alive || self.conn.is_draining();
                self.respond(&then, close, false, ctx);
                self.drive(ctx)
            }
            State::Writing { .. } | State::Closing => Next::Drop,
        }
    }

    /// The server stopped: an idle connection waits only the grace now.
    fn stop(&mut self, ctx: &mut Ctx<'_>) -> Next {
        if matches!(self.state, State::Reading) && self.reader.is_idle() && !self.in_grace {
            self.rearm = true;
            return self.drive(ctx);
        }
        Next::Wait
    }

    /// Start answering `request`: now, or at the end of a `/sleep`.
    fn handle(&mut self, request: &http::Request, ctx: &mut Ctx<'_>) {
        match http::handle(request, &ctx.info) {
            Action::Respond(response) => {
                let close = !request.keep_alive || self.conn.is_draining();
                self.respond(&response, close, false, ctx);
            }
            Action::Sleep { delay, then } => {
                self.deadline = Some(Instant::now() + delay);
                self.state = State::Sleeping {
                    then,
                    keep_alive: request.keep_alive,
                };
            }
        }
    }

    fn respond(&mut self, response: &Response, close: bool, stay_busy: bool, ctx: &Ctx<'_>) {
        self.out.clear();
        self.written = 0;
        http::encode(response, &ctx.info, close, &mut self.out);
        self.deadline = Some(Instant::now() + ctx.options.write_timeout);
        self.state = State::Writing { close, stay_busy };
    }

    /// Close without a reset: send FIN, then read until the client closes
    /// too, for at most the idle grace (and at least 100 ms).
    fn close(&mut self, ctx: &mut Ctx<'_>) -> Next {
        if self.stream.shutdown(Shutdown::Write).is_err() {
            return Next::Drop;
        }
        let linger = ctx.options.idle_grace.max(Duration::from_millis(100));
        self.deadline = Some(Instant::now() + linger);
        self.state = State::Closing;
        self.drive(ctx)
    }

    fn read(&mut self, buf: &mut [u8]) -> Got {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Got::Closed,
                Ok(n) => {
                    if matches!(self.state, State::Reading) {
                        self.reader.push(&buf[..n]);
                    }
                    return Got::Data;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Got::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Got::Closed,
            }
        }
    }
}
