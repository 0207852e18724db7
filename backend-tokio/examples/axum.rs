// cargo run -p baton-tokio --features axum --example axum -- --listen 127.0.0.1:3000 --control /tmp/axum.sock
//! An axum app that upgrades itself without failing a request: `kill -HUP`
//! or `batonctl upgrade --control /tmp/axum.sock` starts the new binary and
//! hands it the sockets, and keep-alive connections move to it open;
//! `kill -TERM` or `batonctl stop` stops gracefully. If the new generation
//! dies in its first seconds, the old one serves again.
//!
//! Routes: `/` names the pid and generation that answered (also in
//! `X-Baton-*` headers, which the project's load client checks), `/sleep/{ms}`
//! answers after a delay (in-flight work an upgrade must not cut).

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use baton_tokio::handover::Versions;
use baton_tokio::{Config, ListenAddr, Server, Tokio};
use clap::Parser;

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
    baton_tokio::logger::init("axum", "tokio");
    // Both generations declare it: keep-alive connections move at upgrades.
    let mut config = Config::default().state_versions(Versions::single(1));
    config.control = args.control;
    config.pid_file = args.pid_file;
    let mut server = Server::new(Tokio, config)?;
    for (index, addr) in args.listen.iter().enumerate() {
        server.listen(&format!("http-{index}"), addr)?;
    }
    let (pid, generation) = (std::process::id(), server.generation());
    let headers = [
        ("x-baton-pid", pid.to_string()),
        ("x-baton-generation", generation.to_string()),
        ("x-baton-backend", "axum".to_owned()),
    ];
    let body = format!("hello from pid {pid} generation {generation} backend axum\n");
    let hello = move || async move { (headers, body) };
    let sleep = |Path(ms): Path<u64>| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        format!("slept {ms} ms\n")
    };
    let app = Router::new()
        .route("/", get(hello))
        .route("/sleep/{ms}", get(sleep));
    baton_tokio::axum::serve(server, app).await?;
    Ok(())
}
