//! The Volumes service: the catalog and the attach leases in the meta
//! group. Changes are raft proposals on the meta leader; lookups are
//! ReadIndex reads on it.

use std::time::{SystemTime, UNIX_EPOCH};

use raftblk_proto::volumes_server::Volumes;
use raftblk_proto::{
    command::Cmd, AttachCmd, AttachRequest, Command, CreateSnapshotCmd, CreateVolumeCmd,
    CreateVolumeRequest, DeleteVolumeCmd, DetachCmd, DetachRequest, Empty, Error as PbError,
    ErrorCode, FinishSnapshotRequest, FlattenCmd, FlattenRequest, GrowVolumeCmd, GrowVolumeRequest,
    ListVolumesResponse, ParentRef, QosLimits, RenewCmd, RenewRequest, SetQosCmd, SetQosRequest,
    SetSnapshotStateCmd, SnapshotRequest, SnapshotState, VolumeIdRequest, VolumeInfo,
    VolumeNameRequest, VolumeResponse, META_GROUP_ID, SECTOR_BYTES,
};
use tonic::{Request, Response, Status};

use super::store_error;
use crate::apply::{self, ApplyOutput};
use crate::store::StoreHandle;

/// Longest volume name.
pub const VOLUME_NAME_BYTES_MAX: usize = 128;
/// Longest attach-lease holder name.
pub const HOLDER_BYTES_MAX: usize = 256;

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Largest I/O limit accepted (per second): far above any device.
pub const QOS_LIMIT_MAX: u64 = 1 << 40;

/// Checks I/O limits: each at most `QOS_LIMIT_MAX` (0: none).
fn validate_qos(q: Option<&QosLimits>) -> Result<(), PbError> {
    let Some(q) = q else { return Ok(()) };
    for (what, v) in [
        ("iops_max", q.iops_max),
        ("read_iops_max", q.read_iops_max),
        ("write_iops_max", q.write_iops_max),
        ("bps_max", q.bps_max),
        ("read_bps_max", q.read_bps_max),
        ("write_bps_max", q.write_bps_max),
        ("iops_burst", q.iops_burst),
        ("bps_burst", q.bps_burst),
    ] {
        if v > QOS_LIMIT_MAX {
            return Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!("{what} {v} exceeds the limit of {QOS_LIMIT_MAX}"),
            ));
        }
    }
    Ok(())
}

/// Checks a lease holder's name: 1-256 printable characters.
fn validate_holder(holder: &str) -> Result<(), PbError> {
    if holder.is_empty() || holder.len() > HOLDER_BYTES_MAX || holder.chars().any(char::is_control)
    {
        return Err(PbError::new(
            ErrorCode::InvalidArgument,
            format!("a lease holder is 1 to {HOLDER_BYTES_MAX} bytes of printable characters"),
        ));
    }
    Ok(())
}

pub struct VolumesService {
    pub store: StoreHandle,
}

/// Checks a volume name: 1-128 of `[A-Za-z0-9._-]`, not starting with `-`.
pub fn validate_name(name: &str) -> Result<(), PbError> {
    if name.is_empty() || name.len() > VOLUME_NAME_BYTES_MAX {
        return Err(PbError::new(
            ErrorCode::InvalidArgument,
            format!("volume name must be 1 to {VOLUME_NAME_BYTES_MAX} characters"),
        ));
    }
    if name.starts_with('-')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(PbError::new(
            ErrorCode::InvalidArgument,
            format!(
                "volume name {name:?} may only hold letters, digits, '.', '_' and '-' (not first)"
            ),
        ));
    }
    Ok(())
}

impl VolumesService {
    fn validate_size(&self, size: u64) -> Result<(), PbError> {
        let max = self.store.config.limits.volume_size_bytes_max;
        if size == 0 {
            return Err(PbError::new(
                ErrorCode::InvalidArgument,
                "volume size must be positive",
            ));
        }
        if !size.is_multiple_of(SECTOR_BYTES) {
            return Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!("volume size {size} is not a multiple of 512 bytes"),
            ));
        }
        if size > max {
            return Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!("volume size {size} exceeds the limit of {max} bytes"),
            ));
        }
        Ok(())
    }

    async fn propose_volume(&self, cmd: Cmd) -> VolumeResponse {
        let cmd = Command { cmd: Some(cmd) };
        match self.store.propose(META_GROUP_ID, &cmd).await {
            Ok(Ok(ApplyOutput::Volume(v))) => VolumeResponse {
                volume: Some(v),
                ..Default::default()
            },
            Ok(Ok(ApplyOutput::Lease(l))) => VolumeResponse {
                lease: Some(l),
                ..Default::default()
            },
            Ok(Ok(_)) => VolumeResponse::default(),
            Ok(Err(e)) => VolumeResponse {
                error: Some(e),
                ..Default::default()
            },
            Err(e) => VolumeResponse {
                error: Some(store_error(&self.store, e)),
                ..Default::default()
            },
        }
    }

    /// The catalog record of `name` as of now (ReadIndex on the meta
    /// leader), with its attach lease.
    async fn read_volume(&self, name: &str) -> Result<VolumeResponse, PbError> {
        validate_name(name)?;
        self.store
            .read_index(META_GROUP_ID, false)
            .await
            .map_err(|e| store_error(&self.store, e))?;
        let storage =
            |e: crate::engine::EngineError| PbError::new(ErrorCode::Storage, e.to_string());
        let v: VolumeInfo = apply::lookup_volume(&self.store.engine, name)
            .map_err(storage)?
            .ok_or_else(|| {
                PbError::new(ErrorCode::NoSuchVolume, format!("no volume named {name:?}"))
            })?;
        let lease = crate::lease::lookup_lease(&self.store.engine, v.id).map_err(storage)?;
        Ok(VolumeResponse {
            error: None,
            volume: Some(v),
            lease,
        })
    }
}

fn failed(e: PbError) -> Response<VolumeResponse> {
    Response::new(VolumeResponse {
        error: Some(e),
        ..Default::default()
    })
}

#[tonic::async_trait]
impl Volumes for VolumesService {
    async fn create(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        let cloning = !r.parent_volume.is_empty();
        if let Err(e) = validate_name(&r.name).and_then(|_| {
            if cloning && r.size_bytes == 0 {
                Ok(())
            } else {
                self.validate_size(r.size_bytes)
            }
        }) {
            return Ok(failed(e));
        }
        let now_ms = now_unix_ms();
        if let Err(e) = validate_qos(r.qos.as_ref()) {
            return Ok(failed(e));
        }
        let parent = match self.parent_of(&r).await {
            Ok(p) => p,
            Err(e) => return Ok(failed(e)),
        };
        let cmd = Cmd::CreateVolume(CreateVolumeCmd {
            name: r.name,
            size_bytes: r.size_bytes,
            chunk_size_bytes: self.store.config.cluster.chunk_size_bytes,
            created_unix_ms: now_ms,
            qos: r.qos,
            parent,
        });
        Ok(Response::new(self.propose_volume(cmd).await))
    }

    async fn delete(
        &self,
        req: Request<VolumeNameRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_name(&r.name) {
            return Ok(failed(e));
        }
        Ok(Response::new(
            self.propose_volume(Cmd::DeleteVolume(DeleteVolumeCmd { name: r.name }))
                .await,
        ))
    }

    async fn get(
        &self,
        req: Request<VolumeNameRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.read_volume(&r.name)
                .await
                .unwrap_or_else(|e| VolumeResponse {
                    error: Some(e),
                    ..Default::default()
                }),
        ))
    }

    async fn attach(
        &self,
        req: Request<AttachRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_holder(&r.holder) {
            return Ok(failed(e));
        }
        let volume = match self.read_volume(&r.name).await {
            Ok(VolumeResponse {
                volume: Some(v), ..
            }) => v,
            Ok(_) => return Ok(failed(PbError::new(ErrorCode::Storage, "no record"))),
            Err(e) => return Ok(failed(e)),
        };
        if r.volume_id != 0 && r.volume_id != volume.id {
            return Ok(failed(PbError::new(
                ErrorCode::NoSuchVolume,
                format!(
                    "volume {:?} is now id {}, not the id {} that was opened (deleted and created again)",
                    r.name, volume.id, r.volume_id
                ),
            )));
        }
        let cmd = Cmd::Attach(AttachCmd {
            volume_id: volume.id,
            holder: r.holder,
            takeover: r.takeover,
            reuse: r.reuse,
            now_unix_ms: now_unix_ms(),
            ttl_ms: r.ttl_ms,
        });
        let mut resp = self.propose_volume(cmd).await;
        if resp.error.is_none() {
            resp.volume = Some(volume);
        }
        Ok(Response::new(resp))
    }

    async fn set_qos(
        &self,
        req: Request<SetQosRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_name(&r.name).and_then(|_| validate_qos(r.qos.as_ref())) {
            return Ok(failed(e));
        }
        Ok(Response::new(
            self.propose_volume(Cmd::SetQos(SetQosCmd {
                name: r.name,
                qos: r.qos,
            }))
            .await,
        ))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_holder(&r.holder) {
            return Ok(failed(e));
        }
        let cmd = Cmd::Renew(RenewCmd {
            volume_id: r.volume_id,
            holder: r.holder,
            epoch: r.epoch,
            now_unix_ms: now_unix_ms(),
            ttl_ms: r.ttl_ms,
        });
        Ok(Response::new(self.propose_volume(cmd).await))
    }

    async fn detach(
        &self,
        req: Request<DetachRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        // Breaking another holder's lease is an operator's act.
        if req.get_ref().force {
            raftblk_tls::server::require(&req, raftblk_tls::Role::Admin, "detach --force")?;
        }
        let r = req.into_inner();
        if !r.force {
            if let Err(e) = validate_holder(&r.holder) {
                return Ok(failed(e));
            }
        }
        let volume = match self.read_volume(&r.name).await {
            Ok(VolumeResponse {
                volume: Some(v), ..
            }) => v,
            Ok(_) => return Ok(failed(PbError::new(ErrorCode::Storage, "no record"))),
            Err(e) => return Ok(failed(e)),
        };
        let cmd = Cmd::Detach(DetachCmd {
            volume_id: volume.id,
            holder: r.holder,
            epoch: r.epoch,
            force: r.force,
        });
        let mut resp = self.propose_volume(cmd).await;
        if resp.error.is_none() {
            resp.volume = Some(volume);
        }
        Ok(Response::new(resp))
    }

    async fn list(&self, _req: Request<Empty>) -> Result<Response<ListVolumesResponse>, Status> {
        if let Err(e) = self.store.read_index(META_GROUP_ID, false).await {
            return Ok(Response::new(ListVolumesResponse {
                error: Some(store_error(&self.store, e)),
                volumes: vec![],
            }));
        }
        match apply::list_volumes(&self.store.engine) {
            Ok(volumes) => Ok(Response::new(ListVolumesResponse {
                error: None,
                volumes,
            })),
            Err(e) => Ok(Response::new(ListVolumesResponse {
                error: Some(PbError::new(ErrorCode::Storage, e.to_string())),
                volumes: vec![],
            })),
        }
    }

    async fn get_by_id(
        &self,
        req: Request<VolumeIdRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let id = req.into_inner().id;
        // Any meta replica answers: a follower's ReadIndex is linearizable.
        if let Err(e) = self.store.read_index(META_GROUP_ID, true).await {
            return Ok(failed(store_error(&self.store, e)));
        }
        match crate::service::volume_cache::read_local_catalog(&self.store, id) {
            Ok(Some((v, lease))) => Ok(Response::new(VolumeResponse {
                error: None,
                volume: Some(v),
                lease,
            })),
            Ok(None) => Ok(failed(PbError::new(
                ErrorCode::NoSuchVolume,
                format!("no volume with id {id}"),
            ))),
            Err(e) => Ok(failed(e)),
        }
    }

    async fn grow(
        &self,
        req: Request<GrowVolumeRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_name(&r.name).and_then(|_| self.validate_size(r.new_size_bytes)) {
            return Ok(failed(e));
        }
        Ok(Response::new(
            self.propose_volume(Cmd::GrowVolume(GrowVolumeCmd {
                name: r.name,
                new_size_bytes: r.new_size_bytes,
            }))
            .await,
        ))
    }

    async fn create_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_name(&r.volume)
            .and_then(|_| crate::snap_catalog::validate_snapshot_name(&r.snapshot))
        {
            return Ok(failed(e));
        }
        let cmd = Cmd::CreateSnapshot(CreateSnapshotCmd {
            volume: r.volume.clone(),
            snapshot: r.snapshot,
            created_unix_ms: now_unix_ms(),
        });
        Ok(Response::new(
            self.with_lease(self.propose_volume(cmd).await),
        ))
    }

    async fn finish_snapshot(
        &self,
        req: Request<FinishSnapshotRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        let state = if r.ok {
            SnapshotState::SnapshotReady
        } else {
            SnapshotState::SnapshotDeleting
        };
        let cmd = Cmd::SetSnapshotState(SetSnapshotStateCmd {
            volume_id: r.volume_id,
            snapshot_id: r.snapshot_id,
            state: state as i32,
            quiesce_us: r.quiesce_us,
            from_pending_only: true,
        });
        Ok(Response::new(self.propose_volume(cmd).await))
    }

    async fn delete_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        Ok(Response::new(
            self.snapshot_state(req.into_inner(), SnapshotState::SnapshotDeleting)
                .await,
        ))
    }

    async fn remove_snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        Ok(Response::new(
            self.snapshot_state(req.into_inner(), SnapshotState::Unspecified)
                .await,
        ))
    }

    async fn flatten(
        &self,
        req: Request<FlattenRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_name(&r.name) {
            return Ok(failed(e));
        }
        Ok(Response::new(
            self.propose_volume(Cmd::Flatten(FlattenCmd { name: r.name }))
                .await,
        ))
    }
}

impl VolumesService {
    /// The parent snapshot a create names (a clone), resolved to ids.
    async fn parent_of(&self, r: &CreateVolumeRequest) -> Result<Option<ParentRef>, PbError> {
        if r.parent_volume.is_empty() && r.parent_snapshot.is_empty() {
            return Ok(None);
        }
        let v = self.known_volume(&r.parent_volume).await?;
        let s = crate::snap_catalog::find_snapshot(&v, &r.parent_snapshot)?;
        Ok(Some(ParentRef {
            volume_id: v.id,
            snapshot_id: s.id,
        }))
    }

    async fn known_volume(&self, name: &str) -> Result<VolumeInfo, PbError> {
        match self.read_volume(name).await? {
            VolumeResponse {
                volume: Some(v), ..
            } => Ok(v),
            _ => Err(PbError::new(ErrorCode::Storage, "no record")),
        }
    }

    /// Moves snapshot `r.snapshot` of `r.volume` to `state`.
    async fn snapshot_state(&self, r: SnapshotRequest, state: SnapshotState) -> VolumeResponse {
        let snap =
            match self.known_volume(&r.volume).await.and_then(|v| {
                crate::snap_catalog::find_snapshot(&v, &r.snapshot).map(|s| (v.id, s.id))
            }) {
                Ok(x) => x,
                Err(e) => {
                    return VolumeResponse {
                        error: Some(e),
                        ..Default::default()
                    }
                }
            };
        self.propose_volume(Cmd::SetSnapshotState(SetSnapshotStateCmd {
            volume_id: snap.0,
            snapshot_id: snap.1,
            state: state as i32,
            quiesce_us: 0,
            from_pending_only: false,
        }))
        .await
    }

    /// Adds the volume's attach lease to a successful answer.
    fn with_lease(&self, mut resp: VolumeResponse) -> VolumeResponse {
        if let Some(v) = &resp.volume {
            resp.lease = crate::lease::lookup_lease(&self.store.engine, v.id)
                .ok()
                .flatten();
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("vm-1.disk_0").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(129)).is_err());
    }
}
