//! The demo server over baton-tokio.

use std::sync::Arc;
use std::time::Duration;

use baton_tokio::{
    Baton, Config, ConnectionState, DrainOutcome, ListenAddr, Listener, Signal, Signals, Stream,
    UpgradeError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cli::Options;
use crate::control::{self, Memory, Parsed};
use crate::events::{self, Events};
use crate::http::{self, Action, RequestReader, ServerInfo};
use crate::Failed;

/// How long accepting pauses after a resource-exhaustion error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const BACKEND: &str = "tokio";

/// Serve until upgraded or stopped, then drain. Errors are logged.
pub fn run(options: &Options) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| events::fatal(format_args!("cannot start the tokio runtime: {e}")))?;
    runtime.block_on(serve(options))
}

async fn serve(options: &Options) -> Result<(), Failed> {
    let mut config = Config::default().upgrade_timeout(options.upgrade_timeout);
    if let Some(path) = &options.next_binary {
        config = config.program(path);
    }
    if let Some(path) = &options.pid_file {
        config = config.pid_file(path);
    }
    let baton = Baton::from_env(config).map_err(events::fatal)?;
    let events = Events::new(baton.generation(), BACKEND);
    events.install_as_logger();
    let fail = |message: String| {
        events.emit(format_args!("error: {message}"));
        // Tell the previous generation why, so its upgrade fails with it.
        let _ = baton.report_error(&message);
        Failed
    };

    let info = Arc::new(ServerInfo {
        pid: std::process::id(),
        generation: baton.generation(),
        backend: BACKEND,
    });
    let mut listeners = Vec::new();
    for (name, addr) in &options.listeners() {
        let (listener, origin) = baton
            .listen_with_origin(name, addr)
            .map_err(|e| fail(e.to_string()))?;
        let local = listener.local_addr().unwrap_or_else(|_| addr.to_string());
        let origin = match origin {
            baton_tokio::Origin::Inherited => "inherited",
            baton_tokio::Origin::Bound => "bound",
        };
        events.emit(format_args!("listening on {local} ({name}, {origin})"));
        listeners.push(listener);
    }
    let mut control_listener = match &options.control {
        Some(path) => {
            let (listener, origin) = baton
                .listen_with_origin(control::LISTENER_NAME, &ListenAddr::Unix(path.clone()))
                .map_err(|e| fail(e.to_string()))?;
            let origin = match origin {
                baton_tokio::Origin::Inherited => "inherited",
                baton_tokio::Origin::Bound => {
                    control::restrict(path).map_err(|e| fail(e.to_string()))?;
                    "bound"
                }
            };
            events.emit(format_args!(
                "listening on unix:{} ({}, {origin})",
                path.display(),
                control::LISTENER_NAME
            ));
            Some(listener)
        }
        None => None,
    };
    let mut udp = match options.udp {
        Some(addr) => {
            let (socket, origin) = baton
                .datagram(crate::cli::UDP_NAME, addr)
                .map_err(|e| fail(e.to_string()))?;
            let local = socket
                .local_addr()
                .map_or_else(|_| addr.to_string(), |a| a.to_string());
            let origin = match origin {
                baton_tokio::Origin::Inherited => "inherited",
                baton_tokio::Origin::Bound => "bound",
            };
            events.emit(format_args!(
                "listening on udp:{local} ({}, {origin})",
                crate::cli::UDP_NAME
            ));
            Some(socket)
        }
        None => None,
    };
    let memory = Arc::new(Memory::new(baton.generation(), BACKEND));
    let mut signals = baton
        .signals()
        .map_err(|e| fail(format!("cannot handle signals: {e}")))?;
    match baton.ready() {
        Ok(()) => {}
        // Another live process owns the PID file: refuse to start, and tell
        // the previous generation why (its upgrade fails, it serves on).
        Err(e @ baton_tokio::Error::PidFile(_)) => return Err(fail(e.to_string())),
        Err(e) => events.emit(format_args!("warning: {e}; serving anyway")),
    }
    events.emit("serving");

    // One round per period of serving: normally one, a second one if the
    // new generation died while this one drained.
    loop {
        let accept_loops: Vec<_> = listeners
            .drain(..)
            .map(|listener| {
                tokio::spawn(accept_loop(
                    listener,
                    baton.clone(),
                    info.clone(),
                    options.clone(),
                    events.clone(),
                ))
            })
            .collect();
        let udp_loop = match udp.take().map(tokio::net::UdpSocket::from_std) {
            Some(Ok(socket)) => Some(tokio::spawn(udp_echo(
                socket,
                baton.clone(),
                info.clone(),
                events.clone(),
            ))),
            Some(Err(e)) => {
                events.emit(format_args!("error: udp: {e}"));
                None
            }
            None => None,
        };
        // Control connections ask the signal loop for upgrades on this
        // channel, one per round of serving.
        let (upgrades, mut requests) = mpsc::channel(16);
        let control_loop = control_listener.take().map(|listener| {
            tokio::spawn(control_loop(
                listener,
                baton.clone(),
                memory.clone(),
                upgrades,
                options.clone(),
                events.clone(),
            ))
        });
        handle_signals(&baton, &mut signals, &mut requests, &memory, &events).await;
        // Requests that came in too late get their answer now; later ones
        // cannot be sent.
        requests.close();
        while let Some(reply) = requests.recv().await {
            let _ = reply.send(control::outcome_line(Err("the server is stopping")));
        }
        for task in accept_loops.into_iter().chain(control_loop).chain(udp_loop) {
            let _ = task.await;
        }
        events.emit(format_args!(
            "draining {} connections",
            baton.tracker().open()
        ));
        let outcome = baton
            .drain_watching(options.drain_timeout, options.successor_watch)
            .await;
        match outcome {
            Ok(DrainOutcome::Drained(report)) => {
                events.emit(format_args!("drained: {report}"));
                break;
            }
            Ok(DrainOutcome::Resumed { successor, status }) => {
                events.emit(format_args!(
                    "resumed: new generation {successor} ended ({status}) while this one drained; serving again"
                ));
                for (name, _) in options.listeners() {
                    match baton.reopen(&name) {
                        Ok(listener) => listeners.push(listener),
                        Err(e) => events.emit(format_args!("error: {e}")),
                    }
                }
                if options.udp.is_some() {
                    match baton.reopen_datagram(crate::cli::UDP_NAME) {
                        Ok(socket) => udp = Some(socket),
                        Err(e) => events.emit(format_args!("error: {e}")),
                    }
                }
                if options.control.is_some() {
                    match baton.reopen(control::LISTENER_NAME) {
                        Ok(listener) => control_listener = Some(listener),
                        Err(e) => events.emit(format_args!("error: {e}")),
                    }
                }
            }
            Err(e) => {
                events.emit(format_args!("warning: {e}; draining without watching"));
                let report = baton.drain(options.drain_timeout).await;
                events.emit(format_args!("drained: {report}"));
                break;
            }
        }
    }
    events.emit("exit");
    Ok(())
}

/// Where the outcome of an upgrade goes: the control connection that asked
/// for it, if any.
type Reply = oneshot::Sender<String>;

/// Act on signals and control requests until this generation stops: SIGHUP
/// or a control `upgrade` upgrades (one at a time), SIGTERM/SIGINT stop.
/// Returns once stopped and any upgrade has logged its outcome.
async fn handle_signals(
    baton: &Baton,
    signals: &mut Signals,
    requests: &mut mpsc::Receiver<Reply>,
    memory: &Arc<Memory>,
    events: &Events,
) {
    let stop = baton.stop_token();
    let mut upgrade: Option<JoinHandle<()>> = None;
    loop {
        let reply = tokio::select! {
            signal = signals.recv() => match signal {
                Some(Signal::Upgrade) => None,
                Some(Signal::Stop) => {
                    events.emit("stopping: signal received");
                    baton.stop();
                    continue;
                }
                None => break,
            },
            Some(reply) = requests.recv() => Some(reply),
            _ = stop.stopped() => break,
        };
        if let Some(task) = begin_upgrade(baton, memory, events, reply) {
            upgrade = Some(task);
        }
    }
    // Let the upgrade task log its outcome before the drain lines; after a
    // stop it finishes at once.
    if let Some(task) = upgrade {
        let _ = task.await;
    }
}

/// Start an upgrade, and a task that logs its outcome, remembers it and
/// sends it to `reply`. `None` if it could not start (logged and answered).
fn begin_upgrade(
    baton: &Baton,
    memory: &Arc<Memory>,
    events: &Events,
    reply: Option<Reply>,
) -> Option<JoinHandle<()>> {
    let answer = |line: String| {
        if let Some(reply) = reply {
            let _ = reply.send(line);
        }
    };
    let pending = match baton.start_upgrade() {
        Ok(pending) => pending,
        Err(e) => {
            events.emit(format_args!("upgrade failed: {e}; still serving"));
            let line = control::outcome_line(Err(&e.to_string()));
            if !matches!(
                e,
                UpgradeError::AlreadyRunning { .. } | UpgradeError::Stopping
            ) {
                memory.record(&line);
            }
            answer(line);
            return None;
        }
    };
    events.emit(format_args!(
        "upgrade started: new process {}",
        pending.pid()
    ));
    let (memory, events) = (memory.clone(), events.clone());
    Some(tokio::spawn(async move {
        let line = events.upgrade_outcome(&pending.ready().await);
        memory.record(&line);
        answer(line);
    }))
}

/// Accept control connections until stopped. Each is tracked like an HTTP
/// connection, so a drain waits until its answer is written.
async fn control_loop(
    listener: Listener,
    baton: Baton,
    memory: Arc<Memory>,
    upgrades: mpsc::Sender<Reply>,
    options: Options,
    events: Events,
) {
    let stop = baton.stop_token();
    let tracker = baton.tracker();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.stopped() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(Stream::Unix(stream)) => {
                let conn = tracker.track();
                tokio::spawn(serve_control(
                    stream,
                    conn,
                    memory.clone(),
                    upgrades.clone(),
                    options.write_timeout,
                    events.clone(),
                ));
            }
            Ok(Stream::Tcp(_)) => {}
            Err(e) if is_resource_exhaustion(&e) => {
                events.emit(format_args!("warning: control accept: {e}; backing off"));
                if back_off(&stop).await {
                    break;
                }
            }
            Err(_) => {}
        }
    }
}

/// One control connection: check the peer, read one command, answer, close.
async fn serve_control(
    mut stream: tokio::net::UnixStream,
    mut conn: baton_tokio::Connection,
    memory: Arc<Memory>,
    upgrades: mpsc::Sender<Reply>,
    write_timeout: Duration,
    events: Events,
) {
    use std::os::fd::AsFd;
    conn.set_busy();
    let tracker = conn.tracker().clone();
    // Check the peer first, but read its command either way: answering
    // before it is read would make the close reset the connection, and the
    // refused client would see a reset instead of the reason.
    let refusal = control::check_peer(stream.as_fd()).err();
    if let Some(refusal) = &refusal {
        events.emit(&refusal.log);
    }
    let read = tokio::time::timeout(control::COMMAND_TIMEOUT, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; control::MAX_COMMAND];
        loop {
            match control::parse(&buf) {
                Parsed::Incomplete => {}
                parsed => return Some(parsed),
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let answer = match (refusal, read) {
        (Some(refusal), _) => refusal.answer,
        (None, Err(_elapsed)) => control::timed_out(),
        (None, Ok(None | Some(Parsed::Incomplete))) => return,
        (None, Ok(Some(Parsed::Invalid(answer)))) => answer,
        (None, Ok(Some(Parsed::Command(control::Command::Stop)))) => control::stop(&events),
        (None, Ok(Some(Parsed::Command(control::Command::Status)))) => {
            memory.status(tracker.open(), tracker.busy()).answer()
        }
        (None, Ok(Some(Parsed::Command(control::Command::Upgrade)))) => {
            let (reply, outcome) = oneshot::channel();
            let stopping = || control::outcome_line(Err("the server is stopping"));
            let line = if upgrades.send(reply).await.is_err() {
                stopping()
            } else {
                tokio::select! {
                    line = outcome => line.unwrap_or_else(|_| stopping()),
                    _ = tracker.forced() => return,
                }
            };
            format!("{line}\n")
        }
    };
    let _ = tokio::time::timeout(write_timeout, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Echo datagrams until stopped, then drop this handle on the socket: the
/// next generation reads the rest of the shared queue. A datagram received
/// is always answered, even if the stop comes meanwhile.
async fn udp_echo(
    socket: tokio::net::UdpSocket,
    baton: Baton,
    info: Arc<ServerInfo>,
    events: Events,
) {
    let stop = baton.stop_token();
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.stopped() => break,
            received = socket.recv_from(&mut buf) => received,
        };
        // A receive error (ECONNREFUSED from the ICMP answer to an earlier
        // reply) concerns that peer only.
        if let Ok((len, peer)) = received {
            let reply = crate::cli::udp_echo(&info, &buf[..len]);
            if let Err(e) = socket.send_to(&reply, peer).await {
                events.emit(format_args!("warning: udp reply to {peer}: {e}"));
            }
        }
    }
}

/// Accept until stopped, then drop the listener: this process stops taking
/// connections from the shared queue, and the next generation takes them all.
async fn accept_loop(
    listener: Listener,
    baton: Baton,
    info: Arc<ServerInfo>,
    options: Options,
    events: Events,
) {
    let stop = baton.stop_token();
    let tracker = baton.tracker();
    loop {
        // Backpressure: at --max-connections, leave new clients in the
        // kernel's accept queue until a connection closes.
        tokio::select! {
            biased;
            _ = stop.stopped() => break,
            _ = tracker.below(options.max_connections) => {}
        }
        let accepted = tokio::select! {
            biased;
            _ = stop.stopped() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(stream) => {
                let conn = tracker.track();
                tokio::spawn(serve_connection(
                    stream,
                    conn,
                    info.clone(),
                    options.clone(),
                ));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // EMFILE and friends: accepting again at once would spin.
                events.emit(format_args!("warning: accept: {e}; backing off"));
                if back_off(&stop).await {
                    break;
                }
            }
            // A connection reset before we accepted it concerns that client only.
            Err(_) => {}
        }
    }
}

/// Pause accepting after EMFILE and friends (accepting again at once would
/// spin); true if the server stopped meanwhile.
async fn back_off(stop: &baton_tokio::StopToken) -> bool {
    tokio::time::timeout(ACCEPT_BACKOFF, stop.stopped())
        .await
        .is_ok()
}

fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One keep-alive connection, with the drain semantics of DESIGN.md: after
/// stop, a request in progress is finished and answered with
/// `Connection: close`; an idle connection waits `idle_grace` for one last
/// request, then closes.
async fn serve_connection(
    mut stream: Stream,
    mut conn: baton_tokio::Connection,
    info: Arc<ServerInfo>,
    options: Options,
) {
    let tracker = conn.tracker().clone();
    let stop = tracker.stop_token().clone();
    let mut reader = RequestReader::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(1024);
    // When the first byte of the request being read arrived: the header
    // timeout bounds the whole request, so trickling bytes cannot extend it.
    let mut request_started: Option<std::time::Instant> = None;
    loop {
        let request = match reader.next_request() {
            Ok(Some(request)) => {
                request_started = None;
                request
            }
            Ok(None) => {
                let idle = reader.is_idle();
                if idle {
                    conn.set_idle();
                } else {
                    conn.set_busy();
                }
                let timeout = match (idle, conn.is_draining()) {
                    (true, true) => options.idle_grace,
                    (true, false) => options.idle_timeout,
                    (false, _) => options.header_timeout.saturating_sub(
                        request_started
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed(),
                    ),
                };
                let read = tokio::select! {
                    read = tokio::time::timeout(timeout, stream.read(&mut buf)) => read,
                    // Stop while idle: re-enter the loop to wait only the grace.
                    _ = stop.stopped(), if idle && !conn.is_draining() => continue,
                    _ = tracker.forced() => return,
                };
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => reader.push(&buf[..n]),
                    Err(_elapsed) if idle => return close(stream, &options).await,
                    Err(_elapsed) => {
                        respond_error(&mut stream, 408, &info, &mut out, options.write_timeout)
                            .await;
                        return close(stream, &options).await;
                    }
                }
                continue;
            }
            Err(status) => {
                conn.set_busy();
                respond_error(&mut stream, status, &info, &mut out, options.write_timeout).await;
                conn.set_idle();
                return close(stream, &options).await;
            }
        };
        conn.set_busy();
        let response = match http::handle(&request, &info) {
            Action::Respond(response) => response,
            Action::Sleep { delay, then } => {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => then,
                    _ = tracker.forced() => return,
                }
            }
        };
        // Decided after the work: a stop during a /sleep still gets a close.
        let closing = !request.keep_alive || conn.is_draining();
        out.clear();
        http::encode(&response, &info, closing, &mut out);
        let written = tokio::select! {
            written = tokio::time::timeout(options.write_timeout, stream.write_all(&out)) => written,
            _ = tracker.forced() => return,
        };
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        conn.set_idle();
        if closing {
            return close(stream, &options).await;
        }
    }
}

/// Answer a bad request, bounded like any response by `--write-timeout`
/// (a client that never reads must not hold the connection).
async fn respond_error(
    stream: &mut Stream,
    status: u16,
    info: &ServerInfo,
    out: &mut Vec<u8>,
    write_timeout: Duration,
) {
    out.clear();
    http::encode(&http::error_response(status), info, true, out);
    let _ = tokio::time::timeout(write_timeout, stream.write_all(out)).await;
}

/// Close without a reset: send FIN, then read what the client still sends
/// until it closes too (bounded), so unread bytes never turn into an RST
/// that would destroy the response in flight.
async fn close(mut stream: Stream, options: &Options) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(options.idle_grace.max(Duration::from_millis(100)), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
