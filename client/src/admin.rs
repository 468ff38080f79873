//! Cluster administration through the meta leader: the cluster map, adding
//! nodes, changing a node's state (drain, out, in, remove) or weight, and
//! cluster flags. Each call goes through the router's retry loop, so it
//! follows the meta leader wherever it is.

use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::{
    ClusterFlags, ClusterMap, Empty, JoinRequest, NodeState, SetFlagsRequest, SetNodeRequest,
    META_GROUP_ID,
};

use crate::error::ClientError;
use crate::router::Client;

fn server(e: ClientError) -> ClientError {
    match e {
        ClientError::Server(pb) => ClientError::from_server(pb, None),
        other => other,
    }
}

impl Client {
    /// The cluster map, as the meta group has it (linearizable).
    pub async fn cluster_map(&self) -> Result<ClusterMap, ClientError> {
        let m = self
            .call_group(META_GROUP_ID, "read the cluster map", |ch| async move {
                let r = ClusterClient::new(ch).get_map(Empty {}).await?.into_inner();
                Ok((r.error, r.map))
            })
            .await
            .map_err(server)?;
        m.ok_or_else(|| ClientError::InvalidArgument("server returned no map".into()))
    }

    /// Registers a node at `addr` before it first starts (id 0: the next
    /// free one); returns its id.
    pub async fn add_node(
        &self,
        addr: &str,
        node_id: u64,
        failure_domain: &str,
        weight: u64,
    ) -> Result<u64, ClientError> {
        let req = JoinRequest {
            node_id,
            addr: addr.to_owned(),
            store_uuid: Default::default(),
            failure_domain: failure_domain.to_owned(),
            weight,
        };
        self.call_group(META_GROUP_ID, "add a node", |ch| {
            let req = req.clone();
            async move {
                let r = ClusterClient::new(ch).join(req).await?.into_inner();
                Ok((r.error, r.node_id))
            }
        })
        .await
        .map_err(server)
    }

    /// Sets node `id`'s state (and weight, if given).
    pub async fn set_node(
        &self,
        id: u64,
        state: Option<NodeState>,
        weight: Option<u64>,
    ) -> Result<ClusterMap, ClientError> {
        let req = SetNodeRequest {
            node_id: id,
            state: state.map_or(0, |s| s as i32),
            set_weight: weight.is_some(),
            weight: weight.unwrap_or(0),
        };
        let m = self
            .call_group(META_GROUP_ID, "change a node", |ch| async move {
                let r = ClusterClient::new(ch).set_node(req).await?.into_inner();
                Ok((r.error, r.map))
            })
            .await
            .map_err(server)?;
        m.ok_or_else(|| ClientError::InvalidArgument("server returned no map".into()))
    }

    /// Replaces the cluster flags.
    pub async fn set_flags(&self, flags: ClusterFlags) -> Result<ClusterMap, ClientError> {
        let m = self
            .call_group(META_GROUP_ID, "set cluster flags", |ch| {
                let req = SetFlagsRequest { flags: Some(flags) };
                async move {
                    let r = ClusterClient::new(ch).set_flags(req).await?.into_inner();
                    Ok((r.error, r.map))
                }
            })
            .await
            .map_err(server)?;
        m.ok_or_else(|| ClientError::InvalidArgument("server returned no map".into()))
    }
}
