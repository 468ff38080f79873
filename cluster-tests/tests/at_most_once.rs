//! At-most-once writes where the raft log no longer helps: a write whose
//! answer was lost (request id A) is retried after its log entry was
//! compacted away and, in between, a newer write (B) to the same block
//! completed. The retry must be answered from the first copy, never
//! applied again (that would undo B):
//! - after every node restarts (the ids must be on disk, not only in the
//!   log tail a restart re-reads);
//! - at a leader that caught up by snapshot (the ids must travel in it);
//! - and a retry older than the window a group checks is refused with
//!   REQUEST_EXPIRED, never applied.
//!
//! Requests go straight to the group's leader over gRPC with explicit
//! request ids, as the client library's retries would send them.

use std::time::{Duration, Instant};

use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::{placement, BlockRange, ErrorCode, ReadRequest, WriteRequest};
use tonic::transport::Channel;

const HEALTHY: Duration = Duration::from_secs(30);
const STEP: Duration = Duration::from_secs(30);
const BLOCK: u64 = 4096;

fn spec(nodes: usize) -> ClusterSpec {
    ClusterSpec {
        nodes,
        data_groups: 2,
        // Small logs: the first write's entry is compacted away quickly.
        log_compact_threshold_entries: 32,
        log_retain_entries: 4,
        ..ClusterSpec::default()
    }
}

/// A block I/O client connected to node `i`.
async fn bio(c: &LocalCluster, i: usize) -> anyhow::Result<BlockIoClient<Channel>> {
    let ch = c.channel(i).await?;
    Ok(BlockIoClient::new(ch))
}

async fn leader_bio(c: &LocalCluster, group: u64) -> anyhow::Result<BlockIoClient<Channel>> {
    let leader = c
        .leader_of(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("group {group} has no leader"))?;
    bio(c, leader).await
}

fn range(group: u64, volume: u64, block: u64) -> BlockRange {
    BlockRange {
        group_id: group,
        volume_id: volume,
        offset_bytes: block * BLOCK,
        length_bytes: BLOCK,
    }
}

fn write(r: BlockRange, seed: u64, id: u64, retry_age_ms: u64) -> WriteRequest {
    let mut request_id = vec![0xA7u8; 8];
    request_id.extend_from_slice(&id.to_be_bytes());
    WriteRequest {
        range: Some(r),
        data: payload(seed, BLOCK as usize).into(),
        request_id: request_id.into(),
        retry_age_ms,
        // Never attached: any epoch from 1 up passes the fence.
        epoch: 1,
        clone: None,
    }
}

async fn read(bio: &mut BlockIoClient<Channel>, r: BlockRange) -> anyhow::Result<Vec<u8>> {
    let got = bio
        .read(ReadRequest {
            range: Some(r),
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(got.error.is_none(), "read: {:?}", got.error);
    Ok(got.data.to_vec())
}

/// A volume whose first chunk lives in a data group: `(volume id, group)`.
async fn volume(c: &LocalCluster) -> anyhow::Result<(u64, u64)> {
    let client = c.client().await?;
    let info = client.create_volume("once", 1 << 20).await?;
    Ok((
        info.id,
        placement::chunk_group(info.id, 0, c.spec.data_groups),
    ))
}

/// Writes other blocks of the group (fresh ids) until every replica's log
/// starts past `index`: the entry at `index` is gone from every log.
async fn compact_past(c: &LocalCluster, group: u64, volume: u64, index: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP;
    let mut n = 0u64;
    loop {
        let mut bio = leader_bio(c, group).await?;
        for _ in 0..64 {
            n += 1;
            let r = bio
                .write(write(
                    range(group, volume, 1 + n % 200),
                    1000 + n,
                    1000 + n,
                    0,
                ))
                .await?
                .into_inner();
            anyhow::ensure!(r.error.is_none(), "filler write: {:?}", r.error);
        }
        let mut firsts = Vec::new();
        for &m in &c.members_of(group).await {
            let st = c.status(m as usize).await?;
            if let Some(g) = st.groups.iter().find(|g| g.group_id == group) {
                firsts.push(g.first_index);
            }
        }
        if !firsts.is_empty() && firsts.iter().all(|f| *f > index) {
            println!("after {n} filler writes every log starts past {index}: {firsts:?}");
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "logs of group {group} not compacted past {index} after {n} writes: {firsts:?}"
        );
    }
}

/// The first write (id 1, payload 1) applied and its log entry compacted
/// away everywhere; returns the block's range.
async fn first_write_then_compact(
    c: &LocalCluster,
    volume: u64,
    group: u64,
) -> anyhow::Result<BlockRange> {
    let x = range(group, volume, 0);
    let mut bio = leader_bio(c, group).await?;
    let r = bio.write(write(x, 1, 1, 0)).await?.into_inner();
    anyhow::ensure!(r.error.is_none(), "first write: {:?}", r.error);
    // Its answer is "lost": the client will retry it later.
    let (_, st) = c
        .group_status(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    compact_past(c, group, volume, st.commit_index).await?;
    Ok(x)
}

/// The newer write (id 2) completes, then the first one is retried at the
/// current leader: the block must still hold the newer write.
async fn newer_write_then_retry(c: &LocalCluster, group: u64, x: BlockRange) -> anyhow::Result<()> {
    let mut bio = leader_bio(c, group).await?;
    let r = bio.write(write(x, 2, 2, 0)).await?.into_inner();
    anyhow::ensure!(r.error.is_none(), "newer write: {:?}", r.error);
    let r = bio.write(write(x, 1, 1, 20_000)).await?.into_inner();
    anyhow::ensure!(
        r.error.is_none(),
        "the retry should be answered from its first copy: {:?}",
        r.error
    );
    let got = read(&mut bio, x).await?;
    assert!(
        got == payload(2, BLOCK as usize),
        "the retried first write was applied again and undid the newer write"
    );
    // The same retry unmarked, as a client that does not send
    // `retry_age_ms` (an older one) sends it, or a first attempt held up
    // past its own retry: answered from the first copy too.
    let r = bio.write(write(x, 1, 1, 0)).await?.into_inner();
    anyhow::ensure!(r.error.is_none(), "unmarked retry: {:?}", r.error);
    let got = read(&mut bio, x).await?;
    assert!(
        got == payload(2, BLOCK as usize),
        "an unmarked retry of the first write was applied again and undid the newer write"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_compaction_and_restart_is_not_applied_again() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(spec(3))?;
    c.wait_healthy(HEALTHY).await?;
    let (volume, group) = volume(&c).await?;
    let x = first_write_then_compact(&c, volume, group).await?;
    for i in 1..=3 {
        c.stop(i);
    }
    for i in 1..=3 {
        c.start_node(i)?;
    }
    c.wait_healthy(HEALTHY).await?;
    newer_write_then_retry(&c, group, x).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_at_a_leader_caught_up_by_snapshot_is_not_applied_again() -> anyhow::Result<()> {
    let c = LocalCluster::start(spec(4))?;
    c.wait_healthy(HEALTHY).await?;
    c.client()
        .await?
        .set_flags(raftblk_proto::ClusterFlags {
            norecover: true,
            norebalance: true,
            noout: false,
        })
        .await?;
    let (volume, group) = volume(&c).await?;
    let x = first_write_then_compact(&c, volume, group).await?;
    // A node without a replica gets one (by snapshot: the log it would
    // need is gone) in place of a follower, then leads.
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
    c.move_replica(group, from, to, STEP).await?;
    c.transfer_leader(group, to as usize, STEP).await?;
    newer_write_then_retry(&c, group, x).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_older_than_the_window_is_refused() -> anyhow::Result<()> {
    let c = LocalCluster::start(spec(3))?;
    c.wait_healthy(HEALTHY).await?;
    let (volume, group) = volume(&c).await?;
    let x = range(group, volume, 0);
    let mut bio = leader_bio(&c, group).await?;
    let r = bio.write(write(x, 2, 2, 0)).await?.into_inner();
    anyhow::ensure!(r.error.is_none(), "write: {:?}", r.error);
    // A retry of a request the group cannot vouch for any more.
    let old = raftblk_proto::RETRY_AGE_MAX_MS + 1;
    let r = bio.write(write(x, 1, 1, old)).await?.into_inner();
    let e = r
        .error
        .ok_or_else(|| anyhow::anyhow!("a retry older than the window was accepted"))?;
    assert_eq!(e.kind(), ErrorCode::RequestExpired, "{e:?}");
    assert!(
        e.message.contains("retry"),
        "unclear message: {}",
        e.message
    );
    assert!(read(&mut bio, x).await? == payload(2, BLOCK as usize));
    // A retry the group can still check is answered from its first copy
    // even when it is old.
    let r = bio.write(write(x, 2, 2, old)).await?.into_inner();
    assert!(r.error.is_none(), "{:?}", r.error);
    Ok(())
}
