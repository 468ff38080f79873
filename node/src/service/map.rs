//! The cluster-map RPCs of the Cluster service: reading the map, node
//! heartbeats and joins (on the meta leader), and admin changes of nodes
//! and flags. Every change is a meta-group proposal, so every meta
//! replica applies it the same way; checks that need the current map read
//! the leader's applied copy, and the apply re-checks what could race
//! (an id taken twice, an older group report).

use std::net::SocketAddr;
use std::time::Instant;

use raftblk_proto::command::Cmd;
use raftblk_proto::{
    ClusterMap, ClusterMapResponse, Command, Error as PbError, ErrorCode, GroupRecord,
    HeartbeatResponse, JoinRequest, JoinResponse, MapChangeResponse, NodeHeartbeat, NodeRecord,
    NodeState, SetFlagsCmd, SetFlagsRequest, SetGroupsCmd, SetNodeCmd, SetNodeRequest,
    META_GROUP_ID,
};

use super::store_error;
use crate::apply::ApplyOutput;
use crate::cluster_map::WEIGHT_DEFAULT;
use crate::placement::reports::Reports;
use crate::store::{StoreError, StoreHandle};

fn invalid(msg: impl Into<String>) -> PbError {
    PbError::new(ErrorCode::InvalidArgument, msg)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Ok if this node leads the meta group, else NOT_LEADER with a hint.
fn check_meta_leader(store: &StoreHandle) -> Result<(), PbError> {
    match store.view(META_GROUP_ID) {
        Some(v) if v.role == "leader" => Ok(()),
        Some(v) => Err(store_error(
            store,
            StoreError::NotLeader {
                group: META_GROUP_ID,
                leader: (v.leader_id != 0).then_some(v.leader_id),
            },
        )),
        None => Err(store_error(
            store,
            StoreError::NotLeader {
                group: META_GROUP_ID,
                leader: store.book.meta_voters().first().copied(),
            },
        )),
    }
}

/// Reads one record of the leader's applied map.
fn get_record<T: prost::Message + Default>(
    store: &StoreHandle,
    key: &[u8],
) -> Result<Option<T>, PbError> {
    match store.engine.get_kv(key) {
        Ok(Some(v)) => T::decode(v.as_slice())
            .map(Some)
            .map_err(|e| PbError::new(ErrorCode::Storage, format!("corrupt map record: {e}"))),
        Ok(None) => Ok(None),
        Err(e) => Err(PbError::new(ErrorCode::Storage, e.to_string())),
    }
}

fn node_record(store: &StoreHandle, id: u64) -> Result<Option<NodeRecord>, PbError> {
    get_record(store, &crate::keys::map_node(META_GROUP_ID, id))
}

/// Proposes a map command; Ok(epoch) once applied.
async fn propose(store: &StoreHandle, cmd: Cmd) -> Result<u64, PbError> {
    let cmd = Command { cmd: Some(cmd) };
    match store.propose(META_GROUP_ID, &cmd).await {
        Ok(Ok(ApplyOutput::MapEpoch(e))) => Ok(e),
        Ok(Ok(_)) => Ok(0),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(store_error(store, e)),
    }
}

/// The map read linearizably from the local meta replica, else the last
/// copy this node has.
pub async fn get_map(store: &StoreHandle) -> ClusterMapResponse {
    if let Some(m) = crate::map_sync::read_local(store).await {
        crate::map_sync::take_map(store, &m);
        return ClusterMapResponse {
            error: None,
            map: Some(m),
        };
    }
    match store.book.map() {
        Some(m) => ClusterMapResponse {
            error: None,
            map: Some((*m).clone()),
        },
        None => ClusterMapResponse {
            error: Some(PbError::new(
                ErrorCode::Unavailable,
                "this node has no copy of the cluster map yet",
            )),
            map: None,
        },
    }
}

async fn read_leader_map(store: &StoreHandle) -> Result<ClusterMap, PbError> {
    let engine = store.engine.clone();
    tokio::task::spawn_blocking(move || crate::cluster_map::read(&engine))
        .await
        .map_err(|e| PbError::new(ErrorCode::Unavailable, e.to_string()))?
        .map_err(|e| PbError::new(ErrorCode::Storage, e.to_string()))
}

fn epoch_now(store: &StoreHandle) -> u64 {
    match store.engine.get_kv(&crate::keys::map_epoch(META_GROUP_ID)) {
        Ok(Some(v)) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            u64::from_be_bytes(b)
        }
        _ => 0,
    }
}

/// A node reports in (meta leader only).
pub async fn heartbeat(
    store: &StoreHandle,
    reports: &Reports,
    hb: NodeHeartbeat,
) -> HeartbeatResponse {
    match handle_heartbeat(store, reports, hb).await {
        Ok(epoch) => HeartbeatResponse {
            error: None,
            map_epoch: epoch,
        },
        Err(e) => HeartbeatResponse {
            error: Some(e),
            map_epoch: 0,
        },
    }
}

async fn handle_heartbeat(
    store: &StoreHandle,
    reports: &Reports,
    hb: NodeHeartbeat,
) -> Result<u64, PbError> {
    check_meta_leader(store)?;
    if hb.led.len() > 8192 || hb.hosted.len() > 8192 {
        return Err(invalid("heartbeat lists too many groups"));
    }
    let Some(mut rec) = node_record(store, hb.node_id)? else {
        return Err(invalid(format!(
            "node {} is not a member of the cluster: join it first",
            hb.node_id
        )));
    };
    if rec.state == NodeState::Removed as i32 {
        return Err(invalid(format!(
            "node {} was removed from the cluster",
            hb.node_id
        )));
    }
    if !rec.store_uuid.is_empty() && rec.store_uuid != hb.store_uuid {
        return Err(invalid(format!(
            "node {}'s data directory is not the one the cluster knows (a wiped or replaced disk?): remove node {} (raftblk node remove {}) and join under a new id",
            hb.node_id, hb.node_id, hb.node_id
        )));
    }
    reports.record(&hb, Instant::now(), store.config.cluster.data_groups);
    // The node's own facts, and its return from down, or from out when
    // the driver (not an operator) marked it out.
    let back = rec.state == NodeState::Down as i32
        || (rec.state == NodeState::Out as i32 && !rec.out_by_admin);
    if rec.store_uuid.is_empty() || rec.addr != hb.addr || back {
        if hb.addr.parse::<SocketAddr>().is_err() {
            return Err(invalid(format!("address `{}` is not host:port", hb.addr)));
        }
        let expect_state = rec.state;
        rec.store_uuid = hb.store_uuid.clone();
        rec.addr = hb.addr.clone();
        if back {
            tracing::info!(node = hb.node_id, "node is back up");
            rec.state = NodeState::Up as i32;
            rec.state_since_unix_ms = now_unix_ms();
        }
        match propose(
            store,
            Cmd::SetNode(SetNodeCmd {
                node: Some(rec),
                create: false,
                expect_state,
            }),
        )
        .await
        {
            // Changed meanwhile: the next heartbeat tries again.
            Err(e) if e.kind() == ErrorCode::Unavailable => {}
            r => {
                r?;
            }
        }
    }
    // Groups whose configuration moved on since the map last heard.
    let mut newer = Vec::new();
    for g in &hb.led {
        let stored: Option<GroupRecord> =
            get_record(store, &crate::keys::map_group(META_GROUP_ID, g.group_id))?;
        if g.group_id <= store.config.cluster.data_groups
            && stored.is_none_or(|s| g.conf_ver > s.conf_ver)
        {
            newer.push(GroupRecord {
                group_id: g.group_id,
                voters: g.replicas.clone(),
                learners: g.learners.clone(),
                voters_outgoing: g.voters_outgoing.clone(),
                conf_ver: g.conf_ver,
            });
        }
    }
    if !newer.is_empty() {
        propose(store, Cmd::SetGroups(SetGroupsCmd { groups: newer })).await?;
    }
    Ok(epoch_now(store))
}

/// A node asks to join (meta leader only); also `raftblk node add`, which
/// registers a node before it first starts (no uuid yet).
pub async fn join(
    store: &StoreHandle,
    lock: &tokio::sync::Mutex<()>,
    req: JoinRequest,
) -> JoinResponse {
    match handle_join(store, lock, req).await {
        Ok((node_id, map)) => JoinResponse {
            error: None,
            node_id,
            map: Some(map),
        },
        Err(e) => JoinResponse {
            error: Some(e),
            node_id: 0,
            map: None,
        },
    }
}

async fn handle_join(
    store: &StoreHandle,
    lock: &tokio::sync::Mutex<()>,
    req: JoinRequest,
) -> Result<(u64, ClusterMap), PbError> {
    check_meta_leader(store)?;
    if req.addr.parse::<SocketAddr>().is_err() {
        return Err(invalid(format!("address `{}` is not host:port", req.addr)));
    }
    if !req.store_uuid.is_empty() && req.store_uuid.len() != 16 {
        return Err(invalid("store uuid must be 16 bytes"));
    }
    if req.weight > 1_000_000 || req.failure_domain.len() > 128 {
        return Err(invalid(
            "weight above 1000000 or failure domain longer than 128 bytes",
        ));
    }
    // One join at a time, so two new nodes never get the same id.
    let _guard = lock.lock().await;
    let map = read_leader_map(store).await?;
    if map.nodes.len() >= crate::cluster_map::NODES_MAX {
        return Err(invalid("the cluster has as many nodes as it may"));
    }
    let id = if req.node_id == 0 {
        map.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1
    } else {
        req.node_id
    };
    if id > crate::membership::NODE_ID_MAX {
        return Err(invalid(format!(
            "node id {id} is above {}",
            crate::membership::NODE_ID_MAX
        )));
    }
    if let Some(clash) = map
        .nodes
        .iter()
        .find(|n| n.id != id && n.addr == req.addr && n.state != NodeState::Removed as i32)
    {
        return Err(invalid(format!(
            "address {} belongs to node {}",
            req.addr, clash.id
        )));
    }
    let existing = map.nodes.iter().find(|n| n.id == id).cloned();
    let mut rec = match existing {
        Some(n) if n.state == NodeState::Removed as i32 => NodeRecord {
            // A removed id may be reused: its replicas are all gone.
            id,
            ..Default::default()
        },
        Some(n) if n.store_uuid.is_empty() || n.store_uuid == req.store_uuid => n,
        Some(_) if req.store_uuid.is_empty() => {
            return Err(invalid(format!("node id {id} is in use")));
        }
        Some(_) => {
            return Err(invalid(format!(
                "node id {id} is in use by another data directory (a wiped or replaced disk?): remove node {id} (raftblk node remove {id}) and join under a new id"
            )));
        }
        None => NodeRecord {
            id,
            ..Default::default()
        },
    };
    let create = map.nodes.iter().all(|n| n.id != id);
    rec.addr = req.addr.clone();
    if rec.state == NodeState::Unspecified as i32 {
        rec.state = NodeState::Up as i32;
        rec.state_since_unix_ms = now_unix_ms();
        rec.weight = if req.weight == 0 {
            WEIGHT_DEFAULT
        } else {
            req.weight
        };
        rec.failure_domain = req.failure_domain.clone();
    }
    if !req.store_uuid.is_empty() {
        rec.store_uuid = req.store_uuid.clone();
    }
    tracing::info!(node = id, addr = %req.addr, "node joins the cluster");
    propose(
        store,
        Cmd::SetNode(SetNodeCmd {
            node: Some(rec),
            create,
            expect_state: 0,
        }),
    )
    .await?;
    Ok((id, read_leader_map(store).await?))
}

/// Admin change of one node: state and weight (meta leader only).
pub async fn set_node(store: &StoreHandle, req: SetNodeRequest) -> MapChangeResponse {
    let r = async {
        check_meta_leader(store)?;
        let mut rec = node_record(store, req.node_id)?
            .ok_or_else(|| invalid(format!("no node {}", req.node_id)))?;
        if req.state != NodeState::Unspecified as i32 {
            let state = NodeState::try_from(req.state)
                .map_err(|_| invalid(format!("unknown node state {}", req.state)))?;
            if state == NodeState::Removed {
                let map = read_leader_map(store).await?;
                let holds: Vec<u64> = map
                    .groups
                    .iter()
                    .filter(|g| {
                        g.voters.contains(&req.node_id)
                            || g.learners.contains(&req.node_id)
                            || g.voters_outgoing.contains(&req.node_id)
                    })
                    .map(|g| g.group_id)
                    .collect();
                if !holds.is_empty() {
                    return Err(invalid(format!(
                        "node {} still holds replicas of groups {holds:?}: drain it first (raftblk node drain {})",
                        req.node_id, req.node_id
                    )));
                }
            }
            if rec.state != state as i32 {
                rec.state = state as i32;
                rec.state_since_unix_ms = now_unix_ms();
            }
            rec.out_by_admin = state == NodeState::Out;
        }
        if req.set_weight {
            if req.weight > 1_000_000 {
                return Err(invalid("weight must be at most 1000000"));
            }
            rec.weight = req.weight;
        }
        propose(
            store,
            Cmd::SetNode(SetNodeCmd {
                node: Some(rec),
                create: false,
                expect_state: 0,
            }),
        )
        .await?;
        read_leader_map(store).await
    }
    .await;
    match r {
        Ok(map) => MapChangeResponse {
            error: None,
            map: Some(map),
        },
        Err(e) => MapChangeResponse {
            error: Some(e),
            map: None,
        },
    }
}

/// Sets the cluster flags (meta leader only).
pub async fn set_flags(store: &StoreHandle, req: SetFlagsRequest) -> MapChangeResponse {
    let r = async {
        check_meta_leader(store)?;
        propose(
            store,
            Cmd::SetFlags(SetFlagsCmd {
                flags: Some(req.flags.unwrap_or_default()),
            }),
        )
        .await?;
        read_leader_map(store).await
    }
    .await;
    match r {
        Ok(map) => MapChangeResponse {
            error: None,
            map: Some(map),
        },
        Err(e) => MapChangeResponse {
            error: Some(e),
            map: None,
        },
    }
}
