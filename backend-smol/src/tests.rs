//! Unit tests of baton-smol: listeners made from handed-over sockets, the
//! upgrade path against small shell scripts (ready, exit, silence, stop
//! while waiting), a real handoff to a second process, drain and signals.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use baton_core::{ListenSocket, ListenerHandoff};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::*;

/// Bound on every wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

/// The shell scripts that stand in for the next generation. All are written
/// once, before any test forks, so no forked child holds one open for
/// writing while another test execs it (ETXTBSY).
fn scripts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("baton-smol-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the script dir");
        let scripts = [
            // Checks the protocol environment for one listener named
            // "http", then reports ready on fd 3 + 1 and exits.
            (
                "ready.sh",
                r#"[ "$LISTEN_FDS $LISTEN_FDNAMES $BATON_READY_FD $BATON_GENERATION" = "1 http 4 1" ] || exit 7
printf 1 >&"$BATON_READY_FD""#,
            ),
            ("exit3.sh", "exit 3"),
            // Ready, then dies while the old generation drains.
            (
                "ready_then_exit5.sh",
                r#"printf 1 >&"$BATON_READY_FD"; exit 5"#,
            ),
            // Ready, then serves (sleeps) until killed.
            (
                "ready_then_stay.sh",
                r#"printf 1 >&"$BATON_READY_FD"; exec sleep 30"#,
            ),
            ("silent.sh", "exec sleep 30"),
            (
                "error.sh",
                r#"echo 'error: config: no such file' >&"$BATON_READY_FD"; exec sleep 30"#,
            ),
        ];
        for (name, body) in scripts {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write a script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("chmod a script");
        }
        dir
    })
}

/// A generation whose upgrades run `program` with `args` (`argv[0]` first).
fn baton_running(program: &Path, args: Vec<OsString>, timeout: Duration) -> Baton {
    let config = Config::default()
        .program(program)
        .args(args)
        .upgrade_timeout(timeout);
    Baton::from_env(config).expect("a generation")
}

/// A generation whose upgrades run the script `name`.
fn baton_with_script(name: &str, timeout: Duration) -> Baton {
    let path = scripts().join(name);
    baton_running(&path, vec![path.clone().into_os_string()], timeout)
}

fn loopback() -> ListenAddr {
    "127.0.0.1:0".parse().expect("loopback address")
}

fn tcp_addr(listener: &Listener) -> std::net::SocketAddr {
    listener
        .local_addr()
        .expect("local address")
        .parse()
        .expect("a TCP address")
}

/// Run `work`, failing the test if it takes longer than [`BOUND`].
fn bounded<T>(work: impl Future<Output = T>) -> T {
    let timeout = async {
        Timer::after(BOUND).await;
        panic!("timed out after {BOUND:?}");
    };
    async_io::block_on(future::or(work, timeout))
}

fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"))
}

/// Reap a child that succeeded its upgrade (the core reaps only failures).
fn reap(child: u32) -> WaitStatus {
    waitpid(pid(child), None).expect("reap the child")
}

#[test]
fn tcp_listener_accepts_and_stream_closes_its_write_half() {
    let baton = Baton::from_env(Config::default()).expect("a generation");
    let (listener, origin) = baton
        .listen_with_origin("http", &loopback())
        .expect("listen");
    assert_eq!(origin, Origin::Bound);
    let addr = tcp_addr(&listener);
    let mut client = TcpStream::connect(addr).expect("connect");
    client.set_read_timeout(Some(BOUND)).expect("timeout");
    bounded(async {
        let mut stream = listener.accept().await.expect("accept");
        if let Stream::Tcp(tcp) = &stream {
            assert!(tcp.get_ref().nodelay().expect("nodelay"), "Nagle is off");
        }
        client.write_all(b"ping").expect("client write");
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.expect("server read");
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong").await.expect("server write");
        stream.close().await.expect("close");
        // The write half is shut: the client reads the reply, then EOF...
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).expect("client read");
        assert_eq!(reply, b"pong");
        // ...while the server can still read what the client sends.
        client.write_all(b"late").expect("client write after close");
        stream.read_exact(&mut buf).await.expect("read after close");
        assert_eq!(&buf, b"late");
    });
}

#[test]
fn unix_listener_accepts() {
    let dir = std::env::temp_dir().join(format!("baton-smol-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("http.sock");
    let baton = Baton::from_env(Config::default()).expect("a generation");
    let addr: ListenAddr = format!("unix:{}", path.display()).parse().expect("addr");
    let listener = baton.listen("http", &addr).expect("listen");
    assert_eq!(listener.local_addr().expect("addr"), addr.to_string());
    let mut client = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    bounded(async {
        let mut stream = listener.accept().await.expect("accept");
        assert!(matches!(stream, Stream::Unix(_)));
        client.write_all(b"hi").expect("client write");
        let mut buf = [0u8; 2];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hi");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn handoff_keeps_the_shared_socket_nonblocking() {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let copy = std_listener.try_clone().expect("dup");
    let listener = Listener::from_listen_socket(ListenSocket::Tcp(std_listener)).expect("wrap");
    assert!(matches!(listener, Listener::Tcp(_)));
    // The other generation's view of the same file description: no accept
    // may ever block, so the flag must still be set.
    match copy.accept() {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        Ok(_) => panic!("nothing connected, yet accept returned a connection"),
    }
}

#[test]
fn upgrade_succeeds_when_the_child_reports_ready() {
    let baton = baton_with_script("ready.sh", BOUND);
    let _listener = baton.listen("http", &loopback()).expect("listen");
    let pending = baton.start_upgrade().expect("start");
    let child = pending.pid();
    let upgraded = bounded(pending.ready()).expect("upgraded");
    assert_eq!((upgraded.pid, upgraded.generation), (child, 1));
    assert!(
        baton.is_stopped(),
        "a successful upgrade stops this generation"
    );
    assert_eq!(baton.stop_token().reason(), Some(StopReason::Upgraded));
    assert_eq!(reap(child), WaitStatus::Exited(pid(child), 0));
    // Stopping: no further upgrade.
    assert!(matches!(baton.start_upgrade(), Err(UpgradeError::Stopping)));
}

#[test]
fn upgrade_fails_when_the_child_exits_and_serving_goes_on() {
    let baton = baton_with_script("exit3.sh", BOUND);
    let err = bounded(baton.upgrade()).expect_err("the child exits");
    assert!(
        matches!(err, UpgradeError::ChildExited { status, .. } if status == baton_core::ExitStatus::Exited(3)),
        "{err}"
    );
    assert!(
        !baton.is_stopped(),
        "a failed upgrade leaves the server serving"
    );
    // The next attempt may start: the failed one is settled.
    let again = bounded(baton.upgrade()).expect_err("exits again");
    assert!(matches!(again, UpgradeError::ChildExited { .. }), "{again}");
}

#[test]
fn upgrade_fails_with_the_childs_error_report() {
    let baton = baton_with_script("error.sh", BOUND);
    match bounded(baton.upgrade()) {
        Err(UpgradeError::ChildFailed { message, .. }) => {
            assert_eq!(message, "config: no such file")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn upgrade_times_out_and_the_child_is_reaped() {
    let baton = baton_with_script("silent.sh", Duration::from_millis(200));
    let pending = baton.start_upgrade().expect("start");
    let child = pending.pid();
    let started = Instant::now();
    let err = bounded(pending.ready()).expect_err("times out");
    assert!(matches!(err, UpgradeError::Timeout { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(!baton.is_stopped());
    assert_eq!(
        waitpid(pid(child), Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD),
        "already killed and reaped"
    );
}

#[test]
fn a_stop_while_waiting_abandons_the_upgrade() {
    let baton = baton_with_script("silent.sh", BOUND);
    let pending = baton.start_upgrade().expect("start");
    let child = pending.pid();
    let second = baton.start_upgrade().expect_err("one at a time");
    assert!(
        matches!(second, UpgradeError::AlreadyRunning { pid } if pid == child),
        "{second}"
    );
    let stopper = baton.clone();
    let (result, ()) = bounded(future::zip(pending.ready(), async move {
        future::yield_now().await;
        stopper.stop();
    }));
    assert!(matches!(result, Err(UpgradeError::Stopping)), "{result:?}");
    assert_eq!(
        waitpid(pid(child), Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD),
        "killed and reaped when abandoned"
    );
}

#[test]
fn drain_waits_for_connections_then_forces_the_rest() {
    let baton = Baton::from_env(Config::default()).expect("a generation");
    let tracker = baton.tracker();
    let mut finishing = tracker.track();
    finishing.set_busy();
    let mut stuck = tracker.track();
    stuck.set_busy();
    baton.stop();
    let report = bounded(async {
        let finish = async {
            future::yield_now().await;
            finishing.set_idle();
            drop(finishing);
            // Closes only when forced, as a connection task does.
            stuck.tracker().clone().forced().await;
            drop(stuck);
        };
        future::zip(baton.drain(Duration::from_millis(100)), finish)
            .await
            .0
    });
    assert_eq!(
        report,
        DrainReport {
            open_at_start: 2,
            finished: 1,
            closed_idle: 0,
            forced: 1
        }
    );
    // Nothing open: returns at once.
    let started = Instant::now();
    bounded(baton.drain(BOUND));
    assert!(started.elapsed() < BOUND);
}

#[test]
fn signals_arrive_as_upgrade_and_stop() {
    let baton = Baton::from_env(Config::default()).expect("a generation");
    let mut signals = baton.signals().expect("signals");
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise SIGHUP");
    assert_eq!(bounded(signals.recv()), Some(Signal::Upgrade));
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise SIGTERM");
    assert_eq!(bounded(signals.recv()), Some(Signal::Stop));
}

/// This test binary, re-run as the next generation with only
/// [`handoff_child`] selected, through `sh -c 'exec ...'` so that its test
/// harness output goes to /dev/null (the fds and the environment cross the
/// extra exec unchanged, as under any wrapper script).
fn child_args(exe: &Path) -> Vec<OsString> {
    let script = "exec \"$0\" tests::handoff_child --exact --ignored --quiet >/dev/null";
    vec!["sh".into(), "-c".into(), script.into(), exe.into()]
}

#[test]
fn a_real_child_adopts_the_listener_and_serves_it() {
    scripts(); // written before this test forks (see `scripts`)
    let exe = std::env::current_exe().expect("test binary");
    let baton = baton_running(Path::new("/bin/sh"), child_args(&exe), BOUND);
    let listener = baton.listen("http", &loopback()).expect("listen");
    let addr = tcp_addr(&listener);
    let upgraded = bounded(baton.upgrade()).expect("the child reports ready");
    assert_eq!(upgraded.generation, 1);
    // This generation stops accepting; the child takes what comes next,
    // from the same socket.
    drop(listener);
    let mut client = TcpStream::connect(addr).expect("connect");
    client.set_read_timeout(Some(BOUND)).expect("timeout");
    let mut reply = String::new();
    client
        .read_to_string(&mut reply)
        .expect("read the child's reply");
    assert_eq!(
        reply,
        format!("pid {} generation 1 inherited\n", upgraded.pid)
    );
    assert_eq!(reap(upgraded.pid), WaitStatus::Exited(pid(upgraded.pid), 0));
}

/// The next generation of [`a_real_child_adopts_the_listener_and_serves_it`]:
/// adopts "http", reports ready, answers one connection with its pid,
/// generation and the listener's origin, and exits. Does nothing when run
/// by hand.
#[test]
#[ignore = "run by a_real_child_adopts_the_listener_and_serves_it as its next generation"]
fn handoff_child() {
    if std::env::var_os("LISTEN_FDS").is_none() {
        return;
    }
    let baton = Baton::from_env(Config::default()).expect("adopt");
    let (listener, origin) = baton
        .listen_with_origin("http", &loopback())
        .expect("listen");
    if origin != Origin::Inherited {
        let _ = baton.report_error("the listener was not inherited");
        return;
    }
    baton.ready().expect("report ready");
    bounded(async {
        let mut stream = listener.accept().await.expect("accept");
        let reply = format!(
            "pid {} generation {} inherited\n",
            std::process::id(),
            baton.generation()
        );
        stream.write_all(reply.as_bytes()).await.expect("write");
        stream.close().await.expect("close");
    });
}

#[test]
fn a_successor_dying_during_the_drain_makes_this_generation_serve_again() {
    let baton = baton_with_script("ready_then_exit5.sh", BOUND);
    let listener = baton.listen("http", &loopback()).expect("listen");
    let addr = tcp_addr(&listener);
    let upgraded = bounded(baton.upgrade()).expect("upgraded");
    drop(listener); // the accept loop ends on the stop
    assert!(baton.is_stopped());
    let outcome = bounded(baton.drain_watching(BOUND, BOUND)).expect("watch the successor");
    assert_eq!(
        outcome,
        DrainOutcome::Resumed {
            successor: upgraded.pid,
            status: ExitStatus::Exited(5)
        }
    );
    assert!(!baton.is_stopped(), "the stop token is re-armed");
    // The port was held all along; a reopened listener accepts on it.
    let listener = baton.reopen("http").expect("reopen");
    let _client = TcpStream::connect(addr).expect("connect");
    bounded(listener.accept()).expect("accept after resuming");
}

#[test]
fn a_successor_alive_past_the_watch_lets_this_generation_exit() {
    let baton = baton_with_script("ready_then_stay.sh", BOUND);
    let pending = baton.start_upgrade().expect("start");
    let child = pending.pid();
    bounded(pending.ready()).expect("upgraded");
    let outcome = bounded(baton.drain_watching(BOUND, Duration::from_millis(100)));
    assert!(
        matches!(outcome, Ok(DrainOutcome::Drained(_))),
        "{outcome:?}"
    );
    assert!(baton.is_stopped());
    nix::sys::signal::kill(pid(child), nix::sys::signal::Signal::SIGKILL).expect("kill");
    assert!(matches!(reap(child), WaitStatus::Signaled(..)));
}

#[test]
fn drain_watching_without_an_upgrade_only_drains() {
    let baton = Baton::from_env(Config::default()).expect("a generation");
    baton.stop();
    let outcome = bounded(baton.drain_watching(BOUND, BOUND)).expect("drain");
    assert_eq!(outcome, DrainOutcome::Drained(DrainReport::default()));
}
