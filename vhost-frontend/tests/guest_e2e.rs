//! End to end with a real Linux guest (Debian kernel, virtio_blk driver)
//! under QEMU, its disk a 3-replica raftblk volume served by raftblk-vhost
//! over vhost-user-blk with 2 queues.

use std::time::Duration;

use raftblk_cluster_tests::guest::{
    fio_passed, fio_result, fio_verify, run_guest, sha256_file, VhostDaemon,
};
use raftblk_cluster_tests::{bin, ClusterSpec, LocalCluster};

const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

const PHASE1: &str = r#"#!/bin/sh
set -e
echo RAFTBLK-FIO-START
@FIO_JOB@
# ext4 on the first 96 MiB: files, sync, checksums.
mkfs.ext4 -q -F /dev/vda 96M
mount -t ext4 /dev/vda /mnt
mkdir /mnt/data
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/data/f$i bs=1M count=$((i * 3)) 2>/dev/null; done
echo "raftblk says hello" > /mnt/data/hello.txt
sync
for f in /mnt/data/*; do echo "RAFTBLK-FILE $(basename $f) $(sha256sum $f | cut -d' ' -f1)"; done
umount /mnt
# Discard a range that held data: it must read back as zeros.
dd if=/dev/urandom of=/dev/vda bs=1M seek=200 count=16 oflag=direct 2>/dev/null
blkdiscard -o $((200 * 1048576)) -l $((16 * 1048576)) /dev/vda
got=$(dd if=/dev/vda bs=1M skip=200 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
want=$(dd if=/dev/zero bs=1M count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$got" = "$want" ]; then echo "RAFTBLK-DISCARD zeros"; else echo "RAFTBLK-DISCARD DATA $got"; exit 1; fi
sync
echo "RAFTBLK-DEVSUM $(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#;

const PHASE2: &str = r#"#!/bin/sh
set -e
mount -t ext4 -o ro /dev/vda /mnt
for f in /mnt/data/*; do echo "RAFTBLK-FILE $(basename $f) $(sha256sum $f | cut -d' ' -f1)"; done
umount /mnt
"#;

#[test]
fn guest_fio_ext4_discard_export_and_second_boot() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume("vm1", 256 << 20))?;
    let dir = tempfile::tempdir()?;
    let mut vhost = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vm1", 2)?;

    let script = PHASE1.replace("@FIO_JOB@", &fio_verify(128, 32, ""));
    let run = run_guest(&vhost.socket, 2, &script, GUEST_TIMEOUT, |_| {})?;
    assert_eq!(run.exit, Some(0), "guest phase 1 failed:\n{}", run.output);
    assert!(
        run.output.contains("RAFTBLK-BOOTED nproc=2"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains("queues=2"),
        "guest did not see 2 queues:\n{}",
        run.output
    );
    assert_eq!(
        run.values("RAFTBLK-DISCARD"),
        vec![vec!["zeros".to_string()]]
    );
    let files = run.values("RAFTBLK-FILE");
    assert_eq!(files.len(), 4, "{}", run.output);
    let devsum = run.values("RAFTBLK-DEVSUM");
    let devsum = devsum
        .first()
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default();
    assert_eq!(devsum.len(), 64, "{}", run.output);
    // Both virtqueues carried I/O.
    std::thread::sleep(Duration::from_millis(500));
    let per_queue = vhost.answered_per_queue();
    assert!(
        per_queue.len() == 2 && per_queue.iter().all(|&n| n > 100),
        "per-queue requests {per_queue:?}"
    );

    // The volume, exported with the CLI, is exactly what the guest wrote.
    let img = dir.path().join("vm1.img");
    let out = std::process::Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args([
            "--cluster",
            &cluster.cluster_arg(),
            "volume",
            "export",
            // The daemon still holds the lease; the guest has stopped.
            "--live",
            "vm1",
        ])
        .arg(&img)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256_file(&img)?,
        devsum,
        "exported volume differs from what the guest read"
    );

    // The daemon serves the next connection on the same socket: a second
    // boot reads the files back.
    assert!(
        vhost.is_running(),
        "raftblk-vhost exited after the guest disconnected"
    );
    let run2 = run_guest(&vhost.socket, 2, PHASE2, GUEST_TIMEOUT, |_| {})?;
    assert_eq!(run2.exit, Some(0), "guest phase 2 failed:\n{}", run2.output);
    assert_eq!(
        run2.values("RAFTBLK-FILE"),
        files,
        "files changed across boots"
    );
    Ok(())
}

#[test]
fn guest_survives_kill_of_a_group_leader_during_fio_verify() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    let info = rt.block_on(client.create_volume("vm2", 256 << 20))?;
    let dir = tempfile::tempdir()?;
    let vhost = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vm2", 2)?;
    // Kill the leader of the group holding the start of the fio region.
    let chunk = (128u64 << 20) / cluster.spec.chunk_size_bytes;
    let group = raftblk_proto::placement::chunk_group(info.id, chunk, cluster.spec.data_groups);
    let victim = rt
        .block_on(cluster.leader_of(group))
        .ok_or_else(|| anyhow::anyhow!("group {group} has no leader"))?;
    let pid = cluster
        .pid(victim)
        .ok_or_else(|| anyhow::anyhow!("victim not running"))?;
    let script = format!(
        "#!/bin/sh\nset -e\necho RAFTBLK-FIO-START\n{}",
        fio_verify(128, 24, "")
    );
    let mut killer: Option<std::thread::JoinHandle<()>> = None;
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut killed_before_fio_ended = false;
    let run = run_guest(&vhost.socket, 2, &script, GUEST_TIMEOUT, |line| {
        if line.contains("RAFTBLK-FIO-START") && killer.is_none() {
            // fio is starting: kill -9 the leader while it runs.
            let killed = killed.clone();
            killer = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                // SAFETY: kill(2) on the PID of a node process this test
                // started and has not reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                killed.store(true, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        // The guest prints its fio result only once fio has finished.
        if line.starts_with("RAFTBLK-FIO ") {
            killed_before_fio_ended = killed.load(std::sync::atomic::Ordering::SeqCst);
        }
    })?;
    if let Some(k) = killer {
        let _ = k.join();
    }
    cluster.kill(victim);
    assert!(run.output.contains("RAFTBLK-FIO-START"), "{}", run.output);
    assert_eq!(
        run.exit,
        Some(0),
        "fio verify failed after the leader was killed:\n{}",
        run.output
    );
    assert!(fio_passed(&run.output), "{}", run.output);
    // The kill happened while fio was still running.
    assert!(
        killed_before_fio_ended,
        "fio finished before the leader was killed:\n{}",
        run.output
    );
    // The node really died during the run and the group moved on.
    let new_leader = rt.block_on(cluster.leader_of(group));
    assert!(
        new_leader.is_some() && new_leader != Some(victim),
        "group {group} leader {new_leader:?}"
    );
    assert!(
        !vhost.log_text().contains("I/O failed"),
        "the daemon reported I/O errors:\n{}",
        vhost.log_text()
    );
    Ok(())
}

/// True when every data group of `map` has `replicas` voters, none on
/// `gone`, and no move under way.
fn healed(map: &raftblk_proto::ClusterMap, gone: u64) -> bool {
    map.groups.iter().filter(|g| g.group_id != 0).all(|g| {
        g.voters.len() as u64 == map.replicas
            && !g.voters.contains(&gone)
            && g.learners.is_empty()
            && g.voters_outgoing.is_empty()
    })
}

#[test]
fn guest_fio_verify_while_a_node_is_lost_for_good_and_the_cluster_heals() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    // Four nodes: down after 1 s of silence, out 2 s later; then every
    // group that had a replica on the lost node gets one back.
    let spec = ClusterSpec {
        nodes: 4,
        data_groups: 8,
        node_down_after_ms: 1000,
        down_out_secs: 2,
        ..ClusterSpec::default()
    };
    let mut cluster = LocalCluster::start(spec)?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume("vm4", 256 << 20))?;
    let dir = tempfile::tempdir()?;
    let vhost = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vm4", 2)?;
    let gone = 4u64;
    let pid = cluster
        .pid(gone as usize)
        .ok_or_else(|| anyhow::anyhow!("node {gone} not running"))?;
    // fio runs for 25 s, verifying as it goes; node 4 dies 2 s in.
    let script = format!(
        "#!/bin/sh\nset -e\necho RAFTBLK-FIO-START\n{}",
        fio_verify(0, 96, "time_based=1\nruntime=25")
    );
    let started = std::time::Instant::now();
    let watcher =
        {
            let client = client.clone();
            rt.spawn(async move {
                // When the map shows every group healed (bounded).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(map) = client.cluster_map().await {
                        if map.nodes.iter().any(|n| {
                            n.id == gone && n.state == raftblk_proto::NodeState::Out as i32
                        }) && healed(&map, gone)
                        {
                            return Some(std::time::Instant::now());
                        }
                    }
                }
                None
            })
        };
    let mut killer: Option<std::thread::JoinHandle<()>> = None;
    let mut fio_ended = None;
    let run = run_guest(&vhost.socket, 2, &script, GUEST_TIMEOUT, |line| {
        if line.contains("RAFTBLK-FIO-START") && killer.is_none() {
            killer = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                // SAFETY: kill(2) on the PID of a node process this test
                // started and has not reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }));
        }
        if line.starts_with("RAFTBLK-FIO ") {
            fio_ended = Some(std::time::Instant::now());
        }
    })?;
    if let Some(k) = killer {
        let _ = k.join();
    }
    cluster.kill(gone as usize);
    assert_eq!(
        run.exit,
        Some(0),
        "fio verify failed while the cluster healed:\n{}",
        run.output
    );
    assert!(fio_passed(&run.output), "{}", run.output);
    let healed_at = rt
        .block_on(watcher)?
        .ok_or_else(|| anyhow::anyhow!("the cluster did not heal within 180 s"))?;
    let fio_ended = fio_ended.ok_or_else(|| anyhow::anyhow!("no fio result line"))?;
    println!(
        "node {gone} killed 2 s into fio; cluster healed {:?} after the start, fio ended {:?} after it: {}",
        healed_at.duration_since(started),
        fio_ended.duration_since(started),
        fio_result(&run.output).unwrap_or_default()
    );
    assert!(
        healed_at < fio_ended,
        "the cluster healed only after fio ended: the heal did not happen under guest I/O"
    );
    assert!(
        !vhost.log_text().contains("I/O failed"),
        "the daemon reported I/O errors:\n{}",
        vhost.log_text()
    );
    Ok(())
}
