//! The scale scenarios (issue 14): what idle connections cost, and whether
//! an upgrade slows down with them or with a large heap.
//!
//! - **idle** (`--idle-connections N`, default 10,000): on a fresh server,
//!   `--upgrades` upgrades with no connection, then 100 warm-up connections
//!   and N more keep-alive connections, each answered once and then left
//!   idle: RSS growth per connection (VmRSS of the serving generation,
//!   before and after the N), then `--upgrades` upgrades with N idle
//!   connections open on the generation that gets the SIGHUP (opened again
//!   before each one: the old generation closes its idle connections when
//!   it drains).
//! - **ballast**: `--upgrades` upgrades of a server started with
//!   `--ballast 0`, then of one with `--ballast SIZE` (`--ballast`, default
//!   1GiB); each SIGHUP only once the serving generation logged that its
//!   ballast is resident.
//!
//! Upgrade time is SIGHUP until the old generation's `upgrade done: pid P
//! generation G ready after N ms` line arrives (the new generation has
//! reported ready); the tables give the median and the slowest. Before each
//! upgrade the previous old generation has exited, so upgrades never
//! overlap.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, Signal};

use super::{ms, pid, Monitor, Options, Procs, Session, STEP_BOUND};

/// Warm-up connections opened before the RSS baseline (the runtime's first
/// slab pages and the like are not a per-connection cost).
const WARM_UP: usize = 100;
/// Connections opened at a time: within the demo's listen backlog (1024).
const BATCH: usize = 256;
/// Bound on each read or write of an idle-connection client.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The old generation's watch of the new one (default 2 s): short, since
/// each upgrade waits for the previous old generation to exit.
const SUCCESSOR_WATCH: &str = "100ms";
/// File descriptors the bench keeps besides the idle connections.
const SPARE_FDS: u64 = 512;

/// What the idle scenario measured on one backend.
#[derive(Debug)]
pub(crate) struct IdleRow {
    backend: String,
    connections: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    without: Vec<Duration>,
    with: Vec<Duration>,
    /// How long the old generation held the idle connections after its
    /// stop, at each upgrade of `with` (they move).
    held_moving: Vec<Duration>,
    /// The same at one upgrade with `--handover off` (they drain).
    held_draining: Duration,
}

/// What the ballast scenario measured on one backend.
#[derive(Debug)]
pub(crate) struct BallastRow {
    backend: String,
    without: Vec<Duration>,
    with: Vec<Duration>,
    rss_with_kib: u64,
}

/// Raise this process's soft open-file limit to the hard one (the servers
/// it starts inherit it) and check that `connections` fit.
pub(crate) fn raise_fd_limit(connections: usize) -> Result<(), String> {
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit(NOFILE): {e}"))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|e| format!("setrlimit(NOFILE, {hard}): {e}"))?;
    }
    let needed = u64::try_from(connections)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE_FDS);
    if hard < needed {
        return Err(format!(
            "{connections} idle connections need an open-file limit of at least {needed}; \
             the hard limit here is {hard} (raise it, or lower --idle-connections)"
        ));
    }
    Ok(())
}

/// The idle scenario on one backend.
pub(crate) fn run_idle(options: &Options, server: &Path, backend: &str) -> Result<IdleRow, String> {
    let n = options.idle_connections;
    let procs = Arc::new(Procs::default());
    let monitor = Monitor::start(Arc::clone(&procs), 20 * STEP_BOUND)?;
    let mut session = Session::new(options, server, backend, Arc::clone(&procs));
    session.extra_args = idle_server_args(n);
    let result = (|| {
        let addr = session.start("127.0.0.1:0")?;
        let mut without = Vec::new();
        for _ in 0..options.upgrades {
            without.push(upgrade_to_ready(&mut session)?);
        }
        let warm = open(addr, WARM_UP)?;
        let rss_before_kib = vm_rss_kib(session.current)?;
        let mut idle = open(addr, n)?;
        let rss_after_kib = vm_rss_kib(session.current)?;
        eprintln!(
            "bench: {backend} idle: {n} connections: VmRSS {rss_before_kib} -> {rss_after_kib} KiB"
        );
        drop(warm);
        let mut with = Vec::new();
        let mut held_moving = Vec::new();
        for round in 0..options.upgrades {
            if round > 0 {
                idle = open(addr, n)?;
            }
            let old = session.current;
            with.push(upgrade_to_ready(&mut session)?);
            held_moving.push(held(&session, old)?);
            // Closed by the client: the next round opens them afresh.
            idle.clear();
        }
        Ok::<_, String>(IdleRow {
            backend: backend.to_owned(),
            connections: n,
            rss_before_kib,
            rss_after_kib,
            without,
            with,
            held_moving,
            held_draining: Duration::ZERO,
        })
    })();
    session.shutdown();
    drop(session);
    monitor.stop();
    let mut row = result?;
    row.held_draining = held_draining(options, server, backend)?;
    Ok(row)
}

/// The demo's flags for `n` idle connections (and the warm-up ones).
fn idle_server_args(n: usize) -> Vec<String> {
    vec![
        "--max-connections".to_owned(),
        (n + WARM_UP + 100).to_string(),
        "--successor-watch".to_owned(),
        SUCCESSOR_WATCH.to_owned(),
    ]
}

/// How long the old generation held `--idle-connections` idle connections
/// after its stop, with `--handover off`: until the idle grace closed them.
fn held_draining(options: &Options, server: &Path, backend: &str) -> Result<Duration, String> {
    let n = options.idle_connections;
    let procs = Arc::new(Procs::default());
    let monitor = Monitor::start(Arc::clone(&procs), 20 * STEP_BOUND)?;
    let mut session = Session::new(options, server, backend, Arc::clone(&procs));
    session.extra_args = idle_server_args(n);
    session
        .extra_args
        .extend(["--handover".to_owned(), "off".to_owned()]);
    let result = (|| {
        let addr = session.start("127.0.0.1:0")?;
        let idle = open(addr, n)?;
        let old = session.current;
        upgrade_to_ready(&mut session)?;
        drop(idle);
        held(&session, old)
    })();
    session.shutdown();
    drop(session);
    monitor.stop();
    result
}

/// The `no connection left after N ms` of `old`, which has exited.
fn held(session: &Session<'_>, old: u32) -> Result<Duration, String> {
    session.emptied.get(&old).copied().ok_or_else(|| {
        format!(
            "pid {old} exited without a `no connection left` line{}",
            session.recent_lines()
        )
    })
}

/// The ballast scenario on one backend: a server with `--ballast 0`, then
/// one with `--ballast SIZE`.
pub(crate) fn run_ballast(
    options: &Options,
    server: &Path,
    backend: &str,
) -> Result<BallastRow, String> {
    let mut times = Vec::new();
    let mut rss_with_kib = 0;
    for size in ["0", options.ballast.as_str()] {
        let procs = Arc::new(Procs::default());
        let monitor = Monitor::start(Arc::clone(&procs), 20 * STEP_BOUND)?;
        let mut session = Session::new(options, server, backend, Arc::clone(&procs));
        session.extra_args = vec![
            "--ballast".to_owned(),
            size.to_owned(),
            "--successor-watch".to_owned(),
            SUCCESSOR_WATCH.to_owned(),
        ];
        let result = (|| {
            session.start("127.0.0.1:0")?;
            let mut took = Vec::new();
            for _ in 0..options.upgrades {
                if size != "0" {
                    wait_ballast(&mut session)?;
                    rss_with_kib = rss_with_kib.max(vm_rss_kib(session.current)?);
                }
                took.push(upgrade_to_ready(&mut session)?);
            }
            Ok::<_, String>(took)
        })();
        session.shutdown();
        drop(session);
        monitor.stop();
        times.push(result?);
    }
    let with = times.pop().unwrap_or_default();
    let without = times.pop().unwrap_or_default();
    Ok(BallastRow {
        backend: backend.to_owned(),
        without,
        with,
        rss_with_kib,
    })
}

/// SIGHUP the serving generation; the time until its `upgrade done` line.
/// Returns once the old generation has exited, so the next upgrade starts
/// from one process.
fn upgrade_to_ready(session: &mut Session<'_>) -> Result<Duration, String> {
    let old = session.current;
    session.outcome = None;
    session.outcome_at = None;
    let sent = Instant::now();
    let deadline = sent + STEP_BOUND;
    kill(pid(old), Signal::SIGHUP).map_err(|e| format!("SIGHUP: {e}"))?;
    while session.outcome.is_none() && session.next_event(deadline).is_some() {}
    let took = session
        .outcome_at
        .map(|at| at.saturating_duration_since(sent));
    match (session.outcome.take(), took) {
        (Some(Ok((new_pid, generation))), Some(took)) => {
            session.current = new_pid;
            session.generation = generation;
            while session.procs.is_live(old) {
                if Instant::now() >= deadline {
                    return Err(format!("pid {old} did not exit within {STEP_BOUND:?}"));
                }
                session.pump(Instant::now() + Duration::from_millis(5));
            }
            Ok(took)
        }
        (Some(Err(e)), _) => Err(e),
        _ => Err(format!(
            "no upgrade outcome within {STEP_BOUND:?}{}",
            session.recent_lines()
        )),
    }
}

/// Wait until the serving generation logged that its ballast is resident.
fn wait_ballast(session: &mut Session<'_>) -> Result<(), String> {
    let deadline = Instant::now() + STEP_BOUND;
    while !session.ballast_filled.contains(&session.current) {
        if session.next_event(deadline).is_none() {
            return Err(format!(
                "pid {} did not log its ballast within {STEP_BOUND:?}{}",
                session.current,
                session.recent_lines()
            ));
        }
    }
    Ok(())
}

/// Open `n` keep-alive connections to `addr`, each answered once with 200,
/// and keep them open.
fn open(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>, String> {
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not loopback"));
    }
    let mut streams = Vec::with_capacity(n);
    for first in (0..n).step_by(BATCH) {
        let batch = first..(first + BATCH).min(n);
        for index in batch.clone() {
            let stream = connect(addr)
                .map_err(|e| format!("idle connection {index}: connect and send: {e}"))?;
            streams.push(stream);
        }
        for index in batch {
            read_ok(&mut streams[index])
                .map_err(|e| format!("idle connection {index}: response: {e}"))?;
        }
    }
    Ok(streams)
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: baton-bench\r\n\r\n")?;
    Ok(stream)
}

/// Read one `200` response with a Content-Length body.
fn read_ok(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    // Bounded: every read takes a byte or fails, up to 64 KiB.
    while buf.len() < 64 * 1024 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a complete response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        if !head.starts_with("HTTP/1.1 200 ") {
            return Err(io::Error::other(format!("not a 200: {head:?}")));
        }
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if body.len() >= length {
            return Ok(());
        }
    }
    Err(io::Error::other("response too large"))
}

/// Resident set size of `pid` now, from `/proc/PID/status`.
fn vm_rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Median and slowest, in ms; `-` for none.
fn median_max(times: &[Duration]) -> (String, String) {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let median = sorted
        .get(sorted.len() / 2)
        .map_or("-".to_owned(), |d| ms(*d));
    let max = sorted.last().map_or("-".to_owned(), |d| ms(*d));
    (median, max)
}

/// `with / without` of the medians, e.g. `1.04×`.
fn ratio(with: &[Duration], without: &[Duration]) -> String {
    let median = |times: &[Duration]| {
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied()
    };
    match (median(with), median(without)) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".to_owned(),
    }
}

/// The idle-connection table.
pub(crate) fn idle_table(rows: &[IdleRow], upgrades: usize, out: &mut String) {
    let n = rows.first().map_or(0, |r| r.connections);
    let _ = writeln!(
        out,
        "\n### {n} idle keep-alive connections\n\n\
         | backend | RSS before MiB | RSS with them MiB | per connection KiB \
         | upgrade, none: median ms | max ms | upgrade, {n} idle: median ms | max ms | ratio \
         | old gen held them, handover on: median ms | max ms | handover off ms |"
    );
    out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for row in rows {
        let per_connection = row.rss_after_kib.saturating_sub(row.rss_before_kib) as f64
            / row.connections.max(1) as f64;
        let (none_median, none_max) = median_max(&row.without);
        let (with_median, with_max) = median_max(&row.with);
        let (moving_median, moving_max) = median_max(&row.held_moving);
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {per_connection:.2} | {none_median} | {none_max} | {with_median} | {with_max} | {} | {moving_median} | {moving_max} | {} |",
            row.backend,
            row.rss_before_kib as f64 / 1024.0,
            row.rss_after_kib as f64 / 1024.0,
            ratio(&row.with, &row.without),
            super::ms(row.held_draining),
        );
    }
    let _ = writeln!(
        out,
        "\nRSS: VmRSS of the serving generation after {WARM_UP} warm-up connections, then with \
         {n} more, each answered once and idle. Upgrade: SIGHUP until the old generation's \
         `upgrade done` line (the new one reported ready), {upgrades} upgrades each; with the \
         idle connections open on the generation upgraded (they move to the next one). Old gen \
         held them: from its stop until its `no connection left` line: with the handover the \
         {n} connections move; with `--handover off` they are closed after the idle grace. \
         nginx holds ~1.3 KiB per idle connection (issue 14)."
    );
}

/// The ballast table.
pub(crate) fn ballast_table(rows: &[BallastRow], ballast: &str, upgrades: usize, out: &mut String) {
    let _ = writeln!(
        out,
        "\n### Upgrade time with a {ballast} heap (`--ballast`)\n\n\
         | backend | ballast 0: median ms | max ms | ballast {ballast}: median ms | max ms | ratio | RSS with ballast MiB |"
    );
    out.push_str("|---|--:|--:|--:|--:|--:|--:|\n");
    for row in rows {
        let (none_median, none_max) = median_max(&row.without);
        let (with_median, with_max) = median_max(&row.with);
        let _ = writeln!(
            out,
            "| {} | {none_median} | {none_max} | {with_median} | {with_max} | {} | {:.1} |",
            row.backend,
            ratio(&row.with, &row.without),
            row.rss_with_kib as f64 / 1024.0,
        );
    }
    let _ = writeln!(
        out,
        "\nSIGHUP until the old generation's `upgrade done` line, {upgrades} upgrades each; with \
         the ballast, each SIGHUP once the serving generation's ballast is resident."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        let d = Duration::from_millis;
        assert_eq!(median_max(&[]), ("-".to_owned(), "-".to_owned()));
        assert_eq!(
            median_max(&[d(3), d(1), d(2)]),
            ("2.00".to_owned(), "3.00".to_owned())
        );
        assert_eq!(ratio(&[d(4), d(4), d(5)], &[d(2), d(2), d(9)]), "2.00×");
        assert_eq!(ratio(&[], &[d(1)]), "-");
    }

    #[test]
    fn vm_rss_of_this_process() {
        assert!(vm_rss_kib(std::process::id()).is_ok_and(|kib| kib > 0));
    }
}
