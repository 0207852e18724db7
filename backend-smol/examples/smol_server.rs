// cargo run -p baton-smol --example smol_server -- 127.0.0.1:7000   (then: kill -HUP <pid>; nc 127.0.0.1 7000)
//! A line echo server on smol that upgrades itself on SIGHUP without
//! refusing a connection, and stops gracefully on SIGTERM or SIGINT.
//!
//! Each connection is greeted with the pid and generation that serve it and
//! gets back every line it sends. After a stop (an upgrade succeeded, or
//! SIGTERM), each connection finishes the echo it is writing, is told `bye`
//! and closed; the old process exits once they all are. New connections go
//! to the new generation.
#![forbid(unsafe_code)]

use std::time::Duration;

use baton_smol::{Baton, Config, Connection, ConnectionState, Signal, Stream};
use futures_lite::io::BufReader;
use futures_lite::{future, AsyncBufReadExt, AsyncWriteExt};

pub(crate) fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".to_owned())
        .parse()?;
    smol::block_on(async {
        let baton = Baton::from_env(Config::default())?;
        let listener = baton.listen("echo", &addr)?;
        let mut signals = baton.signals()?;
        let pid = std::process::id();
        eprintln!(
            "[{pid}] generation {} echoing on {}",
            baton.generation(),
            listener.local_addr()?
        );

        let stop = baton.stop_token();
        let tracker = baton.tracker();
        let generation = baton.generation();
        let accept_loop = smol::spawn(async move {
            loop {
                let stopped = async {
                    stop.stopped().await;
                    None
                };
                let accepted = async { Some(listener.accept().await) };
                match future::or(stopped, accepted).await {
                    None => break, // stop accepting; the listener is dropped here
                    Some(Ok(stream)) => {
                        let conn = tracker.track();
                        smol::spawn(echo(stream, conn, generation)).detach();
                    }
                    Some(Err(e)) => eprintln!("[{pid}] accept: {e}"),
                }
            }
        });
        baton.ready()?; // the previous generation, if any, stops now

        while let Some(signal) = signals.recv().await {
            match signal {
                Signal::Upgrade => match baton.upgrade().await {
                    Ok(upgraded) => eprintln!("[{pid}] upgraded: {upgraded}"),
                    Err(e) => eprintln!("[{pid}] upgrade failed, still serving: {e}"),
                },
                Signal::Stop => baton.stop(),
            }
            if baton.is_stopped() {
                break;
            }
        }
        accept_loop.await;
        let report = baton.drain(Duration::from_secs(10)).await;
        eprintln!("[{pid}] drained: {report}; exit");
        Ok(())
    })
}

/// Greet, then echo lines until the client closes or the server stops.
async fn echo(stream: Stream, mut conn: Connection, generation: u64) {
    let stop = conn.tracker().stop_token().clone();
    let mut stream = BufReader::new(stream);
    let greeting = format!(
        "hello from pid {} generation {generation}\n",
        std::process::id()
    );
    if stream
        .get_mut()
        .write_all(greeting.as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut line = String::new();
    while !conn.is_draining() {
        line.clear();
        let read = async { Some(stream.read_line(&mut line).await) };
        let stopped = async {
            stop.stopped().await;
            None
        };
        match future::or(read, stopped).await {
            Some(Ok(0) | Err(_)) => return,
            Some(Ok(_)) => {}
            None => break, // stopped while waiting for a line
        }
        // Busy while echoing: the drain waits for it.
        conn.set_busy();
        if stream.get_mut().write_all(line.as_bytes()).await.is_err() {
            return;
        }
        conn.set_idle();
    }
    let _ = stream.get_mut().write_all(b"bye\n").await;
    let _ = stream.get_mut().close().await;
}
