//! Block I/O through the client against a real 3-node cluster: mixed-size
//! writes that cross chunk boundaries read back byte-exact, thin volumes,
//! discard and write-zeroes, and the volume catalog operations.

use std::time::Duration;

use futures::future::try_join_all;
use raftblk_client::ClientError;
use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use rand::{Rng, SeedableRng};

const HEALTHY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_size_writes_read_back_exactly() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    let size: u64 = 8 << 20; // 8 chunks of 1 MiB over 4 groups
    client.create_volume("mixed", size).await?;
    let vol = client.open_volume("mixed").await?;
    let mut model = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut seed = 1u64;
    for _round in 0..25 {
        // Up to 8 non-overlapping writes in flight at once.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut writes = Vec::new();
        for _ in 0..8 {
            let sectors = match rng.gen_range(0..4) {
                0 => 1,
                1 => rng.gen_range(1..=8),
                2 => rng.gen_range(8..=256),
                _ => rng.gen_range(256..=2048), // up to 1 MiB
            };
            let len = sectors * 512;
            let off = rng.gen_range(0..=(size - len) / 512) * 512;
            if taken.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            taken.push((off, len));
            seed += 1;
            let data = payload(seed, len as usize);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            writes.push((off, data));
        }
        try_join_all(writes.iter().map(|(off, data)| vol.write(*off, data))).await?;
    }
    // Whole-volume read in 1 MiB reads that straddle chunk boundaries.
    let mut at = 0u64;
    while at < size {
        let len = (1 << 20).min(size - at);
        let got = vol.read(at, len).await?;
        assert!(
            got == model[at as usize..(at + len) as usize],
            "mismatch in [{at}, {})",
            at + len
        );
        at += len - 4096 * 3; // overlap and misalign against chunk edges
        if at + 4096 * 3 >= size {
            break;
        }
    }
    // Random small reads, including sub-4K ones.
    for _ in 0..200 {
        let len = rng.gen_range(1..=32u64) * 512;
        let off = rng.gen_range(0..=(size - len) / 512) * 512;
        let got = vol.read(off, len).await?;
        assert!(
            got == model[off as usize..(off + len) as usize],
            "small read at {off}+{len}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_volumes_discard_and_write_zeroes() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    let vol = client.create_volume("thin", 4 << 20).await?;
    let vol = client.open_volume(&vol.name).await?;
    // Never written: zeros.
    assert!(vol.read(0, 1 << 20).await?.iter().all(|&b| b == 0));
    let data = payload(7, 3 << 20);
    vol.write(0, &data).await?;
    // Discard 1 MiB + 4 KiB straddling a chunk boundary, plus a sub-block
    // range (read-modify-write at apply time).
    vol.discard((1 << 20) - 4096, (1 << 20) + 8192).await?;
    vol.write_zeroes(512, 1024).await?;
    let got = vol.read(0, 3 << 20).await?;
    let mut want = data.clone();
    want[(1 << 20) - 4096..(2 << 20) + 4096].fill(0);
    want[512..1536].fill(0);
    assert!(
        got == want,
        "discarded ranges must read as zeros, others unchanged"
    );
    // Discarded blocks take no space: every replica's digest agrees and the
    // number of stored pairs shrank accordingly.
    let mut stored = 0;
    for g in 1..=cluster.spec.data_groups {
        let (kvs, _) = cluster
            .wait_replicas_identical(g, Duration::from_secs(10))
            .await?;
        stored += kvs;
    }
    // 3 MiB written = 768 blocks; 258 fully discarded.
    assert_eq!(stored, 768 - 258, "blocks stored after discard");
    vol.flush().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_catalog_operations() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    let a = client.create_volume("a", 1 << 20).await?;
    let b = client.create_volume("b", 2 << 20).await?;
    assert_ne!(a.id, b.id);
    assert!(matches!(
        client.create_volume("a", 1 << 20).await,
        Err(ClientError::VolumeExists(_))
    ));
    let names: Vec<String> = client
        .list_volumes()
        .await?
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    let grown = client.grow_volume("a", 3 << 20).await?;
    assert_eq!(grown.size_bytes, 3 << 20);
    assert!(matches!(
        client.grow_volume("a", 1 << 20).await,
        Err(ClientError::InvalidArgument(_))
    ));
    // I/O past the old size works after growing.
    let va = client.open_volume("a").await?;
    va.write((3 << 20) - 4096, &payload(1, 4096)).await?;
    assert_eq!(va.read((3 << 20) - 4096, 4096).await?, payload(1, 4096));
    client.delete_volume("a").await?;
    assert!(matches!(
        client.volume_info("a").await,
        Err(ClientError::NoSuchVolume(_))
    ));
    // A new volume with the old name starts empty (new id, old blocks gone).
    let a2 = client.create_volume("a", 3 << 20).await?;
    assert_ne!(a2.id, a.id);
    let va2 = client.open_volume("a").await?;
    assert!(va2
        .read((3 << 20) - 4096, 4096)
        .await?
        .iter()
        .all(|&x| x == 0));
    // The deleted volume's blocks are purged in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut total = 0;
        for g in 1..=cluster.spec.data_groups {
            total += cluster.digest(1, g).await?.1;
        }
        if total == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{total} blocks of the deleted volume were not purged"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// A write retried with the same request id after a newer write completed
/// is answered from its first copy, never applied again (which would undo
/// the newer write); a new id is a new write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_writes_apply_at_most_once() -> anyhow::Result<()> {
    use raftblk_proto::block_io_client::BlockIoClient;
    use raftblk_proto::{placement, BlockRange, ReadRequest, WriteRequest};
    let mut cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(HEALTHY).await?;
    let client = cluster.client().await?;
    let info = client.create_volume("once", 1 << 20).await?;
    let group = placement::chunk_group(info.id, 0, cluster.spec.data_groups);
    let leader = cluster
        .leader_of(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let ch = cluster.channel(leader).await?;
    let mut bio = BlockIoClient::new(ch);
    let range = Some(BlockRange {
        group_id: group,
        volume_id: info.id,
        offset_bytes: 8192,
        length_bytes: 4096,
    });
    // A retry says how long ago its first attempt was sent.
    let write = |data: Vec<u8>, id: u8, retry_age_ms: u64| WriteRequest {
        range,
        data: data.into(),
        request_id: vec![id; 16].into(),
        retry_age_ms,
        // Never attached: any epoch from 1 up passes the fence.
        epoch: 1,
        clone: None,
    };
    let read = || ReadRequest {
        range,
        ..Default::default()
    };
    let (w1, w2) = (payload(1, 4096), payload(2, 4096));
    for (req, what) in [
        (write(w1.clone(), 1, 0), "first write"),
        (write(w2.clone(), 2, 0), "second write"),
        (write(w1.clone(), 1, 50), "retry of the first write"),
    ] {
        let r = bio.write(req).await?.into_inner();
        anyhow::ensure!(r.error.is_none(), "{what}: {:?}", r.error);
    }
    let got = bio.read(read()).await?.into_inner();
    anyhow::ensure!(got.error.is_none(), "{:?}", got.error);
    assert!(
        got.data[..] == w2[..],
        "the retried first write was applied again over the second"
    );
    // After every node restarts, a retry still finds its first copy (the
    // ids are reloaded from the raft log).
    for i in 1..=3 {
        cluster.stop(i);
        cluster.start_node(i)?;
    }
    cluster.wait_healthy(HEALTHY).await?;
    let leader = cluster
        .leader_of(group)
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader after restart"))?;
    let ch = cluster.channel(leader).await?;
    let mut bio = BlockIoClient::new(ch);
    let r = bio.write(write(w1.clone(), 1, 5000)).await?.into_inner();
    anyhow::ensure!(r.error.is_none(), "retry after restart: {:?}", r.error);
    let got = bio.read(read()).await?.into_inner();
    anyhow::ensure!(got.error.is_none(), "{:?}", got.error);
    assert!(
        got.data[..] == w2[..],
        "after a restart, the retried first write was applied again"
    );
    // A different id is a new request: it applies.
    let r = bio.write(write(w1.clone(), 3, 0)).await?.into_inner();
    anyhow::ensure!(r.error.is_none(), "{:?}", r.error);
    let got = bio.read(read()).await?.into_inner();
    assert!(got.data[..] == w1[..], "a new request id must apply");
    Ok(())
}
