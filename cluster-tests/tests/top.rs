//! `raftblk top` against a live cluster: while a client writes to a
//! volume, `raftblk top --count 2` (finding each node's metrics endpoint
//! through its status) shows every node, and the volume by name with the
//! write rate it is getting.

use std::process::Command;
use std::time::{Duration, Instant};

use raftblk_cluster_tests::{bin, ClusterSpec, LocalCluster};

#[test]
fn top_shows_nodes_and_the_busy_volume() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume("topvol", 64 << 20))?;
    let vol = rt.block_on(client.open_volume("topvol"))?;
    // Writes for as long as top runs (at most 60 s).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let writer = rt.spawn(async move {
        let until = Instant::now() + Duration::from_secs(60);
        let data = vec![7u8; 4096];
        let mut n = 0u64;
        while Instant::now() < until && !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            vol.write((n % 1024) * 4096, &data).await?;
            n += 1;
        }
        anyhow::Ok(n)
    });
    let out = Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(["top", "--count", "2", "--interval-secs", "1", "--cluster"])
        .arg(cluster.cluster_arg())
        .output()?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = rt.block_on(writer)??;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "raftblk top failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(writes > 0);
    // The last frame.
    let frame = text.rsplit("raftblk top:").next().unwrap_or_default();
    for i in 1..=3 {
        let addr = cluster.addr(i);
        assert!(
            frame
                .lines()
                .any(|l| l.contains(&addr) && !l.contains("unreachable")),
            "node {i} ({addr}) missing:\n{frame}"
        );
    }
    let row = frame
        .lines()
        .find(|l| l.starts_with("topvol "))
        .ok_or_else(|| anyhow::anyhow!("no row for the busy volume:\n{frame}"))?;
    // VOLUME ID R-IOPS W-IOPS ...
    let w_iops: f64 = row
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(w_iops > 10.0, "write IOPS {w_iops} in: {row}");

    // The read commands for scripts: --output json parses, and says what
    // the text says.
    let json = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = Command::new(bin("raftblk"))
            .envs(raftblk_cluster_tests::tls::cli_env())
            .args(["--cluster", &cluster.cluster_arg(), "--output", "json"])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let info = json(&["volume", "info", "topvol"])?;
    assert_eq!(info["name"], "topvol");
    assert_eq!(info["size_bytes"], 64u64 << 20);
    assert!(
        info["created"]
            .as_str()
            .is_some_and(|d| d.starts_with("20") && d.ends_with('Z')),
        "{info}"
    );
    let list = json(&["volume", "list"])?;
    assert!(
        list.as_array()
            .is_some_and(|a| a.iter().any(|v| v["name"] == "topvol")),
        "{list}"
    );
    let status = json(&["cluster", "status"])?;
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(
        status["nodes"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    Ok(())
}
