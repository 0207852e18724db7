//! Zero-downtime graceful restart for servers on a hand-driven mio event
//! loop, with no executor.
//!
//! `baton-mio` drives baton's lifecycle ([`baton_core::lifecycle`]: upgrades
//! on `SIGHUP` or the control socket, stops on `SIGTERM`/`SIGINT`, the drain
//! and its deadline, serving again if the new generation dies, sd_notify and
//! the PID file) from the application's own [`mio::Poll`]. A [`Baton`]
//! registers its sources (listeners, the control socket and its
//! connections, signal pipes, the next generation's fds, a [`mio::Waker`])
//! under a reserved range of [`TOKENS`] tokens, turns their readiness and
//! its timers into [`Event`]s, and says through [`Baton::next_timeout`] how
//! long the loop may block. Connections stay the application's: it
//! registers each accepted [`Stream`] under its own tokens and keeps its
//! [`Connection`] guard up to date, so the drain knows what is busy.
//!
//! ```no_run
//! use baton_mio::{Baton, Config, Event};
//! use mio::{Events, Poll, Token};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut poll = Poll::new()?;
//!     // Tokens 0..TOKENS are baton's; the application uses the others.
//!     let config = Config::default().control("/tmp/my-server.sock");
//!     let mut baton = Baton::new(config, poll.registry(), Token(0))?;
//!     // Inherited from the previous generation if it passed "http", else bound.
//!     baton.listen("http", &"127.0.0.1:8080".parse()?)?;
//!     baton.ready()?; // the previous generation stops now
//!
//!     let mut events = Events::with_capacity(256);
//!     loop {
//!         // An application with timers of its own blocks until the nearer one.
//!         match poll.poll(&mut events, baton.next_timeout()) {
//!             Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
//!             result => result?,
//!         }
//!         baton.process(&events);
//!         while let Some(event) = baton.next_event() {
//!             match event {
//!                 // mio reports readiness once per change: accept until None.
//!                 Event::Accept { listener } => {
//!                     while let Some((stream, conn)) = baton.accept(listener) {
//!                         // Register `stream` under an application token and
//!                         // keep `conn` with it: set_busy() while a request
//!                         // runs, set_idle() after; after the stop, answer
//!                         // with `Connection: close`.
//!                         drop((stream, conn));
//!                     }
//!                 }
//!                 Event::CloseIdle => { /* close connections waiting for a request */ }
//!                 Event::ForceClose => { /* close every connection now */ }
//!                 Event::Drained(_report) => return Ok(()),
//!                 // Stop (listeners closed), Resumed (accepting again), …
//!                 _ => {}
//!             }
//!         }
//!         for event in events.iter().filter(|e| !baton.owns(e.token())) {
//!             // the application's connections
//!             let _ = event;
//!         }
//!     }
//! }
//! ```
//!
//! Open connections can also move, open, to the next generation at an
//! upgrade instead of draining ([`Baton::move_connections`],
//! [`Event::Moving`], [`Event::Moved`]); `examples/chat.rs` shows how.
//!
//! A whole server is in `examples/mio.rs`; the demo's mio backend
//! (`baton-demo --backend mio`) drives HTTP/1.1 connections as explicit
//! state machines on top of it.
#![forbid(unsafe_code)]

mod control;
mod listener;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::lifecycle::{Event as LifecycleEvent, Lifecycle, Request};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token, Waker};

pub use baton_core::{
    handover, logger, Config, Connection, DrainReport, ExitStatus, ListenAddr, Offer, Origin,
    StopReason, StopToken, Tracker, UpgradeError, Upgraded,
};
pub use listener::{Listener, Stream};

/// How many tokens a [`Baton`] reserves, from the first one it is given:
/// its waker, the control socket and its connections, the lifecycle's fds,
/// and one per listener or datagram socket (at most [`MAX_SOCKETS`]).
pub const TOKENS: usize = 64;

/// How many listeners and datagram sockets one [`Baton`] can hold.
pub const MAX_SOCKETS: usize = FIRST_CONTROL_CONN - FIRST_SOCKET;

/// How long a listener is left alone after an accept error such as
/// `EMFILE`: accepting again at once would fail again, in a busy loop.
pub const ACCEPT_BACKOFF: Duration = baton_core::server::ACCEPT_BACKOFF;

/// Connections [`Baton::accept`] hands out per [`Event::Accept`]. A
/// listener that still has more waits one loop turn: under a flood of new
/// connections, the ones already open, timers and upgrades still get their
/// turn.
pub const ACCEPT_BATCH: usize = 64;

/// Offsets of baton's tokens from the first one.
const WAKER: usize = 0;
const CONTROL: usize = 1;
/// The lifecycle's fds: signal pipes, the pending upgrade, the successor.
const FIRST_WATCHED: usize = 2;
const MAX_WATCHED: usize = 8;
const FIRST_SOCKET: usize = FIRST_WATCHED + MAX_WATCHED;
/// Control connections, one token each, up to [`control::MAX_SESSIONS`].
const FIRST_CONTROL_CONN: usize = TOKENS - control::MAX_SESSIONS;

/// Why a [`Baton`] could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The generation could not be adopted, a socket bound, or the PID
    /// file claimed.
    #[error(transparent)]
    Core(#[from] baton_core::Error),
    /// Registering with the mio registry failed.
    #[error("cannot register with mio: {0}")]
    Register(#[source] io::Error),
    /// Every socket token is taken.
    #[error("too many listeners: baton-mio has tokens for {max}")]
    TooManyListeners {
        /// [`MAX_SOCKETS`].
        max: usize,
    },
}

/// Identifies one listener of a [`Baton`], in the order they were opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(usize);

impl ListenerId {
    /// Its position: 0 for the first listener opened.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Identifies one datagram socket of a [`Baton`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatagramId(usize);

/// What the application does next.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Connections may be waiting on this listener: call
    /// [`Baton::accept`] until it returns `None`.
    Accept {
        /// The listener.
        listener: ListenerId,
    },
    /// Datagrams may be waiting on this socket
    /// ([`Baton::datagram_socket`]): receive until `WouldBlock`.
    Datagram {
        /// The socket.
        socket: DatagramId,
    },
    /// This generation stopped (it handed over, or was asked to stop): its
    /// listeners and datagram sockets are closed. Connections answer their
    /// request in progress with `Connection: close`; idle ones may still
    /// send one last request until [`Event::CloseIdle`].
    Stop {
        /// Upgraded, or shut down.
        reason: StopReason,
    },
    /// The idle grace after the stop passed: close the connections that
    /// wait for their next request.
    CloseIdle,
    /// The drain deadline passed (or a second stop came): close every
    /// connection now.
    ForceClose,
    /// The next generation died while this one drained: this one serves
    /// again. Its listeners and datagram sockets are open and registered
    /// again ([`Event::Accept`] follows), and the application's connections
    /// go on as before the stop.
    Resumed,
    /// Every connection has closed (or the deadline and its grace passed),
    /// and the watch on the next generation is over: how they ended. Exit
    /// now.
    Drained(DrainReport),
    /// Connections may move to the next generation now (kinds named by
    /// [`Baton::move_connections`]; comes after [`Event::Stop`] at an
    /// upgrade): offer the idle ones at once, the busy ones once their
    /// request is answered, while [`Connection::can_move`] says so.
    Moving,
    /// Connections the previous generation moved here, each with a guard
    /// of this generation: register them ([`Stream::from_moved`] makes the
    /// socket) and serve on from their saved state.
    Moved(Vec<Offer>),
    /// Connections offered that did not move (the next generation refused
    /// or died, or moves had ended), with their own guards: register them
    /// again and serve on; they drain as without a handover. Those that
    /// come back after [`Event::ForceClose`] are closed by baton.
    Unmoved(Vec<Offer>),
}

/// One listener and its accept back-off.
#[derive(Debug)]
struct ListenerSlot {
    /// Its name, to reopen it if this generation serves again.
    name: String,
    token: Token,
    listener: Option<Listener>,
    /// Set after an accept error; readiness is ignored until then.
    paused_until: Option<Instant>,
    /// Accepts left before this listener yields to the rest of the loop.
    budget: usize,
    /// The budget ran out with connections maybe still queued: announce
    /// the listener again on the next turn, without waiting for readiness.
    more: bool,
    /// Left with clients waiting at [`Config::max_connections`]: announce
    /// it again once a connection closes.
    held: bool,
}

/// One datagram socket.
#[derive(Debug)]
struct DatagramSlot {
    name: String,
    token: Token,
    socket: Option<mio::net::UdpSocket>,
}

/// One generation of a mio server: its listeners, control socket and
/// lifecycle, registered in the application's [`mio::Poll`].
pub struct Baton {
    lifecycle: Lifecycle,
    config: Config,
    registry: Registry,
    first_token: usize,
    waker: Arc<Waker>,
    listeners: Vec<ListenerSlot>,
    datagrams: Vec<DatagramSlot>,
    control: control::Server,
    /// The lifecycle's fds registered now, and the epoch they belong to.
    watched: Vec<RawFd>,
    watched_epoch: Option<u64>,
    events: VecDeque<Event>,
    /// Set at [`Event::Stop`], cleared at [`Event::Resumed`].
    stopped: bool,
    /// Set at [`Event::Drained`]: nothing more happens.
    done: bool,
    /// Whether connections may move, as last announced ([`Event::Moving`]).
    moving: bool,
}

impl fmt::Debug for Baton {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Baton")
            .field("generation", &self.generation())
            .field("first_token", &self.first_token)
            .field("listeners", &self.listeners)
            .field("datagrams", &self.datagrams)
            .field("control", &self.control)
            .field("watched", &self.watched)
            .field("stopped", &self.stopped)
            .field("done", &self.done)
            .finish()
    }
}

impl Baton {
    /// Adopt what the previous generation (or systemd) passed, if anything,
    /// install the signal handlers (unless [`Config::handle_signals`] is
    /// off), and register with `registry` under the tokens
    /// `first_token .. first_token + TOKENS`.
    pub fn new(config: Config, registry: &Registry, first_token: Token) -> Result<Self, Error> {
        if first_token.0.checked_add(TOKENS).is_none() {
            return Err(Error::Register(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the token range overflows",
            )));
        }
        let generation = baton_core::Generation::from_env(config.clone())?;
        let lifecycle = Lifecycle::new(generation, config.timeouts.clone());
        let fail = |lifecycle: &Lifecycle, error: Error| {
            report(lifecycle, &error);
            error
        };
        let registry = match registry.try_clone() {
            Ok(registry) => registry,
            Err(e) => return Err(fail(&lifecycle, Error::Register(e))),
        };
        let waker = match Waker::new(&registry, Token(first_token.0 + WAKER)) {
            Ok(waker) => Arc::new(waker),
            Err(e) => return Err(fail(&lifecycle, Error::Register(e))),
        };
        // A stop of the token from any thread wakes the loop; `process`
        // then hands it to the lifecycle.
        let hook = waker.clone();
        lifecycle.generation().stop_token().on_stop(move || {
            if let Err(e) = hook.wake() {
                log::warn!("cannot wake the event loop for the stop: {e}");
            }
        });
        let mut baton = Baton {
            lifecycle,
            control: control::Server::new(
                registry.try_clone().ok(),
                Token(first_token.0 + FIRST_CONTROL_CONN),
            ),
            config,
            registry,
            first_token: first_token.0,
            waker,
            listeners: Vec::new(),
            datagrams: Vec::new(),
            watched: Vec::new(),
            watched_epoch: None,
            events: VecDeque::new(),
            stopped: false,
            done: false,
            moving: false,
        };
        if baton.config.handle_signals {
            if let Err(e) = baton.lifecycle.handle_signals() {
                return Err(baton.fail(baton_core::Error::Signals(e).into()));
            }
        }
        baton.sync_watched();
        Ok(baton)
    }

    /// This generation's number: 0 when started by hand, +1 per upgrade.
    pub fn generation(&self) -> u64 {
        self.lifecycle.generation().number()
    }

    /// True if `token` is one of baton's; the application ignores those.
    pub fn owns(&self, token: Token) -> bool {
        (self.first_token..self.first_token + TOKENS).contains(&token.0)
    }

    /// The loop's waker. mio allows one per `Poll`, and baton holds it:
    /// share this one to wake the loop from other threads. Wake-ups that
    /// are not a stop are ignored by baton.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// The listener `name`: inherited if the previous generation (or
    /// systemd) passed it, else bound to `addr`. It is registered at once;
    /// connections are announced by [`Event::Accept`]. On error the
    /// previous generation is told why (its upgrade fails, it serves on).
    pub fn listen(&mut self, name: &str, addr: &ListenAddr) -> Result<ListenerId, Error> {
        let token = self.socket_token()?;
        let (mut listener, _origin) =
            match self.lifecycle.generation().listen::<Listener>(name, addr) {
                Ok(listener) => listener,
                Err(e) => return Err(self.fail(e.into())),
            };
        if let Err(e) = self
            .registry
            .register(&mut listener, token, Interest::READABLE)
        {
            return Err(self.fail(Error::Register(e)));
        }
        // Connections may already wait in an inherited socket's queue: the
        // registration reports them.
        self.listeners.push(ListenerSlot {
            name: name.to_owned(),
            token,
            listener: Some(listener),
            paused_until: None,
            budget: ACCEPT_BATCH,
            more: false,
            held: false,
        });
        Ok(ListenerId(self.listeners.len() - 1))
    }

    /// The UDP socket `name`: inherited if the previous generation passed
    /// it, else bound to `addr`. Datagrams are announced by
    /// [`Event::Datagram`] while this generation serves; at the stop baton
    /// drops its handle (the next generation reads the rest of the shared
    /// queue), and opens it again if this generation serves again.
    pub fn datagram(
        &mut self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> Result<DatagramId, Error> {
        let token = self.socket_token()?;
        let (socket, _origin) = match self.lifecycle.generation().datagram(name, addr) {
            Ok(socket) => socket,
            Err(e) => return Err(self.fail(e.into())),
        };
        let mut socket = mio::net::UdpSocket::from_std(socket);
        if let Err(e) = self
            .registry
            .register(&mut socket, token, Interest::READABLE)
        {
            return Err(self.fail(Error::Register(e)));
        }
        self.datagrams.push(DatagramSlot {
            name: name.to_owned(),
            token,
            socket: Some(socket),
        });
        Ok(DatagramId(self.datagrams.len() - 1))
    }

    /// The listener `id`, while it is open (until the stop).
    pub fn listener(&self, id: ListenerId) -> Option<&Listener> {
        self.listeners.get(id.0)?.listener.as_ref()
    }

    /// The datagram socket `id`, while it is open (until the stop).
    pub fn datagram_socket(&self, id: DatagramId) -> Option<&mio::net::UdpSocket> {
        self.datagrams.get(id.0)?.socket.as_ref()
    }

    /// Report ready: the control socket (if [`Config::control`] names one)
    /// is opened, the PID file claimed, and the previous generation told
    /// that this one serves, so it stops accepting and drains. Call it once
    /// the listeners are open. A PID file owned by another live server is
    /// an error (the previous generation is told why); other failures to
    /// notify are logged and serving goes on.
    pub fn ready(&mut self) -> Result<(), Error> {
        // After the application's listeners, so they come first in the
        // handoff and in the log.
        if let Some(path) = self.config.control.clone() {
            let generation = self.lifecycle.generation();
            let opened = control::open(generation, &path)
                .map_err(Error::from)
                .and_then(|mut listener| {
                    self.registry
                        .register(&mut listener, self.token(CONTROL), Interest::READABLE)
                        .map_err(Error::Register)
                        .map(|()| listener)
                });
            match opened {
                Ok(listener) => self.control.listen(listener),
                Err(e) => return Err(self.fail(e)),
            }
        }
        let ready = self.lifecycle.ready();
        // From now on the channel from the previous generation is watched:
        // its commit, then the connections it moves.
        self.after_lifecycle();
        match ready {
            Ok(()) => Ok(()),
            Err(e @ baton_core::Error::PidFile(_)) => Err(self.fail(e.into())),
            Err(e) => {
                log::warn!("{e}; serving anyway");
                Ok(())
            }
        }
    }

    /// What this generation moves to the next one at each upgrade, at the
    /// negotiated state version (see
    /// [`Lifecycle::on_save_state`](baton_core::lifecycle::Lifecycle::on_save_state)
    /// and [`Config::state_versions`]).
    pub fn on_save_state(
        &mut self,
        save: impl FnMut(u32) -> Vec<baton_core::handover::Item> + Send + Sync + 'static,
    ) {
        self.lifecycle.on_save_state(save);
    }

    /// Move open connections of these kinds to the next generation at each
    /// upgrade instead of draining them, and take those the previous
    /// generation moves (the live handover, see [`baton_core::lifecycle`];
    /// needs [`Config::state_versions`]). At [`Event::Moving`], a
    /// connection at a safe point (idle, or its request answered) stops
    /// being read, saves its state in a [`handover::Item`] named by its
    /// kind, with its socket from [`Stream::into_fd`], and is
    /// [`offered`](Connection::offer); it comes back as [`Event::Moved`] in
    /// the next generation, or as [`Event::Unmoved`] here if it did not
    /// move. Baton sends offers on the next turn of the loop.
    pub fn move_connections(&mut self, kinds: impl IntoIterator<Item = impl Into<String>>) {
        self.lifecycle.move_connections(kinds);
    }

    /// The state the previous generation moves to this one; blocks up to
    /// `timeout`: call it before [`ready`](Self::ready) (see
    /// [`Generation::receive_state`](baton_core::Generation::receive_state)).
    pub fn receive_state(
        &self,
        timeout: Duration,
    ) -> Result<Vec<baton_core::handover::Item>, Error> {
        Ok(self.lifecycle.generation().receive_state(timeout)?)
    }

    /// Tell the previous generation that this one cannot serve, and why.
    /// It logs it and serves on; exit after calling this. Errors of
    /// [`Baton`]'s own methods are reported already.
    pub fn report_error(&self, message: &str) -> Result<(), baton_core::Error> {
        self.lifecycle.generation().report_error(message)
    }

    /// Accept one connection on `id`, tracked for the drain. `None` when
    /// none is waiting, after the stop, at [`Config::max_connections`]
    /// (the listener is announced again once a connection closes), while
    /// the listener backs off after an error such as `EMFILE` (logged; it
    /// is announced again after [`ACCEPT_BACKOFF`]), or after
    /// [`ACCEPT_BATCH`] connections since the last [`Event::Accept`] (it
    /// comes again on the next turn of the loop). Errors that concern one
    /// client only (it reset before it was accepted) are skipped.
    pub fn accept(&mut self, id: ListenerId) -> Option<(Stream, Connection)> {
        let tracker = self.lifecycle.generation().tracker();
        let slot = self.listeners.get_mut(id.0)?;
        let listener = slot.listener.as_ref()?;
        if slot.paused_until.is_some() {
            return None;
        }
        if slot.budget == 0 {
            slot.more = true;
            return None;
        }
        if tracker.open() >= self.config.max_connections {
            // Back-pressure: new clients wait in the kernel's accept queue.
            slot.held = true;
            return None;
        }
        // Bounded: every error below but the skipped ones returns.
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok(stream) => {
                    slot.budget -= 1;
                    return Some((stream, tracker.track()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if concerns_one_client(&e) => continue,
                Err(e) => {
                    log::warn!("accept: {e}; backing off");
                    slot.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return None;
                }
            }
        }
        slot.more = true;
        None
    }

    /// Start an upgrade, exactly as `SIGHUP` does: refused (and logged) if
    /// one runs or the server is stopping; its outcome is logged, and on
    /// success [`Event::Stop`] follows.
    pub fn upgrade(&mut self) {
        self.request(Request::Upgrade);
    }

    /// Stop gracefully, as `SIGTERM` does: an upgrade still pending is
    /// abandoned, [`Event::Stop`] follows, then the drain. During the drain,
    /// end it now ([`Event::ForceClose`]). A stopped generation never serves
    /// again. [`StopToken::stop`] from another thread does the same.
    pub fn stop(&mut self) {
        self.request(Request::Stop);
    }

    /// True once this generation stopped (handed over or asked to stop)
    /// and has not resumed.
    pub fn is_stopping(&self) -> bool {
        self.stopped || self.lifecycle.is_stopping()
    }

    /// The token that stops this generation; usable from any thread.
    pub fn stop_token(&self) -> StopToken {
        self.lifecycle.generation().stop_token().clone()
    }

    /// The tracker of this generation's connections.
    pub fn tracker(&self) -> Tracker {
        self.lifecycle.generation().tracker().clone()
    }

    /// How long the loop may block before baton has something to do:
    /// `None` for "until an event", zero when events are already queued
    /// or connections offered can be sent.
    /// Call it right before `Poll::poll`, after the application has dropped
    /// its closed connections, so that a drain that just completed, or a
    /// listener held at the connection limit, is noticed.
    pub fn next_timeout(&self) -> Option<Duration> {
        if self.done {
            return (!self.events.is_empty()).then_some(Duration::ZERO);
        }
        if !self.events.is_empty()
            || self.stop_pending()
            || self.listeners.iter().any(|slot| slot.more)
            || self.unhold_due()
        {
            return Some(Duration::ZERO);
        }
        let next = self
            .listeners
            .iter()
            .filter_map(|slot| slot.paused_until)
            .chain(self.lifecycle.poll_timeout())
            .chain(self.control.next_deadline())
            .min()?;
        // Read the clock last: a deadline of "now" (offers to send) is zero.
        Some(next.saturating_duration_since(Instant::now()))
    }

    /// Handle the readiness of baton's sources among `events` and the
    /// timers that are due; the results come from
    /// [`next_event`](Self::next_event). Call it after every `Poll::poll`,
    /// including one that timed out.
    pub fn process(&mut self, events: &mio::Events) {
        if self.done {
            return;
        }
        for index in 0..self.listeners.len() {
            if std::mem::take(&mut self.listeners[index].more) {
                self.announce(index);
            }
        }
        let mut lifecycle = false;
        let mut control = false;
        for event in events.iter() {
            let Some(offset) = event.token().0.checked_sub(self.first_token) else {
                continue;
            };
            match offset {
                CONTROL => control = true,
                n if (FIRST_WATCHED..FIRST_SOCKET).contains(&n) => lifecycle = true,
                n if (FIRST_SOCKET..FIRST_CONTROL_CONN).contains(&n) => {
                    self.socket_ready(event.token())
                }
                n if (FIRST_CONTROL_CONN..TOKENS).contains(&n) => {
                    let tracker = self.lifecycle.generation().tracker().clone();
                    self.control.ready(event.token(), &tracker);
                }
                // WAKER: a stop, seen below; anything else is not ours.
                _ => {}
            }
        }
        let now = Instant::now();
        if lifecycle {
            self.lifecycle.handle_readable(now);
            self.after_lifecycle();
        }
        if control {
            let tracker = self.lifecycle.generation().tracker().clone();
            self.control.accept(&tracker);
        }
        self.tick(now);
    }

    /// The next event, if any. Take them all after every
    /// [`process`](Self::process).
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Timers, the stop token, held listeners, control requests.
    fn tick(&mut self, now: Instant) {
        for index in 0..self.listeners.len() {
            let slot = &mut self.listeners[index];
            if slot.paused_until.is_some_and(|until| until <= now) {
                slot.paused_until = None;
                // The connections that came meanwhile raised no new event.
                self.announce(index);
            }
        }
        if self.unhold_due() {
            for index in 0..self.listeners.len() {
                if std::mem::take(&mut self.listeners[index].held) {
                    self.announce(index);
                }
            }
        }
        let tracker = self.lifecycle.generation().tracker().clone();
        self.control.expire(now, &tracker);
        // A stop of the token from outside (another thread, the application).
        if self.stop_pending() {
            self.lifecycle.request(Request::Stop, None, now);
            self.after_lifecycle();
        }
        for (reply, request) in self.control.take_requests() {
            self.lifecycle.request(request, Some(reply), Instant::now());
            self.after_lifecycle();
        }
        if !self.done {
            self.lifecycle.handle_timeout(now);
            self.after_lifecycle();
        }
    }

    fn request(&mut self, request: Request) {
        if self.done {
            return;
        }
        self.lifecycle.request(request, None, Instant::now());
        self.after_lifecycle();
    }

    /// After every call into the lifecycle: follow its watched fds (before
    /// anything else opens an fd that could reuse a closed one's number),
    /// then act on its events.
    fn after_lifecycle(&mut self) {
        self.sync_watched();
        while let Some(event) = self.lifecycle.poll_event() {
            match event {
                LifecycleEvent::Answer { reply, answer } => {
                    self.control
                        .answer(reply, baton_core::control::answer_text(answer, "mio"));
                }
                LifecycleEvent::StopAccepting(reason) => {
                    self.close_sockets();
                    self.stopped = true;
                    self.events.push_back(Event::Stop { reason });
                }
                LifecycleEvent::CloseIdle => self.events.push_back(Event::CloseIdle),
                LifecycleEvent::ForceClose => {
                    self.control.force();
                    self.events.push_back(Event::ForceClose);
                }
                LifecycleEvent::Resume => {
                    self.stopped = false;
                    self.reopen_sockets();
                    self.events.push_back(Event::Resumed);
                    for index in 0..self.listeners.len() {
                        self.announce(index);
                    }
                    for index in 0..self.datagrams.len() {
                        if self.datagrams[index].socket.is_some() {
                            self.events.push_back(Event::Datagram {
                                socket: DatagramId(index),
                            });
                        }
                    }
                }
                LifecycleEvent::Moved(items) => {
                    let tracker = self.lifecycle.generation().tracker();
                    let offers = items
                        .into_iter()
                        .map(|item| Offer {
                            item,
                            conn: tracker.track(),
                        })
                        .collect();
                    self.events.push_back(Event::Moved(offers));
                }
                // After the force every connection is closed: those that
                // come back then are dropped below.
                LifecycleEvent::Unmoved(offers)
                    if !self.lifecycle.generation().tracker().is_forced() =>
                {
                    self.events.push_back(Event::Unmoved(offers));
                }
                LifecycleEvent::Exit(report) => {
                    self.done = true;
                    self.control.close_all();
                    self.events.push_back(Event::Drained(report));
                }
                // Unmoved after the force: dropped, closed.
                _ => {}
            }
        }
        let moving = self
            .lifecycle
            .generation()
            .tracker()
            .move_version()
            .is_some();
        if moving && !self.moving {
            self.events.push_back(Event::Moving);
        }
        self.moving = moving;
        self.sync_watched();
    }

    /// Register the lifecycle's fds again if their set changed. Called
    /// right after each call into the lifecycle: a closed fd's number can
    /// only have been reused by the lifecycle itself meanwhile (a new fd in
    /// the new set), so deregistering by number never touches an fd of the
    /// application's.
    fn sync_watched(&mut self) {
        let epoch = self.lifecycle.watch_epoch();
        if self.watched_epoch == Some(epoch) {
            return;
        }
        self.watched_epoch = Some(epoch);
        for fd in self.watched.drain(..) {
            // Already closed (and so removed from epoll): ENOENT or EBADF.
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
        let watched = self.lifecycle.watched();
        let fds: Vec<(RawFd, Interest)> = watched
            .all()
            .map(|fd| {
                let interest = if watched.is_writable(fd) {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                (fd.as_raw_fd(), interest)
            })
            .collect();
        drop(watched);
        for (index, (fd, interest)) in fds.into_iter().enumerate() {
            if index >= MAX_WATCHED {
                log::error!("baton-mio: more than {MAX_WATCHED} lifecycle fds to watch");
                break;
            }
            let token = self.token(FIRST_WATCHED + index);
            match self.registry.register(&mut SourceFd(&fd), token, interest) {
                Ok(()) => self.watched.push(fd),
                Err(e) => log::error!("cannot watch fd {fd} in mio: {e}"),
            }
        }
    }

    /// The stop: drop this generation's handles on its listeners and
    /// datagram sockets (it keeps its own copies to hand on, or to serve
    /// again), and the control socket.
    fn close_sockets(&mut self) {
        for slot in &mut self.listeners {
            if let Some(mut listener) = slot.listener.take() {
                let _ = self.registry.deregister(&mut listener);
            }
            slot.paused_until = None;
            slot.more = false;
            slot.held = false;
        }
        for slot in &mut self.datagrams {
            if let Some(mut socket) = slot.socket.take() {
                let _ = self.registry.deregister(&mut socket);
            }
        }
        self.control.close_listener(&self.registry);
        self.events
            .retain(|e| !matches!(e, Event::Accept { .. } | Event::Datagram { .. }));
    }

    /// Serve again: listeners, datagram sockets and the control socket
    /// reopened from this generation's own copies.
    fn reopen_sockets(&mut self) {
        let generation = self.lifecycle.generation();
        for slot in &mut self.listeners {
            let reopened = generation
                .reopen::<Listener>(&slot.name)
                .map_err(Error::from);
            match reopened.and_then(|mut listener| {
                self.registry
                    .register(&mut listener, slot.token, Interest::READABLE)
                    .map_err(Error::Register)
                    .map(|()| listener)
            }) {
                Ok(listener) => {
                    slot.listener = Some(listener);
                    slot.budget = ACCEPT_BATCH;
                }
                Err(e) => log::error!("cannot listen on {:?} again: {e}", slot.name),
            }
        }
        for slot in &mut self.datagrams {
            let reopened = generation.reopen_datagram(&slot.name).map_err(Error::from);
            match reopened.and_then(|socket| {
                let mut socket = mio::net::UdpSocket::from_std(socket);
                self.registry
                    .register(&mut socket, slot.token, Interest::READABLE)
                    .map_err(Error::Register)
                    .map(|()| socket)
            }) {
                Ok(socket) => slot.socket = Some(socket),
                Err(e) => log::error!("cannot receive on {:?} again: {e}", slot.name),
            }
        }
        if self.config.control.is_some() {
            match control::reopen(generation) {
                Ok(mut listener) => {
                    match self.registry.register(
                        &mut listener,
                        self.token(CONTROL),
                        Interest::READABLE,
                    ) {
                        Ok(()) => self.control.listen(listener),
                        Err(e) => log::error!("cannot listen on the control socket again: {e}"),
                    }
                }
                Err(e) => log::error!("{e}"),
            }
            // Control clients may have queued while it was closed.
            let tracker = self.lifecycle.generation().tracker().clone();
            self.control.accept(&tracker);
        }
    }

    fn token(&self, offset: usize) -> Token {
        Token(self.first_token + offset)
    }

    /// The token for the next listener or datagram socket.
    fn socket_token(&self) -> Result<Token, Error> {
        let index = self.listeners.len() + self.datagrams.len();
        if index >= MAX_SOCKETS {
            return Err(Error::TooManyListeners { max: MAX_SOCKETS });
        }
        Ok(self.token(FIRST_SOCKET + index))
    }

    /// A listener or datagram socket is ready.
    fn socket_ready(&mut self, token: Token) {
        if let Some(index) = self.listeners.iter().position(|s| s.token == token) {
            self.announce(index);
        } else if let Some(index) = self.datagrams.iter().position(|s| s.token == token) {
            let queued = self
                .events
                .iter()
                .any(|e| matches!(e, Event::Datagram { socket } if socket.0 == index));
            if self.datagrams[index].socket.is_some() && !queued {
                self.events.push_back(Event::Datagram {
                    socket: DatagramId(index),
                });
            }
        }
    }

    /// Queue [`Event::Accept`] for listener `index` with a fresh budget,
    /// unless it is closed, backing off, or queued already.
    fn announce(&mut self, index: usize) {
        let Some(slot) = self.listeners.get_mut(index) else {
            return;
        };
        if slot.listener.is_none() || slot.paused_until.is_some() {
            return;
        }
        slot.budget = ACCEPT_BATCH;
        let id = ListenerId(index);
        let queued = self
            .events
            .iter()
            .any(|e| matches!(e, Event::Accept { listener } if *listener == id));
        if !queued {
            self.events.push_back(Event::Accept { listener: id });
        }
    }

    /// The stop token was stopped from outside, and the lifecycle has not
    /// acted on it yet.
    fn stop_pending(&self) -> bool {
        !self.stopped && !self.done && self.lifecycle.generation().stop_token().is_stopped()
    }

    /// A listener held at the connection limit can accept again.
    fn unhold_due(&self) -> bool {
        self.listeners.iter().any(|slot| slot.held)
            && self.lifecycle.generation().tracker().open() < self.config.max_connections
    }

    /// Tell the previous generation why this one cannot serve; returns
    /// `error`.
    fn fail(&self, error: Error) -> Error {
        report(&self.lifecycle, &error);
        error
    }
}

/// Tell the previous generation (if any) why this one cannot serve.
fn report(lifecycle: &Lifecycle, error: &Error) {
    if let Err(e) = lifecycle.generation().report_error(&error.to_string()) {
        log::warn!("cannot tell the previous generation why: {e}");
    }
}

/// Accept errors that concern one client only: the next accept may succeed.
fn concerns_one_client(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

#[cfg(test)]
mod tests;
