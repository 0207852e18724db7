//! axum integration (feature `axum`): serve an axum app on a baton listener
//! and drain it without failing a request.
//!
//! Three pieces, one per thing `axum::serve` needs to hear from baton:
//!
//! - [`AxumListener`]: the listener `axum::serve` accepts. It stops
//!   accepting the moment the generation stops (after a successful upgrade,
//!   the new generation takes every new connection from the shared queue).
//! - [`CloseOnStopLayer`]: once stopped, every response carries
//!   `Connection: close`, so hyper closes each keep-alive connection right
//!   after answering on it, and the client knows not to send on it again.
//! - [`shutdown_signal`]: the future for
//!   `with_graceful_shutdown`. It completes an idle grace after the stop.
//!   hyper's graceful shutdown closes idle keep-alive connections at once,
//!   which races with a client that is just sending its next request on one
//!   (the request is lost). The grace leaves every connection that is in use
//!   the time to get its `Connection: close` answer first; only connections
//!   idle through the grace are closed by hyper.
//!
//! ```no_run
//! use std::future::IntoFuture;
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use baton_tokio::{Baton, Config, Signal};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let baton = Baton::from_env(Config::default())?;
//!     let listener = baton.listen("http", &"127.0.0.1:8080".parse()?)?;
//!     let app = Router::new()
//!         .route("/", get(|| async { "hello" }))
//!         .layer(baton.close_on_stop());
//!     let server = axum::serve(baton.axum_listener(listener), app)
//!         .with_graceful_shutdown(baton.shutdown_signal(Duration::from_secs(1)));
//!     let server = tokio::spawn(server.into_future());
//!     baton.ready()?;
//!
//!     let mut signals = baton.signals()?;
//!     while !baton.is_stopped() {
//!         match signals.recv().await {
//!             Some(Signal::Upgrade) => {
//!                 if let Err(e) = baton.upgrade().await {
//!                     eprintln!("upgrade failed, still serving: {e}");
//!                 }
//!             }
//!             Some(Signal::Stop) | None => baton.stop(),
//!         }
//!     }
//!     // In-flight requests finish; bound the wait.
//!     let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
//!     Ok(())
//! }
//! ```
//!
//! The old generation does not resume serving if the new one dies while it
//! drains (see [`Baton::drain_watching`]): `axum::serve` has ended its
//! accept loop by then. Use [`Baton::drain_watching`] with baton's own
//! connection tracking for that guarantee.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderValue, Response};

use crate::{Baton, Listener, StopSignal, StopToken, Stream};

/// The peer address of a connection accepted by an [`AxumListener`].
#[derive(Debug, Clone)]
pub enum PeerAddr {
    /// A TCP peer.
    Tcp(std::net::SocketAddr),
    /// A Unix socket peer (usually unnamed).
    Unix(tokio::net::unix::SocketAddr),
}

/// A baton [`Listener`] as an [`axum::serve::Listener`], accepting until the
/// generation stops. Made by [`Baton::axum_listener`].
#[derive(Debug)]
pub struct AxumListener {
    listener: Option<Listener>,
    local: io::Result<PeerAddr>,
    stop: StopToken,
}

impl AxumListener {
    /// Accept from `listener` until `stop` is stopped.
    pub fn new(listener: Listener, stop: StopToken) -> Self {
        let local = match &listener {
            Listener::Tcp(l) => l.local_addr().map(PeerAddr::Tcp),
            Listener::Unix(l) => l.local_addr().map(PeerAddr::Unix),
        };
        AxumListener {
            listener: Some(listener),
            local,
            stop,
        }
    }

    async fn accept_one(&mut self) -> (Stream, PeerAddr) {
        loop {
            let Some(listener) = &self.listener else {
                // Stopped: the next generation accepts. axum ends its accept
                // loop when the shutdown signal completes.
                return std::future::pending().await;
            };
            let accepted = tokio::select! {
                biased;
                _ = self.stop.stopped() => None,
                accepted = accept(listener) => Some(accepted),
            };
            let Some(accepted) = accepted else {
                // Drop our fd of the socket: this process no longer takes
                // connections from the queue it shares with the next one.
                self.listener = None;
                continue;
            };
            match accepted {
                Ok(accepted) => return accepted,
                Err(e) if is_resource_exhaustion(&e) => {
                    // EMFILE and friends: accepting again at once would spin.
                    log::warn!("accept: {e}; backing off");
                    tokio::select! {
                        _ = self.stop.stopped() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                // A connection reset before it was accepted concerns its client only.
                Err(_) => {}
            }
        }
    }
}

async fn accept(listener: &Listener) -> io::Result<(Stream, PeerAddr)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            stream.set_nodelay(true)?;
            Ok((Stream::Tcp(stream), PeerAddr::Tcp(peer)))
        }
        Listener::Unix(l) => {
            let (stream, peer) = l.accept().await?;
            Ok((Stream::Unix(stream), PeerAddr::Unix(peer)))
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl axum::serve::Listener for AxumListener {
    type Io = Stream;
    type Addr = PeerAddr;

    fn accept(&mut self) -> impl Future<Output = (Self::Io, Self::Addr)> + Send {
        self.accept_one()
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        match &self.local {
            Ok(addr) => Ok(addr.clone()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// A [`tower_layer::Layer`] for axum's `Router::layer`: once the
/// generation is stopped, responses carry `Connection: close`. Made by
/// [`Baton::close_on_stop`].
#[derive(Debug, Clone)]
pub struct CloseOnStopLayer {
    stop: StopToken,
}

impl CloseOnStopLayer {
    /// Mark responses once `stop` is stopped.
    pub fn new(stop: StopToken) -> Self {
        CloseOnStopLayer { stop }
    }
}

impl<S> tower_layer::Layer<S> for CloseOnStopLayer {
    type Service = CloseOnStop<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CloseOnStop {
            inner,
            stop: self.stop.clone(),
        }
    }
}

/// The service [`CloseOnStopLayer`] wraps around the app.
#[derive(Debug, Clone)]
pub struct CloseOnStop<S> {
    inner: S,
    stop: StopToken,
}

impl<S, Req, B> tower_service::Service<Req> for CloseOnStop<S>
where
    S: tower_service::Service<Req, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let response = self.inner.call(request);
        let stop = self.stop.clone();
        Box::pin(async move {
            let mut response = response.await?;
            // Decided after the handler ran: a stop during a slow request
            // still closes its connection.
            if stop.is_stopped() {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        })
    }
}

/// The future for axum's `with_graceful_shutdown`: completes `idle_grace`
/// after `stop` is stopped. Choose a grace longer than a client's pause
/// between two requests on a keep-alive connection.
pub async fn shutdown_signal(stop: StopToken, idle_grace: Duration) {
    stop.stopped().await;
    tokio::time::sleep(idle_grace).await;
}

impl Baton {
    /// `listener` for `axum::serve`: accepts until this generation stops.
    pub fn axum_listener(&self, listener: Listener) -> AxumListener {
        AxumListener::new(listener, self.stop_token())
    }

    /// The layer that adds `Connection: close` to responses once this
    /// generation stops: `Router::layer(baton.close_on_stop())`.
    pub fn close_on_stop(&self) -> CloseOnStopLayer {
        CloseOnStopLayer::new(self.stop_token())
    }

    /// The future for `with_graceful_shutdown`: see [`shutdown_signal`].
    pub fn shutdown_signal(
        &self,
        idle_grace: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        shutdown_signal(self.stop_token(), idle_grace)
    }
}
