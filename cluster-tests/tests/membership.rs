//! Moving a replica by raft membership change, with real processes: add
//! the new replica as a learner (it catches up by snapshot), then one
//! joint-consensus change that promotes it and removes the old one, then
//! leave the joint configuration. Under a recording workload: no failed
//! I/O and no linearizability anomaly; the replicas end identical; the
//! removed replica deletes its data and never comes back, even when its
//! node was down during the move and learns of it only on return. (The
//! placement driver is switched off with the `norecover` flag: these moves
//! are made by hand, step by step.)

use std::time::Duration;

use raftblk_client::Volume;
use raftblk_cluster_tests::workload::{Workload, WorkloadSpec};
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

const HEALTHY: Duration = Duration::from_secs(30);
const STEP: Duration = Duration::from_secs(20);
const GROUP: u64 = 1;

fn spec() -> ClusterSpec {
    ClusterSpec {
        nodes: 4,
        data_groups: 4,
        // Small logs: the learner must be caught up by a snapshot.
        log_compact_threshold_entries: 64,
        log_retain_entries: 8,
        ..ClusterSpec::default()
    }
}

/// Starts the cluster with the placement driver off.
async fn manual_cluster() -> anyhow::Result<LocalCluster> {
    let c = LocalCluster::start(spec())?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    client
        .set_flags(raftblk_proto::ClusterFlags {
            norecover: true,
            norebalance: true,
            noout: false,
        })
        .await?;
    Ok(c)
}

/// A tombstone: the configuration version a replica left at, its peer id.
type Tombstone = (u64, u64);

/// Keys of `group` left in node `i`'s data directory (node stopped):
/// `(state machine keys, raft keys other than the tombstone, tombstone)`.
fn leftovers(
    c: &LocalCluster,
    i: usize,
    group: u64,
) -> anyhow::Result<(usize, usize, Option<Tombstone>)> {
    let engine = raftblk_node::engine::Engine::open(&c.data_dir(i))?;
    let (start, end) = raftblk_node::keys::group_range(group);
    let count = |cf| -> anyhow::Result<usize> {
        let mut n = 0;
        let iter = engine.db().iterator_cf(
            cf,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, _) = item?;
            if k.as_ref() >= end.as_slice() {
                break;
            }
            if k.as_ref() != raftblk_node::keys::tombstone(group).as_slice() {
                n += 1;
            }
        }
        Ok(n)
    };
    let kv = count(engine.kv_cf())?;
    let raft = count(engine.raft_cf())?;
    let tomb = raftblk_node::raft_storage::tombstone(&engine, group, i as u64)?;
    Ok((kv, raft, tomb))
}

/// A voter of `group` that does not lead it.
async fn follower_of(c: &LocalCluster, group: u64) -> anyhow::Result<u64> {
    let (leader, st) = c
        .group_status(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("group {group} has no leader"))?;
    st.replicas
        .iter()
        .copied()
        .find(|r| *r != leader as u64)
        .ok_or_else(|| anyhow::anyhow!("group {group} has no follower"))
}

async fn volumes(c: &LocalCluster, n: usize, bytes: u64) -> anyhow::Result<Vec<Volume>> {
    let client = c.client().await?;
    let mut v = Vec::new();
    for i in 0..n {
        let name = format!("mv{i}");
        client.create_volume(&name, bytes).await?;
        v.push(client.open_volume(&name).await?);
    }
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_a_replica_under_load() -> anyhow::Result<()> {
    let mut c = manual_cluster().await?;
    let blocks = 1024; // 4 MiB per volume: chunks in every group.
    let vols = volumes(&c, 2, blocks * 4096).await?;
    let wspec = WorkloadSpec {
        clients: 4,
        blocks,
        ops_max: 40_000,
        duration_max: Duration::from_secs(90),
    };
    let mut wl = Workload::start(vols.clone(), wspec, 0x6d6f7665);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = follower_of(&c, GROUP).await?;
    let members = c.members_of(GROUP).await;
    let to = (1..=4u64)
        .find(|n| !members.contains(n))
        .ok_or_else(|| anyhow::anyhow!("every node hosts group {GROUP}"))?;
    c.move_replica(GROUP, from, to, STEP).await?;
    c.wait_gone(from as usize, GROUP, STEP).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let summary = wl.stop_and_check(&vols, blocks).await?;
    anyhow::ensure!(summary.acked_writes > 100, "too little load: {summary:?}");
    let (kvs, _) = c.wait_replicas_identical(GROUP, STEP).await?;
    anyhow::ensure!(kvs > 0, "group {GROUP} holds no data");
    // The removed replica's data is gone from its node, and a restart does
    // not bring the replica back.
    c.kill(from as usize);
    let (kv, raft, tomb) = leftovers(&c, from as usize, GROUP)?;
    anyhow::ensure!(
        kv == 0 && raft == 0 && tomb.is_some(),
        "node {from} keeps group {GROUP}: {kv} state-machine keys, {raft} raft keys, tombstone {tomb:?}"
    );
    c.start_node(from as usize)?;
    c.wait_healthy(HEALTHY).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = c.status(from as usize).await?;
    anyhow::ensure!(
        !st.groups.iter().any(|g| g.group_id == GROUP),
        "node {from} hosts group {GROUP} again after a restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_removed_while_its_node_was_down_deletes_itself() -> anyhow::Result<()> {
    let mut c = manual_cluster().await?;
    let vols = volumes(&c, 1, 4 << 20).await?;
    vols[0]
        .write(0, &raftblk_cluster_tests::payload(7, 4 << 20))
        .await?;
    let from = follower_of(&c, GROUP).await?;
    let members = c.members_of(GROUP).await;
    let to = (1..=4u64)
        .find(|n| !members.contains(n))
        .ok_or_else(|| anyhow::anyhow!("every node hosts group {GROUP}"))?;
    c.kill(from as usize);
    // Two of three voters are up: the move goes on without the dead one.
    c.move_replica(GROUP, from, to, STEP).await?;
    vols[0]
        .write(0, &raftblk_cluster_tests::payload(8, 4 << 20))
        .await?;
    c.start_node(from as usize)?;
    // It wakes up believing it is a voter; its peers tell it otherwise.
    c.wait_gone(from as usize, GROUP, STEP).await?;
    c.wait_healthy(HEALTHY).await?;
    let want = raftblk_cluster_tests::payload(8, 4 << 20);
    anyhow::ensure!(
        vols[0].read(0, 4 << 20).await? == want,
        "data after the move"
    );
    c.wait_replicas_identical(GROUP, STEP).await?;
    c.kill(from as usize);
    let (kv, raft, tomb) = leftovers(&c, from as usize, GROUP)?;
    anyhow::ensure!(
        kv == 0 && raft == 0 && tomb.is_some(),
        "node {from} keeps group {GROUP}: {kv} state-machine keys, {raft} raft keys, tombstone {tomb:?}"
    );
    Ok(())
}
