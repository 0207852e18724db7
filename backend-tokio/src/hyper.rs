//! Serve a hyper 1.x service on baton's connections (feature `hyper`).
//!
//! [`serve_connection`] gives an HTTP/1.1 connection baton's drain
//! semantics, which hyper-util's graceful shutdown alone does not: hyper
//! closes an idle keep-alive connection the moment it is told to shut down,
//! and that races with a client that is just sending its next request on it
//! (the request is lost). So after the stop, every response carries
//! `Connection: close` (hyper closes the connection right after it), and
//! only a connection still idle after the idle grace
//! ([`crate::Tracker::closing_idle`]) is shut down by hyper.
//! A request in progress is tracked as busy, so the drain waits for it.
//!
//! # Keep-alive connections move at an upgrade
//!
//! With [`Config::state_versions`](crate::Config::state_versions) in both
//! generations and [`serve_moved`] registered for [`KIND`]
//! (`server.on_moved(KIND, …)`; `baton_tokio::axum::serve` registers it),
//! keep-alive connections move to the next generation open instead: no
//! reconnect, no close race. What hyper's API allows, and how it is used:
//!
//! - `http1::Connection::graceful_shutdown` on a connection with no
//!   request in progress ends it at once and writes nothing; on one whose
//!   response head is written, it ends it once that response is flushed.
//!   Polled through `without_shutdown`, the connection then gives back the
//!   socket and `Parts::read_buf`, the bytes hyper read and did not parse:
//!   a next request that was arriving (part of it, or several pipelined).
//!   The socket and those bytes are the item; the next generation reads
//!   the bytes before the socket ([`serve_moved`]). A request is never read
//!   twice nor lost: hyper parsed it and it is answered here, or it is in
//!   those bytes or still in the socket.
//! - A request hyper has parsed is answered here first, without
//!   `Connection: close`, and the connection moves right after: a response
//!   hands hyper its head in the same poll that ends the service's future,
//!   so the shutdown, which this task can only call between two polls, never
//!   comes before the head is written (hyper would add `Connection: close`
//!   to it). A response still streaming holds the move until it ends (or
//!   the drain deadline cuts it, as without a handover).
//! - A connection that has had no response yet is the exception: hyper's
//!   keep-alive state starts busy, not idle, so `graceful_shutdown` on one
//!   that has read part of its first request waits for the rest and
//!   answers it with `Connection: close`. Such a connection has written
//!   nothing, so its parts are taken at once (`into_parts`, which before
//!   the end risks only bytes not flushed yet: there are none). This is
//!   how a connection that moved with half a request moves again.
//!
//! What cannot move drains as without a handover: `Connection: close` on
//! its next response, closed if still idle after the idle grace. So does a
//! connection whose move failed (the next generation refused it, aborted
//! or died before the commit): it comes back whole to [`serve_moved`]
//! here. For a connection that can move, that is the only way its client
//! has to connect again.
//!
//! - A connection whose last request had a body: hyper does not say
//!   whether it read that body to its end. When the service drops a body
//!   unread, hyper stops reading it and ends the connection after the
//!   response, silently: its `read_buf` would then hold the rest of a
//!   body, not a request. Its next request, if it has no body, is
//!   answered here without `Connection: close` and the connection moves
//!   after it.
//! - One whose last exchange ends it anyway: HTTP/1.0, or `Connection:
//!   close` in the request or the response.
//! - One that asked for an upgrade (an `Upgrade` header, `CONNECT`):
//!   hyper fulfils upgrades only through `with_upgrades`, which has no
//!   `without_shutdown`. The connection switches to it before that
//!   request's response is written, for good.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::body::{Body, Buf, Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, Notify};

use crate::handover::Item;
use crate::{Connection, Stream, Tracker};

/// The kind of the items [`serve_connection`] offers and [`serve_moved`]
/// resumes: register `server.on_moved(KIND, …)`.
pub const KIND: &str = "hyper";

/// The error type hyper accepts from services and bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serve `service` on one connection until the client closes it, the drain
/// closes it, the drain deadline forces it, or it moves to the next
/// generation.
pub async fn serve_connection<S, B>(stream: Stream, conn: Connection, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static> + Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    let io = Replay {
        unread: Bytes::new(),
        stream,
    };
    serve(io, conn, service).await;
}

/// Serve a connection that [`serve_connection`] (or this function) offered,
/// as they do: in the next generation once it moved, or here again if the
/// move failed. The item's payload is what hyper had read from the socket
/// and not parsed; it is read again before the socket.
pub async fn serve_moved<S, B>(mut item: Item, conn: Connection, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static> + Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    match Stream::from_moved(&mut item) {
        Ok(stream) => {
            let unread = Bytes::from(std::mem::take(&mut item.payload));
            serve(Replay { unread, stream }, conn, service).await;
        }
        Err(e) => log::warn!("moves: a {KIND} connection cannot be served: {e}; closed"),
    }
}

/// Serve `service` on `io` with baton's drain semantics; once moves are
/// open, offer the connection at its first safe point.
async fn serve<S, B>(io: Replay, conn: Connection, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static> + Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    let tracker = conn.tracker().clone();
    let books = Arc::new(Books {
        state: Mutex::new(State {
            conn: Some(conn),
            requests: 0,
            answered: false,
            reusable: true,
            upgrade: None,
        }),
        changed: Notify::new(),
    });
    let service = Tracked {
        inner: Box::new(service),
        books: books.clone(),
        tracker: tracker.clone(),
    };
    let mut http = http1::Builder::new().serve_connection(TokioIo::new(io), service);
    let mut closing = false;
    // Serve until the connection may move (at this version) or ends.
    let (version, answered) = loop {
        let (upgrade, idle, answered, reusable) =
            books.update(|s| (s.upgrade.take(), s.requests == 0, s.answered, s.reusable));
        if let Some(go_on) = upgrade {
            let http = http.with_upgrades();
            let _ = go_on.send(());
            return drain(http, &tracker, |http| http.graceful_shutdown()).await;
        }
        if idle && !closing {
            if let Some(version) = tracker.move_version().filter(|_| reusable) {
                break (version, answered);
            }
            if tracker.is_closing_idle() {
                Pin::new(&mut http).graceful_shutdown();
                closing = true;
            }
        }
        // Wake for moves while none are open, for the idle grace after.
        let waiting = !closing && !tracker.is_closing_idle();
        let moves_open = tracker.move_version().is_some();
        tokio::select! {
            _ = &mut http => return,
            () = books.changed.notified() => {}
            () = tracker.moving_or_closing_idle(), if waiting && !moves_open => {}
            () = tracker.closing_idle(), if waiting && moves_open => {}
            () = tracker.forced() => return,
        }
    };
    let parts = if answered {
        Pin::new(&mut http).graceful_shutdown();
        tokio::select! {
            parts = http.without_shutdown() => parts,
            () = tracker.forced() => return,
        }
    } else {
        // Nothing written: no bytes to flush (see the module docs).
        Ok(http.into_parts())
    };
    let Ok(parts) = parts else { return };
    let (stream, unread) = parts.io.into_inner().into_moved(&parts.read_buf);
    let (Some(conn), Ok(fd)) = (books.update(|s| s.conn.take()), stream.into_fd()) else {
        return;
    };
    conn.offer(Item::new(KIND, version, unread).with_fds([fd]));
}

/// Run `http` until it ends or the drain forces it; once idle connections
/// must close, `shutdown` it (hyper then closes it when idle).
async fn drain<F: Future + Unpin>(mut http: F, tracker: &Tracker, shutdown: fn(Pin<&mut F>)) {
    tokio::select! {
        _ = &mut http => return,
        () = tracker.closing_idle() => shutdown(Pin::new(&mut http)),
        () = tracker.forced() => return,
    }
    tokio::select! {
        _ = &mut http => {}
        () = tracker.forced() => {}
    }
}

/// What a connection's task and its service share.
#[derive(Debug)]
struct Books {
    state: Mutex<State>,
    /// Notified when a response is handed to hyper, or an upgrade is asked
    /// for: the task looks at the state again.
    changed: Notify,
}

impl Books {
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[derive(Debug)]
struct State {
    /// The guard; taken when the connection moves.
    conn: Option<Connection>,
    /// Requests hyper parsed and has no response head for yet.
    requests: usize,
    /// Whether hyper was handed a response on this connection.
    answered: bool,
    /// Whether hyper keeps the connection open after the last response and
    /// nothing of its request is left unread (see the module docs).
    reusable: bool,
    /// Set by an upgrade request, whose response waits until the task has
    /// switched hyper to `with_upgrades`.
    upgrade: Option<oneshot::Sender<()>>,
}

/// Marks the connection busy while a request is in progress, notes whether
/// it may move after the response, and adds `Connection: close` to
/// responses once the server stops (unless the connection moves instead).
#[derive(Debug)]
struct Tracked<S> {
    /// Boxed: hyper's `without_shutdown` needs the service `Unpin`.
    inner: Box<S>,
    books: Arc<Books>,
    tracker: Tracker,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Future: Send + 'static>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let upgrade = request.extensions().get::<OnUpgrade>().is_some();
        let reusable = !upgrade
            && request.version() == Version::HTTP_11
            && request.body().is_end_stream()
            && !asks_close(request.headers());
        let (switched, wait_switch) = upgrade.then(oneshot::channel).unzip();
        self.books.update(|state| {
            state.requests += 1;
            state.upgrade = switched;
            if let Some(conn) = &mut state.conn {
                conn.set_busy();
            }
        });
        if upgrade {
            self.books.changed.notify_one();
        }
        let response = self.inner.call(request);
        let (books, tracker) = (self.books.clone(), self.tracker.clone());
        Box::pin(async move {
            if let Some(rx) = wait_switch {
                let _ = rx.await;
            }
            let mut response = response.await;
            let mut reusable =
                reusable && response.as_ref().is_ok_and(|r| !asks_close(r.headers()));
            if let Ok(response) = &mut response {
                let moving = reusable && tracker.move_version().is_some();
                if tracker.stop_token().is_stopped() && !moving && !upgrade {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    reusable = false;
                }
            }
            books.update(|state| {
                state.requests = state.requests.saturating_sub(1);
                state.answered = true;
                state.reusable = reusable;
                if state.requests == 0 {
                    if let Some(conn) = &mut state.conn {
                        conn.set_idle();
                    }
                }
            });
            books.changed.notify_one();
            response
        })
    }
}

/// Whether `headers` carry `Connection: close`.
fn asks_close(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
        })
    })
}

/// A connection's stream, behind bytes already read from it and not parsed
/// (those a connection moved with): they are read first. hyper's own
/// `Rewind` does this but is private.
#[derive(Debug)]
struct Replay {
    unread: Bytes,
    stream: Stream,
}

impl Replay {
    /// The stream, and what was read from it and not parsed: hyper's
    /// `read_buf`, then what hyper has not taken from here yet.
    fn into_moved(self, read_buf: &[u8]) -> (Stream, Vec<u8>) {
        (self.stream, [read_buf, &self.unread].concat())
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unread.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::StopToken;

    /// Answers an `Upgrade` request with 101 and then echoes, as a
    /// WebSocket handler would take over the connection.
    async fn echo(mut request: Request<Incoming>) -> Result<Response<Empty<Bytes>>, Infallible> {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut word = [0u8; 4];
            if io.read_exact(&mut word).await.is_ok() {
                let _ = io.write_all(&word).await;
            }
        });
        let mut response = Response::new(Empty::new());
        *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(hyper::header::UPGRADE, HeaderValue::from_static("echo"));
        Ok(response)
    }

    #[tokio::test]
    async fn an_upgrade_request_switches_to_hyper_upgrades_and_is_fulfilled() {
        let (ours, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let conn = Tracker::new(StopToken::new()).track();
        let service = hyper::service::service_fn(echo);
        tokio::spawn(serve_connection(Stream::Unix(ours), conn, service));
        let exchange = async {
            peer.write_all(
                b"GET / HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await?;
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(peer.read_u8().await?);
            }
            peer.write_all(b"ping").await?;
            let mut word = [0u8; 4];
            peer.read_exact(&mut word).await?;
            Ok::<_, io::Error>((head, word))
        };
        let (head, word) = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("within 10 s")
            .unwrap();
        assert!(
            head.starts_with(b"HTTP/1.1 101 "),
            "{}",
            String::from_utf8_lossy(&head)
        );
        assert_eq!(&word, b"ping");
    }

    #[tokio::test]
    async fn replay_reads_the_unread_bytes_first_and_gives_back_the_rest() {
        let (ours, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let mut replay = Replay {
            unread: Bytes::from_static(b"GET / HT"),
            stream: Stream::Unix(ours),
        };
        peer.write_all(b"TP/1.1\r\n").await.unwrap();
        let mut head = [0u8; 4];
        replay.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET ");
        // hyper had read "GET " and parsed none of it: it moves first.
        let (mut stream, unread) = replay.into_moved(&head);
        assert_eq!(unread, b"GET / HT");
        let mut rest = [0u8; 8];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"TP/1.1\r\n");
    }

    #[test]
    fn connection_close_is_any_close_token() {
        let mut headers = HeaderMap::new();
        assert!(!asks_close(&headers));
        headers.append(CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!asks_close(&headers));
        headers.append(CONNECTION, HeaderValue::from_static("Upgrade, CLOSE"));
        assert!(asks_close(&headers));
    }
}
