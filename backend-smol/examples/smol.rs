// cargo run -p baton-smol --example smol -- --listen 127.0.0.1:7000 --control /tmp/smol.sock
//! A small HTTP/1.1 server on smol that upgrades itself without failing a
//! request: `kill -HUP` or `batonctl upgrade --control /tmp/smol.sock`
//! starts the new binary and hands it the sockets; `kill -TERM` or
//! `batonctl stop` stops gracefully. If the new generation dies in its first
//! seconds, the old one serves again.
//!
//! Every request (head only) is answered with the pid and generation that
//! served it (also in `X-Baton-*` headers, which the project's load client
//! checks); keep-alive until the server drains, then `Connection: close`.

use std::path::PathBuf;
use std::sync::Arc;

use baton_smol::{Config, Connection, ListenAddr, Server, Smol, Stream};
use clap::Parser;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// Listen on IP:PORT or unix:/path (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:7000")]
    listen: Vec<ListenAddr>,
    /// Control socket for `batonctl upgrade|status|stop`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// PID file naming the process that serves.
    #[arg(long)]
    pid_file: Option<PathBuf>,
}

fn main() -> Result<(), baton_smol::Error> {
    let args = Args::parse();
    baton_smol::logger::init("smol", "smol");
    let mut config = Config::default();
    config.control = args.control;
    config.pid_file = args.pid_file;
    let executor = Arc::new(async_executor::Executor::new());
    let mut server = Server::new(Smol::new(executor.clone()), config)?;
    for (index, addr) in args.listen.iter().enumerate() {
        server.listen(&format!("http-{index}"), addr)?;
    }
    let generation = server.generation();
    let serve = server.serve(move |stream, conn| http(stream, conn, generation));
    async_io::block_on(executor.run(serve))?;
    Ok(())
}

/// Answer each request head until the client closes or the server drains.
async fn http(mut stream: Stream, mut conn: Connection, generation: u64) {
    let tracker = conn.tracker().clone();
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 1024]);
    while buf.len() < 8192 {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            // Idle, wait for the next request until the drain closes idle
            // connections; in the middle of one, until it forces them.
            let idle = buf.is_empty();
            let closing = async {
                match idle {
                    true => tracker.closing_idle().await,
                    false => tracker.forced().await,
                }
                Ok(0)
            };
            match future::or(stream.read(&mut chunk), closing).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            conn.set_busy();
            continue;
        };
        buf.drain(..end + 4);
        let pid = std::process::id();
        let body = format!("hello from pid {pid} generation {generation} backend smol\n");
        let close = if conn.is_draining() {
            "close"
        } else {
            "keep-alive"
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nx-baton-pid: {pid}\r\nx-baton-generation: {generation}\r\n\
             x-baton-backend: smol\r\nconnection: {close}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all((head + &body).as_bytes()).await.is_err() || close == "close" {
            return;
        }
        conn.set_idle();
    }
}
