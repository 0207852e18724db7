//! The channel end to end over real socketpairs, in this process: round
//! trips with usable fds, batching past `SCM_MAX_FD`, negotiation, aborts
//! and peer death on both sides, limits, frames out of order, and
//! `EMFILE` on receive (in a child process, whose fd limit is its own).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::channel::Incoming;
use super::*;

/// Both sides and what they reported, driven in turn in one thread.
struct Link {
    s: Sender,
    r: Receiver,
    sent: Vec<SenderEvent>,
    got: Vec<ReceiverEvent>,
}

impl Link {
    fn new(old: Versions, new: Versions) -> Self {
        Link::with_limits(old, new, Limits::default(), Limits::default())
    }

    fn with_limits(old: Versions, new: Versions, old_limits: Limits, new_limits: Limits) -> Self {
        let (a, b) = pair().unwrap();
        Link {
            s: Sender::new(a, old, old_limits),
            r: Receiver::new(b, new, new_limits),
            sent: Vec::new(),
            got: Vec::new(),
        }
    }

    /// Poll both sides until neither has anything to do.
    fn poll(&mut self) {
        for _ in 0..100_000 {
            let a = self.s.poll().unwrap();
            let b = self.r.poll().unwrap();
            let idle = a.is_none() && b.is_none();
            self.sent.extend(a);
            self.got.extend(b);
            if idle {
                return;
            }
        }
        panic!("the channel never went idle");
    }

    /// Poll until `done` holds; every round makes progress or the link is
    /// idle, so a bounded number of rounds decides.
    fn until(&mut self, what: &str, done: impl Fn(&Link) -> bool) {
        for _ in 0..1_000 {
            if done(self) {
                return;
            }
            self.poll();
        }
        panic!(
            "never {what}: sender {:?}, receiver {:?}",
            self.sent, self.got
        );
    }

    fn negotiate(&mut self) -> Option<u32> {
        self.until("negotiated", |l| !l.sent.is_empty() && !l.got.is_empty());
        let Some(SenderEvent::Negotiated(old)) = self.sent.pop() else {
            panic!("sender: {:?}", self.sent);
        };
        let Some(ReceiverEvent::Negotiated(new)) = self.got.pop() else {
            panic!("receiver: {:?}", self.got);
        };
        assert_eq!(old, new);
        old
    }

    /// Send `items` and wait for the receiver to have them all.
    fn transfer(&mut self, items: Vec<Item>) -> Vec<Item> {
        self.s.begin().unwrap();
        for item in items {
            self.s.push(item).unwrap();
        }
        self.s.end().unwrap();
        self.until("received", |l| !l.got.is_empty());
        match self.got.pop() {
            Some(ReceiverEvent::Transaction { items, .. }) => items,
            other => panic!("receiver: {other:?}"),
        }
    }

    fn sender_event(&mut self, what: &str) -> SenderEvent {
        self.until(what, |l| !l.sent.is_empty());
        self.sent.remove(0)
    }

    fn receiver_event(&mut self, what: &str) -> ReceiverEvent {
        self.until(what, |l| !l.got.is_empty());
        self.got.remove(0)
    }
}

fn v(min: u32, max: u32) -> Versions {
    Versions::new(min, max).unwrap()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

fn inode(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino
}

#[test]
fn items_with_payload_and_usable_fds_round_trip() {
    let mut link = Link::new(v(1, 3), v(2, 5));
    assert_eq!(link.negotiate(), Some(3));

    let (pipe_read, pipe_write) = pipe();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
    let (mut accepted, _) = server.accept().unwrap();
    // Several frames' worth, so the payload is split and reassembled.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let items = vec![
        Item::new("conn/1", 3, b"pipelined bytes".to_vec())
            .with_fds([pipe_write, OwnedFd::from(client)]),
        Item::new("cache", 2, big.clone()),
        Item::new("empty", 3, Vec::new()),
    ];
    let mut got = link.transfer(items);
    assert_eq!(
        got.iter()
            .map(|i| (i.name.as_str(), i.version, i.fds.len()))
            .collect::<Vec<_>>(),
        [("conn/1", 3, 2), ("cache", 2, 0), ("empty", 3, 0)]
    );
    assert_eq!(got[0].payload, b"pipelined bytes");
    assert!(
        got[1].payload == big,
        "payload of {} bytes differs",
        got[1].payload.len()
    );
    for fd in &got[0].fds {
        assert!(crate::sys::is_cloexec(fd.as_fd()).unwrap());
    }

    link.r.prepared().unwrap();
    assert!(matches!(
        link.sender_event("prepared"),
        SenderEvent::Prepared
    ));
    link.s.commit().unwrap();
    assert!(matches!(
        link.sender_event("committed"),
        SenderEvent::Committed
    ));
    assert!(matches!(
        link.receiver_event("committed"),
        ReceiverEvent::Committed
    ));

    // The fds work on the receiving side.
    let conn = got.remove(0);
    let mut fds = conn.fds.into_iter();
    let mut write_end = std::fs::File::from(fds.next().unwrap());
    let mut stream = std::net::TcpStream::from(fds.next().unwrap());
    write_end.write_all(b"via pipe").unwrap();
    stream.write_all(b"via tcp").unwrap();
    let mut buf = [0u8; 8];
    std::fs::File::from(pipe_read.try_clone().unwrap())
        .read_exact(&mut buf)
        .unwrap();
    assert_eq!(&buf, b"via pipe");
    let mut buf = [0u8; 7];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"via tcp");
    // The sender let go of its copies at the commit: with the receiver's
    // closed, the pipe has no writer left.
    drop(write_end);
    let mut rest = Vec::new();
    std::fs::File::from(pipe_read)
        .read_to_end(&mut rest)
        .unwrap();
    assert!(rest.is_empty());
}

#[test]
fn an_item_with_more_fds_than_one_message_carries_is_batched() {
    let mut link = Link::new(Versions::single(1), Versions::single(1));
    assert_eq!(link.negotiate(), Some(1));
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..150).map(|_| pipe()).collect();
    let fds: Vec<OwnedFd> = pipes
        .iter()
        .flat_map(|(r, w)| [r.try_clone().unwrap(), w.try_clone().unwrap()])
        .collect();
    let inodes: Vec<u64> = fds.iter().map(inode).collect();
    assert!(fds.len() > SCM_MAX_FD);
    let got = link.transfer(vec![Item::new("many", 1, vec![7; 10]).with_fds(fds)]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].fds.len(), 300);
    // Same open files, same order.
    assert_eq!(got[0].fds.iter().map(inode).collect::<Vec<_>>(), inodes);
}

#[test]
fn many_items_wait_for_room_in_the_socket() {
    let mut link = Link::new(Versions::single(1), Versions::single(1));
    link.negotiate();
    link.s.begin().unwrap();
    for i in 0..500 {
        link.s
            .push(Item::new(format!("item/{i}"), 1, vec![i as u8; 1000]))
            .unwrap();
    }
    // The receiver's queue holds far fewer messages than that.
    assert!(link.s.wants_write());
    link.s.end().unwrap();
    let Some(ReceiverEvent::Transaction { items, version }) = Some(link.receiver_event("received"))
    else {
        panic!("no transaction");
    };
    assert_eq!((items.len(), version), (500, 1));
    assert!(items
        .iter()
        .enumerate()
        .all(|(i, it)| it.name == format!("item/{i}")));
}

#[test]
fn versions_negotiate_to_the_highest_common_one_or_none() {
    let cases = [
        (v(1, 3), v(2, 5), Some(3)),
        (v(2, 5), v(1, 3), Some(3)),
        (v(1, 1), v(1, 9), Some(1)),
        (v(4, 4), v(4, 4), Some(4)),
        (v(1, 2), v(3, 4), None),
        (v(5, 9), v(1, 4), None),
    ];
    for (old, new, expected) in cases {
        let mut link = Link::new(old, new);
        assert_eq!(link.negotiate(), expected, "{old:?} {new:?}");
        assert_eq!((link.s.version(), link.r.version()), (expected, expected));
        if expected.is_none() {
            assert!(matches!(
                link.s.begin(),
                Err(HandoverError::State { call: "begin", .. })
            ));
        }
    }
    assert!(matches!(
        Versions::new(3, 2),
        Err(HandoverError::InvalidVersions { min: 3, max: 2 })
    ));
}

#[test]
fn a_peer_of_another_wire_version_means_no_handover() {
    let (mut raw, b) = pair().unwrap();
    let mut r = Receiver::new(b, v(1, 2), Limits::default());
    raw.queue(&Frame::UnknownWire(2), Vec::new());
    assert!(raw.flush().unwrap());
    assert!(matches!(
        r.poll().unwrap(),
        Some(ReceiverEvent::Negotiated(None))
    ));
}

#[test]
fn a_commit_lets_another_transaction_follow() {
    let mut link = Link::new(Versions::single(1), Versions::single(1));
    link.negotiate();
    for round in 0..3 {
        let got = link.transfer(vec![Item::new("round", 1, vec![round])]);
        assert_eq!(got[0].payload, [round]);
        link.r.prepared().unwrap();
        assert!(matches!(
            link.sender_event("prepared"),
            SenderEvent::Prepared
        ));
        link.s.commit().unwrap();
        assert!(matches!(
            link.sender_event("committed"),
            SenderEvent::Committed
        ));
        assert!(matches!(
            link.receiver_event("committed"),
            ReceiverEvent::Committed
        ));
    }
    // The old generation is done: the new one sees the channel close.
    drop(link.s);
    let mut r = link.r;
    let mut event = None;
    for _ in 0..10 {
        if let Some(e) = r.poll().unwrap() {
            event = Some(e);
            break;
        }
    }
    assert!(matches!(event, Some(ReceiverEvent::Closed)), "{event:?}");
}

#[test]
fn the_receiver_aborting_gives_the_sender_its_items_back() {
    let mut link = Link::new(Versions::single(1), Versions::single(1));
    link.negotiate();
    let (read, write) = pipe();
    let ino = inode(&write);
    let got = link.transfer(vec![Item::new("conn", 1, b"x".to_vec()).with_fds([write])]);
    drop(got);
    link.r.abort("cannot rebuild conn").unwrap();
    match link.sender_event("aborted") {
        SenderEvent::Aborted {
            cause: HandoverError::PeerAborted(reason),
            items,
        } => {
            assert_eq!(reason, "cannot rebuild conn");
            assert_eq!(items.len(), 1);
            assert_eq!(inode(&items[0].fds[0]), ino);
            // Still the pipe's writer: the old generation serves on.
            std::fs::File::from(items.into_iter().next().unwrap().fds.remove(0))
                .write_all(b"k")
                .unwrap();
            let mut b = [0u8];
            std::fs::File::from(read).read_exact(&mut b).unwrap();
        }
        other => panic!("{other:?}"),
    }
    assert!(link.s.is_finished() && link.r.is_finished());
    // A finished side stays quiet, even once the peer is gone.
    let Link { mut s, r, .. } = link;
    drop(r);
    assert!(s.poll().unwrap().is_none());
    assert!(s.poll().unwrap().is_none());
}

#[test]
fn the_sender_aborting_keeps_its_items_and_tells_the_receiver() {
    let mut link = Link::new(Versions::single(1), Versions::single(1));
    link.negotiate();
    let (_read, write) = pipe();
    let _ = link.transfer(vec![Item::new("conn", 1, Vec::new()).with_fds([write])]);
    link.r.prepared().unwrap();
    assert!(matches!(
        link.sender_event("prepared"),
        SenderEvent::Prepared
    ));
    let items = link.s.abort("drain deadline").unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].fds.len(), 1);
    match link.receiver_event("aborted") {
        ReceiverEvent::Aborted(HandoverError::PeerAborted(reason)) => {
            assert_eq!(reason, "drain deadline")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(link.s.commit(), Err(HandoverError::State { .. })));
    let Link { s, mut r, .. } = link;
    drop(s);
    assert!(r.poll().unwrap().is_none());
}

#[test]
fn the_receiver_dying_before_the_commit_aborts_with_every_item_back() {
    for prepared in [false, true] {
        let mut link = Link::new(Versions::single(1), Versions::single(1));
        link.negotiate();
        let (_read, write) = pipe();
        let _ = link.transfer(vec![
            Item::new("conn", 1, vec![1; 100_000]).with_fds([write])
        ]);
        if prepared {
            link.r.prepared().unwrap();
            assert!(matches!(
                link.sender_event("prepared"),
                SenderEvent::Prepared
            ));
        }
        let Link { mut s, r, .. } = link;
        drop(r);
        let event = (0..10).find_map(|_| s.poll().unwrap());
        match event {
            Some(SenderEvent::Aborted {
                cause: HandoverError::PeerGone,
                items,
            }) => {
                assert_eq!(items[0].payload.len(), 100_000);
                assert_eq!(items[0].fds.len(), 1);
            }
            other => panic!("prepared {prepared}: {other:?}"),
        }
        assert!(matches!(s.commit(), Err(HandoverError::State { .. })));
    }
}

#[test]
fn the_receiver_dying_mid_item_aborts_the_sender() {
    let mut link = Link::new(Versions::single(1), Versions::single(1));
    link.negotiate();
    link.s.begin().unwrap();
    link.s.push(Item::new("half", 1, vec![0; 1 << 20])).unwrap();
    // Part of the item is still queued on the sender's side.
    link.poll();
    let Link { mut s, r, .. } = link;
    drop(r);
    let event = (0..10).find_map(|_| s.poll().unwrap());
    assert!(
        matches!(&event, Some(SenderEvent::Aborted { cause: HandoverError::PeerGone, items }) if items.len() == 1),
        "{event:?}"
    );
}

#[test]
fn the_sender_dying_before_the_commit_aborts_the_receiver() {
    for prepared in [false, true] {
        let mut link = Link::new(Versions::single(1), Versions::single(1));
        link.negotiate();
        if prepared {
            let _ = link.transfer(vec![Item::new("conn", 1, Vec::new())]);
            link.r.prepared().unwrap();
        } else {
            link.s.begin().unwrap();
            link.s.push(Item::new("conn", 1, vec![0; 100_000])).unwrap();
            link.poll();
        }
        let Link { s, mut r, .. } = link;
        drop(s);
        let event = (0..10).find_map(|_| r.poll().unwrap());
        assert!(
            matches!(event, Some(ReceiverEvent::Aborted(HandoverError::PeerGone))),
            "prepared {prepared}: {event:?}"
        );
        assert!(matches!(r.prepared(), Err(HandoverError::State { .. })));
    }
}

#[test]
fn the_sender_refuses_items_beyond_the_receivers_limits_and_gives_them_back() {
    let strict = Limits {
        max_items: 2,
        max_name_len: 8,
        max_item_payload: 100,
        max_total_payload: 150,
        max_item_fds: 2,
        max_total_fds: 3,
    };
    let mut link = Link::with_limits(v(1, 3), v(2, 3), Limits::default(), strict);
    link.negotiate();
    let refused = |result: Result<(), Refused>| result.map(|_| ()).unwrap_err();
    // Before begin.
    let r = refused(link.s.push(Item::new("a", 3, Vec::new())));
    assert!(matches!(r.error, HandoverError::State { call: "push", .. }));
    link.s.begin().unwrap();
    let fds = |n: usize| (0..n).map(|_| pipe().0).collect::<Vec<_>>();
    type Case = (Item, fn(&HandoverError) -> bool);
    let cases: Vec<Case> = vec![
        (Item::new("", 3, Vec::new()), |e| {
            matches!(e, HandoverError::EmptyName)
        }),
        (Item::new("too-long-name", 3, Vec::new()), |e| {
            matches!(
                e,
                HandoverError::Limit {
                    limit: Limit::NameLen,
                    value: 13,
                    max: 8
                }
            )
        }),
        (Item::new("old", 1, Vec::new()), |e| {
            matches!(
                e,
                HandoverError::Version {
                    version: 1,
                    min: 2,
                    max: 3
                }
            )
        }),
        (Item::new("big", 3, vec![0; 101]), |e| {
            matches!(
                e,
                HandoverError::Limit {
                    limit: Limit::ItemPayload,
                    ..
                }
            )
        }),
        (Item::new("fds", 3, Vec::new()).with_fds(fds(3)), |e| {
            matches!(
                e,
                HandoverError::Limit {
                    limit: Limit::ItemFds,
                    ..
                }
            )
        }),
    ];
    for (item, is) in cases {
        let name = item.name.clone();
        let back = refused(link.s.push(item));
        assert!(is(&back.error), "{name}: {}", back.error);
        assert_eq!(back.item.name, name);
    }
    link.s
        .push(Item::new("one", 3, vec![0; 100]).with_fds(fds(2)))
        .unwrap();
    let r = refused(link.s.push(Item::new("two", 3, vec![0; 51])));
    assert!(matches!(
        r.error,
        HandoverError::Limit {
            limit: Limit::TotalPayload,
            ..
        }
    ));
    let r = refused(
        link.s
            .push(Item::new("two", 3, Vec::new()).with_fds(fds(2))),
    );
    assert!(matches!(
        r.error,
        HandoverError::Limit {
            limit: Limit::TotalFds,
            ..
        }
    ));
    assert_eq!(r.item.fds.len(), 2);
    link.s
        .push(Item::new("two", 3, vec![0; 50]).with_fds(fds(1)))
        .unwrap();
    let r = refused(link.s.push(Item::new("three", 3, Vec::new())));
    assert!(matches!(
        r.error,
        HandoverError::Limit {
            limit: Limit::Items,
            ..
        }
    ));
    link.s.end().unwrap();
    assert!(
        matches!(link.receiver_event("received"), ReceiverEvent::Transaction { items, .. } if items.len() == 2)
    );
}

/// A receiver and the raw other end, to send what a [`Sender`] never would.
fn raw_peer(limits: Limits) -> (End, Receiver) {
    let (mut raw, b) = pair().unwrap();
    let mut r = Receiver::new(b, Versions::single(1), limits);
    raw.queue(
        &Frame::Hello {
            versions: Versions::single(1),
            limits: Limits::default(),
        },
        Vec::new(),
    );
    raw.flush().unwrap();
    assert!(matches!(
        r.poll().unwrap(),
        Some(ReceiverEvent::Negotiated(Some(1)))
    ));
    // The receiver's hello.
    assert!(matches!(
        raw.recv().unwrap(),
        Some(Incoming::Frame(Frame::Hello { .. }, _))
    ));
    (raw, r)
}

fn send_raw(raw: &mut End, frames: &[Frame], fds: &[RawFd]) {
    for frame in frames {
        let these = fds.get(..frame.fds()).unwrap_or_default().to_vec();
        raw.queue(frame, these);
    }
    assert!(raw.flush().unwrap());
}

/// Poll the receiver until it reports how the transaction ended (or an
/// error), bounded; a complete transaction is passed over.
fn next(r: &mut Receiver) -> Result<Option<ReceiverEvent>, HandoverError> {
    for _ in 0..10 {
        match r.poll() {
            Ok(None | Some(ReceiverEvent::Transaction { .. })) => {}
            other => return other,
        }
    }
    Ok(None)
}

fn item(name: &str, payload_len: u64, fd_count: u32, fds: u8, chunk: &[u8]) -> Frame {
    Frame::Item {
        name: name.into(),
        version: 1,
        payload_len,
        fd_count,
        fds,
        chunk: chunk.to_vec(),
    }
}

#[test]
fn the_receiver_checks_limits_itself_and_aborts() {
    let limits = Limits {
        max_items: 1,
        max_item_payload: 10,
        max_item_fds: 1,
        ..Limits::default()
    };
    let (_read, write) = pipe();
    let fd = [write.as_raw_fd(), write.as_raw_fd()];
    let cases: Vec<(Vec<Frame>, Limit)> = vec![
        (vec![item("a", 11, 0, 0, &[])], Limit::ItemPayload),
        (vec![item("a", 0, 2, 0, &[])], Limit::ItemFds),
        (
            vec![item("a", 0, 0, 0, &[]), item("b", 0, 0, 0, &[])],
            Limit::Items,
        ),
        (vec![item(&"n".repeat(256), 0, 0, 0, &[])], Limit::NameLen),
    ];
    for (frames, limit) in cases {
        let (mut raw, mut r) = raw_peer(limits);
        let mut all = vec![Frame::Begin { version: 1 }];
        all.extend(frames);
        send_raw(&mut raw, &all, &fd);
        match next(&mut r) {
            Ok(Some(ReceiverEvent::Aborted(HandoverError::Limit { limit: got, .. }))) => {
                assert_eq!(got, limit)
            }
            other => panic!("{limit:?}: {other:?}"),
        }
        // The old generation is told why.
        match raw.recv().unwrap() {
            Some(Incoming::Frame(Frame::Abort { reason }, _)) => {
                assert!(reason.contains("limit"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn frames_out_of_order_are_errors_never_panics() {
    let (_read, write) = pipe();
    let fd = [write.as_raw_fd()];
    let in_tx = |r: Result<Option<ReceiverEvent>, HandoverError>| match r {
        Ok(Some(ReceiverEvent::Aborted(e))) => e,
        other => panic!("{other:?}"),
    };
    let outside = |r: Result<Option<ReceiverEvent>, HandoverError>| r.unwrap_err();
    type Case = (Vec<Frame>, bool, fn(&HandoverError) -> bool);
    let cases: Vec<Case> = vec![
        (vec![Frame::Commit], false, |e| {
            matches!(
                e,
                HandoverError::Unexpected {
                    frame: "commit",
                    ..
                }
            )
        }),
        (vec![Frame::Begin { version: 2 }], false, |e| {
            matches!(e, HandoverError::Version { version: 2, .. })
        }),
        (
            vec![
                Frame::Begin { version: 1 },
                Frame::More {
                    fds: 0,
                    chunk: vec![1],
                },
            ],
            true,
            |e| matches!(e, HandoverError::Unexpected { frame: "more", .. }),
        ),
        (
            vec![Frame::Begin { version: 1 }, Frame::Begin { version: 1 }],
            true,
            |e| matches!(e, HandoverError::Unexpected { frame: "begin", .. }),
        ),
        (
            vec![Frame::Begin { version: 1 }, item("a", 2, 0, 0, &[1, 2, 3])],
            true,
            |e| matches!(e, HandoverError::Inconsistent { .. }),
        ),
        (
            vec![
                Frame::Begin { version: 1 },
                item("a", 2, 0, 0, &[1]),
                Frame::End { items: 1 },
            ],
            true,
            |e| matches!(e, HandoverError::Unexpected { frame: "end", .. }),
        ),
        (
            vec![
                Frame::Begin { version: 1 },
                item("a", 2, 0, 0, &[1]),
                Frame::More {
                    fds: 0,
                    chunk: vec![],
                },
            ],
            true,
            |e| {
                matches!(
                    e,
                    HandoverError::Inconsistent {
                        problem: "empty continuation frame",
                        ..
                    }
                )
            },
        ),
        (
            vec![Frame::Begin { version: 1 }, Frame::End { items: 3 }],
            true,
            |e| matches!(e, HandoverError::Inconsistent { .. }),
        ),
        (
            vec![
                Frame::Begin { version: 1 },
                Frame::End { items: 0 },
                Frame::Commit,
            ],
            true,
            |e| {
                matches!(
                    e,
                    HandoverError::Unexpected {
                        frame: "commit",
                        state: "rebuilding"
                    }
                )
            },
        ),
        (
            vec![
                Frame::Begin { version: 1 },
                item("a", 0, 1, 1, &[]),
                Frame::More {
                    fds: 1,
                    chunk: vec![],
                },
            ],
            true,
            |e| matches!(e, HandoverError::Unexpected { frame: "more", .. }),
        ),
        (
            vec![
                Frame::Begin { version: 1 },
                item("a", 0, 2, 1, &[]),
                Frame::More {
                    fds: 1,
                    chunk: vec![],
                },
                Frame::More {
                    fds: 1,
                    chunk: vec![],
                },
            ],
            true,
            |e| matches!(e, HandoverError::Unexpected { frame: "more", .. }),
        ),
        (
            vec![Frame::Begin { version: 1 }, item("a", 0, 0, 1, &[])],
            true,
            |e| {
                matches!(
                    e,
                    HandoverError::Inconsistent {
                        problem: "more fds than declared",
                        ..
                    }
                )
            },
        ),
    ];
    for (frames, transaction, is) in cases {
        let (mut raw, mut r) = raw_peer(Limits::default());
        send_raw(&mut raw, &frames, &fd);
        let result = next(&mut r);
        let e = if transaction {
            in_tx(result)
        } else {
            outside(result)
        };
        assert!(is(&e), "{frames:?}: {e}");
        assert!(r.is_finished());
    }
    // A frame whose declared fds did not come with it.
    let (mut raw, mut r) = raw_peer(Limits::default());
    raw.queue(&Frame::Begin { version: 1 }, Vec::new());
    raw.queue(&Frame::Prepared, fd.to_vec());
    raw.flush().unwrap();
    assert!(matches!(
        next(&mut r),
        Ok(Some(ReceiverEvent::Aborted(HandoverError::FdCount {
            declared: 0,
            received: 1
        })))
    ));
    // Garbage bytes.
    let (raw, mut r) = raw_peer(Limits::default());
    crate::sys::seqpacket::send(raw.as_fd(), &[0xee, 1, 2], &[]).unwrap();
    assert!(matches!(
        next(&mut r),
        Err(HandoverError::Frame(FrameError::UnknownKind(0xee)))
    ));
    drop(raw);

    // And on the sender's side.
    let (a, mut raw) = pair().unwrap();
    let mut s = Sender::new(a, Versions::single(1), Limits::default());
    send_raw(
        &mut raw,
        &[Frame::Hello {
            versions: Versions::single(1),
            limits: Limits::default(),
        }],
        &[],
    );
    assert!(matches!(
        s.poll().unwrap(),
        Some(SenderEvent::Negotiated(Some(1)))
    ));
    s.begin().unwrap();
    s.push(Item::new("a", 1, Vec::new())).unwrap();
    send_raw(&mut raw, &[Frame::Prepared], &[]);
    match (0..10).find_map(|_| s.poll().unwrap()) {
        Some(SenderEvent::Aborted {
            cause: HandoverError::Unexpected {
                frame: "prepared", ..
            },
            items,
        }) => {
            assert_eq!(items.len(), 1)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_inherited_end_must_be_a_seqpacket_socket() {
    let (read, _write) = pipe();
    assert!(End::from_fd(read).is_err());
    let (a, _b) = pair().unwrap();
    let fd = a.into_fd();
    nix::fcntl::fcntl(
        fd.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .unwrap();
    let end = End::from_fd(fd).unwrap();
    assert!(crate::sys::is_nonblocking(end.as_fd()).unwrap());
    assert!(crate::sys::is_cloexec(end.as_fd()).unwrap());
}

/// Set in the environment of the child that [`emfile_on_receive_aborts_cleanly`]
/// starts: this process then runs [`emfile_child`] with its own low fd limit.
const EMFILE_CHILD: &str = "BATON_TEST_HANDOVER_EMFILE_CHILD";
/// Fds in the item the child cannot take.
const EMFILE_FDS: usize = 40;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn wait_readable(fd: std::os::fd::BorrowedFd<'_>) {
    assert!(
        crate::sys::wait_readable(fd, Duration::from_secs(30)).unwrap(),
        "no message in 30 s"
    );
}

/// The receiving side under `EMFILE`, in a child process whose fd limit is
/// lowered (a process-wide change no parallel test may see). Its end is
/// its stdin. Does nothing in a normal test run.
#[test]
fn emfile_child() {
    if std::env::var_os(EMFILE_CHILD).is_none() {
        return;
    }
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().unwrap();
    let mut r = Receiver::new(
        End::from_fd(stdin).unwrap(),
        Versions::single(1),
        Limits::default(),
    );
    let negotiated = loop {
        match r.poll().unwrap() {
            Some(event) => break event,
            None => wait_readable(r.as_fd()),
        }
    };
    assert!(
        matches!(negotiated, ReceiverEvent::Negotiated(Some(1))),
        "{negotiated:?}"
    );
    // Room for three more fds, not for the item's: the kernel installs
    // what it can and drops the rest (MSG_CTRUNC). Fds at or above the
    // limit stay open; only new ones must be below it.
    let open: std::collections::HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    let limit = (0..).filter(|fd| !open.contains(fd)).nth(3).unwrap();
    let before = open_fds();
    let (_, hard) = crate::sys::nofile_limit().unwrap();
    crate::sys::set_nofile_soft_limit(limit, hard).unwrap();
    let event = loop {
        match r.poll() {
            Ok(Some(event)) => break event,
            Ok(None) => wait_readable(r.as_fd()),
            Err(e) => panic!("outside a transaction: {e}"),
        }
    };
    match event {
        ReceiverEvent::Aborted(HandoverError::OutOfFds(e)) => {
            assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // Nothing leaked: every fd the kernel did install was closed.
    assert_eq!(open_fds(), before);
    println!("emfile child: clean abort, {before} fds before and after");
}

#[test]
fn emfile_on_receive_aborts_cleanly() {
    let (a, b) = pair().unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "handover::tests::emfile_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(EMFILE_CHILD, "1")
        .stdin(std::process::Stdio::from(b.into_fd()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut s = Sender::new(a, Versions::single(1), Limits::default());
    let next = |s: &mut Sender| loop {
        match s.poll() {
            Ok(Some(event)) => return Ok(event),
            Ok(None) => wait_readable(s.as_fd()),
            Err(e) => return Err(e),
        }
    };
    let negotiated = next(&mut s);
    assert!(
        matches!(negotiated, Ok(SenderEvent::Negotiated(Some(1)))),
        "{negotiated:?}"
    );
    let (_read, write) = pipe();
    let fds = (0..EMFILE_FDS).map(|_| write.try_clone().unwrap());
    s.begin().unwrap();
    s.push(Item::new("conn", 1, b"state".to_vec()).with_fds(fds))
        .unwrap();
    s.end().unwrap();
    let event = next(&mut s);
    let output = child.wait_with_output().unwrap();
    let report = format!(
        "child {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("clean abort"),
        "{report}"
    );
    match event {
        Ok(SenderEvent::Aborted {
            cause: HandoverError::PeerAborted(reason),
            items,
        }) => {
            assert!(reason.contains("out of file descriptors"), "{reason}");
            assert_eq!(items[0].fds.len(), EMFILE_FDS);
        }
        other => panic!("{other:?}\n{report}"),
    }
}
