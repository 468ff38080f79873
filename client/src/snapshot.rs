//! Snapshots and clones from the client's side.
//!
//! Taking a snapshot: `create_snapshot` records a pending snapshot in the
//! catalog. The volume's lease holder cuts it: it holds its writes (the
//! attachment's gate: in-flight writes finish, new ones wait), has every
//! data group cut the snapshot with its epoch, lets the writes go and
//! records the outcome with the time writes were held. Every write
//! acknowledged before the create is therefore in the snapshot, and none
//! issued after the cut began; since the cut happens while no write is in
//! flight, a write in it implies every write completed before it was
//! issued is too. Holders look for pending snapshots every 500 ms
//! (`attach`'s renew loop); when nobody holds the lease, the creator takes
//! it (fencing any stale writer) and cuts itself. The hold is bounded
//! (`DRAIN_MAX` + `CUT_MAX`): a degraded group fails the snapshot, never
//! freezes the guest.
//!
//! Deleting, rolling back, cloning and flattening are catalog changes plus
//! one operation per data group (see the node's `cow`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::volumes_client::VolumesClient;
use raftblk_proto::{
    CreateVolumeRequest, ErrorCode, FinishSnapshotRequest, FlattenRequest, SnapshotInfo,
    SnapshotOp, SnapshotOpRequest, SnapshotRequest, SnapshotState, VolumeIdRequest, VolumeInfo,
    META_GROUP_ID,
};

use crate::attach::{machine_name, AttachOptions, Attachment};
use crate::error::ClientError;
use crate::router::Client;
use crate::volume::Volume;

/// Longest wait for a volume's in-flight writes to finish before a cut.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Longest a cut of every data group may take (writes are held).
pub const CUT_MAX: Duration = Duration::from_secs(3);
/// How long `create_snapshot` waits for a live holder to cut.
pub const HOLDER_WAIT_MAX: Duration = Duration::from_secs(30);
/// Longest a holder's look for pending snapshots may take.
const SNAPSHOT_LOOKUP_MAX: Duration = Duration::from_secs(2);
/// Deepest chain of clones a read follows.
pub const CLONE_DEPTH_MAX: usize = 16;

/// `VOL@SNAP` split in two.
pub fn parse_snap_spec(spec: &str) -> Result<(&str, &str), ClientError> {
    match spec.split_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => Ok((v, s)),
        _ => Err(ClientError::InvalidArgument(format!(
            "{spec:?} is not VOLUME@SNAPSHOT"
        ))),
    }
}

fn is(s: &SnapshotInfo, state: SnapshotState) -> bool {
    s.state == state as i32
}

/// A server error of a snapshot call: "not found" keeps the server's words.
fn snap_err(e: ClientError) -> ClientError {
    match e {
        ClientError::Server(pb) if pb.kind() == ErrorCode::NoSuchVolume => {
            ClientError::NotFound(pb.message)
        }
        ClientError::Server(pb) => ClientError::from_server(pb, None),
        other => other,
    }
}

/// A unique lease holder for a one-off operation of this process.
fn oneoff_holder(what: &str) -> String {
    format!(
        "raftblk-{what}@{}:{}/{:08x}",
        machine_name(),
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Attachment {
    /// Cuts the volume's pending snapshot, if the catalog has one.
    pub(crate) async fn cut_pending(&self) {
        let look = self.client.volume_info(&self.volume().name);
        let v = match tokio::time::timeout(SNAPSHOT_LOOKUP_MAX, look).await {
            Ok(Ok(v)) if v.id == self.volume().id => v,
            _ => return,
        };
        let Some(s) = v
            .snapshots
            .iter()
            .find(|s| is(s, SnapshotState::SnapshotPending))
        else {
            return;
        };
        if let Err(e) = self.cut(s.id).await {
            tracing::warn!(volume = %v.name, snapshot = %s.name, error = %e, "snapshot cut failed");
        }
    }

    /// Holds this volume's writes, cuts snapshot `snap` in every data
    /// group and records the outcome. Returns the time writes were held
    /// (`None`: another handle of this process did it).
    pub async fn cut(&self, snap: u64) -> Result<Option<Duration>, ClientError> {
        let volume = self.volume().clone();
        let started = Instant::now();
        let held = tokio::time::timeout(DRAIN_MAX, self.gate.lock.write()).await;
        let (ok, why) = match held {
            Ok(guard) => {
                {
                    let done = self.gate.done.lock().unwrap_or_else(|p| p.into_inner());
                    if *done >= snap {
                        return Ok(None);
                    }
                }
                let r = tokio::time::timeout(
                    CUT_MAX,
                    self.client
                        .snapshot_op_all(&volume, snap, SnapshotOp::Cut, self.epoch()),
                )
                .await;
                drop(guard);
                match r {
                    Ok(Ok(())) => (true, String::new()),
                    Ok(Err(e)) => (false, e.to_string()),
                    Err(_) => (false, format!("the cut took longer than {CUT_MAX:?}")),
                }
            }
            Err(_) => (
                false,
                format!("in-flight writes did not finish within {DRAIN_MAX:?}"),
            ),
        };
        let paused = started.elapsed();
        *self.gate.done.lock().unwrap_or_else(|p| p.into_inner()) = snap;
        tracing::info!(volume = %volume.name, snapshot = snap, ok, paused_us = paused.as_micros() as u64, "snapshot cut");
        self.client
            .finish_snapshot(volume.id, snap, ok, paused)
            .await?;
        if ok {
            Ok(Some(paused))
        } else {
            Err(ClientError::InvalidArgument(format!(
                "snapshot of volume {} failed: {why}",
                volume.name
            )))
        }
    }
}

impl Client {
    /// Runs a snapshot operation in every data group.
    pub(crate) async fn snapshot_op_all(
        &self,
        volume: &VolumeInfo,
        snap: u64,
        op: SnapshotOp,
        epoch: u64,
    ) -> Result<(), ClientError> {
        let groups = 1..=self.topology().data_groups;
        let id = volume.id;
        stream::iter(groups)
            .map(|group| async move {
                self.call_group(group, "snapshot", |ch| async move {
                    let r = BlockIoClient::new(ch)
                        .snapshot(SnapshotOpRequest {
                            group_id: group,
                            volume_id: id,
                            snapshot_id: snap,
                            op: op as i32,
                            epoch,
                        })
                        .await?
                        .into_inner();
                    Ok((r.error, ()))
                })
                .await
                .map_err(snap_err)
            })
            .buffer_unordered(self.options().pieces_in_flight_max.max(1))
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn meta_volume_call<Req: Clone + Send + 'static>(
        &self,
        what: &str,
        req: Req,
        call: impl Fn(
                VolumesClient<tonic::transport::Channel>,
                Req,
            ) -> std::pin::Pin<
                Box<
                    dyn std::future::Future<
                            Output = Result<raftblk_proto::VolumeResponse, tonic::Status>,
                        > + Send,
                >,
            > + Send
            + Sync,
    ) -> Result<raftblk_proto::VolumeResponse, ClientError> {
        self.call_group(META_GROUP_ID, what, |ch| {
            let fut = call(VolumesClient::new(ch), req.clone());
            async move {
                let mut r = fut.await?;
                Ok((r.error.take(), r))
            }
        })
        .await
        .map_err(snap_err)
    }

    async fn finish_snapshot(
        &self,
        volume_id: u64,
        snap: u64,
        ok: bool,
        paused: Duration,
    ) -> Result<(), ClientError> {
        let req = FinishSnapshotRequest {
            volume_id,
            snapshot_id: snap,
            ok,
            quiesce_us: paused.as_micros() as u64,
        };
        self.meta_volume_call("finish snapshot", req, |mut c, r| {
            Box::pin(async move { Ok(c.finish_snapshot(r).await?.into_inner()) })
        })
        .await
        .map(|_| ())
    }

    /// The catalog entry of volume `id`.
    pub async fn volume_by_id(&self, id: u64) -> Result<VolumeInfo, ClientError> {
        self.meta_volume_call("get volume", VolumeIdRequest { id }, |mut c, r| {
            Box::pin(async move { Ok(c.get_by_id(r).await?.into_inner()) })
        })
        .await?
        .volume
        .ok_or_else(|| ClientError::NotFound(format!("no volume with id {id}")))
    }

    /// Takes a crash-consistent snapshot `snap` of `volume` (see the module
    /// docs) and returns it once ready.
    pub async fn create_snapshot(
        &self,
        volume: &str,
        snap: &str,
    ) -> Result<SnapshotInfo, ClientError> {
        let req = SnapshotRequest {
            volume: volume.to_owned(),
            snapshot: snap.to_owned(),
        };
        let resp = self
            .meta_volume_call("create snapshot", req, |mut c, r| {
                Box::pin(async move { Ok(c.create_snapshot(r).await?.into_inner()) })
            })
            .await
            .map_err(|e| match e {
                ClientError::VolumeExists(_) => {
                    ClientError::VolumeExists(format!("{volume}@{snap}"))
                }
                e => e,
            })?;
        let v = resp
            .volume
            .ok_or_else(|| ClientError::InvalidArgument("server returned no volume".into()))?;
        let id = v
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .map(|s| s.id)
            .ok_or_else(|| ClientError::InvalidArgument("server returned no snapshot".into()))?;
        // Nobody holds the volume: take the lease (fencing any writer
        // whose lease ran out) and cut here.
        let opts = AttachOptions {
            holder: oneoff_holder("snapshot"),
            takeover: false,
            reuse: false,
            ..AttachOptions::default()
        };
        let result = match self.attach_id(volume, v.id, &opts).await {
            Ok(a) => {
                let r = a.cut(id).await;
                let _ = a.detach().await;
                r.map(|_| ())
            }
            Err(ClientError::Attached(_)) => self.wait_cut(volume, v.id, id).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {}
            Err(e) => {
                // Clean up what a partial cut left (the record is DELETING
                // after a failed cut, or still PENDING if nobody cut).
                let _ = self.finish_snapshot(v.id, id, false, Duration::ZERO).await;
                let _ = self.delete_snapshot(volume, snap).await;
                return Err(e);
            }
        }
        let now = self.volume_info(volume).await?;
        now.snapshots
            .into_iter()
            .find(|s| s.id == id && is(s, SnapshotState::SnapshotReady))
            .ok_or_else(|| ClientError::NotFound(format!("snapshot {volume}@{snap} is gone")))
    }

    /// Waits for the volume's holder to cut snapshot `id`.
    async fn wait_cut(&self, volume: &str, vid: u64, id: u64) -> Result<(), ClientError> {
        let deadline = Instant::now() + HOLDER_WAIT_MAX;
        let mut holder = String::new();
        while Instant::now() < deadline {
            let (v, lease) = self.volume_status(volume).await?;
            if v.id != vid {
                return Err(ClientError::NoSuchVolume(volume.to_owned()));
            }
            holder = lease.map(|l| l.holder).unwrap_or_default();
            match v.snapshots.iter().find(|s| s.id == id) {
                Some(s) if is(s, SnapshotState::SnapshotReady) => return Ok(()),
                Some(s) if is(s, SnapshotState::SnapshotPending) => {}
                _ => {
                    return Err(ClientError::InvalidArgument(format!(
                        "the holder of volume {volume} ({holder}) could not cut the snapshot (see its log)"
                    )))
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(ClientError::Timeout {
            what: format!("snapshot of volume {volume}"),
            last: format!(
                "its holder {holder} did not cut it within {} s",
                HOLDER_WAIT_MAX.as_secs()
            ),
        })
    }

    /// Deletes snapshot `snap` of `volume` (refused while clones use it):
    /// every data group drops what only it held, then the record goes.
    /// Running it again finishes an interrupted delete.
    pub async fn delete_snapshot(&self, volume: &str, snap: &str) -> Result<(), ClientError> {
        let req = SnapshotRequest {
            volume: volume.to_owned(),
            snapshot: snap.to_owned(),
        };
        let v = self
            .meta_volume_call("delete snapshot", req.clone(), |mut c, r| {
                Box::pin(async move { Ok(c.delete_snapshot(r).await?.into_inner()) })
            })
            .await?
            .volume
            .ok_or_else(|| ClientError::InvalidArgument("server returned no volume".into()))?;
        let id = v
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .map(|s| s.id)
            .ok_or_else(|| ClientError::NotFound(format!("no snapshot {volume}@{snap}")))?;
        self.snapshot_op_all(&v, id, SnapshotOp::Delete, 0).await?;
        self.meta_volume_call("remove snapshot", req, |mut c, r| {
            Box::pin(async move { Ok(c.remove_snapshot(r).await?.into_inner()) })
        })
        .await
        .map(|_| ())
    }

    /// Sets `volume` back to snapshot `snap`, holding its lease for the
    /// while (refused if another holder has it: a guest runs on it).
    pub async fn rollback_snapshot(&self, volume: &str, snap: &str) -> Result<(), ClientError> {
        let v = self.volume_info(volume).await?;
        let s = snapshot_named(&v, snap)?;
        let opts = AttachOptions {
            holder: oneoff_holder("rollback"),
            takeover: false,
            reuse: false,
            ..AttachOptions::default()
        };
        let a = self
            .attach_id(volume, v.id, &opts)
            .await
            .map_err(|e| match e {
                ClientError::Attached(m) => ClientError::Attached(format!(
                    "{m}: rollback of an attached volume is refused (stop its guest first)"
                )),
                e => e,
            })?;
        let r = self
            .snapshot_op_all(&v, s.id, SnapshotOp::Rollback, a.epoch())
            .await;
        let _ = a.detach().await;
        r
    }

    /// Makes `name` a clone of `volume@snap`: constant time, sharing the
    /// snapshot's blocks until the clone overwrites them.
    pub async fn clone_volume(
        &self,
        volume: &str,
        snap: &str,
        name: &str,
    ) -> Result<VolumeInfo, ClientError> {
        let req = CreateVolumeRequest {
            name: name.to_owned(),
            parent_volume: volume.to_owned(),
            parent_snapshot: snap.to_owned(),
            ..Default::default()
        };
        let r = self
            .meta_volume_call("clone volume", req, |mut c, r| {
                Box::pin(async move { Ok(c.create(r).await?.into_inner()) })
            })
            .await
            .map_err(|e| match e {
                ClientError::VolumeExists(_) => ClientError::VolumeExists(name.to_owned()),
                e => e,
            })?;
        r.volume
            .ok_or_else(|| ClientError::InvalidArgument("server returned no volume".into()))
    }

    /// Drops `name`'s parent (after `Volume::copy_up_all`).
    pub(crate) async fn drop_parent(&self, name: &str) -> Result<VolumeInfo, ClientError> {
        let req = FlattenRequest {
            name: name.to_owned(),
        };
        self.meta_volume_call("flatten", req, |mut c, r| {
            Box::pin(async move { Ok(c.flatten(r).await?.into_inner()) })
        })
        .await?
        .volume
        .ok_or_else(|| ClientError::InvalidArgument("server returned no volume".into()))
    }

    /// Opens `volume` as of its snapshot `snap`, read-only.
    pub async fn open_snapshot(&self, volume: &str, snap: &str) -> Result<Volume, ClientError> {
        let v = self.volume_info(volume).await?;
        let s = snapshot_named(&v, snap)?;
        let id = s.id;
        let size = s.size_bytes;
        Volume::open_at(self.clone(), v, id, size).await
    }

    /// The read-only handle of a clone's parent snapshot (and its own
    /// parents), `depth` clones deep.
    pub(crate) async fn open_parent(
        &self,
        parent: raftblk_proto::ParentRef,
        depth: usize,
    ) -> Result<Arc<Volume>, ClientError> {
        if depth >= CLONE_DEPTH_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "clones are nested deeper than {CLONE_DEPTH_MAX}: flatten one"
            )));
        }
        let v = self.volume_by_id(parent.volume_id).await?;
        let s = v
            .snapshots
            .iter()
            .find(|s| s.id == parent.snapshot_id)
            .ok_or_else(|| {
                ClientError::NotFound(format!(
                    "the parent snapshot (id {}) of volume {} is gone",
                    parent.snapshot_id, v.name
                ))
            })?;
        let size = s.size_bytes;
        let snap = s.id;
        Ok(Arc::new(
            Box::pin(Volume::open_at_depth(
                self.clone(),
                v,
                snap,
                size,
                depth + 1,
            ))
            .await?,
        ))
    }
}

/// The ready snapshot `snap` of `v`.
pub fn snapshot_named<'a>(v: &'a VolumeInfo, snap: &str) -> Result<&'a SnapshotInfo, ClientError> {
    match v.snapshots.iter().find(|s| s.name == snap) {
        Some(s) if is(s, SnapshotState::SnapshotReady) => Ok(s),
        Some(_) => Err(ClientError::NotFound(format!(
            "snapshot {}@{snap} is not ready (being taken or deleted)",
            v.name
        ))),
        None => Err(ClientError::NotFound(format!(
            "volume {} has no snapshot {snap:?}",
            v.name
        ))),
    }
}
