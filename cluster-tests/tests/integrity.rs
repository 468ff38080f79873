//! Integrity: bytes of stored block data flipped on one stopped replica are
//! never returned to a reader. The corrupt replica reports a checksum
//! error (counted), hands leadership to a healthy replica, the client's
//! retry reads the good copy, and the bad copy is repaired through raft
//! from the new leader's verified copy.

use std::time::Duration;

use raftblk_cluster_tests::{payload, ClusterSpec, LocalCluster};
use raftblk_node::engine::Engine;
use raftblk_node::keys;
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::{placement, BlockRange, ErrorCode, ReadRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_never_returned() -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(ClusterSpec::default())?;
    cluster.wait_healthy(Duration::from_secs(30)).await?;
    let client = cluster.client().await?;
    let info = client.create_volume("crc", 1 << 20).await?;
    let vol = client.open_volume("crc").await?;
    let data = payload(3, 64 * 1024);
    vol.write(0, &data).await?;
    let group = placement::chunk_group(info.id, 0, cluster.spec.data_groups);
    cluster
        .wait_replicas_identical(group, Duration::from_secs(10))
        .await?;

    // Flip bytes of block 2 on one replica while it is stopped.
    let victim = 1usize;
    cluster.stop(victim);
    {
        let engine = Engine::open(&cluster.data_dir(victim))?;
        let key = keys::block(group, info.id, 2);
        let mut stored = engine
            .get_kv(&key)?
            .ok_or_else(|| anyhow::anyhow!("block 2 not stored"))?;
        stored[100] ^= 0xff;
        stored[2000] ^= 0x01;
        engine.db().put_cf(engine.kv_cf(), &key, &stored)?;
        engine.db().flush_cf(engine.kv_cf())?;
    }
    cluster.start_node(victim)?;
    cluster.wait_healthy(Duration::from_secs(30)).await?;
    cluster
        .transfer_leader(group, victim, Duration::from_secs(15))
        .await?;

    // Asked directly, the corrupt leader answers with an error, not bytes.
    let ch = cluster.channel(victim).await?;
    let resp = BlockIoClient::new(ch)
        .read(ReadRequest {
            range: Some(BlockRange {
                group_id: group,
                volume_id: info.id,
                offset_bytes: 8192,
                length_bytes: 4096,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let err = resp
        .error
        .ok_or_else(|| anyhow::anyhow!("corrupt block was served"))?;
    assert_eq!(err.kind(), ErrorCode::Corrupted, "{err}");
    assert!(resp.data.is_empty());
    assert!(err.message.contains("checksum"), "{err}");
    let s = cluster.status(victim).await?;
    assert!(s.checksum_errors >= 1, "checksum error not counted");

    // Through the client: the read succeeds with the good copy.
    let got = vol.read(0, 64 * 1024).await?;
    assert!(got == data, "client read returned wrong bytes");
    let leader = cluster.leader_of(group).await;
    assert_ne!(
        leader,
        Some(victim),
        "the corrupt replica should have given up leadership"
    );
    Ok(())
}
