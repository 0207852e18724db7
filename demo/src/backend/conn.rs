//! One HTTP/1.1 keep-alive connection on an async runtime, written once for
//! tokio and smol: [`crate::http`] parses and answers, this drives the I/O
//! with the drain semantics of DESIGN.md. After the stop, a request in
//! progress is finished and answered with `Connection: close`; an idle
//! connection waits the idle grace for one last request, then closes.
//!
//! With `--handover on`, a connection moves to the next generation instead
//! at its next request boundary, while [`Connection::can_move`] says so: an
//! idle one as soon as moves open, a busy one right after its response
//! (answered with keep-alive then: the client never notices). It carries
//! the bytes read and not yet answered (a pipelined request), which the next
//! generation parses first ([`resume`]).
//!
//! An idle connection holds no buffer: it waits for readability, then
//! reads into a per-thread scratch buffer, and the parser keeps only the
//! bytes of a request not yet complete.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::handover::Item;
use baton_core::runtime::{BoxFuture, Runtime};
use baton_core::{Connection, Tracker};
use futures_lite::{future, FutureExt};

use crate::http::{self, Action, RequestReader, ServerInfo};

/// How much one read takes at most.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// The scratch buffer reads land in before the parser copies what it
    /// needs: one per worker thread, not one per connection.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
}

/// A runtime's stream, as this module needs it.
pub trait Io: Sized + Send + Sync + 'static {
    /// Resolve once the stream may be readable.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Read what is there without waiting (`WouldBlock` if nothing).
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Send FIN.
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// The socket, no longer watched by the runtime, to move it.
    fn into_fd(self) -> io::Result<OwnedFd>;
    /// The stream of a connection that moved here (the socket in `item`).
    fn from_moved(item: &mut Item) -> io::Result<Self>;
}

/// How connections behave, from the demo's flags.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// After a stop, how long an idle connection may send one last request.
    pub idle_grace: Duration,
    /// How long a keep-alive connection may stay idle.
    pub idle_timeout: Duration,
    /// How long a whole request may take once its first byte arrived.
    pub header_timeout: Duration,
    /// How long writing a response may take.
    pub write_timeout: Duration,
    /// Move connections to the next generation at an upgrade (`--handover`).
    pub handover: bool,
}

/// What a read turned up.
enum Read {
    Bytes,
    Closed,
    TimedOut,
    /// What an idle connection waits for came: see [`Wake`].
    Stopped,
    Forced,
}

/// What a connection waits for besides its bytes and its deadline.
#[derive(Clone, Copy)]
enum Wake {
    /// Idle without handover: the stop (it then waits only the grace).
    Stop,
    /// Idle with handover: moves opening (it offers itself), or the idle
    /// grace after a stop ending (it closes).
    MovingOrClosingIdle,
    /// Anything else: the drain deadline forcing every connection closed.
    Forced,
}

/// Serve one connection until the client closes it, it times out, the
/// drain closes it, the drain deadline forces it or it moves to the next
/// generation. `reader` holds the bytes it came with: none when accepted,
/// those read and not answered when it moved here.
///
/// # Memory
///
/// Thousands of connections wait here between requests, so what this
/// future holds while it waits is what an idle connection costs: the
/// stream, the connection's handle, two `Arc`s, the settings, an empty
/// parser and the small wait of `wait_for_bytes`. Everything a request
/// needs (the request itself, the response and its bytes, the write, the
/// close) lives in futures boxed where they start, allocated when a request
/// is complete and freed once it is answered: the size of a future is that
/// of its largest await point, and this one is allocated per connection.
/// For the same reason this is a plain `fn` returning an `async move`
/// block: an `async fn` keeps a second copy of its arguments.
#[allow(clippy::manual_async_fn)] // On purpose, see above.
pub fn serve<R: Runtime, S: Io>(
    runtime: Arc<R>,
    mut stream: S,
    mut conn: Connection,
    mut reader: RequestReader,
    info: Arc<ServerInfo>,
    settings: Settings,
) -> impl Future<Output = ()> + Send {
    async move {
        // When the first byte of the request being read arrived: the header
        // timeout bounds the whole request, so trickling bytes cannot extend it.
        let mut request_started: Option<Instant> = None;
        loop {
            // Answer what is complete; no await below holds the parser's
            // result, so the wait for more bytes stays small.
            match reader.next_request() {
                Ok(Some(request)) => {
                    request_started = None;
                    conn.set_busy();
                    let answered = Box::pin(answer(
                        &*runtime,
                        &mut stream,
                        &conn,
                        request,
                        &info,
                        &settings,
                    ))
                    .await;
                    let Some(closing) = answered else {
                        return;
                    };
                    conn.set_idle();
                    if closing {
                        return Box::pin(close(&*runtime, stream, &settings)).await;
                    }
                    // A request boundary: the response is out, what follows
                    // it (a pipelined request) moves along unread.
                    if let Some(version) = conn.can_move() {
                        return offer(stream, conn, &mut reader, version);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(status) => {
                    conn.set_busy();
                    Box::pin(respond_error(
                        &*runtime,
                        &mut stream,
                        status,
                        &info,
                        &settings,
                    ))
                    .await;
                    conn.set_idle();
                    return Box::pin(close(&*runtime, stream, &settings)).await;
                }
            }
            let idle = reader.is_idle();
            if idle {
                conn.set_idle();
                if let Some(version) = conn.can_move() {
                    return offer(stream, conn, &mut reader, version);
                }
            } else {
                conn.set_busy();
            }
            let wait = match (idle, conn.is_draining()) {
                (true, true) => settings.idle_grace,
                (true, false) => settings.idle_timeout,
                (false, _) => settings
                    .header_timeout
                    .saturating_sub(request_started.get_or_insert_with(Instant::now).elapsed()),
            };
            let deadline = Instant::now() + wait;
            let wake = match (idle, settings.handover) {
                (true, false) if !conn.is_draining() => Wake::Stop,
                // Not the stop: the lifecycle's idle grace after it stands
                // in for this connection's own.
                (true, true) if !conn.tracker().is_closing_idle() => Wake::MovingOrClosingIdle,
                _ => Wake::Forced,
            };
            match wait_for_bytes(&*runtime, &stream, conn.tracker(), deadline, wake).await {
                Read::Bytes => match read_into(&mut stream, &mut reader) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                },
                // Moves opened (offered at the top of the loop), or the
                // stop came (the grace starts).
                Read::Stopped if !conn.tracker().is_closing_idle() => {}
                // The idle grace ended without a move.
                Read::Stopped => return Box::pin(close(&*runtime, stream, &settings)).await,
                Read::Closed | Read::Forced => return,
                Read::TimedOut if idle => {
                    return Box::pin(close(&*runtime, stream, &settings)).await
                }
                Read::TimedOut => {
                    Box::pin(respond_error(&*runtime, &mut stream, 408, &info, &settings)).await;
                    return Box::pin(close(&*runtime, stream, &settings)).await;
                }
            }
        }
    }
}

/// Wait until the stream may be readable, the deadline passes, or what
/// `wake` names happens.
///
/// Kept apart and small: this is what an idle connection waits in.
fn wait_for_bytes<'a, R: Runtime + ?Sized, S: Io>(
    runtime: &'a R,
    stream: &'a S,
    tracker: &'a Tracker,
    deadline: Instant,
    wake: Wake,
) -> impl Future<Output = Read> + Send + 'a {
    // `or` polls its first future first: bytes that are there win over a
    // deadline that passed meanwhile. A plain `fn`: no state of its own
    // around the `Or` (an `async fn` would also keep its arguments twice).
    future::or(
        async move {
            match stream.readable().await {
                Ok(()) => Read::Bytes,
                Err(_) => Read::Closed,
            }
        },
        future::or(
            async move {
                runtime.sleep_until(deadline).await;
                Read::TimedOut
            },
            async move {
                // One listener, not two: an idle connection waits for the
                // stop or the moves only (the drain forces connections
                // closed only after a stop, and after the idle grace, which
                // ends its wait too); any other waits for the force.
                match wake {
                    Wake::Stop if !tracker.is_forced() => {
                        tracker.stop_token().stopped().await;
                        Read::Stopped
                    }
                    Wake::MovingOrClosingIdle if !tracker.is_forced() => {
                        tracker.moving_or_closing_idle().await;
                        if tracker.is_forced() {
                            Read::Forced
                        } else {
                            Read::Stopped
                        }
                    }
                    _ => {
                        tracker.forced().await;
                        Read::Forced
                    }
                }
            },
        ),
    )
}

/// Answer `request`: route it, wait if it is a `/sleep`, write the
/// response. `Some(closing)` once written (closing: the connection ends
/// after it), `None` if the write failed or the drain forced the close.
async fn answer<R: Runtime + ?Sized, S: Io>(
    runtime: &R,
    stream: &mut S,
    conn: &Connection,
    request: http::Request,
    info: &ServerInfo,
    settings: &Settings,
) -> Option<bool> {
    let tracker = conn.tracker();
    let response = match http::handle(&request, info) {
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
                return None;
            }
            then
        }
    };
    // Decided after the work: a stop during a /sleep still gets a close,
    // unless the connection moves on right after this response.
    let closing = !request.keep_alive || (conn.is_draining() && conn.can_move().is_none());
    drop(request);
    let mut out = Vec::new();
    http::encode(&response, info, closing, &mut out);
    drop(response);
    let written = future::or(
        async {
            let deadline = Instant::now() + settings.write_timeout;
            bounded(runtime, deadline, stream.write_all(&out)).await
        },
        async {
            tracker.forced().await;
            None
        },
    )
    .await;
    matches!(written, Some(Ok(()))).then_some(closing)
}

/// Move the connection to the next generation: its socket, and the bytes
/// read and not answered as the payload. Not reading it any more, this
/// generation keeps no copy. A socket the runtime cannot let go of is
/// closed (the client sees the close of a drain).
fn offer<S: Io>(stream: S, conn: Connection, reader: &mut RequestReader, version: u32) {
    match stream.into_fd() {
        Ok(fd) => {
            let item = Item::new(http::MOVED_KIND, version, reader.take_unread());
            conn.offer(item.with_fds([fd]));
        }
        Err(e) => log::warn!("moves: cannot take a connection's socket: {e}; closed"),
    }
}

/// Serve a connection that moved here (or came back from a failed move)
/// from its item: the socket, and the bytes to parse before reading more.
pub fn resume<R: Runtime, S: Io>(
    runtime: Arc<R>,
    mut item: Item,
    conn: Connection,
    info: Arc<ServerInfo>,
    settings: Settings,
) -> BoxFuture<'static, ()> {
    match S::from_moved(&mut item) {
        Ok(stream) => {
            let mut reader = RequestReader::new();
            reader.push(&item.payload);
            // Boxed here once: the driver's own box around it is small.
            serve(runtime, stream, conn, reader, info, settings).boxed()
        }
        Err(e) => {
            log::warn!("moves: cannot serve a moved connection: {e}; closed");
            future::ready(()).boxed()
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

/// Read and drop what is there, through the thread's scratch buffer.
fn discard<S: Io>(stream: &mut S) -> io::Result<usize> {
    SCRATCH.with(|scratch| stream.try_read(&mut scratch.borrow_mut()))
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
    settings: &Settings,
) {
    let mut out = Vec::new();
    http::encode(&http::error_response(status), info, true, &mut out);
    let deadline = Instant::now() + settings.write_timeout;
    let _ = bounded(runtime, deadline, stream.write_all(&out)).await;
}

/// Close without a reset: send FIN, then read what the client still sends
/// until it closes too (bounded), so unread bytes never turn into an RST
/// that would destroy the response in flight.
async fn close<R: Runtime + ?Sized, S: Io>(runtime: &R, mut stream: S, settings: &Settings) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + settings.idle_grace.max(Duration::from_millis(100));
    let _ = bounded(runtime, deadline, async {
        // Bounded by the deadline around it. What arrives is discarded
        // through the thread's scratch buffer: no buffer of its own.
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match discard(&mut stream) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}
