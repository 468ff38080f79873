//! Online resize: a thread per served volume reads the volume's size from
//! the catalog every `interval` and, when it grew, tells the frontend
//! through the backend-request channel (`CONFIG_CHANGE_MSG`, the
//! `BACKEND_REQ` protocol feature): QEMU reads the config space again
//! (whose capacity follows the volume) and interrupts the guest, whose
//! kernel picks up the new capacity. Requests up to the new end are
//! accepted from the moment the size is read. The same read brings the
//! volume's I/O limits, applied at once (`qos`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use raftblk_client::Volume;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

use crate::ratelimit::LogLimiter;

/// The backend-request channel of the connection being served, if its
/// frontend set one up, with a number that changes with every channel.
pub type ConfigNotifier = Arc<Mutex<Option<(u64, Backend)>>>;

/// Polls a new channel must have lived through before it gets its
/// unconditional config change (its rings have started by then).
const NEW_CHANNEL_POLLS: u32 = 2;

/// Longest wait for one catalog read.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Follows `volume`'s size until `stop` is set.
pub fn spawn_size_watch(
    volume: Volume,
    rt: tokio::runtime::Handle,
    notifier: ConfigNotifier,
    qos: Arc<raftblk_client::qos::Qos>,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let name = volume.info().name.clone();
    std::thread::Builder::new()
        .name(format!("size-{name}"))
        .spawn(move || {
            let errors = LogLimiter::new(1);
            // A growth not yet told to any frontend.
            let mut pending = false;
            // The channel last told, and how long the current one lived.
            let mut told: Option<u64> = None;
            let mut current: Option<(u64, u32)> = None;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(interval);
                // The timer must be made inside the runtime.
                let r = rt.block_on(async {
                    tokio::time::timeout(REFRESH_TIMEOUT, volume.refresh_size()).await
                });
                let read = matches!(r, Ok(Ok(_)));
                match r {
                    Ok(Ok(Some(size_bytes))) => {
                        tracing::info!(volume = %name, size_bytes, "volume grew");
                        pending = true;
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
                if read && qos.set(volume.qos()) {
                    tracing::info!(volume = %name, limits = ?qos.limits(), "I/O limits changed");
                }
                let channel = notifier.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some((id, backend)) = channel else {
                    current = None;
                    continue;
                };
                // A frontend that connected after a growth (say, to a
                // restarted daemon) may hold an older size: every channel
                // gets one config change; QEMU ignores it when the
                // capacity is unchanged.
                current = match current {
                    Some((c, n)) if c == id => Some((c, n.saturating_add(1))),
                    _ => Some((id, 1)),
                };
                let settled = current.is_some_and(|(_, n)| n >= NEW_CHANNEL_POLLS);
                if pending || (told != Some(id) && settled) {
                    match backend.handle_config_change() {
                        Ok(_) => {
                            tracing::info!(volume = %name, size_bytes = volume.size_bytes(), "config change sent to the frontend");
                            pending = false;
                            told = Some(id);
                        }
                        Err(e) => {
                            if let Some(suppressed) = errors.allow() {
                                tracing::warn!(volume = %name, suppressed, error = %e, "the frontend did not take the config change (retried; QMP device-sync-config makes the guest see the new size)");
                            }
                        }
                    }
                }
            }
        })
}
