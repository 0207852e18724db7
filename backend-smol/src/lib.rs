//! Zero-downtime graceful restart for smol servers.
//!
//! `baton-smol` drives [`baton_core`] with async-io, so it works on smol or
//! any executor: listeners are [`async_io::Async`] sockets, the next
//! generation's readiness fd is an `Async` pipe watched by the same reactor
//! (no thread parked on it), the upgrade timeout and drain deadline are
//! [`async_io::Timer`]s, and signals come from [`async_signal`]. The
//! application writes a few lines: get listeners by name, report ready,
//! serve until stopped, drain.
//!
//! ```no_run
//! use std::time::Duration;
//! use baton_smol::{Baton, Config, Signal};
//! use futures_lite::future;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     smol::block_on(async {
//!         let baton = Baton::from_env(Config::default())?;
//!         // Inherited from the previous generation if it passed "http", else bound.
//!         let listener = baton.listen("http", &"127.0.0.1:8080".parse()?)?;
//!         let mut signals = baton.signals()?;
//!
//!         let stop = baton.stop_token();
//!         let tracker = baton.tracker();
//!         let accept_loop = smol::spawn(async move {
//!             loop {
//!                 // Stop accepting on stop; the listener is dropped with the loop.
//!                 let stopped = async { stop.stopped().await; None };
//!                 let Some(accepted) = future::or(stopped, async { Some(listener.accept().await) }).await
//!                 else { break };
//!                 let Ok(stream) = accepted else { continue };
//!                 let mut conn = tracker.track();
//!                 smol::spawn(async move {
//!                     // serve `stream`: conn.set_busy() while a request runs,
//!                     // conn.set_idle() after it; close when conn.is_draining().
//!                     let _ = (&mut conn, stream);
//!                 })
//!                 .detach();
//!             }
//!         });
//!         baton.ready()?; // the previous generation stops now
//!
//!         while let Some(signal) = signals.recv().await {
//!             match signal {
//!                 Signal::Upgrade => match baton.upgrade().await {
//!                     Ok(upgraded) => eprintln!("upgraded: {upgraded}"),
//!                     Err(e) => eprintln!("upgrade failed, still serving: {e}"),
//!                 },
//!                 Signal::Stop => baton.stop(),
//!             }
//!             if baton.is_stopped() {
//!                 break;
//!             }
//!         }
//!         accept_loop.await;
//!         let report = baton.drain(Duration::from_secs(30)).await;
//!         eprintln!("drained: {report}");
//!         Ok(())
//!     })
//! }
//! ```
#![forbid(unsafe_code)]

mod listener;

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::{future, StreamExt};

pub use baton_core::{
    Config, Connection, ConnectionState, DrainReport, Error, ExitStatus, ListenAddr, Origin,
    StopReason, StopSignal, StopToken, Successor, Tracker, UpgradeError, Upgraded,
};
pub use listener::{Listener, Stream};

/// How long connections get to close after the drain deadline forced them.
const FORCE_GRACE: Duration = Duration::from_secs(1);

/// One generation of a smol server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Baton {
    generation: Arc<baton_core::Generation>,
}

impl Baton {
    /// Adopt what the previous generation (or systemd) passed, if anything.
    pub fn from_env(config: Config) -> Result<Self, Error> {
        Ok(Baton {
            generation: Arc::new(baton_core::Generation::from_env(config)?),
        })
    }

    /// This generation's number: 0 when started by hand, +1 per upgrade.
    pub fn generation(&self) -> u64 {
        self.generation.number()
    }

    /// The listener `name`: inherited if the previous generation passed it,
    /// else bound to `addr`. Needs no executor: async-io's reactor starts
    /// on first use.
    pub fn listen(&self, name: &str, addr: &ListenAddr) -> Result<Listener, Error> {
        Ok(self.listen_with_origin(name, addr)?.0)
    }

    /// Like [`listen`](Self::listen), and says whether the socket was
    /// inherited or bound, for the log.
    pub fn listen_with_origin(
        &self,
        name: &str,
        addr: &ListenAddr,
    ) -> Result<(Listener, Origin), Error> {
        self.generation.listen(name, addr)
    }

    /// The UDP socket `name`: inherited if the previous generation passed
    /// it, else bound to `addr`. Non-blocking; wrap it in the runtime's UDP
    /// type. It is handed to the next generation like a listener.
    pub fn datagram(
        &self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(std::net::UdpSocket, Origin), Error> {
        self.generation.datagram(name, addr)
    }

    /// Another handle on the datagram socket `name`, to serve again after
    /// the successor died (see [`reopen`](Self::reopen)).
    pub fn reopen_datagram(&self, name: &str) -> Result<std::net::UdpSocket, Error> {
        self.generation.reopen_datagram(name)
    }

    /// Report to the parent that this generation serves: call it once the
    /// listeners accept. The parent then stops accepting and drains.
    pub fn ready(&self) -> Result<(), Error> {
        self.generation.ready()
    }

    /// Report to the parent that this generation cannot serve, and why.
    /// The parent logs it and serves on; exit after calling this.
    pub fn report_error(&self, message: &str) -> Result<(), Error> {
        self.generation.report_error(message)
    }

    /// Start the next generation and wait until it reports ready; on
    /// success this generation is stopped ([`StopReason::Upgraded`]).
    /// The same as [`start_upgrade`](Self::start_upgrade) followed by
    /// [`PendingUpgrade::ready`].
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeError> {
        self.start_upgrade()?.ready().await
    }

    /// Start the next generation. Fails at once if an upgrade is already
    /// running, the server is stopping, or the binary cannot be executed.
    pub fn start_upgrade(&self) -> Result<PendingUpgrade, UpgradeError> {
        Ok(PendingUpgrade {
            pending: self.generation.start_upgrade()?,
            generation: self.generation.clone(),
        })
    }

    /// Stop this generation: accept loops end, connections drain.
    pub fn stop(&self) {
        self.generation.stop_token().stop();
    }

    /// True once stopped, by an upgrade or a shutdown.
    pub fn is_stopped(&self) -> bool {
        self.generation.stop_token().is_stopped()
    }

    /// The token accept loops and connections wait on.
    pub fn stop_token(&self) -> StopToken {
        self.generation.stop_token().clone()
    }

    /// The tracker every accepted connection registers with.
    pub fn tracker(&self) -> Tracker {
        self.generation.tracker().clone()
    }

    /// `SIGHUP` as [`Signal::Upgrade`], `SIGTERM` and `SIGINT` as
    /// [`Signal::Stop`]. From now on these signals no longer kill the
    /// process: they are delivered here.
    pub fn signals(&self) -> io::Result<Signals> {
        use async_signal::Signal as S;
        Ok(Signals {
            inner: async_signal::Signals::new([S::Hup, S::Term, S::Int])?,
        })
    }

    /// Wait until every tracked connection has closed, or `timeout` has
    /// passed; then force the rest closed and report how they all ended.
    /// Call it after the stop.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let tracker = self.tracker();
        if !finishes_within(timeout, tracker.empty()).await {
            tracker.force_close();
            // Connections close as soon as they see the force; the bound
            // only guards against one stuck in a write the kernel holds.
            finishes_within(FORCE_GRACE, tracker.empty()).await;
        }
        tracker.report()
    }

    /// Drain after a stop, like [`drain`](Self::drain); after an upgrade,
    /// also watch the new generation until the drain is over and at least
    /// `watch` has passed. If the new generation dies in that window, this
    /// generation serves again: the stop token is re-armed, and the
    /// application restarts its accept loops on [`reopen`](Self::reopen)ed
    /// listeners. Until this process exits it holds its listening sockets,
    /// so the port is never left unserved.
    pub async fn drain_watching(
        &self,
        timeout: Duration,
        watch: Duration,
    ) -> Result<DrainOutcome, Error> {
        let Some(successor) = self.generation.watch_successor()? else {
            return Ok(DrainOutcome::Drained(self.drain(timeout).await));
        };
        let pid = successor.pid();
        let watch_over = Timer::after(watch);
        // The successor's pidfd turns readable when it exits: the reactor
        // watches it, no SIGCHLD handler and no thread. Checked before each
        // wait, so a death before the registration is not missed.
        let successor = Async::new_nonblocking(successor).map_err(Error::Watch)?;
        let died = async {
            loop {
                match successor.get_ref().check()? {
                    Successor::Failed(status) => return Ok::<_, Error>(Watched::Died(status)),
                    // Handed over or stopped on purpose: nothing to watch.
                    Successor::Exited => return future::pending().await,
                    Successor::Running => {}
                }
                successor.readable().await.map_err(Error::Watch)?;
            }
        };
        let drained = async {
            let report = self.drain(timeout).await;
            watch_over.await;
            Ok(Watched::Drained(report))
        };
        match future::or(drained, died).await? {
            Watched::Drained(report) => Ok(DrainOutcome::Drained(report)),
            Watched::Died(status) => {
                self.generation.resume(status);
                Ok(DrainOutcome::Resumed {
                    successor: pid,
                    status,
                })
            }
        }
    }

    /// Another listener on the socket `name` this generation holds, for
    /// accept loops restarted after [`DrainOutcome::Resumed`].
    pub fn reopen(&self, name: &str) -> Result<Listener, Error> {
        self.generation.reopen(name)
    }
}

/// How [`Baton::drain_watching`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection closed (or was forced at the deadline): exit now.
    Drained(DrainReport),
    /// The new generation died while this one drained: this one serves again.
    Resumed {
        /// The pid of the generation that died.
        successor: u32,
        /// How it ended.
        status: ExitStatus,
    },
}

/// Which side of [`Baton::drain_watching`] finished first.
enum Watched {
    Drained(DrainReport),
    Died(ExitStatus),
}

/// Run `work` for at most `timeout`; true if it finished.
async fn finishes_within(timeout: Duration, work: impl Future<Output = ()>) -> bool {
    let work = async {
        work.await;
        true
    };
    let timer = async {
        Timer::after(timeout).await;
        false
    };
    future::or(work, timer).await
}

/// How often, and how many times, a killed child is looked for after a
/// failed upgrade.
const REAP_INTERVAL: Duration = Duration::from_millis(10);
const REAP_ROUNDS: usize = 500;

/// A next generation that was started and has not reported yet.
#[derive(Debug)]
#[must_use = "dropping a pending upgrade kills the new process"]
pub struct PendingUpgrade {
    pending: baton_core::PendingUpgrade,
    generation: Arc<baton_core::Generation>,
}

/// How waiting for the new process ended.
enum Outcome {
    Report(Result<Upgraded, UpgradeError>),
    Stopped,
    TimedOut,
}

impl PendingUpgrade {
    /// The new process's pid.
    pub fn pid(&self) -> u32 {
        self.pending.pid()
    }

    /// Wait until the new process reports ready; on success this generation
    /// is stopped ([`StopReason::Upgraded`]). On any failure the new process
    /// is killed and reaped, and this generation serves on.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes kills the new process; a
    /// stop ([`Baton::stop`], SIGTERM) while it waits does the same and
    /// returns [`UpgradeError::Stopping`].
    pub async fn ready(self) -> Result<Upgraded, UpgradeError> {
        let PendingUpgrade {
            mut pending,
            generation,
        } = self;
        let pid = pending.pid();
        let io_error = |source| UpgradeError::Io { pid, source };
        // async-io watches a duplicate of the readiness pipe (the same open
        // file description, already non-blocking), and the core reads the
        // report from its own fd.
        let watch: Async<OwnedFd> = pending
            .as_fd()
            .try_clone_to_owned()
            .and_then(Async::new_nonblocking)
            .map_err(io_error)?;
        // The child's pidfd: a child that died without a report settles
        // when it has ended, which EOF alone does not tell.
        let exit: Option<Async<OwnedFd>> = pending
            .exit_fd()
            .map(|fd| fd.try_clone_to_owned().and_then(Async::new))
            .transpose()
            .map_err(io_error)?;
        let deadline = pending.deadline();
        let stop = generation.stop_token().clone();
        let outcome = {
            let report = async {
                loop {
                    if let Poll::Ready(result) = pending.poll() {
                        return Outcome::Report(result);
                    }
                    let retry = pending.retry_at();
                    let exited = async {
                        match (&exit, retry) {
                            (Some(exit), _) => exit.readable().await,
                            (None, Some(at)) => {
                                Timer::at(at).await;
                                Ok(())
                            }
                            (None, None) => future::pending().await,
                        }
                    };
                    if let Err(e) = future::or(watch.readable(), exited).await {
                        return Outcome::Report(Err(io_error(e)));
                    }
                }
            };
            let stopped = async {
                stop.stopped().await;
                Outcome::Stopped
            };
            let timed_out = async {
                Timer::at(deadline).await;
                Outcome::TimedOut
            };
            future::or(report, future::or(stopped, timed_out)).await
        };
        let result = match outcome {
            Outcome::Report(result) => result,
            Outcome::Stopped => {
                // Dropping `pending` kills and reaps the child.
                drop(pending);
                Err(UpgradeError::Stopping)
            }
            Outcome::TimedOut => Err(pending.time_out()),
        };
        // The killed child is not waited for; reap it here, on a timer,
        // without blocking the executor (bounded: a straggler is reaped at
        // the next upgrade).
        for _ in 0..REAP_ROUNDS {
            if generation.reap_exited() == 0 {
                break;
            }
            Timer::after(REAP_INTERVAL).await;
        }
        // Tell systemd either way (`MAINPID=`, or `READY=1` with the reason).
        match &result {
            Ok(upgraded) => generation.upgraded(upgraded),
            Err(e) => generation.upgrade_failed(e),
        }
        result
    }
}

/// What a process signal asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `SIGHUP`: start an upgrade.
    Upgrade,
    /// `SIGTERM` or `SIGINT`: stop gracefully.
    Stop,
}

/// The process signals baton acts on, as a stream.
#[derive(Debug)]
pub struct Signals {
    inner: async_signal::Signals,
}

impl Signals {
    /// The next signal; `None` if signals can no longer be received (the
    /// reason is logged).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a signal not returned stays pending.
    pub async fn recv(&mut self) -> Option<Signal> {
        use async_signal::Signal as S;
        loop {
            match self.inner.next().await? {
                Ok(S::Hup) => return Some(Signal::Upgrade),
                Ok(S::Term | S::Int) => return Some(Signal::Stop),
                // Not registered, so never delivered; ignore rather than panic.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("cannot receive signals: {e}");
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
