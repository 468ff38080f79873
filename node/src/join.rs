//! Before the store starts: a node that joins an existing cluster (no
//! `cluster.nodes` in its config) registers with the meta leader through
//! its seeds and learns the cluster's parameters from the map; after a
//! restart it takes them from the map it persisted. A bootstrap node whose
//! data directory is empty first checks that its peers do not already run
//! a cluster that knows it with data (a wiped node must not bootstrap a
//! second cluster under its old id).

use std::time::Duration;

use anyhow::bail;
use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::{ClusterMap, Empty, ErrorCode, JoinRequest};

use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::identity::StoreIdent;

/// Joining waits this long at most for a seed to answer.
const JOIN_DEADLINE: Duration = Duration::from_secs(120);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Fills in the cluster parameters of a joining node and returns the map
/// to seed the address book with (the persisted one, or the one the join
/// returned).
pub async fn prepare(
    config: &mut NodeConfig,
    engine: &Engine,
    ident: &StoreIdent,
) -> anyhow::Result<Option<ClusterMap>> {
    let persisted = crate::map_sync::load_persisted(engine);
    if config.bootstraps() {
        if ident.fresh {
            check_not_wiped(config).await?;
        }
        return Ok(persisted);
    }
    let map = match persisted {
        Some(m) if !ident.fresh => m,
        _ => join(config, ident).await?,
    };
    if map.data_groups == 0 || map.data_groups > 4096 {
        bail!("the cluster map names {} data groups", map.data_groups);
    }
    config.cluster.data_groups = map.data_groups;
    config.cluster.replicas = map.replicas;
    config.cluster.chunk_size_bytes = map.chunk_size_bytes;
    Ok(Some(map))
}

async fn join(config: &NodeConfig, ident: &StoreIdent) -> anyhow::Result<ClusterMap> {
    let req = JoinRequest {
        node_id: config.node_id,
        addr: config.listen_addr.clone(),
        store_uuid: ident.uuid.to_vec().into(),
        failure_domain: config.failure_domain.clone().unwrap_or_default(),
        weight: config.weight.unwrap_or(0),
    };
    let deadline = tokio::time::Instant::now() + JOIN_DEADLINE;
    let mut backoff = Duration::from_millis(200);
    let mut addrs: Vec<String> = config.seeds.clone();
    loop {
        let mut last = String::new();
        let mut i = 0;
        while i < addrs.len() && i < 16 {
            let addr = addrs[i].clone();
            i += 1;
            let ch = match crate::transport::connect(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let mut client = ClusterClient::new(ch);
            let call = client.join(req.clone());
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    match (r.error, r.map) {
                        (None, Some(map)) => {
                            tracing::info!(
                                node = r.node_id,
                                epoch = map.epoch,
                                "joined the cluster"
                            );
                            return Ok(map);
                        }
                        (Some(e), _) if e.kind() == ErrorCode::NotLeader => {
                            if !e.leader_addr.is_empty() && !addrs.contains(&e.leader_addr) {
                                addrs.push(e.leader_addr.clone());
                            }
                            last = format!("{addr}: {e}");
                        }
                        (Some(e), _) if e.kind() == ErrorCode::InvalidArgument => {
                            bail!("the cluster refused node {}: {}", config.node_id, e.message);
                        }
                        (e, _) => last = format!("{addr}: {e:?}"),
                    }
                }
                Ok(Err(s)) => last = format!("{addr}: {}", s.message()),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        if tokio::time::Instant::now() + backoff > deadline {
            bail!(
                "cannot join the cluster through seeds {:?} within {JOIN_DEADLINE:?}: {last}",
                config.seeds
            );
        }
        tracing::info!(last = %last, "no seed accepted the join yet; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Refuses to bootstrap if another bootstrap node already runs a cluster
/// whose map records this node with a data directory.
async fn check_not_wiped(config: &NodeConfig) -> anyhow::Result<()> {
    for n in config
        .cluster
        .nodes
        .iter()
        .filter(|n| n.id != config.node_id)
    {
        let Ok(Ok(ch)) =
            tokio::time::timeout(Duration::from_secs(1), crate::transport::connect(&n.addr)).await
        else {
            continue;
        };
        let mut client = ClusterClient::new(ch);
        let call = client.get_map(Empty {});
        let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), call).await else {
            continue;
        };
        let Some(map) = r.into_inner().map else {
            continue;
        };
        if let Some(me) = map.nodes.iter().find(|m| m.id == config.node_id) {
            if !me.store_uuid.is_empty() {
                bail!(
                    "this node's data directory is empty, but the running cluster (seen at node {} {}) already knows node {} with data: a wiped or replaced disk must not bootstrap again. Remove node {} (raftblk node remove {}) and join under a new id with `seeds`",
                    n.id, n.addr, config.node_id, config.node_id, config.node_id
                );
            }
        }
    }
    Ok(())
}
