//! A snapshot of a running guest's disk: the guest writes files on ext4
//! (each synced before it is announced) while `raftblk snapshot create`
//! runs; raftblk-vhost, the lease holder, holds the guest's writes for
//! the cut (the time is printed). A clone of the snapshot boots in a
//! second guest: e2fsck recovers the journal as after a power cut, the
//! filesystem is then clean, and every file synced before the create
//! reads back with its checksum.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use raftblk_cluster_tests::guest::{run_guest, VhostDaemon};
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Files written before the snapshot is asked for.
const BEFORE: usize = 12;

const WRITER: &str = r#"#!/bin/sh
set -e
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir /mnt/data
i=0
while [ $i -lt 30 ]; do
  dd if=/dev/urandom of=/mnt/data/f$i bs=64k count=8 2>/dev/null
  sync
  echo "RAFTBLK-DONE f$i $(sha256sum /mnt/data/f$i | cut -d' ' -f1)"
  if [ $i -eq @BEFORE@ ]; then echo RAFTBLK-SNAP-NOW; fi
  i=$((i + 1))
done
umount /mnt
"#;

const CHECKER: &str = r#"#!/bin/sh
set +e
e2fsck -fy /dev/vda > /tmp/fsck1 2>&1
echo "RAFTBLK-FSCK1 $?"
e2fsck -fn /dev/vda > /tmp/fsck2 2>&1
r=$?
echo "RAFTBLK-FSCK2 $r"
[ $r -eq 0 ] || cat /tmp/fsck1 /tmp/fsck2
mount -t ext4 -o ro /dev/vda /mnt || exit 1
for f in /mnt/data/*; do echo "RAFTBLK-FILE $(basename $f) $(sha256sum $f | cut -d' ' -f1)"; done
umount /mnt
"#;

#[test]
fn snapshot_of_a_running_guest_boots_as_a_clone() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume("vs", 128 << 20))?;
    let dir = tempfile::tempdir()?;
    let vhost = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vs", 1)?;
    let mut snap = None;
    let mut snapped_at = None;
    let script = WRITER.replace("@BEFORE@", &(BEFORE - 1).to_string());
    let run = run_guest(&vhost.socket, 1, &script, GUEST_TIMEOUT, |line| {
        if line.contains("RAFTBLK-SNAP-NOW") && snap.is_none() {
            let t = Instant::now();
            snap = Some(rt.block_on(client.create_snapshot("vs", "live")));
            snapped_at = Some(t.elapsed());
        }
    })?;
    assert_eq!(run.exit, Some(0), "writer guest failed:\n{}", run.output);
    let snap = match snap {
        Some(Ok(s)) => s,
        Some(Err(e)) => panic!("snapshot create failed: {e}\n{}", vhost.log_text()),
        None => panic!("the guest never asked for the snapshot:\n{}", run.output),
    };
    println!(
        "snapshot of a running guest: writes held {:.3} ms by raftblk-vhost; create took {:.0} ms",
        snap.quiesce_us as f64 / 1000.0,
        snapped_at.unwrap_or_default().as_secs_f64() * 1000.0
    );
    let written: HashMap<String, String> = run
        .values("RAFTBLK-DONE")
        .into_iter()
        .filter_map(|v| Some((v.first()?.clone(), v.get(1)?.clone())))
        .collect();
    assert_eq!(written.len(), 30, "{}", run.output);
    drop(vhost);

    rt.block_on(client.clone_volume("vs", "live", "vs-clone"))?;
    let vhost2 = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), "vs-clone", 1)?;
    let run2 = run_guest(&vhost2.socket, 1, CHECKER, GUEST_TIMEOUT, |_| {})?;
    assert_eq!(run2.exit, Some(0), "checker guest failed:\n{}", run2.output);
    let status = |key: &str| -> Option<i32> {
        run2.values(key)
            .first()
            .and_then(|v| v.first())
            .and_then(|s| s.parse().ok())
    };
    // 0: clean; 1: errors corrected (the journal replay of an unclean
    // filesystem); afterwards it must be clean.
    assert!(
        status("RAFTBLK-FSCK1").is_some_and(|s| s <= 1),
        "{}",
        run2.output
    );
    assert_eq!(status("RAFTBLK-FSCK2"), Some(0), "{}", run2.output);
    let found: HashMap<String, String> = run2
        .values("RAFTBLK-FILE")
        .into_iter()
        .filter_map(|v| Some((v.first()?.clone(), v.get(1)?.clone())))
        .collect();
    for i in 0..BEFORE {
        let name = format!("f{i}");
        assert_eq!(
            found.get(&name),
            written.get(&name),
            "file {name}, synced before the snapshot was asked for, differs in the clone:\n{}",
            run2.output
        );
    }
    println!(
        "the clone holds {} of the 30 files ({BEFORE} synced before the create)",
        found.len()
    );
    Ok(())
}
