//! The async driver on a small test runtime (async-io's reactor and timers,
//! an async-executor): accept loops and the handler, upgrades and stops
//! through a [`Handle`] and through the control socket (the library's own
//! blocking client), the drain report, and resume with accept loops
//! restarted, and offered connections that come back to their kind's task.
//! baton-tokio and baton-smol test their runtimes and listener
//! types; the driver they share is tested here, once.
//!
//! Every wait is on a response, an answer or the server's end, bounded by
//! [`BOUND`]; nothing sleeps to synchronise.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_executor::Executor;
use async_io::{Async, Timer};
use futures_lite::future;

use super::*;
use crate::control::Client;
use crate::lifecycle::Answer;
use crate::runtime::{Accept, BoxFuture, Runtime};
use crate::{ListenSocket, ListenerHandoff};

/// Bound on every wait of these tests.
const BOUND: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
struct TestRuntime(Arc<Executor<'static>>);

impl Runtime for TestRuntime {
    fn name(&self) -> &'static str {
        "test"
    }
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        self.0.spawn(task).detach();
    }
    fn sleep_until(&self, deadline: Instant) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            Timer::at(deadline).await;
        })
    }
    fn readable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { Async::new_nonblocking(fd)?.readable().await })
    }
    fn writable<'a>(&self, fd: BorrowedFd<'a>) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { Async::new_nonblocking(fd)?.writable().await })
    }
}

/// A TCP listener for the test runtime; connections are plain std streams.
#[derive(Debug)]
struct TestListener(Async<std::net::TcpListener>);

impl ListenerHandoff for TestListener {
    fn from_listen_socket(socket: ListenSocket) -> io::Result<Self> {
        match socket {
            ListenSocket::Tcp(listener) => Ok(TestListener(Async::new_nonblocking(listener)?)),
            other => Err(io::Error::other(format!("not TCP: {other:?}"))),
        }
    }
}

impl Accept for TestListener {
    type Stream = std::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        let (stream, _) = self.0.accept().await?;
        stream.into_inner()
    }
}

/// Answers `pid generation\n` to each connection, then closes it.
async fn hello(mut stream: std::net::TcpStream, mut conn: Connection, generation: u64) {
    conn.set_busy();
    let _ = stream.set_nonblocking(false);
    let _ = writeln!(stream, "{} {generation}", std::process::id());
    conn.set_idle();
}

fn script(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn config(program: &Path) -> Config {
    let mut config = Config::default()
        .program(program)
        .args(vec![program.as_os_str().to_owned()])
        .successor_watch(Duration::from_millis(100))
        .idle_grace(Duration::from_millis(50))
        .handle_signals(false);
    config.timeouts.force_grace = Duration::from_millis(100);
    config
}

/// A server on `127.0.0.1:0` under `config`, run on its own threads until
/// it returns; `test` gets its address and a handle.
fn with_server(
    config: Config,
    test: impl FnOnce(std::net::SocketAddr, Handle) + Send + 'static,
) -> Result<DrainReport, Error> {
    let executor = Arc::new(Executor::new());
    let mut server =
        Server::<TestRuntime, TestListener>::new(TestRuntime(executor.clone()), config)?;
    server.listen("http", &"127.0.0.1:0".parse().unwrap())?;
    let addr = server.listeners[0]
        .0
        .get_ref()
        .local_addr()
        .expect("its address");
    let handle = server.handle();
    let generation = server.generation();
    let tester = std::thread::spawn(move || test(addr, handle));
    let serve = server.serve(move |stream, conn| hello(stream, conn, generation));
    let report = async_io::block_on(executor.run(future::or(serve, async {
        Timer::after(BOUND).await;
        panic!("the server did not end within {BOUND:?}")
    })));
    tester.join().expect("the test thread");
    report
}

/// `GET`-like round trip: the pid and generation that answered.
fn ask(addr: std::net::SocketAddr) -> (u32, u64) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(BOUND)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    let mut words = text.split_whitespace();
    let pid = words.next().and_then(|w| w.parse().ok()).expect("a pid");
    let generation = words
        .next()
        .and_then(|w| w.parse().ok())
        .expect("a generation");
    (pid, generation)
}

#[test]
fn connections_are_served_until_a_stop_then_the_drain_reports() {
    let path = script("unused.sh", "exit 0");
    let report = with_server(config(&path), |addr, handle| {
        assert_eq!(ask(addr), (std::process::id(), 0));
        handle.stop();
    })
    .expect("served");
    assert_eq!(report.forced, 0);
}

#[test]
fn an_upgrade_through_the_handle_hands_over_and_the_server_ends() {
    let path = script("ready.sh", "printf 1 >&$BATON_READY_FD\nexec sleep 30");
    let successor = Arc::new(std::sync::Mutex::new(None));
    let seen = successor.clone();
    with_server(config(&path), move |_addr, handle| {
        match future::block_on(handle.upgrade()) {
            Answer::Upgraded(done) => *seen.lock().unwrap() = Some(done.pid),
            other => panic!("{other:?}"),
        }
    })
    .expect("served");
    let pid = successor.lock().unwrap().expect("a successor");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn the_control_socket_answers_status_upgrade_and_stop() {
    let path = script("exit1.sh", "exit 1");
    let dir = std::env::temp_dir().join(format!("baton-server-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("control.sock");
    let config = config(&path).control(&sock);
    with_server(config, move |_addr, _handle| {
        let client = Client::new(&sock).timeout(BOUND);
        let status = client.status().expect("status");
        assert!(
            status.contains(&format!("pid: {}", std::process::id())),
            "{status}"
        );
        assert!(status.contains("backend: test"), "{status}");
        match client.upgrade() {
            Err(crate::control::ControlError::UpgradeFailed { reason }) => {
                assert!(reason.contains("exit status 1"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let status = client.status().expect("status");
        assert!(status.contains("last upgrade: error"), "{status}");
        client.stop().expect("stop");
    })
    .expect("served");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn after_the_successor_dies_the_accept_loops_serve_again() {
    let path = script("ready-hang.sh", "printf 1 >&$BATON_READY_FD\nexec sleep 30");
    let config = config(&path).successor_watch(Duration::from_secs(10));
    with_server(config, |addr, handle| {
        let pid = match future::block_on(handle.upgrade()) {
            Answer::Upgraded(done) => done.pid,
            other => panic!("{other:?}"),
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        // The old generation resumes: a new connection is answered by it.
        // The listening socket never closed, so the connect is queued until
        // the accept loop runs again.
        assert_eq!(ask(addr), (std::process::id(), 0));
        handle.stop();
    })
    .expect("served");
}

#[test]
fn an_offered_connection_that_cannot_move_comes_back_to_its_moved_task() {
    // No upgrade runs: every offer comes back, whole, to the task of its
    // kind, which serves the connection from the state it saved.
    let path = script("unused-moves.sh", "exit 0");
    let config = config(&path).state_versions(crate::handover::Versions::single(1));
    let executor = Arc::new(Executor::new());
    let mut server =
        Server::<TestRuntime, TestListener>::new(TestRuntime(executor.clone()), config).unwrap();
    server
        .listen("http", &"127.0.0.1:0".parse().unwrap())
        .unwrap();
    let addr = server.listeners[0].0.get_ref().local_addr().unwrap();
    let handle = server.handle();
    server.on_moved("conn", |mut item: Item, conn: Connection| async move {
        let mut stream = std::net::TcpStream::from(item.fds.remove(0));
        let _ = stream.set_nonblocking(false);
        let _ = stream.write_all(&item.payload);
        drop(conn);
    });
    let tester = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(BOUND)).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read");
        handle.stop();
        text
    });
    let serve = server.serve(|stream: std::net::TcpStream, conn: Connection| async move {
        assert_eq!(conn.can_move(), None, "no upgrade: nothing may move");
        let item = Item::new("conn", 1, b"came back\n".to_vec()).with_fds([stream.into()]);
        conn.offer(item);
    });
    let report = async_io::block_on(executor.run(future::or(serve, async {
        Timer::after(BOUND).await;
        panic!("the server did not end within {BOUND:?}")
    })))
    .expect("served");
    assert_eq!(tester.join().expect("the test thread"), "came back\n");
    assert_eq!((report.moved, report.forced), (0, 0));
}
