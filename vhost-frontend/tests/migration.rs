//! Live migration of a real guest between two QEMU processes, each with
//! its own raftblk-vhost daemon serving the same volume (on one machine:
//! the destination started with `-incoming defer`), while the guest runs
//! fio with crc32c verification on both queues.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use raftblk_cluster_tests::guest::{fio_passed, fio_result, fio_verify, guest_initrd, VhostDaemon};
use raftblk_cluster_tests::vm::Vm;
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_MIB: u64 = 512;
/// Migrations in a row in `live_migration`.
const ROUNDS: u32 = 3;
/// The two tests share two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn vhost_blk(socket: &Path) -> Vec<String> {
    vec![
        "-chardev".to_owned(),
        format!("socket,id=c0,path={}", socket.display()),
        "-device".to_owned(),
        "vhost-user-blk-pci,chardev=c0,num-queues=2".to_owned(),
    ]
}

struct Sides {
    volume: String,
    _dir: tempfile::TempDir,
    _initrd: tempfile::TempDir,
    a: VhostDaemon,
    b: VhostDaemon,
    src: Vm,
    dst: Vm,
    migration_socket: String,
}

/// Daemons A and B on volume `volume`, the guest booted on A running fio,
/// the destination QEMU on B waiting for the incoming migration.
fn start_sides(cluster: &LocalCluster, volume: &str) -> anyhow::Result<Sides> {
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume(volume, 256 << 20))?;
    let dir = tempfile::tempdir()?;
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da)?;
    std::fs::create_dir_all(&db)?;
    let a = VhostDaemon::start(&da, &cluster.cluster_arg(), volume, 2)?;
    // B serves the migration destination: it takes the lease over when
    // the guest starts on it.
    let b = VhostDaemon::start_with(&db, &cluster.cluster_arg(), volume, 2, &["--incoming"])?;
    let script = format!(
        "#!/bin/sh\nset -e\necho RAFTBLK-FIO-START\n{}",
        fio_verify(0, 48, "")
    );
    let (initrd_dir, initrd) = guest_initrd(&script, &[])?;
    let boot = || {
        Vm::spawn(
            "source",
            &initrd,
            &vhost_blk(&a.socket),
            GUEST_MIB,
            &dir.path().join("src.qmp"),
            false,
        )
    };
    let mut src = boot()?;
    if let Err(e) = src.wait_for("RAFTBLK-FIO-START", Duration::from_secs(120)) {
        // TCG on two busy cores has stalled a guest kernel's timers during
        // boot (RCU stall reports, no disk I/O yet): boot once more.
        println!("the source guest did not start fio ({e:#}); booting it again");
        src.kill();
        src = boot()?;
        src.wait_for("RAFTBLK-FIO-START", Duration::from_secs(120))?;
    }
    let dst = Vm::spawn(
        "destination",
        &initrd,
        &vhost_blk(&b.socket),
        GUEST_MIB,
        &dir.path().join("dst.qmp"),
        true,
    )?;
    let migration_socket = dir.path().join("migration.sock").display().to_string();
    dst.qmp()?.execute(
        "migrate-incoming",
        &format!(r#"{{"uri": "unix:{migration_socket}"}}"#),
    )?;
    Ok(Sides {
        volume: volume.to_owned(),
        _dir: dir,
        _initrd: initrd_dir,
        a,
        b,
        src,
        dst,
        migration_socket,
    })
}

/// Who holds the attach lease of the sides' volume.
fn lease_holder(cluster: &LocalCluster, s: &Sides) -> anyhow::Result<String> {
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(cluster.client())?;
    let (_, lease) = rt.block_on(client.volume_status(&s.volume))?;
    Ok(lease.map(|l| l.holder).unwrap_or_default())
}

/// QMP `migrate` moves the guest from A to B while fio runs, three times
/// in a row (a fresh pair of QEMU processes and daemons each time): the
/// guest finishes fio on B with verification passing and no I/O error,
/// and A logged the pages it wrote while migration had logging on.
#[test]
fn live_migration() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    for round in 0..ROUNDS {
        let mut s = start_sides(&cluster, &format!("mig{round}"))?;
        // Let fio run a while on the source first.
        s.src.pump(Duration::from_secs(3));
        let mut sq = s.src.qmp()?;
        sq.execute(
            "migrate",
            &format!(r#"{{"uri": "unix:{}"}}"#, s.migration_socket),
        )?;
        sq.wait_migration(&["completed"], MIGRATION_TIMEOUT)?;
        // The source is paused after migrating; it goes away.
        let _ = sq.execute("quit", "{}");
        s.src.wait_exit(Duration::from_secs(60))?;
        let exit = s.dst.wait_exit(GUEST_TIMEOUT)?;
        let (a_log, b_log) = (s.a.log_text(), s.b.log_text());
        assert_eq!(
            exit,
            Some(0),
            "round {round}: the guest failed on the destination:\n--- source ---\n{}\n--- destination ---\n{}\n--- daemon A ---\n{a_log}\n--- daemon B ---\n{b_log}",
            s.src.output,
            s.dst.output
        );
        let fio = fio_result(&s.dst.output);
        assert!(
            fio_passed(&s.dst.output),
            "round {round}: fio on the destination: {fio:?}\n{}",
            s.dst.output
        );
        // fio ran across the move: it started on A and ended on B.
        assert!(
            fio_result(&s.src.output).is_none(),
            "round {round}: fio ended before the migration:\n{}",
            s.src.output
        );
        let logged =
            s.a.log_field_sum("dirty pages logged for migration", "pages_logged");
        println!("live_migration round {round}: fio {fio:?}, daemon A logged {logged} dirty pages");
        assert!(
            logged > 0,
            "round {round}: daemon A logged no page:\n{a_log}"
        );
        for (name, log) in [("A", &a_log), ("B", &b_log)] {
            assert!(
                !log.contains("I/O failed"),
                "round {round}: daemon {name} reported I/O errors:\n{log}"
            );
        }
        // The guest started on B: B took the lease over, A holds none.
        let holder = lease_holder(&cluster, &s)?;
        assert_eq!(
            holder,
            s.b.holder(),
            "round {round}: the lease after migration"
        );
    }
    Ok(())
}

/// A migration cancelled mid-way: the guest carries on on the source and
/// finishes fio there; daemon A turned dirty logging off again when QEMU
/// asked.
#[test]
fn migrate_cancel() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let mut s = start_sides(&cluster, "migc")?;
    s.src.pump(Duration::from_secs(2));
    let mut sq = s.src.qmp()?;
    // Slow enough that the migration is still running when cancelled.
    sq.execute("migrate-set-parameters", r#"{"max-bandwidth": 1048576}"#)?;
    sq.execute(
        "migrate",
        &format!(r#"{{"uri": "unix:{}"}}"#, s.migration_socket),
    )?;
    sq.wait_migration(&["active"], Duration::from_secs(60))?;
    s.src.pump(Duration::from_secs(2));
    sq.execute("migrate_cancel", "{}")?;
    sq.wait_migration(&["cancelled"], Duration::from_secs(60))?;
    s.dst.kill();
    let exit = s.src.wait_exit(GUEST_TIMEOUT)?;
    let a_log = s.a.log_text();
    assert_eq!(
        exit,
        Some(0),
        "the guest failed on the source after the cancel:\n{}\n--- daemon A ---\n{a_log}",
        s.src.output
    );
    let fio = fio_result(&s.src.output);
    assert!(
        fio_passed(&s.src.output),
        "fio on the source: {fio:?}\n{}",
        s.src.output
    );
    assert!(
        a_log.contains("logging=true") && a_log.contains("logging=false"),
        "daemon A did not turn dirty logging on and off again:\n{a_log}"
    );
    assert!(
        !a_log.contains("I/O failed"),
        "daemon A reported I/O errors:\n{a_log}"
    );
    // The guest never started on B: A kept the lease.
    assert_eq!(lease_holder(&cluster, &s)?, s.a.holder());
    println!("migrate_cancel: fio {fio:?} on the source");
    Ok(())
}
