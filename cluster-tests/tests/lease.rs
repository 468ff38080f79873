//! Reads around leadership changes, as the node's status and timings show
//! them: a leader whose transfer attempt was aborted grants itself no lease
//! until the transferee has acknowledged a later heartbeat (a MsgTimeoutNow
//! already sent could still make it win), and reads that arrive during an
//! election complete within one heartbeat round of the new leader's first
//! commit in its term (raft-rs drops read-index requests before it; they
//! must not wait for the periodic re-issue).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftblk_cluster_tests::{ClusterSpec, LocalCluster};
use raftblk_proto::volumes_client::VolumesClient;
use raftblk_proto::{placement, VolumeIdRequest};

const HEALTHY: Duration = Duration::from_secs(30);

async fn lease_ms(c: &LocalCluster, node: usize, group: u64) -> Option<(String, u64)> {
    let st = c.status(node).await.ok()?;
    st.groups
        .iter()
        .find(|g| g.group_id == group)
        .map(|g| (g.role.clone(), g.lease_remaining_ms))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_after_an_aborted_transfer() -> anyhow::Result<()> {
    let c = LocalCluster::start(ClusterSpec::default())?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    let size = 8u64 << 20;
    let info = client.create_volume("lease", size).await?;
    let vol = client.open_volume("lease").await?;
    let group = 1u64;
    let chunk = (0..size / c.spec.chunk_size_bytes)
        .find(|&k| placement::chunk_group(info.id, k, c.spec.data_groups) == group)
        .ok_or_else(|| anyhow::anyhow!("no chunk of the volume in group {group}"))?;
    let at = chunk * c.spec.chunk_size_bytes;
    let leader = c
        .leader_of(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("group {group} has no leader"))?;
    // Reads grant the leader a lease.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        vol.read(at, 4096).await?;
        if let Some((_, ms)) = lease_ms(&c, leader, group).await {
            if ms > 0 {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < until, "reads never granted a lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ask for a transfer to a paused follower: raft aborts it after an
    // election timeout, but its MsgTimeoutNow may be queued towards it.
    let transferee = (1..=3).find(|&i| i != leader).unwrap_or(1);
    c.pause(transferee, true);
    c.request_transfer_leader(group, transferee).await;
    let election_ms = c.spec.tick_interval_ms * c.spec.election_ticks as u64;
    let paused = Instant::now();
    let mut checks = 0;
    let mut seen_leader_after_abort = false;
    while paused.elapsed() < Duration::from_millis(election_ms * 3) {
        // Reads keep working (a quorum without the transferee).
        vol.read(at, 4096).await?;
        if let Some((role, ms)) = lease_ms(&c, leader, group).await {
            if role == "leader" {
                seen_leader_after_abort |=
                    paused.elapsed() > Duration::from_millis(election_ms * 2);
                anyhow::ensure!(
                    ms == 0,
                    "node {leader} holds a {ms} ms lease {:?} after asking paused node {transferee} to take over",
                    paused.elapsed()
                );
                checks += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.pause(transferee, false);
    anyhow::ensure!(
        seen_leader_after_abort && checks > 10,
        "the transfer was not aborted while the transferee was paused (checks {checks})"
    );
    // Once the transferee answers (it may take over with the queued
    // MsgTimeoutNow), leases come back wherever the leadership is.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        vol.read(at, 4096).await?;
        if let Some(l) = c.leader_of(group).await {
            if let Some((_, ms)) = lease_ms(&c, l, group).await {
                if ms > 0 {
                    println!(
                        "no lease on node {leader} in {checks} checks while node {transferee} was paused; lease back on node {l}"
                    );
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < until,
            "no lease came back after the transferee resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(issued, completed)` of every successful read.
type Reads = Arc<Mutex<Vec<(Instant, Instant)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_an_election_complete_right_after_the_first_commit() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(ClusterSpec::default())?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    let id = client.create_volume("elect", 1 << 20).await?.id;

    let heartbeat = Duration::from_millis(c.spec.tick_interval_ms * 2);
    let mut gaps = Vec::new();
    for round in 0..3 {
        let m = c
            .leader_of(0)
            .await
            .ok_or_else(|| anyhow::anyhow!("no meta leader"))?;
        let old_term = c
            .status(m)
            .await?
            .groups
            .iter()
            .find(|g| g.group_id == 0)
            .map(|g| g.term)
            .unwrap_or(0);
        let followers: Vec<usize> = (1..=3).filter(|&i| i != m).collect();
        // Linearizable catalog reads on both followers, a new one every
        // 10 ms on each, for the whole election.
        let reads: Reads = Default::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for &f in &followers {
            let addr = c.addr(f);
            let reads = reads.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let security = raftblk_cluster_tests::tls::security(raftblk_tls::Role::Admin);
                let ch = match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map(|e| security.connect_lazy(e))
                {
                    Ok(ch) => ch,
                    Err(_) => return,
                };
                for _ in 0..1000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let ch = ch.clone();
                    let reads = reads.clone();
                    tokio::spawn(async move {
                        let t0 = Instant::now();
                        let mut vc = VolumesClient::new(ch);
                        let call = vc.get_by_id(VolumeIdRequest { id });
                        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(4), call).await
                        {
                            if r.into_inner().error.is_none() {
                                reads
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push((t0, Instant::now()));
                            }
                        }
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let killed_at = Instant::now();
        c.kill(m);
        // The new leader's first commit in its term, seen from its status.
        let deadline = Instant::now() + Duration::from_secs(10);
        let committed_at = loop {
            let mut found = None;
            for &f in &followers {
                if let Ok(st) = c.status(f).await {
                    if let Some(g) = st.groups.iter().find(|g| g.group_id == 0) {
                        if g.role == "leader" && g.term > old_term && g.commit_index >= g.last_index
                        {
                            found = Some(Instant::now());
                        }
                    }
                }
            }
            if let Some(t) = found {
                break t;
            }
            anyhow::ensure!(Instant::now() < deadline, "no new meta leader");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Reads issued after the kill and before the commit (during the
        // election; at least one must have succeeded): the last of them to
        // complete.
        let during: Vec<(Instant, Instant)> = reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(t0, _)| *t0 >= killed_at && *t0 < committed_at)
            .copied()
            .collect();
        let last = during.iter().map(|(_, done)| *done).max().ok_or_else(|| {
            anyhow::anyhow!("round {round}: no read issued during the election completed")
        })?;
        let gap = last.saturating_duration_since(committed_at);
        println!(
            "round {round}: killed meta leader node {m}; {} reads issued during the election, the last completed {} ms after the new leader's first commit (heartbeat {} ms)",
            during.len(),
            gap.as_millis(),
            heartbeat.as_millis()
        );
        gaps.push(gap);
        c.start_node(m)?;
        c.wait_healthy(HEALTHY).await?;
    }
    // One heartbeat round (the followers learn the commit from the next
    // heartbeat), plus the status poll's resolution.
    let bound = heartbeat + Duration::from_millis(40);
    anyhow::ensure!(
        gaps.iter().all(|g| *g <= bound),
        "reads waited past one heartbeat round after the first commit: {gaps:?} (bound {bound:?})"
    );
    Ok(())
}
