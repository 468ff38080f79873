//! The node process as a supervisor sees it: a panic on any thread (here the
//! store thread, through a failpoint) ends the process with a non-zero
//! status at once instead of leaving a zombie that answers "store stopped";
//! and the `raftblk-node` binary users run ignores `FAILPOINTS` entirely
//! (only the test-only `raftblk-node-failpoints` binary reads it).

use std::time::{Duration, Instant};

use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};

const HEALTHY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_on_the_store_thread_ends_the_process() -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(HEALTHY).await?;
    cluster.kill(2);
    // The store thread panics on its 20th round, a moment after start.
    cluster.set_next_env(2, &[("FAILPOINTS", "store_round=20*off->panic")]);
    let started = Instant::now();
    cluster.start_node(2)?;
    let code = cluster.wait_exit(2, Duration::from_secs(15));
    let took = started.elapsed();
    let log = cluster.log_tail(2, 40);
    assert!(
        log.contains("panic"),
        "the node exited without logging the panic:\n{log}"
    );
    assert_eq!(
        code,
        Some(raftblk_node::daemon::PANIC_EXIT_CODE),
        "node 2 did not exit with the panic status (exit {code:?} after {took:?}):\n{log}"
    );
    // Exit follows the panic at once: startup plus 20 rounds stay far
    // below the 5 s the supervisor may wait.
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    println!("node exited with {code:?} {took:?} after start (panic on the store thread)");
    // It recovers from its data directory when restarted without the fault.
    cluster.start_node(2)?;
    cluster.wait_healthy(HEALTHY).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_binary_ignores_failpoints() -> anyhow::Result<()> {
    let exe = raftblk_cluster_tests::bin("raftblk-node");
    let mut cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(HEALTHY).await?;
    // Restart every node with failpoints that would fail every synced write
    // and panic the store thread, but through the normal binary.
    for i in 1..=3 {
        cluster.kill(i);
        cluster.set_next_env(
            i,
            &[(
                "FAILPOINTS",
                "engine_sync_write=return;store_round=5*off->panic",
            )],
        );
        cluster.start_node_with(i, &exe)?;
    }
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    client.create_volume("fp", 4 << 20).await?;
    let vol = client.open_volume("fp").await?;
    let data = payload(7, 64 * 1024);
    vol.write(4096, &data).await?;
    assert_eq!(vol.read(4096, data.len() as u64).await?, data);
    for i in 1..=3 {
        assert!(
            cluster.wait_exit(i, Duration::from_millis(200)).is_none(),
            "node {i} exited: FAILPOINTS reached the shipped binary:\n{}",
            cluster.log_tail(i, 20)
        );
    }
    Ok(())
}
