//! Raft transport, sending side, for snapshots: one stream per transfer,
//! read from a DB snapshot in bounded pieces, every block verified on the
//! way out, abandoned only when it stops making progress.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::Message;
use raftblk_proto::raft_transport_client::RaftTransportClient;
use raftblk_proto::{RaftEnvelope, SnapshotKv, SnapshotPiece, GRPC_MESSAGE_BYTES_MAX};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{connect, STALL_CHECK};
use crate::block;
use crate::counters::{Counters, Suspects};
use crate::engine::{Engine, OwnedSnapshot};
use crate::keys;
use crate::metrics::METRICS;

/// What a snapshot is read from, and where corrupt blocks are reported.
pub(super) struct SnapshotSource {
    pub(super) snap: OwnedSnapshot,
    pub(super) engine: Engine,
    pub(super) suspects: Arc<Suspects>,
    pub(super) counters: Arc<Counters>,
    pub(super) throttle: Arc<crate::throttle::Throttle>,
}

/// Streams one snapshot. Every block is verified on the way out: a corrupt
/// one aborts the transfer (raft retries later) and is queued for repair,
/// so corruption never spreads to a new replica.
///
/// A transfer is bounded by progress, not by its total time: it is
/// abandoned only when no piece has gone out for `stall` (the receiver
/// stopped reading, the link is gone), so a group of any size finishes at
/// any throttle.
pub(super) async fn send_snapshot(
    from: u64,
    addr: String,
    group: u64,
    msg: Message,
    source: SnapshotSource,
    piece_bytes: usize,
    stall: Duration,
) -> anyhow::Result<()> {
    let SnapshotSource {
        snap,
        engine,
        suspects,
        counters,
        throttle,
    } = source;
    let to = crate::membership::node_of(msg.to);
    let header = RaftEnvelope {
        group_id: group,
        message: msg.write_to_bytes()?.into(),
        ..Default::default()
    };
    let (ptx, prx) = mpsc::channel::<SnapshotPiece>(2);
    // Bytes handed to the stream so far (the channel holds two pieces: a
    // receiver that stops reading stops this count).
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent_by_producer = sent.clone();
    let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let first = SnapshotPiece {
            from_node: from,
            to_node: to,
            header: Some(header),
            ..Default::default()
        };
        ptx.blocking_send(first)
            .map_err(|_| anyhow::anyhow!("receiver closed"))?;
        let (start, end) = keys::group_range(group);
        let mut kvs = Vec::new();
        let mut bytes = 0usize;
        let mut total = 0u64;
        let mut closed = false;
        let mut corrupt: Option<(u64, u64)> = None;
        snap.scan_kv(&engine, &start, &end, |k, v| {
            if let Some((volume, b)) = keys::parse_block(group, k) {
                if block::decode(v).is_err() {
                    counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    suspects.note(group, volume, b);
                    corrupt = Some((volume, b));
                    return false;
                }
            }
            bytes += k.len() + v.len() + 8;
            total += 1;
            kvs.push(SnapshotKv {
                key: k.to_vec().into(),
                value: v.to_vec().into(),
            });
            if bytes >= piece_bytes {
                let piece = SnapshotPiece {
                    from_node: from,
                    to_node: to,
                    kvs: std::mem::take(&mut kvs),
                    ..Default::default()
                };
                throttle.wait_blocking(bytes as u64);
                if ptx.blocking_send(piece).is_err() {
                    closed = true;
                    return false;
                }
                sent_by_producer.fetch_add(bytes as u64, Ordering::Relaxed);
                METRICS.snapshot_sent_bytes.inc_by(bytes as u64);
                bytes = 0;
            }
            true
        })?;
        if let Some((volume, b)) = corrupt {
            anyhow::bail!(
                "block {b} of volume {volume} fails its checksum here: not sent, repair queued"
            );
        }
        if closed {
            anyhow::bail!("receiver closed mid-transfer");
        }
        let last = SnapshotPiece {
            from_node: from,
            to_node: to,
            kvs,
            done: true,
            total_kvs: total,
            ..Default::default()
        };
        ptx.blocking_send(last)
            .map_err(|_| anyhow::anyhow!("receiver closed"))?;
        METRICS.snapshot_sent_bytes.inc_by(bytes as u64);
        Ok(())
    });
    let transfer = async {
        let channel = connect(&addr).await?;
        let mut client = RaftTransportClient::new(channel)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        client.snapshot(ReceiverStream::new(prx)).await?;
        anyhow::Ok(())
    };
    let watchdog = async {
        let mut seen = 0u64;
        let mut moved = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(STALL_CHECK).await;
            let now = sent.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                moved = tokio::time::Instant::now();
            } else if moved.elapsed() >= stall {
                return seen;
            }
        }
    };
    tokio::select! {
        r = transfer => r?,
        bytes = watchdog => {
            // Dropping the stream ends the producer at its next piece.
            anyhow::bail!(
                "snapshot transfer stalled: nothing sent for {} s after {bytes} bytes",
                stall.as_secs()
            );
        }
    }
    producer.await??;
    Ok(())
}
