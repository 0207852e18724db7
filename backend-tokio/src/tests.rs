//! Unit tests of baton-tokio: its listener types and its [`Runtime`]
//! implementation. The driver they plug into is tested once, in baton-core
//! (`core/src/server_tests.rs`); the examples and the demo run it on tokio
//! in the process-level suites.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use baton_core::{ListenSocket, ListenerHandoff};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Bound on every wait in these tests.
const BOUND: Duration = Duration::from_secs(10);

async fn bounded<T>(work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, work)
        .await
        .expect("within the bound")
}

#[test]
fn listening_outside_a_runtime_is_an_error_not_a_panic() {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let err = Listener::from_listen_socket(ListenSocket::Tcp(socket)).unwrap_err();
    assert!(err.to_string().contains("inside a tokio runtime"), "{err}");
}

#[tokio::test]
async fn a_tcp_listener_accepts_with_nagle_off() {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = Listener::from_listen_socket(ListenSocket::Tcp(socket)).unwrap();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    let mut stream = bounded(baton_core::runtime::Accept::accept(&listener))
        .await
        .unwrap();
    let Stream::Tcp(tcp) = &stream else {
        panic!("a TCP stream")
    };
    assert!(tcp.nodelay().unwrap(), "Nagle is off");
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    bounded(stream.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    bounded(stream.shutdown()).await.unwrap();
}

#[tokio::test]
async fn readiness_and_timers_of_the_runtime() {
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    // Writable at once; readable only once the peer wrote.
    bounded(Tokio.writable(a.as_fd())).await.unwrap();
    let readable = Tokio.readable(a.as_fd());
    b.write_all(b"x").unwrap();
    bounded(readable).await.unwrap();
    let start = Instant::now();
    bounded(Tokio.sleep_until(start + Duration::from_millis(20))).await;
    assert!(start.elapsed() >= Duration::from_millis(20));
}

#[tokio::test]
async fn a_server_serves_until_stopped_through_its_handle() {
    let config = Config::default().handle_signals(false);
    let mut server = Server::new(Tokio, config).unwrap();
    server
        .listen("http", &"127.0.0.1:0".parse().unwrap())
        .unwrap();
    let handle = server.handle();
    let served = tokio::spawn(server.serve(
        |mut stream: Stream, mut conn: Connection| async move {
            conn.set_busy();
            let _ = stream.write_all(b"hi\n").await;
            conn.set_idle();
        },
    ));
    handle.stop();
    let report = bounded(served).await.unwrap().unwrap();
    assert_eq!(report.forced, 0);
}
