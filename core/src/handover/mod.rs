//! The live-handover channel: named, versioned items (bytes and fds) move
//! from one generation to the next in a prepare/commit transaction.
//!
//! Two adjacent generations share a Unix `SOCK_SEQPACKET` socketpair
//! ([`pair`]): the old one drives a [`Sender`] on its end, the new one a
//! [`Receiver`] on the other. Nothing here blocks or waits: both ends are
//! non-blocking, and a reactor calls `poll` when the end is readable (or
//! writable, while [`Sender::wants_write`] / [`Receiver::wants_write`]),
//! exactly as the [lifecycle](crate::lifecycle) is driven.
//!
//! # The protocol
//!
//! Each frame is one seqpacket message, so the socket keeps the
//! boundaries. A frame that carries fds has them attached as one
//! `SCM_RIGHTS` control message to that same message, and says how many
//! (the receiver checks). In order:
//!
//! 1. **hello**, both ways, at once: the range of state versions this side
//!    reads and writes (`min..=max`) and the limits it receives within.
//!    The negotiated version is the highest version both ranges hold; with
//!    none (or a peer of another wire version) there is no handover: the
//!    old generation drains as it would without the channel, and the
//!    upgrade still succeeds.
//! 2. **begin** `version` (old → new), then for each item an **item** frame
//!    (name, item version, payload length, fd count, and the first chunk of
//!    payload and fds), followed by **more** frames until the item's
//!    payload and fds are complete, then **end** `count`. An item's fds are
//!    split across frames of at most 253 (`SCM_MAX_FD`) fds; its payload
//!    across frames of at most [`frame::MAX_FRAME`] bytes. An item's
//!    version lies between the higher of the two `min`s and the negotiated
//!    version.
//! 3. The new generation rebuilds the state without serving it and answers
//!    **prepared**, or **abort** `reason`.
//! 4. The old generation answers **commit** — and only once the commit is in
//!    the socket does it let go of its copies — or **abort** `reason`.
//!
//! After a commit both sides can run another transaction (begin … end) on
//! the same channel. An abort by either side ends the channel. If the peer
//! goes (end of file, `ECONNRESET`, `EPIPE`) before the commit is sent, the
//! transaction is aborted on both sides: the old generation gets every item
//! back ([`SenderEvent::Aborted`]) and serves on; the new one drops what it
//! rebuilt. Once the commit is sent the items belong to the new generation:
//! if it crashes after that, they are lost with it, as in any two-phase
//! commit.
//!
//! Every frame out of order is an error, never a panic, and so is every
//! item beyond the receiver's [`Limits`] (the sender checks them first, from
//! the peer's hello, and refuses such an item with [`Refused`] so it can
//! drain that one instead). An error while a transaction is open aborts it
//! (the peer is told why) and arrives as the `Aborted` event; outside one,
//! `poll` returns it.
//!
//! # Frames
//!
//! A kind byte, then the body; integers little-endian.
//!
//! | kind | frame | body |
//! |---|---|---|
//! | `0x01` | hello | `"baton-ho"`, wire `u16` = 1, min `u32`, max `u32`, max items `u32`, max name length `u32`, max item payload `u64`, max total payload `u64`, max item fds `u32`, max total fds `u32` |
//! | `0x02` | begin | version `u32` |
//! | `0x03` | item | name length `u16`, name (UTF-8), version `u32`, payload length `u64`, fd count `u32`, fds in this frame `u8`, payload chunk (to the end) |
//! | `0x04` | more | fds in this frame `u8`, payload chunk (to the end) |
//! | `0x05` | end | item count `u32` |
//! | `0x06` | prepared | — |
//! | `0x07` | commit | — |
//! | `0x08` | abort | reason (UTF-8, to the end, at most 1024 bytes) |
//!
//! A hello with another wire version is read no further than the version.
//!
//! # Passing the channel to the next generation
//!
//! The parent makes the pair before spawning and passes one end like the
//! readiness fd, at the fd named by
//! [`BATON_HANDOVER_FD`](crate::protocol::BATON_HANDOVER_FD); the child
//! takes it with [`End::from_inherited`].
//!
//! | variable | meaning |
//! |---|---|
//! | `BATON_HANDOVER_FD` | the child's end of the channel, at `3 + LISTEN_FDS + 1` (right after `BATON_READY_FD`); set only when the parent declared state versions |
//!
//! # Application state
//!
//! With [`Config::state_versions`](crate::Config::state_versions) the
//! upgrader makes the pair at each spawn (the child's end from a second low
//! fd slot, see [`crate::upgrade`]) and keeps a [`Sender`] in the
//! [`PendingUpgrade`](crate::upgrade::PendingUpgrade). The
//! [lifecycle](crate::lifecycle) drives it for every backend: on
//! [`SenderEvent::Negotiated`] it calls the application's
//! [`on_save_state`](crate::lifecycle::Lifecycle::on_save_state) and sends
//! one transaction; once the new generation is ready (it prepared first) it
//! commits. The new generation takes the items with
//! [`Generation::receive_state`](crate::Generation::receive_state) before it
//! reports ready (or the lifecycle takes and drops them at ready). Blobs
//! are copies: the new generation uses them once prepared; the commit only
//! tells the old one the transaction is over. A generation that declared
//! no versions closes an inherited end at once.
//!
//! # Connections
//!
//! When both generations move connections
//! ([`Lifecycle::move_connections`](crate::lifecycle::Lifecycle::move_connections)),
//! the channel stays open after the state's commit, and each batch of
//! connections offered ([`crate::Connection::offer`]) is one more
//! transaction: an item per connection, named by its kind, its socket as
//! the one fd ([`take_stream`] gives it back as a [`MovedStream`]), its
//! saved state as the payload. The new generation prepares once it has
//! every fd and resumes every kind, serves them only after the commit; an
//! abort gives the old one every item back. Here the items are not copies:
//! between the commit and the old generation's close both hold the same
//! open socket, and only the new one reads it. Which is why the old side
//! never shuts a moved socket down, only closes its fd.
//!
//! TLS connections cannot move this way: their state lives in the TLS
//! library, not the socket (see the README's "Moving open connections").

mod channel;
pub mod frame;
mod receiver;
mod sender;
mod stream;
#[cfg(test)]
mod tests;

pub use channel::{pair, End};
pub use frame::{Frame, FrameError};
pub use receiver::{Receiver, ReceiverEvent};
pub use sender::{Refused, Sender, SenderEvent};
pub use stream::{take_stream, MovedStream};

use std::io;
use std::os::fd::OwnedFd;

/// Most fds the kernel carries in one message; an item with more is split.
pub const SCM_MAX_FD: usize = crate::sys::seqpacket::SCM_MAX_FD;

/// The range of state versions one generation reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    min: u32,
    max: u32,
}

impl Versions {
    /// `min..=max`; [`HandoverError::InvalidVersions`] if `min > max`.
    pub fn new(min: u32, max: u32) -> Result<Self, HandoverError> {
        if min > max {
            return Err(HandoverError::InvalidVersions { min, max });
        }
        Ok(Versions { min, max })
    }

    /// Exactly one version.
    pub fn single(version: u32) -> Self {
        Versions {
            min: version,
            max: version,
        }
    }

    /// The oldest version read.
    pub fn min(&self) -> u32 {
        self.min
    }

    /// The newest version read and written.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The versions both ranges hold, `None` if they share none; the
    /// negotiated version is its upper end.
    pub fn common(&self, other: &Versions) -> Option<Versions> {
        let (min, max) = (self.min.max(other.min), self.max.min(other.max));
        (min <= max).then_some(Versions { min, max })
    }

    /// True if `version` is in the range.
    pub fn contains(&self, version: u32) -> bool {
        (self.min..=self.max).contains(&version)
    }
}

/// What one side accepts in one transaction. Both sides check the
/// receiver's: the receiver sends its limits in its hello, and the sender
/// refuses an item beyond them before sending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Items in one transaction.
    pub max_items: u32,
    /// Bytes of an item's name.
    pub max_name_len: u32,
    /// Payload bytes of one item.
    pub max_item_payload: u64,
    /// Payload bytes of all items of one transaction.
    pub max_total_payload: u64,
    /// Fds of one item.
    pub max_item_fds: u32,
    /// Fds of all items of one transaction.
    pub max_total_fds: u32,
}

impl Default for Limits {
    /// Room for a server with tens of thousands of connections and some
    /// cached state, far from what could exhaust memory.
    fn default() -> Self {
        Limits {
            max_items: 100_000,
            max_name_len: 255,
            max_item_payload: 16 << 20,
            max_total_payload: 256 << 20,
            max_item_fds: 4096,
            max_total_fds: 100_000,
        }
    }
}

impl Limits {
    /// The stricter of two sets of limits, field by field.
    pub fn min(&self, other: &Limits) -> Limits {
        Limits {
            max_items: self.max_items.min(other.max_items),
            max_name_len: self.max_name_len.min(other.max_name_len),
            max_item_payload: self.max_item_payload.min(other.max_item_payload),
            max_total_payload: self.max_total_payload.min(other.max_total_payload),
            max_item_fds: self.max_item_fds.min(other.max_item_fds),
            max_total_fds: self.max_total_fds.min(other.max_total_fds),
        }
    }
}

/// One named piece of state: bytes, and the fds that go with them (a
/// connection's socket, a pipe, a memfd).
#[derive(Debug)]
pub struct Item {
    /// What the receiving application looks it up by (`conn/42`, `cache`).
    pub name: String,
    /// The state version `payload` is written in.
    pub version: u32,
    /// The serialized state.
    pub payload: Vec<u8>,
    /// The fds; the receiver gets new fds for the same open files, in this
    /// order.
    pub fds: Vec<OwnedFd>,
}

impl Item {
    /// An item without fds.
    pub fn new(name: impl Into<String>, version: u32, payload: Vec<u8>) -> Self {
        Item {
            name: name.into(),
            version,
            payload,
            fds: Vec::new(),
        }
    }

    /// The item with `fds` added.
    pub fn with_fds(mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Self {
        self.fds.extend(fds);
        self
    }
}

/// Which [`Limits`] field an item or transaction went past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// [`Limits::max_items`].
    Items,
    /// [`Limits::max_name_len`].
    NameLen,
    /// [`Limits::max_item_payload`].
    ItemPayload,
    /// [`Limits::max_total_payload`].
    TotalPayload,
    /// [`Limits::max_item_fds`].
    ItemFds,
    /// [`Limits::max_total_fds`].
    TotalFds,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Items => "items per transaction",
            Limit::NameLen => "name length",
            Limit::ItemPayload => "payload bytes per item",
            Limit::TotalPayload => "payload bytes per transaction",
            Limit::ItemFds => "fds per item",
            Limit::TotalFds => "fds per transaction",
        })
    }
}

/// Why the channel or a transaction failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// A system call on the channel failed.
    #[error("handover channel: {0}")]
    Io(#[source] io::Error),
    /// The peer sent bytes that are not a frame.
    #[error("malformed handover frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer sent a frame its state does not allow.
    #[error("unexpected {frame} frame while {state}")]
    Unexpected {
        /// The frame's kind.
        frame: &'static str,
        /// This side's state.
        state: &'static str,
    },
    /// The application called a method its state does not allow.
    #[error("{call} is not allowed while {state}")]
    State {
        /// The method.
        call: &'static str,
        /// The state.
        state: &'static str,
    },
    /// A frame came with another number of fds than it declares.
    #[error("frame declares {declared} fds but {received} came with it")]
    FdCount {
        /// What the frame says.
        declared: usize,
        /// What `SCM_RIGHTS` held.
        received: usize,
    },
    /// The peer sent a message longer than any frame.
    #[error("message longer than {} bytes", frame::MAX_FRAME)]
    Oversized,
    /// This process ran out of fds (`EMFILE`, `ENFILE`) while receiving
    /// some: the kernel closed those it could not install.
    #[error("out of file descriptors receiving an item's fds: {0}")]
    OutOfFds(#[source] io::Error),
    /// The kernel delivered fewer fds than were sent (`MSG_CTRUNC`) for
    /// another reason (a security module, say).
    #[error("fds truncated in transit: {received} of {declared}")]
    FdsTruncated {
        /// What the frame says.
        declared: usize,
        /// What arrived.
        received: usize,
    },
    /// An item or transaction went past a limit.
    #[error("{limit} limit exceeded: {value} > {max}")]
    Limit {
        /// Which limit.
        limit: Limit,
        /// The value refused.
        value: u64,
        /// The limit in force.
        max: u64,
    },
    /// A version range with `min > max`.
    #[error("invalid version range {min}..={max}")]
    InvalidVersions {
        /// Its lower end.
        min: u32,
        /// Its upper end.
        max: u32,
    },
    /// An item or `begin` at a version outside the common range.
    #[error("version {version} outside the common range {min}..={max}")]
    Version {
        /// The version given.
        version: u32,
        /// The common range's lower end.
        min: u32,
        /// Its upper end (the negotiated version).
        max: u32,
    },
    /// An item's payload or fds did not add up to what its header says, or
    /// `end` counts other items than were sent.
    #[error("item {name:?} inconsistent: {problem}")]
    Inconsistent {
        /// The item (empty for `end`).
        name: String,
        /// What did not add up.
        problem: &'static str,
    },
    /// An empty item name.
    #[error("empty item name")]
    EmptyName,
    /// The peer went away (end of file, reset) before the transaction
    /// ended.
    #[error("the peer closed the handover channel")]
    PeerGone,
    /// The peer aborted the transaction.
    #[error("the peer aborted the handover: {0}")]
    PeerAborted(String),
}

impl HandoverError {
    /// The error for a failed system call: a reset or broken pipe means the
    /// peer is gone.
    fn io(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN) => HandoverError::PeerGone,
            _ => HandoverError::Io(e),
        }
    }
}

/// Check `value <= max` for `limit`.
fn within(limit: Limit, value: u64, max: u64) -> Result<(), HandoverError> {
    if value > max {
        return Err(HandoverError::Limit { limit, value, max });
    }
    Ok(())
}
