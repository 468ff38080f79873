//! Snapshots and clones as users rely on them, against a real cluster:
//!
//! - `snapshot_under_writes_is_crash_consistent`: writers run while a
//!   snapshot is taken (their process holds the lease: its holder cuts,
//!   holding writes for the moment); the snapshot holds every write
//!   acknowledged before the create, and whenever it holds a write it
//!   holds every write that completed before that one was issued. It
//!   reads the same while the volume keeps changing. Prints the time
//!   writes were held.
//! - `images_rollback_clone_diff_delete`: snapshots read back their bytes;
//!   rollback restores them exactly; a clone reads its parent's bytes,
//!   diverges on sub-4K writes and discards without changing the parent;
//!   deleting a snapshot with clones is refused naming them; export-diff
//!   applied with import-diff to a copy of the older snapshot gives the
//!   newer byte for byte; flatten frees the parent; deletes free the
//!   blocks only snapshots held; a replica of a group moves to another
//!   node, the old node is killed, and the snapshot and the clone still
//!   read back byte for byte.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftblk_client::{AttachOptions, Client, Volume};
use raftblk_cluster_tests::{bin, payload, ClusterSpec, LocalCluster};
use raftblk_proto::placement;

const HEALTHY: Duration = Duration::from_secs(30);
const BLOCK: u64 = 4096;

/// Runs the `raftblk` CLI: (success, stdout, stderr).
fn cli(cluster: &str, args: &[&str]) -> (bool, String, String) {
    match std::process::Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(["--cluster", cluster, "--timeout-secs", "20"])
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

fn cli_ok(cluster: &str, args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = cli(cluster, args);
    anyhow::ensure!(ok, "raftblk {args:?} failed: {out}{err}");
    Ok(out)
}

/// One recorded write: its block, its sequence number on that block
/// (blocks belong to one writer, which writes them in order), and when
/// it was issued and acknowledged.
#[derive(Debug, Clone, Copy)]
struct Rec {
    block: u64,
    seq: u64,
    issued: Instant,
    acked: Instant,
}

/// The block payload of write `seq` to `block`: both in the first 16
/// bytes, the rest derived from them.
fn stamp(block: u64, seq: u64) -> Vec<u8> {
    let mut d = payload(block * 1_000_003 + seq, BLOCK as usize);
    d[..8].copy_from_slice(&block.to_le_bytes());
    d[8..16].copy_from_slice(&seq.to_le_bytes());
    d
}

/// The sequence number a block holds (0: never written), checking the
/// whole payload.
fn seq_of(block: u64, data: &[u8]) -> anyhow::Result<u64> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&data[8..16]);
    let seq = u64::from_le_bytes(s);
    anyhow::ensure!(
        data == stamp(block, seq).as_slice(),
        "block {block} holds neither zeros nor a whole write (seq field {seq})"
    );
    Ok(seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_under_writes_is_crash_consistent() -> anyhow::Result<()> {
    let spec = ClusterSpec {
        nodes: 3,
        data_groups: 4,
        chunk_size_bytes: 1 << 20,
        ..ClusterSpec::default()
    };
    let c = LocalCluster::start(spec)?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    const BLOCKS: u64 = 1024; // 4 MiB: 4 chunks over the 4 groups
    const WRITERS: u64 = 8;
    client.create_volume("cc", BLOCKS * BLOCK).await?;
    let vol = client.open_volume("cc").await?;
    vol.attach().await?;
    let history: Arc<Mutex<Vec<Rec>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (vol, history, stop) = (vol.clone(), history.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            // Writer w owns blocks w, w+WRITERS, ...; one write in flight.
            let mut seqs = vec![0u64; (BLOCKS / WRITERS) as usize];
            let mut i = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                let slot = ((i * 7919 + w) % (BLOCKS / WRITERS)) as usize;
                let block = slot as u64 * WRITERS + w;
                seqs[slot] += 1;
                let issued = Instant::now();
                vol.write(block * BLOCK, &stamp(block, seqs[slot])).await?;
                let acked = Instant::now();
                history.lock().unwrap_or_else(|p| p.into_inner()).push(Rec {
                    block,
                    seq: seqs[slot],
                    issued,
                    acked,
                });
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The create runs in this process, whose writers hold the lease: it
    // waits for the holder (this process's attachment) to cut.
    let invoked = Instant::now();
    let snap = client.create_snapshot("cc", "s1").await?;
    let created = Instant::now();
    println!(
        "snapshot cc@s1 cut under {WRITERS} writers: writes held {:.3} ms; create took {:.0} ms",
        snap.quiesce_us as f64 / 1000.0,
        (created - invoked).as_secs_f64() * 1000.0
    );
    // Writes go on after the snapshot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let image = client
        .open_snapshot("cc", "s1")
        .await?
        .read(0, BLOCKS * BLOCK)
        .await?;
    stop.store(true, Ordering::Release);
    for t in tasks {
        t.await??;
    }
    let history = history.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let after = history.iter().filter(|r| r.issued > created).count();
    println!(
        "{} writes recorded, {after} issued after the snapshot was created",
        history.len()
    );
    anyhow::ensure!(
        after > 0,
        "no write after the snapshot: the test proves little"
    );
    let mut held = vec![0u64; BLOCKS as usize];
    for b in 0..BLOCKS {
        let at = (b * BLOCK) as usize;
        held[b as usize] = seq_of(b, &image[at..at + BLOCK as usize])?;
    }
    // Every write acknowledged before the create is in the snapshot.
    for r in history.iter().filter(|r| r.acked < invoked) {
        anyhow::ensure!(
            held[r.block as usize] >= r.seq,
            "write {} to block {} was acknowledged before the create but the snapshot holds {}",
            r.seq,
            r.block,
            held[r.block as usize]
        );
    }
    // Prefix closure: the latest issue time of any write in the snapshot;
    // every write completed before it must be in the snapshot too.
    let contained = |r: &Rec| held[r.block as usize] >= r.seq;
    let newest_in = history
        .iter()
        .filter(|r| held[r.block as usize] == r.seq)
        .map(|r| r.issued)
        .max();
    if let Some(t) = newest_in {
        for r in history.iter().filter(|r| r.acked < t) {
            anyhow::ensure!(
                contained(r),
                "the snapshot holds a write issued after write {} to block {} completed, but not that write (it holds {})",
                r.seq,
                r.block,
                held[r.block as usize]
            );
        }
    }
    // Nothing issued after the create finished is in it.
    for r in history.iter().filter(|r| r.issued > created) {
        anyhow::ensure!(
            held[r.block as usize] < r.seq,
            "write {} to block {} was issued after the snapshot was created, yet it is in it",
            r.seq,
            r.block
        );
    }
    // The snapshot reads the same after more writes.
    let again = client
        .open_snapshot("cc", "s1")
        .await?
        .read(0, BLOCKS * BLOCK)
        .await?;
    anyhow::ensure!(
        again == image,
        "the snapshot changed while the volume was written"
    );
    Ok(())
}

/// A model of a volume's bytes next to the volume.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn write(&mut self, off: u64, data: &[u8]) {
        self.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.bytes[off as usize..(off + len) as usize].fill(0);
    }
}

async fn write_both(v: &Volume, m: &mut Model, off: u64, data: &[u8]) -> anyhow::Result<()> {
    v.write(off, data).await?;
    m.write(off, data);
    Ok(())
}

async fn same(v: &Volume, want: &[u8], what: &str) -> anyhow::Result<()> {
    let got = v.read(0, want.len() as u64).await?;
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        anyhow::bail!(
            "{what}: first difference at byte {i} (block {}): {} != {}",
            i as u64 / BLOCK,
            got[i],
            want[i]
        );
    }
    Ok(())
}

/// Blocks kept for snapshots over every data group (one running replica
/// of each).
async fn kept_blocks(c: &LocalCluster, groups: u64) -> anyhow::Result<u64> {
    let mut n = 0;
    for g in 1..=groups {
        let members = c.members_of(g).await;
        let Some(&r) = members.iter().find(|&&r| c.is_running(r as usize)) else {
            anyhow::bail!("group {g} has no running replica");
        };
        n += c.stored_counts(r as usize, g).await?.1;
    }
    Ok(n)
}

/// Opens `name` for writing under holder `who` (no sharing).
async fn writer(client: &Client, name: &str, who: &str) -> anyhow::Result<Volume> {
    let v = client
        .open_volume(name)
        .await?
        .with_attach_options(AttachOptions {
            holder: who.to_owned(),
            reuse: false,
            ..AttachOptions::default()
        });
    v.attach().await?;
    Ok(v)
}

async fn release(v: &Volume) -> anyhow::Result<()> {
    if let Some(a) = v.attachment() {
        a.detach().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_rollback_clone_diff_delete() -> anyhow::Result<()> {
    const GROUPS: u64 = 4;
    let spec = ClusterSpec {
        nodes: 4,
        data_groups: GROUPS,
        chunk_size_bytes: 1 << 20,
        log_compact_threshold_entries: 64,
        log_retain_entries: 8,
        ..ClusterSpec::default()
    };
    let mut c = LocalCluster::start(spec)?;
    c.wait_healthy(HEALTHY).await?;
    let client = c.client().await?;
    client
        .set_flags(raftblk_proto::ClusterFlags {
            norecover: true,
            norebalance: true,
            noout: true,
        })
        .await?;
    let cl = c.cluster_arg();
    const SIZE: u64 = 4 << 20;
    let info = client.create_volume("base", SIZE).await?;
    let mut m = Model {
        bytes: vec![0u8; SIZE as usize],
    };
    let v = writer(&client, "base", "writer-a").await?;
    // State A: whole blocks, sub-4K writes, spread over every chunk.
    for i in 0..96u64 {
        let off = (i * 37 % 1024) * BLOCK;
        write_both(&v, &mut m, off, &payload(i, BLOCK as usize)).await?;
    }
    for i in 0..16u64 {
        let off = (i * 61 % 1024) * BLOCK + 512 * (i % 8);
        write_both(&v, &mut m, off, &payload(100 + i, 512)).await?;
    }
    release(&v).await?;
    let out = cli_ok(&cl, &["snapshot", "create", "base@s1"])?;
    println!("{}", out.trim());
    let model_a = m.bytes.clone();
    // State B: overwrites, partial writes, a discard.
    let v = writer(&client, "base", "writer-b").await?;
    for i in 0..48u64 {
        let off = (i * 53 % 1024) * BLOCK;
        write_both(&v, &mut m, off, &payload(1000 + i, BLOCK as usize)).await?;
    }
    write_both(&v, &mut m, 5 * BLOCK + 1024, &payload(2000, 1536)).await?;
    v.discard(37 * BLOCK, 4 * BLOCK).await?;
    m.zero(37 * BLOCK, 4 * BLOCK);
    release(&v).await?;
    cli_ok(&cl, &["snapshot", "create", "base@s2"])?;
    let model_b = m.bytes.clone();
    // State C.
    let v = writer(&client, "base", "writer-c").await?;
    for i in 0..32u64 {
        let off = (i * 71 % 1024) * BLOCK;
        write_both(&v, &mut m, off, &payload(3000 + i, BLOCK as usize)).await?;
    }
    release(&v).await?;
    let model_c = m.bytes.clone();
    same(
        &client.open_snapshot("base", "s1").await?,
        &model_a,
        "base@s1",
    )
    .await?;
    same(
        &client.open_snapshot("base", "s2").await?,
        &model_b,
        "base@s2",
    )
    .await?;
    same(&client.open_volume("base").await?, &model_c, "base").await?;
    let list = cli_ok(&cl, &["snapshot", "list", "base"])?;
    anyhow::ensure!(
        list.contains("s1") && list.contains("s2") && list.contains("ready"),
        "{list}"
    );

    // A clone of s1 reads A; diverges on a sub-4K write and a discard of
    // shared blocks; the parent does not change.
    let out = cli_ok(&cl, &["volume", "clone", "base@s1", "c1"])?;
    println!("{}", out.trim());
    let cv = client.open_volume("c1").await?;
    same(&cv, &model_a, "clone c1 before writes").await?;
    let mut cm = Model {
        bytes: model_a.clone(),
    };
    let cw = writer(&client, "c1", "clone-writer").await?;
    // 512 bytes into a block the clone shares (block 37: written in A).
    write_both(&cw, &mut cm, 37 * BLOCK + 512, &payload(4000, 512)).await?;
    // A discard of shared data blocks, one partly.
    cw.discard(74 * BLOCK, 2 * BLOCK).await?;
    cm.zero(74 * BLOCK, 2 * BLOCK);
    cw.discard(111 * BLOCK + 1024, 1024).await?;
    cm.zero(111 * BLOCK + 1024, 1024);
    // A whole-block write of zeros reads as zeros, not the parent's.
    write_both(&cw, &mut cm, 148 * BLOCK, &vec![0u8; BLOCK as usize]).await?;
    anyhow::ensure!(
        model_a[(37 * BLOCK) as usize..(38 * BLOCK) as usize]
            .iter()
            .any(|&b| b != 0)
            && model_a[(74 * BLOCK) as usize..(75 * BLOCK) as usize]
                .iter()
                .any(|&b| b != 0)
            && model_a[(148 * BLOCK) as usize..(149 * BLOCK) as usize]
                .iter()
                .any(|&b| b != 0),
        "the test's clone writes must hit blocks the parent holds"
    );
    same(&cw, &cm.bytes, "clone c1 after writes").await?;
    same(
        &client.open_snapshot("base", "s1").await?,
        &model_a,
        "base@s1 after clone writes",
    )
    .await?;
    same(
        &client.open_volume("base").await?,
        &model_c,
        "base after clone writes",
    )
    .await?;
    release(&cw).await?;

    // Deleting the parent snapshot is refused, naming the clone.
    let (ok, out, err) = cli(&cl, &["snapshot", "delete", "base@s1"]);
    anyhow::ensure!(
        !ok && err.contains("c1"),
        "delete of a parent: {ok} {out} {err}"
    );

    // export-diff s1..s2 applied to a copy of s1 gives s2.
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("s1.raw");
    let diff = dir.path().join("s1-s2.diff");
    let full = dir.path().join("s2.diff");
    cli_ok(
        &cl,
        &[
            "volume",
            "export",
            "base@s1",
            raw.to_str().unwrap_or_default(),
        ],
    )?;
    let out = cli_ok(
        &cl,
        &[
            "volume",
            "export-diff",
            "base@s2",
            "--from-snap",
            "s1",
            diff.to_str().unwrap_or_default(),
        ],
    )?;
    println!("{}", out.trim());
    let diff_len = std::fs::metadata(&diff)?.len();
    anyhow::ensure!(
        diff_len < SIZE / 4,
        "an incremental diff of 49 blocks is {diff_len} bytes"
    );
    client.create_volume("copy", SIZE).await?;
    cli_ok(
        &cl,
        &["volume", "import", "copy", raw.to_str().unwrap_or_default()],
    )?;
    cli_ok(
        &cl,
        &[
            "volume",
            "import-diff",
            diff.to_str().unwrap_or_default(),
            "copy",
        ],
    )?;
    same(
        &client.open_volume("copy").await?,
        &model_b,
        "copy of s1 + diff",
    )
    .await?;
    // A full diff into an empty volume gives s2 as well.
    cli_ok(
        &cl,
        &[
            "volume",
            "export-diff",
            "base@s2",
            full.to_str().unwrap_or_default(),
        ],
    )?;
    client.create_volume("copy2", SIZE).await?;
    cli_ok(
        &cl,
        &[
            "volume",
            "import-diff",
            full.to_str().unwrap_or_default(),
            "copy2",
        ],
    )?;
    same(
        &client.open_volume("copy2").await?,
        &model_b,
        "empty + full diff",
    )
    .await?;
    // A damaged diff is refused before anything is written.
    let mut bytes = std::fs::read(&diff)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&diff, &bytes)?;
    let (ok, _, err) = cli(
        &cl,
        &[
            "volume",
            "import-diff",
            diff.to_str().unwrap_or_default(),
            "copy",
        ],
    );
    anyhow::ensure!(!ok && err.contains("checksum"), "a damaged diff: {err}");
    same(
        &client.open_volume("copy").await?,
        &model_b,
        "copy after a refused diff",
    )
    .await?;

    // Rollback: refused while attached; restores s2's bytes exactly.
    let holder = writer(&client, "base", "guest-holder").await?;
    let (ok, _, err) = cli(&cl, &["snapshot", "rollback", "base@s2"]);
    anyhow::ensure!(
        !ok && err.contains("guest-holder"),
        "rollback while attached: {err}"
    );
    release(&holder).await?;
    cli_ok(&cl, &["snapshot", "rollback", "base@s2"])?;
    same(
        &client.open_volume("base").await?,
        &model_b,
        "base after rollback to s2",
    )
    .await?;
    same(
        &client.open_snapshot("base", "s1").await?,
        &model_a,
        "base@s1 after rollback",
    )
    .await?;

    // A replica of the group holding base's first chunk and c1's moves to
    // another node; the old node dies; snapshot and clone read back.
    let g = placement::chunk_group(info.id, 0, GROUPS);
    let members = c.members_of(g).await;
    // A follower moves (a leader must hand its role over first).
    let leader = c.leader_of(g).await.map(|l| l as u64);
    let from = members
        .iter()
        .copied()
        .find(|&m| Some(m) != leader)
        .ok_or_else(|| anyhow::anyhow!("group {g} has no follower"))?;
    let to = (1..=4u64).find(|n| !members.contains(n)).unwrap_or(4);
    // Enough writes that the new replica needs a raft snapshot.
    let filler = client.create_volume("filler", 64 << 20).await?;
    let chunk = (0..64u64)
        .find(|&k| placement::chunk_group(filler.id, k, GROUPS) == g)
        .ok_or_else(|| anyhow::anyhow!("no chunk of the filler volume lives in group {g}"))?;
    let v = writer(&client, "filler", "filler").await?;
    for i in 0..100u64 {
        let off = (chunk << 20) + (i % 64) * BLOCK;
        v.write(off, &payload(5000 + i, BLOCK as usize)).await?;
    }
    release(&v).await?;
    let installed_before = c.status(to as usize).await?.snapshots_applied;
    c.move_replica(g, from, to, Duration::from_secs(30)).await?;
    let installed = c.status(to as usize).await?.snapshots_applied - installed_before;
    anyhow::ensure!(
        installed > 0,
        "the new replica was not caught up by a raft snapshot"
    );
    c.kill(from as usize);
    c.transfer_leader(g, to as usize, Duration::from_secs(20))
        .await?;
    same(
        &client.open_snapshot("base", "s1").await?,
        &model_a,
        "base@s1 after a move",
    )
    .await?;
    same(
        &client.open_snapshot("base", "s2").await?,
        &model_b,
        "base@s2 after a move",
    )
    .await?;
    same(
        &client.open_volume("c1").await?,
        &cm.bytes,
        "c1 after a move",
    )
    .await?;

    // A clone with snapshots is not flattened: they read through the
    // parent (flattening would turn their parent blocks into zeros).
    cli_ok(&cl, &["snapshot", "create", "c1@cs"])?;
    let (ok, out, err) = cli(&cl, &["volume", "flatten", "c1"]);
    anyhow::ensure!(
        !ok && err.contains("cs"),
        "flatten of a clone with a snapshot: {ok} {out} {err}"
    );
    same(
        &client.open_snapshot("c1", "cs").await?,
        &cm.bytes,
        "c1@cs after a refused flatten",
    )
    .await?;
    cli_ok(&cl, &["snapshot", "delete", "c1@cs"])?;

    // Flatten c1, then s1 may go; deletes free the kept blocks.
    let out = cli_ok(&cl, &["volume", "flatten", "c1"])?;
    println!("{}", out.trim());
    same(
        &client.open_volume("c1").await?,
        &cm.bytes,
        "c1 after flatten",
    )
    .await?;
    let before = kept_blocks(&c, GROUPS).await?;
    cli_ok(&cl, &["snapshot", "delete", "base@s1"])?;
    let mid = kept_blocks(&c, GROUPS).await?;
    same(
        &client.open_snapshot("base", "s2").await?,
        &model_b,
        "base@s2 after deleting s1",
    )
    .await?;
    cli_ok(&cl, &["snapshot", "delete", "base@s2"])?;
    let after = kept_blocks(&c, GROUPS).await?;
    println!(
        "blocks kept for snapshots: {before} with s1 and s2, {mid} with s2, {after} with none"
    );
    anyhow::ensure!(
        mid < before && after == 0,
        "deletes did not free: {before} -> {mid} -> {after}"
    );
    same(
        &client.open_volume("base").await?,
        &model_b,
        "base after deletes",
    )
    .await?;
    same(
        &client.open_volume("c1").await?,
        &cm.bytes,
        "c1 after deleting its parent",
    )
    .await?;
    for g in 1..=GROUPS {
        c.wait_replicas_identical(g, Duration::from_secs(20))
            .await?;
    }

    // Deleting a volume frees its snapshots' blocks too, even once the
    // volume itself holds no block (all discarded after the snapshot).
    cli_ok(&cl, &["snapshot", "create", "copy@last"])?;
    let v = writer(&client, "copy", "discarder").await?;
    v.discard(0, SIZE).await?;
    release(&v).await?;
    anyhow::ensure!(
        kept_blocks(&c, GROUPS).await? > 0,
        "the discard kept nothing"
    );
    cli_ok(&cl, &["volume", "delete", "copy"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kept = kept_blocks(&c, GROUPS).await?;
        if kept == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{kept} snapshot blocks of a deleted volume are still stored after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
