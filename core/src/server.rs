//! The async driver: the [`Lifecycle`] on any [`Runtime`], with accept
//! loops, the control socket and signals, written once for baton-tokio and
//! baton-smol.
//!
//! A [`Server`] is what an application on an async runtime uses: name its
//! listeners, then hand [`Server::serve`] a function that serves one
//! connection. The server reports ready, accepts (with back-pressure at
//! [`Config::max_connections`] and a back-off after `EMFILE`), upgrades on
//! `SIGHUP` or a control `upgrade`, stops on `SIGTERM`/`SIGINT` or a control
//! `stop`, drains, serves again if its successor dies, and returns how the
//! drain ended: then the process should exit.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::control::{self, Parsed};
use crate::handover::Item;
use crate::lifecycle::{Answer, Event, Lifecycle, ReplyTo, Request};
use crate::runtime::{Accept, BoxFuture, Runtime};
use crate::{Config, Connection, DrainReport, Error, Generation, ListenAddr, ListenSocket};
use crate::{Offer, StopToken, Tracker};

/// How long accepting pauses after a resource-exhaustion error (`EMFILE`…):
/// accepting again at once would fail again, in a busy loop.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long writing a control answer may take.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A task run on a datagram socket while this generation serves: it gets
/// the socket and the stop token, and should return once stopped (the next
/// generation reads the rest of the shared queue).
type DatagramTask =
    Arc<dyn Fn(std::net::UdpSocket, StopToken) -> BoxFuture<'static, ()> + Send + Sync>;

/// Serves a connection that moved here (or came back from a failed move):
/// its saved state and a guard of this generation.
type MovedTask = Arc<dyn Fn(Item, Connection) -> BoxFuture<'static, ()> + Send + Sync>;

/// A request from a control connection or a [`Handle`], with where its
/// answer goes.
type Message = (Request, Option<async_channel::Sender<Answer>>);

/// One generation of a server on the async runtime `R`, accepting on
/// listeners of type `L`. baton-tokio and baton-smol name it `Server`.
pub struct Server<R: Runtime, L: Accept> {
    runtime: Arc<R>,
    lifecycle: Lifecycle,
    config: Config,
    /// Every listener's name, to reopen them all on a resume.
    names: Vec<String>,
    /// Every datagram task, to run them again on a resume.
    datagram_tasks: Vec<(String, DatagramTask)>,
    /// What the next round of serving starts on.
    listeners: Vec<L>,
    datagrams: Vec<(std::net::UdpSocket, DatagramTask)>,
    control: Option<UnixListener>,
    on_ready: Option<Box<dyn FnOnce() + Send + Sync>>,
    /// How to serve each kind of connection that moves.
    moved_tasks: HashMap<String, MovedTask>,
    messages: (
        async_channel::Sender<Message>,
        async_channel::Receiver<Message>,
    ),
}

impl<R: Runtime, L: Accept> std::fmt::Debug for Server<R, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("runtime", &self.runtime)
            .field("generation", &self.lifecycle.generation().number())
            .field("listeners", &self.names)
            .field("control", &self.control.is_some())
            .finish()
    }
}

impl<R: Runtime, L: Accept> Server<R, L> {
    /// Adopt what the previous generation (or systemd) passed, install the
    /// signal handlers, and open the control socket if `config` names one
    /// (it accepts once [`serve`](Self::serve) runs).
    pub fn new(runtime: R, config: Config) -> Result<Self, Error> {
        let generation = Generation::from_env(config.clone())?;
        let mut server = Server {
            runtime: Arc::new(runtime),
            lifecycle: Lifecycle::new(generation, config.timeouts.clone()),
            config,
            names: Vec::new(),
            datagram_tasks: Vec::new(),
            listeners: Vec::new(),
            datagrams: Vec::new(),
            control: None,
            on_ready: None,
            moved_tasks: HashMap::new(),
            messages: async_channel::unbounded(),
        };
        if server.config.handle_signals {
            if let Err(e) = server.lifecycle.handle_signals() {
                return Err(server.fail(Error::Signals(e)));
            }
        }
        if let Some(path) = server.config.control.clone() {
            server.control = Some(server.open_control(&path)?);
        }
        Ok(server)
    }

    /// This generation's number: 0 when started by hand, +1 per upgrade.
    pub fn generation(&self) -> u64 {
        self.lifecycle.generation().number()
    }

    /// Accept on the listener `name`: inherited if the previous generation
    /// (or systemd) passed it, else bound to `addr`. On error the previous
    /// generation is told why (its upgrade fails and it serves on).
    pub fn listen(&mut self, name: &str, addr: &ListenAddr) -> Result<(), Error> {
        match self.lifecycle.generation().listen::<L>(name, addr) {
            Ok((listener, _origin)) => {
                self.names.push(name.to_owned());
                self.listeners.push(listener);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Run `task` on the UDP socket `name` (inherited, or bound to `addr`)
    /// while this generation serves, and again if it serves again after
    /// its successor died.
    pub fn datagram<F, Fut>(
        &mut self,
        name: &str,
        addr: std::net::SocketAddr,
        task: F,
    ) -> Result<(), Error>
    where
        F: Fn(std::net::UdpSocket, StopToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        match self.lifecycle.generation().datagram(name, addr) {
            Ok((socket, _origin)) => {
                let task: DatagramTask = Arc::new(move |socket, stop| Box::pin(task(socket, stop)));
                self.datagram_tasks.push((name.to_owned(), task.clone()));
                self.datagrams.push((socket, task));
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Run `hook` once this generation has reported ready, before it
    /// accepts: work that must not delay the handover (warming a cache)
    /// starts there, not before.
    pub fn on_ready(&mut self, hook: impl FnOnce() + Send + Sync + 'static) {
        self.on_ready = Some(Box::new(hook));
    }

    /// What this generation moves to the next one at each upgrade, at the
    /// negotiated state version (see [`Lifecycle::on_save_state`] and
    /// [`Config::state_versions`]).
    pub fn on_save_state(
        &mut self,
        save: impl FnMut(u32) -> Vec<crate::handover::Item> + Send + Sync + 'static,
    ) {
        self.lifecycle.on_save_state(save);
    }

    /// Move open connections of `kind` at each upgrade instead of draining
    /// them, and serve with `task` those that move here. The live handover
    /// (see [`crate::lifecycle`]): needs [`Config::state_versions`].
    ///
    /// Connections of this kind offer themselves at safe points: when
    /// [`Connection::can_move`] says so (after finishing a request, or when
    /// [`Tracker::moving_or_closing_idle`] wakes an idle one), stop reading,
    /// save the socket and its state in an [`Item`] named `kind`, and
    /// [`Connection::offer`] it. `task` gets such an item — in the next
    /// generation once the move is committed, or here again if it failed —
    /// rebuilds the connection from it and serves it as the handler would.
    pub fn on_moved<F, Fut>(&mut self, kind: &str, task: F)
    where
        F: Fn(Item, Connection) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let task: MovedTask = Arc::new(move |item, conn| Box::pin(task(item, conn)));
        self.moved_tasks.insert(kind.to_owned(), task);
        let kinds: Vec<String> = self.moved_tasks.keys().cloned().collect();
        self.lifecycle.move_connections(kinds);
    }

    /// The state the previous generation moves to this one; blocks up to
    /// `timeout`: call it before [`serve`](Self::serve) (see
    /// [`Generation::receive_state`](crate::Generation::receive_state)).
    pub fn receive_state(&self, timeout: Duration) -> Result<Vec<crate::handover::Item>, Error> {
        self.lifecycle.generation().receive_state(timeout)
    }

    /// A handle to ask this server for an upgrade or a stop from the
    /// application's own code.
    pub fn handle(&self) -> Handle {
        Handle {
            messages: self.messages.0.clone(),
        }
    }

    /// How long an idle connection may still send a last request after the
    /// stop ([`Tracker::closing_idle`] resolves then).
    pub fn idle_grace(&self) -> Duration {
        self.config.timeouts.idle_grace
    }

    /// The token that stops this generation, for the application's own tasks.
    pub fn stop_token(&self) -> StopToken {
        self.lifecycle.generation().stop_token().clone()
    }

    /// The tracker of this generation's connections.
    pub fn tracker(&self) -> Tracker {
        self.lifecycle.generation().tracker().clone()
    }

    /// Tell the previous generation this one cannot serve, and why; returns
    /// the error to pass on.
    fn fail(&self, error: Error) -> Error {
        if let Err(e) = self.lifecycle.generation().report_error(&error.to_string()) {
            log::warn!("cannot tell the previous generation why: {e}");
        }
        error
    }

    fn open_control(&mut self, path: &std::path::Path) -> Result<UnixListener, Error> {
        let generation = self.lifecycle.generation();
        match generation.listen_private::<ListenSocket>(control::LISTENER_NAME, path) {
            Ok((ListenSocket::Unix(listener), _origin)) => Ok(listener),
            Ok(_) => Err(self.fail(Error::Listen {
                name: control::LISTENER_NAME.to_owned(),
                addr: format!("unix:{}", path.display()),
                source: io::Error::other("not a Unix stream socket"),
            })),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Report ready, then serve every connection with `handler` until this
    /// generation has handed over or stopped and drained. Returns how the
    /// drain ended; the process should exit then.
    ///
    /// `handler` gets each accepted connection with its [`Connection`]
    /// guard: mark it busy while a request runs and idle after, and close
    /// it once [`Connection::is_draining`] (after finishing the request in
    /// progress) or [`Tracker::forced`] resolves.
    pub async fn serve<H, F>(mut self, handler: H) -> Result<DrainReport, Error>
    where
        H: Fn(L::Stream, Connection) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        if let Err(e) = self.lifecycle.ready() {
            if matches!(e, Error::PidFile(_)) {
                // Another live server owns the PID file: refuse to start.
                return Err(self.fail(e));
            }
            log::warn!("{e}; serving anyway");
        }
        if let Some(hook) = self.on_ready.take() {
            hook();
        }
        let handler = Arc::new(handler);
        self.start_serving(&handler);
        let mut replies: HashMap<u64, async_channel::Sender<Answer>> = HashMap::new();
        let mut next_reply = 0u64;
        loop {
            while let Some(event) = self.lifecycle.poll_event() {
                match event {
                    Event::Answer { reply, answer } => {
                        if let Some(tx) = replies.remove(&reply.0) {
                            let _ = tx.try_send(answer);
                        }
                    }
                    Event::Resume => self.resume(&handler),
                    Event::Moved(items) => {
                        let tracker = self.lifecycle.generation().tracker();
                        for item in items {
                            let conn = tracker.track();
                            self.serve_moved(item, conn);
                        }
                    }
                    Event::Unmoved(offers) => {
                        for Offer { item, conn } in offers {
                            self.serve_moved(item, conn);
                        }
                    }
                    Event::Exit(report) => return Ok(report),
                    // Stop, close idle, force: accept loops and connections
                    // follow the stop token and the tracker, which the
                    // lifecycle has already set.
                    _ => {}
                }
            }
            let wake = self.wait().await;
            let now = Instant::now();
            match wake {
                Wake::Message((request, reply)) => {
                    let id = reply.map(|tx| {
                        next_reply += 1;
                        replies.insert(next_reply, tx);
                        ReplyTo(next_reply)
                    });
                    self.lifecycle.request(request, id, now);
                }
                Wake::Something => self.lifecycle.handle_readable(now),
            }
        }
    }

    /// Serve a connection that moved here or came back, by its kind (the
    /// lifecycle takes no kind it has no task for).
    fn serve_moved(&self, item: Item, conn: Connection) {
        match self.moved_tasks.get(&item.name) {
            Some(task) => self.runtime.spawn(task(item, conn)),
            None => log::warn!(
                "moves: no task for connections of kind {:?}; closed",
                item.name
            ),
        }
    }

    /// Wait until the lifecycle has something to do.
    async fn wait(&self) -> Wake {
        let lifecycle = &self.lifecycle;
        let mut waits: Vec<BoxFuture<'_, Wake>> = Vec::new();
        let watched = lifecycle.watched();
        for fd in watched.all() {
            // One registration per fd: a writable wait also wakes on a
            // hang-up or error, and the wake reads whatever came.
            let ready = if watched.is_writable(fd) {
                self.runtime.writable(fd)
            } else {
                self.runtime.readable(fd)
            };
            waits.push(Box::pin(async move {
                let _ = ready.await;
                Wake::Something
            }));
        }
        if let Some(at) = lifecycle.poll_timeout() {
            let sleep = self.runtime.sleep_until(at);
            waits.push(Box::pin(async move {
                sleep.await;
                Wake::Something
            }));
        }
        let tracker = lifecycle.generation().tracker().clone();
        if lifecycle.is_stopping() && tracker.open() > 0 {
            let tracker = tracker.clone();
            waits.push(Box::pin(async move {
                tracker.empty().await;
                Wake::Something
            }));
        }
        if !tracker.has_offers() {
            // The first offer wakes the lifecycle; later ones wait for it.
            let tracker = tracker.clone();
            waits.push(Box::pin(async move {
                tracker.offered().await;
                Wake::Something
            }));
        }
        let messages = self.messages.1.clone();
        waits.push(Box::pin(async move {
            match messages.recv().await {
                Ok(message) => Wake::Message(message),
                // Never closed: the server holds a sender.
                Err(_) => std::future::pending().await,
            }
        }));
        first_of(waits).await
    }

    /// Start accepting on every listener, the control socket and the
    /// datagram tasks.
    fn start_serving<H, F>(&mut self, handler: &Arc<H>)
    where
        H: Fn(L::Stream, Connection) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let generation = self.lifecycle.generation();
        let stop = generation.stop_token().clone();
        let tracker = generation.tracker().clone();
        for listener in self.listeners.drain(..) {
            self.runtime.spawn(Box::pin(accept_loop(
                self.runtime.clone(),
                listener,
                stop.clone(),
                tracker.clone(),
                self.config.max_connections,
                handler.clone(),
            )));
        }
        if let Some(listener) = self.control.take() {
            self.runtime.spawn(Box::pin(control_loop(
                self.runtime.clone(),
                listener,
                stop.clone(),
                tracker.clone(),
                self.messages.0.clone(),
            )));
        }
        for (socket, task) in self.datagrams.drain(..) {
            self.runtime.spawn(task(socket, stop.clone()));
        }
    }

    /// Serve again after the successor died: accept loops on listeners
    /// reopened from the sockets this generation held.
    fn resume<H, F>(&mut self, handler: &Arc<H>)
    where
        H: Fn(L::Stream, Connection) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let generation = self.lifecycle.generation();
        for name in &self.names {
            match generation.reopen::<L>(name) {
                Ok(listener) => self.listeners.push(listener),
                Err(e) => log::error!("{e}"),
            }
        }
        for (name, task) in &self.datagram_tasks {
            match generation.reopen_datagram(name) {
                Ok(socket) => self.datagrams.push((socket, task.clone())),
                Err(e) => log::error!("{e}"),
            }
        }
        if self.config.control.is_some() {
            match generation.reopen::<ListenSocket>(control::LISTENER_NAME) {
                Ok(ListenSocket::Unix(listener)) => self.control = Some(listener),
                Ok(_) => {}
                Err(e) => log::error!("{e}"),
            }
        }
        self.start_serving(handler);
    }
}

/// Why [`Server::wait`] returned.
enum Wake {
    /// A request to act on.
    Message(Message),
    /// An fd, a timer or the tracker: let the lifecycle look.
    Something,
}

/// Asks a running [`Server`] for an upgrade, its status or a stop, from the
/// application's own code. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Handle {
    messages: async_channel::Sender<Message>,
}

impl Handle {
    /// Start an upgrade and wait for its outcome, exactly as `SIGHUP` or a
    /// control `upgrade` does.
    pub async fn upgrade(&self) -> Answer {
        self.ask(Request::Upgrade).await
    }

    /// Stop gracefully, as `SIGTERM` does; during a drain, end it now.
    pub fn stop(&self) {
        let _ = self.messages.try_send((Request::Stop, None));
    }

    async fn ask(&self, request: Request) -> Answer {
        let (tx, rx) = async_channel::bounded(1);
        let stopping = || Answer::UpgradeFailed("the server is stopping".to_owned());
        if self.messages.send((request, Some(tx))).await.is_err() {
            return stopping();
        }
        rx.recv().await.unwrap_or_else(|_| stopping())
    }
}

/// Resolve with the first of `futures` to resolve.
async fn first_of<T>(mut futures: Vec<BoxFuture<'_, T>>) -> T {
    std::future::poll_fn(|cx: &mut Context<'_>| {
        for future in futures.iter_mut() {
            if let Poll::Ready(value) = future.as_mut().poll(cx) {
                return Poll::Ready(value);
            }
        }
        Poll::Pending
    })
    .await
}

/// `a`, unless `stop` stops first (`None`). The stop is checked first.
async fn unless_stopped<T>(stop: &StopToken, a: impl Future<Output = T>) -> Option<T> {
    let mut a = std::pin::pin!(a);
    let mut stopped = std::pin::pin!(stop.stopped());
    std::future::poll_fn(|cx| {
        if stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        a.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Accept until stopped, then drop the listener: this process stops taking
/// connections from the shared queue, and the next generation takes them all.
async fn accept_loop<R, L, H, F>(
    runtime: Arc<R>,
    listener: L,
    stop: StopToken,
    tracker: Tracker,
    max_connections: usize,
    handler: Arc<H>,
) where
    R: Runtime,
    L: Accept,
    H: Fn(L::Stream, Connection) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        // Back-pressure: at the limit, new clients wait in the kernel's
        // accept queue until a connection closes.
        if unless_stopped(&stop, tracker.below(max_connections))
            .await
            .is_none()
        {
            break;
        }
        let Some(accepted) = unless_stopped(&stop, listener.accept()).await else {
            break;
        };
        match accepted {
            Ok(stream) => {
                let conn = tracker.track();
                runtime.spawn(Box::pin(handler(stream, conn)));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                log::warn!("accept: {e}; backing off");
                let pause = runtime.sleep_until(Instant::now() + ACCEPT_BACKOFF);
                if unless_stopped(&stop, pause).await.is_none() {
                    break;
                }
            }
            // A connection reset before it was accepted concerns that client only.
            Err(_) => {}
        }
    }
}

/// True for the accept errors that say "no resources now" (`EMFILE`, …).
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accept control connections until stopped. Each is tracked like any
/// connection, so a drain waits until its answer is written.
async fn control_loop<R: Runtime>(
    runtime: Arc<R>,
    listener: UnixListener,
    stop: StopToken,
    tracker: Tracker,
    messages: async_channel::Sender<Message>,
) {
    loop {
        let Some(readable) = unless_stopped(&stop, runtime.readable(listener.as_fd())).await else {
            break;
        };
        if let Err(e) = readable {
            log::warn!("control: {e}");
        }
        // Bounded: one readiness, at most a batch of connections.
        for _ in 0..64 {
            match listener.accept() {
                Ok((stream, _)) => {
                    let conn = tracker.track();
                    let task = control_session(runtime.clone(), stream, conn, messages.clone());
                    runtime.spawn(Box::pin(task));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_resource_exhaustion(&e) => {
                    log::warn!("control accept: {e}; backing off");
                    let pause = runtime.sleep_until(Instant::now() + ACCEPT_BACKOFF);
                    let _ = unless_stopped(&stop, pause).await;
                    break;
                }
                Err(_) => {}
            }
        }
    }
}

/// One control connection: check the peer, read one command, answer, close.
async fn control_session<R: Runtime>(
    runtime: Arc<R>,
    stream: UnixStream,
    mut conn: Connection,
    messages: async_channel::Sender<Message>,
) {
    conn.set_busy();
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    // Check the peer first, but read its command either way: answering
    // before it is read would make the close reset the connection, and the
    // refused client would see a reset instead of the reason.
    let refusal = control::check_peer(stream.as_fd()).err();
    if let Some(refusal) = &refusal {
        log::warn!("{}", refusal.log);
    }
    let deadline = Instant::now() + control::COMMAND_TIMEOUT;
    let parsed = read_command(&*runtime, &stream, deadline).await;
    let answer = match (refusal, parsed) {
        (Some(refusal), _) => refusal.answer,
        (None, None) => control::timed_out(),
        (None, Some(Parsed::Incomplete)) => return,
        (None, Some(Parsed::Invalid(answer))) => answer,
        (None, Some(Parsed::Command(command))) => {
            let request = match command {
                control::Command::Upgrade => Request::Upgrade,
                control::Command::Status => Request::Status,
                control::Command::Stop => Request::Stop,
            };
            let (tx, rx) = async_channel::bounded(1);
            let stopping = || control::error_line("the server is stopping");
            if messages.send((request, Some(tx))).await.is_err() {
                stopping()
            } else {
                let forced = conn.tracker().clone();
                let answer = first_of(vec![
                    Box::pin(async move { rx.recv().await.ok() }) as BoxFuture<'_, _>,
                    Box::pin(async move {
                        forced.forced().await;
                        None
                    }),
                ])
                .await;
                match answer {
                    Some(answer) => control::answer_text(answer, runtime.name()),
                    None => stopping(),
                }
            }
        }
    };
    let deadline = Instant::now() + CONTROL_WRITE_TIMEOUT;
    write_all(&*runtime, &stream, answer.as_bytes(), deadline).await;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Answered: a drain counts it as finished, not forced.
    conn.set_idle();
}

/// Read until a command line is complete; `None` at EOF, error or deadline.
async fn read_command<R: Runtime + ?Sized>(
    runtime: &R,
    mut stream: &UnixStream,
    deadline: Instant,
) -> Option<Parsed> {
    let mut session = control::Session::new();
    let mut chunk = [0u8; control::MAX_COMMAND];
    // Bounded by the deadline and by MAX_COMMAND (the session refuses more).
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => match session.push(&chunk[..n]) {
                Parsed::Incomplete => continue,
                parsed => return Some(parsed),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
        if !before(runtime, runtime.readable(stream.as_fd()), deadline).await {
            return None;
        }
    }
}

/// True if `ready` resolves before `deadline`.
async fn before<R: Runtime + ?Sized>(
    runtime: &R,
    ready: BoxFuture<'_, io::Result<()>>,
    deadline: Instant,
) -> bool {
    first_of(vec![
        Box::pin(async {
            let _ = ready.await;
            true
        }) as BoxFuture<'_, bool>,
        Box::pin(async {
            runtime.sleep_until(deadline).await;
            false
        }),
    ])
    .await
}

/// Write `bytes` whole, or give up at `deadline` or on an error.
async fn write_all<R: Runtime + ?Sized>(
    runtime: &R,
    mut stream: &UnixStream,
    mut bytes: &[u8],
    deadline: Instant,
) {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !before(runtime, runtime.writable(stream.as_fd()), deadline).await {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
