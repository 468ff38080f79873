//! The Cluster service: this node's view of the cluster (members, hosted
//! groups with leader, term and indexes, counters) and per-group digests
//! for comparing replicas, and what each volume stores in the groups this
//! node leads (counted by `crate::usage`).

use std::sync::atomic::Ordering;

use raftblk_proto::cluster_server::Cluster;
use raftblk_proto::{
    ChangePeersRequest, ChangePeersResponse, ClusterMapResponse, HeartbeatResponse, JoinRequest,
    JoinResponse, MapChangeResponse, NodeHeartbeat, PeerChangeKind, PeerHealth, PeerProgress,
    RepairBlockRequest, SetFlagsRequest, SetNodeRequest,
};
use raftblk_proto::{
    Empty, Error as PbError, ErrorCode, GroupDigestRequest, GroupDigestResponse, GroupStatus,
    NodeInfo, NodeStatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use raftblk_proto::{GroupUsage, VolumeBlocks, VolumeUsageRequest, VolumeUsageResponse};
use tonic::{Request, Response, Status};

use super::store_error;
use crate::keys;
use crate::store::StoreHandle;

pub struct ClusterService {
    pub store: StoreHandle,
    /// Heartbeats received while leading the meta group.
    pub reports: std::sync::Arc<crate::placement::reports::Reports>,
    /// The placement driver's last view (meta leader).
    pub placement: std::sync::Arc<crate::placement::driver::DriverStatus>,
    /// Joins run one at a time (see `map::join`).
    pub join_lock: tokio::sync::Mutex<()>,
    /// Usage counts run one at a time: each may scan every block key here.
    /// The permit moves into the blocking scan, so a caller that goes away
    /// does not free the slot before the scan ends.
    pub usage_slot: std::sync::Arc<tokio::sync::Semaphore>,
    /// The group the next usage count starts from: a count that ran out
    /// of time leaves it at the first group not counted, so repeated
    /// counts on a node too large for one cover every group in turn.
    pub usage_cursor: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Volumes one usage request may name.
const USAGE_VOLUMES_MAX: usize = 4096;
/// How long a usage request waits for the one running before it.
const USAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long one usage count may scan; groups not finished by then are left
/// out of the answer. Below the client's 15 s per node.
const USAGE_BUDGET: std::time::Duration = std::time::Duration::from_secs(8);

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(&self, _req: Request<Empty>) -> Result<Response<NodeStatusResponse>, Status> {
        let cfg = &self.store.config;
        let c = &self.store.counters;
        let now = std::time::Instant::now();
        let groups = self
            .store
            .views()
            .into_iter()
            .map(|v| GroupStatus {
                group_id: v.group,
                replicas: v.members.voters.clone(),
                conf_ver: v.members.conf_ver,
                hibernating: v.hibernating,
                learners: v.members.learners.clone(),
                voters_outgoing: v.members.voters_outgoing.clone(),
                progress: v
                    .progress
                    .iter()
                    .map(|&(node_id, matched, state)| PeerProgress {
                        node_id,
                        matched,
                        state: state.to_owned(),
                    })
                    .collect(),
                leader_id: v.leader_id,
                term: v.term,
                commit_index: v.commit_index,
                applied_index: v.applied_index,
                first_index: v.first_index,
                last_index: v.last_index,
                role: v.role.to_string(),
                lease_remaining_ms: v
                    .lease_until
                    .filter(|_| v.role == "leader" && !v.transferring)
                    .map(|u| u.saturating_duration_since(now).as_millis() as u64)
                    .unwrap_or(0),
            })
            .collect();
        Ok(Response::new(NodeStatusResponse {
            node_id: cfg.node_id,
            nodes: self
                .store
                .book
                .nodes()
                .into_iter()
                .map(|(id, addr)| NodeInfo { id, addr })
                .collect(),
            data_group_count: cfg.cluster.data_groups,
            replicas: cfg.cluster.replicas,
            chunk_size_bytes: cfg.cluster.chunk_size_bytes,
            groups,
            checksum_errors: c.checksum_errors.load(Ordering::Relaxed),
            snapshots_sent: c.snapshots_sent.load(Ordering::Relaxed),
            snapshots_applied: c.snapshots_applied.load(Ordering::Relaxed),
            blocks_repaired: c.blocks_repaired.load(Ordering::Relaxed),
            placement: Some(self.placement.get()),
            metrics_addr: crate::metrics::BOUND_ADDR
                .get()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            peers: self
                .store
                .book
                .nodes()
                .into_iter()
                .filter(|(id, _)| *id != cfg.node_id)
                .map(|(id, _)| {
                    let silent = self.store.liveness.silent_for(id);
                    PeerHealth {
                        node_id: id,
                        heard: silent.is_some(),
                        silent_ms: silent.map(|d| d.as_millis() as u64).unwrap_or(0),
                    }
                })
                .collect(),
        }))
    }

    async fn get_map(&self, _req: Request<Empty>) -> Result<Response<ClusterMapResponse>, Status> {
        Ok(Response::new(super::map::get_map(&self.store).await))
    }

    async fn heartbeat(
        &self,
        req: Request<NodeHeartbeat>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        if let Some(p) = req.extensions().get::<raftblk_tls::PeerInfo>() {
            p.speaks_for(req.get_ref().node_id)?;
        }
        Ok(Response::new(
            super::map::heartbeat(&self.store, &self.reports, req.into_inner()).await,
        ))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // A node joins as itself (an operator's `admin` certificate may
        // register any node): one node's key cannot take over another's
        // record and address.
        if let Some(p) = req.extensions().get::<raftblk_tls::PeerInfo>() {
            if p.role == Some(raftblk_tls::Role::Node) {
                p.speaks_for(req.get_ref().node_id)?;
            }
        }
        Ok(Response::new(
            super::map::join(&self.store, &self.join_lock, req.into_inner()).await,
        ))
    }

    async fn set_node(
        &self,
        req: Request<SetNodeRequest>,
    ) -> Result<Response<MapChangeResponse>, Status> {
        Ok(Response::new(
            super::map::set_node(&self.store, req.into_inner()).await,
        ))
    }

    async fn set_flags(
        &self,
        req: Request<SetFlagsRequest>,
    ) -> Result<Response<MapChangeResponse>, Status> {
        Ok(Response::new(
            super::map::set_flags(&self.store, req.into_inner()).await,
        ))
    }

    async fn change_peers(
        &self,
        req: Request<ChangePeersRequest>,
    ) -> Result<Response<ChangePeersResponse>, Status> {
        use crate::membership::PeerChange;
        let r = req.into_inner();
        let fail = |e| {
            Ok(Response::new(ChangePeersResponse {
                error: Some(e),
                ..Default::default()
            }))
        };
        if r.changes.len() > 8 {
            return fail(PbError::new(
                ErrorCode::InvalidArgument,
                "at most 8 changes in one step",
            ));
        }
        let mut changes = Vec::with_capacity(r.changes.len());
        for c in &r.changes {
            changes.push(match PeerChangeKind::try_from(c.kind) {
                Ok(PeerChangeKind::AddLearner) => PeerChange::AddLearner(c.node_id),
                Ok(PeerChangeKind::AddVoter) => PeerChange::AddVoter(c.node_id),
                Ok(PeerChangeKind::Remove) => PeerChange::Remove(c.node_id),
                _ => {
                    return fail(PbError::new(
                        ErrorCode::InvalidArgument,
                        format!("unknown peer change kind {}", c.kind),
                    ))
                }
            });
        }
        for c in &changes {
            // A removed node may still have to be dropped from a group.
            if !matches!(c, PeerChange::Remove(_)) && self.store.book.addr(c.node()).is_none() {
                return fail(PbError::new(
                    ErrorCode::InvalidArgument,
                    format!("node {} is not a cluster member", c.node()),
                ));
            }
        }
        match self
            .store
            .change_peers(r.group_id, changes, r.conf_ver)
            .await
        {
            Ok(Ok(crate::apply::ApplyOutput::Membership(m))) => {
                Ok(Response::new(ChangePeersResponse {
                    error: None,
                    conf_ver: m.conf_ver,
                    voters: m.voters.clone(),
                    learners: m.learners.clone(),
                    voters_outgoing: m.voters_outgoing.clone(),
                }))
            }
            Ok(Ok(_)) => fail(PbError::new(
                ErrorCode::Unavailable,
                "the change did not apply as a membership change",
            )),
            Ok(Err(e)) => fail(e),
            Err(e) => fail(store_error(&self.store, e)),
        }
    }

    async fn group_digest(
        &self,
        req: Request<GroupDigestRequest>,
    ) -> Result<Response<GroupDigestResponse>, Status> {
        let group = req.into_inner().group_id;
        let (snap, applied) = match self.store.digest_snapshot(group).await {
            Ok(s) => s,
            Err(e) => {
                return Ok(Response::new(GroupDigestResponse {
                    error: Some(store_error(&self.store, e)),
                    ..Default::default()
                }))
            }
        };
        let engine = self.store.engine.clone();
        let res = tokio::task::spawn_blocking(move || {
            let (start, end) = keys::group_range(group);
            let mut h = crc32fast::Hasher::new();
            let mut h2 = crc32fast::Hasher::new_with_initial(0x5a5a_5a5a);
            let mut n = 0u64;
            let mut blocks = 0u64;
            let mut kept = 0u64;
            snap.scan_kv(&engine, &start, &end, |k, v| {
                if keys::is_applied_request(group, k) {
                    return true;
                }
                if keys::parse_block(group, k).is_some() {
                    blocks += 1;
                }
                if keys::parse_snap_block(group, k).is_some() && !v.is_empty() {
                    kept += 1;
                }
                for x in [k, v] {
                    h.update(&(x.len() as u32).to_le_bytes());
                    h.update(x);
                    h2.update(x);
                }
                n += 1;
                true
            })
            .map(|_| {
                (
                    n,
                    blocks,
                    kept,
                    (u64::from(h.finalize()) << 32) | u64::from(h2.finalize()),
                )
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match res {
            Ok((kv_count, block_count, snapshot_block_count, digest)) => GroupDigestResponse {
                error: None,
                applied_index: applied,
                kv_count,
                digest,
                block_count,
                snapshot_block_count,
            },
            Err(e) => GroupDigestResponse {
                error: Some(PbError::new(ErrorCode::Storage, e.to_string())),
                ..Default::default()
            },
        }))
    }

    async fn volume_usage(
        &self,
        req: Request<VolumeUsageRequest>,
    ) -> Result<Response<VolumeUsageResponse>, Status> {
        let fail = |e: PbError| {
            Ok(Response::new(VolumeUsageResponse {
                error: Some(e),
                groups: Vec::new(),
            }))
        };
        let r = req.into_inner();
        let (mut volumes, mut whiteouts) = (r.volume_ids, r.whiteout_volume_ids);
        if volumes.len() > USAGE_VOLUMES_MAX || whiteouts.len() > USAGE_VOLUMES_MAX {
            return fail(PbError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "{} volumes and {} with whiteouts named; at most {USAGE_VOLUMES_MAX} of each per request (no volumes: every volume)",
                    volumes.len(),
                    whiteouts.len()
                ),
            ));
        }
        for ids in [&mut volumes, &mut whiteouts] {
            ids.sort_unstable();
            ids.dedup();
        }
        let permit =
            match tokio::time::timeout(USAGE_WAIT, self.usage_slot.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) | Err(_) => {
                    return fail(PbError::new(
                        ErrorCode::Unavailable,
                        "another usage count is running on this node; try again",
                    ))
                }
            };
        let mut led: Vec<(u64, u64)> = self
            .store
            .views()
            .into_iter()
            .filter(|v| v.role == "leader")
            .map(|v| (v.group, v.term))
            .collect();
        led.sort_unstable();
        // Start where the last count that ran out of time stopped.
        let cursor = self.usage_cursor.clone();
        let from = cursor.load(Ordering::Relaxed);
        let start = led.partition_point(|&(g, _)| g < from);
        led.rotate_left(start);
        let engine = self.store.engine.clone();
        let res = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let deadline = std::time::Instant::now() + USAGE_BUDGET;
            let mut groups = Vec::with_capacity(led.len());
            for (group, term) in led {
                let mut counts = crate::usage::VolumeCounts::new();
                if !crate::usage::count_group(
                    &engine,
                    group,
                    &volumes,
                    &whiteouts,
                    deadline,
                    &mut counts,
                )? {
                    cursor.store(group, Ordering::Relaxed);
                    tracing::warn!(
                        group,
                        counted = groups.len(),
                        budget_ms = USAGE_BUDGET.as_millis() as u64,
                        "volume usage count ran out of time; the groups from this one on are left out (the next count starts here)"
                    );
                    break;
                }
                groups.push(GroupUsage {
                    group_id: group,
                    term,
                    volumes: counts
                        .into_iter()
                        .map(|(volume_id, (blocks, snapshot_blocks))| VolumeBlocks {
                            volume_id,
                            blocks,
                            snapshot_blocks,
                        })
                        .collect(),
                });
            }
            Ok::<_, crate::engine::EngineError>(groups)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        match res {
            Ok(groups) => Ok(Response::new(VolumeUsageResponse {
                error: None,
                groups,
            })),
            Err(e) => fail(PbError::new(ErrorCode::Storage, e.to_string())),
        }
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = req.into_inner();
        let error = match self.store.view(r.group_id) {
            None => Some(PbError::new(
                ErrorCode::WrongGroup,
                format!("group {} is not hosted here", r.group_id),
            )),
            Some(v) if v.role != "leader" => Some(store_error(
                &self.store,
                crate::store::StoreError::NotLeader {
                    group: r.group_id,
                    leader: (v.leader_id != 0).then_some(v.leader_id),
                },
            )),
            Some(v) if r.to_node != 0 && !v.members.voters.contains(&r.to_node) => {
                Some(PbError::new(
                    ErrorCode::InvalidArgument,
                    format!("node {} is not a voter of group {}", r.to_node, r.group_id),
                ))
            }
            Some(_) => {
                self.store
                    .request_transfer_leader(r.group_id, (r.to_node != 0).then_some(r.to_node));
                None
            }
        };
        Ok(Response::new(TransferLeaderResponse { error }))
    }

    async fn repair_block(
        &self,
        req: Request<RepairBlockRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let r = req.into_inner();
        let fail = |e| Ok(Response::new(TransferLeaderResponse { error: Some(e) }));
        match self.store.view(r.group_id) {
            None => {
                return fail(PbError::new(
                    ErrorCode::WrongGroup,
                    format!("group {} is not hosted here", r.group_id),
                ))
            }
            Some(v) if v.role != "leader" => {
                return fail(store_error(
                    &self.store,
                    crate::store::StoreError::NotLeader {
                        group: r.group_id,
                        leader: (v.leader_id != 0).then_some(v.leader_id),
                    },
                ))
            }
            Some(_) => {}
        }
        // Planned and proposed on the store thread, tied to a log position
        // (see `repair`).
        let error = match self.store.repair(r.group_id, r.volume_id, r.block).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                if e.kind() == ErrorCode::Corrupted {
                    self.store.note_corrupt(r.group_id, r.volume_id, r.block);
                }
                Some(e)
            }
            Err(e) => Some(store_error(&self.store, e)),
        };
        Ok(Response::new(TransferLeaderResponse { error }))
    }
}
