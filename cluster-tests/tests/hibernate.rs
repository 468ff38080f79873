//! Idle groups hibernate (no ticks, no heartbeats) and wake on demand: a
//! hibernating leader holds no read lease, reads and writes wake their
//! group, and when a hibernating group's leader is killed its followers
//! notice at the node level and elect a new leader as fast as a ticking
//! group would.

use std::time::{Duration, Instant};

use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::placement;

const HEALTHY: Duration = Duration::from_secs(30);

/// `(leader node, hibernating, lease ms)` of every group, per its leader.
async fn leaders(c: &LocalCluster, groups: u64) -> Vec<(u64, Option<(usize, bool, u64)>)> {
    let mut out = Vec::new();
    for g in 0..=groups {
        let s = c
            .group_status(g)
            .await
            .map(|(l, st)| (l, st.hibernating, st.lease_remaining_ms));
        out.push((g, s));
    }
    out
}

async fn wait_all_hibernating(
    c: &LocalCluster,
    groups: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let l = leaders(c, groups).await;
        let awake: Vec<_> = l
            .iter()
            .filter(|(_, s)| !s.is_some_and(|(_, h, _)| h))
            .collect();
        if awake.is_empty() {
            for (g, s) in &l {
                let lease = s.map_or(0, |(_, _, ms)| ms);
                anyhow::ensure!(
                    lease == 0,
                    "group {g}: a hibernating leader holds a {lease} ms lease"
                );
            }
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "groups still awake after {timeout:?}: {awake:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_hibernate_wake_and_survive_their_leader() -> anyhow::Result<()> {
    let spec = ClusterSpec {
        data_groups: 16,
        ..ClusterSpec::default()
    };
    let election_ms = spec.tick_interval_ms * spec.election_ticks as u64;
    let mut c = LocalCluster::start(spec)?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    let info = client.create_volume("h", 16 << 20).await?;
    let vol = client.open_volume("h").await?;
    let data = payload(3, 16 << 20);
    vol.write(0, &data).await?;
    // Idle: every group goes to sleep, leaders without leases.
    wait_all_hibernating(&c, 16, Duration::from_secs(20)).await?;
    // Reads and writes wake their groups and complete.
    anyhow::ensure!(
        vol.read(0, 16 << 20).await? == data,
        "read after hibernation"
    );
    let more = payload(4, 1 << 20);
    vol.write(0, &more).await?;
    anyhow::ensure!(
        vol.read(0, 1 << 20).await? == more,
        "write after hibernation"
    );
    wait_all_hibernating(&c, 16, Duration::from_secs(20)).await?;

    // Kill the leader of a hibernating data group (not the meta leader, so
    // the client can still look things up) and time the election.
    let meta_leader = c.group_status(0).await.map(|(l, _)| l).unwrap_or(0);
    let mut victim = None;
    let used: Vec<u64> = (0..16u64)
        .map(|k| placement::chunk_group(info.id, k, 16))
        .collect();
    for g in used.iter().copied() {
        if let Some((l, st)) = c.group_status(g).await {
            if l != meta_leader && st.hibernating {
                victim = Some((g, l));
                break;
            }
        }
    }
    let (group, leader) =
        victim.ok_or_else(|| anyhow::anyhow!("no hibernating group led off the meta leader"))?;
    c.kill(leader);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(10);
    let elected = loop {
        if let Some((l, _)) = c.group_status(group).await {
            if l != leader {
                break killed.elapsed();
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "group {group} has no new leader after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "group {group}: hibernating leader node {leader} killed; new leader after {elected:?} (election timeout {election_ms} ms)"
    );
    // A ticking group elects within its randomized timeout [ET, 2 ET) after
    // its leader's last heartbeat; the hibernating one must do as well
    // (node silence is noticed after ET, the randomized rest follows),
    // plus a margin for the polling and the vote round.
    anyhow::ensure!(
        elected <= Duration::from_millis(2 * election_ms + 400),
        "new leader after {elected:?}, more than 2 x the election timeout ({election_ms} ms)"
    );
    // And the group serves I/O again: write a chunk that lives in it.
    let chunk = (0..16u64)
        .find(|k| placement::chunk_group(info.id, *k, 16) == group)
        .ok_or_else(|| anyhow::anyhow!("no chunk of the volume in group {group}"))?;
    let off = chunk << 20;
    vol.write(off, &payload(5, 4096)).await?;
    anyhow::ensure!(
        vol.read(off, 4096).await? == payload(5, 4096),
        "I/O on group {group}"
    );
    Ok(())
}
