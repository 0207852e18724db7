//! The event loop end to end: real sockets on loopback, real child
//! processes (`/bin/sh -c`), and waits bounded by poll timeouts, never
//! sleeps.

use std::net::TcpStream;
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
}

impl Loop {
    fn new(config: Config) -> Loop {
        let poll = Poll::new().unwrap();
        // Not at 0, to check that the token range is honoured.
        let baton = Baton::new(config, poll.registry(), Token(100)).unwrap();
        Loop {
            poll,
            events: Events::with_capacity(64),
            baton,
        }
    }

    /// An upgrade to `sh -c SCRIPT`, reporting within `timeout`.
    fn upgrading_to(script: &str, timeout: Duration) -> Loop {
        let config = Config::default()
            .upgrade_timeout(timeout)
            .program("/bin/sh")
            .args(vec!["sh".into(), "-c".into(), script.into()]);
        Loop::new(config)
    }

    fn listen(&mut self) -> (ListenerId, std::net::SocketAddr) {
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

    /// The next event, polling as long as baton says it may block (within
    /// `WAIT`). Also checks that every poll had a timeout or something to
    /// wake it, and that tokens outside baton's range never appear.
    fn next(&mut self) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(event) = self.baton.next_event() {
                return event;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no event within {WAIT:?}: {:?}",
                self.baton
            );
            let timeout = self.baton.next_timeout().map_or(left, |t| t.min(left));
            match self.poll.poll(&mut self.events, Some(timeout)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => result.unwrap(),
            }
            for event in self.events.iter() {
                assert!(self.baton.owns(event.token()), "{event:?}");
            }
            self.baton.process(&self.events);
        }
    }
}

#[test]
fn a_connection_is_announced_accepted_and_tracked() {
    let mut lp = Loop::new(Config::default());
    let (id, addr) = lp.listen();
    assert_eq!(id.index(), 0);
    assert_eq!(lp.baton.next_timeout(), None, "idle: block until an event");
    let _client = TcpStream::connect(addr).unwrap();
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
    let (_stream, conn) = lp.baton.accept(id).unwrap().expect("a connection");
    assert_eq!(lp.baton.tracker().open(), 1);
    assert!(!conn.is_draining());
    assert!(lp.baton.accept(id).unwrap().is_none(), "queue empty");
    assert!(!lp.baton.owns(Token(99)) && !lp.baton.owns(Token(100 + TOKENS)));
}

#[test]
fn an_upgrade_to_a_child_that_reports_ready_stops_this_generation() {
    // One listener, so the readiness fd is 4; the script checks the protocol.
    let script = r#"[ "$LISTEN_FDS" = 1 ] && [ "$LISTEN_FDNAMES" = http ] && [ "$BATON_READY_FD" = 4 ] && [ "$BATON_GENERATION" = 1 ] && printf 1 >&4"#;
    let mut lp = Loop::upgrading_to(script, WAIT);
    let (id, _) = lp.listen();
    let pid = lp.baton.start_upgrade().unwrap();
    match lp.next() {
        Event::UpgradeDone(Ok(upgraded)) => {
            assert_eq!((upgraded.pid, upgraded.generation), (pid, 1));
        }
        other => panic!("expected the upgrade to succeed: {other:?}"),
    }
    assert!(matches!(
        lp.next(),
        Event::Stop {
            reason: StopReason::Upgraded
        }
    ));
    assert!(lp.baton.listener(id).is_none(), "listener closed at stop");
    assert!(lp.baton.accept(id).unwrap().is_none());
    assert!(matches!(
        lp.baton.start_upgrade(),
        Err(UpgradeError::Stopping)
    ));
    lp.baton.drain(WAIT);
    match lp.next() {
        Event::Drained(report) => assert_eq!(report, DrainReport::default()),
        other => panic!("expected the drain to end: {other:?}"),
    }
}

#[test]
fn an_upgrade_to_a_child_that_exits_fails_and_serving_goes_on() {
    let mut lp = Loop::upgrading_to("exit 3", WAIT);
    let (id, addr) = lp.listen();
    let pid = lp.baton.start_upgrade().unwrap();
    assert!(matches!(
        lp.baton.start_upgrade(),
        Err(UpgradeError::AlreadyRunning { pid: running }) if running == pid
    ));
    match lp.next() {
        Event::UpgradeDone(Err(UpgradeError::ChildExited { pid: child, status })) => {
            assert_eq!(child, pid);
            assert_eq!(status, baton_core::ExitStatus::Exited(3));
        }
        other => panic!("expected the upgrade to fail: {other:?}"),
    }
    assert!(!lp.baton.is_stopped());
    let _client = TcpStream::connect(addr).unwrap();
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
    // A failed upgrade does not block the next one.
    let _pid = lp.baton.start_upgrade().unwrap();
    assert!(matches!(lp.next(), Event::UpgradeDone(Err(_))));
}

#[test]
fn an_upgrade_that_does_not_report_in_time_fails() {
    let timeout = Duration::from_millis(200);
    let mut lp = Loop::upgrading_to("exec sleep 30", timeout);
    lp.listen();
    let pid = lp.baton.start_upgrade().unwrap();
    let wait = lp.baton.next_timeout().expect("the upgrade deadline");
    assert!(wait <= timeout, "{wait:?}");
    match lp.next() {
        Event::UpgradeDone(Err(UpgradeError::Timeout { pid: child, .. })) => assert_eq!(child, pid),
        other => panic!("expected a timeout: {other:?}"),
    }
    assert!(!lp.baton.is_stopped());
    assert_eq!(lp.baton.next_timeout(), None, "nothing pending any more");
}

#[test]
fn a_stop_during_an_upgrade_abandons_it() {
    let mut lp = Loop::upgrading_to("exec sleep 30", WAIT);
    lp.listen();
    lp.baton.start_upgrade().unwrap();
    lp.baton.stop();
    assert!(matches!(
        lp.next(),
        Event::UpgradeDone(Err(UpgradeError::Stopping))
    ));
    assert!(matches!(
        lp.next(),
        Event::Stop {
            reason: StopReason::Shutdown
        }
    ));
}

#[test]
fn a_stop_from_another_thread_wakes_the_loop() {
    let mut lp = Loop::new(Config::default());
    lp.listen();
    let stop = lp.baton.stop_token();
    let stopper = std::thread::spawn(move || stop.stop());
    // Baton has no deadline, so only the waker can end this poll early.
    assert!(matches!(lp.next(), Event::Stop { .. }));
    stopper.join().unwrap();
}

#[test]
fn the_drain_forces_what_is_still_busy_at_its_deadline() {
    let mut lp = Loop::new(Config::default());
    let (id, addr) = lp.listen();
    let _client = TcpStream::connect(addr).unwrap();
    assert!(matches!(lp.next(), Event::Accept { .. }));
    let (_stream, mut conn) = lp.baton.accept(id).unwrap().expect("a connection");
    conn.set_busy();
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::Stop { .. }));
    assert!(conn.is_draining());
    lp.baton.drain(Duration::from_millis(50));
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
    let error = lp.baton.accept(id).expect_err("accept fails");
    assert_eq!(error.raw_os_error(), Some(libc::EINVAL), "{error}");
    assert!(lp.baton.accept(id).unwrap().is_none(), "paused");
    let wait = lp.baton.next_timeout().expect("the back-off deadline");
    assert!(wait <= ACCEPT_BACKOFF, "{wait:?}");
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
    assert!(lp.baton.accept(id).is_err(), "still failing: paused again");
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
fn signals_become_events() {
    let mut lp = Loop::new(Config::default());
    lp.baton.handle_signals().unwrap();
    signal_hook::low_level::raise(SIGHUP).unwrap();
    assert!(matches!(lp.next(), Event::Upgrade));
    signal_hook::low_level::raise(SIGTERM).unwrap();
    assert!(matches!(lp.next(), Event::Shutdown));
    assert!(!lp.baton.is_stopped(), "the application decides");
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
        while let Some(conn) = lp.baton.accept(id).unwrap() {
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

/// The script of a next generation that reports ready, then `rest`.
fn ready_then(rest: &str) -> String {
    format!("printf 1 >&4; {rest}")
}

#[test]
fn the_old_generation_serves_again_if_the_new_one_dies_while_it_drains() {
    let mut lp = Loop::upgrading_to(&ready_then("exit 7"), WAIT);
    let (id, addr) = lp.listen();
    let pid = lp.baton.start_upgrade().unwrap();
    assert!(matches!(lp.next(), Event::UpgradeDone(Ok(_))));
    assert!(matches!(lp.next(), Event::Stop { .. }));
    assert!(lp.baton.listener(id).is_none());
    lp.baton.drain_watching(WAIT, WAIT).unwrap();
    match lp.next() {
        Event::Resumed { successor, status } => {
            assert_eq!(
                (successor, status),
                (pid, baton_core::ExitStatus::Exited(7))
            );
        }
        other => panic!("expected to serve again: {other:?}"),
    }
    assert!(!lp.baton.is_stopped());
    assert!(lp.baton.listener(id).is_some(), "listener reopened");
    let _client = TcpStream::connect(addr).unwrap();
    assert!(matches!(lp.next(), Event::Accept { listener } if listener == id));
    assert!(lp.baton.accept(id).unwrap().is_some());
    // A second stop drains as the first would have.
    lp.baton.stop();
    assert!(matches!(lp.next(), Event::Stop { .. }));
}

#[test]
fn the_drain_waits_out_the_watch_on_a_new_generation_that_lives() {
    let mut lp = Loop::upgrading_to(&ready_then("exec sleep 30"), WAIT);
    lp.listen();
    let pid = lp.baton.start_upgrade().unwrap();
    assert!(matches!(lp.next(), Event::UpgradeDone(Ok(_))));
    assert!(matches!(lp.next(), Event::Stop { .. }));
    let watch = Duration::from_millis(200);
    let started = Instant::now();
    lp.baton.drain_watching(WAIT, watch).unwrap();
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
    let killed = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn a_new_generation_that_exits_cleanly_is_not_replaced() {
    // Exit 0 is what a generation does after handing over in turn, or when
    // stopped on purpose: the old one must not serve beside the newest.
    let mut lp = Loop::upgrading_to(&ready_then("exit 0"), WAIT);
    let (id, _) = lp.listen();
    lp.baton.start_upgrade().unwrap();
    assert!(matches!(lp.next(), Event::UpgradeDone(Ok(_))));
    assert!(matches!(lp.next(), Event::Stop { .. }));
    lp.baton
        .drain_watching(WAIT, Duration::from_millis(100))
        .unwrap();
    assert!(matches!(lp.next(), Event::Drained(_)));
    assert!(lp.baton.is_stopped());
    assert!(lp.baton.listener(id).is_none());
}
