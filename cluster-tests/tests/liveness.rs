//! Node-level liveness: every node reports how long each peer has been
//! silent on its raft stream; a killed node's silence grows while the
//! others stay fresh. (Links also send an empty keepalive batch each
//! heartbeat interval when idle, for when groups hibernate; the placement
//! driver of the elastic-cluster work will mark nodes down from this.)

use std::time::{Duration, Instant};

use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

const HEALTHY: Duration = Duration::from_secs(30);

fn silent_ms(st: &raftblk_proto::NodeStatusResponse, node: u64) -> Option<u64> {
    st.peers
        .iter()
        .find(|p| p.node_id == node && p.heard)
        .map(|p| p.silent_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_hear_each_other_and_notice_a_dead_node() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(ClusterSpec::default())?;
    c.wait_healthy(HEALTHY).await?;
    let heartbeat_ms = c.spec.tick_interval_ms * 2;
    // Idle for a while: every pair still hears each other within a few
    // heartbeat intervals.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for i in 1..=3usize {
        let st = c.status(i).await?;
        for j in (1..=3u64).filter(|j| *j != i as u64) {
            let ms = silent_ms(&st, j)
                .ok_or_else(|| anyhow::anyhow!("node {i} never heard from node {j}"))?;
            anyhow::ensure!(
                ms <= 4 * heartbeat_ms,
                "node {i} last heard from node {j} {ms} ms ago (heartbeat {heartbeat_ms} ms)"
            );
        }
    }
    c.kill(3);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = c.status(1).await?;
    let dead = silent_ms(&st, 3).unwrap_or(0);
    let alive = silent_ms(&st, 2).unwrap_or(u64::MAX);
    println!(
        "{:?} after kill -9 of node 3: node 1 last heard node 3 {dead} ms ago, node 2 {alive} ms ago",
        killed.elapsed()
    );
    anyhow::ensure!(
        dead >= 1000,
        "node 3 was killed 1.5 s ago yet heard {dead} ms ago"
    );
    anyhow::ensure!(alive <= 4 * heartbeat_ms, "node 2 silent for {alive} ms");
    Ok(())
}
