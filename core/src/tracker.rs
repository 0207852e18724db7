//! Connection tracking: what the drain needs to know about every connection.
//!
//! Each accepted connection holds a [`Connection`] guard and says when it is
//! busy (a request in progress) and when it is idle. After stop, the drain
//! waits until every guard is dropped ([`Tracker::empty`]); at its deadline it
//! calls [`Tracker::force_close`], which connection tasks observe through
//! [`Tracker::forced`] and close. The [`DrainReport`] counts how each
//! connection ended after stop.
//!
//! With a live handover, a connection at a safe point (idle between
//! requests, or done with one) can instead move to the next generation:
//! while [`Connection::can_move`] says so, the application saves its state
//! into an [`Item`] and calls [`Connection::offer`]; the lifecycle sends the
//! offers, and the guard lives until the new generation committed them (or
//! they come back, see [`crate::lifecycle::Event::Unmoved`]).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use event_listener::Event;

use crate::handover::Item;
use crate::stop::StopToken;

/// How the connections open at stop ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections open when the drain started.
    pub open_at_start: usize,
    /// Finished a request after stop, answered it with `Connection: close`.
    pub finished: usize,
    /// Closed while idle (no request came within the grace period).
    pub closed_idle: usize,
    /// Still busy at the deadline and closed by force.
    pub forced: usize,
    /// Moved to the next generation, open (live handover).
    pub moved: usize,
}

impl fmt::Display for DrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.moved > 0 {
            write!(f, "{} moved / ", self.moved)?;
        }
        write!(
            f,
            "{} finished / {} closed idle / {} forced",
            self.finished, self.closed_idle, self.forced
        )
    }
}

/// Counts open and busy connections, and how they ended after stop.
#[derive(Clone)]
pub struct Tracker {
    inner: Arc<Inner>,
}

struct Inner {
    stop: StopToken,
    open: AtomicUsize,
    busy: AtomicUsize,
    open_at_stop: AtomicUsize,
    finished: AtomicUsize,
    closed_idle: AtomicUsize,
    forced: AtomicUsize,
    moved: AtomicUsize,
    force: AtomicBool,
    /// Set once the idle grace after the stop has passed.
    close_idle: AtomicBool,
    /// The state version connections may move at, plus one; 0 while they
    /// may not. An atomic: every connection reads it after each request.
    move_version: AtomicU64,
    /// Connections offered and not yet taken by the lifecycle.
    offered: Mutex<Vec<Offer>>,
    /// Notified when `open` drops to zero, when `force` is set, when moves
    /// open and when a connection is offered.
    changed: Event,
    /// Notified whenever a connection closes (`open` decreases), for
    /// [`Tracker::below`]; only accept loops listen to it.
    closed: Event,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("open", &self.open())
            .field("busy", &self.busy())
            .field("forced", &self.is_forced())
            .finish()
    }
}

impl Tracker {
    /// A tracker whose drain starts when `stop` is stopped.
    pub fn new(stop: StopToken) -> Self {
        let inner = Arc::new(Inner {
            stop: stop.clone(),
            open: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            open_at_stop: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            closed_idle: AtomicUsize::new(0),
            forced: AtomicUsize::new(0),
            moved: AtomicUsize::new(0),
            move_version: AtomicU64::new(0),
            offered: Mutex::new(Vec::new()),
            force: AtomicBool::new(false),
            close_idle: AtomicBool::new(false),
            changed: Event::new(),
            closed: Event::new(),
        });
        // Remember how many were open when the drain began, for the report.
        let weak = Arc::downgrade(&inner);
        stop.on_stop(move || {
            if let Some(inner) = weak.upgrade() {
                let open = inner.open.load(Ordering::SeqCst);
                inner.open_at_stop.store(open, Ordering::SeqCst);
            }
        });
        Tracker { inner }
    }

    /// Start tracking a newly accepted connection. It starts idle.
    #[must_use = "the connection is tracked only while the guard lives"]
    pub fn track(&self) -> Connection {
        self.inner.open.fetch_add(1, Ordering::SeqCst);
        Connection {
            tracker: self.clone(),
            busy: false,
            served_after_stop: false,
            moved: false,
            stays: false,
        }
    }

    /// The token whose stop starts the drain.
    pub fn stop_token(&self) -> &StopToken {
        &self.inner.stop
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
    }

    /// Connections with a request in progress now.
    pub fn busy(&self) -> usize {
        self.inner.busy.load(Ordering::SeqCst)
    }

    /// Tell every connection to close now, busy or not: the drain deadline
    /// has passed.
    pub fn force_close(&self) {
        self.inner.force.store(true, Ordering::SeqCst);
        self.inner.changed.notify(usize::MAX);
    }

    /// True once [`force_close`](Self::force_close) was called.
    pub fn is_forced(&self) -> bool {
        self.inner.force.load(Ordering::SeqCst)
    }

    /// Tell idle connections to close: the idle grace after the stop has
    /// passed (the lifecycle calls it). Busy ones finish their request.
    pub fn close_idle(&self) {
        self.inner.close_idle.store(true, Ordering::SeqCst);
        self.inner.changed.notify(usize::MAX);
    }

    /// True once idle connections should close: the idle grace after the
    /// stop has passed, or the drain deadline forced everything.
    pub fn is_closing_idle(&self) -> bool {
        self.inner.close_idle.load(Ordering::SeqCst) || self.is_forced()
    }

    /// The state version to save connections at while they may move to the
    /// next generation; `None` otherwise.
    pub fn move_version(&self) -> Option<u32> {
        let stored = self.inner.move_version.load(Ordering::SeqCst);
        stored.checked_sub(1).and_then(|v| u32::try_from(v).ok())
    }

    /// Resolves once idle connections should act: offer themselves while
    /// [`Connection::can_move`], else close ([`closing_idle`](Self::closing_idle)).
    pub async fn moving_or_closing_idle(&self) {
        self.wait_until(|t| t.is_closing_idle() || t.move_version().is_some())
            .await;
    }

    /// Resolves once a connection was offered and not yet taken.
    pub async fn offered(&self) {
        self.wait_until(Self::has_offers).await;
    }

    /// Let connections move at `version` (the lifecycle does, once the next
    /// generation is ready and takes them).
    pub(crate) fn open_moves(&self, version: u32) {
        let stored = u64::from(version) + 1;
        self.inner.move_version.store(stored, Ordering::SeqCst);
        self.inner.changed.notify(usize::MAX);
    }

    /// No more moves: connections offered from now on come back.
    pub(crate) fn close_moves(&self) {
        self.inner.move_version.store(0, Ordering::SeqCst);
    }

    /// The connections offered since the last call, in order.
    pub(crate) fn take_offers(&self) -> Vec<Offer> {
        std::mem::take(&mut *self.offers())
    }

    /// True if a connection was offered and not yet taken.
    pub fn has_offers(&self) -> bool {
        !self.offers().is_empty()
    }

    fn offers(&self) -> std::sync::MutexGuard<'_, Vec<Offer>> {
        self.inner
            .offered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves when an idle connection should close: the idle grace after
    /// the stop has passed, or the drain deadline forced everything. Any
    /// executor. A connection waiting for its next request races its read
    /// with this; one in the middle of a request waits for
    /// [`forced`](Self::forced) only.
    pub async fn closing_idle(&self) {
        self.wait_until(Self::is_closing_idle).await;
    }

    /// Resolves when [`force_close`](Self::force_close) is called. Any executor.
    pub async fn forced(&self) {
        self.wait_until(Self::is_forced).await;
    }

    /// Resolves when no connection is open. Any executor.
    pub async fn empty(&self) {
        self.wait_until(|t| t.open() == 0).await;
    }

    /// Resolves when fewer than `n` connections are open, at once if so
    /// already. Any executor. An accept loop waits on it before accepting,
    /// to bound open connections with backpressure: clients wait in the
    /// kernel's accept queue until a connection closes.
    pub async fn below(&self, n: usize) {
        self.wait_on(&self.inner.closed, |t| t.open() < n).await;
    }

    async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        self.wait_on(&self.inner.changed, done).await;
    }

    async fn wait_on(&self, event: &Event, done: impl Fn(&Self) -> bool) {
        // Check, listen, check again, so a change between the two is not lost.
        while !done(self) {
            let listener = event.listen();
            if done(self) {
                break;
            }
            listener.await;
        }
    }

    /// Forget an abandoned drain (the generation resumed): its counts, and
    /// a force that would otherwise close every new connection at once.
    pub(crate) fn resume(&self) {
        self.inner.force.store(false, Ordering::SeqCst);
        self.inner.close_idle.store(false, Ordering::SeqCst);
        for counter in [
            &self.inner.finished,
            &self.inner.closed_idle,
            &self.inner.forced,
            &self.inner.moved,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
    }

    /// How the connections open at stop have ended so far.
    pub fn report(&self) -> DrainReport {
        DrainReport {
            open_at_start: self.inner.open_at_stop.load(Ordering::SeqCst),
            finished: self.inner.finished.load(Ordering::SeqCst),
            closed_idle: self.inner.closed_idle.load(Ordering::SeqCst),
            forced: self.inner.forced.load(Ordering::SeqCst),
            moved: self.inner.moved.load(Ordering::SeqCst),
        }
    }
}

/// The guard of one tracked connection. Dropping it closes the books on the
/// connection: after stop, it is counted as finished, closed idle or forced.
#[derive(Debug)]
#[must_use = "the connection is tracked only while the guard lives"]
pub struct Connection {
    tracker: Tracker,
    busy: bool,
    served_after_stop: bool,
    /// Committed to the next generation: counted as moved.
    moved: bool,
    /// Offered and given back: it stays in this generation, so that it
    /// cannot be offered and refused again in a loop.
    stays: bool,
}

/// A connection offered to the next generation: its saved state (the
/// socket among the item's fds) and its guard, which keeps it counted as
/// open until the move is committed.
#[derive(Debug)]
pub struct Offer {
    /// The saved state; its name is the connection's kind.
    pub item: Item,
    /// The guard.
    pub conn: Connection,
}

impl Connection {
    /// A request has started: the drain must let it finish.
    pub fn set_busy(&mut self) {
        if !self.busy {
            self.busy = true;
            self.tracker.inner.busy.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The last request was answered: the drain may close the connection.
    pub fn set_idle(&mut self) {
        if self.busy {
            self.busy = false;
            self.tracker.inner.busy.fetch_sub(1, Ordering::SeqCst);
            if self.tracker.inner.stop.is_stopped() {
                self.served_after_stop = true;
            }
        }
    }

    /// True while a request is in progress.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// True once the server is stopping: the connection should answer its
    /// current request with `Connection: close`, or close if idle.
    pub fn is_draining(&self) -> bool {
        self.tracker.inner.stop.is_stopped()
    }

    /// The state version to save this connection at, while it may move to
    /// the next generation: at a safe point (idle, or its request answered)
    /// stop reading it, save it and [`offer`](Self::offer) it instead of
    /// closing it. `None` when it may not move (no handover, or its move
    /// failed: it came back and stays): drain it as usual.
    pub fn can_move(&self) -> Option<u32> {
        self.tracker.move_version().filter(|_| !self.stays)
    }

    /// Hand this connection to the lifecycle to move to the next
    /// generation: `item` (named by the connection's kind, written at
    /// [`can_move`](Self::can_move)'s version) holds its socket and its
    /// state. Stop reading the socket first, and keep no copy of it: if
    /// the move fails, the connection comes back whole to whoever resumes
    /// that kind ([`crate::lifecycle::Event::Unmoved`]).
    pub fn offer(mut self, item: Item) {
        self.set_idle();
        let tracker = self.tracker.clone();
        tracker.offers().push(Offer { item, conn: self });
        tracker.inner.changed.notify(usize::MAX);
    }

    /// The move failed: the connection stays here for good.
    pub(crate) fn set_stays(&mut self) {
        self.stays = true;
    }

    /// The move was committed: dropping the guard counts it as moved.
    pub(crate) fn set_moved(&mut self) {
        self.set_idle();
        self.moved = true;
    }

    /// The tracker this connection belongs to, to wait for [`Tracker::forced`].
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let inner = &self.tracker.inner;
        if self.busy {
            inner.busy.fetch_sub(1, Ordering::SeqCst);
        }
        if inner.stop.is_stopped() {
            // Closed by the server at the deadline counts as forced, busy or
            // idle (a long-lived connection that never sends is cut too).
            let counter = if self.moved {
                &inner.moved
            } else if self.busy || inner.force.load(Ordering::SeqCst) {
                &inner.forced
            } else if self.served_after_stop {
                &inner.finished
            } else {
                &inner.closed_idle
            };
            counter.fetch_add(1, Ordering::SeqCst);
        }
        if inner.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            inner.changed.notify(usize::MAX);
        }
        inner.closed.notify(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_open_and_busy() {
        let tracker = Tracker::new(StopToken::new());
        let mut a = tracker.track();
        let _b = tracker.track();
        assert_eq!((tracker.open(), tracker.busy()), (2, 0));
        a.set_busy();
        a.set_busy();
        assert_eq!(tracker.busy(), 1);
        drop(a);
        assert_eq!((tracker.open(), tracker.busy()), (1, 0));
    }

    #[test]
    fn report_classifies_connections_after_stop() {
        let stop = StopToken::new();
        let tracker = Tracker::new(stop.clone());
        let before = tracker.track();
        drop(before); // closed before stop: not in the report
        let idle = tracker.track();
        let mut finishing = tracker.track();
        finishing.set_busy();
        let mut stuck = tracker.track();
        stuck.set_busy();
        stop.stop();
        assert!(idle.is_draining());
        finishing.set_idle();
        drop(finishing);
        drop(idle);
        tracker.force_close();
        drop(stuck);
        assert_eq!(
            tracker.report(),
            DrainReport {
                open_at_start: 3,
                finished: 1,
                closed_idle: 1,
                forced: 1,
                moved: 0
            }
        );
        assert_eq!(
            tracker.report().to_string(),
            "1 finished / 1 closed idle / 1 forced"
        );
    }

    /// Issue 12 item 10: a connection idle through the whole drain (a
    /// long-lived one that never sends) and cut at the deadline is forced,
    /// not finished.
    #[test]
    fn idle_connections_cut_at_the_deadline_count_as_forced() {
        let stop = StopToken::new();
        let tracker = Tracker::new(stop.clone());
        let silent = tracker.track();
        let mut busy = tracker.track();
        busy.set_busy();
        stop.stop();
        tracker.force_close();
        drop(silent);
        drop(busy);
        let report = tracker.report();
        assert_eq!(
            (report.finished, report.closed_idle, report.forced),
            (0, 0, 2)
        );
    }

    #[test]
    fn empty_resolves_when_last_connection_closes() {
        let tracker = Tracker::new(StopToken::new());
        let conn = tracker.track();
        let waiter = {
            let tracker = tracker.clone();
            std::thread::spawn(move || block_on(tracker.empty()))
        };
        drop(conn);
        waiter.join().unwrap();
        block_on(tracker.empty()); // already empty: returns at once
    }

    #[test]
    fn below_resolves_when_a_connection_closes() {
        let tracker = Tracker::new(StopToken::new());
        block_on(tracker.below(1)); // none open: at once
        let a = tracker.track();
        let b = tracker.track();
        block_on(tracker.below(3)); // 2 < 3: at once
        let waiter = {
            let tracker = tracker.clone();
            std::thread::spawn(move || block_on(tracker.below(2)))
        };
        drop(a); // 1 open: below 2, though not empty
        waiter.join().unwrap();
        assert_eq!(tracker.open(), 1);
        drop(b);
    }

    fn block_on<F: std::future::Future>(fut: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = std::pin::pin!(fut);
        loop {
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    }

    #[test]
    fn offers_wait_in_order_and_committed_moves_count_as_moved() {
        let stop = StopToken::new();
        let tracker = Tracker::new(stop.clone());
        let (a, b) = (tracker.track(), tracker.track());
        assert_eq!(a.can_move(), None);
        tracker.open_moves(3);
        assert_eq!(a.can_move(), Some(3));
        stop.stop();
        a.offer(Item::new("a", 3, Vec::new()));
        b.offer(Item::new("b", 3, Vec::new()));
        assert!(tracker.has_offers());
        assert_eq!(tracker.open(), 2, "offered connections stay open");
        let offers = tracker.take_offers();
        let names: Vec<&str> = offers.iter().map(|o| o.item.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // One that came back stays, while the others may still move.
        let mut offers = offers;
        offers[1].conn.set_stays();
        assert_eq!(offers[0].conn.can_move(), Some(3));
        assert_eq!(offers[1].conn.can_move(), None);
        tracker.close_moves();
        assert_eq!(tracker.move_version(), None);
        let mut offers = offers.into_iter();
        offers.next().unwrap().conn.set_moved();
        drop(offers);
        let report = tracker.report();
        assert_eq!(
            (report.moved, report.closed_idle, tracker.open()),
            (1, 1, 0)
        );
    }
}
