//! The lifecycle of one generation, from "serving" to "exit", written once.
//!
//! [`Lifecycle`] is a state machine in the manner of quinn-proto: it does the
//! syscalls that never block (fork/exec of the next generation, reading its
//! report, reaping), but it never waits. A backend feeds it what its reactor
//! saw — a signal, a control command, an fd that became readable, the time —
//! and acts on the [`Event`]s it returns; [`Lifecycle::poll_timeout`] says
//! when to call [`Lifecycle::handle_timeout`] at the latest. baton-mio drives
//! it from the application's `mio::Poll`; baton-tokio and baton-smol through
//! the one async driver in [`crate::server`].
//!
//! What it decides, so that no backend decides it differently:
//!
//! - an upgrade (SIGHUP, control `upgrade`, the API) starts only while
//!   serving and while no other runs; a trigger during one is refused and
//!   answered at once;
//! - a stop (SIGTERM, SIGINT, control `stop`, the API) abandons a pending
//!   upgrade (the new process is killed), stops accepting and drains; it is
//!   sticky: a generation asked to stop never serves again;
//! - a stop during the drain ends it at once: what is left is closed and
//!   counted as forced (nginx's fast shutdown);
//! - the drain has a deadline, then a short grace for forced connections;
//! - after a handover, the successor is watched for at least the watch
//!   window: if it dies (not a clean exit, and not after it handed over to
//!   a newer generation), this generation serves again;
//! - systemd hears `READY=1` again after every failed upgrade, and the PID
//!   file names whoever serves.
//!
//! - application state ([`crate::Config::state_versions`]) moves to the
//!   next generation before it reports ready: when the two share a state
//!   version, the items of [`Lifecycle::on_save_state`] are sent, and
//!   committed once the upgrade succeeded; on any failure this generation
//!   keeps them and the upgrade goes on without them (`state: …` lines say
//!   why);
//! - open connections move too ([`Lifecycle::move_connections`]): once the
//!   state is committed, the same channel stays open, and connections the
//!   application offers at safe points ([`crate::Connection::offer`]) go
//!   over in further transactions; committed, they are the new
//!   generation's ([`Event::Moved`] there); if a move fails they come back
//!   ([`Event::Unmoved`]) and drain here as without a handover
//!   (`moves: …` lines say why).
//!
//! Every lifecycle line is logged at `info` (or `warn`) through `log`, in the
//! words the demo prints: `upgrade started: new process P`, `upgrade done:
//! pid P generation G ready after N ms`, `upgrade failed: …; still serving`,
//! `draining N connections`, `drained: …`, `resumed: …`.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::generation::{Generation, Successor, SuccessorWatch};
use crate::handover::{HandoverError, Item, Receiver, ReceiverEvent, Sender, SenderEvent};
use crate::stop::StopReason;
use crate::tracker::{Connection, DrainReport, Offer};
use crate::upgrade::{PendingUpgrade, UpgradeError, Upgraded};
use crate::ExitStatus;

/// How long connections get to close once the drain deadline forced them.
pub const FORCE_GRACE: Duration = Duration::from_secs(1);

/// How often unreaped children of failed upgrades are checked again.
const REAP_RETRY: Duration = Duration::from_millis(50);

/// How long [`Lifecycle::ready`] waits for the previous generation's state
/// when the application did not take it with
/// [`Generation::receive_state`] first.
const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// The lifecycle's settings, beyond what [`crate::Config`] gives the
/// generation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Timeouts {
    /// How long the drain may take before what is left is closed. Default 30 s.
    pub drain: Duration,
    /// How long, at least, the successor is watched after a handover.
    /// Default 2 s.
    pub successor_watch: Duration,
    /// How long forced connections get to close. Default [`FORCE_GRACE`].
    pub force_grace: Duration,
    /// How long an idle keep-alive connection may still send one last
    /// request after the stop: closing it at once races with a client that
    /// is just sending. Default 2 s.
    pub idle_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            drain: Duration::from_secs(30),
            successor_watch: Duration::from_secs(2),
            force_grace: FORCE_GRACE,
            idle_grace: Duration::from_secs(2),
        }
    }
}

/// Names the caller that waits for an answer (a control connection); the
/// backend maps it to wherever the answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyTo(pub u64);

/// What an operator or the application asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Start an upgrade; the answer comes with its outcome.
    Upgrade,
    /// Describe the server.
    Status,
    /// Stop gracefully; during a drain, end it at once.
    Stop,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// The upgrade succeeded: this process serves no more.
    Upgraded(Upgraded),
    /// The upgrade failed or was refused; this process serves on (or is
    /// stopping, which the reason says).
    UpgradeFailed(String),
    /// The state of the server.
    Status(Status),
    /// The stop was taken.
    Stopping,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This process.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// Since it started.
    pub uptime: Duration,
    /// Connections open now.
    pub open: usize,
    /// Connections with a request in progress now.
    pub busy: usize,
    /// How the last upgrade that ran (or could not start) ended.
    pub last_upgrade: Option<Result<Upgraded, String>>,
}

/// What the backend must do.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Deliver `answer` to `reply`.
    Answer {
        /// Who waits.
        reply: ReplyTo,
        /// What to tell it.
        answer: Answer,
    },
    /// Stop accepting: end the accept loops and drop their listeners. The
    /// stop token has stopped; connections drain.
    StopAccepting(StopReason),
    /// The idle grace after the stop passed: close connections that wait
    /// for their next request ([`crate::Tracker::closing_idle`] says the
    /// same to futures).
    CloseIdle,
    /// The drain deadline passed: close every connection now.
    ForceClose,
    /// The successor died while this generation drained: serve again,
    /// accepting on listeners from [`Generation::reopen`].
    Resume,
    /// Connections the previous generation moved here, committed: serve
    /// each (the item's name is its kind, its fds hold the socket) with a
    /// new guard from this generation's tracker.
    Moved(Vec<Item>),
    /// Connections offered to the next generation that did not move (it
    /// refused or died, the move failed, or moves had ended): serve them
    /// on, whole, as before the offer; they drain as without a handover.
    Unmoved(Vec<Offer>),
    /// Every connection closed (or was forced) and the watch is over: exit.
    Exit(DrainReport),
}

/// The fds the backend watches for readability on the lifecycle's behalf,
/// and those of them it also watches for writability. Any of them ready:
/// call [`Lifecycle::handle_readable`].
#[derive(Debug, Default)]
pub struct Watched<'a> {
    /// Signal pipes (when the lifecycle handles signals).
    pub signals: Vec<BorrowedFd<'a>>,
    /// The pending upgrade's readiness fd and its exit fd.
    pub upgrade: Vec<BorrowedFd<'a>>,
    /// The successor's exit and hand-over fds, while it is watched.
    pub successor: Vec<BorrowedFd<'a>>,
    /// The state channels: to the next generation while state or
    /// connections move, from the previous one while they arrive.
    pub state: Vec<BorrowedFd<'a>>,
    /// Fds of [`all`](Self::all) to watch for writability too (the state
    /// channel while frames wait for room). A reactor that registers an fd
    /// once (tokio, async-io) may wait for writability alone on these: a
    /// hang-up or error wakes that wait too, and `handle_readable` reads
    /// whatever came.
    pub writable: Vec<BorrowedFd<'a>>,
}

impl<'a> Watched<'a> {
    /// Every fd to watch for readability, in one list.
    pub fn all(&self) -> impl Iterator<Item = BorrowedFd<'a>> + '_ {
        self.signals
            .iter()
            .chain(&self.upgrade)
            .chain(&self.successor)
            .chain(&self.state)
            .copied()
    }

    /// True if `fd` is to be watched for writability too.
    pub fn is_writable(&self, fd: BorrowedFd<'_>) -> bool {
        use std::os::fd::AsRawFd;
        self.writable
            .iter()
            .any(|w| w.as_raw_fd() == fd.as_raw_fd())
    }
}

/// One upgrade in flight and who waits for its outcome.
#[derive(Debug)]
struct Upgrade {
    pending: PendingUpgrade,
    replies: Vec<ReplyTo>,
    state: Option<StateSend>,
}

/// The state channel to the child of the pending upgrade.
#[derive(Debug)]
struct StateSend {
    sender: Sender,
    /// The child said "prepared": commit once it is ready.
    prepared: bool,
}

/// The application's [`Lifecycle::on_save_state`] callback.
struct SaveState(Box<dyn FnMut(u32) -> Vec<Item> + Send + Sync>);

impl std::fmt::Debug for SaveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaveState(..)")
    }
}

/// After a successful upgrade: the channel to the new generation, for the
/// state's commit and then for connections.
#[derive(Debug)]
struct Moving {
    sender: Sender,
    /// The new generation.
    pid: u32,
    /// The guards of the connections in the open transaction, in the order
    /// of their items.
    in_flight: Vec<Connection>,
    /// The state's transaction is committed: later ones move connections.
    state_committed: bool,
}

/// After ready: the channel from the previous generation, for its commit
/// and then for connections.
#[derive(Debug)]
struct Receiving {
    receiver: Receiver,
    /// Connections prepared and waiting for the commit.
    held: Vec<Item>,
}

/// What driving the state channel left to do with it.
#[derive(Debug, PartialEq, Eq)]
enum Keep {
    Yes,
    No,
}

/// Most channel events handled per wake-up: the rest wait for the next.
const MAX_STATE_EVENTS: usize = 64;

/// The drain after a stop.
#[derive(Debug)]
struct Drain {
    /// When idle connections are told to close; `None` once told.
    close_idle_at: Option<Instant>,
    deadline: Instant,
    /// Set once forced: when to give up on connections that did not close.
    give_up: Option<Instant>,
    successor: Option<SuccessorWatch>,
    watch_until: Instant,
    /// When the drain began; `None` once the last connection was gone (and
    /// logged as such).
    began: Option<Instant>,
}

/// The state machine of one generation. See the [module docs](self).
#[derive(Debug)]
pub struct Lifecycle {
    generation: Generation,
    timeouts: Timeouts,
    signals: Option<crate::signals::SignalPipes>,
    upgrade: Option<Upgrade>,
    drain: Option<Drain>,
    /// An operator or the application asked this generation to stop: it
    /// never serves again, whatever its successor does.
    stop_requested: bool,
    events: VecDeque<Event>,
    started: Instant,
    last_upgrade: Option<Result<Upgraded, String>>,
    exited: bool,
    /// Changes whenever the set of [`watched`](Lifecycle::watched) fds does.
    epoch: u64,
    /// Killed children of failed upgrades not reaped yet.
    unreaped: usize,
    save_state: Option<SaveState>,
    /// The kinds of connection this generation moves and resumes.
    move_kinds: Vec<String>,
    /// After a successful upgrade: the channel to the new generation.
    moving: Option<Moving>,
    /// Whether a state channel was last watched for writability.
    state_writable: bool,
    /// After ready: the channel from the previous generation.
    receiving: Option<Receiving>,
}

impl Lifecycle {
    /// The lifecycle of `generation`. Call [`ready`](Self::ready) once its
    /// listeners accept.
    pub fn new(generation: Generation, timeouts: Timeouts) -> Self {
        Lifecycle {
            generation,
            timeouts,
            signals: None,
            upgrade: None,
            drain: None,
            stop_requested: false,
            events: VecDeque::new(),
            started: Instant::now(),
            last_upgrade: None,
            exited: false,
            epoch: 0,
            unreaped: 0,
            save_state: None,
            move_kinds: Vec::new(),
            moving: None,
            state_writable: false,
            receiving: None,
        }
    }

    /// What this generation moves to the next one, at the negotiated state
    /// version (given): called once per upgrade whose new generation shares
    /// a version of [`crate::Config::state_versions`] with this one, while
    /// this one still serves. Without it, an empty transaction is sent.
    pub fn on_save_state(&mut self, save: impl FnMut(u32) -> Vec<Item> + Send + Sync + 'static) {
        self.save_state = Some(SaveState(Box::new(save)));
    }

    /// Move open connections of these kinds at each upgrade, and take
    /// those of the previous generation: the application offers them
    /// ([`crate::Connection::offer`], the item named by the kind) and
    /// serves them on [`Event::Moved`] and [`Event::Unmoved`]. Needs
    /// [`crate::Config::state_versions`]: the connections' state is
    /// written at the negotiated version. A kind the next generation does
    /// not resume makes it refuse the move: those connections drain here.
    pub fn move_connections(&mut self, kinds: impl IntoIterator<Item = impl Into<String>>) {
        self.move_kinds = kinds.into_iter().map(Into::into).collect();
    }

    /// Act on `SIGHUP` (upgrade), `SIGTERM` and `SIGINT` (stop): their
    /// handlers write to fds in [`watched`](Self::watched).
    pub fn handle_signals(&mut self) -> std::io::Result<()> {
        if self.signals.is_none() {
            self.signals = Some(crate::signals::SignalPipes::install()?);
            self.epoch += 1;
        }
        Ok(())
    }

    /// The generation: its listeners, stop token and tracker.
    pub fn generation(&self) -> &Generation {
        &self.generation
    }

    /// Tell the parent (and systemd) that this generation serves.
    pub fn ready(&mut self) -> Result<(), crate::Error> {
        // State the application did not take: prepared and dropped, so the
        // channel is ready for connections.
        match self.generation.receive_state(STATE_TIMEOUT) {
            Ok(items) if !items.is_empty() => log::warn!(
                "state: {} items received and not taken by the application",
                items.len()
            ),
            Ok(_) => {}
            Err(e) => log::warn!("state: {e}"),
        }
        if !self.move_kinds.is_empty() && self.generation.state_versions().is_none() {
            log::warn!(
                "moves: no state versions declared (Config::state_versions): connections of {:?} drain at upgrades instead of moving",
                self.move_kinds
            );
        }
        self.generation.ready()?;
        log::info!("serving");
        // Watch for the previous generation's commit, then for connections.
        if let Some(receiver) = self.generation.take_state_receiver() {
            self.receiving = Some(Receiving {
                receiver,
                held: Vec::new(),
            });
            self.epoch += 1;
            self.poll_state();
        }
        Ok(())
    }

    /// True once this generation stopped (upgraded or asked to stop) and
    /// has not resumed.
    pub fn is_stopping(&self) -> bool {
        self.drain.is_some() || self.generation.stop_token().is_stopped()
    }

    /// A number that changes whenever the set of [`watched`](Self::watched)
    /// fds changes: a reactor that registers them once (mio) registers them
    /// again then. An fd number alone cannot tell, since a closed fd's number
    /// is reused by the next one opened.
    pub fn watch_epoch(&self) -> u64 {
        self.epoch
    }

    /// The fds to watch now; the set changes as upgrades start and end.
    pub fn watched(&self) -> Watched<'_> {
        let mut watched = Watched::default();
        if let Some(signals) = &self.signals {
            watched.signals.extend(signals.fds());
        }
        if let Some(upgrade) = &self.upgrade {
            watched
                .upgrade
                .push(std::os::fd::AsFd::as_fd(&upgrade.pending));
            watched.upgrade.extend(upgrade.pending.exit_fd());
        }
        if let Some(receiving) = &self.receiving {
            let fd = std::os::fd::AsFd::as_fd(&receiving.receiver);
            watched.state.push(fd);
            if receiving.receiver.wants_write() {
                watched.writable.push(fd);
            }
        }
        for sender in self.senders() {
            watched.state.push(std::os::fd::AsFd::as_fd(sender));
            if sender.wants_write() {
                watched.writable.push(std::os::fd::AsFd::as_fd(sender));
            }
        }
        if let Some(successor) = self.drain.as_ref().and_then(|d| d.successor.as_ref()) {
            watched.successor.extend(successor.fds());
        }
        watched
    }

    /// A request from the application or a control connection; `reply`
    /// gets its [`Answer`] as an [`Event::Answer`].
    pub fn request(&mut self, request: Request, reply: Option<ReplyTo>, now: Instant) {
        match request {
            Request::Upgrade => self.start_upgrade(reply),
            Request::Status => {
                if let Some(reply) = reply {
                    let tracker = self.generation.tracker();
                    let status = Status {
                        pid: std::process::id(),
                        generation: self.generation.number(),
                        uptime: now.saturating_duration_since(self.started),
                        open: tracker.open(),
                        busy: tracker.busy(),
                        last_upgrade: self.last_upgrade.clone(),
                    };
                    self.answer(reply, Answer::Status(status));
                }
            }
            Request::Stop => {
                if let Some(reply) = reply {
                    self.answer(reply, Answer::Stopping);
                }
                self.stop("stop requested", now);
            }
        }
        self.unreaped = self.generation.reap_exited();
    }

    /// Something in [`watched`](Self::watched) is readable (or may be):
    /// read and act on everything, without blocking.
    pub fn handle_readable(&mut self, now: Instant) {
        if let Some(signals) = &mut self.signals {
            let arrived = signals.take();
            // Several SIGHUPs read at once are one request.
            if arrived.upgrade > 0 {
                self.start_upgrade(None);
            }
            // Two stops read at once are a stop, then "finish now".
            for _ in 0..arrived.stop.min(2) {
                self.stop("signal received", now);
            }
        }
        // The state channel first: a "prepared" is in its socket before
        // the new generation writes "ready".
        self.poll_state();
        self.poll_upgrade();
        self.check_successor(now);
        self.handle_timeout(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called at the
    /// latest; `None` when nothing is timed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let upgrade = self.upgrade.as_ref().map(|u| {
            let deadline = u.pending.deadline();
            u.pending.retry_at().map_or(deadline, |at| at.min(deadline))
        });
        let now = Instant::now();
        let drain = self.drain.as_ref().map(|d| {
            let mut next = d.give_up.unwrap_or(d.deadline);
            if let Some(at) = d.close_idle_at {
                next = next.min(at);
            }
            if self.generation.tracker().open() == 0 {
                // The connections are gone: the drain ends with the watch,
                // or now (once a killed child is reaped: its own timer);
                // say so now.
                if d.began.is_some() {
                    next = now;
                } else if d.watch_until > now {
                    next = next.min(d.watch_until);
                } else if self.unreaped == 0 && self.receiving.as_ref().is_none_or(is_between) {
                    // (Connections on their way here: the channel wakes.)
                    next = now;
                }
            }
            next
        });
        let reap = (self.unreaped > 0).then(|| now + REAP_RETRY);
        // Offers to send, or to give back: now.
        let offers =
            (self.generation.tracker().has_offers() && self.can_take_offers()).then_some(now);
        [upgrade, drain, reap, offers].into_iter().flatten().min()
    }

    /// Time passed: the upgrade timeout, the drain deadline and its grace,
    /// the end of the watch, reaping. Also call it when connections close
    /// during the drain (the async driver waits on the tracker for that).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.poll_state();
        let timed_out = self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.pending.deadline() <= now);
        if timed_out {
            if let Some(upgrade) = self.upgrade.take() {
                let error = upgrade.pending.time_out();
                self.settle(Err(error), upgrade.replies, upgrade.state, now);
            }
        } else if self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.pending.retry_at().is_some_and(|at| at <= now))
        {
            self.poll_upgrade();
        }
        self.advance_drain(now);
        // Last: a child killed above is counted, and its reap timed.
        self.unreaped = self.generation.reap_exited();
    }

    /// The next thing to do, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// True once [`Event::Exit`] was returned: nothing more will happen.
    pub fn is_done(&self) -> bool {
        self.exited && self.events.is_empty()
    }

    fn answer(&mut self, reply: ReplyTo, answer: Answer) {
        self.events.push_back(Event::Answer { reply, answer });
    }

    fn start_upgrade(&mut self, reply: Option<ReplyTo>) {
        // While stopping, or while one runs, refuse at once: the
        // generation's own checks say why.
        let started = if self.stop_requested || self.drain.is_some() || self.exited {
            Err(UpgradeError::Stopping)
        } else if let Some(upgrade) = &self.upgrade {
            Err(UpgradeError::AlreadyRunning {
                pid: upgrade.pending.pid(),
            })
        } else {
            self.generation.start_upgrade()
        };
        match started {
            Ok(mut pending) => {
                log::info!("upgrade started: new process {}", pending.pid());
                self.epoch += 1;
                let state = pending.take_state_sender().map(|sender| StateSend {
                    sender,
                    prepared: false,
                });
                self.upgrade = Some(Upgrade {
                    pending,
                    replies: reply.into_iter().collect(),
                    state,
                });
                self.poll_state();
            }
            Err(error) => {
                log::info!("upgrade failed: {error}; still serving");
                let reason = error.to_string();
                // A refusal is not an upgrade that ran: status keeps the last one.
                if !matches!(
                    error,
                    UpgradeError::AlreadyRunning { .. } | UpgradeError::Stopping
                ) {
                    self.generation.upgrade_failed(&error);
                    self.last_upgrade = Some(Err(reason.clone()));
                }
                if let Some(reply) = reply {
                    self.answer(reply, Answer::UpgradeFailed(reason));
                }
            }
        }
    }

    fn poll_upgrade(&mut self) {
        let Some(upgrade) = self.upgrade.as_mut() else {
            return;
        };
        if let std::task::Poll::Ready(result) = upgrade.pending.poll() {
            if let Some(upgrade) = self.upgrade.take() {
                self.settle(result, upgrade.replies, upgrade.state, Instant::now());
            }
        }
    }

    /// Drive the state channel: answer the negotiation with the
    /// application's items, note "prepared", finish a commit. Never blocks.
    fn poll_state(&mut self) {
        if let Some(upgrade) = self.upgrade.as_mut() {
            let pid = upgrade.pending.pid();
            if let Some(state) = upgrade.state.as_mut() {
                if drive_state(state, &mut self.save_state, pid) == Keep::No {
                    upgrade.state = None;
                    self.epoch += 1;
                }
            }
        }
        if let Some(receiving) = self.receiving.as_mut() {
            if drive_receiving(receiving, &self.move_kinds, &mut self.events) == Keep::No {
                self.receiving = None;
                self.epoch += 1;
            }
        }
        self.poll_moves();
        let writable = self.senders().any(Sender::wants_write)
            || self
                .receiving
                .as_ref()
                .is_some_and(|r| r.receiver.wants_write());
        if writable != self.state_writable {
            self.state_writable = writable;
            self.epoch += 1;
        }
    }

    /// The senders of the state channels to the next generation.
    fn senders(&self) -> impl Iterator<Item = &Sender> {
        self.upgrade
            .as_ref()
            .and_then(|u| u.state.as_ref())
            .map(|s| &s.sender)
            .into_iter()
            .chain(self.moving.as_ref().map(|m| &m.sender))
    }

    /// True if offered connections can be acted on now: sent in a new
    /// transaction, or given back because nothing takes them.
    fn can_take_offers(&self) -> bool {
        self.moving
            .as_ref()
            .is_none_or(|m| m.sender.can_begin() || m.sender.is_finished())
    }

    /// Drive the channel to the new generation after the upgrade: the
    /// state's commit, then moves of the connections offered.
    fn poll_moves(&mut self) {
        let tracker = self.generation.tracker().clone();
        if let Some(moving) = self.moving.as_mut() {
            let moves = !self.move_kinds.is_empty();
            if drive_moving(moving, moves, &mut self.events) == Keep::No {
                tracker.close_moves();
                self.moving = None;
                self.epoch += 1;
            }
        }
        if !tracker.has_offers() || !self.can_take_offers() {
            return;
        }
        let offers = tracker.take_offers();
        let Some(moving) = self
            .moving
            .as_mut()
            .filter(|_| tracker.move_version().is_some())
        else {
            give_back(&mut self.events, offers);
            return;
        };
        let (count, pid) = (offers.len(), moving.pid);
        if let Err(e) = moving.sender.begin() {
            log::info!("moves: {e}; {count} connections stay");
            give_back(&mut self.events, offers);
            return;
        }
        let mut refused = Vec::new();
        for Offer { item, conn } in offers {
            match moving.sender.push(item) {
                Ok(()) => moving.in_flight.push(conn),
                Err(r) => {
                    log::warn!("moves: {r}; that connection stays");
                    refused.push(Offer { item: r.item, conn });
                }
            }
        }
        if !refused.is_empty() {
            give_back(&mut self.events, refused);
        }
        log::debug!(
            "moves: offering {} connections to new process {pid}",
            moving.in_flight.len()
        );
        if let Err(e) = moving.sender.end() {
            log::info!("moves: {e}");
        }
        // Frames may be queued now: watch for writability.
        self.epoch += 1;
    }

    /// The upgrade settled: commit the state if it succeeded and the new
    /// generation prepared it; otherwise this generation keeps it.
    fn settle_state(&mut self, state: Option<StateSend>, result: &Result<Upgraded, UpgradeError>) {
        let Some(mut state) = state else {
            return;
        };
        let pid = match result {
            Ok(upgraded) => upgraded.pid,
            Err(e) => e.pid().unwrap_or_default(),
        };
        if result.is_ok() && drive_state(&mut state, &mut self.save_state, pid) == Keep::No {
            return;
        }
        match result {
            Ok(_) if state.prepared => match state.sender.commit() {
                Ok(()) => {
                    // Connections may move from now on: offers wait in the
                    // tracker until the commit is in the socket.
                    if let (false, Some(version)) =
                        (self.move_kinds.is_empty(), state.sender.version())
                    {
                        self.generation.tracker().open_moves(version);
                    }
                    self.moving = Some(Moving {
                        sender: state.sender,
                        pid,
                        in_flight: Vec::new(),
                        state_committed: false,
                    });
                    self.poll_state();
                }
                Err(e) => log::warn!("state: not moved to new process {pid}: commit: {e}"),
            },
            Ok(_) => {
                log::info!(
                    "state: not moved: new process {pid} reported ready without preparing it; this generation keeps it"
                );
                let _ = state.sender.abort("ready before prepared");
            }
            Err(_) => {
                log::info!("state: not moved: the upgrade failed; this generation keeps it");
                let _ = state.sender.abort("the upgrade failed");
            }
        }
    }

    fn settle(
        &mut self,
        result: Result<Upgraded, UpgradeError>,
        replies: Vec<ReplyTo>,
        state: Option<StateSend>,
        now: Instant,
    ) {
        self.epoch += 1;
        self.settle_state(state, &result);
        let answer = match result {
            Ok(upgraded) => {
                // First tell our own parent (if it still watches us) that a
                // newer generation serves: killed after this, we are no
                // longer its business. Then the operator; then stop, which
                // wakes every connection (thousands of tasks on a busy
                // server) and is no part of the handover.
                self.generation.handed_over();
                log::info!("upgrade done: {upgraded}");
                self.generation.upgraded(&upgraded);
                self.last_upgrade = Some(Ok(upgraded));
                Answer::Upgraded(upgraded)
            }
            Err(error) => {
                if matches!(error, UpgradeError::Stopping) {
                    log::info!("upgrade abandoned: the server is stopping");
                } else {
                    log::info!("upgrade failed: {error}; still serving");
                    self.generation.upgrade_failed(&error);
                }
                let reason = error.to_string();
                self.last_upgrade = Some(Err(reason.clone()));
                Answer::UpgradeFailed(reason)
            }
        };
        for reply in replies {
            self.answer(reply, answer.clone());
        }
        if self.generation.stop_token().is_stopped() && self.drain.is_none() {
            self.begin_drain(now);
        }
    }

    /// A stop from an operator or the application.
    fn stop(&mut self, why: &str, now: Instant) {
        if self.exited {
            // Done already: a late SIGTERM changes nothing.
            return;
        }
        if self.drain.is_some() {
            // Draining already (after a handover or a first stop): an
            // operator's stop now means "finish now".
            self.stop_requested = true;
            self.force(now, "stop received while draining: closing what is left");
            return;
        }
        self.stop_requested = true;
        log::info!("stopping: {why}");
        if let Some(upgrade) = self.upgrade.take() {
            self.epoch += 1;
            // Dropping it kills the new process (reaped without blocking).
            drop(upgrade.pending);
            if upgrade.state.is_some() {
                log::info!("state: not moved: the upgrade was abandoned; this generation keeps it");
            }
            log::info!("upgrade abandoned: the server is stopping");
            let answer = Answer::UpgradeFailed(UpgradeError::Stopping.to_string());
            for reply in upgrade.replies {
                self.answer(reply, answer.clone());
            }
        }
        self.generation.stop_token().stop();
        self.begin_drain(now);
    }

    fn begin_drain(&mut self, now: Instant) {
        let reason = self
            .generation
            .stop_token()
            .reason()
            .unwrap_or(StopReason::Shutdown);
        let successor = if reason == StopReason::Upgraded && !self.stop_requested {
            match self.generation.watch_successor() {
                Ok(watch) => watch,
                Err(e) => {
                    log::warn!("{e}; draining without watching the new generation");
                    None
                }
            }
        } else {
            None
        };
        let watch_until = if successor.is_some() {
            now.checked_add(self.timeouts.successor_watch)
                .unwrap_or(now)
        } else {
            now
        };
        self.epoch += 1;
        log::info!("draining {} connections", self.generation.tracker().open());
        self.drain = Some(Drain {
            close_idle_at: Some(now.checked_add(self.timeouts.idle_grace).unwrap_or(now)),
            deadline: now.checked_add(self.timeouts.drain).unwrap_or(now),
            give_up: None,
            successor,
            watch_until,
            began: Some(now),
        });
        self.events.push_back(Event::StopAccepting(reason));
        self.advance_drain(now);
    }

    fn force(&mut self, now: Instant, why: &str) {
        let Some(drain) = self.drain.as_mut() else {
            return;
        };
        if drain.give_up.is_some() {
            return;
        }
        if self.generation.tracker().open() > 0 {
            log::info!("{why}");
        }
        // Offers from now on come back, to be closed.
        self.generation.tracker().close_moves();
        self.generation.tracker().force_close();
        drain.give_up = Some(now.checked_add(self.timeouts.force_grace).unwrap_or(now));
        self.events.push_back(Event::ForceClose);
    }

    fn advance_drain(&mut self, now: Instant) {
        let Some(drain) = &self.drain else {
            return;
        };
        if self.exited {
            return;
        }
        if drain.close_idle_at.is_some_and(|at| at <= now) {
            self.generation.tracker().close_idle();
            self.events.push_back(Event::CloseIdle);
            if let Some(drain) = self.drain.as_mut() {
                drain.close_idle_at = None;
            }
        }
        let Some(drain) = &self.drain else {
            return;
        };
        if drain.give_up.is_none() && drain.deadline <= now {
            self.force(now, "drain deadline passed: closing what is left");
        }
        let Some(drain) = self.drain.as_mut() else {
            return;
        };
        if self.generation.tracker().open() == 0 {
            // How long this generation held connections after it stopped
            // (moved ones leave at once; drained ones with their clients).
            if let Some(began) = drain.began.take() {
                let held = now.saturating_duration_since(began).as_secs_f64() * 1000.0;
                log::info!("no connection left after {held:.1} ms");
            }
        }
        let connections_done =
            self.generation.tracker().open() == 0 || drain.give_up.is_some_and(|at| at <= now);
        let watch_over = drain.successor.is_none() || drain.watch_until <= now;
        // A killed child dies within moments: reap it before exiting, so it
        // is not left to whoever inherits it (bounded by the drain deadline).
        self.unreaped = self.generation.reap_exited();
        let children_done = self.unreaped == 0 || drain.deadline <= now;
        // Connections the previous generation is moving here are taken
        // (and moved on, or drained) before this one exits.
        let arrivals_done = self.receiving.as_ref().is_none_or(is_between) || drain.deadline <= now;
        if connections_done && watch_over && children_done && arrivals_done {
            let report = self.generation.tracker().report();
            log::info!("drained: {report}");
            log::info!("exit");
            self.drain = None;
            self.epoch += 1;
            self.exited = true;
            self.events.push_back(Event::Exit(report));
        }
    }

    fn check_successor(&mut self, now: Instant) {
        let Some(watch) = self.drain.as_mut().and_then(|d| d.successor.as_mut()) else {
            return;
        };
        let pid = watch.pid();
        let fds = watch.fds().len();
        let checked = watch.check();
        if watch.fds().len() != fds {
            self.epoch += 1;
        }
        let status = match checked {
            Ok(Successor::Running) => return,
            Ok(Successor::Failed(status)) => status,
            Ok(other) => {
                log::debug!("new generation {pid}: {other:?}; not watching it any more");
                self.end_watch(now);
                return;
            }
            Err(e) => {
                log::warn!("{e}; not watching the new generation any more");
                self.end_watch(now);
                return;
            }
        };
        if self.stop_requested {
            log::info!(
                "new generation {pid} ended ({status}) while this one drained; not serving again: a stop was requested"
            );
            self.end_watch(now);
            return;
        }
        self.resume(pid, status);
    }

    fn end_watch(&mut self, now: Instant) {
        if let Some(drain) = self.drain.as_mut() {
            drain.successor = None;
            self.epoch += 1;
        }
        self.advance_drain(now);
    }

    fn resume(&mut self, pid: u32, status: ExitStatus) {
        log::info!(
            "resumed: new generation {pid} ended ({status}) while this one drained; serving again"
        );
        self.drain = None;
        self.epoch += 1;
        self.generation.tracker().close_moves();
        self.generation.resume(status);
        self.events.push_back(Event::Resume);
    }
}

/// Handle what the state channel of a pending upgrade reported.
fn drive_state(state: &mut StateSend, save: &mut Option<SaveState>, pid: u32) -> Keep {
    for _ in 0..MAX_STATE_EVENTS {
        let event = match state.sender.poll() {
            Ok(Some(event)) => event,
            Ok(None) => return Keep::Yes,
            Err(e) => {
                log::info!("state: not moved to new process {pid}: {e}; this generation keeps it");
                return Keep::No;
            }
        };
        match event {
            SenderEvent::Negotiated(Some(version)) => {
                let items = save.as_mut().map(|f| (f.0)(version)).unwrap_or_default();
                if let Err(e) = send_items(&mut state.sender, items, pid) {
                    log::info!(
                        "state: not moved to new process {pid}: {e}; this generation keeps it"
                    );
                    return Keep::No;
                }
            }
            SenderEvent::Negotiated(None) => {
                log::info!(
                    "state: not moved: new process {pid} shares no state version with this generation"
                );
                return Keep::No;
            }
            SenderEvent::Prepared => state.prepared = true,
            SenderEvent::Aborted { cause, .. } => {
                log::info!(
                    "state: not moved to new process {pid}: {cause}; this generation keeps it"
                );
                return Keep::No;
            }
            SenderEvent::Closed => {
                log::info!(
                    "state: not moved: new process {pid} closed the channel (it takes no state)"
                );
                return Keep::No;
            }
            SenderEvent::Committed => {}
        }
    }
    Keep::Yes
}

/// One transaction: `items` at the negotiated version.
fn send_items(sender: &mut Sender, items: Vec<Item>, pid: u32) -> Result<(), HandoverError> {
    sender.begin()?;
    for item in items {
        let (name, version, len) = (item.name.clone(), item.version, item.payload.len());
        match sender.push(item) {
            Ok(()) => {
                log::info!("state: sending {name:?} v{version} ({len} bytes) to new process {pid}")
            }
            Err(refused) => log::warn!("state: {refused}; this generation keeps it"),
        }
    }
    sender.end()
}

/// Connections offered that did not move: back to the application, for
/// good (they are not offered again).
fn give_back(events: &mut VecDeque<Event>, mut offers: Vec<Offer>) {
    for offer in &mut offers {
        offer.conn.set_stays();
    }
    events.push_back(Event::Unmoved(offers));
}

/// True between transactions (nothing held, nothing being received).
fn is_between(receiving: &Receiving) -> bool {
    receiving.held.is_empty() && receiving.receiver.can_begin()
}

/// The new generation after ready: the previous one's commit, then (when
/// this one moves connections) transactions of connections.
fn drive_receiving(
    receiving: &mut Receiving,
    kinds: &[String],
    events: &mut VecDeque<Event>,
) -> Keep {
    for _ in 0..MAX_STATE_EVENTS {
        let event = match receiving.receiver.poll() {
            Ok(None) if !receiving.receiver.is_finished() => return Keep::Yes,
            Ok(Some(event)) => event,
            Ok(None) => return Keep::No,
            Err(e) => {
                log::info!("moves: channel from the previous generation: {e}");
                return Keep::No;
            }
        };
        match event {
            ReceiverEvent::Committed if receiving.held.is_empty() => {
                log::debug!("state: the previous generation committed");
                // Without kinds to take, the channel has served.
                if kinds.is_empty() {
                    return Keep::No;
                }
            }
            ReceiverEvent::Committed => {
                let moved = std::mem::take(&mut receiving.held);
                log::debug!("moves: {} connections committed here", moved.len());
                events.push_back(Event::Moved(moved));
            }
            ReceiverEvent::Transaction { items, .. } => {
                if let Some(item) = items.iter().find(|i| !kinds.contains(&i.name)) {
                    let reason = format!("no resume for connections of kind {:?}", item.name);
                    log::info!("moves: refused: {reason}");
                    let _ = receiving.receiver.abort(&reason);
                    return Keep::No;
                }
                if let Err(e) = receiving.receiver.prepared() {
                    log::info!("moves: {e}");
                    return Keep::No;
                }
                receiving.held = items;
            }
            ReceiverEvent::Aborted(e) => {
                let dropped = std::mem::take(&mut receiving.held).len();
                log::info!("moves: the previous generation did not commit ({e}); {dropped} connections stay there");
                return Keep::No;
            }
            ReceiverEvent::Negotiated(_) => {}
            ReceiverEvent::Closed => return Keep::No,
        }
    }
    Keep::Yes
}

/// The old generation after the upgrade: the state's commit, then each
/// move of connections: commit what the new generation prepared, let go of
/// what it committed, give back what did not move.
fn drive_moving(moving: &mut Moving, moves: bool, events: &mut VecDeque<Event>) -> Keep {
    let pid = moving.pid;
    for _ in 0..MAX_STATE_EVENTS {
        let event = match moving.sender.poll() {
            Ok(None) => return Keep::Yes,
            Ok(Some(event)) => event,
            Err(e) => {
                log::info!("moves: channel to new process {pid}: {e}");
                return Keep::No;
            }
        };
        match event {
            SenderEvent::Committed if !moving.state_committed => {
                moving.state_committed = true;
                log::info!("state: committed to the new generation");
                if !moves {
                    return Keep::No;
                }
            }
            SenderEvent::Committed => {
                let count = moving.in_flight.len();
                for mut conn in moving.in_flight.drain(..) {
                    conn.set_moved();
                }
                // (None when the new generation's limits refused them all.)
                if count > 0 {
                    log::info!("moved {count} connections to new process {pid}");
                }
            }
            SenderEvent::Prepared => {
                if let Err(e) = moving.sender.commit() {
                    log::info!("moves: commit: {e}");
                }
            }
            SenderEvent::Aborted { cause, items } => {
                let count = items.len();
                log::info!(
                    "moves: not moved to new process {pid}: {cause}; {count} connections stay"
                );
                let offers = items
                    .into_iter()
                    .zip(moving.in_flight.drain(..))
                    .map(|(item, conn)| Offer { item, conn })
                    .collect();
                give_back(events, offers);
                return Keep::No;
            }
            SenderEvent::Closed => {
                log::debug!("moves: new process {pid} closed the channel");
                return Keep::No;
            }
            SenderEvent::Negotiated(_) => {}
        }
    }
    Keep::Yes
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
