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

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::{Connection, StopToken, Stream};

/// The error type hyper accepts from services and bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serve `service` on one connection until the client closes it, the drain
/// closes it, or the drain deadline forces it.
pub async fn serve_connection<S, B>(stream: Stream, conn: Connection, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let tracker = conn.tracker().clone();
    let stop = tracker.stop_token().clone();
    let service = Tracked {
        inner: service,
        state: Arc::new(Mutex::new(InFlight { conn, requests: 0 })),
        stop: stop.clone(),
    };
    let http = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut http = pin!(http);
    tokio::select! {
        _ = http.as_mut() => return,
        _ = stop.stopped() => {}
        _ = tracker.forced() => return,
    }
    // Stopped: responses now close their connection; give an idle one the
    // grace to send one last request before hyper shuts it down.
    tokio::select! {
        _ = http.as_mut() => return,
        _ = tracker.closing_idle() => http.as_mut().graceful_shutdown(),
        _ = tracker.forced() => return,
    }
    tokio::select! {
        _ = http.as_mut() => {}
        _ = tracker.forced() => {}
    }
}

/// A connection's guard and how many of its requests are in progress.
#[derive(Debug)]
struct InFlight {
    conn: Connection,
    requests: usize,
}

/// Marks the connection busy while a request is in progress, and adds
/// `Connection: close` to responses once the server stops.
#[derive(Debug)]
struct Tracked<S> {
    inner: S,
    state: Arc<Mutex<InFlight>>,
    stop: StopToken,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        update(&self.state, |in_flight| {
            in_flight.requests += 1;
            in_flight.conn.set_busy();
        });
        let response = self.inner.call(request);
        let (state, stop) = (self.state.clone(), self.stop.clone());
        Box::pin(async move {
            let mut response = response.await;
            if let Ok(response) = &mut response {
                if stop.is_stopped() {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
            }
            update(&state, |in_flight| {
                in_flight.requests = in_flight.requests.saturating_sub(1);
                if in_flight.requests == 0 {
                    in_flight.conn.set_idle();
                }
            });
            response
        })
    }
}

fn update(state: &Mutex<InFlight>, f: impl FnOnce(&mut InFlight)) {
    f(&mut state.lock().unwrap_or_else(|e| e.into_inner()));
}
