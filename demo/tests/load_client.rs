//! The load client (`testkit::load`) against tiny in-test servers built on
//! the demo's own sans-IO HTTP module: they answer well, answer with
//! `Connection: close`, answer 500, hang up, or never answer. (These were
//! the load client's unit tests when it lived in the demo; testkit does not
//! depend on the demo, so they run here.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use baton_demo::http::{encode, error_response, handle, Action, RequestReader, ServerInfo};
use testkit::load::{FailureKind, Load, LoadConfig};

/// How a test server answers each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Correct answers; keeps the connection unless the client closes.
    Good,
    /// Correct answers, each with `Connection: close`.
    GoodThenClose,
    /// 500 to everything.
    Status500,
    /// Read the request, then close without answering.
    Hangup,
    /// Read requests, never answer; close when the client does.
    Silent,
}

const INFO: ServerInfo = ServerInfo {
    pid: 4242,
    generation: 7,
    backend: "test",
};

/// Serve exactly `connections` connections, each in its own thread, until the client closes.
fn server(mode: Mode, connections: usize) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let handle = std::thread::spawn(move || {
        let conns: Vec<_> = (0..connections)
            .map(|_| {
                let (stream, _) = listener.accept().expect("accept");
                std::thread::spawn(move || serve(stream, mode))
            })
            .collect();
        for conn in conns {
            conn.join().expect("server connection thread");
        }
    });
    (addr, handle)
}

fn serve(mut stream: TcpStream, mode: Mode) {
    let mut reader = RequestReader::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Answer every complete request before reading more.
        while let Ok(Some(request)) = reader.next_request() {
            let close = !request.keep_alive || mode == Mode::GoodThenClose;
            let response = match (mode, handle(&request, &INFO)) {
                (Mode::Hangup, _) => return,
                (Mode::Silent, _) => continue,
                (Mode::Status500, _) => error_response(500),
                (_, Action::Respond(r)) => r,
                (_, Action::Sleep { then, .. }) => then,
            };
            let mut out = Vec::new();
            encode(&response, &INFO, close, &mut out);
            if stream.write_all(&out).is_err() || close {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => reader.push(&chunk[..n]),
        }
    }
}

fn config(addr: SocketAddr, keep_alive: usize, per_request: usize, max: u64) -> LoadConfig {
    LoadConfig {
        keep_alive_connections: keep_alive,
        per_request_connections: per_request,
        max_requests: max,
        max_duration: Duration::from_secs(30),
        ..LoadConfig::new(addr)
    }
}

#[test]
fn good_server_keep_alive() {
    let (addr, server) = server(Mode::Good, 2);
    let report = Load::start(config(addr, 2, 0, 50)).expect("start").wait();
    server.join().expect("server");
    assert_eq!(report.ok, 100, "{report:?}");
    assert_eq!(report.failed(), 0, "{:?}", report.failure_samples);
    assert_eq!(report.per_generation, BTreeMap::from([(7, 100)]));
    assert_eq!(report.pids, BTreeSet::from([4242]));
    assert_eq!(report.latencies_us.len(), 100);
    assert!(report.latencies_us.windows(2).all(|w| w[0] <= w[1]));
    let (ok, failed) = report
        .timeline
        .iter()
        .fold((0, 0), |(a, b), (ok, failed)| (a + ok, b + failed));
    assert_eq!((ok, failed), (100, 0));
}

#[test]
fn good_server_per_request_and_other_path() {
    let (addr, server) = server(Mode::Good, 5);
    let mut config = config(addr, 0, 1, 5);
    config.path = "/health".to_owned();
    let report = Load::start(config).expect("start").wait();
    server.join().expect("server");
    assert_eq!((report.ok, report.failed()), (5, 0), "{report:?}");
}

#[test]
fn connection_close_reconnects_without_failure() {
    let (addr, server) = server(Mode::GoodThenClose, 5);
    let load = Load::start(config(addr, 1, 0, 5)).expect("start");
    let report = load.wait();
    server.join().expect("server");
    assert_eq!((report.ok, report.failed()), (5, 0), "{report:?}");
}

#[test]
fn status_500_is_bad_status() {
    let (addr, server) = server(Mode::Status500, 3);
    let report = Load::start(config(addr, 1, 0, 3)).expect("start").wait();
    server.join().expect("server");
    assert_eq!(report.ok, 0);
    assert_eq!(
        report.failures,
        BTreeMap::from([(FailureKind::BadStatus, 3)])
    );
    assert_eq!(report.failure_samples.len(), 3);
    assert!(
        report.failure_samples[0].starts_with("bad status: status 500 (keep-alive #0)"),
        "{:?}",
        report.failure_samples
    );
}

#[test]
fn hangup_is_eof() {
    let (addr, server) = server(Mode::Hangup, 3);
    let report = Load::start(config(addr, 0, 1, 3)).expect("start").wait();
    server.join().expect("server");
    assert_eq!(report.failures, BTreeMap::from([(FailureKind::Eof, 3)]));
    assert_eq!(report.timeline.iter().map(|b| b.1).sum::<u64>(), 3);
}

#[test]
fn silent_server_is_timeout() {
    let (addr, server) = server(Mode::Silent, 2);
    let mut config = config(addr, 1, 0, 2);
    config.request_timeout = Duration::from_millis(50);
    let report = Load::start(config).expect("start").wait();
    server.join().expect("server");
    assert_eq!(report.failures, BTreeMap::from([(FailureKind::Timeout, 2)]));
}
