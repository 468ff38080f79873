//! Placement rules the driver keeps while the cluster changes, with real
//! processes and the placement driver on:
//! - failure domains: every group's voters stay in distinct domains (the
//!   meta group's in as many as it can), through bootstrap (which ignores
//!   domains) and after a node joins a rack that already has one;
//!   the meta group has as many voters as there are racks (3 here), and
//!   `raftblk cluster wait-healthy --balanced` ends;
//! - a node past the full ratio gives its replicas away once another node
//!   can take them, so writes stop failing with NO_SPACE;
//! - a node an operator marked out stays out while it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use raftblk_cluster_tests::{bin, payload, ClusterSpec, LocalCluster};

const HEALTHY: Duration = Duration::from_secs(30);

/// Every group's members as their leaders report them, if no group is
/// mid-move (no learner, no joint configuration) and every group answers.
async fn settled(c: &LocalCluster, groups: u64) -> Option<BTreeMap<u64, Vec<u64>>> {
    let mut out = BTreeMap::new();
    for g in 0..=groups {
        let (_, s) = c.group_status(g).await?;
        if !s.learners.is_empty() || !s.voters_outgoing.is_empty() {
            return None;
        }
        out.insert(g, s.replicas);
    }
    Some(out)
}

/// Waits until the placement stays the same over three polls and `ok`
/// holds for it; returns it.
async fn wait_settled(
    c: &LocalCluster,
    groups: u64,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&BTreeMap<u64, Vec<u64>>) -> bool,
) -> anyhow::Result<BTreeMap<u64, Vec<u64>>> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    let mut same = 0;
    loop {
        let now = settled(c, groups).await;
        if now.is_some() && now == last && now.as_ref().is_some_and(&ok) {
            same += 1;
            if same >= 3 {
                return now.ok_or_else(|| anyhow::anyhow!("unreachable"));
            }
        } else {
            same = 0;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not settled after {timeout:?}: {now:?}"
        );
        last = now;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_domains_stay_distinct_as_nodes_join() -> anyhow::Result<()> {
    let groups = 6;
    let mut c = LocalCluster::start(ClusterSpec {
        nodes: 4,
        data_groups: groups,
        rebalance: true,
        // Nodes 1 and 4 share rack a: the bootstrap placement puts some
        // groups on both.
        domains: ["a", "b", "c", "a"].map(String::from).to_vec(),
        ..ClusterSpec::default()
    })?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    client.create_volume("racks", 8 << 20).await?;
    let vol = client.open_volume("racks").await?;
    let data = payload(7, 8 << 20);
    vol.write(0, &data).await?;
    let racks = |c: &LocalCluster| -> BTreeMap<u64, String> {
        (1..=c.spec.nodes as u64)
            .map(|n| (n, c.spec.domains[n as usize - 1].clone()))
            .collect()
    };
    // Each group's voters in distinct racks; the meta group's one per rack.
    let distinct = |rack: &BTreeMap<u64, String>, p: &BTreeMap<u64, Vec<u64>>| {
        let all: BTreeSet<&String> = rack.values().collect();
        p.iter().all(|(g, voters)| {
            let used: BTreeSet<&String> = voters.iter().filter_map(|v| rack.get(v)).collect();
            used.len() == voters.len() && (*g != 0 || voters.len() == all.len())
        })
    };
    let rack4 = racks(&c);
    let p = wait_settled(&c, groups, Duration::from_secs(90), "4 nodes", |p| {
        distinct(&rack4, p)
    })
    .await?;
    println!("4 nodes in racks {rack4:?}: {p:?}");

    // Node 5 joins rack b, which node 2 holds: replicas of rack b spread
    // over both, and no group ends up with two voters in one rack.
    c.spec.domains.push("b".into());
    let n5 = c.add_joining_node()?;
    let rack5 = racks(&c);
    let p = wait_settled(&c, groups, Duration::from_secs(120), "node 5 joined", |p| {
        distinct(&rack5, p) && p.values().any(|v| v.contains(&(n5 as u64)))
    })
    .await?;
    println!("5 nodes in racks {rack5:?}: {p:?}");
    let out = std::process::Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(["--cluster", &c.cluster_arg(), "--timeout-secs", "10"])
        .args(["cluster", "wait-healthy", "--balanced", "--wait-secs", "60"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "wait-healthy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(vol.read(0, 8 << 20).await? == data, "data changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_gives_its_replicas_to_a_new_one() -> anyhow::Result<()> {
    let groups = 4;
    let mib = 256;
    let mut c = LocalCluster::start(ClusterSpec {
        data_groups: groups,
        rebalance: true,
        tmpfs_mib_all: Some(mib),
        full_ratios: Some((0.6, 0.7)),
        ..ClusterSpec::default()
    })?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    client.create_volume("full", 4 << 20).await?;
    let vol = client.open_volume("full").await?;
    vol.write(0, &payload(1, 4 << 20)).await?;
    // Node 1's disk fills past the full ratio: every group has a replica
    // there, so every write is refused.
    std::fs::write(
        c.data_dir(1).join("ballast"),
        vec![0xEEu8; (mib as usize * 3 / 4) << 20],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match vol.write(0, &payload(2, 4096)).await {
            Err(e) if e.to_string().contains("NO_SPACE") => break,
            r => anyhow::ensure!(
                Instant::now() < deadline,
                "writes not refused with node 1 full: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A new node: node 1's replicas move to it, and writes work again.
    let n4 = c.add_joining_node()? as u64;
    let started = Instant::now();
    let p = wait_settled(
        &c,
        groups,
        Duration::from_secs(150),
        "node 1 sheds its replicas",
        |p| {
            p.iter()
                .filter(|(g, _)| **g != 0)
                .all(|(_, v)| !v.contains(&1) && v.contains(&n4))
        },
    )
    .await?;
    println!(
        "node 1 gave its data replicas to node {n4} in {:?}: {p:?}",
        started.elapsed()
    );
    vol.write(0, &payload(3, 4 << 20)).await?;
    anyhow::ensure!(vol.read(0, 4 << 20).await? == payload(3, 4 << 20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_out_stays_out_while_the_node_runs() -> anyhow::Result<()> {
    use raftblk_proto::NodeState;
    let groups = 4;
    let c = LocalCluster::start(ClusterSpec {
        nodes: 4,
        data_groups: groups,
        ..ClusterSpec::default()
    })?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    client.set_node(4, Some(NodeState::Out), None).await?;
    // Its heartbeats go on; it stays out, and gives its replicas away.
    let p = wait_settled(&c, groups, Duration::from_secs(60), "node 4 out", |p| {
        p.values().all(|v| !v.contains(&4))
    })
    .await?;
    let state = |m: &raftblk_proto::ClusterMap| {
        m.nodes
            .iter()
            .find(|n| n.id == 4)
            .map(|n| NodeState::try_from(n.state).unwrap_or(NodeState::Unspecified))
    };
    let m = client.cluster_map().await?;
    anyhow::ensure!(
        state(&m) == Some(NodeState::Out),
        "node 4 is {:?} while it runs, after an operator marked it out; groups {p:?}",
        state(&m)
    );
    anyhow::ensure!(c.is_running(4), "node 4 stopped");
    // `node in` brings it back.
    client.set_node(4, Some(NodeState::Up), None).await?;
    let m = client.cluster_map().await?;
    anyhow::ensure!(state(&m) == Some(NodeState::Up), "{:?}", state(&m));
    Ok(())
}
