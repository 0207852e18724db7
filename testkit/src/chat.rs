//! The chat examples' suite (issue 13): each backend's `examples/chat.rs`
//! run as a process, its connections moving, open, through upgrades.
//!
//! The chat's line protocol: `nick NAME` is answered `hello NAME pid P`,
//! every other line `NAME N pid P: TEXT`, N counting the connection's
//! messages. A [`Client`] speaks it over a blocking `TcpStream`, every read
//! and write bounded by [`IO_TIMEOUT`], and checks each reply: its name,
//! its text, and a counter exactly one more than the last, whichever
//! generation answers.
//!
//! [`chat_tests!`](crate::chat_tests) makes one `#[test]` per scenario for
//! the example named (its cargo target name), so a backend's test file is
//! one line:
//!
//! ```text
//! testkit::chat_tests!("smol-chat");
//! ```
//!
//! | test | what it shows |
//! |---|---|
//! | [`clients_stay_connected_through_upgrades`] | [`CLIENTS`] clients sending without pause through [`UPGRADES`] upgrades through `batonctl`: none disconnected or failed, every counter continued without a gap, each client was answered by generations in their order only and by every one the test waited for (every other one), traffic was answered during every upgrade that started with all clients settled, each old generation moved all and closed none (`drained: 50 moved / 1 finished / 0 closed idle / 0 forced`, the one finished being `batonctl`'s control connection); `batonctl stop` then closes the idle clients after the idle grace and every generation exits 0 |
//! | [`half_line_moves_with_the_connection`] | a line half read by the old generation when the upgrade comes moves in the connection's state: its rest, sent after the move, completes it, and the new generation answers it with the next counter |
//!
//! Every wait is on a reply, a log line or a `batonctl` exit, bounded in
//! time; nothing sleeps.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::examples::Deploy;
use crate::harness::{Server, LINE_TIMEOUT};
use crate::steps::assert_exited_cleanly;

/// Clients of [`clients_stay_connected_through_upgrades`].
pub const CLIENTS: usize = 50;

/// Upgrades in [`clients_stay_connected_through_upgrades`].
pub const UPGRADES: u64 = 100;

/// Bound on one read or write of a [`Client`]: a reply comes in
/// milliseconds, even while its connection moves.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest reply line read; the example's own line limit.
const MAX_LINE: u64 = 4096;

/// How long a traffic thread runs at most, should the test never stop it.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(300);

/// One `#[test]` per scenario of this module for the chat example named by
/// its cargo target (the examples must have been built: `cargo test -p
/// PACKAGE` builds them first).
///
/// ```text
/// testkit::chat_tests!("smol-chat");
/// ```
#[macro_export]
macro_rules! chat_tests {
    ($example:literal) => {
        $crate::chat_tests!(@each $example:
            clients_stay_connected_through_upgrades,
            half_line_moves_with_the_connection,
        );
    };
    (@each $example:literal: $($test:ident,)+) => {
        $(
            #[test]
            fn $test() {
                $crate::chat::$test($example);
            }
        )+
    };
}

/// A reply to a message: `NAME N pid P: TEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The connection's message counter (N).
    pub count: u64,
    /// The generation that answered (P).
    pub pid: u32,
}

/// One chat connection: blocking, every read and write bounded by
/// [`IO_TIMEOUT`], every reply checked.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<TcpStream>,
    nick: String,
    /// Messages answered so far: the next reply's counter is one more.
    count: u64,
}

impl Client {
    /// Connect to `addr` and name this connection `nick`; returns the
    /// client and the pid that greeted it.
    pub fn connect(addr: SocketAddr, nick: &str) -> io::Result<(Client, u32)> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut client = Client {
            reader: BufReader::new(stream),
            nick: nick.to_owned(),
            count: 0,
        };
        client.send(format!("nick {nick}\n").as_bytes())?;
        let line = client.read_line()?;
        let pid = line
            .strip_prefix(&format!("hello {nick} pid "))
            .and_then(|pid| pid.parse().ok())
            .ok_or_else(|| invalid(format!("expected `hello {nick} pid P`, got {line:?}")))?;
        Ok((client, pid))
    }

    /// Write `bytes` as they are (a line, half a line, several lines).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// The next line, without its newline; end of stream is an error.
    pub fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)?;
        if line.pop() != Some(b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the server closed the connection (after {:?})",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        String::from_utf8(line).map_err(|e| invalid(format!("not UTF-8: {e}")))
    }

    /// Send `text` as a line and read its reply.
    pub fn message(&mut self, text: &str) -> io::Result<Reply> {
        self.send(format!("{text}\n").as_bytes())?;
        self.reply(text)
    }

    /// Read the reply to a message `text` sent already: the connection's
    /// name, the next counter, `text`.
    pub fn reply(&mut self, text: &str) -> io::Result<Reply> {
        let line = self.read_line()?;
        let expected = self.count + 1;
        let reply = line
            .strip_prefix(&format!("{} ", self.nick))
            .and_then(|rest| rest.strip_suffix(&format!(": {text}")))
            .and_then(|rest| rest.split_once(" pid "))
            .and_then(|(count, pid)| Some((count.parse().ok()?, pid.parse().ok()?)));
        match reply {
            Some((count, pid)) if count == expected => {
                self.count = count;
                Ok(Reply { count, pid })
            }
            _ => Err(invalid(format!(
                "expected `{} {expected} pid P: {text}`, got {line:?}",
                self.nick
            ))),
        }
    }

    /// Messages answered so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Wait for the server to close the connection: nothing more is read.
    pub fn expect_closed(&mut self) -> io::Result<()> {
        let mut rest = Vec::new();
        (&mut self.reader).take(MAX_LINE).read_to_end(&mut rest)?;
        match rest.is_empty() {
            true => Ok(()),
            false => Err(invalid(format!(
                "read {:?} before the close",
                String::from_utf8_lossy(&rest)
            ))),
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Connect `nick` and fail the test if that fails.
#[track_caller]
fn connect(server: &Server, nick: &str) -> (Client, u32) {
    match Client::connect(server.addr(), nick) {
        Ok(connected) => connected,
        Err(e) => server.fail(format_args!("client {nick}: connect: {e}")),
    }
}

/// What the traffic threads share with the test: the pid that last
/// answered each client, and the first failure.
#[derive(Debug, Default)]
struct Board {
    last_pid: Vec<u32>,
    failure: Option<String>,
}

/// How a traffic thread ended.
#[derive(Debug)]
struct ClientEnd {
    /// The client, unless it failed.
    client: Option<Client>,
    /// The pids that answered it, each once, in order.
    pids: Vec<u32>,
}

/// One thread per client, each sending messages without pause (the next as
/// soon as the last is answered) until stopped.
#[derive(Debug)]
struct Traffic {
    board: Arc<(Mutex<Board>, Condvar)>,
    stop: Arc<AtomicBool>,
    /// Replies received by all clients.
    replies: Arc<AtomicU64>,
    threads: Vec<JoinHandle<ClientEnd>>,
}

impl Traffic {
    /// Connect `clients` clients (`nick cN`), all greeted by `pid`, and start
    /// their traffic.
    #[track_caller]
    fn start(server: &Server, clients: usize, pid: u32) -> Traffic {
        let board = Arc::new((
            Mutex::new(Board {
                last_pid: vec![pid; clients],
                failure: None,
            }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for index in 0..clients {
            let (client, greeted) = connect(server, &format!("c{index}"));
            server.check(
                greeted == pid,
                format_args!("client c{index} greeted by {greeted}, expected {pid}"),
            );
            let (board, stop, replies) = (board.clone(), stop.clone(), replies.clone());
            let thread = std::thread::Builder::new()
                .name(format!("chat-c{index}"))
                .spawn(move || send_until_stopped(client, index, &board, &stop, &replies))
                .expect("spawn a client thread");
            threads.push(thread);
        }
        Traffic {
            board,
            stop,
            replies,
            threads,
        }
    }

    fn replies(&self) -> u64 {
        self.replies.load(Ordering::SeqCst)
    }

    /// Wait until every client was answered by `pid`, or a client failed.
    #[track_caller]
    fn wait_all_answered_by(&self, server: &mut Server, pid: u32, timeout: Duration) {
        let (board, changed) = &*self.board;
        let board = board.lock().unwrap_or_else(PoisonError::into_inner);
        let (board, _) = changed
            .wait_timeout_while(board, timeout, |b| {
                b.failure.is_none() && b.last_pid.iter().any(|&p| p != pid)
            })
            .unwrap_or_else(PoisonError::into_inner);
        // The lines logged meanwhile tell why, if this fails.
        server.poll();
        if let Some(failure) = &board.failure {
            server.fail(failure);
        }
        let behind: Vec<_> = (board.last_pid.iter().enumerate())
            .filter(|&(_, &p)| p != pid)
            .map(|(index, p)| format!("c{index}: {p}"))
            .collect();
        server.check(
            behind.is_empty(),
            format_args!(
                "after {timeout:?}, not answered by pid {pid} yet (last answered by): {behind:?}"
            ),
        );
    }

    /// Stop every thread and collect how each client ended.
    fn stop(mut self) -> Vec<ClientEnd> {
        self.stop.store(true, Ordering::SeqCst);
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|thread| thread.join().expect("a client thread panicked"))
            .collect()
    }
}

impl Drop for Traffic {
    /// A failed test stops its threads (the server's processes die with it,
    /// which ends any blocked read).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A client thread: message after message until stopped or failed (or
/// after [`TRAFFIC_LIMIT`]); each reply checked by [`Client::reply`].
fn send_until_stopped(
    mut client: Client,
    index: usize,
    board: &(Mutex<Board>, Condvar),
    stop: &AtomicBool,
    replies: &AtomicU64,
) -> ClientEnd {
    let mut pids = vec![
        board
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_pid[index],
    ];
    let until = Instant::now() + TRAFFIC_LIMIT;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        let text = format!("m{} from c{index}", client.count() + 1);
        match client.message(&text) {
            Ok(reply) => {
                replies.fetch_add(1, Ordering::SeqCst);
                if pids.last() != Some(&reply.pid) {
                    pids.push(reply.pid);
                    let mut shared = board.0.lock().unwrap_or_else(PoisonError::into_inner);
                    shared.last_pid[index] = reply.pid;
                    board.1.notify_all();
                }
            }
            Err(e) => {
                let failure = format!(
                    "client c{index} after {} messages (answered by {pids:?}): {e}",
                    client.count()
                );
                let mut shared = board.0.lock().unwrap_or_else(PoisonError::into_inner);
                shared.failure.get_or_insert(failure);
                board.1.notify_all();
                return ClientEnd { client: None, pids };
            }
        }
    }
    ClientEnd {
        client: Some(client),
        pids,
    }
}

/// Fail unless the `drained: …` line of `pid` (searched from the start)
/// reads `expected`.
#[track_caller]
fn expect_drained(server: &mut Server, pid: u32, expected: &str) {
    let line = match server.find(pid, |m| m.starts_with("drained: ")) {
        Some(line) => line,
        None => server.wait_for_pid(pid, "drained: ", LINE_TIMEOUT),
    };
    server.check(
        line.message() == format!("drained: {expected}"),
        format_args!("pid {pid}: expected `drained: {expected}`: {}", line.text),
    );
}

/// [`CLIENTS`] clients send without pause through [`UPGRADES`] upgrades
/// through `batonctl`; none is disconnected, every counter goes on.
///
/// Every other upgrade (and the last) starts only once every client was
/// answered by the generation before it (an event per client, bounded in
/// time); the ones between follow at once, so connections also arrive in
/// a generation that is already moving them on. Each client must then be
/// answered by every waited-for generation, and by generations in their
/// order only: 51 of the 101 at least, however the machine is loaded, and
/// no generation after a newer one (a connection that moved back). Without
/// a wait, a generation can be asked to upgrade before a client spoke to
/// it, and the client passes through it unanswered: correct, but how often
/// is a matter of timing, no bound to rely on.
pub fn clients_stay_connected_through_upgrades(example: &str) {
    let started = Instant::now();
    let deploy = Deploy::new(example, "chat-storm");
    let mut server = deploy.start();
    let mut generations = vec![server.pid()];
    let mut waited = vec![server.pid()];
    let traffic = Traffic::start(&server, CLIENTS, server.pid());
    let mut quietest = u64::MAX;
    for round in 1..=UPGRADES {
        let before = traffic.replies();
        let pid = deploy.upgrade(&mut server, round);
        // Replies that came while `batonctl upgrade` ran, when it started
        // with every client answered by the generation it upgraded: the
        // traffic went on during the upgrade. (An upgrade right after
        // another may find every connection still in transit.)
        let settled = round % 2 == 1;
        if settled {
            quietest = quietest.min(traffic.replies() - before);
        }
        generations.push(pid);
        if !settled || round == UPGRADES {
            traffic.wait_all_answered_by(&mut server, pid, LINE_TIMEOUT);
            waited.push(pid);
        }
    }
    let replies = traffic.replies();
    let ends = traffic.stop();
    let storm = started.elapsed();
    server.check(
        quietest > 0,
        "no reply came during an upgrade that started with every client settled: the traffic stopped",
    );
    let mut clients = Vec::new();
    let mut fewest = generations.len();
    for (index, end) in ends.into_iter().enumerate() {
        let mut later = generations.iter();
        let in_order = end.pids.iter().all(|pid| later.any(|g| g == pid));
        let every_waited = waited.iter().all(|pid| end.pids.contains(pid));
        server.check(
            in_order && every_waited,
            format_args!(
                "client c{index} was answered by {:?}; expected generations in their order \
                 {generations:?}, with every one of {waited:?}",
                end.pids
            ),
        );
        fewest = fewest.min(end.pids.len());
        match end.client {
            Some(client) => clients.push(client),
            None => server.fail(format_args!("client c{index} failed")),
        }
    }
    let last = server.pid();
    // Each old generation moved every client and closed none; the one
    // finished connection is `batonctl`'s (control connections are tracked
    // like any other).
    for &old in &generations[..generations.len() - 1] {
        expect_drained(
            &mut server,
            old,
            &format!("{CLIENTS} moved / 1 finished / 0 closed idle / 0 forced"),
        );
        assert_exited_cleanly(&mut server, old);
    }

    // No next generation: the stop closes the idle clients after the idle
    // grace, as without a handover.
    let ran = deploy.batonctl("stop");
    server.check(ran.code == Some(0), format_args!("batonctl stop: {ran}"));
    expect_drained(
        &mut server,
        last,
        &format!("1 finished / {CLIENTS} closed idle / 0 forced"),
    );
    for (index, client) in clients.iter_mut().enumerate() {
        if let Err(e) = client.expect_closed() {
            server.fail(format_args!("client c{index} at the stop: {e}"));
        }
    }
    assert_exited_cleanly(&mut server, last);
    deploy.expect_no_pid_file(&server);
    eprintln!(
        "{example}: {CLIENTS} clients through {UPGRADES} upgrades in {storm:?}: {replies} replies, \
         at least {quietest} during each settled upgrade; each client answered by {fewest} generations at least"
    );
}

/// A line the old generation has half read when the upgrade comes moves
/// with the connection (the bytes read and not answered are part of its
/// state); its rest completes it in the new generation.
pub fn half_line_moves_with_the_connection(example: &str) {
    let deploy = Deploy::new(example, "chat-half-line");
    let mut server = deploy.start();
    let old = server.pid();
    let (mut client, _) = connect(&server, "h");
    // One write, one loopback segment: once the reply to `m1` is back, the
    // server has read `hal` too, and holds it unanswered.
    let first = client.send(b"m1\nhal").and_then(|()| client.reply("m1"));
    server.check(
        matches!(first, Ok(Reply { pid, .. }) if pid == old),
        format_args!("m1: expected an answer from {old}: {first:?}"),
    );
    let new = deploy.upgrade(&mut server, 1);
    let moved = format!("moved 1 connections to new process {new}");
    if server.find(old, |m| m == moved).is_none() {
        server.wait_for_pid(old, &moved, LINE_TIMEOUT);
    }
    let rest = client.send(b"f\n").and_then(|()| client.reply("half"));
    server.check(
        matches!(rest, Ok(Reply { count: 2, pid }) if pid == new),
        format_args!("the completed line: expected `h 2 pid {new}: half`: {rest:?}"),
    );
    expect_drained(
        &mut server,
        old,
        "1 moved / 1 finished / 0 closed idle / 0 forced",
    );
    assert_exited_cleanly(&mut server, old);
    drop(client);
    let ran = deploy.batonctl("stop");
    server.check(ran.code == Some(0), format_args!("batonctl stop: {ran}"));
    assert_exited_cleanly(&mut server, new);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A client against a scripted server: the replies it accepts and the
    /// ones it refuses.
    #[test]
    fn replies_are_checked() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("nick");
            assert_eq!(line, "nick a\n");
            stream
                .write_all(b"hello a pid 7\na 1 pid 7: x\na 3 pid 8: y\n")
                .expect("write");
        });
        let (mut client, pid) = Client::connect(addr, "a").expect("connect");
        assert_eq!(pid, 7);
        assert_eq!(client.reply("x").expect("x"), Reply { count: 1, pid: 7 });
        // A gap in the counter.
        let gap = client.reply("y").expect_err("a gap");
        assert!(gap.to_string().contains("expected `a 2 pid P: y`"), "{gap}");
        server.join().expect("the scripted server");
        assert!(client.expect_closed().is_ok());
        let eof = client.read_line().expect_err("closed");
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
    }
}
