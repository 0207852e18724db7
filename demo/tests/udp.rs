//! The UDP echo (`--udp`) through upgrades, once per backend.
//!
//! A client sends numbered datagrams over loopback at a bounded rate while
//! the test upgrades the server several times; every reply names the
//! generation that answered. The socket is handed over like a listener, so
//! the queue is never without a reader: the new generation reads from it
//! before it reports ready, and the old one stops reading only after that.
//! A datagram is read by exactly one of them, whichever reads first, and is
//! always answered. So no datagram sent after a new generation reported
//! ready may be lost; datagrams sent during the switch should not be either
//! (a loss there could only be the socket's receive buffer overflowing
//! while no process was scheduled to read), and their count is printed.

mod common;

use testkit::per_backend;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{Server, BINARY, LINE_TIMEOUT};
use nix::sys::signal::Signal;

per_backend! {
    fn udp_echo_through_upgrades;
}

const UPGRADES: usize = 5;
/// Pause between two datagrams: about 1000 a second.
const PACING: Duration = Duration::from_millis(1);
/// At most this many datagrams in all (the sender's bound).
const MAX_DATAGRAMS: u64 = 60_000;
/// Replies from the last generation wanted before the sender stops.
const TAIL_REPLIES: usize = 300;
/// How long the client waits for the last replies once it stopped sending.
const REPLY_GRACE: Duration = Duration::from_secs(3);

/// What the client saw: when each datagram was sent, and who answered it.
#[derive(Debug, Default)]
struct Record {
    sent: Vec<Instant>,
    /// Sequence number -> generations that answered it (more than one
    /// would be a duplicate).
    answered: BTreeMap<u64, Vec<u64>>,
}

/// The address in the `listening on udp:ADDR (udp, ORIGIN)` line of `pid`,
/// and the origin.
#[track_caller]
fn udp_line(server: &mut Server, pid: u32) -> (SocketAddr, String) {
    let Some(line) = server.find(pid, |m| m.starts_with("listening on udp:")) else {
        server.fail(format_args!("pid {pid} wrote no `listening on udp:` line"))
    };
    let rest = &line.message()["listening on udp:".len()..];
    let parsed = rest.split_once(' ').and_then(|(addr, origin)| {
        Some((
            addr.parse().ok()?,
            origin.trim_matches(['(', ')']).to_owned(),
        ))
    });
    match parsed {
        Some(found) => found,
        None => server.fail(format_args!("unexpected line: {}", line.message())),
    }
}

/// The `serving` line of `pid`: already received, or the next one to come
/// (waiting on the log, up to [`LINE_TIMEOUT`]).
fn serving_line(server: &mut Server, pid: u32) -> common::Line {
    if let Some(line) = server.find(pid, |m| m == "serving") {
        return line;
    }
    server.wait_until(
        &format!("the `serving` line of pid {pid}"),
        |l| l.pid() == Some(pid) && l.message() == "serving",
        LINE_TIMEOUT,
    )
}

/// `gen=G pid=P seq=N` -> (N, G).
fn parse_reply(reply: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(reply).ok()?;
    let rest = text.strip_prefix("gen=")?;
    let (generation, rest) = rest.split_once(" pid=")?;
    let (_pid, seq) = rest.split_once(" seq=")?;
    Some((seq.parse().ok()?, generation.parse().ok()?))
}

fn udp_echo_through_upgrades(backend: &str) {
    let mut command = Command::new(BINARY);
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--backend",
        backend,
    ]);
    let mut server = Server::spawn(command);
    server.wait_serving();
    let first = server.pid();
    let (addr, origin) = udp_line(&mut server, first);
    server.check(
        origin == "udp, bound",
        format_args!("generation 0: {origin}"),
    );

    let client = UdpSocket::bind("127.0.0.1:0").expect("bind the client");
    client.connect(addr).expect("connect the client");
    client
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("set a read timeout");
    let receiver = client.try_clone().expect("clone the client");
    let record = Arc::new(Mutex::new(Record::default()));
    // Signalled on each reply, for the test waiting for some.
    let replied = Arc::new(Condvar::new());
    let sending = Arc::new(AtomicBool::new(true));

    let sender = {
        let (record, sending) = (record.clone(), sending.clone());
        std::thread::spawn(move || {
            let mut errors = 0u64;
            for seq in 0..MAX_DATAGRAMS {
                if !sending.load(Ordering::Relaxed) {
                    break;
                }
                // Stamped before sending: a datagram counts as sent after
                // an event only if it left after the test saw that event.
                record.lock().unwrap().sent.push(Instant::now());
                if client.send(format!("seq={seq}").as_bytes()).is_err() {
                    errors += 1;
                }
                std::thread::sleep(PACING);
            }
            errors
        })
    };
    let replies = {
        let (record, sending, replied) = (record.clone(), sending.clone(), replied.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut quiet_since: Option<Instant> = None;
            loop {
                match receiver.recv(&mut buf) {
                    Ok(len) => {
                        quiet_since = None;
                        if let Some((seq, generation)) = parse_reply(&buf[..len]) {
                            record
                                .lock()
                                .unwrap()
                                .answered
                                .entry(seq)
                                .or_default()
                                .push(generation);
                            replied.notify_all();
                        }
                    }
                    Err(_) if sending.load(Ordering::Relaxed) => {}
                    Err(_) => {
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= REPLY_GRACE {
                            break;
                        }
                    }
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait (on the condition variable, bounded) until `generation`
    // answered `count` datagrams.
    let wait_replies = |server: &Server, generation: u64, count: usize| {
        let mut guard = record.lock().unwrap();
        loop {
            let answered = guard
                .answered
                .values()
                .filter(|g| g.contains(&generation))
                .count();
            if answered >= count {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(guard);
                server.fail(format_args!(
                    "generation {generation} answered {answered} datagrams, fewer than {count}"
                ));
            }
            guard = replied.wait_timeout(guard, left).unwrap().0;
        }
    };
    wait_replies(&server, 0, 50);

    // (sighup, serving, done): when the test signalled each upgrade, saw the
    // new generation's `serving` line, and saw the old one's `upgrade done`.
    let mut switches = Vec::new();
    for _ in 0..UPGRADES {
        let old = server.pid();
        let sighup = Instant::now();
        let new = server.upgrade();
        let (_, origin) = udp_line(&mut server, new);
        server.check(
            origin == "udp, inherited",
            format_args!("the UDP socket was not handed over: {origin}"),
        );
        // The old generation may log `upgrade done` before the new one
        // logs `serving`, and the reader thread forwards lines a little
        // later: wait for it (bounded) rather than look once.
        let serving = serving_line(&mut server, new);
        let Some(done) = server.find(old, |m| m.starts_with("upgrade done")) else {
            server.fail(format_args!("pid {old} wrote no `upgrade done` line"))
        };
        switches.push((sighup, serving.at, done.at));
        // Some echo from the new generation before the next switch.
        wait_replies(&server, server.generation(), 200);
    }
    wait_replies(&server, server.generation(), TAIL_REPLIES);
    sending.store(false, Ordering::Relaxed);
    let send_errors = sender.join().expect("the sender panicked");
    replies.join().expect("the receiver panicked");
    let last = server.pid();
    server.signal(last, Signal::SIGTERM);
    server.wait_exit_line(last, LINE_TIMEOUT);

    let record = record.lock().unwrap();
    let lost: Vec<u64> = (0..record.sent.len() as u64)
        .filter(|seq| !record.answered.contains_key(seq))
        .collect();
    let duplicated: Vec<u64> = record
        .answered
        .iter()
        .filter(|(_, g)| g.len() > 1)
        .map(|(seq, _)| *seq)
        .collect();
    let mut per_generation: BTreeMap<u64, usize> = BTreeMap::new();
    for generation in record.answered.values().flatten() {
        *per_generation.entry(*generation).or_default() += 1;
    }
    // A datagram is in a switch if it was sent between the SIGHUP and the
    // new generation's `serving` line; else a generation that reported
    // ready was there to read it (after the last upgrade's `upgrade done`
    // and after each `serving` line until the next SIGHUP).
    let in_switch = |seq: u64| {
        let sent = record.sent[seq as usize];
        switches
            .iter()
            .any(|(sighup, serving, _)| sent >= *sighup && sent < *serving)
    };
    let (lost_in_switch, lost_when_ready): (Vec<u64>, Vec<u64>) =
        lost.iter().partition(|seq| in_switch(**seq));
    let sent_in_switch = (0..record.sent.len() as u64)
        .filter(|seq| in_switch(*seq))
        .count();
    let last_done = switches.last().map(|s| s.2).expect("upgrades ran");
    let lost_after_last_done = lost
        .iter()
        .filter(|seq| record.sent[**seq as usize] >= last_done)
        .count();
    eprintln!(
        "udp echo ({backend}): {} sent ({send_errors} send errors), {} answered, {} lost \
         ({} of {sent_in_switch} sent during the {UPGRADES} switches, {} while a ready \
         generation served), {} duplicated; per generation {per_generation:?}; lost: {lost:?}",
        record.sent.len(),
        record.answered.len(),
        lost.len(),
        lost_in_switch.len(),
        lost_when_ready.len(),
        duplicated.len(),
    );
    server.check(
        lost_when_ready.is_empty() && lost_after_last_done == 0,
        format_args!(
            "datagrams sent while a ready generation served were lost: {lost_when_ready:?}"
        ),
    );
    server.check(
        duplicated.is_empty(),
        format_args!("datagrams answered twice: {duplicated:?}"),
    );
    server.check(
        per_generation.len() >= 2 && per_generation.len() > UPGRADES / 2,
        format_args!("replies came from generations {per_generation:?}"),
    );
    server.check(
        per_generation.contains_key(&(UPGRADES as u64)),
        format_args!("the last generation never answered: {per_generation:?}"),
    );
}
