// cargo run -p baton-mio --example mio-chat -- --listen 127.0.0.1:7100 --control /tmp/chat.sock
//! A line-protocol chat on a hand-driven mio loop whose connections live
//! through upgrades: at each `kill -HUP` (or `batonctl upgrade --control
//! /tmp/chat.sock`) every connection moves, open, to the new generation
//! with its state — no client reconnects, no counter restarts. The same
//! program as baton-tokio's `examples/chat.rs`.
//!
//! Send `nick NAME` to name yourself; every other line is a message,
//! answered with `NAME N pid P: TEXT`, N counting this connection's
//! messages. Try it with `nc 127.0.0.1 7100`, upgrade, and type on.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::path::PathBuf;

use baton_mio::handover::{Item, Versions};
use baton_mio::{Baton, Config, Connection, Event, ListenAddr, Offer, Stream, TOKENS};
use clap::Parser;
use mio::{Events, Interest, Poll, Registry, Token};

/// The kind of connection this server moves, and the version of its state.
const KIND: &str = "chat";
const STATE_VERSION: u32 = 1;
/// Longest line read.
const MAX_LINE: usize = 4096;

#[derive(Parser)]
struct Args {
    /// Listen on IP:PORT or unix:/path (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:7100")]
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
    baton_mio::logger::init("chat", "mio");
    let mut config = Config::default().state_versions(Versions::single(STATE_VERSION));
    config.control = args.control;
    config.pid_file = args.pid_file;
    let mut poll = Poll::new()?;
    let mut baton = Baton::new(config, poll.registry(), Token(0))?;
    baton.move_connections([KIND]);
    for (index, addr) in args.listen.iter().enumerate() {
        baton.listen(&format!("chat-{index}"), addr)?;
    }
    baton.ready()?;
    let mut clients = Clients {
        registry: poll.registry().try_clone()?,
        map: HashMap::new(),
        next: TOKENS,
    };
    let mut events = Events::with_capacity(256);
    loop {
        // Zero while connections offered wait to be sent.
        match poll.poll(&mut events, baton.next_timeout()) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            result => result?,
        }
        baton.process(&events);
        while let Some(event) = baton.next_event() {
            match event {
                Event::Accept { listener } => {
                    while let Some((stream, conn)) = baton.accept(listener) {
                        clients.add(stream, conn, Chat::default())?;
                    }
                }
                // Connections that moved here, or came back from a failed move.
                Event::Moved(offers) | Event::Unmoved(offers) => {
                    for Offer { mut item, conn } in offers {
                        if let (Ok(stream), Some(chat)) =
                            (Stream::from_moved(&mut item), Chat::restore(&item))
                        {
                            clients.add(stream, conn, chat)?;
                        }
                    }
                }
                // Every connection waits for its next line: it moves now.
                Event::Moving => clients.serve_all(),
                // Draining without a handover: the same wait ends them.
                Event::CloseIdle | Event::ForceClose => clients.map.clear(),
                Event::Drained(_) => return Ok(()),
                _ => {}
            }
        }
        for event in events.iter().filter(|e| !baton.owns(e.token())) {
            clients.serve(event.token());
        }
    }
}

/// One connection's state: what moves with it.
#[derive(Default)]
struct Chat {
    nick: Option<String>,
    messages: u64,
    /// Bytes read and not yet answered (a partial or pipelined line).
    unread: Vec<u8>,
}

impl Chat {
    /// The reply to one line.
    fn answer(&mut self, line: &str) -> String {
        let pid = std::process::id();
        if let Some(nick) = line.strip_prefix("nick ") {
            self.nick = Some(nick.trim().to_owned());
            return format!("hello {} pid {pid}\n", nick.trim());
        }
        self.messages += 1;
        let nick = self.nick.as_deref().unwrap_or("anonymous");
        format!("{nick} {} pid {pid}: {line}\n", self.messages)
    }

    /// `messages nick\n` then the unread bytes.
    fn save(self, version: u32) -> Item {
        let mut payload = format!("{} {}\n", self.messages, self.nick.unwrap_or_default());
        payload.push_str(&String::from_utf8_lossy(&self.unread));
        Item::new(KIND, version, payload.into_bytes())
    }

    fn restore(item: &Item) -> Option<Chat> {
        let text = std::str::from_utf8(&item.payload).ok()?;
        let (head, unread) = text.split_once('\n')?;
        let (messages, nick) = head.split_once(' ')?;
        Some(Chat {
            nick: (!nick.is_empty()).then(|| nick.to_owned()),
            messages: messages.parse().ok()?,
            unread: unread.as_bytes().to_vec(),
        })
    }
}

/// One connection: its socket, its tracking guard, its state.
struct Client {
    stream: Stream,
    conn: Connection,
    chat: Chat,
}

impl Client {
    /// Answer every complete line, reading until nothing is left; false
    /// to close.
    fn serve(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            while let Some(end) = self.chat.unread.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.chat.unread.drain(..=end).collect();
                self.conn.set_busy();
                let reply = self.chat.answer(String::from_utf8_lossy(&line).trim_end());
                // Short replies: written whole, or the connection dropped.
                if self.stream.write_all(reply.as_bytes()).is_err() {
                    return false;
                }
            }
            self.conn.set_idle();
            if self.chat.unread.len() > MAX_LINE {
                return false;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.chat.unread.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

/// The connections, by token.
struct Clients {
    registry: Registry,
    map: HashMap<Token, Client>,
    /// The last token given (baton's are below `TOKENS`).
    next: usize,
}

impl Clients {
    /// Register a connection and answer the lines it brought, if any.
    fn add(&mut self, mut stream: Stream, conn: Connection, chat: Chat) -> io::Result<()> {
        self.next += 1;
        let token = Token(self.next);
        self.registry
            .register(&mut stream, token, Interest::READABLE)?;
        self.map.insert(token, Client { stream, conn, chat });
        self.serve(token);
        Ok(())
    }

    /// Serve one connection, then at the safe point that follows (every
    /// line read is answered, nothing more to read) move it if it may.
    fn serve(&mut self, token: Token) {
        let Some(client) = self.map.get_mut(&token) else {
            return;
        };
        if !client.serve() {
            self.map.remove(&token);
            return;
        }
        let Some(version) = client.conn.can_move() else {
            return;
        };
        if let Some(client) = self.map.remove(&token) {
            if let Ok(fd) = client.stream.into_fd(&self.registry) {
                client.conn.offer(client.chat.save(version).with_fds([fd]));
            }
        }
    }

    fn serve_all(&mut self) {
        let tokens: Vec<Token> = self.map.keys().copied().collect();
        for token in tokens {
            self.serve(token);
        }
    }
}
