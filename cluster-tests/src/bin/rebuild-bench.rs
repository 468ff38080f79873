//! `rebuild-bench`: how fast a cluster re-replicates a lost node's data,
//! and what clients see meanwhile. Four local nodes (real processes, the
//! test harness), a volume filled with data, then `kill -9` of node 4 for
//! good: it is marked down after 1 s and out 2 s later, and the placement
//! driver rebuilds its replicas on nodes 1-3. Prints one table row per
//! throttle setting (the default `placement.snapshot_bytes_per_sec` and
//! unthrottled): data rebuilt, rebuild time, MiB/s per rebuilding node and
//! its ratio to this disk's measured write bandwidth, and a 4 KiB QD1
//! write probe's p50/p99/max latency before and during the rebuild.
//!
//!   cargo build --release --workspace --bins && \
//!   target/release/rebuild-bench [DATA_MIB] [PROBE_SECS]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use raftblk_client::Volume;
use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::NodeState;
use rand::Rng as _;

const GROUPS: u64 = 16;
const LOST: usize = 4;

fn pct(lat: &mut [Duration], p: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat.sort_unstable();
    let i = ((lat.len() - 1) as f64 * p).round() as usize;
    lat[i].as_secs_f64() * 1000.0
}

/// Write bandwidth of the disk under `dir`: 512 MiB, direct, synced.
fn disk_write_mib_s(dir: &std::path::Path) -> anyhow::Result<f64> {
    let f = dir.join("ddtest");
    let t = Instant::now();
    let st = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=1M",
            "count=512",
            "oflag=direct",
            "conv=fdatasync",
        ])
        .arg(format!("of={}", f.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .context("run dd")?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&f);
    anyhow::ensure!(st.success(), "dd failed");
    Ok(512.0 / secs)
}

/// 4 KiB writes at random offsets of the first `region` bytes, one at a
/// time, until `stop`; returns (start time, latency) of each.
async fn probe(
    vol: Volume,
    region: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(Instant, Duration)> {
    let mut out = Vec::new();
    let data = payload(77, 4096);
    while !*stop.borrow() && out.len() < 1_000_000 {
        let off = rand::thread_rng().gen_range(0..region / 4096) * 4096;
        let t = Instant::now();
        if vol.write(off, &data).await.is_ok() {
            out.push((t, t.elapsed()));
        }
    }
    out
}

struct Row {
    throttle: String,
    rebuilt_mib: f64,
    secs: f64,
    per_node: f64,
    disk: f64,
    before: (f64, f64, f64),
    during: (f64, f64, f64),
    probe_ops: usize,
}

async fn run(
    throttle: Option<u64>,
    data_mib: u64,
    probe_secs: u64,
    disk: &mut Option<f64>,
) -> anyhow::Result<Row> {
    let spec = ClusterSpec {
        nodes: 4,
        data_groups: GROUPS,
        chunk_size_bytes: 4 << 20,
        tick_interval_ms: 100,
        node_down_after_ms: 1000,
        down_out_secs: 2,
        scrub_blocks_per_sec: 0,
        snapshot_bytes_per_sec: throttle,
        ..ClusterSpec::default()
    };
    let mut c = LocalCluster::start(spec)?;
    c.wait_healthy(Duration::from_secs(60)).await?;
    if disk.is_none() {
        *disk = Some(disk_write_mib_s(
            &c.data_dir(1)
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_default(),
        )?);
    }
    let client = c.client().await?;
    let size = data_mib << 20;
    client.create_volume("rb", size).await?;
    let vol = client.open_volume("rb").await?;
    // Fill: 1 MiB writes, 8 in flight.
    let chunk = payload(5, 1 << 20);
    let mut off = 0u64;
    while off < size {
        let mut batch = Vec::new();
        for _ in 0..8 {
            if off >= size {
                break;
            }
            batch.push(vol.write(off, &chunk));
            off += 1 << 20;
        }
        for r in futures::future::join_all(batch).await {
            r?;
        }
    }
    // What node 4 holds.
    let st = c.status(LOST).await?;
    let mut bytes = 0u64;
    for g in st.groups.iter().filter(|g| g.group_id != 0) {
        bytes += c.digest(LOST, g.group_id).await?.1 * 4096;
    }
    // Healthy latency.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let p = tokio::spawn(probe(vol.clone(), size, rx));
    tokio::time::sleep(Duration::from_secs(probe_secs)).await;
    let _ = tx.send(true);
    let mut before: Vec<Duration> = p.await?.into_iter().map(|(_, l)| l).collect();
    // Lose node 4 for good, probing all along.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let p = tokio::spawn(probe(vol.clone(), size, rx));
    c.kill(LOST);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut out_at = None;
    let healed_at = loop {
        anyhow::ensure!(Instant::now() < deadline, "no rebuild within 600 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(map) = client.cluster_map().await else {
            continue;
        };
        if out_at.is_none()
            && map
                .nodes
                .iter()
                .any(|n| n.id == LOST as u64 && n.state == NodeState::Out as i32)
        {
            out_at = Some(Instant::now());
        }
        let mut healed = out_at.is_some();
        for g in 1..=GROUPS {
            match c.group_status(g).await {
                Some((_, s))
                    if s.replicas.len() == 3
                        && !s.replicas.contains(&(LOST as u64))
                        && s.learners.is_empty()
                        && s.voters_outgoing.is_empty() => {}
                _ => healed = false,
            }
        }
        if healed {
            break Instant::now();
        }
    };
    let _ = tx.send(true);
    let out_at = out_at.unwrap_or(healed_at);
    let samples = p.await?;
    let mut during: Vec<Duration> = samples
        .iter()
        .filter(|(t, _)| *t >= out_at && *t <= healed_at)
        .map(|(_, l)| *l)
        .collect();
    let secs = healed_at.duration_since(out_at).as_secs_f64().max(1e-3);
    let rebuilt_mib = bytes as f64 / (1 << 20) as f64;
    let max = |v: &[Duration]| v.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let probe_ops = during.len();
    Ok(Row {
        throttle: match throttle {
            None => "default (64 MiB/s per sender)".into(),
            Some(0) => "unthrottled".into(),
            Some(b) => format!("{} MiB/s", b >> 20),
        },
        rebuilt_mib,
        secs,
        // Nodes 1-3 each receive about a third.
        per_node: rebuilt_mib / 3.0 / secs,
        disk: disk.unwrap_or(0.0),
        before: (pct(&mut before, 0.5), pct(&mut before, 0.99), max(&before)),
        during: (pct(&mut during, 0.5), pct(&mut during, 0.99), max(&during)),
        probe_ops,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let data_mib: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(512);
    let probe_secs: u64 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(8);
    let mut disk = None;
    let mut rows = Vec::new();
    for throttle in [None, Some(0)] {
        rows.push(run(throttle, data_mib, probe_secs, &mut disk).await?);
    }
    println!(
        "\n4 local nodes, {GROUPS} groups x 3 replicas, {data_mib} MiB written; node {LOST} killed for good (down after 1 s, out 2 s later); rebuild timed from out to every group back at 3 replicas. Probe: 4 KiB random writes at QD1 through the client library.\n"
    );
    println!("| throttle | rebuilt | rebuild time | MiB/s per rebuilding node | vs disk write | probe p50 / p99 / max before (ms) | during rebuild (ms) | probe writes during |");
    println!("|---|---:|---:|---:|---:|---|---|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} MiB | {:.1} s | {:.1} | {:.2}x of {:.0} MiB/s | {:.2} / {:.2} / {:.0} | {:.2} / {:.2} / {:.0} | {} |",
            r.throttle,
            r.rebuilt_mib,
            r.secs,
            r.per_node,
            r.per_node / r.disk.max(1e-9),
            r.disk,
            r.before.0,
            r.before.1,
            r.before.2,
            r.during.0,
            r.during.1,
            r.during.2,
            r.probe_ops
        );
    }
    Ok(())
}
