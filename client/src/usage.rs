//! What volumes store, for `volume list` and `volume info` (like `rbd du`):
//! every member counts the blocks of the groups it leads
//! (`Cluster.VolumeUsage`), and this sums the answers, one per group (the
//! higher term's when two members both answered as its leader). A group no
//! member answered for (an election under way, a node down, a count out
//! of time) is named, so the caller can say the figure is a lower bound.
//!
//! Figures are logical: one copy of each block, not times the replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::{GroupUsage, VolumeInfo, VolumeUsageRequest, BLOCK_BYTES};

use crate::error::ClientError;
use crate::router::{status_text, Client};

/// How long one member may take to count (its own budget is 8 s).
const NODE_TIMEOUT: Duration = Duration::from_secs(15);
/// Rounds of asking every member while some group has no answer.
const ROUNDS_MAX: u32 = 2;
/// Pause between rounds (an election settles in about a second).
const ROUND_PAUSE: Duration = Duration::from_millis(1500);
/// Clones one request may name (the node's limit).
const NAMED_VOLUMES_MAX: usize = 4096;
/// Volumes one request names, each its own range scan; more are asked as
/// "every volume" (one scan of every block) and filtered here.
const NAMED_VOLUMES_SCAN_MAX: usize = 64;

/// One group's count: the counting leader's term, and per volume id its
/// blocks and kept blocks.
type GroupCount = (u64, BTreeMap<u64, (u64, u64)>);

/// Why a member gave no count.
enum Failure {
    /// This program's certificate may not ask: no other member will differ.
    Denied(String),
    /// The member predates `Cluster.VolumeUsage`.
    Unimplemented,
    Other(String),
}

/// One volume's stored bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Blocks the volume holds now (4 KiB each).
    pub stored_bytes: u64,
    /// Old contents kept for its snapshots.
    pub snapshot_bytes: u64,
}

/// The sum over every group that answered.
#[derive(Debug, Clone, Default)]
pub struct UsageReport {
    /// Per volume id; a volume with nothing stored is absent.
    pub volumes: BTreeMap<u64, VolumeUsage>,
    /// Groups of the cluster map no member counted: the figures leave
    /// their blocks out.
    pub groups_missing: Vec<u64>,
    /// Why members did not answer (`node N: reason`), for the message.
    pub errors: Vec<String>,
}

impl UsageReport {
    /// `volume`'s usage (zero if it stores nothing).
    pub fn of(&self, volume: u64) -> VolumeUsage {
        self.volumes.get(&volume).copied().unwrap_or_default()
    }

    /// Whether every group of the map was counted.
    pub fn complete(&self) -> bool {
        self.groups_missing.is_empty()
    }
}

impl Client {
    /// Stored bytes of `volumes`, summed over the groups' leaders.
    pub async fn volume_usage(&self, volumes: &[VolumeInfo]) -> Result<UsageReport, ClientError> {
        self.refresh_topology().await;
        let topo = self.topology();
        let expected: BTreeSet<u64> = topo.groups.keys().copied().collect();
        let wanted: BTreeSet<u64> = volumes.iter().map(|v| v.id).collect();
        let whiteout_volume_ids: Vec<u64> = volumes
            .iter()
            .filter(|v| v.whiteouts || v.parent.is_some())
            .map(|v| v.id)
            .collect();
        if whiteout_volume_ids.len() > NAMED_VOLUMES_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "{} clones in one count; at most {NAMED_VOLUMES_MAX}",
                whiteout_volume_ids.len()
            )));
        }
        let req = VolumeUsageRequest {
            // Many volumes: one scan of every block, kept for those asked.
            volume_ids: if wanted.len() > NAMED_VOLUMES_SCAN_MAX {
                Vec::new()
            } else {
                wanted.iter().copied().collect()
            },
            whiteout_volume_ids,
        };
        let mut counted: BTreeMap<u64, GroupCount> = BTreeMap::new();
        let mut errors = Vec::new();
        for round in 0..ROUNDS_MAX {
            if round > 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            errors.clear();
            let mut unimplemented = 0;
            let calls = topo.nodes.iter().map(|(&id, addr)| {
                let req = req.clone();
                let ch = self.channel(addr);
                async move {
                    let ch = match ch {
                        Ok(ch) => ch,
                        Err(e) => return (id, Err(Failure::Other(e.to_string()))),
                    };
                    let mut c = ClusterClient::new(ch);
                    let call = c.volume_usage(req);
                    let r = match tokio::time::timeout(NODE_TIMEOUT, call).await {
                        Ok(Ok(r)) => Ok(r.into_inner()),
                        Ok(Err(s))
                            if matches!(
                                s.code(),
                                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                            ) =>
                        {
                            Err(Failure::Denied(s.message().to_owned()))
                        }
                        Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                            Err(Failure::Unimplemented)
                        }
                        Ok(Err(s)) => Err(Failure::Other(status_text(&s))),
                        Err(_) => Err(Failure::Other("timed out".to_owned())),
                    };
                    (id, r)
                }
            });
            for (id, r) in futures::future::join_all(calls).await {
                let resp = match r {
                    Ok(resp) => resp,
                    Err(Failure::Denied(msg)) => {
                        return Err(ClientError::PermissionDenied(format!("node {id}: {msg}")))
                    }
                    Err(Failure::Other(msg)) => {
                        errors.push(format!("node {id}: {msg}"));
                        continue;
                    }
                    Err(Failure::Unimplemented) => {
                        unimplemented += 1;
                        errors.push(format!(
                            "node {id}: does not count stored bytes (an older version)"
                        ));
                        continue;
                    }
                };
                if let Some(e) = resp.error {
                    errors.push(format!("node {id}: {}", e.message));
                    continue;
                }
                for g in resp.groups {
                    take_group(&mut counted, g, &wanted);
                }
            }
            if unimplemented > 0 && unimplemented == topo.nodes.len() {
                return Err(ClientError::InvalidArgument(
                    "no node counts stored bytes: they run an older version".into(),
                ));
            }
            if expected.iter().all(|g| counted.contains_key(g)) {
                break;
            }
        }
        let volumes = sum(&counted);
        Ok(UsageReport {
            volumes,
            groups_missing: expected
                .into_iter()
                .filter(|g| !counted.contains_key(g))
                .collect(),
            errors,
        })
    }
}

/// Takes one member's count of group `g` unless a count from the same or
/// a higher term is already in: a deposed leader that has not heard of its
/// successor answers with its older term, and one group is never summed
/// twice. Only volumes in `wanted` (all when empty) are kept.
fn take_group(counted: &mut BTreeMap<u64, GroupCount>, g: GroupUsage, wanted: &BTreeSet<u64>) {
    if counted.get(&g.group_id).is_some_and(|(t, _)| *t >= g.term) {
        return;
    }
    let vols = g
        .volumes
        .iter()
        .filter(|v| wanted.is_empty() || wanted.contains(&v.volume_id))
        .map(|v| (v.volume_id, (v.blocks, v.snapshot_blocks)))
        .collect();
    counted.insert(g.group_id, (g.term, vols));
}

/// Per volume, the bytes of its blocks and kept blocks over every group.
fn sum(counted: &BTreeMap<u64, GroupCount>) -> BTreeMap<u64, VolumeUsage> {
    let mut volumes: BTreeMap<u64, VolumeUsage> = BTreeMap::new();
    for (_, per_volume) in counted.values() {
        for (&id, &(blocks, kept)) in per_volume {
            let u = volumes.entry(id).or_default();
            u.stored_bytes = u
                .stored_bytes
                .saturating_add(blocks.saturating_mul(BLOCK_BYTES));
            u.snapshot_bytes = u
                .snapshot_bytes
                .saturating_add(kept.saturating_mul(BLOCK_BYTES));
        }
    }
    volumes
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftblk_proto::VolumeBlocks;

    fn group(id: u64, term: u64, vols: &[(u64, u64, u64)]) -> GroupUsage {
        GroupUsage {
            group_id: id,
            term,
            volumes: vols
                .iter()
                .map(|&(volume_id, blocks, snapshot_blocks)| VolumeBlocks {
                    volume_id,
                    blocks,
                    snapshot_blocks,
                })
                .collect(),
        }
    }

    #[test]
    fn each_group_counts_once_from_its_newest_leader() {
        let all = BTreeSet::new();
        for newer_first in [false, true] {
            let mut counted = BTreeMap::new();
            let old = group(1, 3, &[(7, 10, 1)]);
            let new = group(1, 4, &[(7, 12, 2)]);
            let (a, b) = if newer_first { (new, old) } else { (old, new) };
            take_group(&mut counted, a, &all);
            take_group(&mut counted, b, &all);
            // The same term twice (a retry round): still once.
            take_group(&mut counted, group(2, 5, &[(7, 3, 0), (8, 1, 0)]), &all);
            take_group(&mut counted, group(2, 5, &[(7, 3, 0), (8, 1, 0)]), &all);
            let v = sum(&counted);
            assert_eq!(
                v.get(&7),
                Some(&VolumeUsage {
                    stored_bytes: 15 * BLOCK_BYTES,
                    snapshot_bytes: 2 * BLOCK_BYTES
                }),
                "newer_first={newer_first}"
            );
            assert_eq!(v.get(&8).map(|u| u.stored_bytes), Some(BLOCK_BYTES));
        }
    }

    #[test]
    fn only_the_volumes_asked_for_are_kept() {
        let mut counted = BTreeMap::new();
        let wanted: BTreeSet<u64> = [8].into();
        take_group(&mut counted, group(2, 1, &[(7, 3, 0), (8, 1, 0)]), &wanted);
        assert_eq!(sum(&counted).keys().copied().collect::<Vec<_>>(), vec![8]);
    }
}
