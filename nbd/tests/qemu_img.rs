//! qemu-img and qemu-io against `raftblk-nbd` on a real cluster: a qcow2
//! image with a known pattern and holes is imported into a volume
//! through the NBD export (`qemu-img convert -n`), compared
//! (`qemu-img compare`), mapped (`qemu-img map`: the holes come from
//! BLOCK_STATUS), exported back to qcow2 and compared again; a second
//! client of the writable export is refused; SIGTERM gives the lease
//! back; a snapshot export serves two readers at once while the volume
//! is written; a read-only export serves two readers at once and applies the
//! volume's I/O limits as they change.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use raftblk_cluster_tests::nbd::NbdDaemon;
use raftblk_cluster_tests::{bin, ClusterSpec, LocalCluster};

const MIB: u64 = 1 << 20;
/// Where the image holds data: (offset, length, pattern byte).
const DATA: [(u64, u64, u8); 4] = [
    (0, MIB, 0xab),
    (10 * MIB, MIB, 0xcd),
    (33 * MIB, MIB / 2, 0x5a),
    (63 * MIB, MIB, 0x11),
];
const IMAGE_SIZE: u64 = 64 * MIB;
/// Budget of any one tool run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a command to its end within TOOL_TIMEOUT (killed past it).
fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("spawn {cmd:?}: {e} (install qemu-utils)"))?;
    wait_output(child, &format!("{cmd:?}"))
}

fn wait_output(mut child: std::process::Child, what: &str) -> anyhow::Result<Output> {
    let deadline = Instant::now() + TOOL_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{what} did not finish within {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command that must succeed; its stdout.
fn ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = run(cmd)?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn qemu_img(args: &[&str]) -> anyhow::Result<String> {
    ok(Command::new("qemu-img").args(args))
}

/// The image's virtual size from `qemu-img info --output=json` (the
/// image's own field comes after those of its children).
fn virtual_size(image: &Path) -> anyhow::Result<u64> {
    let info = qemu_img(&["info", "--output=json", &image.display().to_string()])?;
    let at = info
        .rfind("\"virtual-size\":")
        .ok_or_else(|| anyhow::anyhow!("no virtual-size in {info}"))?;
    let digits: String = info[at + 15..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Ok(digits.parse()?)
}

/// `(start, length, data)` of each extent `qemu-img map --output=json`
/// prints.
fn map_extents(json: &str) -> Vec<(u64, u64, bool)> {
    let field = |obj: &str, name: &str| -> Option<String> {
        let at = obj.find(&format!("\"{name}\":"))? + name.len() + 3;
        Some(
            obj[at..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect(),
        )
    };
    json.split('{')
        .skip(1)
        .filter_map(|obj| {
            Some((
                field(obj, "start")?.parse().ok()?,
                field(obj, "length")?.parse().ok()?,
                field(obj, "data")? == "true",
            ))
        })
        .collect()
}

/// The data ranges of a map, adjacent extents merged.
fn data_ranges(extents: &[(u64, u64, bool)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(start, len, data) in extents {
        if !data {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len)),
        }
    }
    out
}

fn expected_data() -> Vec<(u64, u64)> {
    DATA.iter().map(|&(o, l, _)| (o, l)).collect()
}

#[test]
fn qemu_img_convert_compare_map_through_nbd() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("image.qcow2");
    let image_s = image.display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &image_s,
        &IMAGE_SIZE.to_string(),
    ])?;
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for (off, len, pat) in DATA {
        io.arg("-c").arg(format!("write -P {pat:#x} {off} {len}"));
    }
    ok(io.arg(&image_s))?;
    let size = virtual_size(&image)?;
    assert_eq!(size, IMAGE_SIZE);

    let cluster = LocalCluster::start(ClusterSpec::default())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let cargs = ["--cluster", &cluster.cluster_arg()];
    ok(Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(cargs)
        .args(["volume", "create", "img", "--size", &size.to_string()]))?;

    // Refused at start, with a message: TCP without TLS, a snapshot or a
    // volume that does not exist.
    let sock = dir.path().join("refused.sock").display().to_string();
    for (extra, want) in [
        (["--volume", "img", "--listen", "127.0.0.1:10809"], "TLS"),
        (["--volume", "img@s1", "--read-only", ""], "no snapshot"),
        (["--volume", "nope", "", ""], "nope"),
    ] {
        let out = run(Command::new(bin("raftblk-nbd"))
            .envs(raftblk_cluster_tests::tls::cli_env())
            .args(["--socket", &sock])
            .args(cargs)
            .args(extra.iter().filter(|a| !a.is_empty())))?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }

    let mut nbd = NbdDaemon::start(dir.path(), "w", &cluster.cluster_arg(), "img", &[])?;
    let uri = nbd.uri();
    // Import: every format QEMU reads goes in through the export.
    let t = Instant::now();
    qemu_img(&["convert", "-n", "-f", "qcow2", "-O", "raw", &image_s, &uri])?;
    println!("import of {} MiB: {:?}", size / MIB, t.elapsed());
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &image_s, &uri])?;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // The holes are visible through BLOCK_STATUS.
    let map = qemu_img(&["map", "--output=json", "-f", "raw", &uri])?;
    let extents = map_extents(&map);
    assert_eq!(
        extents.iter().map(|e| e.1).sum::<u64>(),
        size,
        "map covers the disk: {map}"
    );
    assert_eq!(data_ranges(&extents), expected_data(), "{map}");
    // The pattern itself, through a second tool.
    let mut check = Command::new("qemu-io");
    check.args(["-r", "-f", "raw"]);
    for (off, len, pat) in DATA {
        check.arg("-c").arg(format!("read -P {pat:#x} {off} {len}"));
    }
    check
        .arg("-c")
        .arg(format!("read -P 0 {} {}", 2 * MIB, MIB));
    let out = ok(check.arg(&uri))?;
    assert!(!out.contains("verification failed"), "{out}");
    // Export back to qcow2: identical, and only the data was allocated.
    let back = dir.path().join("back.qcow2");
    let back_s = back.display().to_string();
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &uri, &back_s])?;
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", &image_s, &back_s])?;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let back_map = qemu_img(&["map", "--output=json", "-f", "qcow2", &back_s])?;
    assert_eq!(
        data_ranges(&map_extents(&back_map)),
        expected_data(),
        "{back_map}"
    );

    // A second client of the writable export is refused while the first
    // one is connected.
    let holder = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4096", "-c", "sleep 6000", &uri])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(700));
    let second = run(Command::new("qemu-img").args(["info", "-f", "raw", &uri]))?;
    let holder = wait_output(holder, "qemu-io holding the export")?;
    assert!(holder.status.success(), "{holder:?}");
    assert!(!second.status.success(), "second client served");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another client"), "{err}");
    assert!(nbd.log_text().contains("refused a client"));

    // SIGTERM gives the lease back: a new daemon attaches without
    // --takeover.
    assert_eq!(nbd.terminate(Duration::from_secs(15))?, Some(0));
    assert!(
        nbd.log_text().contains("attach lease given back"),
        "{}",
        nbd.log_text()
    );
    let mut nbd2 = NbdDaemon::start(dir.path(), "w", &cluster.cluster_arg(), "img", &[])?;
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &image_s, &nbd2.uri()])?;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // Stopped as systemd would (the lease is given back).
    assert_eq!(nbd2.terminate(Duration::from_secs(15))?, Some(0));

    // A read-only export: two readers at once, writes refused.
    let ro = NbdDaemon::start(
        dir.path(),
        "ro",
        &cluster.cluster_arg(),
        "img",
        &["--read-only"],
    )?;
    let reader = |pause_ms: u64| {
        let mut c = Command::new("qemu-io");
        c.args(["-r", "-f", "raw"]);
        c.arg("-c").arg(format!("read -P 0xab 0 {MIB}"));
        c.arg("-c").arg(format!("sleep {pause_ms}"));
        c.arg("-c").arg(format!("read -P 0x11 {} {MIB}", 63 * MIB));
        c.arg(ro.uri())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn()
    };
    let (a, b) = (reader(1500)?, reader(1500)?);
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &image_s, &ro.uri()])?;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    for r in [a, b] {
        let out = wait_output(r, "qemu-io reader")?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("failed"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // I/O limits apply within a second of a change: 30 reads take about
    // 1.5 s at 20 IOPS, and far less once the limit is lifted.
    let client = rt.block_on(cluster.client())?;
    let limit = raftblk_proto::QosLimits {
        iops_max: 20,
        ..raftblk_proto::QosLimits::default()
    };
    let timed_reads = || -> anyhow::Result<Duration> {
        let mut c = Command::new("qemu-io");
        c.args(["-r", "-f", "raw"]);
        for i in 0..30 {
            c.arg("-c").arg(format!("read {} 4096", i * 8192));
        }
        let t = Instant::now();
        ok(c.arg(ro.uri()))?;
        Ok(t.elapsed())
    };
    rt.block_on(client.set_qos("img", Some(limit)))?;
    std::thread::sleep(Duration::from_millis(1200));
    let limited = timed_reads()?;
    rt.block_on(client.set_qos("img", None))?;
    std::thread::sleep(Duration::from_millis(1200));
    let free = timed_reads()?;
    println!("30 reads: {limited:?} under a 20 IOPS limit, {free:?} without");
    assert!(limited >= Duration::from_millis(1200), "{limited:?}");
    assert!(free * 2 < limited, "{free:?} vs {limited:?}");
    assert!(ro.log_text().contains("I/O limits changed"));
    let log = ro.log_text();
    let connected = log.matches("client connected").count();
    assert!(connected >= 3, "{log}");
    let write =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4096", &ro.uri()]))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&write.stdout),
        String::from_utf8_lossy(&write.stderr)
    );
    assert!(
        !write.status.success()
            || text.contains("failed")
            || text.contains("read-only")
            || text.contains("Permission"),
        "write to a read-only export: {text}"
    );
    drop(ro);

    // A snapshot served read-only: two readers at once see the image
    // while the volume keeps taking writes through a writable export.
    ok(Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .args(cargs)
        .args(["snapshot", "create", "img@s1"]))?;
    let w = NbdDaemon::start(dir.path(), "w3", &cluster.cluster_arg(), "img", &[])?;
    let snap = NbdDaemon::start(dir.path(), "snap", &cluster.cluster_arg(), "img@s1", &[])?;
    let mut writer = Command::new("qemu-io");
    writer.args(["-f", "raw"]);
    for i in 0..64u64 {
        writer
            .arg("-c")
            .arg(format!("write -P 0x77 {} {MIB}", (i % 8) * MIB));
    }
    let writer = writer
        .arg(w.uri())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let snap_reader = || {
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw", &image_s, &snap.uri()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let (a, b) = (snap_reader()?, snap_reader()?);
    for r in [a, b] {
        let out = wait_output(r, "qemu-img compare of the snapshot")?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Images are identical"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = wait_output(writer, "qemu-io writer")?;
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{out:?}"
    );
    // The volume did change; the snapshot did not.
    let now = ok(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", &format!("read -P 0x77 0 {MIB}")])
        .arg(w.uri()))?;
    assert!(!now.contains("failed"), "{now}");
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", &image_s, &snap.uri()])?;
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let write =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4096", &snap.uri()]))?;
    assert!(
        !write.status.success() || String::from_utf8_lossy(&write.stdout).contains("failed"),
        "a write to a snapshot export succeeded"
    );
    println!("qemu_img test took {:?}", started.elapsed());
    Ok(())
}
