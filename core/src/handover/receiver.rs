//! The new generation's side: receives items, rebuilds, answers.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::channel::{End, Incoming};
use super::frame::{self, Frame};
use super::{within, HandoverError, Item, Limit, Limits, Versions};

/// What a [`Receiver`] reports from [`Receiver::poll`].
#[derive(Debug)]
#[non_exhaustive]
pub enum ReceiverEvent {
    /// The hellos were exchanged: the version a transaction will use, or
    /// `None` when the generations share none (no handover).
    Negotiated(Option<u32>),
    /// A whole transaction arrived. Rebuild the state without serving it,
    /// then [`Receiver::prepared`] (or [`Receiver::abort`]).
    Transaction {
        /// The negotiated version it was written at.
        version: u32,
        /// The items, in the order sent, with their fds.
        items: Vec<Item>,
    },
    /// The old generation committed: serve what was rebuilt.
    Committed,
    /// The transaction ended without a commit (the old generation aborted
    /// or went away, or an item broke the limits or the protocol — the old
    /// generation was told): drop what was rebuilt, without serving it. The
    /// channel is finished.
    Aborted(HandoverError),
    /// The old generation closed the channel outside a transaction.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Hello,
    Ready,
    NoHandover,
    Receiving,
    Rebuilding,
    Prepared,
    Aborted,
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Hello => "waiting for the peer's hello",
            State::Ready => "ready",
            State::NoHandover => "without a common version",
            State::Receiving => "receiving items",
            State::Rebuilding => "rebuilding",
            State::Prepared => "prepared",
            State::Aborted => "aborted",
            State::Closed => "closed",
        }
    }

    fn in_transaction(self) -> bool {
        matches!(self, State::Receiving | State::Rebuilding | State::Prepared)
    }

    fn finished(self) -> bool {
        matches!(self, State::Aborted | State::Closed)
    }
}

/// The item being received, its payload and fds still arriving.
#[derive(Debug)]
struct Partial {
    item: Item,
    payload_len: u64,
    fd_count: u32,
}

/// The new generation's end of the channel: a state machine over an
/// [`End`].
///
/// `new` → [`ReceiverEvent::Negotiated`] → [`ReceiverEvent::Transaction`] →
/// [`prepared`](Receiver::prepared) → [`ReceiverEvent::Committed`]. Every
/// item is checked against this side's [`Limits`] as it arrives; memory
/// grows with the bytes received, never with a declared length alone.
#[derive(Debug)]
pub struct Receiver {
    end: End,
    state: State,
    common: Option<Versions>,
    limits: Limits,
    items: Vec<Item>,
    current: Option<Partial>,
    total_payload: u64,
    total_fds: u64,
    pending_error: Option<HandoverError>,
}

impl Receiver {
    /// Start the channel on `end`: queues the hello carrying `versions`
    /// (the state versions this generation reads) and the `limits` it
    /// receives within.
    pub fn new(mut end: End, versions: Versions, limits: Limits) -> Self {
        end.queue(&Frame::Hello { versions, limits }, Vec::new());
        let mut receiver = Receiver {
            end,
            state: State::Hello,
            common: Some(versions),
            limits,
            items: Vec::new(),
            current: None,
            total_payload: 0,
            total_fds: 0,
            pending_error: None,
        };
        receiver.try_flush();
        receiver
    }

    /// Do the channel's I/O and return the next event; `None` until the
    /// socket is readable again (or writable, while
    /// [`Receiver::wants_write`]). Call it until `None` after each wake-up.
    ///
    /// An error inside a transaction arrives as [`ReceiverEvent::Aborted`]
    /// (and the old generation is told); `Err` is an error outside one.
    /// After `Aborted` or an `Err`, the channel is finished: drop it.
    pub fn poll(&mut self) -> Result<Option<ReceiverEvent>, HandoverError> {
        if self.state.finished() {
            self.end.discard();
            return Ok(None);
        }
        self.try_flush();
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

    fn on_incoming(&mut self, incoming: Incoming) -> Result<Option<ReceiverEvent>, HandoverError> {
        let (frame, fds) = match incoming {
            Incoming::Eof if self.state.in_transaction() => return Err(HandoverError::PeerGone),
            Incoming::Eof => {
                self.state = State::Closed;
                return Ok(Some(ReceiverEvent::Closed));
            }
            Incoming::Frame(frame, fds) => (frame, fds),
        };
        match (self.state, frame) {
            (State::Hello, Frame::Hello { versions, .. }) => {
                self.common = self.common.and_then(|own| own.common(&versions));
                Ok(Some(self.negotiated()))
            }
            (State::Hello, Frame::UnknownWire(_)) => {
                self.common = None;
                Ok(Some(self.negotiated()))
            }
            (_, Frame::Abort { reason }) => Err(HandoverError::PeerAborted(reason)),
            (State::Ready, Frame::Begin { version }) => {
                let common = self.common.unwrap_or(Versions::single(0));
                if version != common.max() {
                    return Err(HandoverError::Version {
                        version,
                        min: common.min(),
                        max: common.max(),
                    });
                }
                self.state = State::Receiving;
                self.total_payload = 0;
                self.total_fds = 0;
                Ok(None)
            }
            (
                State::Receiving,
                Frame::Item {
                    name,
                    version,
                    payload_len,
                    fd_count,
                    chunk,
                    ..
                },
            ) if self.current.is_none() => {
                self.start_item(name, version, payload_len, fd_count)?;
                self.add_to_item(chunk, fds, false)?;
                Ok(None)
            }
            (State::Receiving, Frame::More { chunk, .. }) if self.current.is_some() => {
                self.add_to_item(chunk, fds, true)?;
                Ok(None)
            }
            (State::Receiving, Frame::End { items }) if self.current.is_none() => {
                if items as usize != self.items.len() {
                    return Err(HandoverError::Inconsistent {
                        name: String::new(),
                        problem: "end counts other items than were sent",
                    });
                }
                self.state = State::Rebuilding;
                Ok(Some(ReceiverEvent::Transaction {
                    version: self.common.map(|c| c.max()).unwrap_or_default(),
                    items: std::mem::take(&mut self.items),
                }))
            }
            (State::Prepared, Frame::Commit) => {
                self.state = State::Ready;
                Ok(Some(ReceiverEvent::Committed))
            }
            (state, frame) => Err(HandoverError::Unexpected {
                frame: frame.kind(),
                state: state.name(),
            }),
        }
    }

    /// Check an item header against the limits, before any of its bytes is
    /// kept.
    fn start_item(
        &mut self,
        name: String,
        version: u32,
        payload_len: u64,
        fd_count: u32,
    ) -> Result<(), HandoverError> {
        let limits = self.limits;
        if name.is_empty() {
            return Err(HandoverError::EmptyName);
        }
        within(
            Limit::NameLen,
            name.len() as u64,
            limits.max_name_len.into(),
        )?;
        let common = self.common.unwrap_or(Versions::single(0));
        if !common.contains(version) {
            return Err(HandoverError::Version {
                version,
                min: common.min(),
                max: common.max(),
            });
        }
        within(
            Limit::Items,
            self.items.len() as u64 + 1,
            limits.max_items.into(),
        )?;
        within(Limit::ItemPayload, payload_len, limits.max_item_payload)?;
        let total_payload = self.total_payload.saturating_add(payload_len);
        within(Limit::TotalPayload, total_payload, limits.max_total_payload)?;
        within(Limit::ItemFds, fd_count.into(), limits.max_item_fds.into())?;
        let total_fds = self.total_fds + u64::from(fd_count);
        within(Limit::TotalFds, total_fds, limits.max_total_fds.into())?;
        self.total_payload = total_payload;
        self.total_fds = total_fds;
        self.current = Some(Partial {
            item: Item {
                name,
                version,
                payload: Vec::new(),
                fds: Vec::new(),
            },
            payload_len,
            fd_count,
        });
        Ok(())
    }

    /// Add a chunk and its fds to the current item; the item is done when
    /// both add up to its header.
    fn add_to_item(
        &mut self,
        chunk: Vec<u8>,
        fds: Vec<OwnedFd>,
        more: bool,
    ) -> Result<(), HandoverError> {
        let Some(partial) = self.current.as_mut() else {
            return Ok(());
        };
        let item = &mut partial.item;
        if (item.payload.len() + chunk.len()) as u64 > partial.payload_len {
            return Err(HandoverError::Inconsistent {
                name: item.name.clone(),
                problem: "more payload than declared",
            });
        }
        if item.fds.len() + fds.len() > partial.fd_count as usize {
            return Err(HandoverError::Inconsistent {
                name: item.name.clone(),
                problem: "more fds than declared",
            });
        }
        if more && chunk.is_empty() && fds.is_empty() {
            // Each more frame must move the item forward.
            return Err(HandoverError::Inconsistent {
                name: item.name.clone(),
                problem: "empty continuation frame",
            });
        }
        partial.item.payload.extend_from_slice(&chunk);
        partial.item.fds.extend(fds);
        if item_complete(partial) {
            if let Some(done) = self.current.take() {
                self.items.push(done.item);
            }
        }
        Ok(())
    }

    fn negotiated(&mut self) -> ReceiverEvent {
        self.state = match self.common {
            Some(_) => State::Ready,
            None => State::NoHandover,
        };
        ReceiverEvent::Negotiated(self.version())
    }

    fn fail(&mut self, e: HandoverError) -> Result<Option<ReceiverEvent>, HandoverError> {
        let in_transaction = self.state.in_transaction();
        self.items.clear();
        self.current = None;
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
            Ok(Some(ReceiverEvent::Aborted(e)))
        } else {
            Err(e)
        }
    }

    fn try_flush(&mut self) {
        if let Err(e) = self.end.flush() {
            self.pending_error.get_or_insert(e);
        }
    }

    /// Everything is rebuilt (and not served): tell the old generation,
    /// then wait for [`ReceiverEvent::Committed`].
    pub fn prepared(&mut self) -> Result<(), HandoverError> {
        if self.state != State::Rebuilding {
            return Err(HandoverError::State {
                call: "prepared",
                state: self.state.name(),
            });
        }
        self.end.queue(&Frame::Prepared, Vec::new());
        self.state = State::Prepared;
        self.try_flush();
        Ok(())
    }

    /// Refuse the transaction (the state cannot be rebuilt): tells the old
    /// generation, which keeps everything, and finishes the channel.
    pub fn abort(&mut self, reason: &str) -> Result<(), HandoverError> {
        if self.state.finished() {
            return Err(HandoverError::State {
                call: "abort",
                state: self.state.name(),
            });
        }
        self.items.clear();
        self.current = None;
        self.end.queue(
            &Frame::Abort {
                reason: frame::truncate(reason, frame::MAX_REASON).to_owned(),
            },
            Vec::new(),
        );
        let _ = self.end.flush();
        self.state = State::Aborted;
        Ok(())
    }

    /// The negotiated state version, once the hellos are exchanged.
    pub fn version(&self) -> Option<u32> {
        match self.state {
            State::Hello => None,
            _ => self.common.map(|c| c.max()),
        }
    }

    /// True while frames wait for room in the socket.
    pub fn wants_write(&self) -> bool {
        self.end.wants_write()
    }

    /// True between transactions: waiting for the next begin.
    pub fn can_begin(&self) -> bool {
        self.state == State::Ready
    }

    /// True once the channel is over (aborted, closed or failed): drop it.
    pub fn is_finished(&self) -> bool {
        self.state.finished()
    }
}

fn item_complete(partial: &Partial) -> bool {
    partial.item.payload.len() as u64 == partial.payload_len
        && partial.item.fds.len() == partial.fd_count as usize
}

impl AsFd for Receiver {
    /// The socket, for a reactor: readable, and writable while
    /// [`Receiver::wants_write`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.end.as_fd()
    }
}
