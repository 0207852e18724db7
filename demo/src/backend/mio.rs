//! The demo server over baton-mio: one thread, one `mio::Poll`, and every
//! connection an explicit state machine driving [`crate::http`]
//! (reading → handling → writing → closing).
//!
//! baton-mio runs the lifecycle (signals, control socket, upgrade, drain,
//! resume) and says what to do; this module serves HTTP and UDP. It behaves
//! as the tokio server does, line for line in the log: after a stop, a
//! request in progress is finished and answered with `Connection: close`,
//! idle connections close at [`Event::CloseIdle`] (a request that raced it
//! is still served), and what is left at [`Event::ForceClose`] is cut.
//! With `--handover on`, keep-alive connections move to the next
//! generation instead, at request boundaries: idle ones when moves open
//! ([`Event::Moving`]), busy ones once their response (kept alive) is
//! written, each with the bytes read and not answered.
//!
//! Every wait is a deadline in a timer heap, so an idle server blocks in
//! `poll` until the nearest one (or forever). An idle connection holds no
//! buffer: reads land in one scratch buffer shared by all, and the response
//! buffer is dropped once written.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use baton_mio::handover::Item;
use baton_mio::{Baton, Connection, DatagramId, Event, Offer, Stream};
use mio::{Interest, Poll, Registry, Token};

use crate::cli::{self, Options};
use crate::http::{self, Action, RequestReader, Response, ServerInfo};
use crate::Failed;

const BACKEND: &str = "mio";
/// Baton takes tokens `0..TOKENS`; connection `n` is `FIRST_CONN + n`.
const FIRST_CONN: usize = baton_mio::TOKENS;
/// Steps (a read, a request, a state change) one connection may take per
/// turn of the loop, so a client pipelining without pause cannot starve
/// the others; the rest waits for the next turn.
const STEPS_PER_TURN: u32 = 64;
/// How much one read takes at most.
const READ_CHUNK: usize = 16 * 1024;

/// Serve until upgraded or stopped, then drain. Errors are logged.
pub fn run(options: &Options) -> Result<(), Failed> {
    let failed = |e: &dyn std::fmt::Display| {
        log::error!("{e}");
        Failed
    };
    let mut poll =
        Poll::new().map_err(|e| failed(&format_args!("cannot create the mio poll: {e}")))?;
    // Errors of `Baton`'s methods are reported to the previous generation.
    let mut baton =
        Baton::new(super::config(options), poll.registry(), Token(0)).map_err(|e| failed(&e))?;
    for (name, addr) in &options.listeners() {
        baton.listen(name, addr).map_err(|e| failed(&e))?;
    }
    let mut udp = match options.udp {
        Some(addr) => Some(Udp {
            id: baton
                .datagram(cli::UDP_NAME, addr)
                .map_err(|e| failed(&e))?,
            more: false,
            buf: Vec::new(),
        }),
        None => None,
    };
    let registry = match poll.registry().try_clone() {
        Ok(registry) => registry,
        Err(e) => {
            let message = format!("cannot clone the mio registry: {e}");
            let _ = baton.report_error(&message);
            return Err(failed(&message));
        }
    };
    super::restore_state(
        |t| baton.receive_state(t).map_err(|e| e.to_string()),
        options,
    );
    baton.on_save_state(crate::stats::save);
    if options.handover {
        baton.move_connections([http::MOVED_KIND]);
    }
    baton.ready().map_err(|e| failed(&e))?;
    // After "ready": a new generation's own cache must not delay the handover.
    let delay = super::ballast_delay(baton.generation(), options);
    crate::ballast::fill_in_background(options.ballast, delay);
    let info = ServerInfo {
        pid: std::process::id(),
        generation: baton.generation(),
        backend: BACKEND,
    };
    let mut server = Server::new(registry, options, info);
    let mut ready = mio::Events::with_capacity(1024);
    loop {
        let mut timeout = earliest(baton.next_timeout(), server.next_timeout());
        if udp.as_ref().is_some_and(|udp| udp.more) {
            timeout = Some(Duration::ZERO);
        }
        match poll.poll(&mut ready, timeout) {
            Ok(()) => {}
            // A signal arrived; its pipe is readable on the next poll.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(&format_args!("poll: {e}"))),
        }
        baton.process(&ready);
        if let Some(udp) = udp.as_mut().filter(|udp| udp.more) {
            udp.ready(&baton, &server.ctx.info);
        }
        while let Some(event) = baton.next_event() {
            match event {
                // At --max-connections baton returns None and announces the
                // listener again once a connection closed (back-pressure).
                Event::Accept { listener } => {
                    while let Some((stream, conn)) = baton.accept(listener) {
                        server.add(stream, conn, &[]);
                    }
                }
                // Connections that moved here, or came back from a failed move.
                Event::Moved(offers) | Event::Unmoved(offers) => {
                    for Offer { mut item, conn } in offers {
                        if let Ok(stream) = Stream::from_moved(&mut item) {
                            server.add(stream, conn, &item.payload);
                        }
                    }
                }
                Event::Moving => server.move_idle(),
                Event::Datagram { socket } => {
                    if let Some(udp) = udp.as_mut().filter(|udp| udp.id == socket) {
                        udp.ready(&baton, &server.ctx.info);
                    }
                }
                Event::CloseIdle => server.close_idle(),
                Event::ForceClose => server.close_all(),
                Event::Drained(_) => return Ok(()),
                // Stop: connections see it (`Connection::is_draining`) when
                // they answer; Resumed: baton accepts again.
                _ => {}
            }
        }
        server.resume();
        for event in ready.iter().filter(|e| !baton.owns(e.token())) {
            server.ready(event);
        }
        server.expire(Instant::now());
    }
}

/// The `--udp` echo, on the socket baton holds while this generation serves.
struct Udp {
    id: DatagramId,
    /// A batch ended with datagrams maybe still queued: go on next turn.
    more: bool,
    /// Allocated at the first datagram.
    buf: Vec<u8>,
}

impl Udp {
    /// Echo every datagram waiting (readiness is edge-triggered). A
    /// datagram received is always answered, unless the send buffer is
    /// full: that reply is dropped, as UDP may.
    fn ready(&mut self, baton: &Baton, info: &ServerInfo) {
        self.more = false;
        let Some(socket) = baton.datagram_socket(self.id) else {
            return;
        };
        if self.buf.is_empty() {
            self.buf = vec![0; 65_536];
        }
        // Bounded: the queue may refill as fast as it is read, so stop after
        // a batch and go on next turn (no new edge comes for what is queued).
        self.more = true;
        for _ in 0..1024 {
            let (len, peer) = match socket.recv_from(&mut self.buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.more = false;
                    return;
                }
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
                    log::warn!("udp: {e}");
                    self.more = false;
                    return;
                }
            };
            let reply = cli::udp_echo(info, &self.buf[..len]);
            match socket.send_to(&reply, peer) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => log::warn!("udp reply to {peer}: {e}"),
            }
        }
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
                buf: vec![0u8; READ_CHUNK],
            },
        }
    }

    /// Take an accepted connection (it may have sent its request already),
    /// or one that moved with `unread` bytes.
    fn add(&mut self, mut stream: Stream, conn: Connection, unread: &[u8]) {
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
        let mut conn = Conn::new(self.next_serial, stream, conn);
        conn.reader.push(unread);
        self.conns[slot] = Some(conn);
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
        if let Next::Move(version) = next {
            return self.offer(slot, version);
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

    /// Move the connection in `slot` to the next generation: the socket,
    /// and as payload what it read and did not answer.
    fn offer(&mut self, slot: usize, version: u32) {
        if let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) {
            self.free.push(slot);
            let unread = conn.reader.take_unread();
            if let Ok(fd) = conn.stream.into_fd(&self.registry) {
                conn.conn
                    .offer(Item::new(http::MOVED_KIND, version, unread).with_fds([fd]));
            }
        }
    }

    /// Moves opened: the connections waiting for a request move now (busy
    /// ones once answered).
    fn move_idle(&mut self) {
        for slot in 0..self.conns.len() {
            self.drive(slot, |conn, ctx| conn.drive(ctx));
        }
    }

    /// The idle grace after the stop passed: close the connections that
    /// wait for their next request.
    fn close_idle(&mut self) {
        for slot in 0..self.conns.len() {
            self.drive(slot, |conn, ctx| conn.close_idle(ctx));
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
    /// At a request boundary while moves are open: move it, at this state
    /// version.
    Move(u32),
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
            out: Vec::new(),
            written: 0,
            deadline: None,
            armed: None,
            rearm: true,
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
                        // Between requests: move before reading more.
                        if let Some(version) = self.conn.can_move() {
                            return Next::Move(version);
                        }
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
                    if idle {
                        // Waiting for the next request: hold no buffer.
                        self.reader = RequestReader::new();
                        if self.conn.tracker().is_closing_idle() {
                            return self.close(ctx);
                        }
                    }
                    if self.rearm {
                        self.rearm = false;
                        let options = ctx.options;
                        let now = Instant::now();
                        self.deadline = Some(if idle {
                            now + options.idle_timeout
                        } else {
                            *self.request_started.get_or_insert(now) + options.header_timeout
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
                    // Written: an idle connection holds no buffer.
                    self.out = Vec::new();
                    if !stay_busy {
                        self.conn.set_idle();
                    }
                    if close {
                        return self.close(ctx);
                    }
                    // Answered: what was read after it (a pipelined
                    // request) moves unanswered.
                    if let Some(version) = self.conn.can_move() {
                        return Next::Move(version);
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
                let close = self.must_close(keep_alive);
                self.respond(&then, close, false, ctx);
                self.drive(ctx)
            }
            State::Writing { .. } | State::Closing => Next::Drop,
        }
    }

    /// The idle grace after the stop passed: close if waiting for the next
    /// request (a request that raced it is served, with `Connection: close`).
    fn close_idle(&mut self, ctx: &mut Ctx<'_>) -> Next {
        if !matches!(self.state, State::Reading) || !self.reader.is_idle() {
            return Next::Wait;
        }
        match self.read(&mut ctx.buf) {
            Got::Data => {
                self.rearm = true;
                self.drive(ctx)
            }
            Got::WouldBlock => self.close(ctx),
            Got::Closed => Next::Drop,
        }
    }

    /// Start answering `request`: now, or at the end of a `/sleep`.
    fn handle(&mut self, request: &http::Request, ctx: &mut Ctx<'_>) {
        match http::handle(request, &ctx.info) {
            Action::Respond(response) => {
                let close = self.must_close(request.keep_alive);
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

    /// Whether the response ends the connection: the client asks to, or
    /// this generation drains it (one that moves stays open).
    fn must_close(&self, keep_alive: bool) -> bool {
        !keep_alive || (self.conn.is_draining() && self.conn.can_move().is_none())
    }

    fn respond(&mut self, response: &Response, close: bool, stay_busy: bool, ctx: &Ctx<'_>) {
        self.out = Vec::with_capacity(1024);
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
