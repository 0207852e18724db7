//! The handover channel's socket calls: a `SOCK_SEQPACKET` socketpair and
//! `sendmsg`/`recvmsg` with `SCM_RIGHTS`, never blocking.
//!
//! Contract for [`crate::handover`]: every fd that comes out of here is an
//! [`OwnedFd`] with `FD_CLOEXEC` set (`MSG_CMSG_CLOEXEC`), including the
//! ones the kernel installed before it ran out of fds (`MSG_CTRUNC`), so a
//! failed receive leaks nothing.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};

/// The kernel's limit on fds in one `SCM_RIGHTS` message
/// (`include/net/scm.h`); more fails the whole `sendmsg` with `EINVAL`.
pub(crate) const SCM_MAX_FD: usize = 253;

/// A connected `AF_UNIX` `SOCK_SEQPACKET` pair, both ends non-blocking and
/// close-on-exec.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Check that `fd` is an `AF_UNIX` `SOCK_SEQPACKET` socket, then make it
/// non-blocking and close-on-exec: an inherited end may come without
/// either.
pub(crate) fn prepare_seqpacket(fd: BorrowedFd<'_>) -> io::Result<()> {
    let info = super::socket_info(fd)?;
    if info.family != libc::AF_UNIX || info.socket_type != libc::SOCK_SEQPACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an AF_UNIX SOCK_SEQPACKET socket",
        ));
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Send one message with `fds` attached (at most [`SCM_MAX_FD`]).
/// `WouldBlock` when the peer's queue is full; `MSG_NOSIGNAL`, so a dead
/// peer is `EPIPE`, never `SIGPIPE`.
pub(crate) fn send(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    loop {
        match sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, cmsgs, flags, None) {
            // A seqpacket message goes whole or not at all.
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// One received message.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes of the message in the buffer; 0 is end of file.
    pub(crate) len: usize,
    /// The fds that came with it, owned and close-on-exec.
    pub(crate) fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the message was longer than the buffer.
    pub(crate) truncated: bool,
    /// `MSG_CTRUNC`: the kernel could not give us every fd (out of fds).
    pub(crate) fds_truncated: bool,
}

/// Room for the control message of [`SCM_MAX_FD`] fds.
pub(crate) fn cmsg_buffer() -> Vec<u8> {
    nix::cmsg_space!([RawFd; SCM_MAX_FD])
}

/// Receive one message into `buf`, its fds through `cmsg` (from
/// [`cmsg_buffer`]). `WouldBlock` when nothing is queued.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<Received> {
    // Zeroed so that only what the kernel writes is parsed below.
    cmsg.fill(0);
    let flags = MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT;
    let (len, msg_flags) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut *cmsg), flags) {
            Ok(msg) => break (msg.bytes, msg.flags),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    // Parsed here rather than with nix's `RecvMsg::cmsgs`, which refuses to
    // iterate when `MSG_CTRUNC` is set: the fds the kernel did install
    // before it ran out would then leak.
    let fds = received_fds(cmsg)
        .into_iter()
        // SAFETY: the kernel installed each of these fds in this process for
        // this `recvmsg` (SCM_RIGHTS in the zeroed buffer it wrote), and
        // nothing else knows their numbers: this is their only owner.
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .collect();
    Ok(Received {
        len,
        fds,
        truncated: msg_flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated: msg_flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// The fd numbers in the `SCM_RIGHTS` messages of a control buffer the
/// kernel wrote into after it was zeroed (a zero length ends the walk).
fn received_fds(cmsg: &[u8]) -> Vec<RawFd> {
    const WORD: usize = std::mem::size_of::<usize>();
    let align = |len: usize| len.saturating_add(WORD - 1) & !(WORD - 1);
    let header = align(std::mem::size_of::<libc::cmsghdr>());
    let int = std::mem::size_of::<RawFd>();
    let mut fds = Vec::new();
    let mut at: usize = 0;
    while let Some(hdr) = cmsg.get(at..at.saturating_add(header)) {
        // cmsghdr: cmsg_len (size_t), cmsg_level (int), cmsg_type (int).
        let word = |range: std::ops::Range<usize>| hdr.get(range).unwrap_or_default();
        let len = usize::from_ne_bytes(word(0..WORD).try_into().unwrap_or_default());
        let level = i32::from_ne_bytes(word(WORD..WORD + 4).try_into().unwrap_or_default());
        let kind = i32::from_ne_bytes(word(WORD + 4..WORD + 8).try_into().unwrap_or_default());
        if len < header {
            break;
        }
        let data = cmsg
            .get(at + header..at.saturating_add(len))
            .unwrap_or_default();
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            fds.extend(
                data.chunks_exact(int)
                    .map(|b| RawFd::from_ne_bytes(b.try_into().unwrap_or_default())),
            );
        }
        at = at.saturating_add(align(len));
    }
    fds
}

/// After `MSG_CTRUNC`: is this process out of fds? `Some(EMFILE or
/// ENFILE)` if duplicating `fd` fails so, which is why the kernel could not
/// install what was sent.
pub(crate) fn out_of_fds(fd: BorrowedFd<'_>) -> Option<io::Error> {
    match fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(0)) {
        Ok(raw) => {
            // SAFETY: F_DUPFD_CLOEXEC just returned this new fd; we own it
            // and close it at once.
            drop(unsafe { OwnedFd::from_raw_fd(raw) });
            None
        }
        Err(e @ (Errno::EMFILE | Errno::ENFILE)) => Some(e.into()),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn pair_is_nonblocking_cloexec_and_keeps_boundaries() {
        let (a, b) = seqpacket_pair().unwrap();
        for fd in [&a, &b] {
            assert!(super::super::is_cloexec(fd.as_fd()).unwrap());
            assert!(super::super::is_nonblocking(fd.as_fd()).unwrap());
        }
        send(a.as_fd(), b"one", &[]).unwrap();
        send(a.as_fd(), b"two!", &[b.as_raw_fd()]).unwrap();
        let (mut buf, mut cmsg) = (vec![0; 16], cmsg_buffer());
        let first = recv(b.as_fd(), &mut buf, &mut cmsg).unwrap();
        assert_eq!((first.len, first.fds.len()), (3, 0));
        let second = recv(b.as_fd(), &mut buf, &mut cmsg).unwrap();
        assert_eq!((second.len, second.fds.len()), (4, 1));
        assert!(super::super::is_cloexec(second.fds[0].as_fd()).unwrap());
        let err = recv(b.as_fd(), &mut buf, &mut cmsg).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn control_buffer_parser_stops_on_garbage() {
        assert!(received_fds(&[]).is_empty());
        assert!(received_fds(&[0xff; 7]).is_empty());
        assert!(received_fds(&cmsg_buffer()).is_empty());
        // A length pointing past the end takes nothing beyond it.
        let mut buf = vec![0u8; 24];
        buf[..8].copy_from_slice(&1000usize.to_ne_bytes());
        buf[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        buf[12..16].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        assert!(received_fds(&buf).is_empty());
    }
}
