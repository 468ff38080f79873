//! The fence is part of a group's replicated state: after holder B took a
//! volume over from holder A, one replica of the volume's group moves to
//! another node (the new replica catches up by snapshot) and leads; A's
//! late writes and discards, replayed against the new replica set with
//! A's epoch, are refused as FENCED and change no block; nor does a retry
//! of a write A made before the takeover. Then the operator's view: the
//! CLI shows the holder, refuses an import while B holds the volume, and
//! `volume detach --force` breaks B's lease so that the next holder
//! attaches without taking over, fencing B.

use std::time::Duration;

use raftblk_client::{AttachOptions, ClientError};
use raftblk_cluster_tests::{bin, payload, ClusterSpec, LocalCluster};
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::{placement, BlockRange, DiscardRequest, ErrorCode, FenceRequest, WriteRequest};

const HEALTHY: Duration = Duration::from_secs(30);
const STEP: Duration = Duration::from_secs(20);
const BLOCK: u64 = 4096;
/// Blocks A writes; B overwrites the first `B_BLOCKS`.
const A_BLOCKS: u64 = 16;
const B_BLOCKS: u64 = 8;
/// B's writes after the takeover: past the log compaction threshold, so
/// the moved replica is caught up by a snapshot.
const FILLER_WRITES: u64 = 200;

fn spec() -> ClusterSpec {
    ClusterSpec {
        nodes: 4,
        data_groups: 4,
        log_compact_threshold_entries: 64,
        log_retain_entries: 8,
        ..ClusterSpec::default()
    }
}

/// Runs the `raftblk` CLI: (success, stdout, stderr).
fn cli(cluster: &str, args: &[&str]) -> (bool, String, String) {
    match std::process::Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(["--cluster", cluster, "--timeout-secs", "10"])
        .args(args)
        .output()
    {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("cannot run raftblk: {e}")),
    }
}

fn holder(name: &str, takeover: bool) -> AttachOptions {
    AttachOptions {
        holder: name.to_owned(),
        takeover,
        reuse: false,
        ..AttachOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_survives_a_replica_move() -> anyhow::Result<()> {
    let c = LocalCluster::start(spec())?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    // Moves by hand only.
    client
        .set_flags(raftblk_proto::ClusterFlags {
            norecover: true,
            norebalance: true,
            noout: false,
        })
        .await?;
    let info = client.create_volume("fv", 4 << 20).await?;
    let group = placement::chunk_group(info.id, 0, spec().data_groups);

    // A writes, then B takes the volume over and overwrites part of it.
    let vol_a = client
        .open_volume("fv")
        .await?
        .with_attach_options(holder("A", false));
    for b in 0..A_BLOCKS {
        vol_a
            .write(b * BLOCK, &payload(100 + b, BLOCK as usize))
            .await?;
    }
    let epoch_a = vol_a.attach().await?.epoch();
    // One of A's writes with a request id of its own, retried later.
    let early_id: Vec<u8> = [0xEAu8; 16].to_vec();
    let early = |retry_age_ms| WriteRequest {
        range: Some(BlockRange {
            group_id: group,
            volume_id: info.id,
            offset_bytes: BLOCK,
            length_bytes: BLOCK,
        }),
        data: payload(101, BLOCK as usize).into(),
        request_id: early_id.clone().into(),
        retry_age_ms,
        epoch: epoch_a,
        clone: None,
    };
    let leader_addr = {
        let (l, _) = c
            .group_status(group)
            .await
            .ok_or_else(|| anyhow::anyhow!("group {group} has no leader"))?;
        c.addr(l)
    };
    let r = BlockIoClient::new(client.channel(&leader_addr)?)
        .write(early(0))
        .await?
        .into_inner();
    anyhow::ensure!(r.error.is_none(), "A's write: {:?}", r.error);
    let vol_b = client
        .open_volume("fv")
        .await?
        .with_attach_options(holder("B", true));
    let epoch_b = vol_b.attach().await?.epoch();
    anyhow::ensure!(epoch_b > epoch_a, "takeover epoch {epoch_b} <= {epoch_a}");
    for b in 0..B_BLOCKS {
        vol_b
            .write(b * BLOCK, &payload(300 + b, BLOCK as usize))
            .await?;
    }
    for i in 0..FILLER_WRITES {
        let b = 64 + i % 128;
        vol_b
            .write(b * BLOCK, &payload(500 + i, BLOCK as usize))
            .await?;
    }
    // A's own handle finds out at its next write.
    match vol_a.write(0, &payload(1, BLOCK as usize)).await {
        Err(ClientError::Fenced(_)) => {}
        other => anyhow::bail!("A wrote after the takeover: {other:?}"),
    }

    // Move a follower's replica of the group to the node without one; the
    // new replica leads.
    let (leader, st) = c
        .group_status(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("group {group} has no leader"))?;
    let from = st
        .replicas
        .iter()
        .copied()
        .find(|r| *r != leader as u64)
        .ok_or_else(|| anyhow::anyhow!("group {group} has no follower"))?;
    let members = c.members_of(group).await;
    let to = (1..=spec().nodes as u64)
        .find(|n| !members.contains(n))
        .ok_or_else(|| anyhow::anyhow!("every node hosts group {group}"))?;
    let snapshots_before = c.status(to as usize).await?.snapshots_applied;
    c.move_replica(group, from, to, STEP).await?;
    let snapshots = c.status(to as usize).await?.snapshots_applied - snapshots_before;
    anyhow::ensure!(
        snapshots > 0,
        "the new replica was not caught up by a snapshot"
    );
    c.wait_gone(from as usize, group, STEP).await?;
    c.transfer_leader(group, to as usize, STEP).await?;

    // A's late requests, replayed with its epoch at the new leader.
    let ch = client.channel(&c.addr(to as usize))?;
    let mut bio = BlockIoClient::new(ch);
    for b in 0..A_BLOCKS {
        let range = BlockRange {
            group_id: group,
            volume_id: info.id,
            offset_bytes: b * BLOCK,
            length_bytes: BLOCK,
        };
        let mut id = vec![0xFEu8; 8];
        id.extend_from_slice(&b.to_be_bytes());
        let w = bio
            .write(WriteRequest {
                range: Some(range),
                data: payload(900 + b, BLOCK as usize).into(),
                request_id: id.into(),
                retry_age_ms: 0,
                epoch: epoch_a,
                clone: None,
            })
            .await?
            .into_inner();
        let code = w.error.as_ref().map(|e| e.kind());
        anyhow::ensure!(
            code == Some(ErrorCode::Fenced),
            "A's late write to block {b}: {:?}",
            w.error
        );
        let d = bio
            .discard(DiscardRequest {
                range: Some(range),
                zeroes: true,
                request_id: Default::default(),
                retry_age_ms: 0,
                epoch: epoch_a,
                clone: None,
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            d.error.as_ref().map(|e| e.kind()) == Some(ErrorCode::Fenced),
            "A's late discard of block {b}: {:?}",
            d.error
        );
    }
    // A fence above every epoch handed out would leave the volume
    // unwritable for good: refused.
    let f = bio
        .fence(FenceRequest {
            group_id: group,
            volume_id: info.id,
            epoch: epoch_b + 100,
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        f.error.as_ref().map(|e| e.kind()) == Some(ErrorCode::InvalidArgument),
        "a fence with an epoch never handed out: {:?}",
        f.error
    );
    // The retry of A's early write is answered from the group's memory of
    // it (applied once, before the takeover) or refused: never applied.
    let r = bio.write(early(2_000)).await?.into_inner();
    println!("fence_move: retry of A's early write: {:?}", r.error);
    // Every block reads B's data or A's from before the takeover.
    for b in 0..A_BLOCKS {
        let want = if b < B_BLOCKS { 300 + b } else { 100 + b };
        let got = vol_b.read(b * BLOCK, BLOCK).await?;
        anyhow::ensure!(
            got == payload(want, BLOCK as usize),
            "block {b} does not hold what it should"
        );
    }
    // And the replicas, the moved one included, agree (fence included).
    c.wait_replicas_identical(group, STEP).await?;

    // The CLI: info names B, an import is refused naming B, a detach
    // without --force is refused, one with --force breaks the lease.
    let cluster = c.cluster_arg();
    let (ok, out, err) = cli(&cluster, &["volume", "info", "fv"]);
    anyhow::ensure!(
        ok && out.contains("attached:   B (epoch"),
        "volume info does not name B:\n{out}{err}"
    );
    let img = tempfile::NamedTempFile::new()?;
    std::fs::write(img.path(), payload(7, 4096))?;
    let path = img.path().display().to_string();
    let (ok, _, err) = cli(&cluster, &["volume", "import", "fv", &path]);
    anyhow::ensure!(
        !ok && err.contains("is attached by \"B\""),
        "import while B holds the volume:\n{err}"
    );
    let (ok, _, err) = cli(&cluster, &["volume", "detach", "fv"]);
    anyhow::ensure!(
        !ok && err.contains("--force"),
        "detach without --force:\n{err}"
    );
    let (ok, out, err) = cli(&cluster, &["volume", "detach", "fv", "--force"]);
    anyhow::ensure!(ok, "detach --force:\n{out}{err}");
    let (_, out, _) = cli(&cluster, &["volume", "info", "fv"]);
    anyhow::ensure!(
        out.contains(&format!("attached:   no (last epoch {epoch_b})")),
        "after detach --force:\n{out}"
    );
    // The next holder needs no takeover, and its attach fences B.
    let vol_c = client
        .open_volume("fv")
        .await?
        .with_attach_options(holder("C", false));
    vol_c.write(0, &payload(42, BLOCK as usize)).await?;
    match vol_b.write(0, &payload(43, BLOCK as usize)).await {
        Err(ClientError::Fenced(_)) => {}
        other => anyhow::bail!("B wrote after its lease was broken and C attached: {other:?}"),
    }
    anyhow::ensure!(vol_b.read(0, BLOCK).await? == payload(42, BLOCK as usize));
    println!(
        "fence_move: group {group} moved from node {from} to node {to}; A's epoch {epoch_a} refused under B's {epoch_b}"
    );
    Ok(())
}
