//! Serving one volume on one unix socket: accept a VMM connection, answer
//! its vhost-user requests (`handler`) until it disconnects, then accept
//! the next one on the same socket (the daemon outlives any guest, and a
//! restarted daemon is found again by a frontend that reconnects).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use raftblk_client::Volume;
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};

use crate::backend::{BlkBackend, DeviceOptions};
use crate::handler::Handler;
use crate::resize::{spawn_size_watch, ConfigNotifier};

/// How often the volume's size is read from the catalog (online resize).
const SIZE_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Requests the handler refused (answered with an error) in a row before
/// the connection is dropped as hopeless.
const REFUSED_IN_A_ROW_MAX: u32 = 64;

/// Serves `volume` on `socket` until `connections_max` connections have
/// ended (None: forever).
pub fn serve_volume(
    socket: &Path,
    volume: Volume,
    rt: tokio::runtime::Handle,
    opts: DeviceOptions,
    connections_max: Option<u64>,
) -> anyhow::Result<()> {
    let listener = Listener::new(socket, true)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?;
    tracing::info!(
        socket = %socket.display(),
        volume = %volume.info().name,
        size_bytes = volume.size_bytes(),
        queues = opts.num_queues,
        read_only = opts.read_only,
        "serving volume"
    );
    let notifier: ConfigNotifier = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let watch = spawn_size_watch(
        volume.clone(),
        rt.clone(),
        notifier.clone(),
        opts.qos.clone(),
        SIZE_POLL_INTERVAL,
        stop.clone(),
    )
    .context("start the size watcher")?;
    let result = accept_loop(
        &listener,
        socket,
        &volume,
        &rt,
        &opts,
        connections_max,
        &notifier,
    );
    stop.store(true, Ordering::Release);
    let _ = watch.join();
    result
}

fn accept_loop(
    listener: &Listener,
    socket: &Path,
    volume: &Volume,
    rt: &tokio::runtime::Handle,
    opts: &DeviceOptions,
    connections_max: Option<u64>,
    notifier: &ConfigNotifier,
) -> anyhow::Result<()> {
    let mut served = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => anyhow::bail!("accept on {}: {e}", socket.display()),
        };
        tracing::info!(socket = %socket.display(), "frontend connected");
        // Out of fds or threads: this connection is dropped (the frontend
        // may try again), the daemon serves on.
        let made = BlkBackend::new(volume.clone(), rt.clone(), opts.clone()).and_then(|b| {
            let h = Handler::new(b.clone(), notifier.clone())?;
            Ok((b, h))
        });
        let (backend, handler) = match made {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(socket = %socket.display(), error = %e, "cannot set up the connection; dropped");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let handler = Arc::new(Mutex::new(handler));
        let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
        let mut refused = 0u32;
        loop {
            match conn.handle_request() {
                Ok(()) => refused = 0,
                Err(VuError::Disconnected | VuError::PartialMessage) => {
                    tracing::info!(socket = %socket.display(), "frontend disconnected");
                    break;
                }
                // The request was answered with an error; the frontend
                // decides whether to go on.
                Err(e) if handler.lock().map(|h| h.fatal()).unwrap_or(true) => {
                    tracing::error!(socket = %socket.display(), error = %e, "dropping the connection: the frontend reconnects and the inflight region serves what is left");
                    break;
                }
                Err(
                    e @ (VuError::ReqHandlerError(_)
                    | VuError::InvalidOperation(_)
                    | VuError::InvalidParam),
                ) => {
                    tracing::warn!(socket = %socket.display(), error = %e, "request refused");
                    refused += 1;
                    if refused >= REFUSED_IN_A_ROW_MAX {
                        tracing::warn!(socket = %socket.display(), "too many refused requests; dropping the connection");
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(socket = %socket.display(), error = %e, "connection ended with an error");
                    break;
                }
            }
        }
        drop(conn);
        *notifier.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let pages_logged = handler.lock().map(|h| h.pages_logged()).unwrap_or_default();
        if pages_logged > 0 {
            tracing::info!(
                pages_logged,
                "dirty pages logged for migration on the connection"
            );
        }
        // Answer what was accepted (bounded), then stop the workers.
        match Arc::try_unwrap(handler) {
            Ok(h) => drop(h.into_inner().unwrap_or_else(|p| p.into_inner())),
            Err(h) => h.lock().unwrap_or_else(|p| p.into_inner()).stop_all(),
        }
        for (queue, requests) in backend.answered_per_queue().into_iter().enumerate() {
            tracing::info!(queue, requests, "queue statistics for the connection");
        }
        let resubmitted = backend.resubmitted();
        if resubmitted > 0 {
            tracing::info!(
                resubmitted,
                "requests served again from the inflight region"
            );
        }
        served += 1;
        if connections_max.is_some_and(|m| served >= m) {
            return Ok(());
        }
    }
}
