//! One HTTP/1.1 keep-alive connection on an async runtime, written once for
//! tokio and smol: [`crate::http`] parses and answers, this drives the I/O
//! with the drain semantics of DESIGN.md. After the stop, a request in
//! progress is finished and answered with `Connection: close`; an idle
//! connection waits the idle grace for one last request, then closes.
//!
//! An idle connection holds no buffer: it waits for readability, then
//! reads into a per-thread scratch buffer, and the parser keeps only the
//! bytes of a request not yet complete.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::runtime::Runtime;
use baton_core::Connection;
use futures_lite::future;

use crate::http::{self, Action, RequestReader, ServerInfo};

/// How much one read takes at most.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// The scratch buffer reads land in before the parser copies what it
    /// needs: one per worker thread, not one per connection.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
}

/// A runtime's stream, as this module needs it.
pub trait Io: Send + Sync + 'static {
    /// Resolve once the stream may be readable.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Read what is there without waiting (`WouldBlock` if nothing).
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Send FIN.
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// The connection timeouts of the demo's flags.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// After a stop, how long an idle connection may send one last request.
    pub idle_grace: Duration,
    /// How long a keep-alive connection may stay idle.
    pub idle_timeout: Duration,
    /// How long a whole request may take once its first byte arrived.
    pub header_timeout: Duration,
    /// How long writing a response may take.
    pub write_timeout: Duration,
}

/// What a read turned up.
enum Read {
    Bytes,
    Closed,
    TimedOut,
    Stopped,
    Forced,
}

/// Serve one connection until the client closes it, it times out, the
/// drain closes it or the drain deadline forces it.
pub async fn serve<R: Runtime, S: Io>(
    runtime: Arc<R>,
    mut stream: S,
    mut conn: Connection,
    info: Arc<ServerInfo>,
    timeouts: Timeouts,
) {
    let tracker = conn.tracker().clone();
    let stop = tracker.stop_token().clone();
    let mut reader = RequestReader::new();
    // When the first byte of the request being read arrived: the header
    // timeout bounds the whole request, so trickling bytes cannot extend it.
    let mut request_started: Option<Instant> = None;
    loop {
        let request = match reader.next_request() {
            Ok(Some(request)) => {
                request_started = None;
                request
            }
            Ok(None) => {
                let idle = reader.is_idle();
                if idle {
                    conn.set_idle();
                } else {
                    conn.set_busy();
                }
                let wait = match (idle, conn.is_draining()) {
                    (true, true) => timeouts.idle_grace,
                    (true, false) => timeouts.idle_timeout,
                    (false, _) => timeouts
                        .header_timeout
                        .saturating_sub(request_started.get_or_insert_with(Instant::now).elapsed()),
                };
                let deadline = Instant::now() + wait;
                let waiting_idle = idle && !conn.is_draining();
                let read = future::or(
                    async {
                        match stream.readable().await {
                            Ok(()) => Read::Bytes,
                            Err(_) => Read::Closed,
                        }
                    },
                    future::or(
                        async {
                            runtime.sleep_until(deadline).await;
                            Read::TimedOut
                        },
                        future::or(
                            async {
                                // Stop while idle: wait only the grace from now on.
                                if waiting_idle {
                                    stop.stopped().await;
                                    Read::Stopped
                                } else {
                                    future::pending().await
                                }
                            },
                            async {
                                tracker.forced().await;
                                Read::Forced
                            },
                        ),
                    ),
                )
                .await;
                match read {
                    Read::Bytes => match read_into(&mut stream, &mut reader) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    },
                    Read::Stopped => {}
                    Read::Closed | Read::Forced => return,
                    Read::TimedOut if idle => return close(&*runtime, stream, &timeouts).await,
                    Read::TimedOut => {
                        respond_error(&*runtime, &mut stream, 408, &info, &timeouts).await;
                        return close(&*runtime, stream, &timeouts).await;
                    }
                }
                continue;
            }
            Err(status) => {
                conn.set_busy();
                respond_error(&*runtime, &mut stream, status, &info, &timeouts).await;
                conn.set_idle();
                return close(&*runtime, stream, &timeouts).await;
            }
        };
        conn.set_busy();
        let response = match http::handle(&request, &info) {
            Action::Respond(response) => response,
            Action::Sleep { delay, then } => {
                let slept = future::or(
                    async {
                        runtime.sleep_until(Instant::now() + delay).await;
                        true
                    },
                    async {
                        tracker.forced().await;
                        false
                    },
                )
                .await;
                if !slept {
                    return;
                }
                then
            }
        };
        // Decided after the work: a stop during a /sleep still gets a close.
        let closing = !request.keep_alive || conn.is_draining();
        let mut out = Vec::new();
        http::encode(&response, &info, closing, &mut out);
        drop(response);
        let written = future::or(
            async {
                let deadline = Instant::now() + timeouts.write_timeout;
                bounded(&*runtime, deadline, stream.write_all(&out)).await
            },
            async {
                tracker.forced().await;
                None
            },
        )
        .await;
        if !matches!(written, Some(Ok(()))) {
            return;
        }
        drop(out);
        conn.set_idle();
        if closing {
            return close(&*runtime, stream, &timeouts).await;
        }
    }
}

/// Read what is there into the parser, through the thread's scratch buffer.
fn read_into<S: Io>(stream: &mut S, reader: &mut RequestReader) -> io::Result<usize> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let n = stream.try_read(&mut scratch)?;
        reader.push(&scratch[..n]);
        Ok(n)
    })
}

/// `work`, unless `deadline` passes first (`None`).
async fn bounded<R: Runtime + ?Sized, T>(
    runtime: &R,
    deadline: Instant,
    work: impl Future<Output = T>,
) -> Option<T> {
    future::or(async { Some(work.await) }, async {
        runtime.sleep_until(deadline).await;
        None
    })
    .await
}

/// Answer a bad request, bounded like any response by the write timeout (a
/// client that never reads must not hold the connection).
async fn respond_error<R: Runtime + ?Sized, S: Io>(
    runtime: &R,
    stream: &mut S,
    status: u16,
    info: &ServerInfo,
    timeouts: &Timeouts,
) {
    let mut out = Vec::new();
    http::encode(&http::error_response(status), info, true, &mut out);
    let deadline = Instant::now() + timeouts.write_timeout;
    let _ = bounded(runtime, deadline, stream.write_all(&out)).await;
}

/// Close without a reset: send FIN, then read what the client still sends
/// until it closes too (bounded), so unread bytes never turn into an RST
/// that would destroy the response in flight.
async fn close<R: Runtime + ?Sized, S: Io>(runtime: &R, mut stream: S, timeouts: &Timeouts) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + timeouts.idle_grace.max(Duration::from_millis(100));
    let mut sink = [0u8; 512];
    let _ = bounded(runtime, deadline, async {
        // Bounded by the deadline around it.
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}
