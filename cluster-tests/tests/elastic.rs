//! Self-healing with real processes and no operator action: a node killed
//! for good is marked down, then out, and every group that had a replica
//! on it gets one back elsewhere (learner, catch-up, joint consensus),
//! under a recording workload with no failed I/O and no linearizability
//! anomaly; the meta group heals the same way.

use std::time::{Duration, Instant};

use raftblk_client::Volume;
use raftblk_cluster_tests::workload::{Workload, WorkloadSpec};
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};
use raftblk_proto::NodeState;

const HEALTHY: Duration = Duration::from_secs(30);
/// Down after 1 s, out 2 s later, then the moves.
const HEAL: Duration = Duration::from_secs(60);

fn spec(nodes: usize) -> ClusterSpec {
    ClusterSpec {
        nodes,
        data_groups: 8,
        node_down_after_ms: 1000,
        down_out_secs: 2,
        log_compact_threshold_entries: 256,
        log_retain_entries: 32,
        ..ClusterSpec::default()
    }
}

async fn volumes(c: &LocalCluster, n: usize, bytes: u64) -> anyhow::Result<Vec<Volume>> {
    let client = c.client().await?;
    let mut v = Vec::new();
    for i in 0..n {
        let name = format!("el{i}");
        client.create_volume(&name, bytes).await?;
        v.push(client.open_volume(&name).await?);
    }
    Ok(v)
}

/// Waits until every group in `groups` has `want` voters, none on `gone`,
/// and no move under way; returns each group's voters.
async fn wait_healed(
    c: &LocalCluster,
    groups: std::ops::RangeInclusive<u64>,
    gone: u64,
    want: impl Fn(u64) -> usize,
) -> anyhow::Result<Vec<(u64, Vec<u64>)>> {
    let deadline = Instant::now() + HEAL;
    loop {
        let mut healed = Vec::new();
        let mut pending = Vec::new();
        for g in groups.clone() {
            match c.group_status(g).await {
                Some((_, st))
                    if st.replicas.len() == want(g)
                        && !st.replicas.contains(&gone)
                        && st.learners.is_empty()
                        && st.voters_outgoing.is_empty() =>
                {
                    healed.push((g, st.replicas.clone()))
                }
                Some((_, st)) => pending.push((g, st.replicas, st.learners, st.voters_outgoing)),
                None => pending.push((g, vec![], vec![], vec![])),
            }
        }
        if pending.is_empty() {
            return Ok(healed);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not healed after {HEAL:?}: (group, voters, learners, outgoing) {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_node_loss() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(spec(4))?;
    c.wait_healthy(HEALTHY).await?;
    let blocks = 1024;
    let vols = volumes(&c, 2, blocks * 4096).await?;
    let wspec = WorkloadSpec {
        clients: 4,
        blocks,
        ops_max: 60_000,
        duration_max: Duration::from_secs(120),
    };
    let mut wl = Workload::start(vols.clone(), wspec, 0x10557);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gone = 4u64;
    let killed = Instant::now();
    c.kill(gone as usize);
    let healed = wait_healed(&c, 1..=8, gone, |_| 3).await?;
    println!(
        "healed {:?} after kill -9 of node {gone}: {healed:?}",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    wl.stop_and_check(&vols, blocks).await?;
    for g in 1..=8 {
        c.wait_replicas_identical(g, Duration::from_secs(20))
            .await?;
    }
    let map = c.client().await?.cluster_map().await?;
    let rec = map
        .nodes
        .iter()
        .find(|n| n.id == gone)
        .ok_or_else(|| anyhow::anyhow!("node {gone} left the map"))?;
    anyhow::ensure!(rec.state == NodeState::Out as i32, "node {gone}: {rec:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_node_loss() -> anyhow::Result<()> {
    // Six nodes: the meta group on five, one spare to take a lost member.
    let mut c = LocalCluster::start(spec(6))?;
    c.wait_healthy(HEALTHY).await?;
    let (leader, meta) = c
        .group_status(0)
        .await
        .ok_or_else(|| anyhow::anyhow!("no meta leader"))?;
    anyhow::ensure!(meta.replicas.len() == 5, "meta voters {:?}", meta.replicas);
    // Lose the meta leader itself, for good.
    c.kill(leader);
    let healed = wait_healed(&c, 0..=0, leader as u64, |_| 5).await?;
    println!("meta group after losing node {leader}: {:?}", healed[0].1);
    anyhow::ensure!(
        healed[0].1.contains(&6),
        "the spare node did not join the meta group"
    );
    // The catalog works and the data groups healed too.
    let client = c.client().await?;
    client.create_volume("after", 1 << 20).await?;
    wait_healed(&c, 1..=8, leader as u64, |_| 3).await?;
    c.wait_replicas_identical(0, Duration::from_secs(20))
        .await?;
    Ok(())
}

/// Data replicas (voters) each node holds per the groups' leaders, and
/// groups (meta included) each node leads.
async fn counts(
    c: &LocalCluster,
    groups: u64,
) -> (
    std::collections::BTreeMap<u64, usize>,
    std::collections::BTreeMap<u64, usize>,
) {
    let mut replicas = std::collections::BTreeMap::new();
    let mut leaders = std::collections::BTreeMap::new();
    for g in 0..=groups {
        if let Some((l, st)) = c.group_status(g).await {
            *leaders.entry(l as u64).or_insert(0) += 1;
            if g == 0 {
                continue;
            }
            for v in st.replicas {
                *replicas.entry(v).or_insert(0) += 1;
            }
        }
    }
    (replicas, leaders)
}

fn spread(m: &std::collections::BTreeMap<u64, usize>, nodes: u64) -> usize {
    let v: Vec<usize> = (1..=nodes)
        .map(|n| m.get(&n).copied().unwrap_or(0))
        .collect();
    v.iter().max().unwrap_or(&0) - v.iter().min().unwrap_or(&0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_node_rebalance() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(ClusterSpec {
        rebalance: true,
        ..spec(3)
    })?;
    c.wait_healthy(HEALTHY).await?;
    let blocks = 1024;
    let vols = volumes(&c, 2, blocks * 4096).await?;
    let wspec = WorkloadSpec {
        clients: 4,
        blocks,
        ops_max: 80_000,
        duration_max: Duration::from_secs(150),
    };
    let mut wl = Workload::start(vols.clone(), wspec, 0xadd);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let n4 = c.add_joining_node()?;
    let n5 = c.add_joining_node()?;
    anyhow::ensure!((n4, n5) == (4, 5), "nodes {n4}, {n5}");
    // 24 data replicas over 5 nodes: 4 or 5 each; leaders within one.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (replicas, leaders) = counts(&c, 8).await;
        let meta = c
            .group_status(0)
            .await
            .map(|(_, s)| s.replicas.len())
            .unwrap_or(0);
        let moving = {
            let mut any = false;
            for g in 0..=8 {
                if let Some((_, s)) = c.group_status(g).await {
                    any |= !s.learners.is_empty() || !s.voters_outgoing.is_empty();
                }
            }
            any
        };
        if !moving && spread(&replicas, 5) <= 1 && spread(&leaders, 5) <= 1 && meta == 5 {
            println!(
                "balanced {:?} after adding nodes 4 and 5: replicas {replicas:?}, leaders {leaders:?}, meta voters {meta}",
                started.elapsed()
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not balanced: replicas {replicas:?}, leaders {leaders:?}, meta voters {meta}, moving {moving}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wl.stop_and_check(&vols, blocks).await?;
    for g in 0..=8 {
        c.wait_replicas_identical(g, Duration::from_secs(20))
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_node() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(spec(4))?;
    c.wait_healthy(HEALTHY).await?;
    let blocks = 1024;
    let vols = volumes(&c, 2, blocks * 4096).await?;
    let wspec = WorkloadSpec {
        clients: 4,
        blocks,
        ops_max: 60_000,
        duration_max: Duration::from_secs(120),
    };
    let mut wl = Workload::start(vols.clone(), wspec, 0xd4a1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = c.client().await?;
    let drained = 2u64;
    client
        .set_node(drained, Some(NodeState::Draining), None)
        .await?;
    // It still holds replicas: removing it now is refused, clearly.
    let early = client
        .set_node(drained, Some(NodeState::Removed), None)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    anyhow::ensure!(early.contains("drain it first"), "early remove: {early:?}");
    // Every group keeps three voters throughout (add before remove).
    let deadline = Instant::now() + HEAL;
    let mut samples = 0;
    loop {
        let mut holding = Vec::new();
        for g in 0..=8 {
            if let Some((_, st)) = c.group_status(g).await {
                anyhow::ensure!(
                    st.replicas.len() >= 3,
                    "group {g} dropped to voters {:?} during the drain",
                    st.replicas
                );
                if st.replicas.contains(&drained)
                    || st.learners.contains(&drained)
                    || st.voters_outgoing.contains(&drained)
                {
                    holding.push(g);
                }
            }
        }
        samples += 1;
        if holding.is_empty() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {drained} still holds groups {holding:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("node {drained} drained ({samples} samples, every group kept 3 voters)");
    // The map follows within a few heartbeats; then it can be removed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .set_node(drained, Some(NodeState::Removed), None)
            .await
        {
            Ok(map) => {
                let rec = map.nodes.iter().find(|n| n.id == drained);
                anyhow::ensure!(
                    rec.is_some_and(|r| r.state == NodeState::Removed as i32),
                    "{rec:?}"
                );
                break;
            }
            Err(e) => anyhow::ensure!(Instant::now() < deadline, "remove: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.stop(drained as usize);
    tokio::time::sleep(Duration::from_secs(2)).await;
    wl.stop_and_check(&vols, blocks).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_node_returns() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(spec(4))?;
    c.wait_healthy(HEALTHY).await?;
    let blocks = 1024;
    let vols = volumes(&c, 2, blocks * 4096).await?;
    let wspec = WorkloadSpec {
        clients: 4,
        blocks,
        ops_max: 60_000,
        duration_max: Duration::from_secs(120),
    };
    let mut wl = Workload::start(vols.clone(), wspec, 0x7e7);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gone = 4u64;
    let held: Vec<u64> = c
        .status(gone as usize)
        .await?
        .groups
        .iter()
        .map(|g| g.group_id)
        .collect();
    c.kill(gone as usize);
    wait_healed(&c, 1..=8, gone, |_| 3).await?;
    // Back with its old data: every replica it had was moved away.
    c.start_node(gone as usize)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = c.status(gone as usize).await;
        if let Ok(st) = st {
            if st.groups.is_empty() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {gone} still hosts {:?}",
                st.groups
                    .iter()
                    .map(|g| (g.group_id, g.role.clone()))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Up again in the map.
    let client = c.client().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let map = client.cluster_map().await?;
        if map
            .nodes
            .iter()
            .any(|n| n.id == gone && n.state == NodeState::Up as i32)
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {gone} not up again: {:?}",
            map.nodes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wl.stop_and_check(&vols, blocks).await?;
    // Its stale data is gone.
    c.kill(gone as usize);
    let engine = raftblk_node::engine::Engine::open(&c.data_dir(gone as usize))?;
    for g in held {
        let (start, end) = raftblk_node::keys::group_range(g);
        let mut left = 0;
        for item in engine.db().iterator_cf(
            engine.kv_cf(),
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, _) = item?;
            if k.as_ref() >= end.as_slice() {
                break;
            }
            left += 1;
        }
        anyhow::ensure!(left == 0, "node {gone} keeps {left} keys of group {g}");
    }
    Ok(())
}

/// Where in a move a node dies.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The new replica is a learner catching up (or caught up).
    Learner,
    /// The group is in the joint configuration (new voter in, old out).
    Joint,
}

/// Which node of the move dies.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Source,
    Target,
    Leader,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_move() -> anyhow::Result<()> {
    use raftblk_proto::ClusterFlags;
    use raftblk_proto::PeerChangeKind::{AddLearner, AddVoter, Remove};
    // Down after 1 s, never out: the victims come back.
    let mut c = LocalCluster::start(ClusterSpec {
        down_out_secs: 3600,
        ..spec(5)
    })?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    let blocks = 2048;
    let vols = volumes(&c, 2, blocks * 4096).await?;
    let wspec = WorkloadSpec {
        clients: 4,
        blocks,
        ops_max: 200_000,
        duration_max: Duration::from_secs(240),
    };
    let mut wl = Workload::start(vols.clone(), wspec, 0xdead);
    let hold = |on: bool| ClusterFlags {
        noout: false,
        norecover: on,
        norebalance: true,
    };
    let step_wait = Duration::from_secs(20);
    let mut group = 0u64;
    for step in [Step::Learner, Step::Joint] {
        for victim in [Victim::Source, Victim::Target, Victim::Leader] {
            group = group % 8 + 1;
            client.set_flags(hold(true)).await?;
            let (leader, st) = c
                .group_status(group)
                .await
                .ok_or_else(|| anyhow::anyhow!("group {group} has no leader"))?;
            let leader = leader as u64;
            let source = st
                .replicas
                .iter()
                .copied()
                .find(|r| *r != leader)
                .ok_or_else(|| anyhow::anyhow!("no follower"))?;
            let target = (1..=5u64)
                .find(|n| !st.replicas.contains(n))
                .ok_or_else(|| anyhow::anyhow!("no spare node"))?;
            let r = c
                .change_peers(group, &[(AddLearner, target)], step_wait)
                .await?;
            anyhow::ensure!(r.error.is_none(), "add learner: {:?}", r.error);
            c.wait_caught_up(group, target, step_wait).await?;
            if let Step::Joint = step {
                let r = c
                    .change_peers(group, &[(AddVoter, target), (Remove, source)], step_wait)
                    .await?;
                anyhow::ensure!(r.error.is_none(), "enter joint: {:?}", r.error);
            }
            let dead = match victim {
                Victim::Source => source,
                Victim::Target => target,
                Victim::Leader => leader,
            };
            c.kill(dead as usize);
            let killed = Instant::now();
            // The driver takes over: the move completes or rolls back.
            client.set_flags(hold(false)).await?;
            let deadline = Instant::now() + Duration::from_secs(40);
            let done = loop {
                if let Some((_, st)) = c.group_status(group).await {
                    if st.learners.is_empty()
                        && st.voters_outgoing.is_empty()
                        && st.replicas.len() == 3
                    {
                        break st.replicas;
                    }
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "group {group}: move neither finished nor rolled back ({step:?}, {victim:?} killed): {:?}",
                    c.group_status(group).await.map(|(_, s)| (s.replicas, s.learners, s.voters_outgoing))
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let outcome = if done.contains(&target) {
                "completed"
            } else {
                "rolled back"
            };
            println!(
                "group {group}: {step:?} step, {victim:?} (node {dead}) killed: {outcome} after {:?}, voters {done:?}",
                killed.elapsed()
            );
            c.start_node(dead as usize)?;
            c.wait_healthy(HEALTHY).await?;
            c.wait_replicas_identical(group, Duration::from_secs(30))
                .await?;
        }
    }
    wl.stop_and_check(&vols, blocks).await?;
    Ok(())
}
