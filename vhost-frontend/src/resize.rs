//! Online resize: a thread per served volume reads the volume's size from
//! the catalog every `interval` and, when it grew, tells the frontend
//! through the backend-request channel (`CONFIG_CHANGE_MSG`, the
//! `BACKEND_REQ` protocol feature): QEMU reads the config space again
//! (whose capacity follows the volume) and interrupts the guest, whose
//! kernel picks up the new capacity. Requests up to the new end are
//! accepted from the moment the size is read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use raftblk_client::Volume;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

use crate::ratelimit::LogLimiter;

/// The backend-request channel of the connection being served, if its
/// frontend set one up.
pub type ConfigNotifier = Arc<Mutex<Option<Backend>>>;

/// Longest wait for one catalog read.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Follows `volume`'s size until `stop` is set.
pub fn spawn_size_watch(
    volume: Volume,
    rt: tokio::runtime::Handle,
    notifier: ConfigNotifier,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let name = volume.info().name.clone();
    std::thread::Builder::new()
        .name(format!("size-{name}"))
        .spawn(move || {
            let errors = LogLimiter::new(1);
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(interval);
                // The timer must be made inside the runtime.
                let r = rt.block_on(async {
                    tokio::time::timeout(REFRESH_TIMEOUT, volume.refresh_size()).await
                });
                match r {
                    Ok(Ok(Some(size_bytes))) => {
                        tracing::info!(volume = %name, size_bytes, "volume grew");
                        notify(&name, &notifier);
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        if let Some(suppressed) = errors.allow() {
                            tracing::warn!(volume = %name, suppressed, error = %e, "reading the volume's size");
                        }
                    }
                    Err(_) => {
                        if let Some(suppressed) = errors.allow() {
                            tracing::warn!(volume = %name, suppressed, "reading the volume's size timed out");
                        }
                    }
                }
            }
        })
}

/// Sends the config change to the connected frontend, if any.
fn notify(name: &str, notifier: &ConfigNotifier) {
    let channel = notifier.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match channel {
        Some(b) => match b.handle_config_change() {
            Ok(_) => tracing::info!(volume = %name, "config change sent to the frontend"),
            Err(e) => tracing::warn!(
                volume = %name,
                error = %e,
                "the frontend did not take the config change; QMP device-sync-config makes the guest see the new size"
            ),
        },
        None => tracing::info!(
            volume = %name,
            "no frontend with a backend channel; the next one reads the new size"
        ),
    }
}
