//! The load client the tests and the benchmark use.
//!
//! Plain std threads and blocking `std::net` sockets, so it measures every
//! backend the same way and depends on no runtime. It only talks to loopback.
//! Each thread checks every response, counts failures by kind and successes
//! per generation, and stops by itself: every loop is bounded by a request
//! count, a duration and a stop flag.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Failure samples kept in a report.
const MAX_SAMPLES: usize = 20;
/// Width of a timeline bucket.
const BUCKET: Duration = Duration::from_millis(100);
/// Largest response head the client accepts before calling the response bad.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Largest response body the client accepts before calling the response bad.
const MAX_RESPONSE_BODY: usize = 16 * 1024 * 1024;

/// What load to generate, against which address.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Server address; must be loopback. Ignored when `unix` is set.
    pub addr: SocketAddr,
    /// Connect to this Unix stream socket instead of `addr` (default: none,
    /// TCP). See [`LoadConfig::unix`].
    pub unix: Option<PathBuf>,
    /// Threads each keeping one persistent connection.
    pub keep_alive_connections: usize,
    /// Threads each doing connect / one request with `Connection: close` / close, in a loop.
    pub per_request_connections: usize,
    /// Request path (default "/"). For "/" the hello body is checked too.
    pub path: String,
    /// Per request bound on connect + write + read (default 5 s).
    pub request_timeout: Duration,
    /// Hard bound: no thread starts a request after this (default 120 s).
    pub max_duration: Duration,
    /// Hard bound on requests per thread (default 10_000_000).
    pub max_requests: u64,
}

impl LoadConfig {
    /// Defaults: 4 keep-alive connections, no per-request ones, path "/".
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            unix: None,
            keep_alive_connections: 4,
            per_request_connections: 0,
            path: "/".to_owned(),
            request_timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(120),
            max_requests: 10_000_000,
        }
    }

    /// The same defaults, against the Unix stream socket at `path` (a
    /// server started with `--listen unix:PATH`).
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            unix: Some(path.into()),
            ..Self::new(SocketAddr::from(([127, 0, 0, 1], 0)))
        }
    }
}

/// Why a request failed, as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// Connect was refused: nobody listening.
    Refused,
    /// Connection reset or aborted, or a broken pipe.
    Reset,
    /// The server closed before a complete response.
    Eof,
    /// Connect, write or read took longer than the request timeout.
    Timeout,
    /// A response with a status other than 200.
    BadStatus,
    /// A 200 response with missing headers or the wrong body.
    BadBody,
    /// Anything else.
    Other,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Eof => "eof",
            Self::Timeout => "timeout",
            Self::BadStatus => "bad status",
            Self::BadBody => "bad body",
            Self::Other => "other",
        })
    }
}

/// Running load. Dropping it stops and joins the threads.
#[derive(Debug)]
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Stats>>,
    start: Instant,
}

/// State shared with the threads: the stop flag and the live counters.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    max_generation: AtomicU64,
    /// Per keep-alive thread: the generation of its last answer.
    last_generation: Vec<AtomicU64>,
}

impl Load {
    /// Start the threads. Refuses a non-loopback address (or a path that would not
    /// fit in a request line) with `io::ErrorKind::InvalidInput`.
    pub fn start(config: LoadConfig) -> io::Result<Load> {
        if config.unix.is_none() && !config.addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("load client only targets loopback, not {}", config.addr),
            ));
        }
        if !config.path.starts_with('/') || config.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid request path {:?}", config.path),
            ));
        }
        let last_generation = (0..config.keep_alive_connections)
            .map(|_| AtomicU64::new(0))
            .collect();
        let mut load = Load {
            shared: Arc::new(Shared {
                last_generation,
                ..Shared::default()
            }),
            threads: Vec::new(),
            start: Instant::now(),
        };
        let config = Arc::new(config);
        let workers = (0..config.keep_alive_connections)
            .map(|i| (i, true))
            .chain((0..config.per_request_connections).map(|i| (i, false)));
        for (index, keep_alive) in workers {
            let name = if keep_alive {
                "keep-alive"
            } else {
                "per-request"
            };
            let worker = Worker {
                config: Arc::clone(&config),
                shared: Arc::clone(&load.shared),
                index,
                start: load.start,
                label: format!("{name} #{index}"),
                keep_alive,
                stats: Stats::default(),
                generations: BTreeSet::new(),
            };
            // On error `load` is dropped, which stops and joins the threads already started.
            let handle = std::thread::Builder::new()
                .name(format!("baton-load-{name}-{index}"))
                .spawn(move || worker.run())?;
            load.threads.push(handle);
        }
        Ok(load)
    }

    /// Live counter: successful responses so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Live counter: failed requests so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Highest generation seen in any response so far (from X-Baton-Generation), cheap (atomic).
    pub fn max_generation(&self) -> u64 {
        self.shared.max_generation.load(Ordering::Relaxed)
    }

    /// The generation that last answered the keep-alive thread answered
    /// longest ago: once it reaches G, every keep-alive connection has been
    /// answered by G (or later). `None` without keep-alive threads.
    pub fn min_keep_alive_generation(&self) -> Option<u64> {
        let last = self.shared.last_generation.iter();
        last.map(|g| g.load(Ordering::Relaxed)).min()
    }

    /// Stop all threads (each finishes its current request first), join them, and return the report.
    pub fn stop(self) -> Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Wait until every thread reaches its own bound (`max_requests` or
    /// `max_duration`), then return the report. For runs sized in advance.
    pub fn wait(mut self) -> Report {
        let mut report = Report::default();
        let mut samples = Vec::new();
        for handle in std::mem::take(&mut self.threads) {
            match handle.join() {
                Ok(stats) => stats.merge_into(&mut report, &mut samples),
                // A bug, not a server failure; still make it visible in the report.
                Err(_) => {
                    *report.failures.entry(FailureKind::Other).or_default() += 1;
                    samples.push((Duration::MAX, "other: load thread panicked".to_owned()));
                }
            }
        }
        samples.sort();
        report.failure_samples = samples
            .into_iter()
            .take(MAX_SAMPLES)
            .map(|(_, s)| s)
            .collect();
        report.latencies_us.sort_unstable();
        report.elapsed = self.start.elapsed();
        report
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// What a load run saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Successful responses.
    pub ok: u64,
    /// Failed requests, by kind.
    pub failures: BTreeMap<FailureKind, u64>,
    /// Failure descriptions, at most the first 20, e.g. "reset: connection reset by peer (keep-alive #3)".
    pub failure_samples: Vec<String>,
    /// Successful responses per X-Baton-Generation.
    pub per_generation: BTreeMap<u64, u64>,
    /// Every X-Baton-Pid seen in a successful response.
    pub pids: BTreeSet<u32>,
    /// Latency of every successful request, in microseconds, sorted ascending.
    pub latencies_us: Vec<u32>,
    /// Successful and failed requests per 100 ms bucket since start: (ok, failed).
    pub timeline: Vec<(u64, u64)>,
    /// Time from start to the end of the run.
    pub elapsed: Duration,
    /// Connections opened (every thread, every connect attempt that got
    /// through).
    pub connects: u64,
    /// Connections the keep-alive threads opened beyond their first: how
    /// often the server made a client connect again.
    pub reconnects: u64,
    /// For each connection of a keep-alive thread, how many generations
    /// answered on it (a connection that moves through upgrades is
    /// answered by each).
    pub generations_per_connection: Vec<usize>,
}

impl Report {
    /// Total failed requests, all kinds.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Latency percentile (nearest rank), `p` in 0..=100; None without successes.
    pub fn percentile_us(&self, p: f64) -> Option<u32> {
        if self.latencies_us.is_empty() || !p.is_finite() {
            return None;
        }
        let n = self.latencies_us.len();
        let rank = (p.clamp(0.0, 100.0) / 100.0 * n as f64).ceil() as usize;
        self.latencies_us
            .get(rank.saturating_sub(1).min(n - 1))
            .copied()
    }
}

/// One thread's results, merged into the report at stop so the hot path takes no lock.
#[derive(Debug, Default)]
struct Stats {
    ok: u64,
    failures: BTreeMap<FailureKind, u64>,
    /// (time since start, description), the thread's first MAX_SAMPLES.
    samples: Vec<(Duration, String)>,
    per_generation: BTreeMap<u64, u64>,
    pids: BTreeSet<u32>,
    latencies_us: Vec<u32>,
    timeline: Vec<(u64, u64)>,
    connects: u64,
    reconnects: u64,
    generations_per_connection: Vec<usize>,
}

impl Stats {
    fn merge_into(self, report: &mut Report, samples: &mut Vec<(Duration, String)>) {
        report.ok += self.ok;
        report.connects += self.connects;
        report.reconnects += self.reconnects;
        report
            .generations_per_connection
            .extend(self.generations_per_connection);
        for (kind, n) in self.failures {
            *report.failures.entry(kind).or_default() += n;
        }
        samples.extend(self.samples);
        for (generation, n) in self.per_generation {
            *report.per_generation.entry(generation).or_default() += n;
        }
        report.pids.extend(self.pids);
        report.latencies_us.extend(self.latencies_us);
        if report.timeline.len() < self.timeline.len() {
            report.timeline.resize(self.timeline.len(), (0, 0));
        }
        for (total, (ok, failed)) in report.timeline.iter_mut().zip(self.timeline) {
            total.0 += ok;
            total.1 += failed;
        }
    }

    /// Timeline bucket for now.
    fn bucket(&mut self, start: Instant) -> &mut (u64, u64) {
        let index = (start.elapsed().as_millis() / BUCKET.as_millis()) as usize;
        if self.timeline.len() <= index {
            self.timeline.resize(index + 1, (0, 0));
        }
        &mut self.timeline[index]
    }
}

/// A failed request: its kind and what happened.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    detail: String,
}

impl Failure {
    fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    fn io(error: &io::Error) -> Self {
        Self::new(classify(error), error.to_string())
    }
}

/// Map a socket error to the failure kinds the tests count.
fn classify(error: &io::Error) -> FailureKind {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => FailureKind::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => FailureKind::Reset,
        // Socket timeouts surface as WouldBlock on Unix and TimedOut elsewhere.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FailureKind::Timeout,
        io::ErrorKind::UnexpectedEof => FailureKind::Eof,
        _ => FailureKind::Other,
    }
}

/// A checked 200 response.
#[derive(Debug)]
struct Answer {
    pid: u32,
    generation: u64,
    /// The server asked to close (`Connection: close`): reconnect, not a failure.
    close: bool,
}

/// One load thread.
#[derive(Debug)]
struct Worker {
    config: Arc<LoadConfig>,
    shared: Arc<Shared>,
    /// Its number among the threads of its kind.
    index: usize,
    start: Instant,
    /// "keep-alive #3", for failure samples.
    label: String,
    keep_alive: bool,
    stats: Stats,
    /// The generations that answered on the current connection.
    generations: BTreeSet<u64>,
}

impl Worker {
    fn run(mut self) -> Stats {
        let request = if self.keep_alive {
            format!("GET {} HTTP/1.1\r\nHost: baton\r\n\r\n", self.config.path)
        } else {
            format!(
                "GET {} HTTP/1.1\r\nHost: baton\r\nConnection: close\r\n\r\n",
                self.config.path
            )
        };
        let mut conn: Option<Conn> = None;
        let mut sent = 0u64;
        while sent < self.config.max_requests
            && !self.shared.stop.load(Ordering::Relaxed)
            && self.start.elapsed() < self.config.max_duration
        {
            sent += 1;
            let began = Instant::now();
            let deadline = began + self.config.request_timeout;
            let result = self.request(&mut conn, request.as_bytes(), deadline);
            match result {
                Ok(answer) => {
                    self.generations.insert(answer.generation);
                    if answer.close || !self.keep_alive {
                        conn = None;
                        self.end_connection();
                    }
                    self.record_ok(&answer, began.elapsed());
                }
                Err(failure) => {
                    conn = None;
                    self.end_connection();
                    let refused = failure.kind == FailureKind::Refused;
                    self.record_failure(failure);
                    if refused {
                        // Nobody is listening (e.g. between two generations in a bad
                        // upgrade): without this a refused connect returns at once and
                        // the thread would spin. It throttles the failure loop only.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        self.end_connection();
        self.stats
    }

    /// The current connection ended (or the run did): note how many
    /// generations answered on it.
    fn end_connection(&mut self) {
        if self.keep_alive && !self.generations.is_empty() {
            let generations = std::mem::take(&mut self.generations).len();
            self.stats.generations_per_connection.push(generations);
        }
    }

    /// One request on `conn`, connecting first if there is no connection.
    fn request(
        &mut self,
        conn: &mut Option<Conn>,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Answer, Failure> {
        let conn = match conn {
            Some(conn) => conn,
            None => {
                let connected = match &self.config.unix {
                    Some(path) => Conn::connect_unix(path, deadline)?,
                    None => Conn::connect(self.config.addr, deadline)?,
                };
                if self.keep_alive && self.stats.connects > 0 {
                    self.stats.reconnects += 1;
                }
                self.stats.connects += 1;
                conn.insert(connected)
            }
        };
        conn.write(request, deadline)?;
        let response = conn.read_response(deadline)?;
        validate(&response, &self.config.path)
    }

    fn record_ok(&mut self, answer: &Answer, latency: Duration) {
        self.shared.ok.fetch_add(1, Ordering::Relaxed);
        self.shared
            .max_generation
            .fetch_max(answer.generation, Ordering::Relaxed);
        if self.keep_alive {
            self.shared.last_generation[self.index].store(answer.generation, Ordering::Relaxed);
        }
        let stats = &mut self.stats;
        stats.ok += 1;
        *stats.per_generation.entry(answer.generation).or_default() += 1;
        stats.pids.insert(answer.pid);
        stats
            .latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        stats.bucket(self.start).0 += 1;
    }

    fn record_failure(&mut self, failure: Failure) {
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        let stats = &mut self.stats;
        *stats.failures.entry(failure.kind).or_default() += 1;
        if stats.samples.len() < MAX_SAMPLES {
            let text = format!("{}: {} ({})", failure.kind, failure.detail, self.label);
            stats.samples.push((self.start.elapsed(), text));
        }
        stats.bucket(self.start).1 += 1;
    }
}

/// Time left until `deadline`, or a Timeout failure when none is left
/// (a zero socket timeout would mean "no timeout" to the OS, so never pass one).
fn remaining(deadline: Instant) -> Result<Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Failure::new(FailureKind::Timeout, "request timeout"))
    } else {
        Ok(left)
    }
}

/// A client connection plus bytes read past the last response.
#[derive(Debug)]
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
}

/// A TCP or Unix stream.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(buf),
            Stream::Unix(s) => s.write_all(buf),
        }
    }
}

/// A response as read from the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

impl Conn {
    fn connect(addr: SocketAddr, deadline: Instant) -> Result<Conn, Failure> {
        let stream =
            TcpStream::connect_timeout(&addr, remaining(deadline)?).map_err(|e| Failure::io(&e))?;
        stream.set_nodelay(true).map_err(|e| Failure::io(&e))?;
        Ok(Conn {
            stream: Stream::Tcp(stream),
            buf: Vec::new(),
        })
    }

    /// Connect to a Unix stream socket. A missing socket file counts as
    /// refused: nobody listens there. (A Unix connect waits only while the
    /// server's backlog is full; the deadline bounds everything after it.)
    fn connect_unix(path: &std::path::Path, deadline: Instant) -> Result<Conn, Failure> {
        remaining(deadline)?;
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Failure::new(
                FailureKind::Refused,
                format!("{}: no such socket: {e}", path.display()),
            ),
            _ => Failure::io(&e),
        })?;
        Ok(Conn {
            stream: Stream::Unix(stream),
            buf: Vec::new(),
        })
    }

    fn write(&mut self, data: &[u8], deadline: Instant) -> Result<(), Failure> {
        self.stream
            .set_write_timeout(Some(remaining(deadline)?))
            .map_err(|e| Failure::io(&e))?;
        self.stream.write_all(data).map_err(|e| Failure::io(&e))
    }

    /// Read more bytes into `buf`; EOF is a failure since a response is still due.
    fn fill(&mut self, deadline: Instant) -> Result<(), Failure> {
        self.stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|e| Failure::io(&e))?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Failure::new(
                        FailureKind::Eof,
                        "connection closed before a complete response",
                    ))
                }
                Ok(n) => {
                    self.buf
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::io(&e)),
            }
        }
    }

    /// Read one response: head, then exactly Content-Length body bytes. Bytes
    /// past it stay in `buf`. A non-200 head returns at once (the caller drops
    /// the connection, so its body need not be read).
    fn read_response(&mut self, deadline: Instant) -> Result<RawResponse, Failure> {
        let (head_len, status, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers = parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect::<Vec<_>>();
                    break (n, parsed.code.unwrap_or(0), headers);
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_RESPONSE_HEAD => {
                    return Err(Failure::new(FailureKind::Other, "response head too large"));
                }
                Ok(httparse::Status::Partial) => self.fill(deadline)?,
                Err(e) => {
                    return Err(Failure::new(
                        FailureKind::Other,
                        format!("bad response head: {e}"),
                    ))
                }
            }
        };
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if status != 200 {
            return Ok(response);
        }
        let length = response
            .header("content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n <= MAX_RESPONSE_BODY)
            .ok_or_else(|| Failure::new(FailureKind::BadBody, "missing or bad Content-Length"))?;
        let end = head_len + length;
        while self.buf.len() < end {
            self.fill(deadline)?;
        }
        response.body = self.buf.get(head_len..end).unwrap_or_default().to_vec();
        self.buf.drain(..end);
        Ok(response)
    }
}

/// Check a response: 200, numeric pid and generation headers, and for "/" the exact hello body.
fn validate(response: &RawResponse, path: &str) -> Result<Answer, Failure> {
    if response.status != 200 {
        return Err(Failure::new(
            FailureKind::BadStatus,
            format!("status {}", response.status),
        ));
    }
    let text = |name: &str| {
        response
            .header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    let bad = |what: &str| Failure::new(FailureKind::BadBody, what.to_owned());
    let pid: u32 = text("x-baton-pid")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("missing or bad X-Baton-Pid"))?;
    let generation: u64 = text("x-baton-generation")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("missing or bad X-Baton-Generation"))?;
    if path == "/" {
        let backend = text("x-baton-backend").ok_or_else(|| bad("missing X-Baton-Backend"))?;
        let expected = format!("hello from pid {pid} generation {generation} backend {backend}\n");
        if response.body != expected.as_bytes() {
            return Err(bad(&format!(
                "body {:?} does not match headers",
                String::from_utf8_lossy(&response.body)
            )));
        }
    }
    let close = response.header("connection").is_some_and(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    Ok(Answer {
        pid,
        generation,
        close,
    })
}

#[cfg(test)]
mod tests {
    //! The load client's checks and bounds without a server: no listener, a
    //! missing socket, a stop, bad input, response validation, error
    //! classification and percentiles. Against real servers that answer
    //! well, answer 500 or hang up, it is tested in baton-demo
    //! (`demo/tests/load_client.rs`, built on the demo's HTTP module).

    use super::*;
    use std::net::TcpListener;

    fn config(addr: SocketAddr, keep_alive: usize, per_request: usize, max: u64) -> LoadConfig {
        LoadConfig {
            keep_alive_connections: keep_alive,
            per_request_connections: per_request,
            max_requests: max,
            max_duration: Duration::from_secs(30),
            ..LoadConfig::new(addr)
        }
    }

    #[test]
    fn no_listener_is_refused() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let load = Load::start(config(addr, 1, 1, 3)).expect("start");
        let report = load.wait();
        assert_eq!(report.ok, 0);
        assert_eq!(report.failures, BTreeMap::from([(FailureKind::Refused, 6)]));
        assert_eq!(report.failure_samples.len(), 6);
    }

    #[test]
    fn missing_unix_socket_is_refused() {
        let path =
            std::env::temp_dir().join(format!("baton-load-{}-none.sock", std::process::id()));
        let mut config = LoadConfig::unix(&path);
        config.keep_alive_connections = 1;
        config.max_requests = 3;
        let report = Load::start(config).expect("start").wait();
        assert_eq!(report.ok, 0);
        assert_eq!(report.failures, BTreeMap::from([(FailureKind::Refused, 3)]));
        assert!(
            report.failure_samples[0].contains("no such socket"),
            "{:?}",
            report.failure_samples
        );
    }

    #[test]
    fn stop_ends_an_unbounded_run() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let load = Load::start(config(addr, 2, 0, u64::MAX)).expect("start");
        let report = load.stop();
        assert_eq!(report.ok, 0);
        assert!(report.failures.keys().all(|k| *k == FailureKind::Refused));
        assert!(report.failure_samples.len() <= MAX_SAMPLES);
    }

    #[test]
    fn non_loopback_is_invalid_input() {
        let addr: SocketAddr = "192.0.2.1:80".parse().expect("addr");
        let error = Load::start(LoadConfig::new(addr)).expect_err("must refuse");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let mut bad_path = LoadConfig::new("127.0.0.1:1".parse().expect("addr"));
        bad_path.path = "/ HTTP/1.1\r\n".to_owned();
        let error = Load::start(bad_path).expect_err("must refuse");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn validate_checks_headers_and_body() {
        let response = |body: &str, headers: &[(&str, &str)]| RawResponse {
            status: 200,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body: body.as_bytes().to_vec(),
        };
        let full = [
            ("X-Baton-Pid", "1"),
            ("X-Baton-Generation", "2"),
            ("X-Baton-Backend", "mio"),
        ];
        let good = response("hello from pid 1 generation 2 backend mio\n", &full);
        assert!(validate(&good, "/").is_ok());
        let wrong = response("hello from pid 9 generation 2 backend mio\n", &full);
        assert_eq!(
            validate(&wrong, "/").map_err(|f| f.kind).err(),
            Some(FailureKind::BadBody)
        );
        assert!(validate(&wrong, "/health").is_ok());
        let no_pid = response("", &full[1..]);
        assert_eq!(
            validate(&no_pid, "/health").map_err(|f| f.kind).err(),
            Some(FailureKind::BadBody)
        );
        let bad_gen = response("", &[("X-Baton-Pid", "1"), ("X-Baton-Generation", "x")]);
        assert_eq!(
            validate(&bad_gen, "/health").map_err(|f| f.kind).err(),
            Some(FailureKind::BadBody)
        );
    }

    #[test]
    fn classify_maps_error_kinds() {
        let kind = |k: io::ErrorKind| classify(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::ConnectionRefused), FailureKind::Refused);
        assert_eq!(kind(io::ErrorKind::ConnectionReset), FailureKind::Reset);
        assert_eq!(kind(io::ErrorKind::BrokenPipe), FailureKind::Reset);
        assert_eq!(kind(io::ErrorKind::ConnectionAborted), FailureKind::Reset);
        assert_eq!(kind(io::ErrorKind::WouldBlock), FailureKind::Timeout);
        assert_eq!(kind(io::ErrorKind::TimedOut), FailureKind::Timeout);
        assert_eq!(kind(io::ErrorKind::PermissionDenied), FailureKind::Other);
        assert_eq!(FailureKind::BadStatus.to_string(), "bad status");
        assert_eq!(FailureKind::BadBody.to_string(), "bad body");
    }

    #[test]
    fn percentiles() {
        let report = Report {
            latencies_us: (1..=100).collect(),
            ..Report::default()
        };
        assert_eq!(report.percentile_us(0.0), Some(1));
        assert_eq!(report.percentile_us(50.0), Some(50));
        assert_eq!(report.percentile_us(99.0), Some(99));
        assert_eq!(report.percentile_us(100.0), Some(100));
        assert_eq!(report.percentile_us(f64::NAN), None);
        assert_eq!(Report::default().percentile_us(50.0), None);
    }
}
