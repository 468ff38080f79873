//! Exclusive attach with fencing, with real `raftblk-vhost` processes of a
//! real 3-node cluster (the test plays the VMM and guest driver, see
//! `common`): one daemon holds a volume's attach lease; a second one is
//! refused unless it takes over; a frozen holder's late writes never land
//! once another daemon took over, and the frozen one stops serving; a
//! daemon stopped with SIGTERM gives its lease back.

mod common;

use std::time::Duration;

use anyhow::Context as _;
use common::*;
use raftblk_cluster_tests::guest::VhostDaemon;
use raftblk_cluster_tests::payload;
use raftblk_vhost::virtio_blk::{S_IOERR, S_OK};

const VOLUME: &str = "fence";
/// Blocks (4 KiB) A writes, before and after the takeover.
const BLOCKS_A: u64 = 16;
/// Blocks B writes after taking over (A's `BLOCKS_B..BLOCKS_A` only A
/// ever touches).
const BLOCKS_B: u64 = 8;
const BLOCK: usize = 4096;
/// Bound on A's answers after it resumes (its retries included).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

/// Block `b` as written by writer generation `generation`.
fn data(generation: u64, b: u64) -> Vec<u8> {
    payload(generation * 1000 + b, BLOCK)
}

fn sector(b: u64) -> u64 {
    b * (BLOCK as u64 / 512)
}

/// Every block of the test's range, read through `drv`.
fn read_all(drv: &mut Driver, blocks: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..blocks)
        .map(|b| {
            let (s, got) = drv.read(0, sector(b), BLOCK as u32)?;
            anyhow::ensure!(s == S_OK, "read of block {b}: status {s}");
            Ok(got)
        })
        .collect()
}

#[test]
fn fencing() -> anyhow::Result<()> {
    let (cluster, dir, mut a, _) = setup(VOLUME, 16 << 20)?;
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(cluster.client())?;
    let holder = |rt: &tokio::runtime::Runtime| -> anyhow::Result<raftblk_proto::AttachLease> {
        let (_, l) = rt.block_on(client.volume_status(VOLUME))?;
        l.context("the volume has no lease")
    };
    let first = holder(&rt)?;
    anyhow::ensure!(
        first.holder == a.holder(),
        "A should hold the lease: {first:?}"
    );

    // A second daemon without --takeover is refused, naming the holder.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other)?;
    match VhostDaemon::start(&other, &cluster.cluster_arg(), VOLUME, 2) {
        Ok(_) => anyhow::bail!("a second daemon attached the volume A holds"),
        Err(e) => {
            let text = format!("{e:#}");
            anyhow::ensure!(
                text.contains("is attached by") && text.contains(&a.holder()),
                "the refusal does not name the holder: {text}"
            );
        }
    }

    // A restart of A (same host and socket, as systemd does) reclaims the
    // lease without --takeover, with a new epoch.
    a.restart()?;
    let reclaimed = holder(&rt)?;
    anyhow::ensure!(
        reclaimed.holder == a.holder() && reclaimed.epoch > first.epoch,
        "the restarted daemon did not reclaim its lease: {first:?} -> {reclaimed:?}"
    );

    // The data from before the takeover, written through A.
    let (mut drv_a, ..) = Driver::connect(&a.socket, 2)?;
    for b in 0..BLOCKS_A {
        anyhow::ensure!(drv_a.write(0, sector(b), &data(1, b))? == S_OK);
    }
    // A's late writes, to blocks B writes and to blocks only A does: the
    // even blocks posted just before A freezes (racing with it: A may or
    // may not send them before it stops), the odd ones while it is frozen
    // (the guest's requests wait in the ring).
    let late = |odd: u64| -> Vec<(u64, Vec<u8>)> {
        (0..BLOCKS_A)
            .filter(|b| b % 2 == odd)
            .map(|b| (sector(b), data(2, b)))
            .collect()
    };
    let racing = drv_a.post_writes(0, 0, &late(0))?;
    a.signal(libc::SIGSTOP)?;
    let frozen = drv_a.post_writes(0, racing.len(), &late(1))?;
    let heads: Vec<u16> = racing.iter().chain(&frozen).copied().collect();

    // B takes over (the VM restarted on another host) and writes.
    let dir_b = dir.path().join("b");
    std::fs::create_dir_all(&dir_b)?;
    let b = VhostDaemon::start_with(&dir_b, &cluster.cluster_arg(), VOLUME, 2, &["--takeover"]);
    let b = match b {
        Ok(b) => b,
        Err(e) => {
            a.signal(libc::SIGCONT)?;
            return Err(e);
        }
    };
    let taken = holder(&rt)?;
    anyhow::ensure!(
        taken.holder == b.holder() && taken.epoch > reclaimed.epoch,
        "B did not take the lease over: {taken:?}"
    );
    let (mut drv_b, ..) = Driver::connect(&b.socket, 2)?;
    for blk in 0..BLOCKS_B {
        anyhow::ensure!(drv_b.write(0, sector(blk), &data(3, blk))? == S_OK);
    }
    let before = read_all(&mut drv_b, BLOCKS_A)?;
    for (blk, got) in before.iter().enumerate() {
        let blk = blk as u64;
        let ok = if blk < BLOCKS_B {
            *got == data(3, blk)
        } else {
            *got == data(1, blk) || *got == data(2, blk)
        };
        anyhow::ensure!(
            ok,
            "block {blk} holds neither B's data nor A's from before the takeover"
        );
    }

    // A resumes: every write it still had in flight fails, none lands.
    a.signal(libc::SIGCONT)?;
    let answered = drv_a.collect(0, heads.len(), ANSWER_TIMEOUT)?;
    let failed = answered.iter().filter(|(_, s)| *s == S_IOERR).count();
    let after = read_all(&mut drv_b, BLOCKS_A)?;
    for (blk, (was, now)) in before.iter().zip(&after).enumerate() {
        anyhow::ensure!(
            was == now,
            "block {blk} changed after A resumed: a fenced write landed\n{}",
            a.log_text()
        );
    }
    println!(
        "fencing: {failed} of A's {} late writes failed as fenced, {} had been applied before the takeover",
        heads.len(),
        heads.len() - failed
    );
    for (head, status) in &answered {
        anyhow::ensure!(
            !frozen.contains(head) || *status == S_IOERR,
            "a write posted while A was frozen succeeded (head {head}, status {status})"
        );
    }
    // A stops serving the guest, and its log says why.
    let (s, _) = drv_a.read(1, 0, BLOCK as u32)?;
    anyhow::ensure!(s == S_IOERR, "A still serves reads after losing the volume");
    anyhow::ensure!(drv_a.write(1, sector(BLOCKS_A), &data(4, 0))? == S_IOERR);
    let log = a.log_text();
    anyhow::ensure!(
        log.contains("attach lease lost"),
        "A did not log why it stopped:\n{log}"
    );
    // The cluster itself refused A's writes (not only A's own check).
    anyhow::ensure!(
        log.contains("is below the fence"),
        "no write of A reached the cluster to be refused there:\n{log}"
    );
    let (s, got) = drv_b.read(0, sector(BLOCKS_A), BLOCK as u32)?;
    anyhow::ensure!(
        s == S_OK && got.iter().all(|&x| x == 0),
        "A's write after its fencing landed"
    );
    anyhow::ensure!(holder(&rt)?.holder == b.holder(), "B lost the lease");
    // Stopped with SIGTERM (systemctl stop), B gives the lease back.
    b.signal(libc::SIGTERM)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = holder(&rt)?;
        if l.holder.is_empty() {
            anyhow::ensure!(l.epoch == taken.epoch, "epoch moved on a detach: {l:?}");
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "B did not give the lease back on SIGTERM: {l:?}\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
