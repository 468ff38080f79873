//! The guest lifecycle with a real Linux guest under QEMU: what happens to
//! a running VM when its raftblk-vhost daemon dies and comes back.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftblk_cluster_tests::guest::{fio_verify, run_guest_vhost, VhostDaemon};
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

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
    let fio = run.values("RAFTBLK-FIO");
    assert_eq!(
        fio.first().and_then(|v| v.first()).map(String::as_str),
        Some("rc=0"),
        "{}",
        run.output
    );
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
        fio.first()
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
