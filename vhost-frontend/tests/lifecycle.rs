//! The guest lifecycle with a real Linux guest under QEMU: what happens to
//! a running VM when its raftblk-vhost daemon dies and comes back, and
//! when its disk grows.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftblk_cluster_tests::guest::{
    fio_passed, fio_result, fio_verify, run_guest, run_guest_vhost, VhostDaemon,
};
use raftblk_cluster_tests::{bin, ClusterSpec, LocalCluster};

const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Daemon kills the test makes while fio runs.
const KILLS: u32 = 4;
/// Time between one restart and the next kill.
const KILL_INTERVAL: Duration = Duration::from_secs(3);

/// `kill -9` of raftblk-vhost, again and again, while the guest runs fio
/// with verification on both queues; the daemon is restarted each time
/// (as systemd's `Restart=always` does) and QEMU reconnects. The guest
/// sees no I/O error: requests it was waiting for are found in the
/// inflight region by the new daemon and served again.
#[test]
fn daemon_kill() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume("vmk", 256 << 20))?;
    let dir = tempfile::tempdir()?;
    let daemon = Arc::new(Mutex::new(VhostDaemon::start(
        dir.path(),
        &cluster.cluster_arg(),
        "vmk",
        2,
    )?));
    let socket = daemon
        .lock()
        .map_err(|_| anyhow::anyhow!("daemon lock"))?
        .socket
        .clone();
    let script = format!(
        "#!/bin/sh\nset -e\necho RAFTBLK-FIO-START\n{}",
        fio_verify(0, 96, "")
    );
    let kills = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut killer: Option<std::thread::JoinHandle<anyhow::Result<()>>> = None;
    let mut kills_before_fio_ended = 0;
    let run = run_guest_vhost(&socket, 2, Some(500), &script, GUEST_TIMEOUT, |line| {
        if line.contains("RAFTBLK-FIO-START") && killer.is_none() {
            let (daemon, kills, stop) = (daemon.clone(), kills.clone(), stop.clone());
            killer = Some(std::thread::spawn(move || {
                for _ in 0..KILLS {
                    let until = Instant::now() + KILL_INTERVAL;
                    while Instant::now() < until {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let mut d = daemon.lock().map_err(|_| anyhow::anyhow!("daemon lock"))?;
                    // SIGKILL, then a new process on the same socket.
                    d.restart()?;
                    kills.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            }));
        }
        if line.starts_with("RAFTBLK-FIO ") {
            kills_before_fio_ended = kills.load(Ordering::SeqCst);
        }
    })?;
    stop.store(true, Ordering::SeqCst);
    if let Some(k) = killer {
        k.join()
            .map_err(|_| anyhow::anyhow!("killer thread panicked"))??;
    }
    let daemon = daemon.lock().map_err(|_| anyhow::anyhow!("daemon lock"))?;
    let log = daemon.log_text();
    assert!(run.output.contains("RAFTBLK-FIO-START"), "{}", run.output);
    assert_eq!(
        run.exit,
        Some(0),
        "fio verify failed across daemon kills:\n{}\n--- daemon log ---\n{log}",
        run.output
    );
    assert!(fio_passed(&run.output), "{}", run.output);
    assert!(
        kills_before_fio_ended >= 3,
        "only {kills_before_fio_ended} daemon kills happened while fio ran:\n{}",
        run.output
    );
    let resubmitted =
        daemon.log_field_sum("resubmitting requests from the inflight region", "requests");
    println!(
        "daemon_kill: {kills_before_fio_ended} kills during fio, {resubmitted} requests resubmitted \
         from the inflight region, fio {:?}",
        fio_result(&run.output)
    );
    assert!(
        resubmitted > 0,
        "no request was resubmitted from the inflight region:\n{log}"
    );
    assert!(
        !log.contains("I/O failed"),
        "the daemon reported I/O errors:\n{log}"
    );
    Ok(())
}

const GROW_SCRIPT: &str = r#"#!/bin/sh
set -e
old=$(cat /sys/block/vda/size)
echo "RAFTBLK-READY $old"
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ]; do
  i=$((i + 1))
  [ $i -lt 2400 ] || { echo "RAFTBLK-NOGROW"; exit 1; }
  sleep 0.05
done
new=$(cat /sys/block/vda/size)
echo "RAFTBLK-GROWN $old $new"
# 1 MiB right past the old end, written and read back around the cache.
dd if=/dev/urandom of=/tmp/pat bs=1M count=1 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M seek=$((old / 2048)) oflag=direct conv=notrunc 2>/dev/null
got=$(dd if=/dev/vda bs=1M skip=$((old / 2048)) count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
want=$(sha256sum /tmp/pat | cut -d' ' -f1)
if [ "$got" = "$want" ]; then echo "RAFTBLK-PASTEND ok"; else echo "RAFTBLK-PASTEND bad"; exit 1; fi
"#;

/// `raftblk volume grow` on a volume a running guest has attached: the
/// guest kernel sees the new capacity without a reboot (the daemon reads
/// the new size and sends QEMU a config-change message) and writes past
/// the old end. How long the guest took is printed (a benchmark figure,
/// see BENCHMARKS.md), not asserted.
#[test]
fn online_grow() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    let old_bytes: u64 = 256 << 20;
    let new_bytes: u64 = 384 << 20;
    rt.block_on(client.create_volume("vmg", old_bytes))?;
    let dir = tempfile::tempdir()?;
    let daemon = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vmg", 2)?;
    let mut grown_at: Option<Instant> = None;
    let mut seen_after: Option<Duration> = None;
    let mut grow_error: Option<String> = None;
    let run = run_guest(&daemon.socket, 2, GROW_SCRIPT, GUEST_TIMEOUT, |line| {
        if line.starts_with("RAFTBLK-READY") && grown_at.is_none() {
            let out = std::process::Command::new(bin("raftblk"))
                .envs(raftblk_cluster_tests::tls::cli_env())
                .args(["--cluster", &cluster.cluster_arg()])
                .args(["volume", "grow", "vmg", "--size", "384M"])
                .output();
            match out {
                Ok(o) if o.status.success() => grown_at = Some(Instant::now()),
                Ok(o) => grow_error = Some(String::from_utf8_lossy(&o.stderr).into_owned()),
                Err(e) => grow_error = Some(e.to_string()),
            }
        }
        if line.starts_with("RAFTBLK-GROWN") {
            seen_after = grown_at.map(|t| t.elapsed());
        }
    })?;
    let log = daemon.log_text();
    assert_eq!(grow_error, None, "raftblk volume grow failed");
    assert_eq!(
        run.exit,
        Some(0),
        "the guest did not see the new size or could not write past the old end:\n{}\n--- daemon log ---\n{log}",
        run.output
    );
    let grown = run.values("RAFTBLK-GROWN");
    assert_eq!(
        grown.first().map(|v| v.as_slice()),
        Some([(old_bytes / 512).to_string(), (new_bytes / 512).to_string()].as_slice()),
        "{}",
        run.output
    );
    assert_eq!(
        run.values("RAFTBLK-PASTEND").first().map(|v| v.join(" ")),
        Some("ok".to_owned())
    );
    let seen_after = seen_after.ok_or_else(|| anyhow::anyhow!("no grow time"))?;
    println!(
        "online_grow: the guest saw {} MiB {} ms after `raftblk volume grow` returned",
        new_bytes >> 20,
        seen_after.as_millis()
    );
    assert!(log.contains("config change sent to the frontend"), "{log}");
    Ok(())
}
