//! The event loop end to end: real sockets on loopback, real child
//! processes (`/bin/sh -c`), a real control socket, and waits bounded by
//! poll timeouts, never sleeps.
//!
//! What the lifecycle decides (refusals, the stop during a drain, the
//! watch) is tested in `baton_core::lifecycle` too; here it is checked
//! that baton-mio registers what the lifecycle watches, turns its events
//! into the application's, and serves the control socket.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use super::*;

/// Bound on waiting for one event.
const WAIT: Duration = Duration::from_secs(10);

/// A poll loop with a baton in it, as an application would run it.
struct Loop {
    poll: Poll,
    events: Events,
    baton: Baton,
    /// Events seen while waiting for something else.
    seen: VecDeque<Event>,
}

impl Loop {
    /// Signals are left alone: handlers are process-wide, and tests run
    /// in parallel; only `signals_upgrade_and_stop` installs them.
    fn new(config: Config) -> Loop {
        Loop::with(config.handle_signals(false))
    }

    fn with(config: Config) -> Loop {
        let poll = Poll::new().unwrap();
        // Not at 0, to check that the token range is honoured.
        let baton = Baton::new(config, poll.registry(), Token(100)).unwrap();
        Loop {
            poll,
            events: Events::with_capacity(64),
            baton,
            seen: VecDeque::new(),
        }
    }

    fn listen(&mut self) -> (ListenerId, SocketAddr) {
        let id = self
            .baton
            .listen("http", &"127.0.0.1:0".parse().unwrap())
            .unwrap();
        let addr = match self.baton.listener(id) {
            Some(Listener::Tcp(l)) => l.local_addr().unwrap(),
            other => panic!("not a TCP listener: {other:?}"),
        };
        (id, addr)
    }

    /// Connect a client to listener `id` at `addr`, announced and accepted:
    /// the client's end, the server's end and its guard.
    fn connect(&mut self, id: ListenerId, addr: SocketAddr) -> (TcpStream, Stream, Connection) {
        let client = TcpStream::connect(addr).unwrap();
        assert!(matches!(self.next(), Event::Accept { listener } if listener == id));
        let (stream, conn) = self.baton.accept(id).expect("a connection");
        (client, stream, conn)
    }

    /// One turn of the loop, blocking as long as baton says it may (at
    /// most until `deadline`). Checks that tokens outside baton's range
    /// never appear.
    fn turn(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "nothing within {WAIT:?}: {:?}", self.baton);
        let timeout = self.baton.next_timeout().map_or(left, |t| t.min(left));
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            result => result.unwrap(),
        }
        for event in self.events.iter() {
            assert!(self.baton.owns(event.token()), "{event:?}");
        }
        self.baton.process(&self.events);
        while let Some(event) = self.baton.next_event() {
            self.seen.push_back(event);
        }
    }

    /// The next event (within `WAIT`).
    fn next(&mut self) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(event) = self.seen.pop_front() {
                return event;
            }
            self.turn(deadline);
        }
    }

    /// Run the loop until `done` (within `WAIT`).
    fn until(&mut self, mut done: impl FnMut(&Loop) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            self.turn(deadline);
        }
    }

    /// Send `command` on the control socket at `path` from another thread
    /// while the loop runs, and return the answer.
    fn ask(&mut self, path: &Path, command: &str) -> String {
        let answer = self.ask_later(path, command);
        self.answer(&answer)
    }

    /// Send `command` from another thread; the thread sends the answer
    /// back, then wakes the loop.
    fn ask_later(&self, path: &Path, command: &str) -> mpsc::Receiver<String> {
        let waker = self.baton.waker();
        let client = baton_core::control::Client::new(path).timeout(WAIT);
        let command = command.to_owned();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let answer = client.request(&command);
            let _ = tx.send(answer.unwrap_or_else(|e| format!("client error: {e}")));
            waker.wake().unwrap();
        });
        rx
    }

    /// Run the loop until `answer` comes.
    fn answer(&mut self, answer: &mpsc::Receiver<String>) -> String {
        let mut got = None;
        self.until(|_| {
            got = got.take().or_else(|| answer.try_recv().ok());
            got.is_some()
        });
        got.unwrap()
    }

    /// True while an upgrade is pending (its fds are watched).
    fn upgrading(&self) -> bool {
        !self.baton.lifecycle.watched().upgrade.is_empty()
    }
}

/// A control socket path in a fresh directory.
fn control_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-mio-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("control.sock")
}

/// An upgrade to `sh -c SCRIPT`, reporting within `timeout`.
fn upgrading_to(script: &str, timeout: Duration) -> Config {
    Config::default()
        .upgrade_timeout(timeout)
        .program("/bin/sh")
        .args(vec!["sh".into(), "-c".into(), script.into()])
}

/// The script of a next generation that reports ready, then `rest`.
fn ready_then(rest: &str) -> String {
    format!("printf 1 >&$BATON_READY_FD; {rest}")
}

#[test]
fn a_connection_is_announced_accepted_and_tracked() {
    let mut lp = Loop::new(Config::default());
    let (id, addr) = lp.listen();
    assert_eq!(id.index(), 0);
    lp.baton.ready().unwrap();
    assert_eq!(lp.baton.next_timeout(), None, "idle: block until an event");
    let (_client, _stream, conn) = lp.connect(id, addr);
    assert_eq!(lp.baton.tracker().open(), 1);
    assert!(!conn.is_draining());
    assert!(lp.baton.accept(id).is_none(), "queue empty");
    assert!(!lp.baton.owns(Token(99)) && !lp.baton.owns(Token(100 + TOKENS)));
}

#[test]
fn a_control_upgrade_to_a_child_that_reports_ready_stops_this_generation() {
    // The listener, then the control socket, so the readiness fd is 5; the
    // script checks the protocol.
    let script = r#"[ "$LISTEN_FDS" = 2 ] && [ "$LISTEN_FDNAMES" = http:control ] && [ "$BATON_READY_FD" = 5 ] && [ "$BATON_GENERATION" = 1 ] && printf 1 >&5"#;
    let path = control_path("ready");
    let mut lp = Loop::new(upgrading_to(script, WAIT).control(&path));
    let (id, _) = lp.listen();
    lp.baton.ready().unwrap();
    let answer = lp.ask(&path, "upgrade");
    let upgraded = baton_core::control::parse_outcome(&answer).expect(&answer);
    assert_eq!(upgraded.generation, 1, "{answer}");
    assert!(matches!(
        lp.next(),
        Event::Stop {
            reason: StopReason::Upgraded
        }
    ));
    assert!(lp.baton.is_stopping());
    assert!(lp.baton.listener(id).is_none(), "listener closed at stop");
    assert!(lp.baton.accept(id).is_none());
    // The child exited 0 after its report: it is not made up for.
    match lp.next() {
        // The control connection that asked was open at the stop, and
        // was answered before it closed.
        Event::Drained(report) => assert_eq!((report.open_at_start, report.finished), (1, 1)),
        other => panic!("expected the drain to end: {other:?}"),
    }
    assert_eq!(lp.baton.next_timeout(), None, "nothing more");
}

#[test]
fn an_upgrade_to_a_child_that_exits_fails_and_serving_goes_on() {
    let path = control_path("exits");
    let mut lp = Loop::new(upgrading_to("exit 3", WAIT).control(&path));
    let (id, addr) = lp.listen();
    lp.baton.ready().unwrap();
    let answer = lp.ask(&path, "upgrade");
    assert!(
        answer.starts_with("error new process ")
            && answer.contains("exited before reporting ready"),
        "{answer}"
    );
    assert!(!lp.baton.is_stopping());
    let _client = TcpStream::connect(addr).unwrap();
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
    // A failed upgrade does not block the next one.
    let answer = lp.ask(&path, "upgrade");
    assert!(answer.starts_with("error new process "), "{answer}");
    let status = lp.ask(&path, "status");
    assert!(status.contains("backend: mio\n"), "{status}");
    assert!(
        status.contains("last upgrade: error new process "),
        "{status}"
    );
}

#[test]
fn an_upgrade_that_does_not_report_in_time_fails_and_one_meanwhile_is_refused() {
    let timeout = Duration::from_millis(300);
    let path = control_path("timeout");
    let mut lp = Loop::new(upgrading_to("exec sleep 30", timeout).control(&path));
    lp.listen();
    lp.baton.ready().unwrap();
    lp.baton.upgrade();
    assert!(lp.upgrading());
    let wait = lp.baton.next_timeout().expect("the upgrade deadline");
    assert!(wait <= timeout, "{wait:?}");
    let refused = lp.ask(&path, "upgrade");
    assert!(
        refused.starts_with("error an upgrade is already running"),
        "{refused}"
    );
    lp.until(|lp| !lp.upgrading());
    let status = lp.ask(&path, "status");
    assert!(status.contains("did not report ready within"), "{status}");
    assert!(!lp.baton.is_stopping());
    // Nothing pending any more, once the killed child is reaped (retried
    // every 50 ms until it is: on a busy machine it can take a while).
    lp.until(|lp| lp.baton.next_timeout().is_none());
}

#[test]
fn a_stop_during_an_upgrade_abandons_it() {
    let path = control_path("abandon");
    let mut lp = Loop::new(upgrading_to("exec sleep 30", WAIT).control(&path));
    lp.listen();
    lp.baton.ready().unwrap();
    let client = lp.ask_later(&path, "upgrade");
    lp.until(|lp| lp.upgrading());
    lp.baton.stop();
    assert!(matches!(
        lp.next(),
        Event::Stop {
            reason: StopReason::Shutdown
        }
    ));
    assert_eq!(lp.answer(&client), "error the server is stopping\n");
    assert!(matches!(lp.next(), Event::Drained(_)));
}

#[test]
fn a_stop_from_another_thread_wakes_the_loop() {
    let mut lp = Loop::new(Config::default());
    lp.listen();
    lp.baton.ready().unwrap();
    let stop = lp.baton.stop_token();
    let stopper = std::thread::spawn(move || stop.stop());
    // Baton has no deadline, so only the waker can end this poll early.
    assert!(matches!(lp.next(), Event::Stop { .. }));
    stopper.join().unwrap();
    assert!(matches!(lp.next(), Event::Drained(_)));
}

#[test]
fn a_control_stop_is_answered_then_drains() {
    let path = control_path("stop");
    let mut lp = Loop::new(Config::default().control(&path));
    lp.listen();
    lp.baton.ready().unwrap();
    assert_eq!(lp.ask(&path, "bogus").lines().count(), 1);
    assert_eq!(lp.ask(&path, "stop"), "ok stopping\n");
    assert!(matches!(
        lp.next(),
        Event::Stop {
            reason: StopReason::Shutdown
        }
    ));
    match lp.next() {
        // The control connection was tracked, and answered: finished.
        Event::Drained(report) => assert_eq!(report.forced, 0, "{report:?}"),
        other => panic!("expected the drain to end: {other:?}"),
    }
}

#[test]
fn the_drain_closes_idle_then_forces_what_is_still_busy_at_its_deadline() {
    let config = Config::default()
        .idle_grace(Duration::from_millis(20))
        .drain_timeout(Duration::from_millis(100));
    let mut lp = Loop::new(config);
    let (id, addr) = lp.listen();
    let (_client, _stream, mut conn) = lp.connect(id, addr);
    conn.set_busy();
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::Stop { .. }));
    assert!(conn.is_draining());
    assert!(matches!(lp.next(), Event::CloseIdle));
    assert!(matches!(lp.next(), Event::ForceClose));
    assert!(lp.baton.tracker().is_forced());
    drop(conn);
    match lp.next() {
        Event::Drained(report) => {
            assert_eq!((report.open_at_start, report.forced), (1, 1), "{report:?}")
        }
        other => panic!("expected the drain to end: {other:?}"),
    }
}

/// Issue 12 item 3: a stop during the drain ends it at once.
#[test]
fn a_stop_during_the_drain_forces_at_once() {
    let mut lp = Loop::new(Config::default().drain_timeout(WAIT * 10));
    let (id, addr) = lp.listen();
    let (_client, _stream, mut conn) = lp.connect(id, addr);
    conn.set_busy();
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::Stop { .. }));
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::ForceClose));
    drop(conn);
    assert!(matches!(lp.next(), Event::Drained(report) if report.forced == 1));
}

#[test]
fn an_accept_error_pauses_the_listener_instead_of_spinning() {
    let mut lp = Loop::new(Config::default());
    let (id, _) = lp.listen();
    // A listening socket shut down fails every accept with EINVAL, as a
    // process out of fds fails every accept with EMFILE.
    match lp.baton.listener(id) {
        Some(Listener::Tcp(l)) => socket2::SockRef::from(l)
            .shutdown(std::net::Shutdown::Both)
            .unwrap(),
        other => panic!("not a TCP listener: {other:?}"),
    }
    assert!(lp.baton.accept(id).is_none(), "accept fails");
    assert!(lp.baton.listeners[id.0].paused_until.is_some(), "paused");
    let wait = lp.baton.next_timeout().expect("the back-off deadline");
    assert!(wait <= ACCEPT_BACKOFF, "{wait:?}");
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
    assert!(lp.baton.accept(id).is_none());
    assert!(
        lp.baton.listeners[id.0].paused_until.is_some(),
        "still failing: paused again"
    );
}

#[test]
fn a_back_off_that_passed_before_process_still_wakes_the_loop() {
    let mut lp = Loop::new(Config::default());
    let (id, _) = lp.listen();
    // The back-off ends between one `process` and the next `next_timeout`
    // (the application handled events meanwhile): the loop must not block
    // "until an event", or the listener stays paused while clients wait.
    lp.baton.listeners[id.0].paused_until = Some(Instant::now());
    assert_eq!(lp.baton.next_timeout(), Some(Duration::ZERO));
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
}

#[test]
fn at_max_connections_accepting_waits_for_a_close() {
    let mut lp = Loop::new(Config::default().max_connections(1));
    let (id, addr) = lp.listen();
    let _a = TcpStream::connect(addr).unwrap();
    let _b = TcpStream::connect(addr).unwrap();
    assert!(matches!(lp.next(), Event::Accept { .. }));
    let first = lp.baton.accept(id).expect("a connection");
    assert!(lp.baton.accept(id).is_none(), "at the limit");
    assert_eq!(lp.baton.next_timeout(), None, "held: block until a close");
    drop(first);
    assert_eq!(lp.baton.next_timeout(), Some(Duration::ZERO));
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
    assert!(lp.baton.accept(id).is_some(), "the client that waited");
}

/// SIGHUP upgrades, SIGTERM stops (abandoning the upgrade), and a SIGTERM
/// after the stop is not dropped: it ends the drain (issue 12 item 9).
#[test]
fn signals_upgrade_and_stop() {
    let mut lp = Loop::with(upgrading_to("exec sleep 30", WAIT).drain_timeout(WAIT * 10));
    let (id, addr) = lp.listen();
    lp.baton.ready().unwrap();
    let (_client, _stream, mut conn) = lp.connect(id, addr);
    conn.set_busy();
    signal_hook::low_level::raise(libc::SIGHUP).unwrap();
    lp.until(|lp| lp.upgrading());
    signal_hook::low_level::raise(libc::SIGTERM).unwrap();
    assert!(matches!(
        lp.next(),
        Event::Stop {
            reason: StopReason::Shutdown
        }
    ));
    assert!(!lp.upgrading(), "abandoned");
    signal_hook::low_level::raise(libc::SIGTERM).unwrap();
    assert!(matches!(lp.next(), Event::ForceClose));
    drop(conn);
    assert!(matches!(lp.next(), Event::Drained(_)));
}

#[test]
fn a_flood_of_connections_is_accepted_in_batches() {
    let mut lp = Loop::new(Config::default());
    let (id, addr) = lp.listen();
    let extra = 5;
    let _clients: Vec<TcpStream> = (0..ACCEPT_BATCH + extra)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let accept_all = |lp: &mut Loop| {
        assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
        let mut accepted = Vec::new();
        while let Some(conn) = lp.baton.accept(id) {
            accepted.push(conn);
        }
        accepted
    };
    let first = accept_all(&mut lp);
    assert_eq!(first.len(), ACCEPT_BATCH);
    assert_eq!(
        lp.baton.next_timeout(),
        Some(Duration::ZERO),
        "the rest is announced on the next turn"
    );
    let second = accept_all(&mut lp);
    assert_eq!(second.len(), extra);
    assert_eq!(lp.baton.next_timeout(), None, "all accepted: block");
    assert_eq!(lp.baton.tracker().open(), ACCEPT_BATCH + extra);
}

#[test]
fn the_old_generation_serves_again_if_the_new_one_dies_while_it_drains() {
    let path = control_path("resume");
    let mut lp = Loop::new(upgrading_to(&ready_then("exit 7"), WAIT).control(&path));
    let (id, addr) = lp.listen();
    let udp = lp
        .baton
        .datagram("udp", "127.0.0.1:0".parse().unwrap())
        .unwrap();
    lp.baton.ready().unwrap();
    lp.baton.upgrade();
    // The sockets closed at the stop may be open again already: the new
    // generation can die before this loop looks (checked at the stop in
    // `a_control_upgrade_to_a_child_that_reports_ready_stops_this_generation`).
    assert!(matches!(lp.next(), Event::Stop { .. }));
    assert!(matches!(lp.next(), Event::Resumed));
    assert!(!lp.baton.is_stopping());
    assert!(lp.baton.listener(id).is_some(), "listener reopened");
    assert!(
        lp.baton.datagram_socket(udp).is_some(),
        "datagram socket reopened"
    );
    let _client = TcpStream::connect(addr).unwrap();
    let accepted = loop {
        if let Event::Accept { listener } = lp.next() {
            assert_eq!(listener, id);
            break lp.baton.accept(id);
        }
    };
    assert!(accepted.is_some());
    let status = lp.ask(&path, "status");
    assert!(
        status.contains("generation: 0\n"),
        "the control socket serves again: {status}"
    );
    // A second stop drains as the first would have.
    lp.baton.stop();
    loop {
        match lp.next() {
            Event::Stop { .. } => break,
            Event::Accept { .. } | Event::Datagram { .. } => {}
            other => panic!("expected the stop: {other:?}"),
        }
    }
}

/// A stop is sticky: once asked to stop, a generation does not serve again
/// when its successor dies.
#[test]
fn no_resume_after_a_stop() {
    let path = control_path("sticky");
    let mut lp = Loop::new(
        upgrading_to(&ready_then("exec sleep 30"), WAIT)
            .control(&path)
            .successor_watch(WAIT * 10)
            .drain_timeout(WAIT * 10),
    );
    let (id, addr) = lp.listen();
    lp.baton.ready().unwrap();
    let (_client, _stream, mut conn) = lp.connect(id, addr);
    conn.set_busy();
    let answer = lp.ask(&path, "upgrade");
    let upgraded = baton_core::control::parse_outcome(&answer).expect(&answer);
    assert!(matches!(
        lp.next(),
        Event::Stop {
            reason: StopReason::Upgraded
        }
    ));
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::ForceClose));
    drop(conn);
    let killed = std::process::Command::new("kill")
        .arg(upgraded.pid.to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    match lp.next() {
        Event::Drained(_) => {}
        other => panic!("a stopped generation must not serve again: {other:?}"),
    }
    assert!(lp.baton.listener(id).is_none());
}

#[test]
fn the_drain_waits_out_the_watch_on_a_new_generation_that_lives() {
    let watch = Duration::from_millis(200);
    let path = control_path("watch");
    let config = upgrading_to(&ready_then("exec sleep 30"), WAIT)
        .successor_watch(watch)
        .control(&path);
    let mut lp = Loop::new(config);
    lp.listen();
    lp.baton.ready().unwrap();
    let started = Instant::now();
    let answer = lp.ask_later(&path, "upgrade");
    assert!(matches!(lp.next(), Event::Stop { .. }));
    let wait = lp.baton.next_timeout().expect("the end of the watch");
    assert!(
        !wait.is_zero() && wait <= watch,
        "{wait:?}: block until then"
    );
    assert!(matches!(lp.next(), Event::Drained(_)));
    assert!(
        started.elapsed() >= watch,
        "reported before the watch ended"
    );
    let answer = answer.recv().unwrap();
    let upgraded = baton_core::control::parse_outcome(&answer).expect(&answer);
    let killed = std::process::Command::new("kill")
        .arg(upgraded.pid.to_string())
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn a_new_generation_that_exits_cleanly_is_not_replaced() {
    // Exit 0 is what a generation does after handing over in turn, or when
    // stopped on purpose: the old one must not serve beside the newest.
    let mut lp = Loop::new(upgrading_to(&ready_then("exit 0"), WAIT).successor_watch(WAIT));
    let (id, _) = lp.listen();
    lp.baton.ready().unwrap();
    lp.baton.upgrade();
    assert!(matches!(lp.next(), Event::Stop { .. }));
    assert!(matches!(lp.next(), Event::Drained(_)));
    assert!(lp.baton.is_stopping());
    assert!(lp.baton.listener(id).is_none());
}

/// A connection offered for a move, as an application saves it.
fn offer(stream: Stream, conn: Connection, registry: &Registry) {
    let fd = stream.into_fd(registry).unwrap();
    conn.offer(handover::Item::new("chat", 1, b"3 ann\n".to_vec()).with_fds([fd]));
}

#[test]
fn an_offer_while_no_move_is_open_comes_back_on_the_next_turn() {
    let config = Config::default().state_versions(handover::Versions::single(1));
    let mut lp = Loop::new(config);
    let (id, addr) = lp.listen();
    lp.baton.move_connections(["chat"]);
    lp.baton.ready().unwrap();
    let (mut client, stream, conn) = lp.connect(id, addr);
    assert_eq!(conn.can_move(), None, "no upgrade: no move");
    // Never registered: into_fd has nothing to deregister.
    offer(stream, conn, lp.poll.registry());
    // Offered from the application's code, after `process`: the loop
    // must not block until some unrelated event.
    assert_eq!(lp.baton.next_timeout(), Some(Duration::ZERO));
    let Event::Unmoved(mut offers) = lp.next() else {
        panic!("expected the offer back");
    };
    assert_eq!(offers.len(), 1);
    let Offer { mut item, conn } = offers.remove(0);
    assert_eq!(
        (item.name.as_str(), &item.payload[..]),
        ("chat", &b"3 ann\n"[..])
    );
    assert_eq!(lp.baton.tracker().open(), 1, "its guard came back with it");
    // The same client socket, whole.
    let mut stream = Stream::from_moved(&mut item).unwrap();
    stream.write_all(b"back\n").unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = [0u8; 5];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"back\n");
    drop(conn);
    assert_eq!(lp.baton.tracker().open(), 0);
}

#[test]
fn an_offer_that_comes_back_after_the_force_is_closed_by_baton() {
    let config = Config::default().drain_timeout(WAIT * 10);
    let mut lp = Loop::new(config.state_versions(handover::Versions::single(1)));
    let (id, addr) = lp.listen();
    lp.baton.move_connections(["chat"]);
    let (_client, stream, mut conn) = lp.connect(id, addr);
    conn.set_busy();
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::Stop { .. }));
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::ForceClose));
    offer(stream, conn, lp.poll.registry());
    // Not handed back to an application that closed everything.
    match lp.next() {
        Event::Drained(report) => assert_eq!(report.forced, 1, "{report:?}"),
        other => panic!("expected the drain to end: {other:?}"),
    }
}

#[test]
fn into_fd_deregisters_the_stream() {
    let poll = Poll::new().unwrap();
    let registry = poll.registry();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let streams = [
        Stream::Tcp(mio::net::TcpStream::from_std(tcp)),
        Stream::Unix(mio::net::UnixStream::from_std(unix)),
    ];
    for mut stream in streams {
        registry
            .register(&mut stream, Token(7), Interest::READABLE)
            .unwrap();
        let raw = match &stream {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        // epoll holds one registration per fd: a second one fails while
        // the first is there.
        let again = registry.register(&mut SourceFd(&raw), Token(8), Interest::READABLE);
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let fd = stream.into_fd(registry).unwrap();
        assert_eq!(fd.as_raw_fd(), raw);
        registry
            .register(&mut SourceFd(&raw), Token(8), Interest::READABLE)
            .expect("deregistered");
        registry.deregister(&mut SourceFd(&raw)).unwrap();
    }
}

#[test]
fn from_moved_makes_a_tcp_or_unix_stream_of_the_items_one_fd() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (tcp, _) = listener.accept().unwrap();
    let (unix, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let item = |fd: std::os::fd::OwnedFd| handover::Item::new("chat", 1, Vec::new()).with_fds([fd]);
    let mut moved = item(tcp.into());
    match Stream::from_moved(&mut moved) {
        Ok(Stream::Tcp(mut s)) => {
            assert!(s.nodelay().unwrap(), "no Nagle delay, as accepted ones");
            s.write_all(b"tcp").unwrap();
        }
        other => panic!("expected a TCP stream: {other:?}"),
    }
    assert!(moved.fds.is_empty(), "the fd was taken");
    assert!(Stream::from_moved(&mut moved).is_err(), "no fd left");
    match Stream::from_moved(&mut item(unix.into())) {
        Ok(Stream::Unix(mut s)) => s.write_all(b"unix").unwrap(),
        other => panic!("expected a Unix stream: {other:?}"),
    }
    client.set_read_timeout(Some(WAIT)).unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = [0u8; 4];
    client.read_exact(&mut got[..3]).unwrap();
    assert_eq!(&got[..3], b"tcp");
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"unix");
}
