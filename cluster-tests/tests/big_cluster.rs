//! Clusters larger than the meta group (which has at most 5 replicas):
//! nodes 6 and 7 host no meta replica, yet lead data groups and serve
//! block I/O for them (checking requests against their cached volume
//! records, refreshed from the meta group over the network), and purge the
//! blocks of deleted volumes. Exercised through the client library and,
//! on 7 nodes, through `raftblk-vhost` with a real Linux guest.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use raftblk_client::Client;
use raftblk_cluster_tests::guest::{run_guest, sha256_file, VhostDaemon};
use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::placement;

const HEALTHY: Duration = Duration::from_secs(60);

fn spec(nodes: usize) -> ClusterSpec {
    ClusterSpec {
        nodes,
        data_groups: 2 * nodes as u64,
        chunk_size_bytes: 256 * 1024,
        // Few idle resources: this machine runs all nodes at once.
        scrub_blocks_per_sec: 0,
        ..ClusterSpec::default()
    }
}

/// Makes `node` the leader of every data group it replicates; the groups.
async fn lead_from(c: &LocalCluster, node: usize) -> anyhow::Result<Vec<u64>> {
    let ids: Vec<u64> = (1..=c.spec.nodes as u64).collect();
    let mut led = Vec::new();
    for g in 1..=c.spec.data_groups {
        if placement::group_replicas(&ids, g, c.spec.replicas).contains(&(node as u64)) {
            c.transfer_leader(g, node, Duration::from_secs(20)).await?;
            led.push(g);
        }
    }
    anyhow::ensure!(!led.is_empty(), "node {node} replicates no data group");
    let meta = placement::group_replicas(&ids, 0, c.spec.replicas);
    anyhow::ensure!(
        !meta.contains(&(node as u64)),
        "node {node} hosts a meta replica: the test would prove nothing"
    );
    Ok(led)
}

/// Chunks of a volume `size` bytes long whose group is in `groups`.
fn chunks_in(id: u64, size: u64, c: &LocalCluster, groups: &[u64]) -> Vec<u64> {
    (0..size / c.spec.chunk_size_bytes)
        .filter(|&k| groups.contains(&placement::chunk_group(id, k, c.spec.data_groups)))
        .collect()
}

/// Waits (bounded) until no node holds any block of any data group.
async fn wait_purged_everywhere(c: &LocalCluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut left = Vec::new();
        for i in 1..=c.spec.nodes {
            let st = c.status(i).await?;
            for g in st.groups.iter().filter(|g| g.group_id != 0) {
                let (_, kvs, _) = c.digest(i, g.group_id).await?;
                if kvs > 0 {
                    left.push((i, g.group_id, kvs));
                }
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("blocks of the deleted volume remain (node, group, keys): {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes, reads back and discards a whole volume through the client.
async fn client_io(client: &Client, name: &str, size: u64) -> anyhow::Result<()> {
    let vol = client.open_volume(name).await?;
    let piece = 192 * 1024u64; // misaligned against the 256 KiB chunks
    let mut at = 0;
    let mut seed = 1;
    while at < size {
        let len = piece.min(size - at);
        vol.write(at, &payload(seed, len as usize)).await?;
        at += len;
        seed += 1;
    }
    let all = vol.read(0, size).await?;
    let (mut at, mut seed) = (0u64, 1u64);
    while at < size {
        let len = piece.min(size - at);
        anyhow::ensure!(
            all[at as usize..(at + len) as usize] == payload(seed, len as usize)[..],
            "volume {name}: bytes [{at}, {}) differ from what was written",
            at + len
        );
        at += len;
        seed += 1;
    }
    // Discard the middle half (sub-chunk edges) and write-zero a sector.
    vol.discard(size / 4 + 512, size / 2).await?;
    vol.write_zeroes(4096, 512).await?;
    let after = vol.read(0, size).await?;
    let mut want = all;
    want[(size / 4 + 512) as usize..(size / 4 + 512 + size / 2) as usize].fill(0);
    want[4096..4608].fill(0);
    anyhow::ensure!(
        after == want,
        "volume {name}: discard/write-zeroes not as expected"
    );
    Ok(())
}

async fn run_client_case(nodes: usize) -> anyhow::Result<LocalCluster> {
    let cluster = LocalCluster::start(spec(nodes))?;
    cluster.wait_healthy(HEALTHY).await?;
    let mut led = BTreeSet::new();
    for n in 6..=nodes {
        led.extend(lead_from(&cluster, n).await?);
    }
    let led: Vec<u64> = led.into_iter().collect();
    let client = cluster.client().await?;
    let size = 8u64 << 20;
    let info = client.create_volume("far", size).await?;
    let far = chunks_in(info.id, size, &cluster, &led);
    anyhow::ensure!(
        !far.is_empty(),
        "no chunk of the volume lands on groups {led:?} led by nodes 6..={nodes}"
    );
    client_io(&client, "far", size).await?;
    // The groups were led by the far nodes throughout (I/O went through
    // them, not around them).
    for n in 6..=nodes {
        let st = cluster.status(n).await?;
        let leading = st.groups.iter().filter(|g| g.role == "leader").count();
        anyhow::ensure!(leading > 0, "node {n} leads no group any more");
    }
    client.delete_volume("far").await?;
    wait_purged_everywhere(&cluster).await?;
    println!(
        "{nodes} nodes: {} of {} chunks on groups {led:?} led by nodes 6..={nodes}; written, read, discarded, purged on every node",
        far.len(),
        size / cluster.spec.chunk_size_bytes
    );
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_serve_io_on_nodes_without_meta() -> anyhow::Result<()> {
    run_client_case(6).await?;
    Ok(())
}

const GUEST_SCRIPT: &str = r#"#!/bin/sh
set -e
dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null
dd if=/tmp/a of=/dev/vda bs=1M oflag=direct 2>/dev/null
w=$(sha256sum /tmp/a | cut -d' ' -f1)
r=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "RAFTBLK-RW $w $r"
blkdiscard -o 4194304 -l 8388608 /dev/vda
z=$(dd if=/dev/vda bs=1M skip=4 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
zz=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "RAFTBLK-ZERO $z $zz"
echo "RAFTBLK-SUM $(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#;

#[test]
fn seven_nodes_serve_a_guest_through_nodes_without_meta() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cluster = rt.block_on(run_client_case(7))?;
    // A guest disk whose chunks land on groups led by nodes 6 and 7.
    let client = rt.block_on(cluster.client())?;
    let size = 16u64 << 20;
    let info = rt.block_on(client.create_volume("vm7", size))?;
    let mut led = Vec::new();
    for n in [6, 7] {
        led.extend(rt.block_on(lead_from(&cluster, n))?);
    }
    let far = chunks_in(info.id, size, &cluster, &led);
    anyhow::ensure!(!far.is_empty(), "no chunk of vm7 on groups {led:?}");
    let dir = tempfile::tempdir()?;
    let vhost = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vm7", 1)?;
    let run = run_guest(
        &vhost.socket,
        1,
        GUEST_SCRIPT,
        Duration::from_secs(300),
        |_| {},
    )?;
    assert_eq!(run.exit, Some(0), "guest failed:\n{}", run.output);
    let rw = run.values("RAFTBLK-RW");
    assert!(
        rw.len() == 1 && rw[0].len() == 2 && rw[0][0] == rw[0][1],
        "the guest read back other bytes than it wrote:\n{}",
        run.output
    );
    let z = run.values("RAFTBLK-ZERO");
    assert!(
        z.len() == 1 && z[0].len() == 2 && z[0][0] == z[0][1],
        "the discarded range does not read as zeros:\n{}",
        run.output
    );
    // The cluster holds what the guest saw.
    let sum = run.values("RAFTBLK-SUM");
    let vol = rt.block_on(client.open_volume("vm7"))?;
    let img = dir.path().join("vm7.img");
    std::fs::write(&img, rt.block_on(vol.read(0, size))?)?;
    assert_eq!(
        sum.first().and_then(|v| v.first()).cloned(),
        Some(sha256_file(&img)?),
        "the cluster's bytes differ from the guest's"
    );
    println!(
        "7 nodes: guest wrote, read back and discarded vm7 ({} of {} chunks on groups led by nodes 6 and 7)",
        far.len(),
        size / cluster.spec.chunk_size_bytes
    );
    Ok(())
}
