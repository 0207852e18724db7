// cargo run -p baton-mio --example mio -- --listen 127.0.0.1:7000 --control /tmp/mio.sock
//! A small HTTP/1.1 server on a hand-driven mio loop that upgrades itself
//! without failing a request: `kill -HUP` or `batonctl upgrade --control
//! /tmp/mio.sock` starts the new binary and hands it the sockets; `kill
//! -TERM` or `batonctl stop` stops gracefully. If the new generation dies in
//! its first seconds, the old one serves again.
//!
//! Every request (head only) is answered with the pid and generation that
//! served it; keep-alive until the server drains, then `connection: close`.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;

use baton_mio::{Baton, Config, Connection, Event, ListenAddr, Stream, TOKENS};
use clap::Parser;
use mio::{Events, Interest, Poll, Token};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    baton_mio::logger::init("mio", "mio");
    let mut config = Config::default();
    config.control = args.control;
    config.pid_file = args.pid_file;
    let mut poll = Poll::new()?;
    let mut baton = Baton::new(config, poll.registry(), Token(0))?;
    for (index, addr) in args.listen.iter().enumerate() {
        baton.listen(&format!("http-{index}"), addr)?;
    }
    baton.ready()?;
    // Each connection: its stream, its tracking guard, the bytes of a head.
    let mut conns: HashMap<Token, (Stream, Connection, Vec<u8>)> = HashMap::new();
    let (mut events, mut next) = (Events::with_capacity(256), TOKENS);
    loop {
        match poll.poll(&mut events, baton.next_timeout()) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            result => result?,
        }
        baton.process(&events);
        while let Some(event) = baton.next_event() {
            match event {
                Event::Accept { listener } => {
                    while let Some((mut stream, conn)) = baton.accept(listener) {
                        next += 1;
                        poll.registry()
                            .register(&mut stream, Token(next), Interest::READABLE)?;
                        conns.insert(Token(next), (stream, conn, Vec::new()));
                    }
                }
                // Connections waiting for a request close; busy ones too at
                // ForceClose. Dropping one closes it.
                Event::CloseIdle => conns.retain(|_, (_, conn, _)| conn.is_busy()),
                Event::ForceClose => conns.clear(),
                Event::Drained(_) => return Ok(()),
                _ => {}
            }
        }
        for event in events.iter().filter(|e| !baton.owns(e.token())) {
            let Some((stream, conn, buf)) = conns.get_mut(&event.token()) else {
                continue;
            };
            if !serve(stream, conn, buf, baton.generation()) {
                conns.remove(&event.token());
            }
        }
    }
}

/// Read what is there and answer every complete head; false to close.
fn serve(stream: &mut Stream, conn: &mut Connection, buf: &mut Vec<u8>, generation: u64) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return false,
        }
        conn.set_busy();
    }
    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        buf.drain(..end + 4);
        let (pid, close) = (std::process::id(), conn.is_draining());
        let body = format!("hello from pid {pid} generation {generation} backend mio\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nx-baton-pid: {pid}\r\nx-baton-generation: {generation}\r\n\
             x-baton-backend: mio\r\nconnection: {}\r\ncontent-length: {}\r\n\r\n{body}",
            if close { "close" } else { "keep-alive" },
            body.len()
        );
        // Small answers to a blocking-enough client: written whole or dropped.
        if stream.write_all(response.as_bytes()).is_err() || close {
            return false;
        }
    }
    if buf.is_empty() {
        conn.set_idle();
    }
    buf.len() < 8192
}
