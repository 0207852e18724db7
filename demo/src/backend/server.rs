//! The demo on an async runtime, written once for tokio and smol: baton's
//! [`Server`] owns the lifecycle (signals, control socket, upgrade, drain,
//! resume, moves); this module only names the listeners and serves HTTP
//! (accepted, or moved here with `--handover on`) and UDP.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::sync::Arc;

use baton_core::runtime::{Accept, Runtime};
use baton_core::server::Server;
use baton_core::StopToken;
use futures_lite::future;

use super::conn::{self, Io};
use crate::cli::{self, Options};
use crate::http::{self, RequestReader, ServerInfo};
use crate::Failed;

/// How connections behave, from the demo's flags.
pub fn settings(options: &Options) -> conn::Settings {
    conn::Settings {
        idle_grace: options.idle_grace,
        idle_timeout: options.idle_timeout,
        header_timeout: options.header_timeout,
        write_timeout: options.write_timeout,
        handover: options.handover,
    }
}

/// Serve until upgraded or stopped, then drain. Errors are logged.
pub async fn serve<R, L>(runtime: R, options: &Options) -> Result<(), Failed>
where
    R: Runtime + Clone,
    L: Accept,
    L::Stream: Io,
{
    let timers = Arc::new(runtime.clone());
    let failed = |e: baton_core::Error| {
        log::error!("{e}");
        Failed
    };
    let mut server = Server::<R, L>::new(runtime, super::config(options)).map_err(failed)?;
    let info = Arc::new(ServerInfo {
        pid: std::process::id(),
        generation: server.generation(),
        backend: timers.name(),
    });
    for (name, addr) in &options.listeners() {
        server.listen(name, addr).map_err(failed)?;
    }
    if let Some(addr) = options.udp {
        let (timers, info) = (timers.clone(), info.clone());
        server
            .datagram(cli::UDP_NAME, addr, move |socket, stop| {
                udp_echo(timers.clone(), socket, stop, info.clone())
            })
            .map_err(failed)?;
    }
    super::restore_state(
        |t| server.receive_state(t).map_err(|e| e.to_string()),
        options,
    );
    server.on_save_state(crate::stats::save);
    // After "ready": a new generation's own cache must not delay the handover.
    let (ballast, delay) = (
        options.ballast,
        super::ballast_delay(server.generation(), options),
    );
    server.on_ready(move || crate::ballast::fill_in_background(ballast, delay));
    let settings = settings(options);
    if options.handover {
        // Without it the lifecycle moves nothing: connections drain.
        let (timers, info) = (timers.clone(), info.clone());
        server.on_moved(http::MOVED_KIND, move |item, conn| {
            conn::resume::<R, L::Stream>(timers.clone(), item, conn, info.clone(), settings)
        });
    }
    server
        .serve(move |stream, conn| {
            let reader = RequestReader::new();
            conn::serve(timers.clone(), stream, conn, reader, info.clone(), settings)
        })
        .await
        .map_err(failed)?;
    Ok(())
}

/// Echo datagrams until stopped, then drop this handle on the socket: the
/// next generation reads the rest of the shared queue. A datagram received
/// is always answered, even if the stop comes meanwhile.
async fn udp_echo<R: Runtime>(
    runtime: Arc<R>,
    socket: UdpSocket,
    stop: StopToken,
    info: Arc<ServerInfo>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        // `or` prefers its first future: a stop wins over a ready datagram.
        let stopped = async {
            stop.stopped().await;
            false
        };
        let readable = async { runtime.readable(socket.as_fd()).await.is_ok() };
        if !future::or(stopped, readable).await {
            break;
        }
        // Bounded: the socket's queue is finite; stop after a batch anyway.
        for _ in 0..64 {
            let (len, peer) = match socket.recv_from(&mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ECONNREFUSED from the ICMP answer to an earlier reply
                // concerns that peer only.
                Err(_) => continue,
            };
            let reply = cli::udp_echo(&info, &buf[..len]);
            if let Err(e) = socket.send_to(&reply, peer) {
                log::warn!("udp reply to {peer}: {e}");
            }
        }
    }
}
