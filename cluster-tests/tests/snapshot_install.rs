//! A big snapshot install does not stall the other groups of its node.
//!
//! Node 3 is killed while ≥ 256 MiB of incompressible data go to one group
//! G, whose leader compacts its log far past node 3. Node 3 restarts, takes
//! the leadership of every other data group, and installs G's snapshot
//! while it leads them. Throughout the install those groups keep their
//! leader (no term change, leader still node 3 on every replica) and keep
//! serving writes and reads through node 3 with no gap between completed
//! I/Os longer than one election timeout. Finally G's replicas converge.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use raftblk_client::ClientOptions;
use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_proto::placement::chunk_group;

const HEALTHY: Duration = Duration::from_secs(30);
/// Data written to group G while node 3 is down.
const BIG_BYTES: u64 = 256 << 20;
const WRITE_BYTES: u64 = 1 << 20;
const CHUNK_BYTES: u64 = 1 << 20;
const DATA_GROUPS: u64 = 4;
const INSTALLER: usize = 3;

/// Largest interval without a completed I/O in `[from, to]`, given the
/// sorted completion instants.
fn longest_gap(done: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut gap = Duration::ZERO;
    for &t in done.iter().filter(|t| **t > from && **t <= to) {
        gap = gap.max(t.duration_since(last));
        last = t;
    }
    gap.max(to.saturating_duration_since(last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_snapshot_install_does_not_stall_other_groups() -> anyhow::Result<()> {
    let spec = ClusterSpec {
        data_groups: DATA_GROUPS,
        chunk_size_bytes: CHUNK_BYTES,
        log_compact_threshold_entries: 64,
        log_retain_entries: 16,
        ..ClusterSpec::default()
    };
    let election_timeout =
        Duration::from_millis(spec.tick_interval_ms * spec.election_ticks as u64);
    let mut c = LocalCluster::start(spec)?;
    c.wait_healthy(HEALTHY).await?;
    let opts = ClientOptions {
        deadline: Duration::from_secs(20),
        attempt_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let client = c.client_with(opts).await?;
    let size: u64 = 2 << 30;
    client.create_volume("big", size).await?;
    let vol = client.open_volume("big").await?;
    let vid = vol.info().id;
    let nchunks = size / CHUNK_BYTES;
    let big_group = chunk_group(vid, 0, DATA_GROUPS);
    let big_chunks: Vec<u64> = (0..nchunks)
        .filter(|&k| chunk_group(vid, k, DATA_GROUPS) == big_group)
        .take((BIG_BYTES / CHUNK_BYTES) as usize)
        .collect();
    anyhow::ensure!(
        big_chunks.len() as u64 * CHUNK_BYTES >= BIG_BYTES,
        "not enough chunks in group {big_group}"
    );
    // One chunk per other group for the probe I/O.
    let mut probe: BTreeMap<u64, u64> = BTreeMap::new();
    for k in 0..nchunks {
        let g = chunk_group(vid, k, DATA_GROUPS);
        if g != big_group {
            probe.entry(g).or_insert(k);
        }
    }
    anyhow::ensure!(probe.len() as u64 == DATA_GROUPS - 1, "no probe chunks");
    for (&g, &k) in &probe {
        vol.write(k * CHUNK_BYTES, &payload(g, 4096)).await?;
    }
    let before = c
        .status(INSTALLER)
        .await?
        .groups
        .into_iter()
        .find(|s| s.group_id == big_group)
        .ok_or_else(|| anyhow::anyhow!("node {INSTALLER} lacks group {big_group}"))?;

    // Node 3 down: fill G with incompressible data, 16 writes of 1 MiB in
    // flight, so its peers compact their logs far past node 3's.
    c.kill(INSTALLER);
    c.wait_healthy(HEALTHY).await?;
    let t = Instant::now();
    stream::iter(big_chunks.iter().copied())
        .map(|k| {
            let vol = vol.clone();
            async move {
                let data = payload(0x5eed_0000 + k, WRITE_BYTES as usize);
                vol.write(k * CHUNK_BYTES, &data).await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!(
        "wrote {} MiB to group {big_group} in {:?} with node {INSTALLER} down",
        BIG_BYTES >> 20,
        t.elapsed()
    );
    let leader = c
        .leader_of(big_group)
        .await
        .ok_or_else(|| anyhow::anyhow!("group {big_group} has no leader"))?;
    let first = c
        .status(leader)
        .await?
        .groups
        .into_iter()
        .find(|s| s.group_id == big_group)
        .map(|s| s.first_index)
        .unwrap_or(0);
    anyhow::ensure!(
        first > before.last_index + 1,
        "the leader of group {big_group} did not compact past node {INSTALLER} ({first} vs {})",
        before.last_index
    );

    // Node 3 back: it leads every other group before G's snapshot (being
    // streamed now) is installed. Its install thread waits 3 s before it
    // starts (a failpoint; the store thread goes on), so the transfers
    // below always come first, however fast this machine streams.
    c.set_next_env(
        INSTALLER,
        &[("FAILPOINTS", "snapshot_install_start=sleep(3000)")],
    );
    c.start_node(INSTALLER)?;
    let transfers = probe
        .keys()
        .map(|&g| c.transfer_leader(g, INSTALLER, Duration::from_secs(15)));
    futures::future::try_join_all(transfers).await?;
    let led_at = Instant::now();
    let applied_at_lead = c.status(INSTALLER).await?.snapshots_applied;
    anyhow::ensure!(
        applied_at_lead == 0,
        "node {INSTALLER} installed the snapshot before it led the other groups; nothing measured"
    );
    // Terms of the other groups as every replica sees them now.
    let terms = |s: &raftblk_proto::NodeStatusResponse| -> BTreeMap<u64, (u64, u64)> {
        s.groups
            .iter()
            .filter(|g| probe.contains_key(&g.group_id))
            .map(|g| (g.group_id, (g.term, g.leader_id)))
            .collect()
    };
    let mut base: BTreeMap<usize, BTreeMap<u64, (u64, u64)>> = BTreeMap::new();
    for i in 1..=3 {
        base.insert(i, terms(&c.status(i).await?));
    }
    for (i, m) in &base {
        for (g, (_, l)) in m {
            anyhow::ensure!(
                *l == INSTALLER as u64,
                "node {i} sees leader {l} for group {g} after the transfer"
            );
        }
    }

    // Probe I/O on the other groups: a 4 KiB write then its read, in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Mutex<BTreeMap<u64, Vec<Instant>>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for (&g, &k) in &probe {
        let vol = vol.clone();
        let stop = stop.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let data = payload((g << 40) | n, 4096);
                let off = k * CHUNK_BYTES + (n % 64) * 4096;
                vol.write(off, &data).await?;
                let now = Instant::now();
                done.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(g)
                    .or_default()
                    .push(now);
                let got = vol.read(off, 4096).await?;
                anyhow::ensure!(got == data, "group {g}: read back differs");
                let now = Instant::now();
                done.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(g)
                    .or_default()
                    .push(now);
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }

    // Watch the install: node 3's counter, its staged file, every replica's
    // view of the other groups' leaders.
    let snap_dir = c.data_dir(INSTALLER).join("snap");
    let mut file_seen: Option<Instant> = None;
    let mut file_bytes = 0u64;
    let mut installed_at: Option<Instant> = None;
    // First change seen per (node, group).
    let mut changes: BTreeMap<(usize, u64), String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(rd) = std::fs::read_dir(&snap_dir) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "snap") {
                    file_seen.get_or_insert_with(Instant::now);
                    file_bytes = file_bytes.max(e.metadata().map(|m| m.len()).unwrap_or(0));
                }
            }
        }
        for i in 1..=3 {
            let Ok(s) = c.status(i).await else { continue };
            if i == INSTALLER && s.snapshots_applied > 0 && installed_at.is_none() {
                installed_at = Some(Instant::now());
            }
            for (g, (term, l)) in terms(&s) {
                let (term0, _) = base[&i][&g];
                if term != term0 || (l != 0 && l != INSTALLER as u64) {
                    changes.entry((i, g)).or_insert_with(|| {
                        format!(
                            "node {i} sees group {g} at term {term} led by {l} (was term {term0} led by {INSTALLER})"
                        )
                    });
                }
            }
        }
        if let Some(t) = installed_at {
            if t.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        if Instant::now() >= deadline {
            stop.store(true, Ordering::Relaxed);
            anyhow::bail!(
                "node {INSTALLER} did not install the snapshot of group {big_group} within 90 s; log:\n{}",
                c.log_tail(INSTALLER, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    let installed_at = installed_at.unwrap_or(end);
    let done = done.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut worst = Duration::ZERO;
    for (g, times) in &done {
        let gap = longest_gap(times, led_at, end);
        eprintln!(
            "group {g}: {} I/Os completed, longest gap {gap:?}",
            times.len()
        );
        worst = worst.max(gap);
    }
    eprintln!(
        "snapshot of group {big_group}: {} MiB file; install finished {:?} after the file was staged, {:?} after node {INSTALLER} took the lead; {ops} write+read rounds on the other groups; longest I/O gap {worst:?} (election timeout {election_timeout:?}); leader changes seen on {} (node, group) pairs",
        file_bytes >> 20,
        file_seen.map(|f| installed_at.saturating_duration_since(f)),
        installed_at.duration_since(led_at),
        changes.len()
    );
    let log = std::fs::read_to_string(c.log_path(INSTALLER)).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("snapshot")) {
        eprintln!("node {INSTALLER}: {line}");
    }
    anyhow::ensure!(
        changes.is_empty(),
        "leaders changed during the install:\n{}",
        changes.into_values().collect::<Vec<_>>().join("\n")
    );
    anyhow::ensure!(
        worst < election_timeout,
        "I/O on the other groups stalled {worst:?} (election timeout {election_timeout:?})"
    );
    let (kvs, _) = c
        .wait_replicas_identical(big_group, Duration::from_secs(60))
        .await?;
    eprintln!("group {big_group}: replicas identical, {kvs} pairs");
    Ok(())
}
