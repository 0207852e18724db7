//! Unit tests of baton-smol: listeners made from handed-over sockets and
//! its [`Runtime`] implementation. The driver they plug into is tested once,
//! in baton-core (`core/src/server_tests.rs`); the examples and the demo run
//! it on smol in the process-level suites.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use baton_core::runtime::Accept;
use baton_core::{ListenSocket, ListenerHandoff};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};

use super::*;

/// Bound on every wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

/// Run `work` on this thread, failing after [`BOUND`].
fn bounded<T>(work: impl std::future::Future<Output = T>) -> T {
    async_io::block_on(future::or(work, async {
        Timer::after(BOUND).await;
        panic!("not done within {BOUND:?}")
    }))
}

fn tcp_listener() -> (Listener, std::net::SocketAddr) {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    (
        Listener::from_listen_socket(ListenSocket::Tcp(socket)).unwrap(),
        addr,
    )
}

#[test]
fn tcp_listener_accepts_and_stream_closes_its_write_half() {
    let (listener, addr) = tcp_listener();
    let mut client = TcpStream::connect(addr).expect("connect");
    client.set_read_timeout(Some(BOUND)).expect("timeout");
    bounded(async {
        let mut stream = Accept::accept(&listener).await.expect("accept");
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
    let _ = std::fs::remove_file(&path);
    let socket = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    socket.set_nonblocking(true).unwrap();
    let listener = Listener::from_listen_socket(ListenSocket::Unix(socket)).expect("wrap");
    assert_eq!(
        listener.local_addr().expect("addr"),
        format!("unix:{}", path.display())
    );
    let mut client = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    bounded(async {
        let mut stream = Accept::accept(&listener).await.expect("accept");
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
fn readiness_and_timers_of_the_runtime() {
    let runtime = Smol::new(Arc::new(Executor::new()));
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.write_all(b"x").unwrap();
    bounded(runtime.readable(a.as_fd())).unwrap();
    bounded(runtime.writable(a.as_fd())).unwrap();
    let start = Instant::now();
    bounded(runtime.sleep_until(start + Duration::from_millis(20)));
    assert!(start.elapsed() >= Duration::from_millis(20));
}
