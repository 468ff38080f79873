//! Durability and recovery with real processes: a volume survives a
//! restart of every node; `kill -9` of a group leader while writes stream
//! loses no acknowledged write and I/O resumes; the killed node, restarted
//! after its peers compacted their logs, catches up by snapshot and ends up
//! byte-identical to its peers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftblk_client::ClientOptions;
use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};

const HEALTHY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_survives_restart_of_every_node() -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    client.create_volume("persist", 6 << 20).await?;
    let vol = client.open_volume("persist").await?;
    let data = payload(99, 6 << 20);
    vol.write(0, &data).await?;
    // Sub-block writes too (read-modify-write state must persist).
    vol.write(4096 + 512, &payload(5, 512)).await?;
    let mut want = data.clone();
    want[4096 + 512..4096 + 1024].copy_from_slice(&payload(5, 512));
    drop(vol);
    drop(client);
    // Graceful stop of all, then a hard kill of all after a restart.
    for i in 1..=3 {
        cluster.stop(i);
    }
    for i in 1..=3 {
        cluster.start_node(i)?;
    }
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    let vol = client.open_volume("persist").await?;
    assert!(
        vol.read(0, 6 << 20).await? == want,
        "data after graceful restart"
    );
    for i in 1..=3 {
        cluster.kill(i);
    }
    for i in 1..=3 {
        cluster.start_node(i)?;
    }
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    let vol = client.open_volume("persist").await?;
    assert!(
        vol.read(0, 6 << 20).await? == want,
        "data after kill -9 of every node"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acked_write_and_snapshot_catches_up() -> anyhow::Result<()> {
    let spec = ClusterSpec {
        data_groups: 2,
        log_compact_threshold_entries: 64,
        log_retain_entries: 8,
        ..ClusterSpec::default()
    };
    let mut cluster = LocalCluster::start(spec)?;
    cluster.wait_healthy(HEALTHY).await?;
    let opts = ClientOptions {
        deadline: Duration::from_secs(20),
        attempt_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let client = cluster.client_with(opts).await?;
    let size: u64 = 4 << 20;
    client.create_volume("stream", size).await?;
    let vol = client.open_volume("stream").await?;

    // Writers stream 4 KiB writes, each to its own block slot, and record
    // what was acknowledged and when.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(u64, u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let vol = vol.clone();
        let stop = stop.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let slot = (w * 256 + n % 256) * 4096;
                let seed = (w << 32) | n;
                match vol.write(slot, &payload(seed, 4096)).await {
                    Ok(()) => acked.lock().unwrap_or_else(|p| p.into_inner()).push((
                        slot,
                        seed,
                        Instant::now(),
                    )),
                    Err(e) => return Err(anyhow::anyhow!("write failed: {e}")),
                }
                n += 1;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Kill the leader of the group holding chunk 0.
    let group = raftblk_proto::placement::chunk_group(vol.info().id, 0, 2);
    let victim = cluster
        .leader_of(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let killed_at = Instant::now();
    cluster.kill(victim);
    // Keep writing long enough for the survivors to compact past the
    // victim's log several times over.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Only writes to the victim's group tell how long it stalled.
    let chunk = vol.info().chunk_size_bytes;
    let in_group =
        |slot: u64| raftblk_proto::placement::chunk_group(vol.info().id, slot / chunk, 2) == group;
    let after: Vec<Instant> = acked
        .iter()
        .filter(|a| in_group(a.0))
        .map(|a| a.2)
        .filter(|t| *t > killed_at)
        .collect();
    assert!(
        !after.is_empty(),
        "no write to group {group} was acknowledged after the kill"
    );
    let first_after = after.iter().min().copied().unwrap_or(killed_at);
    let stall = first_after.duration_since(killed_at);
    eprintln!(
        "writes to group {group} resumed {stall:?} after kill -9 of its leader (node {victim}); {} acked in all",
        acked.len()
    );
    // A few election timeouts (10 ticks × 50 ms) plus client retry.
    assert!(
        stall < Duration::from_secs(5),
        "writes stalled {stall:?} after the leader was killed"
    );

    // Every acknowledged write (the last one per slot) reads back.
    let mut last = std::collections::HashMap::new();
    for (slot, seed, _) in &acked {
        last.insert(*slot, *seed);
    }
    for (slot, seed) in &last {
        assert_eq!(
            vol.read(*slot, 4096).await?,
            payload(*seed, 4096),
            "acked write at {slot} lost"
        );
    }

    // The survivors compacted past what the victim holds.
    let s = cluster.status(if victim == 1 { 2 } else { 1 }).await?;
    let g = s
        .groups
        .iter()
        .find(|g| g.group_id == group)
        .ok_or_else(|| anyhow::anyhow!("group"))?;
    assert!(
        g.first_index > 1,
        "log was never compacted (first index {})",
        g.first_index
    );

    // Restart the victim: it must catch up by snapshot, then match.
    cluster.start_node(victim)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = cluster.status(victim).await {
            if s.snapshots_applied > 0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "restarted node never installed a snapshot:\n{}",
            cluster.log_tail(victim, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for g in 0..=cluster.spec.data_groups {
        cluster
            .wait_replicas_identical(g, Duration::from_secs(30))
            .await?;
    }
    // And it serves the data once it leads.
    cluster
        .transfer_leader(group, victim, Duration::from_secs(15))
        .await?;
    for (slot, seed) in &last {
        assert_eq!(
            vol.read(*slot, 4096).await?,
            payload(*seed, 4096),
            "after snapshot, slot {slot}"
        );
    }
    Ok(())
}

/// Every write acknowledged before a `kill -9` of every node at once (with
/// writes of 4 KiB and 256 KiB in flight, logs compacting) reads back after
/// the restart: acks wait for a durable log entry on a majority, never for
/// the (unsynced) apply, so recovery must rebuild what apply lost from the
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acked_before_kill_of_every_node_read_back() -> anyhow::Result<()> {
    let spec = ClusterSpec {
        data_groups: 4,
        log_compact_threshold_entries: 64,
        log_retain_entries: 8,
        ..ClusterSpec::default()
    };
    let mut cluster = LocalCluster::start(spec)?;
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    // Slots never rewritten: writer w's n-th write goes to its n-th slot,
    // so each acked slot has exactly one right value.
    const SMALL_WRITERS: u64 = 6;
    const SMALL_SLOTS: u64 = 512; // 2 MiB per 4 KiB writer
    const LARGE: u64 = 256 << 10;
    const LARGE_SLOTS: u64 = 32; // 8 MiB of 256 KiB writes
    let small_base = 0u64;
    let large_base = SMALL_WRITERS * SMALL_SLOTS * 4096;
    let size = large_base + LARGE_SLOTS * LARGE;
    client.create_volume("allkill", size).await?;
    let vol = client.open_volume("allkill").await?;
    let acked: Arc<Mutex<Vec<(u64, u64, usize)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..=SMALL_WRITERS {
        let vol = vol.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let (slots, len, base) = if w < SMALL_WRITERS {
                (SMALL_SLOTS, 4096u64, small_base + w * SMALL_SLOTS * 4096)
            } else {
                (LARGE_SLOTS, LARGE, large_base)
            };
            for n in 0..slots {
                let off = base + n * len;
                let seed = (w << 32) | n;
                // Errors come once the nodes are gone: the writer stops.
                if vol.write(off, &payload(seed, len as usize)).await.is_err() {
                    break;
                }
                acked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((off, seed, len as usize));
            }
        }));
    }
    // Kill every node while the writers are busy.
    let started = Instant::now();
    loop {
        let n = acked.lock().unwrap_or_else(|p| p.into_inner()).len();
        if n >= 600 || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 1..=3 {
        cluster.kill(i);
    }
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        acked.len() >= 100,
        "only {} writes acked before the kill",
        acked.len()
    );
    for t in tasks {
        t.abort();
    }
    drop(vol);
    drop(client);
    for i in 1..=3 {
        cluster.start_node(i)?;
    }
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    let vol = client.open_volume("allkill").await?;
    let large = acked.iter().filter(|a| a.2 as u64 == LARGE).count();
    for (off, seed, len) in &acked {
        assert!(
            vol.read(*off, *len as u64).await? == payload(*seed, *len),
            "write acked before kill -9 of every node lost: {len} bytes at {off}"
        );
    }
    eprintln!(
        "{} acked writes ({large} of 256 KiB) read back after kill -9 of every node",
        acked.len()
    );
    for g in 0..=cluster.spec.data_groups {
        cluster
            .wait_replicas_identical(g, Duration::from_secs(30))
            .await?;
    }
    Ok(())
}
