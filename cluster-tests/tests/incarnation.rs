//! Replica incarnations: a replica removed from a group and added back on
//! the same node is a new replica, and the old one must never pass for it.
//!
//! The sequence: node N's learner catches up; N is killed; the group
//! removes N and adds it back as a learner; N restarts with its old
//! replica, whose log holds both changes. The old replica must not make
//! the leader believe the new one holds entries it does not (raft-rs then
//! panics on the new, empty replica, and the node crash-loops); the node
//! stays up and the group converges with N caught up, identical to the
//! others, and able to vote.

use std::time::Duration;

use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::placement;
use raftblk_proto::PeerChangeKind::{AddLearner, AddVoter, Remove};

const HEALTHY: Duration = Duration::from_secs(30);
const STEP: Duration = Duration::from_secs(30);

/// Waits (a few seconds at most) until node `i` hosts `group` and has
/// applied `index`.
async fn wait_applied(c: &LocalCluster, i: usize, group: u64, index: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // (Not listening yet counts as not there yet.)
        let st = c.status(i).await.ok();
        let g = st
            .as_ref()
            .and_then(|st| st.groups.iter().find(|g| g.group_id == group));
        if g.is_some_and(|g| g.applied_index >= index) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the leader counts node {i} caught up in group {group}, but node {i} {}",
            match g {
                Some(g) => format!("applied only {} of {index}", g.applied_index),
                None => "has no replica of it".into(),
            }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_removed_and_added_back_while_down_rejoins_as_new() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(ClusterSpec {
        nodes: 4,
        data_groups: 2,
        ..ClusterSpec::default()
    })?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    client
        .set_flags(raftblk_proto::ClusterFlags {
            norecover: true,
            norebalance: true,
            noout: true,
        })
        .await?;
    let info = client.create_volume("inc", 1 << 20).await?;
    let group = placement::chunk_group(info.id, 0, c.spec.data_groups);
    let vol = client.open_volume("inc").await?;
    let members = c.members_of(group).await;
    let n = (1..=4u64)
        .find(|x| !members.contains(x))
        .ok_or_else(|| anyhow::anyhow!("every node hosts group {group}"))?;
    vol.write(0, &payload(1, 64 << 10)).await?;

    // N's learner catches up from the log.
    let r = c.change_peers(group, &[(AddLearner, n)], STEP).await?;
    anyhow::ensure!(r.error.is_none(), "add learner: {:?}", r.error);
    c.wait_caught_up(group, n, STEP).await?;
    vol.write(64 << 10, &payload(2, 64 << 10)).await?;
    c.wait_caught_up(group, n, STEP).await?;

    // N goes down; the group drops it and adds it back.
    c.kill(n as usize);
    let r = c.change_peers(group, &[(Remove, n)], STEP).await?;
    anyhow::ensure!(r.error.is_none(), "remove: {:?}", r.error);
    let r = c.change_peers(group, &[(AddLearner, n)], STEP).await?;
    anyhow::ensure!(r.error.is_none(), "add back: {:?}", r.error);
    vol.write(128 << 10, &payload(3, 64 << 10)).await?;

    let (_, st) = c
        .group_status(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let added_back_at = st.commit_index;

    // N returns with its old replica. When the leader counts N's learner
    // caught up, N really holds the group that far (a destroyed old
    // replica's acknowledgements must not count for the new one).
    c.start_node(n as usize)?;
    c.wait_caught_up(group, n, STEP).await?;
    wait_applied(&c, n as usize, group, added_back_at).await?;
    vol.write(192 << 10, &payload(4, 64 << 10)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    anyhow::ensure!(
        c.is_running(n as usize),
        "node {n} exited after rejoining:\n{}",
        c.log_tail(n as usize, 30)
    );
    // The new replica votes, and holds what the others hold.
    let r = c.change_peers(group, &[(AddVoter, n)], STEP).await?;
    anyhow::ensure!(r.error.is_none(), "promote: {:?}", r.error);
    let leader = c
        .leader_of(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))? as u64;
    let out = members
        .iter()
        .copied()
        .find(|m| *m != leader)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let r = c.change_peers(group, &[(Remove, out)], STEP).await?;
    anyhow::ensure!(r.error.is_none(), "remove {out}: {:?}", r.error);
    c.wait_replicas_identical(group, STEP).await?;
    c.transfer_leader(group, n as usize, STEP).await?;
    let got = vol.read(0, 256 << 10).await?;
    for (i, seed) in [1u64, 2, 3, 4].iter().enumerate() {
        let at = i * (64 << 10);
        assert!(
            got[at..at + (64 << 10)] == payload(*seed, 64 << 10)[..],
            "write {seed} lost with node {n} leading"
        );
    }
    anyhow::ensure!(
        c.is_running(n as usize),
        "node {n} exited:\n{}",
        c.log_tail(n as usize, 30)
    );
    Ok(())
}
