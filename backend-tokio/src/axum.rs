//! Serve an axum app with baton (feature `axum`).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use baton_tokio::{Config, Server, Tokio};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), baton_tokio::Error> {
//!     let mut server = Server::new(Tokio, Config::default())?;
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
pub async fn serve(server: Server, app: axum::Router) -> Result<DrainReport, Error> {
    server
        .serve(move |stream, conn| {
            let service = TowerToHyperService::new(app.clone());
            crate::hyper::serve_connection(stream, conn, service)
        })
        .await
}
