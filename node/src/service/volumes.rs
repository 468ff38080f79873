//! The Volumes service: the catalog in the meta group. Changes are raft
//! proposals on the meta leader; lookups are ReadIndex reads on it.

use std::time::{SystemTime, UNIX_EPOCH};

use raftblk_proto::volumes_server::Volumes;
use raftblk_proto::{
    command::Cmd, Command, CreateVolumeCmd, CreateVolumeRequest, DeleteVolumeCmd, Empty,
    Error as PbError, ErrorCode, GrowVolumeCmd, GrowVolumeRequest, ListVolumesResponse,
    VolumeIdRequest, VolumeNameRequest, VolumeResponse, META_GROUP_ID, SECTOR_BYTES,
};
use tonic::{Request, Response, Status};

use super::store_error;
use crate::apply::{self, ApplyOutput};
use crate::store::StoreHandle;

/// Longest volume name.
pub const VOLUME_NAME_BYTES_MAX: usize = 128;

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
                error: None,
                volume: Some(v),
            },
            Ok(Ok(_)) => VolumeResponse::default(),
            Ok(Err(e)) => VolumeResponse {
                error: Some(e),
                volume: None,
            },
            Err(e) => VolumeResponse {
                error: Some(store_error(&self.store, e)),
                volume: None,
            },
        }
    }
}

fn failed(e: PbError) -> Response<VolumeResponse> {
    Response::new(VolumeResponse {
        error: Some(e),
        volume: None,
    })
}

#[tonic::async_trait]
impl Volumes for VolumesService {
    async fn create(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<VolumeResponse>, Status> {
        let r = req.into_inner();
        if let Err(e) = validate_name(&r.name).and_then(|_| self.validate_size(r.size_bytes)) {
            return Ok(failed(e));
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cmd = Cmd::CreateVolume(CreateVolumeCmd {
            name: r.name,
            size_bytes: r.size_bytes,
            chunk_size_bytes: self.store.config.cluster.chunk_size_bytes,
            created_unix_ms: now_ms,
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
        if let Err(e) = validate_name(&r.name) {
            return Ok(failed(e));
        }
        if let Err(e) = self.store.read_index(META_GROUP_ID, false).await {
            return Ok(failed(store_error(&self.store, e)));
        }
        match apply::lookup_volume(&self.store.engine, &r.name) {
            Ok(Some(v)) => Ok(Response::new(VolumeResponse {
                error: None,
                volume: Some(v),
            })),
            Ok(None) => Ok(failed(PbError::new(
                ErrorCode::NoSuchVolume,
                format!("no volume named {:?}", r.name),
            ))),
            Err(e) => Ok(failed(PbError::new(ErrorCode::Storage, e.to_string()))),
        }
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
            Ok(Some(v)) => Ok(Response::new(VolumeResponse {
                error: None,
                volume: Some(v),
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
