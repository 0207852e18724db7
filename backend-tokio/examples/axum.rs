// cargo run -p baton-tokio --features axum --example axum -- 127.0.0.1:3000   (then: curl 127.0.0.1:3000/; kill -HUP <pid>)
//! An axum app that upgrades itself on SIGHUP without failing a request,
//! and stops gracefully on SIGTERM or SIGINT.
//!
//! Arguments: the address to listen on (`IP:PORT` or `unix:/path`, default
//! `127.0.0.1:3000`), then optionally the idle grace in milliseconds (default
//! 1000). Routes: `/` answers with the pid and generation that serve it,
//! `/sleep/{ms}` answers after a delay (in-flight work an upgrade must not
//! cut). Every event is a line on stderr, prefixed with the pid.
//!
//! After an upgrade the old process stops accepting at once, answers every
//! further request with `Connection: close`, lets hyper close connections
//! still idle after the grace, waits for in-flight requests (at most
//! `DRAIN_TIMEOUT`) and exits.

use std::future::IntoFuture;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use baton_tokio::{Baton, Config, ListenAddr, Signal, UpgradeError};

/// The bound on the drain: requests still running then are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One event line on stderr, written with one `write` so that lines of
/// generations sharing the stderr pipe never interleave.
macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[pid {}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }};
}

#[tokio::main]
pub(crate) async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: ListenAddr = args.next().as_deref().unwrap_or("127.0.0.1:3000").parse()?;
    let idle_grace = match args.next() {
        Some(ms) => Duration::from_millis(ms.parse()?),
        None => Duration::from_secs(1),
    };

    // Inherit the socket "http" from the previous generation, or bind it.
    let baton = Baton::from_env(Config::default().upgrade_timeout(Duration::from_secs(10)))?;
    let listener = match baton.listen("http", &addr) {
        Ok(listener) => listener,
        Err(e) => {
            // Tell the previous generation why, so it serves on.
            let _ = baton.report_error(&e.to_string());
            return Err(e.into());
        }
    };
    let generation = baton.generation();
    log!(
        "generation {generation} listening on {}",
        listener.local_addr()?
    );

    let app = Router::new()
        .route(
            "/",
            get(move || async move {
                format!(
                    "hello from pid {} generation {generation}\n",
                    std::process::id()
                )
            }),
        )
        .route(
            "/sleep/{ms}",
            get(|Path(ms): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
                format!("slept {ms} ms in pid {}\n", std::process::id())
            }),
        )
        // After the stop, responses say `Connection: close`.
        .layer(baton.close_on_stop());
    // Accepts until this generation stops; the shutdown signal fires an idle
    // grace after the stop, and then hyper closes idle connections and the
    // serve future waits for in-flight requests.
    let server = axum::serve(baton.axum_listener(listener), app)
        .with_graceful_shutdown(baton.shutdown_signal(idle_grace));
    let server = tokio::spawn(server.into_future());
    let mut signals = baton.signals()?;
    baton.ready()?;
    log!("serving");

    while !baton.is_stopped() {
        match signals.recv().await {
            Some(Signal::Upgrade) => {
                // One upgrade at a time: a SIGHUP during it waits in `signals`.
                match baton.start_upgrade() {
                    Ok(pending) => {
                        let pid = pending.pid();
                        log!("upgrade started: new process {pid}");
                        // Signals still count while the new process starts:
                        // a stop abandons the upgrade (its process is killed).
                        let ready = pending.ready();
                        tokio::pin!(ready);
                        let outcome = loop {
                            tokio::select! {
                                outcome = &mut ready => break outcome,
                                signal = signals.recv() => match signal {
                                    Some(Signal::Upgrade) => {
                                        log!("upgrade refused: one is already running")
                                    }
                                    Some(Signal::Stop) | None => {
                                        log!("stopping");
                                        baton.stop();
                                    }
                                },
                            }
                        };
                        match outcome {
                            Ok(done) => log!(
                                "upgrade done: pid {} generation {} ready after {} ms",
                                done.pid,
                                done.generation,
                                done.time_to_ready.as_millis()
                            ),
                            Err(UpgradeError::Stopping) => {
                                log!("upgrade abandoned: the server is stopping")
                            }
                            Err(e) => log!("upgrade failed: {e}; still serving"),
                        }
                    }
                    Err(e) => log!("upgrade failed: {e}; still serving"),
                }
            }
            Some(Signal::Stop) | None => {
                log!("stopping");
                baton.stop();
            }
        }
    }

    log!("draining");
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => log!("drained"),
        Ok(Ok(Err(e))) => log!("server error: {e}"),
        Ok(Err(e)) => log!("server task failed: {e}"),
        Err(_) => log!("drain timed out after {DRAIN_TIMEOUT:?}; cutting what is left"),
    }
    log!("exit");
    Ok(())
}
