// cargo run -p baton-smol --example smol-chat -- --listen 127.0.0.1:7100 --control /tmp/chat.sock
//! A line-protocol chat on smol whose connections live through upgrades: at
//! each `kill -HUP` (or `batonctl upgrade --control /tmp/chat.sock`) every
//! connection moves, open, to the new generation with its state — no client
//! reconnects, no counter restarts. The same program as baton-tokio's
//! `examples/chat.rs`.
//!
//! Send `nick NAME` to name yourself; every other line is a message,
//! answered with `NAME N pid P: TEXT`, N counting this connection's
//! messages. Try it with `nc 127.0.0.1 7100`, upgrade, and type on.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use baton_smol::handover::{Item, Versions};
use baton_smol::{Config, Connection, ListenAddr, Server, Smol, Stream};
use clap::Parser;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};

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

fn main() -> Result<(), baton_smol::Error> {
    let args = Args::parse();
    baton_smol::logger::init("chat", "smol");
    let mut config = Config::default().state_versions(Versions::single(STATE_VERSION));
    config.control = args.control;
    config.pid_file = args.pid_file;
    let executor = Arc::new(async_executor::Executor::new());
    let mut server = Server::new(Smol::new(executor.clone()), config)?;
    for (index, addr) in args.listen.iter().enumerate() {
        server.listen(&format!("chat-{index}"), addr)?;
    }
    // A connection that moved here (or came back from a failed move).
    server.on_moved(KIND, |mut item: Item, conn| async move {
        let (Ok(stream), Some(chat)) = (Stream::from_moved(&mut item), Chat::restore(&item)) else {
            return;
        };
        serve(stream, conn, chat).await;
    });
    let serve = server.serve(|stream, conn| serve(stream, conn, Chat::default()));
    async_io::block_on(executor.run(serve))?;
    Ok(())
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

/// What ended a wait for the client's next bytes.
enum Woken {
    Read(io::Result<usize>),
    /// Moving (the loop offers it), or closing idle connections (a drain
    /// without a handover).
    Moving,
}

/// Answer lines until the client leaves, the server drains, or the
/// connection moves to the next generation.
async fn serve(mut stream: Stream, mut conn: Connection, mut chat: Chat) {
    let tracker = conn.tracker().clone();
    let mut chunk = [0u8; 1024];
    loop {
        while let Some(end) = chat.unread.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = chat.unread.drain(..=end).collect();
            conn.set_busy();
            let reply = chat.answer(String::from_utf8_lossy(&line).trim_end());
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            conn.set_idle();
        }
        if chat.unread.len() > MAX_LINE {
            return;
        }
        // A safe point: every complete line read is answered.
        if let Some(version) = conn.can_move() {
            if let Ok(fd) = stream.into_fd() {
                conn.offer(chat.save(version).with_fds([fd]));
            }
            return;
        }
        // `or` polls the read first and returns it if it completed; a read
        // that loses the race took no bytes (async-io reads only in the
        // poll that completes it), so nothing is lost when it is dropped.
        let read = async { Woken::Read(stream.read(&mut chunk).await) };
        let moving = async {
            tracker.moving_or_closing_idle().await;
            Woken::Moving
        };
        match future::or(read, moving).await {
            Woken::Read(Ok(0) | Err(_)) => return,
            Woken::Read(Ok(n)) => chat.unread.extend_from_slice(&chunk[..n]),
            // Moves that closed again since (a failed move) leave it
            // served here.
            Woken::Moving => {
                if conn.can_move().is_none() && tracker.is_closing_idle() {
                    return;
                }
            }
        }
    }
}
