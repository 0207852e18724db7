//! Serve an axum app with baton (feature `axum`).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use baton_tokio::handover::Versions;
//! use baton_tokio::{Config, Server, Tokio};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), baton_tokio::Error> {
//!     // Keep-alive connections move at each upgrade (drop it to drain them).
//!     let config = Config::default().state_versions(Versions::single(1));
//!     let mut server = Server::new(Tokio, config)?;
//!     server.listen("http", &"127.0.0.1:3000".parse().unwrap())?;
//!     let app = Router::new().route("/", get(|| async { "hello" }));
//!     baton_tokio::axum::serve(server, app).await?;
//!     Ok(())
//! }
//! ```

use hyper_util::service::TowerToHyperService;

use crate::{DrainReport, Error, Server};

/// Serve `app` on every listener of `server` until it has handed over or
/// stopped and drained, with baton's drain semantics
/// ([`crate::hyper::serve_connection`]).
///
/// Keep-alive connections move to the next generation at an upgrade,
/// instead of draining, when both generations declare
/// [`Config::state_versions`](crate::Config::state_versions): this
/// registers [`crate::hyper::serve_moved`] for them (see
/// [`crate::hyper`] for what moves). The connections' state is hyper's
/// unparsed bytes, the same in every version: any version both share will
/// do.
pub async fn serve(mut server: Server, app: axum::Router) -> Result<DrainReport, Error> {
    let moved = app.clone();
    server.on_moved(crate::hyper::KIND, move |item, conn| {
        let service = TowerToHyperService::new(moved.clone());
        crate::hyper::serve_moved(item, conn, service)
    });
    server
        .serve(move |stream, conn| {
            let service = TowerToHyperService::new(app.clone());
            crate::hyper::serve_connection(stream, conn, service)
        })
        .await
}
