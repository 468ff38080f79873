//! Bad input gets a clear error and changes nothing: the CLI's argument
//! and cluster errors, and malformed block RPCs sent straight to a node.

use std::process::Command;
use std::time::Duration;

use raftblk_cluster_tests::{bin, payload, ClusterSpec, LocalCluster};
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::volumes_client::VolumesClient;
use raftblk_proto::{
    placement, BlockRange, CreateVolumeRequest, ErrorCode, ReadRequest, WriteRequest,
};

fn cli(cluster: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("raftblk"))
        .envs(raftblk_cluster_tests::tls::cli_env())
        .arg("--cluster")
        .arg(cluster)
        .arg("--timeout-secs")
        .arg("10")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run raftblk {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_are_clear_and_change_nothing() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(Duration::from_secs(30)).await?;
    let c = cluster.cluster_arg();
    let dir = tempfile::tempdir()?;

    let (ok, out, err) = cli(&c, &["volume", "create", "v1", "--size", "2M"]);
    assert!(ok, "{out}{err}");
    let img = dir.path().join("small.img");
    std::fs::write(&img, payload(1, 1 << 20))?;
    let (ok, _, err) = cli(
        &c,
        &["volume", "import", "v1", img.to_str().unwrap_or_default()],
    );
    assert!(ok, "{err}");

    // I/O limits: set, shown, merged, removed; bad values named.
    let (ok, _, err) = cli(&c, &["volume", "set", "v1"]);
    assert!(!ok && err.contains("nothing to set"), "{err}");
    let (ok, _, err) = cli(&c, &["volume", "set", "v1", "--bps-max", "fast"]);
    assert!(!ok && err.contains("--bps-max"), "{err}");
    let (ok, out, err) = cli(
        &c,
        &[
            "volume",
            "set",
            "v1",
            "--iops-max",
            "300",
            "--bps-max",
            "10M",
        ],
    );
    assert!(
        ok && out.contains("IOPS 300") && out.contains("10 MiB/s"),
        "{out}{err}"
    );
    let (ok, out, err) = cli(&c, &["volume", "set", "v1", "--write-iops-max", "100"]);
    assert!(
        ok && out.contains("IOPS 300 (read -, write 100"),
        "{out}{err}"
    );
    let (ok, out, err) = cli(
        &c,
        &[
            "volume",
            "set",
            "v1",
            "--iops-max",
            "0",
            "--write-iops-max",
            "0",
            "--bps-max",
            "0",
        ],
    );
    assert!(ok && out.contains("limits: none"), "{out}{err}");
    let (_, out, _) = cli(&c, &["volume", "info", "v1"]);
    assert!(out.contains("limits:     none"), "{out}");

    // Unknown volume.
    let (ok, _, err) = cli(&c, &["volume", "info", "nope"]);
    assert!(!ok && err.contains("no volume named \"nope\""), "{err}");
    let (ok, _, err) = cli(&c, &["volume", "delete", "nope"]);
    assert!(!ok && err.contains("no volume named \"nope\""), "{err}");
    // Size not a multiple of 512.
    let (ok, _, err) = cli(&c, &["volume", "create", "v2", "--size", "1000"]);
    assert!(!ok && err.contains("not a multiple of 512"), "{err}");
    let (ok, _, err) = cli(&c, &["volume", "create", "v2", "--size", "ten"]);
    assert!(!ok && err.contains("is not a size"), "{err}");
    let (ok, _, err) = cli(&c, &["volume", "grow", "v1", "--size", "3000"]);
    assert!(!ok && err.contains("not a multiple of 512"), "{err}");
    // Shrinking.
    let (ok, _, err) = cli(&c, &["volume", "grow", "v1", "--size", "1M"]);
    assert!(!ok && err.contains("shrinking"), "{err}");
    // Existing name.
    let (ok, _, err) = cli(&c, &["volume", "create", "v1", "--size", "1M"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    // Bad name.
    let (ok, _, err) = cli(&c, &["volume", "create", "bad/name", "--size", "1M"]);
    assert!(!ok && err.contains("may only hold"), "{err}");
    // Import larger than the volume.
    let big = dir.path().join("big.img");
    std::fs::write(&big, payload(2, 3 << 20))?;
    let (ok, _, err) = cli(
        &c,
        &["volume", "import", "v1", big.to_str().unwrap_or_default()],
    );
    assert!(!ok && err.contains("larger than volume v1"), "{err}");
    // Import of a missing file.
    let (ok, _, err) = cli(&c, &["volume", "import", "v1", "/nonexistent/x.img"]);
    assert!(
        !ok && err.contains("cannot read /nonexistent/x.img"),
        "{err}"
    );
    // Unreachable cluster (a port nothing listens on).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let (ok, _, err) = cli(&dead, &["volume", "list"]);
    assert!(!ok && err.contains("cannot reach the cluster"), "{err}");

    // Snapshots and clones: malformed specs, unknown snapshots, bad
    // names, a clone under a taken name, a garbage diff file.
    let (ok, _, err) = cli(&c, &["snapshot", "create", "v1"]);
    assert!(!ok && err.contains("is not VOLUME@SNAPSHOT"), "{err}");
    let (ok, _, err) = cli(&c, &["snapshot", "create", "v1@bad/name"]);
    assert!(!ok && err.contains("snapshot name"), "{err}");
    let (ok, _, err) = cli(&c, &["snapshot", "create", "nope@s"]);
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, _, err) = cli(&c, &["snapshot", "delete", "v1@never"]);
    assert!(!ok && err.contains("no snapshot"), "{err}");
    let (ok, _, err) = cli(&c, &["snapshot", "rollback", "v1@never"]);
    assert!(!ok && err.contains("no snapshot"), "{err}");
    let (ok, _, err) = cli(&c, &["volume", "clone", "v1@never", "v3"]);
    assert!(!ok && err.contains("no snapshot"), "{err}");
    let (ok, _, err) = cli(&c, &["snapshot", "create", "v1@s"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&c, &["snapshot", "create", "v1@s"]);
    assert!(
        !ok && err.contains("v1@s") && err.contains("already exists"),
        "{err}"
    );
    let (ok, _, err) = cli(&c, &["volume", "clone", "v1@s", "v1"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(&c, &["volume", "flatten", "v1"]);
    assert!(!ok && err.contains("not a clone"), "{err}");
    let (ok, _, err) = cli(
        &c,
        &[
            "volume",
            "export-diff",
            "v1@s",
            "--from-snap",
            "s",
            "/dev/null",
        ],
    );
    assert!(!ok && err.contains("not older"), "{err}");
    let junk = dir.path().join("junk.diff");
    std::fs::write(&junk, payload(3, 4096))?;
    let (ok, _, err) = cli(
        &c,
        &[
            "volume",
            "import-diff",
            junk.to_str().unwrap_or_default(),
            "v1",
        ],
    );
    assert!(!ok && err.contains("not a raftblk diff"), "{err}");
    let (ok, _, err) = cli(&c, &["snapshot", "delete", "v1@s"]);
    assert!(ok, "{err}");

    // Nothing changed: one volume, same size, same bytes.
    let (ok, out, _) = cli(&c, &["volume", "list"]);
    assert!(ok);
    assert!(out.contains("v1") && !out.contains("v2"), "{out}");
    assert!(out.contains("2 MiB"), "{out}");
    let exported = dir.path().join("out.img");
    let (ok, _, err) = cli(
        &c,
        &[
            "volume",
            "export",
            "v1",
            exported.to_str().unwrap_or_default(),
        ],
    );
    assert!(ok, "{err}");
    let got = std::fs::read(&exported)?;
    assert_eq!(got.len(), 2 << 20);
    assert!(got[..1 << 20] == payload(1, 1 << 20)[..] && got[1 << 20..].iter().all(|&b| b == 0));

    // Output into a pipe whose reader has gone (`| head -1`) ends
    // quietly with 141, as Unix tools do: no panic, no backtrace. The
    // reader exits at once; raftblk writes only after its RPCs.
    let out = Command::new("sh")
        .envs(raftblk_cluster_tests::tls::cli_env())
        .arg("-c")
        .arg(r#"{ "$0" --cluster "$1" cluster status; echo "rc=$?" >&2; } | exit 0"#)
        .arg(bin("raftblk"))
        .arg(&c)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rc=141") && !err.contains("panicked"),
        "raftblk into a closed pipe: {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rpcs_get_clear_errors_and_change_nothing() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(Duration::from_secs(30)).await?;
    let client = cluster.client().await?;
    let info = client.create_volume("rpc", 2 << 20).await?;
    let vol = client.open_volume("rpc").await?;
    let data = payload(11, 2 << 20);
    vol.write(0, &data).await?;
    let groups = cluster.spec.data_groups;
    let g0 = placement::chunk_group(info.id, 0, groups);
    let leader = cluster
        .leader_of(g0)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let ch = cluster.channel(leader).await?;
    let mut bio = BlockIoClient::new(ch.clone());
    let range = |group, volume_id, off, len| BlockRange {
        group_id: group,
        volume_id,
        offset_bytes: off,
        length_bytes: len,
    };
    let write = |r: BlockRange, len: usize| WriteRequest {
        range: Some(r),
        data: vec![0xAB; len].into(),
        request_id: Default::default(),
        retry_age_ms: 0,
        epoch: 1,
        clone: None,
    };
    let cases: Vec<(WriteRequest, ErrorCode, &str)> = vec![
        (
            write(range(g0, info.id, 100, 512), 512),
            ErrorCode::InvalidArgument,
            "multiples of 512",
        ),
        (
            write(range(g0, info.id, 0, 700), 700),
            ErrorCode::InvalidArgument,
            "multiples of 512",
        ),
        (
            write(range(g0, info.id, 0, 0), 0),
            ErrorCode::InvalidArgument,
            "positive",
        ),
        (
            write(range(g0, info.id, 0, 4096), 512),
            ErrorCode::InvalidArgument,
            "data is 512 bytes",
        ),
        (
            write(range(g0, info.id, 2 << 20, 4096), 4096),
            ErrorCode::OutOfRange,
            "past the end",
        ),
        (
            write(range(g0, info.id, u64::MAX - 511, 512), 512),
            ErrorCode::OutOfRange,
            "overflow",
        ),
        (
            write(range(g0, 9999, 0, 4096), 4096),
            ErrorCode::NoSuchVolume,
            "no volume with id 9999",
        ),
        (
            write(range(g0, info.id, (1 << 20) - 4096, 8192), 8192),
            ErrorCode::InvalidArgument,
            "crosses a chunk boundary",
        ),
        (
            write(range(g0, info.id, 0, 2 << 20), 2 << 20),
            ErrorCode::InvalidArgument,
            "exceeds the limit",
        ),
        (
            write(range(if g0 == 1 { 2 } else { 1 }, info.id, 0, 4096), 4096),
            ErrorCode::InvalidArgument,
            "lives in group",
        ),
        (
            WriteRequest {
                range: None,
                data: Default::default(),
                request_id: Default::default(),
                retry_age_ms: 0,
                epoch: 1,
                clone: None,
            },
            ErrorCode::InvalidArgument,
            "no range",
        ),
        (
            WriteRequest {
                request_id: vec![1u8; 5].into(),
                ..write(range(g0, info.id, 0, 4096), 4096)
            },
            ErrorCode::InvalidArgument,
            "request id must be 16 bytes",
        ),
        (
            WriteRequest {
                epoch: 0,
                ..write(range(g0, info.id, 0, 4096), 4096)
            },
            ErrorCode::Fenced,
            "need an attach lease",
        ),
    ];
    for (req, code, text) in cases {
        let desc = format!("{:?}", req.range);
        let r = bio.write(req).await?.into_inner();
        let e = r
            .error
            .ok_or_else(|| anyhow::anyhow!("accepted bad write {desc}"))?;
        assert_eq!(e.kind(), code, "{desc}: {e}");
        assert!(e.message.contains(text), "{desc}: {e}");
    }
    let r = bio
        .read(ReadRequest {
            range: Some(range(g0, info.id, 512 * 3, 1000)),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(r.error.map(|e| e.kind()), Some(ErrorCode::InvalidArgument));
    // A group this node does not lead (or host) answers NotLeader with a
    // leader hint, or WrongGroup.
    let mut vols = VolumesClient::new(ch);
    for (name, size, text) in [
        ("", 4096u64, "1 to 128"),
        ("x", 1000, "multiple of 512"),
        ("x", 0, "positive"),
    ] {
        let r = vols
            .create(CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                qos: None,
                ..Default::default()
            })
            .await?
            .into_inner();
        let e = r
            .error
            .ok_or_else(|| anyhow::anyhow!("accepted bad volume {name:?}/{size}"))?;
        assert!(e.message.contains(text), "{e}");
    }
    // Nothing changed.
    assert!(vol.read(0, 2 << 20).await? == data);
    assert_eq!(client.list_volumes().await?.len(), 1);
    Ok(())
}
