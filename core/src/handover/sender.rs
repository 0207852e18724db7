//! The old generation's side: offers items, commits or takes them back.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use super::channel::{End, Incoming};
use super::frame::{self, Frame, ITEM_FIXED, MAX_FDS_PER_FRAME, MAX_FRAME, MORE_FIXED};
use super::{within, HandoverError, Item, Limit, Limits, Versions};

/// What a [`Sender`] reports from [`Sender::poll`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SenderEvent {
    /// The hellos were exchanged: the version a transaction will use, or
    /// `None` when the generations share none (drain as without handover).
    Negotiated(Option<u32>),
    /// The new generation rebuilt every item and waits: [`Sender::commit`]
    /// or [`Sender::abort`].
    Prepared,
    /// The commit is in the socket: the new generation owns the items, and
    /// this side's copies are closed. Another transaction may begin.
    Committed,
    /// The transaction ended without a commit (the peer aborted or went
    /// away, or the channel failed): every item offered comes back, and
    /// this side keeps serving them. The channel is finished.
    Aborted {
        /// Why.
        cause: HandoverError,
        /// Every item of the transaction, fds and all.
        items: Vec<Item>,
    },
    /// The peer closed the channel outside a transaction.
    Closed,
}

/// An item [`Sender::push`] did not take: it is given back whole, so the
/// application can serve or drain it as if there were no handover.
#[derive(Debug, thiserror::Error)]
#[error("handover item {:?} refused: {error}", item.name)]
pub struct Refused {
    /// The item, untouched.
    pub item: Item,
    /// Why.
    #[source]
    pub error: HandoverError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Hello,
    Ready,
    NoHandover,
    Sending,
    AwaitingAnswer,
    Prepared,
    Committing,
    Aborted,
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Hello => "waiting for the peer's hello",
            State::Ready => "ready",
            State::NoHandover => "without a common version",
            State::Sending => "sending items",
            State::AwaitingAnswer => "waiting for prepared",
            State::Prepared => "prepared",
            State::Committing => "committing",
            State::Aborted => "aborted",
            State::Closed => "closed",
        }
    }

    /// Items are held (and owed back on failure).
    fn in_transaction(self) -> bool {
        matches!(
            self,
            State::Sending | State::AwaitingAnswer | State::Prepared | State::Committing
        )
    }

    fn finished(self) -> bool {
        matches!(self, State::Aborted | State::Closed)
    }
}

/// The old generation's end of the channel: a state machine over an
/// [`End`].
///
/// `new` → [`SenderEvent::Negotiated`] → [`begin`](Sender::begin),
/// [`push`](Sender::push)…, [`end`](Sender::end) →
/// [`SenderEvent::Prepared`] → [`commit`](Sender::commit) →
/// [`SenderEvent::Committed`]. The sender holds every pushed item until the
/// commit is sent, so an abort gives them all back.
#[derive(Debug)]
pub struct Sender {
    end: End,
    state: State,
    common: Option<Versions>,
    /// Own limits, then the stricter of own and the peer's once known.
    limits: Limits,
    held: Vec<Item>,
    total_payload: u64,
    total_fds: u64,
    /// A send failure found inside a method, reported by the next poll.
    pending_error: Option<HandoverError>,
    events: VecDeque<SenderEvent>,
}

impl Sender {
    /// Start the channel on `end`: queues the hello carrying `versions`
    /// (the state versions this generation writes) and `limits`.
    pub fn new(mut end: End, versions: Versions, limits: Limits) -> Self {
        end.queue(&Frame::Hello { versions, limits }, Vec::new());
        let mut sender = Sender {
            end,
            state: State::Hello,
            common: Some(versions),
            limits,
            held: Vec::new(),
            total_payload: 0,
            total_fds: 0,
            pending_error: None,
            events: VecDeque::new(),
        };
        sender.try_flush();
        sender
    }

    /// Do the channel's I/O (send what is queued, read what came) and
    /// return the next event; `None` until the socket is readable again
    /// (or writable, while [`Sender::wants_write`]). Call it until `None`
    /// after each wake-up.
    ///
    /// An error inside a transaction arrives as [`SenderEvent::Aborted`]
    /// with the items; `Err` is an error outside one. After `Aborted` or an
    /// `Err`, the channel is finished: drop it.
    pub fn poll(&mut self) -> Result<Option<SenderEvent>, HandoverError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        if self.state.finished() {
            self.end.discard();
            return Ok(None);
        }
        // After a failed send, fail without sending again.
        if self.pending_error.is_none() {
            self.try_flush();
        }
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        if let Some(e) = self.pending_error.take() {
            return self.fail(e);
        }
        loop {
            let incoming = match self.end.recv() {
                Ok(Some(incoming)) => incoming,
                Ok(None) => return Ok(None),
                Err(e) => return self.fail(e),
            };
            match self.on_incoming(incoming) {
                Ok(Some(event)) => return Ok(Some(event)),
                Ok(None) => {}
                Err(e) => return self.fail(e),
            }
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) -> Result<Option<SenderEvent>, HandoverError> {
        let frame = match incoming {
            Incoming::Eof if self.state.in_transaction() => return Err(HandoverError::PeerGone),
            Incoming::Eof => {
                self.state = State::Closed;
                return Ok(Some(SenderEvent::Closed));
            }
            // No frame to the sender carries fds; any that came with an
            // unexpected one are closed here.
            Incoming::Frame(frame, _fds) => frame,
        };
        match (self.state, frame) {
            (State::Hello, Frame::Hello { versions, limits }) => {
                self.common = self.common.and_then(|own| own.common(&versions));
                self.limits = self.limits.min(&limits);
                Ok(Some(self.negotiated()))
            }
            (State::Hello, Frame::UnknownWire(_)) => {
                self.common = None;
                Ok(Some(self.negotiated()))
            }
            (_, Frame::Abort { reason }) => Err(HandoverError::PeerAborted(reason)),
            (State::AwaitingAnswer, Frame::Prepared) => {
                self.state = State::Prepared;
                Ok(Some(SenderEvent::Prepared))
            }
            (state, frame) => Err(HandoverError::Unexpected {
                frame: frame.kind(),
                state: state.name(),
            }),
        }
    }

    fn negotiated(&mut self) -> SenderEvent {
        self.state = match self.common {
            Some(_) => State::Ready,
            None => State::NoHandover,
        };
        SenderEvent::Negotiated(self.version())
    }

    /// Abort on `e`: tell the peer (unless it is the one that gave up),
    /// give the items back.
    fn fail(&mut self, e: HandoverError) -> Result<Option<SenderEvent>, HandoverError> {
        let in_transaction = self.state.in_transaction();
        // Before the items go back: queued frames name their fds.
        self.end.clear_outbox();
        if !matches!(e, HandoverError::PeerGone | HandoverError::PeerAborted(_)) {
            self.end.queue(
                &Frame::Abort {
                    reason: e.to_string(),
                },
                Vec::new(),
            );
            let _ = self.end.flush();
        }
        self.state = State::Aborted;
        if in_transaction {
            Ok(Some(SenderEvent::Aborted {
                cause: e,
                items: self.take_items(),
            }))
        } else {
            Err(e)
        }
    }

    fn take_items(&mut self) -> Vec<Item> {
        self.total_payload = 0;
        self.total_fds = 0;
        std::mem::take(&mut self.held)
    }

    /// Send what the socket takes; a failure waits for the next poll. The
    /// commit's flush is the commit itself: only then are the copies let go.
    fn try_flush(&mut self) {
        match self.end.flush() {
            Ok(true) if self.state == State::Committing => {
                self.held.clear();
                self.total_payload = 0;
                self.total_fds = 0;
                self.state = State::Ready;
                self.events.push_back(SenderEvent::Committed);
            }
            Ok(_) => {}
            Err(e) => {
                self.pending_error.get_or_insert(e);
            }
        }
    }

    fn expect(&self, call: &'static str, state: State) -> Result<(), HandoverError> {
        if self.state != state {
            return Err(HandoverError::State {
                call,
                state: self.state.name(),
            });
        }
        Ok(())
    }

    /// Open a transaction at the negotiated version.
    pub fn begin(&mut self) -> Result<(), HandoverError> {
        self.expect("begin", State::Ready)?;
        let version = self.version().unwrap_or_default();
        self.end.queue(&Frame::Begin { version }, Vec::new());
        self.state = State::Sending;
        self.total_payload = 0;
        self.total_fds = 0;
        self.try_flush();
        Ok(())
    }

    /// Offer `item`; it is held until the commit is sent. An item the
    /// receiver would refuse (its limits, the common versions) or a call
    /// outside a transaction is given back in [`Refused`] and the
    /// transaction goes on without it.
    pub fn push(&mut self, item: Item) -> Result<(), Refused> {
        if let Err(error) = self.check(&item) {
            return Err(Refused { item, error });
        }
        self.queue_item(&item);
        self.total_payload += item.payload.len() as u64;
        self.total_fds += item.fds.len() as u64;
        self.held.push(item);
        self.try_flush();
        Ok(())
    }

    fn check(&self, item: &Item) -> Result<(), HandoverError> {
        self.expect("push", State::Sending)?;
        let limits = &self.limits;
        if item.name.is_empty() {
            return Err(HandoverError::EmptyName);
        }
        // The item frame's header must fit in one frame whatever the limit.
        let name_max = u64::from(limits.max_name_len).min((MAX_FRAME - ITEM_FIXED) as u64);
        within(Limit::NameLen, item.name.len() as u64, name_max)?;
        let common = self.common.unwrap_or(Versions::single(0));
        if !common.contains(item.version) {
            return Err(HandoverError::Version {
                version: item.version,
                min: common.min(),
                max: common.max(),
            });
        }
        within(
            Limit::Items,
            self.held.len() as u64 + 1,
            limits.max_items.into(),
        )?;
        let payload = item.payload.len() as u64;
        within(Limit::ItemPayload, payload, limits.max_item_payload)?;
        within(
            Limit::TotalPayload,
            self.total_payload + payload,
            limits.max_total_payload,
        )?;
        let fds = item.fds.len() as u64;
        within(Limit::ItemFds, fds, limits.max_item_fds.into())?;
        within(
            Limit::TotalFds,
            self.total_fds + fds,
            limits.max_total_fds.into(),
        )?;
        Ok(())
    }

    /// Split `item` into an item frame and as many more frames as its
    /// payload and fds need.
    fn queue_item(&mut self, item: &Item) {
        let raw: Vec<RawFd> = item.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut payload = item.payload.as_slice();
        let mut fds = raw.as_slice();
        let mut take = |room: usize| {
            let (chunk, rest) = payload.split_at(payload.len().min(room));
            payload = rest;
            let (these, rest) = fds.split_at(fds.len().min(MAX_FDS_PER_FRAME));
            fds = rest;
            (chunk.to_vec(), these.to_vec())
        };
        let (chunk, these) = take(MAX_FRAME - ITEM_FIXED - item.name.len());
        let first = Frame::Item {
            name: item.name.clone(),
            version: item.version,
            payload_len: item.payload.len() as u64,
            fd_count: raw.len() as u32,
            fds: these.len() as u8,
            chunk,
        };
        self.end.queue(&first, these);
        let mut sent = (first_len(&first), first.fds());
        while sent.0 < item.payload.len() || sent.1 < raw.len() {
            let (chunk, these) = take(MAX_FRAME - MORE_FIXED);
            sent = (sent.0 + chunk.len(), sent.1 + these.len());
            let more = Frame::More {
                fds: these.len() as u8,
                chunk,
            };
            self.end.queue(&more, these);
        }
    }

    /// The transaction's last item is pushed; wait for
    /// [`SenderEvent::Prepared`].
    pub fn end(&mut self) -> Result<(), HandoverError> {
        self.expect("end", State::Sending)?;
        let items = u32::try_from(self.held.len()).unwrap_or(u32::MAX);
        self.end.queue(&Frame::End { items }, Vec::new());
        self.state = State::AwaitingAnswer;
        self.try_flush();
        Ok(())
    }

    /// Commit a prepared transaction; [`SenderEvent::Committed`] follows
    /// from [`Sender::poll`] once the commit is in the socket, and only
    /// then are this side's copies closed.
    pub fn commit(&mut self) -> Result<(), HandoverError> {
        self.expect("commit", State::Prepared)?;
        self.end.queue(&Frame::Commit, Vec::new());
        self.state = State::Committing;
        self.try_flush();
        Ok(())
    }

    /// Give up (a deadline passed, the application changed its mind):
    /// tells the peer, finishes the channel and gives every item of the
    /// open transaction back. A commit already in the socket cannot be
    /// taken back: after [`SenderEvent::Committed`] this returns no items.
    pub fn abort(&mut self, reason: &str) -> Result<Vec<Item>, HandoverError> {
        if self.state.finished() {
            return Err(HandoverError::State {
                call: "abort",
                state: self.state.name(),
            });
        }
        self.end.clear_outbox();
        self.end.queue(
            &Frame::Abort {
                reason: frame::truncate(reason, frame::MAX_REASON).to_owned(),
            },
            Vec::new(),
        );
        let _ = self.end.flush();
        self.state = State::Aborted;
        Ok(self.take_items())
    }

    /// The negotiated state version, once the hellos are exchanged.
    pub fn version(&self) -> Option<u32> {
        match self.state {
            State::Hello => None,
            _ => self.common.map(|c| c.max()),
        }
    }

    /// True between transactions: [`begin`](Sender::begin) may open one.
    pub fn can_begin(&self) -> bool {
        self.state == State::Ready
    }

    /// True while frames wait for room in the socket: wait until it is
    /// writable too.
    pub fn wants_write(&self) -> bool {
        self.end.wants_write()
    }

    /// True once the channel is over (aborted, closed or failed): drop it.
    pub fn is_finished(&self) -> bool {
        self.state.finished()
    }
}

/// Payload bytes in an item frame.
fn first_len(frame: &Frame) -> usize {
    match frame {
        Frame::Item { chunk, .. } => chunk.len(),
        _ => 0,
    }
}

impl AsFd for Sender {
    /// The socket, for a reactor: readable, and writable while
    /// [`Sender::wants_write`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.end.as_fd()
    }
}
