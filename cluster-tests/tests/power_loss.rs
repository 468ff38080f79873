//! Power loss (issue 15 item 8): three `raftblk-node` processes run inside
//! one QEMU guest on an ext4 disk, a workload writes and prints each
//! acknowledged write on the console, and the test kills QEMU with
//! SIGKILL in the middle of it. Everything the nodes had not synced sits
//! in the guest's page cache and is lost with it (the guest keeps dirty
//! pages for up to 10 minutes: `vm.dirty_expire_centisecs` and the ext4
//! commit interval are raised, so only what was fsynced reaches the
//! disk), just as at a power cut of a whole rack. The apply of block data
//! is never synced by design (the raft log is the only log).
//!
//! The guest boots again from the same disk: every write acknowledged
//! before the cut reads back (or a later write of the same writer), no
//! block holds bytes no write produced, and the three replicas of every
//! group converge to the same applied index and digest.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use raftblk_cluster_tests::bin;
use raftblk_cluster_tests::guest::run_guest_with_disk;

const BLOCKS: u64 = 512;
const TASKS: u64 = 8;
/// Acknowledged writes before the power cut.
const ACKS_BEFORE_CUT: usize = 1500;
const GUEST_MEM_MIB: u64 = 2048;
const DISK_BYTES: u64 = 2 << 30;
/// Each boot (TCG: the three nodes run slowly).
const BOOT_MAX: Duration = Duration::from_secs(300);

fn node_config(i: u64) -> String {
    let mut t = format!(
        "node_id = {i}\nlisten_addr = \"127.0.0.1:710{i}\"\ndata_dir = \"/mnt/node{i}\"\n\
         tls = {{ insecure_plaintext = true }}\n\n\
         [cluster]\ndata_groups = 8\nreplicas = 3\nchunk_size_bytes = 65536\n"
    );
    for j in 1..=3 {
        t += &format!("\n[[cluster.nodes]]\nid = {j}\naddr = \"127.0.0.1:710{j}\"\n");
    }
    // Slow ticks for TCG; small logs, so compaction and the state
    // machine flushes it waits for happen during the run.
    t += "\n[raft]\ntick_interval_ms = 100\nelection_ticks = 20\nheartbeat_ticks = 3\n\
          log_compact_threshold_entries = 64\nlog_retain_entries = 16\n\n\
          [limits]\nmemory_budget_bytes = 134217728\nscrub_blocks_per_sec = 0\nworker_threads = 1\n\n\
          [placement]\nnearfull_ratio = 0.99\nfull_ratio = 1.0\n";
    t
}

fn script(first_boot: bool, body: &str) -> String {
    let mut s = String::from("#!/bin/sh\nifconfig lo 127.0.0.1 up\n");
    // Dirty pages stay in the guest's page cache until synced.
    s += "echo 60000 > /proc/sys/vm/dirty_expire_centisecs\n";
    s += "echo 60000 > /proc/sys/vm/dirty_writeback_centisecs\n";
    if first_boot {
        s += "/sbin/mke2fs -q -t ext4 -F /dev/vda || exit 10\n";
    }
    s += "mount -t ext4 -o commit=600 /dev/vda /mnt || exit 11\n";
    if first_boot {
        for i in 1..=3 {
            s += &format!("cat > /mnt/node{i}.toml <<'EOF'\n{}EOF\n", node_config(i));
        }
        s += "sync\n";
    }
    for i in 1..=3 {
        s += &format!(
            "RUST_LOG=info /bin/raftblk-node --config /mnt/node{i}.toml >/mnt/node{i}-boot{}.log 2>&1 &\n",
            if first_boot { 1 } else { 2 }
        );
    }
    s += body;
    s
}

#[test]
fn writes_acknowledged_before_a_power_cut_survive_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    let node = bin("raftblk-node");
    let client = bin("power-loss-client");
    let files = [
        ("/bin/raftblk-node", node.as_path()),
        ("/bin/power-loss-client", client.as_path()),
    ];

    // Boot 1: write until the cut.
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut acks = 0usize;
    let started = Instant::now();
    let run1 = run_guest_with_disk(
        &disk,
        &files,
        &script(
            true,
            &format!(
                "/bin/power-loss-client write {BLOCKS} {TASKS} 1000000 \
                 || tail -n 20 /mnt/node1-boot1.log\n"
            ),
        ),
        GUEST_MEM_MIB,
        BOOT_MAX,
        |line| {
            let mut it = line.split_whitespace();
            if it.next() == Some("ACK") {
                let block = it.next().and_then(|v| v.parse::<u64>().ok());
                let id = it.next().and_then(|v| v.parse::<u64>().ok());
                if let (Some(b), Some(id)) = (block, id) {
                    let e = acked.entry(b).or_insert(0);
                    *e = (*e).max(id);
                    acks += 1;
                }
            }
            acks >= ACKS_BEFORE_CUT
        },
    )?;
    anyhow::ensure!(
        run1.cut,
        "the guest ended before the cut ({acks} acks):\n{}",
        run1.output
    );
    println!(
        "power cut after {acks} acknowledged writes over {} blocks, {:.1} s after boot",
        acked.len(),
        started.elapsed().as_secs_f64()
    );

    // Boot 2: read back, compare replicas.
    let run2 = run_guest_with_disk(
        &disk,
        &files,
        &script(
            false,
            &format!(
                "sleep 1\n\
                 /bin/power-loss-client check {BLOCKS} || exit 20\n\
                 grep -h 'ERROR\\|panicked' /mnt/node*-boot2.log | head -20\n\
                 grep -h 'replica opened' /mnt/node*-boot2.log | sed 's/^.*replica opened/OPENED/'\n"
            ),
        ),
        GUEST_MEM_MIB,
        BOOT_MAX,
        |_| false,
    )?;
    anyhow::ensure!(
        run2.exit == Some(0),
        "the check did not run to its end (exit {:?}):\n{}",
        run2.exit,
        run2.output
    );
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    for v in run2.values("SEEN") {
        if let (Some(b), Some(id)) = (v.first().and_then(|b| b.parse().ok()), v.get(1)) {
            seen.insert(b, id.clone());
        }
    }
    anyhow::ensure!(
        seen.len() as u64 == BLOCKS,
        "read back {} of {BLOCKS} blocks:\n{}",
        seen.len(),
        run2.output
    );
    let mut lost = Vec::new();
    for (&block, &want) in &acked {
        let got = seen.get(&block).map(String::as_str).unwrap_or("missing");
        match got.parse::<u64>() {
            // A later write of the block's own writer may have landed.
            Ok(id) if id >= want && id % TASKS == block % TASKS => {}
            _ => lost.push(format!("block {block}: acked write {want}, read {got}")),
        }
    }
    for (&block, got) in &seen {
        if got == "garbage" {
            lost.push(format!("block {block}: bytes no write produced"));
        }
    }
    assert!(
        lost.is_empty(),
        "after the power cut {} blocks lost acknowledged writes: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    let converged = run2.values("CONVERGED");
    assert!(
        !converged.is_empty(),
        "replicas did not converge after the power cut: {:?}",
        run2.values("DIVERGED")
    );
    // How far each replica's state machine lagged its log at the reboot:
    // what the cut took from it (applies never synced) plus what was not
    // applied yet; all of it was applied again from the log.
    let opened = run2.values("OPENED");
    let field = |v: &[String], k: &str| -> u64 {
        v.iter()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    let lagging = opened
        .iter()
        .filter(|v| field(v, "applied") < field(v, "last_index"))
        .count();
    let reapplied: u64 = opened
        .iter()
        .map(|v| field(v, "last_index").saturating_sub(field(v, "applied")))
        .sum();
    println!(
        "at the reboot {lagging} of {} replicas had a state machine behind their log \
         ({reapplied} entries applied again)",
        opened.len()
    );
    println!(
        "after the reboot: all {} acknowledged blocks read back; replicas of {} groups identical",
        acked.len(),
        converged[0].first().map(String::as_str).unwrap_or("?")
    );
    Ok(())
}
