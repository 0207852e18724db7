// cargo run -p baton-mio --example mio_server -- 127.0.0.1:8080   (then: curl 127.0.0.1:8080; kill -HUP <pid>; kill -TERM <pid>)
//! A greeting server on a raw mio loop that replaces itself in place.
//!
//! Every connection gets one line naming the process and generation that
//! answered, then is closed. `SIGHUP` starts the same binary as the next
//! generation, which inherits the listening socket; once it reports ready,
//! this one stops accepting, finishes what it started, and exits.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, Write};
use std::time::Duration;

use baton_mio::{Baton, Config, Connection, ConnectionState, Event, Stream};
use mio::{Events, Interest, Poll, Token};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let mut poll = Poll::new()?;
    let mut baton = Baton::new(Config::default(), poll.registry(), Token(0))?;
    baton.listen("greeting", &addr.parse()?)?;
    baton.handle_signals()?;
    baton.ready()?;

    let pid = std::process::id();
    let log = |message: &str| eprintln!("[pid {pid}] {message}");
    log(&format!(
        "generation {} serving on {addr}",
        baton.generation()
    ));
    let greeting = format!("hello from pid {pid} generation {}\n", baton.generation());

    // Accepted connections, waiting to be greeted; tokens above baton's.
    let mut conns: HashMap<Token, (Stream, Connection)> = HashMap::new();
    let mut next_token = baton_mio::TOKENS;
    let mut events = Events::with_capacity(256);
    loop {
        match poll.poll(&mut events, baton.next_timeout()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        }
        baton.process(&events);
        while let Some(event) = baton.next_event() {
            match event {
                Event::Accept { listener } => loop {
                    match baton.accept(listener) {
                        Ok(Some((mut stream, conn))) => {
                            let token = Token(next_token);
                            next_token += 1;
                            poll.registry()
                                .register(&mut stream, token, Interest::WRITABLE)?;
                            conns.insert(token, (stream, conn));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            log(&format!("accept: {e}; backing off"));
                            break;
                        }
                    }
                },
                Event::Upgrade => match baton.start_upgrade() {
                    Ok(child) => log(&format!("upgrading to pid {child}")),
                    Err(e) => log(&format!("upgrade failed, still serving: {e}")),
                },
                Event::UpgradeDone(Ok(upgraded)) => log(&format!("upgraded: {upgraded}")),
                Event::UpgradeDone(Err(e)) => log(&format!("upgrade failed, still serving: {e}")),
                Event::Shutdown => baton.stop(),
                Event::Stop { reason } => {
                    log(&format!("stopping ({reason:?}): {} open", conns.len()));
                    // After an upgrade, serve again if the new generation dies
                    // within 2 s.
                    let timeout = Duration::from_secs(10);
                    if let Err(e) = baton.drain_watching(timeout, Duration::from_secs(2)) {
                        log(&format!("{e}; draining without watching"));
                        baton.drain(timeout);
                    }
                }
                Event::Resumed { successor, status } => log(&format!(
                    "new generation {successor} ended ({status}): serving again"
                )),
                Event::ForceClose => conns.clear(),
                Event::Drained(report) => {
                    log(&format!("drained: {report}"));
                    return Ok(());
                }
                _ => {}
            }
        }
        for event in events.iter().filter(|e| !baton.owns(e.token())) {
            let Some((mut stream, mut conn)) = conns.remove(&event.token()) else {
                continue;
            };
            conn.set_busy();
            match stream.write(greeting.as_bytes()) {
                // Not writable after all: wait for the next event.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conns.insert(event.token(), (stream, conn));
                }
                // Written, or the client is gone: either way this one is done.
                _ => conn.set_idle(),
            }
        }
    }
}
