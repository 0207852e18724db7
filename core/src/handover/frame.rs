//! The frames of the handover channel, encoded and decoded without I/O.
//!
//! One frame is one `SOCK_SEQPACKET` message (the socket keeps the
//! boundaries), so there is no length prefix: a frame is a kind byte and a
//! body, integers little-endian. The layout of every kind is in the
//! [module docs](super#frames). The decoder never panics and allocates no
//! more than the bytes it was given: every length field is checked against
//! the bytes actually present before anything is copied.

use super::{Limits, Versions};

/// The largest frame, in bytes. Far below the socket's default send buffer
/// (`net.core.wmem_default`, 208 KiB), so a frame never fails with
/// `EMSGSIZE`; larger payloads are split across frames.
pub const MAX_FRAME: usize = 64 * 1024;
/// The first bytes of a hello: what is on the other end speaks this channel.
pub const MAGIC: [u8; 8] = *b"baton-ho";
/// The layout of the frames after the hello; a peer with another one gets
/// no handover.
pub const WIRE_VERSION: u16 = 1;
/// Longest abort reason sent; longer ones are cut (at a char boundary).
pub const MAX_REASON: usize = 1024;
/// Most fds one frame may carry: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS_PER_FRAME: usize = crate::sys::seqpacket::SCM_MAX_FD;

/// Bytes of an `ITEM` frame before its name.
pub(crate) const ITEM_FIXED: usize = 1 + 2 + 4 + 8 + 4 + 1;
/// Bytes of a `MORE` frame before its payload chunk.
pub(crate) const MORE_FIXED: usize = 1 + 1;

const HELLO: u8 = 0x01;
const BEGIN: u8 = 0x02;
const ITEM: u8 = 0x03;
const MORE: u8 = 0x04;
const END: u8 = 0x05;
const PREPARED: u8 = 0x06;
const COMMIT: u8 = 0x07;
const ABORT: u8 = 0x08;

/// One message on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// First frame each way: state versions and receive limits.
    Hello {
        /// The state versions this side reads and writes.
        versions: Versions,
        /// What this side accepts; the sender stays within the peer's.
        limits: Limits,
    },
    /// A hello of another wire version, whose body this one cannot read.
    UnknownWire(u16),
    /// The old generation opens a transaction at the negotiated version.
    Begin {
        /// The negotiated state version.
        version: u32,
    },
    /// The start of an item: its header, the first chunk of its payload
    /// and `fds` of its fds.
    Item {
        /// The item's name.
        name: String,
        /// The state version of its payload.
        version: u32,
        /// Its whole payload, over this frame and the `MORE` ones.
        payload_len: u64,
        /// All its fds, over this frame and the `MORE` ones.
        fd_count: u32,
        /// Fds attached to this frame.
        fds: u8,
        /// The first bytes of the payload.
        chunk: Vec<u8>,
    },
    /// More of the current item.
    More {
        /// Fds attached to this frame.
        fds: u8,
        /// The next bytes of the payload.
        chunk: Vec<u8>,
    },
    /// The transaction's last item has been sent.
    End {
        /// How many items it had.
        items: u32,
    },
    /// The new generation rebuilt everything and waits for the commit.
    Prepared,
    /// The old generation lets go: the new one owns the items now.
    Commit,
    /// Either side gives the transaction up.
    Abort {
        /// Why, for the logs.
        reason: String,
    },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// An empty message.
    #[error("empty frame")]
    Empty,
    /// More than [`MAX_FRAME`] bytes.
    #[error("frame of {0} bytes, more than {MAX_FRAME}")]
    TooLarge(usize),
    /// A kind byte this version does not know.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The body ends before its fields do.
    #[error("truncated frame")]
    Truncated,
    /// Bytes after the last field of a fixed-size frame.
    #[error("trailing bytes after the frame")]
    Trailing,
    /// A hello without the magic bytes: not a baton handover peer.
    #[error("not a baton handover hello")]
    BadMagic,
    /// A name or reason that is not UTF-8.
    #[error("text field is not valid utf-8")]
    Utf8,
    /// A version range with `min > max`.
    #[error("invalid version range {min}..={max}")]
    Versions {
        /// Its lower end.
        min: u32,
        /// Its upper end.
        max: u32,
    },
    /// A frame that declares more fds than one message can carry.
    #[error("frame declares {0} fds, more than {MAX_FDS_PER_FRAME}")]
    TooManyFds(u8),
}

impl Frame {
    /// The number of fds that must come with this frame.
    pub fn fds(&self) -> usize {
        match self {
            Frame::Item { fds, .. } | Frame::More { fds, .. } => usize::from(*fds),
            _ => 0,
        }
    }

    /// The frame's kind, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } | Frame::UnknownWire(_) => "hello",
            Frame::Begin { .. } => "begin",
            Frame::Item { .. } => "item",
            Frame::More { .. } => "more",
            Frame::End { .. } => "end",
            Frame::Prepared => "prepared",
            Frame::Commit => "commit",
            Frame::Abort { .. } => "abort",
        }
    }

    /// Append the encoded frame to `out`. Names, chunks and reasons are
    /// written as given: the sender keeps them within [`MAX_FRAME`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello { versions, limits } => {
                out.push(HELLO);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
                out.extend_from_slice(&versions.min().to_le_bytes());
                out.extend_from_slice(&versions.max().to_le_bytes());
                out.extend_from_slice(&limits.max_items.to_le_bytes());
                out.extend_from_slice(&limits.max_name_len.to_le_bytes());
                out.extend_from_slice(&limits.max_item_payload.to_le_bytes());
                out.extend_from_slice(&limits.max_total_payload.to_le_bytes());
                out.extend_from_slice(&limits.max_item_fds.to_le_bytes());
                out.extend_from_slice(&limits.max_total_fds.to_le_bytes());
            }
            Frame::UnknownWire(wire) => {
                out.push(HELLO);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&wire.to_le_bytes());
            }
            Frame::Begin { version } => {
                out.push(BEGIN);
                out.extend_from_slice(&version.to_le_bytes());
            }
            Frame::Item {
                name,
                version,
                payload_len,
                fd_count,
                fds,
                chunk,
            } => {
                out.push(ITEM);
                let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&name_len.to_le_bytes());
                out.extend_from_slice(
                    name.as_bytes()
                        .get(..usize::from(name_len))
                        .unwrap_or_default(),
                );
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&payload_len.to_le_bytes());
                out.extend_from_slice(&fd_count.to_le_bytes());
                out.push(*fds);
                out.extend_from_slice(chunk);
            }
            Frame::More { fds, chunk } => {
                out.push(MORE);
                out.push(*fds);
                out.extend_from_slice(chunk);
            }
            Frame::End { items } => {
                out.push(END);
                out.extend_from_slice(&items.to_le_bytes());
            }
            Frame::Prepared => out.push(PREPARED),
            Frame::Commit => out.push(COMMIT),
            Frame::Abort { reason } => {
                out.push(ABORT);
                out.extend_from_slice(truncate(reason, MAX_REASON).as_bytes());
            }
        }
    }

    /// The frame as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decode one frame (one whole message).
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        if bytes.len() > MAX_FRAME {
            return Err(FrameError::TooLarge(bytes.len()));
        }
        let (&kind, body) = bytes.split_first().ok_or(FrameError::Empty)?;
        let mut r = Reader(body);
        let frame = match kind {
            HELLO => {
                if r.take(MAGIC.len())? != MAGIC {
                    return Err(FrameError::BadMagic);
                }
                let wire = r.u16()?;
                if wire != WIRE_VERSION {
                    // Its body is another layout: not ours to read.
                    return Ok(Frame::UnknownWire(wire));
                }
                let (min, max) = (r.u32()?, r.u32()?);
                let versions =
                    Versions::new(min, max).map_err(|_| FrameError::Versions { min, max })?;
                let limits = Limits {
                    max_items: r.u32()?,
                    max_name_len: r.u32()?,
                    max_item_payload: r.u64()?,
                    max_total_payload: r.u64()?,
                    max_item_fds: r.u32()?,
                    max_total_fds: r.u32()?,
                };
                Frame::Hello { versions, limits }
            }
            BEGIN => Frame::Begin { version: r.u32()? },
            ITEM => {
                let name_len = usize::from(r.u16()?);
                let name = text(r.take(name_len)?)?;
                let version = r.u32()?;
                let payload_len = r.u64()?;
                let fd_count = r.u32()?;
                let fds = fd_field(r.u8()?)?;
                return Ok(Frame::Item {
                    name,
                    version,
                    payload_len,
                    fd_count,
                    fds,
                    chunk: r.rest().to_vec(),
                });
            }
            MORE => {
                let fds = fd_field(r.u8()?)?;
                return Ok(Frame::More {
                    fds,
                    chunk: r.rest().to_vec(),
                });
            }
            END => Frame::End { items: r.u32()? },
            PREPARED => Frame::Prepared,
            COMMIT => Frame::Commit,
            ABORT => {
                let rest = r.rest();
                // Cut like the encoder does, so a long one stays readable.
                let reason = String::from_utf8_lossy(rest.get(..MAX_REASON).unwrap_or(rest));
                // Replacement characters can make it longer than it was.
                return Ok(Frame::Abort {
                    reason: truncate(&reason, MAX_REASON).to_owned(),
                });
            }
            other => return Err(FrameError::UnknownKind(other)),
        };
        if !r.0.is_empty() {
            return Err(FrameError::Trailing);
        }
        Ok(frame)
    }
}

/// `s` cut to at most `max` bytes at a char boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn fd_field(fds: u8) -> Result<u8, FrameError> {
    if usize::from(fds) > MAX_FDS_PER_FRAME {
        return Err(FrameError::TooManyFds(fds));
    }
    Ok(fds)
}

fn text(bytes: &[u8]) -> Result<String, FrameError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| FrameError::Utf8)
}

/// A cursor that fails instead of panicking when the bytes run out.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if n > self.0.len() {
            return Err(FrameError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        self.take(N)?.try_into().map_err(|_| FrameError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames() -> impl Strategy<Value = Frame> {
        let limits = (
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(a, b, c, d, e, f)| Limits {
                max_items: a,
                max_name_len: b,
                max_item_payload: c,
                max_total_payload: d,
                max_item_fds: e,
                max_total_fds: f,
            });
        let versions = (any::<u32>(), any::<u32>())
            .prop_map(|(a, b)| Versions::new(a.min(b), a.max(b)).unwrap());
        let chunk = proptest::collection::vec(any::<u8>(), 0..300);
        let fds = 0..=MAX_FDS_PER_FRAME as u8;
        prop_oneof![
            (versions, limits).prop_map(|(versions, limits)| Frame::Hello { versions, limits }),
            any::<u16>()
                .prop_filter("another wire", |w| *w != WIRE_VERSION)
                .prop_map(Frame::UnknownWire),
            any::<u32>().prop_map(|version| Frame::Begin { version }),
            (
                ".{0,40}",
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                fds.clone(),
                chunk.clone()
            )
                .prop_map(|(name, version, payload_len, fd_count, fds, chunk)| {
                    Frame::Item {
                        name,
                        version,
                        payload_len,
                        fd_count,
                        fds,
                        chunk,
                    }
                }),
            (fds, chunk).prop_map(|(fds, chunk)| Frame::More { fds, chunk }),
            any::<u32>().prop_map(|items| Frame::End { items }),
            Just(Frame::Prepared),
            Just(Frame::Commit),
            ".{0,200}".prop_map(|reason| Frame::Abort { reason }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encode_then_decode_round_trips(frame in frames()) {
            let bytes = frame.to_bytes();
            prop_assert_eq!(Frame::decode(&bytes), Ok(frame));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_frames(frame in frames(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
            let mut bytes = frame.to_bytes();
            let at = at % bytes.len();
            bytes[at] = byte;
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(decoded) = Frame::decode(&bytes) {
                // What decodes re-encodes to a frame that decodes the same.
                prop_assert_eq!(Frame::decode(&decoded.to_bytes()), Ok(decoded));
            }
        }
    }

    #[test]
    fn malformed_frames_are_typed_errors() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode(&[0x7f]), Err(FrameError::UnknownKind(0x7f)));
        assert_eq!(Frame::decode(&[BEGIN, 1, 2]), Err(FrameError::Truncated));
        assert_eq!(Frame::decode(&[COMMIT, 0]), Err(FrameError::Trailing));
        let mut bad = vec![HELLO];
        bad.extend_from_slice(&[b'x'; 20]);
        assert_eq!(Frame::decode(&bad), Err(FrameError::BadMagic));
        assert_eq!(
            Frame::decode(&[MORE, 254]),
            Err(FrameError::TooManyFds(254))
        );
        assert_eq!(
            Frame::decode(&vec![MORE; MAX_FRAME + 1]),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
        // A name length far past the frame is refused, not allocated.
        assert_eq!(
            Frame::decode(&[ITEM, 0xff, 0xff, b'a']),
            Err(FrameError::Truncated)
        );
        assert_eq!(Frame::decode(&[ITEM, 1, 0, 0xff]), Err(FrameError::Utf8));
        let mut hello = vec![HELLO];
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        hello.extend_from_slice(&5u32.to_le_bytes());
        hello.extend_from_slice(&4u32.to_le_bytes());
        assert_eq!(
            Frame::decode(&hello),
            Err(FrameError::Versions { min: 5, max: 4 })
        );
    }

    #[test]
    fn an_abort_of_invalid_utf8_decodes_to_what_it_re_encodes_to() {
        let mut bytes = vec![ABORT];
        bytes.extend_from_slice(&[0xff; MAX_REASON + 10]);
        let frame = Frame::decode(&bytes).unwrap();
        assert_eq!(Frame::decode(&frame.to_bytes()), Ok(frame));
    }

    #[test]
    fn long_abort_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON);
        let Ok(Frame::Abort { reason: got }) = Frame::decode(&Frame::Abort { reason }.to_bytes())
        else {
            panic!("not an abort");
        };
        assert_eq!(got.len(), MAX_REASON);
    }
}
