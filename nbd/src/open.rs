//! Choosing and opening what an export serves, from the name given on
//! the command line: `VOL` is a volume (writable unless read-only, under
//! its attach lease), `VOL@SNAP` a snapshot (always read-only, no
//! lease: a snapshot never changes, so any number of clients may read
//! it while the volume is written). The one place a new kind of export is added. Also the
//! catalog watch every served volume gets: size growth and I/O limit
//! changes are read every 500 ms.

use std::sync::Arc;
use std::time::Duration;

use raftblk_client::attach::daemon_holder;
use raftblk_client::qos::Qos;
use raftblk_client::{AttachOptions, Client, ClientError, Volume};

use crate::backend::Backend;
use crate::ratelimit::LogLimiter;
use crate::volume_backend::VolumeBackend;

/// How often a served volume's record is read again.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Longest wait for one catalog read.
const WATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What an export name on the command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Volume(String),
    Snapshot { volume: String, snapshot: String },
}

impl Target {
    pub fn parse(name: &str) -> Target {
        match name.split_once('@') {
            Some((volume, snapshot)) => Target::Snapshot {
                volume: volume.to_owned(),
                snapshot: snapshot.to_owned(),
            },
            None => Target::Volume(name.to_owned()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("an empty volume name")]
    EmptyName,
    #[error("cannot open volume {name:?}: {source}")]
    Open { name: String, source: ClientError },
    /// Another holder has the lease (`--takeover` takes it over).
    #[error(
        "cannot attach volume {name:?} (if its holder is gone for good: --takeover): {source}"
    )]
    Attached { name: String, source: ClientError },
    #[error("cannot attach volume {name:?}: {source}")]
    Attach { name: String, source: ClientError },
}

pub struct OpenOptions {
    pub read_only: bool,
    pub takeover: bool,
    /// The lease holder's socket (`daemon_holder("raftblk-nbd", socket)`).
    pub socket: std::path::PathBuf,
}

/// An opened export source.
pub struct Opened {
    /// The export's name (`VOL` or `VOL@SNAP`).
    pub name: String,
    /// Served read-only (asked for, or a snapshot).
    pub read_only: bool,
    pub backend: Arc<dyn Backend>,
    /// The volume behind it, whose lease (if any) is given back at exit.
    pub volume: Volume,
    pub qos: Arc<Qos>,
}

/// Opens `name` for serving.
pub async fn open(client: &Client, name: &str, o: &OpenOptions) -> Result<Opened, OpenError> {
    let volume_name = match Target::parse(name) {
        Target::Snapshot { volume, snapshot } => {
            if volume.is_empty() || snapshot.is_empty() {
                return Err(OpenError::EmptyName);
            }
            let snap = client
                .open_snapshot(&volume, &snapshot)
                .await
                .map_err(|source| OpenError::Open {
                    name: name.to_owned(),
                    source,
                })?;
            let qos = Arc::new(Qos::new(snap.info().qos));
            let backend: Arc<dyn Backend> =
                Arc::new(VolumeBackend::new(snap.clone(), qos.clone(), false));
            return Ok(Opened {
                name: name.to_owned(),
                read_only: true,
                backend,
                volume: snap,
                qos,
            });
        }
        Target::Volume(v) if v.is_empty() => return Err(OpenError::EmptyName),
        Target::Volume(v) => v,
    };
    let volume = client
        .open_volume(&volume_name)
        .await
        .map_err(|source| OpenError::Open {
            name: volume_name.clone(),
            source,
        })?;
    let volume = volume.with_attach_options(AttachOptions {
        holder: daemon_holder("raftblk-nbd", &o.socket),
        takeover: o.takeover,
        // A restart on the same socket gets a new epoch: whatever its
        // predecessor still had in flight is fenced.
        reuse: false,
        ..AttachOptions::default()
    });
    // A read-only export writes nothing: it takes no lease.
    if !o.read_only {
        let a = volume
            .attach()
            .await
            .and_then(|a| a.check().map(|_| a))
            .map_err(|source| match source {
                ClientError::Attached(_) | ClientError::Fenced(_) => OpenError::Attached {
                    name: volume_name.clone(),
                    source,
                },
                source => OpenError::Attach {
                    name: volume_name.clone(),
                    source,
                },
            })?;
        tracing::info!(volume = %volume_name, holder = a.holder(), epoch = a.epoch(), "serving under the attach lease");
    }
    let qos = Arc::new(Qos::new(volume.info().qos));
    let backend: Arc<dyn Backend> = Arc::new(VolumeBackend::new(
        volume.clone(),
        qos.clone(),
        !o.read_only,
    ));
    Ok(Opened {
        name: volume_name,
        read_only: o.read_only,
        backend,
        volume,
        qos,
    })
}

/// Reads `volume`'s record every `interval` (until the task is
/// dropped): a growth is served from then on (new clients see the new
/// size), a change of I/O limits applies at once.
pub async fn watch(volume: Volume, qos: Arc<Qos>, interval: Duration) {
    let errors = LogLimiter::new(1);
    let name = volume.info().name.clone();
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(WATCH_TIMEOUT, volume.refresh_size()).await {
            Ok(Ok(grew)) => {
                if let Some(size_bytes) = grew {
                    tracing::info!(volume = %name, size_bytes, "volume grew");
                }
                if qos.set(volume.qos()) {
                    tracing::info!(volume = %name, limits = ?qos.limits(), "I/O limits changed");
                }
            }
            Ok(Err(e)) => {
                if let Some(suppressed) = errors.allow() {
                    tracing::warn!(volume = %name, suppressed, error = %e, "reading the volume's record");
                }
            }
            Err(_) => {
                if let Some(suppressed) = errors.allow() {
                    tracing::warn!(volume = %name, suppressed, "reading the volume's record timed out");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_at_are_snapshots() {
        assert_eq!(Target::parse("vm1"), Target::Volume("vm1".into()));
        assert_eq!(
            Target::parse("vm1@daily"),
            Target::Snapshot {
                volume: "vm1".into(),
                snapshot: "daily".into()
            }
        );
    }
}
