//! The cluster map and joining, with real processes: a node configured
//! with only its id, address, data directory and a seed joins a running
//! cluster; every member and client learns it from the map; the map
//! follows a replica moved onto it; `raftblk node list` shows it; and a
//! wiped node that comes back under its old id is refused, whether it
//! joined later or bootstrapped the cluster.

use std::process::Command;
use std::time::{Duration, Instant};

use raftblk_cluster_tests::{bin, ClusterSpec, LocalCluster};
use raftblk_proto::NodeState;
use raftblk_proto::PeerChangeKind::AddLearner;

const HEALTHY: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(20);

/// Polls `f` every 100 ms until it returns Some, or fails after `WAIT`.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_a_seed_and_the_map_follows() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(ClusterSpec::default())?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    let map = client.cluster_map().await?;
    anyhow::ensure!(
        map.nodes.len() == 3 && map.data_groups == 4,
        "bootstrap map: {map:?}"
    );
    let n = c.add_joining_node()?;
    // It registers, heartbeats (its data directory's uuid lands in the
    // map) and every member learns its address.
    let rec = wait_for("the new node in the map with its uuid", || async {
        let m = client.cluster_map().await.ok()?;
        m.nodes
            .into_iter()
            .find(|r| r.id == n as u64 && !r.store_uuid.is_empty())
    })
    .await?;
    anyhow::ensure!(
        rec.state == NodeState::Up as i32 && rec.addr == c.addr(n),
        "{rec:?}"
    );
    for i in 1..=n {
        wait_for(&format!("node {i} knows node {n}"), || async {
            let st = c.status(i).await.ok()?;
            st.nodes.iter().any(|x| x.id == n as u64).then_some(())
        })
        .await?;
    }
    // A replica moved onto it: the map follows the group.
    let r = c.change_peers(2, &[(AddLearner, n as u64)], WAIT).await?;
    anyhow::ensure!(r.error.is_none(), "add learner: {:?}", r.error);
    let rec = wait_for("the map follows the move", || async {
        let m = client.cluster_map().await.ok()?;
        m.groups
            .into_iter()
            .find(|g| g.group_id == 2 && g.learners.contains(&(n as u64)))
    })
    .await?;
    anyhow::ensure!(rec.conf_ver == r.conf_ver, "map {rec:?} vs group {r:?}");
    wait_for("the learner catches up", || async {
        let st = c.status(n).await.ok()?;
        st.groups
            .iter()
            .find(|g| g.group_id == 2 && g.applied_index > 5)
            .map(|_| ())
    })
    .await?;
    // The CLI lists it.
    let out = Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(["--cluster", &c.addr(1), "node", "list"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "node list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{n} ")))
        .ok_or_else(|| anyhow::anyhow!("node {n} missing from:\n{text}"))?;
    anyhow::ensure!(
        row.contains("up") && row.trim_end().ends_with('1'),
        "row: {row}"
    );
    println!("{text}");

    // A restart keeps its identity and finds the cluster from its
    // persisted map.
    c.kill(n);
    c.start_node(n)?;
    wait_for("the restarted node serves its replica again", || async {
        let st = c.status(n).await.ok()?;
        st.groups.iter().any(|g| g.group_id == 2).then_some(())
    })
    .await?;

    // Wiped, it must not come back under its old id.
    c.kill(n);
    c.wipe(n)?;
    c.start_node(n)?;
    let code = c.wait_exit(n, WAIT);
    let log = c.log_tail(n, 5);
    anyhow::ensure!(
        code.is_some_and(|c| c != 0),
        "a wiped joiner kept running; log:\n{log}"
    );
    anyhow::ensure!(log.contains("another data directory"), "log:\n{log}");

    // Nor may a wiped bootstrap node bootstrap again.
    c.kill(3);
    c.wipe(3)?;
    c.start_node(3)?;
    let code = c.wait_exit(3, WAIT);
    let log = c.log_tail(3, 5);
    anyhow::ensure!(
        code.is_some_and(|c| c != 0),
        "a wiped bootstrap node kept running; log:\n{log}"
    );
    anyhow::ensure!(log.contains("must not bootstrap again"), "log:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_full_nodes_are_refused_clearly() -> anyhow::Result<()> {
    // Every disk counts as full (any use is past 0.01%): the driver marks
    // the nodes full in the map and writes get a clear NO_SPACE error,
    // while reads and discards still work.
    let c = LocalCluster::start(ClusterSpec {
        full_ratios: Some((0.0001, 0.0001)),
        ..ClusterSpec::default()
    })?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    client.create_volume("full", 4 << 20).await?;
    let vol = client.open_volume("full").await?;
    let err = wait_for("writes refused as the map marks the nodes full", || async {
        match vol.write(0, &raftblk_cluster_tests::payload(1, 4096)).await {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        }
    })
    .await?;
    anyhow::ensure!(
        err.contains("NO_SPACE") && err.contains("full_ratio"),
        "unclear error: {err}"
    );
    let map = client.cluster_map().await?;
    anyhow::ensure!(map.full_nodes.len() == 3, "full nodes {:?}", map.full_nodes);
    vol.read(0, 4096).await?;
    vol.discard(0, 4096).await?;
    println!("write refused: {err}");
    Ok(())
}
