//! Stored bytes per volume, as `raftblk volume list` and `volume info`
//! show them (like `rbd du`): blocks written count once each (a partial
//! write stores its whole block, a discard frees its blocks), blocks
//! never written count nothing, blocks kept for a snapshot count apart,
//! and a clone counts only the blocks it wrote (not the whiteouts its
//! discards leave); the figures match what the replicas' digests count, and stay
//! the same (no group counted twice or left out) after a node dies and
//! its groups elect new leaders.

use std::time::{Duration, Instant};

use raftblk_client::size::format_size;
use raftblk_cluster_tests::{bin, payload, ClusterSpec, LocalCluster};

const HEALTHY: Duration = Duration::from_secs(30);
const BLOCK: u64 = 4096;

/// Runs `raftblk ARGS` against the cluster: (stdout, stderr), or an error
/// naming the failed command.
fn text(cluster: &str, args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = std::process::Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(["--cluster", cluster, "--timeout-secs", "20"])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "raftblk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `raftblk --output json ARGS` against the cluster.
fn json(cluster: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let args: Vec<&str> = ["--output", "json"].iter().chain(args).copied().collect();
    Ok(serde_json::from_str(&text(cluster, &args)?.0)?)
}

/// `(data bytes, snapshot bytes, complete)` of `name` in `volume list`.
fn listed(cluster: &str, name: &str) -> anyhow::Result<(u64, u64, bool)> {
    let all = json(cluster, &["volume", "list"])?;
    let v = all
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .ok_or_else(|| anyhow::anyhow!("{name} not in {all:#}"))?;
    let num = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| anyhow::anyhow!("{k} is not a number in {v:#}"))
    };
    anyhow::ensure!(
        num("stored_bytes")? == num("data_stored_bytes")? + num("snapshot_stored_bytes")?,
        "stored_bytes is not data plus snapshots: {v:#}"
    );
    Ok((
        num("data_stored_bytes")?,
        num("snapshot_stored_bytes")?,
        v["stored_complete"].as_bool().unwrap_or(false),
    ))
}

/// Checks `name`'s figures in `volume list` (JSON), `volume info` (JSON
/// and text), polling up to 30 s for a complete count (a group may be
/// electing a leader).
fn expect_stored(
    cluster: &str,
    name: &str,
    data_blocks: u64,
    kept_blocks: u64,
) -> anyhow::Result<()> {
    let want = (data_blocks * BLOCK, kept_blocks * BLOCK);
    let until = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let (data, kept, complete) = listed(cluster, name)?;
        if complete || Instant::now() > until {
            anyhow::ensure!(complete, "the count of {name} never completed");
            break (data, kept);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    anyhow::ensure!(
        got == want,
        "{name}: listed (data, snapshots) {got:?}, want {want:?}"
    );
    let info = json(cluster, &["volume", "info", name])?;
    anyhow::ensure!(
        info["data_stored_bytes"].as_u64() == Some(want.0)
            && info["snapshot_stored_bytes"].as_u64() == Some(want.1),
        "{name}: info says {info:#}, want {want:?}"
    );
    let (out, _) = text(cluster, &["volume", "info", name])?;
    let line = out
        .lines()
        .find(|l| l.starts_with("stored:"))
        .ok_or_else(|| anyhow::anyhow!("no stored: line in\n{out}"))?;
    anyhow::ensure!(
        line.contains(&format!("({} bytes;", want.0 + want.1)),
        "{name}: {line}"
    );
    Ok(())
}

/// Blocks and kept blocks over every data group, from the digest of one
/// running replica of each (which reads every value).
async fn digests(c: &LocalCluster, groups: u64) -> anyhow::Result<(u64, u64)> {
    let mut sum = (0, 0);
    for g in 1..=groups {
        let members = c.members_of(g).await;
        let Some(&r) = members.iter().find(|&&r| c.is_running(r as usize)) else {
            anyhow::bail!("group {g} has no running replica");
        };
        let (b, k) = c.stored_counts(r as usize, g).await?;
        sum = (sum.0 + b, sum.1 + k);
    }
    Ok(sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_list_and_info_show_what_each_volume_stores() -> anyhow::Result<()> {
    let mut c = LocalCluster::start(ClusterSpec::default())?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    let cl = c.cluster_arg();
    let a = client.create_volume("du-a", 64 << 20).await?;
    client.create_volume("du-b", 16 << 20).await?;
    let cl2 = cl.clone();
    tokio::task::spawn_blocking(move || expect_stored(&cl2, "du-a", 0, 0)).await??;

    let v = client.open_volume("du-a").await?;
    // 1 MiB at 0 and 512 KiB at 40 MiB: chunks in several groups.
    v.write(0, &payload(1, 1 << 20)).await?;
    v.write(40 << 20, &payload(2, 512 << 10)).await?;
    // 512 bytes inside one block: the block is stored whole.
    v.write((50 << 20) + 1024, &payload(3, 512)).await?;
    // A discard frees the blocks it covers.
    v.discard(0, 256 << 10).await?;
    let data_blocks = 256 - 64 + 128 + 1;
    let cl2 = cl.clone();
    tokio::task::spawn_blocking(move || {
        expect_stored(&cl2, "du-a", data_blocks, 0)?;
        expect_stored(&cl2, "du-b", 0, 0)
    })
    .await??;

    // After a snapshot, overwriting 32 stored blocks keeps their old
    // contents; writing 16 blocks that were never written keeps nothing
    // (the snapshot only notes they were absent).
    client.create_snapshot("du-a", "s1").await?;
    v.write(256 << 10, &payload(4, 128 << 10)).await?;
    v.write(8 << 20, &payload(5, 64 << 10)).await?;
    let data_blocks = data_blocks + 16;
    let kept_blocks = 32;
    let cl2 = cl.clone();
    tokio::task::spawn_blocking(move || expect_stored(&cl2, "du-a", data_blocks, kept_blocks))
        .await??;

    // A clone counts only the blocks it wrote itself: two whole ones, and
    // one it wrote 512 bytes of (stored whole, the rest from its parent).
    client.clone_volume("du-a", "s1", "du-c").await?;
    let cv = client.open_volume("du-c").await?;
    cv.write(2 << 20, &payload(6, 2 * BLOCK as usize)).await?;
    cv.write((512 << 10) + 512, &payload(7, 512)).await?;
    // Discarding blocks the parent holds stores whiteouts (so they read
    // as zeros, not as the parent's): they hold no data.
    cv.discard(600 << 10, 2 * BLOCK).await?;
    let clone_blocks = 3;
    let cl2 = cl.clone();
    tokio::task::spawn_blocking(move || {
        expect_stored(&cl2, "du-c", clone_blocks, 0)?;
        expect_stored(&cl2, "du-a", data_blocks, kept_blocks)
    })
    .await??;

    // The library call agrees, and so do the replicas' own digests
    // (counted with the values read, on one running replica per group).
    let report = client
        .volume_usage(&[client.volume_info("du-a").await?])
        .await?;
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.of(a.id).stored_bytes, data_blocks * BLOCK);
    assert_eq!(report.of(a.id).snapshot_bytes, kept_blocks * BLOCK);
    let groups = c.status(1).await?.data_group_count;
    // The digests count every block key, the clone's two whiteouts too.
    let whiteouts = 2;
    assert_eq!(
        digests(&c, groups).await?,
        (data_blocks + clone_blocks + whiteouts, kept_blocks)
    );

    // A node that leads every data group dies: the groups are counted by
    // their new leaders, none twice, none left out.
    for g in 1..=groups {
        c.transfer_leader(g, 3, Duration::from_secs(20)).await?;
    }
    c.kill(3);
    let cl2 = cl.clone();
    tokio::task::spawn_blocking(move || {
        expect_stored(&cl2, "du-a", data_blocks, kept_blocks)?;
        expect_stored(&cl2, "du-b", 0, 0)?;
        expect_stored(&cl2, "du-c", clone_blocks, 0)
    })
    .await??;
    let (out, err) = tokio::task::spawn_blocking(move || text(&cl, &["volume", "list"])).await??;
    println!("{out}{err}");
    assert!(
        out.lines().next().is_some_and(|h| h.contains("STORED")),
        "{out}"
    );
    // The STORED column: data plus what the snapshots keep.
    for (name, blocks) in [
        ("du-a", data_blocks + kept_blocks),
        ("du-b", 0),
        ("du-c", clone_blocks),
    ] {
        let row = out
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .ok_or_else(|| anyhow::anyhow!("no row for {name}:\n{out}"))?;
        // ID NAME SIZE STORED CHUNK, each size two words ("1.4 MiB").
        let cols: Vec<&str> = row.split_whitespace().collect();
        anyhow::ensure!(cols.len() == 8, "{row}");
        let stored = format!("{} {}", cols[4], cols[5]);
        assert_eq!(stored, format_size(blocks * BLOCK), "{row}");
    }
    Ok(())
}
