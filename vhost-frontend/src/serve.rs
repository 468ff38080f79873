//! Serving one volume on one unix socket: accept a VMM connection, run the
//! vhost-user protocol until it disconnects, then accept the next one on
//! the same socket (the daemon outlives any guest).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use raftblk_client::Volume;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BlkBackend, DeviceOptions};

/// Serves `volume` on `socket` until `connections_max` connections have
/// ended (None: forever).
pub fn serve_volume(
    socket: &Path,
    volume: Volume,
    rt: tokio::runtime::Handle,
    opts: DeviceOptions,
    connections_max: Option<u64>,
) -> anyhow::Result<()> {
    let mut listener = Listener::new(socket, true)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?;
    tracing::info!(
        socket = %socket.display(),
        volume = %volume.info().name,
        size_bytes = volume.size_bytes(),
        queues = opts.num_queues,
        read_only = opts.read_only,
        "serving volume"
    );
    let mut served = 0u64;
    loop {
        let backend =
            BlkBackend::new(volume.clone(), rt.clone(), opts.clone()).context("create backend")?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(
            format!("vhost-{}", volume.info().name),
            backend.clone(),
            mem,
        )
        .map_err(|e| anyhow::anyhow!("create vhost-user daemon: {e}"))?;
        for (q, h) in daemon.get_epoll_handlers().iter().enumerate() {
            let fd = backend.completion_fd(q).context("completion fd")?;
            h.register_listener(fd, EventSet::IN, backend.completion_event_id())
                .map_err(|e| anyhow::anyhow!("register completion fd: {e}"))?;
        }
        daemon
            .start(&mut listener)
            .map_err(|e| anyhow::anyhow!("accept on {}: {e}", socket.display()))?;
        tracing::info!(socket = %socket.display(), "frontend connected");
        let result = daemon.wait();
        match &result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!(socket = %socket.display(), "frontend disconnected"),
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %e, "connection ended with an error")
            }
        }
        // Let requests still in flight finish (bounded) before the worker
        // threads go away.
        let deadline = Instant::now() + opts.io_timeout;
        while backend.inflight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for (queue, requests) in backend.answered_per_queue().into_iter().enumerate() {
            tracing::info!(queue, requests, "queue statistics for the connection");
        }
        backend.signal_exit();
        drop(daemon);
        served += 1;
        if connections_max.is_some_and(|m| served >= m) {
            return Ok(());
        }
    }
}
