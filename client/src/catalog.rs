//! Catalog calls through the meta leader: create, inspect, grow, limit,
//! list and delete volumes. Each goes through the router's retry loop
//! (`Client::call_group`), so it follows the meta leader wherever it is.

use std::future::Future;

use raftblk_proto::volumes_client::VolumesClient;
use raftblk_proto::{
    CreateVolumeRequest, Empty, GrowVolumeRequest, VolumeInfo, VolumeNameRequest, META_GROUP_ID,
};
use tonic::transport::Channel;

use crate::error::ClientError;
use crate::router::{Attempt, Client};

impl Client {
    async fn volume_call(
        &self,
        what: &str,
        name: Option<&str>,
        op: impl Fn(
            VolumesClient<Channel>,
        )
            -> std::pin::Pin<Box<dyn Future<Output = Attempt<Option<VolumeInfo>>> + Send>>,
    ) -> Result<Option<VolumeInfo>, ClientError> {
        self.call_group(META_GROUP_ID, what, |ch| op(VolumesClient::new(ch)))
            .await
            .map_err(|e| match e {
                ClientError::Server(pb) => ClientError::from_server(pb, name),
                other => other,
            })
    }

    /// Creates a volume of `size_bytes` (a positive multiple of 512).
    pub async fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<VolumeInfo, ClientError> {
        self.create_volume_with_qos(name, size_bytes, None).await
    }

    /// Creates a volume with I/O limits (see `set_qos`).
    pub async fn create_volume_with_qos(
        &self,
        name: &str,
        size_bytes: u64,
        qos: Option<raftblk_proto::QosLimits>,
    ) -> Result<VolumeInfo, ClientError> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(512) {
            return Err(ClientError::InvalidArgument(format!(
                "volume size {size_bytes} is not a positive multiple of 512 bytes"
            )));
        }
        let n = name.to_owned();
        let v = self
            .volume_call("create volume", Some(name), move |mut c| {
                let req = CreateVolumeRequest {
                    name: n.clone(),
                    size_bytes,
                    qos,
                    ..Default::default()
                };
                Box::pin(async move {
                    let r = c.create(req).await?.into_inner();
                    Ok((r.error, r.volume))
                })
            })
            .await?;
        v.ok_or_else(|| ClientError::InvalidArgument("server returned no volume".into()))
    }

    /// The catalog entry of `name`.
    pub async fn volume_info(&self, name: &str) -> Result<VolumeInfo, ClientError> {
        let n = name.to_owned();
        let v = self
            .volume_call("get volume", Some(name), move |mut c| {
                let req = VolumeNameRequest { name: n.clone() };
                Box::pin(async move {
                    let r = c.get(req).await?.into_inner();
                    Ok((r.error, r.volume))
                })
            })
            .await?;
        v.ok_or_else(|| ClientError::NoSuchVolume(name.to_owned()))
    }

    /// Deletes `name`; its blocks are purged in the background.
    pub async fn delete_volume(&self, name: &str) -> Result<VolumeInfo, ClientError> {
        let n = name.to_owned();
        let v = self
            .volume_call("delete volume", Some(name), move |mut c| {
                let req = VolumeNameRequest { name: n.clone() };
                Box::pin(async move {
                    let r = c.delete(req).await?.into_inner();
                    Ok((r.error, r.volume))
                })
            })
            .await?;
        v.ok_or_else(|| ClientError::NoSuchVolume(name.to_owned()))
    }

    /// Grows `name` to `new_size_bytes` (never shrinks).
    pub async fn grow_volume(
        &self,
        name: &str,
        new_size_bytes: u64,
    ) -> Result<VolumeInfo, ClientError> {
        if new_size_bytes == 0 || !new_size_bytes.is_multiple_of(512) {
            return Err(ClientError::InvalidArgument(format!(
                "volume size {new_size_bytes} is not a positive multiple of 512 bytes"
            )));
        }
        let n = name.to_owned();
        let v = self
            .volume_call("grow volume", Some(name), move |mut c| {
                let req = GrowVolumeRequest {
                    name: n.clone(),
                    new_size_bytes,
                };
                Box::pin(async move {
                    let r = c.grow(req).await?.into_inner();
                    Ok((r.error, r.volume))
                })
            })
            .await?;
        v.ok_or_else(|| ClientError::NoSuchVolume(name.to_owned()))
    }

    /// Replaces the I/O limits of `name` (`None` or all zeros: none);
    /// serving daemons apply them within a second.
    pub async fn set_qos(
        &self,
        name: &str,
        qos: Option<raftblk_proto::QosLimits>,
    ) -> Result<VolumeInfo, ClientError> {
        let n = name.to_owned();
        let v = self
            .volume_call("set volume limits", Some(name), move |mut c| {
                let req = raftblk_proto::SetQosRequest {
                    name: n.clone(),
                    qos,
                };
                Box::pin(async move {
                    let r = c.set_qos(req).await?.into_inner();
                    Ok((r.error, r.volume))
                })
            })
            .await?;
        v.ok_or_else(|| ClientError::NoSuchVolume(name.to_owned()))
    }

    /// Every volume, in name order.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ClientError> {
        self.call_group(META_GROUP_ID, "list volumes", |ch| async move {
            let r = VolumesClient::new(ch).list(Empty {}).await?.into_inner();
            Ok((r.error, r.volumes))
        })
        .await
        .map_err(|e| match e {
            ClientError::Server(pb) => ClientError::from_server(pb, None),
            other => other,
        })
    }
}
