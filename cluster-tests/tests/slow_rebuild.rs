//! A group whose snapshot takes longer than any fixed transfer deadline
//! still gets its new replica (issue 15 item 4). Snapshot transfers are
//! bounded by progress (`placement.snapshot_stall_secs`: nothing sent for
//! that long), not by their total time.
//!
//! A group of 4 nodes holds 12 MiB of data (its log compacted, so a new
//! replica needs a snapshot); the rebuild throttle is 1 MiB/s and the
//! stall bound 2 s, so the snapshot takes about 12 s, six times the bound.
//! One of its replicas moves to the fourth node; the move finishes, the
//! new replica leads, and every byte reads back through it.

use std::time::{Duration, Instant};

use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::placement::chunk_group;

const HEALTHY: Duration = Duration::from_secs(30);
/// The move, snapshot included (about 12 s at the throttle).
const MOVE: Duration = Duration::from_secs(90);
const CHUNK_BYTES: u64 = 1 << 20;
const DATA_GROUPS: u64 = 2;
const GROUP_BYTES: u64 = 12 << 20;
const THROTTLE_BYTES_PER_SEC: u64 = 1 << 20;
const STALL_SECS: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_longer_than_the_stall_bound_completes() -> anyhow::Result<()> {
    let spec = ClusterSpec {
        nodes: 4,
        data_groups: DATA_GROUPS,
        chunk_size_bytes: CHUNK_BYTES,
        log_compact_threshold_entries: 16,
        log_retain_entries: 4,
        snapshot_bytes_per_sec: Some(THROTTLE_BYTES_PER_SEC),
        snapshot_stall_secs: Some(STALL_SECS),
        ..ClusterSpec::default()
    };
    let c = LocalCluster::start(spec)?;
    c.wait_healthy(HEALTHY).await?;
    c.client()
        .await?
        .set_flags(raftblk_proto::ClusterFlags {
            norecover: true,
            norebalance: true,
            noout: false,
        })
        .await?;
    let client = c.client().await?;
    client.create_volume("v", 64 << 20).await?;
    let vol = client.open_volume("v").await?;
    let vid = vol.info().id;
    let group = chunk_group(vid, 0, DATA_GROUPS);
    let chunks: Vec<u64> = (0..64)
        .filter(|&k| chunk_group(vid, k, DATA_GROUPS) == group)
        .take((GROUP_BYTES / CHUNK_BYTES) as usize)
        .collect();
    anyhow::ensure!(
        chunks.len() as u64 * CHUNK_BYTES >= GROUP_BYTES,
        "not enough chunks in group {group}"
    );
    for &k in &chunks {
        vol.write(k * CHUNK_BYTES, &payload(k, CHUNK_BYTES as usize))
            .await?;
    }
    let members = c.members_of(group).await;
    let leader = c
        .leader_of(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))? as u64;
    let to = (1..=4u64)
        .find(|n| !members.contains(n))
        .ok_or_else(|| anyhow::anyhow!("every node hosts group {group}"))?;
    let from = members
        .iter()
        .copied()
        .find(|m| *m != leader)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let started = Instant::now();
    c.move_replica(group, from, to, MOVE).await?;
    let took = started.elapsed();
    println!(
        "group {group}: {} MiB moved to node {to} in {:.1} s (stall bound {STALL_SECS} s)",
        GROUP_BYTES >> 20,
        took.as_secs_f64()
    );
    // The bound was really exceeded: the snapshot was not quick.
    assert!(
        took > Duration::from_secs(2 * STALL_SECS),
        "the snapshot took {took:?}: not longer than the stall bound, the test proves nothing"
    );
    // The new replica holds every byte: it leads and serves the reads.
    c.transfer_leader(group, to as usize, HEALTHY).await?;
    for &k in &chunks {
        let got = vol.read(k * CHUNK_BYTES, CHUNK_BYTES).await?;
        assert!(
            got == payload(k, CHUNK_BYTES as usize),
            "chunk {k} differs after the move"
        );
    }
    Ok(())
}
