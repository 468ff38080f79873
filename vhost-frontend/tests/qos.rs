//! Per-volume I/O limits with a real Linux guest under QEMU: while fio
//! runs in the guest, `raftblk volume set`'s library call limits the volume
//! to 500 IOPS; the guest's own disk statistics over the next 10 s show
//! that rate; the limit is lifted online and the rate recovers.

use std::time::Duration;

use raftblk_cluster_tests::guest::{run_guest, VhostDaemon};
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};
use raftblk_proto::QosLimits;

const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
const LIMIT_IOPS: u64 = 500;

/// fio reads for 30 s in the background; the guest counts the reads its
/// disk completed over 10 s once the limit is set, and over 5 s once it
/// is lifted (each after a 2 s pause: the daemon applies a change within
/// one second).
const SCRIPT: &str = r#"#!/bin/sh
set -e
reads() { set -- $(cat /sys/block/vda/stat); echo $1; }
fio --name=q --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randread \
    --bs=4k --iodepth=16 --size=64m --runtime=30 --time_based \
    --output-format=terse --terse-version=3 > /tmp/q.out 2>&1 &
sleep 1
echo RAFTBLK-QOS-SET
sleep 2
a=$(reads); sleep 10; b=$(reads)
echo "RAFTBLK-QOS limited $(( (b - a) / 10 ))"
echo RAFTBLK-QOS-LIFT
sleep 2
a=$(reads); sleep 5; b=$(reads)
echo "RAFTBLK-QOS free $(( (b - a) / 5 ))"
wait
"#;

#[test]
fn iops_limit_set_and_lifted_online() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume("vq", 128 << 20))?;
    let dir = tempfile::tempdir()?;
    let vhost = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vq", 1)?;
    let limit = QosLimits {
        iops_max: LIMIT_IOPS,
        ..QosLimits::default()
    };
    let mut set_errors = Vec::new();
    let run = run_guest(&vhost.socket, 1, SCRIPT, GUEST_TIMEOUT, |line| {
        let qos = if line.contains("RAFTBLK-QOS-SET") {
            Some(limit)
        } else if line.contains("RAFTBLK-QOS-LIFT") {
            None
        } else {
            return;
        };
        if let Err(e) = rt.block_on(client.set_qos("vq", qos)) {
            set_errors.push(e.to_string());
        }
    })?;
    assert!(set_errors.is_empty(), "set_qos: {set_errors:?}");
    assert_eq!(run.exit, Some(0), "guest failed:\n{}", run.output);
    let rate = |what: &str| -> Option<u64> {
        run.values("RAFTBLK-QOS")
            .into_iter()
            .find(|v| v.first().map(String::as_str) == Some(what))
            .and_then(|v| v.get(1).and_then(|n| n.parse().ok()))
    };
    let (limited, free) = (rate("limited"), rate("free"));
    println!("qos: {limited:?} IOPS under a {LIMIT_IOPS} IOPS limit, {free:?} IOPS once lifted");
    let limited = limited.unwrap_or(0);
    assert!(
        limited * 10 >= LIMIT_IOPS * 9 && limited * 10 <= LIMIT_IOPS * 11,
        "{limited} IOPS under a {LIMIT_IOPS} IOPS limit (±10%):\n{}\n{}",
        run.output,
        vhost.log_text()
    );
    assert!(
        free.unwrap_or(0) > 2 * LIMIT_IOPS,
        "{free:?} IOPS after the limit was lifted:\n{}",
        run.output
    );
    let log = vhost.log_text();
    assert!(
        log.matches("I/O limits changed").count() >= 2,
        "the daemon did not log both changes:\n{log}"
    );
    Ok(())
}
