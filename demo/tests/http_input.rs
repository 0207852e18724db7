//! Hostile and unusual HTTP input against the real `baton-demo` binary, once
//! per compiled backend (issue 7, "Bad input"): slow clients, bad framing,
//! chunked bodies, pipelining, and a client that never reads its responses.
//! Each case is answered or closed, and a fresh `GET /` on another
//! connection is still answered 200 afterwards (other connections are
//! unaffected). And `--max-connections`: a client over the limit waits in
//! the accept queue and is served once a connection closes.
//!
//! Every wait is on a response, an EOF or a log line, bounded in time; the
//! servers listen on `127.0.0.1:0`, so the tests run in parallel.

mod common;

use testkit::per_backend;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{get, request, Conn, Server, BINARY, REQUEST_TIMEOUT};

per_backend! {
    fn slowloris;
    fn slowloris_trickle;
    fn bad_content_length;
    fn chunked_bodies;
    fn pipelining;
    fn client_that_never_reads;
    fn max_connections_is_backpressure;
}

/// A fresh `GET /` on a new connection answers 200, from the server's pid.
fn assert_unaffected(server: &Server, after: &str) {
    match get(server.addr(), "/") {
        Ok(reply) => server.check(
            reply.status == 200 && reply.pid == Some(server.pid()),
            format_args!("after {after}: GET / answered {reply:?}"),
        ),
        Err(e) => server.fail(format_args!("after {after}: GET / failed: {e}")),
    }
}

/// Read one response on `conn` and check its status and body.
fn expect_response(server: &Server, conn: &mut Conn, what: &str, status: u16, body: &[u8]) {
    match conn.read_response(REQUEST_TIMEOUT) {
        Ok(response) => server.check(
            response.status == status && response.body == body,
            format_args!(
                "{what}: expected {status} {:?}, got {response:?}",
                String::from_utf8_lossy(body)
            ),
        ),
        Err(e) => server.fail(format_args!("{what}: expected {status}, got {e}")),
    }
}

/// The server closed `conn` without another response: reading one ends in
/// EOF or a reset, not a response and not a timeout.
fn expect_closed(server: &Server, conn: &mut Conn, what: &str) {
    match conn.read_response(REQUEST_TIMEOUT) {
        Ok(response) => server.fail(format_args!(
            "{what}: expected the connection to close, got {response:?}"
        )),
        Err(e) => server.check(
            matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ),
            format_args!("{what}: expected EOF or a reset, got {e}"),
        ),
    }
}

/// A client that sends part of a request head and nothing more gets 408 (or
/// a close) once `--header-timeout` has passed, not before; meanwhile other
/// connections are served.
fn slowloris(backend: &str) {
    let server = Server::start(BINARY, backend, &["--header-timeout", "1s"]);
    let addr = server.addr();
    let start = Instant::now();
    let mut slow = Conn::connect(addr).expect("connect");
    slow.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .expect("send a partial head");
    // Served while the slow client holds its connection.
    assert_unaffected(&server, "a partial head on another connection");
    match slow.read_response(REQUEST_TIMEOUT) {
        Ok(response) => server.check(
            response.status == 408 && response.close(),
            format_args!("slowloris: expected 408 with Connection: close, got {response:?}"),
        ),
        Err(e) => server.check(
            matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ),
            format_args!("slowloris: expected 408 or a close, got {e}"),
        ),
    }
    let waited = start.elapsed();
    server.check(
        waited >= Duration::from_millis(900),
        format_args!("slowloris: answered after {waited:?}, before the 1s header timeout"),
    );
    expect_closed(&server, &mut slow, "after the 408");
    assert_unaffected(&server, "slowloris");
}

/// A client that trickles its head, a byte at a time, still gets 408 once
/// `--header-timeout` has passed since the head began: the timeout bounds the
/// whole head, not the pause between two reads.
fn slowloris_trickle(backend: &str) {
    let server = Server::start(BINARY, backend, &["--header-timeout", "1s"]);
    let addr = server.addr();
    let start = Instant::now();
    let mut slow = Conn::connect(addr).expect("connect");
    slow.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .expect("send a partial head");
    // One more byte each time 300 ms pass without an answer: at most 40
    // rounds (12 s), far more than the timeout.
    let mut outcome = None;
    for _ in 0..40 {
        match slow.read_response(Duration::from_millis(300)) {
            Ok(response) => {
                outcome = Some(Ok(response));
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                outcome = Some(Err(e));
                break;
            }
        }
        if let Err(e) = slow.send(b"a") {
            outcome = Some(Err(e));
            break;
        }
    }
    let waited = start.elapsed();
    match outcome {
        Some(Ok(response)) => server.check(
            response.status == 408,
            format_args!("trickle: expected 408, got {response:?}"),
        ),
        Some(Err(e)) => server.check(
            matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ),
            format_args!("trickle: expected 408 or a close, got {e}"),
        ),
        None => server.fail(format_args!(
            "trickle: still connected after {waited:?} with a 1s header timeout"
        )),
    }
    server.check(
        waited < Duration::from_secs(5),
        format_args!("trickle: cut only after {waited:?} with a 1s header timeout"),
    );
    assert_unaffected(&server, "a trickled head");
}

/// Invalid or conflicting Content-Length is a 400, never a guess.
fn bad_content_length(backend: &str) {
    let server = Server::start(BINARY, backend, &[]);
    let addr = server.addr();
    let cases: [(&str, &[u8]); 4] = [
        (
            "Content-Length: abc",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\nabc",
        ),
        (
            "Content-Length: -1",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        ),
        (
            "conflicting Content-Length",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "Content-Length with Transfer-Encoding",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    for (what, raw) in cases {
        match request(addr, raw) {
            Ok(response) => server.check(
                response.status == 400 && response.close(),
                format_args!("{what}: expected 400 with Connection: close, got {response:?}"),
            ),
            Err(e) => server.fail(format_args!("{what}: expected 400, got {e}")),
        }
        assert_unaffected(&server, what);
    }
}

/// Chunked bodies are decoded whatever the split, a malformed one is a 400,
/// and a request pipelined after one is framed right (no desync).
fn chunked_bodies(backend: &str) {
    let server = Server::start(BINARY, backend, &[]);
    let addr = server.addr();

    // Several chunks, an extension and a trailer, split across writes (even
    // inside a chunk's data and inside the size line).
    let mut conn = Conn::connect(addr).expect("connect");
    let pieces: [&[u8]; 5] = [
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;name=val",
        b"ue\r\nhel",
        b"lo\r\n1\r\n \r\nA\r\n01234",
        b"56789\r\n0\r\nX-Trailer: y",
        b"es\r\n\r\n",
    ];
    for piece in pieces {
        conn.send(piece).expect("send a piece of a chunked request");
    }
    expect_response(&server, &mut conn, "chunked POST", 200, b"hello 0123456789");
    // The connection is still in step: another request on it is answered.
    conn.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send GET /health");
    expect_response(&server, &mut conn, "GET after chunked", 200, b"ok\n");
    assert_unaffected(&server, "a chunked body in pieces");

    // A chunked POST and a GET in one write: both answered, in order.
    let mut conn = Conn::connect(addr).expect("connect");
    conn.send(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
          3;x=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
          GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .expect("send a chunked POST and a GET");
    expect_response(&server, &mut conn, "pipelined chunked POST", 200, b"abcde");
    expect_response(&server, &mut conn, "GET after a chunked POST", 200, b"ok\n");
    assert_unaffected(&server, "a pipelined chunked POST");

    // Malformed chunk framing: 400 and a close, the rest is never read as a request.
    let malformed: [(&str, &[u8]); 3] = [
        (
            "chunk size not hex",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n\
              GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
        ),
        (
            "chunk longer than its size",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n\
              GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
        ),
        (
            "empty chunk size",
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n;ext\r\n\r\n\
              GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
        ),
    ];
    for (what, raw) in malformed {
        let mut conn = Conn::connect(addr).expect("connect");
        conn.send(raw).expect("send a malformed chunked request");
        match conn.read_response(REQUEST_TIMEOUT) {
            Ok(response) => server.check(
                response.status == 400 && response.close(),
                format_args!("{what}: expected 400 with Connection: close, got {response:?}"),
            ),
            Err(e) => server.fail(format_args!("{what}: expected 400, got {e}")),
        }
        expect_closed(&server, &mut conn, what);
        assert_unaffected(&server, what);
    }
}

/// Pipelined requests are answered in order; nothing after a
/// `Connection: close` request is answered.
fn pipelining(backend: &str) {
    let server = Server::start(BINARY, backend, &[]);
    let addr = server.addr();

    // Three in one write, the first the slowest: three answers, in order.
    let mut conn = Conn::connect(addr).expect("connect");
    conn.send(
        b"GET /sleep/30 HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc\
          GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .expect("send three pipelined requests");
    expect_response(&server, &mut conn, "first of three", 200, b"slept 30 ms\n");
    expect_response(&server, &mut conn, "second of three", 200, b"abc");
    expect_response(&server, &mut conn, "third of three", 200, b"ok\n");
    assert_unaffected(&server, "three pipelined requests");

    // A request after `Connection: close` is not answered: the connection
    // closes after the first response.
    let mut conn = Conn::connect(addr).expect("connect");
    conn.send(
        b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nno",
    )
    .expect("send a request after Connection: close");
    match conn.read_response(REQUEST_TIMEOUT) {
        Ok(response) => server.check(
            response.status == 200 && response.text() == "ok\n" && response.close(),
            format_args!("Connection: close: expected 200 ok with a close, got {response:?}"),
        ),
        Err(e) => server.fail(format_args!("Connection: close: expected 200, got {e}")),
    }
    expect_closed(&server, &mut conn, "a request after Connection: close");
    assert_unaffected(&server, "a request after Connection: close");
}

/// Body of each `POST /echo` the non-reading client sends.
const BIG_BODY: usize = 900 * 1024;
/// Most requests it sends before the server must have given up on it
/// (about 58 MiB: more than loopback socket buffers hold both ways).
const MAX_BIG_REQUESTS: usize = 64;

/// Pipeline big `POST /echo` requests on one connection without reading,
/// until a write fails; then read until EOF or an error. Ok: the server
/// closed the connection (EOF or reset). Every blocking call is bounded by
/// `REQUEST_TIMEOUT`.
fn never_read(addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut one = format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {BIG_BODY}\r\n\r\n")
        .into_bytes();
    one.resize(one.len() + BIG_BODY, b'x');
    for _ in 0..MAX_BIG_REQUESTS {
        if let Err(e) = stream.write_all(&one) {
            // A write timeout means the server still holds the connection open.
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                return Err(e);
            }
            return Ok(());
        }
    }
    // Everything fit in the buffers: the server closes when its write
    // times out; read what is there until EOF or the reset.
    let mut sink = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(e)
            }
            Err(_) => return Ok(()),
        }
    }
    Err(io::Error::new(ErrorKind::TimedOut, "reading never ended"))
}

/// A client that pipelines big requests and never reads the responses
/// blocks the server's writes: after `--write-timeout` the server closes
/// that connection, and other connections are served all along.
fn client_that_never_reads(backend: &str) {
    let server = Server::start(BINARY, backend, &["--write-timeout", "1s"]);
    let addr = server.addr();
    let (done_tx, done_rx) = mpsc::channel();
    let client = std::thread::spawn(move || {
        let start = Instant::now();
        let outcome = never_read(addr);
        let _ = done_tx.send((outcome, start.elapsed()));
    });
    // Served while the other client blocks the server's writes; at most
    // 400 rounds of (GET + 50 ms wait on the client's outcome).
    let mut served = 0u32;
    let (outcome, took) = loop {
        assert_unaffected(&server, "a client that never reads (meanwhile)");
        served += 1;
        match done_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(outcome) => break outcome,
            Err(mpsc::RecvTimeoutError::Timeout) if served < 400 => {}
            Err(e) => server.fail(format_args!(
                "the non-reading client did not finish after {served} rounds: {e}"
            )),
        }
    };
    let _ = client.join();
    if let Err(e) = outcome {
        server.fail(format_args!(
            "the server did not close a connection whose client never reads: {e}"
        ));
    }
    // Closed because a write was blocked for the write timeout, not sooner.
    server.check(
        took >= Duration::from_millis(900),
        format_args!("the non-reading client was cut after {took:?}, before the 1s write timeout"),
    );
    assert_unaffected(&server, "a client that never reads");
}

/// `GET /health` on a keep-alive connection answers 200 ok.
fn health(server: &Server, conn: &mut Conn, what: &str) {
    conn.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap_or_else(|e| server.fail(format_args!("{what}: send: {e}")));
    expect_response(server, conn, what, 200, b"ok\n");
}

/// At `--max-connections` the server stops accepting: a third client's
/// request waits (it is not refused) and is answered as soon as one of the
/// first two connections closes.
fn max_connections_is_backpressure(backend: &str) {
    let server = Server::start(BINARY, backend, &["--max-connections", "2"]);
    let addr = server.addr();
    let mut first = Conn::connect(addr).expect("connect the first client");
    health(&server, &mut first, "first client");
    let mut second = Conn::connect(addr).expect("connect the second client");
    health(&server, &mut second, "second client");

    // The kernel completes the handshake; the server does not accept it.
    let mut third = Conn::connect(addr).expect("connect the third client");
    third
        .send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send the third request");
    match third.read_response(Duration::from_millis(500)) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => server.fail(format_args!(
            "over the limit: expected no answer yet, got {other:?}"
        )),
    }
    // The open ones are still served.
    health(&server, &mut second, "second client at the limit");

    drop(first);
    expect_response(
        &server,
        &mut third,
        "third client after a close",
        200,
        b"ok\n",
    );
    health(&server, &mut second, "second client after the third");
    drop(second);
    drop(third);
    assert_unaffected(&server, "the connection limit");
}
