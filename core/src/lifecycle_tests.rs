//! The lifecycle driven by hand, as a backend would drive it, against small
//! shell scripts standing in for the next generation: upgrades that succeed,
//! fail, time out or are refused, stops (during an upgrade, during a drain),
//! the successor watch and resume, hand-overs, the idle grace and status.
//!
//! The "reactor" is poll(2) on the lifecycle's watched fds, bounded by the
//! lifecycle's own timeout, a round count and a deadline; nothing sleeps to
//! synchronise. Signals are not installed here (they are process-wide); the
//! signal pipes have their own test, and the process-level suites send real
//! signals.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use std::os::fd::AsFd;

use super::*;
use crate::{Config, Generation};

/// A shell script as the "next generation". With no listeners passed, its
/// readiness fd is 3.
fn script(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn lifecycle(program: &std::path::Path, timeouts: Timeouts) -> Lifecycle {
    let config = Config::default()
        .program(program)
        .args(vec![program.as_os_str().to_owned()])
        .upgrade_timeout(Duration::from_secs(10));
    let mut lifecycle = Lifecycle::new(Generation::from_env(config).unwrap(), timeouts);
    lifecycle.ready().unwrap();
    lifecycle
}

/// Short timeouts for tests that wait for the drain to end.
fn quick() -> Timeouts {
    Timeouts {
        drain: Duration::from_secs(10),
        successor_watch: Duration::from_millis(100),
        force_grace: Duration::from_millis(100),
        idle_grace: Duration::from_millis(50),
    }
}

/// Drive `lifecycle` until `until` accepts an event; returns every event
/// seen. Fails after 20 s or 10 000 rounds.
fn drive(lifecycle: &mut Lifecycle, mut until: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        while let Some(event) = lifecycle.poll_event() {
            let done = until(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
        assert!(Instant::now() < deadline, "no such event; saw {seen:?}");
        let wait = lifecycle
            .poll_timeout()
            .map_or(Duration::from_millis(100), |at| {
                at.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(100));
        let watched = lifecycle.watched();
        let mut fds: Vec<PollFd<'_>> = watched
            .all()
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        poll(&mut fds, timeout).unwrap();
        drop(fds);
        drop(watched);
        lifecycle.handle_readable(Instant::now());
    }
    panic!("too many rounds; saw {seen:?}");
}

/// Drive `lifecycle` until it exits; its drain report.
fn drive_to_exit(lifecycle: &mut Lifecycle) -> DrainReport {
    match drive(lifecycle, |e| matches!(e, Event::Exit(_))).pop() {
        Some(Event::Exit(report)) => report,
        other => unreachable!("{other:?}"),
    }
}

/// Drive `lifecycle` until offered connections come back; them.
fn drive_to_unmoved(lifecycle: &mut Lifecycle) -> Vec<Offer> {
    match drive(lifecycle, |e| matches!(e, Event::Unmoved(_))).pop() {
        Some(Event::Unmoved(offers)) => offers,
        other => unreachable!("{other:?}"),
    }
}

fn answer_of(events: &[Event], to: ReplyTo) -> Option<&Answer> {
    events.iter().find_map(|event| match event {
        Event::Answer { reply, answer } if *reply == to => Some(answer),
        _ => None,
    })
}

fn upgraded_pid(events: &[Event], to: ReplyTo) -> u32 {
    match answer_of(events, to) {
        Some(Answer::Upgraded(done)) => done.pid,
        other => panic!("expected an upgrade, got {other:?}; events {events:?}"),
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn a_ready_child_completes_the_upgrade_then_the_drain_ends_after_the_watch() {
    let path = script("ready.sh", "printf 1 >&3\nexec sleep 30");
    let mut lifecycle = lifecycle(&path, quick());
    let now = Instant::now();
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), now);
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Exit(_)));
    let pid = upgraded_pid(&events, ReplyTo(1));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::StopAccepting(StopReason::Upgraded))));
    assert!(lifecycle.is_done());
    kill(pid);
}

#[test]
fn a_child_that_exits_fails_the_upgrade_and_serving_goes_on() {
    let path = script("exit1.sh", "exit 1");
    let mut lifecycle = lifecycle(&path, quick());
    lifecycle.request(Request::Upgrade, Some(ReplyTo(7)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    match answer_of(&events, ReplyTo(7)) {
        Some(Answer::UpgradeFailed(reason)) => {
            assert!(reason.contains("exit status 1"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!lifecycle.is_stopping());
    // Status remembers the failure.
    lifecycle.request(Request::Status, Some(ReplyTo(8)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    match answer_of(&events, ReplyTo(8)) {
        Some(Answer::Status(status)) => {
            assert_eq!(status.pid, std::process::id());
            assert!(matches!(&status.last_upgrade, Some(Err(r)) if r.contains("exit status 1")));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_second_upgrade_is_refused_while_one_runs_and_a_silent_child_times_out() {
    let path = script("silent.sh", "exec sleep 30");
    let config = Config::default()
        .program(&path)
        .args(vec![path.as_os_str().to_owned()])
        .upgrade_timeout(Duration::from_millis(300));
    let mut lifecycle = Lifecycle::new(Generation::from_env(config).unwrap(), quick());
    lifecycle.ready().unwrap();
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    lifecycle.request(Request::Upgrade, Some(ReplyTo(2)), Instant::now());
    let events = drive(&mut lifecycle, |e| {
        matches!(
            e,
            Event::Answer {
                reply: ReplyTo(1),
                ..
            }
        )
    });
    match answer_of(&events, ReplyTo(2)) {
        Some(Answer::UpgradeFailed(reason)) => assert!(reason.contains("already running")),
        other => panic!("{other:?}"),
    }
    match answer_of(&events, ReplyTo(1)) {
        Some(Answer::UpgradeFailed(reason)) => assert!(reason.contains("did not report ready")),
        other => panic!("{other:?}"),
    }
    // The killed child is reaped without blocking the loop, on the
    // lifecycle's own reap timer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lifecycle.generation().reap_exited() > 0 {
        assert!(
            Instant::now() < deadline,
            "the timed-out child was never reaped"
        );
        let at = lifecycle
            .poll_timeout()
            .expect("a reap timer while a child is unreaped");
        let wait = at.saturating_duration_since(Instant::now());
        poll(
            &mut [],
            PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX),
        )
        .unwrap();
        lifecycle.handle_timeout(Instant::now());
    }
    assert!(!lifecycle.is_stopping());
}

#[test]
fn a_stop_during_an_upgrade_abandons_it_and_the_server_exits() {
    let path = script("hang.sh", "exec sleep 30");
    let mut lifecycle = lifecycle(&path, quick());
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    lifecycle.request(Request::Stop, Some(ReplyTo(2)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Exit(_)));
    match answer_of(&events, ReplyTo(1)) {
        Some(Answer::UpgradeFailed(reason)) => assert!(reason.contains("stopping")),
        other => panic!("{other:?}"),
    }
    assert_eq!(answer_of(&events, ReplyTo(2)), Some(&Answer::Stopping));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::StopAccepting(StopReason::Shutdown))));
    // Exit waits until the killed child is reaped.
    assert_eq!(lifecycle.generation().reap_exited(), 0);
}

#[test]
fn a_successor_that_dies_while_this_generation_drains_makes_it_serve_again() {
    let path = script("ready-hang.sh", "printf 1 >&3\nexec sleep 30");
    let mut timeouts = quick();
    timeouts.successor_watch = Duration::from_secs(10);
    let mut lifecycle = lifecycle(&path, timeouts);
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    let pid = upgraded_pid(&events, ReplyTo(1));
    kill(pid);
    let events = drive(&mut lifecycle, |e| {
        matches!(e, Event::Resume | Event::Exit(_))
    });
    assert!(matches!(events.last(), Some(Event::Resume)), "{events:?}");
    assert!(!lifecycle.is_stopping());
    // Serving again: upgrades are allowed again.
    lifecycle.request(Request::Upgrade, Some(ReplyTo(2)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    kill(upgraded_pid(&events, ReplyTo(2)));
}

/// Issue 12 item 3: a stop is sticky. Stopped while draining, this
/// generation does not serve again when its successor dies.
#[test]
fn after_a_stop_a_dying_successor_does_not_make_this_generation_serve_again() {
    let path = script("ready-hang2.sh", "printf 1 >&3\nexec sleep 30");
    let mut timeouts = quick();
    timeouts.successor_watch = Duration::from_secs(10);
    let mut lifecycle = lifecycle(&path, timeouts);
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    let pid = upgraded_pid(&events, ReplyTo(1));
    lifecycle.request(Request::Stop, None, Instant::now());
    kill(pid);
    let events = drive(&mut lifecycle, |e| {
        matches!(e, Event::Resume | Event::Exit(_))
    });
    assert!(matches!(events.last(), Some(Event::Exit(_))), "{events:?}");
}

/// Issue 12 item 9: a stop during the drain ends it at once; what is left
/// is closed and counted as forced.
#[test]
fn a_stop_during_the_drain_forces_what_is_left() {
    let path = script("unused.sh", "exit 0");
    let mut timeouts = quick();
    timeouts.drain = Duration::from_secs(3600);
    let mut lifecycle = lifecycle(&path, timeouts);
    let mut busy = lifecycle.generation().tracker().track();
    busy.set_busy();
    lifecycle.request(Request::Stop, None, Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::StopAccepting(_)));
    assert!(!events.iter().any(|e| matches!(e, Event::ForceClose)));
    lifecycle.request(Request::Stop, None, Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::ForceClose));
    assert!(lifecycle.generation().tracker().is_forced(), "{events:?}");
    drop(busy);
    assert_eq!(drive_to_exit(&mut lifecycle).forced, 1);
}

/// Issue 12 item 4: A upgraded to B, B to C, then B died: A must not serve
/// beside C. B says so on its readiness pipe after "ready".
#[test]
fn a_successor_that_handed_over_does_not_make_this_generation_serve_again() {
    let fifo = std::env::temp_dir().join(format!("baton-lifecycle-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let path = script(
        "handover.sh",
        &format!(
            "printf 1 >&3\nread line < {}\nprintf H >&3\nexit 3",
            fifo.display()
        ),
    );
    let mut timeouts = quick();
    timeouts.successor_watch = Duration::from_secs(10);
    let mut lifecycle = lifecycle(&path, timeouts);
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    upgraded_pid(&events, ReplyTo(1));
    // Let the successor report its hand-over, then die with status 3.
    std::fs::write(&fifo, "go\n").unwrap();
    let events = drive(&mut lifecycle, |e| {
        matches!(e, Event::Resume | Event::Exit(_))
    });
    assert!(matches!(events.last(), Some(Event::Exit(_))), "{events:?}");
    let _ = std::fs::remove_file(&fifo);
}

#[test]
fn idle_connections_are_told_to_close_after_the_idle_grace() {
    let path = script("unused2.sh", "exit 0");
    let mut lifecycle = lifecycle(&path, quick());
    let idle = lifecycle.generation().tracker().track();
    lifecycle.request(Request::Stop, None, Instant::now());
    assert!(!lifecycle.generation().tracker().is_closing_idle());
    drive(&mut lifecycle, |e| matches!(e, Event::CloseIdle));
    assert!(lifecycle.generation().tracker().is_closing_idle());
    drop(idle);
    assert_eq!(drive_to_exit(&mut lifecycle).closed_idle, 1);
}

#[test]
fn the_watched_fds_change_with_the_epoch() {
    let path = script("ready3.sh", "printf 1 >&3\nexec sleep 30");
    let mut lifecycle = lifecycle(&path, quick());
    let before = (lifecycle.watch_epoch(), lifecycle.watched().all().count());
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let during = lifecycle.watched().all().count();
    assert_ne!(lifecycle.watch_epoch(), before.0);
    assert!(during > before.1);
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    kill(upgraded_pid(&events, ReplyTo(1)));
}

/// A reactor that only sleeps until `poll_timeout` (mio) must wake as soon
/// as the last connection of a drain closes, not at the drain deadline.
#[test]
fn once_the_last_connection_closes_the_drain_end_is_due_at_once() {
    let path = script("unused3.sh", "exit 0");
    let mut timeouts = quick();
    timeouts.drain = Duration::from_secs(3600);
    timeouts.idle_grace = Duration::from_secs(3600);
    let mut lifecycle = lifecycle(&path, timeouts);
    let conn = lifecycle.generation().tracker().track();
    lifecycle.request(Request::Stop, None, Instant::now());
    while lifecycle.poll_event().is_some() {}
    let before = lifecycle.poll_timeout().expect("a drain deadline");
    assert!(before > Instant::now() + Duration::from_secs(60));
    drop(conn);
    let due = lifecycle.poll_timeout().expect("the end of the drain");
    assert!(due <= Instant::now(), "due in {:?}", due - Instant::now());
    lifecycle.handle_timeout(Instant::now());
    assert!(matches!(lifecycle.poll_event(), Some(Event::Exit(_))));
}

/// The next generation for the state tests: this test binary, re-run to
/// execute only `test`, an ignored test that plays the new generation.
fn state_lifecycle(test: &str, out: &std::path::Path) -> Lifecycle {
    let _ = std::fs::remove_file(out);
    let exe = std::env::current_exe().unwrap();
    let args = [
        exe.as_os_str(),
        "--exact".as_ref(),
        test.as_ref(),
        "--ignored".as_ref(),
        "--test-threads=1".as_ref(),
        "--quiet".as_ref(),
    ]
    .iter()
    .map(|a| a.to_os_string())
    .collect();
    let config = Config::default()
        .program(&exe)
        .args(args)
        .upgrade_timeout(Duration::from_secs(20))
        .state_versions(crate::handover::Versions::new(1, 2).unwrap());
    let mut lifecycle = Lifecycle::new(Generation::from_env(config).unwrap(), quick());
    lifecycle.on_save_state(|version| {
        vec![crate::handover::Item::new(
            "requests",
            version,
            b"41".to_vec(),
        )]
    });
    lifecycle.ready().unwrap();
    lifecycle
}

/// Where a state child writes what it received: named after its parent.
fn state_out(parent: u32, variant: &str) -> PathBuf {
    std::env::temp_dir().join(format!("baton-state-{parent}-{variant}.out"))
}

/// Play the new generation: receive the state at `versions`, write
/// `name v<version> <payload>` lines (or `none`), report ready, exit.
fn state_child(variant: &str, versions: crate::handover::Versions) {
    if std::env::var_os(crate::protocol::BATON_HANDOVER_FD).is_none() {
        return; // Run by hand: nothing to play.
    }
    let config = Config::default().state_versions(versions);
    let generation = Generation::from_env(config).unwrap();
    let items = generation.receive_state(Duration::from_secs(10)).unwrap();
    let mut text: String = items
        .iter()
        .map(|i| {
            format!(
                "{} v{} {}\n",
                i.name,
                i.version,
                String::from_utf8_lossy(&i.payload)
            )
        })
        .collect();
    if text.is_empty() {
        text = "none\n".to_owned();
    }
    let out = state_out(std::os::unix::process::parent_id(), variant);
    std::fs::write(out, text).unwrap();
    generation.ready().unwrap();
}

#[test]
#[ignore = "the new generation of the state tests, run by them"]
fn state_child_v2() {
    state_child("v2", crate::handover::Versions::new(2, 3).unwrap());
}

#[test]
#[ignore = "the new generation of the state tests, run by them"]
fn state_child_v9() {
    state_child("v9", crate::handover::Versions::single(9));
}

#[test]
fn state_moves_to_the_next_generation_and_is_committed_once_it_is_ready() {
    let out = state_out(std::process::id(), "v2");
    let mut lifecycle = state_lifecycle("lifecycle::tests::state_child_v2", &out);
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    upgraded_pid(&events, ReplyTo(1));
    // Received before ready, at the highest common version.
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "requests v2 41\n");
    // The commit goes out, then the channel is let go.
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Exit(_)));
    assert!(lifecycle.moving.is_none(), "{events:?}");
    let _ = std::fs::remove_file(out);
}

#[test]
fn without_a_common_version_nothing_moves_and_the_upgrade_succeeds() {
    let out = state_out(std::process::id(), "v9");
    let mut lifecycle = state_lifecycle("lifecycle::tests::state_child_v9", &out);
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    upgraded_pid(&events, ReplyTo(1));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "none\n");
    assert!(lifecycle.moving.is_none());
    let _ = std::fs::remove_file(out);
}

#[test]
fn a_child_that_takes_no_state_gets_none_and_the_upgrade_succeeds() {
    // A script neither reads nor closes the channel: ready without
    // "prepared" moves nothing, and the upgrade is not failed for it.
    let path = script("ready-no-state.sh", "printf 1 >&3\nexec sleep 30");
    let config = Config::default()
        .program(&path)
        .args(vec![path.as_os_str().to_owned()])
        .state_versions(crate::handover::Versions::single(1));
    let mut lifecycle = Lifecycle::new(Generation::from_env(config).unwrap(), quick());
    let saved = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = saved.clone();
    lifecycle.on_save_state(move |_| {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Vec::new()
    });
    lifecycle.ready().unwrap();
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    let pid = upgraded_pid(&events, ReplyTo(1));
    assert!(
        !saved.load(std::sync::atomic::Ordering::SeqCst),
        "no version was negotiated"
    );
    assert!(lifecycle.moving.is_none());
    kill(pid);
}

/// A connection for the move tests: the client's end, and the server's end
/// with its guard. The client has already sent `ping\n`, which the server
/// never read: it must reach whoever serves the connection next.
fn connection(lifecycle: &Lifecycle) -> (std::net::TcpStream, std::net::TcpStream, Connection) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (server, _) = listener.accept().unwrap();
    client.write_all(b"ping\n").unwrap();
    (client, server, lifecycle.generation().tracker().track())
}

/// Offer the connection with `state` as its payload once moves are open.
fn offer(conn: Connection, server: std::net::TcpStream, state: &[u8]) {
    let version = conn.can_move().expect("moves are open after the upgrade");
    let item = Item::new("conn", version, state.to_vec()).with_fds([server.into()]);
    conn.offer(item);
}

/// Read one line.
fn read_line(stream: &std::net::TcpStream) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    line
}

/// A lifecycle whose next generation is this test binary playing `test`,
/// moving connections of kind `conn`.
fn moving_lifecycle(test: &str) -> Lifecycle {
    let out = state_out(std::process::id(), "unused");
    let mut lifecycle = state_lifecycle(test, &out);
    lifecycle.move_connections(["conn"]);
    lifecycle
}

/// Play a new generation that takes connections of `kind`: each one moved
/// here is answered `pong <payload> <pid>` once its first line is read.
fn move_child(kind: &str) {
    if std::env::var_os(crate::protocol::BATON_HANDOVER_FD).is_none() {
        return;
    }
    use std::io::Write;
    let config = Config::default().state_versions(crate::handover::Versions::new(1, 2).unwrap());
    let mut lifecycle = Lifecycle::new(Generation::from_env(config).unwrap(), quick());
    lifecycle.move_connections([kind]);
    lifecycle.ready().unwrap();
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Moved(_)));
    let Some(Event::Moved(items)) = events.into_iter().last() else {
        unreachable!()
    };
    for mut item in items {
        let crate::handover::MovedStream::Tcp(stream) =
            crate::handover::take_stream(&mut item).unwrap()
        else {
            panic!("a TCP connection was moved")
        };
        stream.set_nonblocking(false).unwrap();
        assert_eq!(read_line(&stream), "ping\n");
        let payload = String::from_utf8_lossy(&item.payload);
        let reply = format!("pong {payload} {}\n", std::process::id());
        (&stream).write_all(reply.as_bytes()).unwrap();
    }
}

#[test]
#[ignore = "the new generation of the move tests, run by them"]
fn move_child_serves() {
    move_child("conn");
}

#[test]
#[ignore = "the new generation of the move tests, run by them"]
fn move_child_of_another_kind() {
    move_child("other");
}

/// Play a new generation killed once it has received connections, before
/// it says "prepared": the old one never commits.
#[test]
#[ignore = "the new generation of the move tests, run by them"]
fn move_child_dies_before_the_commit() {
    if std::env::var_os(crate::protocol::BATON_HANDOVER_FD).is_none() {
        return;
    }
    let config = Config::default().state_versions(crate::handover::Versions::new(1, 2).unwrap());
    let generation = Generation::from_env(config).unwrap();
    generation.receive_state(Duration::from_secs(10)).unwrap();
    generation.ready().unwrap();
    let mut receiver = generation.take_state_receiver().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match receiver.poll().unwrap() {
            Some(ReceiverEvent::Transaction { items, .. }) if !items.is_empty() => {
                // Killed, as by the OOM killer or an operator.
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            }
            Some(_) => {}
            None => {
                crate::sys::wait_io(receiver.as_fd(), false, Duration::from_millis(100)).unwrap();
            }
        }
    }
    panic!("no connection came");
}

#[test]
fn a_connection_moves_open_with_its_unread_bytes_and_counts_as_moved() {
    let mut lifecycle = moving_lifecycle("lifecycle::tests::move_child_serves");
    let (client, server, conn) = connection(&lifecycle);
    assert_eq!(conn.can_move(), None, "no moves before an upgrade");
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    let pid = upgraded_pid(&events, ReplyTo(1));
    offer(conn, server, b"state");
    // Moved and committed: the drain ends without waiting for it.
    let report = drive_to_exit(&mut lifecycle);
    assert_eq!(report.moved, 1, "{report:?}");
    assert!(report.to_string().starts_with("1 moved / "), "{report}");
    // The new generation read the line this one never read, and answered
    // with the state that moved.
    assert_eq!(read_line(&client), format!("pong state {pid}\n"));
}

#[test]
fn a_new_generation_killed_before_the_commit_leaves_every_connection_here() {
    use std::io::Write;
    let mut lifecycle = moving_lifecycle("lifecycle::tests::move_child_dies_before_the_commit");
    let (client, server, conn) = connection(&lifecycle);
    let (_other_client, other_server, other_conn) = connection(&lifecycle);
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    upgraded_pid(&events, ReplyTo(1));
    offer(conn, server, b"first");
    offer(other_conn, other_server, b"second");
    let offers = drive_to_unmoved(&mut lifecycle);
    // Both come back whole, in order, with their guards; the connection
    // still works from here, and its unread line is still unread.
    let payloads: Vec<&[u8]> = offers.iter().map(|o| o.item.payload.as_slice()).collect();
    assert_eq!(payloads, [b"first".as_slice(), b"second".as_slice()]);
    assert_eq!(lifecycle.generation().tracker().open(), 2);
    let mut offers = offers.into_iter();
    let mut first = offers.next().unwrap();
    let stream = std::net::TcpStream::from(first.item.fds.remove(0));
    stream.set_nonblocking(false).unwrap();
    assert_eq!(read_line(&stream), "ping\n");
    (&stream).write_all(b"still here\n").unwrap();
    assert_eq!(read_line(&client), "still here\n");
    // It stays here for good (no offer-refuse loop), and moves ended: a
    // later offer comes back too.
    assert_eq!(first.conn.can_move(), None);
    first.conn.offer(first.item);
    assert_eq!(drive_to_unmoved(&mut lifecycle).len(), 1);
}

#[test]
fn a_new_generation_that_does_not_resume_the_kind_refuses_and_the_connection_stays() {
    let mut lifecycle = moving_lifecycle("lifecycle::tests::move_child_of_another_kind");
    let (_client, server, conn) = connection(&lifecycle);
    lifecycle.request(Request::Upgrade, Some(ReplyTo(1)), Instant::now());
    let events = drive(&mut lifecycle, |e| matches!(e, Event::Answer { .. }));
    let pid = upgraded_pid(&events, ReplyTo(1));
    offer(conn, server, b"state");
    assert_eq!(drive_to_unmoved(&mut lifecycle).len(), 1);
    kill(pid);
}

#[test]
fn an_offer_without_an_upgrade_comes_back() {
    let path = script("never.sh", "exit 1");
    let mut lifecycle = lifecycle(&path, quick());
    let conn = lifecycle.generation().tracker().track();
    assert_eq!(conn.can_move(), None);
    conn.offer(Item::new("conn", 1, b"x".to_vec()));
    assert!(lifecycle
        .poll_timeout()
        .is_some_and(|at| at <= Instant::now()));
    lifecycle.handle_timeout(Instant::now());
    match lifecycle.poll_event() {
        Some(Event::Unmoved(offers)) => {
            assert_eq!(offers[0].item.payload, b"x");
            // The guard came back with it: still open.
            assert_eq!(lifecycle.generation().tracker().open(), 1);
        }
        other => panic!("expected the offer back, got {other:?}"),
    }
}
