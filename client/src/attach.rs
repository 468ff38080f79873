//! Attach leases from the client's side: taking a volume's lease (and with
//! it a new epoch), fencing every data group with that epoch before the
//! first write, renewing the lease in the background, and noticing when
//! it is lost (another holder took over: the cluster answers FENCED).
//!
//! A process names itself once (`process_holder`): every client of the
//! process attaching with `reuse` shares one lease and its epoch (and a
//! detach by one of them ends it for all). The vhost daemon names itself
//! after its machine and socket and attaches without `reuse`, so a
//! restarted daemon fences its predecessor.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::volumes_client::VolumesClient;
use raftblk_proto::{
    AttachLease, AttachRequest, DetachRequest, FenceRequest, RenewRequest, VolumeInfo,
    VolumeNameRequest, META_GROUP_ID,
};

use crate::error::ClientError;
use crate::router::Client;

/// Lease lifetime a client asks for; it renews every third of it.
pub const LEASE_TTL_MS: u64 = 30_000;
/// Bounds the nodes put on a requested lifetime.
const LEASE_TTL_MS_MIN: u64 = 1_000;
const LEASE_TTL_MS_MAX: u64 = 600_000;

/// How to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Who attaches (shown by `raftblk volume info`).
    pub holder: String,
    /// Attach even if another holder's lease is live.
    pub takeover: bool,
    /// Share the lease (and its epoch) if `holder` holds it already.
    pub reuse: bool,
    pub ttl_ms: u64,
}

impl Default for AttachOptions {
    /// The process's own holder name, shared by its clients.
    fn default() -> Self {
        AttachOptions {
            holder: process_holder(),
            takeover: false,
            reuse: true,
            ttl_ms: LEASE_TTL_MS,
        }
    }
}

/// This machine's host name (`localhost` if unknown).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// This machine: its host name and the start of its machine id (the boot
/// id if it has none), so that two hosts of one name differ.
pub fn machine_name() -> String {
    let id = ["/etc/machine-id", "/proc/sys/kernel/random/boot_id"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().replace('-', ""))
                .filter(|s| !s.is_empty() && s != "uninitialized")
        })
        .unwrap_or_default();
    let id: String = id.chars().take(12).collect();
    format!("{}/{id}", host_name())
}

/// `program@machine:SOCKET` (the socket's directory made absolute): the
/// holder name of a daemon serving a volume on `socket`, the same after a
/// restart of it on this machine.
pub fn daemon_holder(program: &str, socket: &std::path::Path) -> String {
    let socket = match (socket.parent(), socket.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        })
        .map(|d| d.join(name))
        .unwrap_or_else(|_| socket.to_owned()),
        _ => socket.to_owned(),
    };
    format!("{program}@{}:{}", machine_name(), socket.display())
}

/// `program@machine:pid/nonce`: one lease holder per process (the nonce
/// tells apart processes of one pid in different pid namespaces).
pub fn process_holder() -> String {
    static NONCE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let nonce = *NONCE.get_or_init(rand::random);
    let program = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "raftblk".to_owned());
    format!(
        "{program}@{}:{}/{nonce:08x}",
        machine_name(),
        std::process::id()
    )
}

/// Holds a volume's writes for a snapshot cut: writes share it, a cut
/// takes it alone (tokio's lock is fair: once a cut waits, new writes
/// queue behind it). One per volume and epoch in a process, so every
/// handle sharing a lease quiesces together.
pub(crate) struct Gate {
    pub(crate) lock: tokio::sync::RwLock<()>,
    /// The newest snapshot id this process cut (or gave up on).
    pub(crate) done: Mutex<u64>,
}

/// The gates of this process, by (volume id, epoch).
type Gates = Mutex<std::collections::HashMap<(u64, u64), Weak<Gate>>>;

fn gate_for(volume: u64, epoch: u64) -> Arc<Gate> {
    static GATES: std::sync::OnceLock<Gates> = std::sync::OnceLock::new();
    let mut gates = GATES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    gates.retain(|_, g| g.strong_count() > 0);
    if let Some(g) = gates.get(&(volume, epoch)).and_then(Weak::upgrade) {
        return g;
    }
    let g = Arc::new(Gate {
        lock: tokio::sync::RwLock::new(()),
        done: Mutex::new(0),
    });
    gates.insert((volume, epoch), Arc::downgrade(&g));
    g
}

/// A held attach lease.
pub struct Attachment {
    pub(crate) client: Client,
    pub(crate) gate: Arc<Gate>,
    volume: VolumeInfo,
    holder: String,
    epoch: u64,
    ttl_ms: u64,
    /// Why the lease was lost, once it was.
    lost: Mutex<Option<String>>,
    /// Whether `lost` is set: the per-request check reads no lock.
    lost_flag: std::sync::atomic::AtomicBool,
    /// Given back at shutdown (`release`): no more renewals.
    released: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("volume", &self.volume.name)
            .field("holder", &self.holder)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Attachment {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn volume(&self) -> &VolumeInfo {
        &self.volume
    }

    /// Why the lease is lost (`None` while held).
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records that the lease is lost; returns whether it was news.
    pub fn mark_lost(&self, why: &str) -> bool {
        self.end(why, true)
    }

    fn end(&self, why: &str, lost: bool) -> bool {
        let mut l = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if l.is_some() {
            return false;
        }
        if lost {
            tracing::error!(volume = %self.volume.name, holder = %self.holder, epoch = self.epoch, reason = why, "attach lease lost: no more writes to this volume");
        } else {
            tracing::info!(volume = %self.volume.name, holder = %self.holder, epoch = self.epoch, "detached");
        }
        *l = Some(why.to_owned());
        self.lost_flag
            .store(true, std::sync::atomic::Ordering::Release);
        true
    }

    /// `Fenced` if the lease is lost.
    pub fn check(&self) -> Result<u64, ClientError> {
        if !self.lost_flag.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(self.epoch);
        }
        match self.lost() {
            Some(why) => Err(ClientError::Fenced(why)),
            None => Ok(self.epoch),
        }
    }

    /// Extends the lease; a FENCED answer marks it lost.
    pub async fn renew(&self) -> Result<(), ClientError> {
        self.check()?;
        let req = RenewRequest {
            volume_id: self.volume.id,
            holder: self.holder.clone(),
            epoch: self.epoch,
            ttl_ms: self.ttl_ms,
        };
        let r = self
            .client
            .call_group(META_GROUP_ID, "renew lease", |ch| {
                let req = req.clone();
                async move {
                    let r = VolumesClient::new(ch).renew(req).await?.into_inner();
                    Ok((r.error, ()))
                }
            })
            .await
            .map_err(|e| ClientError::from_client(e, &self.volume.name));
        if let Err(ClientError::Fenced(why)) = &r {
            // After a release the "broken" answer is our own detach.
            if !self.released.load(std::sync::atomic::Ordering::Acquire) {
                self.mark_lost(why);
            }
        }
        r
    }

    /// Gives the lease up at shutdown while requests may still be in
    /// flight: renewals stop, but this handle is not marked lost (its
    /// epoch stays valid until another holder attaches).
    pub async fn release(&self) -> Result<(), ClientError> {
        self.released
            .store(true, std::sync::atomic::Ordering::Release);
        if self.lost().is_some() {
            return Ok(());
        }
        self.client
            .detach_volume(&self.volume.name, &self.holder, self.epoch, false)
            .await
            .map(|_| ())
    }

    /// Gives the lease up (nothing to do if it is lost already).
    pub async fn detach(&self) -> Result<(), ClientError> {
        if !self.end("detached", false) {
            return Ok(());
        }
        self.client
            .detach_volume(&self.volume.name, &self.holder, self.epoch, false)
            .await
            .map(|_| ())
    }
}

/// How often a holder looks for a snapshot to cut.
const SNAPSHOT_POLL: Duration = Duration::from_millis(500);

/// Cuts the snapshots asked of `a`'s volume (see `snapshot`) until the
/// lease ends or the attachment is dropped.
async fn snapshot_loop(a: Weak<Attachment>) {
    loop {
        tokio::time::sleep(SNAPSHOT_POLL).await;
        let Some(a) = a.upgrade() else { return };
        if a.released.load(std::sync::atomic::Ordering::Acquire) || a.lost().is_some() {
            return;
        }
        a.cut_pending().await;
    }
}

/// Renews `a` every third of its lifetime until it is lost or dropped.
async fn renew_loop(a: Weak<Attachment>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(a) = a.upgrade() else { return };
        if a.released.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        match a.renew().await {
            Ok(()) => {}
            Err(ClientError::Fenced(_)) => return,
            Err(e @ (ClientError::NoSuchVolume(_) | ClientError::InvalidArgument(_))) => {
                a.mark_lost(&e.to_string());
                return;
            }
            Err(e) if a.lost().is_some() => {
                tracing::debug!(error = %e, "renewal after the lease ended");
                return;
            }
            Err(e) => {
                tracing::warn!(volume = %a.volume.name, error = %e, "could not renew the attach lease; retrying")
            }
        }
    }
}

impl ClientError {
    /// Maps a server error of a volume's call to its typed error.
    pub(crate) fn from_client(e: ClientError, name: &str) -> ClientError {
        match e {
            ClientError::Server(pb) => ClientError::from_server(pb, Some(name)),
            other => other,
        }
    }
}

impl Client {
    /// Takes the attach lease of volume `name` and fences every data group
    /// with its epoch; the lease is renewed in the background (on the
    /// current tokio runtime) until it is lost or the attachment dropped.
    pub async fn attach(
        &self,
        name: &str,
        opts: &AttachOptions,
    ) -> Result<Arc<Attachment>, ClientError> {
        self.attach_id(name, 0, opts).await
    }

    /// Like `attach`, refused (NoSuchVolume) unless `name` is still the
    /// volume of id `volume_id` (0: any).
    pub async fn attach_id(
        &self,
        name: &str,
        volume_id: u64,
        opts: &AttachOptions,
    ) -> Result<Arc<Attachment>, ClientError> {
        let req = AttachRequest {
            name: name.to_owned(),
            holder: opts.holder.clone(),
            takeover: opts.takeover,
            reuse: opts.reuse,
            ttl_ms: opts.ttl_ms,
            volume_id,
        };
        let (volume, lease) = self
            .call_group(META_GROUP_ID, "attach", |ch| {
                let req = req.clone();
                async move {
                    let r = VolumesClient::new(ch).attach(req).await?.into_inner();
                    Ok((r.error, (r.volume, r.lease)))
                }
            })
            .await
            .map_err(|e| ClientError::from_client(e, name))?;
        let (Some(volume), Some(lease)) = (volume, lease) else {
            return Err(ClientError::InvalidArgument(
                "attach: the server returned no lease".into(),
            ));
        };
        if let Err(e) = self.fence(&volume, lease.epoch).await {
            // Not usable: give the lease back rather than leave it
            // unrenewed until it expires, unless other handles of this
            // process may share it.
            if !opts.reuse {
                let _ = self
                    .detach_volume(name, &lease.holder, lease.epoch, false)
                    .await;
            }
            return Err(e);
        }
        tracing::info!(volume = %volume.name, holder = %lease.holder, epoch = lease.epoch, "attached");
        // The lifetime the nodes grant (they bound the request alike).
        let ttl_ms = match opts.ttl_ms {
            0 => LEASE_TTL_MS,
            t => t.clamp(LEASE_TTL_MS_MIN, LEASE_TTL_MS_MAX),
        };
        let a = Arc::new(Attachment {
            client: self.clone(),
            gate: gate_for(volume.id, lease.epoch),
            volume,
            holder: lease.holder,
            epoch: lease.epoch,
            ttl_ms,
            lost: Mutex::new(None),
            lost_flag: std::sync::atomic::AtomicBool::new(false),
            released: std::sync::atomic::AtomicBool::new(false),
        });
        let every = Duration::from_millis(ttl_ms / 3);
        tokio::spawn(renew_loop(Arc::downgrade(&a), every));
        tokio::spawn(snapshot_loop(Arc::downgrade(&a)));
        Ok(a)
    }

    /// Raises the fence of `volume` to `epoch` in every data group.
    async fn fence(&self, volume: &VolumeInfo, epoch: u64) -> Result<(), ClientError> {
        let groups = 1..=self.topology().data_groups;
        let id = volume.id;
        stream::iter(groups)
            .map(|group| async move {
                self.call_group(group, "fence", |ch| async move {
                    let r = BlockIoClient::new(ch)
                        .fence(FenceRequest {
                            group_id: group,
                            volume_id: id,
                            epoch,
                        })
                        .await?
                        .into_inner();
                    Ok((r.error, ()))
                })
                .await
                .map_err(|e| ClientError::from_client(e, &volume.name))
            })
            .buffer_unordered(self.options().pieces_in_flight_max)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    /// Releases the lease of `name` held by `holder` at `epoch`, or with
    /// `force` whoever holds it (the holder is fenced by the next attach).
    pub async fn detach_volume(
        &self,
        name: &str,
        holder: &str,
        epoch: u64,
        force: bool,
    ) -> Result<AttachLease, ClientError> {
        let req = DetachRequest {
            name: name.to_owned(),
            holder: holder.to_owned(),
            epoch,
            force,
        };
        let lease = self
            .call_group(META_GROUP_ID, "detach", |ch| {
                let req = req.clone();
                async move {
                    let r = VolumesClient::new(ch).detach(req).await?.into_inner();
                    Ok((r.error, r.lease))
                }
            })
            .await
            .map_err(|e| ClientError::from_client(e, name))?;
        Ok(lease.unwrap_or_default())
    }

    /// The catalog entry of `name` with its attach lease (`None`: never
    /// attached).
    pub async fn volume_status(
        &self,
        name: &str,
    ) -> Result<(VolumeInfo, Option<AttachLease>), ClientError> {
        let req = VolumeNameRequest {
            name: name.to_owned(),
        };
        let (v, lease) = self
            .call_group(META_GROUP_ID, "get volume", |ch| {
                let req = req.clone();
                async move {
                    let r = VolumesClient::new(ch).get(req).await?.into_inner();
                    Ok((r.error, (r.volume, r.lease)))
                }
            })
            .await
            .map_err(|e| ClientError::from_client(e, name))?;
        let v = v.ok_or_else(|| ClientError::NoSuchVolume(name.to_owned()))?;
        Ok((v, lease))
    }
}
