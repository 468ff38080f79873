//! Space of a replica that moved away returns to its old node (issue 15
//! item 7). Block payloads live in RocksDB blob files shared by every
//! group of the node, so deleting a group's keys frees nothing by itself:
//! its blobs sit in files next to other groups' live blocks.
//!
//! Two groups on 4 nodes; group A gets `RAFTBLK_RECLAIM_MIB` (default
//! 256) MiB and group B a quarter of that, written interleaved so that the
//! blob files mix both. A replica of A moves away from a node that keeps
//! its replica of B; that node's blob files (where block payloads live)
//! must shrink to about B's size within a bounded time, and B reads back
//! intact.

use std::path::Path;
use std::time::{Duration, Instant};

use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::placement::chunk_group;

const HEALTHY: Duration = Duration::from_secs(30);
const MOVE: Duration = Duration::from_secs(120);
/// How long the freed space may take to come back.
const RECLAIM: Duration = Duration::from_secs(120);
const CHUNK_BYTES: u64 = 4 << 20;
const WRITE_BYTES: u64 = 1 << 20;
const DATA_GROUPS: u64 = 2;
/// Room above group B's bytes the node's blob files may keep. The SST
/// files (keys, the raft log) and the WAL are printed, not bounded here:
/// their size follows the memtables, not the data stored.
const SLACK_BYTES: u64 = 16 << 20;

fn group_a_bytes() -> u64 {
    std::env::var("RAFTBLK_RECLAIM_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&m| (64..=8192).contains(&m))
        .unwrap_or(256)
        << 20
}

/// Bytes of the RocksDB files under a node's data dir, by kind: blob,
/// SST, WAL and the rest.
fn db_files(dir: &Path) -> [u64; 4] {
    let mut by_kind = [0u64; 4];
    let Ok(rd) = std::fs::read_dir(dir.join("db")) else {
        return by_kind;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if !m.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let kind = if name.ends_with(".blob") {
            0
        } else if name.ends_with(".sst") {
            1
        } else if name.ends_with(".log") {
            2
        } else {
            3
        };
        by_kind[kind] += m.len();
    }
    by_kind
}

fn blob_bytes(dir: &Path) -> u64 {
    db_files(dir)[0]
}

fn mib(v: [u64; 4]) -> String {
    format!(
        "blob {} MiB, sst {} MiB, wal {} MiB, other {} MiB",
        v[0] >> 20,
        v[1] >> 20,
        v[2] >> 20,
        v[3] >> 20
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_away_replica_gives_its_space_back() -> anyhow::Result<()> {
    let a_bytes = group_a_bytes();
    let b_bytes = a_bytes / 4;
    let spec = ClusterSpec {
        nodes: 4,
        data_groups: DATA_GROUPS,
        chunk_size_bytes: CHUNK_BYTES,
        log_compact_threshold_entries: 64,
        log_retain_entries: 16,
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
    let chunks_max = 4 * (a_bytes + b_bytes) / CHUNK_BYTES + 64;
    client.create_volume("v", chunks_max * CHUNK_BYTES).await?;
    let vol = client.open_volume("v").await?;
    let vid = vol.info().id;
    let group_a = chunk_group(vid, 0, DATA_GROUPS);
    // Data groups are numbered 1..=DATA_GROUPS.
    let group_b = DATA_GROUPS + 1 - group_a;
    let chunks_of = |g: u64, bytes: u64| -> Vec<u64> {
        (0..chunks_max)
            .filter(|&k| chunk_group(vid, k, DATA_GROUPS) == g)
            .take(bytes.div_ceil(CHUNK_BYTES) as usize)
            .collect()
    };
    let a_chunks = chunks_of(group_a, a_bytes);
    let b_chunks = chunks_of(group_b, b_bytes);
    anyhow::ensure!(
        a_chunks.len() as u64 * CHUNK_BYTES >= a_bytes
            && b_chunks.len() as u64 * CHUNK_BYTES >= b_bytes,
        "not enough chunks for groups {group_a} and {group_b}"
    );
    // Offsets of every 1 MiB write, A's and B's interleaved (four of A,
    // then one of B), so that every flush puts both groups in a blob file.
    let offsets = |chunks: &[u64]| -> Vec<u64> {
        chunks
            .iter()
            .flat_map(|k| {
                (0..CHUNK_BYTES / WRITE_BYTES).map(move |j| k * CHUNK_BYTES + j * WRITE_BYTES)
            })
            .collect()
    };
    let (a_off, b_off) = (offsets(&a_chunks), offsets(&b_chunks));
    let started = Instant::now();
    let mut b_iter = b_off.iter();
    for (i, &off) in a_off.iter().enumerate() {
        vol.write(off, &payload(off, WRITE_BYTES as usize)).await?;
        if i % 4 == 3 {
            if let Some(&ob) = b_iter.next() {
                vol.write(ob, &payload(ob, WRITE_BYTES as usize)).await?;
            }
        }
    }
    for &ob in b_iter {
        vol.write(ob, &payload(ob, WRITE_BYTES as usize)).await?;
    }
    println!(
        "wrote {} MiB to group {group_a} and {} MiB to group {group_b} in {:.1} s",
        a_bytes >> 20,
        b_bytes >> 20,
        started.elapsed().as_secs_f64()
    );

    let members_a = c.members_of(group_a).await;
    let members_b = c.members_of(group_b).await;
    let leader_a = c
        .leader_of(group_a)
        .await
        .ok_or_else(|| anyhow::anyhow!("group {group_a} has no leader"))? as u64;
    let from = members_a
        .iter()
        .copied()
        .find(|m| *m != leader_a && members_b.contains(m))
        .ok_or_else(|| anyhow::anyhow!("no follower of {group_a} that hosts {group_b}"))?;
    let to = (1..=4u64)
        .find(|n| !members_a.contains(n))
        .ok_or_else(|| anyhow::anyhow!("every node hosts group {group_a}"))?;
    let before = blob_bytes(&c.data_dir(from as usize));
    println!(
        "node {from} before: {}",
        mib(db_files(&c.data_dir(from as usize)))
    );
    c.move_replica(group_a, from, to, MOVE).await?;
    let moved = Instant::now();
    let bound = b_bytes + SLACK_BYTES;
    let after = loop {
        let now = blob_bytes(&c.data_dir(from as usize));
        if now <= bound || moved.elapsed() >= RECLAIM {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "node {from}: blob files {} MiB before moving {} MiB of group {group_a} away, \
         {} MiB {:.1} s after (group {group_b} holds {} MiB there)",
        before >> 20,
        a_bytes >> 20,
        after >> 20,
        moved.elapsed().as_secs_f64(),
        b_bytes >> 20
    );
    println!(
        "node {from} after: {}",
        mib(db_files(&c.data_dir(from as usize)))
    );
    assert!(
        after <= bound,
        "node {from}'s blob files still hold {} MiB {RECLAIM:?} after group {group_a} moved away \
         (bound: group {group_b}'s {} MiB + {} MiB)",
        after >> 20,
        b_bytes >> 20,
        SLACK_BYTES >> 20
    );
    // What stayed is intact: group B reads back through node `from`.
    c.transfer_leader(group_b, from as usize, HEALTHY).await?;
    for &ob in &b_off {
        let got = vol.read(ob, WRITE_BYTES).await?;
        assert!(
            got == payload(ob, WRITE_BYTES as usize),
            "group {group_b} block at {ob} differs after the reclamation"
        );
    }
    Ok(())
}
