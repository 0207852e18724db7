//! `baton-bench`: the same restart scenario on every backend, side by side.
//!
//! ```text
//! cargo run --release -p baton-bench [-- --duration 10s --backend tokio,mio …]
//! ```
//!
//! **Which server.** The bench runs `baton-demo` as a separate process: the
//! binary next to its own executable (`target/release/baton-demo` for
//! `target/release/baton-bench`), or `--server PATH`. Run through cargo
//! (cargo sets `CARGO` for `cargo run`), it first runs
//! `cargo build -p baton-demo --all-features` with its own profile and
//! target directory, so that one command builds the demo fresh and with every
//! backend (a no-op when it is up to date). Run directly, it uses the binary
//! as it is; if there is none, it fails with the command that builds it. It
//! asks the demo which backends it has (the demo's own "not compiled in;
//! available: …" answer to an unknown `--backend`), compares all of them by
//! default, and names the build command when some are missing.
//!
//! For each backend it starts the demo server on `127.0.0.1:0`, drives it
//! with [`testkit::load`] over `--connections` keep-alive connections (one
//! load thread each, in this process) and runs three scenarios, each on a
//! fresh server for `--duration`:
//!
//! - **steady**: load only: throughput and latency p50 / p99 / max;
//! - **upgrades**: the same load while the current generation gets SIGHUP
//!   every `--upgrade-every`, the next one only once the previous one has
//!   finished (its `upgrade done` or `upgrade failed` line). Upgrade time is
//!   SIGHUP until a request on a fresh connection is answered by the new
//!   generation. The demo's keep-alive connections move to the new
//!   generation (live handover, on by default);
//! - **upgrades, handover off**: the same with `--handover off`: every
//!   upgrade ends the old generation's keep-alive connections, and the
//!   clients connect again;
//! - **restart without handoff**: the baseline: SIGTERM, wait for the exit,
//!   start the same binary fresh on the same port. Restart time is SIGTERM
//!   until the new process answers. The refused and reset requests it shows
//!   are what baton avoids.
//!
//! Every run also reports failed requests by kind (reported, never hidden),
//! reconnects per upgrade or restart (keep-alive clients that had to connect
//! again), how long an old generation still held connections after it
//! stopped (median of its `no connection left after N ms` lines),
//! the peak RSS of any generation (VmHWM from `/proc/PID/status`, sampled
//! every 100 ms) and CPU seconds of server and client. The bench is a child
//! subreaper and reaps every generation it saw by pid, so
//! `getrusage(RUSAGE_CHILDREN)` deltas are the server's CPU, and
//! `getrusage(RUSAGE_SELF)` deltas the client's (the load threads run here):
//! a reader sees when the client is the bottleneck.
//!
//! Two more scenarios measure scale (issue 14), each on fresh servers, and
//! get tables of their own: **idle** (RSS per idle keep-alive connection,
//! and upgrade time with `--idle-connections` of them open vs none) and
//! **ballast** (upgrade time of a server with `--ballast 0` vs `--ballast
//! 1GiB`); see [`scale`]'s docs. For them the bench raises its own
//! open-file limit to the hard limit.
//!
//! Output: a Markdown table on stdout, an SVG timeline per run in `--out`
//! (requests and failures per 100 ms, a mark at each upgrade or restart),
//! progress on stderr. Every loop is bounded in time and count, traffic goes
//! to loopback only, and only processes of the server tree the bench started
//! are signalled, by pid.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::{self, Write as _};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use testkit::load::{Load, LoadConfig, Report};

pub mod scale;

/// Every backend baton-demo can be built with, in table order.
pub const BACKENDS: &[&str] = &["tokio", "smol", "mio"];
/// The command that builds the demo with every backend (add `--release` for
/// a release bench).
const BUILD: &str = "cargo build -p baton-demo --all-features";

/// Bound on a server reaching `serving`, an upgrade or restart finishing, and
/// the final drain. Generous: the demo's own upgrade timeout is 10 s.
const STEP_BOUND: Duration = Duration::from_secs(30);
/// How often RSS is sampled and exited generations are reaped.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Pause between two probes for the new generation.
const PROBE_PAUSE: Duration = Duration::from_millis(1);
/// Bound on one probe request (connect, write, each read).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Server log lines kept for error messages.
const RECENT_LINES: usize = 30;
/// Bound on lines read from one server's stderr.
const MAX_LINES: u64 = 10_000_000;
/// Attempts to start the fresh server of a restart (the port can be briefly busy).
const START_ATTEMPTS: u32 = 5;

/// Runs the same load and restart scenarios against every backend compiled
/// into baton-demo and prints a Markdown table; writes an SVG timeline per run.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "baton-bench", version)]
pub struct Options {
    /// The demo server binary. Default: `baton-demo` next to this executable
    /// (built first when run through `cargo run`).
    #[arg(long, value_name = "PATH")]
    pub server: Option<PathBuf>,
    /// Backends to compare, comma-separated or repeated. Default: every one
    /// compiled into the server.
    #[arg(long = "backend", value_name = "NAME", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Scenarios to run, comma-separated or repeated.
    #[arg(
        long = "scenario",
        value_name = "NAME",
        value_enum,
        value_delimiter = ',',
        default_values_t = [
            Scenario::Steady, Scenario::Upgrades, Scenario::UpgradesDrain, Scenario::Restart,
            Scenario::Idle, Scenario::Ballast,
        ]
    )]
    pub scenarios: Vec<Scenario>,
    /// Idle keep-alive connections of the `idle` scenario.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub idle_connections: usize,
    /// The large heap of the `ballast` scenario, as the demo's `--ballast`
    /// takes it (compared with `--ballast 0`).
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    pub ballast: String,
    /// Upgrades per measurement of the `idle` and `ballast` scenarios
    /// (the tables give their median and slowest).
    #[arg(long, value_name = "N", default_value_t = 7)]
    pub upgrades: usize,
    /// Keep-alive connections, each driven by its own load thread.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub connections: usize,
    /// How long each scenario runs under load.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Interval between two upgrades (or restarts), each started only once
    /// the previous one finished.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
    pub upgrade_every: Duration,
    /// Directory for the SVG timelines.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    pub out: PathBuf,
}

/// What happens to the server while the load runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Nothing: steady keep-alive load.
    Steady,
    /// SIGHUP every `--upgrade-every`: baton's handoff, connections move.
    Upgrades,
    /// The same with `--handover off`: connections drain and clients reconnect.
    UpgradesDrain,
    /// SIGTERM, wait for exit, start fresh: the baseline without handoff.
    Restart,
    /// RSS per idle keep-alive connection; upgrade time with them vs none.
    Idle,
    /// Upgrade time with `--ballast 0` vs `--ballast SIZE`.
    Ballast,
}

impl Scenario {
    /// Short name, for file names and progress.
    fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Upgrades => "upgrades",
            Scenario::UpgradesDrain => "upgrades-drain",
            Scenario::Restart => "restart",
            Scenario::Idle => "idle",
            Scenario::Ballast => "ballast",
        }
    }

    /// Whether it runs under the load client and goes in the main table.
    fn under_load(self) -> bool {
        matches!(
            self,
            Scenario::Steady | Scenario::Upgrades | Scenario::UpgradesDrain | Scenario::Restart
        )
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scenario::Steady => "steady",
            Scenario::Upgrades => "upgrades",
            Scenario::UpgradesDrain => "upgrades, handover off",
            Scenario::Restart => "restart without handoff",
            Scenario::Idle => "idle connections",
            Scenario::Ballast => "ballast",
        })
    }
}

/// The bench could not run (bad flags, no server binary); the message says why.
#[derive(Debug)]
pub struct BenchError(pub String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

/// Run every backend and scenario, print the table. `Ok(false)` when some run
/// failed or a baton run saw failed requests: the table is printed anyway.
pub fn run(options: &Options) -> Result<bool, BenchError> {
    let server = server_binary(options)?;
    let available = compiled_backends(&server)?;
    let backends: Vec<String> = if options.backends.is_empty() {
        if available.len() < BACKENDS.len() {
            eprintln!(
                "bench: note: {} has only {}; `{BUILD} --release` builds every backend",
                server.display(),
                available.join(", ")
            );
        }
        available.clone()
    } else {
        options.backends.clone()
    };
    if backends.is_empty() {
        return Err(BenchError(format!(
            "{} has no backend compiled in (build it with `{BUILD} --release`)",
            server.display()
        )));
    }
    if let Some(unknown) = backends.iter().find(|b| !available.contains(b)) {
        return Err(BenchError(format!(
            "backend {unknown:?} is not compiled into {}; available: {} (build every backend with `{BUILD} --release`)",
            server.display(),
            available.join(", ")
        )));
    }
    if options.connections == 0
        || options.duration.is_zero()
        || options.upgrade_every.is_zero()
        || options.idle_connections == 0
        || options.upgrades == 0
    {
        return Err(BenchError(
            "--connections, --duration, --upgrade-every, --idle-connections and --upgrades \
             must be above zero"
                .to_owned(),
        ));
    }
    if options.scenarios.contains(&Scenario::Idle) {
        scale::raise_fd_limit(options.idle_connections).map_err(BenchError)?;
    }
    std::fs::create_dir_all(&options.out)
        .map_err(|e| BenchError(format!("cannot create {}: {e}", options.out.display())))?;
    // Old generations are reparented to the bench when their parent exits,
    // so it can reap them, and their CPU shows up in RUSAGE_CHILDREN.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| BenchError(format!("prctl(PR_SET_CHILD_SUBREAPER): {e}")))?;

    let mut runs = Vec::new();
    let mut idle_rows = Vec::new();
    let mut ballast_rows = Vec::new();
    let mut errors = Vec::new();
    for backend in &backends {
        for &scenario in &options.scenarios {
            if !scenario.under_load() {
                eprintln!(
                    "bench: {backend} {scenario}: {} upgrades each",
                    options.upgrades
                );
                let result = match scenario {
                    Scenario::Idle => {
                        scale::run_idle(options, &server, backend).map(|row| idle_rows.push(row))
                    }
                    _ => scale::run_ballast(options, &server, backend)
                        .map(|row| ballast_rows.push(row)),
                };
                if let Err(e) = result {
                    eprintln!("bench: {backend} {scenario}: error: {e}");
                    errors.push(format!("{backend} {scenario}: {e}"));
                }
                continue;
            }
            eprintln!(
                "bench: {backend} {scenario}: {} connections for {:?}",
                options.connections, options.duration
            );
            match run_one(options, &server, backend, scenario) {
                Ok(run) => {
                    eprintln!("bench: {backend} {scenario}: {}", run.summary());
                    runs.push(run);
                }
                Err(e) => {
                    eprintln!("bench: {backend} {scenario}: error: {e}");
                    errors.push(format!("{backend} {scenario}: {e}"));
                }
            }
        }
    }

    let mut out = String::new();
    if options.scenarios.iter().any(|s| s.under_load()) {
        table(&runs, &mut out);
    }
    if !idle_rows.is_empty() {
        scale::idle_table(&idle_rows, options.upgrades, &mut out);
    }
    if !ballast_rows.is_empty() {
        scale::ballast_table(&ballast_rows, &options.ballast, options.upgrades, &mut out);
    }
    notes(options, &runs, &errors, &mut out);
    print!("{out}");
    let _ = std::io::stdout().flush();
    let clean = errors.is_empty()
        && runs
            .iter()
            .filter(|r| r.scenario != Scenario::Restart)
            .all(|r| r.report.failed() == 0 && r.restart_failures.is_empty());
    Ok(clean)
}

/// The server to run: `--server PATH`, or the `baton-demo` next to this
/// executable, which is built first when the bench runs under cargo.
fn server_binary(options: &Options) -> Result<PathBuf, BenchError> {
    if let Some(path) = &options.server {
        if !path.is_file() {
            return Err(BenchError(format!(
                "no server binary at {}",
                path.display()
            )));
        }
        return Ok(path.clone());
    }
    let me = std::env::current_exe()
        .map_err(|e| BenchError(format!("cannot find this executable: {e}")))?;
    let server = me.with_file_name("baton-demo");
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_demo(&cargo, &me)?;
    }
    if !server.is_file() {
        return Err(BenchError(format!(
            "no server binary at {} (build it with `{BUILD} --release`, or pass --server PATH)",
            server.display()
        )));
    }
    // Run directly, the server next to us may be stale: say so.
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if modified(&server) < modified(&me) {
        eprintln!(
            "bench: warning: {} is older than this executable; `{BUILD} --release` rebuilds it",
            server.display()
        );
    }
    Ok(server)
}

/// `cargo build -p baton-demo --all-features` into the directory `me` (this
/// executable) is in: the same target directory and profile, so the demo
/// lands next to the bench. Cargo's output goes to our stderr.
fn build_demo(cargo: &std::ffi::OsStr, me: &Path) -> Result<(), BenchError> {
    let profile_dir = me
        .parent()
        .ok_or_else(|| BenchError("no parent directory".into()))?;
    let mut command = Command::new(cargo);
    command.args(["build", "-p", "baton-demo", "--all-features"]);
    // The workspace this bench was built from, wherever it is run from.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    if manifest.is_file() {
        command.arg("--manifest-path").arg(manifest);
    }
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
        None => {}
    }
    if let Some(target) = profile_dir.parent() {
        command.arg("--target-dir").arg(target);
    }
    eprintln!("bench: building the demo with every backend: {command:?}");
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| BenchError(format!("cannot run {command:?}: {e}")))?;
    if !status.success() {
        return Err(BenchError(format!("{command:?} failed: {status}")));
    }
    Ok(())
}

/// The backends compiled into `server`, from its answer to an unknown
/// `--backend`: `backend "…" is not compiled in; available: tokio, smol`.
/// It exits before binding anything; bounded by [`STEP_BOUND`].
fn compiled_backends(server: &Path) -> Result<Vec<String>, BenchError> {
    let mut child = Command::new(server)
        .args(["--listen", "127.0.0.1:0", "--backend", "baton-bench-probe"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError(format!("cannot run {}: {e}", server.display())))?;
    let stderr = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            // Bounded: a few lines, then EOF when the server exits.
            let _ = stderr.by_ref().take(64 * 1024).read_to_string(&mut text);
        }
        let _ = tx.send(text);
    });
    let text = rx.recv_timeout(STEP_BOUND);
    if text.is_err() {
        // Ours, started above: stop it by pid.
        let _ = child.kill();
    }
    let _ = child.wait();
    let text = text.map_err(|_| {
        BenchError(format!(
            "{} did not answer an unknown --backend within {STEP_BOUND:?}",
            server.display()
        ))
    })?;
    available_backends(&text).ok_or_else(|| {
        BenchError(format!(
            "{} did not list its backends (is it baton-demo?): {text:?}",
            server.display()
        ))
    })
}

/// The known backends in the `available: A, B` list of the demo's error
/// output, in table order; `None` without such a list.
fn available_backends(text: &str) -> Option<Vec<String>> {
    let available = text
        .lines()
        .find_map(|line| line.split_once("available: ").map(|(_, list)| list))?;
    Some(
        BACKENDS
            .iter()
            .filter(|b| available.split(',').any(|a| a.trim() == **b))
            .map(|b| (*b).to_owned())
            .collect(),
    )
}

/// One duration parser for every baton tool: `250ms`, `10s`, `2m`, bounded.
pub use baton_core::duration::parse_duration;

/// What one run measured.
#[derive(Debug)]
struct Run {
    backend: String,
    scenario: Scenario,
    report: Report,
    /// Time until the new generation (or fresh process) answered, per successful upgrade or restart.
    restarts: Vec<Duration>,
    /// Why an upgrade or restart failed.
    restart_failures: Vec<String>,
    /// How long each old generation held connections after it stopped.
    emptied: Vec<Duration>,
    peak_rss_kib: u64,
    server_cpu: Duration,
    client_cpu: Duration,
    svg: PathBuf,
}

impl Run {
    fn throughput(&self) -> f64 {
        self.report.ok as f64 / self.report.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line for the progress output.
    fn summary(&self) -> String {
        format!(
            "{:.0} req/s, {}, {} restarts, timeline {}",
            self.throughput(),
            failures(&self.report),
            self.restarts.len(),
            self.svg.display()
        )
    }
}

/// One scenario on a fresh server, from start to every generation reaped.
fn run_one(
    options: &Options,
    server: &Path,
    backend: &str,
    scenario: Scenario,
) -> Result<Run, String> {
    let children_before = cpu(UsageWho::RUSAGE_CHILDREN)?;
    let self_before = cpu(UsageWho::RUSAGE_SELF)?;
    let procs = Arc::new(Procs::default());
    let monitor = Monitor::start(Arc::clone(&procs), options.duration + 4 * STEP_BOUND)?;
    let mut session = Session::new(options, server, backend, Arc::clone(&procs));
    let driven = session.drive(scenario);
    session.shutdown();
    drop(session);
    let peak_rss_kib = monitor.stop();
    let server_cpu = cpu(UsageWho::RUSAGE_CHILDREN)?.saturating_sub(children_before);
    let client_cpu = cpu(UsageWho::RUSAGE_SELF)?.saturating_sub(self_before);
    let driven = driven?;
    let svg = options
        .out
        .join(format!("{backend}-{}.svg", scenario.name()));
    let title = format!(
        "{backend}, {scenario}: {} keep-alive connections, {} ok, {} failed",
        options.connections,
        driven.report.ok,
        driven.report.failed()
    );
    // The last bucket is cut short by the stop: leave it out, it is no dip.
    let whole = usize::try_from(options.duration.as_millis() / 100).unwrap_or(usize::MAX);
    let buckets = &driven.report.timeline[..driven.report.timeline.len().min(whole)];
    timeline(&svg, &title, scenario, buckets, &driven.marks)?;
    Ok(Run {
        backend: backend.to_owned(),
        scenario,
        report: driven.report,
        restarts: driven.restarts,
        restart_failures: driven.restart_failures,
        emptied: driven.emptied,
        peak_rss_kib,
        server_cpu,
        client_cpu,
        svg,
    })
}

/// CPU time (user + system) of this process or its reaped children.
fn cpu(who: UsageWho) -> Result<Duration, String> {
    let usage = getrusage(who).map_err(|e| format!("getrusage: {e}"))?;
    let seconds = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// What [`Session::drive`] collected.
#[derive(Debug)]
struct Driven {
    report: Report,
    restarts: Vec<Duration>,
    restart_failures: Vec<String>,
    /// When each upgrade or restart was triggered, since the load started.
    marks: Vec<Duration>,
    /// How long each old generation held connections after it stopped.
    emptied: Vec<Duration>,
}

/// Every process of one server tree: generation 0, each upgrade child, each
/// restarted process. Reaped by pid only, never `waitpid(-1)`.
#[derive(Debug, Default)]
struct Procs {
    inner: Mutex<ProcsInner>,
}

#[derive(Debug, Default)]
struct ProcsInner {
    /// Not reaped yet (by us, or by its parent generation).
    live: BTreeSet<i32>,
    /// Every pid ever added, so a late log line cannot add a reaped one again.
    seen: BTreeSet<i32>,
    /// Highest VmHWM of any of them, in KiB.
    peak_rss_kib: u64,
}

impl Procs {
    fn lock(&self) -> MutexGuard<'_, ProcsInner> {
        // A panic elsewhere cannot leave the sets inconsistent: use them anyway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, pid: u32) {
        let Ok(pid) = i32::try_from(pid) else { return };
        let mut inner = self.lock();
        if inner.seen.insert(pid) {
            inner.live.insert(pid);
        }
    }

    /// Reap `pid` if it exited; true while it still runs (or is not ours to reap yet).
    fn is_live(&self, pid: u32) -> bool {
        let Ok(pid) = i32::try_from(pid) else {
            return false;
        };
        let mut inner = self.lock();
        if inner.live.contains(&pid) && !still_running(pid) {
            inner.live.remove(&pid);
        }
        inner.live.contains(&pid)
    }

    /// Reap every exited process; true while some still run.
    fn poll(&self) -> bool {
        let mut inner = self.lock();
        inner.live.retain(|&pid| still_running(pid));
        !inner.live.is_empty()
    }

    /// Sample VmHWM of every live process.
    fn sample_rss(&self) {
        let mut inner = self.lock();
        let peak = inner.live.iter().filter_map(|&pid| vm_hwm_kib(pid)).max();
        inner.peak_rss_kib = inner.peak_rss_kib.max(peak.unwrap_or(0));
    }

    fn signal_all(&self, signal: Signal) {
        for &pid in &self.lock().live {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// Reap `pid` if it is our exited child. A pid that is not our child yet
/// (its parent generation still runs) counts as running while `/proc` has
/// it; once it is gone from `/proc`, its parent reaped it.
fn still_running(pid: i32) -> bool {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => false,
        Ok(_) | Err(Errno::EINTR) => true,
        Err(Errno::ECHILD) => Path::new(&format!("/proc/{pid}")).exists(),
        Err(_) => false,
    }
}

/// Peak resident set size of `pid` so far, from `/proc/PID/status`.
fn vm_hwm_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The thread that samples RSS and reaps exited generations every 100 ms.
#[derive(Debug)]
struct Monitor {
    procs: Arc<Procs>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Monitor {
    /// Start sampling; the thread also ends by itself after `bound`.
    fn start(procs: Arc<Procs>, bound: Duration) -> Result<Monitor, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (procs, stop) = (Arc::clone(&procs), Arc::clone(&stop));
            thread::Builder::new()
                .name("baton-bench-monitor".to_owned())
                .spawn(move || {
                    let start = Instant::now();
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < bound {
                        procs.sample_rss();
                        procs.poll();
                        thread::sleep(SAMPLE_EVERY);
                    }
                })
                .map_err(|e| format!("cannot start the monitor thread: {e}"))?
        };
        Ok(Monitor {
            procs,
            stop,
            thread,
        })
    }

    /// Stop sampling; the peak RSS seen, in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.procs.lock().peak_rss_kib
    }
}

/// What a server's stderr reader thread sends.
#[derive(Debug)]
enum Event {
    /// A line `baton-demo[PID] gen=G backend=B: MESSAGE`.
    Log {
        pid: u32,
        message: String,
        text: String,
    },
    /// Any other line (`baton-demo: error: …`).
    Other(String),
    /// The stderr of the process the bench started with this pid closed:
    /// it and every generation it became have exited.
    Closed(u32),
}

impl Event {
    fn parse(text: String) -> Event {
        let parsed = (|| {
            let rest = text.strip_prefix("baton-demo[")?;
            let (pid, rest) = rest.split_once("] gen=")?;
            let (_, rest) = rest.split_once(" backend=")?;
            let (_, message) = rest.split_once(": ")?;
            Some((pid.parse().ok()?, message.to_owned()))
        })();
        match parsed {
            Some((pid, message)) => Event::Log { pid, message, text },
            None => Event::Other(text),
        }
    }
}

/// One server tree under load: starts it, triggers upgrades or restarts,
/// follows the current pid from the log lines.
#[derive(Debug)]
struct Session<'a> {
    options: &'a Options,
    server: &'a Path,
    backend: &'a str,
    procs: Arc<Procs>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Last lines of the servers, for error messages.
    recent: VecDeque<String>,
    /// The generation that serves and gets the next SIGHUP or SIGTERM.
    current: u32,
    generation: u64,
    addr: Option<SocketAddr>,
    /// How the running upgrade ended, from the current pid's log lines.
    outcome: Option<Result<(u32, u64), String>>,
    /// When `outcome` was set: the `upgrade done` (or failed) line arrived.
    outcome_at: Option<Instant>,
    /// Arguments added to every server started (the scale scenarios').
    extra_args: Vec<String>,
    /// Pids that logged `ballast: … allocated and touched`.
    ballast_filled: BTreeSet<u32>,
    /// Generations stopped by an upgrade or restart in this run.
    stopped: BTreeSet<u32>,
    /// Their `no connection left after N ms`, by pid.
    emptied: std::collections::BTreeMap<u32, Duration>,
}

impl<'a> Session<'a> {
    fn new(options: &'a Options, server: &'a Path, backend: &'a str, procs: Arc<Procs>) -> Self {
        let (tx, rx) = mpsc::channel();
        Session {
            options,
            server,
            backend,
            procs,
            tx,
            rx,
            recent: VecDeque::new(),
            current: 0,
            generation: 0,
            addr: None,
            outcome: None,
            outcome_at: None,
            extra_args: Vec::new(),
            ballast_filled: BTreeSet::new(),
            stopped: BTreeSet::new(),
            emptied: std::collections::BTreeMap::new(),
        }
    }

    /// Start the server, run the load and the scenario for `--duration`, stop the load.
    fn drive(&mut self, scenario: Scenario) -> Result<Driven, String> {
        if scenario == Scenario::UpgradesDrain {
            self.extra_args = vec!["--handover".to_owned(), "off".to_owned()];
        }
        let addr = self.start("127.0.0.1:0")?;
        let options = self.options;
        let config = LoadConfig {
            keep_alive_connections: options.connections,
            // A hard bound in case the bench itself hangs; stop() ends it normally.
            max_duration: options.duration + 2 * STEP_BOUND,
            ..LoadConfig::new(addr)
        };
        let started = Instant::now();
        let load = Load::start(config).map_err(|e| format!("cannot start the load: {e}"))?;
        let end = started + options.duration;
        let mut next = started + options.upgrade_every;
        let mut progress = started + Duration::from_secs(1);
        let mut restarts = Vec::new();
        let mut restart_failures = Vec::new();
        let mut marks = Vec::new();
        // Each step waits for an event, a deadline or a whole upgrade: the
        // time bound ends the loop long before this count.
        for _ in 0..10_000_000u64 {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if scenario != Scenario::Steady && now >= next {
                marks.push(now - started);
                let result = match scenario {
                    Scenario::Restart => self.restart(addr),
                    _ => self.upgrade(addr),
                };
                match result {
                    Ok(took) => restarts.push(took),
                    Err(e) => {
                        eprintln!("bench: {} {scenario}: {e}", self.backend);
                        restart_failures.push(e);
                    }
                }
                next = now + options.upgrade_every;
                continue;
            }
            if now >= progress {
                eprintln!(
                    "bench: {} {scenario}: {:.0?}/{:.0?}, {} ok, {} failed, generation {}, {} restarts",
                    self.backend,
                    now - started,
                    options.duration,
                    load.ok(),
                    load.failed(),
                    load.max_generation(),
                    restarts.len()
                );
                progress = now + Duration::from_secs(1);
            }
            let until = match scenario {
                Scenario::Steady => end.min(progress),
                _ => end.min(progress).min(next),
            };
            self.pump(until);
            if scenario == Scenario::Restart && !self.procs.is_live(self.current) {
                // One process at a time here: if it is gone, nothing is left to measure.
                drop(load.stop());
                let why = restart_failures.last().cloned().unwrap_or_default();
                return Err(format!(
                    "no server is running any more: {why}{}",
                    self.recent_lines()
                ));
            }
        }
        let report = load.stop();
        // The clients are gone: every stopped generation says when it held
        // no connection any more (bounded).
        let deadline = Instant::now() + STEP_BOUND;
        while self.stopped.iter().any(|p| !self.emptied.contains_key(p))
            && self.next_event(deadline).is_some()
        {}
        Ok(Driven {
            report,
            restarts,
            restart_failures,
            marks,
            emptied: self.emptied.values().copied().collect(),
        })
    }

    /// Spawn the server on `listen` and wait until it serves; its address.
    fn start(&mut self, listen: &str) -> Result<SocketAddr, String> {
        let mut child = Command::new(self.server)
            .args(["--listen", listen, "--backend", self.backend])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.server.display()))?;
        let pid = child.id();
        self.procs.add(pid);
        let Some(stderr) = child.stderr.take() else {
            return Err("no stderr pipe".to_owned());
        };
        // The Child is dropped without waiting: like every generation after
        // it, the process is reaped by pid in Procs.
        drop(child);
        let (tx, procs) = (self.tx.clone(), Arc::clone(&self.procs));
        thread::Builder::new()
            .name(format!("baton-bench-stderr-{pid}"))
            .spawn(move || read_lines(stderr, pid, &tx, &procs))
            .map_err(|e| format!("cannot start a reader thread: {e}"))?;

        let deadline = Instant::now() + STEP_BOUND;
        let mut addr = None;
        while let Some(event) = self.next_event(deadline) {
            match &event {
                Event::Log {
                    pid: from, message, ..
                } if *from == pid => {
                    if let Some(rest) = message.strip_prefix("listening on ") {
                        let text = rest.split(" (").next().unwrap_or_default();
                        addr = text.parse::<SocketAddr>().ok();
                    } else if message == "serving" {
                        let addr = addr.ok_or_else(|| {
                            format!(
                                "no `listening on` line before `serving`{}",
                                self.recent_lines()
                            )
                        })?;
                        if !addr.ip().is_loopback() {
                            return Err(format!("the server listens on {addr}, not loopback"));
                        }
                        self.current = pid;
                        self.generation = 0;
                        self.addr = Some(addr);
                        return Ok(addr);
                    }
                }
                Event::Closed(closed) if *closed == pid => {
                    return Err(format!(
                        "the server exited before serving{}",
                        self.recent_lines()
                    ))
                }
                _ => {}
            }
        }
        Err(format!(
            "the server did not serve within {STEP_BOUND:?}{}",
            self.recent_lines()
        ))
    }

    /// SIGHUP the current generation; the time until a fresh connection is
    /// answered by the new one. Returns once the old one logged the outcome.
    fn upgrade(&mut self, addr: SocketAddr) -> Result<Duration, String> {
        let expected = self.generation + 1;
        self.outcome = None;
        self.stopped.insert(self.current);
        let sent = Instant::now();
        let deadline = sent + STEP_BOUND;
        kill(pid(self.current), Signal::SIGHUP).map_err(|e| format!("SIGHUP: {e}"))?;
        let mut answered = None;
        while Instant::now() < deadline {
            self.pump(Instant::now());
            if let Some(Err(e)) = &self.outcome {
                return Err(e.clone());
            }
            if probe(addr).is_some_and(|(_, generation)| generation >= expected) {
                answered = Some(sent.elapsed());
                break;
            }
            thread::sleep(PROBE_PAUSE);
        }
        while self.outcome.is_none() && self.next_event(deadline).is_some() {}
        match self.outcome.take() {
            Some(Ok((new_pid, generation))) => {
                self.current = new_pid;
                self.generation = generation;
                answered.ok_or_else(|| {
                    format!("generation {generation} never answered within {STEP_BOUND:?}")
                })
            }
            Some(Err(e)) => Err(e),
            None => Err(format!(
                "no upgrade outcome within {STEP_BOUND:?}{}",
                self.recent_lines()
            )),
        }
    }

    /// SIGTERM the server, wait for its exit, start it fresh on the same port;
    /// the time until the fresh process answers.
    fn restart(&mut self, addr: SocketAddr) -> Result<Duration, String> {
        let old = self.current;
        self.stopped.insert(old);
        let sent = Instant::now();
        let deadline = sent + STEP_BOUND;
        kill(pid(old), Signal::SIGTERM).map_err(|e| format!("SIGTERM: {e}"))?;
        while self.procs.is_live(old) {
            if Instant::now() >= deadline {
                return Err(format!("pid {old} did not exit within {STEP_BOUND:?}"));
            }
            self.pump(Instant::now() + PROBE_PAUSE);
        }
        let listen = addr.to_string();
        let mut started = Err(String::new());
        for _ in 0..START_ATTEMPTS {
            started = self.start(&listen);
            if started.is_ok() {
                break;
            }
        }
        started?;
        let fresh = self.current;
        while Instant::now() < deadline {
            if probe(addr).is_some_and(|(pid, _)| pid == fresh) {
                return Ok(sent.elapsed());
            }
            self.pump(Instant::now() + PROBE_PAUSE);
        }
        Err(format!("pid {fresh} never answered within {STEP_BOUND:?}"))
    }

    /// Stop gracefully: SIGTERM the current generation, wait until every
    /// process is reaped, SIGKILL what is left (by pid), wait again.
    fn shutdown(&mut self) {
        if self.current != 0 && self.procs.is_live(self.current) {
            let _ = kill(pid(self.current), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STEP_BOUND;
        while self.procs.poll() && Instant::now() < deadline {
            self.pump(Instant::now() + Duration::from_millis(10));
        }
        if self.procs.poll() {
            eprintln!(
                "bench: {}: processes left after {STEP_BOUND:?}: killing them",
                self.backend
            );
            self.procs.signal_all(Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.procs.poll() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Handle events until `until` (at least the ones already queued).
    fn pump(&mut self, until: Instant) {
        while self.next_event(until).is_some() {}
    }

    /// The next event, handled, or None at `deadline`.
    fn next_event(&mut self, deadline: Instant) -> Option<Event> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let event = match self.rx.recv_timeout(wait) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
        };
        self.handle(&event);
        Some(event)
    }

    /// Keep the line for errors; note how an upgrade of the current pid ended.
    fn handle(&mut self, event: &Event) {
        let text = match event {
            Event::Log { text, .. } | Event::Other(text) => text.clone(),
            Event::Closed(pid) => format!("(stderr of pid {pid} closed)"),
        };
        if self.recent.len() == RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(text);
        let Event::Log { pid, message, .. } = event else {
            return;
        };
        if message.starts_with("ballast: ") {
            self.ballast_filled.insert(*pid);
        }
        if let Some(held) = message
            .strip_prefix("no connection left after ")
            .and_then(|rest| rest.strip_suffix(" ms"))
            .and_then(|ms| ms.parse::<f64>().ok())
        {
            self.emptied
                .insert(*pid, Duration::from_secs_f64(held.max(0.0) / 1000.0));
        }
        if *pid != self.current {
            return;
        }
        if let Some(rest) = message.strip_prefix("upgrade done: pid ") {
            let mut words = rest.split_whitespace();
            let new_pid = words.next().and_then(|w| w.parse().ok());
            let generation = words.nth(1).and_then(|w| w.parse().ok());
            self.outcome = Some(match (new_pid, generation) {
                (Some(p), Some(g)) => Ok((p, g)),
                _ => Err(format!("cannot parse {message:?}")),
            });
            self.outcome_at = Some(Instant::now());
        } else if message.starts_with("upgrade failed") || message.starts_with("upgrade abandoned")
        {
            self.outcome = Some(Err(message.clone()));
            self.outcome_at = Some(Instant::now());
        }
    }

    fn recent_lines(&self) -> String {
        let mut text = String::from("; last server lines:");
        for line in &self.recent {
            let _ = write!(text, "\n  {line}");
        }
        text
    }
}

impl Drop for Session<'_> {
    /// Never leave a server behind, even on a panic: SIGKILL by pid.
    fn drop(&mut self) {
        if self.procs.poll() {
            self.procs.signal_all(Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.procs.poll() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Forward the lines of one server's stderr (shared by all its generations),
/// registering every pid that appears so it gets reaped and sampled.
fn read_lines(stderr: impl Read, spawned: u32, tx: &Sender<Event>, procs: &Procs) {
    let mut lines = BufReader::new(stderr).lines();
    for _ in 0..MAX_LINES {
        let Some(Ok(text)) = lines.next() else { break };
        let event = Event::parse(text);
        if let Event::Log { pid, message, .. } = &event {
            procs.add(*pid);
            if let Some(child) = message
                .strip_prefix("upgrade started: new process ")
                .and_then(|p| p.trim().parse().ok())
            {
                procs.add(child);
            }
        }
        if tx.send(event).is_err() {
            return;
        }
    }
    let _ = tx.send(Event::Closed(spawned));
}

/// `GET /` on a fresh connection: the (pid, generation) that answered.
fn probe(addr: SocketAddr) -> Option<(u32, u64)> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: baton\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, _) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    if !lines.next()?.starts_with("HTTP/1.1 200") {
        return None;
    }
    let mut found = (None, None);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("x-baton-pid") {
            found.0 = value.trim().parse().ok();
        } else if name.eq_ignore_ascii_case("x-baton-generation") {
            found.1 = value.trim().parse().ok();
        }
    }
    Some((found.0?, found.1?))
}

/// "0", or "N: refused A, reset B".
fn failures(report: &Report) -> String {
    let total = report.failed();
    if total == 0 {
        return "0".to_owned();
    }
    let kinds: Vec<String> = report
        .failures
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    format!("{total}: {}", kinds.join(", "))
}

/// Milliseconds with two decimals.
fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn latency_ms(report: &Report, p: f64) -> String {
    report.percentile_us(p).map_or("-".to_owned(), |us| {
        ms(Duration::from_micros(u64::from(us)))
    })
}

/// The Markdown table: one row per backend and scenario.
fn table(runs: &[Run], out: &mut String) {
    out.push_str(
        "| backend | scenario | req/s | p50 ms | p99 ms | max ms | failed requests \
         | restarts | restart median ms | restart max ms | reconnects per restart \
         | old gen held connections: median ms | max ms | peak RSS MiB \
         | server CPU s | client CPU s |\n",
    );
    out.push_str("|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for run in runs {
        let (restarts, median, max, reconnects) = if run.scenario == Scenario::Steady {
            (
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            )
        } else {
            let mut times = run.restarts.clone();
            times.sort_unstable();
            let mut count = times.len().to_string();
            if !run.restart_failures.is_empty() {
                let _ = write!(count, " ({} failed)", run.restart_failures.len());
            }
            let median = times
                .get(times.len() / 2)
                .map_or("-".to_owned(), |d| ms(*d));
            let max = times.last().map_or("-".to_owned(), |d| ms(*d));
            let reconnects = match times.len() {
                0 => "-".to_owned(),
                n => format!("{:.1}", run.report.reconnects as f64 / n as f64),
            };
            (count, median, max, reconnects)
        };
        let mut emptied = run.emptied.clone();
        emptied.sort_unstable();
        let held_median = emptied
            .get(emptied.len() / 2)
            .map_or("-".to_owned(), |d| ms(*d));
        let held_max = emptied.last().map_or("-".to_owned(), |d| ms(*d));
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} |",
            run.backend,
            run.scenario,
            run.throughput(),
            latency_ms(&run.report, 50.0),
            latency_ms(&run.report, 99.0),
            latency_ms(&run.report, 100.0),
            failures(&run.report),
            restarts,
            median,
            max,
            reconnects,
            held_median,
            held_max,
            run.peak_rss_kib as f64 / 1024.0,
            run.server_cpu.as_secs_f64(),
            run.client_cpu.as_secs_f64(),
        );
    }
}

/// Below the table: what the columns mean, what went wrong in baton's runs
/// (which must not happen), runs that failed, and where the timelines are.
fn notes(options: &Options, runs: &[Run], errors: &[String], out: &mut String) {
    if !runs.is_empty() {
        let _ = writeln!(
            out,
            "\n{} keep-alive connections, {:?} per run, an upgrade or restart every {:?}. \
             Restart time: SIGHUP (upgrades) or SIGTERM (restart without handoff) until a \
             fresh connection is answered by the new process. Reconnects: keep-alive clients \
             that had to connect again, per upgrade or restart. Old gen held connections: from \
             its stop until its last connection moved or closed (its `no connection left` \
             line). Server CPU: every generation; client CPU: the bench process, whose threads \
             are the load client.",
            options.connections, options.duration, options.upgrade_every
        );
    }
    let mut problems = Vec::new();
    for run in runs.iter().filter(|r| r.scenario != Scenario::Restart) {
        for sample in &run.report.failure_samples {
            problems.push(format!(
                "{} {}: failed request: {sample}",
                run.backend, run.scenario
            ));
        }
        for failure in &run.restart_failures {
            problems.push(format!(
                "{} {}: upgrade failed: {failure}",
                run.backend, run.scenario
            ));
        }
    }
    problems.extend(errors.iter().map(|e| format!("error: {e}")));
    if !problems.is_empty() {
        out.push('\n');
        for problem in problems {
            let _ = writeln!(out, "- {problem}");
        }
    }
    if !runs.is_empty() {
        out.push_str("\nTimelines:\n");
        for run in runs {
            let _ = writeln!(
                out,
                "- {} {}: {}",
                run.backend,
                run.scenario,
                run.svg.display()
            );
        }
    }
}

/// The SVG timeline: successful and failed requests per 100 ms, with a
/// vertical mark at each upgrade or restart.
fn timeline(
    path: &Path,
    title: &str,
    scenario: Scenario,
    buckets: &[(u64, u64)],
    marks: &[Duration],
) -> Result<(), String> {
    use plotters::prelude::*;

    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (1000, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let seconds = (buckets.len() as f64 / 10.0).max(0.1);
        let top = buckets
            .iter()
            .map(|&(ok, failed)| ok.max(failed))
            .max()
            .unwrap_or(0)
            .max(1);
        // Head room for the legend, top right.
        let top = top + top * 2 / 5 + 1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..seconds, 0..top)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("seconds since the load started")
            .y_desc("requests per 100 ms")
            .draw()?;
        let mark_style = ShapeStyle::from(&RGBColor(230, 140, 0).mix(0.8)).stroke_width(1);
        let mark_label = match scenario {
            Scenario::Restart => "restart (SIGTERM, start fresh)",
            _ => "upgrade (SIGHUP)",
        };
        let mut marked = chart.draw_series(marks.iter().map(|m| {
            let x = m.as_secs_f64();
            PathElement::new(vec![(x, 0), (x, top)], mark_style)
        }))?;
        if !marks.is_empty() {
            marked = marked.label(mark_label);
            marked.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], mark_style));
        }
        // Each bucket is drawn at its middle.
        let at = |i: usize| i as f64 / 10.0 + 0.05;
        chart
            .draw_series(LineSeries::new(
                buckets.iter().enumerate().map(|(i, b)| (at(i), b.0)),
                BLUE.stroke_width(2),
            ))?
            .label("ok")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                buckets.iter().enumerate().map(|(i, b)| (at(i), b.1)),
                RED.stroke_width(2),
            ))?
            .label("failed")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use testkit::load::FailureKind;

    #[test]
    fn backends_from_the_demo_answer() {
        let all = "baton-demo: error: backend \"baton-bench-probe\" is not compiled in; available: mio, smol, tokio\n";
        assert_eq!(
            available_backends(all),
            Some(vec!["tokio".into(), "smol".into(), "mio".into()])
        );
        let one = "baton-demo: error: backend \"x\" is not compiled in; available: smol\n";
        assert_eq!(available_backends(one), Some(vec!["smol".into()]));
        assert_eq!(
            available_backends("error: unexpected argument '--backend'\n"),
            None
        );
    }

    #[test]
    fn parses_log_lines() {
        let event = Event::parse(
            "baton-demo[42] gen=3 backend=tokio: upgrade done: pid 50 generation 4 ready after 3 ms"
                .to_owned(),
        );
        let Event::Log { pid, message, .. } = event else {
            panic!("not a log line");
        };
        assert_eq!(pid, 42);
        assert_eq!(
            message,
            "upgrade done: pid 50 generation 4 ready after 3 ms"
        );
        assert!(matches!(
            Event::parse("baton-demo: error: bad".to_owned()),
            Event::Other(_)
        ));
    }

    #[test]
    fn failures_by_kind() {
        let mut report = Report::default();
        assert_eq!(failures(&report), "0");
        report.failures = BTreeMap::from([(FailureKind::Refused, 7), (FailureKind::Reset, 2)]);
        assert_eq!(failures(&report), "9: refused 7, reset 2");
    }

    #[test]
    fn vm_hwm_of_this_process() {
        let own = i32::try_from(std::process::id()).expect("pid");
        assert!(vm_hwm_kib(own).is_some_and(|kib| kib > 0));
    }
}
