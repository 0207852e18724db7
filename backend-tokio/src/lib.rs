//! Zero-downtime graceful restart for tokio servers.
//!
//! `baton-tokio` drives [`baton_core`] with tokio: the next generation's
//! readiness fd is a tokio pipe [`Receiver`], the upgrade
//! timeout and drain deadline are tokio timers, signals come from
//! [`tokio::signal`]. The application writes a few lines: get listeners by
//! name, report ready, serve until stopped, drain.
//!
//! With the `axum` feature, the module `baton_tokio::axum` serves an axum app on
//! baton's listeners: `axum::serve(baton.axum_listener(listener), app)`.
//!
//! ```no_run
//! use std::time::Duration;
//! use baton_tokio::{Baton, Config, Signal};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let baton = Baton::from_env(Config::default())?;
//!     // Inherited from the previous generation if it passed "http", else bound.
//!     let listener = baton.listen("http", &"127.0.0.1:8080".parse()?)?;
//!     let mut signals = baton.signals()?;
//!
//!     let stop = baton.stop_token();
//!     let tracker = baton.tracker();
//!     tokio::spawn(async move {
//!         loop {
//!             let stream = tokio::select! {
//!                 accepted = listener.accept() => accepted,
//!                 _ = stop.stopped() => break, // stop accepting; drop the listener
//!             };
//!             let Ok(stream) = stream else { continue };
//!             let mut conn = tracker.track();
//!             tokio::spawn(async move {
//!                 // serve `stream`: conn.set_busy() while a request runs,
//!                 // conn.set_idle() after it; close when conn.is_draining().
//!                 let _ = (&mut conn, stream);
//!             });
//!         }
//!     });
//!     baton.ready()?; // the previous generation stops now
//!
//!     while let Some(signal) = signals.recv().await {
//!         match signal {
//!             Signal::Upgrade => match baton.upgrade().await {
//!                 Ok(upgraded) => eprintln!("upgraded: {upgraded}"),
//!                 Err(e) => eprintln!("upgrade failed, still serving: {e}"),
//!             },
//!             Signal::Stop => baton.stop(),
//!         }
//!         if baton.is_stopped() {
//!             break;
//!         }
//!     }
//!     let report = baton.drain(Duration::from_secs(30)).await;
//!     eprintln!("drained: {report}");
//!     Ok(())
//! }
//! ```
#![forbid(unsafe_code)]

#[cfg(feature = "axum")]
pub mod axum;
mod listener;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::unix::pipe::Receiver;
use tokio::signal::unix::{signal, SignalKind};

pub use baton_core::{
    Config, Connection, ConnectionState, DrainReport, Error, ExitStatus, ListenAddr, Origin,
    StopReason, StopSignal, StopToken, Successor, Tracker, UpgradeError, Upgraded,
};
pub use listener::{Listener, Stream};

/// How long connections get to close after the drain deadline forced them.
const FORCE_GRACE: Duration = Duration::from_secs(1);

/// One generation of a tokio server. Cheap to clone.
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
    /// else bound to `addr`. Must be called inside a tokio runtime.
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
    /// [`Signal::Stop`]. Must be called inside a tokio runtime.
    pub fn signals(&self) -> io::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Wait until every tracked connection has closed, or `timeout` has
    /// passed; then force the rest closed and report how they all ended.
    /// Call it after the stop.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let tracker = self.tracker();
        if tokio::time::timeout(timeout, tracker.empty())
            .await
            .is_err()
        {
            tracker.force_close();
            // Connections close as soon as they see the force; the bound
            // only guards against one stuck in a write the kernel holds.
            let _ = tokio::time::timeout(FORCE_GRACE, tracker.empty()).await;
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
        let watch_until = tokio::time::Instant::now() + watch;
        // SIGCHLD says "a child changed state"; `exited` says whether it was
        // the successor. Checked once after subscribing, so a death before
        // the subscription is not missed.
        let mut child_signals = signal(SignalKind::child()).map_err(Error::Watch)?;
        let died = async {
            loop {
                match successor.check()? {
                    Successor::Failed(status) => return Ok::<_, Error>(status),
                    // Handed over or stopped on purpose: nothing to watch.
                    Successor::Exited => return std::future::pending().await,
                    Successor::Running => {}
                }
                child_signals.recv().await;
            }
        };
        let drained = async {
            let report = self.drain(timeout).await;
            tokio::time::sleep_until(watch_until).await;
            report
        };
        tokio::select! {
            report = drained => Ok(DrainOutcome::Drained(report)),
            status = died => {
                let status = status?;
                self.generation.resume(status);
                Ok(DrainOutcome::Resumed { successor: successor.pid(), status })
            }
        }
    }

    /// Another listener on the socket `name` this generation holds, for
    /// accept loops restarted after [`DrainOutcome::Resumed`]. Must be
    /// called inside a tokio runtime.
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
        let generation = self.generation.clone();
        let result = self.wait().await;
        // The killed child is not waited for; reap it here, on a timer,
        // without blocking the runtime (bounded: a straggler is reaped at
        // the next upgrade).
        for _ in 0..REAP_ROUNDS {
            if generation.reap_exited() == 0 {
                break;
            }
            tokio::time::sleep(REAP_INTERVAL).await;
        }
        match &result {
            Ok(upgraded) => generation.upgraded(upgraded),
            Err(e) => generation.upgrade_failed(e),
        }
        result
    }

    async fn wait(self) -> Result<Upgraded, UpgradeError> {
        let PendingUpgrade {
            mut pending,
            generation,
        } = self;
        let pid = pending.pid();
        let deadline = tokio::time::Instant::from_std(pending.deadline());
        let io_error = |source| UpgradeError::Io { pid, source };
        // tokio watches a duplicate of the readiness pipe (the same open
        // file description), and the core reads the report from its own fd.
        let watch = pending.as_fd().try_clone_to_owned().map_err(io_error)?;
        let watch = Receiver::from_owned_fd(watch).map_err(io_error)?;
        // A child that died without a report settles once it has ended,
        // which EOF alone does not tell: SIGCHLD wakes the loop for that
        // (subscribed before the first poll, so no exit is missed).
        let mut child_signals = signal(SignalKind::child()).map_err(io_error)?;
        let report = async {
            loop {
                let retry = pending.retry_at();
                tokio::select! {
                    ready = watch.readable() => ready.map_err(io_error)?,
                    _ = child_signals.recv() => {}
                    () = async {
                        match retry {
                            Some(at) => tokio::time::sleep_until(at.into()).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
                // try_io clears tokio's readiness when the core hit WouldBlock.
                match watch.try_io(|| match pending.poll() {
                    Poll::Ready(result) => Ok(result),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }) {
                    Ok(result) => return result,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(io_error(e)),
                }
            }
        };
        let stop = generation.stop_token().clone();
        tokio::select! {
            result = tokio::time::timeout_at(deadline, report) => match result {
                Ok(result) => result,
                Err(_elapsed) => Err(pending.time_out()),
            },
            _ = stop.stopped() => Err(UpgradeError::Stopping),
        }
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
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// The next signal.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a signal not returned stays pending.
    pub async fn recv(&mut self) -> Option<Signal> {
        tokio::select! {
            Some(()) = self.hangup.recv() => Some(Signal::Upgrade),
            Some(()) = self.terminate.recv() => Some(Signal::Stop),
            Some(()) = self.interrupt.recv() => Some(Signal::Stop),
            else => None,
        }
    }
}
