//! Accepting clients: each connection runs the handshake (bounded in
//! time) and then the transmission phase in its own task. At most
//! `connections_max` connections are open at once (handshaking or
//! served); more are closed at once with a log line. A writable export
//! additionally serves one client at a time (its claim, see `export`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::export::Export;
use crate::handshake::handshake;
use crate::ratelimit::{client_errors, connection_lines};
use crate::transmission::{serve, Limits};

#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    pub connections_max: usize,
    pub handshake_timeout: Duration,
    pub limits: Limits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            connections_max: 16,
            handshake_timeout: Duration::from_secs(30),
            limits: Limits::default(),
        }
    }
}

/// Counts of the connections served so far.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub ended: AtomicU64,
}

/// Serves `export` to every client of `listener`, forever (until the
/// task is dropped).
pub async fn serve_unix(
    listener: UnixListener,
    export: Arc<Export>,
    opts: ServerOptions,
    stats: Arc<ServerStats>,
) {
    let slots = Arc::new(Semaphore::new(opts.connections_max.max(1)));
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                if let Some(suppressed) = client_errors().allow() {
                    tracing::warn!(error = %e, suppressed, "accept failed");
                }
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        next_id += 1;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = client_errors().allow() {
                tracing::warn!(
                    connection = next_id,
                    connections_max = opts.connections_max,
                    suppressed,
                    "too many connections: closed a new one"
                );
            }
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (export, stats) = (export.clone(), stats.clone());
        tokio::spawn(async move {
            connection(stream, export, opts, next_id, slot).await;
            stats.ended.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// One client, from greeting to close.
pub async fn connection<S>(
    mut stream: S,
    export: Arc<Export>,
    opts: ServerOptions,
    id: u64,
    _slot: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let hs = tokio::time::timeout(opts.handshake_timeout, handshake(&mut stream, &export)).await;
    let session = match hs {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => {
            tracing::debug!(connection = id, "client ended the handshake");
            return;
        }
        Ok(Err(e)) => {
            if let Some(suppressed) = client_errors().allow() {
                tracing::warn!(connection = id, suppressed, error = %e, "handshake failed");
            }
            return;
        }
        Err(_) => {
            if let Some(suppressed) = client_errors().allow() {
                tracing::warn!(
                    connection = id,
                    suppressed,
                    "handshake did not finish within {:?}",
                    opts.handshake_timeout
                );
            }
            return;
        }
    };
    if let Some(suppressed) = connection_lines().allow() {
        tracing::info!(
            connection = id,
            export = export.name(),
            structured = session.structured,
            block_status = session.base_allocation,
            suppressed,
            "client connected"
        );
    }
    match serve(stream, export, session, opts.limits).await {
        Ok(st) => {
            if let Some(suppressed) = connection_lines().allow() {
                tracing::info!(
                    connection = id,
                    requests = st.requests,
                    errors = st.errors,
                    soft = st.soft_disconnect,
                    suppressed,
                    "client disconnected"
                );
            }
        }
        Err(e) => {
            if let Some(suppressed) = client_errors().allow() {
                tracing::warn!(connection = id, suppressed, error = %e, "connection ended");
            }
        }
    }
}
