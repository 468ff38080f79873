//! Real guests on raftblk-nbd: a Linux guest under QEMU (TCG) whose disk
//! is a raftblk volume reached through QEMU's NBD client, first as an
//! emulated SATA disk on an AHCI controller (no paravirtual driver in
//! the guest), then as a SCSI disk on virtio-scsi. On each: mkfs.ext4,
//! files written and checksummed, e2fsck clean, fio verify. The second
//! guest first reads back the first one's files from the volume.

use std::path::Path;
use std::time::{Duration, Instant};

use raftblk_cluster_tests::guest::{
    fio_passed, fio_result, fio_verify, run_guest_nbd, NbdController,
};
use raftblk_cluster_tests::nbd::NbdDaemon;
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

/// Budget of one guest run (boot, mkfs, files, fsck, fio) under TCG.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Checks the previous guest's files, if asked, then: ext4 on the first
/// 96 MiB, files and their checksums read back after dropping the page
/// cache, e2fsck, fio verify further on.
const SCRIPT: &str = r#"#!/bin/sh
set -e
echo "RAFTBLK-SDA $(cat /sys/block/sda/size) $(cat /sys/block/sda/device/model 2>/dev/null)"
@CHECK_PREVIOUS@
mkfs.ext4 -q -F /dev/sda 96M
mount -t ext4 /dev/sda /mnt
mkdir /mnt/data
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/data/f$i bs=1M count=$((i * 2)) 2>/dev/null; done
echo "raftblk over nbd says hello" > /mnt/data/hello.txt
sync
for f in /mnt/data/*; do echo "RAFTBLK-FILE $(basename $f) $(sha256sum $f | cut -d' ' -f1)"; done
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/sda /mnt
for f in /mnt/data/*; do echo "RAFTBLK-REREAD $(basename $f) $(sha256sum $f | cut -d' ' -f1)"; done
umount /mnt
e2fsck -fn /dev/sda > /tmp/fsck.out 2>&1 && echo "RAFTBLK-FSCK clean" || { cat /tmp/fsck.out; exit 1; }
@FIO_JOB@
"#;

const CHECK_PREVIOUS: &str = r#"mount -t ext4 -o ro /dev/sda /mnt
for f in /mnt/data/*; do echo "RAFTBLK-PREVIOUS $(basename $f) $(sha256sum $f | cut -d' ' -f1)"; done
umount /mnt"#;

fn sums(run: &raftblk_cluster_tests::guest::GuestRun, key: &str) -> Vec<Vec<String>> {
    run.values(key)
}

#[test]
fn guest_on_ahci_and_virtio_scsi_over_nbd() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    let size: u64 = 256 << 20;
    rt.block_on(client.create_volume("nbdvm", size))?;
    let dir = tempfile::tempdir()?;
    let nbd = NbdDaemon::start(dir.path(), "nbdvm", &cluster.cluster_arg(), "nbdvm", &[])?;
    let e2fsck = Path::new("/sbin/e2fsck");
    let files = [("/sbin/e2fsck", e2fsck)];
    let mut previous: Option<Vec<Vec<String>>> = None;
    for (controller, fio_offset) in [(NbdController::Ahci, 128), (NbdController::VirtioScsi, 192)] {
        let fio = fio_verify(fio_offset, 24, "").replace("/dev/vda", "/dev/sda");
        let check = if previous.is_some() {
            CHECK_PREVIOUS
        } else {
            ""
        };
        let script = SCRIPT
            .replace("@CHECK_PREVIOUS@", check)
            .replace("@FIO_JOB@", &fio);
        let started = Instant::now();
        let run = run_guest_nbd(
            &nbd.socket,
            "nbdvm",
            controller,
            &files,
            &script,
            GUEST_TIMEOUT,
            |_| {},
        )?;
        let took = started.elapsed();
        assert_eq!(
            run.exit,
            Some(0),
            "{controller:?} guest failed:\n{}\n{}",
            run.output,
            nbd.log_text()
        );
        let sda = sums(&run, "RAFTBLK-SDA");
        assert_eq!(
            sda.first().and_then(|v| v.first()).map(String::as_str),
            Some((size / 512).to_string().as_str()),
            "the guest sees the volume's size: {}",
            run.output
        );
        let written = sums(&run, "RAFTBLK-FILE");
        assert_eq!(written.len(), 4, "{}", run.output);
        assert_eq!(written, sums(&run, "RAFTBLK-REREAD"), "files read back");
        assert!(run.output.contains("RAFTBLK-FSCK clean"), "{}", run.output);
        assert!(
            fio_passed(&run.output),
            "fio: {:?}\n{}",
            fio_result(&run.output),
            run.output
        );
        if let Some(prev) = &previous {
            assert_eq!(
                &sums(&run, "RAFTBLK-PREVIOUS"),
                prev,
                "the first guest's files on the volume:\n{}",
                run.output
            );
        }
        println!(
            "{controller:?} over NBD: guest run {took:?}, fio {:?}, disk model {:?}",
            fio_result(&run.output),
            sda.first().map(|v| v[1..].join(" "))
        );
        previous = Some(written);
    }
    let log = nbd.log_text();
    assert_eq!(log.matches("client connected").count(), 2, "{log}");
    assert!(log.contains("structured=true block_status=true"), "{log}");
    Ok(())
}
