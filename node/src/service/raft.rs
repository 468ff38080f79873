//! Raft transport, receiving side: decodes batches of raft messages from
//! peer streams into the store's inbox, and stages incoming snapshots to
//! files in bounded pieces.
//!
//! Raft messages are decoded with raft-rs's protobuf 2 codec (which has
//! RUSTSEC-2024-0437, unbounded recursion in `skip_group`): only cluster
//! peers may reach this service; deployments must keep the node port on a
//! trusted network.

use std::sync::atomic::{AtomicU64, Ordering};

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use raftblk_proto::raft_transport_server::RaftTransport;
use raftblk_proto::{Empty, RaftBatch, SnapshotPiece};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::msg::StoreMsg;
use crate::snapshot_file::SnapshotWriter;
use crate::store::StoreHandle;

/// Envelopes accepted in one batch.
const BATCH_ENVELOPES_MAX: usize = 4096;
/// How often a raft stream re-checks its sender's certificate against the
/// current CRL and clock (the role gate saw it once, when the stream
/// opened).
const PEER_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Refuses a stream whose sender's certificate was revoked or expired
/// since the stream opened.
fn still_trusted(peer: Option<&raftblk_tls::PeerInfo>, from: u64) -> Result<(), Status> {
    let Some(p) = peer else {
        return Ok(());
    };
    match p.no_longer_valid() {
        None => Ok(()),
        Some(why) => {
            tracing::warn!(node = from, subject = %p.subject, why, "raft stream cut: its certificate may no longer be used");
            Err(Status::permission_denied(format!(
                "the certificate ({}) was {why}",
                p.subject
            )))
        }
    }
}

pub struct RaftService {
    pub store: StoreHandle,
    pub store_tx: mpsc::Sender<StoreMsg>,
    pub nonce: AtomicU64,
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<Empty>, Status> {
        let me = self.store.config.node_id;
        let peer = req.extensions().get::<raftblk_tls::PeerInfo>().cloned();
        let mut checked = std::time::Instant::now();
        let mut stream = req.into_inner();
        // The sender, checked on its first batch: later ones must match.
        let mut sender: Option<(u64, bytes::Bytes)> = None;
        // Its series of the received-message counters, resolved once.
        let mut received = None;
        while let Some(batch) = stream.message().await? {
            if batch.to_node != me {
                return Err(Status::invalid_argument(format!(
                    "batch for node {} reached node {me}",
                    batch.to_node
                )));
            }
            match &sender {
                Some((n, u)) if *n == batch.from_node && *u == batch.from_store_uuid => {}
                Some(_) => {
                    return Err(Status::invalid_argument("a raft stream changed its sender"))
                }
                None => {
                    if let Some(p) = &peer {
                        p.speaks_for(batch.from_node)?;
                    }
                    check_sender(&self.store, batch.from_node, &batch.from_store_uuid)?;
                    sender = Some((batch.from_node, batch.from_store_uuid.clone()));
                    let peer = [batch.from_node.to_string()];
                    let m = &*crate::metrics::METRICS;
                    received = Some((
                        m.raft_received.with_label_values(&peer),
                        m.raft_received_bytes.with_label_values(&peer),
                    ));
                }
            }
            if batch.envelopes.len() > BATCH_ENVELOPES_MAX {
                return Err(Status::invalid_argument("too many envelopes in one batch"));
            }
            if checked.elapsed() >= PEER_RECHECK {
                checked = std::time::Instant::now();
                still_trusted(peer.as_ref(), batch.from_node)?;
            }
            self.store.liveness.heard(batch.from_node);
            if let Some((count, bytes)) = &received {
                count.inc_by(batch.envelopes.len() as u64);
                bytes.inc_by(batch.envelopes.iter().map(|e| e.message.len() as u64).sum());
            }
            if batch.envelopes.is_empty() {
                // A keepalive: nothing for the store.
                continue;
            }
            let mut msgs = Vec::with_capacity(batch.envelopes.len());
            for env in batch.envelopes {
                if env.hibernate {
                    let h = StoreMsg::Hibernate {
                        from: batch.from_node,
                        group: env.group_id,
                        term: env.term,
                        commit: env.commit,
                    };
                    if self.store_tx.send(h).await.is_err() {
                        return Err(Status::unavailable("store stopped"));
                    }
                    continue;
                }
                if env.gc {
                    let gc = StoreMsg::RaftGc {
                        from: batch.from_node,
                        group: env.group_id,
                        conf_ver: env.conf_ver,
                        peer: env.gc_peer,
                    };
                    if self.store_tx.send(gc).await.is_err() {
                        return Err(Status::unavailable("store stopped"));
                    }
                    continue;
                }
                match Message::parse_from_bytes(&env.message) {
                    Ok(m) if crate::membership::node_of(m.from) != batch.from_node => {
                        tracing::warn!(
                            from = batch.from_node,
                            claimed = m.from,
                            "raft message from another node than its stream's"
                        )
                    }
                    Ok(m) if m.get_msg_type() != MessageType::MsgSnapshot => {
                        msgs.push((env.group_id, env.conf_ver, m))
                    }
                    Ok(_) => tracing::warn!(
                        from = batch.from_node,
                        "snapshot on the message stream ignored"
                    ),
                    Err(e) => {
                        tracing::warn!(from = batch.from_node, error = %e, "undecodable raft message")
                    }
                }
            }
            if msgs.is_empty() {
                continue;
            }
            if self.store_tx.send(StoreMsg::Raft { msgs }).await.is_err() {
                return Err(Status::unavailable("store stopped"));
            }
        }
        Ok(Response::new(Empty {}))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotPiece>>,
    ) -> Result<Response<Empty>, Status> {
        let me = self.store.config.node_id;
        let peer = req.extensions().get::<raftblk_tls::PeerInfo>().cloned();
        let mut stream = req.into_inner();
        let stall = std::time::Duration::from_secs(self.store.config.placement.snapshot_stall_secs);
        let first = tokio::time::timeout(stall, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("snapshot stream sent no header"))??;
        let Some(first) = first else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        if let Some(p) = &peer {
            p.speaks_for(first.from_node)?;
        }
        let header = first
            .header
            .ok_or_else(|| Status::invalid_argument("first snapshot piece lacks the header"))?;
        let msg = Message::parse_from_bytes(&header.message)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot header: {e}")))?;
        if msg.get_msg_type() != MessageType::MsgSnapshot
            || crate::membership::node_of(msg.to) != me
            || crate::membership::node_of(msg.from) != first.from_node
            || first.to_node != me
        {
            return Err(Status::invalid_argument(
                "snapshot header is not a MsgSnapshot from the stream's sender to this node",
            ));
        }
        let group = header.group_id;
        if self.store.view(group).is_none() {
            return Err(Status::invalid_argument(format!(
                "group {group} is not hosted here"
            )));
        }
        let meta = msg.get_snapshot().get_metadata();
        let dir = self.store.config.data_dir.join("snap");
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
        let mut writer = SnapshotWriter::create(&dir, group, meta.index, meta.term, nonce)
            .map_err(|e| Status::internal(e.to_string()))?;
        // Every way out but success removes the partial file.
        let total = match receive_pieces(&mut stream, &mut writer, stall).await {
            Ok(total) => total,
            Err(e) => {
                writer.abandon();
                return Err(e);
            }
        };
        // The stream may have run for minutes: its sender must still be
        // trusted for the snapshot to count.
        if let Err(e) = still_trusted(peer.as_ref(), first.from_node) {
            writer.abandon();
            return Err(e);
        }
        if total != writer.count() {
            let got = writer.count();
            writer.abandon();
            return Err(Status::data_loss(format!(
                "snapshot stream incomplete: {got} of {total} pairs"
            )));
        }
        let path = tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(
            group,
            index = meta.index,
            pairs = total,
            "snapshot received"
        );
        crate::metrics::METRICS.snapshots_received.inc();
        let staged = path.clone();
        if self
            .store_tx
            .send(StoreMsg::SnapshotReceived {
                group,
                msg: Box::new(msg),
                path,
            })
            .await
            .is_err()
        {
            let _ = std::fs::remove_file(staged);
            return Err(Status::unavailable("store stopped"));
        }
        Ok(Response::new(Empty {}))
    }
}

/// Refuses a raft stream from a node whose data directory is not the one
/// the cluster map records for its id (a wiped or replaced disk that came
/// back under the old id: its empty log and lost votes must not count), or
/// from a removed node.
fn check_sender(store: &StoreHandle, from: u64, uuid: &[u8]) -> Result<(), Status> {
    if store.book.is_removed(from) {
        return Err(Status::permission_denied(format!(
            "node {from} was removed from the cluster"
        )));
    }
    let Some(map) = store.book.map() else {
        return Ok(());
    };
    if let Some(rec) = map.nodes.iter().find(|n| n.id == from) {
        if !rec.store_uuid.is_empty() && rec.store_uuid.as_ref() != uuid {
            tracing::warn!(
                from,
                "raft stream refused: the sender's data directory is not the one the cluster knows"
            );
            return Err(Status::permission_denied(format!(
                "node {from}'s data directory is not the one the cluster knows: remove node {from} and join under a new id"
            )));
        }
    }
    Ok(())
}

/// Writes the pieces after the header into `writer`; the total number of
/// pairs the sender announced in its last piece.
async fn receive_pieces(
    stream: &mut Streaming<SnapshotPiece>,
    writer: &mut SnapshotWriter,
    stall: std::time::Duration,
) -> Result<u64, Status> {
    let mut total = None;
    loop {
        // Bounded by progress: each piece within `stall` of the last.
        let next = tokio::time::timeout(stall, stream.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "snapshot stream stalled: no piece for {} s",
                    stall.as_secs()
                ))
            })??;
        let Some(piece) = next else { break };
        if total.is_some() {
            return Err(Status::invalid_argument(
                "snapshot pieces after the last one",
            ));
        }
        let bytes: usize = piece
            .kvs
            .iter()
            .map(|kv| kv.key.len() + kv.value.len() + 8)
            .sum();
        crate::metrics::METRICS
            .snapshot_received_bytes
            .inc_by(bytes as u64);
        for kv in &piece.kvs {
            writer
                .push(&kv.key, &kv.value)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if piece.done {
            total = Some(piece.total_kvs);
        }
    }
    total.ok_or_else(|| Status::data_loss("snapshot stream ended before its last piece"))
}
