//! One end of the channel: frames in and out of a non-blocking seqpacket
//! socket, fds attached.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use super::frame::{Frame, MAX_FRAME};
use super::HandoverError;
use crate::sys::seqpacket;

/// One end of a handover channel: an `AF_UNIX` `SOCK_SEQPACKET` socket,
/// non-blocking and close-on-exec. Give it to a [`Sender`](super::Sender)
/// in the old generation or a [`Receiver`](super::Receiver) in the new one.
#[derive(Debug)]
pub struct End {
    fd: OwnedFd,
    /// Frames not yet accepted by the socket (its queue was full).
    outbox: VecDeque<Outgoing>,
    /// One frame, reused.
    buf: Vec<u8>,
    /// Room for the fds of one frame, reused.
    cmsg: Vec<u8>,
}

/// A queued frame.
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    /// Fds owned by the [`Sender`](super::Sender)'s held items, which clears
    /// the outbox before it lets go of any of them.
    fds: Vec<RawFd>,
}

/// What one receive found.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A frame and exactly as many fds as it declares.
    Frame(Frame, Vec<OwnedFd>),
    /// The peer closed its end.
    Eof,
}

/// A connected pair of ends: one for the old generation, one for the new.
pub fn pair() -> io::Result<(End, End)> {
    let (a, b) = seqpacket::seqpacket_pair()?;
    Ok((End::new(a), End::new(b)))
}

impl End {
    fn new(fd: OwnedFd) -> Self {
        End {
            fd,
            outbox: VecDeque::new(),
            buf: vec![0; MAX_FRAME],
            cmsg: seqpacket::cmsg_buffer(),
        }
    }

    /// An end from a socket made elsewhere: checked to be an `AF_UNIX`
    /// `SOCK_SEQPACKET` socket, made non-blocking and close-on-exec.
    pub fn from_fd(fd: OwnedFd) -> io::Result<End> {
        seqpacket::prepare_seqpacket(fd.as_fd())?;
        Ok(End::new(fd))
    }

    /// The end a parent passed at `fd` (the value of
    /// [`BATON_HANDOVER_FD`](crate::protocol::BATON_HANDOVER_FD)): adopted
    /// (`EBADF` if it is not open), then checked as in [`End::from_fd`].
    /// Call it once per process for that fd.
    pub fn from_inherited(fd: RawFd) -> io::Result<End> {
        End::from_fd(crate::sys::adopt_inherited_fd(fd)?)
    }

    /// The socket, to pass to the next generation (the parent closes its
    /// copy once the child has it, or the child's death is never seen).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// True while frames wait for room in the socket: wait for it to be
    /// writable, then poll again.
    pub(crate) fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Queue `frame` with `fds` (at most `SCM_MAX_FD`, alive until sent
    /// or [`End::clear_outbox`]).
    pub(crate) fn queue(&mut self, frame: &Frame, fds: Vec<RawFd>) {
        self.outbox.push_back(Outgoing {
            bytes: frame.to_bytes(),
            fds,
        });
    }

    /// Forget every queued frame (their fds are about to be given back).
    pub(crate) fn clear_outbox(&mut self) {
        self.outbox.clear();
    }

    /// Send queued frames until the socket is full; true when none is left.
    pub(crate) fn flush(&mut self) -> Result<bool, HandoverError> {
        while let Some(next) = self.outbox.front() {
            match seqpacket::send(self.fd.as_fd(), &next.bytes, &next.fds) {
                Ok(()) => {
                    self.outbox.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(HandoverError::io(e)),
            }
        }
        Ok(true)
    }

    /// Once the channel is finished: send what is still queued (an
    /// abort), best effort, and drop whatever the peer sends (closing its
    /// fds). Bounded: end of file is read again and again, so it stops
    /// there.
    pub(crate) fn discard(&mut self) {
        let _ = self.flush();
        while let Ok(Some(Incoming::Frame(..))) = self.recv() {}
    }

    /// Receive one frame, `None` if none is queued. On any error the fds
    /// that came are closed.
    pub(crate) fn recv(&mut self) -> Result<Option<Incoming>, HandoverError> {
        let got = match seqpacket::recv(self.fd.as_fd(), &mut self.buf, &mut self.cmsg) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            // The peer closed with frames of ours unread: the kernel reports
            // the reset once, ahead of what the peer sent last (an abort
            // and its reason, say), which is still queued: read that.
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                match seqpacket::recv(self.fd.as_fd(), &mut self.buf, &mut self.cmsg) {
                    Ok(got) if got.len > 0 => got,
                    _ => return Err(HandoverError::PeerGone),
                }
            }
            Err(e) => return Err(HandoverError::io(e)),
        };
        if got.truncated {
            return Err(HandoverError::Oversized);
        }
        let bytes = self.buf.get(..got.len).unwrap_or_default();
        if got.fds_truncated {
            let declared = Frame::decode(bytes).map(|f| f.fds()).unwrap_or(0);
            let received = got.fds.len();
            // Probed before the fds that did come are closed, which frees
            // their slots.
            let out_of_fds = seqpacket::out_of_fds(self.fd.as_fd());
            drop(got.fds);
            return Err(match out_of_fds {
                Some(e) => HandoverError::OutOfFds(e),
                None => HandoverError::FdsTruncated { declared, received },
            });
        }
        if got.len == 0 && got.fds.is_empty() {
            return Ok(Some(Incoming::Eof));
        }
        let frame = Frame::decode(bytes)?;
        if frame.fds() != got.fds.len() {
            return Err(HandoverError::FdCount {
                declared: frame.fds(),
                received: got.fds.len(),
            });
        }
        Ok(Some(Incoming::Frame(frame, got.fds)))
    }
}

impl AsFd for End {
    /// The socket, for a reactor to wait on.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
