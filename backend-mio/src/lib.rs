//! Zero-downtime graceful restart for servers on a hand-driven mio event
//! loop, with no executor.
//!
//! `baton-mio` drives [`baton_core`] from the application's own
//! [`mio::Poll`]: a [`Baton`] registers its sources (listeners, the next
//! generation's readiness fd, a [`mio::Waker`] for stops, a signal pipe)
//! under a reserved range of [`TOKENS`] tokens, turns their readiness and its
//! timers into [`Event`]s, and says through [`Baton::next_timeout`] how long
//! the loop may block. Connections stay the application's: it registers each
//! accepted [`Stream`] under its own tokens and keeps its [`Connection`]
//! guard up to date, so the drain knows what is busy.
//!
//! ```no_run
//! use std::time::Duration;
//! use baton_mio::{Baton, Config, Event};
//! use mio::{Events, Poll, Token};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut poll = Poll::new()?;
//!     // Tokens 0..TOKENS are baton's; the application uses the others.
//!     let mut baton = Baton::new(Config::default(), poll.registry(), Token(0))?;
//!     // Inherited from the previous generation if it passed "http", else bound.
//!     baton.listen("http", &"127.0.0.1:8080".parse()?)?;
//!     baton.handle_signals()?; // SIGHUP upgrades, SIGTERM/SIGINT stop
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
//!                 Event::Accept { listener } => loop {
//!                     match baton.accept(listener) {
//!                         Ok(Some((stream, conn))) => {
//!                             // Register `stream` under an application token and
//!                             // keep `conn` with it: set_busy() while a request
//!                             // runs, set_idle() after; close once draining.
//!                             drop((stream, conn));
//!                         }
//!                         Ok(None) => break,
//!                         Err(e) => {
//!                             eprintln!("accept: {e}; paused briefly");
//!                             break;
//!                         }
//!                     }
//!                 },
//!                 Event::Upgrade => match baton.start_upgrade() {
//!                     Ok(pid) => eprintln!("upgrading to pid {pid}"),
//!                     Err(e) => eprintln!("upgrade failed, still serving: {e}"),
//!                 },
//!                 Event::UpgradeDone(Ok(upgraded)) => eprintln!("upgraded: {upgraded}"),
//!                 Event::UpgradeDone(Err(e)) => eprintln!("upgrade failed, still serving: {e}"),
//!                 Event::Shutdown => baton.stop(),
//!                 // Listeners are closed; let the connections finish, and
//!                 // after an upgrade serve again if the new generation dies.
//!                 Event::Stop { .. } => {
//!                     let (timeout, watch) = (Duration::from_secs(30), Duration::from_secs(2));
//!                     if baton.drain_watching(timeout, watch).is_err() {
//!                         baton.drain(timeout);
//!                     }
//!                 }
//!                 Event::Resumed { successor, .. } => eprintln!("{successor} died: serving again"),
//!                 Event::ForceClose => { /* drop every connection now */ }
//!                 Event::Drained(report) => {
//!                     eprintln!("drained: {report}");
//!                     return Ok(());
//!                 }
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
//! A whole server is in `examples/mio_server.rs`; the demo's mio backend
//! (`baton-demo --backend mio`) drives HTTP/1.1 connections as explicit
//! state machines on top of it.
#![forbid(unsafe_code)]

mod listener;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use baton_core::{Generation, PendingUpgrade, Successor, SuccessorWatch};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

pub use baton_core::{
    Config, Connection, ConnectionState, DrainReport, ExitStatus, ListenAddr, Origin, StopReason,
    StopSignal, StopToken, Tracker, UpgradeError, Upgraded,
};
pub use listener::{Listener, Stream};

/// How many tokens a [`Baton`] reserves, from the first one it is given:
/// its waker, its signals, the readiness fd of an upgrade, the watch on the
/// next generation, and one per listener (so at most `TOKENS - 4`
/// listeners).
pub const TOKENS: usize = 64;

/// How long a listener is left alone after an accept error such as
/// `EMFILE`: accepting again at once would fail again, in a busy loop.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections [`Baton::accept`] hands out per [`Event::Accept`]. A
/// listener that still has more waits one loop turn: under a flood of new
/// connections, the ones already open, timers and upgrades still get their
/// turn.
pub const ACCEPT_BATCH: usize = 64;

/// How long connections get to close after the drain deadline forced them.
const FORCE_GRACE: Duration = Duration::from_secs(1);

/// Offsets of baton's tokens from the first one.
const WAKER: usize = 0;
const SIGNALS: usize = 1;
const UPGRADE: usize = 2;
const WATCH: usize = 3;
const FIRST_LISTENER: usize = 4;

/// Why a [`Baton`] could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The generation could not be adopted, or a listener bound.
    #[error(transparent)]
    Core(#[from] baton_core::Error),
    /// Registering with the mio registry failed.
    #[error("cannot register with mio: {0}")]
    Register(#[source] io::Error),
    /// Every listener token is taken.
    #[error("too many listeners: baton-mio has tokens for {max}")]
    TooManyListeners {
        /// How many listeners fit in [`TOKENS`].
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

/// What happened, for the application's event loop.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Connections may be waiting on this listener: call
    /// [`Baton::accept`] until it returns `Ok(None)` or an error.
    Accept {
        /// The listener.
        listener: ListenerId,
    },
    /// `SIGHUP`: the operator asks for an upgrade; usually answered with
    /// [`Baton::start_upgrade`].
    Upgrade,
    /// `SIGTERM` or `SIGINT`: the operator asks for a graceful stop; usually
    /// answered with [`Baton::stop`].
    Shutdown,
    /// The upgrade started by [`Baton::start_upgrade`] has settled. On
    /// success this generation is stopped and [`Event::Stop`] follows; on
    /// failure the new process was killed and reaped, and this one serves on.
    UpgradeDone(Result<Upgraded, UpgradeError>),
    /// This generation stopped: its listeners are closed. Connections
    /// should finish their request (answering with `Connection: close`) or
    /// close if idle; call [`Baton::drain`] to bound how long that takes.
    Stop {
        /// Upgraded, or shut down.
        reason: StopReason,
    },
    /// The drain deadline passed: close every connection now.
    ForceClose,
    /// Every connection has closed (or the deadline and its grace passed),
    /// and the watch on the next generation is over: how they ended. The
    /// application can exit.
    Drained(DrainReport),
    /// The next generation died while this one drained (see
    /// [`Baton::drain_watching`]): this one serves again. Its listeners are
    /// open and registered again, [`Baton::is_stopped`] is false, and the
    /// application's connections go on as before the stop.
    Resumed {
        /// The pid of the generation that died.
        successor: u32,
        /// How it ended.
        status: ExitStatus,
    },
}

/// One listener and its accept back-off.
#[derive(Debug)]
struct ListenerSlot {
    /// Its name, to reopen it if this generation serves again.
    name: String,
    listener: Option<Listener>,
    /// Set after an accept error; readiness is ignored until then.
    paused_until: Option<Instant>,
    /// Accepts left before this listener yields to the rest of the loop.
    budget: usize,
    /// The budget ran out with connections maybe still queued: announce
    /// the listener again on the next turn, without waiting for readiness.
    more: bool,
}

/// The drain after a stop.
#[derive(Debug)]
struct Drain {
    deadline: Instant,
    /// Set once connections were forced: when to report regardless.
    give_up: Option<Instant>,
    /// The next generation, watched until the drain is reported.
    successor: Option<SuccessorWatch>,
    /// The drain is not reported before this: the watch lasts at least
    /// until then.
    not_before: Instant,
    reported: bool,
}

/// One generation of a mio server: its listeners, signals, upgrade and
/// drain, registered in the application's [`mio::Poll`].
pub struct Baton {
    generation: Generation,
    registry: Registry,
    first_token: usize,
    waker: Arc<Waker>,
    signals: Option<Signals>,
    listeners: Vec<ListenerSlot>,
    upgrade: Option<PendingUpgrade>,
    events: VecDeque<Event>,
    /// Set once [`Event::Stop`] was queued.
    stop_seen: bool,
    drain: Option<Drain>,
}

impl fmt::Debug for Baton {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Baton")
            .field("generation", &self.generation.number())
            .field("first_token", &self.first_token)
            .field("listeners", &self.listeners)
            .field("signals", &self.signals.is_some())
            .field("upgrade", &self.upgrade.as_ref().map(PendingUpgrade::pid))
            .field("stop_seen", &self.stop_seen)
            .field("drain", &self.drain)
            .finish()
    }
}

impl Baton {
    /// Adopt what the previous generation (or systemd) passed, if anything,
    /// and register with `registry` under the tokens
    /// `first_token .. first_token + TOKENS`.
    pub fn new(config: Config, registry: &Registry, first_token: Token) -> Result<Self, Error> {
        if first_token.0.checked_add(TOKENS).is_none() {
            return Err(Error::Register(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the token range overflows",
            )));
        }
        let generation = Generation::from_env(config)?;
        let registry = registry.try_clone().map_err(Error::Register)?;
        let waker = Waker::new(&registry, Token(first_token.0 + WAKER)).map_err(Error::Register)?;
        let waker = Arc::new(waker);
        // A stop from any thread (the API, a successful upgrade) wakes the
        // loop; `process` then sees the flag.
        let hook = waker.clone();
        generation.stop_token().on_stop(move || {
            if let Err(e) = hook.wake() {
                log::warn!("cannot wake the event loop for the stop: {e}");
            }
        });
        Ok(Baton {
            generation,
            registry,
            first_token: first_token.0,
            waker,
            signals: None,
            listeners: Vec::new(),
            upgrade: None,
            events: VecDeque::new(),
            stop_seen: false,
            drain: None,
        })
    }

    /// This generation's number: 0 when started by hand, +1 per upgrade.
    pub fn generation(&self) -> u64 {
        self.generation.number()
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

    /// The listener `name`: inherited if the previous generation passed it,
    /// else bound to `addr`. It is registered at once; connections are
    /// announced by [`Event::Accept`].
    pub fn listen(&mut self, name: &str, addr: &ListenAddr) -> Result<ListenerId, Error> {
        Ok(self.listen_with_origin(name, addr)?.0)
    }

    /// Like [`listen`](Self::listen), and says whether the socket was
    /// inherited or bound, for the log.
    pub fn listen_with_origin(
        &mut self,
        name: &str,
        addr: &ListenAddr,
    ) -> Result<(ListenerId, Origin), Error> {
        let max = TOKENS - FIRST_LISTENER;
        let index = self.listeners.len();
        if index >= max {
            return Err(Error::TooManyListeners { max });
        }
        let (mut listener, origin): (Listener, Origin) = self.generation.listen(name, addr)?;
        let token = self.token(FIRST_LISTENER + index);
        self.registry
            .register(&mut listener, token, Interest::READABLE)
            .map_err(Error::Register)?;
        self.listeners.push(ListenerSlot {
            name: name.to_owned(),
            listener: Some(listener),
            paused_until: None,
            budget: ACCEPT_BATCH,
            more: false,
        });
        // Connections may already wait in an inherited socket's queue:
        // registration reports them, so nothing more is needed here.
        Ok((ListenerId(index), origin))
    }

    /// The UDP socket `name`: inherited if the previous generation passed
    /// it, else bound to `addr`. Non-blocking; it is handed to the next
    /// generation like a listener. Unlike listeners it is not registered:
    /// the application wraps it with `mio::net::UdpSocket::from_std`,
    /// registers it under one of its own tokens, and deregisters and drops
    /// it at [`Event::Stop`] (the generation keeps a copy for the handoff).
    pub fn datagram(
        &self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(std::net::UdpSocket, Origin), Error> {
        Ok(self.generation.datagram(name, addr)?)
    }

    /// Another handle on the datagram socket `name`, to serve it again
    /// after [`Event::Resumed`].
    pub fn reopen_datagram(&self, name: &str) -> Result<std::net::UdpSocket, Error> {
        Ok(self.generation.reopen_datagram(name)?)
    }

    /// The listener `id`, while it is open (until the stop).
    pub fn listener(&self, id: ListenerId) -> Option<&Listener> {
        self.listeners.get(id.0)?.listener.as_ref()
    }

    /// Accept one connection on `id`, tracked for the drain. `Ok(None)`
    /// when none is waiting, after the stop, while the listener backs off,
    /// or after [`ACCEPT_BATCH`] connections since the last
    /// [`Event::Accept`] (it comes again on the next turn of the loop).
    /// An error such as `EMFILE` pauses the listener for
    /// [`ACCEPT_BACKOFF`], after which [`Event::Accept`] comes again;
    /// errors that concern one client only (it reset before we accepted)
    /// are skipped.
    pub fn accept(&mut self, id: ListenerId) -> io::Result<Option<(Stream, Connection)>> {
        if self.generation.stop_token().is_stopped() {
            return Ok(None);
        }
        let Some(slot) = self.listeners.get_mut(id.0) else {
            return Ok(None);
        };
        let Some(listener) = slot.listener.as_ref() else {
            return Ok(None);
        };
        if slot.paused_until.is_some() {
            return Ok(None);
        }
        if slot.budget == 0 {
            slot.more = true;
            return Ok(None);
        }
        loop {
            match listener.accept() {
                Ok(stream) => {
                    slot.budget -= 1;
                    return Ok(Some((stream, self.generation.tracker().track())));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if concerns_one_client(&e) => continue,
                Err(e) => {
                    slot.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return Err(e);
                }
            }
        }
    }

    /// Deliver `SIGHUP` as [`Event::Upgrade`] and `SIGTERM`/`SIGINT` as
    /// [`Event::Shutdown`] instead of their default actions. Signals that
    /// come after the stop are swallowed: the drain is already running.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        if self.signals.is_some() {
            return Ok(());
        }
        let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
        self.registry
            .register(&mut signals, self.token(SIGNALS), Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Report to the parent that this generation serves: call it once the
    /// listeners are registered. The parent then stops accepting and drains.
    pub fn ready(&self) -> Result<(), baton_core::Error> {
        self.generation.ready()
    }

    /// Report to the parent that this generation cannot serve, and why.
    /// The parent logs it and serves on; exit after calling this.
    pub fn report_error(&self, message: &str) -> Result<(), baton_core::Error> {
        self.generation.report_error(message)
    }

    /// Start the next generation and return its pid. Its report comes as
    /// [`Event::UpgradeDone`]. Fails at once if an upgrade is already
    /// running, the server is stopping, or the binary cannot be executed.
    pub fn start_upgrade(&mut self) -> Result<u32, UpgradeError> {
        let pending = self.generation.start_upgrade()?;
        let pid = pending.pid();
        // A report written before this registration is not lost: epoll
        // reports the readiness an fd already has when it is added.
        self.registry
            .register(
                &mut SourceFd(&pending.as_raw_fd()),
                self.token(UPGRADE),
                Interest::READABLE,
            )
            .map_err(|source| UpgradeError::Io { pid, source })?;
        // The child's pidfd, same token: a child that died without a
        // report settles once it has ended, which EOF alone does not tell.
        if let Some(exit) = pending.exit_fd() {
            let registered = self.registry.register(
                &mut SourceFd(&exit.as_raw_fd()),
                self.token(UPGRADE),
                Interest::READABLE,
            );
            if let Err(source) = registered {
                let _ = self
                    .registry
                    .deregister(&mut SourceFd(&pending.as_raw_fd()));
                return Err(UpgradeError::Io { pid, source });
            }
        }
        self.upgrade = Some(pending);
        Ok(pid)
    }

    /// Stop this generation: listeners close, connections drain.
    /// [`Event::Stop`] follows.
    pub fn stop(&self) {
        self.generation.stop_token().stop();
    }

    /// True once stopped, by an upgrade or a shutdown.
    pub fn is_stopped(&self) -> bool {
        self.generation.stop_token().is_stopped()
    }

    /// The token that stops this generation; usable from any thread.
    pub fn stop_token(&self) -> StopToken {
        self.generation.stop_token().clone()
    }

    /// The tracker of this generation's connections.
    pub fn tracker(&self) -> Tracker {
        self.generation.tracker().clone()
    }

    /// Start the drain after the stop: [`Event::Drained`] comes once every
    /// tracked connection has closed; if `timeout` passes first,
    /// [`Event::ForceClose`] asks the application to close the rest.
    /// Before the stop there is nothing to drain, and it does nothing; so
    /// does a second call.
    pub fn drain(&mut self, timeout: Duration) {
        if self.drain.is_none() && self.is_stopped() {
            let now = Instant::now();
            self.drain = Some(Drain {
                deadline: now + timeout,
                give_up: None,
                successor: None,
                not_before: now,
                reported: false,
            });
        }
    }

    /// Like [`drain`](Self::drain); after an upgrade, also watch the new
    /// generation until the drain is over and at least `watch` has passed.
    /// If it dies in that window (killed, or an exit status other than 0:
    /// a clean exit means it handed over in turn or was stopped on
    /// purpose), this generation serves again:
    /// [`Event::Resumed`] comes instead of [`Event::Drained`]. Until this
    /// process exits it holds its listening sockets, so the port is never
    /// left unserved. On an error nothing has started: call `drain`.
    pub fn drain_watching(&mut self, timeout: Duration, watch: Duration) -> Result<(), Error> {
        if self.drain.is_some() || !self.is_stopped() {
            return Ok(());
        }
        let successor = self.generation.watch_successor()?;
        if let Some(successor) = &successor {
            self.registry
                .register(
                    &mut SourceFd(&successor.as_fd().as_raw_fd()),
                    self.token(WATCH),
                    Interest::READABLE,
                )
                .map_err(Error::Register)?;
        }
        let now = Instant::now();
        self.drain = Some(Drain {
            deadline: now + timeout,
            give_up: None,
            not_before: if successor.is_some() {
                now + watch
            } else {
                now
            },
            successor,
            reported: false,
        });
        Ok(())
    }

    /// How long the loop may block before baton has something to do:
    /// `None` for "until an event", zero when events are already queued.
    /// Call it right before `Poll::poll`, after the application has dropped
    /// its closed connections, so a drain that just completed is noticed.
    pub fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if !self.events.is_empty()
            || self.stop_pending()
            || self.drain_complete(now)
            || self.listeners.iter().any(|slot| slot.more)
        {
            return Some(Duration::ZERO);
        }
        let drain = self.drain.as_ref().filter(|d| !d.reported);
        // Only instants that change something when they pass, so a passed
        // one cannot turn into a busy loop.
        let deadlines = [
            drain.map(|d| d.give_up.unwrap_or(d.deadline)),
            drain.map(|d| d.not_before),
        ];
        // These two are cleared by the `process` that sees them passed, so
        // one that passed since the last `process` means "now", not "never":
        // filtering it out would block the loop until some other event (a
        // listener paused by EMFILE stayed paused while clients waited).
        let cleared_when_passed = self
            .listeners
            .iter()
            .filter_map(|slot| slot.paused_until)
            .chain(self.upgrade.as_ref().map(PendingUpgrade::deadline))
            .chain(self.upgrade.as_ref().and_then(PendingUpgrade::retry_at));
        let next = deadlines
            .into_iter()
            .flatten()
            .filter(|&at| at > now)
            .chain(cleared_when_passed)
            .min()?;
        Some(next.saturating_duration_since(now))
    }

    /// Handle the readiness of baton's sources among `events` and the
    /// timers that are due; the results come from
    /// [`next_event`](Self::next_event). Call it after every `Poll::poll`,
    /// including one that timed out.
    pub fn process(&mut self, events: &mio::Events) {
        for index in 0..self.listeners.len() {
            if std::mem::take(&mut self.listeners[index].more) {
                self.announce(ListenerId(index));
            }
        }
        for event in events.iter() {
            let Some(offset) = event.token().0.checked_sub(self.first_token) else {
                continue;
            };
            match offset {
                SIGNALS => self.read_signals(),
                UPGRADE => self.poll_upgrade(),
                WATCH => self.check_successor(),
                n if (FIRST_LISTENER..TOKENS).contains(&n) => {
                    let id = ListenerId(n - FIRST_LISTENER);
                    self.announce(id);
                }
                // WAKER: a stop, seen below; anything else is not ours.
                _ => {}
            }
        }
        self.expire(Instant::now());
        self.check_stop();
        // Killed children of failed upgrades, reaped without waiting (on
        // the next event: the lifecycle will add a timer).
        self.generation.reap_exited();
    }

    /// The next event, if any. Drain it after every
    /// [`process`](Self::process).
    pub fn next_event(&mut self) -> Option<Event> {
        self.check_stop();
        if self.drain_complete(Instant::now()) {
            self.end_watch();
            if let Some(drain) = self.drain.as_mut() {
                drain.reported = true;
            }
            let report = self.generation.tracker().report();
            self.events.push_back(Event::Drained(report));
        }
        self.events.pop_front()
    }

    fn token(&self, offset: usize) -> Token {
        Token(self.first_token + offset)
    }

    /// Queue [`Event::Accept`] for `id` with a fresh budget, unless it is
    /// closed, backing off, or queued already.
    fn announce(&mut self, id: ListenerId) {
        let Some(slot) = self.listeners.get_mut(id.0) else {
            return;
        };
        if slot.listener.is_none() || slot.paused_until.is_some() {
            return;
        }
        slot.budget = ACCEPT_BATCH;
        let queued = self
            .events
            .iter()
            .any(|e| matches!(e, Event::Accept { listener } if *listener == id));
        if !queued {
            self.events.push_back(Event::Accept { listener: id });
        }
    }

    fn read_signals(&mut self) {
        let stopped = self.generation.stop_token().is_stopped();
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        for signal in signals.pending() {
            let event = match signal {
                SIGHUP => Event::Upgrade,
                SIGTERM | SIGINT => Event::Shutdown,
                _ => continue,
            };
            if !stopped {
                self.events.push_back(event);
            }
        }
    }

    fn poll_upgrade(&mut self) {
        let Some(pending) = self.upgrade.as_mut() else {
            return;
        };
        if let Poll::Ready(result) = pending.poll() {
            self.end_upgrade();
            self.settle_upgrade(result);
        }
    }

    /// Tell the generation how the upgrade ended (a success stops it), and
    /// the application.
    fn settle_upgrade(&mut self, result: Result<Upgraded, UpgradeError>) {
        match &result {
            Ok(upgraded) => self.generation.upgraded(upgraded),
            Err(e) => self.generation.upgrade_failed(e),
        }
        self.events.push_back(Event::UpgradeDone(result));
    }

    /// Take the pending upgrade out of the registry; dropping what is
    /// returned kills the new process unless it has settled.
    fn end_upgrade(&mut self) -> Option<PendingUpgrade> {
        let pending = self.upgrade.take()?;
        // Closing the fd would remove it from epoll anyway; deregistering
        // keeps the registry's view exact.
        let _ = self
            .registry
            .deregister(&mut SourceFd(&pending.as_raw_fd()));
        if let Some(exit) = pending.exit_fd() {
            let _ = self.registry.deregister(&mut SourceFd(&exit.as_raw_fd()));
        }
        Some(pending)
    }

    fn expire(&mut self, now: Instant) {
        let due = self
            .upgrade
            .as_ref()
            .is_some_and(|pending| pending.deadline() <= now);
        if due {
            if let Some(pending) = self.end_upgrade() {
                self.settle_upgrade(Err(pending.time_out()));
            }
        } else if self
            .upgrade
            .as_ref()
            .and_then(PendingUpgrade::retry_at)
            .is_some_and(|at| at <= now)
        {
            // No pidfd: the dying child's exit is polled on a timer.
            self.poll_upgrade();
        }
        for index in 0..self.listeners.len() {
            let slot = &mut self.listeners[index];
            if slot.paused_until.is_some_and(|until| until <= now) {
                slot.paused_until = None;
                // The connections that came meanwhile raised no new event.
                self.announce(ListenerId(index));
            }
        }
        if let Some(drain) = self.drain.as_mut().filter(|d| !d.reported) {
            if drain.give_up.is_none() && drain.deadline <= now {
                self.generation.tracker().force_close();
                drain.give_up = Some(now + FORCE_GRACE);
                self.events.push_back(Event::ForceClose);
            }
        }
    }

    /// The watched successor's pidfd is readable: it exited. Serve again.
    fn check_successor(&mut self) {
        let Some(successor) = self.drain.as_ref().and_then(|d| d.successor.as_ref()) else {
            return;
        };
        let pid = successor.pid();
        match successor.check() {
            Ok(Successor::Exited) => {
                log::info!("new process {pid} exited cleanly: not serving again");
                self.end_watch();
            }
            Ok(Successor::Failed(status)) => self.resume(pid, status),
            Ok(Successor::Running) => {}
            Err(e) => {
                log::warn!("cannot watch new process {pid} any more: {e}");
                self.end_watch();
            }
        }
    }

    /// Stop watching the successor.
    fn end_watch(&mut self) {
        if let Some(successor) = self.drain.as_mut().and_then(|d| d.successor.take()) {
            let _ = self
                .registry
                .deregister(&mut SourceFd(&successor.as_fd().as_raw_fd()));
        }
    }

    /// The successor died while this generation drained: take the
    /// generation back, reopen and register the listeners.
    fn resume(&mut self, successor: u32, status: ExitStatus) {
        self.end_watch();
        self.drain = None;
        self.stop_seen = false;
        self.generation.resume(status);
        for index in 0..self.listeners.len() {
            let name = self.listeners[index].name.clone();
            let reopened = self.generation.reopen::<Listener>(&name);
            let mut listener: Listener = match reopened {
                Ok(listener) => listener,
                Err(e) => {
                    log::error!("{e}");
                    continue;
                }
            };
            let token = self.token(FIRST_LISTENER + index);
            if let Err(e) = self
                .registry
                .register(&mut listener, token, Interest::READABLE)
            {
                log::error!("cannot listen on {name:?} again: {e}");
                continue;
            }
            self.listeners[index].listener = Some(listener);
        }
        self.events.push_back(Event::Resumed { successor, status });
        for index in 0..self.listeners.len() {
            self.announce(ListenerId(index));
        }
    }

    /// The stop flag is set but [`Event::Stop`] not queued yet.
    fn stop_pending(&self) -> bool {
        !self.stop_seen && self.generation.stop_token().is_stopped()
    }

    /// Queue [`Event::Stop`] once the token is stopped: close the listeners
    /// and abandon an upgrade still pending (killing its process).
    fn check_stop(&mut self) {
        if !self.stop_pending() {
            return;
        }
        self.stop_seen = true;
        for slot in &mut self.listeners {
            if let Some(mut listener) = slot.listener.take() {
                let _ = self.registry.deregister(&mut listener);
            }
            slot.paused_until = None;
        }
        if let Some(pending) = self.end_upgrade() {
            drop(pending);
            self.settle_upgrade(Err(UpgradeError::Stopping));
        }
        let reason = self
            .generation
            .stop_token()
            .reason()
            .unwrap_or(StopReason::Shutdown);
        self.events.push_back(Event::Stop { reason });
    }

    /// The drain runs, is not reported yet, its watch is over, and no
    /// connection is open (or the deadline and its grace have passed).
    fn drain_complete(&self, now: Instant) -> bool {
        self.drain.as_ref().is_some_and(|d| {
            !d.reported
                && d.not_before <= now
                && (self.generation.tracker().open() == 0
                    || d.give_up.is_some_and(|give_up| give_up <= now))
        })
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
