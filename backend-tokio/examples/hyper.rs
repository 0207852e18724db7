// cargo run -p baton-tokio --features hyper --example hyper -- --listen 127.0.0.1:3000 --control /tmp/hyper.sock
//! A plain hyper 1.x service that upgrades itself without failing a
//! request: `kill -HUP` or `batonctl upgrade --control /tmp/hyper.sock`
//! starts the new binary and hands it the sockets, and keep-alive
//! connections move to it open; `kill -TERM` or `batonctl stop` stops
//! gracefully. If the new generation dies in its first seconds, the old one
//! serves again.
//!
//! Every request is answered with the pid and generation that served it
//! (also in `X-Baton-*` headers, which the project's load client checks);
//! `/sleep/{ms}` answers after a delay (in-flight work an upgrade must not
//! cut, and a connection that moves only once it is answered).

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use baton_tokio::handover::Versions;
use baton_tokio::{Config, ListenAddr, Server, Tokio};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Request, Response};

#[derive(Parser)]
struct Args {
    /// Listen on IP:PORT or unix:/path (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:3000")]
    listen: Vec<ListenAddr>,
    /// Control socket for `batonctl upgrade|status|stop`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// PID file naming the process that serves.
    #[arg(long)]
    pid_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), baton_tokio::Error> {
    let args = Args::parse();
    baton_tokio::logger::init("hyper", "tokio");
    // Both generations declare it: keep-alive connections move at upgrades.
    let mut config = Config::default().state_versions(Versions::single(1));
    config.control = args.control;
    config.pid_file = args.pid_file;
    let mut server = Server::new(Tokio, config)?;
    for (index, addr) in args.listen.iter().enumerate() {
        server.listen(&format!("http-{index}"), addr)?;
    }
    let (pid, generation) = (std::process::id(), server.generation());
    let hello = move |request: Request<Incoming>| async move {
        if let Some(ms) = request.uri().path().strip_prefix("/sleep/") {
            let ms = ms.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let body = Full::new(Bytes::from(format!("slept {ms} ms\n")));
            return Ok(Response::new(body));
        }
        let body = format!("hello from pid {pid} generation {generation} backend hyper\n");
        let mut response = Response::new(Full::new(Bytes::from(body)));
        let headers = response.headers_mut();
        headers.insert("x-baton-pid", HeaderValue::from(pid));
        headers.insert("x-baton-generation", HeaderValue::from(generation));
        headers.insert("x-baton-backend", HeaderValue::from_static("hyper"));
        Ok::<_, Infallible>(response)
    };
    server.on_moved(baton_tokio::hyper::KIND, move |item, conn| {
        baton_tokio::hyper::serve_moved(item, conn, service_fn(hello))
    });
    server
        .serve(move |stream, conn| {
            baton_tokio::hyper::serve_connection(stream, conn, service_fn(hello))
        })
        .await?;
    Ok(())
}
